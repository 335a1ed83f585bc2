//! The cloud-hypervisor backend: `cloud-hypervisor --api-socket`, driven
//! over its REST API (see `http`).
//!
//! How a VMM exit is told apart from a guest power-off: cloud-hypervisor
//! runs with `--no-shutdown`, so a guest that powers off leaves the VMM
//! running with the VM back in `Created` (or `Shutdown`), which kiln's
//! `vm.info` polls see. Any exit kiln did not ask for is then a crash, even
//! at exit status 0 (a vCPU error ends v54 that way). The event monitor
//! cannot tell: v54 emits the same `vm shutdown`, `vm deleted`, `vmm
//! shutdown` events for a guest power-off and for a vCPU error (both run
//! `vmm_shutdown`), from a thread that may not write them before the exit.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::backend::Backend;
use crate::ch_config::ch_vm_config;
use crate::error::{Error, ErrorKind, Result};
use crate::http::{self, Failure, Response};
use crate::plan::VmPlan;
use crate::process::VmmProcess;
use crate::qemu::EXIT_GRACE;
use crate::vm::{LaunchOptions, ShutdownHow, Status, Vmm, remove_stale_socket};

/// How often shutdown polls `vm.info` while the guest powers off.
const POWER_OFF_POLL: Duration = Duration::from_millis(50);

/// A VM run by cloud-hypervisor. See [`Vmm`].
#[derive(Debug)]
pub struct ChVm {
    process: VmmProcess,
    api_socket: PathBuf,
    request_timeout: Duration,
    /// `vm.boot` succeeded: from then on a `Created` VM is one the guest powered off.
    booted: bool,
    /// A live VMM said the guest had powered off.
    guest_powered_off: bool,
    /// Set once the VMM has exited (and was reaped).
    outcome: Option<Status>,
}

/// What a VMM exit kiln did not ask for means: a clean stop only after the
/// guest powered off and with exit status 0; a crash otherwise, whose reason
/// is the VMM's last error line (if it logged one) and its exit status.
pub(crate) fn classify_exit(
    exit: ExitStatus,
    guest_powered_off: bool,
    last_error: Option<String>,
    log_tail: String,
) -> Status {
    if exit.success() && guest_powered_off {
        return Status::ShutDown(ShutdownHow::Guest);
    }
    let reason = match last_error {
        Some(line) => format!("{line} ({exit})"),
        None if exit.success() => format!("{exit} without a guest power-off"),
        None => exit.to_string(),
    };
    Status::Crashed { reason, log_tail }
}

impl ChVm {
    /// Starts cloud-hypervisor, waits for `vmm.ping` and sends `vm.create`;
    /// see [`crate::launch`].
    pub fn launch(plan: &VmPlan, options: &LaunchOptions) -> Result<ChVm> {
        plan.validate()?;
        if plan.user_network {
            return Err(Error::invalid("user_network", "cloud-hypervisor has no user-mode network; use a tap"));
        }
        let config = serde_json::to_vec(&ch_vm_config(plan))
            .map_err(|err| Error::protocol("vm.create", format!("cannot encode the VM config: {err}")))?;
        let api_socket = options.prepare("api.sock")?;
        let binary = options.binary.clone().unwrap_or_else(|| "cloud-hypervisor".into());
        let mut api_arg = std::ffi::OsString::from("path=");
        api_arg.push(&api_socket);
        // `--no-shutdown`: see the module doc.
        let args = ["--api-socket".into(), api_arg, "--no-shutdown".into()];
        let process = VmmProcess::spawn(&binary, &args, &options.run_dir.join("vmm.log"))?;
        let mut vm = ChVm {
            process,
            api_socket,
            request_timeout: options.request_timeout,
            booted: false,
            guest_powered_off: false,
            outcome: None,
        };
        // On error `vm` drops: the VMM is killed and reaped, the socket removed.
        vm.wait_for_ping(options.start_timeout)?;
        vm.call("PUT", "vm.create", Some(&config))?;
        Ok(vm)
    }

