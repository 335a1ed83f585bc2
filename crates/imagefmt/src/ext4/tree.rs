//! The input: a tree of directories, files, symlinks, hard links, device
//! nodes and fifos, each with its POSIX metadata and extended attributes,
//! checked as entries are added.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use super::xattr::{self, Xattr};
use super::{DeviceKind, MAX_FILE_BYTES, MAX_NAME_BYTES, MAX_SYMLINK_BYTES, Metadata};
use crate::sink::Source;
use crate::{Error, Result};

/// The directory the writer makes at the root for `e2fsck` to reconnect
/// orphans into; a tree's own entry of that name is refused at layout
/// unless [`Ext4Options::lost_found`](super::Ext4Options) is off.
pub(crate) const LOST_AND_FOUND: &str = "lost+found";
/// The largest device numbers Linux encodes: 12 bits of major, 20 of minor.
const MAX_MAJOR: u32 = (1 << 12) - 1;
const MAX_MINOR: u32 = (1 << 20) - 1;

/// A tree of directories, regular files (sparse ones too), symlinks, hard
/// links, device nodes and fifos to put into an ext4 image, every entry with
/// its mode, owner, modification time and extended attributes.
///
/// Names are checked as they are added (at most 255 bytes, no `/`, no NUL,
/// neither `.` nor `..`), so [`Ext4Tree::layout`](Ext4Tree::layout) only
/// fails on geometry. Entries are kept sorted by name, so the order of the
/// `add_*` calls does not change the image. Parents are created as needed
/// with mode 0755, owner 0:0 and time 0; [`Ext4Tree::add_dir`] on an
/// existing directory sets its metadata.
///
/// ```
/// use kiln_imagefmt::{DeviceKind, Ext4Options, Ext4Tree, Metadata};
///
/// let mut tree = Ext4Tree::new();
/// let root_owned = Metadata::default().with_mtime(1_700_000_000, 0);
/// tree.add_dir("etc", root_owned.with_mode(0o755))?;
/// tree.add_file_from_bytes("etc/motd", b"kiln\n".to_vec(), root_owned)?;
/// tree.add_file_from_bytes("bin/tool", vec![0x7f, b'E'], root_owned.with_mode(0o4755))?;
/// tree.set_xattr("bin/tool", "security.capability", &[0; 20])?;
/// tree.add_hardlink("bin/tool-again", "bin/tool")?;
/// tree.add_symlink("etc/issue", "motd", root_owned.with_owner(1000, 1000))?;
/// tree.add_device("dev/null", DeviceKind::Char, 1, 3, root_owned.with_mode(0o666))?;
/// // 1 GiB, of which only the last byte is data: the rest is a hole.
/// tree.add_file_from_segments("var/sparse", 1 << 30, vec![((1 << 30) - 1, b"!".to_vec())], root_owned)?;
/// let layout = tree.layout(&Ext4Options::default().with_label("root"))?;
/// let mut image = std::io::Cursor::new(Vec::new());
/// layout.write_to(&mut image)?;
/// assert_eq!(image.get_ref().len() as u64, layout.summary().image_bytes);
/// assert_eq!(&image.get_ref()[0x438..0x43a], &[0x53, 0xEF]); // the ext4 magic
/// # Ok::<(), kiln_imagefmt::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Ext4Tree {
    pub(crate) root: Dir,
    pub(crate) secret: bool,
    pub(crate) counts: Counts,
    /// Every entry's time in the image, when set ([`Ext4Tree::set_epoch`]).
    pub(crate) epoch: Option<i64>,
}

/// How many entries of each kind a tree holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) files: u64,
    /// Not counting the root.
    pub(crate) dirs: u64,
    pub(crate) symlinks: u64,
    pub(crate) hardlinks: u64,
    /// Devices and fifos.
    pub(crate) specials: u64,
    pub(crate) data_bytes: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Dir {
    pub(crate) meta: Metadata,
    pub(crate) xattrs: Vec<Xattr>,
    pub(crate) children: BTreeMap<String, Node>,
}

#[derive(Debug, Clone)]
pub(crate) enum Node {
    Dir(Dir),
    File(FileNode),
    Symlink(SymlinkNode),
    Special(SpecialNode),
    /// Another name for the entry at this path (never a directory, never
    /// itself a hard link: links to links are resolved when added).
    Hardlink(String),
}

/// A byte range of a file that holds data; the rest is holes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DataRange {
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct FileNode {
    pub(crate) meta: Metadata,
    pub(crate) xattrs: Vec<Xattr>,
    /// A host file, or the bytes of the data ranges one after the other.
    pub(crate) source: Source,
    pub(crate) size: u64,
    /// Where the data is, sorted and disjoint; `None` for a file with no holes.
    pub(crate) ranges: Option<Box<[DataRange]>>,
}

