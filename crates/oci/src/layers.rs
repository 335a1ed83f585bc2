//! OCI layer semantics (image-spec `layer.md`) and the ext4 tree of one
//! layer chain step.
//!
//! Layers are replayed, in order, into a merged tree that holds metadata
//! only: a regular file is the layer and byte range of its data in that
//! layer's tar. Each layer is read once, its entries collected, then its
//! whiteouts (`.wh.NAME`, `.wh..wh..opq`) applied to what the layers below
//! made (the spec: a whiteout never hides an entry of its own layer,
//! whatever the order in the tar), then its other entries in tar order.
//!
//! A chain step's tree is what overlayfs needs as the upper layers'
//! lowerdir over the lower layers' filesystems: the merged tree after the
//! lower layers is kept, and the final one is compared against it. Names
//! of the lower that are gone get a whiteout (char device 0:0); a
//! directory that was recreated (removed, or made opaque, and made again)
//! gets `trusted.overlay.opaque=y`; a file (any non-directory inode) the
//! uppers created, or whose set of names they changed (a hard link added
//! to a lower file, one of its names removed), is written with all its
//! names, so that link counts are right in the overlay.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_imagefmt::{DeviceKind, Ext4Tree, Metadata};

use crate::tar::{EntryKind, TarEntry, TarError, TarReader};
use crate::{Error, Result};

/// The prefix of whiteout names, and the name of the opaque marker.
const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Xattrs under this prefix steer overlayfs (whiteouts, opaque dirs,
/// redirects, metacopy): a layer may not set them.
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";

/// A layer as an uncompressed tar file (in the cache), and the label that
/// names it in errors (its diff_id, or its index).
#[derive(Debug, Clone)]
pub struct LayerTar {
    path: Arc<Path>,
    label: String,
}

impl LayerTar {
    /// The layer whose uncompressed tar is at `path`, named `label` in errors.
    pub fn new(path: impl AsRef<Path>, label: impl Into<String>) -> LayerTar {
        LayerTar { path: Arc::from(path.as_ref()), label: label.into() }
    }
}

/// The ext4 tree of a layer chain step of image `image` (a label for
/// errors): what the `upper` layers, applied in order over the `lower`
/// ones, change, in overlayfs's format (see the module doc). With no
/// lower layers it is the whole image flattened. Only metadata is held:
/// each regular file's data is a byte range of its layer's tar, read when
/// the tree is written.
///
/// Hostile entries are refused with an error naming the entry, the layer
/// and the image: an absolute path, a `..` component, a path through a
/// symlink or a file, a hard link to nothing or to a directory, a size
/// that runs past the end of the tar, a `trusted.overlay.*` xattr, a
/// character device 0:0 (an overlayfs whiteout), names ext4 cannot hold.
pub fn layer_tree(image: &str, lower: &[LayerTar], upper: &[LayerTar]) -> Result<Ext4Tree> {
    build(image, lower, upper)
}

/// Where layers come from: files for [`layer_tree`], memory for the fuzzer.
pub(crate) trait LayerSource {
    type Reader: Read + Seek;
    fn label(&self) -> &str;
    /// The file it is, for errors.
    fn location(&self) -> PathBuf;
    fn open(&self) -> io::Result<Self::Reader>;
    /// Adds a file whose data is `size` bytes of the layer from `offset`.
    fn add_file(
        &self,
        tree: &mut Ext4Tree,
        dest: &str,
        offset: u64,
        size: u64,
        meta: Metadata,
    ) -> kiln_imagefmt::Result<()>;
}

impl LayerSource for LayerTar {
    type Reader = File;

    fn label(&self) -> &str {
        &self.label
    }

    fn location(&self) -> PathBuf {
        self.path.to_path_buf()
    }

    fn open(&self) -> io::Result<File> {
        File::open(&self.path)
    }

    fn add_file(
        &self,
        tree: &mut Ext4Tree,
        dest: &str,
        offset: u64,
        size: u64,
        meta: Metadata,
    ) -> kiln_imagefmt::Result<()> {
        tree.add_file_from_host_range(dest, &self.path, offset, size, meta)
    }
}

/// A layer held in memory (for the fuzzer): its data is copied into the tree.
pub(crate) struct BytesLayer<'b> {
    pub(crate) bytes: &'b [u8],
    pub(crate) label: String,
}

