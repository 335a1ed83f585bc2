//! The image as the store keeps it: [`Image`], its [`Layer`]s and
//! [`RuntimeConfig`], and the JSON record they are saved as.

use serde::{Deserialize, Serialize};

use crate::config::Compression;
use crate::digest::{Digest, chain_ids};

/// The version of the image record format; a record of another version is
/// treated as absent (the image is pulled again). 2: the image's
/// `StopSignal` is kept (a version-1 record never says, so it would read
/// as SIGTERM for an image that names another).
pub(crate) const RECORD_VERSION: u32 = 2;

/// A layer of an image: its blob and what it decompresses to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub(crate) digest: Digest,
    pub(crate) diff_id: Digest,
    pub(crate) media_type: String,
    pub(crate) size: u64,
}

impl Layer {
    /// The digest of the (compressed) blob.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }
    /// The digest of the decompressed tar: the layer tar's name in the store.
    pub fn diff_id(&self) -> &Digest {
        &self.diff_id
    }
    /// The blob's media type as the manifest gave it.
    pub fn media_type(&self) -> &str {
        &self.media_type
    }
    /// The blob's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// How the blob is compressed.
    pub fn compression(&self) -> Option<Compression> {
        Compression::of_media_type(&self.media_type)
    }
}

/// The runtime part of an image config: what `docker run` uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    pub(crate) entrypoint: Vec<String>,
    pub(crate) cmd: Vec<String>,
    pub(crate) env: Vec<String>,
    pub(crate) working_dir: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) stop_signal: Option<String>,
}

impl RuntimeConfig {
    /// `Entrypoint`, empty if the image has none.
    pub fn entrypoint(&self) -> &[String] {
        &self.entrypoint
    }
    /// `Cmd`, empty if the image has none.
    pub fn cmd(&self) -> &[String] {
        &self.cmd
    }
    /// `Env`, `NAME=VALUE` entries in the image's order.
    pub fn env(&self) -> &[String] {
        &self.env
    }
    /// `WorkingDir`, if set and not empty.
    pub fn working_dir(&self) -> Option<&str> {
        self.working_dir.as_deref()
    }
    /// `User` (`uid[:gid]` or names), if set and not empty.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
    /// `StopSignal` as the image wrote it (`SIGQUIT`, `3`), if set and not
    /// empty; not checked here (kiln-guest's `StopSignal::parse` reads it).
    pub fn stop_signal(&self) -> Option<&str> {
        self.stop_signal.as_deref()
    }
}

/// An image in the store: its digests, runtime config and layers, base first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub(crate) source: String,
    pub(crate) manifest_digest: Digest,
    pub(crate) config_digest: Digest,
    pub(crate) runtime: RuntimeConfig,
    pub(crate) layers: Vec<Layer>,
}

impl Image {
    /// The source it was first pulled from, as the user wrote it.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// The digest of its manifest (for a `docker save` archive, of the
    /// manifest kiln made for it): the image's identity in the store.
    pub fn manifest_digest(&self) -> &Digest {
        &self.manifest_digest
    }
    /// The digest of its config.
    pub fn config_digest(&self) -> &Digest {
        &self.config_digest
    }
    /// Entrypoint, cmd, env, working dir, user and stop signal.
    pub fn runtime(&self) -> &RuntimeConfig {
        &self.runtime
    }
    /// Its layers, base first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }
    /// The ChainID of each layer's chain (layers 0..=n), base first.
    pub fn chain_ids(&self) -> Vec<Digest> {
        chain_ids(&self.layers.iter().map(|l| l.diff_id).collect::<Vec<_>>())
    }
}

/// The on-disk image record, `images/sha256/<manifest hex>.json`.
#[derive(Serialize, Deserialize)]
pub(crate) struct ImageRecord {
    pub(crate) version: u32,
    source: String,
    pub(crate) manifest: Digest,
    config: Digest,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    working_dir: Option<String>,
    user: Option<String>,
    /// Absent in a record written before kiln carried it: read as none
    /// (SIGTERM). The version is not bumped for it, since gc would sweep a
    /// record of another version, and with it the disks of running VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stop_signal: Option<String>,
    layers: Vec<LayerRecord>,
}

#[derive(Serialize, Deserialize)]
struct LayerRecord {
    digest: Digest,
    diff_id: Digest,
    media_type: String,
    size: u64,
}

impl From<&Image> for ImageRecord {
    fn from(image: &Image) -> ImageRecord {
        let runtime = image.runtime.clone();
        ImageRecord {
            version: RECORD_VERSION,
            source: image.source.clone(),
            manifest: image.manifest_digest,
            config: image.config_digest,
            entrypoint: runtime.entrypoint,
            cmd: runtime.cmd,
            env: runtime.env,
            working_dir: runtime.working_dir,
            user: runtime.user,
            stop_signal: runtime.stop_signal,
            layers: image
                .layers
                .iter()
                .map(|l| LayerRecord {
                    digest: l.digest,
                    diff_id: l.diff_id,
                    media_type: l.media_type.clone(),
                    size: l.size,
                })
                .collect(),
        }
    }
}

impl From<ImageRecord> for Image {
    fn from(record: ImageRecord) -> Image {
        Image {
            source: record.source,
            manifest_digest: record.manifest,
            config_digest: record.config,
            runtime: RuntimeConfig {
                entrypoint: record.entrypoint,
                cmd: record.cmd,
                env: record.env,
                working_dir: record.working_dir,
                user: record.user,
                stop_signal: record.stop_signal,
            },
            layers: record
                .layers
                .into_iter()
                .map(|l| Layer { digest: l.digest, diff_id: l.diff_id, media_type: l.media_type, size: l.size })
                .collect(),
        }
    }
}
