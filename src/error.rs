/// The result type of every fallible kiln library call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error the kiln library returns. Messages name the value at fault.
#[derive(Debug, thiserror::Error)]
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
        "Data disk {} is {} but resources.storage asks for {}; kiln does not resize data disks: set storage back, or move the disk away to start with a blank one",
        path.display(), crate::error::show_bytes(*disk), crate::error::show_bytes(*storage)
    )]
    DataDiskSizeChanged { path: std::path::PathBuf, disk: u64, storage: u64 },
    #[error("VM `{name}` is already running{}", pid.map(|p| format!(" (kiln run pid {p})")).unwrap_or_default())]
    VmBusy { name: String, pid: Option<u32> },
    #[error("VM `{name}` was not stopped cleanly; run `kiln gc` to release what it held")]
    VmNeedsGc { name: String },
    #[error("The guest {what} {} does not exist; run `cargo xtask guest`, set KILN_GUEST_DIR, or name it in the spec's [guest]", path.display())]
    GuestFileMissing { what: &'static str, path: std::path::PathBuf },
    #[error("No VMM: `{binary}` is not on PATH (install qemu-system-x86, or see the README for cloud-hypervisor)")]
    NoVmm { binary: &'static str },
    #[error("The spec cannot run as a VM: {0}")]
    VmPolicy(String),
    #[error("The spec has no service.binary, which a VM needs")]
    NoBinary,
    #[error("The spec has no service.image, which Kubernetes needs (service.binary is for VMs)")]
    NoImage,
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
    pub(crate) fn state_io(path: &std::path::Path, source: std::io::Error) -> Error {
        Error::StateIo { path: path.to_path_buf(), source }
    }
}
