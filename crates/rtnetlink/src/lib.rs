//! kiln-rtnetlink: the few rtnetlink (`NETLINK_ROUTE`) messages kiln sends
//! to configure an interface, as pure functions over bytes: [`Request`]
//! encodes (and decodes) link up with an optional MTU, an IPv4 address and a
//! default IPv4 route; [`find_ack`] reads the kernel's answer to one of
//! them. Everything is built by one [`MessageBuilder`] and split by one
//! reader ([`messages`], [`attributes`]), so a request and its parse cannot
//! disagree on the layout.
//!
//! Both ends of a kiln VM's link use it: kiln-net on the host (its tap's
//! address, MTU and link state) and kiln-init inside the guest (eth0's
//! address and default route, loopback up).
//!
//! What it is not: it opens no socket and makes no system call (the caller
//! owns the socket and sends the bytes), has no dependencies and no async
//! runtime, and it is not a general netlink library: IPv4 only, and only
//! the requests above. Layouts are those of `<linux/netlink.h>` and
//! `<linux/rtnetlink.h>`; every field is in host byte order, as netlink
//! wants, except addresses (network order).
//!
//! ```
//! use std::net::Ipv4Addr;
//! use kiln_rtnetlink::{Ack, IfExists, Request, find_ack};
//!
//! let request = Request::AddAddress {
//!     index: 2,
//!     address: Ipv4Addr::new(10, 213, 0, 1),
//!     prefix_len: 30,
//!     if_exists: IfExists::Replace,
//! };
//! let bytes = request.encode(7); // sequence number 7
//! assert_eq!(Request::decode(&bytes), Ok((7, request)));
//! // The kernel answers with an NLMSG_ERROR carrying errno 0 for success.
//! assert_eq!(find_ack(&kiln_rtnetlink::ack_message(7, 0), 7), Ok(Some(Ack::Accepted)));
//! ```

use std::fmt;
use std::net::Ipv4Addr;

/// `struct nlmsghdr`: length, type, flags, sequence number, port id.
pub const NLMSG_HEADER_LEN: usize = 16;
/// The message type of an acknowledgement or error (`struct nlmsgerr`).
pub const NLMSG_ERROR: u16 = 2;
/// `RTM_NEWLINK`: change a link.
pub const RTM_NEWLINK: u16 = 16;
/// `RTM_NEWADDR`: add an address.
pub const RTM_NEWADDR: u16 = 20;
/// `RTM_NEWROUTE`: add a route.
pub const RTM_NEWROUTE: u16 = 24;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 0x1;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
/// `struct ifinfomsg`, `struct ifaddrmsg`, `struct rtmsg`.
const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const RTMSG_LEN: usize = 12;
const ATTRIBUTE_HEADER_LEN: usize = 4;

/// What is wrong with bytes that were to be a netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A message's length field is below the header's or beyond the bytes left.
    MessageLength { len: usize, left: usize },
    /// An attribute's length field is below its header's or beyond the bytes left.
    AttributeLength { len: usize, left: usize },
    /// An `NLMSG_ERROR` too short to hold its error code.
    AckWithoutCode,
    /// Bytes that are not one of the [`Request`]s this crate builds.
    NotARequest { reason: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::MessageLength { len, left } => write!(f, "message length {len} with {left} bytes left"),
            Error::AttributeLength { len, left } => write!(f, "attribute length {len} with {left} bytes left"),
            Error::AckWithoutCode => f.write_str("error message without an error code"),
            Error::NotARequest { reason } => write!(f, "not a request kiln sends: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A netlink message under construction: header first, the family header
/// and attributes appended, the length patched in by [`finish`](Self::finish).
#[derive(Debug, Clone)]
pub struct MessageBuilder(Vec<u8>);

impl MessageBuilder {
    /// The `nlmsghdr` of a message of type `kind`; the port id is 0 (the
    /// kernel fills in the sender's).
    pub fn new(kind: u16, flags: u16, seq: u32) -> MessageBuilder {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched in finish()
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
        MessageBuilder(bytes)
    }

    /// Appends raw bytes: the family header (`ifinfomsg` and the like).
    pub fn bytes(mut self, data: &[u8]) -> MessageBuilder {
        self.0.extend_from_slice(data);
        self
    }

    /// Appends an rtattr: u16 length, u16 type, payload, padded to 4 bytes.
    /// A payload over 65,531 bytes cannot be encoded; its length saturates.
    pub fn attribute(mut self, kind: u16, payload: &[u8]) -> MessageBuilder {
        let len = u16::try_from(ATTRIBUTE_HEADER_LEN + payload.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    /// The message, its length field set.
    pub fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.0.len()).unwrap_or(u32::MAX);
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// One message read out of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
    /// Everything after the `nlmsghdr`, up to the message's length.
    pub payload: &'a [u8],
}

/// The messages in `datagram`, in order. Messages are padded to 4 bytes; a
/// tail shorter than a header is ignored, a bad length ends the iteration
/// with an error.
pub fn messages(datagram: &[u8]) -> impl Iterator<Item = Result<Message<'_>>> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HEADER_LEN {
            return None;
        }
        let len = u32_at(rest, 0) as usize;
        if len < NLMSG_HEADER_LEN || len > rest.len() {
            let left = rest.len();
            rest = &[];
            return Some(Err(Error::MessageLength { len, left }));
        }
        let message = Message {
            kind: u16_at(rest, 4),
            flags: u16_at(rest, 6),
            seq: u32_at(rest, 8),
            pid: u32_at(rest, 12),
            payload: &rest[NLMSG_HEADER_LEN..len],
        };
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some(Ok(message))
    })
}

