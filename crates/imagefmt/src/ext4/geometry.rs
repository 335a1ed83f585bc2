//! Geometry: where every region of the filesystem sits, decided from the
//! block count, the inode count and whether there is a journal, and how
//! much of each group is used. Nothing here is O(blocks): a group's use is
//! a prefix of it, so bitmaps and free counts are computed per group.
//!
//! The placement is mke2fs's `flex_bg` one, with flex groups of 16: the
//! block bitmaps, inode bitmaps and inode tables of groups 16f to 16f+15
//! sit together at the start of group 16f (in group 0 after the
//! superblock and descriptor table). A backup superblock and descriptor
//! table (`sparse_super`: groups 1 and powers of 3, 5 and 7, none of them
//! a multiple of 16) starts its group. The journal follows group 0's
//! metadata when it fits in group 0 (filesystems up to 16 GiB), and
//! otherwise fills whole groups holding nothing else from the middle of
//! the filesystem on, where mke2fs puts it. So every group's reserved
//! blocks are one run at its start ([`Geometry::reserved`]); data is
//! allocated upwards from the end of group 0's, around the others.

use super::layout::{BLOCKS_PER_GROUP, DESC_SIZE, INODE_SIZE, Run};
use super::{BLOCK, EXTENT_MAX_BLOCKS, journal};
use crate::{Error, Result};

/// Groups whose metadata sits together, as mke2fs's default `-G 16`.
pub(crate) const GROUPS_PER_FLEX: u32 = 16;
/// The smallest automatic image: 64 blocks (256 KiB).
const MIN_BLOCKS: u64 = 64;
/// Where the automatic size stops growing: 1 TiB.
const MAX_AUTO_BLOCKS: u64 = 1 << 28;
/// mke2fs drops a last group holding less than its own metadata plus this.
const LAST_GROUP_SLACK: u64 = 50;
/// The most inodes ext4 counts (32-bit inode numbers).
const MAX_INODES: u64 = u32::MAX as u64;

/// Where the regions of the filesystem sit, in blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) blocks: u64,
    pub(crate) groups: u32,
    pub(crate) gdt_blocks: u64,
    pub(crate) inodes_per_group: u32,
    pub(crate) itable_blocks: u64,
    /// The length of the image file, at least `blocks * BLOCK`.
    pub(crate) image_bytes: u64,
    /// The journal's blocks (inode 8) and its extent tree's, one run.
    pub(crate) journal: Option<journal::Placement>,
}

/// What the content needs of the filesystem, for sizing it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Demand {
    /// The highest inode number the tree uses.
    pub(crate) inodes: u64,
    pub(crate) data_blocks: u64,
    /// The writable profile: a journal, and inodes as mke2fs counts them.
    pub(crate) journal: bool,
}

impl Demand {
    /// Inodes for a filesystem of `blocks`: the tree's, or for a writable
    /// disk mke2fs's count if larger (one per `default_inode_ratio` bytes).
    fn inodes_for(&self, blocks: u64) -> u64 {
        let ratio = if self.journal { (blocks * BLOCK / default_inode_ratio(blocks)).min(MAX_INODES) } else { 0 };
        self.inodes.max(ratio)
    }
}

/// mke2fs's bytes per inode for a filesystem of `blocks` 4 KiB blocks:
/// its size types (misc/mke2fs.c) with Debian 12's /etc/mke2fs.conf ratios.
pub(crate) fn default_inode_ratio(blocks: u64) -> u64 {
    let mib = 1 << 20 >> 12; // blocks per MiB
    match blocks {
        b if b < 3 * mib => 8192,        // floppy
        b if b < 512 * mib => 4096,      // small
        b if b < 4 << 20 << 8 => 16384,  // default, below 4 TiB
        b if b < 16 << 20 << 8 => 32768, // big, below 16 TiB
        _ => 65536,                      // huge
    }
}

impl Geometry {
    pub(crate) fn has_backup(group: u32) -> bool {
        fn power_of(mut n: u32, base: u32) -> bool {
            while n > 1 && n % base == 0 {
                n /= base;
            }
            n == 1
        }
        group <= 1 || power_of(group, 3) || power_of(group, 5) || power_of(group, 7)
    }

    pub(crate) fn group_start(group: u32) -> u64 {
        u64::from(group) * BLOCKS_PER_GROUP
    }

    /// Blocks a superblock copy and its descriptor table take.
    pub(crate) fn backup_blocks(&self) -> u64 {
        1 + self.gdt_blocks
    }

    pub(crate) fn blocks_in_group(&self, group: u32) -> u64 {
        self.blocks.saturating_sub(Geometry::group_start(group)).min(BLOCKS_PER_GROUP)
    }

