//! The lifecycle both backends share: [`Vmm`], [`Status`], [`LaunchOptions`].

use std::fmt;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::plan::{VmPlan, check_socket_path};

/// What a VM is doing, from the VMM's answer *and* whether its process lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The VMM runs and holds the VM, which has not been booted.
    Created,
    Running,
    Paused,
    /// The VM is gone and its VMM exited (and was reaped) the expected way.
    ShutDown(ShutdownHow),
    /// The VMM exited unexpectedly or the guest died.
    Crashed {
        /// The exit status (`signal: 9 (SIGKILL)`, `exit status: 1`), after
        /// the VMM's last logged error when it left one, or the guest state
        /// that says why.
        reason: String,
        /// The last lines of the VMM's log.
        log_tail: String,
    },
}

/// How a VM that shut down came to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownHow {
    /// The guest powered off (on its own or after the power button).
    Guest,
    /// The guest did not react within the grace period; kiln asked the VMM to quit.
    VmmQuit,
    /// kiln SIGKILLed the VMM (it ignored the quit request, or [`Vmm::kill`] was called).
    Killed,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Created => f.write_str("created"),
            Status::Running => f.write_str("running"),
            Status::Paused => f.write_str("paused"),
            Status::ShutDown(how) => write!(f, "shut down ({how:?})"),
            Status::Crashed { reason, .. } => write!(f, "crashed ({reason})"),
        }
    }
}

/// How QEMU should run guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM when it can be trusted to run a stock kernel, else TCG; see
    /// [`crate::probe_accel`]. The environment variable `KILN_QEMU_ACCEL`
    /// (`kvm` or `tcg`) overrides the probe.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// Where and how to start a VMM. Build one with [`LaunchOptions::new`],
/// then set the fields you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LaunchOptions {
    /// Per-VM directory for the API/QMP socket and `vmm.log`; created 0700
    /// if missing. Keep it short: sockets must fit 107 bytes.
    pub run_dir: PathBuf,
    /// The VMM binary; `None` looks up `cloud-hypervisor` or
    /// `qemu-system-x86_64` on `PATH`.
    pub binary: Option<PathBuf>,
    /// QEMU only.
    pub accel: AccelChoice,
    /// How long the VMM may take to open its socket and answer.
    pub start_timeout: Duration,
    /// How long any single request may take.
    pub request_timeout: Duration,
}

impl LaunchOptions {
    /// Options for a VMM whose sockets and log go to `run_dir`: the binary
    /// from `PATH`, [`AccelChoice::Auto`], 10 s to start, 5 s per request.
    pub fn new(run_dir: impl Into<PathBuf>) -> LaunchOptions {
        LaunchOptions {
            run_dir: run_dir.into(),
            binary: None,
            accel: AccelChoice::Auto,
            start_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
        }
    }

    /// Creates the run directory and returns the socket path in it, checked
    /// against `sun_path`.
    pub(crate) fn prepare(&self, socket_name: &str) -> Result<PathBuf> {
        let socket = self.run_dir.join(socket_name);
        check_socket_path("run_dir", &socket)?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.run_dir)
            .map_err(|err| Error::io("Creating the run directory", &self.run_dir, err))?;
        remove_stale_socket(&socket)?;
        Ok(socket)
    }
}

pub(crate) fn remove_stale_socket(socket: &Path) -> Result<()> {
    match std::fs::remove_file(socket) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io("Removing a stale socket", socket, err))
        }
        _ => Ok(()),
    }
}

/// A running VMM and its VM: one lifecycle for every backend. Dropping it
/// kills and reaps the VMM and removes its socket.
pub trait Vmm: fmt::Debug + Send {
    fn backend(&self) -> Backend;
    /// The VMM's process id (also its process group).
    fn pid(&self) -> u32;
    /// The VMM's own log (its stdout and stderr).
    fn log_path(&self) -> &Path;
    /// Boots the created VM.
    fn boot(&mut self) -> Result<()>;
    /// Asks the VMM, after checking whether its process still runs.
    fn status(&mut self) -> Result<Status>;
    fn pause(&mut self) -> Result<()>;
    fn resume(&mut self) -> Result<()>;
    /// The serial port's pseudo-terminal, when the plan asked for one.
    fn serial_pty(&mut self) -> Result<Option<PathBuf>>;
    /// Presses the power button, waits up to `grace` for the guest to power
    /// off, then asks the VMM to quit, then SIGKILLs it; always reaps it.
    /// Returns the final status: [`Status::ShutDown`], or [`Status::Crashed`]
    /// if the VM had already crashed. Idempotent.
    fn shutdown(&mut self, grace: Duration) -> Result<Status>;
    /// SIGKILLs the VMM's process group and reaps it. Idempotent.
    fn kill(&mut self) -> Result<()>;
}

/// Starts the VMM for `plan` and creates the VM (not booted yet).
pub fn launch(backend: Backend, plan: &VmPlan, options: &LaunchOptions) -> Result<Box<dyn Vmm>> {
    Ok(match backend {
        Backend::Qemu => Box::new(crate::qemu::QemuVm::launch(plan, options)?),
        Backend::CloudHypervisor => Box::new(crate::ch::ChVm::launch(plan, options)?),
    })
}
