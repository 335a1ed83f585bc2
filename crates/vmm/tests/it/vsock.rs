//! Hybrid vsock against a fake peer: a unix socket that answers the way
//! cloud-hypervisor's vsock muxer does. No VMM runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use expect_test::expect;
use kiln_vmm::{ErrorKind, VsockListener, vsock_connect};

use crate::support::run_dir;

/// Accepts one connection on `listener`, checks the CONNECT line, and
/// answers with `reply` (then `after`, in the same write).
fn fake_muxer(listener: UnixListener, reply: &'static str, after: &'static str) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).expect("read CONNECT");
        let mut stream = reader.into_inner();
        stream.write_all(format!("{reply}{after}").as_bytes()).expect("reply");
        // Keep the stream open until the client is done.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        line
    })
}

#[test]
fn vsock_connect_speaks_the_hybrid_handshake() {
    let dir = run_dir();
    let socket = dir.path().join("vsock");
    let peer = fake_muxer(UnixListener::bind(&socket).expect("bind"), "OK 1073741824\n", "hello from the guest");
    let mut stream = vsock_connect(&socket, 1234, Duration::from_secs(5)).expect("connect");
    // Bytes after the OK line belong to the caller, untouched.
    let mut greeting = [0u8; 20];
    stream.read_exact(&mut greeting).expect("read guest data");
    assert_eq!(&greeting, b"hello from the guest");
    drop(stream);
    assert_eq!(peer.join().expect("peer"), "CONNECT 1234\n");
}

#[test]
fn vsock_connect_reports_a_refused_port() {
    let dir = run_dir();
    let socket = dir.path().join("vsock");
    let listener = UnixListener::bind(&socket).expect("bind");
    // cloud-hypervisor closes the connection when nothing listens in the guest.
    let peer = std::thread::spawn(move || drop(listener.accept().expect("accept")));
    let err = vsock_connect(&socket, 52, Duration::from_secs(5)).expect_err("refused");
    peer.join().expect("peer");
    assert_eq!(err.kind(), ErrorKind::Protocol);
    expect![
        "Unexpected answer from the VMM to vsock CONNECT 52: connection closed: is the guest listening on that port?"
    ]
    .assert_eq(&err.to_string());
}

#[test]
fn vsock_connect_rejects_a_bad_reply_and_a_silent_peer() {
    let dir = run_dir();
    let socket = dir.path().join("vsock");
    let peer = fake_muxer(UnixListener::bind(&socket).expect("bind"), "NO 1\n", "");
    let err = vsock_connect(&socket, 7, Duration::from_secs(5)).expect_err("bad reply");
    expect![[r#"Unexpected answer from the VMM to vsock CONNECT 7: expected `OK <port>`, got "NO 1\n""#]]
        .assert_eq(&err.to_string());
    drop(peer);
    // A peer that accepts and never answers hits the deadline.
    let silent = dir.path().join("silent");
    let _listener = UnixListener::bind(&silent).expect("bind");
    let err = vsock_connect(&silent, 7, Duration::from_millis(200)).expect_err("silent peer");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
}

#[test]
fn vsock_listener_receives_guest_connections() {
    let dir = run_dir();
    let socket = dir.path().join("vsock");
    let listener = VsockListener::bind(&socket, 5000).expect("listen");
    let path = listener.path().to_owned();
    assert_eq!(path, dir.path().join("vsock_5000"));
    let mode = std::fs::metadata(&path).expect("socket exists").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // The VMM connects to <socket>_<port> when the guest connects to host port 5000.
    let vmm = std::thread::spawn(move || {
        let mut stream = UnixStream::connect(&path).expect("connect");
        stream.write_all(b"ready").expect("write");
    });
    let mut stream = listener.accept().expect("accept");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    vmm.join().expect("vmm thread");
    assert_eq!(text, "ready");
    let path = listener.path().to_owned();
    drop(listener);
    assert!(!path.exists(), "listener socket removed on drop");
}

#[test]
fn vsock_listener_path_must_fit_sun_path() {
    let dir = run_dir();
    let socket = dir.path().join("v".repeat(100));
    let err = VsockListener::bind(&socket, 4_000_000_000).expect_err("too long");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("a unix socket path holds at most 107"), "{err}");
}