    /// The groups of `first`'s flex group (`first` a multiple of 16).
    fn flex_members(&self, first: u32) -> u64 {
        u64::from(GROUPS_PER_FLEX.min(self.groups - first))
    }

    /// Where the bitmaps and inode tables of `group`'s flex group start,
    /// and `group`'s place among them.
    fn flex_slot(&self, group: u32) -> (u64, u64, u64) {
        let first = group - group % GROUPS_PER_FLEX;
        let backup = if Geometry::has_backup(first) { self.backup_blocks() } else { 0 };
        (Geometry::group_start(first) + backup, self.flex_members(first), u64::from(group - first))
    }

    pub(crate) fn block_bitmap(&self, group: u32) -> u64 {
        let (start, _, index) = self.flex_slot(group);
        start + index
    }

    pub(crate) fn inode_bitmap(&self, group: u32) -> u64 {
        let (start, members, index) = self.flex_slot(group);
        start + members + index
    }

    pub(crate) fn inode_table(&self, group: u32) -> u64 {
        let (start, members, index) = self.flex_slot(group);
        start + 2 * members + index * self.itable_blocks
    }

    /// The metadata at the start of `group`: its backup superblock and
    /// descriptors, and its flex group's bitmaps and tables if it leads one.
    fn metadata(&self, group: u32) -> u64 {
        if group >= self.groups {
            return 0;
        }
        let backup = if Geometry::has_backup(group) { self.backup_blocks() } else { 0 };
        let flex = if group % GROUPS_PER_FLEX == 0 { self.flex_members(group) * (2 + self.itable_blocks) } else { 0 };
        backup + flex
    }

    /// The blocks at the start of `group` that hold metadata or journal.
    pub(crate) fn reserved(&self, group: u32) -> u64 {
        let metadata = self.metadata(group);
        let start = Geometry::group_start(group);
        match self.journal {
            // The journal starts where a group's metadata ends (see the module doc).
            Some(journal) if journal.start < start + BLOCKS_PER_GROUP && journal.end() > start => {
                metadata.max(journal.end().min(start + BLOCKS_PER_GROUP) - start)
            }
            _ => metadata,
        }
    }

    /// The first block after group 0's metadata and journal, where data starts.
    pub(crate) fn data_start(&self) -> u64 {
        self.reserved(0)
    }

    /// Blocks used in `group` when data fills everything below `end`.
    pub(crate) fn used_in_group(&self, group: u32, end: u64) -> u64 {
        let start = Geometry::group_start(group);
        let below_end = end.clamp(start, start + self.blocks_in_group(group)) - start;
        self.reserved(group).max(below_end)
    }

    pub(crate) fn free_in_group(&self, group: u32, end: u64) -> u64 {
        self.blocks_in_group(group) - self.used_in_group(group, end)
    }

    /// Every group's reserved blocks.
    fn reserved_total(&self) -> u64 {
        (0..self.groups).map(|group| self.reserved(group)).sum()
    }

    pub(crate) fn inodes(&self) -> u32 {
        self.groups * self.inodes_per_group
    }

    /// The geometry for `blocks` blocks holding at least `inodes` inodes,
    /// or `None` if its metadata or journal would not fit. A short last
    /// group is dropped, by mke2fs's rule.
    fn for_blocks(blocks: u64, demand: Demand, image_bytes: u64) -> Option<Geometry> {
        let (inodes, journal) = (demand.inodes_for(blocks), demand.journal);
        let mut blocks = blocks;
        loop {
            let groups = blocks.div_ceil(BLOCKS_PER_GROUP);
            let mut ipg = inodes.div_ceil(groups).next_multiple_of(16).max(16);
            if ipg > BLOCK * 8 {
                // mke2fs's ratio, counted before a short last group was
                // dropped, can ask more than a bitmap holds: give what it
                // holds (mke2fs shrinks its groups instead), if the tree fits.
                if demand.inodes.div_ceil(groups) > BLOCK * 8 {
                    return None;
                }
                ipg = BLOCK * 8;
            }
            if ipg * groups > MAX_INODES {
                ipg = MAX_INODES / groups / 16 * 16;
            }
            let itable_blocks = ipg * INODE_SIZE / BLOCK;
            let gdt_blocks = (groups * DESC_SIZE).div_ceil(BLOCK);
            let last = u32::try_from(groups - 1).ok()?;
            let rem = blocks % BLOCKS_PER_GROUP;
            let last_backup = if Geometry::has_backup(last) { 1 + gdt_blocks } else { 0 };
            if groups > 1 && rem != 0 && rem < 2 + itable_blocks + last_backup + LAST_GROUP_SLACK {
                blocks -= rem;
                continue;
            }
            let mut geometry = Geometry {
                blocks,
                groups: last + 1,
                gdt_blocks,
                inodes_per_group: ipg as u32,
                itable_blocks,
                image_bytes,
                journal: None,
            };
            if ipg * groups < demand.inodes || (0..=last).any(|g| geometry.metadata(g) > geometry.blocks_in_group(g)) {
                return None;
            }
            if journal {
                geometry.journal = Some(geometry.place_journal()?);
            }
            return Some(geometry);
        }
    }

