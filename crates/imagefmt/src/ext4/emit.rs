//! Writing a planned layout: superblocks and descriptor tables, bitmaps,
//! inode tables, xattr and extent tree blocks, directory and symlink
//! blocks, then file data.

use std::os::unix::fs::FileExt;

use super::data::DataWriter;
use super::disk::{self, GroupDesc, Inode, Superblock};
use super::htree;
use super::layout::{
    BLOCKS_PER_GROUP, DESC_SIZE, Ext4Layout, FAST_SYMLINK_MAX, Geometry, INODE_SIZE, InodeKind, InodePlan, Run,
};
use super::tree::{DataRange, FileNode, SpecialKind};
use super::{BLOCK, DeviceKind, extent, journal, xattr};
use crate::sink::{Sink, Source, copy_host_file, open_holding, open_unchanged, write_nonzero};
use crate::{Error, Result};

/// Inodes encoded per inode-table write: 1 MiB, a multiple of the block.
const INODES_PER_WRITE: usize = 4096;
/// Bytes read at a time from a host file whose blocks are split in several runs.
const COPY_BUFFER: usize = 1 << 20;

impl Ext4Layout<'_> {
    pub(crate) fn emit(&self, sink: &mut dyn Sink) -> Result<()> {
        let g = &self.geometry;
        let seed = disk::csum_seed(&self.uuid);
        let descriptors = self.write_bitmaps(sink, seed)?;
        let mut table = Vec::with_capacity((u64::from(g.groups) * DESC_SIZE) as usize);
        for (group, desc) in descriptors.iter().enumerate() {
            table.extend_from_slice(&desc.encode(group as u32, seed));
        }
        let summary = self.summary();
        for group in (0..g.groups).filter(|&group| Geometry::has_backup(group)) {
            let superblock = Superblock {
                blocks: g.blocks,
                free_blocks: summary.free_blocks,
                inodes: summary.inodes,
                free_inodes: summary.free_inodes,
                inodes_per_group: g.inodes_per_group,
                uuid: self.uuid,
                label: self.label,
                hash_seed: self.hash_seed,
                group: group as u16,
                journal_backup: g.journal.map(|journal| journal.backup(seed)),
            };
            let start = Geometry::group_start(group) * BLOCK;
            // The primary sits 1 KiB in; each backup at the start of its group.
            let offset = if group == 0 { 1024 } else { start };
            sink.write_at(offset, &superblock.encode()).map_err(Error::Write)?;
            sink.write_at(start + BLOCK, &table).map_err(Error::Write)?;
        }
        self.write_inode_tables(sink, seed)?;
        self.write_inode_blocks(sink, seed)?;
        if let Some(journal) = g.journal {
            for (block, bytes) in journal.extents(seed).1 {
                sink.write_at(block * BLOCK, &bytes).map_err(Error::Write)?;
            }
            // The rest of the journal stays zero (holes).
            let superblock = journal::superblock(&self.uuid, journal.len);
            sink.write_at(journal.first_block() * BLOCK, &superblock).map_err(Error::Write)?;
        }
        // Small files go through the staging writer; the rest one by one.
        let image = sink.positional_file();
        std::thread::scope(|scope| {
            let mut data = DataWriter::new(scope, image);
            for (index, plan) in self.inodes.iter().enumerate() {
                if !data.stage(sink, plan)? {
                    self.write_data(sink, Ext4Layout::ino(index), plan, seed)?;
                }
            }
            data.flush(sink)
        })?;
        sink.finish(g.image_bytes).map_err(Error::Write)
    }

    /// Writes every group's bitmaps, returning the descriptors that describe them.
    fn write_bitmaps(&self, sink: &mut dyn Sink, seed: u32) -> Result<Vec<GroupDesc>> {
        let g = &self.geometry;
        let mut descriptors = Vec::with_capacity(g.groups as usize);
        for group in 0..g.groups {
            // Used blocks are a prefix of the group; bits past the end of
            // the last group are set, as the format asks.
            let mut blocks = vec![0u8; BLOCK as usize];
            set_bits(&mut blocks, 0..g.used_in_group(group, self.end) as usize);
            set_bits(&mut blocks, g.blocks_in_group(group) as usize..BLOCKS_PER_GROUP as usize);
            let ipg = g.inodes_per_group as usize;
            let used_inodes = self.used_inodes_in_group(group) as usize;
            let mut inodes = vec![0u8; BLOCK as usize];
            set_bits(&mut inodes, 0..used_inodes);
            set_bits(&mut inodes, ipg..BLOCK as usize * 8);
            let desc = GroupDesc {
                block_bitmap: g.block_bitmap(group),
                inode_bitmap: g.inode_bitmap(group),
                inode_table: g.inode_table(group),
                free_blocks: self.free_blocks(group) as u32,
                free_inodes: g.inodes_per_group - used_inodes as u32,
                used_dirs: self.dirs_in_group(group),
                block_bitmap_csum: disk::bitmap_csum(seed, &blocks),
                inode_bitmap_csum: disk::bitmap_csum(seed, &inodes[..ipg / 8]),
                inodes_unused: used_inodes == 0,
            };
            write_nonzero(sink, desc.block_bitmap * BLOCK, &blocks).map_err(Error::Write)?;
            write_nonzero(sink, desc.inode_bitmap * BLOCK, &inodes).map_err(Error::Write)?;
            descriptors.push(desc);
        }
        Ok(descriptors)
    }

    /// Writes the used inodes, group by group, at most `INODES_PER_WRITE`
    /// at a time (a whole group's table of 120,000 files was 5 MiB of peak
    /// RSS); the rest of each table stays zero.
    fn write_inode_tables(&self, sink: &mut dyn Sink, seed: u32) -> Result<()> {
        let g = &self.geometry;
        let mut table =
            TableWriter { base: 0, first: 0, bytes: Vec::with_capacity(INODES_PER_WRITE * INODE_SIZE as usize) };
        for group in 0..g.groups {
            table.start(g.inode_table(group) * BLOCK);
            // Inode 8, the journal, goes between the root (2) and 11 in group 0.
            let mut journal = g.journal.filter(|_| group == 0).map(|journal| {
                let root = &self.inodes[0].meta;
                journal.inode(seed, root.mtime, root.mtime_nsec).encode(journal::JOURNAL_INO, seed)
            });
            let index = |ino: u32| ((ino - 1) % g.inodes_per_group) as usize;
            for (ino, plan) in self.inodes_in_group(group) {
                if ino > journal::JOURNAL_INO
                    && let Some(bytes) = journal.take()
                {
                    table.place(sink, index(journal::JOURNAL_INO), &bytes)?;
                }
                table.place(sink, index(ino), &inode_for(plan, ino, seed).encode(ino, seed))?;
            }
            if let Some(bytes) = journal.take() {
                table.place(sink, index(journal::JOURNAL_INO), &bytes)?;
            }
            table.flush(sink)?;
        }
        Ok(())
    }

    /// Writes each inode's xattr block and extent tree blocks.
    fn write_inode_blocks(&self, sink: &mut dyn Sink, seed: u32) -> Result<()> {
        for (index, plan) in self.inodes.iter().enumerate() {
            if let Some(block) = plan.xattr_block {
                // The layout gave a block only to xattrs that fit one.
                let (_, in_block) = xattr::split(plan.xattrs).unwrap_or_default();
                sink.write_at(block * BLOCK, &xattr::block(&in_block, block, seed)).map_err(Error::Write)?;
            }
            if !plan.tree_blocks.is_empty() {
                let (_, blocks) = extent::encode(&plan.runs, &plan.tree_blocks, Ext4Layout::ino(index), seed);
                for (block, bytes) in blocks {
                    sink.write_at(block * BLOCK, &bytes).map_err(Error::Write)?;
                }
            }
        }
        Ok(())
    }

    fn write_data(&self, sink: &mut dyn Sink, ino: u32, plan: &InodePlan<'_>, seed: u32) -> Result<()> {
        match &plan.kind {
            InodeKind::Dir { parent, entries } => {
                let bytes = htree::dir_blocks(ino, *parent, entries, &self.hash_seed, seed);
                write_runs(sink, &plan.runs, &bytes)
            }
            InodeKind::Symlink(target) if target.len() > FAST_SYMLINK_MAX => {
                write_runs(sink, &plan.runs, target.as_bytes())
            }
            InodeKind::Symlink(_) | InodeKind::Special(_) => Ok(()),
            InodeKind::File(file) => write_file_data(sink, plan, file),
        }
    }
}

