//! Persistent tap devices made through `/dev/net/tun`, the way
//! `ip tuntap add mode tap user <uid>` makes them: `IFF_TAP | IFF_NO_PI`,
//! owned by the VMM's uid and persistent, so an unprivileged VMM can open
//! the tap later with its own flags (cloud-hypervisor adds `IFF_VNET_HDR`
//! itself when it attaches). Creation adds `IFF_TUN_EXCL` so an existing
//! device is reported instead of silently reused.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_rtnetlink::{IfExists, Request};
use rustix::ioctl::{IntegerSetter, Updater, ioctl, opcode};

use crate::ifname::{self, IFNAME_MAX};
use crate::{Error, Result, netlink};

/// Prefix of every kiln tap name: a route or link with it is kiln's own.
pub const TAP_PREFIX: &str = "kt-";
/// How long [`Tap::delete`] waits for another holder of the tap to close it.
const DELETE_WAIT: Duration = Duration::from_secs(3);
const TUN_DEVICE: &str = "/dev/net/tun";

const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
/// Fail with EBUSY instead of attaching when the device already exists.
const IFF_TUN_EXCL: u16 = 0x8000;
const TUNSETIFF: rustix::ioctl::Opcode = opcode::write::<rustix::ffi::c_int>(b'T', 202);
const TUNSETPERSIST: rustix::ioctl::Opcode = opcode::write::<rustix::ffi::c_int>(b'T', 203);
const TUNSETOWNER: rustix::ioctl::Opcode = opcode::write::<rustix::ffi::c_int>(b'T', 204);

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

/// The kernel's `struct ifreq` as TUNSETIFF reads it: a NUL-terminated name
/// and the flags, padded to the size of the union (24 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: u16,
    padding: [u8; 22],
}

/// The tap name for VM `vm_id`: `kt-<vm_id>` when that fits in 15 bytes,
/// otherwise `kt-<first 3 bytes>-<FNV-1a 32-bit hash of the whole id>`,
/// so long ids sharing a prefix still get different names. The hash is
/// upper-case hex and VM ids are lower-case, so a hashed name never equals
/// the direct name of a short id.
pub fn tap_name(vm_id: &str) -> Result<String> {
    crate::validate_vm_id(vm_id)?;
    let direct = format!("{TAP_PREFIX}{vm_id}");
    let name = if direct.len() <= IFNAME_MAX {
        direct
    } else {
        // vm ids are ASCII (validated above), so byte slicing is safe.
        format!("{TAP_PREFIX}{}-{:08X}", &vm_id[..3], kiln_types::hash::fnv1a_32(vm_id.as_bytes()))
    };
    ifname::validate_for_tap(&name)?;
    Ok(name)
}

/// Persistent tap devices in the calling thread's network namespace.
#[derive(Debug)]
pub struct Tap;

/// The host side of a VM's link, set by [`Tap::configure`]. Built with
/// [`TapConfig::new`] and the `with_*` methods (fields may be added).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TapConfig {
    /// The host's address on the tap (a lease's host address).
    pub host_addr: Ipv4Addr,
    /// The prefix length of the VM's subnet (30 or 31 for kiln's leases).
    pub prefix_len: u8,
    /// The MTU, or `None` to keep the kernel's default (1500).
    pub mtu: Option<u32>,
    /// Sets `route_localnet` on the tap, so the host's own connections to
    /// `127.0.0.1:<published port>` can be DNATed to the guest (kiln's
    /// nftables rules masquerade them to the tap address).
    pub route_localnet: bool,
}

impl TapConfig {
    /// `host_addr/prefix_len` on the tap, the kernel's default MTU, no
    /// `route_localnet`.
    pub fn new(host_addr: Ipv4Addr, prefix_len: u8) -> Self {
        TapConfig { host_addr, prefix_len, mtu: None, route_localnet: false }
    }

    /// With this MTU (`None`: the kernel's default).
    pub fn with_mtu(self, mtu: Option<u32>) -> Self {
        TapConfig { mtu, ..self }
    }

    /// With `route_localnet` set as given.
    pub fn with_route_localnet(self, route_localnet: bool) -> Self {
        TapConfig { route_localnet, ..self }
    }
}

impl Tap {
    /// Creates the persistent tap `name`, owned by `owner_uid` if given
    /// (so a VMM running as that uid can open it without CAP_NET_ADMIN).
    /// Needs CAP_NET_ADMIN. An existing device of that name is an error.
    pub fn create(name: &str, owner_uid: Option<u32>) -> Result<()> {
        ifname::validate_for_tap(name)?;
        let tun = open_tun(name)?;
        attach(&tun, name, "create", IFF_TUN_EXCL)?;
        if let Some(uid) = owner_uid {
            // SAFETY: TUNSETOWNER takes the uid as the integer argument itself.
            let set_owner = unsafe { IntegerSetter::<TUNSETOWNER>::new_usize(uid as usize) };
            // SAFETY: `set_owner` matches TUNSETOWNER's argument type (above).
            unsafe { ioctl(&tun, set_owner) }.map_err(|errno| tap_error(name, "set the owner of", errno))?;
        }
        set_persist(&tun, name, true, "create")
    }

