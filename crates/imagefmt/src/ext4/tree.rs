//! The input: a tree of directories, files and symlinks, each with its
//! POSIX metadata, checked as entries are added.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use super::{MAX_FILE_BYTES, MAX_NAME_BYTES, MAX_SYMLINK_BYTES, Metadata};
use crate::sink::Source;
use crate::{Error, Result};

/// The directory the writer makes at the root for `e2fsck` to reconnect
/// orphans into; a tree cannot put its own entry there.
pub(crate) const LOST_AND_FOUND: &str = "lost+found";

/// A tree of directories, regular files and symlinks to put into an ext4
/// image, every entry with its mode, owner and modification time.
///
/// Names are checked as they are added (at most 255 bytes, no `/`, no NUL,
/// neither `.` nor `..`), so [`Ext4Tree::layout`](Ext4Tree::layout) only
/// fails on geometry. Entries are kept sorted by name, so the order of the
/// `add_*` calls does not change the image. Parents are created as needed
/// with mode 0755, owner 0:0 and time 0; [`Ext4Tree::add_dir`] on an
/// existing directory sets its metadata.
///
/// ```
/// use kiln_imagefmt::{Ext4Options, Ext4Tree, Metadata};
///
/// let mut tree = Ext4Tree::new();
/// let root_owned = Metadata::default().with_mtime(1_700_000_000, 0);
/// tree.add_dir("etc", root_owned.with_mode(0o755))?;
/// tree.add_file_from_bytes("etc/motd", b"kiln\n".to_vec(), root_owned)?;
/// tree.add_file_from_bytes("bin/tool", vec![0x7f, b'E'], root_owned.with_mode(0o4755))?;
/// tree.add_symlink("etc/issue", "motd", root_owned.with_owner(1000, 1000))?;
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
    secret: bool,
    pub(crate) counts: Counts,
}

/// How many entries of each kind a tree holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) files: u64,
    /// Not counting the root.
    pub(crate) dirs: u64,
    pub(crate) symlinks: u64,
    pub(crate) data_bytes: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Dir {
    pub(crate) meta: Metadata,
    pub(crate) children: BTreeMap<String, Node>,
}

#[derive(Debug, Clone)]
pub(crate) enum Node {
    Dir(Dir),
    File(FileNode),
    Symlink(SymlinkNode),
}

#[derive(Debug, Clone)]
pub(crate) struct FileNode {
    pub(crate) meta: Metadata,
    pub(crate) source: Source,
    pub(crate) size: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct SymlinkNode {
    pub(crate) meta: Metadata,
    pub(crate) target: String,
}

impl Default for Ext4Tree {
    fn default() -> Ext4Tree {
        Ext4Tree { root: Dir::implied(), secret: false, counts: Counts::default() }
    }
}

impl Dir {
    fn implied() -> Dir {
        Dir { meta: Metadata::default().with_mode(0o755), children: BTreeMap::new() }
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
        let dir = walk_create(&mut self.root, &components, dest, &mut created)?;
        dir.meta = meta;
        self.counts.dirs += created;
        Ok(())
    }

    /// Adds a regular file at `dest` whose content is `bytes`.
    pub fn add_file_from_bytes(&mut self, dest: &str, bytes: impl Into<Vec<u8>>, meta: Metadata) -> Result<()> {
        let bytes: Arc<[u8]> = Arc::from(bytes.into());
        let size = bytes.len() as u64;
        self.insert_file(dest, FileNode { meta, source: Source::Bytes(bytes), size })
    }

    /// Adds the host file `src` (symlinks followed) at `dest`, with `meta`
    /// rather than the host file's own metadata, so that no root is needed
    /// to give it an owner. The content is read when the image is written
    /// and must not change until then.
    pub fn add_file_from_path(&mut self, dest: &str, src: impl AsRef<Path>, meta: Metadata) -> Result<()> {
        let src = src.as_ref();
        let read_error = |source| Error::ReadSource { path: src.to_path_buf(), source };
        let host = fs::metadata(src).map_err(read_error)?;
        if !host.file_type().is_file() {
            return Err(Error::UnsupportedFileType { path: src.to_path_buf(), kind: "not a regular file" });
        }
        // Fail now, not halfway through writing, on a file we cannot open.
        fs::File::open(src).map_err(read_error)?;
        self.insert_file(dest, FileNode { meta, source: Source::Host(src.to_path_buf()), size: host.size() })?;
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
        let node = SymlinkNode { meta: meta.with_mode(0o777), target: target.to_owned() };
        self.insert(dest, Node::Symlink(node))?;
        self.counts.symlinks += 1;
        Ok(())
    }

    /// Whether a host file in the tree is one its group or others cannot
    /// read: the image file is then written with mode 0600.
    pub fn is_secret(&self) -> bool {
        self.secret
    }

    /// Number of regular files in the tree.
    pub fn file_count(&self) -> u64 {
        self.counts.files
    }

    /// Number of directories in the tree, not counting the root.
    pub fn dir_count(&self) -> u64 {
        self.counts.dirs
    }

    /// Sum of the sizes of all regular files.
    pub fn data_bytes(&self) -> u64 {
        self.counts.data_bytes
    }

    fn insert_file(&mut self, dest: &str, node: FileNode) -> Result<()> {
        if node.size > MAX_FILE_BYTES {
            return Err(Error::Ext4FileTooLarge { path: dest.to_owned(), size: node.size, max: MAX_FILE_BYTES });
        }
        check_meta(dest, node.meta)?;
        let size = node.size;
        self.insert(dest, Node::File(node))?;
        self.counts.files += 1;
        self.counts.data_bytes += size;
        Ok(())
    }

    fn insert(&mut self, dest: &str, node: Node) -> Result<()> {
        let mut components = split_dest(dest)?;
        let Some(name) = components.pop() else {
            return Err(invalid(dest, "only a directory can be the root".into()));
        };
        if components.is_empty() && name == LOST_AND_FOUND {
            return Err(invalid(dest, "the writer makes /lost+found itself".into()));
        }
        let mut created = 0;
        let dir = walk_create(&mut self.root, &components, dest, &mut created)?;
        if dir.children.contains_key(name) {
            return Err(Error::AlreadyExists { path: dest.to_owned() });
        }
        dir.children.insert(name.to_owned(), node);
        self.counts.dirs += created;
        Ok(())
    }
}

fn walk_create<'d>(root: &'d mut Dir, components: &[&str], dest: &str, created: &mut u64) -> Result<&'d mut Dir> {
    let mut dir = root;
    for (depth, component) in components.iter().enumerate() {
        if depth == 0 && *component == LOST_AND_FOUND {
            return Err(invalid(dest, "the writer makes /lost+found itself".into()));
        }
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
fn split_dest(dest: &str) -> Result<Vec<&str>> {
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

fn check_meta(dest: &str, meta: Metadata) -> Result<()> {
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

fn invalid(dest: &str, reason: String) -> Error {
    Error::InvalidExt4Entry { path: dest.to_owned(), reason }
}