    fn wait_for_ping(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::Timeout { what: "cloud-hypervisor vmm.ping".into(), deadline: timeout });
            }
            let timeout_here = remaining.min(self.request_timeout);
            match http::request(&self.api_socket, &mut self.process, "GET", "vmm.ping", None, timeout_here) {
                Ok(response) => return check_response("vmm.ping", response).map(drop),
                Err(Failure::NotListening(_)) => {
                    if let Some(status) = self.process.try_exit()? {
                        return Err(self.process.exited_error("start-up", status));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(Failure::Exited(status)) => return Err(self.process.exited_error("start-up", status)),
                Err(Failure::Error(err)) => return Err(err),
            }
        }
    }

    /// One API call; a non-2xx answer becomes [`Error::Api`] with the body
    /// verbatim. Checks the process first; a connection that fails (socket
    /// gone, refused, cut short) while the VMM exits is
    /// [`Error::VmmExited`], never a socket error. Does not classify the exit:
    /// callers that may see it ([`ChVm::status`]) do, through `exited`.
    fn call(&mut self, method: &str, endpoint: &str, body: Option<&[u8]>) -> Result<Response> {
        if let Some(status) = self.exited()? {
            return Err(Error::InvalidState { operation: format!("call {endpoint}"), state: status.to_string() });
        }
        match http::request(&self.api_socket, &mut self.process, method, endpoint, body, self.request_timeout) {
            Ok(response) => match check_response(endpoint, response) {
                // The API thread outlives the VMM's control loop by a moment
                // and says so: the VMM is exiting.
                Err(err) if matches!(&err, Error::Api { body, .. } if control_loop_gone(body)) => {
                    match self.process.wait_exit(self.request_timeout)? {
                        Some(status) => Err(self.process.exited_error(endpoint, status)),
                        None => Err(err),
                    }
                }
                Err(err) => match self.process.try_exit()? {
                    Some(status) => Err(self.process.exited_error(endpoint, status)),
                    None => Err(err),
                },
                ok => ok,
            },
            Err(Failure::Exited(status)) => Err(self.process.exited_error(endpoint, status)),
            // The socket was there at launch and only the VMM removes it or
            // closes its listener: on the way out. Give the exit time to land.
            Err(Failure::NotListening(err)) => match self.process.wait_exit(self.request_timeout)? {
                Some(status) => Err(self.process.exited_error(endpoint, status)),
                None => Err(Error::io(format!("cloud-hypervisor {endpoint}"), &self.api_socket, err)),
            },
            Err(Failure::Error(err)) if matches!(err.kind(), ErrorKind::Io | ErrorKind::Protocol) => {
                // A broken connection usually means the VMM is exiting: say why.
                match self.process.wait_exit(EXIT_GRACE)? {
                    Some(status) => Err(self.process.exited_error(endpoint, status)),
                    None => Err(err),
                }
            }
            Err(Failure::Error(err)) => match self.process.try_exit()? {
                Some(status) => Err(self.process.exited_error(endpoint, status)),
                None => Err(err),
            },
        }
    }

    fn call_json(&mut self, method: &str, endpoint: &str) -> Result<Value> {
        let response = self.call(method, endpoint, None)?;
        serde_json::from_slice(&response.body)
            .map_err(|err| Error::protocol(format!("cloud-hypervisor {endpoint}"), format!("body is not JSON: {err}")))
    }

    /// `vm.counters`: per-device counters, as cloud-hypervisor reports them.
    pub fn counters(&mut self) -> Result<Value> {
        self.call_json("GET", "vm.counters")
    }

    /// `vm.info`: the VM's configuration and state, as cloud-hypervisor reports them.
    pub fn info(&mut self) -> Result<Value> {
        self.call_json("GET", "vm.info")
    }

    /// The final status once the process has exited (reaped and classified
    /// once, by [`classify_exit`]).
    fn exited(&mut self) -> Result<Option<Status>> {
        if let Some(outcome) = &self.outcome {
            return Ok(Some(outcome.clone()));
        }
        let Some(exit) = self.process.try_exit()? else { return Ok(None) };
        let outcome =
            classify_exit(exit, self.guest_powered_off, self.process.last_error_line(), self.process.log_tail());
        self.finish(outcome.clone());
        Ok(Some(outcome))
    }

    fn finish(&mut self, outcome: Status) -> Status {
        self.outcome = Some(outcome.clone());
        let _ = remove_stale_socket(&self.api_socket);
        outcome
    }

    /// Whether the guest has gone: the VMM exited, or a live VMM says the
    /// guest powered off or no longer knows the VM.
    fn guest_gone(&mut self) -> Result<bool> {
        match self.status() {
            Ok(Status::ShutDown(_) | Status::Crashed { .. }) => Ok(true),
            Ok(_) => Ok(false),
            Err(err) if err.kind() == ErrorKind::Api => Ok(true),
            Err(err) => Err(err),
        }
    }
}

/// Whether an error body is cloud-hypervisor's API thread saying the VMM
/// thread no longer takes requests (`ApiError::RequestSend`,
/// `ResponseRecv`, `EventFdWrite` in v54's vmm/src/api/mod.rs).
fn control_loop_gone(body: &str) -> bool {
    let Ok(messages) = serde_json::from_str::<Vec<String>>(body) else { return false };
    messages.iter().any(|message| {
        matches!(message.as_str(), "API request send error" | "API response receive error" | "Cannot write to EventFd")
    })
}

fn check_response(endpoint: &str, response: Response) -> Result<Response> {
    if (200..300).contains(&response.status) {
        Ok(response)
    } else {
        Err(Error::Api {
            endpoint: endpoint.to_owned(),
            status: response.status,
            body: String::from_utf8_lossy(&response.body).into_owned(),
        })
    }
}

