//! The host's name server, as the box can use it.
//!
//! The box reaches the host only over its point-to-point link (and, with `--net nat`,
//! the world beyond), so a loopback name server such as systemd-resolved's 127.0.0.53
//! stub is useless inside it: it would be the box's own loopback.

use std::net::Ipv4Addr;

/// The host's resolver configuration file.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The name server a box should use, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolver {
    /// The first IPv4 `nameserver` of resolv.conf outside 127.0.0.0/8.
    Reachable(Ipv4Addr),
    /// No usable name server; the reason is for the run's notes.
    Unavailable(String),
}

impl Resolver {
    /// The address, when there is one.
    pub fn address(&self) -> Option<Ipv4Addr> {
        match self {
            Resolver::Reachable(address) => Some(*address),
            Resolver::Unavailable(_) => None,
        }
    }

    /// Why there is no address, when there is none.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Resolver::Reachable(_) => None,
            Resolver::Unavailable(reason) => Some(reason),
        }
    }
}

/// The resolver from the host's /etc/resolv.conf.
pub fn host_resolver() -> Resolver {
    match std::fs::read_to_string(RESOLV_CONF) {
        Ok(text) => from_resolv_conf(&text),
        Err(error) => Resolver::Unavailable(format!("{RESOLV_CONF}: {error}")),
    }
}

/// The first `nameserver` line of resolv.conf text that a box can reach.
pub fn from_resolv_conf(text: &str) -> Resolver {
    let mut loopback = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(value) = words.next() else { continue };
        // IPv6 servers are skipped: the link is IPv4 only.
        let Ok(address) = value.parse::<Ipv4Addr>() else {
            continue;
        };
        if address.is_loopback() {
            loopback.push(address.to_string());
        } else if !address.is_unspecified() {
            return Resolver::Reachable(address);
        }
    }
    if loopback.is_empty() {
        Resolver::Unavailable(format!("{RESOLV_CONF} names no IPv4 name server"))
    } else {
        Resolver::Unavailable(format!(
            "{RESOLV_CONF} names only the loopback stub {} that a box cannot reach; the box gets no resolver",
            loopback.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reachable_ipv4_name_server_wins() {
        let text = "# generated\nsearch example\nnameserver 127.0.0.53\nnameserver fd00::1\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n";
        assert_eq!(
            from_resolv_conf(text),
            Resolver::Reachable(Ipv4Addr::new(192, 0, 2, 53))
        );
    }

    #[test]
    fn only_a_loopback_stub_gives_none_and_says_why() {
        let resolver = from_resolv_conf("nameserver 127.0.0.53\noptions edns0\n");
        assert_eq!(resolver.address(), None);
        let reason = resolver.reason().expect("a reason");
        assert!(reason.contains("127.0.0.53"), "{reason}");
    }

    #[test]
    fn no_name_server_at_all_says_so() {
        let resolver = from_resolv_conf("search example\n");
        assert!(resolver
            .reason()
            .expect("a reason")
            .contains("no IPv4 name server"));
    }
}
