//! Placement: every decision about the image, made from the tree's
//! metadata alone. Writing an [`Ext4Layout`] only encodes and copies.
//!
//! The geometry (`geometry.rs`) reserves a run at the start of some groups
//! for metadata and the journal; data follows group 0's, in inode order,
//! each file's blocks contiguous except where another group's reserved
//! run sits in the way. So the used blocks are exactly those below
//! [`Ext4Layout::end`] plus the reserved runs above it, and the used inodes
//! are exactly 1 to [`Ext4Layout::last_inode`].

use std::collections::BTreeMap;
use std::io::{Seek, Write};
use std::path::Path;

use kiln_types::hash::Fnv1a64;

use super::disk::{self, DirEntry};
pub(crate) use super::geometry::Geometry;
use super::geometry::{Allocator, Demand, size_geometry};
use super::htree;
use super::tree::{Dir, FileNode, LOST_AND_FOUND, Node, SpecialKind};
use super::xattr::{self, Xattr};
use super::{BLOCK, DeviceKind, EXTENT_MAX_BLOCKS, Ext4Options, Ext4Summary, Ext4Tree, MAX_LINKS, Metadata, extent};
use crate::{Error, Result};

/// Blocks per group: one bitmap block's worth of bits.
pub(crate) const BLOCKS_PER_GROUP: u64 = BLOCK * 8;
pub(crate) const INODE_SIZE: u64 = 256;
pub(crate) const DESC_SIZE: u64 = 64;
pub(crate) const ROOT_INO: u32 = 2;
pub(crate) const LOST_AND_FOUND_INO: u32 = 11;
/// Inodes 1 to 10 are reserved; the first ordinary one is 11 (lost+found, when the writer makes it).
const FIRST_INO: u32 = 11;
/// Symlink targets shorter than this live in the inode's block map.
pub(crate) const FAST_SYMLINK_MAX: usize = 59;

/// A run of contiguous blocks holding contiguous logical blocks of an inode: one extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// The first logical block (block of the file) it holds.
    pub(crate) logical: u64,
    pub(crate) start: u64,
    pub(crate) len: u64,
}

/// An inode's runs, in file order. Nearly every file has one, held inline:
/// a `Vec` each was a heap block per file (6 MiB on 120,000 files).
#[derive(Debug, Default)]
pub(crate) enum Runs {
    #[default]
    None,
    One(Run),
    Many(Vec<Run>),
}

impl Runs {
    pub(crate) fn as_slice(&self) -> &[Run] {
        match self {
            Runs::None => &[],
            Runs::One(run) => std::slice::from_ref(run),
            Runs::Many(runs) => runs,
        }
    }

    fn extend(&mut self, more: Vec<Run>) {
        *self = match (std::mem::take(self), more.as_slice()) {
            (runs, []) => runs,
            (Runs::None, [run]) => Runs::One(*run),
            (Runs::None, _) => Runs::Many(more),
            (Runs::One(first), _) => Runs::Many(std::iter::once(first).chain(more).collect()),
            (Runs::Many(mut runs), _) => {
                runs.extend(more);
                Runs::Many(runs)
            }
        };
    }
}

impl std::ops::Deref for Runs {
    type Target = [Run];

    fn deref(&self) -> &[Run] {
        self.as_slice()
    }
}

/// One inode to write.
#[derive(Debug)]
pub(crate) struct InodePlan<'t> {
    pub(crate) kind: InodeKind<'t>,
    pub(crate) meta: Metadata,
    pub(crate) links: u32,
    /// The blocks holding its data, in file order; holes between them.
    pub(crate) runs: Runs,
    /// Sorted, as the tree keeps them.
    pub(crate) xattrs: &'t [Xattr],
    /// The external xattr block, if the xattrs need one.
    pub(crate) xattr_block: Option<u64>,
    /// The extent tree's blocks, when `runs` are more than the inode holds.
    pub(crate) tree_blocks: Vec<u64>,
}

#[derive(Debug)]
pub(crate) enum InodeKind<'t> {
    /// Entries other than `.` and `..`, sorted by name.
    Dir {
        parent: u32,
        entries: Vec<DirEntry<'t>>,
    },
    File(&'t FileNode),
    Symlink(&'t str),
    /// A device or fifo: no blocks.
    Special(SpecialKind),
}

impl InodePlan<'_> {
    pub(crate) fn data_blocks(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }

    /// Every block the inode owns, for `i_blocks`.
    pub(crate) fn owned_blocks(&self) -> u64 {
        self.data_blocks() + self.tree_blocks.len() as u64 + u64::from(self.xattr_block.is_some())
    }
}

