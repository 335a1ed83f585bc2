//! Just enough HTTP/1.1 for cloud-hypervisor's API socket: one request per
//! connection, `Content-Length` bodies, a deadline on everything, and the
//! VMM's liveness checked while waiting.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::process::VmmProcess;

/// Response heads larger than this are refused.
const MAX_HEAD: usize = 16 << 10;
/// Response bodies larger than this are refused (`vm.info` is a few KiB).
const MAX_BODY: usize = 16 << 20;
/// How often a waiting request checks that the VMM still runs.
const LIVENESS_SLICE: Duration = Duration::from_millis(20);

/// An HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
}

/// Parses a response from the bytes read so far: `Ok(None)` when more are
/// needed. `eof` says the peer closed the connection (a body without
/// `Content-Length` ends there). Pure, and fuzzed: the VMM is not trusted.
pub(crate) fn parse_response(bytes: &[u8], eof: bool) -> std::result::Result<Option<Response>, String> {
    let Some(head_len) = bytes.windows(4).position(|window| window == b"\r\n\r\n") else {
        if bytes.len() > MAX_HEAD {
            return Err(format!("response head exceeds {MAX_HEAD} bytes"));
        }
        return if eof { Err("connection closed before the end of the response head".into()) } else { Ok(None) };
    };
    if head_len > MAX_HEAD {
        return Err(format!("response head exceeds {MAX_HEAD} bytes"));
    }
    let head = std::str::from_utf8(&bytes[..head_len]).map_err(|_| "response head is not UTF-8".to_owned())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(format!("bad status line `{status_line}`"));
    }
    let status: u16 = code.parse().map_err(|_| format!("bad status line `{status_line}`"))?;
    if !(100..=599).contains(&status) {
        return Err(format!("bad status line `{status_line}`"));
    }
    let mut content_length = None;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or_else(|| format!("bad header line `{line}`"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length: usize = value.parse().map_err(|_| format!("bad Content-Length `{value}`"))?;
            if length > MAX_BODY {
                return Err(format!("body of {length} bytes exceeds {MAX_BODY}"));
            }
            if content_length.is_some_and(|previous| previous != length) {
                return Err("conflicting Content-Length headers".into());
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("unsupported Transfer-Encoding `{value}`"));
        }
    }
    let body = &bytes[head_len + 4..];
    let no_body = status == 204 || status == 304 || status < 200;
    match content_length {
        _ if no_body => Ok(Some(Response { status, body: Vec::new() })),
        Some(length) if body.len() >= length => Ok(Some(Response { status, body: body[..length].to_vec() })),
        Some(_) if eof => Err("connection closed before the end of the body".into()),
        Some(_) => Ok(None),
        None if body.len() > MAX_BODY => Err(format!("body exceeds {MAX_BODY} bytes")),
        None if eof => Ok(Some(Response { status, body: body.to_vec() })),
        None => Ok(None),
    }
}

/// Renders a request. `body` is JSON.
pub(crate) fn render_request(method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if let Some(body) = body {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    } else if method == "PUT" {
        request.push_str("Content-Length: 0\r\n");
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    bytes
}

/// Why a request did not produce a response.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The socket is not there (yet) or nobody listens.
    NotListening(io::Error),
    /// The VMM process exited while kiln waited.
    Exited(std::process::ExitStatus),
    /// Anything else, as a finished error.
    Error(Error),
}

