use std::path::PathBuf;
use std::time::Duration;

/// The result type of every fallible kiln-vmm call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The [`crate::VmPlan`] or an argument is invalid; nothing was started.
    InvalidInput,
    /// The VMM binary is not installed or cannot be executed.
    BinaryMissing,
    /// The VMM did not answer before a deadline (it was killed).
    Timeout,
    /// The VMM process exited when it should have been running.
    VmmExited,
    /// The VMM answered with an error (for cloud-hypervisor: a non-2xx status).
    Api,
    /// The VMM spoke something kiln cannot read.
    Protocol,
    /// The operation is not possible in the VM's current state.
    InvalidState,
    /// A file, socket or process operation failed.
    Io,
}

/// Every error kiln-vmm returns. Messages name the field, file or endpoint at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A [`crate::VmPlan`] field or a launch option is invalid.
    #[error("Invalid VM plan: `{field}` {reason}")]
    InvalidPlan { field: String, reason: String },
    /// The VMM binary cannot be found or executed.
    #[error("Cannot start `{}`; install it or point kiln at it", binary.display())]
    BinaryMissing { binary: PathBuf, source: std::io::Error },
    /// A deadline passed while waiting for the VMM.
    #[error("{what} did not finish within {deadline:?}")]
    Timeout { what: String, deadline: Duration },
    /// The VMM process exited while kiln needed it.
    #[error("The VMM exited during {during} ({status}); last lines of its log:\n{log_tail}")]
    VmmExited { during: String, status: String, log_tail: String },
    /// cloud-hypervisor answered a request with an error status; `body` is
    /// its response body, verbatim (a JSON array of strings).
    #[error("cloud-hypervisor refused {endpoint} (HTTP {status}): {body}")]
    Api { endpoint: String, status: u16, body: String },
    /// QEMU answered a QMP command with an error.
    #[error("QEMU refused QMP `{command}`: {class}: {desc}")]
    Qmp { command: String, class: String, desc: String },
    /// The VMM sent something that is not valid for its protocol.
    #[error("Unexpected answer from the VMM to {what}: {detail}")]
    Protocol { what: String, detail: String },
    /// The operation does not fit the VM's state.
    #[error("Cannot {operation}: the VM is {state}")]
    InvalidState { operation: String, state: String },
    /// A file, socket or process operation failed.
    #[error("{what} failed on {}", path.display())]
    Io { what: String, path: PathBuf, source: std::io::Error },
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidPlan { .. } => ErrorKind::InvalidInput,
            Error::BinaryMissing { .. } => ErrorKind::BinaryMissing,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::VmmExited { .. } => ErrorKind::VmmExited,
            Error::Api { .. } | Error::Qmp { .. } => ErrorKind::Api,
            Error::Protocol { .. } => ErrorKind::Protocol,
            Error::InvalidState { .. } => ErrorKind::InvalidState,
            Error::Io { .. } => ErrorKind::Io,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::InvalidPlan { field: field.into(), reason: reason.into() }
    }

    pub(crate) fn io(what: impl Into<String>, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io { what: what.into(), path: path.into(), source }
    }

    pub(crate) fn protocol(what: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::Protocol { what: what.into(), detail: detail.into() }
    }
}
