//! What `kiln run` asks of the VMM: the backend, the guest files, the
//! VM's paths, its MAC and kernel command line, and the [`VmPlan`] itself.

use std::path::{Path, PathBuf};

use kiln_guest::{CONTROL_PORT_NAME, DATA_DISK_SERIAL, LAYER_SERIAL_PREFIX};
use kiln_types::hash::Fnv1a64;
use kiln_vmm::{Backend, BackendChoice, Console, Disk, DiskFormat, MacAddr, SerialPort, VmPlan};

use super::{DEFAULT_GRACE, RunOptions};
use crate::state::{LeaseInfo, StateDir};
use crate::{Error, Result, Spec};

/// The guest's vsock context id (cloud-hypervisor; one VM per VMM).
const GUEST_CID: u32 = 3;

/// The kernel and initramfs a VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GuestFiles {
    /// bzImage (QEMU).
    pub(crate) bzimage: PathBuf,
    /// Uncompressed ELF (cloud-hypervisor), when there is one.
    pub(crate) vmlinux: Option<PathBuf>,
    pub(crate) initramfs: PathBuf,
}

impl GuestFiles {
    /// The spec's `guest.kernel`/`guest.initramfs`, else `dir` (or
    /// `$KILN_GUEST_DIR`, or `./target/guest`) as `cargo xtask guest` writes it.
    pub(crate) fn find(spec: &Spec, dir: Option<&Path>) -> Result<GuestFiles> {
        let dir = dir
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(kiln_guest::GUEST_DIR_ENV).map(PathBuf::from))
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
/// what this host can run; its program must be on `PATH`.
pub(crate) fn choose_backend(spec: &Spec, override_backend: Option<BackendChoice>) -> Result<Backend> {
    let backend = kiln_vmm::choose_backend(override_backend.unwrap_or(spec.vm.backend)).map_err(Error::Vmm)?;
    if kiln_vmm::find_on_path(backend.program()).is_none() {
        return Err(Error::NoVmm { binary: backend.program() });
    }
    Ok(backend)
}

/// A locally administered, unicast MAC derived from the VM's name with
/// kiln's stable hash, so it survives toolchain upgrades.
pub(crate) fn mac_for(name: &str) -> MacAddr {
    let [a, b, c, d, ..] = Fnv1a64::new().field(b"kiln mac").field(name.as_bytes()).finish().to_le_bytes();
    MacAddr([0x02, 0x6b, a, b, c, d])
}

/// What a spec asks that a kiln VM cannot give.
pub(super) fn check_vm_policies(spec: &Spec) -> Result<()> {
    if spec.resources.gpu.policy == crate::GpuPolicy::Required && spec.vm.vfio.is_empty() {
        return Err(Error::GpuWithoutVfio);
    }
    if spec.resources.confidentiality == crate::Confidentiality::TeeRequired {
        return Err(Error::TeeRequired);
    }
    Ok(())
}

/// The kernel command line kiln boots with. It carries exactly one
/// `kiln.grace=`: the spec's if its `guest.cmdline` has one, else the
/// default's. kiln-init uses it when a stop comes without a grace period
/// (the power button); `stop <grace>` on the control channel overrides it.
pub(crate) fn kernel_cmdline(spec: &Spec) -> String {
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

/// The paths of one VM's files, in its directory of a [`StateDir`].
#[derive(Debug, Clone)]
#[non_exhaustive]
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

/// The virtio-blk serial of layer disk `index` (bottom layer first), as
/// kiln-init looks for it.
pub(crate) fn layer_serial(index: usize) -> String {
    format!("{LAYER_SERIAL_PREFIX}{index}")
}

/// The VM plan for `spec` with its files, tap and lease. `layers` are an
/// image's layer-chain filesystems, bottom first (none for a binary): each
/// is attached read-only (the image store shares them between VMs) with
/// the serial [`layer_serial`] of its place.
#[allow(clippy::too_many_arguments)]
pub(crate) fn vm_plan(
    spec: &Spec,
    guest: &GuestFiles,
    backend: Backend,
    files: &VmFiles,
    layers: &[PathBuf],
    tap: &str,
    lease: &LeaseInfo,
) -> Result<VmPlan> {
    let kernel = match backend {
        Backend::Qemu => guest.bzimage.clone(),
        Backend::CloudHypervisor => guest.vmlinux.clone().ok_or_else(|| Error::GuestFileMissing {
            what: "uncompressed kernel (vmlinux) for cloud-hypervisor",
            path: guest.bzimage.with_file_name("vmlinux"),
        })?,
    };
    let mut plan = VmPlan::new(spec.name.as_str(), kernel, kernel_cmdline(spec));
    plan.cpus = spec.resources.cpus;
    plan.memory.mib = spec.resources.memory.0 >> 20;
    plan.initramfs = Some(guest.initramfs.clone());
    plan.disks.push(Disk::new(&files.service, DiskFormat::Raw).with_read_only(true));
    plan.disks.push(Disk::new(&files.seed, DiskFormat::Raw).with_read_only(true));
    if let Some(data) = &files.data {
        plan.disks.push(Disk::new(data, DiskFormat::Raw).with_serial(DATA_DISK_SERIAL));
    }
    for (index, layer) in layers.iter().enumerate() {
        plan.disks.push(Disk::new(layer, DiskFormat::Raw).with_read_only(true).with_serial(layer_serial(index)));
    }
    let mut network = kiln_vmm::Network::new(tap, mac_for(spec.name.as_str()));
    network.guest = Some(lease.guest);
    plan.networks.push(network);
    plan.serial = Console::File(files.console_log.clone());
    // The control channel to kiln-init (see crate::control).
    match backend {
        Backend::Qemu => plan.control = Some(SerialPort::new(CONTROL_PORT_NAME, &files.control_socket)),
        Backend::CloudHypervisor => plan.vsock = Some(kiln_vmm::Vsock::new(GUEST_CID, &files.vsock_socket)),
    }
    plan.entropy = true;
    plan.vfio = spec.vm.vfio.clone();
    plan.validate().map_err(Error::Vmm)?;
    Ok(plan)
}

/// The VM `kiln run` would start for a spec, as [`plan_vm`] finds it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PlannedVm {
    /// The backend, resolved on this host.
    pub backend: Backend,
    /// What the VMM would be given.
    pub plan: VmPlan,
    /// The VM's run directory (the VMM's sockets and log).
    pub run_dir: PathBuf,
    /// The OCI image the VM runs: its source, and the manifest digest once
    /// the image store holds it (`kiln run` or `kiln image oci pull`).
    pub image: Option<(String, Option<String>)>,
}

/// What `kiln run` would hand the VMM for `spec`, with the pool's first
/// lease and `state`'s paths; nothing on the host is touched.
pub fn plan_vm(spec: &Spec, state: &StateDir, options: &RunOptions) -> Result<PlannedVm> {
    let guest = GuestFiles::find(spec, options.guest_dir.as_deref())?;
    let backend = choose_backend(spec, options.backend)?;
    let files = VmFiles::new(state, spec);
    let first = u32::from(options.net.cidr.network());
    let lease = LeaseInfo {
        host: std::net::Ipv4Addr::from(first + 1),
        guest: std::net::Ipv4Addr::from(first + 2),
        prefix_len: options.net.prefix,
    };
    let tap = kiln_net::tap_name(spec.name.as_str())?;
    let (image, layers) = match spec.vm_program() {
        Some(crate::VmProgram::Image(source)) => {
            let name = super::oci::parse_image_source(source)?.to_string();
            match super::oci::cached_image(state, source)? {
                Some(cached) => (
                    Some((name, Some(cached.manifest_digest().to_string()))),
                    super::oci::planned_layer_disks(state, &cached),
                ),
                None => (Some((name, None)), Vec::new()),
            }
        }
        _ => (None, Vec::new()),
    };
    let plan = vm_plan(spec, &guest, backend, &files, &layers, &tap, &lease)?;
    Ok(PlannedVm { backend, plan, run_dir: files.run_dir, image })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::run::tests::spec_with_cmdline;

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
        let qemu = vm_plan(&spec, &guest, kiln_vmm::Backend::Qemu, &files, &[], "kt-g", &lease).unwrap();
        let port = qemu.control.expect("QEMU gets the control port");
        assert_eq!((port.name.as_str(), port.socket), (CONTROL_PORT_NAME, files.run_dir.join("control.sock")));
        assert_eq!(qemu.vsock, None, "no vhost-vsock here");
        let ch = vm_plan(&spec, &guest, kiln_vmm::Backend::CloudHypervisor, &files, &[], "kt-g", &lease).unwrap();
        assert_eq!(ch.control, None);
        assert_eq!(kiln_vmm::ch_vm_config(&ch)["vsock"]["socket"], files.vsock_socket.to_str().unwrap());
        let vsock = ch.vsock.expect("cloud-hypervisor gets vsock");
        assert_eq!((vsock.cid, vsock.socket), (GUEST_CID, files.run_dir.join("vsock.sock")));
    }

