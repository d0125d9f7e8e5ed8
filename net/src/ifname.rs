//! The host interface names of box links, one scheme for every kind and mode.
//!
//! | | `--net` (link) | `--net nat` |
//! |---|---|---|
//! | container (veth host end) | `tb<i>` | `tbn<i>` |
//! | VM (tap) | `tbt<i>` | `tbnt<i>` |
//!
//! The mode is in the name because the name is all the kernel's packet path can match on
//! cheaply: the `ip twinbox` table forwards and masquerades `tbn*` only (see `nat.rs`),
//! whatever pool a link came from. Every name starts with `tb`, which the table treats as
//! "a box link". `<i>` is the lease index in decimal without leading zeros, so a name
//! parses back to exactly one (kind, mode, index).

use twinbox_spec::NetMode;

/// Which side of the host a link's host end is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A container's veth pair (host end).
    Veth,
    /// A VM's tap.
    Tap,
}

/// Every name of a box link starts with this (the NAT table's "ours" pattern is `tb*`).
pub const PREFIX: &str = "tb";
/// Every NAT link's name starts with this (the table's "may leave the host" pattern).
pub const NAT_PREFIX: &str = "tbn";

/// The prefixes, longest first so that parsing `tbnt3` does not stop at `tbn`.
const PREFIXES: [(&str, Kind, NetMode); 4] = [
    ("tbnt", Kind::Tap, NetMode::Nat),
    ("tbn", Kind::Veth, NetMode::Nat),
    ("tbt", Kind::Tap, NetMode::Link),
    ("tb", Kind::Veth, NetMode::Link),
];

/// The host interface name of link `index` of `kind` in `mode`.
pub fn name(kind: Kind, mode: NetMode, index: u32) -> String {
    let prefix = PREFIXES
        .iter()
        .find(|(_, k, m)| *k == kind && *m == mode)
        .map(|(prefix, _, _)| *prefix)
        .expect("every kind and mode has a prefix");
    format!("{prefix}{index}")
}

/// The (kind, mode, index) a name of ours stands for; None for any other name.
pub fn parse(name: &str) -> Option<(Kind, NetMode, u32)> {
    let (prefix, kind, mode) = PREFIXES.iter().find(|(p, _, _)| name.starts_with(p))?;
    let digits = &name[prefix.len()..];
    let index: u32 = digits.parse().ok()?;
    // "tb007" or "tb+7" would parse to 7 but is no name we make.
    (index.to_string() == digits).then_some((*kind, *mode, index))
}

/// Every name link `index` may have on the host, for the checks that an index is free.
pub fn all(index: u32) -> impl Iterator<Item = String> {
    PREFIXES
        .iter()
        .map(move |(_, kind, mode)| name(*kind, *mode, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_nat_names_carry_the_nat_prefix() {
        for kind in [Kind::Veth, Kind::Tap] {
            for mode in [NetMode::Link, NetMode::Nat] {
                for index in [0, 7, 10, (1 << 22) - 1] {
                    let name = name(kind, mode, index);
                    assert_eq!(parse(&name), Some((kind, mode, index)), "{name}");
                    assert!(name.len() < libc::IFNAMSIZ, "{name} does not fit IFNAMSIZ");
                    assert!(name.starts_with(PREFIX), "{name}");
                    assert_eq!(name.starts_with(NAT_PREFIX), mode == NetMode::Nat, "{name}");
                }
            }
        }
        assert_eq!(name(Kind::Veth, NetMode::Link, 3), "tb3");
        assert_eq!(name(Kind::Tap, NetMode::Link, 3), "tbt3");
        assert_eq!(name(Kind::Veth, NetMode::Nat, 3), "tbn3");
        assert_eq!(name(Kind::Tap, NetMode::Nat, 3), "tbnt3");
        assert_eq!(all(5).collect::<Vec<_>>(), ["tbnt5", "tbn5", "tbt5", "tb5"]);
    }

    #[test]
    fn names_we_do_not_make_are_not_ours() {
        for foreign in [
            "tb",
            "tbt",
            "tbn",
            "tbnt",
            "tb07",
            "tb+7",
            "tbx1",
            "tbinit-peer",
            "tbt1a",
            "eth0",
            "tbnat1",
            "tb-1",
        ] {
            assert_eq!(parse(foreign), None, "{foreign}");
        }
    }
}
