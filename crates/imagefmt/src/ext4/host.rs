//! The thin I/O shell that reads a host directory into an [`Ext4Tree`]:
//! `lstat` for kinds and metadata, `readlink`, `llistxattr`/`lgetxattr`,
//! and `SEEK_DATA`/`SEEK_HOLE` for the holes of sparse files. A wide
//! directory's children are read on several threads; the tree is built on
//! one, in name order, so the image does not depend on timing.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, channel};

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use super::tree::{DataRange, FileNode, LOST_AND_FOUND, invalid};
use super::{DeviceKind, Ext4Tree, Metadata};
use crate::sink::Source;
use crate::{Error, Result};

impl Ext4Tree {
    /// Adds host path `src` at `dest`, as `cp -a` would copy it, without
    /// following symlinks: a directory gives its mode, owner, time and
    /// xattrs to directory `dest` (`""` is the root) and its contents,
    /// recursively, go under it; anything else becomes the entry `dest`.
    /// Each entry keeps its mode, owner, nanosecond mtime and xattrs;
    /// symlinks keep their target, device nodes their number, sparse files
    /// their holes, and names of one host inode (same device and inode
    /// number) become hard links to one inode. Sockets are skipped, as
    /// `tar` skips them: they are endpoints of a running program, not
    /// content. A `lost+found` directory at the root of the copy is skipped:
    /// it belongs to the host filesystem, and the image has its own. File
    /// contents are read when the image is written and must not change
    /// until then. On error the tree is left as it was.
    pub fn add_host_path(&mut self, dest: &str, src: impl AsRef<Path>) -> Result<()> {
        let (dest, src) = (dest.trim_matches('/'), src.as_ref());
        let mut staged = self.clone();
        std::thread::scope(|scope| {
            let mut walk = HostWalk { tree: &mut staged, inodes: HashMap::new(), scanners: Scanners::new(scope) };
            let info = gather(src).map_err(|source| Error::ReadSource { path: src.to_path_buf(), source })?;
            walk.add(dest, src, info)
        })?;
        *self = staged;
        Ok(())
    }
}

/// What one host entry is, read by [`gather`] on any thread.
struct HostEntry {
    host: fs::Metadata,
    /// `llistxattr`'s names and each value, in list order.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// A symlink's target.
    target: Option<std::path::PathBuf>,
    /// A sparse file's data ranges.
    ranges: Option<Box<[DataRange]>>,
}

/// Reads everything the tree needs of host entry `src` but a directory's
/// children: `lstat`, the xattrs, a symlink's target, a sparse file's holes.
fn gather(src: &Path) -> io::Result<HostEntry> {
    let host = fs::symlink_metadata(src)?;
    let kind = host.file_type();
    let mut entry = HostEntry { xattrs: Vec::new(), target: None, ranges: None, host };
    if kind.is_socket() {
        return Ok(entry);
    }
    entry.xattrs = read_xattrs(src)?;
    if kind.is_symlink() {
        entry.target = Some(fs::read_link(src)?);
    } else if kind.is_file() && may_have_holes(&entry.host) {
        // Only a file with fewer allocated bytes than its length can
        // have holes: a dense one is not opened until its data is copied.
        entry.ranges = data_ranges(&File::open(src)?, &entry.host)?;
    }
    Ok(entry)
}

