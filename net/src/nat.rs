//! `--net nat`: masquerade the NAT boxes' traffic out of the host, and keep every other
//! box on its link.
//!
//! What this changes on the host, exactly:
//! - the nftables table `ip twinbox`, replaced as a whole in one atomic `nft` transaction
//!   (so applying it twice leaves the same ruleset, and concurrent runs cannot interleave):
//!   ```text
//!   table ip twinbox {
//!       chain postrouting {
//!           type nat hook postrouting priority srcnat; policy accept;
//!           iifname "tbn*" oifname != "tb*" masquerade
//!       }
//!       chain forward {
//!           type filter hook forward priority filter; policy accept;
//!           iifname "tbn*" oifname != "tb*" accept
//!           iifname != "tb*" oifname "tbn*" ct state established,related accept
//!           iifname "tb*" drop
//!           oifname "tb*" drop
//!           iifname != "tb*" oifname != "tb*" drop   # only if twinbox turned ip_forward on
//!       }
//!   }
//!   ```
//!   `tb*` is every box link's host end, `tbn*` the NAT ones (`ifname.rs`: veth `tbn<i>`,
//!   tap `tbnt<i>`; plain `--net` links are `tb<i>`, `tbt<i>`). So only a NAT box's traffic
//!   leaving through a non-box interface is forwarded and rewritten, only replies to its
//!   connections come back in, and nothing is forwarded from or to any other box link:
//!   not a plain `--net` box's (it reaches the host alone, table or not), not box to box.
//!   The rules name interfaces, not address pools, so runs with different pools
//!   (`TWINBOX_NET_POOL`) install the same table and never undo each other. Box-to-host
//!   traffic is not forwarded and is untouched. Other interfaces whose names start with
//!   `tb` are treated as box links too;
//! - `net.ipv4.ip_forward` set to 1 if it was 0, after the table is in (below). The
//!   kernel copies that write to every interface's
//!   `forwarding`, so the plain `--net` host ends are set back to 0 right after
//!   (`forwarding.rs`); each box's host end has its own `forwarding` (1 for NAT, 0 for
//!   plain links) from its creation on, with or without this table.
//!
//! A host that was no router must not become one: `ip_forward` is global, so turning it on
//! for the NAT boxes would also route between the host's other interfaces (two NICs, a VPN
//! and a LAN), which our `tb*` rules do not see. The host counts as a router when
//! `ip_forward` is 1 or any interface not named `tb*` has its own `conf/<if>/forwarding`
//! at 1 (IPv4 forwarding is decided by the receiving interface's value, so a host routing
//! on one link only — systemd-networkd's per-link `IPForward=` — routes with `ip_forward`
//! at 0) ([`plan`], [`routing_interfaces`]). When it was none, twinbox is the one that
//! turns `ip_forward` on: it writes the note [`FORWARDING_NOTE`] (holding this boot's
//! `/proc/sys/kernel/random/boot_id`, so a note from another boot — /run not a tmpfs —
//! counts for nothing) and the forward chain gets the last rule above, which drops
//! forwarding between two interfaces that are not box links — as Docker sets the FORWARD
//! policy to drop when it turns forwarding on. A run that finds `ip_forward` at 1 keeps
//! that rule exactly when the note of this boot exists (an earlier run turned it on), so
//! every run installs the same table. A host that routed before twinbox keeps its
//! routing: no such rule, no note. (Per-interface `forwarding=0` on the uplink would not
//! do: a masqueraded reply is forwarded from the uplink to the box.) Where only some
//! interfaces forwarded, the write of `ip_forward` sets every interface's `forwarding` to 1
//! (the kernel's copy, above): the host then routes between all its interfaces.
//!
//! Order, so that no failure or kill leaves a router unguarded: under the lock
//! [`LOCK`] (two runs, or a run and [`remove`], take turns), [`apply`] reads, writes the
//! note if it is to turn `ip_forward` on, installs the table (with the drop rule), and only
//! then writes the sysctl. If `nft` fails (not installed, too old, no nf_tables) the sysctl
//! is left as it was and the note this run wrote is unlinked; if the sysctl write fails
//! the note is unlinked too. A kill after the note and before the sysctl leaves a note
//! with `ip_forward` at 0, which the next run rewrites.
//!
//! The limit: something that starts routing after twinbox turned `ip_forward` on in this
//! boot (Docker or libvirt started later, an admin's sysctl) has its forwarding between
//! non-box interfaces dropped by the last rule, and every later `--net nat` run installs
//! it again while the note is there. The remedy, by hand (the `--net nat` help says so):
//! `nft delete table ip twinbox` and `rm /run/twinbox/ip_forward-turned-on-by-twinbox`;
//! the next run then finds a router and adds no drop rule. [`remove`] does more (and
//! turns `ip_forward` off): it is for tests and uninstall.
//!
//! The table stays after the run (it matches nothing without boxes); [`remove`] turns
//! `ip_forward` off first if the note says twinbox turned it on, then deletes the table,
//! then the note.
//! An accept here cannot override a drop in another table on the same hook (for example
//! a firewall whose forward policy is drop): such a host must allow `tbn*` itself.
//!
//! Written with the `nftables` crate, which builds the ruleset as typed JSON and hands it
//! to `nft -j -f -`: nftables' own netlink wire format is unstable between versions and
//! has no maintained pure-Rust encoder, while `nft`'s JSON is its documented interface.
//! The `nft` binary (Debian package `nftables`) is therefore needed for `--net nat` only.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, CT};
use nftables::helper::{self, NftablesError};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Accept, Drop, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::error::{Error, Result};

