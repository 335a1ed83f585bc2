//! Image archives read in place: an `oci-archive` (a tar of an OCI layout)
//! and a `docker save` tar (`docker-archive`). The tar's headers are
//! indexed once; a blob is then a byte range of the archive, read without
//! unpacking anything. Entry names are only map keys here, never paths on
//! the host, so a hostile name cannot write anywhere.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::config::{
    Compression, DOCKER_CONFIG, Descriptor, DockerArchiveEntry, ImageConfig, Manifest, OCI_MANIFEST, parse_json,
};
use crate::digest::{Digest, read_verified};
use crate::error::{Error, Result};
use crate::layout::{LayoutFiles, LayoutReader};
use crate::source::{BlobSource, Fetched, MANIFEST_LIMIT};

/// The largest image config kiln reads (a config with a long history is
/// tens of KiB).
pub(crate) const CONFIG_LIMIT: u64 = 16 << 20;
/// The largest PAX or GNU long-name record kiln reads from an archive.
const META_LIMIT: u64 = 1 << 20;
/// How many symlinks a `docker save` path may pass through.
const SYMLINK_HOPS: usize = 8;

/// Where an entry's data lies in the archive.
#[derive(Debug, Clone, Copy)]
struct Extent {
    offset: u64,
    size: u64,
}

/// The regular files and symlinks of a tar, by normalised name.
#[derive(Debug)]
pub(crate) struct ArchiveFiles {
    path: PathBuf,
    files: HashMap<String, Extent>,
    symlinks: HashMap<String, String>,
}

impl ArchiveFiles {
    /// Reads every header of the tar at `path` (skipping the data).
    pub(crate) fn index(path: &Path) -> Result<ArchiveFiles> {
        let bad = |reason: String| Error::InvalidArchive { path: path.to_owned(), reason };
        let read_error = |source| Error::Read { path: path.to_owned(), source };
        let mut file = BufReader::new(File::open(path).map_err(read_error)?);
        let length = file.get_ref().metadata().map_err(read_error)?.len();
        let mut files = HashMap::new();
        let mut symlinks = HashMap::new();
        let mut offset = 0u64;
        let mut long_name: Option<String> = None;
        let mut long_link: Option<String> = None;
        let mut pax_path: Option<String> = None;
        let mut pax_size: Option<u64> = None;
        loop {
            if offset + 512 > length {
                return Err(bad(format!(
                    "it ends inside the header at byte {offset}; a tar ends with two zero blocks"
                )));
            }
            let mut header = [0u8; 512];
            file.seek(SeekFrom::Start(offset)).map_err(read_error)?;
            file.read_exact(&mut header).map_err(read_error)?;
            if offset == 0 && Compression::sniff(&header) != Compression::None {
                return Err(bad("it is compressed; kiln reads archives in place, so decompress it first".to_owned()));
            }
            if header.iter().all(|&b| b == 0) {
                break;
            }
            check_header_checksum(&header).map_err(|reason| bad(format!("header at byte {offset}: {reason}")))?;
            let header_size = parse_number(&header[124..136])
                .ok_or_else(|| bad(format!("header at byte {offset}: bad size field")))?;
            let size = pax_size.take().unwrap_or(header_size);
            let data = offset + 512;
            if data.checked_add(size).is_none_or(|end| end > length) {
                return Err(bad(format!("entry at byte {offset} claims {size} bytes, past the end of the archive")));
            }
            let kind = header[156];
            let read_meta = |file: &mut BufReader<File>| -> Result<Vec<u8>> {
                if size > META_LIMIT {
                    return Err(bad(format!("metadata entry at byte {offset} is {size} bytes (limit {META_LIMIT})")));
                }
                let mut bytes = vec![0u8; size as usize];
                file.seek(SeekFrom::Start(data)).map_err(read_error)?;
                file.read_exact(&mut bytes).map_err(read_error)?;
                Ok(bytes)
            };
            match kind {
                b'L' => long_name = Some(c_string(&read_meta(&mut file)?)),
                b'K' => long_link = Some(c_string(&read_meta(&mut file)?)),
                b'x' => {
                    let records = read_meta(&mut file)?;
                    for (key, value) in
                        pax_records(&records).map_err(|reason| bad(format!("PAX header at byte {offset}: {reason}")))?
                    {
                        match key.as_str() {
                            "path" => pax_path = Some(value),
                            "size" => {
                                pax_size = Some(
                                    value
                                        .parse()
                                        .map_err(|_| bad(format!("PAX header at byte {offset}: bad size {value:?}")))?,
                                )
                            }
                            "linkpath" => long_link = Some(value),
                            _ => {}
                        }
                    }
                }
                b'g' => {}
                _ => {
                    let name = pax_path.take().or(long_name.take()).unwrap_or_else(|| header_name(&header));
                    let link = long_link.take().unwrap_or_else(|| c_string(&header[157..257]));
                    let name = normalise(&name);
                    match kind {
                        b'0' | 0 | b'7' => {
                            symlinks.remove(&name);
                            files.insert(name, Extent { offset: data, size });
                        }
                        b'2' => {
                            files.remove(&name);
                            symlinks.insert(name, link);
                        }
                        _ => {}
                    }
                }
            }
            offset = data + size.div_ceil(512) * 512;
        }
        Ok(ArchiveFiles { path: path.to_owned(), files, symlinks })
    }

