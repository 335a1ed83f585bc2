//! kiln: the launcher library behind the `kiln` binary. It reads the spec
//! (`kiln.toml`, see `docs/spec.md`), turns the service into the disk images
//! a microVM boots with (the service disk, label `SERVICEDISK`, with its
//! generated `launch` script; the seed; the data disk), and runs it: lease,
//! tap, firewall, VMM, console, release ([`run`]), with a state record per
//! VM so [`collect_garbage`] can clean up after a crash.
//!
//! It is not the image writer (`kiln-imagefmt`), does not touch nftables or
//! netlink itself (`kiln-net`) and never spawns a VMM (`kiln-vmm`). For
//! Kubernetes it only converts the spec (`workload`, `ClusterDefaults`,
//! behind the default-on `k8s` feature); the mapping onto objects and the
//! cluster client live in `kiln-k8s`. Without that feature the library
//! compiles no Kubernetes or async code at all.

mod control;
mod error;
mod gc;
mod hostnet;
#[cfg(feature = "k8s")]
mod k8s;
mod launch;
mod run;
mod service_disk;
mod size;
mod spec;
mod state;

pub use error::{Error, ErrorKind, Result};
pub use gc::{GcAction, HostHandles, collect_garbage, release_vm};
pub use hostnet::{CIDR_ENV, DEFAULT_CIDR, HostNet, UPLINK_ENV};
#[cfg(feature = "k8s")]
pub use k8s::{ClusterDefaults, K8S_DEFAULTS_ENV, K8sWorkload, workload};
pub use launch::LaunchScript;
pub use run::{
    DEFAULT_GRACE, FAILURE_EXIT_CODE, INSECURE_REGISTRIES_ENV, ImageEvent, LayerDisk, MAX_LAYER_DISKS, OCI_STORE_DIR,
    PlannedVm, REGISTRY_CA_ENV, ROOTFS_FORMAT, RunObserver, RunOptions, RunOutcome, STOP_MARGIN, VmFiles, build_images,
    cached_image, image_rootfs, open_image_store, parse_image_source, plan_vm, pull_image, refuse_pod, request_stop,
    run,
};
pub use service_disk::{DiskTree, ServiceDisk};
pub use size::parse_size;
pub use spec::{
    AbsolutePath, Container, ContainerName, ContainerResources, Medium, MountSpec, Pod, PodContainer, PodMount,
    PodVolume, Restart, SERVICE_CONTAINER, Volume,
};
pub use spec::{
    Backend, ByteSize, Confidentiality, FileSource, FileTree, GRACE_PARAMETER, Gpu, GpuPolicy, Guest, Kubernetes, Name,
    Network, PciAddress, PodSecurity, PortSpec, PublishSpec, Resources, Service, Spec, Toleration, VmProgram,
    VmSettings, VmUses, rewrite_loopback_urls,
};
pub use state::{
    ExitInfo, ExitSource, LeaseInfo, Phase, STATE_DIR_ENV, StateDir, StateLock, VmClaim, VmEntry, VmImage, VmRecord,
    VmmInfo,
};

/// The root README's Rust snippets, compiled (and run, unless `no_run`) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
