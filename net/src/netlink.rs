//! A small synchronous rtnetlink client: one request, one ACK (or one dump), on a
//! blocking `netlink-sys` socket. The messages are built and parsed by
//! `netlink-packet-route`; this module only numbers, sends and collects them.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// An open NETLINK_ROUTE socket and the sequence number of its last request.
pub(crate) struct Rtnl {
    socket: Socket,
    sequence: u32,
}

impl Rtnl {
    /// Open and bind a route netlink socket of this process's network namespace.
    pub(crate) fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Create a veth pair: `host` here, `peer` created directly in the network namespace
    /// of `peer_pid` (IFLA_NET_NS_PID on the peer), so the box end never appears on the host.
    pub(crate) fn add_veth(&mut self, host: &str, peer: &str, peer_pid: u32) -> io::Result<()> {
        let mut peer_message = LinkMessage::default();
        peer_message.attributes = vec![
            LinkAttribute::IfName(peer.to_string()),
            LinkAttribute::NetNsPid(peer_pid),
        ];
        let mut message = LinkMessage::default();
        message.attributes = vec![
            LinkAttribute::IfName(host.to_string()),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_message))),
            ]),
        ];
        self.ack(
            RouteNetlinkMessage::NewLink(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Give interface `index` the address `address/prefix_len` (with its broadcast).
    pub(crate) fn add_ipv4(
        &mut self,
        index: u32,
        address: Ipv4Addr,
        prefix_len: u8,
    ) -> io::Result<()> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.prefix_len = prefix_len;
        message.header.index = index;
        message.attributes = vec![
            AddressAttribute::Local(IpAddr::V4(address)),
            AddressAttribute::Address(IpAddr::V4(address)),
        ];
        if prefix_len < 31 {
            let broadcast = u32::from(address) | (u32::MAX >> prefix_len);
            message
                .attributes
                .push(AddressAttribute::Broadcast(Ipv4Addr::from(broadcast)));
        }
        self.ack(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Bring interface `index` up (IFF_UP in flags and change mask, nothing else touched).
    pub(crate) fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        self.ack(RouteNetlinkMessage::SetLink(message), 0)
    }

    /// Set interface `index`'s alias (IFLA_IFALIAS, `ip link show`'s "alias" line).
    pub(crate) fn set_alias(&mut self, index: u32, alias: &str) -> io::Result<()> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.attributes = vec![LinkAttribute::IfAlias(alias.to_string())];
        self.ack(RouteNetlinkMessage::SetLink(message), 0)
    }

    /// Every interface of this namespace: its name and alias, if it has one.
    pub(crate) fn links(&mut self) -> io::Result<Vec<(String, Option<String>)>> {
        let mut found = Vec::new();
        for message in self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
            let RouteNetlinkMessage::NewLink(link) = message else {
                continue;
            };
            let mut name = None;
            let mut alias = None;
            for attribute in link.attributes {
                match attribute {
                    LinkAttribute::IfName(n) => name = Some(n),
                    LinkAttribute::IfAlias(a) => alias = Some(a),
                    _ => {}
                }
            }
            if let Some(name) = name {
                found.push((name, alias));
            }
        }
        Ok(found)
    }

    /// Delete the interface called `name` in this namespace.
    pub(crate) fn delete_link(&mut self, name: &str) -> io::Result<()> {
        let mut message = LinkMessage::default();
        message.attributes = vec![LinkAttribute::IfName(name.to_string())];
        self.ack(RouteNetlinkMessage::DelLink(message), 0)
    }

    /// Every IPv4 address on every interface of this namespace, with its interface index.
    pub(crate) fn ipv4_addresses(&mut self) -> io::Result<Vec<(u32, Ipv4Addr)>> {
        let mut request = AddressMessage::default();
        request.header.family = AddressFamily::Inet;
        let mut found = Vec::new();
        for message in self.dump(RouteNetlinkMessage::GetAddress(request))? {
            let RouteNetlinkMessage::NewAddress(address) = message else {
                continue;
            };
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on
            // point-to-point links, so prefer LOCAL and fall back to ADDRESS.
            let local = address.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let plain = address.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(plain) {
                found.push((address.header.index, ip));
            }
        }
        Ok(found)
    }

    /// Send `message` with NLM_F_REQUEST | NLM_F_ACK | `flags` and wait for its ACK.
    fn ack(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let sequence = self.send(message, NLM_F_REQUEST | NLM_F_ACK | flags)?;
        loop {
            for reply in self.receive()? {
                if reply.header.sequence_number != sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            None => Ok(()),
                            Some(_) => Err(error.to_io()),
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    _ => continue,
                }
            }
        }
    }

    /// Send `message` as a dump request and collect every reply up to NLMSG_DONE.
    fn dump(&mut self, message: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let sequence = self.send(message, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut replies = Vec::new();
        loop {
            for reply in self.receive()? {
                if reply.header.sequence_number != sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(error) if error.code.is_some() => {
                        return Err(error.to_io())
                    }
                    _ => continue,
                }
            }
        }
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut packet = NetlinkMessage::from(message);
        packet.header.flags = flags;
        packet.header.sequence_number = self.sequence;
        packet.finalize();
        let mut buffer = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buffer);
        let sent = self.socket.send(&buffer, 0)?;
        if sent != buffer.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("netlink send: {sent} of {} bytes", buffer.len()),
            ));
        }
        Ok(self.sequence)
    }

    /// One datagram from the kernel, split into its netlink messages.
    fn receive(&mut self) -> io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
        loop {
            // A signal to the CLI (SIGINT/SIGTERM handlers) must not fail a request.
            match self.socket.recv_from_full() {
                Ok((datagram, _)) => return split_messages(&datagram),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
        }
    }
}

