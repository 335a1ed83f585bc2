//! `kiln run`: a spec to a running microVM and back.
//!
//! The steps, each recorded in the VM's state record *before* it touches the
//! host (see [`crate::state`]): build or reuse the images; lease a subnet;
//! create and configure the tap; apply the firewall; start the VMM and
//! open the control channel to kiln-init ([`crate::control`]); boot;
//! stream the console until the guest powers off or a stop is asked for;
//! release everything. The outcome never comes from the console, which the
//! service writes too: a crash the VMM saw wins, else kiln-init's report on
//! the control channel, else "no report". Any error on the way releases what was taken; a
//! SIGKILL leaves a record from which `kiln gc` releases it.

mod console;
mod container;
mod images;
mod oci;
mod plan;

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_guest::{GuestReport, MAX_GRACE_SECONDS, VSOCK_STATUS_PORT};
use kiln_net::{Tap, TapConfig, VmRules, tap_name};
use kiln_vmm::{Backend, BackendChoice, LaunchOptions, Status, Vmm, VsockListener};

use crate::control::ControlChannel;
use crate::gc::{HostHandles, release_vm};
use crate::state::{ExitInfo, ExitSource, LeaseInfo, Phase, StateDir, VmClaim, VmRecord, VmmInfo};
use crate::{Error, HostNet, Result, Spec, VmProgram};

pub use images::build_images;
use images::service_disk;
pub(crate) use oci::sweep_image_store;
pub use oci::{
    INSECURE_REGISTRIES_ENV, ImageEvent, LayerDisk, MAX_LAYER_DISKS, OCI_STORE_DIR, REGISTRY_CA_ENV, ROOTFS_FORMAT,
    cached_image, image_rootfs, open_image_store, parse_image_source, pull_image,
};
use plan::{GuestFiles, check_vm_policies, choose_backend, vm_plan};
pub use plan::{PlannedVm, VmFiles, plan_vm};

/// The grace period between SIGTERM and SIGKILL when neither `kiln stop
/// --timeout` nor the spec's `kiln.grace=` gives one.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// How long past the grace period a stopping guest may take to power off
/// (SIGKILL, unmount, report) before the VMM is asked to quit.
pub const STOP_MARGIN: Duration = Duration::from_secs(10);
/// The file in the VM's directory where `kiln stop --timeout` leaves its
/// grace period (whole seconds) for the launcher to read.
pub(crate) const STOP_TIMEOUT_FILE: &str = "stop-timeout";
/// The file in the VM's directory where the launcher leaves the grace
/// period a stop without `--timeout` gets (the spec's, else the default),
/// so `kiln stop` knows how long the launcher may take.
pub(crate) const GRACE_FILE: &str = "grace";
/// kiln's exit code when there is no exit status of the service's: the VMM
/// saw a crash, panic or reset, the VM stopped without a report, kiln-init
/// reported a failure, or kiln run itself failed after the VM started.
pub const FAILURE_EXIT_CODE: i32 = 125;

/// How a run goes, beyond the spec. Start from [`RunOptions::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunOptions {
    /// Overrides the spec's `vm.backend`.
    pub backend: Option<BackendChoice>,
    /// Set (by a signal handler) to stop the VM gracefully.
    pub stop: Arc<AtomicBool>,
    /// Where VM addresses come from and egress goes.
    pub net: HostNet,
    /// The guest files when the spec names none.
    pub guest_dir: Option<PathBuf>,
}

impl RunOptions {
    /// The spec's backend, the default guest directory, and a stop flag
    /// nobody has set yet (hand a clone of [`RunOptions::stop`] to a
    /// signal handler).
    pub fn new(net: HostNet) -> RunOptions {
        RunOptions { backend: None, stop: Arc::new(AtomicBool::new(false)), net, guest_dir: None }
    }
}

