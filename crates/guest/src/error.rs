//! The crate's one error type.

/// Everything kiln-guest's readers refuse. Messages name the thing at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("Not a bzImage kernel: {reason}")]
    NotBzImage { reason: String },
    #[error("The kernel payload is compressed with {compression}, which kiln cannot decompress")]
    UnsupportedCompression { compression: &'static str },
    #[error("Cannot decompress the kernel payload ({compression}): {reason}")]
    Decompress { compression: &'static str, reason: String },
    #[error("The decompressed kernel is not an ELF file (it starts with {start:02x?})")]
    NotElfKernel { start: Vec<u8> },
    #[error("The decompressed kernel would exceed {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("Not a kernel module: {reason}")]
    NotModule { reason: String },
    #[error("Module {module:?} is not among the modules given")]
    ModuleNotFound { module: String },
    #[error("Module {module:?} depends on {dependency:?}, which is not among the modules given")]
    MissingModule { module: String, dependency: String },
    #[error("Modules depend on each other in a cycle: {cycle}")]
    ModuleCycle { cycle: String },
    #[error("Invalid {file}: {reason}")]
    Seed { file: &'static str, reason: String },
    #[error("Invalid netlink reply: {reason}")]
    Netlink { reason: String },
    #[error("Invalid control line {line:?}: {reason}")]
    Control { line: String, reason: String },
    /// `line` 0: the config as a whole (a field's value), not one line.
    #[error("Invalid container config{}: {reason}", line_suffix(*.line))]
    ContainerConfig { line: usize, reason: String },
    #[error("Stop signal {value:?} is not a signal: a name (SIGQUIT, QUIT, quit, SIGRTMIN+3) or a number from 1 to 64")]
    StopSignal { value: String },
    #[error("Cannot run the container as user {user:?}: {reason}")]
    User { user: String, reason: String },
}

fn line_suffix(line: usize) -> String {
    if line == 0 { String::new() } else { format!(", line {line}") }
}

/// `Result` with kiln-guest's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