/// A planned image: geometry, every inode and every block decided.
#[derive(Debug)]
pub struct Ext4Layout<'t> {
    pub(crate) tree: &'t Ext4Tree,
    pub(crate) geometry: Geometry,
    /// Inode 2 (the root) first, then 11, 12, … in order.
    pub(crate) inodes: Vec<InodePlan<'t>>,
    /// The first block past the metadata and data (backups above it are used too).
    pub(crate) end: u64,
    pub(crate) uuid: [u8; 16],
    pub(crate) hash_seed: [u8; 16],
    pub(crate) label: [u8; 16],
}

impl Ext4Tree {
    /// Plans the image: checks the options, numbers every inode, sizes the
    /// filesystem (the content plus a little headroom, or `options.size`)
    /// and places every block. Errors name the option or entry at fault.
    pub fn layout(&self, options: &Ext4Options) -> Result<Ext4Layout<'_>> {
        let label = label_bytes(options.label.as_deref())?;
        let counts = self.counts;
        if options.lost_found && self.root.children.contains_key(LOST_AND_FOUND) {
            let reason =
                "the writer makes /lost+found itself (Ext4Options::with_lost_found(false) leaves it to the tree)";
            return Err(super::tree::invalid(LOST_AND_FOUND, reason.into()));
        }
        // The root, lost+found and one inode per entry that is not a hard link.
        let inodes = 2 + counts.files + counts.dirs + counts.symlinks + counts.specials;
        let mut numbering = Numbering {
            plans: Vec::with_capacity(usize::try_from(inodes).unwrap_or(0)),
            epoch: self.epoch,
            keep_all_paths: counts.hardlinks > 0,
            ..Numbering::default()
        };
        numbering.visit_root(&self.root, options.lost_found);
        numbering.link_hardlinks()?;
        let mut inodes = numbering.plans;
        for (&index, path) in &numbering.paths {
            if let InodeKind::Dir { entries, .. } = &inodes[index].kind {
                htree::DirShape::of(entries).check(path, entries.len())?;
            }
        }
        let data_blocks: u64 = inodes.iter().map(|plan| blocks_for(plan)).sum();
        let inode_count = u64::from(last_inode(inodes.len()));
        let demand = Demand { inodes: inode_count, data_blocks, journal: options.journal };
        let geometry = size_geometry(options.size, demand)?;
        let mut allocator = Allocator::new(&geometry);
        for plan in &mut inodes {
            allocator.place(plan);
        }
        let needed = allocator.next;
        if needed > geometry.blocks {
            return Err(Error::DoesNotFit { needed: needed * BLOCK, size: geometry.image_bytes });
        }
        let mut hash = numbering.hash;
        hash.field(&label);
        if options.journal {
            // A writable disk made from the same tree as a read-only image gets its own UUID.
            hash.field(b"journal").feed(&geometry.blocks.to_le_bytes());
        }
        let uuid = options.uuid.unwrap_or_else(|| hash.uuid(b"uuid"));
        let hash_seed = options.hash_seed.unwrap_or_else(|| hash.uuid(b"hash seed"));
        Ok(Ext4Layout { tree: self, geometry, inodes, end: needed, uuid, hash_seed, label })
    }
}

impl<'t> Ext4Layout<'t> {
    /// What the image holds.
    pub fn summary(&self) -> Ext4Summary {
        let g = &self.geometry;
        let counts = self.tree.counts;
        Ext4Summary {
            image_bytes: g.image_bytes,
            block_size: BLOCK as u32,
            blocks: g.blocks,
            free_blocks: (0..g.groups).map(|group| self.free_blocks(group)).sum(),
            inodes: g.inodes(),
            free_inodes: g.inodes() - self.last_inode(),
            groups: g.groups,
            files: counts.files,
            dirs: counts.dirs,
            symlinks: counts.symlinks,
            hardlinks: counts.hardlinks,
            specials: counts.specials,
            data_bytes: counts.data_bytes,
            journal_blocks: g.journal.map_or(0, |run| run.len),
            uuid: self.uuid,
        }
    }