impl<'b> LayerSource for BytesLayer<'b> {
    type Reader = io::Cursor<&'b [u8]>;

    fn label(&self) -> &str {
        &self.label
    }

    fn location(&self) -> PathBuf {
        PathBuf::from("(memory)")
    }

    fn open(&self) -> io::Result<Self::Reader> {
        Ok(io::Cursor::new(self.bytes))
    }

    fn add_file(
        &self,
        tree: &mut Ext4Tree,
        dest: &str,
        offset: u64,
        size: u64,
        meta: Metadata,
    ) -> kiln_imagefmt::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.bytes.len());
        let end = usize::try_from(offset.saturating_add(size)).unwrap_or(usize::MAX).min(self.bytes.len());
        tree.add_file_from_bytes(dest, self.bytes[start..end].to_vec(), meta)
    }
}

/// Which layers an error is about, by index into lower then upper.
struct Context<'l, L> {
    image: &'l str,
    layers: Vec<&'l L>,
}

impl<L: LayerSource> Context<'_, L> {
    fn bad(&self, layer: usize, entry: &str, reason: impl Into<String>) -> Error {
        Error::BadLayerEntry {
            image: self.image.to_owned(),
            layer: self.layers[layer].label().to_owned(),
            entry: entry.to_owned(),
            reason: reason.into(),
        }
    }

    fn for_ext4(&self, layer: usize, entry: &str, source: kiln_imagefmt::Error) -> Error {
        Error::LayerEntryForExt4 {
            image: self.image.to_owned(),
            layer: self.layers[layer].label().to_owned(),
            entry: entry.to_owned(),
            source: Box::new(source),
        }
    }

    fn tar(&self, layer: usize, error: TarError) -> Error {
        match error {
            TarError::Bad { entry, reason } => self.bad(layer, &entry, reason),
            TarError::Io(source) => Error::ReadLayer {
                image: self.image.to_owned(),
                layer: self.layers[layer].label().to_owned(),
                path: self.layers[layer].location(),
                source,
            },
        }
    }
}

/// Permission bits, owner and time of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
}

/// The seconds an ext4 inode time holds (256-byte inodes: signed 32 bits
/// and two epoch bits; the kernel's `s_time_min`..=`s_time_max`,
/// 1901-12-13 to 2446-05-10), which kiln-imagefmt refuses to leave.
const EXT4_TIME_MIN: i64 = -(1 << 31);
const EXT4_TIME_MAX: i64 = (1 << 34) - 1 - (1 << 31);

/// A layer entry's time as ext4 can hold it: clamped to its range, the
/// nanoseconds dropped at a bound, as Linux's `timestamp_truncate` stores
/// it there (and so GNU tar and umoci extracting such a layer onto ext4).
fn ext4_time(seconds: i64, nanoseconds: u32) -> (i64, u32) {
    let clamped = seconds.clamp(EXT4_TIME_MIN, EXT4_TIME_MAX);
    let at_bound = clamped == EXT4_TIME_MIN || clamped == EXT4_TIME_MAX;
    (clamped, if at_bound { 0 } else { nanoseconds })
}

impl Meta {
    fn of(entry: &TarEntry) -> Meta {
        let (mtime, mtime_nsec) = ext4_time(entry.mtime, entry.mtime_nsec);
        Meta { mode: entry.mode, uid: entry.uid, gid: entry.gid, mtime, mtime_nsec }
    }

    /// What an implied parent gets, as containerd and the ext4 writer give it.
    fn implied() -> Meta {
        Meta { mode: 0o755, uid: 0, gid: 0, mtime: 0, mtime_nsec: 0 }
    }

    fn ext4(self) -> Metadata {
        Metadata::default().with_mode(self.mode).with_owner(self.uid, self.gid).with_mtime(self.mtime, self.mtime_nsec)
    }
}

type Xattrs = Vec<(String, Vec<u8>)>;

#[derive(Debug, Clone)]
struct Dir {
    /// Identity: a directory removed (or made opaque) and made again is a
    /// new one, which the lower's must not show through.
    id: u64,
    meta: Meta,
    xattrs: Xattrs,
    /// The layer that last set its metadata (or created it).
    changed_in: usize,
    children: BTreeMap<String, Node>,
}

#[derive(Debug, Clone)]
enum Node {
    Dir(Dir),
    /// A name of a non-directory inode.
    Inode(usize),
}

