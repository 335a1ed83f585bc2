//! newc cpio archives (what the Linux kernel unpacks as an initramfs),
//! deterministic, optionally gzip-compressed.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::sink::{image_mode, is_private, write_atomically};
use crate::{Error, Result};

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;
const S_IFIFO: u32 = 0o010_000;
/// Read buffer for host files copied into an archive.
const COPY_BUFFER: usize = 64 << 10;
/// Longest path the kernel's unpacker accepts.
const MAX_PATH: usize = 4095;

/// How an archive is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    None,
    /// gzip (deflate, level 6, no name, mtime 0), which every kernel unpacks.
    #[default]
    Gzip,
}

/// A tree of entries for a newc archive. Entries are kept sorted by path,
/// so parents always precede their children and the order of `add_*` calls
/// does not change the archive. Every entry is owned by uid/gid 0 and
/// stamped with the same mtime; inode numbers count up from 1.
#[derive(Debug, Clone, Default)]
pub struct CpioArchive {
    entries: BTreeMap<String, Entry>,
    /// Set by [`CpioArchive::mark_secret`] or a private host file.
    secret: bool,
}

#[derive(Debug, Clone)]
enum Entry {
    Dir { mode: u32 },
    File { mode: u32, source: FileSource, size: u64 },
    Symlink { target: String },
    Device { kind: u32, mode: u32, major: u32, minor: u32 },
}

#[derive(Debug, Clone)]
enum FileSource {
    Host(PathBuf),
    Bytes(Arc<[u8]>),
}

/// What an archive write produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpioSummary {
    /// Entries, not counting the trailer.
    pub entries: u64,
    /// Archive bytes before compression.
    pub archive_bytes: u64,
    /// Bytes of the file written.
    pub file_bytes: u64,
}

impl CpioArchive {
    /// An empty archive.
    pub fn new() -> CpioArchive {
        CpioArchive::default()
    }

