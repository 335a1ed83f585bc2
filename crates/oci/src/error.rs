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
}