#[derive(Debug, Clone)]
pub(crate) struct SymlinkNode {
    pub(crate) meta: Metadata,
    pub(crate) xattrs: Vec<Xattr>,
    pub(crate) target: String,
}

/// A device node or fifo: an inode with no data.
#[derive(Debug, Clone)]
pub(crate) struct SpecialNode {
    pub(crate) meta: Metadata,
    pub(crate) xattrs: Vec<Xattr>,
    pub(crate) kind: SpecialKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpecialKind {
    Device { kind: DeviceKind, major: u32, minor: u32 },
    Fifo,
}

impl FileNode {
    /// The data ranges: the whole file unless it has holes.
    pub(crate) fn data_ranges(&self) -> std::borrow::Cow<'_, [DataRange]> {
        match &self.ranges {
            Some(ranges) => std::borrow::Cow::Borrowed(ranges),
            None if self.size == 0 => std::borrow::Cow::Borrowed(&[]),
            None => std::borrow::Cow::Owned(vec![DataRange { offset: 0, len: self.size }]),
        }
    }
}

impl Default for Ext4Tree {
    fn default() -> Ext4Tree {
        Ext4Tree { root: Dir::implied(), secret: false, counts: Counts::default(), epoch: None }
    }
}

impl Dir {
    fn implied() -> Dir {
        Dir { meta: Metadata::default().with_mode(0o755), xattrs: Vec::new(), children: BTreeMap::new() }
    }

    /// Rebuilds the directory's map from its sorted entries, which packs
    /// its nodes full: inserted one by one in name order, as a walk adds
    /// them, a `BTreeMap` leaves its nodes about half empty (on a tree of
    /// 120,000 small files, a fifth of the peak memory).
    fn compact(&mut self) {
        let children = std::mem::take(&mut self.children);
        self.children = children.into_iter().collect();
    }
}

impl Node {
    fn xattrs_mut(&mut self) -> Option<&mut Vec<Xattr>> {
        match self {
            Node::Dir(dir) => Some(&mut dir.xattrs),
            Node::File(file) => Some(&mut file.xattrs),
            Node::Symlink(link) => Some(&mut link.xattrs),
            Node::Special(special) => Some(&mut special.xattrs),
            Node::Hardlink(_) => None,
        }
    }
}

impl Ext4Tree {
    /// An empty tree: just the root directory (mode 0755, owner 0:0).
    pub fn new() -> Ext4Tree {
        Ext4Tree::default()
    }

    /// Creates directory `dest` (and its parents) with `meta`, or sets the
    /// metadata of the directory already there. `""` or `"/"` is the root.
    pub fn add_dir(&mut self, dest: &str, meta: Metadata) -> Result<()> {
        let components = split_dest(dest)?;
        check_meta(dest, meta)?;
        let mut created = 0;
        let dir = walk_create(&mut self.root, &components, &mut created)?;
        dir.meta = meta;
        self.counts.dirs += created;
        Ok(())
    }

    /// Adds a regular file at `dest` whose content is `bytes`.
    pub fn add_file_from_bytes(&mut self, dest: &str, bytes: impl Into<Vec<u8>>, meta: Metadata) -> Result<()> {
        let bytes: Arc<[u8]> = Arc::from(bytes.into());
        let size = bytes.len() as u64;
        self.insert_file(dest, FileNode { meta, xattrs: Vec::new(), source: Source::Bytes(bytes), size, ranges: None })
    }

    /// Adds a sparse regular file of `size` bytes at `dest`: each segment is
    /// (offset, bytes), and everything between them reads as zeros and
    /// takes no blocks (holes). Segments must not overlap or reach past
    /// `size`; their order does not matter.
    pub fn add_file_from_segments(
        &mut self,
        dest: &str,
        size: u64,
        segments: impl IntoIterator<Item = (u64, Vec<u8>)>,
        meta: Metadata,
    ) -> Result<()> {
        let mut segments: Vec<(u64, Vec<u8>)> = segments.into_iter().filter(|(_, bytes)| !bytes.is_empty()).collect();
        segments.sort_by_key(|(offset, _)| *offset);
        let mut ranges = Vec::with_capacity(segments.len());
        let mut data = Vec::new();
        let mut end = 0u64;
        for (offset, bytes) in &segments {
            let len = bytes.len() as u64;
            if *offset < end || offset.checked_add(len).is_none_or(|stop| stop > size) {
                return Err(invalid(
                    dest,
                    format!("segment at {offset} ({len} bytes) overlaps another or ends past the size {size}"),
                ));
            }
            ranges.push(DataRange { offset: *offset, len });
            data.extend_from_slice(bytes);
            end = offset + len;
        }
        let source = Source::Bytes(Arc::from(data));
        self.insert_file(dest, FileNode { meta, xattrs: Vec::new(), source, size, ranges: Some(ranges.into()) })
    }

