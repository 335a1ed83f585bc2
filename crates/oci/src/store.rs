//! The content-addressed image cache: manifests and configs by digest,
//! layers decompressed once into plain tars by diff_id, one small record
//! per image, references from users (VM names) and a `gc` that removes
//! what nobody references. ARCHITECTURE.md ("kiln-oci: sources and the
//! store") describes the layout and its invariants.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::archive::CONFIG_LIMIT;
use crate::config::{Compression, DOCKER_CONFIG, ImageConfig, parse_json};
use crate::digest::{Digest, HashingWriter, VerifyingReader, read_verified};
use crate::error::{Error, Result};
use crate::image::{Image, ImageRecord, Layer, RECORD_VERSION, RuntimeConfig};
use crate::layers::{LayerTar, layer_tree};
use crate::source::{BlobSource, resolve_manifest};
use crate::space::{Headroom, MIN_FREE_BYTES};

mod gc;
pub use gc::{GcOptions, GcReport};

const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// How often, in bytes, progress is reported while a layer streams.
const PROGRESS_STEP: u64 = 256 * 1024;

/// Progress of one blob's transfer, for a progress bar.
#[non_exhaustive]
#[derive(Debug, Clone, Copy)]
pub struct BlobProgress {
    /// The blob.
    pub digest: Digest,
    /// Bytes of it read so far.
    pub done: u64,
    /// Its size.
    pub total: u64,
}

/// `refs.json`: which users hold which images.
#[derive(Default, Serialize, Deserialize)]
struct RefsFile {
    refs: BTreeMap<String, BTreeSet<Digest>>,
}

/// `sources.json`: the manifest each source string was last pulled as,
/// so [`Store::find`] reads one small file, not every image record.
#[derive(Default, Serialize, Deserialize)]
struct SourcesFile {
    sources: BTreeMap<String, Digest>,
}

/// The one field every version of an image record has.
#[derive(Deserialize)]
struct RecordVersion {
    version: u32,
}

/// A held lock on the store; dropping it (closing the file) releases it.
#[derive(Debug)]
pub struct StoreGuard {
    _file: File,
}

