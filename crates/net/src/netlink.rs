//! The three rtnetlink requests kiln's taps need: set the host address,
//! set MTU and link up. Hand-rolled and synchronous over a rustix socket:
//! the `rtnetlink` crate needs tokio, and the messages are a few fixed
//! structs (see rtnetlink(7)), encoded by pure functions tested byte for byte.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, recv, send, socket};

const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 0x1;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const NLMSG_HEADER_LEN: usize = 16;

/// A netlink message under construction: header first, length patched last.
struct Message(Vec<u8>);

impl Message {
    fn new(kind: u16, flags: u16, seq: u32) -> Message {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched in finish()
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills it in
        Message(bytes)
    }

    fn bytes(mut self, data: &[u8]) -> Message {
        self.0.extend_from_slice(data);
        self
    }

    /// An rtattr: u16 length, u16 type, payload, padded to 4 bytes.
    fn attribute(mut self, kind: u16, payload: &[u8]) -> Message {
        let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.0.len()).unwrap_or(u32::MAX);
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// `RTM_NEWLINK` for `ifindex`: link up and, if given, the MTU.
pub(crate) fn link_up_message(seq: u32, ifindex: u32, mtu: Option<u32>) -> Vec<u8> {
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut ifinfo = vec![AF_UNSPEC, 0, 0, 0];
    ifinfo.extend_from_slice(&ifindex.to_ne_bytes());
    ifinfo.extend_from_slice(&IFF_UP.to_ne_bytes());
    ifinfo.extend_from_slice(&IFF_UP.to_ne_bytes());
    let mut message = Message::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq).bytes(&ifinfo);
    if let Some(mtu) = mtu {
        message = message.attribute(IFLA_MTU, &mtu.to_ne_bytes());
    }
    message.finish()
}

/// `RTM_NEWADDR` (create or replace) of `addr/prefix_len` on `ifindex`.
pub(crate) fn address_message(seq: u32, ifindex: u32, addr: Ipv4Addr, prefix_len: u8) -> Vec<u8> {
    // struct ifaddrmsg: family, prefixlen, flags, scope (universe), index.
    let mut ifaddr = vec![AF_INET, prefix_len, 0, 0];
    ifaddr.extend_from_slice(&ifindex.to_ne_bytes());
    Message::new(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, seq)
        .bytes(&ifaddr)
        .attribute(IFA_LOCAL, &addr.octets())
        .attribute(IFA_ADDRESS, &addr.octets())
        .finish()
}

/// The errno of the `NLMSG_ERROR` answering `seq` in `reply` (0 is an ACK),
/// or `None` if `reply` holds no answer to it.
pub(crate) fn ack_errno(reply: &[u8], seq: u32) -> Option<i32> {
    let mut rest = reply;
    while rest.len() >= NLMSG_HEADER_LEN {
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HEADER_LEN || len > rest.len() {
            return None;
        }
        let kind = u16::from_ne_bytes(rest[4..6].try_into().ok()?);
        let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().ok()?);
        if kind == NLMSG_ERROR && msg_seq == seq && len >= NLMSG_HEADER_LEN + 4 {
            let error = i32::from_ne_bytes(rest[16..20].try_into().ok()?);
            return Some(-error);
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    None
}

/// One NETLINK_ROUTE socket; requests are sent one at a time and wait for their ACK.
pub(crate) struct Rtnetlink {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnetlink {
    pub(crate) fn open() -> io::Result<Rtnetlink> {
        // NETLINK_ROUTE is protocol 0, which rustix spells `None`.
        let fd = socket(AddressFamily::NETLINK, SocketType::RAW, None)?;
        Ok(Rtnetlink { fd, seq: 0 })
    }

    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    pub(crate) fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `message` (built with sequence number `seq`) and waits for its ACK.
    pub(crate) fn request(&mut self, seq: u32, message: &[u8]) -> io::Result<()> {
        send(&self.fd, message, SendFlags::empty())?;
        let mut buffer = vec![0u8; 8192];
        loop {
            let (received, _) = recv(&self.fd, &mut buffer, RecvFlags::empty())?;
            match ack_errno(&buffer[..received], seq) {
                Some(0) => return Ok(()),
                Some(errno) => return Err(io::Error::from_raw_os_error(errno)),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn messages_match_rtnetlink_layout() {
        // Little-endian host assumed by the literals (x86_64).
        assert_eq!(
            hex(&link_up_message(7, 3, Some(1400))),
            "28 00 00 00 10 00 05 00 07 00 00 00 00 00 00 00 \
             00 00 00 00 03 00 00 00 01 00 00 00 01 00 00 00 \
             08 00 04 00 78 05 00 00"
        );
        assert_eq!(hex(&link_up_message(1, 9, None)).len(), 32 * 3 - 1);
        assert_eq!(
            hex(&address_message(2, 3, Ipv4Addr::new(10, 0, 0, 1), 30)),
            "28 00 00 00 14 00 05 05 02 00 00 00 00 00 00 00 \
             02 1e 00 00 03 00 00 00 08 00 02 00 0a 00 00 01 \
             08 00 01 00 0a 00 00 01"
        );
    }

    #[test]
    fn acks_and_errors_are_found_by_sequence() {
        let error = |seq: u32, errno: i32| {
            let mut m = Message::new(NLMSG_ERROR, 0, seq).bytes(&(-errno).to_ne_bytes()).finish();
            m.extend_from_slice(&[0; 16]); // the echoed request header
            let len = u32::try_from(m.len()).unwrap();
            m[..4].copy_from_slice(&len.to_ne_bytes());
            m
        };
        assert_eq!(ack_errno(&error(5, 0), 5), Some(0));
        assert_eq!(ack_errno(&error(5, 1), 5), Some(1));
        assert_eq!(ack_errno(&error(4, 0), 5), None);
        let both = [error(4, 0), error(5, 17)].concat();
        assert_eq!(ack_errno(&both, 5), Some(17));
        assert_eq!(ack_errno(&[0xff; 7], 5), None);
        assert_eq!(ack_errno(&[0; 32], 5), None, "a zero length must not loop forever");
    }
}