#[derive(Debug)]
struct Inode {
    kind: InodeKind,
    meta: Meta,
    xattrs: Xattrs,
    created_in: usize,
}

#[derive(Debug)]
enum InodeKind {
    File { offset: u64, size: u64 },
    Symlink(String),
    Device(DeviceKind, u32, u32),
    Fifo,
}

/// The merged tree: directories hold names, inodes are shared by their names.
struct Merged {
    root: Dir,
    inodes: Vec<Inode>,
    next_dir_id: u64,
}

/// How a walk to a parent directory failed: the error's reason, naming
/// the component at fault.
enum Walk {
    Missing,
    Refused(String),
}

impl Merged {
    /// The directory at `components`, created (0755, 0:0) where missing
    /// when `layer` is given; a symlink or a file on the way is refused.
    fn dir_mut(&mut self, components: &[&str], create: Option<usize>) -> std::result::Result<&mut Dir, Walk> {
        let mut next_id = self.next_dir_id;
        let mut dir = &mut self.root;
        for (depth, component) in components.iter().enumerate() {
            if !dir.children.contains_key(*component) {
                let Some(layer) = create else { return Err(Walk::Missing) };
                next_id += 1;
                let fresh = Dir {
                    id: next_id,
                    meta: Meta::implied(),
                    xattrs: Vec::new(),
                    changed_in: layer,
                    children: BTreeMap::new(),
                };
                dir.children.insert((*component).to_owned(), Node::Dir(fresh));
            }
            dir = match dir.children.get_mut(*component) {
                Some(Node::Dir(sub)) => sub,
                Some(Node::Inode(inode)) => {
                    let on_the_way = components[..=depth].join("/");
                    let what = match self.inodes[*inode].kind {
                        InodeKind::Symlink(_) => "a symlink",
                        _ => "not a directory",
                    };
                    self.next_dir_id = next_id;
                    return Err(Walk::Refused(format!("its parent {on_the_way:?} is {what}")));
                }
                None => return Err(Walk::Missing),
            };
        }
        self.next_dir_id = next_id;
        Ok(dir)
    }

    /// The node at `path` (not the root), following no symlink.
    fn find(&self, components: &[&str]) -> std::result::Result<&Node, Walk> {
        let (last, parents) = components.split_last().ok_or(Walk::Missing)?;
        let mut dir = &self.root;
        for (depth, component) in parents.iter().enumerate() {
            dir = match dir.children.get(*component) {
                Some(Node::Dir(sub)) => sub,
                Some(Node::Inode(inode)) => {
                    let on_the_way = components[..=depth].join("/");
                    let what = match self.inodes[*inode].kind {
                        InodeKind::Symlink(_) => "a symlink",
                        _ => "not a directory",
                    };
                    return Err(Walk::Refused(format!("its parent {on_the_way:?} is {what}")));
                }
                None => return Err(Walk::Missing),
            };
        }
        dir.children.get(*last).ok_or(Walk::Missing)
    }
}

fn split(path: &str) -> Vec<&str> {
    path.split('/').filter(|c| !c.is_empty()).collect()
}

/// Reads every entry of layer `index` (metadata only).
fn read_entries<L: LayerSource>(context: &Context<'_, L>, index: usize) -> Result<Vec<TarEntry>> {
    let layer = context.layers[index];
    let reader = layer.open().map_err(|source| context.tar(index, TarError::Io(source)))?;
    let mut tar = TarReader::new(reader).map_err(|source| context.tar(index, TarError::Io(source)))?;
    let mut entries = Vec::new();
    while let Some(entry) = tar.next_entry().map_err(|error| context.tar(index, error))? {
        entries.push(entry);
    }
    Ok(entries)
}

