//! The control channel between kiln's launcher and kiln-init: one
//! bidirectional stream of `\n`-terminated ASCII lines that the service's
//! output never reaches (QEMU: the virtio-serial port [`CONTROL_PORT_NAME`];
//! cloud-hypervisor: vsock port [`crate::VSOCK_STATUS_PORT`]). Pure: both
//! ends build and parse their lines here, and nowhere else.
//!
//! Guest to host, once, when the service has ended (or kiln-init failed):
//! `exit <code>`, `signal <number>` or `failed <reason>`.
//! Host to guest: `stop <grace seconds>`, which stops the service like the
//! power button does, with that grace period before SIGKILL.

use std::fmt;

use crate::error::{Error, Result};

/// The name of kiln-init's virtio-serial port (`/sys/class/virtio-ports/*/name`).
pub const CONTROL_PORT_NAME: &str = "org.kiln.control";
/// The longest line either end accepts, newline included; longer ones are
/// dropped whole (a `failed` reason is cut to fit).
pub const MAX_LINE: usize = 1024;
/// The longest grace period a `stop` may ask for (one day): kiln-init adds
/// it to a clock, which must not overflow.
pub const MAX_GRACE_SECONDS: u64 = 86_400;

/// What kiln-init reports about the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestReport {
    /// The service exited with this status.
    Exited(u8),
    /// The service was killed by this signal.
    Killed(u8),
    /// kiln-init could not run the service (or failed while it ran).
    Failed(String),
}

impl GuestReport {
    /// The exit code a shell would give: the status, or 128 + the signal.
    /// `None` for a failure (the service never gave one).
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            GuestReport::Exited(code) => Some(i32::from(*code)),
            GuestReport::Killed(signal) => Some(128 + i32::from(*signal)),
            GuestReport::Failed(_) => None,
        }
    }

    /// The report as one line, newline included. A failure reason is made
    /// one line of printable ASCII and cut to fit [`MAX_LINE`].
    pub fn to_line(&self) -> String {
        let mut line = match self {
            GuestReport::Exited(code) => format!("exit {code}"),
            GuestReport::Killed(signal) => format!("signal {signal}"),
            GuestReport::Failed(reason) => format!("failed {}", printable(reason)),
        };
        line.truncate(MAX_LINE - 1);
        line.push('\n');
        line
    }

    /// Parses one line (without its newline).
    pub fn parse(line: &str) -> Result<GuestReport> {
        let bad = |reason: &str| Error::Control { line: line.to_owned(), reason: reason.to_owned() };
        let (word, rest) =
            line.split_once(' ').ok_or_else(|| bad("expected `exit N`, `signal N` or `failed REASON`"))?;
        let number = |limit: u8| {
            decimal(rest).filter(|n| *n <= u64::from(limit)).map(|n| n as u8).ok_or_else(|| bad("bad number"))
        };
        match word {
            "exit" => Ok(GuestReport::Exited(number(u8::MAX)?)),
            "signal" => match number(64)? {
                0 => Err(bad("signal 0")),
                signal => Ok(GuestReport::Killed(signal)),
            },
            "failed" if !rest.is_empty() => Ok(GuestReport::Failed(printable(rest))),
            _ => Err(bad("expected `exit N`, `signal N` or `failed REASON`")),
        }
    }
}

impl fmt::Display for GuestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestReport::Exited(code) => write!(f, "service exited with status {code}"),
            GuestReport::Killed(signal) => write!(f, "service killed by signal {signal}"),
            GuestReport::Failed(reason) => write!(f, "guest failed: {reason}"),
        }
    }
}

/// What the launcher asks of kiln-init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCommand {
    /// SIGTERM the service now, SIGKILL its process group after this many seconds.
    Stop { grace_seconds: u64 },
}

impl HostCommand {
    /// The command as one line, newline included.
    pub fn to_line(&self) -> String {
        match self {
            HostCommand::Stop { grace_seconds } => format!("stop {grace_seconds}\n"),
        }
    }

    /// Parses one line (without its newline).
    pub fn parse(line: &str) -> Result<HostCommand> {
        let bad = |reason: &str| Error::Control { line: line.to_owned(), reason: reason.to_owned() };
        let seconds = line.strip_prefix("stop ").ok_or_else(|| bad("expected `stop SECONDS`"))?;
        match decimal(seconds) {
            Some(grace_seconds) if grace_seconds <= MAX_GRACE_SECONDS => Ok(HostCommand::Stop { grace_seconds }),
            _ => Err(bad("the grace period must be 0 to 86400 whole seconds")),
        }
    }
}

