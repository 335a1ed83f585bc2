//! The rtnetlink requests kiln-init sends inside the guest: bring a link up,
//! add an IPv4 address, add a default route; and the acknowledgement reader.
//! Thin names over kiln-rtnetlink, which owns the bytes (and their tests)
//! for the guest and for kiln-net's taps alike: kiln-init stays small and
//! static, and depends on nothing of the host's.

use std::net::Ipv4Addr;

use kiln_rtnetlink::{Ack, IfExists, Request};

use crate::{Error, Result};

/// `RTM_NEWLINK` setting `IFF_UP` on interface `index`.
pub fn link_up(seq: u32, index: u32) -> Vec<u8> {
    Request::LinkUp { index, mtu: None }.encode(seq)
}

/// `RTM_NEWADDR`: `address/prefix_len` on interface `index`; an existing
/// address is an error.
pub fn add_address(seq: u32, index: u32, address: Ipv4Addr, prefix_len: u8) -> Vec<u8> {
    Request::AddAddress { index, address, prefix_len, if_exists: IfExists::Fail }.encode(seq)
}

/// `RTM_NEWROUTE`: the default route via `gateway` out of interface `index`.
pub fn add_default_route(seq: u32, index: u32, gateway: Ipv4Addr) -> Vec<u8> {
    Request::AddDefaultRoute { index, gateway }.encode(seq)
}

/// Reads the kernel's answer to request `seq`: `Ok(())` for an ACK,
/// `Err(errno)` (positive) for a refusal, an error for anything malformed.
pub fn parse_ack(reply: &[u8], seq: u32) -> Result<std::result::Result<(), i32>> {
    match kiln_rtnetlink::find_ack(reply, seq) {
        Ok(Some(Ack::Accepted)) => Ok(Ok(())),
        Ok(Some(Ack::Refused(errno))) => Ok(Err(errno)),
        Ok(None) => Err(Error::Netlink { reason: format!("no acknowledgement for request {seq}") }),
        Err(e) => Err(Error::Netlink { reason: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use expect_test::expect;
    use kiln_rtnetlink::{MessageBuilder, NLMSG_ERROR};

    use super::*;

    #[test]
    fn acknowledgements() {
        let ack = |seq: u32, code: i32| {
            let mut reply = MessageBuilder::new(NLMSG_ERROR, 0, seq).bytes(&code.to_le_bytes()).finish();
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
