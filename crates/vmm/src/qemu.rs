//! The QEMU backend: `qemu-system-x86_64`, started paused, driven over QMP.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use serde_json::Value;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::plan::VmPlan;
use crate::process::VmmProcess;
use crate::qemu_args::{Accel, qemu_args};
use crate::qmp::Qmp;
use crate::vm::{AccelChoice, LaunchOptions, ShutdownHow, Status, Vmm, remove_stale_socket};

/// The environment variable that overrides [`AccelChoice::Auto`]: `kvm` or `tcg`.
pub const QEMU_ACCEL_ENV: &str = "KILN_QEMU_ACCEL";

/// Resolves an accelerator choice. Explicit choices win; `Auto` follows
/// `KILN_QEMU_ACCEL`, else picks KVM only when `/dev/kvm` opens read-write
/// *and* the host is not itself a guest (no `hypervisor` CPU flag): under
/// nested virtualisation KVM is present but stock kernels hang, and a hang
/// cannot be told from a slow boot without waiting for it.
pub fn probe_accel(choice: AccelChoice) -> Result<Accel> {
    match choice {
        AccelChoice::Kvm => return Ok(Accel::Kvm),
        AccelChoice::Tcg => return Ok(Accel::Tcg),
        AccelChoice::Auto => {}
    }
    if let Some(value) = std::env::var_os(QEMU_ACCEL_ENV) {
        return match value.to_str() {
            Some("kvm") => Ok(Accel::Kvm),
            Some("tcg") => Ok(Accel::Tcg),
            _ => Err(Error::invalid(QEMU_ACCEL_ENV, format!("is {value:?}; use `kvm` or `tcg`"))),
        };
    }
    let kvm_opens = OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    Ok(if kvm_opens && !is_nested(&cpuinfo) { Accel::Kvm } else { Accel::Tcg })
}

/// Whether `/proc/cpuinfo` says this host runs under a hypervisor.
pub(crate) fn is_nested(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|flag| flag == "hypervisor"))
}

/// How long a VMM whose socket just failed may take to be reapable.
pub(crate) const EXIT_GRACE: Duration = Duration::from_millis(500);

/// A VM run by QEMU. See [`Vmm`].
#[derive(Debug)]
pub struct QemuVm {
    process: VmmProcess,
    qmp: Qmp,
    qmp_path: PathBuf,
    /// The control port's socket, removed with the QMP socket.
    control_path: Option<PathBuf>,
    accel: Accel,
    request_timeout: Duration,
    booted: bool,
    /// Set once kiln has stopped the VM (or seen it stop).
    outcome: Option<Status>,
}

impl QemuVm {
    /// Starts QEMU paused with the VM created; see [`crate::launch`].
    pub fn launch(plan: &VmPlan, options: &LaunchOptions) -> Result<QemuVm> {
        plan.validate()?;
        let accel = probe_accel(options.accel)?;
        let qmp_path = options.prepare("qmp.sock")?;
        let control_path = plan.control.as_ref().map(|port| port.socket.clone());
        if let Some(path) = &control_path {
            remove_stale_socket(path)?;
        }
        let binary = options.binary.clone().unwrap_or_else(|| "qemu-system-x86_64".into());
        let args = qemu_args(plan, accel, &qmp_path);
        let mut process = VmmProcess::spawn(&binary, &args, &options.run_dir.join("vmm.log"))?;
        // On any error below, `process` drops: the VMM is killed and reaped.
        let qmp = match Qmp::connect(&qmp_path, &mut process, options.start_timeout) {
            Ok(qmp) => qmp,
            Err(err) => {
                // A dropped connection usually means QEMU is exiting: say why.
                let err = match process.wait_exit(EXIT_GRACE) {
                    Ok(Some(status)) if err.kind() != crate::ErrorKind::VmmExited => {
                        process.exited_error("start-up", status)
                    }
                    _ => err,
                };
                drop(process);
                for path in std::iter::once(&qmp_path).chain(&control_path) {
                    let _ = remove_stale_socket(path);
                }
                return Err(err);
            }
        };
        Ok(QemuVm {
            process,
            qmp,
            qmp_path,
            control_path,
            accel,
            request_timeout: options.request_timeout,
            booted: false,
            outcome: None,
        })
    }

