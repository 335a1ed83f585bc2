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

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_guest::{CONTROL_PORT_NAME, GuestReport, HostCommand, MAX_GRACE_SECONDS, VSOCK_STATUS_PORT};
use kiln_imagefmt::{FatOptions, FatTree, NoCloudSeed};
use kiln_net::{Tap, TapConfig, VmRules, tap_name};
use kiln_vmm::{Console, Disk, DiskFormat, LaunchOptions, MacAddr, SerialPort, Status, VmPlan, Vmm, VsockListener};

use crate::control::ControlChannel;
use crate::gc::{HostHandles, release_vm};
use crate::state::{ExitInfo, ExitSource, LeaseInfo, Phase, StateDir, VmClaim, VmRecord, VmmInfo};
use crate::{DiskTree, Error, HostNet, LaunchScript, Result, ServiceDisk, Spec};

/// The environment variable naming the guest directory `cargo xtask guest`
/// wrote (also what the tests use).
pub const GUEST_DIR_ENV: &str = "KILN_GUEST_DIR";
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
/// The guest's vsock context id (cloud-hypervisor; one VM per VMM).
const GUEST_CID: u32 = 3;

/// How a run goes, beyond the spec.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Overrides the spec's `vm.backend`.
    pub backend: Option<crate::Backend>,
    /// Set (by a signal handler) to stop the VM gracefully.
    pub stop: Arc<AtomicBool>,
    /// Where VM addresses come from and egress goes.
    pub net: HostNet,
    /// The guest files when the spec names none.
    pub guest_dir: Option<PathBuf>,
}

/// What the caller sees of a run as it goes.
pub trait RunObserver {
    /// A step begins.
    fn phase(&mut self, phase: Phase, detail: &str);
    /// New bytes on the guest's console.
    fn console(&mut self, bytes: &[u8]);
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
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
}

/// The kernel and initramfs a VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFiles {
    /// bzImage (QEMU).
    pub bzimage: PathBuf,
    /// Uncompressed ELF (cloud-hypervisor), when there is one.
    pub vmlinux: Option<PathBuf>,
    pub initramfs: PathBuf,
}

impl GuestFiles {
    /// The spec's `guest.kernel`/`guest.initramfs`, else `dir` (or
    /// `$KILN_GUEST_DIR`, or `./target/guest`) as `cargo xtask guest` writes it.
    pub fn find(spec: &Spec, dir: Option<&Path>) -> Result<GuestFiles> {
        let dir = dir
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(GUEST_DIR_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("target/guest"));
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let must_exist = |path: PathBuf, what: &'static str| {
            if path.is_file() { Ok(path) } else { Err(Error::GuestFileMissing { what, path }) }
        };
        let bzimage = must_exist(spec.guest.kernel.clone().unwrap_or_else(|| dir.join("vmlinuz")), "kernel")?;
        let vmlinux = match &spec.guest.kernel {
            Some(kernel) => Some(kernel.clone()),
            None => Some(dir.join("vmlinux")).filter(|path| path.is_file()),
        };
        let initramfs =
            must_exist(spec.guest.initramfs.clone().unwrap_or_else(|| dir.join("initramfs.cpio.gz")), "initramfs")?;
        Ok(GuestFiles { bzimage, vmlinux, initramfs })
    }
}

/// The backend to use: the override, else the spec's, resolved against
/// what this host can run.
pub fn choose_backend(spec: &Spec, override_backend: Option<crate::Backend>) -> Result<kiln_vmm::Backend> {
    let on_path = |binary: &str| {
        std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()))
    };
    let backend = match override_backend.unwrap_or(spec.vm.backend) {
        crate::Backend::Auto => kiln_vmm::default_backend().map_err(Error::Vmm)?,
        crate::Backend::CloudHypervisor => kiln_vmm::Backend::CloudHypervisor,
        crate::Backend::Qemu => kiln_vmm::Backend::Qemu,
    };
    let binary = match backend {
        kiln_vmm::Backend::CloudHypervisor => "cloud-hypervisor",
        kiln_vmm::Backend::Qemu => "qemu-system-x86_64",
    };
    if !on_path(binary) {
        return Err(Error::NoVmm { binary });
    }
    Ok(backend)
}