/// Applies layer `index` to `merged`: its whiteouts first, then the rest.
/// A whiteout whose parent is not a directory below (`RUN rm /a && mkdir
/// /a` gives `a/` and `a/.wh..wh..opq` over a lower file `a`, as Docker's
/// and containers/storage's differs write it) hides nothing there; it is
/// refused only if the parent is still no directory once the layer's own
/// entries are in, so a whiteout through a symlink stays refused.
fn apply<L: LayerSource>(context: &Context<'_, L>, merged: &mut Merged, index: usize) -> Result<()> {
    let entries = read_entries(context, index)?;
    let base = |path: &str| path.rsplit('/').next().unwrap_or("").to_owned();
    let mut deferred = Vec::new();
    for entry in &entries {
        let name = base(&entry.path);
        if name.starts_with(WHITEOUT_PREFIX) && !whiteout(context, merged, index, entry, &name)? {
            deferred.push(entry.path.clone());
        }
    }
    for entry in entries {
        if !base(&entry.path).starts_with(WHITEOUT_PREFIX) {
            add(context, merged, index, entry)?;
        }
    }
    for path in deferred {
        let components = split(&path);
        if let Err(Walk::Refused(reason)) = merged.dir_mut(&components[..components.len().saturating_sub(1)], None) {
            return Err(context.bad(index, &path, reason));
        }
    }
    Ok(())
}

fn whiteout<L: LayerSource>(
    context: &Context<'_, L>,
    merged: &mut Merged,
    index: usize,
    entry: &TarEntry,
    name: &str,
) -> Result<bool> {
    let components = split(&entry.path);
    let parent = &components[..components.len().saturating_sub(1)];
    if name == OPAQUE_MARKER {
        let fresh_id = merged.next_dir_id + 1;
        match merged.dir_mut(parent, None) {
            Ok(dir) => {
                // The lower's entries are gone and the directory is a new
                // one: in the overlay, an opaque directory.
                dir.children.clear();
                if !parent.is_empty() {
                    dir.id = fresh_id;
                    merged.next_dir_id = fresh_id;
                }
            }
            Err(Walk::Missing) => {}
            Err(Walk::Refused(_)) => return Ok(false),
        }
        return Ok(true);
    }
    if name.starts_with(WHITEOUT_META_PREFIX) {
        // Other AUFS metadata (.wh..wh.plnk and the like): never applied,
        // as containerd does.
        return Ok(true);
    }
    let hidden = &name[WHITEOUT_PREFIX.len()..];
    if hidden.is_empty() || hidden == "." || hidden == ".." {
        return Err(context.bad(index, &entry.path, "a whiteout of no name"));
    }
    match merged.dir_mut(parent, None) {
        Ok(dir) => {
            dir.children.remove(hidden);
        }
        Err(Walk::Missing) => {}
        Err(Walk::Refused(_)) => return Ok(false),
    }
    Ok(true)
}

fn add<L: LayerSource>(context: &Context<'_, L>, merged: &mut Merged, index: usize, entry: TarEntry) -> Result<()> {
    let refuse = |reason: String| context.bad(index, &entry.path, reason);
    for (name, _) in &entry.xattrs {
        if name.starts_with(OVERLAY_XATTR_PREFIX) {
            return Err(refuse(format!("xattr {name:?} would steer overlayfs")));
        }
    }
    let components = split(&entry.path);
    let meta = Meta::of(&entry);
    let Some((name, parent)) = components.split_last() else {
        // The root itself: only its metadata.
        if entry.kind != EntryKind::Dir {
            return Err(refuse("the root must be a directory".into()));
        }
        merged.root.meta = meta;
        merged.root.xattrs = entry.xattrs;
        merged.root.changed_in = index;
        return Ok(());
    };
    let inode = match entry.kind {
        EntryKind::Dir => None,
        EntryKind::Hardlink { ref target } => {
            if target.is_empty() {
                return Err(refuse("a hard link to the root directory".into()));
            }
            match merged.find(&split(target)) {
                Ok(Node::Inode(inode)) => Some(*inode),
                Ok(Node::Dir(_)) => return Err(refuse(format!("a hard link to the directory {target:?}"))),
                Err(Walk::Missing) => return Err(refuse(format!("a hard link to {target:?}, which is not there"))),
                Err(Walk::Refused(reason)) => return Err(refuse(format!("a hard link to {target:?}: {reason}"))),
            }
        }
        EntryKind::CharDevice { major: 0, minor: 0 } => {
            return Err(refuse("a character device 0:0 is an overlayfs whiteout; layers use .wh. names".into()));
        }
        ref kind => {
            let kind = match kind {
                EntryKind::File { size, offset } => InodeKind::File { offset: *offset, size: *size },
                EntryKind::Symlink { target } => InodeKind::Symlink(target.clone()),
                EntryKind::CharDevice { major, minor } => InodeKind::Device(DeviceKind::Char, *major, *minor),
                EntryKind::BlockDevice { major, minor } => InodeKind::Device(DeviceKind::Block, *major, *minor),
                _ => InodeKind::Fifo,
            };
            merged.inodes.push(Inode { kind, meta, xattrs: entry.xattrs.clone(), created_in: index });
            Some(merged.inodes.len() - 1)
        }
    };
    // Reserved before the walk, which may make parents with ids of their own.
    merged.next_dir_id += 1;
    let fresh_id = merged.next_dir_id;
    let dir = match merged.dir_mut(parent, Some(index)) {
        Ok(dir) => dir,
        Err(Walk::Refused(reason)) => return Err(refuse(reason)),
        Err(Walk::Missing) => return Err(refuse("its parent is missing".into())),
    };
    match (inode, dir.children.get_mut(*name)) {
        (Some(inode), _) => {
            dir.children.insert((*name).to_owned(), Node::Inode(inode));
        }
        // A directory over a directory keeps what is in it.
        (None, Some(Node::Dir(existing))) => {
            existing.meta = meta;
            existing.xattrs = entry.xattrs;
            existing.changed_in = index;
        }
        (None, _) => {
            let fresh = Dir { id: fresh_id, meta, xattrs: entry.xattrs, changed_in: index, children: BTreeMap::new() };
            dir.children.insert((*name).to_owned(), Node::Dir(fresh));
        }
    }
    Ok(())
}

