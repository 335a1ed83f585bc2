//! kiln-oci: OCI container images, made ready for a microVM.
//!
//! It reads images from an OCI image layout, an OCI archive, a `docker
//! save` archive or a registry (the OCI distribution API), verifying every
//! blob against its sha256 digest; picks linux/amd64 from an index; reads
//! layer tars (gzip, zstd or plain) with full OCI semantics (whiteouts,
//! opaque directories, hard links, PAX and GNU long names, xattrs, device
//! nodes), refusing hostile entries; and turns layers into ext4 trees for
//! [`kiln_imagefmt`] to write, one filesystem per layer chain, stacked by
//! overlayfs in the guest.
//!
//! It is not a container runtime: it starts no process and mounts
//! nothing. The guest side (`kiln-init`) mounts and runs what it makes,
//! and the `kiln` binary decides where the cache lives.

mod archive;
mod auth;
mod config;
mod digest;
mod error;
mod image;
mod layers;
mod layout;
mod registry;
mod source;
mod space;
mod store;
mod tar;

pub use config::{Compression, MANIFEST_MEDIA_TYPES};
pub use digest::{Digest, chain_ids};
pub use error::{Error, RegistryErrorKind, Result};
pub use image::{Image, Layer, RuntimeConfig};
pub use layers::{LayerTar, layer_tree};
pub use registry::{RegistryClient, RegistryClientBuilder, RegistrySource};
pub use source::{BlobSource, Fetched, ImageSource, RegistryReference};
pub use store::{BlobProgress, GcOptions, GcReport, Store, StoreGuard};

/// The layer reader over bytes in memory and the registry client's
/// readers, for the fuzz targets only.
#[doc(hidden)]
pub mod fuzzing {
    use crate::layers::{BytesLayer, build};
    pub use crate::registry::fuzzing::*;

    /// [`layer_tree`](crate::layer_tree) over layer tars held in memory
    /// (labelled by index); file data is copied into the tree.
    pub fn layer_tree_from_bytes(
        image: &str,
        lower: &[&[u8]],
        upper: &[&[u8]],
    ) -> crate::Result<kiln_imagefmt::Ext4Tree> {
        fn layers<'b>(from: usize, tars: &[&'b [u8]]) -> Vec<BytesLayer<'b>> {
            let layer = |(index, bytes): (usize, &&'b [u8])| BytesLayer { bytes, label: format!("#{}", from + index) };
            tars.iter().enumerate().map(layer).collect()
        }
        let (lower, upper) = (layers(0, lower), layers(lower.len(), upper));
        build(image, &lower, &upper)
    }
}