/// The image cache in a directory the caller gives (kiln: its state dir).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the store at `root`, creating its directories (0755).
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let store = Store { root: root.into() };
        for dir in ["blobs/sha256", "layers/sha256", "images/sha256", "derived/sha256", "tmp"] {
            create_dir_all(&store.root.join(dir))?;
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the decompressed tar of layer `diff_id` is (once pulled).
    pub fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers/sha256").join(format!("{}.tar", diff_id.hex()))
    }

    /// Where manifest or config blob `digest` is (once pulled).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    fn record_path(&self, manifest: &Digest) -> PathBuf {
        self.root.join("images/sha256").join(format!("{}.json", manifest.hex()))
    }

    /// A directory for files derived from the layer chain `chain_id` (a
    /// layer filesystem, keyed inside by its writer's version), created if
    /// need be. [`Store::gc`] removes it once no referenced image has that
    /// chain. Write into it while holding [`Store::guard`], with a temp
    /// file whose name starts with `.` and a rename: gc, which waits for
    /// guard holders, removes such a file as a killed writer's leftover.
    pub fn derived_dir(&self, chain_id: &Digest) -> Result<PathBuf> {
        let dir = self.root.join("derived/sha256").join(chain_id.hex());
        create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Holds off [`Store::gc`] (a shared lock) while the guard lives:
    /// [`Store::pull`] takes it, and so should whoever writes derived files.
    pub fn guard(&self) -> Result<StoreGuard> {
        self.lock("pull.lock", rustix::fs::FlockOperation::LockShared)
    }

    fn lock(&self, name: &str, operation: rustix::fs::FlockOperation) -> Result<StoreGuard> {
        let path = self.root.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o644)
            .open(&path)
            .map_err(|source| Error::Write { path: path.clone(), source })?;
        rustix::fs::flock(&file, operation).map_err(|errno| Error::Lock { path, source: errno.into() })?;
        Ok(StoreGuard { _file: file })
    }

    /// The image whose manifest is `manifest`, if the store holds it: one
    /// small file read.
    pub fn image(&self, manifest: &Digest) -> Result<Option<Image>> {
        let path = self.record_path(manifest);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Read { path, source }),
        };
        let what = path.display().to_string();
        // The version first: another kiln's record may have another shape,
        // and is "not here" (pull again), not a broken store.
        let RecordVersion { version } = parse_json(&bytes, &what)?;
        if version != RECORD_VERSION {
            return Ok(None);
        }
        let record: ImageRecord = parse_json(&bytes, &what)?;
        if record.manifest != *manifest {
            return Ok(None);
        }
        Ok(Some(record.into()))
    }

    /// The image source string `source` (an [`ImageSource`](crate::ImageSource)
    /// as displayed) was last pulled as, if the store still holds it: two
    /// small files read, no source opened, nothing written.
    pub fn find(&self, source: &str) -> Result<Option<Image>> {
        let Some(manifest) = self.read_sources()?.sources.remove(source) else { return Ok(None) };
        self.image(&manifest)
    }

    /// Pulls the image `source` names into the store, verifying every blob,
    /// and returns it. Warm (record and layer tars present), it reads the
    /// source's manifest, the record and `sources.json` only. On error
    /// nothing unverified or partial is left; layers verified before the
    /// failure stay, unreferenced, until gc.
    pub fn pull(&self, source: &dyn BlobSource, progress: &mut dyn FnMut(&BlobProgress)) -> Result<Image> {
        let _guard = self.guard()?;
        let name = source.name().to_owned();
        let resolved = resolve_manifest(source)?;
        if let Some(image) = self.image(&resolved.digest)? {
            if image.layers.iter().all(|l| self.layer_path(&l.diff_id).is_file()) {
                for layer in &image.layers {
                    progress(&BlobProgress { digest: layer.digest, done: layer.size, total: layer.size });
                }
                self.index_source(&name, &image.manifest_digest)?;
                return Ok(image);
            }
        }
        let manifest = &resolved.manifest;
        let config_what = format!("config {} of {name}", manifest.config.digest);
        if ![OCI_CONFIG, DOCKER_CONFIG, ""].contains(&manifest.config.media_type.as_str()) {
            return Err(Error::UnsupportedMediaType {
                what: config_what,
                media_type: manifest.config.media_type.clone(),
            });
        }
        let config_bytes = read_verified(
            source.blob(&manifest.config.digest)?,
            &config_what,
            Some((manifest.config.digest, Some(manifest.config.size))),
            CONFIG_LIMIT,
        )?;
        let config: ImageConfig = parse_json(&config_bytes, &config_what)?;
        let layers = check_config(&config, manifest, &name)?;
        let mut fetched = Vec::new();
        for layer in &layers {
            if self.layer_path(&layer.diff_id).is_file() {
                progress(&BlobProgress { digest: layer.digest, done: layer.size, total: layer.size });
                continue;
            }
            if let Err(error) = self.fetch_layer(source, layer, &name, progress) {
                self.drop_layers(&fetched);
                return Err(error);
            }
            fetched.push(layer.diff_id);
        }
        // The layers' entries are checked now (metadata only), so the store
        // never records an image whose layers are hostile: it refuses them
        // with the entry, layer and image named, and keeps none of them.
        let tars: Vec<LayerTar> = layers
            .iter()
            .map(|layer| LayerTar::new(self.layer_path(&layer.diff_id), layer.diff_id.to_string()))
            .collect();
        if let Err(error) = layer_tree(&name, &[], &tars) {
            self.drop_layers(&fetched);
            return Err(error);
        }
        self.write_content(&self.blob_path(&resolved.digest), &resolved.bytes)?;
        self.write_content(&self.blob_path(&manifest.config.digest), &config_bytes)?;
        let runtime = config.config.unwrap_or_default();
        let non_empty = |value: Option<String>| value.filter(|v| !v.is_empty());
        let image = Image {
            source: name,
            manifest_digest: resolved.digest,
            config_digest: manifest.config.digest,
            runtime: RuntimeConfig {
                entrypoint: runtime.entrypoint.unwrap_or_default(),
                cmd: runtime.cmd.unwrap_or_default(),
                env: runtime.env.unwrap_or_default(),
                working_dir: non_empty(runtime.working_dir),
                user: non_empty(runtime.user),
                stop_signal: non_empty(runtime.stop_signal),
            },
            layers,
        };
        let record = serde_json::to_vec_pretty(&ImageRecord::from(&image))
            .map_err(|source| Error::Json { what: "an image record".to_owned(), source })?;
        self.write_atomic(&self.record_path(&image.manifest_digest), &record)?;
        self.index_source(&image.source, &image.manifest_digest)?;
        Ok(image)
    }

    /// Removes layer tars this pull wrote for an image it then refused.
    fn drop_layers(&self, diff_ids: &[Digest]) {
        for diff_id in diff_ids {
            // Best effort: the error being returned is the one that matters.
            let _ = fs::remove_file(self.layer_path(diff_id));
        }
    }

    fn read_sources(&self) -> Result<SourcesFile> {
        let path = self.root.join("sources.json");
        match fs::read(&path) {
            // Empty: replaced, not fsynced, when the host crashed (see `replace`).
            Ok(bytes) if bytes.is_empty() => Ok(SourcesFile::default()),
            Ok(bytes) => parse_json(&bytes, &path.display().to_string()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(SourcesFile::default()),
            Err(source) => Err(Error::Read { path, source }),
        }
    }

    /// Records in `sources.json` that `source` is `manifest` now, unless it
    /// says so already (a warm pull then writes nothing). Like refs.json it
    /// is replaced atomically without an fsync: after a crash an older
    /// index only makes `find` miss until the next pull.
    fn index_source(&self, source: &str, manifest: &Digest) -> Result<()> {
        let _lock = self.lock("sources.lock", rustix::fs::FlockOperation::LockExclusive)?;
        let mut sources = self.read_sources()?;
        if sources.sources.get(source) == Some(manifest) {
            return Ok(());
        }
        sources.sources.insert(source.to_owned(), *manifest);
        self.write_sources(&sources)
    }

    fn write_sources(&self, sources: &SourcesFile) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(sources)
            .map_err(|source| Error::Json { what: "sources.json".to_owned(), source })?;
        self.replace(&self.root.join("sources.json"), &bytes)
    }

    /// Streams layer `layer` from `source`, decompresses it and writes it
    /// as `layers/sha256/<diff_id>.tar`, checking the blob's digest and size
    /// and the tar's diff_id on the way; a temp file until all checks pass.
    fn fetch_layer(
        &self,
        source: &dyn BlobSource,
        layer: &Layer,
        image: &str,
        progress: &mut dyn FnMut(&BlobProgress),
    ) -> Result<()> {
        let blob = format!("layer {} of {image}", layer.digest);
        let compression = layer
            .compression()
            .ok_or_else(|| Error::UnsupportedMediaType { what: blob.clone(), media_type: layer.media_type.clone() })?;
        let reader = source.blob(&layer.digest)?;
        let reporting =
            ProgressReader { inner: reader, digest: layer.digest, done: 0, reported: 0, total: layer.size, progress };
        let mut verifier = VerifyingReader::new(reporting, blob.clone(), layer.digest, Some(layer.size));
        let temp = TempFile::create(&self.root.join("tmp"))?;
        let room = Headroom { inner: temp.file()?, dir: self.root.join("tmp"), unchecked: 0, min_free: MIN_FREE_BYTES };
        let mut writer = HashingWriter::new(BufWriter::with_capacity(256 * 1024, room));
        let copied = match compression {
            Compression::None => copy(&mut verifier, &mut writer),
            Compression::Gzip => {
                copy(&mut flate2::read::MultiGzDecoder::new(BufReader::new(&mut verifier)), &mut writer)
            }
            Compression::Zstd => match ZstdFrames::new(BufReader::new(&mut verifier)) {
                Ok(mut decoder) => copy(&mut decoder, &mut writer),
                Err(error) => Err(CopyError::Read(error)),
            },
        };
        match copied {
            Ok(()) => verifier.finish()?,
            Err(CopyError::Write(source)) if source.kind() == io::ErrorKind::StorageFull => {
                return Err(Error::Decompress { blob, source });
            }
            Err(CopyError::Write(source)) => return Err(Error::Write { path: temp.path.clone(), source }),
            Err(CopyError::Read(source)) => {
                // A corrupt blob usually fails to decompress: say which check
                // it fails (size, digest) before blaming the decompressor.
                if let Some(error) = verifier.size_error() {
                    return Err(error);
                }
                verifier.finish()?;
                return Err(Error::Decompress { blob, source });
            }
        }
        let (buffered, diff_id, _) = writer.finish();
        let file = buffered
            .into_inner()
            .map_err(|error| Error::Write { path: temp.path.clone(), source: error.into_error() })?
            .inner;
        file.sync_all().map_err(|source| Error::Write { path: temp.path.clone(), source })?;
        if diff_id != layer.diff_id {
            return Err(Error::DiffIdMismatch { layer: blob, expected: layer.diff_id, actual: diff_id });
        }
        temp.persist(&self.layer_path(&layer.diff_id))
    }

    /// Writes content-addressed file `path` unless it exists (the same name
    /// means the same bytes, so a concurrent writer's copy is as good).
    fn write_content(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        if path.is_file() { Ok(()) } else { self.write_atomic(path, bytes) }
    }

    /// Writes `path` whole or not at all: a temp file, fsync, rename.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let temp = TempFile::create(&self.root.join("tmp"))?;
        let mut file = temp.file()?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|source| Error::Write { path: temp.path.clone(), source })?;
        temp.persist(path)
    }

    /// Replaces `path` whole (a temp file and a rename) but does not wait
    /// for the disk: for the files only a running host needs (refs.json,
    /// sources.json), where an fsync would be most of a warm run's host-side
    /// work. After a host crash such a file may be old or empty (its data
    /// not yet on disk), and is read as no entries: no VM survives a crash.
    fn replace(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let temp = TempFile::create(&self.root.join("tmp"))?;
        let mut file = temp.file()?;
        file.write_all(bytes).map_err(|source| Error::Write { path: temp.path.clone(), source })?;
        temp.persist(path)
    }

    fn read_refs(&self) -> Result<RefsFile> {
        let path = self.root.join("refs.json");
        match fs::read(&path) {
            // Empty: replaced, not fsynced, when the host crashed (see `replace`).
            Ok(bytes) if bytes.is_empty() => Ok(RefsFile::default()),
            Ok(bytes) => parse_json(&bytes, &path.display().to_string()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(RefsFile::default()),
            Err(source) => Err(Error::Read { path, source }),
        }
    }

    fn write_refs(&self, refs: &RefsFile) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(refs).map_err(|source| Error::Json { what: "refs.json".to_owned(), source })?;
        // No fsync: references only matter while their VMs live, and after
        // a host crash none does (ARCHITECTURE.md, the store's invariants).
        self.replace(&self.root.join("refs.json"), &bytes)
    }

    /// Records that `user` (a VM name) uses image `manifest`, so gc keeps
    /// it. Fails if the store no longer holds the image (a gc ran since
    /// the pull): pull it again.
    pub fn retain(&self, user: &str, manifest: &Digest) -> Result<()> {
        let _lock = self.lock("refs.lock", rustix::fs::FlockOperation::LockExclusive)?;
        if !self.record_path(manifest).is_file() {
            return Err(Error::NotInStore { digest: *manifest });
        }
        let mut refs = self.read_refs()?;
        if refs.refs.entry(user.to_owned()).or_default().insert(*manifest) {
            self.write_refs(&refs)?;
        }
        Ok(())
    }

    /// Drops every reference `user` holds.
    pub fn release(&self, user: &str) -> Result<()> {
        let _lock = self.lock("refs.lock", rustix::fs::FlockOperation::LockExclusive)?;
        let mut refs = self.read_refs()?;
        if refs.refs.remove(user).is_some() {
            self.write_refs(&refs)?;
        }
        Ok(())
    }

    /// The images `user` holds.
    pub fn references(&self, user: &str) -> Result<Vec<Digest>> {
        let _lock = self.lock("refs.lock", rustix::fs::FlockOperation::LockShared)?;
        Ok(self.read_refs()?.refs.remove(user).map(|set| set.into_iter().collect()).unwrap_or_default())
    }
}

