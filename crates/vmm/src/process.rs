//! The VMM process: spawned into its own process group with its output in
//! a log file, killed if the launcher dies, always reaped.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::error::{Error, Result};

/// How many lines of the VMM log an error or a crash report carries.
pub(crate) const LOG_TAIL_LINES: usize = 20;

#[derive(Debug)]
pub(crate) struct VmmProcess {
    child: Child,
    log_path: PathBuf,
    exit: Option<ExitStatus>,
}

impl VmmProcess {
    /// Starts `binary args`, stdout and stderr appended to `log_path`
    /// (created 0600, truncated), stdin from /dev/null.
    pub(crate) fn spawn(binary: &Path, args: &[OsString], log_path: &Path) -> Result<VmmProcess> {
        let mut log = open_log(log_path)?;
        // The command line heads the log (as libvirt does), so a crash
        // report always says what ran. The VMM's output follows it: the
        // child inherits the file offset.
        let header = format!("kiln: starting {}\n", command_line(binary, args));
        log.write_all(header.as_bytes()).map_err(|err| Error::io("Writing the VMM log", log_path, err))?;
        let log_err = log.try_clone().map_err(|err| Error::io("Sharing the VMM log", log_path, err))?;
        let mut command = Command::new(binary);
        command.args(args).stdin(Stdio::null()).stdout(log).stderr(log_err);
        // Its own group: a terminal's Ctrl-C reaches kiln, which shuts the
        // VM down, not the VMM directly; and kill(-pgid) reaches any helper
        // process the VMM started.
        command.process_group(0);
        let parent = rustix::process::getpid();
        // SAFETY: the closure runs between fork and exec in the child. It
        // only makes raw syscalls (prctl, getppid) and builds an io::Error
        // from an errno, which does not allocate: async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                // Killed when the thread that spawned it exits (Linux ties
                // PDEATHSIG to the parent *thread*): see ARCHITECTURE.md.
                rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
                // The parent may have died before prctl took effect.
                if rustix::process::getppid() != Some(parent) {
                    return Err(io::Error::from_raw_os_error(esrch()));
                }
                Ok(())
            })
        };
        let child = command.spawn().map_err(|err| match err.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
                Error::BinaryMissing { binary: binary.to_owned(), source: err }
            }
            _ => Error::io("Starting the VMM", binary, err),
        })?;
        Ok(VmmProcess { child, log_path: log_path.to_owned(), exit: None })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The exit status, if the process has exited (it is reaped then).
    pub(crate) fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().map_err(|err| Error::io("Waiting for the VMM", &self.log_path, err))?;
        }
        Ok(self.exit)
    }

    /// Waits up to `timeout` for the process to exit.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the process group and reaps the VMM. Idempotent.
    pub(crate) fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        if let Some(pid) = Pid::from_raw(self.pid() as i32) {
            // ESRCH: the group is already gone; the child still needs reaping.
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        }
        let status = self.child.wait().map_err(|err| Error::io("Reaping the VMM", &self.log_path, err))?;
        self.exit = Some(status);
        Ok(status)
    }

    /// The last lines of the VMM log.
    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log_path, LOG_TAIL_LINES)
    }

    /// The last error the VMM logged (see [`last_error_line`]), searched in
    /// the log's last 64 KiB: a backtrace may follow it for many lines.
    pub(crate) fn last_error_line(&self) -> Option<String> {
        last_error_line(&String::from_utf8_lossy(&read_end(&self.log_path, 64 << 10)))
    }

    /// An error for a VMM that exited while kiln needed it.
    pub(crate) fn exited_error(&self, during: &str, status: ExitStatus) -> Error {
        Error::VmmExited { during: during.to_owned(), status: status.to_string(), log_tail: self.log_tail() }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        // Never leave a VMM running or a zombie behind.
        let _ = self.kill();
    }
}

fn open_log(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| Error::io("Creating the VMM log", path, err))
}

