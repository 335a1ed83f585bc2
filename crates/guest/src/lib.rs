//! kiln-guest: kiln's minimal guest. The `kiln-init` binary is PID 1 inside
//! the microVM (mount, load modules, find disks by label, configure eth0,
//! run `/srv/launch`, report its exit, power off). This library holds the
//! pure readers that `kiln-init` and `cargo xtask guest` share:
//!
//! - [`extract_vmlinux`]: the uncompressed ELF kernel out of a bzImage
//!   (payload in gzip, xz, lz4 or zstd), for cloud-hypervisor's PVH boot;
//! - [`ModInfo`] and [`load_order`]: a kernel module's `.modinfo` section
//!   and the dependency order to load modules in (Debian's cloud kernel
//!   ships no `modules.dep`);
//! - [`classify_disk`]: what a disk holds, from its first sectors (a FAT
//!   label such as `SERVICEDISK`/`CIDATA`, an ext label, or nothing);
//! - [`GuestConfig`]: hostname, eth0 address and default route from the
//!   NoCloud seed's `meta-data` and `network-config`;
//! - [`netlink`]: the rtnetlink messages that set that address and route
//!   (thin names over kiln-rtnetlink, which kiln-net shares);
//! - [`GuestReport`], [`HostCommand`] and [`LineBuffer`]: the line protocol
//!   of the control channel between kiln's launcher and kiln-init (the exit
//!   report one way, `stop <grace>` the other), which the service's output
//!   never reaches;
//! - [`ContainerConfig`]: an OCI container's runtime config on the service
//!   disk, and the pure parts of running it as `docker run` does
//!   ([`resolve_user`], [`merge_env`], [`overlay_options`], [`hosts_file`]..).
//!
//! It is not a VMM and not an image writer: it never spawns a process and
//! never touches the host; only the `kiln-init` binary makes system calls,
//! and only inside the guest.
//!
//! ```
//! use kiln_guest::{GuestConfig, classify_disk, DiskKind};
//!
//! let network = "version: 2\nethernets:\n  eth0:\n    addresses: [10.0.2.15/24]\n    gateway4: 10.0.2.2\n";
//! let config = GuestConfig::parse("local-hostname: web-1\n", Some(network))?;
//! assert_eq!(config.hostname.as_deref(), Some("web-1"));
//! assert_eq!(config.ipv4.map(|ip| ip.prefix_len), Some(24));
//! assert_eq!(classify_disk(&[0; 2048]), DiskKind::Blank);
//! # Ok::<(), kiln_guest::Error>(())
//! ```

mod container;
mod control;
mod disk;
mod error;
mod kernel;
mod modinfo;
pub mod netlink;
mod seed;

pub use container::{
    CONTAINER_CONFIG_FILE, ContainerConfig, DEFAULT_PATH, FilesMount, LAYER_SERIAL_PREFIX, MAX_LAYERS, ResolvedUser,
    StopSignal, UpperKind, combine_argv, find_in_path, hostname_file, hosts_file, merge_env, overlay_options,
    resolv_conf, resolve_user,
};
pub use control::{CONTROL_PORT_NAME, GuestReport, HostCommand, LineBuffer, MAX_GRACE_SECONDS, MAX_LINE};
pub use disk::{CLASSIFY_BYTES, DiskKind, classify_disk};
pub use error::{Error, Result};
pub use kernel::{BzImage, KernelCompression, extract_vmlinux};
pub use modinfo::{ModInfo, decompress_module, load_order, module_name_from_file};
pub use seed::{GuestConfig, Ipv4Config};

/// The volume label of the service disk (kiln's `ServiceDisk::LABEL`).
pub const SERVICE_DISK_LABEL: &str = "SERVICEDISK";
/// The volume label of the NoCloud seed.
pub const SEED_LABEL: &str = "CIDATA";
/// The ext volume label kiln-init gives the data disk when it formats it.
pub const DATA_DISK_LABEL: &str = "KILNDATA";
/// The virtio-blk serial that marks a blank disk as the data disk to format.
pub const DATA_DISK_SERIAL: &str = "kiln-data";
/// The environment variable naming the directory where `cargo xtask guest`
/// put the kernel and initramfs (`vmlinuz`, `vmlinux`, `initramfs.cpio.gz`).
pub const GUEST_DIR_ENV: &str = "KILN_GUEST_DIR";

/// The prefix of every line kiln-init writes to the console.
pub const MARKER_PREFIX: &str = "kiln-init: ";
/// vsock port (on the host, CID 2) that receives the service's output.
pub const VSOCK_LOG_PORT: u32 = 10_240;
/// vsock port (on the host, CID 2) of the control channel (cloud-hypervisor;
/// QEMU uses the virtio-serial port [`CONTROL_PORT_NAME`]).
pub const VSOCK_STATUS_PORT: u32 = 10_241;

/// Builders the fuzz targets share with the unit tests.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::modinfo::fake_module;
}

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
