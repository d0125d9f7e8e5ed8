//! `--net nat`: masquerade the boxes' traffic out of the host.
//!
//! What this changes on the host, exactly:
//! - the nftables table `ip twinbox`, replaced as a whole in one atomic `nft` transaction
//!   (so applying it twice leaves the same ruleset, and concurrent runs cannot interleave):
//!   ```text
//!   table ip twinbox {
//!       chain postrouting {
//!           type nat hook postrouting priority srcnat; policy accept;
//!           ip saddr <pool> oifname != "tb*" masquerade
//!       }
//!       chain forward {
//!           type filter hook forward priority filter; policy accept;
//!           iifname "tb*" accept
//!           oifname "tb*" accept
//!       }
//!   }
//!   ```
//!   `tb*` matches the host ends of every box link (veth `tb<i>`, tap `tbt<i>`), so only
//!   traffic from the pool leaving through any other interface is rewritten, and
//!   box-to-host traffic keeps its address;
//! - `net.ipv4.ip_forward` set to 1 (left at 1 by [`remove`]: other software on the host
//!   may rely on it by then).
//!
//! The table stays after the run (it matches nothing without boxes); [`remove`] deletes it.
//! An accept here cannot override a drop in another table on the same hook (for example
//! a firewall whose forward policy is drop): such a host must allow `tb*` itself.
//!
//! Written with the `nftables` crate, which builds the ruleset as typed JSON and hands it
//! to `nft -j -f -`: nftables' own netlink wire format is unstable between versions and
//! has no maintained pure-Rust encoder, while `nft`'s JSON is its documented interface.
//! The `nft` binary (Debian package `nftables`) is therefore needed for `--net nat` only.

use std::borrow::Cow;
use std::io;

use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::helper::{self, NftablesError};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Accept, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::error::{Error, Result};
use crate::lease::Pool;

/// The table's name (family `ip`).
pub const TABLE: &str = "twinbox";
/// The pattern that matches the host end of every box link.
pub const INTERFACE_PATTERN: &str = "tb*";
/// The sysctl turned on by [`apply`].
pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Install (or replace) the `ip twinbox` table for `pool` and turn on ip_forward.
pub fn apply(pool: &Pool) -> Result<()> {
    enable_ip_forward()?;
    run_nft("apply", &ruleset(pool))?;
    tracing::debug!(%pool, "nat table ip twinbox applied");
    Ok(())
}

/// Delete the `ip twinbox` table if it exists (for tests and uninstall).
pub fn remove() -> Result<()> {
    let mut batch = Batch::new();
    // `add` first makes `delete` succeed when the table is absent.
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    run_nft("remove", &batch.to_nftables())
}

/// The whole transaction [`apply`] sends: create-if-missing, delete, then the table anew.
pub fn ruleset(pool: &Pool) -> Nftables<'static> {
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
    let pool_prefix = Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(pool.base().to_string()))),
        len: u32::from(pool.prefix_len()),
    }));
    batch.add(NfListObject::Rule(rule(
        "postrouting",
        vec![
            matches(
                Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                    PayloadField {
                        protocol: "ip".into(),
                        field: "saddr".into(),
                    },
                ))),
                Operator::EQ,
                pool_prefix,
            ),
            matches(meta(MetaKey::Oifname), Operator::NEQ, ours()),
            Statement::Masquerade(None),
        ],
    )));
    for key in [MetaKey::Iifname, MetaKey::Oifname] {
        batch.add(NfListObject::Rule(rule(
            "forward",
            vec![
                matches(meta(key), Operator::EQ, ours()),
                Statement::Accept(Some(Accept {})),
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

fn ours() -> Expression<'static> {
    Expression::String(INTERFACE_PATTERN.into())
}

fn enable_ip_forward() -> Result<()> {
    let sysctl_error = |source| Error::Sysctl {
        path: IP_FORWARD,
        source,
    };
    let now = std::fs::read_to_string(IP_FORWARD).map_err(sysctl_error)?;
    if now.trim() != "1" {
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
    }
    Ok(())
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

    #[test]
    fn the_ruleset_replaces_the_table_atomically_and_masquerades_only_the_pool() {
        let pool: Pool = "10.201.0.0/16".parse().unwrap();
        let json = serde_json::to_value(ruleset(&pool)).unwrap();
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
            r#""addr":"10.201.0.0","len":16"#,
            r#""op":"!=","right":"tb*""#,
            r#""masquerade":null"#,
            r#""hook":"postrouting""#,
            r#""hook":"forward""#,
            r#""name":"twinbox""#,
        ] {
            assert!(text.contains(needle), "ruleset lacks {needle}: {text}");
        }
        assert!(
            !text.contains("ip6"),
            "the table must be family ip only: {text}"
        );
    }
}
