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
mod config;
mod digest;
mod error;
mod image;
mod layout;
mod source;
mod store;

pub use config::{Compression, MANIFEST_MEDIA_TYPES};
pub use digest::{Digest, chain_ids};
pub use error::{Error, Result};
pub use image::{Image, Layer, RuntimeConfig};
pub use source::{BlobSource, Fetched, ImageSource, RegistryReference};
pub use store::{BlobProgress, GcReport, Store, StoreGuard};