    /// Adds the host file `src` (symlinks followed) at `dest`, with `meta`
    /// rather than the host file's own metadata, so that no root is needed
    /// to give it an owner. Its holes (found with `SEEK_HOLE` now, when the
    /// host says it has fewer blocks than bytes) stay holes. The content is
    /// read when the image is written and must not change until then.
    pub fn add_file_from_path(&mut self, dest: &str, src: impl AsRef<Path>, meta: Metadata) -> Result<()> {
        let src = src.as_ref();
        let read_error = |source| Error::ReadSource { path: src.to_path_buf(), source };
        let host = fs::metadata(src).map_err(read_error)?;
        if !host.file_type().is_file() {
            return Err(Error::UnsupportedFileType { path: src.to_path_buf(), kind: "not a regular file" });
        }
        // Fail now, not halfway through writing, on a file we cannot open.
        let file = fs::File::open(src).map_err(read_error)?;
        let ranges = super::host::data_ranges(&file, &host).map_err(read_error)?;
        let source = Source::Host(src.to_path_buf());
        self.insert_file(dest, FileNode { meta, xattrs: Vec::new(), source, size: host.size(), ranges })?;
        self.secret |= crate::sink::is_private(&host);
        Ok(())
    }

    /// Adds a regular file at `dest` whose content is the `len` bytes of
    /// host file `src` from byte `offset`: a member of an uncompressed
    /// archive, such as a cached layer tar, copied without unpacking it.
    /// `src` is shared (an `Arc`), so a tree of many members of one archive
    /// holds its path once. The host file must hold those bytes now and
    /// when the image is written (it may be longer); else `SourceChanged`
    /// then.
    pub fn add_file_from_host_range(
        &mut self,
        dest: &str,
        src: &Arc<Path>,
        offset: u64,
        len: u64,
        meta: Metadata,
    ) -> Result<()> {
        let read_error = |source| Error::ReadSource { path: src.to_path_buf(), source };
        let host = fs::metadata(src).map_err(read_error)?;
        if !host.file_type().is_file() {
            return Err(Error::UnsupportedFileType { path: src.to_path_buf(), kind: "not a regular file" });
        }
        let needed = offset.checked_add(len).filter(|&end| end <= host.size());
        if needed.is_none() {
            return Err(invalid(
                dest,
                format!("{len} bytes from {offset} are past the end of {} ({} bytes)", src.display(), host.size()),
            ));
        }
        let source = Source::HostRange { path: Arc::clone(src), offset };
        self.insert_file(dest, FileNode { meta, xattrs: Vec::new(), source, size: len, ranges: None })?;
        self.secret |= crate::sink::is_private(&host);
        Ok(())
    }

    /// Adds a symbolic link at `dest` pointing at `target` (stored as
    /// given, never resolved). A link's mode is always 0777; `meta` gives
    /// its owner and time.
    pub fn add_symlink(&mut self, dest: &str, target: &str, meta: Metadata) -> Result<()> {
        if target.is_empty() || target.len() > MAX_SYMLINK_BYTES || target.contains('\0') {
            return Err(invalid(dest, format!("a symlink target is 1 to {MAX_SYMLINK_BYTES} bytes with no NUL")));
        }
        check_meta(dest, meta.with_mode(0o777))?;
        let node = SymlinkNode { meta: meta.with_mode(0o777), xattrs: Vec::new(), target: target.to_owned() };
        self.insert(dest, Node::Symlink(node))?;
        self.counts.symlinks += 1;
        Ok(())
    }

    /// Adds `dest` as another name (a hard link) for the entry at
    /// `existing`, which must already be in the tree and not be a
    /// directory. Both names share one inode: its metadata, content and
    /// xattrs, and a link count of the names it has.
    pub fn add_hardlink(&mut self, dest: &str, existing: &str) -> Result<()> {
        let target = split_dest(existing)?;
        if target.is_empty() {
            return Err(invalid(dest, "the hard link's target is the root directory".into()));
        }
        let resolved = match find_mut(&mut self.root, &target) {
            None => return Err(invalid(dest, format!("the hard link's target {existing:?} is not in the tree"))),
            Some(Node::Dir(_)) => {
                return Err(invalid(dest, format!("the hard link's target {existing:?} is a directory")));
            }
            Some(Node::Hardlink(to)) => to.clone(),
            Some(_) => target.join("/"),
        };
        self.insert(dest, Node::Hardlink(resolved))?;
        self.counts.hardlinks += 1;
        Ok(())
    }

