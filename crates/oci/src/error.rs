//! The one error type of kiln-oci.

/// The result type of every fallible kiln-oci call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error kiln-oci returns. Messages name the image, layer, entry or
/// file at fault.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing an image failed in kiln-imagefmt.
    #[error(transparent)]
    Image(#[from] kiln_imagefmt::Error),

    /// An image reference (`host[:port]/path[:tag][@digest]`) does not parse.
    #[error("Invalid image reference `{reference}`: {reason}")]
    BadReference { reference: String, reason: String },

    /// A Docker `config.json` could not be read or parsed.
    #[error("Registry credentials in {path}: {reason}")]
    DockerConfig { path: std::path::PathBuf, reason: String },

    /// A CA certificate file for registries could not be read.
    #[error("CA certificate file {path}: {reason}")]
    CaFile { path: std::path::PathBuf, reason: String },

    /// A registry (or its token endpoint) failed or refused a request.
    #[error("Registry {registry}, repository {repository}, {reference}: {message}")]
    Registry {
        registry: String,
        repository: String,
        /// The tag or digest asked for.
        reference: String,
        kind: RegistryErrorKind,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

/// What kind of registry failure an [`Error::Registry`] is, for callers
/// that branch on it.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryErrorKind {
    /// HTTP 401/403, or the token endpoint refused the credentials.
    Unauthorized,
    /// HTTP 404: no such repository, tag, manifest or blob.
    NotFound,
    /// The TLS handshake failed (an unknown CA, a wrong name, not TLS).
    Tls,
    /// The connection failed or broke.
    Transport,
    /// The registry answered something the API does not allow.
    Protocol,
    /// Any other HTTP status.
    Status,
}