/// The table's name (family `ip`).
pub const TABLE: &str = "twinbox";
/// The pattern that matches the host end of every box link.
pub const INTERFACE_PATTERN: &str = "tb*";
/// The pattern that matches the host end of every `--net nat` box link.
pub const NAT_INTERFACE_PATTERN: &str = "tbn*";
/// The sysctl turned on by [`apply`].
pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// Exists while `ip_forward` is on because twinbox turned it on; holds the boot's id
/// ([`BOOT_ID`]), so it counts in that boot only.
pub const FORWARDING_NOTE: &str = "/run/twinbox/ip_forward-turned-on-by-twinbox";
/// Held by [`apply`] and [`remove`] from their first read to their last write.
pub const LOCK: &str = "/run/twinbox/nat.lock";
/// This boot's id, as the kernel gives it.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// Each interface's IPv4 settings, `forwarding` among them.
const INTERFACES: &str = "/proc/sys/net/ipv4/conf";

/// Who made this host forward IPv4, which decides whether the table guards the host's
/// other interfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    /// The host forwarded before twinbox: its routing between other interfaces is its own.
    Host,
    /// twinbox turned `ip_forward` on: forwarding between non-box interfaces is dropped.
    Twinbox,
}

/// What [`apply`] does on a host as it found it (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Which table to install.
    pub forwarding: Forwarding,
    /// Write [`FORWARDING_NOTE`] before the table (a [`Forwarding::Host`] plan removes
    /// any note instead).
    pub write_note: bool,
    /// Write 1 to `ip_forward` after the table.
    pub turn_on: bool,
}

/// The decision of [`apply`]: `ip_forward_on` as read, `routing_interfaces` the non-box
/// interfaces forwarding on their own ([`routing_interfaces`]), `noted` whether a note of
/// this boot exists.
pub fn plan(ip_forward_on: bool, routing_interfaces: &[String], noted: bool) -> Plan {
    let (forwarding, write_note, turn_on) = match (ip_forward_on, noted) {
        (true, true) => (Forwarding::Twinbox, false, false),
        (true, false) => (Forwarding::Host, false, false),
        // A note with ip_forward at 0: someone turned it off since, or a run died before
        // its write; either way it counts for nothing now.
        (false, _) if !routing_interfaces.is_empty() => (Forwarding::Host, false, true),
        (false, _) => (Forwarding::Twinbox, true, true),
    };
    Plan {
        forwarding,
        write_note,
        turn_on,
    }
}

