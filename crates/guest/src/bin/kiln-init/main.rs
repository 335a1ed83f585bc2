//! kiln-init: PID 1 of kiln's minimal guest.
//!
//! It mounts `/proc`, `/sys` and `/dev`, loads the modules listed in
//! `/lib/modules/kiln/load-order`, finds the service disk (`SERVICEDISK`),
//! the seed (`CIDATA`) and the data disk by what they hold, never by order,
//! sets the hostname, eth0's address and default route from the seed, runs
//! `/srv/launch` (or, when the service disk holds `container.conf`, an OCI
//! container's program in an overlay of its layer disks), reaps orphans, turns the ACPI power button (or `stop` on
//! the control channel) into SIGTERM (or the image's stop signal) for the service, and powers off when
//! the service ends. Every outcome is one console line starting
//! `kiln-init: ` for people, and one report on the control channel for the
//! launcher (the console is the service's too, so it proves nothing). A
//! failure never panics the kernel without saying why. See ARCHITECTURE.md
//! (`crates/guest`).

mod channel;
mod container;
mod disks;
mod network;
mod service;
mod sys;

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::time::{Duration, Instant};

use kiln_guest::{GuestReport, MARKER_PREFIX, SEED_LABEL, SERVICE_DISK_LABEL, StopSignal};

use channel::{open_control_channel, report_to_host};
use disks::{describe, find_disks, mount_data_disk, mount_fat};
use network::apply_seed;
use service::{HostCommands, drain_service_output, power_buttons, spawn_service, supervise};
use sys::ExitStatus;

/// Where `cargo xtask guest` puts the module load order (one file per line).
const LOAD_ORDER: &str = "/lib/modules/kiln/load-order";
const MODULE_DIR: &str = "/lib/modules/kiln";

/// Default time between SIGTERM and SIGKILL; `kiln.grace=SECONDS` on the
/// kernel command line overrides it, and `stop SECONDS` on the control
/// channel overrides both.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

fn main() {
    let init_start = sys::monotonic_seconds();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|arg| arg == container::EXEC_FLAG) {
        container::exec_main(&args[1..]);
    }
    std::panic::set_hook(Box::new(|info| fail(&format!("kiln-init panicked: {info}"))));
    if std::process::id() != 1 {
        eprintln!("{MARKER_PREFIX}FAILED: kiln-init must run as PID 1 (it powers the machine off)");
        std::process::exit(2);
    }
    match run(init_start) {
        Ok(status) => {
            drain_service_output(Duration::from_secs(1));
            let report = match status {
                ExitStatus::Code(code) => GuestReport::Exited(u8::try_from(code).unwrap_or(u8::MAX)),
                ExitStatus::Signal(signal) => GuestReport::Killed(u8::try_from(signal).unwrap_or(u8::MAX)),
            };
            say(&report.to_string());
            report_to_host(&report);
            shut_down();
        }
        Err(err) => fail(&err.to_string()),
    }
}

/// A failure with the step it happened in.
#[derive(Debug)]
pub(crate) struct Failure(pub(crate) String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) type Result<T> = std::result::Result<T, Failure>;

/// Turns an I/O error into a failure naming what was being done.
pub(crate) trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|err| Failure(format!("{}: {err}", what())))
    }
}

/// One console line, prefixed so the launcher can find it among kernel messages.
pub(crate) fn say(message: &str) {
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "{MARKER_PREFIX}{message}");
    let _ = stdout.flush();
}

/// Reports a failure the same way as an exit, then powers off.
pub(crate) fn fail(reason: &str) -> ! {
    say(&format!("FAILED: {reason}"));
    report_to_host(&GuestReport::Failed(reason.to_owned()));
    shut_down()
}