/// What the caller sees of a run as it goes.
pub trait RunObserver {
    /// A step begins.
    fn phase(&mut self, phase: Phase, detail: &str);
    /// New bytes on the guest's console.
    fn console(&mut self, bytes: &[u8]);
    /// Progress pulling and converting the VM's OCI image.
    fn image_event(&mut self, _event: ImageEvent<'_>) {}
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RunOutcome {
    pub exit: ExitInfo,
    /// The exit code `kiln run` should end with: the service's, or
    /// [`FAILURE_EXIT_CODE`].
    pub exit_code: i32,
    /// Milliseconds from `kiln run` starting to the VMM being started: kiln's
    /// own work (checks, lease, images, tap, firewall, state records).
    pub host_ms: f64,
    /// Milliseconds from `kiln run` starting to the boot request being sent
    /// (the VMM's start-up included).
    pub boot_request_ms: f64,
    /// Milliseconds from `kiln run` starting to the boot request acknowledged.
    pub launch_ms: f64,
    /// Whether the service disk image was reused from a previous run.
    pub images_reused: bool,
    /// For a VM of an OCI image, milliseconds of host-side work on it: the
    /// pull (warm: reading its manifest), the store reference, finding or
    /// building its layer filesystems.
    pub image_ms: Option<f64>,
    /// How many layer filesystems this run built (0 on a warm cache).
    pub layers_built: usize,
}

/// The one grace period of a stop: `kiln stop --timeout` if it gave one,
/// else the spec's `kiln.grace=`, else [`DEFAULT_GRACE`].
pub(crate) fn resolve_grace(stop_timeout: Option<u64>, spec: &Spec) -> Duration {
    stop_timeout.or(spec.guest.grace_seconds()).map_or(DEFAULT_GRACE, Duration::from_secs)
}

/// `kiln stop`'s half of the stop protocol: leaves `timeout` (or, without
/// one, nothing) in the VM directory's `stop-timeout` file for its
/// launcher, and returns the grace period the launcher will then use (the
/// timeout, else the spec's that the launcher left in its `grace` file, else
/// [`DEFAULT_GRACE`]). The caller then signals the launcher.
pub fn request_stop(vm_dir: &Path, timeout: Option<u64>) -> Result<Duration> {
    let file = vm_dir.join(STOP_TIMEOUT_FILE);
    match timeout {
        Some(seconds) => crate::state::write_private_atomically(&file, seconds.to_string().as_bytes())?,
        None => match fs::remove_file(&file) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(Error::state_io(&file, err)),
            _ => {}
        },
    }
    let spec_grace = fs::read_to_string(vm_dir.join(GRACE_FILE)).ok();
    Ok(timeout
        .or_else(|| spec_grace.as_deref().and_then(parse_stop_timeout))
        .map_or(DEFAULT_GRACE, Duration::from_secs))
}

/// The seconds in a [`STOP_TIMEOUT_FILE`]: whole seconds, 0 to one day.
pub(crate) fn parse_stop_timeout(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|seconds| *seconds <= MAX_GRACE_SECONDS)
}

/// Refuses a pod-form spec (`[[container]]`): kiln does not run pods in a
/// VM yet, and running one of its containers would silently be wrong.
pub fn refuse_pod(spec: &Spec, spec_path: &Path) -> Result<()> {
    if spec.is_pod_form() {
        return Err(Error::PodNotInVm { path: spec_path.to_path_buf(), containers: spec.container.len() });
    }
    Ok(())
}

/// Runs `spec` to completion. See the module doc.
pub fn run(
    spec: &Spec,
    spec_path: &Path,
    state: &StateDir,
    options: &RunOptions,
    observer: &mut dyn RunObserver,
) -> Result<RunOutcome> {
    let started = Instant::now();
    // Everything that can fail without touching the host fails here first.
    refuse_pod(spec, spec_path)?;
    check_vm_policies(spec)?;
    let guest = GuestFiles::find(spec, options.guest_dir.as_deref())?;
    let backend = choose_backend(spec, options.backend)?;
    match spec.vm_program() {
        Some(VmProgram::Binary(_)) => {
            let lease = LeaseInfo { host: Ipv4Addr::LOCALHOST, guest: Ipv4Addr::LOCALHOST, prefix_len: 30 };
            service_disk(spec, &lease)?.tree()?;
        }
        Some(VmProgram::Image(source)) => {
            oci::parse_image_source(source).map_err(|err| Error::Spec {
                path: spec_path.to_path_buf(),
                message: format!("service.image: {err}"),
            })?;
        }
        None => return Err(Error::NoBinary),
    }
    options.net.check_no_collision()?;
    let host = HostHandles::open(state, &options.net)?;

    let name = spec.name.as_str();
    let record = VmRecord {
        name: name.to_owned(),
        spec: spec_path.to_path_buf(),
        launcher_pid: std::process::id(),
        started: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        ..VmRecord::default()
    };
    let mut claim = state.claim(name, record)?;
    let mut vmm: Option<Box<dyn Vmm>> = None;
    let mut applied: Option<VmRules> = None;
    let mut slots = Slots { vmm: &mut vmm, rules: &mut applied };
    let result =
        launch_and_wait(spec, &guest, backend, state, options, &host, &mut claim, &mut slots, observer, started);
    // Whatever happened: the VMM goes (dropping it kills and reaps it), and
    // so does everything the record names. The firewall elements go by the
    // rules they were added with (no table listing); gc's path by tag is
    // the fallback.
    drop(vmm);
    if let Some(rules) = &applied
        && host.nft.remove(rules).is_ok()
    {
        claim.record.firewall = false;
    }
    let release = release_vm(&claim.record, &host, false);
    let exit = match &result {
        Ok(outcome) => outcome.exit.clone(),
        Err(err) => ExitInfo { code: None, how: format!("kiln run failed: {err}"), source: Some(ExitSource::Launcher) },
    };
    claim.record.exit = Some(exit);
    claim.record.phase = Phase::Stopped;
    claim.save()?;
    release?;
    result
}

