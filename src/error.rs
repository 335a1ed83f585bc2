/// The result type of every fallible kiln library call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is, for callers that branch on it
/// (exit codes, retries, "run `kiln gc` first" hints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The spec, a size, a launch argument or another input is invalid.
    InvalidInput,
    /// The spec is valid but asks what a kiln VM cannot give (a GPU without
    /// a device to pass through, a confidential VM).
    Unsupported,
    /// A file or program the run needs is missing (guest files, the
    /// service binary, the VMM).
    NotFound,
    /// The VM is running, or its state is held by another kiln process.
    Busy,
    /// What an earlier run left must be released first (`kiln gc`).
    NeedsGc,
    /// kiln's state directory cannot be found, read or written, or is corrupt.
    State,
    /// Reading or writing an input, image or channel failed.
    Io,
    /// The VMM failed (see [`kiln_vmm::ErrorKind`] through the source).
    Vmm,
    /// Host networking (leases, taps, firewall) failed.
    Network,
    /// An image could not be written.
    Image,
    /// The Kubernetes mapping failed (only with the `k8s` feature; the kind
    /// exists in both builds so that matches on it need no cfg).
    Kubernetes,
}

/// Every error the kiln library returns. Messages name the value at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("Invalid size {input:?}: {reason}")]
    InvalidSize { input: String, reason: String },
    #[error("The launch program {program:?} {reason}")]
    InvalidProgram { program: String, reason: &'static str },
    #[error("Argument {index} ({arg:?}) contains a NUL byte, which exec cannot pass")]
    NulInArgument { index: usize, arg: String },
    #[error("Environment variable {name} contains a NUL byte, which exec cannot pass")]
    NulInEnvValue { name: String },
    #[error("Invalid environment variable name {name:?}: {reason}")]
    InvalidEnvName { name: String, reason: &'static str },
    #[error("Environment variable {name} is given twice")]
    DuplicateEnv { name: String },
    #[error("Invalid service disk tree name {name:?}: {reason}")]
    InvalidTreeName { name: String, reason: &'static str },
    #[error("Service disk tree {name:?} is given twice (FAT ignores case)")]
    DuplicateTree { name: String },
    #[error("Service disk tree {name:?} must be a directory, but {} is not", source_path.display())]
    TreeNotADirectory { name: String, source_path: std::path::PathBuf },
    #[error("Spec {}: {message}", path.display())]
    Spec { path: std::path::PathBuf, message: String },
    #[error("Cannot read spec {}", path.display())]
    SpecRead { path: std::path::PathBuf, source: std::io::Error },
    #[error("Cannot tell where kiln's state lives: set KILN_STATE_DIR or HOME")]
    StateDirUnknown,
    #[error("State I/O failed on {}", path.display())]
    StateIo { path: std::path::PathBuf, source: std::io::Error },
    #[error("State file {} is corrupt: {reason}", path.display())]
    StateCorrupt { path: std::path::PathBuf, reason: String },
    #[error("Waited {seconds} s for {}, which another kiln gc or kiln run holds; is a kiln process stuck?", path.display())]
    StateLockTimeout { path: std::path::PathBuf, seconds: u64 },
    #[error(
        "Data disk {} is {} but resources.storage asks for {}; kiln does not resize data disks: set storage back, or move the disk away to have a new one made",
        path.display(), crate::error::show_bytes(*disk), crate::error::show_bytes(*storage)
    )]
    DataDiskSizeChanged { path: std::path::PathBuf, disk: u64, storage: u64 },
    #[error("resources.storage_seed must be a directory, but {} is not", path.display())]
    StorageSeedNotADirectory { path: std::path::PathBuf },
    #[error(
        "Data disk {} holds neither an ext2/3/4 filesystem nor zeros; kiln formats only a disk it made blank: move it away to start with a new one",
        path.display()
    )]
    DataDiskForeign { path: std::path::PathBuf },
    #[error("Cannot make data disk {} from resources.storage and resources.storage_seed", path.display())]
    DataDisk { path: std::path::PathBuf, source: kiln_imagefmt::Error },
    #[error("VM `{name}` is already running{}", pid.map(|p| format!(" (kiln run pid {p})")).unwrap_or_default())]
    VmBusy { name: String, pid: Option<u32> },
    #[error("VM `{name}` was not stopped cleanly; run `kiln gc` to release what it held")]
    VmNeedsGc { name: String },
    #[error("The guest {what} {} does not exist; run `cargo xtask guest`, set KILN_GUEST_DIR, or name it in the spec's [guest]", path.display())]
    GuestFileMissing { what: &'static str, path: std::path::PathBuf },
    #[error("No VMM: `{binary}` is not on PATH (install qemu-system-x86, or see the README for cloud-hypervisor)")]
    NoVmm { binary: &'static str },
    #[error(
        "The spec cannot run as a VM: resources.gpu.policy is \"required\" but vm.vfio names no PCI device to pass through"
    )]
    GpuWithoutVfio,
    #[error(
        "The spec cannot run as a VM: confidentiality is \"tee-required\", but kiln starts no confidential VMs (SEV-SNP, TDX); run it on Kubernetes with a kata RuntimeClass"
    )]
    TeeRequired,
    #[error(
        "Spec {}: a pod of {containers} container(s) ([[container]]) is not yet run in a VM; only the [service] form is (render it with `kiln render --target k8s`)",
        path.display()
    )]
    PodNotInVm { path: std::path::PathBuf, containers: usize },
    #[error("The spec has neither service.binary nor service.image, one of which a VM needs")]
    NoBinary,
    #[error("Image {image} cannot run in a VM")]
    ContainerConfig { image: String, source: kiln_guest::Error },
    #[error(
        "service.image `{image}` is a local image source, which a Pod cannot pull: push it to a registry and name it there"
    )]
    K8sLocalImage { image: String },
    #[error("The spec has no service.image, which Kubernetes needs (service.binary is for VMs)")]
    NoImage,
    #[error("Container `{container}` has no image, which Kubernetes needs (a binary is for VMs)")]
    K8sContainerNoImage { container: String },
    #[error(
        "{setter} sets `{key}` to `{spec}`, but the Pod's image is pinned to {manifest}, the linux/amd64 manifest kiln's image store holds, which needs `{key}` = `{pinned}`"
    )]
    K8sPinnedPlatform { setter: String, key: String, spec: String, pinned: String, manifest: String },
    #[error("service.files.{tree} cannot go into a Pod: {why}")]
    K8sFiles { tree: String, why: String },
    #[error("Kubernetes defaults {}: {message}", path.display())]
    K8sDefaults { path: std::path::PathBuf, message: String },
    #[cfg(feature = "k8s")]
    #[error(transparent)]
    K8s(#[from] kiln_k8s::Error),
    #[error("The service binary {} does not exist", path.display())]
    BinaryMissing { path: std::path::PathBuf },
    #[error("Cannot read or write {}", path.display())]
    InputIo { path: std::path::PathBuf, source: std::io::Error },
    #[error(transparent)]
    Vmm(kiln_vmm::Error),
    #[error("Cannot open the control channel to kiln-init at {}", path.display())]
    ControlChannel { path: std::path::PathBuf, source: std::io::Error },
    #[error("Host networking: {0}")]
    HostNet(String),
    #[error(transparent)]
    Net(#[from] kiln_net::Error),
    #[error(transparent)]
    Image(#[from] kiln_imagefmt::Error),
    #[error(transparent)]
    Oci(#[from] kiln_oci::Error),
}

/// `16777216 bytes (16 MiB)`: exact, and readable.
pub(crate) fn show_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{b} bytes ({} GiB)", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{b} bytes ({} MiB)", b >> 20),
        b => format!("{b} bytes"),
    }
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidSize { .. }
            | Error::InvalidProgram { .. }
            | Error::NulInArgument { .. }
            | Error::NulInEnvValue { .. }
            | Error::InvalidEnvName { .. }
            | Error::DuplicateEnv { .. }
            | Error::InvalidTreeName { .. }
            | Error::DuplicateTree { .. }
            | Error::TreeNotADirectory { .. }
            | Error::Spec { .. }
            | Error::DataDiskSizeChanged { .. }
            | Error::StorageSeedNotADirectory { .. }
            | Error::DataDiskForeign { .. }
            | Error::NoBinary
            | Error::NoImage
            | Error::K8sContainerNoImage { .. }
            | Error::K8sLocalImage { .. }
            | Error::K8sPinnedPlatform { .. }
            | Error::ContainerConfig { .. }
            | Error::K8sFiles { .. }
            | Error::K8sDefaults { .. } => ErrorKind::InvalidInput,
            Error::GpuWithoutVfio | Error::TeeRequired | Error::PodNotInVm { .. } => ErrorKind::Unsupported,
            Error::SpecRead { .. } | Error::InputIo { .. } | Error::ControlChannel { .. } => ErrorKind::Io,
            Error::GuestFileMissing { .. } | Error::NoVmm { .. } | Error::BinaryMissing { .. } => ErrorKind::NotFound,
            Error::StateDirUnknown | Error::StateIo { .. } | Error::StateCorrupt { .. } => ErrorKind::State,
            Error::StateLockTimeout { .. } | Error::VmBusy { .. } => ErrorKind::Busy,
            Error::VmNeedsGc { .. } => ErrorKind::NeedsGc,
            Error::Vmm(_) => ErrorKind::Vmm,
            Error::HostNet(_) | Error::Net(_) => ErrorKind::Network,
            Error::Image(_) | Error::DataDisk { .. } | Error::Oci(_) => ErrorKind::Image,
            #[cfg(feature = "k8s")]
            Error::K8s(_) => ErrorKind::Kubernetes,
        }
    }

    pub(crate) fn state_io(path: &std::path::Path, source: std::io::Error) -> Error {
        Error::StateIo { path: path.to_path_buf(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::{Error, ErrorKind};

    #[test]
    fn errors_have_a_kind_callers_can_branch_on() {
        let cases = [
            (Error::VmBusy { name: "web".into(), pid: Some(7) }, ErrorKind::Busy),
            (Error::VmNeedsGc { name: "web".into() }, ErrorKind::NeedsGc),
            (Error::NoVmm { binary: "qemu-system-x86_64" }, ErrorKind::NotFound),
            (Error::TeeRequired, ErrorKind::Unsupported),
            (Error::InvalidSize { input: "1Q".into(), reason: "unknown unit".into() }, ErrorKind::InvalidInput),
            (Error::StateDirUnknown, ErrorKind::State),
        ];
        for (error, kind) in cases {
            assert_eq!(error.kind(), kind, "{error}");
        }
    }
}