/// The rtattrs in `bytes` as (type, payload), in order; a bad length ends
/// the iteration with an error.
pub fn attributes(bytes: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8])>> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let len = if rest.len() >= ATTRIBUTE_HEADER_LEN { usize::from(u16_at(rest, 0)) } else { 0 };
        if len < ATTRIBUTE_HEADER_LEN || len > rest.len() {
            let left = rest.len();
            rest = &[];
            return Some(Err(Error::AttributeLength { len, left }));
        }
        let attribute = (u16_at(rest, 2), &rest[ATTRIBUTE_HEADER_LEN..len]);
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some(Ok(attribute))
    })
}

/// The kernel's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Done (`NLMSG_ERROR` with error 0).
    Accepted,
    /// Refused with this errno (positive, as in `errno.h`).
    Refused(i32),
}

impl Ack {
    /// 0 if accepted, else the errno.
    pub fn errno(self) -> i32 {
        match self {
            Ack::Accepted => 0,
            Ack::Refused(errno) => errno,
        }
    }
}

/// The answer to request `seq` in `reply`, or `None` if `reply` holds none
/// (answers to other requests are skipped).
pub fn find_ack(reply: &[u8], seq: u32) -> Result<Option<Ack>> {
    for message in messages(reply) {
        let message = message?;
        if message.kind != NLMSG_ERROR || message.seq != seq {
            continue;
        }
        let code = message.payload.get(..4).ok_or(Error::AckWithoutCode)?;
        let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
        return Ok(Some(if code == 0 { Ack::Accepted } else { Ack::Refused(code.saturating_neg()) }));
    }
    Ok(None)
}

/// The kernel's answer to request `seq` (errno 0 for success), with the
/// request's header echoed as zeros: for tests of the code that reads it.
pub fn ack_message(seq: u32, errno: i32) -> Vec<u8> {
    MessageBuilder::new(NLMSG_ERROR, 0, seq).bytes(&errno.saturating_neg().to_ne_bytes()).bytes(&[0; 16]).finish()
}

/// What a request that creates something does if it exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfExists {
    /// Replace it (`NLM_F_REPLACE`): the request is idempotent.
    Replace,
    /// Fail with `EEXIST` (`NLM_F_EXCL`).
    Fail,
}

impl IfExists {
    fn flag(self) -> u16 {
        match self {
            IfExists::Replace => NLM_F_REPLACE,
            IfExists::Fail => NLM_F_EXCL,
        }
    }
}

/// A request kiln sends, each answered with an [`Ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// `RTM_NEWLINK`: `IFF_UP` on interface `index` and, if given, its MTU.
    LinkUp { index: u32, mtu: Option<u32> },
    /// `RTM_NEWADDR`: `address/prefix_len` on interface `index` (scope universe).
    AddAddress { index: u32, address: Ipv4Addr, prefix_len: u8, if_exists: IfExists },
    /// `RTM_NEWROUTE`: the default route via `gateway` out of interface
    /// `index`, in the main table; an existing default route is an error.
    AddDefaultRoute { index: u32, gateway: Ipv4Addr },
}