impl Vmm for ChVm {
    fn backend(&self) -> Backend {
        Backend::CloudHypervisor
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    fn boot(&mut self) -> Result<()> {
        self.call("PUT", "vm.boot", None)?;
        self.booted = true;
        Ok(())
    }

    fn status(&mut self) -> Result<Status> {
        // The process first: a dead VMM's socket says nothing true.
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        let info = match self.info() {
            Ok(info) => info,
            // `call` has waited for a VMM that was going away.
            Err(err) if err.kind() == ErrorKind::VmmExited => return self.exited()?.ok_or(err),
            Err(err) => return Err(err),
        };
        let state = info.get("state").and_then(Value::as_str).unwrap_or("");
        Ok(match state {
            "Created" if !self.booted => Status::Created,
            "Running" => Status::Running,
            "Paused" | "BreakPoint" => Status::Paused,
            // The guest powered off; the VMM still runs (`--no-shutdown`,
            // which puts the VM back in `Created`) until shutdown().
            "Shutdown" | "Created" => {
                self.guest_powered_off = true;
                Status::ShutDown(ShutdownHow::Guest)
            }
            other => {
                return Err(Error::protocol("cloud-hypervisor vm.info", format!("unknown VM state `{other}`")));
            }
        })
    }

    fn pause(&mut self) -> Result<()> {
        self.call("PUT", "vm.pause", None).map(drop)
    }

    fn resume(&mut self) -> Result<()> {
        self.call("PUT", "vm.resume", None).map(drop)
    }

    fn serial_pty(&mut self) -> Result<Option<PathBuf>> {
        let info = self.info()?;
        let serial = &info["config"]["serial"];
        Ok((serial["mode"].as_str() == Some("Pty")).then(|| serial["file"].as_str().map(PathBuf::from)).flatten())
    }

    fn shutdown(&mut self, grace: Duration) -> Result<Status> {
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        // Only a running guest can react to the power button: a created or
        // paused VM goes straight to `vmm.shutdown` instead of waiting out `grace`.
        let mut gone = false;
        let status = self.status();
        if matches!(status, Ok(Status::ShutDown(ShutdownHow::Guest))) {
            gone = true;
        } else if matches!(status, Ok(Status::Running)) {
            // The VMM may refuse (the guest just went off): poll anyway.
            let _ = self.call("PUT", "vm.power-button", None);
            let deadline = Instant::now() + grace;
            gone = self.guest_gone()?;
            while !gone && Instant::now() < deadline {
                std::thread::sleep(POWER_OFF_POLL.min(deadline.saturating_duration_since(Instant::now())));
                gone = self.guest_gone()?;
            }
        }
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        let how = if gone { ShutdownHow::Guest } else { ShutdownHow::VmmQuit };
        // The VMM may exit before it answers.
        let _ = self.call("PUT", "vmm.shutdown", None);
        if self.process.wait_exit(self.request_timeout)?.is_some() {
            return Ok(self.finish(Status::ShutDown(how)));
        }
        self.process.kill()?;
        Ok(self.finish(Status::ShutDown(ShutdownHow::Killed)))
    }

    fn kill(&mut self) -> Result<()> {
        if self.exited()?.is_none() {
            self.process.kill()?;
            self.finish(Status::ShutDown(ShutdownHow::Killed));
        }
        Ok(())
    }
}

impl Drop for ChVm {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = remove_stale_socket(&self.api_socket);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn a_user_mode_network_is_refused_before_anything_starts() {
        let mut plan = VmPlan::new("vm1", "/k/vmlinuz", "console=ttyS0");
        plan.user_network = true;
        // A run directory that cannot be created: the refusal must come first.
        let options = LaunchOptions::new("/proc/kiln-never-created");
        let err = ChVm::launch(&plan, &options).expect_err("cloud-hypervisor has no user-mode network");
        assert_eq!(err.kind(), crate::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("user_network"), "{err}");
    }

    #[test]
    fn an_exit_is_a_guest_shutdown_only_after_a_power_off_at_status_0() {
        let check = |raw_wait_status: i32, powered_off: bool, error: Option<&str>, expected: expect_test::Expect| {
            let status = classify_exit(
                ExitStatus::from_raw(raw_wait_status),
                powered_off,
                error.map(str::to_owned),
                "tail".into(),
            );
            expected.assert_eq(&status.to_string());
        };
        let vcpu =
            Some("VCPU generated error: VcpuRun(Failed to run vcpu: Unexpected exit reason on vcpu run: InternalError");
        check(0, true, None, expect_test::expect!["shut down (Guest)"]);
        check(0, false, None, expect_test::expect!["crashed (exit status: 0 without a guest power-off)"]);
        check(
            0,
            false,
            vcpu,
            expect_test::expect![
                "crashed (VCPU generated error: VcpuRun(Failed to run vcpu: Unexpected exit reason on vcpu run: InternalError (exit status: 0))"
            ],
        );
        // A failing exit is a crash even after the guest powered off.
        check(1 << 8, true, None, expect_test::expect!["crashed (exit status: 1)"]);
        check(9, false, None, expect_test::expect!["crashed (signal: 9 (SIGKILL))"]);
        check(
            9,
            true,
            vcpu,
            expect_test::expect![
                "crashed (VCPU generated error: VcpuRun(Failed to run vcpu: Unexpected exit reason on vcpu run: InternalError (signal: 9 (SIGKILL)))"
            ],
        );
    }
}