/// What a spec asks that a kiln VM cannot give.
fn check_vm_policies(spec: &Spec) -> Result<()> {
    if spec.resources.gpu.policy == crate::GpuPolicy::Required && spec.vm.vfio.is_empty() {
        return Err(Error::VmPolicy(
            "resources.gpu.policy is \"required\" but vm.vfio names no PCI device to pass through".to_owned(),
        ));
    }
    if spec.resources.confidentiality == crate::Confidentiality::TeeRequired {
        return Err(Error::VmPolicy(
            "confidentiality is \"tee-required\", but kiln starts no confidential VMs (SEV-SNP, TDX); \
             run it on Kubernetes with a kata RuntimeClass"
                .to_owned(),
        ));
    }
    Ok(())
}

/// The kernel command line kiln boots with. It carries exactly one
/// `kiln.grace=`: the spec's if its `guest.cmdline` has one, else the
/// default's. kiln-init uses it when a stop comes without a grace period
/// (the power button); `stop <grace>` on the control channel overrides it.
pub fn kernel_cmdline(spec: &Spec) -> String {
    // no_timer_check: a busy host can make the kernel's IO-APIC timer check
    // fail under TCG, which then hangs or panics the boot (seen with three
    // guests booting at once on two cores); VMs have no broken 8254 to find.
    let mut cmdline = String::from("console=ttyS0 panic=-1 quiet no_timer_check");
    if let Some(extra) = &spec.guest.cmdline {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    if spec.guest.grace_seconds().is_none() {
        cmdline.push_str(&format!(" {}{}", crate::GRACE_PARAMETER, DEFAULT_GRACE.as_secs()));
    }
    cmdline
}

/// The one grace period of a stop: `kiln stop --timeout` if it gave one,
/// else the spec's `kiln.grace=`, else [`DEFAULT_GRACE`].
pub fn resolve_grace(stop_timeout: Option<u64>, spec: &Spec) -> Duration {
    stop_timeout.or(spec.guest.grace_seconds()).map_or(DEFAULT_GRACE, Duration::from_secs)
}

/// `kiln stop`'s half of the stop protocol: leaves `timeout` (or, without
/// one, nothing) in the VM directory's [`STOP_TIMEOUT_FILE`] for its
/// launcher, and returns the grace period the launcher will then use (the
/// timeout, else the spec's that the launcher left in [`GRACE_FILE`], else
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

/// A locally administered, unicast MAC derived from the VM's name.
pub fn mac_for(name: &str) -> MacAddr {
    let mut hasher = DefaultHasher::new();
    name.hash(&mut hasher);
    let [a, b, c, d, ..] = hasher.finish().to_le_bytes();
    MacAddr([0x02, 0x6b, a, b, c, d])
}

/// The paths of one VM's files.
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub service: PathBuf,
    pub seed: PathBuf,
    pub data: Option<PathBuf>,
    pub console_log: PathBuf,
    pub run_dir: PathBuf,
    /// QEMU: the host end of the control port (QEMU listens).
    pub control_socket: PathBuf,
    /// cloud-hypervisor: the hybrid vsock socket; the launcher listens on
    /// `<it>_<VSOCK_STATUS_PORT>` for kiln-init.
    pub vsock_socket: PathBuf,
}

impl VmFiles {
    pub fn new(state: &StateDir, spec: &Spec) -> VmFiles {
        let dir = state.vm_dir(spec.name.as_str());
        VmFiles {
            service: dir.join("service.img"),
            seed: dir.join("seed.img"),
            data: spec.resources.storage.map(|_| state.data_disk(spec.name.as_str())),
            console_log: dir.join("console.log"),
            run_dir: dir.join("run"),
            control_socket: dir.join("run").join("control.sock"),
            vsock_socket: dir.join("run").join("vsock.sock"),
        }
    }
}

