//! The console pump: the guest's console to the observer, the control
//! channel read, and a stop asked for turned into the stop protocol.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kiln_guest::HostCommand;
use kiln_vmm::{Status, Vmm};

use super::{RunObserver, RunOptions, STOP_MARGIN, STOP_TIMEOUT_FILE, parse_stop_timeout, resolve_grace};
use crate::control::ControlChannel;
use crate::state::{Phase, VmClaim};
use crate::{Error, Result, Spec};

/// Streams the console and reads the control channel until the VM stops.
/// On a stop request: sends `stop <grace>` to kiln-init (the power button
/// when there is no channel), waits the grace period plus [`STOP_MARGIN`]
/// for the guest to power off, then has the VMM quit.
#[allow(clippy::too_many_arguments)]
pub(super) fn follow_console(
    vmm: &mut dyn Vmm,
    console_log: &Path,
    claim: &mut VmClaim,
    spec: &Spec,
    options: &RunOptions,
    observer: &mut dyn RunObserver,
    control: &mut ControlChannel,
) -> Result<Status> {
    let mut console =
        fs::File::open(console_log).map_err(|source| Error::InputIo { path: console_log.to_path_buf(), source })?;
    let mut buffer = vec![0u8; 64 * 1024];
    let mut pump = |console: &mut fs::File, observer: &mut dyn RunObserver, control: &mut ControlChannel| {
        control.poll();
        loop {
            match console.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => observer.console(&buffer[..n]),
            }
        }
    };
    let mut stop_deadline: Option<Instant> = None;
    loop {
        pump(&mut console, observer, control);
        if stop_deadline.is_none() && options.stop.load(Ordering::Relaxed) {
            claim.record.phase = Phase::Stopping;
            claim.save()?;
            let asked = fs::read_to_string(claim.dir().join(STOP_TIMEOUT_FILE)).ok();
            let grace = resolve_grace(asked.as_deref().and_then(parse_stop_timeout), spec);
            let sent = control.send(HostCommand::Stop { grace_seconds: grace.as_secs() });
            let how = if sent { "asked on the control channel" } else { "power button" };
            observer.phase(
                Phase::Stopping,
                &format!("stopping ({how}): the service gets SIGTERM, then SIGKILL after {}s", grace.as_secs()),
            );
            if !sent {
                let status = vmm.shutdown(grace + STOP_MARGIN).map_err(Error::Vmm)?;
                pump(&mut console, observer, control);
                return Ok(status);
            }
            stop_deadline = Some(Instant::now() + grace + STOP_MARGIN);
        }
        match vmm.status().map_err(Error::Vmm)? {
            status @ (Status::ShutDown(_) | Status::Crashed { .. }) => {
                // Whatever the guest wrote last.
                pump(&mut console, observer, control);
                return Ok(status);
            }
            _ if stop_deadline.is_some_and(|deadline| Instant::now() >= deadline) => {
                // The guest did not power off in time (or nobody read the
                // stop: QEMU keeps bytes for a port no one holds): the power
                // button, one more margin, then the VMM quits (or is killed).
                let status = vmm.shutdown(STOP_MARGIN).map_err(Error::Vmm)?;
                pump(&mut console, observer, control);
                return Ok(status);
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
