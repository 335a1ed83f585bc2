//! `VmPlan`: kiln's own description of a VM, independent of the VMM that runs it.

use std::fmt;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::pci::PciAddress;

/// The longest path a unix socket can bind: `sun_path` is 108 bytes with the NUL.
pub const SUN_PATH_MAX: usize = 107;

/// The longest kernel command line x86 Linux accepts (`COMMAND_LINE_SIZE` minus the NUL).
pub const CMDLINE_MAX: usize = 2047;

/// A VM as kiln wants it, for any backend. Build one with [`VmPlan::new`],
/// adjust the public fields, and let the backend [`VmPlan::validate`] it.
/// Like every plan type here it is `#[non_exhaustive]`: fields can be added
/// without breaking callers, who start from the constructors.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmPlan {
    /// A short name for logs and the VMM's process title: `[A-Za-z0-9._-]`, at most 64 bytes.
    pub name: String,
    /// Virtual CPUs, 1 to 254.
    pub cpus: u8,
    pub memory: Memory,
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    /// Block devices, in the order the guest sees them (`vda`, `vdb`, ...).
    pub disks: Vec<Disk>,
    pub networks: Vec<Network>,
    /// QEMU only: one more virtio-net device, after `networks`, on QEMU's
    /// user-mode network (slirp: 10.0.2.0/24, gateway 10.0.2.2), which needs
    /// no tap and no root. For tests and benchmarks whose guest wants a NIC
    /// but no host networking; cloud-hypervisor has none and refuses it.
    pub user_network: bool,
    pub vsock: Option<Vsock>,
    /// A named virtio-serial port whose host end is a unix socket the VMM
    /// listens on: kiln's control channel to kiln-init. QEMU only;
    /// cloud-hypervisor has no named ports (kiln uses `vsock` there) and
    /// ignores it.
    pub control: Option<SerialPort>,
    /// The legacy serial port (`ttyS0`).
    pub serial: Console,
    /// The virtio console (`hvc0`).
    pub console: Console,
    /// A virtio-rng device fed from the host's `/dev/urandom`.
    pub entropy: bool,
    /// Host PCI devices passed through with VFIO (GPUs).
    pub vfio: Vec<PciAddress>,
}

/// Guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Memory {
    pub mib: u64,
    /// Share guest memory with other processes (needed by vhost-user devices such as virtiofsd).
    pub shared: bool,
    /// Back guest memory with huge pages (the host must have them reserved).
    pub hugepages: bool,
}

/// A disk image given to the guest as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
    /// Open with `O_DIRECT`, bypassing the host page cache.
    pub direct: bool,
    pub format: DiskFormat,
    /// The virtio-blk serial the guest sees (`/sys/block/vdX/serial`): at
    /// most 20 bytes of `[A-Za-z0-9._-]`. kiln-init finds its data disk by it.
    pub serial: Option<String>,
}

/// The format of a disk image. Always stated, never probed: probing a
/// guest-writable raw image lets the guest turn it into a qcow2 that names
/// a host file as its backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// A virtio-net device on a tap the launcher created (kiln-net).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Network {
    pub tap: String,
    pub mac: MacAddr,
    /// The tap's own address and prefix, when the VMM should know it
    /// (cloud-hypervisor can configure the tap; QEMU leaves it to kiln-net).
    pub host: Option<(Ipv4Addr, u8)>,
    /// The guest's address. No VMM sets it: the guest configures itself
    /// from the seed, so this is for the launcher's bookkeeping and logs.
    pub guest: Option<Ipv4Addr>,
}

/// A virtio-vsock device. cloud-hypervisor exposes it as the unix socket
/// `socket` (hybrid vsock); QEMU uses the host kernel's vhost-vsock and
/// ignores `socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Vsock {
    /// The guest's context id: 3 or more (0-2 are reserved).
    pub cid: u32,
    pub socket: PathBuf,
}

