//! The one error type of kiln-oci.

use std::path::PathBuf;

use crate::digest::Digest;

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

    // Sources, digests and the store (digest.rs, source.rs, layout.rs, archive.rs, store.rs).
    #[error("Invalid digest {digest:?}: {reason}")]
    InvalidDigest { digest: String, reason: String },
    #[error("Invalid image source {spec:?}: {reason}")]
    InvalidSource { spec: String, reason: String },
    #[error("{blob} does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { blob: String, expected: Digest, actual: Digest },
    #[error("{blob} is {actual} bytes, but its descriptor says {expected}")]
    SizeMismatch { blob: String, expected: u64, actual: String },
    #[error("{layer} decompresses to {actual}, but the image config's diff_id is {expected}")]
    DiffIdMismatch { layer: String, expected: Digest, actual: Digest },
    #[error("Cannot read {blob}")]
    ReadBlob {
        blob: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot decompress {blob}")]
    Decompress {
        blob: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is larger than {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error("Cannot parse {what}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} has media type {media_type:?}, which kiln cannot use")]
    UnsupportedMediaType { what: String, media_type: String },
    #[error("Invalid image {what}: {reason}")]
    InvalidImage { what: String, reason: String },
    #[error("{image} has no linux/amd64 image; it offers {offered}")]
    NoMatchingPlatform { image: String, offered: String },
    #[error("{image} has no tag {tag:?}; its tags: {available}")]
    TagNotFound { image: String, tag: String, available: String },
    #[error("{image} holds {count} images; name one with :TAG (its tags: {available})")]
    AmbiguousImage { image: String, count: usize, available: String },
    #[error("{image} does not hold blob {digest}")]
    BlobNotFound { image: String, digest: Digest },
    #[error("Invalid archive {}: {reason}", path.display())]
    InvalidArchive { path: PathBuf, reason: String },
    #[error("Cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The image store holds no image {digest}; pull it again")]
    NotInStore { digest: Digest },
    /// A layer tar holds an entry that is malformed or hostile.
    #[error("Image {image}, layer {layer}: entry {entry:?}: {reason}")]
    BadLayerEntry { image: String, layer: String, entry: String, reason: String },
    /// A layer entry that the ext4 writer cannot hold.
    #[error("Image {image}, layer {layer}: entry {entry:?} cannot go into an ext4 filesystem")]
    LayerEntryForExt4 {
        image: String,
        layer: String,
        entry: String,
        // Boxed: the writer's error is large, and every Result here carries it.
        #[source]
        source: Box<kiln_imagefmt::Error>,
    },
    /// A layer tar could not be read.
    #[error("Image {image}, layer {layer}: cannot read {}", path.display())]
    ReadLayer {
        image: String,
        layer: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },

    // The registry client (registry.rs, auth.rs).
    /// A Docker `config.json` could not be read or parsed.
    #[error("Registry credentials in {path}: {reason}")]
    DockerConfig { path: PathBuf, reason: String },

    /// A CA certificate file for registries could not be read.
    #[error("CA certificate file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },

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
