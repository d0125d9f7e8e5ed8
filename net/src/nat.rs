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
//! - `net.ipv4.ip_forward` set to 1. The kernel copies that write to every interface's
//!   `forwarding`, so the plain `--net` host ends are set back to 0 right after
//!   (`forwarding.rs`); each box's host end has its own `forwarding` (1 for NAT, 0 for
//!   plain links) from its creation on, with or without this table.
//!
//! A host that was no router must not become one: `ip_forward` is global, so turning it on
//! for the NAT boxes would also route between the host's other interfaces (two NICs, a VPN
//! and a LAN), which our `tb*` rules do not see. So when twinbox is the one that turns it
//! on (it read 0), it first writes the note [`FORWARDING_NOTE`] (under /run, cleared at
//! boot as `ip_forward` is) and the forward chain gets the last rule above, which drops
//! forwarding between two interfaces that are not box links — as Docker sets the FORWARD
//! policy to drop when it turns forwarding on. A run that finds `ip_forward` at 1 keeps
//! that rule exactly when the note exists (an earlier run of this boot turned it on), so
//! every run installs the same table; the note is written before the sysctl, so two runs
//! at once agree whichever reads first. A host that forwarded before twinbox keeps its
//! routing: no such rule. (Per-interface `forwarding=0` on the uplink would not do: a
//! masqueraded reply is forwarded from the uplink to the box.) A host that starts routing
//! by other means after twinbox turned `ip_forward` on (Docker started later, an admin's
//! sysctl) has that traffic dropped by the rule until [`remove`] or a reboot.
//!
//! The table stays after the run (it matches nothing without boxes); [`remove`] deletes it
//! and, if the note says twinbox turned `ip_forward` on, turns it off again.
//! An accept here cannot override a drop in another table on the same hook (for example
//! a firewall whose forward policy is drop): such a host must allow `tbn*` itself.
//!
//! Written with the `nftables` crate, which builds the ruleset as typed JSON and hands it
//! to `nft -j -f -`: nftables' own netlink wire format is unstable between versions and
//! has no maintained pure-Rust encoder, while `nft`'s JSON is its documented interface.
//! The `nft` binary (Debian package `nftables`) is therefore needed for `--net nat` only.

use std::borrow::Cow;
use std::io;
use std::path::PathBuf;

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
/// Exists while `ip_forward` is on because twinbox turned it on (this boot: /run is a
/// tmpfs, cleared at boot as the sysctl is).
pub const FORWARDING_NOTE: &str = "/run/twinbox/ip_forward-turned-on-by-twinbox";

/// Who made this host forward IPv4, which decides whether the table guards the host's
/// other interfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    /// The host forwarded before twinbox: its routing between other interfaces is its own.
    Host,
    /// twinbox turned `ip_forward` on: forwarding between non-box interfaces is dropped.
    Twinbox,
}

/// Install (or replace) the `ip twinbox` table and turn on ip_forward.
pub fn apply() -> Result<()> {
    let forwarding = enable_ip_forward()?;
    run_nft("apply", &ruleset(forwarding))?;
    tracing::debug!(?forwarding, "nat table ip twinbox applied");
    Ok(())
}

/// Delete the `ip twinbox` table if it exists (for tests and uninstall), and turn
/// `ip_forward` off again if twinbox turned it on (then nothing else guards the host).
pub fn remove() -> Result<()> {
    let mut batch = Batch::new();
    // `add` first makes `delete` succeed when the table is absent.
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    run_nft("remove", &batch.to_nftables())?;
    if turned_on_by_twinbox()? {
        std::fs::write(IP_FORWARD, b"0\n").map_err(|source| Error::Sysctl {
            path: PathBuf::from(IP_FORWARD),
            source,
        })?;
        std::fs::remove_file(FORWARDING_NOTE).map_err(|source| Error::ForwardingNote {
            path: PathBuf::from(FORWARDING_NOTE),
            source,
        })?;
    }
    Ok(())
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

/// Turn ip_forward on; when that takes a write, note that twinbox did (before the write,
/// so a run reading 1 right after also sees the note) and close the plain links'
/// forwarding again, which the write opened (see `forwarding.rs`).
fn enable_ip_forward() -> Result<Forwarding> {
    let sysctl_error = |source| Error::Sysctl {
        path: PathBuf::from(IP_FORWARD),
        source,
    };
    let now = std::fs::read_to_string(IP_FORWARD).map_err(sysctl_error)?;
    if now.trim() == "1" {
        return Ok(if turned_on_by_twinbox()? {
            Forwarding::Twinbox
        } else {
            Forwarding::Host
        });
    }
    write_note()?;
    std::fs::write(IP_FORWARD, b"1\n").map_err(|source: io::Error| {
        match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => Error::NotPermitted {
                call: "write 1 to",
                interface: IP_FORWARD.to_string(),
                source,
            },
            _ => sysctl_error(source),
        }
    })?;
    crate::forwarding::close_link_mode_interfaces();
    Ok(Forwarding::Twinbox)
}

/// Whether [`FORWARDING_NOTE`] exists (a symlink or anything else there counts as no).
fn turned_on_by_twinbox() -> Result<bool> {
    match std::fs::symlink_metadata(FORWARDING_NOTE) {
        Ok(meta) => Ok(meta.is_file()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::ForwardingNote {
            path: PathBuf::from(FORWARDING_NOTE),
            source,
        }),
    }
}

/// Create [`FORWARDING_NOTE`] (and /run/twinbox, root's, 0755) if missing; never through a
/// symlink.
fn write_note() -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let note = std::path::Path::new(FORWARDING_NOTE);
    let error = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| Error::ForwardingNote { path, source }
    };
    let dir = note.parent().expect("the note has a directory");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(error(dir))?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(note)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && turned_on_by_twinbox()? => Ok(()),
        Err(source) => Err(error(note)(source)),
    }
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
}