/// The interfaces that forward what they receive, of `values` (each interface's name under
/// /proc/sys/net/ipv4/conf and its `forwarding`): not `all` (the copy of `ip_forward`),
/// not `default` (the value new interfaces start with), not a box link (`tb*`, which
/// twinbox sets per box).
pub fn routing_interfaces(values: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let box_prefix = INTERFACE_PATTERN.trim_end_matches('*');
    let mut names: Vec<String> = values
        .into_iter()
        .filter(|(name, value)| {
            name != "all"
                && name != "default"
                && !name.starts_with(box_prefix)
                && value.trim() == "1"
        })
        .map(|(name, _)| name)
        .collect();
    names.sort();
    names
}

/// Whether `note` (the note's text, if it is a regular file) was written in the boot
/// `boot_id`.
pub fn noted_this_boot(note: Option<&str>, boot_id: &str) -> bool {
    note.is_some_and(|text| !boot_id.trim().is_empty() && text.trim() == boot_id.trim())
}

/// Install (or replace) the `ip twinbox` table, then turn on ip_forward if the host did
/// not forward (see the module doc for the order and why).
pub fn apply() -> Result<()> {
    let _lock = lock()?;
    let ip_forward_on = read_ip_forward()?;
    let boot_id = boot_id()?;
    let noted = noted_this_boot(read_note()?.as_deref(), &boot_id);
    let routing = if ip_forward_on {
        Vec::new()
    } else {
        routing_interfaces(interface_forwarding())
    };
    let plan = plan(ip_forward_on, &routing, noted);
    if plan.forwarding == Forwarding::Host {
        // A note of another boot, or one a killed run left with ip_forward at 0 before
        // this host was found routing: kept, it would make the next run drop its routing.
        remove_note()?;
    }
    if plan.write_note {
        write_note(&boot_id)?;
    }
    let undo_note = |error: Error| {
        if plan.write_note {
            let _ = remove_note();
        }
        error
    };
    run_nft("apply", &ruleset(plan.forwarding)).map_err(undo_note)?;
    if plan.turn_on {
        write_ip_forward(true).map_err(undo_note)?;
        crate::forwarding::close_link_mode_interfaces();
    }
    tracing::debug!(?plan, ?routing, "nat table ip twinbox applied");
    Ok(())
}

/// Undo [`apply`] (for tests and uninstall): if the note of this boot says twinbox turned
/// `ip_forward` on, turn it off first (then nothing is forwarded while the table goes),
/// then delete the `ip twinbox` table if it exists, then the note.
pub fn remove() -> Result<()> {
    let _lock = lock()?;
    if noted_this_boot(read_note()?.as_deref(), &boot_id()?) {
        write_ip_forward(false)?;
    }
    let mut batch = Batch::new();
    // `add` first makes `delete` succeed when the table is absent.
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    run_nft("remove", &batch.to_nftables())?;
    remove_note()
}

/// The whole transaction [`apply`] sends: create-if-missing, delete, then the table anew.
pub fn ruleset(forwarding: Forwarding) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    batch.add(NfListObject::Table(table()));
    batch.add(NfListObject::Chain(base_chain(
        "postrouting",
        NfChainType::NAT,
        NfHook::Postrouting,
        100, // srcnat
    )));
    batch.add(NfListObject::Chain(base_chain(
        "forward",
        NfChainType::Filter,
        NfHook::Forward,
        0, // filter
    )));
    let from_nat_box_out = || {
        vec![
            matches(meta(MetaKey::Iifname), Operator::EQ, nat_boxes()),
            matches(meta(MetaKey::Oifname), Operator::NEQ, boxes()),
        ]
    };
    let mut masquerade = from_nat_box_out();
    masquerade.push(Statement::Masquerade(None));
    batch.add(NfListObject::Rule(rule("postrouting", masquerade)));

    let mut out = from_nat_box_out();
    out.push(accept());
    let replies = vec![
        matches(meta(MetaKey::Iifname), Operator::NEQ, boxes()),
        matches(meta(MetaKey::Oifname), Operator::EQ, nat_boxes()),
        matches(
            Expression::Named(NamedExpression::CT(CT {
                key: "state".into(),
                family: None,
                dir: None,
            })),
            Operator::IN,
            Expression::List(vec![
                Expression::String("established".into()),
                Expression::String("related".into()),
            ]),
        ),
        accept(),
    ];
    batch.add(NfListObject::Rule(rule("forward", out)));
    batch.add(NfListObject::Rule(rule("forward", replies)));
    for key in [MetaKey::Iifname, MetaKey::Oifname] {
        batch.add(NfListObject::Rule(rule(
            "forward",
            vec![
                matches(meta(key), Operator::EQ, boxes()),
                Statement::Drop(Some(Drop {})),
            ],
        )));
    }
    if forwarding == Forwarding::Twinbox {
        batch.add(NfListObject::Rule(rule(
            "forward",
            vec![
                matches(meta(MetaKey::Iifname), Operator::NEQ, boxes()),
                matches(meta(MetaKey::Oifname), Operator::NEQ, boxes()),
                Statement::Drop(Some(Drop {})),
            ],
        )));
    }
    batch.to_nftables()
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::IP,
        name: TABLE.into(),
        handle: None,
    }
}

