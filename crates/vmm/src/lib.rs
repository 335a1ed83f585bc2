//! kiln-vmm starts and drives the VMM that runs a kiln microVM:
//! cloud-hypervisor over its REST API socket, or QEMU over QMP where
//! cloud-hypervisor or KVM is missing, behind one lifecycle ([`Vmm`]) with a
//! truthful [`Status`]. A VM is described once, as a [`VmPlan`], and mapped
//! to each VMM by pure functions ([`ch_vm_config`], [`qemu_args`]).
//!
//! It is *not* a VMM, and it does not build images (kiln-imagefmt), create
//! taps or firewall rules (kiln-net) or talk to the guest beyond giving it
//! channels (vsock, a named virtio-serial port) whose host ends the caller uses.
//! It is the only kiln crate that spawns a VMM. Every VMM it starts runs in
//! its own process group, dies with the thread that started it
//! (`PR_SET_PDEATHSIG`), and is killed and reaped when its handle drops.
//! Every wait has a deadline. No async runtime.
//!
//! ```no_run
//! use std::time::Duration;
//! use kiln_vmm::{Backend, Console, LaunchOptions, Status, VmPlan, launch};
//!
//! let mut plan = VmPlan::new("web-1", "/var/lib/kiln/vmlinuz", "console=ttyS0 panic=-1");
//! plan.initramfs = Some("/var/lib/kiln/initramfs.cpio.gz".into());
//! plan.serial = Console::File("/run/kiln/web-1/serial.log".into());
//! let mut vm = launch(Backend::Qemu, &plan, &LaunchOptions::new("/run/kiln/web-1"))?;
//! vm.boot()?;
//! println!("{}", vm.status()?); // running
//! // Power button; after 30 s without a power-off, quit; then SIGKILL.
//! let stopped: Status = vm.shutdown(Duration::from_secs(30))?;
//! # Ok::<(), kiln_vmm::Error>(())
//! ```

mod backend;
mod ch;
mod ch_config;
mod error;
mod http;
mod pci;
mod plan;
mod process;
mod qemu;
mod qemu_args;
mod qmp;
mod vm;
mod vsock;

pub use backend::{Backend, BackendChoice, choose_backend, find_on_path};
pub use ch::ChVm;
pub use ch_config::ch_vm_config;
pub use error::{Error, ErrorKind, Result};
pub use pci::PciAddress;
pub use plan::{
    CMDLINE_MAX, Console, Disk, DiskFormat, MacAddr, Memory, Network, SUN_PATH_MAX, SerialPort, VmPlan, Vsock,
    check_socket_path,
};
pub use qemu::{QEMU_ACCEL_ENV, QemuVm, probe_accel};
pub use qemu_args::{Accel, qemu_args};
pub use vm::{AccelChoice, LaunchOptions, ShutdownHow, Status, Vmm, launch};
pub use vsock::{VsockListener, vsock_connect};

/// Parsers of untrusted VMM output, for the fuzz targets only.
#[doc(hidden)]
pub mod fuzzing {
    /// Parses an HTTP response; `Ok(None)` means incomplete.
    pub fn parse_http_response(bytes: &[u8], eof: bool) -> Result<Option<(u16, Vec<u8>)>, String> {
        crate::http::parse_response(bytes, eof)
            .map(|response| response.map(|response| (response.status, response.body)))
    }

    /// Parses one QMP line; returns whether it was understood.
    pub fn parse_qmp_line(line: &str) -> bool {
        crate::qmp::parse_qmp_line(line).is_ok()
    }

    /// Parses a hybrid-vsock `CONNECT` reply.
    pub fn parse_vsock_reply(line: &[u8]) -> Result<u32, String> {
        crate::vsock::parse_connect_reply(line)
    }
}

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
