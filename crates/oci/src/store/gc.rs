//! The store's sweep: [`Store::gc`] and [`Store::gc_with`], what they
//! remove and how (dry, which derived files stay).

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use super::{Store, digest_entries, read_dir};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// What [`Store::gc`] removed (or, dry, would remove).
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Image records.
    pub images: usize,
    /// Layer tars.
    pub layers: usize,
    /// Manifest and config blobs.
    pub blobs: usize,
    /// Derived directories (by chain id).
    pub derived: usize,
    /// Temp files a killed writer left in derived directories still used.
    /// (A layer filesystem of another format stays while its directory is
    /// used: a VM of another kiln may be about to open it.)
    pub derived_files: usize,
    /// Killed pulls' leftovers in the store's `tmp/`.
    pub temp_files: usize,
    /// Bytes of regular files removed.
    pub bytes: u64,
}

/// How [`Store::gc_with`] sweeps: [`GcOptions::default`] removes what
/// [`Store::gc`] does.
#[derive(Default)]
pub struct GcOptions<'a> {
    dry_run: bool,
    released: &'a [String],
}

impl<'a> GcOptions<'a> {
    /// Removes nothing: the report says what a sweep would remove now.
    pub fn dry_run(mut self, dry_run: bool) -> GcOptions<'a> {
        self.dry_run = dry_run;
        self
    }

    /// Counts the references `users` hold as released: for a dry run whose
    /// caller would release them before a real sweep.
    pub fn as_if_released(mut self, users: &'a [String]) -> GcOptions<'a> {
        self.released = users;
        self
    }
}

impl std::fmt::Debug for GcOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcOptions").field("dry_run", &self.dry_run).field("released", &self.released).finish()
    }
}

impl Store {
    /// Removes every image no user references, then every layer tar,
    /// manifest, config and derived directory that no remaining image
    /// uses, temp files in the derived directories that stay, and leftover
    /// temp files. It waits for running pulls (and holders of
    /// [`Store::guard`]) to finish, and they wait for it.
    pub fn gc(&self) -> Result<GcReport> {
        self.gc_with(&GcOptions::default())
    }

    /// [`Store::gc`] as `options` say: dry (the same report, nothing
    /// removed, under the same locks), and which derived files to keep.
    pub fn gc_with(&self, options: &GcOptions<'_>) -> Result<GcReport> {
        let _pulls = self.lock("pull.lock", rustix::fs::FlockOperation::LockExclusive)?;
        let _refs = self.lock("refs.lock", rustix::fs::FlockOperation::LockExclusive)?;
        let dry_run = options.dry_run;
        let mut refs = self.read_refs()?.refs;
        refs.retain(|user, _| !options.released.contains(user));
        let referenced: BTreeSet<Digest> = refs.into_values().flatten().collect();
        let mut report = GcReport::default();
        let (mut live_layers, mut live_blobs, mut live_chains) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        let mut removed_images = BTreeSet::new();
        for (path, digest) in digest_entries(&self.root.join("images/sha256"), ".json")? {
            let image = if referenced.contains(&digest) { self.image(&digest)? } else { None };
            match image {
                Some(image) => {
                    live_blobs.extend([image.manifest_digest, image.config_digest]);
                    live_chains.extend(image.chain_ids());
                    live_layers.extend(image.layers.iter().map(|l| l.diff_id));
                }
                None => {
                    report.bytes += remove_file(&path, dry_run)?;
                    report.images += 1;
                    removed_images.insert(digest);
                }
            }
        }
        for (path, diff_id) in digest_entries(&self.root.join("layers/sha256"), ".tar")? {
            if !live_layers.contains(&diff_id) {
                report.bytes += remove_file(&path, dry_run)?;
                report.layers += 1;
            }
        }
        for (path, digest) in digest_entries(&self.root.join("blobs/sha256"), "")? {
            if !live_blobs.contains(&digest) {
                report.bytes += remove_file(&path, dry_run)?;
                report.blobs += 1;
            }
        }
        for (path, chain) in digest_entries(&self.root.join("derived/sha256"), "")? {
            if !live_chains.contains(&chain) {
                report.bytes += remove_tree(&path, dry_run)?;
                report.derived += 1;
                continue;
            }
            // No writer runs while gc holds pull.lock: a temp file is a leftover.
            for entry in read_dir(&path)? {
                let name = entry.file_name().map(|name| name.to_string_lossy()).unwrap_or_default();
                if name.starts_with('.') {
                    report.bytes += remove_tree(&entry, dry_run)?;
                    report.derived_files += 1;
                }
            }
        }
        if report.images > 0 {
            let _lock = self.lock("sources.lock", rustix::fs::FlockOperation::LockExclusive)?;
            let mut sources = self.read_sources()?;
            let before = sources.sources.len();
            sources
                .sources
                .retain(|_, manifest| !removed_images.contains(manifest) && self.record_path(manifest).is_file());
            if sources.sources.is_empty() {
                let path = self.root.join("sources.json");
                if path.exists() {
                    report.bytes += remove_file(&path, dry_run)?;
                }
            } else if sources.sources.len() != before && !dry_run {
                self.write_sources(&sources)?;
            }
        }
        // No pull runs while gc holds pull.lock, so every temp file is a leftover.
        for entry in read_dir(&self.root.join("tmp"))? {
            report.bytes += remove_tree(&entry, dry_run)?;
            report.temp_files += 1;
        }
        Ok(report)
    }
}

/// Removes a file (dry: only measures it), returning its size.
fn remove_file(path: &Path, dry_run: bool) -> Result<u64> {
    let size = fs::symlink_metadata(path).map_or(0, |m| m.len());
    if !dry_run {
        fs::remove_file(path).map_err(|source| Error::Write { path: path.to_owned(), source })?;
    }
    Ok(size)
}

/// Removes a file or a directory tree (dry: only measures it), returning
/// the bytes of its regular files.
fn remove_tree(path: &Path, dry_run: bool) -> Result<u64> {
    let metadata = fs::symlink_metadata(path).map_err(|source| Error::Read { path: path.to_owned(), source })?;
    if !metadata.is_dir() {
        return remove_file(path, dry_run);
    }
    let mut bytes = 0;
    for entry in read_dir(path)? {
        bytes += remove_tree(&entry, dry_run)?;
    }
    if !dry_run {
        fs::remove_dir(path).map_err(|source| Error::Write { path: path.to_owned(), source })?;
    }
    Ok(bytes)
}