/// Checks the config against the manifest (type, platform, one diff_id per
/// layer) and pairs each layer with its diff_id.
fn check_config(config: &ImageConfig, manifest: &crate::config::Manifest, image: &str) -> Result<Vec<Layer>> {
    if config.rootfs.kind != "layers" {
        return Err(Error::InvalidImage {
            what: image.to_owned(),
            reason: format!("its config's rootfs.type is {:?}, not \"layers\"", config.rootfs.kind),
        });
    }
    let os_ok = config.os.is_empty() || config.os == "linux";
    let arch_ok = config.architecture.is_empty() || config.architecture == "amd64";
    if !os_ok || !arch_ok {
        return Err(Error::NoMatchingPlatform {
            image: image.to_owned(),
            offered: format!("{}/{}", config.os, config.architecture),
        });
    }
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(Error::InvalidImage {
            what: image.to_owned(),
            reason: format!(
                "its manifest has {} layers but its config {} diff_ids",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            ),
        });
    }
    Ok(manifest
        .layers
        .iter()
        .zip(&config.rootfs.diff_ids)
        .map(|(descriptor, diff_id)| Layer {
            digest: descriptor.digest,
            diff_id: *diff_id,
            media_type: descriptor.media_type.clone(),
            size: descriptor.size,
        })
        .collect())
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// `io::copy` that tells a failed read (a corrupt blob) from a failed write (the disk).
fn copy(reader: &mut dyn Read, writer: &mut dyn Write) -> std::result::Result<(), CopyError> {
    let mut buffer = vec![0u8; 128 * 1024];
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(CopyError::Read(error)),
        };
        writer.write_all(&buffer[..n]).map_err(CopyError::Write)?;
    }
    writer.flush().map_err(CopyError::Write)
}