/// One group's inode table, encoded `INODES_PER_WRITE` inodes at a time.
struct TableWriter {
    /// Where the group's table starts, in bytes.
    base: u64,
    /// The index in the group of the first inode in `bytes`.
    first: usize,
    bytes: Vec<u8>,
}

impl TableWriter {
    fn start(&mut self, base: u64) {
        (self.base, self.first) = (base, 0);
        self.bytes.clear();
    }

    /// Puts an encoded inode at `index`; inodes come in ascending order.
    fn place(&mut self, sink: &mut dyn Sink, index: usize, inode: &[u8]) -> Result<()> {
        if index >= self.first + INODES_PER_WRITE {
            self.flush(sink)?;
            self.first = index / INODES_PER_WRITE * INODES_PER_WRITE;
        }
        let at = (index - self.first) * INODE_SIZE as usize;
        self.bytes.resize(at + INODE_SIZE as usize, 0);
        self.bytes[at..].copy_from_slice(inode);
        Ok(())
    }

    fn flush(&mut self, sink: &mut dyn Sink) -> Result<()> {
        if !self.bytes.is_empty() {
            let at = self.base + (self.first * INODE_SIZE as usize) as u64;
            write_nonzero(sink, at, &self.bytes).map_err(Error::Write)?;
            self.bytes.clear();
        }
        Ok(())
    }
}