    /// After group 0's metadata if the journal fits there, else in whole
    /// groups holding nothing else, from the middle of the filesystem on.
    fn place_journal(&self) -> Option<journal::Placement> {
        let len = journal::default_blocks(self.blocks)?;
        let in_group_0 = journal::Placement { start: self.metadata(0), len };
        if in_group_0.end() <= self.blocks_in_group(0) {
            return Some(in_group_0);
        }
        let span = (in_group_0.end() - in_group_0.start).div_ceil(BLOCKS_PER_GROUP) as u32;
        let empty = |group: u32| self.metadata(group) == 0 && self.blocks_in_group(group) == BLOCKS_PER_GROUP;
        let middle = self.groups / 2;
        (middle..self.groups)
            .chain(1..middle)
            .find(|&first| (first..first + span).all(empty))
            .map(|first| journal::Placement { start: Geometry::group_start(first), len })
    }
}

/// Finds the geometry for the content: the smallest with a little
/// headroom, or the one `size` gives.
pub(crate) fn size_geometry(size: Option<u64>, demand: Demand) -> Result<Geometry> {
    if demand.inodes > MAX_INODES {
        return Err(Error::Ext4TooManyInodes { inodes: demand.inodes, max: MAX_INODES });
    }
    if let Some(size) = size {
        return fixed_geometry(size, demand);
    }
    let floor = if demand.journal { journal::MIN_FS_BLOCKS } else { MIN_BLOCKS };
    let mut blocks = (demand.data_blocks + 16).max(floor);
    loop {
        let geometry = match Geometry::for_blocks(blocks, demand, blocks * BLOCK) {
            Some(geometry) => geometry,
            // More groups make each group's inode table smaller, so that
            // a flex group's tables fit in its first group.
            None if blocks < MAX_AUTO_BLOCKS => {
                blocks += BLOCKS_PER_GROUP;
                continue;
            }
            None => return Err(Error::DoesNotFit { needed: blocks * BLOCK, size: MAX_AUTO_BLOCKS * BLOCK }),
        };
        let used = geometry.reserved_total() + demand.data_blocks;
        let wanted = (used + used / 64 + 16).max(floor);
        if wanted <= geometry.blocks {
            return Ok(geometry);
        }
        // Asking for `wanted` again would give the same geometry when its
        // short last group was dropped: always grow, so that a size that
        // keeps the last group is reached in a few steps.
        blocks = wanted.max(blocks + MIN_BLOCKS);
    }
}

/// The geometry of an image of exactly `size` bytes.
fn fixed_geometry(size: u64, demand: Demand) -> Result<Geometry> {
    if size == 0 || size % BLOCK != 0 {
        return Err(Error::InvalidSize {
            size,
            reason: format!("an ext4 image is a whole number of {BLOCK}-byte blocks"),
        });
    }
    let blocks = size / BLOCK;
    if demand.journal && blocks < journal::MIN_FS_BLOCKS {
        return Err(Error::InvalidSize {
            size,
            reason: format!(
                "a journaled ext4 image is at least {} bytes, the least mke2fs gives a journal",
                journal::MIN_FS_BLOCKS * BLOCK
            ),
        });
    }
    let geometry = Geometry::for_blocks(blocks, demand, size)
        .ok_or_else(|| Error::DoesNotFit { needed: (demand.inodes * INODE_SIZE).max(size + 1), size })?;
    let needed = geometry.reserved_total() + demand.data_blocks;
    if needed > geometry.blocks {
        return Err(Error::DoesNotFit { needed: needed * BLOCK, size });
    }
    Ok(geometry)
}

/// Hands out blocks in ascending order, around every group's reserved blocks.
pub(crate) struct Allocator<'g> {
    geometry: &'g Geometry,
    /// The next free block; everything below it is used.
    pub(crate) next: u64,
}