    /// The extent of regular file `name`, following symlinks inside the archive.
    fn find(&self, name: &str) -> Option<Extent> {
        let mut name = normalise(name);
        for _ in 0..=SYMLINK_HOPS {
            if let Some(extent) = self.files.get(&name) {
                return Some(*extent);
            }
            let target = self.symlinks.get(&name)?;
            let base = name.rsplit_once('/').map_or("", |(dir, _)| dir);
            name = resolve_relative(base, target)?;
        }
        None
    }
}

impl LayoutFiles for ArchiveFiles {
    fn open(&self, name: &str) -> Result<Box<dyn Read + '_>> {
        let extent = self.find(name).ok_or_else(|| Error::Read {
            path: self.path.join(name),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file in the archive"),
        })?;
        let read_error = |source| Error::Read { path: self.path.clone(), source };
        let mut file = File::open(&self.path).map_err(read_error)?;
        file.seek(SeekFrom::Start(extent.offset)).map_err(read_error)?;
        Ok(Box::new(BufReader::with_capacity(64 * 1024, file.take(extent.size))))
    }
}

fn check_header_checksum(header: &[u8; 512]) -> std::result::Result<(), String> {
    let stored = parse_number(&header[148..156]).ok_or("bad checksum field")?;
    let sum: u64 =
        header.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
    if stored != sum { Err(format!("checksum {stored} does not match the header's {sum}")) } else { Ok(()) }
}

/// An octal field (NUL- or space-terminated), or GNU's base-256 form.
fn parse_number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut value = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(value);
    }
    let text: Vec<u8> = field.iter().copied().skip_while(|&b| b == b' ').take_while(|&b| b != 0 && b != b' ').collect();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&text).ok()?, 8).ok()
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// name, with ustar's prefix field in front when the magic is POSIX ustar.
fn header_name(header: &[u8; 512]) -> String {
    let name = c_string(&header[0..100]);
    let prefix = c_string(&header[345..500]);
    if &header[257..263] == b"ustar\0" && !prefix.is_empty() { format!("{prefix}/{name}") } else { name }
}

/// PAX extended header records: `LEN KEY=VALUE\n`.
fn pax_records(mut bytes: &[u8]) -> std::result::Result<Vec<(String, String)>, String> {
    let mut records = Vec::new();
    while !bytes.is_empty() {
        let space = bytes.iter().position(|&b| b == b' ').ok_or("a record has no length")?;
        let length: usize =
            std::str::from_utf8(&bytes[..space]).ok().and_then(|s| s.parse().ok()).ok_or("bad record length")?;
        if length <= space + 1 || length > bytes.len() || bytes[length - 1] != b'\n' {
            return Err("a record's length does not fit".to_owned());
        }
        let record = &bytes[space + 1..length - 1];
        let equals = record.iter().position(|&b| b == b'=').ok_or("a record has no '='")?;
        records.push((
            String::from_utf8_lossy(&record[..equals]).into_owned(),
            String::from_utf8_lossy(&record[equals + 1..]).into_owned(),
        ));
        bytes = &bytes[length..];
    }
    Ok(records)
}