/// The inode for plan `ino`: type, metadata, size, block map and xattrs.
fn inode_for(plan: &InodePlan<'_>, ino: u32, seed: u32) -> Inode {
    let meta = plan.meta;
    let (type_bits, size) = match &plan.kind {
        InodeKind::Dir { .. } => (disk::S_IFDIR, plan.data_blocks() * BLOCK),
        InodeKind::File(file) => (disk::S_IFREG, file.size),
        InodeKind::Symlink(target) => (disk::S_IFLNK, target.len() as u64),
        InodeKind::Special(SpecialKind::Device { kind: DeviceKind::Char, .. }) => (disk::S_IFCHR, 0),
        InodeKind::Special(SpecialKind::Device { kind: DeviceKind::Block, .. }) => (disk::S_IFBLK, 0),
        InodeKind::Special(SpecialKind::Fifo) => (disk::S_IFIFO, 0),
    };
    let (flags, block) = match &plan.kind {
        InodeKind::Symlink(target) if target.len() <= FAST_SYMLINK_MAX => {
            let mut block = [0u8; 60];
            block[..target.len()].copy_from_slice(target.as_bytes());
            (0, block)
        }
        InodeKind::Dir { entries, .. } if htree::DirShape::of(entries).is_indexed() => {
            let root = extent::encode(&plan.runs, &plan.tree_blocks, ino, seed).0;
            (disk::INODE_FLAG_EXTENTS | htree::INODE_FLAG_INDEX, root)
        }
        // No extents flag: e2fsck takes a device with one for a corrupt inode.
        InodeKind::Special(SpecialKind::Device { major, minor, .. }) => (0, disk::device_block(*major, *minor)),
        InodeKind::Special(_) => (0, [0u8; 60]),
        _ => (disk::INODE_FLAG_EXTENTS, extent::encode(&plan.runs, &plan.tree_blocks, ino, seed).0),
    };
    let in_inode = if plan.xattrs.is_empty() { Vec::new() } else { xattr::split(plan.xattrs).unwrap_or_default().0 };
    Inode {
        mode: type_bits | meta.mode,
        uid: meta.uid,
        gid: meta.gid,
        size,
        links: plan.links,
        blocks: plan.owned_blocks(),
        flags,
        block,
        mtime: meta.mtime,
        mtime_nsec: meta.mtime_nsec,
        xattr_block: plan.xattr_block.unwrap_or(0),
        xattrs: xattr::ibody(&in_inode),
    }
}

/// Sets the bits of `range` in a bitmap.
fn set_bits(bitmap: &mut [u8], range: std::ops::Range<usize>) {
    let (start, end) = (range.start, range.end.max(range.start));
    let (first_byte, last_byte) = (start.div_ceil(8), end / 8);
    if first_byte > last_byte {
        // Within one byte.
        for bit in start..end {
            bitmap[bit / 8] |= 1 << (bit % 8);
        }
        return;
    }
    for bit in (start..first_byte * 8).chain(last_byte * 8..end) {
        bitmap[bit / 8] |= 1 << (bit % 8);
    }
    bitmap[first_byte..last_byte].fill(0xFF);
}