/// The VM plan for `spec` with its files, tap and lease.
pub fn vm_plan(
    spec: &Spec,
    guest: &GuestFiles,
    backend: kiln_vmm::Backend,
    files: &VmFiles,
    tap: &str,
    lease: &LeaseInfo,
) -> Result<VmPlan> {
    let kernel = match backend {
        kiln_vmm::Backend::Qemu => guest.bzimage.clone(),
        kiln_vmm::Backend::CloudHypervisor => guest.vmlinux.clone().ok_or_else(|| Error::GuestFileMissing {
            what: "uncompressed kernel (vmlinux) for cloud-hypervisor",
            path: guest.bzimage.with_file_name("vmlinux"),
        })?,
    };
    let mut plan = VmPlan::new(spec.name.as_str(), kernel, kernel_cmdline(spec));
    plan.cpus = spec.resources.cpus;
    plan.memory.mib = spec.resources.memory.0 >> 20;
    plan.initramfs = Some(guest.initramfs.clone());
    let raw = |path: &Path, read_only: bool| Disk {
        path: path.to_path_buf(),
        read_only,
        direct: false,
        format: DiskFormat::Raw,
        serial: None,
    };
    plan.disks.push(raw(&files.service, true));
    plan.disks.push(raw(&files.seed, true));
    if let Some(data) = &files.data {
        plan.disks.push(Disk { serial: Some(DATA_DISK_SERIAL.to_owned()), ..raw(data, false) });
    }
    plan.networks.push(kiln_vmm::Network {
        tap: tap.to_owned(),
        mac: mac_for(spec.name.as_str()),
        host: None,
        guest: Some(lease.guest),
    });
    plan.serial = Console::File(files.console_log.clone());
    // The control channel to kiln-init (see crate::control).
    match backend {
        kiln_vmm::Backend::Qemu => {
            plan.control =
                Some(SerialPort { name: CONTROL_PORT_NAME.to_owned(), socket: files.control_socket.clone() });
        }
        kiln_vmm::Backend::CloudHypervisor => {
            plan.vsock = Some(kiln_vmm::Vsock { cid: GUEST_CID, socket: files.vsock_socket.clone() });
        }
    }
    plan.entropy = true;
    plan.vfio = spec.vm.vfio.iter().map(|pci| pci.as_str().to_owned()).collect();
    plan.validate().map_err(Error::Vmm)?;
    Ok(plan)
}

/// The virtio serial kiln-init looks for on a blank data disk it may format.
pub const DATA_DISK_SERIAL: &str = "kiln-data";

/// Builds (or reuses) the service disk, writes the seed, and creates the
/// data disk if it does not exist; an existing data disk of another size
/// than `resources.storage` is refused ([`Error::DataDiskSizeChanged`]).
/// Returns whether the service disk was reused.
pub fn build_images(spec: &Spec, files: &VmFiles, lease: &LeaseInfo) -> Result<bool> {
    if let (Some(data), Some(size)) = (&files.data, spec.resources.storage) {
        check_data_disk(data, size.0)?;
    }
    let reused = build_service_disk(spec, &files.service, lease)?;
    let seed = seed(spec, lease);
    let tree = seed.tree()?;
    let options = FatOptions { label: Some(NoCloudSeed::LABEL.to_owned()), ..FatOptions::default() };
    tree.layout(&options)?.write_file(&files.seed, None)?;
    make_private(&files.seed)?;
    if let (Some(data), Some(size)) = (&files.data, spec.resources.storage)
        && !data.exists()
    {
        create_blank_disk(data, size.0)?;
    }
    Ok(reused)
}

/// An existing data disk must have the size the spec asks for: growing it
/// needs `resize2fs` in the guest (busybox has none), and shrinking loses data.
fn check_data_disk(path: &Path, storage: u64) -> Result<()> {
    match fs::metadata(path) {
        Ok(meta) if meta.len() != storage => {
            Err(Error::DataDiskSizeChanged { path: path.to_path_buf(), disk: meta.len(), storage })
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::InputIo { path: path.to_path_buf(), source }),
    }
}

