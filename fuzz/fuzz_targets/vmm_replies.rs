//! Hostile VMM output -> kiln-vmm's readers (cloud-hypervisor HTTP
//! responses, QMP lines, hybrid-vsock `CONNECT` replies) must answer `Ok` or
//! `Err`, never panic.
//!
//! Round trips: a response rendered from an arbitrary status and body parses
//! back to the same status and body, whether it arrives whole or cut at an
//! arbitrary point (the first part must read as incomplete); a vsock reply
//! rendered from a port parses back to that port.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use kiln_vmm::fuzzing::{parse_http_response, parse_qmp_line, parse_vsock_reply};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Case {
    Http { bytes: Vec<u8>, eof: bool },
    Qmp(String),
    Vsock(Vec<u8>),
    HttpRoundTrip { status: u16, body: Vec<u8>, cut: usize },
    VsockRoundTrip(u32),
}

fuzz_target!(|data: &[u8]| {
    let Ok(case) = Case::arbitrary(&mut Unstructured::new(data)) else { return };
    match case {
        Case::Http { bytes, eof } => {
            let _ = parse_http_response(&bytes, eof);
        }
        Case::Qmp(line) => {
            let _ = parse_qmp_line(&line);
        }
        Case::Vsock(line) => {
            let _ = parse_vsock_reply(&line);
        }
        Case::HttpRoundTrip { status, body, cut } => {
            let status = 200 + status % 400;
            if status == 204 || status == 304 {
                return;
            }
            let mut response =
                format!("HTTP/1.1 {status} Whatever\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            response.extend_from_slice(&body);
            let whole = parse_http_response(&response, false).expect("a well-formed response parses");
            assert_eq!(whole, Some((status, body.clone())));
            let cut = cut % response.len();
            assert_eq!(parse_http_response(&response[..cut], false), Ok(None), "a prefix is incomplete");
        }
        Case::VsockRoundTrip(port) => {
            assert_eq!(parse_vsock_reply(format!("OK {port}\n").as_bytes()), Ok(port));
        }
    }
});
