//! rtnetlink requests kiln-init sends inside the guest: bring a link up, add
//! an IPv4 address, add a default route; and the acknowledgement reader.
//! Hand-written (three fixed messages) rather than `netlink-packet-route`:
//! kiln-init stays small and static, and the bytes are checked here.
//!
//! Layouts are from `<linux/netlink.h>` and `<linux/rtnetlink.h>`; all
//! fields are in host (little-endian) order except addresses.

use std::net::Ipv4Addr;

use crate::{Error, Result};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 0x1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

/// `RTM_NEWLINK` setting `IFF_UP` on interface `index`.
pub fn link_up(seq: u32, index: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(16);
    body.extend_from_slice(&[AF_UNSPEC, 0]); // ifi_family, pad
    body.extend_from_slice(&0_u16.to_le_bytes()); // ifi_type
    body.extend_from_slice(&(index as i32).to_le_bytes());
    body.extend_from_slice(&IFF_UP.to_le_bytes()); // ifi_flags
    body.extend_from_slice(&IFF_UP.to_le_bytes()); // ifi_change
    message(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, body)
}

/// `RTM_NEWADDR`: `address/prefix_len` on interface `index`.
pub fn add_address(seq: u32, index: u32, address: Ipv4Addr, prefix_len: u8) -> Vec<u8> {
    let mut body = vec![AF_INET, prefix_len, 0, RT_SCOPE_UNIVERSE];
    body.extend_from_slice(&index.to_le_bytes());
    attribute(&mut body, IFA_LOCAL, &address.octets());
    attribute(&mut body, IFA_ADDRESS, &address.octets());
    message(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, body)
}

/// `RTM_NEWROUTE`: the default route via `gateway` out of interface `index`.
pub fn add_default_route(seq: u32, index: u32, gateway: Ipv4Addr) -> Vec<u8> {
    // rtm_family, dst_len, src_len, tos, table, protocol, scope, type; flags.
    let mut body = vec![AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST];
    body.extend_from_slice(&0_u32.to_le_bytes());
    attribute(&mut body, RTA_GATEWAY, &gateway.octets());
    attribute(&mut body, RTA_OIF, &index.to_le_bytes());
    message(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, body)
}

/// Reads the kernel's answer to request `seq`: `Ok(())` for an ACK,
/// `Err(errno)` (positive) for a refusal, an error for anything malformed.
pub fn parse_ack(reply: &[u8], seq: u32) -> Result<std::result::Result<(), i32>> {
    let fail = |reason: String| Err(Error::Netlink { reason });
    let mut rest = reply;
    while rest.len() >= 16 {
        let len = u32_at(rest, 0) as usize;
        if len < 16 || len > rest.len() {
            return fail(format!("message length {len} with {} bytes left", rest.len()));
        }
        let kind = u16::from_le_bytes([rest[4], rest[5]]);
        let message_seq = u32_at(rest, 8);
        if kind == NLMSG_ERROR && message_seq == seq {
            if len < 20 {
                return fail("error message without an error code".to_owned());
            }
            let code = i32::from_le_bytes([rest[16], rest[17], rest[18], rest[19]]);
            return Ok(if code == 0 { Ok(()) } else { Err(-code) });
        }
        // Messages are padded to 4 bytes.
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    fail(format!("no acknowledgement for request {seq}"))
}

fn message(kind: u16, flags: u16, seq: u32, body: Vec<u8>) -> Vec<u8> {
    let len = 16 + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&0_u32.to_le_bytes()); // nlmsg_pid: the kernel
    out.extend_from_slice(&body);
    out
}

/// An rtattr, padded to 4 bytes.
fn attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&((4 + value.len()) as u16).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

#[cfg(test)]
mod tests {
    use expect_test::expect;

    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes
            .chunks(4)
            .map(|word| word.iter().map(|b| format!("{b:02x}")).collect::<String>())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn requests() {
        // Compared with `ip -d monitor`-style dumps of what iproute2 sends.
        expect!["20000000 10000500 07000000 00000000 00000000 02000000 01000000 01000000"]
            .assert_eq(&hex(&link_up(7, 2)));
        expect!["28000000 14000506 08000000 00000000 02180000 02000000 08000200 0a00020f 08000100 0a00020f"]
            .assert_eq(&hex(&add_address(8, 2, Ipv4Addr::new(10, 0, 2, 15), 24)));
        expect!["2c000000 18000506 09000000 00000000 02000000 fe030001 00000000 08000500 0a000202 08000400 02000000"]
            .assert_eq(&hex(&add_default_route(9, 2, Ipv4Addr::new(10, 0, 2, 2))));
    }

    #[test]
    fn acknowledgements() {
        let ack = |seq: u32, code: i32| {
            let mut reply = message(NLMSG_ERROR, 0, seq, code.to_le_bytes().to_vec());
            reply.extend_from_slice(&[0; 16]); // the echoed request header
            reply[..4].copy_from_slice(&36_u32.to_le_bytes());
            reply
        };
        assert_eq!(parse_ack(&ack(5, 0), 5).ok(), Some(Ok(())));
        assert_eq!(parse_ack(&ack(5, -17), 5).ok(), Some(Err(17)));
        let mut two = ack(4, 0);
        two.extend(ack(5, -1));
        assert_eq!(parse_ack(&two, 5).ok(), Some(Err(1)));
        expect!["Invalid netlink reply: no acknowledgement for request 6"]
            .assert_eq(&parse_ack(&two, 6).unwrap_err().to_string());
        expect!["Invalid netlink reply: message length 4 with 36 bytes left"].assert_eq(
            &parse_ack(
                &{
                    let mut bad = ack(5, 0);
                    bad[0] = 4;
                    bad
                },
                5,
            )
            .unwrap_err()
            .to_string(),
        );
    }
}
