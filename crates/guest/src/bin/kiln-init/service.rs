//! The service: started from `/srv/launch` in its own process group, its
//! output copied, and supervised until it ends, the power button or a
//! `stop` turning into SIGTERM and, after the grace period, SIGKILL.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_guest::{HostCommand, LineBuffer, StopSignal, VSOCK_LOG_PORT};

use crate::sys::{self, ExitStatus};
use crate::{Context, Failure, Result, say};

const SERVICE: &str = "/srv/launch";

/// Linux input: `struct input_event` is 24 bytes on x86_64; EV_KEY, KEY_POWER.
const INPUT_EVENT_LEN: usize = 24;

const EV_KEY: u16 = 1;

const KEY_POWER: u16 = 116;

/// The thread copying the service's output to the console and vsock, if any.
static TEE: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);

/// `/dev/input/event*` devices that report the ACPI power button.
pub(crate) fn power_buttons() -> Vec<File> {
    let Ok(entries) = fs::read_dir("/sys/class/input") else { return Vec::new() };
    let mut buttons = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("event") {
            continue;
        }
        let device_name = fs::read_to_string(entry.path().join("device/name")).unwrap_or_default();
        if device_name.trim() == "Power Button" {
            if let Ok(file) = File::open(format!("/dev/input/{name}")) {
                buttons.push(file);
            }
        }
    }
    buttons
}

/// Reads what a readable evdev device has: whether it holds a
/// power-button press (a key release or another key is no stop).
pub(crate) fn read_power_press(button: &File) -> bool {
    let mut events = [0; INPUT_EVENT_LEN * 16];
    let len = (&*button).read(&mut events).unwrap_or(0);
    power_pressed(&events[..len])
}

/// Whether the bytes read from an evdev device hold a power-button press.
fn power_pressed(events: &[u8]) -> bool {
    events.chunks_exact(INPUT_EVENT_LEN).any(|event| {
        let kind = u16::from_le_bytes([event[16], event[17]]);
        let code = u16::from_le_bytes([event[18], event[19]]);
        let value = i32::from_le_bytes([event[20], event[21], event[22], event[23]]);
        kind == EV_KEY && code == KEY_POWER && value == 1
    })
}

pub(crate) fn spawn_service() -> Result<i32> {
    if !sys::exists(SERVICE) {
        return Err(Failure(format!("{SERVICE} does not exist on the service disk")));
    }
    let mut command = Command::new(SERVICE);
    command.env_clear().env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin").env("HOME", "/").current_dir("/");
    spawn_command(command, SERVICE)
}

/// Starts `command` as the service: stdin from /dev/null, its own process
/// group, signals unblocked, output to the console (and the vsock log when
/// the host listens). Returns its pid; `what` names it in errors.
pub(crate) fn spawn_command(mut command: Command, what: &str) -> Result<i32> {
    command.stdin(Stdio::null()).process_group(0);
    // SAFETY: the hook only calls `pthread_sigmask`, which is async-signal-safe
    // and does not allocate. Without it the service would start with
    // SIGTERM blocked (kiln-init's signalfd mask), deaf to its stop.
    unsafe {
        command.pre_exec(sys::unblock_signals);
    }
    // With a vsock log port on the host, output goes to the console and there.
    let log = sys::vsock_connect(VSOCK_LOG_PORT).ok();
    let pipe = if log.is_some() {
        let (reader, writer) = sys::pipe().context(|| "cannot create the log pipe".to_owned())?;
        command.stdout(writer.try_clone().context(|| "cannot duplicate the log pipe".to_owned())?).stderr(writer);
        Some(reader)
    } else {
        None
    };
    let child = command.spawn().context(|| format!("cannot start {what}"))?;
    drop(command); // Closes our copies of the pipe's write end.
    if let (Some(reader), Some(log)) = (pipe, log) {
        let handle = std::thread::spawn(move || tee(reader, log));
        if let Ok(mut tee) = TEE.lock() {
            *tee = Some(handle);
        }
    }
    // The pid is kept, not the Child: kiln-init reaps every process itself.
    Ok(child.id() as i32)
}

/// Lets the output copier finish, so the exit line comes after the
/// service's last words; gives up after `limit` (an orphan may hold the pipe).
pub(crate) fn drain_service_output(limit: Duration) {
    let Some(handle) = TEE.lock().ok().and_then(|mut tee| tee.take()) else { return };
    let deadline = Instant::now() + limit;
    while !handle.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Copies the service's output to the console and the vsock log until EOF;
/// a vsock error drops the log, never the console.
fn tee(mut reader: File, log: File) {
    let mut log = Some(log);
    let mut buf = vec![0; 16 * 1024];
    loop {
        let len = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(len) => len,
        };
        let _ = io::stdout().lock().write_all(&buf[..len]);
        if let Some(socket) = log.as_mut() {
            if socket.write_all(&buf[..len]).is_err() {
                log = None;
            }
        }
    }
}