    /// Writes the image to `out`, which must be empty (a new file or an
    /// empty buffer; anything else is refused): regions that are zero in
    /// the image are skipped, so old bytes would show through.
    pub fn write_to<W: Write + Seek>(&self, out: &mut W) -> Result<()> {
        let mut sink = crate::sink::WriteSeekSink::new(out).map_err(Error::Write)?;
        self.emit(&mut sink)
    }

    /// Writes the image to `path` atomically: into a temporary file in the
    /// same directory, committed and renamed over `path` once complete.
    /// Trees holding private host files ([`Ext4Tree::is_secret`]) get mode
    /// 0600 from the start, others 0644, less the umask. File data moves
    /// with `copy_file_range`; blocks never written stay holes.
    pub fn write_file(&self, path: &Path) -> Result<Ext4Summary> {
        let mode = crate::sink::image_mode(self.tree.is_secret());
        crate::sink::write_atomically(path, mode, |sink| self.emit(sink))?;
        Ok(self.summary())
    }

    /// The highest inode number in use; every one below it is in use too.
    pub(crate) fn last_inode(&self) -> u32 {
        last_inode(self.inodes.len())
    }

    /// The inode number of `self.inodes[index]`.
    pub(crate) fn ino(index: usize) -> u32 {
        if index == 0 { ROOT_INO } else { FIRST_INO + index as u32 - 1 }
    }

    pub(crate) fn free_blocks(&self, group: u32) -> u64 {
        self.geometry.free_in_group(group, self.end)
    }

    pub(crate) fn used_inodes_in_group(&self, group: u32) -> u32 {
        let ipg = self.geometry.inodes_per_group;
        self.last_inode().saturating_sub(group * ipg).min(ipg)
    }

    pub(crate) fn dirs_in_group(&self, group: u32) -> u32 {
        self.inodes_in_group(group).filter(|(_, plan)| matches!(plan.kind, InodeKind::Dir { .. })).count() as u32
    }

    /// The planned inodes of `group`, with their numbers.
    pub(crate) fn inodes_in_group(&self, group: u32) -> impl Iterator<Item = (u32, &InodePlan<'t>)> {
        let ipg = self.geometry.inodes_per_group;
        let first = group * ipg + 1;
        let last = first + self.used_inodes_in_group(group);
        (first..last).filter_map(move |ino| {
            // Inode 2 is the root, 3 to 10 are reserved and unplanned, 11 on follow in order.
            let index = match ino {
                ROOT_INO => 0,
                ino if ino >= FIRST_INO => (ino - FIRST_INO + 1) as usize,
                _ => return None,
            };
            Some((ino, &self.inodes[index]))
        })
    }
}

/// The highest inode number in use with `plans` inodes planned: at least
/// the last reserved one (10), which is in use (the bitmap marks 1 to 10)
/// even when the root is the only inode planned.
fn last_inode(plans: usize) -> u32 {
    Ext4Layout::ino(plans - 1).max(FIRST_INO - 1)
}

/// Numbers the inodes depth first, in name order, and hashes what it sees.
#[derive(Default)]
struct Numbering<'t> {
    plans: Vec<InodePlan<'t>>,
    /// The path of each directory's plan, for errors, and of every plan
    /// when hard links must find their targets by path: kept for all
    /// 120,000 files of a tree, they were a sixth of the peak memory.
    paths: BTreeMap<usize, String>,
    keep_all_paths: bool,
    hash: Fnv1a64,
    /// The time that replaces every entry's, if any.
    epoch: Option<i64>,
    /// Directory entries that are hard links: the directory's plan, the
    /// entry's index in it, and the path (without a leading `/`) it names.
    hardlinks: Vec<(usize, usize, &'t str)>,
}

impl<'t> Numbering<'t> {
    fn visit_root(&mut self, root: &'t Dir, lost_found: bool) {
        self.push("/", root.meta, &root.xattrs, InodeKind::Dir { parent: ROOT_INO, entries: Vec::new() });
        let mut entries = Vec::new();
        if lost_found {
            let meta = Metadata::default().with_mode(0o700).with_mtime(root.meta.mtime, root.meta.mtime_nsec);
            self.push("/lost+found", meta, &[], InodeKind::Dir { parent: ROOT_INO, entries: Vec::new() });
            entries.push(DirEntry { name: LOST_AND_FOUND, ino: LOST_AND_FOUND_INO, file_type: disk::FT_DIR });
        } else {
            // Two trees that differ only in the writer's lost+found get different UUIDs.
            self.hash.field(b"no lost+found");
        }
        let subdirs = self.visit_children(root, 0, "", &mut entries) + u32::from(lost_found);
        self.plans[0].links = 2 + subdirs;
        self.plans[0].kind = InodeKind::Dir { parent: ROOT_INO, entries };
    }

