//! The cloud-hypervisor backend: `cloud-hypervisor --api-socket`, driven
//! over its REST API (see `http`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ch_config::ch_vm_config;
use crate::error::{Error, ErrorKind, Result};
use crate::http::{self, Failure, Response};
use crate::plan::VmPlan;
use crate::process::VmmProcess;
use crate::qemu::EXIT_GRACE;
use crate::vm::{Backend, LaunchOptions, ShutdownHow, Status, Vmm, remove_stale_socket};

/// How often shutdown polls `vm.info` while the guest powers off.
const POWER_OFF_POLL: Duration = Duration::from_millis(50);

/// A VM run by cloud-hypervisor. See [`Vmm`].
#[derive(Debug)]
pub struct ChVm {
    process: VmmProcess,
    api_socket: PathBuf,
    request_timeout: Duration,
    /// Set once the VMM has exited (and was reaped).
    outcome: Option<Status>,
}

impl ChVm {
    /// Starts cloud-hypervisor, waits for `vmm.ping` and sends `vm.create`;
    /// see [`crate::launch`].
    pub fn launch(plan: &VmPlan, options: &LaunchOptions) -> Result<ChVm> {
        plan.validate()?;
        let config = serde_json::to_vec(&ch_vm_config(plan))
            .map_err(|err| Error::protocol("vm.create", format!("cannot encode the VM config: {err}")))?;
        let api_socket = options.prepare("api.sock")?;
        let binary = options.binary.clone().unwrap_or_else(|| "cloud-hypervisor".into());
        let mut api_arg = std::ffi::OsString::from("path=");
        api_arg.push(&api_socket);
        let process = VmmProcess::spawn(&binary, &["--api-socket".into(), api_arg], &options.run_dir.join("vmm.log"))?;
        let mut vm = ChVm { process, api_socket, request_timeout: options.request_timeout, outcome: None };
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

    /// One API call; a non-2xx answer becomes [`Error::Api`] with the body verbatim.
    fn call(&mut self, method: &str, endpoint: &str, body: Option<&[u8]>) -> Result<Response> {
        if let Some(status) = self.exited()? {
            return Err(Error::InvalidState { operation: format!("call {endpoint}"), state: status.to_string() });
        }
        match http::request(&self.api_socket, &mut self.process, method, endpoint, body, self.request_timeout) {
            Ok(response) => check_response(endpoint, response),
            Err(Failure::Exited(status)) => Err(self.process.exited_error(endpoint, status)),
            Err(Failure::NotListening(err)) => match self.process.try_exit()? {
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
            Err(Failure::Error(err)) => Err(err),
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

    /// The final status once the process has exited (reaped and classified once).
    fn exited(&mut self) -> Result<Option<Status>> {
        if let Some(outcome) = &self.outcome {
            return Ok(Some(outcome.clone()));
        }
        let Some(exit) = self.process.try_exit()? else { return Ok(None) };
        let outcome = if exit.success() {
            Status::ShutDown(ShutdownHow::Guest)
        } else {
            Status::Crashed { reason: exit.to_string(), log_tail: self.process.log_tail() }
        };
        self.finish(outcome.clone());
        Ok(Some(outcome))
    }

    fn finish(&mut self, outcome: Status) -> Status {
        self.outcome = Some(outcome.clone());
        let _ = remove_stale_socket(&self.api_socket);
        outcome
    }

    /// Whether the guest has gone: the VMM exited, or `vm.info` says
    /// `Shutdown` or no longer knows the VM.
    fn guest_gone(&mut self) -> Result<bool> {
        if self.process.try_exit()?.is_some() {
            return Ok(true);
        }
        Ok(match self.info() {
            Ok(info) => info.get("state").and_then(Value::as_str) == Some("Shutdown"),
            Err(err) if err.kind() == ErrorKind::Api => true,
            Err(err) if err.kind() == ErrorKind::VmmExited => true,
            Err(err) => return Err(err),
        })
    }
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
        self.call("PUT", "vm.boot", None).map(drop)
    }

    fn status(&mut self) -> Result<Status> {
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        let info = match self.info() {
            Ok(info) => info,
            Err(err) => return self.exited()?.ok_or(err),
        };
        let state = info.get("state").and_then(Value::as_str).unwrap_or("");
        Ok(match state {
            "Created" => Status::Created,
            "Running" => Status::Running,
            "Paused" | "BreakPoint" => Status::Paused,
            // The guest powered off; the VMM still runs until shutdown().
            "Shutdown" => Status::ShutDown(ShutdownHow::Guest),
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