fn read_xattrs(src: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match list_xattrs(src) {
        Ok(names) => names,
        // A filesystem without xattrs has none to copy.
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(errno) => return Err(errno.into()),
    };
    let mut xattrs = Vec::new();
    for name in names.split(|&b| b == 0).filter(|name| !name.is_empty()) {
        match get_xattr(src, name) {
            Ok(value) => xattrs.push((name.to_vec(), value)),
            // Removed since it was listed.
            Err(Errno::NODATA) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(xattrs)
}

/// Below this many entries, a directory's children are read here alone.
const MIN_ENTRIES_PER_SCANNER: usize = 32;
/// Scanner threads at most, besides the walking thread.
const MAX_SCANNERS: usize = 3;

type ScanJob = (std::sync::Arc<Path>, Vec<std::ffi::OsString>);
type ScanDone = Vec<io::Result<HostEntry>>;

/// Threads that [`gather`] shares of a directory's children while the
/// walking thread gathers its own share: `statx` and `llistxattr` of
/// 120,000 small files were half of the walk's time, on one core.
struct Scanners<'scope, 'env> {
    scope: &'scope std::thread::Scope<'scope, 'env>,
    threads: Vec<(Sender<ScanJob>, Receiver<ScanDone>)>,
    max: usize,
}

impl<'scope, 'env> Scanners<'scope, 'env> {
    fn new(scope: &'scope std::thread::Scope<'scope, 'env>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Scanners { scope, threads: Vec::new(), max: (cores - 1).min(MAX_SCANNERS) }
    }

    /// Gathers `dir/name` for every name, in order, on up to `max + 1` threads.
    fn gather_children(&mut self, dir: &Path, names: &[std::ffi::OsString]) -> ScanDone {
        let shares = (names.len() / MIN_ENTRIES_PER_SCANNER).clamp(1, self.max + 1);
        if shares == 1 {
            return names.iter().map(|name| gather(&dir.join(name))).collect();
        }
        while self.threads.len() < shares - 1 {
            let (jobs, job_queue) = channel::<ScanJob>();
            let (done_queue, done) = channel();
            self.scope.spawn(move || {
                for (dir, names) in job_queue {
                    let entries = names.iter().map(|name| gather(&dir.join(name))).collect();
                    if done_queue.send(entries).is_err() {
                        return;
                    }
                }
            });
            self.threads.push((jobs, done));
        }
        let share = names.len().div_ceil(shares);
        let dir: std::sync::Arc<Path> = dir.into();
        let mut parts = names.chunks(share);
        let own = parts.next().unwrap_or_default();
        let mut sent = Vec::new();
        for ((jobs, done), part) in self.threads.iter().zip(parts) {
            // A scanner that is gone (it panicked) leaves its share to this thread.
            if jobs.send((dir.clone(), part.to_vec())).is_ok() {
                sent.push((done, None));
            } else {
                sent.push((done, Some(part)));
            }
        }
        let mut entries: ScanDone = own.iter().map(|name| gather(&dir.join(name))).collect();
        for (done, unsent) in sent {
            match unsent {
                None => match done.recv() {
                    Ok(part) => entries.extend(part),
                    Err(_) => panic!("an ext4 host scanner thread stopped"),
                },
                Some(part) => entries.extend(part.iter().map(|name| gather(&dir.join(name)))),
            }
        }
        entries
    }
}

struct HostWalk<'t, 'scope, 'env> {
    tree: &'t mut Ext4Tree,
    /// The first destination of each multiply linked host inode.
    inodes: HashMap<(u64, u64), String>,
    scanners: Scanners<'scope, 'env>,
}

impl HostWalk<'_, '_, '_> {
    fn add(&mut self, dest: &str, src: &Path, entry: HostEntry) -> Result<()> {
        let read_error = |source| Error::ReadSource { path: src.to_path_buf(), source };
        let HostEntry { host, xattrs, target, ranges } = entry;
        let kind = host.file_type();
        if kind.is_socket() {
            return Ok(());
        }
        if !kind.is_dir() && host.nlink() > 1 {
            if let Some(first) = self.inodes.get(&(host.dev(), host.ino())) {
                return self.tree.add_hardlink(dest, &first.clone());
            }
            self.inodes.insert((host.dev(), host.ino()), dest.to_owned());
        }
        let meta = Metadata::default()
            .with_mode(host.mode() & 0o7777)
            .with_owner(host.uid(), host.gid())
            .with_mtime(host.mtime(), host.mtime_nsec() as u32);
        if kind.is_dir() {
            self.tree.add_dir(dest, meta)?;
            self.add_xattrs(dest, &xattrs)?;
            let mut names = Vec::new();
            for entry in fs::read_dir(src).map_err(read_error)? {
                names.push(entry.map_err(read_error)?.file_name());
            }
            // Sorted, so that which name of a hard-linked inode comes first does not depend on the host.
            names.sort();
            let children = self.scanners.gather_children(src, &names);
            for (name, child_entry) in names.into_iter().zip(children) {
                let child_src = src.join(&name);
                let Some(name) = name.to_str() else {
                    return Err(invalid(&child_src.to_string_lossy(), "the name is not UTF-8".into()));
                };
                // A host root's lost+found is that filesystem's, not content (mke2fs -d
                // skips it too), even where it cannot be read; the image gets its own.
                if dest.is_empty() && name == LOST_AND_FOUND && child_src.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                    continue;
                }
                let child_entry =
                    child_entry.map_err(|source| Error::ReadSource { path: child_src.clone(), source })?;
                let child = if dest.is_empty() { name.to_owned() } else { format!("{dest}/{name}") };
                self.add(&child, &child_src, child_entry)?;
            }
            self.tree.compact_dir(dest);
            return Ok(());
        }
        if dest.is_empty() {
            return Err(invalid(dest, format!("{} is not a directory, so it cannot be the root", src.display())));
        }
        if kind.is_file() {
            let node = FileNode {
                meta,
                xattrs: Vec::new(),
                source: Source::Host(src.to_path_buf()),
                size: host.size(),
                ranges,
            };
            self.tree.insert_file(dest, node)?;
            self.tree.secret |= crate::sink::is_private(&host);
        } else if kind.is_symlink() {
            let target = target.unwrap_or_default();
            let Some(target) = target.to_str() else {
                return Err(invalid(dest, "the symlink's target is not UTF-8".into()));
            };
            self.tree.add_symlink(dest, target, meta)?;
        } else if kind.is_char_device() || kind.is_block_device() {
            let device = if kind.is_char_device() { DeviceKind::Char } else { DeviceKind::Block };
            let (major, minor) = (rustix::fs::major(host.rdev()), rustix::fs::minor(host.rdev()));
            self.tree.add_device(dest, device, major, minor, meta)?;
        } else if kind.is_fifo() {
            self.tree.add_fifo(dest, meta)?;
        }
        self.add_xattrs(dest, &xattrs)
    }

    /// Copies the gathered extended attributes to `dest`.
    fn add_xattrs(&mut self, dest: &str, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        for (name, value) in xattrs {
            let Ok(name) = std::str::from_utf8(name) else {
                return Err(invalid(dest, "an xattr name is not UTF-8".into()));
            };
            self.tree.set_xattr(dest, name, value)?;
        }
        Ok(())
    }
}