    /// Adds a character or block device node at `dest` with device number
    /// `major:minor` (at most 4095:1048575, what Linux encodes).
    pub fn add_device(&mut self, dest: &str, kind: DeviceKind, major: u32, minor: u32, meta: Metadata) -> Result<()> {
        if major > MAX_MAJOR || minor > MAX_MINOR {
            return Err(invalid(dest, format!("device {major}:{minor} is past {MAX_MAJOR}:{MAX_MINOR}")));
        }
        self.insert_special(dest, SpecialKind::Device { kind, major, minor }, meta)
    }

    /// Adds a named pipe (fifo) at `dest`.
    pub fn add_fifo(&mut self, dest: &str, meta: Metadata) -> Result<()> {
        self.insert_special(dest, SpecialKind::Fifo, meta)
    }

    /// Sets extended attribute `name` of the entry at `dest` (`""` is the
    /// root; a hard link sets its inode's) to `value`, replacing one of the
    /// same name. Names are `user.*`, `trusted.*`, `security.*` (such as
    /// `security.capability`), or `system.posix_acl_access` and
    /// `system.posix_acl_default`, whose value is the ACL as `getxattr`
    /// returns it (converted to ext4's own form here). They are stored in
    /// the inode while they fit, then in one external block: more than that
    /// holds is an error naming the entry.
    pub fn set_xattr(&mut self, dest: &str, name: &str, value: &[u8]) -> Result<()> {
        let xattr = Xattr::new(name, value).map_err(|reason| invalid(dest, reason))?;
        let mut components = split_dest(dest)?;
        let target_path;
        if let Some(Node::Hardlink(to)) = find_mut(&mut self.root, &components) {
            target_path = to.clone();
            components = target_path.split('/').collect();
        }
        let xattrs = match find_mut(&mut self.root, &components) {
            None if components.is_empty() => &mut self.root.xattrs,
            Some(Node::Symlink(_) | Node::Special(_)) if name.starts_with("user.") || name.starts_with("system.") => {
                return Err(invalid(
                    dest,
                    format!(
                        "xattr {name:?}: user.* and ACLs are for regular files and directories only, as Linux allows"
                    ),
                ));
            }
            Some(Node::File(_)) if name == "system.posix_acl_default" => {
                return Err(invalid(dest, "a default ACL is for directories only, as Linux allows".into()));
            }
            Some(node) => node.xattrs_mut().ok_or_else(|| invalid(dest, "a hard link to a hard link".into()))?,
            None => return Err(invalid(dest, format!("no entry to set xattr {name:?} on"))),
        };
        let mut updated = xattrs.clone();
        xattr::insert(&mut updated, xattr);
        if let Err(needed) = xattr::split(&updated) {
            return Err(invalid(
                dest,
                format!("its xattrs need {needed} bytes outside the inode; one xattr block holds {}", super::BLOCK),
            ));
        }
        *xattrs = updated;
        Ok(())
    }

    /// Stamps every entry, whatever time it was added with, with `seconds`
    /// (and 0 ns) in the image, as `--epoch` asks; `None` keeps each
    /// entry's own time. Applies to the whole tree, whenever it is called.
    pub fn set_epoch(&mut self, seconds: Option<i64>) -> Result<()> {
        if let Some(seconds) = seconds {
            check_meta("(epoch)", Metadata::default().with_mtime(seconds, 0))?;
        }
        self.epoch = seconds;
        Ok(())
    }

    /// Has the image written with mode 0600, as if the tree held a private
    /// host file (for a disk that will hold private data, like a data disk).
    pub fn mark_secret(&mut self) {
        self.secret = true;
    }

    /// Whether a host file in the tree is one its group or others cannot
    /// read: the image file is then written with mode 0600.
    pub fn is_secret(&self) -> bool {
        self.secret
    }

    /// Number of regular files (inodes, not names) in the tree.
    pub fn file_count(&self) -> u64 {
        self.counts.files
    }

    /// Number of directories in the tree, not counting the root.
    pub fn dir_count(&self) -> u64 {
        self.counts.dirs
    }

    /// Sum of the sizes of all regular files, holes included.
    pub fn data_bytes(&self) -> u64 {
        self.counts.data_bytes
    }