/// `./a//b/` -> `a/b`.
fn normalise(name: &str) -> String {
    name.split('/').filter(|c| !c.is_empty() && *c != ".").collect::<Vec<_>>().join("/")
}

/// `target` seen from directory `base`, lexically, or `None` if it climbs
/// out of the archive or is absolute.
fn resolve_relative(base: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = base.split('/').filter(|c| !c.is_empty()).collect();
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    Some(parts.join("/"))
}

/// An `oci-archive:FILE[:TAG]`.
pub(crate) type OciArchive = LayoutReader<ArchiveFiles>;

impl OciArchive {
    pub(crate) fn open(file: PathBuf, tag: Option<String>, name: String) -> Result<OciArchive> {
        LayoutReader::new(ArchiveFiles::index(&file)?, tag.as_deref(), name)
    }
}

/// A `docker save` archive (`docker-archive:FILE[:REF]`). It has no
/// manifest blob, so kiln makes one: an OCI manifest naming the config
/// file and the layer files by their digests, the same bytes for the same
/// archive (its digest is the image's manifest digest in the store).
#[derive(Debug)]
pub(crate) struct DockerArchive {
    files: ArchiveFiles,
    name: String,
    manifest: Vec<u8>,
    /// Archive paths of the config and the layers, by digest.
    blobs: HashMap<Digest, String>,
}

impl DockerArchive {
    pub(crate) fn open(file: PathBuf, reference: Option<&str>, name: String) -> Result<DockerArchive> {
        let files = ArchiveFiles::index(&file)?;
        let what = format!("manifest.json of {name}");
        let entries: Vec<DockerArchiveEntry> =
            parse_json(&read_verified(files.open("manifest.json")?, &what, None, MANIFEST_LIMIT)?, &what)?;
        let entry = choose_docker_entry(&entries, reference, &name)?;

        let config_what = format!("config {} of {name}", entry.config);
        let config_bytes = read_verified(files.open(&entry.config)?, &config_what, None, CONFIG_LIMIT)?;
        let config: ImageConfig = parse_json(&config_bytes, &config_what)?;
        if config.rootfs.diff_ids.len() != entry.layers.len() {
            return Err(Error::InvalidImage {
                what: name,
                reason: format!(
                    "manifest.json lists {} layers but the config has {} diff_ids",
                    entry.layers.len(),
                    config.rootfs.diff_ids.len()
                ),
            });
        }
        let config_digest = Digest::of(&config_bytes);
        let mut blobs = HashMap::from([(config_digest, entry.config.clone())]);
        let mut layers = Vec::new();
        for (path, diff_id) in entry.layers.iter().zip(&config.rootfs.diff_ids) {
            let extent = files.find(path).ok_or_else(|| Error::InvalidImage {
                what: name.clone(),
                reason: format!("manifest.json names layer {path:?}, which the archive does not hold"),
            })?;
            let mut magic = [0u8; 4];
            let mut reader = files.open(path)?;
            let got =
                read_up_to(&mut reader, &mut magic).map_err(|source| Error::Read { path: file.join(path), source })?;
            let compression = Compression::sniff(&magic[..got]);
            // A plain layer's digest is its diff_id, checked as it is read;
            // a compressed one is named by its digest (docker 25's
            // blobs/sha256/HEX) or hashed here once.
            let digest = match (compression, path.strip_prefix("blobs/sha256/")) {
                (Compression::None, _) => *diff_id,
                (_, Some(hex)) => Digest::from_hex(hex)?,
                (_, None) => hash_stream(files.open(path)?, &file.join(path))?,
            };
            blobs.insert(digest, path.clone());
            layers.push(Descriptor {
                media_type: compression.oci_media_type().to_owned(),
                digest,
                size: extent.size,
                platform: None,
                annotations: Default::default(),
            });
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: OCI_MANIFEST.to_owned(),
            config: Descriptor {
                media_type: DOCKER_CONFIG.to_owned(),
                digest: config_digest,
                size: config_bytes.len() as u64,
                platform: None,
                annotations: Default::default(),
            },
            layers,
        };
        let manifest = serde_json::to_vec(&manifest).map_err(|source| Error::Json { what: what.clone(), source })?;
        Ok(DockerArchive { files, name, manifest, blobs })
    }
}