fn list_xattrs(path: &Path) -> rustix::io::Result<Vec<u8>> {
    loop {
        let mut names = vec![0u8; rustix::fs::llistxattr_query(path)?];
        if names.is_empty() {
            return Ok(names);
        }
        match rustix::fs::llistxattr(path, &mut names[..]) {
            Ok(len) => return Ok(names[..len].to_vec()),
            // The list grew between the two calls: ask again.
            Err(Errno::RANGE) => continue,
            Err(errno) => return Err(errno),
        }
    }
}

fn get_xattr(path: &Path, name: &[u8]) -> rustix::io::Result<Vec<u8>> {
    loop {
        let mut value = vec![0u8; rustix::fs::lgetxattr_query(path, name)?];
        if value.is_empty() {
            return Ok(value);
        }
        match rustix::fs::lgetxattr(path, name, &mut value[..]) {
            Ok(len) => return Ok(value[..len].to_vec()),
            Err(Errno::RANGE) => continue,
            Err(errno) => return Err(errno),
        }
    }
}

/// Where an open host file's data is, or `None` if it has no holes. Only a
/// file with fewer allocated bytes than its length can have holes, so
/// dense files cost no extra system call; a filesystem that cannot say
/// where its holes are gives `None` too.
pub(crate) fn data_ranges(file: &File, host: &fs::Metadata) -> io::Result<Option<Box<[DataRange]>>> {
    let size = host.size();
    if !may_have_holes(host) {
        return Ok(None);
    }
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < size {
        let start = match rustix::fs::seek(file, SeekFrom::Data(at)) {
            Ok(start) => start,
            // No data past `at`: the rest is a hole.
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL | Errno::NOTSUP) => return Ok(None),
            Err(errno) => return Err(errno.into()),
        };
        let end = rustix::fs::seek(file, SeekFrom::Hole(start))?.min(size);
        if end > start {
            ranges.push(DataRange { offset: start, len: end - start });
        }
        at = end.max(start + 1);
    }
    if ranges.as_slice() == [DataRange { offset: 0, len: size }] {
        return Ok(None);
    }
    Ok(Some(ranges.into()))
}

/// Whether a host file has fewer allocated bytes than its length, the only
/// way it can have holes.
pub(crate) fn may_have_holes(host: &fs::Metadata) -> bool {
    host.blocks() * 512 < host.size()
}
