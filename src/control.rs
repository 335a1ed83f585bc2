//! The launcher's end of the control channel to kiln-init: the exit report
//! comes in, `stop <grace>` goes out (the lines are `kiln_guest`'s
//! [`GuestReport`] and [`HostCommand`]). The service's output never reaches
//! it, unlike the console.
//!
//! - QEMU: the guest's virtio-serial port `org.kiln.control`, whose host end
//!   is a unix socket QEMU listens on; the launcher connects before boot.
//! - cloud-hypervisor: kiln-init connects to host vsock port
//!   [`kiln_guest::VSOCK_STATUS_PORT`], which cloud-hypervisor turns into a
//!   connection to `<vsock socket>_<port>`. The launcher listens there before
//!   boot and takes only the first connection, which kiln-init makes before
//!   it starts the service; the listener is closed once it has it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_guest::{GuestReport, HostCommand, LineBuffer};
use kiln_vmm::VsockListener;

use crate::{Error, Result};

/// See the module doc.
#[derive(Debug)]
pub(crate) struct ControlChannel {
    end: End,
    lines: LineBuffer,
    report: Option<GuestReport>,
}

#[derive(Debug)]
enum End {
    /// cloud-hypervisor, before kiln-init has connected.
    Waiting(VsockListener),
    Connected(UnixStream),
    Closed,
}

impl ControlChannel {
    /// Connects to the socket QEMU listens on for the control port, within `timeout`.
    pub(crate) fn connect(socket: &Path, timeout: Duration) -> Result<ControlChannel> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(err) if started.elapsed() < timeout && err.kind() == io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => return Err(Error::ControlChannel { path: socket.to_path_buf(), source }),
            }
        };
        stream.set_nonblocking(true).map_err(|source| Error::ControlChannel { path: socket.to_path_buf(), source })?;
        Ok(ControlChannel::with(End::Connected(stream)))
    }

    /// Waits (without blocking) for kiln-init's connection on `listener`.
    pub(crate) fn listen(listener: VsockListener) -> ControlChannel {
        ControlChannel::with(End::Waiting(listener))
    }

    fn with(end: End) -> ControlChannel {
        ControlChannel { end, lines: LineBuffer::new(), report: None }
    }

    /// Takes in whatever has arrived, without blocking.
    pub(crate) fn poll(&mut self) {
        if let End::Waiting(listener) = &self.end {
            match listener.try_accept() {
                Ok(Some(stream)) if stream.set_nonblocking(true).is_ok() => self.end = End::Connected(stream),
                Ok(None) => return,
                Ok(Some(_)) | Err(_) => {
                    self.end = End::Closed;
                    return;
                }
            }
        }
        let End::Connected(stream) = &mut self.end else { return };
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => {
                    self.end = End::Closed;
                    return;
                }
                Ok(len) => {
                    for line in self.lines.push(&buffer[..len]) {
                        take_line(&mut self.report, &line);
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) => {
                    tracing::warn!("control channel: {err}");
                    self.end = End::Closed;
                    return;
                }
            }
        }
    }

    /// kiln-init's exit report, once it has come.
    pub(crate) fn report(&self) -> Option<&GuestReport> {
        self.report.as_ref()
    }

    /// Sends `command`; false when there is no connected channel to send it on.
    pub(crate) fn send(&mut self, command: HostCommand) -> bool {
        self.poll();
        let End::Connected(stream) = &mut self.end else { return false };
        // A few bytes into an empty socket buffer: a non-blocking write takes them whole.
        let line = command.to_line();
        stream.write(line.as_bytes()).is_ok_and(|written| written == line.len())
    }
}

/// Keeps the first exit report; anything else is logged and ignored.
fn take_line(report: &mut Option<GuestReport>, line: &str) {
    match GuestReport::parse(line) {
        Ok(parsed) if report.is_none() => *report = Some(parsed),
        Ok(parsed) => tracing::warn!("control channel: a second report ignored: {parsed}"),
        Err(err) => tracing::warn!("control channel: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn the_first_report_counts_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let mut channel = ControlChannel::connect(&socket, Duration::from_secs(5)).unwrap();
        let (mut guest, _) = listener.accept().unwrap();
        channel.poll();
        assert_eq!(channel.report(), None);
        guest.write_all(b"kiln-init: service exited with status 0\nexi").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        channel.poll();
        assert_eq!(channel.report(), None, "console-style lines are not reports");
        guest.write_all(b"t 3\nexit 0\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        channel.poll();
        assert_eq!(channel.report(), Some(&GuestReport::Exited(3)));
        assert!(channel.send(HostCommand::Stop { grace_seconds: 30 }));
        let mut line = [0u8; 8];
        guest.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"stop 30\n");
        drop(guest);
        std::thread::sleep(Duration::from_millis(20));
        channel.poll();
        assert!(!channel.send(HostCommand::Stop { grace_seconds: 1 }), "a closed channel sends nothing");
        assert_eq!(channel.report(), Some(&GuestReport::Exited(3)), "the report outlives the channel");
    }

    #[test]
    fn vsock_takes_only_the_first_connection() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let listener = VsockListener::bind(&socket, kiln_guest::VSOCK_STATUS_PORT).unwrap();
        let path = listener.path().to_owned();
        let mut channel = ControlChannel::listen(listener);
        channel.poll();
        assert!(!channel.send(HostCommand::Stop { grace_seconds: 1 }), "nobody connected yet");
        // kiln-init first (before the service starts), then an impostor.
        let mut init = UnixStream::connect(&path).unwrap();
        let mut impostor = UnixStream::connect(&path).unwrap();
        channel.poll();
        let _ = impostor.write_all(b"exit 0\n"); // Refused, or never read.
        init.write_all(b"signal 9\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        channel.poll();
        assert_eq!(channel.report(), Some(&GuestReport::Killed(9)));
    }
}