/// Images in the VM's directory are the owner's only, secret or not (the
/// image writer makes a non-secret image 0644).
fn make_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|source| Error::InputIo { path: path.to_path_buf(), source })
}

fn service_disk(spec: &Spec, lease: &LeaseInfo) -> Result<ServiceDisk> {
    let binary = spec.service.binary.clone().ok_or(Error::NoBinary)?;
    if !binary.is_file() {
        return Err(Error::BinaryMissing { path: binary });
    }
    let launch = LaunchScript {
        args: spec.service.args.iter().map(|arg| arg.clone().into_bytes()).collect(),
        env: spec.guest_env(lease.host).into_iter().map(|(k, v)| (k, v.into_bytes())).collect(),
        ..LaunchScript::default()
    };
    let trees = spec
        .service
        .files
        .iter()
        .map(|(name, tree)| DiskTree { name: name.clone(), source: tree.path.clone(), secret: tree.secret })
        .collect();
    Ok(ServiceDisk { binary, launch, trees })
}

/// Writes the service disk unless the one there was built from the same
/// inputs (same kiln, same image options and epoch, same launch script, and
/// every input file with the same path, size, mtime, inode and mode): a
/// warm start then costs a few `stat`s.
fn build_service_disk(spec: &Spec, path: &Path, lease: &LeaseInfo) -> Result<bool> {
    let disk = service_disk(spec, lease)?;
    let options = FatOptions { label: Some(ServiceDisk::LABEL.to_owned()), ..FatOptions::default() };
    let key = format!("{:016x}", inputs_key(&disk, &options, env!("CARGO_PKG_VERSION"))?);
    let key_path = path.with_extension("key");
    if path.is_file() && fs::read_to_string(&key_path).is_ok_and(|old| old == key) {
        return Ok(true);
    }
    let tree: FatTree = disk.tree()?;
    tree.layout(&options)?.write_file(path, None)?;
    make_private(path)?;
    crate::state::write_private_atomically(&key_path, key.as_bytes())?;
    Ok(false)
}

/// The warm cache key: everything the service disk's bytes depend on.
fn inputs_key(disk: &ServiceDisk, options: &FatOptions, kiln_version: &str) -> Result<u64> {
    let mut hasher = DefaultHasher::new();
    // The writer's version, then every layout option (label, epoch from
    // SOURCE_DATE_EPOCH, volume id, type, size, cluster size) as it stands.
    kiln_version.hash(&mut hasher);
    format!("{options:?}").hash(&mut hasher);
    disk.launch.render()?.hash(&mut hasher);
    let stat = |path: &Path, hasher: &mut DefaultHasher| -> Result<()> {
        let meta = fs::metadata(path).map_err(|source| Error::InputIo { path: path.to_path_buf(), source })?;
        (path, meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino(), meta.mode()).hash(hasher);
        Ok(())
    };
    stat(&disk.binary, &mut hasher)?;
    for tree in &disk.trees {
        (&tree.name, tree.secret).hash(&mut hasher);
        let mut stack = vec![tree.source.clone()];
        while let Some(dir) = stack.pop() {
            stat(&dir, &mut hasher)?;
            let mut entries: Vec<PathBuf> = fs::read_dir(&dir)
                .map_err(|source| Error::InputIo { path: dir.clone(), source })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            for entry in entries {
                if entry.is_dir() { stack.push(entry) } else { stat(&entry, &mut hasher)? }
            }
        }
    }
    Ok(hasher.finish())
}

/// The NoCloud seed: hostname, and eth0's address and default route.
pub fn seed(spec: &Spec, lease: &LeaseInfo) -> NoCloudSeed {
    let network_config = format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"{mac}\"\n    addresses: [\"{guest}/{prefix}\"]\n    routes:\n      - to: default\n        via: \"{host}\"\n",
        mac = mac_for(spec.name.as_str()),
        guest = lease.guest,
        prefix = lease.prefix_len,
        host = lease.host,
    );
    NoCloudSeed {
        user_data: b"#cloud-config\n".to_vec(),
        meta_data: NoCloudSeed::meta_data(spec.name.as_str(), spec.name.as_str()),
        network_config: Some(network_config.into_bytes()),
        vendor_data: None,
    }
}