/// The last `lines` lines of the file at `path` (at most its last 8 KiB),
/// lossily decoded; empty if it cannot be read.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let bytes = read_end(path, 8192);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last `max` bytes of the file at `path`; empty if it cannot be read.
fn read_end(path: &Path, max: u64) -> Vec<u8> {
    let read = || -> io::Result<Vec<u8>> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
        let mut bytes = Vec::new();
        file.take(max).read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    read().unwrap_or_default()
}

/// The last error a VMM log reports, on one line and without the logger's
/// prefix: cloud-hypervisor's `cloud-hypervisor: 45.1s: <vcpu0>
/// ERROR:vmm/src/cpu.rs:1487 -- VCPU generated error: ...` becomes `VCPU
/// generated error: ...`, followed by the causes that anyhow's `{:?}` puts
/// on the next lines (`Caused by:`, indented), each after `: `; the
/// backtrace is left out. Error lines are the logger's `ERROR` level, a
/// Rust panic, or a line that starts with `error`; kiln's own header line
/// never counts. Pure; the log is not trusted, so the result is cut to 400
/// characters.
pub(crate) fn last_error_line(log: &str) -> Option<String> {
    let lines: Vec<&str> = log.lines().collect();
    let at = lines.iter().rposition(|line| {
        let line = line.trim();
        !line.starts_with("kiln: ")
            && (line.contains(" ERROR:")
                || line.contains("panicked at")
                || line.get(..5).is_some_and(|head| head.eq_ignore_ascii_case("error")))
    })?;
    let line = lines[at].trim();
    let mut message = match line.split_once(" ERROR:") {
        Some((_, rest)) => rest.split_once(" -- ").map_or(rest, |(_, message)| message),
        None => line,
    }
    .trim()
    .to_owned();
    let mut in_causes = false;
    for line in lines[at + 1..].iter().map(|line| line.trim()) {
        if line.starts_with("cloud-hypervisor: ") || line == "Stack backtrace:" {
            break;
        }
        if line == "Caused by:" {
            in_causes = true;
        } else if in_causes && !line.is_empty() {
            // Several causes are numbered `0: `, `1: `...
            let cause = match line.split_once(": ") {
                Some((number, cause)) if number.chars().all(|c| c.is_ascii_digit()) => cause,
                _ => line,
            };
            message.push_str(": ");
            message.push_str(cause);
        }
    }
    Some(message.chars().take(400).collect())
}

/// `binary args...`, each word single-quoted when it is not plain.
fn command_line(binary: &Path, args: &[OsString]) -> String {
    let quote = |word: &std::ffi::OsStr| {
        let word = word.to_string_lossy();
        let plain = !word.is_empty()
            && word.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ',' | '=' | ':'));
        if plain { word.into_owned() } else { format!("'{}'", word.replace('\'', "'\\''")) }
    };
    std::iter::once(quote(binary.as_os_str())).chain(args.iter().map(|arg| quote(arg))).collect::<Vec<_>>().join(" ")
}