/// A zstd stream of one or more frames (ruzstd's decoder reads one).
struct ZstdFrames<R: BufRead> {
    decoder: Option<ruzstd::decoding::StreamingDecoder<R, ruzstd::decoding::FrameDecoder>>,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(source: R) -> io::Result<ZstdFrames<R>> {
        let decoder = ruzstd::decoding::StreamingDecoder::new(source).map_err(io::Error::other)?;
        Ok(ZstdFrames { decoder: Some(decoder) })
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(decoder) = self.decoder.as_mut() else { return Ok(0) };
            let n = decoder.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            let Some((mut source, frame)) = self.decoder.take().map(|d| d.into_parts()) else { return Ok(0) };
            if source.fill_buf()?.is_empty() {
                return Ok(0);
            }
            self.decoder =
                Some(ruzstd::decoding::StreamingDecoder::new_with_decoder(source, frame).map_err(io::Error::other)?);
        }
    }
}

/// Reports bytes read to the progress callback, every [`PROGRESS_STEP`] and at the end.
struct ProgressReader<'a, R> {
    inner: R,
    digest: Digest,
    done: u64,
    reported: u64,
    total: u64,
    progress: &'a mut dyn FnMut(&BlobProgress),
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done == 0 && self.reported == 0 {
            (self.progress)(&BlobProgress { digest: self.digest, done: 0, total: self.total });
        }
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done - self.reported >= PROGRESS_STEP || (n == 0 && self.done != self.reported) {
            self.reported = self.done;
            (self.progress)(&BlobProgress { digest: self.digest, done: self.done, total: self.total });
        }
        Ok(n)
    }
}

