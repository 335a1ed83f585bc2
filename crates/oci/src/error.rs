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
}
