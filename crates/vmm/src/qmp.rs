//! A minimal synchronous QMP client: one JSON object per line over a unix
//! socket, with a deadline on every read and write.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::process::VmmProcess;

/// QMP lines longer than this are refused (a reply to anything kiln asks is tiny).
const MAX_LINE: u64 = 1 << 20;

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum QmpMessage {
    Greeting,
    /// A reply; `id` echoes the request's, so a late reply to a command
    /// that timed out is never taken for the answer to the next one.
    Return {
        value: Value,
        id: Option<u64>,
    },
    Error {
        class: String,
        desc: String,
        id: Option<u64>,
    },
    Event {
        name: String,
        data: Value,
    },
}

/// Parses one QMP line. Pure, and fuzzed: QEMU's output is not trusted.
pub(crate) fn parse_qmp_line(line: &str) -> Result<QmpMessage> {
    let bad = |detail: &str| Error::protocol("QMP", format!("{detail}: {}", line.trim_end()));
    let value: Value = serde_json::from_str(line).map_err(|_| bad("not JSON"))?;
    let Value::Object(object) = value else { return Err(bad("not a JSON object")) };
    if object.contains_key("QMP") {
        return Ok(QmpMessage::Greeting);
    }
    let id = object.get("id").and_then(Value::as_u64);
    if let Some(value) = object.get("return") {
        return Ok(QmpMessage::Return { value: value.clone(), id });
    }
    if let Some(error) = object.get("error") {
        let text = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
        return Ok(QmpMessage::Error { class: text("class"), desc: text("desc"), id });
    }
    if let Some(Value::String(name)) = object.get("event") {
        let data = object.get("data").cloned().unwrap_or(Value::Null);
        return Ok(QmpMessage::Event { name: name.clone(), data });
    }
    Err(bad("neither a greeting, a reply nor an event"))
}

#[derive(Debug)]
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: PathBuf,
    /// Events seen while waiting for replies, oldest first.
    pub(crate) events: Vec<(String, Value)>,
    /// The id of the last request sent.
    last_id: u64,
}

impl Qmp {
    /// Connects to QEMU's QMP socket at `path` once it appears, reads the
    /// greeting and negotiates capabilities, all within `timeout`. Fails
    /// early if `process` exits.
    pub(crate) fn connect(path: &Path, process: &mut VmmProcess, timeout: Duration) -> Result<Qmp> {
        let started = Instant::now();
        let deadline = started + timeout;
        let stream = loop {
            if let Some(status) = process.try_exit()? {
                return Err(process.exited_error("start-up", status));
            }
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(err) if matches!(err.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout { what: "QEMU's QMP socket".into(), deadline: timeout });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(err) => return Err(Error::io("Connecting to QMP", path, err)),
            }
        };
        let writer = stream.try_clone().map_err(|err| Error::io("Cloning the QMP socket", path, err))?;
        let mut qmp =
            Qmp { reader: BufReader::new(stream), writer, path: path.to_owned(), events: Vec::new(), last_id: 0 };
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        match qmp.read_message("the QMP greeting", remaining)? {
            QmpMessage::Greeting => {}
            other => return Err(Error::protocol("the QMP greeting", format!("{other:?}"))),
        }
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        qmp.execute("qmp_capabilities", None, remaining)?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value.
    pub(crate) fn execute(&mut self, command: &str, arguments: Option<Value>, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        self.last_id += 1;
        let id = self.last_id;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer.set_write_timeout(Some(timeout)).map_err(|err| Error::io("Configuring QMP", &self.path, err))?;
        self.writer.write_all(line.as_bytes()).map_err(|err| self.io_error(command, timeout, err))?;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::Timeout { what: format!("QMP `{command}`"), deadline: timeout });
            }
            match self.read_message(command, remaining)? {
                QmpMessage::Return { value, id: Some(reply) } if reply == id => return Ok(value),
                QmpMessage::Error { class, desc, id: Some(reply) } if reply == id => {
                    return Err(Error::Qmp { command: command.into(), class, desc });
                }
                // A late reply to an earlier request that timed out.
                QmpMessage::Return { .. } | QmpMessage::Error { .. } => {}
                QmpMessage::Event { name, data } => self.events.push((name, data)),
                QmpMessage::Greeting => return Err(Error::protocol(format!("QMP `{command}`"), "a second greeting")),
            }
        }
    }

    /// Reads what QEMU sent before it closed the socket (after it exited),
    /// keeping the events.
    pub(crate) fn drain_events(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while let Some(remaining) = deadline.checked_duration_since(Instant::now()) {
            match self.read_message("draining events", remaining) {
                Ok(QmpMessage::Event { name, data }) => self.events.push((name, data)),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }

    fn read_message(&mut self, what: &str, timeout: Duration) -> Result<QmpMessage> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|err| Error::io("Configuring QMP", &self.path, err))?;
        let mut line = Vec::new();
        let read = (&mut self.reader).take(MAX_LINE).read_until(b'\n', &mut line);
        match read {
            Ok(0) => Err(Error::protocol(format!("QMP `{what}`"), "QEMU closed the connection")),
            Ok(_) if !line.ends_with(b"\n") => {
                Err(Error::protocol(format!("QMP `{what}`"), "line too long or cut off"))
            }
            Ok(_) => parse_qmp_line(&String::from_utf8_lossy(&line)),
            Err(err) => Err(self.io_error(what, timeout, err)),
        }
    }

    fn io_error(&self, what: &str, timeout: Duration, err: io::Error) -> Error {
        if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            Error::Timeout { what: format!("QMP `{what}`"), deadline: timeout }
        } else {
            Error::io(format!("QMP `{what}`"), &self.path, err)
        }
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn check(line: &str, expected: Expect) {
        let actual = match parse_qmp_line(line) {
            Ok(message) => format!("{message:?}"),
            Err(err) => format!("error: {err}"),
        };
        expected.assert_eq(&actual);
    }

    #[test]
    fn qmp_lines() {
        check(
            r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#,
            expect!["Greeting"],
        );
        check(r#"{"return": {}}"#, expect!["Return { value: Object {}, id: None }"]);
        check(r#"{"return": {}, "id": 7}"#, expect!["Return { value: Object {}, id: Some(7) }"]);
        check(
            r#"{"return": {"status": "prelaunch", "singlestep": false, "running": false}}"#,
            expect![[
                r#"Return { value: Object {"running": Bool(false), "singlestep": Bool(false), "status": String("prelaunch")}, id: None }"#
            ]],
        );
        check(
            r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            expect![[r#"Error { class: "CommandNotFound", desc: "The command nope has not been found", id: None }"#]],
        );
        check(
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#,
            expect![[
                r#"Event { name: "SHUTDOWN", data: Object {"guest": Bool(true), "reason": String("guest-shutdown")} }"#
            ]],
        );
        check("[1]", expect!["error: Unexpected answer from the VMM to QMP: not a JSON object: [1]"]);
        check(
            "{\"x\":1}\n",
            expect![[
                r#"error: Unexpected answer from the VMM to QMP: neither a greeting, a reply nor an event: {"x":1}"#
            ]],
        );
        check("{", expect!["error: Unexpected answer from the VMM to QMP: not JSON: {"]);
    }
}