fn base_chain(name: &'static str, kind: NfChainType, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: name.into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

fn rule(chain: &'static str, expr: Vec<Statement<'static>>) -> Rule<'static> {
    Rule {
        family: NfFamily::IP,
        table: TABLE.into(),
        chain: chain.into(),
        expr: expr.into(),
        ..Rule::default()
    }
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn boxes() -> Expression<'static> {
    Expression::String(Cow::Borrowed(INTERFACE_PATTERN))
}

fn nat_boxes() -> Expression<'static> {
    Expression::String(Cow::Borrowed(NAT_INTERFACE_PATTERN))
}

fn accept() -> Statement<'static> {
    Statement::Accept(Some(Accept {}))
}

fn sysctl_error(path: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => Error::NotPermitted {
            call: "write",
            interface: path.to_string(),
            source,
        },
        _ => Error::Sysctl {
            path: PathBuf::from(path),
            source,
        },
    }
}

fn read_ip_forward() -> Result<bool> {
    let now = std::fs::read_to_string(IP_FORWARD).map_err(sysctl_error(IP_FORWARD))?;
    Ok(now.trim() == "1")
}

fn write_ip_forward(on: bool) -> Result<()> {
    std::fs::write(IP_FORWARD, if on { "1\n" } else { "0\n" }).map_err(sysctl_error(IP_FORWARD))
}

fn boot_id() -> Result<String> {
    std::fs::read_to_string(BOOT_ID)
        .map(|id| id.trim().to_string())
        .map_err(sysctl_error(BOOT_ID))
}

/// Every interface's `forwarding` of this network namespace; one that goes while read is
/// skipped.
fn interface_forwarding() -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(INTERFACES) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let value = std::fs::read_to_string(entry.path().join("forwarding")).ok()?;
            Some((entry.file_name().to_string_lossy().into_owned(), value))
        })
        .collect()
}

fn note_error(source: io::Error) -> Error {
    Error::ForwardingNote {
        path: PathBuf::from(FORWARDING_NOTE),
        source,
    }
}

/// The text of [`FORWARDING_NOTE`] if it is a regular file (a symlink or anything else
/// there counts as no note).
fn read_note() -> Result<Option<String>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(FORWARDING_NOTE);
    let mut file = match file {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        Err(source) => return Err(note_error(source)),
    };
    if !file.metadata().map_err(note_error)?.is_file() {
        return Ok(None);
    }
    let mut text = String::new();
    // A note is a boot id: anything longer is no note of ours.
    (&mut file)
        .take(64)
        .read_to_string(&mut text)
        .map_err(note_error)?;
    Ok(Some(text))
}

/// Write [`FORWARDING_NOTE`] anew with this boot's id, never through a symlink.
fn write_note(boot_id: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    remove_note()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(FORWARDING_NOTE)
        .map_err(note_error)?;
    file.write_all(format!("{boot_id}\n").as_bytes())
        .map_err(note_error)
}