fn create_blank_disk(path: &Path, size: u64) -> Result<()> {
    let temp = path.with_extension("img.tmp");
    let io = |source| Error::InputIo { path: path.to_path_buf(), source };
    let file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp).map_err(io)?;
    file.set_len(size).map_err(io)?;
    drop(file);
    fs::rename(&temp, path).map_err(io)
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
    check_vm_policies(spec)?;
    let guest = GuestFiles::find(spec, options.guest_dir.as_deref())?;
    let backend = choose_backend(spec, options.backend)?;
    service_disk(spec, &LeaseInfo { host: Ipv4Addr::LOCALHOST, guest: Ipv4Addr::LOCALHOST, prefix_len: 30 })?.tree()?;
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
    backend: kiln_vmm::Backend,
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
    let images_reused = build_images(spec, &files, &lease)?;

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

    let plan = vm_plan(spec, guest, backend, &files, &tap, &lease)?;
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
    claim.record.vmm = Some(VmmInfo {
        backend: backend_name(backend).to_owned(),
        pid: 0,
        run_dir: files.run_dir.clone(),
        argv: Vec::new(),
    });
    step(claim, observer, Phase::Vmm, &format!("starting {}", backend_name(backend)))?;
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
        kiln_vmm::Backend::Qemu => ControlChannel::connect(&files.control_socket, Duration::from_secs(5))?,
        kiln_vmm::Backend::CloudHypervisor => {
            ControlChannel::listen(VsockListener::bind(&files.vsock_socket, VSOCK_STATUS_PORT).map_err(Error::Vmm)?)
        }
    };
    step(claim, observer, Phase::Booting, "booting")?;
    let boot_request_ms = started.elapsed().as_secs_f64() * 1e3;
    vmm.boot().map_err(Error::Vmm)?;
    let launch_ms = started.elapsed().as_secs_f64() * 1e3;
    step(claim, observer, Phase::Running, "running")?;

    let status = follow_console(vmm.as_mut(), &files.console_log, claim, spec, options, observer, &mut control)?;
    let exit = outcome(&status, control.report());
    Ok(RunOutcome {
        exit_code: exit.code.unwrap_or(FAILURE_EXIT_CODE),
        exit,
        host_ms,
        boot_request_ms,
        launch_ms,
        images_reused,
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
pub const CRASH_TEST_HOLD_ENV: &str = "KILN_CRASH_TEST_HOLD_AFTER";

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

fn backend_name(backend: kiln_vmm::Backend) -> &'static str {
    match backend {
        kiln_vmm::Backend::CloudHypervisor => "cloud-hypervisor",
        kiln_vmm::Backend::Qemu => "qemu",
    }
}

/// Streams the console and reads the control channel until the VM stops.
/// On a stop request: sends `stop <grace>` to kiln-init (the power button
/// when there is no channel), waits the grace period plus [`STOP_MARGIN`]
/// for the guest to power off, then has the VMM quit.
#[allow(clippy::too_many_arguments)]
fn follow_console(
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

#[cfg(test)]
mod tests {
    use super::*;

    use expect_test::{Expect, expect};
    use kiln_vmm::ShutdownHow;

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

    fn spec_with_cmdline(cmdline: Option<&str>) -> Spec {
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

    #[test]
    fn the_control_channel_is_a_serial_port_on_qemu_and_vsock_on_cloud_hypervisor() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let spec = spec_with_cmdline(None);
        let files = VmFiles::new(&state, &spec);
        let guest = GuestFiles {
            bzimage: "/g/vmlinuz".into(),
            vmlinux: Some("/g/vmlinux".into()),
            initramfs: "/g/initramfs.cpio.gz".into(),
        };
        let lease = LeaseInfo { host: Ipv4Addr::new(10, 0, 0, 1), guest: Ipv4Addr::new(10, 0, 0, 2), prefix_len: 30 };
        let qemu = vm_plan(&spec, &guest, kiln_vmm::Backend::Qemu, &files, "kt-g", &lease).unwrap();
        let port = qemu.control.expect("QEMU gets the control port");
        assert_eq!((port.name.as_str(), port.socket), (CONTROL_PORT_NAME, files.run_dir.join("control.sock")));
        assert_eq!(qemu.vsock, None, "no vhost-vsock here");
        let ch = vm_plan(&spec, &guest, kiln_vmm::Backend::CloudHypervisor, &files, "kt-g", &lease).unwrap();
        assert_eq!(ch.control, None);
        assert_eq!(kiln_vmm::ch_vm_config(&ch)["vsock"]["socket"], files.vsock_socket.to_str().unwrap());
        let vsock = ch.vsock.expect("cloud-hypervisor gets vsock");
        assert_eq!((vsock.cid, vsock.socket), (GUEST_CID, files.run_dir.join("vsock.sock")));
    }

    #[test]
    fn run_cache_key_covers_kiln_version_epoch_label_and_every_fat_option() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("service");
        fs::write(&binary, b"#!/bin/sh\n").unwrap();
        let disk = ServiceDisk { binary, launch: LaunchScript::default(), trees: Vec::new() };
        let base = FatOptions { label: Some(ServiceDisk::LABEL.to_owned()), epoch: 0, ..FatOptions::default() };
        let key = |options: &FatOptions, version: &str| inputs_key(&disk, options, version).unwrap();
        let reference = key(&base, "0.1.0");
        assert_eq!(reference, key(&base.clone(), "0.1.0"), "the key is stable");
        let changed: Vec<(&str, u64)> = vec![
            ("kiln version", key(&base, "0.1.1")),
            ("epoch (SOURCE_DATE_EPOCH)", key(&FatOptions { epoch: 1_700_000_000, ..base.clone() }, "0.1.0")),
            ("label", key(&FatOptions { label: Some("OTHER".into()), ..base.clone() }, "0.1.0")),
            ("volume id", key(&FatOptions { volume_id: Some(7), ..base.clone() }, "0.1.0")),
            ("FAT type", key(&FatOptions { fat_type: Some(kiln_imagefmt::FatType::Fat32), ..base.clone() }, "0.1.0")),
            ("size", key(&FatOptions { size: Some(64 << 20), ..base.clone() }, "0.1.0")),
            ("cluster size", key(&FatOptions { cluster_size: Some(512), ..base.clone() }, "0.1.0")),
        ];
        for (what, changed) in changed {
            assert_ne!(changed, reference, "changing the {what} kept the cached service disk");
        }
        // And the epoch the writer uses is SOURCE_DATE_EPOCH's: the key sees it.
        assert_eq!(
            FatOptions::default().epoch,
            std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        );
    }

    #[test]
    fn run_refuses_a_data_disk_whose_size_differs_from_storage() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("web.img");
        check_data_disk(&disk, 16 << 20).unwrap();
        create_blank_disk(&disk, 16 << 20).unwrap();
        check_data_disk(&disk, 16 << 20).unwrap();
        let err = check_data_disk(&disk, 32 << 20).unwrap_err().to_string();
        assert!(
            err.contains(&disk.display().to_string())
                && err.contains("16777216 bytes (16 MiB)")
                && err.contains("33554432 bytes (32 MiB)"),
            "{err}"
        );
        assert_eq!(fs::metadata(&disk).unwrap().len(), 16 << 20, "the disk is left as it was");
    }

    #[test]
    fn macs_are_local_unicast_and_stable() {
        let mac = mac_for("web");
        assert_eq!(mac.0[0] & 0b11, 0b10, "locally administered, unicast");
        assert_eq!(mac, mac_for("web"));
        assert_ne!(mac, mac_for("web2"));
    }
}