/// Split one datagram into the netlink messages it carries (each 4-byte aligned).
fn split_messages(datagram: &[u8]) -> io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut messages = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let rest = &datagram[offset..];
        let length = NetlinkBuffer::new_checked(rest)
            .map_err(|e| invalid(format!("netlink reply: {e}")))?
            .length() as usize;
        if length == 0 || length > rest.len() {
            return Err(invalid(format!("netlink reply: message length {length}")));
        }
        let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..length])
            .map_err(|e| invalid(format!("netlink reply: {e}")))?;
        messages.push(message);
        offset += (length + 3) & !3;
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_reply_with_two_messages_splits_into_both() {
        let mut bytes = Vec::new();
        for index in [7u32, 9] {
            let mut address = AddressMessage::default();
            address.header.family = AddressFamily::Inet;
            address.header.index = index;
            address.header.prefix_len = 30;
            address
                .attributes
                .push(AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(
                    10, 201, 0, 1,
                ))));
            let mut packet = NetlinkMessage::from(RouteNetlinkMessage::NewAddress(address));
            packet.finalize();
            let mut buffer = vec![0u8; packet.buffer_len()];
            packet.serialize(&mut buffer);
            bytes.extend_from_slice(&buffer);
        }
        let messages = split_messages(&bytes).expect("two well-formed messages");
        let indices: Vec<u32> = messages
            .iter()
            .filter_map(|m| match &m.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(a)) => {
                    Some(a.header.index)
                }
                _ => None,
            })
            .collect();
        assert_eq!(indices, vec![7, 9]);
    }

    #[test]
    fn a_truncated_reply_is_an_error_not_a_panic() {
        let error = split_messages(&[16, 0, 0, 0, 1, 0]).expect_err("6 bytes are no message");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn unprivileged_address_dump_lists_loopback() {
        let mut rtnl = Rtnl::open().expect("a NETLINK_ROUTE socket needs no privilege");
        let addresses = rtnl.ipv4_addresses().expect("RTM_GETADDR dump");
        assert!(
            addresses.iter().any(|(_, ip)| ip.is_loopback()),
            "no 127.x address among {addresses:?}"
        );
    }
}