/// Unlink [`FORWARDING_NOTE`] (whatever it is) if it exists.
fn remove_note() -> Result<()> {
    match std::fs::remove_file(FORWARDING_NOTE) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(note_error(source)),
    }
}

/// Takes [`LOCK`] (waiting for the run holding it), creating /run/twinbox (root's, 0755,
/// whatever the umask) if missing; released when the returned lock drops.
fn lock() -> Result<Flock<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = Path::new(LOCK);
    let dir = path.parent().expect("the lock has a directory");
    let error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::LockFile { path, source }
    };
    crate::rundir::ensure(dir).map_err(error(dir))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(error(path))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| error(path)(io::Error::from(errno)))
}

fn run_nft(action: &'static str, ruleset: &Nftables<'_>) -> Result<()> {
    helper::apply_ruleset(ruleset).map_err(|error| match error {
        NftablesError::NftExecution { inner, .. } if inner.kind() == io::ErrorKind::NotFound => {
            Error::NftMissing { source: inner }
        }
        NftablesError::NftFailed { stderr, .. } if stderr.contains("Operation not permitted") => {
            Error::NotPermitted {
                call: "nft",
                interface: format!("table ip {TABLE}"),
                source: io::Error::from_raw_os_error(libc::EPERM),
            }
        }
        NftablesError::NftFailed { stderr, .. } => Error::Nft {
            action,
            detail: stderr.lines().next().unwrap_or("failed").trim().to_string(),
        },
        other => Error::Nft {
            action,
            detail: other.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The rules of `chain`, each as the list of its statements.
    fn rules(json: &Value, chain: &str) -> Vec<Vec<Value>> {
        json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.get("add")?.get("rule"))
            .filter(|r| r["chain"] == chain)
            .map(|r| r["expr"].as_array().unwrap().clone())
            .collect()
    }

    /// `iifname == "tbn*"` and the like, as nft's JSON spells a match.
    fn on(key: &str, op: &str, pattern: &str) -> Value {
        serde_json::json!({"match": {"left": {"meta": {"key": key}}, "op": op, "right": pattern}})
    }

    #[test]
    fn the_ruleset_replaces_the_table_atomically() {
        let json = serde_json::to_value(ruleset(Forwarding::Host)).unwrap();
        let commands = json["nftables"].as_array().expect("a command list");
        let verbs: Vec<&str> = commands
            .iter()
            .map(|c| c.as_object().unwrap().keys().next().unwrap().as_str())
            .collect();
        assert_eq!(
            verbs[..3],
            ["add", "delete", "add"],
            "table is not replaced whole"
        );
        let text = json.to_string();
        for needle in [
            r#""hook":"postrouting""#,
            r#""hook":"forward""#,
            r#""name":"twinbox""#,
            r#""policy":"accept""#,
        ] {
            assert!(text.contains(needle), "ruleset lacks {needle}: {text}");
        }
        assert!(
            !text.contains("ip6"),
            "the table must be family ip only: {text}"
        );
    }

    #[test]
    fn only_nat_links_leaving_the_host_are_masqueraded_whatever_the_pool() {
        let json = serde_json::to_value(ruleset(Forwarding::Twinbox)).unwrap();
        assert_eq!(
            rules(&json, "postrouting"),
            [vec![
                on("iifname", "==", "tbn*"),
                on("oifname", "!=", "tb*"),
                serde_json::json!({"masquerade": null}),
            ]]
        );
        assert!(
            !json.to_string().contains("saddr"),
            "a pool in the table would make two pools replace each other's rule"
        );
    }

    #[test]
    fn forwarding_lets_nat_boxes_out_replies_in_and_drops_every_other_box_link() {
        let json = serde_json::to_value(ruleset(Forwarding::Host)).unwrap();
        let accept = serde_json::json!({"accept": {}});
        let drop = serde_json::json!({"drop": {}});
        let established = serde_json::json!({"match": {
            "left": {"ct": {"key": "state"}},
            "op": "in",
            "right": ["established", "related"],
        }});
        assert_eq!(
            rules(&json, "forward"),
            [
                vec![
                    on("iifname", "==", "tbn*"),
                    on("oifname", "!=", "tb*"),
                    accept.clone()
                ],
                vec![
                    on("iifname", "!=", "tb*"),
                    on("oifname", "==", "tbn*"),
                    established,
                    accept
                ],
                vec![on("iifname", "==", "tb*"), drop.clone()],
                vec![on("oifname", "==", "tb*"), drop],
            ],
            "order matters: the drops come after the two NAT accepts"
        );
    }

    #[test]
    fn a_host_that_twinbox_made_forward_routes_nothing_but_nat_boxes() {
        let host = rules(
            &serde_json::to_value(ruleset(Forwarding::Host)).unwrap(),
            "forward",
        );
        let ours = rules(
            &serde_json::to_value(ruleset(Forwarding::Twinbox)).unwrap(),
            "forward",
        );
        assert_eq!(
            ours[..host.len()],
            host[..],
            "the box rules are the same either way"
        );
        assert_eq!(
            ours[host.len()..],
            [vec![
                on("iifname", "!=", "tb*"),
                on("oifname", "!=", "tb*"),
                serde_json::json!({"drop": {}}),
            ]],
            "forwarding between the host's other interfaces is dropped, last"
        );
        assert!(
            !host.iter().any(|r| r.contains(&on("iifname", "!=", "tb*"))
                && r.contains(&on("oifname", "!=", "tb*"))),
            "a host that routed before twinbox keeps its routing: {host:?}"
        );
    }

    fn forwarding(values: &[(&str, &str)]) -> Vec<String> {
        routing_interfaces(
            values
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string())),
        )
    }

    #[test]
    fn a_host_forwarding_on_one_link_only_is_a_router() {
        // systemd-networkd's IPForward= on wg0 alone: ip_forward stays 0.
        let values = [
            ("all", "0\n"),
            ("default", "0\n"),
            ("lo", "0\n"),
            ("eth0", "0\n"),
            ("wg0", "1\n"),
            ("tbn3", "1\n"),
        ];
        assert_eq!(forwarding(&values), ["wg0"]);
        assert_eq!(
            plan(false, &forwarding(&values), false),
            Plan {
                forwarding: Forwarding::Host,
                write_note: false,
                turn_on: true
            },
            "no drop rule and no note, so remove never turns it off"
        );
    }

    #[test]
    fn box_links_all_and_default_do_not_make_the_host_a_router() {
        let values = [
            ("all", "1\n"),
            ("default", "1\n"),
            ("eth0", "0\n"),
            ("tbn0", "1\n"),
            ("tbnt1", "1\n"),
        ];
        assert!(forwarding(&values).is_empty());
        assert_eq!(
            plan(false, &forwarding(&values), false),
            Plan {
                forwarding: Forwarding::Twinbox,
                write_note: true,
                turn_on: true
            }
        );
    }

    #[test]
    fn ip_forward_on_keeps_the_table_the_note_of_this_boot_says() {
        let keep = |forwarding| Plan {
            forwarding,
            write_note: false,
            turn_on: false,
        };
        assert_eq!(plan(true, &[], true), keep(Forwarding::Twinbox));
        assert_eq!(plan(true, &[], false), keep(Forwarding::Host));
        // ip_forward at 0 with a note of this boot: the note is stale, written anew.
        assert!(plan(false, &[], true).write_note);
        assert_eq!(
            plan(false, &["eth1".into()], true).forwarding,
            Forwarding::Host
        );
    }

    #[test]
    fn a_note_counts_in_its_own_boot_only() {
        let boot = "0b5b3c1e-6f4f-4f6e-9d1e-2c8f3a9d7e11";
        assert!(noted_this_boot(
            Some(&format!("{boot}\n")),
            &format!("{boot}\n")
        ));
        assert!(!noted_this_boot(
            Some("4d0f1c2b-0000-4000-8000-000000000000\n"),
            boot
        ));
        assert!(!noted_this_boot(Some(""), boot), "an empty (older) note");
        assert!(!noted_this_boot(None, boot));
        assert!(
            !noted_this_boot(Some(""), ""),
            "no boot id reads as no note"
        );
    }
}