/// What a run holds that must be released whether it succeeds or not.
struct Slots<'a> {
    vmm: &'a mut Option<Box<dyn Vmm>>,
    rules: &'a mut Option<VmRules>,
}

#[allow(clippy::too_many_arguments)]
fn launch_and_wait(
    spec: &Spec,
    guest: &GuestFiles,
    backend: Backend,
    state: &StateDir,
    options: &RunOptions,
    host: &HostHandles,
    claim: &mut VmClaim,
    slots: &mut Slots<'_>,
    observer: &mut dyn RunObserver,
    started: Instant,
) -> Result<RunOutcome> {
    let name = spec.name.as_str();
    let files = VmFiles::new(state, spec);
    // A grace period left by a `kiln stop` of an earlier run is not this run's.
    let _ = fs::remove_file(claim.dir().join(STOP_TIMEOUT_FILE));
    let grace = resolve_grace(None, spec).as_secs().to_string();
    crate::state::write_private_atomically(&claim.dir().join(GRACE_FILE), grace.as_bytes())?;

    step(claim, observer, Phase::Lease, "leasing an address")?;
    let leased = host.ledger.allocate(name, std::process::id())?;
    let lease = LeaseInfo { host: leased.host_addr, guest: leased.guest_addr, prefix_len: leased.subnet.prefix_len() };
    claim.record.lease = Some(lease);
    claim.save()?;

    step(claim, observer, Phase::Images, "building the images")?;
    let prepared = match spec.vm_program() {
        Some(VmProgram::Image(source)) => {
            let mut events = |event: ImageEvent<'_>| observer.image_event(event);
            Some(oci::prepare_for_vm(&host.image_store()?, source, claim, &mut events)?)
        }
        _ => None,
    };
    let container = match &prepared {
        Some(prepared) => Some(container::container_config(
            spec,
            &oci::image_runtime(&prepared.image),
            &prepared.image.manifest_digest().hex(),
            u32::try_from(prepared.disks.len()).unwrap_or(u32::MAX),
            &lease,
        )?),
        None => None,
    };
    let images_reused = images::build_vm_images(spec, &files, &lease, container.as_ref())?;
    let layers: Vec<PathBuf> = prepared.iter().flat_map(|p| p.disks.iter().map(|d| d.path.clone())).collect();

    let tap = tap_name(name)?;
    claim.record.tap = Some(tap.clone());
    step(claim, observer, Phase::Tap, &format!("creating tap {tap}"))?;
    Tap::create(&tap, None)?;
    let publishes = !spec.network.publish.is_empty();
    Tap::configure(&tap, &TapConfig::new(lease.host, lease.prefix_len).with_route_localnet(publishes))?;

    claim.record.firewall = true;
    step(claim, observer, Phase::Firewall, "applying the firewall")?;
    let rules = VmRules::new(name, tap.clone(), lease.host, lease.guest)
        .with_uplink(options.net.uplink.clone().filter(|uplink| *uplink != tap))
        .with_firewall(spec.firewall());
    host.nft.apply(&rules)?;
    *slots.rules = Some(rules);

    let plan = vm_plan(spec, guest, backend, &files, &layers, &tap, &lease)?;
    // The console log starts empty for this run; it holds the service's
    // output, so only the owner reads it.
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&files.console_log)
        .map_err(|source| Error::InputIo { path: files.console_log.clone(), source })?;
    claim.record.console_log = Some(files.console_log.clone());
    claim.record.vmm =
        Some(VmmInfo { backend: backend.name().to_owned(), pid: 0, run_dir: files.run_dir.clone(), argv: Vec::new() });
    step(claim, observer, Phase::Vmm, &format!("starting {}", backend.name()))?;
    let host_ms = started.elapsed().as_secs_f64() * 1e3;
    let vmm =
        slots.vmm.insert(kiln_vmm::launch(backend, &plan, &LaunchOptions::new(&files.run_dir)).map_err(Error::Vmm)?);
    if let Some(info) = &mut claim.record.vmm {
        info.pid = vmm.pid();
        // Its exact command line, which gc matches before it kills that pid.
        info.argv = crate::gc::process_argv(info.pid).unwrap_or_default();
    }
    // At once, not with the next step: a launcher killed from here on leaves
    // gc the pid to kill and wait for (a dying VMM still holds the tap).
    claim.save()?;
    // Before boot, so the channel is there before kiln-init looks for it.
    let mut control = match backend {
        Backend::Qemu => ControlChannel::connect(&files.control_socket, Duration::from_secs(5))?,
        Backend::CloudHypervisor => {
            ControlChannel::listen(VsockListener::bind(&files.vsock_socket, VSOCK_STATUS_PORT).map_err(Error::Vmm)?)
        }
    };
    step(claim, observer, Phase::Booting, "booting")?;
    let boot_request_ms = started.elapsed().as_secs_f64() * 1e3;
    vmm.boot().map_err(Error::Vmm)?;
    let launch_ms = started.elapsed().as_secs_f64() * 1e3;
    step(claim, observer, Phase::Running, "running")?;

    let status =
        console::follow_console(vmm.as_mut(), &files.console_log, claim, spec, options, observer, &mut control)?;
    let exit = outcome(&status, control.report());
    Ok(RunOutcome {
        exit_code: exit.code.unwrap_or(FAILURE_EXIT_CODE),
        exit,
        host_ms,
        boot_request_ms,
        launch_ms,
        images_reused,
        image_ms: prepared.as_ref().map(|p| p.host_ms),
        layers_built: prepared.as_ref().map_or(0, |p| p.disks.iter().filter(|d| d.built).count()),
    })
}