    /// Adds directory `path` (parents are created with mode 0755).
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let path = self.prepare(path)?;
        match self.entries.get(&path) {
            Some(Entry::Dir { .. }) => {
                self.entries.insert(path, Entry::Dir { mode: mode & 0o7777 });
                Ok(())
            }
            Some(_) => Err(Error::AlreadyExists { path }),
            None => {
                self.entries.insert(path, Entry::Dir { mode: mode & 0o7777 });
                Ok(())
            }
        }
    }

    /// Adds a regular file with `bytes` as its content.
    pub fn add_file_from_bytes(&mut self, path: &str, bytes: impl Into<Vec<u8>>, mode: u32) -> Result<()> {
        let bytes: Arc<[u8]> = Arc::from(bytes.into());
        let size = bytes.len() as u64;
        check_size(Path::new(path), size)?;
        self.insert(path, Entry::File { mode: mode & 0o7777, source: FileSource::Bytes(bytes), size })
    }

    /// Adds host file `src` (symlinks followed) at `path` with `mode`.
    pub fn add_file_from_path(&mut self, path: &str, src: impl AsRef<Path>, mode: u32) -> Result<()> {
        let src = src.as_ref();
        let meta = fs::metadata(src).map_err(|source| Error::ReadSource { path: src.to_path_buf(), source })?;
        if !meta.is_file() {
            return Err(Error::UnsupportedFileType { path: src.to_path_buf(), kind: "not a regular file" });
        }
        check_size(src, meta.len())?;
        self.secret |= is_private(&meta);
        let source = FileSource::Host(src.to_path_buf());
        self.insert(path, Entry::File { mode: mode & 0o7777, source, size: meta.len() })
    }

    /// Marks the archive as holding secrets: [`CpioArchive::write_file`]
    /// then writes it mode 0600.
    pub fn mark_secret(&mut self) {
        self.secret = true;
    }

    /// Whether the archive is secret: marked so, or holding a host file that
    /// its group or others cannot read (an image is never more readable than
    /// what went into it).
    pub fn is_secret(&self) -> bool {
        self.secret
    }

    /// Adds a symbolic link at `path` pointing to `target`, stored as given.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<()> {
        if target.is_empty() || target.contains('\0') {
            return Err(Error::InvalidName {
                path: path.to_owned(),
                reason: "a symlink target is non-empty, without NUL".into(),
            });
        }
        self.insert(path, Entry::Symlink { target: target.to_owned() })
    }

    /// Adds a character device node, such as `dev/console` (5, 1).
    pub fn add_char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        self.insert(path, Entry::Device { kind: S_IFCHR, mode: mode & 0o7777, major, minor })
    }

    /// Adds a block device node.
    pub fn add_block_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        self.insert(path, Entry::Device { kind: S_IFBLK, mode: mode & 0o7777, major, minor })
    }

    /// Adds host directory `src`'s contents under `dest` (`""` for the root),
    /// keeping permission bits, symlinks (not followed), device nodes and
    /// FIFOs. Owners and times are not kept: everything is root's, at the
    /// archive's epoch. Sockets are refused.
    pub fn add_host_tree(&mut self, dest: &str, src: impl AsRef<Path>) -> Result<()> {
        let src = src.as_ref();
        let mut staged = self.clone();
        let dest = staged.prepare(dest)?;
        if !dest.is_empty() {
            let meta = fs::metadata(src).map_err(|source| Error::ReadSource { path: src.to_path_buf(), source })?;
            staged.add_dir(&dest, meta.permissions().mode())?;
        }
        staged.walk(&dest, src)?;
        *self = staged;
        Ok(())
    }

    fn walk(&mut self, dest: &str, src: &Path) -> Result<()> {
        let mut children = Vec::new();
        for entry in fs::read_dir(src).map_err(read_error(src))? {
            children.push(entry.map_err(read_error(src))?.path());
        }
        children.sort();
        for path in children {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                return Err(Error::InvalidName {
                    path: path.display().to_string(),
                    reason: "the name is not valid UTF-8".into(),
                });
            };
            let target = if dest.is_empty() { name.to_owned() } else { format!("{dest}/{name}") };
            let meta = fs::symlink_metadata(&path).map_err(read_error(&path))?;
            let file_type = meta.file_type();
            let mode = meta.permissions().mode();
            if file_type.is_symlink() {
                let link = fs::read_link(&path).map_err(read_error(&path))?;
                let link = link.to_str().ok_or_else(|| Error::InvalidName {
                    path: path.display().to_string(),
                    reason: "the symlink target is not valid UTF-8".into(),
                })?;
                self.add_symlink(&target, link)?;
            } else if file_type.is_dir() {
                self.add_dir(&target, mode)?;
                self.walk(&target, &path)?;
            } else if file_type.is_file() {
                self.add_file_from_path(&target, &path, mode)?;
            } else if file_type.is_char_device() || file_type.is_block_device() {
                let kind = if file_type.is_char_device() { S_IFCHR } else { S_IFBLK };
                let rdev = meta.rdev();
                let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
                self.insert(&target, Entry::Device { kind, mode: mode & 0o7777, major, minor })?;
            } else if file_type.is_fifo() {
                self.insert(&target, Entry::Device { kind: S_IFIFO, mode: mode & 0o7777, major: 0, minor: 0 })?;
            } else {
                return Err(Error::UnsupportedFileType { path, kind: "socket" });
            }
        }
        Ok(())
    }

    /// Normalises `path` (no leading `/`, no empty, `.` or `..` components)
    /// and creates its missing parents.
    fn prepare(&mut self, path: &str) -> Result<String> {
        let invalid = |reason: &str| Error::InvalidName { path: path.to_owned(), reason: reason.to_owned() };
        if path.contains('\0') {
            return Err(invalid("paths cannot contain NUL"));
        }
        let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        if components.iter().any(|&c| c == "." || c == "..") {
            return Err(invalid("\".\" and \"..\" are not allowed in archive paths"));
        }
        let normal = components.join("/");
        if normal.len() > MAX_PATH {
            return Err(invalid("longer than 4095 bytes"));
        }
        for depth in 1..components.len() {
            let parent = components[..depth].join("/");
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent, Entry::Dir { mode: 0o755 });
                }
                Some(Entry::Dir { .. }) => {}
                Some(_) => return Err(Error::NotADirectory { path: parent }),
            }
        }
        Ok(normal)
    }

    fn insert(&mut self, path: &str, entry: Entry) -> Result<()> {
        let path = self.prepare(path)?;
        if path.is_empty() {
            return Err(Error::InvalidName { path, reason: "an entry needs a name".into() });
        }
        if self.entries.contains_key(&path) {
            return Err(Error::AlreadyExists { path });
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// Number of entries (the trailer not included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the archive has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Streams the uncompressed archive to `out`, stamping every entry with
    /// `epoch` (seconds, clamped to cpio's 32-bit field). Returns the bytes written.
    pub fn write_to<W: Write>(&self, out: W, epoch: i64) -> Result<u64> {
        let mut out = CountingWriter { inner: out, written: 0 };
        let mtime = epoch.clamp(0, i64::from(u32::MAX)) as u32;
        for (index, (path, entry)) in self.entries.iter().enumerate() {
            let ino = index as u32 + 1;
            let (mode, nlink, size, major, minor) = match entry {
                Entry::Dir { mode } => (S_IFDIR | mode, 2, 0, 0, 0),
                Entry::File { mode, size, .. } => (S_IFREG | mode, 1, *size, 0, 0),
                Entry::Symlink { target } => (S_IFLNK | 0o777, 1, target.len() as u64, 0, 0),
                Entry::Device { kind, mode, major, minor } => (kind | mode, 1, 0, *major, *minor),
            };
            let header = Header { ino, mode, nlink, mtime, size: size as u32, rdev_major: major, rdev_minor: minor };
            header.write(&mut out, path).map_err(Error::Write)?;
            match entry {
                Entry::File { source: FileSource::Bytes(bytes), .. } => out.write_all(bytes).map_err(Error::Write)?,
                Entry::File { source: FileSource::Host(src), size, .. } => copy_exact(src, *size, &mut out)?,
                Entry::Symlink { target } => out.write_all(target.as_bytes()).map_err(Error::Write)?,
                Entry::Dir { .. } | Entry::Device { .. } => {}
            }
            out.pad().map_err(Error::Write)?;
        }
        let trailer = Header { ino: 0, mode: 0, nlink: 1, mtime: 0, size: 0, rdev_major: 0, rdev_minor: 0 };
        trailer.write(&mut out, TRAILER).map_err(Error::Write)?;
        out.flush().map_err(Error::Write)?;
        Ok(out.written)
    }

    /// Writes the archive to `path` atomically (temporary file, then
    /// rename), compressed as asked. The file is mode 0600 if the archive
    /// is secret (see [`CpioArchive::is_secret`]), else 0644, less the umask.
    pub fn write_file(&self, path: &Path, compression: Compression, epoch: i64) -> Result<CpioSummary> {
        let archive_bytes = write_atomically(path, image_mode(self.secret), |sink| match compression {
            Compression::None => self.write_to(sink, epoch),
            Compression::Gzip => {
                let mut encoder = flate2::GzBuilder::new().mtime(0).write(sink, flate2::Compression::default());
                let written = self.write_to(&mut encoder, epoch)?;
                // The trailer goes into the sink's buffer, which
                // write_atomically flushes and checks before the rename.
                encoder.finish().map_err(Error::Write)?;
                Ok(written)
            }
        })?;
        let file_bytes =
            fs::metadata(path).map_err(|source| Error::WriteImage { path: path.to_path_buf(), source })?.len();
        Ok(CpioSummary { entries: self.entries.len() as u64, archive_bytes, file_bytes })
    }
}

fn read_error(path: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |source| Error::ReadSource { path: path.to_path_buf(), source }
}

fn check_size(path: &Path, size: u64) -> Result<()> {
    if size > u64::from(u32::MAX) {
        return Err(Error::FileTooLarge { path: path.to_path_buf(), size });
    }
    Ok(())
}

fn copy_exact(src: &Path, size: u64, out: &mut impl Write) -> Result<()> {
    let read_error = |source| Error::ReadSource { path: src.to_path_buf(), source };
    let mut file = File::open(src).map_err(read_error)?.take(size);
    // Not io::copy: it would blame the source for the image's ENOSPC.
    let mut buffer = vec![0u8; COPY_BUFFER.min(size as usize)];
    let mut copied = 0u64;
    loop {
        let got = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(e)),
        };
        out.write_all(&buffer[..got]).map_err(Error::Write)?;
        copied += got as u64;
    }
    if copied != size {
        return Err(Error::SourceChanged { path: src.to_path_buf(), expected: size });
    }
    Ok(())
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    size: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