/// Every name of every inode, sorted.
fn names(dir: &Dir, prefix: &str, out: &mut HashMap<usize, Vec<String>>) {
    for (name, node) in &dir.children {
        let path = join(prefix, name);
        match node {
            Node::Dir(sub) => names(sub, &path, out),
            Node::Inode(inode) => out.entry(*inode).or_default().push(path),
        }
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() { name.to_owned() } else { format!("{prefix}/{name}") }
}

/// Builds the chain step's tree; see [`layer_tree`].
pub(crate) fn build<L: LayerSource>(image: &str, lower: &[L], upper: &[L]) -> Result<Ext4Tree> {
    let context = Context { image, layers: lower.iter().chain(upper).collect() };
    let mut merged = Merged {
        root: Dir { id: 0, meta: Meta::implied(), xattrs: Vec::new(), changed_in: 0, children: BTreeMap::new() },
        inodes: Vec::new(),
        next_dir_id: 0,
    };
    for index in 0..lower.len() {
        apply(&context, &mut merged, index)?;
    }
    let before = merged.root.clone();
    for index in lower.len()..context.layers.len() {
        apply(&context, &mut merged, index)?;
    }
    let mut before_names = HashMap::new();
    names(&before, "", &mut before_names);
    let mut after_names = HashMap::new();
    names(&merged.root, "", &mut after_names);
    let first_upper = lower.len();
    let touched = |inode: usize| {
        merged.inodes[inode].created_in >= first_upper || before_names.get(&inode) != after_names.get(&inode)
    };
    let mut emit =
        Emit { context: &context, merged: &merged, tree: Ext4Tree::new(), inodes: HashSet::new(), first_upper };
    emit.dir("", &merged.root, Some(&before), &touched)?;
    emit.inodes(&after_names)?;
    Ok(emit.tree)
}

struct Emit<'e, 'l, L> {
    context: &'e Context<'l, L>,
    merged: &'e Merged,
    tree: Ext4Tree,
    /// Inodes to write.
    inodes: HashSet<usize>,
    first_upper: usize,
}

impl<L: LayerSource> Emit<'_, '_, L> {
    /// Emits what changed in directory `path` (`after`), given the same
    /// directory before the uppers (`None`: the directory is new, so all
    /// of it goes in). Returns whether anything under it was emitted.
    fn dir(&mut self, path: &str, after: &Dir, before: Option<&Dir>, touched: &dyn Fn(usize) -> bool) -> Result<bool> {
        let mut emitted = false;
        for (name, node) in &after.children {
            let child = join(path, name);
            let below = before.and_then(|dir| dir.children.get(name));
            match node {
                Node::Dir(sub) => match below {
                    Some(Node::Dir(old)) if old.id == sub.id => {
                        emitted |= self.dir(&child, sub, Some(old), touched)?;
                    }
                    _ => {
                        self.dir(&child, sub, None, touched)?;
                        if matches!(below, Some(Node::Dir(_))) {
                            let opaque = self.tree.set_xattr(&child, "trusted.overlay.opaque", b"y");
                            opaque.map_err(|e| self.context.for_ext4(sub.changed_in, &child, e))?;
                        }
                        emitted = true;
                    }
                },
                Node::Inode(inode) => {
                    if before.is_none() || touched(*inode) {
                        self.inodes.insert(*inode);
                        emitted = true;
                    }
                }
            }
        }
        if let Some(before) = before {
            for name in before.children.keys() {
                if !after.children.contains_key(name) {
                    let child = join(path, name);
                    let whiteout =
                        self.tree.add_device(&child, DeviceKind::Char, 0, 0, Metadata::default().with_mode(0));
                    whiteout.map_err(|e| self.context.for_ext4(self.first_upper, &child, e))?;
                    emitted = true;
                }
            }
        }
        let changed = before.is_none() || after.changed_in >= self.first_upper || path.is_empty();
        if emitted || changed {
            let layer = after.changed_in;
            self.tree.add_dir(path, after.meta.ext4()).map_err(|e| self.context.for_ext4(layer, path, e))?;
            for (name, value) in &after.xattrs {
                self.tree.set_xattr(path, name, value).map_err(|e| self.context.for_ext4(layer, path, e))?;
            }
        }
        Ok(emitted || changed)
    }

    /// Writes each inode collected under its first name, its other names
    /// as hard links to it.
    fn inodes(&mut self, names: &HashMap<usize, Vec<String>>) -> Result<()> {
        let mut inodes: Vec<usize> = std::mem::take(&mut self.inodes).into_iter().collect();
        inodes.sort_unstable();
        for inode in inodes {
            let Some(paths) = names.get(&inode) else { continue };
            let Some((first, others)) = paths.split_first() else { continue };
            let node = &self.merged.inodes[inode];
            let layer = node.created_in;
            let fail = |path: &str, e| self.context.for_ext4(layer, path, e);
            let meta = node.meta.ext4();
            let added = match &node.kind {
                InodeKind::File { offset, size } => {
                    self.context.layers[layer].add_file(&mut self.tree, first, *offset, *size, meta)
                }
                InodeKind::Symlink(target) => self.tree.add_symlink(first, target, meta),
                InodeKind::Device(kind, major, minor) => self.tree.add_device(first, *kind, *major, *minor, meta),
                InodeKind::Fifo => self.tree.add_fifo(first, meta),
            };
            added.map_err(|e| fail(first, e))?;
            for (name, value) in &node.xattrs {
                self.tree.set_xattr(first, name, value).map_err(|e| fail(first, e))?;
            }
            for other in others {
                self.tree.add_hardlink(other, first).map_err(|e| fail(other, e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Whether kiln-imagefmt takes an entry with this time.
    fn ext4_takes(seconds: i64, nanoseconds: u32) -> bool {
        Ext4Tree::new().add_dir("d", Metadata::default().with_mtime(seconds, nanoseconds)).is_ok()
    }

    #[test]
    fn ext4_time_range_is_exactly_what_the_ext4_writer_takes() {
        assert!(ext4_takes(EXT4_TIME_MIN, 0) && ext4_takes(EXT4_TIME_MAX, 0));
        assert!(!ext4_takes(EXT4_TIME_MIN - 1, 0) && !ext4_takes(EXT4_TIME_MAX + 1, 0));
        let shown = |seconds, nanoseconds| format!("{:?}", ext4_time(seconds, nanoseconds));
        assert_eq!(shown(1_700_000_000, 5), "(1700000000, 5)");
        assert_eq!(shown(EXT4_TIME_MIN + 1, 7), "(-2147483647, 7)");
        assert_eq!(shown(i64::MIN, 999_999_999), "(-2147483648, 0)");
        assert_eq!(shown(i64::MAX, 1), "(15032385535, 0)");
        assert_eq!(shown(EXT4_TIME_MAX, 3), "(15032385535, 0)");
    }

    proptest! {
        #[test]
        fn every_layer_time_becomes_one_the_ext4_writer_takes(seconds in any::<i64>(), nanoseconds in 0u32..1_000_000_000) {
            let (clamped, nanos) = ext4_time(seconds, nanoseconds);
            prop_assert!(ext4_takes(clamped, nanos));
            if (EXT4_TIME_MIN + 1..EXT4_TIME_MAX).contains(&seconds) {
                prop_assert_eq!((clamped, nanos), (seconds, nanoseconds));
            }
        }
    }
}