/// ESRCH without a libc dependency: rustix's errno carries the raw value.
fn esrch() -> i32 {
    rustix::io::Errno::SRCH.raw_os_error()
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmm.log");
        std::fs::write(&path, (1..=30).map(|n| format!("line {n}\n")).collect::<String>()).expect("write");
        assert_eq!(log_tail(&path, 3), "line 28\nline 29\nline 30");
        assert_eq!(log_tail(&dir.path().join("missing"), 3), "");
    }

    #[test]
    fn the_last_error_line_is_found_past_a_backtrace() {
        let check = |log: &str, expected: expect_test::Expect| {
            expected.assert_eq(&format!("{:?}", last_error_line(log)));
        };
        // What cloud-hypervisor v54 wrote on this nested host (FACTS.md).
        let vcpu = "kiln: starting cloud-hypervisor --api-socket path=/run/x/api.sock --no-shutdown\n\
            cloud-hypervisor:   0.725354s: <vcpu0> WARN:vmm/src/cpu.rs:278 -- Kernel lacks CONFIG_SCHED_CORE support - no SMT isolation\n\
            cloud-hypervisor: 100.633141s: <vcpu0> ERROR:vmm/src/cpu.rs:1487 -- VCPU generated error: VcpuRun(Failed to run vcpu\n\
            \n\
            Caused by:\n    Unexpected exit reason on vcpu run: InternalError\n\
            \n\
            Stack backtrace:\n   0: <unknown>\n   4: start_thread\n             at ./nptl/pthread_create.c:442:8\n";
        check(
            vcpu,
            expect_test::expect![[
                r#"Some("VCPU generated error: VcpuRun(Failed to run vcpu: Unexpected exit reason on vcpu run: InternalError")"#
            ]],
        );
        check(
            "cloud-hypervisor: 1.0s: <vmm> ERROR:vmm/src/lib.rs:1 -- outer\nCaused by:\n    0: middle\n    1: inner\ncloud-hypervisor: 2.0s: <vmm> WARN:x -- later\n",
            expect_test::expect![[r#"Some("outer: middle: inner")"#]],
        );
        check(
            "thread 'vcpu0' panicked at vmm/src/cpu.rs:10:5:\nboom\nnote: run with `RUST_BACKTRACE=1`\n",
            expect_test::expect![[r#"Some("thread 'vcpu0' panicked at vmm/src/cpu.rs:10:5:")"#]],
        );
        check("Error booting VM: VmBoot(...)\n", expect_test::expect![[r#"Some("Error booting VM: VmBoot(...)")"#]]);
        check("kiln: starting /bin/error-prone\nfake cloud-hypervisor exiting with 0\n", expect_test::expect!["None"]);
        check("", expect_test::expect!["None"]);
    }

    proptest::proptest! {
        // The log is the VMM's (and a guest can make it write): any text is read safely.
        #[test]
        fn any_log_gives_at_most_one_short_line(log in "(?s).{0,600}", prefix in "(ERROR:|error|Caused by:\n|  0: |Stack backtrace:\n|\u{e9}){0,3}") {
            if let Some(line) = last_error_line(&format!("{prefix}{log}")) {
                proptest::prop_assert!(line.chars().count() <= 400 && !line.contains('\n'));
            }
        }
    }

    #[test]
    fn command_lines_are_quoted() {
        let args: Vec<OsString> = ["-append", "console=ttyS0 panic=-1", "it's", ""].map(OsString::from).to_vec();
        expect_test::expect![[r#"/usr/bin/qemu -append 'console=ttyS0 panic=-1' 'it'\''s' ''"#]]
            .assert_eq(&command_line(Path::new("/usr/bin/qemu"), &args));
    }

    #[test]
    fn missing_binary_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = VmmProcess::spawn(Path::new("/nonexistent/qemu"), &[], &dir.path().join("log"))
            .expect_err("no such binary");
        assert_eq!(err.kind(), crate::ErrorKind::BinaryMissing);
        expect_test::expect!["Cannot start `/nonexistent/qemu`; install it or point kiln at it"]
            .assert_eq(&err.to_string());
    }

    #[test]
    fn exit_status_and_kill() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let mut quick =
            VmmProcess::spawn(Path::new("/bin/sh"), &["-c".into(), "echo hello; exit 3".into()], &log).expect("sh");
        let status = quick.wait_exit(Duration::from_secs(10)).expect("wait").expect("exits");
        assert_eq!(status.code(), Some(3));
        assert_eq!(quick.log_tail(), "kiln: starting /bin/sh -c 'echo hello; exit 3'\nhello");
        let mut slow =
            VmmProcess::spawn(Path::new("/bin/sh"), &["-c".into(), "sleep 60 & wait".into()], &log).expect("sh");
        assert_eq!(slow.wait_exit(Duration::from_millis(50)).expect("wait"), None);
        let status = slow.kill().expect("kill");
        assert_eq!(status.signal(), Some(9));
        // The whole group died: the backgrounded sleep too (once init has
        // reaped the orphan, the group is empty).
        let group = Pid::from_raw(slow.pid() as i32).expect("pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        while rustix::process::test_kill_process_group(group).is_ok() {
            assert!(Instant::now() < deadline, "process group still alive");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(slow.kill().expect("idempotent").signal(), Some(9));
    }
}