impl<'g> Allocator<'g> {
    pub(crate) fn new(geometry: &'g Geometry) -> Allocator<'g> {
        Allocator { geometry, next: geometry.data_start() }
    }

    /// The runs holding the next `blocks` blocks, the first for logical
    /// block `logical`, each at most one extent long.
    pub(crate) fn allocate(&mut self, mut logical: u64, mut blocks: u64) -> Vec<Run> {
        let g = self.geometry;
        let mut runs = Vec::new();
        while blocks > 0 {
            let mut group = (self.next / BLOCKS_PER_GROUP) as u32;
            // A journal can fill whole groups: skip until a free block.
            while self.next < Geometry::group_start(group) + g.reserved(group) {
                self.next = Geometry::group_start(group) + g.reserved(group);
                group = (self.next / BLOCKS_PER_GROUP) as u32;
            }
            let mut boundary = group + 1;
            while boundary < g.groups && g.reserved(boundary) == 0 {
                boundary += 1;
            }
            let len = blocks.min(Geometry::group_start(boundary) - self.next).min(EXTENT_MAX_BLOCKS);
            runs.push(Run { logical, start: self.next, len });
            self.next += len;
            logical += len;
            blocks -= len;
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writable(size: u64) -> Geometry {
        size_geometry(Some(size), Demand { inodes: 11, data_blocks: 2, journal: true }).unwrap()
    }

    #[test]
    fn inode_counts_follow_mke2fs_size_types() {
        // mke2fs -t ext4 -b 4096 gives these inode counts for these sizes.
        for (size, inodes) in [(8u64 << 20, 2048u32), (64 << 20, 16384), (1 << 30, 65536), (10 << 30, 655_360)] {
            assert_eq!(writable(size).inodes(), inodes, "{size}");
        }
    }

    #[test]
    fn a_64_gib_disk_spreads_metadata_over_flex_groups() {
        let g = writable(64 << 30);
        assert_eq!((g.groups, g.inodes_per_group, g.itable_blocks), (512, 8192, 512));
        assert_eq!(g.inode_table(16), Geometry::group_start(16) + 32);
        assert_eq!(g.reserved(17), 0);
        let journal = g.journal.unwrap();
        // 2^24 blocks is just past mke2fs's 256 MiB class: four whole groups.
        assert_eq!(journal.len, 131072);
        assert_eq!(journal.start % BLOCKS_PER_GROUP, 0, "{journal:?}");
        let first = (journal.start / BLOCKS_PER_GROUP) as u32;
        assert!((first..first + 4).all(|group| g.reserved(group) == BLOCKS_PER_GROUP), "{journal:?}");
    }

    #[test]
    fn the_allocator_skips_reserved_blocks() {
        let g = writable(64 << 30);
        let journal = g.journal.unwrap();
        let mut allocator = Allocator::new(&g);
        allocator.next = journal.start - 10;
        let runs = allocator.allocate(0, 20);
        let after = journal.end();
        let expected =
            vec![Run { logical: 0, start: journal.start - 10, len: 10 }, Run { logical: 10, start: after, len: 10 }];
        assert_eq!(runs, expected);
    }

    /// Every block of `g` that holds metadata or journal, with what it holds.
    fn claims(g: &Geometry) -> Vec<(u64, u64, String)> {
        let mut claims = Vec::new();
        for group in 0..g.groups {
            if Geometry::has_backup(group) {
                claims.push((Geometry::group_start(group), g.backup_blocks(), format!("backup {group}")));
            }
            claims.push((g.block_bitmap(group), 1, format!("block bitmap {group}")));
            claims.push((g.inode_bitmap(group), 1, format!("inode bitmap {group}")));
            claims.push((g.inode_table(group), g.itable_blocks, format!("inode table {group}")));
        }
        if let Some(journal) = g.journal {
            claims.push((journal.start, journal.end() - journal.start, "journal".into()));
        }
        claims.sort();
        claims
    }

    proptest::proptest! {
        #[test]
        fn metadata_and_journal_never_overlap_and_fill_each_groups_reserved_run(
            blocks in proptest::prop_oneof![2048u64..200_000, 200_000u64..1 << 26],
            inodes in 11u64..200_000,
            journal in proptest::bool::ANY,
        ) {
            let Ok(g) = size_geometry(Some(blocks * BLOCK), Demand { inodes, data_blocks: 0, journal }) else {
                return Ok(()); // too many inodes for a small size: refused, not misplaced
            };
            proptest::prop_assert!(u64::from(g.inodes()) >= inodes);
            let claims = claims(&g);
            for pair in claims.windows(2) {
                proptest::prop_assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{:?} overlaps {:?}", pair[0], pair[1]);
            }
            // Every claim starts in a reserved run, only the journal spills
            // into the next groups', and the runs hold nothing else.
            let mut reserved = 0;
            for group in 0..g.groups {
                let run = g.reserved(group);
                proptest::prop_assert!(run <= g.blocks_in_group(group), "group {}", group);
                reserved += run;
            }
            let claimed: u64 = claims.iter().map(|claim| claim.1).sum();
            proptest::prop_assert_eq!(claimed, reserved);
            for (start, len, what) in &claims {
                let group = (start / BLOCKS_PER_GROUP) as u32;
                let end = Geometry::group_start(group) + g.reserved(group);
                let spills = start + len > end;
                proptest::prop_assert!(*start < end && (!spills || what == "journal"), "{} at {}+{}", what, start, len);
            }
        }
    }
}
