//! cloud-hypervisor's hybrid vsock: the guest's vsock device appears on the
//! host as a unix socket. Host-to-guest: connect to it and send
//! `CONNECT <port>\n`; it answers `OK <host port>\n`. Guest-to-host: the VMM
//! connects to `<socket>_<port>`, where the host listens.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::plan::check_socket_path;

/// The longest reply line kiln reads (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 32;

/// Parses the VMM's answer to `CONNECT`: the host-side port on success.
/// Pure, and fuzzed.
pub(crate) fn parse_connect_reply(line: &[u8]) -> std::result::Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| "reply is not UTF-8".to_owned())?;
    let port = text
        .strip_suffix('\n')
        .and_then(|text| text.strip_prefix("OK "))
        .ok_or_else(|| format!("expected `OK <port>`, got {text:?}"))?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("expected `OK <port>`, got {text:?}"));
    }
    port.parse().map_err(|_| format!("port out of range in {text:?}"))
}

/// Connects to guest `port` through the hybrid vsock socket `socket`,
/// within `timeout`. The stream is ready for the guest service's protocol:
/// nothing past the `OK` line has been read from it.
pub fn vsock_connect(socket: &Path, port: u32, timeout: Duration) -> Result<UnixStream> {
    check_socket_path("vsock.socket", socket)?;
    let what = format!("vsock CONNECT {port}");
    let closed = || Error::protocol(&what, "connection closed: is the guest listening on that port?");
    let io_error = |err: io::Error| {
        if matches!(err.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) {
            closed()
        } else if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            Error::Timeout { what: what.clone(), deadline: timeout }
        } else {
            Error::io(what.clone(), socket, err)
        }
    };
    let mut stream = UnixStream::connect(socket).map_err(io_error)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_error)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_error)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(io_error)?;
    // Byte by byte: whatever follows the newline belongs to the caller.
    let mut line = Vec::with_capacity(MAX_REPLY);
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if line.len() == MAX_REPLY {
            return Err(Error::protocol(&what, format!("reply longer than {MAX_REPLY} bytes")));
        }
        match stream.read(&mut byte).map_err(io_error)? {
            // cloud-hypervisor closes the connection when nothing listens on the port.
            0 => return Err(closed()),
            _ => line.push(byte[0]),
        }
    }
    parse_connect_reply(&line).map_err(|detail| Error::protocol(&what, detail))?;
    stream.set_read_timeout(None).map_err(io_error)?;
    stream.set_write_timeout(None).map_err(io_error)?;
    Ok(stream)
}

/// A host listener for connections the guest makes to host `port`:
/// the unix socket `<socket>_<port>` (mode 0600), removed on drop.
#[derive(Debug)]
pub struct VsockListener {
    listener: UnixListener,
    path: PathBuf,
}

impl VsockListener {
    /// Listens on `<socket>_<port>`, replacing a stale socket file there.
    pub fn bind(socket: &Path, port: u32) -> Result<VsockListener> {
        let mut path = socket.as_os_str().to_owned();
        path.push(format!("_{port}"));
        let path = PathBuf::from(path);
        check_socket_path("vsock.socket", &path)?;
        crate::vm::remove_stale_socket(&path)?;
        let listener = UnixListener::bind(&path).map_err(|err| Error::io("Listening for vsock", &path, err))?;
        let listener = VsockListener { listener, path };
        std::fs::set_permissions(&listener.path, std::fs::Permissions::from_mode(0o600))
            .map_err(|err| Error::io("Restricting the vsock socket", &listener.path, err))?;
        Ok(listener)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The guest's next connection if one is waiting, without blocking.
    /// The stream returned blocks as usual.
    pub fn try_accept(&self) -> Result<Option<UnixStream>> {
        let failed = |err| Error::io("Accepting a vsock connection", &self.path, err);
        self.listener.set_nonblocking(true).map_err(failed)?;
        let accepted = self.listener.accept();
        self.listener.set_nonblocking(false).map_err(failed)?;
        match accepted {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(failed)?;
                Ok(Some(stream))
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(err) => Err(failed(err)),
        }
    }

    /// Waits for the guest's next connection.
    pub fn accept(&self) -> Result<UnixStream> {
        self.listener
            .accept()
            .map(|(stream, _)| stream)
            .map_err(|err| Error::io("Accepting a vsock connection", &self.path, err))
    }
}

impl Drop for VsockListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_replies() {
        assert_eq!(parse_connect_reply(b"OK 1073741824\n"), Ok(1_073_741_824));
        for bad in [&b"OK \n"[..], b"OK 12", b"ok 12\n", b"OK 99999999999\n", b"OK -1\n", b"\xff\n"] {
            assert!(parse_connect_reply(bad).is_err(), "{bad:?}");
        }
    }
}