/// `text` with everything but printable ASCII and spaces as `?`.
fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect()
}

/// Plain decimal digits only (no sign, no spaces, no leading zero), at
/// most 20 of them: each number has one spelling.
fn decimal(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if text.len() > 1 && text.starts_with('0') {
        return None;
    }
    text.parse().ok()
}

/// Splits a byte stream into lines. Bytes go in as they arrive; complete
/// lines come out without their `\n` (and a `\r` before it). A line longer
/// than [`MAX_LINE`] is dropped up to its newline; one that is not UTF-8
/// comes out lossily converted (no report parses from it, but a `failed`
/// reason, whose odd characters become `?`).
#[derive(Debug, Default, Clone)]
pub struct LineBuffer {
    pending: Vec<u8>,
    /// Inside an overlong line: discard until the next newline.
    skipping: bool,
}

impl LineBuffer {
    pub fn new() -> LineBuffer {
        LineBuffer::default()
    }

    /// Adds `bytes` and returns the lines they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                if !std::mem::take(&mut self.skipping) {
                    let mut line = std::mem::take(&mut self.pending);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    lines.push(String::from_utf8_lossy(&line).into_owned());
                }
                self.pending.clear();
            } else if !self.skipping {
                self.pending.push(byte);
                if self.pending.len() >= MAX_LINE {
                    self.pending.clear();
                    self.skipping = true;
                }
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};
    use proptest::prelude::*;

    use super::*;

    /// A parse's outcome as one line: `show` of the value, or the error.
    fn check<T>(parsed: Result<T>, show: impl FnOnce(&T) -> String, expected: Expect) {
        let actual = match parsed {
            Ok(value) => show(&value),
            Err(err) => format!("error: {err}"),
        };
        expected.assert_eq(&actual);
    }

    fn check_report(line: &str, expected: Expect) {
        let show =
            |report: &GuestReport| format!("{report:?} code={:?} line={:?}", report.exit_code(), report.to_line());
        check(GuestReport::parse(line), show, expected);
    }

    #[test]
    fn guest_reports_parse_and_round_trip() {
        check_report("exit 0", expect![[r#"Exited(0) code=Some(0) line="exit 0\n""#]]);
        check_report("exit 255", expect![[r#"Exited(255) code=Some(255) line="exit 255\n""#]]);
        check_report("signal 9", expect![[r#"Killed(9) code=Some(137) line="signal 9\n""#]]);
        check_report(
            "failed no disk labelled SERVICEDISK",
            expect![[
                r#"Failed("no disk labelled SERVICEDISK") code=None line="failed no disk labelled SERVICEDISK\n""#
            ]],
        );
        check_report("exit 256", expect!["error: Invalid control line \"exit 256\": bad number"]);
        check_report("exit -1", expect![[r#"error: Invalid control line "exit -1": bad number"#]]);
        check_report("exit +3", expect![[r#"error: Invalid control line "exit +3": bad number"#]]);
        check_report("exit 03", expect![[r#"error: Invalid control line "exit 03": bad number"#]]);
        check_report("exit 3 ", expect![[r#"error: Invalid control line "exit 3 ": bad number"#]]);
        check_report("signal 0", expect![[r#"error: Invalid control line "signal 0": signal 0"#]]);
        check_report("signal 65", expect![[r#"error: Invalid control line "signal 65": bad number"#]]);
        check_report(
            "failed ",
            expect![[r#"error: Invalid control line "failed ": expected `exit N`, `signal N` or `failed REASON`"#]],
        );
        check_report(
            "kiln-init: service exited with status 0",
            expect![[
                r#"error: Invalid control line "kiln-init: service exited with status 0": expected `exit N`, `signal N` or `failed REASON`"#
            ]],
        );
        check_report(
            "exit",
            expect![[r#"error: Invalid control line "exit": expected `exit N`, `signal N` or `failed REASON`"#]],
        );
    }

    #[test]
    fn failure_reasons_become_one_short_line() {
        let report = GuestReport::Failed(format!("two\nlines\tand é {}", "x".repeat(2000)));
        let line = report.to_line();
        assert_eq!(line.len(), MAX_LINE);
        assert!(line.starts_with("failed two?lines?and ? xxx"), "{line}");
        assert_eq!(line.matches('\n').count(), 1);
        let parsed = GuestReport::parse(line.trim_end_matches('\n')).expect("a cut reason still parses");
        assert!(matches!(parsed, GuestReport::Failed(reason) if reason.starts_with("two?lines")));
    }

    fn check_command(line: &str, expected: Expect) {
        check(HostCommand::parse(line), |command| format!("{command:?} line={:?}", command.to_line()), expected);
    }

    #[test]
    fn host_commands_parse_and_round_trip() {
        check_command("stop 30", expect![[r#"Stop { grace_seconds: 30 } line="stop 30\n""#]]);
        check_command("stop 0", expect![[r#"Stop { grace_seconds: 0 } line="stop 0\n""#]]);
        check_command("stop 86400", expect![[r#"Stop { grace_seconds: 86400 } line="stop 86400\n""#]]);
        check_command(
            "stop 86401",
            expect![[r#"error: Invalid control line "stop 86401": the grace period must be 0 to 86400 whole seconds"#]],
        );
        check_command(
            "stop 2.5",
            expect![[r#"error: Invalid control line "stop 2.5": the grace period must be 0 to 86400 whole seconds"#]],
        );
        check_command(
            "stop 99999999999999999999999",
            expect![[
                r#"error: Invalid control line "stop 99999999999999999999999": the grace period must be 0 to 86400 whole seconds"#
            ]],
        );
        check_command("halt", expect![[r#"error: Invalid control line "halt": expected `stop SECONDS`"#]]);
    }

    fn any_report() -> impl Strategy<Value = GuestReport> {
        prop_oneof![
            any::<u8>().prop_map(GuestReport::Exited),
            (1u8..=64).prop_map(GuestReport::Killed),
            "[ -~]{1,200}".prop_map(GuestReport::Failed),
        ]
    }

    proptest! {
        #[test]
        fn reports_and_commands_round_trip_through_any_split(
            reports in proptest::collection::vec(any_report(), 1..4),
            grace in 0..=MAX_GRACE_SECONDS,
            split in any::<usize>(),
        ) {
            let mut bytes: Vec<u8> = reports.iter().flat_map(|r| r.to_line().into_bytes()).collect();
            let stop = HostCommand::Stop { grace_seconds: grace };
            bytes.extend_from_slice(stop.to_line().as_bytes());
            let at = split % (bytes.len() + 1);
            let mut buffer = LineBuffer::new();
            let mut lines = buffer.push(&bytes[..at]);
            lines.extend(buffer.push(&bytes[at..]));
            prop_assert_eq!(lines.len(), reports.len() + 1);
            for (line, report) in lines.iter().zip(&reports) {
                prop_assert_eq!(&GuestReport::parse(line)?, report);
            }
            prop_assert_eq!(HostCommand::parse(&lines[reports.len()])?, stop);
        }
    }

    proptest! {
        /// The fuzz target's property (`guest_readers`), on any bytes.
        #[test]
        fn any_bytes_give_short_lines_that_print_back_as_they_parse(
            bytes in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b' '), any::<u8>()], 0..3000),
        ) {
            for line in LineBuffer::new().push(&bytes) {
                prop_assert!(line.chars().count() < MAX_LINE);
                if let Ok(report) = GuestReport::parse(&line) {
                    prop_assert_eq!(GuestReport::parse(report.to_line().trim_end_matches('\n')).ok(), Some(report));
                }
                if let Ok(command) = HostCommand::parse(&line) {
                    prop_assert_eq!(command.to_line(), format!("{line}\n"));
                }
            }
        }
    }

    #[test]
    fn lines_are_split_across_reads() {
        let mut buffer = LineBuffer::new();
        assert_eq!(buffer.push(b"exi"), Vec::<String>::new());
        assert_eq!(buffer.push(b"t 3\r\nsignal 9\nfai"), vec!["exit 3".to_owned(), "signal 9".to_owned()]);
        assert_eq!(buffer.push(b"led x\n"), vec!["failed x".to_owned()]);
        // An overlong line is dropped whole; the next one still comes through.
        let mut long = vec![b'a'; MAX_LINE * 3];
        long.extend_from_slice(b"\nexit 1\n");
        assert_eq!(buffer.push(&long), vec!["exit 1".to_owned()]);
        assert_eq!(buffer.push(b"\xff\n"), vec!["\u{fffd}".to_owned()]);
    }
}