impl Request {
    /// The request as sequence number `seq`, asking for an acknowledgement.
    pub fn encode(&self, seq: u32) -> Vec<u8> {
        let create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE;
        match *self {
            Request::LinkUp { index, mtu } => {
                // struct ifinfomsg: family, pad, type, index, flags, change.
                let mut ifinfo = vec![AF_UNSPEC, 0, 0, 0];
                ifinfo.extend_from_slice(&index.to_ne_bytes());
                ifinfo.extend_from_slice(&IFF_UP.to_ne_bytes());
                ifinfo.extend_from_slice(&IFF_UP.to_ne_bytes());
                let mut message = MessageBuilder::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq).bytes(&ifinfo);
                if let Some(mtu) = mtu {
                    message = message.attribute(IFLA_MTU, &mtu.to_ne_bytes());
                }
                message.finish()
            }
            Request::AddAddress { index, address, prefix_len, if_exists } => {
                // struct ifaddrmsg: family, prefixlen, flags, scope, index.
                let mut ifaddr = vec![AF_INET, prefix_len, 0, RT_SCOPE_UNIVERSE];
                ifaddr.extend_from_slice(&index.to_ne_bytes());
                MessageBuilder::new(RTM_NEWADDR, create | if_exists.flag(), seq)
                    .bytes(&ifaddr)
                    .attribute(IFA_LOCAL, &address.octets())
                    .attribute(IFA_ADDRESS, &address.octets())
                    .finish()
            }
            Request::AddDefaultRoute { index, gateway } => {
                // struct rtmsg: family, dst_len, src_len, tos, table,
                // protocol, scope, type; flags.
                let mut rtmsg = vec![AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST];
                rtmsg.extend_from_slice(&0u32.to_ne_bytes());
                MessageBuilder::new(RTM_NEWROUTE, create | NLM_F_EXCL, seq)
                    .bytes(&rtmsg)
                    .attribute(RTA_GATEWAY, &gateway.octets())
                    .attribute(RTA_OIF, &index.to_ne_bytes())
                    .finish()
            }
        }
    }

    /// The request `bytes` holds and its sequence number. Accepts exactly
    /// what [`encode`](Self::encode) writes, so `encode(decode(b)) == b`.
    pub fn decode(bytes: &[u8]) -> Result<(u32, Request)> {
        let not = |reason: String| Error::NotARequest { reason };
        let mut all = messages(bytes);
        let message = all.next().ok_or_else(|| not(format!("{} bytes hold no message", bytes.len())))??;
        let request = match message.kind {
            RTM_NEWLINK => decode_link_up(&message)?,
            RTM_NEWADDR => decode_address(&message)?,
            RTM_NEWROUTE => decode_route(&message)?,
            kind => return Err(not(format!("message type {kind}"))),
        };
        if request.encode(message.seq) != bytes {
            return Err(not(format!("{request:?} is encoded otherwise")));
        }
        Ok((message.seq, request))
    }
}

/// An rtattr as read: its type and payload.
type Attribute<'a> = (u16, &'a [u8]);

/// The family header of `message` (`len` bytes) and its attributes.
fn split<'a>(message: &Message<'a>, len: usize) -> Result<(&'a [u8], Vec<Attribute<'a>>)> {
    let (header, rest) = message.payload.split_at_checked(len).ok_or_else(|| Error::NotARequest {
        reason: format!("a {}-byte payload for a {len}-byte header", message.payload.len()),
    })?;
    Ok((header, attributes(rest).collect::<Result<_>>()?))
}

fn decode_link_up(message: &Message<'_>) -> Result<Request> {
    let (ifinfo, attributes) = split(message, IFINFOMSG_LEN)?;
    let mtu = match attributes.as_slice() {
        [] => None,
        [(IFLA_MTU, mtu)] => Some(u32_of(mtu, "IFLA_MTU")?),
        other => return Err(unexpected(other)),
    };
    Ok(Request::LinkUp { index: u32_at(ifinfo, 4), mtu })
}

fn decode_address(message: &Message<'_>) -> Result<Request> {
    let (ifaddr, attributes) = split(message, IFADDRMSG_LEN)?;
    let [(IFA_LOCAL, local), (IFA_ADDRESS, _)] = attributes.as_slice() else {
        return Err(unexpected(&attributes));
    };
    let if_exists = if message.flags & NLM_F_REPLACE != 0 { IfExists::Replace } else { IfExists::Fail };
    let address = Ipv4Addr::from(u32_of(local, "IFA_LOCAL")?.to_ne_bytes());
    Ok(Request::AddAddress { index: u32_at(ifaddr, 4), address, prefix_len: ifaddr[1], if_exists })
}

fn decode_route(message: &Message<'_>) -> Result<Request> {
    let (_, attributes) = split(message, RTMSG_LEN)?;
    let [(RTA_GATEWAY, gateway), (RTA_OIF, index)] = attributes.as_slice() else {
        return Err(unexpected(&attributes));
    };
    let gateway = Ipv4Addr::from(u32_of(gateway, "RTA_GATEWAY")?.to_ne_bytes());
    Ok(Request::AddDefaultRoute { index: u32_of(index, "RTA_OIF")?, gateway })
}

fn unexpected(attributes: &[Attribute<'_>]) -> Error {
    let types: Vec<u16> = attributes.iter().map(|(kind, _)| *kind).collect();
    Error::NotARequest { reason: format!("attribute types {types:?}") }
}

fn u32_of(payload: &[u8], what: &str) -> Result<u32> {
    match payload {
        [a, b, c, d] => Ok(u32::from_ne_bytes([*a, *b, *c, *d])),
        _ => Err(Error::NotARequest { reason: format!("a {}-byte {what}", payload.len()) }),
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

#[cfg(test)]
mod tests;

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
