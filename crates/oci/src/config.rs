//! The JSON documents of OCI and Docker images, as far as kiln reads them:
//! descriptors, indexes (and Docker manifest lists), manifests (and Docker
//! v2 schema 2 manifests), image configs and a `docker save` archive's
//! `manifest.json`. Unknown fields are ignored, as the image-spec asks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub(crate) const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub(crate) const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub(crate) const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The annotation a layout's index.json names a tag with.
pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The manifest media types a registry is asked for (`Accept`), best first.
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST];

/// How a layer blob is compressed, from its media type.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (the common case).
    Gzip,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// The compression of a layer of media type `media_type` (OCI, OCI
    /// non-distributable and Docker types), or `None` for a type that is not a layer.
    pub(crate) fn of_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            OCI_LAYER_TAR
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            OCI_LAYER_GZIP
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
            OCI_LAYER_ZSTD
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// The OCI media type of a layer compressed this way.
    pub(crate) fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => OCI_LAYER_TAR,
            Compression::Gzip => OCI_LAYER_GZIP,
            Compression::Zstd => OCI_LAYER_ZSTD,
        }
    }

    /// The compression a blob's first bytes show (gzip and zstd magic), for
    /// a `docker save` archive, whose layers carry no media type.
    pub(crate) fn sniff(first_bytes: &[u8]) -> Compression {
        if first_bytes.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if first_bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// An OCI content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub(crate) media_type: String,
    pub(crate) digest: Digest,
    pub(crate) size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: BTreeMap<String, String>,
}

/// The platform of an index entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) variant: Option<String>,
}

/// An OCI image index or a Docker manifest list (the same shape).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Index {
    #[serde(default)]
    pub(crate) manifests: Vec<Descriptor>,
}

/// An OCI image manifest or a Docker v2 schema 2 manifest (the same shape).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    pub(crate) schema_version: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) media_type: String,
    pub(crate) config: Descriptor,
    pub(crate) layers: Vec<Descriptor>,
}

/// The parts of an image config kiln uses.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ImageConfig {
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
    #[serde(default)]
    pub(crate) config: Option<ContainerConfig>,
    pub(crate) rootfs: RootFs,
}

/// The runtime part of an image config (`config` in the JSON).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ContainerConfig {
    #[serde(default)]
    pub(crate) user: Option<String>,
    #[serde(default)]
    pub(crate) env: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) cmd: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) working_dir: Option<String>,
    /// As the image gives it (`SIGQUIT`, `3`): kiln-guest's `StopSignal`
    /// reads it where it is used, as `docker run` does.
    #[serde(default)]
    pub(crate) stop_signal: Option<String>,
}

/// `rootfs` of an image config: the diff_ids of the layers, base first.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RootFs {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) diff_ids: Vec<Digest>,
}

/// One image of a `docker save` archive's `manifest.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct DockerArchiveEntry {
    pub(crate) config: String,
    #[serde(default)]
    pub(crate) repo_tags: Option<Vec<String>>,
    pub(crate) layers: Vec<String>,
}

/// What a manifest-ish document is, from its media type or, when the
/// source gave none, its own `mediaType` field and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ManifestKind {
    Index,
    Manifest,
}

/// Just enough of a document to tell an index from a manifest.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Shape {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    config: Option<serde::de::IgnoredAny>,
}

impl ManifestKind {
    /// Classifies `bytes`; `media_type` is what the source said (a
    /// registry's Content-Type, a descriptor's mediaType), if anything.
    pub(crate) fn of(bytes: &[u8], media_type: Option<&str>, what: &str) -> Result<ManifestKind> {
        let shape: Shape = parse_json(bytes, what)?;
        let declared = media_type.filter(|t| !t.is_empty()).or(shape.media_type.as_deref());
        match declared {
            Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => Ok(ManifestKind::Index),
            Some(OCI_MANIFEST | DOCKER_MANIFEST) => Ok(ManifestKind::Manifest),
            Some(other) => Err(Error::UnsupportedMediaType { what: what.to_owned(), media_type: other.to_owned() }),
            None if shape.manifests.is_some() => Ok(ManifestKind::Index),
            None if shape.config.is_some() => Ok(ManifestKind::Manifest),
            None => Err(Error::InvalidImage {
                what: what.to_owned(),
                reason: "neither an index (no \"manifests\") nor a manifest (no \"config\")".to_owned(),
            }),
        }
    }
}

/// Parses JSON document `what`, naming it in the error.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json { what: what.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_compression_is_read_from_oci_and_docker_media_types() {
        assert_eq!(Compression::of_media_type(OCI_LAYER_GZIP), Some(Compression::Gzip));
        assert_eq!(
            Compression::of_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(Compression::of_media_type(OCI_LAYER_ZSTD), Some(Compression::Zstd));
        assert_eq!(Compression::of_media_type(OCI_LAYER_TAR), Some(Compression::None));
        assert_eq!(Compression::of_media_type("application/vnd.oci.image.config.v1+json"), None);
    }

    #[test]
    fn manifest_kind_comes_from_the_declared_type_then_the_shape() {
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(ManifestKind::of(index, None, "x").unwrap(), ManifestKind::Index);
        let manifest = br#"{"schemaVersion":2,"config":{}}"#;
        assert_eq!(ManifestKind::of(manifest, None, "x").unwrap(), ManifestKind::Manifest);
        assert_eq!(ManifestKind::of(manifest, Some(DOCKER_MANIFEST_LIST), "x").unwrap(), ManifestKind::Index);
        let error = ManifestKind::of(manifest, Some("text/plain"), "the manifest of y").unwrap_err().to_string();
        assert!(error.contains("text/plain") && error.contains("the manifest of y"), "{error}");
    }

    #[test]
    fn image_config_carries_the_stop_signal_as_written() {
        let config = |json: &str| -> ImageConfig { parse_json(json.as_bytes(), "config").unwrap() };
        let with =
            config(r#"{"config":{"StopSignal":"SIGQUIT","Cmd":["nginx"]},"rootfs":{"type":"layers","diff_ids":[]}}"#);
        assert_eq!(with.config.unwrap().stop_signal.as_deref(), Some("SIGQUIT"));
        let without = config(r#"{"config":{"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":[]}}"#);
        assert_eq!(without.config.unwrap().stop_signal, None);
        let error = parse_json::<ImageConfig>(
            br#"{"config":{"StopSignal":3},"rootfs":{"type":"layers","diff_ids":[]}}"#,
            "the config of z",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("the config of z"), "a StopSignal that is not a string: {error}");
    }
}