    /// The accelerator this VM runs under.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        if let Some(status) = self.exited()? {
            return Err(Error::InvalidState { operation: format!("run QMP `{command}`"), state: status.to_string() });
        }
        self.qmp.execute(command, arguments, self.request_timeout)
    }

    /// The final status if the process has exited (reaping and classifying it once).
    fn exited(&mut self) -> Result<Option<Status>> {
        if let Some(outcome) = &self.outcome {
            return Ok(Some(outcome.clone()));
        }
        let Some(exit) = self.process.try_exit()? else { return Ok(None) };
        self.qmp.drain_events(Duration::from_millis(100));
        let outcome = self.classify_exit(exit);
        self.outcome = Some(outcome.clone());
        Ok(Some(outcome))
    }

    /// An exit kiln did not cause: clean after a guest power-off, a crash otherwise.
    fn classify_exit(&self, exit: ExitStatus) -> Status {
        let reason = self.qmp.events.iter().rev().find_map(|(name, data)| {
            (name == "SHUTDOWN").then(|| data.get("reason").and_then(Value::as_str).unwrap_or("").to_owned())
        });
        match reason.as_deref() {
            _ if !exit.success() => Status::Crashed { reason: exit.to_string(), log_tail: self.process.log_tail() },
            Some("guest-panic") => {
                Status::Crashed { reason: "the guest panicked".into(), log_tail: self.process.log_tail() }
            }
            // -no-reboot turns a reboot (or `panic=-1`) into an exit.
            Some("guest-reset") => Status::Crashed {
                reason: "the guest reset (reboot or panic)".into(),
                log_tail: self.process.log_tail(),
            },
            _ => Status::ShutDown(ShutdownHow::Guest),
        }
    }

    fn stopped_by_kiln(&mut self, how: ShutdownHow) -> Status {
        self.outcome = Some(Status::ShutDown(how));
        self.remove_sockets();
        Status::ShutDown(how)
    }

    fn remove_sockets(&self) {
        for path in std::iter::once(&self.qmp_path).chain(&self.control_path) {
            let _ = remove_stale_socket(path);
        }
    }
}

impl Vmm for QemuVm {
    fn backend(&self) -> Backend {
        Backend::Qemu
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    fn boot(&mut self) -> Result<()> {
        if self.booted {
            return Err(Error::InvalidState { operation: "boot".into(), state: "already booted".into() });
        }
        self.execute("cont", None)?;
        self.booted = true;
        Ok(())
    }

    fn status(&mut self) -> Result<Status> {
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        let reply = match self.qmp.execute("query-status", None, self.request_timeout) {
            Ok(reply) => reply,
            // QEMU may exit between the liveness check and the reply; its
            // socket closes a moment before the process can be reaped.
            Err(err) => {
                self.process.wait_exit(EXIT_GRACE)?;
                return self.exited()?.ok_or(err);
            }
        };
        let state = reply.get("status").and_then(Value::as_str).unwrap_or("");
        Ok(match state {
            "prelaunch" => Status::Created,
            "running" => Status::Running,
            // The guest is off and QEMU (without -no-shutdown) is exiting:
            // classify the exit, whose events say how it went.
            "shutdown" => {
                self.process.wait_exit(EXIT_GRACE)?;
                self.exited()?.unwrap_or(Status::ShutDown(ShutdownHow::Guest))
            }
            "internal-error" | "guest-panicked" | "io-error" => Status::Crashed {
                reason: format!("QEMU reports the VM as `{state}`"),
                log_tail: self.process.log_tail(),
            },
            // paused, suspended, debug, watchdog, migration states: not running guest code.
            _ => Status::Paused,
        })
    }

    fn pause(&mut self) -> Result<()> {
        self.execute("stop", None).map(drop)
    }

    fn resume(&mut self) -> Result<()> {
        self.execute("cont", None).map(drop)
    }

    fn serial_pty(&mut self) -> Result<Option<PathBuf>> {
        let chardevs = self.execute("query-chardev", None)?;
        let filename = chardevs.as_array().into_iter().flatten().find_map(|chardev| {
            (chardev.get("label")?.as_str()? == "serial0")
                .then(|| chardev.get("filename")?.as_str().map(str::to_owned))?
        });
        Ok(filename.and_then(|name| name.strip_prefix("pty:").map(PathBuf::from)))
    }

    fn shutdown(&mut self, grace: Duration) -> Result<Status> {
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        // Only a running guest can react to the power button: a created or
        // paused VM goes straight to `quit` instead of waiting out `grace`.
        if matches!(self.status(), Ok(Status::Running)) {
            // Errors are expected here: QEMU may exit while answering.
            let _ = self.qmp.execute("system_powerdown", None, self.request_timeout);
            if self.process.wait_exit(grace)?.is_some() {
                return Ok(self.exited()?.unwrap_or(Status::ShutDown(ShutdownHow::Guest)));
            }
        }
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        let _ = self.qmp.execute("quit", None, self.request_timeout);
        if self.process.wait_exit(self.request_timeout)?.is_some() {
            return Ok(self.stopped_by_kiln(ShutdownHow::VmmQuit));
        }
        self.process.kill()?;
        Ok(self.stopped_by_kiln(ShutdownHow::Killed))
    }

    fn kill(&mut self) -> Result<()> {
        if self.exited()?.is_none() {
            self.process.kill()?;
            self.stopped_by_kiln(ShutdownHow::Killed);
        }
        Ok(())
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.process.kill();
        self.remove_sockets();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_hosts_are_recognised() {
        assert!(is_nested("processor\t: 0\nflags\t\t: fpu vme hypervisor lahf_lm\n"));
        assert!(!is_nested("processor\t: 0\nflags\t\t: fpu vme vmx lahf_lm\n"));
        assert_eq!(probe_accel(AccelChoice::Tcg).expect("explicit"), Accel::Tcg);
        assert_eq!(probe_accel(AccelChoice::Kvm).expect("explicit"), Accel::Kvm);
    }
}
