//! The input: a tree of directories and files, sources checked as they are added.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::names;
use crate::sink::Source;
use crate::{Error, Result};

/// The largest file FAT can hold: its size field is 32 bits.
pub(crate) const MAX_FILE_SIZE: u64 = u32::MAX as u64;

/// A tree of directories and files to put into a FAT image.
///
/// Names are checked as they are added: an invalid or colliding name is an
/// error naming the path at fault, so [`FatTree::layout`] only fails on
/// geometry. Entries are kept sorted by name, so the order of the `add_*`
/// calls does not change the image.
#[derive(Debug, Clone, Default)]
pub struct FatTree {
    pub(crate) root: Dir,
    secret: bool,
    files: u64,
    dirs: u64,
    data_bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Dir {
    pub(crate) children: BTreeMap<String, Node>,
    /// Upper-cased name -> name as given, to refuse names FAT would confuse.
    folded: HashMap<String, String>,
}

#[derive(Debug, Clone)]
pub(crate) enum Node {
    Dir(Dir),
    File(FileNode),
}

#[derive(Debug, Clone)]
pub(crate) struct FileNode {
    pub(crate) source: Source,
    pub(crate) size: u64,
}

impl FatTree {
    /// An empty tree: just the root directory.
    pub fn new() -> FatTree {
        FatTree::default()
    }

    /// Creates directory `dest` (and its parents). Existing directories are fine.
    pub fn add_dir(&mut self, dest: &str) -> Result<()> {
        let components = split_dest(dest)?;
        self.dir_mut(&components, dest).map(|_| ())
    }

    /// Adds a file at `dest` whose content is `bytes`.
    pub fn add_file_from_bytes(&mut self, dest: &str, bytes: impl Into<Vec<u8>>) -> Result<()> {
        let bytes: Arc<[u8]> = Arc::from(bytes.into());
        let size = bytes.len() as u64;
        if size > MAX_FILE_SIZE {
            return Err(Error::FileTooLarge { path: PathBuf::from(dest), size });
        }
        self.insert_file(dest, FileNode { source: Source::Bytes(bytes), size })
    }

    /// Adds the host file `src` at `dest`. Symlinks are followed; the content
    /// is read when the image is written, and must not change until then.
    pub fn add_file_from_path(&mut self, dest: &str, src: impl AsRef<Path>) -> Result<()> {
        let src = src.as_ref();
        let meta = stat(src)?;
        if meta.is_dir() {
            return Err(Error::UnsupportedFileType {
                path: src.to_path_buf(),
                kind: "directory where a file was expected",
            });
        }
        let node = host_file(src, &meta)?;
        self.insert_file(dest, node)?;
        self.secret |= crate::sink::is_private(&meta);
        Ok(())
    }

    /// Adds host path `src` at `dest`: a file becomes the file `dest`, a
    /// directory puts its contents (recursively, following symlinks) under
    /// directory `dest`. Use `""` as `dest` for the root.
    pub fn add_host_path(&mut self, dest: &str, src: impl AsRef<Path>) -> Result<()> {
        let src = src.as_ref();
        let meta = stat(src)?;
        if !meta.is_dir() {
            let node = host_file(src, &meta)?;
            self.insert_file(dest, node)?;
            self.secret |= crate::sink::is_private(&meta);
            return Ok(());
        }
        let components = split_dest(dest)?;
        let mut ancestors = HashSet::new();
        ancestors.insert((meta.dev(), meta.ino()));
        let mut counts = Counts::default();
        // Build the subtree aside, then graft it: a failure leaves `self` untouched.
        let mut staged = self.clone();
        let dir = staged.dir_mut(&components, dest)?;
        walk_host_dir(dir, src, &mut ancestors, &mut counts)?;
        staged.files += counts.files;
        staged.dirs += counts.dirs;
        staged.data_bytes += counts.data_bytes;
        staged.secret |= counts.private_files;
        *self = staged;
        Ok(())
    }

    /// Marks the tree as holding secrets (a keystore, say): files written by
    /// [`FatLayout::write_file`](crate::FatLayout::write_file) get mode 0600.
    pub fn mark_secret(&mut self) {
        self.secret = true;
    }

    /// Whether the tree is secret: [`FatTree::mark_secret`] was called, or a
    /// host file in it is one its group or others cannot read (FAT keeps no
    /// modes, so the image is never more readable than what went into it).
    pub fn is_secret(&self) -> bool {
        self.secret
    }

    /// Number of regular files in the tree.
    pub fn file_count(&self) -> u64 {
        self.files
    }

    /// Number of directories in the tree, not counting the root.
    pub fn dir_count(&self) -> u64 {
        self.dirs
    }

    /// Sum of the sizes of all files.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    fn insert_file(&mut self, dest: &str, node: FileNode) -> Result<()> {
        let mut components = split_dest(dest)?;
        let Some(name) = components.pop() else {
            return Err(Error::InvalidName { path: dest.to_owned(), reason: "a file needs a name".into() });
        };
        let size = node.size;
        let mut created = 0;
        let dir = walk_create(&mut self.root, &components, dest, &mut created)?;
        dir.insert(name, Node::File(node), dest)?;
        self.dirs += created;
        self.files += 1;
        self.data_bytes += size;
        Ok(())
    }