/// Writes `bytes` across `runs`, in order.
fn write_runs(sink: &mut dyn Sink, runs: &[Run], bytes: &[u8]) -> Result<()> {
    let mut done = 0usize;
    for run in runs {
        let take = ((run.len * BLOCK) as usize).min(bytes.len() - done);
        write_nonzero(sink, run.start * BLOCK, &bytes[done..done + take]).map_err(Error::Write)?;
        done += take;
    }
    Ok(())
}

/// Writes one regular file's data into the blocks `plan` gives it: each
/// data range to where its logical blocks sit, holes left unwritten.
pub(crate) fn write_file_data(sink: &mut dyn Sink, plan: &InodePlan<'_>, file: &FileNode) -> Result<()> {
    let runs = &plan.runs;
    if file.size == 0 {
        // Nothing to copy: an empty file is not opened (a directory of
        // 100,000 of them spent most of its syscalls opening them).
        return Ok(());
    }
    if file.ranges.is_none() {
        if let [run] = runs.as_slice() {
            // Dense and in one run: the kernel copies (or shares) the bytes.
            match &file.source {
                Source::Host(path) => {
                    return copy_host_file(sink, run.start * BLOCK, path, None, file.size, &mut |_| {});
                }
                Source::HostRange { path, offset } => {
                    return copy_host_file(sink, run.start * BLOCK, path, Some(*offset), file.size, &mut |_| {});
                }
                Source::Bytes(_) => {}
            }
        }
    }
    let ranges = file.data_ranges();
    match &file.source {
        Source::Bytes(bytes) => {
            let mut taken = 0usize;
            for range in ranges.iter() {
                let data = &bytes[taken..taken + range.len as usize];
                write_mapped(sink, runs, range.offset, data)?;
                taken += range.len as usize;
            }
            Ok(())
        }
        Source::Host(path) => copy_ranges(sink, runs, path, None, file.size, &ranges),
        Source::HostRange { path, offset } => copy_ranges(sink, runs, path, Some(*offset), file.size, &ranges),
    }
}

/// Writes `data`, which sits at byte `offset` of the file, into the runs
/// holding those logical blocks.
fn write_mapped(sink: &mut dyn Sink, runs: &[Run], offset: u64, data: &[u8]) -> Result<()> {
    let mut at = offset;
    let end = offset + data.len() as u64;
    // Runs are in logical order: find the first one holding `offset`.
    let first = runs.partition_point(|run| (run.logical + run.len) * BLOCK <= offset);
    for run in &runs[first..] {
        if at >= end {
            break;
        }
        let run_start = run.logical * BLOCK;
        let run_end = (run.logical + run.len) * BLOCK;
        let stop = end.min(run_end);
        let piece = &data[(at - offset) as usize..(stop - offset) as usize];
        write_nonzero(sink, run.start * BLOCK + (at - run_start), piece).map_err(Error::Write)?;
        at = stop;
    }
    Ok(())
}

/// Copies the data ranges of host file `path` through a buffer; with
/// `range_start`, the file's bytes start there in `path`.
fn copy_ranges(
    sink: &mut dyn Sink,
    runs: &[Run],
    path: &std::path::Path,
    range_start: Option<u64>,
    size: u64,
    ranges: &[DataRange],
) -> Result<()> {
    let src = match range_start {
        None => open_unchanged(path, size)?,
        Some(start) => open_holding(path, start, size)?,
    };
    let base = range_start.unwrap_or(0);
    let changed = || Error::SourceChanged { path: path.to_path_buf(), expected: base + size };
    let mut buffer = vec![0u8; COPY_BUFFER];
    for range in ranges {
        let mut at = range.offset;
        let end = range.offset + range.len;
        while at < end {
            let want = ((end - at) as usize).min(COPY_BUFFER);
            src.read_exact_at(&mut buffer[..want], base + at).map_err(|_| changed())?;
            write_mapped(sink, runs, at, &buffer[..want])?;
            at += want as u64;
        }
    }
    Ok(())
}