/// How the run ended: a crash the VMM saw wins over any report (a service
/// could have forged one before crashing the guest); else kiln-init's
/// report; else the VMM's word that the VM stopped without one. The
/// console is never read for this.
pub(crate) fn outcome(status: &Status, report: Option<&GuestReport>) -> ExitInfo {
    let from_vmm = |how: String| ExitInfo { code: None, how, source: Some(ExitSource::Vmm) };
    match (status, report) {
        (Status::Crashed { reason, log_tail }, report) => {
            let mut how = format!("VMM crashed: {reason}");
            if let Some(report) = report {
                how.push_str(&format!(" (after kiln-init reported: {report})"));
            }
            if !log_tail.trim().is_empty() {
                how.push('\n');
                how.push_str(log_tail.trim_end());
            }
            from_vmm(how)
        }
        (_, Some(report)) => {
            ExitInfo { code: report.exit_code(), how: report.to_string(), source: Some(ExitSource::KilnInit) }
        }
        (status, None) => from_vmm(format!("the VM stopped ({status}) without an exit report from kiln-init")),
    }
}

/// For crash tests only: `kiln run` stops dead after the step this names
/// (`lease`, `tap`, `firewall`, `vmm`, `running`...) has *finished* its
/// record, so a test can SIGKILL it at a known point and check `kiln gc`.
pub(crate) const CRASH_TEST_HOLD_ENV: &str = "KILN_CRASH_TEST_HOLD_AFTER";

fn step(claim: &mut VmClaim, observer: &mut dyn RunObserver, phase: Phase, detail: &str) -> Result<()> {
    // The previous step is complete when the next begins.
    hold_if_asked(claim.record.phase);
    claim.record.phase = phase;
    claim.save()?;
    observer.phase(phase, detail);
    if phase == Phase::Running {
        hold_if_asked(phase);
    }
    Ok(())
}