    #[test]
    fn an_images_layer_disks_are_read_only_in_order_with_serials_kiln_layer0_up() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let spec = spec_with_cmdline(None);
        let files = VmFiles::new(&state, &spec);
        let guest =
            GuestFiles { bzimage: "/g/vmlinuz".into(), vmlinux: None, initramfs: "/g/initramfs.cpio.gz".into() };
        let lease = LeaseInfo { host: Ipv4Addr::new(10, 0, 0, 1), guest: Ipv4Addr::new(10, 0, 0, 2), prefix_len: 30 };
        let layers: Vec<PathBuf> = vec!["/oci/rootfs/base.ext4".into(), "/oci/rootfs/top.ext4".into()];
        let plan = vm_plan(&spec, &guest, kiln_vmm::Backend::Qemu, &files, &layers, "kt-g", &lease).unwrap();
        let attached: Vec<String> = plan
            .disks
            .iter()
            .filter(|disk| disk.serial.as_deref().is_some_and(|s| s.starts_with(LAYER_SERIAL_PREFIX)))
            .map(|disk| {
                format!("{} ro={} {}", disk.serial.as_deref().unwrap_or(""), disk.read_only, disk.path.display())
            })
            .collect();
        assert_eq!(
            attached,
            ["kiln-layer0 ro=true /oci/rootfs/base.ext4", "kiln-layer1 ro=true /oci/rootfs/top.ext4"],
            "bottom layer first"
        );
    }

    #[test]
    fn macs_are_local_unicast_and_stable() {
        let mac = mac_for("web");
        assert_eq!(mac.0[0] & 0b11, 0b10, "locally administered, unicast");
        assert_eq!(mac, mac_for("web"));
        assert_ne!(mac, mac_for("web2"));
    }

    #[test]
    fn macs_come_from_the_stable_hash_so_a_toolchain_upgrade_keeps_them() {
        // FNV-1a 64 of the length-delimited fields "kiln mac", "web" (worked
        // out by hand too); std's DefaultHasher promises no such value.
        assert_eq!(mac_for("web").to_string(), "02:6b:21:eb:09:7e");
    }
}