/// A file in the store's tmp/ that is removed on drop unless persisted.
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    fn create(dir: &Path) -> Result<TempFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let name = format!("{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let path = dir.join(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(|source| Error::Write { path: path.clone(), source })?;
        Ok(TempFile { path, persisted: false })
    }

    fn file(&self) -> Result<File> {
        OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|source| Error::Write { path: self.path.clone(), source })
    }

    /// Sets mode 0644 (whatever the umask) and renames the file to `target`.
    fn persist(mut self, target: &Path) -> Result<()> {
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o644))
            .and_then(|()| fs::rename(&self.path, target))
            .map_err(|source| Error::Write { path: target.to_owned(), source })?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn create_dir_all(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o755)))
        .map_err(|source| Error::Write { path: dir.to_owned(), source })
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let read_error = |source| Error::Read { path: dir.to_owned(), source };
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_error)? {
        paths.push(entry.map_err(read_error)?.path());
    }
    Ok(paths)
}

/// The entries of `dir` named `<64 hex><suffix>`, with their digests;
/// other names are not the store's and are left alone.
fn digest_entries(dir: &Path, suffix: &str) -> Result<Vec<(PathBuf, Digest)>> {
    Ok(read_dir(dir)?
        .into_iter()
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?;
            let digest = Digest::from_hex(name.strip_suffix(suffix)?).ok()?;
            Some((path, digest))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn digest() -> impl Strategy<Value = Digest> {
        any::<[u8; 32]>().prop_map(|bytes| Digest::of(&bytes))
    }

    fn image() -> impl Strategy<Value = Image> {
        let strings = || proptest::collection::vec(".{0,12}", 0..4);
        let layer = (digest(), digest(), ".{0,40}", any::<u64>())
            .prop_map(|(digest, diff_id, media_type, size)| Layer { digest, diff_id, media_type, size });
        (
            ".{0,30}",
            digest(),
            digest(),
            (
                strings(),
                strings(),
                strings(),
                proptest::option::of(".{1,12}"),
                proptest::option::of(".{1,12}"),
                proptest::option::of(".{1,8}"),
            ),
            proptest::collection::vec(layer, 0..5),
        )
            .prop_map(
                |(
                    source,
                    manifest_digest,
                    config_digest,
                    (entrypoint, cmd, env, working_dir, user, stop_signal),
                    layers,
                )| Image {
                    source,
                    manifest_digest,
                    config_digest,
                    runtime: RuntimeConfig { entrypoint, cmd, env, working_dir, user, stop_signal },
                    layers,
                },
            )
    }

    #[test]
    fn an_empty_refs_or_sources_file_left_by_a_crash_reads_as_none_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(dir.path().join("refs.json"), b"").unwrap();
        fs::write(dir.path().join("sources.json"), b"").unwrap();
        assert_eq!(store.references("vm").unwrap(), Vec::<Digest>::new());
        assert!(store.find("oci:/x:1").unwrap().is_none());
        assert_eq!(store.gc().unwrap(), GcReport::default());
        fs::write(dir.path().join("refs.json"), b"{").unwrap();
        let error = store.references("vm").unwrap_err().to_string();
        assert!(error.contains("refs.json"), "{error}");
    }

    #[test]
    fn zstd_layers_of_several_frames_decompress_whole() {
        use ruzstd::encoding::{CompressionLevel, compress_to_vec};
        let mut stream = compress_to_vec(&b"first frame, "[..], CompressionLevel::Fastest);
        stream.extend(compress_to_vec(&b"second frame"[..], CompressionLevel::Fastest));
        let mut out = Vec::new();
        ZstdFrames::new(&stream[..]).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, b"first frame, second frame");
    }

    proptest! {
        #[test]
        fn image_record_round_trips_through_its_json(image in image()) {
            let bytes = serde_json::to_vec_pretty(&ImageRecord::from(&image)).unwrap();
            let back: ImageRecord = parse_json(&bytes, "record").unwrap();
            prop_assert_eq!(Image::from(back), image);
        }
    }
}