    /// Deletes the tap `name`. Deleting a tap that does not exist succeeds
    /// (idempotent: cleanup after a crash may race with another cleanup);
    /// a non-tap device of that name is an error. A tap another process
    /// holds open is [`Error::TapBusy`] once that process has had 3 s to
    /// let go: a VMM that was just killed may still be closing its files.
    pub fn delete(name: &str) -> Result<()> {
        ifname::validate_for_tap(name)?;
        let deadline = Instant::now() + DELETE_WAIT;
        loop {
            let tun = open_tun(name)?;
            // Attaching to a missing name makes a transient tap that vanishes
            // when `tun` closes, so a missing tap ends up deleted too.
            match attach(&tun, name, "delete", 0) {
                Err(Error::TapBusy { .. }) if Instant::now() < deadline => {
                    drop(tun);
                    std::thread::sleep(Duration::from_millis(20));
                }
                attached => {
                    attached?;
                    return set_persist(&tun, name, false, "delete");
                }
            }
        }
    }

    /// Sets the host address, MTU and `route_localnet` of the tap `name` and
    /// brings it up, over rtnetlink (the address is replaced if it exists,
    /// so configuring twice is harmless). Needs CAP_NET_ADMIN.
    pub fn configure(name: &str, config: &TapConfig) -> Result<()> {
        ifname::validate_for_tap(name)?;
        if config.prefix_len > 32 {
            return Err(Error::InvalidTapConfig(format!("prefix length /{} is not an IPv4 prefix", config.prefix_len)));
        }
        if let Some(mtu) = config.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(Error::InvalidTapConfig(format!("MTU {mtu} is outside 68..=65535")));
            }
        }
        let io = |action: &'static str| {
            move |source: std::io::Error| match source.raw_os_error() {
                Some(code) if code == rustix::io::Errno::PERM.raw_os_error() => {
                    Error::TapNotPermitted { name: name.to_owned() }
                }
                _ => Error::TapIo { name: name.to_owned(), action, source },
            }
        };
        let mut rtnetlink = netlink::Rtnetlink::open().map_err(io("open a netlink socket for"))?;
        let ifindex = rustix::net::netdevice::name_to_index(rtnetlink.fd(), name)
            .map_err(|errno| io("find")(std::io::Error::from(errno)))?;
        if config.route_localnet {
            let path = format!("/proc/sys/net/ipv4/conf/{name}/route_localnet");
            std::fs::write(&path, "1").map_err(io("set route_localnet on"))?;
        }
        let address = Request::AddAddress {
            index: ifindex,
            address: config.host_addr,
            prefix_len: config.prefix_len,
            if_exists: IfExists::Replace,
        };
        rtnetlink.request(&address).map_err(io("set the address of"))?;
        rtnetlink.request(&Request::LinkUp { index: ifindex, mtu: config.mtu }).map_err(io("bring up"))
    }

    /// Polls `/sys/class/net/<name>` until it exists or `deadline` passes.
    /// sysfs shows the namespace that mounted it, so call this from a
    /// process whose /sys belongs to the tap's namespace.
    pub fn wait_until_exists(name: &str, deadline: Instant) -> Result<()> {
        ifname::validate_for_tap(name)?;
        let started = Instant::now();
        let path = Path::new("/sys/class/net").join(name);
        loop {
            if path.exists() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::TapWaitTimeout { name: name.to_owned(), waited: now - started });
            }
            std::thread::sleep(Duration::from_millis(5).min(deadline - now));
        }
    }
}

fn open_tun(name: &str) -> Result<File> {
    OpenOptions::new().read(true).write(true).open(TUN_DEVICE).map_err(|source| match source.kind() {
        ErrorKind::NotFound => Error::TunMissing,
        ErrorKind::PermissionDenied => Error::TapNotPermitted { name: name.to_owned() },
        _ => Error::TapIo { name: name.to_owned(), action: "open /dev/net/tun for", source },
    })
}

fn attach(tun: &File, name: &str, action: &'static str, extra_flags: u16) -> Result<()> {
    let mut request = IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI | extra_flags, padding: [0; 22] };
    // validate_tap_name bounds the name to 15 bytes, leaving the NUL.
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; IfReq has its
    // layout (16-byte name, flags, padding to the 40-byte union size).
    let set_iff = unsafe { Updater::<TUNSETIFF, IfReq>::new(&mut request) };
    // SAFETY: `set_iff` points at a live, correctly sized ifreq (above).
    unsafe { ioctl(tun, set_iff) }.map_err(|errno| tap_error(name, action, errno))
}

fn set_persist(tun: &File, name: &str, persist: bool, action: &'static str) -> Result<()> {
    // SAFETY: TUNSETPERSIST takes 0 or 1 as the integer argument itself.
    let set_persist = unsafe { IntegerSetter::<TUNSETPERSIST>::new_usize(usize::from(persist)) };
    // SAFETY: `set_persist` matches TUNSETPERSIST's argument type (above).
    unsafe { ioctl(tun, set_persist) }.map_err(|errno| tap_error(name, action, errno))
}

fn tap_error(name: &str, action: &'static str, errno: rustix::io::Errno) -> Error {
    let name = name.to_owned();
    match errno {
        rustix::io::Errno::PERM | rustix::io::Errno::ACCESS => Error::TapNotPermitted { name },
        rustix::io::Errno::BUSY | rustix::io::Errno::EXIST => Error::TapBusy { name },
        rustix::io::Errno::INVAL => Error::TapNotTap { name },
        _ => Error::TapIo { name, action, source: errno.into() },
    }
}