    /// Numbers `dir`'s children (and theirs), appending their entries;
    /// `index` is `dir`'s plan. Returns how many are directories.
    fn visit_children(&mut self, dir: &'t Dir, index: usize, path: &str, entries: &mut Vec<DirEntry<'t>>) -> u32 {
        let ino = Ext4Layout::ino(index);
        let mut subdirs = 0;
        for (name, node) in &dir.children {
            let child_path = format!("{path}/{name}");
            let child = self.plans.len();
            let child_ino = Ext4Layout::ino(child);
            self.hash.field(name.as_bytes()).feed(&ino.to_le_bytes());
            let file_type = match node {
                Node::Dir(sub) => {
                    subdirs += 1;
                    self.push(&child_path, sub.meta, &sub.xattrs, InodeKind::Dir { parent: ino, entries: Vec::new() });
                    let mut sub_entries = Vec::new();
                    let sub_subdirs = self.visit_children(sub, child, &child_path, &mut sub_entries);
                    self.plans[child].links = 2 + sub_subdirs;
                    self.plans[child].kind = InodeKind::Dir { parent: ino, entries: sub_entries };
                    disk::FT_DIR
                }
                Node::File(file) => {
                    self.hash.feed(&file.size.to_le_bytes());
                    for range in file.ranges.iter().flatten() {
                        self.hash.feed(&range.offset.to_le_bytes()).feed(&range.len.to_le_bytes());
                    }
                    self.push(&child_path, file.meta, &file.xattrs, InodeKind::File(file));
                    disk::FT_REG
                }
                Node::Symlink(link) => {
                    self.hash.field(link.target.as_bytes());
                    self.push(&child_path, link.meta, &link.xattrs, InodeKind::Symlink(&link.target));
                    disk::FT_SYMLINK
                }
                Node::Special(special) => {
                    self.hash.field(format!("{:?}", special.kind).as_bytes());
                    self.push(&child_path, special.meta, &special.xattrs, InodeKind::Special(special.kind));
                    special_file_type(special.kind)
                }
                Node::Hardlink(target) => {
                    self.hash.field(target.as_bytes());
                    // Numbered once every path is known: the target may come later.
                    self.hardlinks.push((index, entries.len(), target));
                    entries.push(DirEntry { name, ino: 0, file_type: 0 });
                    continue;
                }
            };
            entries.push(DirEntry { name, ino: child_ino, file_type });
        }
        subdirs
    }

    fn push(&mut self, path: &str, meta: Metadata, xattrs: &'t [Xattr], kind: InodeKind<'t>) {
        let meta = match self.epoch {
            Some(seconds) => meta.with_mtime(seconds, 0),
            None => meta,
        };
        let hash = &mut self.hash;
        hash.feed(&meta.mode.to_le_bytes()).feed(&meta.uid.to_le_bytes()).feed(&meta.gid.to_le_bytes());
        hash.feed(&meta.mtime.to_le_bytes()).feed(&meta.mtime_nsec.to_le_bytes());
        for x in xattrs {
            hash.field(&[x.index]).field(&x.suffix).field(&x.value);
        }
        // A directory's count is set once its subdirectories are known.
        let links = if matches!(kind, InodeKind::Dir { .. }) { 2 } else { 1 };
        let plan =
            InodePlan { kind, meta, links, runs: Runs::None, xattrs, xattr_block: None, tree_blocks: Vec::new() };
        if self.keep_all_paths || matches!(plan.kind, InodeKind::Dir { .. }) {
            self.paths.insert(self.plans.len(), path.to_owned());
        }
        self.plans.push(plan);
    }