impl Header {
    fn write<W: Write>(&self, out: &mut CountingWriter<W>, name: &str) -> io::Result<()> {
        let namesize = name.len() as u32 + 1;
        let fields = [
            self.ino,
            self.mode,
            0,
            0,
            self.nlink,
            self.mtime,
            self.size,
            0,
            0,
            self.rdev_major,
            self.rdev_minor,
            namesize,
            0,
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        out.write_all(&header)?;
        out.pad()
    }
}

/// Counts bytes so entries can be padded to 4-byte boundaries.
struct CountingWriter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> CountingWriter<W> {
    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - self.written % 4) % 4;
        self.write_all(&[0u8; 3][..padding as usize])
    }
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first_and_layout_is_padded() {
        let mut archive = CpioArchive::new();
        archive.add_file_from_bytes("bin/kiln-init", b"\x7fELF".to_vec(), 0o755).unwrap();
        archive.add_char_device("dev/console", 0o600, 5, 1).unwrap();
        archive.add_symlink("init", "bin/kiln-init").unwrap();
        let mut out = Vec::new();
        let written = archive.write_to(&mut out, 0).unwrap();
        assert_eq!(written as usize, out.len());
        assert_eq!(out.len() % 4, 0);
        let names: Vec<String> = out
            .windows(6)
            .enumerate()
            .filter(|(_, w)| *w == MAGIC)
            .map(|(at, _)| {
                let namesize =
                    usize::from_str_radix(std::str::from_utf8(&out[at + 94..at + 102]).unwrap(), 16).unwrap();
                String::from_utf8_lossy(&out[at + HEADER_LEN..at + HEADER_LEN + namesize - 1]).into_owned()
            })
            .collect();
        assert_eq!(names, ["bin", "bin/kiln-init", "dev", "dev/console", "init", "TRAILER!!!"]);
    }

    #[test]
    fn escaping_paths_are_refused() {
        let mut archive = CpioArchive::new();
        for path in ["../etc/passwd", "a/./b", "", "x\0y"] {
            assert!(archive.add_file_from_bytes(path, Vec::new(), 0o644).is_err(), "{path:?}");
        }
        archive.add_file_from_bytes("a", Vec::new(), 0o644).unwrap();
        assert!(matches!(archive.add_dir("a/b", 0o755), Err(Error::NotADirectory { .. })));
        assert!(matches!(archive.add_symlink("a", "b"), Err(Error::AlreadyExists { .. })));
    }
}