/// Sends one request on a fresh connection to `socket` and reads the
/// response within `timeout`, giving up early if `process` exits.
pub(crate) fn request(
    socket: &Path,
    process: &mut VmmProcess,
    method: &str,
    endpoint: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> std::result::Result<Response, Failure> {
    let deadline = Instant::now() + timeout;
    let timed_out =
        || Failure::Error(Error::Timeout { what: format!("cloud-hypervisor {endpoint}"), deadline: timeout });
    let io_error = |err: io::Error| Failure::Error(Error::io(format!("cloud-hypervisor {endpoint}"), socket, err));
    let mut stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(err) if matches!(err.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
            return Err(Failure::NotListening(err));
        }
        Err(err) => return Err(io_error(err)),
    };
    stream.set_write_timeout(Some(timeout)).map_err(io_error)?;
    let request = render_request(method, &format!("/api/v1/{endpoint}"), body);
    if let Err(err) = stream.write_all(&request) {
        if let Ok(Some(status)) = process.try_exit() {
            return Err(Failure::Exited(status));
        }
        return Err(if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            timed_out()
        } else {
            io_error(err)
        });
    }
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(timed_out());
        }
        stream.set_read_timeout(Some(remaining.min(LIVENESS_SLICE))).map_err(io_error)?;
        let eof = match stream.read(&mut buffer) {
            Ok(0) => true,
            Ok(count) => {
                received.extend_from_slice(&buffer[..count]);
                false
            }
            Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if let Ok(Some(status)) = process.try_exit() {
                    return Err(Failure::Exited(status));
                }
                continue;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(io_error(err)),
        };
        match parse_response(&received, eof) {
            Ok(Some(response)) => return Ok(response),
            Ok(None) => {}
            Err(detail) => {
                if let Ok(Some(status)) = process.try_exit() {
                    return Err(Failure::Exited(status));
                }
                return Err(Failure::Error(Error::protocol(format!("cloud-hypervisor {endpoint}"), detail)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn check(bytes: &str, eof: bool, expected: Expect) {
        let actual = match parse_response(bytes.as_bytes(), eof) {
            Ok(Some(response)) => format!("{} {:?}", response.status, String::from_utf8_lossy(&response.body)),
            Ok(None) => "incomplete".into(),
            Err(err) => format!("error: {err}"),
        };
        expected.assert_eq(&actual);
    }

    #[test]
    fn responses() {
        check("HTTP/1.1 204 No Content\r\n\r\n", false, expect![[r#"204 """#]]);
        check("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", false, expect![[r#"200 "{}""#]]);
        check("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}", false, expect!["incomplete"]);
        check(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}",
            true,
            expect!["error: connection closed before the end of the body"],
        );
        check("HTTP/1.1 200 OK\r\n\r\nabc", true, expect![[r#"200 "abc""#]]);
        check("HTTP/1.1 200 OK\r\n", false, expect!["incomplete"]);
        check("HTTP/1.1 200 OK\r\n", true, expect!["error: connection closed before the end of the response head"]);
        check(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 67\r\n\r\n[\"Error from API\",\"The VM could not boot\",\"VM config is missing\"]",
            false,
            expect!["incomplete"],
        );
        check("HTTP/1.1 2000 OK\r\n\r\n", false, expect!["error: bad status line `HTTP/1.1 2000 OK`"]);
        check("SSH-2.0 hello\r\n\r\n", false, expect!["error: bad status line `SSH-2.0 hello`"]);
        check(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            expect!["error: unsupported Transfer-Encoding `chunked`"],
        );
        check(
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            false,
            expect!["error: body of 99999999999 bytes exceeds 16777216"],
        );
        check(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false,
            expect!["error: conflicting Content-Length headers"],
        );
    }

    fn check_request(method: &str, path: &str, body: Option<&[u8]>, expected: Expect) {
        // Line ends shown as `\r\n|` so the expectation has no raw CR.
        let text = String::from_utf8(render_request(method, path, body)).expect("ASCII").replace("\r\n", "\\r\\n|\n");
        expected.assert_eq(&text);
    }

    #[test]
    fn requests() {
        check_request(
            "GET",
            "/api/v1/vmm.ping",
            None,
            expect![[r#"
            GET /api/v1/vmm.ping HTTP/1.1\r\n|
            Host: localhost\r\n|
            Accept: application/json\r\n|
            \r\n|
        "#]],
        );
        check_request(
            "PUT",
            "/api/v1/vm.boot",
            None,
            expect![[r#"
            PUT /api/v1/vm.boot HTTP/1.1\r\n|
            Host: localhost\r\n|
            Accept: application/json\r\n|
            Content-Length: 0\r\n|
            \r\n|
        "#]],
        );
        check_request(
            "PUT",
            "/api/v1/vm.create",
            Some(b"{}"),
            expect![[r#"
            PUT /api/v1/vm.create HTTP/1.1\r\n|
            Host: localhost\r\n|
            Accept: application/json\r\n|
            Content-Type: application/json\r\n|
            Content-Length: 2\r\n|
            \r\n|
            {}"#]],
        );
    }
}
