//! An OCI image layout (image-spec image-layout.md): `oci-layout`,
//! `index.json`, `blobs/sha256/<hex>`. The same reading serves a layout
//! directory and an `oci-archive` (a tar of one), through [`LayoutFiles`].

use std::io::{BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::{Descriptor, Index, REF_NAME, parse_json};
use crate::digest::{Digest, read_verified};
use crate::error::{Error, Result};
use crate::source::{BlobSource, Fetched, MANIFEST_LIMIT};

/// The files of a layout, wherever they are kept. Paths are relative and
/// made by kiln (`index.json`, `blobs/sha256/<hex>`), never from the image.
pub(crate) trait LayoutFiles {
    /// Opens file `path` of the layout.
    fn open(&self, path: &str) -> Result<Box<dyn Read + '_>>;
}

/// A layout directory on disk.
#[derive(Debug)]
pub(crate) struct Directory(pub(crate) PathBuf);

impl LayoutFiles for Directory {
    fn open(&self, path: &str) -> Result<Box<dyn Read + '_>> {
        let full = self.0.join(path);
        // Non-blocking, so a FIFO or a device in the layout's place of a blob
        // is refused rather than read forever; a regular file reads as usual.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(&full)
            .map_err(|source| Error::Read { path: full.clone(), source })?;
        let is_file = file.metadata().map_err(|source| Error::Read { path: full.clone(), source })?.is_file();
        if !is_file {
            let source = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
            return Err(Error::Read { path: full, source });
        }
        Ok(Box::new(BufReader::with_capacity(64 * 1024, file)))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutMarker {
    image_layout_version: String,
}

/// An OCI layout opened for one tag: its index.json read and the tag
/// looked up once, at open.
#[derive(Debug)]
pub(crate) struct LayoutReader<F> {
    files: F,
    name: String,
    chosen: Descriptor,
}

/// A layout directory (`oci:DIR[:TAG]`).
pub(crate) type Layout = LayoutReader<Directory>;

impl Layout {
    pub(crate) fn open(dir: PathBuf, tag: Option<String>, name: String) -> Result<Layout> {
        LayoutReader::new(Directory(dir), tag.as_deref(), name)
    }
}

impl<F: LayoutFiles> LayoutReader<F> {
    /// Checks `oci-layout` and picks the index.json entry for `tag` (by
    /// its `org.opencontainers.image.ref.name`); with no tag the index must
    /// hold exactly one entry.
    pub(crate) fn new(files: F, tag: Option<&str>, name: String) -> Result<LayoutReader<F>> {
        let marker_bytes = read_verified(files.open("oci-layout")?, &format!("oci-layout of {name}"), None, 4096)?;
        let marker: LayoutMarker = parse_json(&marker_bytes, &format!("oci-layout of {name}"))?;
        if !marker.image_layout_version.starts_with("1.") {
            return Err(Error::InvalidImage {
                what: name,
                reason: format!("imageLayoutVersion {:?} is not 1.x", marker.image_layout_version),
            });
        }
        let what = format!("index.json of {name}");
        let index: Index = parse_json(&read_verified(files.open("index.json")?, &what, None, MANIFEST_LIMIT)?, &what)?;
        let chosen = choose_entry(&index, tag, &name)?;
        Ok(LayoutReader { files, name, chosen })
    }

    fn blob_path(digest: &Digest) -> String {
        format!("blobs/sha256/{}", digest.hex())
    }
}

/// The entry of a layout's index.json that `tag` names.
fn choose_entry(index: &Index, tag: Option<&str>, name: &str) -> Result<Descriptor> {
    let tags = || {
        let names: Vec<&str> =
            index.manifests.iter().filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str)).collect();
        if names.is_empty() { "none".to_owned() } else { names.join(", ") }
    };
    match tag {
        Some(tag) => {
            let tagged: Vec<&Descriptor> =
                index.manifests.iter().filter(|d| d.annotations.get(REF_NAME).is_some_and(|t| t == tag)).collect();
            match tagged.as_slice() {
                [] => Err(Error::TagNotFound { image: name.to_owned(), tag: tag.to_owned(), available: tags() }),
                [one] => Ok((*one).clone()),
                // One tag on several platform manifests: pick as from an index.
                _ => {
                    let sub = Index { manifests: tagged.into_iter().cloned().collect() };
                    crate::source::pick_platform(&sub, name).cloned()
                }
            }
        }
        None => match index.manifests.as_slice() {
            [one] => Ok(one.clone()),
            [] => {
                Err(Error::InvalidImage { what: name.to_owned(), reason: "its index.json lists no image".to_owned() })
            }
            many => Err(Error::AmbiguousImage { image: name.to_owned(), count: many.len(), available: tags() }),
        },
    }
}

impl<F: LayoutFiles> BlobSource for LayoutReader<F> {
    fn name(&self) -> &str {
        &self.name
    }

    fn root(&self) -> Result<Fetched> {
        let what = format!("manifest {} of {}", self.chosen.digest, self.name);
        let bytes = read_verified(self.blob(&self.chosen.digest)?, &what, None, MANIFEST_LIMIT)?;
        let media_type = (!self.chosen.media_type.is_empty()).then(|| self.chosen.media_type.clone());
        Ok(Fetched::new(bytes, media_type).expecting(self.chosen.digest, Some(self.chosen.size)))
    }

    fn manifest(&self, digest: &Digest) -> Result<Fetched> {
        let what = format!("manifest {digest} of {}", self.name);
        Ok(Fetched::new(read_verified(self.blob(digest)?, &what, None, MANIFEST_LIMIT)?, None))
    }

    fn blob(&self, digest: &Digest) -> Result<Box<dyn Read + '_>> {
        self.files.open(&Self::blob_path(digest)).map_err(|error| match error {
            Error::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Error::BlobNotFound { image: self.name.clone(), digest: *digest }
            }
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, Option<&str>)]) -> Index {
        Index {
            manifests: entries
                .iter()
                .map(|(content, tag)| Descriptor {
                    media_type: crate::config::OCI_MANIFEST.to_owned(),
                    digest: Digest::of(content.as_bytes()),
                    size: content.len() as u64,
                    platform: None,
                    annotations: tag.map(|t| (REF_NAME.to_owned(), t.to_owned())).into_iter().collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn layout_tag_picks_its_entry_and_a_missing_tag_lists_the_tags() {
        let two = index(&[("a", Some("one")), ("b", Some("two"))]);
        assert_eq!(choose_entry(&two, Some("two"), "oci:L").unwrap().digest, Digest::of(b"b"));
        let error = choose_entry(&two, Some("three"), "oci:L").unwrap_err().to_string();
        assert_eq!(error, "oci:L has no tag \"three\"; its tags: one, two");
        let error = choose_entry(&two, None, "oci:L").unwrap_err().to_string();
        assert_eq!(error, "oci:L holds 2 images; name one with :TAG (its tags: one, two)");
        let one = index(&[("a", None)]);
        assert_eq!(choose_entry(&one, None, "oci:L").unwrap().digest, Digest::of(b"a"));
    }

    #[test]
    fn a_fifo_in_a_layouts_place_of_a_blob_is_refused_not_read_forever() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("blob");
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, rustix::fs::Mode::from(0o644), 0)
            .unwrap();
        let error = Directory(dir.path().to_path_buf()).open("blob").err().unwrap().to_string();
        assert_eq!(error, format!("Cannot read {}", fifo.display()));
        assert!(Directory(dir.path().to_path_buf()).open("missing").is_err());
    }
}