/// A named virtio-serial port (`/sys/class/virtio-ports/vportNpM/name` in
/// the guest) backed by a unix socket on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SerialPort {
    /// 1-64 characters of `[A-Za-z0-9._-]`, such as `org.kiln.control`.
    pub name: String,
    /// The VMM listens here (server, no wait); the launcher connects.
    pub socket: PathBuf,
}

/// Where a serial port or console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    Off,
    /// Appended to a host file.
    File(PathBuf),
    /// A pseudo-terminal the VMM allocates; ask the running VM for its path.
    Pty,
    /// A unix socket the VMM listens on.
    Socket(PathBuf),
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = Error;

    fn from_str(text: &str) -> Result<MacAddr> {
        let bad = || Error::invalid("mac", format!("`{text}` is not six hex octets separated by `:`"));
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(octets))
    }
}

impl Memory {
    /// `mib` MiB of private memory without huge pages.
    pub fn new(mib: u64) -> Memory {
        Memory { mib, shared: false, hugepages: false }
    }
}

impl Disk {
    /// A writable disk with the host page cache and no serial.
    pub fn new(path: impl Into<PathBuf>, format: DiskFormat) -> Disk {
        Disk { path: path.into(), read_only: false, direct: false, format, serial: None }
    }

    /// The same disk, read-only (or not).
    pub fn with_read_only(self, read_only: bool) -> Disk {
        Disk { read_only, ..self }
    }

    /// The same disk, opened with `O_DIRECT` (or not).
    pub fn with_direct(self, direct: bool) -> Disk {
        Disk { direct, ..self }
    }

    /// The same disk with the virtio-blk serial `serial`.
    pub fn with_serial(self, serial: impl Into<String>) -> Disk {
        Disk { serial: Some(serial.into()), ..self }
    }
}

impl Network {
    /// A virtio-net device on `tap` with `mac`; no addresses recorded.
    pub fn new(tap: impl Into<String>, mac: MacAddr) -> Network {
        Network { tap: tap.into(), mac, host: None, guest: None }
    }
}

impl Vsock {
    /// A vsock device with context id `cid`, hybrid-vsock socket `socket`.
    pub fn new(cid: u32, socket: impl Into<PathBuf>) -> Vsock {
        Vsock { cid, socket: socket.into() }
    }
}

impl SerialPort {
    /// The named port `name`, its host end the unix socket `socket`.
    pub fn new(name: impl Into<String>, socket: impl Into<PathBuf>) -> SerialPort {
        SerialPort { name: name.into(), socket: socket.into() }
    }
}

impl VmPlan {
    /// A VM with 1 vCPU, 512 MiB, the given kernel and command line, and nothing else.
    pub fn new(name: impl Into<String>, kernel: impl Into<PathBuf>, cmdline: impl Into<String>) -> VmPlan {
        VmPlan {
            name: name.into(),
            cpus: 1,
            memory: Memory { mib: 512, shared: false, hugepages: false },
            kernel: kernel.into(),
            initramfs: None,
            cmdline: cmdline.into(),
            disks: Vec::new(),
            networks: Vec::new(),
            user_network: false,
            vsock: None,
            control: None,
            serial: Console::Off,
            console: Console::Off,
            entropy: false,
            vfio: Vec::new(),
        }
    }