    pub(crate) fn insert_file(&mut self, dest: &str, node: FileNode) -> Result<()> {
        if node.size > MAX_FILE_BYTES {
            return Err(Error::Ext4FileTooLarge { path: dest.to_owned(), size: node.size, max: MAX_FILE_BYTES });
        }
        check_meta(dest, node.meta)?;
        let size = node.size;
        self.insert(dest, Node::File(node))?;
        self.counts.files += 1;
        self.counts.data_bytes = self.counts.data_bytes.saturating_add(size);
        Ok(())
    }

    fn insert_special(&mut self, dest: &str, kind: SpecialKind, meta: Metadata) -> Result<()> {
        check_meta(dest, meta)?;
        self.insert(dest, Node::Special(SpecialNode { meta, xattrs: Vec::new(), kind }))?;
        self.counts.specials += 1;
        Ok(())
    }

    pub(crate) fn insert(&mut self, dest: &str, node: Node) -> Result<()> {
        let mut components = split_dest(dest)?;
        let Some(name) = components.pop() else {
            return Err(invalid(dest, "only a directory can be the root".into()));
        };
        let mut created = 0;
        let dir = walk_create(&mut self.root, &components, &mut created)?;
        if dir.children.contains_key(name) {
            return Err(Error::AlreadyExists { path: dest.to_owned() });
        }
        dir.children.insert(name.to_owned(), node);
        self.counts.dirs += created;
        Ok(())
    }
}

/// The node at `components` below `root`, if there is one (`None` for the root itself).
impl Ext4Tree {
    /// Packs directory `dest`'s map once its entries are all added ([`Dir::compact`]).
    pub(crate) fn compact_dir(&mut self, dest: &str) {
        let components: Vec<&str> = dest.split('/').filter(|c| !c.is_empty()).collect();
        match find_mut(&mut self.root, &components) {
            Some(Node::Dir(dir)) => dir.compact(),
            None if components.is_empty() => self.root.compact(),
            _ => {}
        }
    }
}

fn find_mut<'d>(root: &'d mut Dir, components: &[&str]) -> Option<&'d mut Node> {
    let (last, parents) = components.split_last()?;
    let mut dir = root;
    for component in parents {
        match dir.children.get_mut(*component) {
            Some(Node::Dir(sub)) => dir = sub,
            _ => return None,
        }
    }
    dir.children.get_mut(*last)
}

fn walk_create<'d>(root: &'d mut Dir, components: &[&str], created: &mut u64) -> Result<&'d mut Dir> {
    let mut dir = root;
    for (depth, component) in components.iter().enumerate() {
        if !dir.children.contains_key(*component) {
            dir.children.insert((*component).to_owned(), Node::Dir(Dir::implied()));
            *created += 1;
        }
        dir = match dir.children.get_mut(*component) {
            Some(Node::Dir(sub)) => sub,
            _ => return Err(Error::NotADirectory { path: components[..=depth].join("/") }),
        };
    }
    Ok(dir)
}

/// Splits `dest` at `/`, ignoring empty components (so `/a//b/` is `a/b`),
/// and checks every name.
pub(crate) fn split_dest(dest: &str) -> Result<Vec<&str>> {
    let components: Vec<&str> = dest.split('/').filter(|c| !c.is_empty()).collect();
    for component in &components {
        if *component == "." || *component == ".." {
            return Err(invalid(dest, format!("{component:?} cannot be a name in an image")));
        }
        if component.len() > MAX_NAME_BYTES {
            return Err(invalid(dest, format!("{} bytes in one name; ext4 allows {MAX_NAME_BYTES}", component.len())));
        }
        if component.contains('\0') {
            return Err(invalid(dest, "a name cannot hold a NUL byte".into()));
        }
    }
    Ok(components)
}

pub(crate) fn check_meta(dest: &str, meta: Metadata) -> Result<()> {
    if meta.mode & !0o7777 != 0 {
        return Err(invalid(dest, format!("mode {:o} has bits beyond 07777", meta.mode)));
    }
    if !super::disk::TIME_RANGE.contains(&meta.mtime) {
        return Err(invalid(
            dest,
            format!("time {} s is outside what ext4 stores (1901-12-13 to 2446-05-10)", meta.mtime),
        ));
    }
    if meta.mtime_nsec >= 1_000_000_000 {
        return Err(invalid(dest, format!("{} nanoseconds is a second or more", meta.mtime_nsec)));
    }
    Ok(())
}

pub(crate) fn invalid(dest: &str, reason: String) -> Error {
    Error::InvalidExt4Entry { path: dest.to_owned(), reason }
}
