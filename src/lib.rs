//! kiln: the launcher library behind the `kiln` binary. It turns a service
//! (a binary, its arguments, environment and data trees) into the disk images
//! a microVM boots with: the service disk (label `SERVICEDISK`) with its
//! generated `launch` script, plus the spec (`kiln.toml`, see `docs/spec.md`)
//! and the helpers specs share, such as size parsing.
//!
//! It is not the image writer: bytes on disk are `kiln-imagefmt`'s job, and
//! nothing here mounts, needs root or spawns a process. Booting VMs,
//! networking and Kubernetes are not part of it yet.

mod error;
mod gc;
mod hostnet;
mod launch;
mod run;
mod service_disk;
mod size;
mod spec;
mod state;

pub use error::{Error, Result};
pub use gc::{GcAction, HostHandles, collect_garbage, release_vm};
pub use hostnet::{CIDR_ENV, DEFAULT_CIDR, HostNet, UPLINK_ENV};
pub use launch::LaunchScript;
pub use run::{
    CRASH_TEST_HOLD_ENV, DATA_DISK_SERIAL, FAILURE_EXIT_CODE, GUEST_DIR_ENV, GUEST_GRACE, GuestFiles, RunObserver,
    RunOptions, RunOutcome, VmFiles, build_images, choose_backend, exit_from_console, kernel_cmdline, mac_for, run,
    seed, vm_plan,
};
pub use service_disk::{DiskTree, ServiceDisk};
pub use size::parse_size;
pub use spec::{
    Backend, ByteSize, Confidentiality, FileTree, Gpu, GpuPolicy, Guest, Kubernetes, Name, Network, PciAddress,
    PortSpec, PublishSpec, Resources, Service, Spec, Toleration, VmSettings, rewrite_loopback_urls,
};
pub use state::{ExitInfo, LeaseInfo, Phase, STATE_DIR_ENV, StateDir, VmClaim, VmEntry, VmRecord, VmmInfo};