/// The host's commands on the control channel, read as they arrive. One
/// reader for the whole boot: the container setup's wait and supervise
/// share it, so a line cut in two between them is still read whole.
pub(crate) struct HostCommands {
    channel: Option<File>,
    lines: LineBuffer,
}

impl HostCommands {
    pub(crate) fn new(channel: Option<File>) -> HostCommands {
        HostCommands { channel, lines: LineBuffer::new() }
    }

    /// The descriptor to poll, while the host's end is open.
    pub(crate) fn fd(&self) -> Option<RawFd> {
        self.channel.as_ref().map(|channel| channel.as_raw_fd())
    }

    /// Reads what arrived (call once [`HostCommands::fd`] polls readable);
    /// the grace period of a `stop` among the lines it completed, if any.
    pub(crate) fn read(&mut self) -> Option<Duration> {
        let channel = self.channel.as_ref()?;
        let mut bytes = [0; 512];
        let mut asked = None;
        match (&*channel).read(&mut bytes) {
            Ok(0) => {
                // The host hung up: stop listening (a virtio port would
                // poll as readable forever), but keep the port held.
                say("control channel: the host closed its end");
                self.channel = None;
            }
            Ok(len) => {
                for line in self.lines.push(&bytes[..len]) {
                    match HostCommand::parse(&line) {
                        Ok(HostCommand::Stop { grace_seconds }) => asked = Some(Duration::from_secs(grace_seconds)),
                        Err(err) => say(&format!("control channel: ignored: {err}")),
                    }
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock || err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                say(&format!("control channel: cannot read: {err}"));
                self.channel = None;
            }
        }
        asked
    }
}

/// Waits for the service to end, reaping every child, turning the power
/// button (or SIGTERM/SIGINT/SIGPWR to PID 1) into `stop_signal` (SIGTERM,
/// or the container image's) for the service and SIGKILL for its process
/// group after `grace`; `stop SECONDS` from the control channel does the
/// same with its own grace.
pub(crate) fn supervise(
    service: i32,
    signals: &OwnedFd,
    buttons: &[File],
    mut commands: HostCommands,
    grace: Duration,
    stop_signal: StopSignal,
) -> Result<ExitStatus> {
    let mut kill_at: Option<Instant> = None;
    loop {
        let mut fds = vec![signals.as_raw_fd()];
        fds.extend(buttons.iter().map(|b| b.as_raw_fd()));
        fds.extend(commands.fd());
        // A child may have ended before the signalfd existed; reap first.
        while let Some((pid, status)) = sys::reap_one() {
            if pid == service {
                return Ok(status);
            }
        }
        let timeout = kill_at.map(|at| at.saturating_duration_since(Instant::now()));
        let ready = sys::poll_readable(&fds, timeout).context(|| "cannot wait for events".to_owned())?;
        let mut stop = false;
        if ready[0] {
            for signal in sys::read_signals(signals) {
                stop |= signal as libc::c_int != libc::SIGCHLD;
            }
        }
        for (button, is_ready) in buttons.iter().zip(&ready[1..]) {
            stop |= *is_ready && read_power_press(button);
        }
        let asked = if ready.get(1 + buttons.len()) == Some(&true) { commands.read() } else { None };
        if kill_at.is_none() {
            let start = match asked {
                Some(asked) => Some(("stop asked on the control channel", asked)),
                None => stop.then_some(("power button", grace)),
            };
            if let Some((why, grace)) = start {
                say(&format!("{why}: sending {stop_signal} to the service, grace {:.1}s", grace.as_secs_f64()));
                let _ = sys::kill(service, stop_signal.number());
                kill_at = Some(Instant::now() + grace);
            }
        }
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            say("grace period over: sending SIGKILL to the service's process group");
            let _ = sys::kill(-service, libc::SIGKILL);
            kill_at = Some(Instant::now() + Duration::from_secs(3600));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_button_events() {
        let event = |kind: u16, code: u16, value: i32| {
            let mut bytes = vec![0; 16];
            bytes.extend_from_slice(&kind.to_le_bytes());
            bytes.extend_from_slice(&code.to_le_bytes());
            bytes.extend_from_slice(&value.to_le_bytes());
            bytes
        };
        let press = [event(EV_KEY, KEY_POWER, 1), event(0, 0, 0)].concat();
        assert!(power_pressed(&press));
        assert!(!power_pressed(&event(EV_KEY, KEY_POWER, 0)));
        assert!(!power_pressed(&event(EV_KEY, 115, 1)));
        assert!(!power_pressed(&press[..20]));
    }
}