    /// Checks every field; the first problem is returned, naming its field.
    /// Paths must be absolute (a VMM resolves relative ones against its own
    /// working directory), sockets must fit `sun_path`. Files are not opened:
    /// the VMM reports missing ones when it starts.
    pub fn validate(&self) -> Result<()> {
        let name_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if self.name.is_empty() || self.name.len() > 64 || !self.name.chars().all(name_ok) {
            return Err(Error::invalid("name", format!("`{}` must be 1-64 characters of [A-Za-z0-9._-]", self.name)));
        }
        if !(1..=254).contains(&self.cpus) {
            return Err(Error::invalid("cpus", format!("is {}; it must be 1 to 254", self.cpus)));
        }
        let memory = self.memory;
        if !(16..=16 << 20).contains(&memory.mib) {
            return Err(Error::invalid("memory.mib", format!("is {}; it must be 16 MiB to 16 TiB", memory.mib)));
        }
        if memory.hugepages && memory.mib % 2 != 0 {
            return Err(Error::invalid(
                "memory.mib",
                format!("is {}; with hugepages it must be a multiple of 2 MiB", memory.mib),
            ));
        }
        check_file_path("kernel", &self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            check_file_path("initramfs", initramfs)?;
        }
        if self.cmdline.len() > CMDLINE_MAX {
            return Err(Error::invalid(
                "cmdline",
                format!("is {} bytes; Linux takes at most {CMDLINE_MAX}", self.cmdline.len()),
            ));
        }
        if self.cmdline.contains(['\0', '\n']) {
            return Err(Error::invalid("cmdline", "contains a NUL or newline"));
        }
        for (index, disk) in self.disks.iter().enumerate() {
            check_file_path(&format!("disks[{index}].path"), &disk.path)?;
            if let Some(serial) = &disk.serial {
                let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
                if serial.is_empty() || serial.len() > 20 || !serial.chars().all(valid) {
                    return Err(Error::invalid(
                        format!("disks[{index}].serial"),
                        format!("`{serial}` must be 1-20 characters of [A-Za-z0-9._-]"),
                    ));
                }
            }
        }
        for (index, network) in self.networks.iter().enumerate() {
            check_network(index, network)?;
        }
        if let Some(vsock) = &self.vsock {
            if vsock.cid < 3 || vsock.cid == u32::MAX {
                return Err(Error::invalid(
                    "vsock.cid",
                    format!("is {}; context ids 0-2 and 2^32-1 are reserved", vsock.cid),
                ));
            }
            check_socket_path("vsock.socket", &vsock.socket)?;
        }
        if let Some(port) = &self.control {
            if port.name.is_empty() || port.name.len() > 64 || !port.name.chars().all(name_ok) {
                return Err(Error::invalid(
                    "control.name",
                    format!("`{}` must be 1-64 characters of [A-Za-z0-9._-]", port.name),
                ));
            }
            check_socket_path("control.socket", &port.socket)?;
        }
        check_console("serial", &self.serial)?;
        check_console("console", &self.console)?;
        Ok(())
    }
}

/// Checks that `path` can name a unix socket: absolute, no NUL, at most
/// [`SUN_PATH_MAX`] bytes. `field` names the plan field or option in the error.
pub fn check_socket_path(field: &str, path: &Path) -> Result<()> {
    check_file_path(field, path)?;
    let len = path.as_os_str().len();
    if len > SUN_PATH_MAX {
        return Err(Error::invalid(
            field,
            format!(
                "`{}` is {len} bytes; a unix socket path holds at most {SUN_PATH_MAX} (sun_path); use a shorter directory",
                path.display()
            ),
        ));
    }
    Ok(())
}

fn check_file_path(field: &str, path: &Path) -> Result<()> {
    let bytes = path.as_os_str().as_bytes();
    if !path.is_absolute() {
        return Err(Error::invalid(field, format!("`{}` must be an absolute path", path.display())));
    }
    if bytes.contains(&0) || bytes.contains(&b'\n') {
        return Err(Error::invalid(field, format!("`{}` contains a NUL or newline", path.display())));
    }
    // cloud-hypervisor's API is JSON, which cannot carry other bytes.
    if path.to_str().is_none() {
        return Err(Error::invalid(field, format!("`{}` is not valid UTF-8", path.display())));
    }
    Ok(())
}