    fn dir_mut(&mut self, components: &[&str], dest: &str) -> Result<&mut Dir> {
        let mut created = 0;
        let dir = walk_create(&mut self.root, components, dest, &mut created)?;
        self.dirs += created;
        Ok(dir)
    }
}

fn walk_create<'d>(root: &'d mut Dir, components: &[&str], dest: &str, created: &mut u64) -> Result<&'d mut Dir> {
    let mut dir = root;
    for (depth, component) in components.iter().enumerate() {
        if !dir.children.contains_key(*component) {
            dir.insert(component, Node::Dir(Dir::default()), dest)?;
            *created += 1;
        }
        dir = match dir.children.get_mut(*component) {
            Some(Node::Dir(sub)) => sub,
            _ => return Err(Error::NotADirectory { path: components[..=depth].join("/") }),
        };
    }
    Ok(dir)
}

impl Dir {
    fn insert(&mut self, name: &str, node: Node, dest: &str) -> Result<()> {
        names::validate_long_name(name).map_err(|reason| Error::InvalidName { path: dest.to_owned(), reason })?;
        let folded = names::fold_case(name);
        if let Some(existing) = self.folded.get(&folded) {
            if existing == name {
                return Err(Error::AlreadyExists { path: dest.to_owned() });
            }
            return Err(Error::NameCollision {
                dir: parent_of(dest),
                first: existing.clone(),
                second: name.to_owned(),
            });
        }
        self.folded.insert(folded, name.to_owned());
        self.children.insert(name.to_owned(), node);
        Ok(())
    }
}

fn parent_of(dest: &str) -> String {
    let trimmed = dest.trim_matches('/');
    match trimmed.rfind('/') {
        Some(at) => trimmed[..at].to_owned(),
        None => "/".to_owned(),
    }
}

fn split_dest(dest: &str) -> Result<Vec<&str>> {
    let components: Vec<&str> = dest.split('/').filter(|c| !c.is_empty()).collect();
    for component in &components {
        names::validate_long_name(component).map_err(|reason| Error::InvalidName { path: dest.to_owned(), reason })?;
    }
    Ok(components)
}

#[derive(Default)]
struct Counts {
    files: u64,
    dirs: u64,
    data_bytes: u64,
    /// Whether a file that group or others cannot read was seen.
    private_files: bool,
}

fn stat(path: &Path) -> Result<fs::Metadata> {
    fs::metadata(path).map_err(|source| {
        if source.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
            Error::SymlinkLoop { path: path.to_path_buf() }
        } else {
            Error::ReadSource { path: path.to_path_buf(), source }
        }
    })
}

fn host_file(path: &Path, meta: &fs::Metadata) -> Result<FileNode> {
    let file_type = meta.file_type();
    let kind = if file_type.is_file() {
        None
    } else if file_type.is_socket() {
        Some("socket")
    } else if file_type.is_fifo() {
        Some("named pipe")
    } else if file_type.is_block_device() {
        Some("block device")
    } else if file_type.is_char_device() {
        Some("character device")
    } else {
        Some("special file")
    };
    if let Some(kind) = kind {
        return Err(Error::UnsupportedFileType { path: path.to_path_buf(), kind });
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(Error::FileTooLarge { path: path.to_path_buf(), size: meta.len() });
    }
    // Fail now, not halfway through writing, on a file we cannot open.
    fs::File::open(path).map_err(|source| Error::ReadSource { path: path.to_path_buf(), source })?;
    Ok(FileNode { source: Source::Host(path.to_path_buf()), size: meta.len() })
}

fn walk_host_dir(dir: &mut Dir, src: &Path, ancestors: &mut HashSet<(u64, u64)>, counts: &mut Counts) -> Result<()> {
    let read_dir = fs::read_dir(src).map_err(|source| Error::ReadSource { path: src.to_path_buf(), source })?;
    let mut entries = Vec::new();
    for entry in read_dir {
        let entry = entry.map_err(|source| Error::ReadSource { path: src.to_path_buf(), source })?;
        entries.push(entry.path());
    }
    entries.sort();
    for path in entries {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return Err(Error::InvalidName {
                path: path.display().to_string(),
                reason: "the name is not valid UTF-8".into(),
            });
        };
        let name = name.to_owned();
        let host_path = path.display().to_string();
        let meta = stat(&path)?;
        if meta.is_dir() {
            let key = (meta.dev(), meta.ino());
            if !ancestors.insert(key) {
                return Err(Error::SymlinkLoop { path });
            }
            let mut sub = Dir::default();
            walk_host_dir(&mut sub, &path, ancestors, counts)?;
            ancestors.remove(&key);
            dir.insert(&name, Node::Dir(sub), &host_path)?;
            counts.dirs += 1;
        } else {
            let node = host_file(&path, &meta)?;
            counts.files += 1;
            counts.data_bytes += node.size;
            counts.private_files |= crate::sink::is_private(&meta);
            dir.insert(&name, Node::File(node), &host_path)?;
        }
    }
    Ok(())
}