fn hold_if_asked(finished: Phase) {
    let Some(wanted) = std::env::var_os(CRASH_TEST_HOLD_ENV) else { return };
    let name = serde_json::to_value(finished).ok().and_then(|v| v.as_str().map(str::to_owned));
    if name.as_deref().is_some_and(|name| wanted == name) {
        eprintln!("kiln: {CRASH_TEST_HOLD_ENV}: holding after {name:?}", name = name.unwrap_or_default());
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use expect_test::{Expect, expect};
    use kiln_vmm::ShutdownHow;

    use super::plan::kernel_cmdline;

    fn check_outcome(status: Status, report: Option<GuestReport>, expected: Expect) {
        let exit = outcome(&status, report.as_ref());
        let source = exit.source.map(|s| s.to_string()).unwrap_or_default();
        expected.assert_eq(&format!("code={:?} ({source}) {}", exit.code, exit.how));
    }

    #[test]
    fn a_crash_the_vmm_saw_wins_over_any_report() {
        let reset = || Status::Crashed { reason: "the guest reset (reboot or panic)".into(), log_tail: String::new() };
        check_outcome(
            reset(),
            Some(GuestReport::Exited(0)),
            expect![
                "code=None (seen by the VMM) VMM crashed: the guest reset (reboot or panic) (after kiln-init reported: service exited with status 0)"
            ],
        );
        check_outcome(
            reset(),
            None,
            expect!["code=None (seen by the VMM) VMM crashed: the guest reset (reboot or panic)"],
        );
        check_outcome(
            Status::Crashed { reason: "signal: 9 (SIGKILL)".into(), log_tail: "qemu: line 1\nqemu: line 2\n".into() },
            None,
            expect![[r#"
                code=None (seen by the VMM) VMM crashed: signal: 9 (SIGKILL)
                qemu: line 1
                qemu: line 2"#]],
        );
        check_outcome(
            Status::ShutDown(ShutdownHow::Guest),
            Some(GuestReport::Exited(3)),
            expect!["code=Some(3) (reported by kiln-init) service exited with status 3"],
        );
        check_outcome(
            Status::ShutDown(ShutdownHow::Guest),
            Some(GuestReport::Killed(9)),
            expect!["code=Some(137) (reported by kiln-init) service killed by signal 9"],
        );
        check_outcome(
            Status::ShutDown(ShutdownHow::Guest),
            Some(GuestReport::Failed("no disk labelled SERVICEDISK".into())),
            expect!["code=None (reported by kiln-init) guest failed: no disk labelled SERVICEDISK"],
        );
        check_outcome(
            Status::ShutDown(ShutdownHow::VmmQuit),
            None,
            expect![
                "code=None (seen by the VMM) the VM stopped (shut down (VmmQuit)) without an exit report from kiln-init"
            ],
        );
    }

    pub(crate) fn spec_with_cmdline(cmdline: Option<&str>) -> Spec {
        let guest = cmdline.map(|c| format!("[guest]\ncmdline = \"{c}\"\n")).unwrap_or_default();
        Spec::parse(&format!("name = \"g\"\n[service]\nbinary = \"/bin/true\"\n{guest}"), Path::new("/s/g.toml"))
            .expect("a valid spec")
    }

    #[test]
    fn one_grace_period_from_stop_then_spec_then_default() {
        let plain = spec_with_cmdline(None);
        let sixty = spec_with_cmdline(Some("quiet kiln.grace=60"));
        assert_eq!(resolve_grace(None, &plain), DEFAULT_GRACE);
        assert_eq!(resolve_grace(None, &sixty), Duration::from_secs(60));
        assert_eq!(resolve_grace(Some(2), &sixty), Duration::from_secs(2));
        assert_eq!(resolve_grace(Some(0), &plain), Duration::ZERO);
        // The command line carries exactly one kiln.grace: the spec's, or the default.
        expect!["console=ttyS0 panic=-1 quiet no_timer_check kiln.grace=10"].assert_eq(&kernel_cmdline(&plain));
        expect!["console=ttyS0 panic=-1 quiet no_timer_check quiet kiln.grace=60"].assert_eq(&kernel_cmdline(&sixty));
        assert_eq!(parse_stop_timeout("30\n"), Some(30));
        assert_eq!(parse_stop_timeout("86400"), Some(86_400));
        for bad in ["", "-1", "2.5", "86401", "ten", "99999999999999999999999"] {
            assert_eq!(parse_stop_timeout(bad), None, "{bad:?}");
        }
    }
}