/// Stops what is left, unmounts the disks and powers off; never returns.
fn shut_down() -> ! {
    let _ = sys::kill(-1, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        while sys::reap_one().is_some() {}
        if sys::no_children_left() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = sys::kill(-1, libc::SIGKILL);
    while sys::reap_one().is_some() {}
    for target in [container::ROOT, "/mnt/data", "/srv"] {
        let _ = sys::umount(target);
    }
    say("powering off");
    let err = sys::power_off();
    // Only reached if the kernel refused; PID 1 must not exit (that panics the kernel).
    say(&format!("FAILED: power off refused: {err}"));
    loop {
        std::thread::park();
    }
}

fn run(init_start: f64) -> Result<ExitStatus> {
    mount_basics()?;
    say(&format!("timing init_start={init_start:.6}"));
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let grace = grace_period(&cmdline);
    let _ = sys::disable_ctrl_alt_del();
    load_modules()?;
    let modules_loaded = sys::monotonic_seconds();
    // As soon as its driver is loaded: long before the service exists (it
    // must never get hold of the channel), and early enough that a failure
    // finding the disks is reported on it too.
    let mut commands = HostCommands::new(open_control_channel());
    let disks = find_disks()?;
    let Some(service_disk) = disks.iter().find(|d| d.is_fat(SERVICE_DISK_LABEL)) else {
        return Err(Failure(format!(
            "service disk not found: no disk labelled {SERVICE_DISK_LABEL} (disks: {})",
            describe(&disks)
        )));
    };
    mount_fat(&service_disk.device, "/srv")?;
    let seed = match disks.iter().find(|d| d.is_fat(SEED_LABEL)) {
        Some(seed) => Some(apply_seed(&seed.device)?),
        None => None,
    };
    mount_data_disk(&disks)?;
    let container = container::read_config()?;
    let disks_ready = sys::monotonic_seconds();
    let power_buttons = power_buttons();
    let signals = sys::signal_fd().context(|| "cannot block signals".to_owned())?;
    let service = match &container {
        Some(config) => container::start(config, &disks, seed.as_ref(), &signals, &power_buttons, &mut commands)?,
        None => spawn_service()?,
    };
    let service_start = sys::monotonic_seconds();
    say(&format!(
        "timing kernel_start=0.000000 init_start={init_start:.6} modules_loaded={modules_loaded:.6} \
         disks_ready={disks_ready:.6} service_start={service_start:.6}"
    ));
    let stop_signal = container.as_ref().map_or(StopSignal::TERM, |config| config.stop_signal);
    supervise(service, &signals, &power_buttons, commands, grace, stop_signal)
}

fn mount_basics() -> Result<()> {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (fstype, target, flags, data) in [
        ("proc", "/proc", nosuid_nodev_noexec, ""),
        ("sysfs", "/sys", nosuid_nodev_noexec, ""),
        ("devtmpfs", "/dev", libc::MS_NOSUID, "mode=0755"),
        ("tmpfs", "/run", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755"),
        ("tmpfs", "/tmp", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777"),
    ] {
        fs::create_dir_all(target).context(|| format!("cannot create {target}"))?;
        match sys::mount(fstype, target, fstype, flags, data) {
            Ok(()) => {}
            // Already there (a kernel with CONFIG_DEVTMPFS_MOUNT mounts /dev itself).
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {}
            Err(err) => return Err(Failure(format!("cannot mount {fstype} on {target}: {err}"))),
        }
    }
    Ok(())
}

/// `kiln.grace=SECONDS` from the kernel command line (the last one, should
/// there be several: kiln writes exactly one, the spec's).
fn grace_period(cmdline: &str) -> Duration {
    cmdline
        .split_whitespace()
        .rev()
        .find_map(|word| word.strip_prefix("kiln.grace="))
        .and_then(|value| value.parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
        .map_or(DEFAULT_GRACE, Duration::from_secs_f64)
}

fn load_modules() -> Result<()> {
    let order = match fs::read_to_string(LOAD_ORDER) {
        Ok(order) => order,
        // A kernel with everything built in needs no modules.
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(Failure(format!("cannot read {LOAD_ORDER}: {err}"))),
    };
    for file in order.lines().map(str::trim).filter(|line| !line.is_empty()) {
        let path = format!("{MODULE_DIR}/{file}");
        let module = File::open(&path).context(|| format!("cannot open module {path}"))?;
        match sys::finit_module(&module) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
            // ENODEV: hardware the module drives is absent; the module is not needed.
            Err(err) if err.raw_os_error() == Some(libc::ENODEV) => {}
            Err(err) => return Err(Failure(format!("cannot load module {path}: {err}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_from_the_command_line() {
        assert_eq!(grace_period("console=ttyS0 kiln.grace=2.5 panic=-1"), Duration::from_millis(2500));
        assert_eq!(grace_period("kiln.grace=10 kiln.grace=60"), Duration::from_secs(60), "the last one counts");
        assert_eq!(grace_period("console=ttyS0"), DEFAULT_GRACE);
        assert_eq!(grace_period("kiln.grace=-1"), DEFAULT_GRACE);
        assert_eq!(grace_period("kiln.grace=soon"), DEFAULT_GRACE);
    }
}