fn read_up_to(reader: &mut dyn Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn hash_stream(mut reader: impl Read, path: &Path) -> Result<Digest> {
    let mut writer = crate::digest::HashingWriter::new(std::io::sink());
    std::io::copy(&mut reader, &mut writer).map_err(|source| Error::Read { path: path.to_owned(), source })?;
    Ok(writer.finish().1)
}

/// The image of a `docker save` archive that `reference` names by one of
/// its RepoTags (`busybox:1` also matches `docker.io/library/busybox:1`).
fn choose_docker_entry<'a>(
    entries: &'a [DockerArchiveEntry],
    reference: Option<&str>,
    name: &str,
) -> Result<&'a DockerArchiveEntry> {
    let tags = || {
        let all: Vec<&str> = entries.iter().flat_map(|e| e.repo_tags.iter().flatten()).map(String::as_str).collect();
        if all.is_empty() { "none".to_owned() } else { all.join(", ") }
    };
    match reference {
        None => match entries {
            [one] => Ok(one),
            [] => Err(Error::InvalidImage {
                what: name.to_owned(),
                reason: "its manifest.json lists no image".to_owned(),
            }),
            many => Err(Error::AmbiguousImage { image: name.to_owned(), count: many.len(), available: tags() }),
        },
        Some(wanted) => {
            let canonical = |text: &str| text.parse::<crate::source::RegistryReference>().map(|r| r.to_string()).ok();
            let wanted_canonical = canonical(wanted);
            entries
                .iter()
                .find(|entry| {
                    entry
                        .repo_tags
                        .iter()
                        .flatten()
                        .any(|tag| tag == wanted || (wanted_canonical.is_some() && canonical(tag) == wanted_canonical))
                })
                .ok_or_else(|| Error::TagNotFound { image: name.to_owned(), tag: wanted.to_owned(), available: tags() })
        }
    }
}

impl BlobSource for DockerArchive {
    fn name(&self) -> &str {
        &self.name
    }

    fn root(&self) -> Result<Fetched> {
        Ok(Fetched::new(self.manifest.clone(), Some(OCI_MANIFEST.to_owned())))
    }

    fn manifest(&self, digest: &Digest) -> Result<Fetched> {
        Err(Error::BlobNotFound { image: self.name.clone(), digest: *digest })
    }

    fn blob(&self, digest: &Digest) -> Result<Box<dyn Read + '_>> {
        let path =
            self.blobs.get(digest).ok_or_else(|| Error::BlobNotFound { image: self.name.clone(), digest: *digest })?;
        self.files.open(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_numbers_read_octal_and_base_256() {
        assert_eq!(parse_number(b"00000001750\0"), Some(0o1750));
        assert_eq!(parse_number(b"     17 \0"), Some(0o17));
        assert_eq!(parse_number(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(parse_number(b"12x4\0"), None);
    }

    #[test]
    fn archive_symlinks_resolve_inside_the_archive_only() {
        assert_eq!(resolve_relative("abc", "../x.tar").as_deref(), Some("x.tar"));
        assert_eq!(resolve_relative("abc", "../../x.tar"), None);
        assert_eq!(resolve_relative("abc", "/etc/passwd"), None);
        assert_eq!(normalise("./a//b/"), "a/b");
    }

    #[test]
    fn archive_pax_records_parse_and_refuse_bad_lengths() {
        assert_eq!(pax_records(b"12 path=abc\n").unwrap(), vec![("path".to_owned(), "abc".to_owned())]);
        assert!(pax_records(b"99 path=abc\n").is_err());
    }
}
