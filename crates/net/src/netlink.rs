//! The socket side of the rtnetlink requests kiln's taps need (set the
//! host address, set MTU and link up): synchronous, over a rustix socket,
//! because the `rtnetlink` crate needs tokio. The bytes are kiln-rtnetlink's,
//! which kiln-init shares inside the guest.

use std::io;
use std::os::fd::OwnedFd;

use kiln_rtnetlink::Request;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, recv, send, socket};

/// The errno of the `NLMSG_ERROR` answering `seq` in `reply` (0 is an ACK),
/// or `None` if `reply` holds no (readable) answer to it: the caller reads on.
pub(crate) fn ack_errno(reply: &[u8], seq: u32) -> Option<i32> {
    kiln_rtnetlink::find_ack(reply, seq).ok().flatten().map(kiln_rtnetlink::Ack::errno)
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

    /// Sends `request` under the next sequence number and waits for its ACK.
    pub(crate) fn request(&mut self, request: &Request) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let (seq, message) = (self.seq, request.encode(self.seq));
        send(&self.fd, &message, SendFlags::empty())?;
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
    use kiln_rtnetlink::{MessageBuilder, NLMSG_ERROR};

    use super::*;

    #[test]
    fn acks_and_errors_are_found_by_sequence() {
        let error = |seq: u32, errno: i32| {
            let mut m = MessageBuilder::new(NLMSG_ERROR, 0, seq).bytes(&(-errno).to_ne_bytes()).finish();
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