    /// Points each hard link's entry at its target's inode and counts the link.
    fn link_hardlinks(&mut self) -> Result<()> {
        if self.hardlinks.is_empty() {
            return Ok(());
        }
        let by_path: std::collections::HashMap<&str, usize> =
            self.paths.iter().map(|(&index, path)| (&path[1..], index)).collect();
        for &(dir, entry, target) in &self.hardlinks {
            // The tree only makes hard links to entries it holds.
            let Some(&index) = by_path.get(target) else { continue };
            let plan = &mut self.plans[index];
            plan.links += 1;
            if plan.links > MAX_LINKS {
                return Err(Error::InvalidExt4Entry {
                    path: self.paths[&index][1..].to_owned(),
                    reason: format!("more than {MAX_LINKS} hard links, the most ext4 counts"),
                });
            }
            let file_type = match plan.kind {
                InodeKind::File(_) => disk::FT_REG,
                InodeKind::Symlink(_) => disk::FT_SYMLINK,
                InodeKind::Special(kind) => special_file_type(kind),
                InodeKind::Dir { .. } => disk::FT_DIR,
            };
            if let InodeKind::Dir { entries, .. } = &mut self.plans[dir].kind {
                entries[entry].ino = Ext4Layout::ino(index);
                entries[entry].file_type = file_type;
            }
        }
        Ok(())
    }
}

fn special_file_type(kind: SpecialKind) -> u8 {
    match kind {
        SpecialKind::Device { kind: DeviceKind::Char, .. } => disk::FT_CHRDEV,
        SpecialKind::Device { kind: DeviceKind::Block, .. } => disk::FT_BLKDEV,
        SpecialKind::Fifo => disk::FT_FIFO,
    }
}

/// The block segments (first logical block, blocks) an inode's data needs:
/// one from block 0 for directories, slow symlinks and dense files; for
/// sparse files, the blocks their data ranges touch, adjacent ones merged.
fn block_segments(plan: &InodePlan<'_>) -> Vec<(u64, u64)> {
    let dense = |blocks: u64| if blocks == 0 { Vec::new() } else { vec![(0, blocks)] };
    match &plan.kind {
        InodeKind::Dir { entries, .. } => dense(htree::DirShape::of(entries).blocks()),
        InodeKind::File(file) if file.ranges.is_none() => dense(file.size.div_ceil(BLOCK)),
        InodeKind::File(file) => {
            let mut segments: Vec<(u64, u64)> = Vec::new();
            for range in file.data_ranges().iter() {
                let (first, end) = (range.offset / BLOCK, (range.offset + range.len).div_ceil(BLOCK));
                match segments.last_mut() {
                    Some((start, len)) if *start + *len >= first => *len = end.max(*start + *len) - *start,
                    _ => segments.push((first, end - first)),
                }
            }
            segments
        }
        InodeKind::Symlink(target) => dense(u64::from(target.len() > FAST_SYMLINK_MAX)),
        InodeKind::Special(_) => Vec::new(),
    }
}

/// Blocks an inode needs, for sizing: its data, its xattr block, and at
/// most the extent tree its data could need, each segment split at every
/// extent's length and, once more than that, where backup superblocks sit.
fn blocks_for(plan: &InodePlan<'_>) -> u64 {
    let segments = block_segments(plan);
    let data: u64 = segments.iter().map(|(_, len)| len).sum();
    let most_extents: u64 = segments.iter().map(|(_, len)| 2 * len.div_ceil(EXTENT_MAX_BLOCKS) + 1).sum();
    data + extent::tree_blocks(most_extents as usize) + u64::from(xattr::needs_block(plan.xattrs))
}

impl Allocator<'_> {
    /// Places an inode's blocks, one after the other: its xattr block, its
    /// data, then its extent tree.
    fn place(&mut self, plan: &mut InodePlan<'_>) {
        if xattr::needs_block(plan.xattrs) {
            plan.xattr_block = self.allocate(0, 1).first().map(|run| run.start);
        }
        for (logical, blocks) in block_segments(plan) {
            plan.runs.extend(self.allocate(logical, blocks));
        }
        let tree = extent::tree_blocks(plan.runs.len());
        plan.tree_blocks = self.allocate(0, tree).iter().flat_map(|run| run.start..run.start + run.len).collect();
    }
}

fn label_bytes(label: Option<&str>) -> Result<[u8; 16]> {
    let mut bytes = [0u8; 16];
    if let Some(label) = label {
        if label.len() > 16 || label.contains('\0') {
            return Err(Error::InvalidLabel {
                label: label.to_owned(),
                reason: "an ext4 label is at most 16 bytes, with no NUL".into(),
            });
        }
        bytes[..label.len()].copy_from_slice(label.as_bytes());
    }
    Ok(bytes)
}