fn check_network(index: usize, network: &Network) -> Result<()> {
    let tap = &network.tap;
    let tap_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if tap.is_empty() || tap.len() > 15 || !tap.chars().all(tap_ok) {
        return Err(Error::invalid(
            format!("networks[{index}].tap"),
            format!("`{tap}` must be 1-15 characters of [A-Za-z0-9._-] (IFNAMSIZ)"),
        ));
    }
    let mac = network.mac;
    if mac.0[0] & 1 != 0 || mac.0 == [0; 6] {
        return Err(Error::invalid(
            format!("networks[{index}].mac"),
            format!("{mac} is not a unicast address (the lowest bit of the first octet must be 0)"),
        ));
    }
    if let Some((_, prefix)) = network.host {
        if !(1..=32).contains(&prefix) {
            return Err(Error::invalid(format!("networks[{index}].host"), format!("prefix /{prefix} must be 1 to 32")));
        }
    }
    Ok(())
}

fn check_console(field: &str, console: &Console) -> Result<()> {
    match console {
        Console::Off | Console::Pty => Ok(()),
        Console::File(path) => check_file_path(field, path),
        Console::Socket(path) => check_socket_path(field, path),
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn check(edit: impl FnOnce(&mut VmPlan), expected: Expect) {
        let mut plan = VmPlan::new("vm1", "/k/vmlinuz", "console=ttyS0");
        edit(&mut plan);
        let actual = match plan.validate() {
            Ok(()) => "ok".to_owned(),
            Err(err) => err.to_string(),
        };
        expected.assert_eq(&actual);
    }

    #[test]
    fn validation_names_the_field() {
        check(|_| {}, expect!["ok"]);
        check(
            |p| p.name = "a b".into(),
            expect!["Invalid VM plan: `name` `a b` must be 1-64 characters of [A-Za-z0-9._-]"],
        );
        check(|p| p.cpus = 0, expect!["Invalid VM plan: `cpus` is 0; it must be 1 to 254"]);
        check(|p| p.memory.mib = 8, expect!["Invalid VM plan: `memory.mib` is 8; it must be 16 MiB to 16 TiB"]);
        check(
            |p| p.memory = Memory { mib: 513, shared: true, hugepages: true },
            expect!["Invalid VM plan: `memory.mib` is 513; with hugepages it must be a multiple of 2 MiB"],
        );
        check(|p| p.kernel = "vmlinuz".into(), expect!["Invalid VM plan: `kernel` `vmlinuz` must be an absolute path"]);
        check(|p| p.cmdline = "a\nb".into(), expect!["Invalid VM plan: `cmdline` contains a NUL or newline"]);
        check(
            |p| p.cmdline = "x".repeat(2048),
            expect!["Invalid VM plan: `cmdline` is 2048 bytes; Linux takes at most 2047"],
        );
        check(
            |p| {
                p.disks.push(Disk {
                    path: "d.img".into(),
                    read_only: true,
                    direct: false,
                    format: DiskFormat::Raw,
                    serial: None,
                })
            },
            expect!["Invalid VM plan: `disks[0].path` `d.img` must be an absolute path"],
        );
        check(
            |p| p.vsock = Some(Vsock { cid: 2, socket: "/run/v.sock".into() }),
            expect!["Invalid VM plan: `vsock.cid` is 2; context ids 0-2 and 2^32-1 are reserved"],
        );
        check(
            |p| p.vsock = Some(Vsock { cid: 3, socket: PathBuf::from(format!("/{}", "s".repeat(107))) }),
            expect![[
                r#"Invalid VM plan: `vsock.socket` `/sssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss` is 108 bytes; a unix socket path holds at most 107 (sun_path); use a shorter directory"#
            ]],
        );
        check(
            |p| p.vsock = Some(Vsock { cid: 3, socket: PathBuf::from(format!("/{}", "s".repeat(106))) }),
            expect!["ok"],
        );
        check(
            |p| p.serial = Console::Socket(PathBuf::from(format!("/tmp/{}", "s".repeat(110)))),
            expect![
                "Invalid VM plan: `serial` `/tmp/ssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss` is 115 bytes; a unix socket path holds at most 107 (sun_path); use a shorter directory"
            ],
        );
        check(
            |p| p.console = Console::File("rel.log".into()),
            expect!["Invalid VM plan: `console` `rel.log` must be an absolute path"],
        );
        let net = |tap: &str, mac: &str| Network {
            tap: tap.into(),
            mac: mac.parse().expect("test MAC parses"),
            host: None,
            guest: None,
        };
        check(
            |p| p.networks.push(net("kt-0123456789abc", "52:54:00:00:00:01")),
            expect![
                "Invalid VM plan: `networks[0].tap` `kt-0123456789abc` must be 1-15 characters of [A-Za-z0-9._-] (IFNAMSIZ)"
            ],
        );
        check(
            |p| p.networks.push(net("kt-1", "01:54:00:00:00:01")),
            expect![
                "Invalid VM plan: `networks[0].mac` 01:54:00:00:00:01 is not a unicast address (the lowest bit of the first octet must be 0)"
            ],
        );
        // A bad address cannot get into the plan: PciAddress::parse refuses
        // it (see crate::pci's tests for the message).
        check(|p| p.vfio.push(PciAddress::parse("0000:01:00.0").expect("valid")), expect!["ok"]);
        check(
            |p| p.control = Some(SerialPort { name: "org,kiln".into(), socket: "/run/c.sock".into() }),
            expect!["Invalid VM plan: `control.name` `org,kiln` must be 1-64 characters of [A-Za-z0-9._-]"],
        );
        check(
            |p| p.control = Some(SerialPort { name: "org.kiln.control".into(), socket: "c.sock".into() }),
            expect!["Invalid VM plan: `control.socket` `c.sock` must be an absolute path"],
        );
    }

    #[test]
    fn mac_addresses_parse_and_print() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().expect("valid MAC");
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for bad in ["", "52:54:00:ab:cd", "52:54:00:ab:cd:0f:00", "5:54:00:ab:cd:0f", "zz:54:00:ab:cd:0f"] {
            let err = bad.parse::<MacAddr>().expect_err(bad);
            assert!(err.to_string().contains("`mac`"), "{err}");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A plan using every field, for the backend mapping tests.
    pub(crate) fn full_plan() -> VmPlan {
        let mut plan = VmPlan::new("web-1", "/var/lib/kiln/vmlinux", "console=ttyS0 panic=-1 quiet");
        plan.cpus = 2;
        plan.memory = Memory { mib: 1024, shared: true, hugepages: true };
        plan.initramfs = Some("/var/lib/kiln/initramfs.cpio.gz".into());
        plan.disks = vec![
            Disk {
                path: "/vms/web-1/root.qcow2".into(),
                read_only: false,
                direct: true,
                format: DiskFormat::Qcow2,
                serial: Some("kiln-data".into()),
            },
            Disk {
                path: "/vms/web-1/seed,1.img".into(),
                read_only: true,
                direct: false,
                format: DiskFormat::Raw,
                serial: None,
            },
        ];
        plan.networks = vec![Network {
            tap: "kt-web-1".into(),
            mac: MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            host: Some((Ipv4Addr::new(10, 0, 0, 1), 30)),
            guest: Some(Ipv4Addr::new(10, 0, 0, 2)),
        }];
        plan.vsock = Some(Vsock { cid: 7, socket: "/run/kiln/web-1/vsock".into() });
        plan.control =
            Some(SerialPort { name: "org.kiln.control".into(), socket: "/run/kiln/web-1/control.sock".into() });
        plan.serial = Console::File("/run/kiln/web-1/serial.log".into());
        plan.console = Console::Pty;
        plan.entropy = true;
        plan.vfio = vec![PciAddress::parse("0000:01:00.0").expect("valid")];
        plan
    }
}
