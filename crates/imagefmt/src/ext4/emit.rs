//! Writing a planned layout: superblocks and descriptor tables, bitmaps,
//! inode tables, directory and symlink blocks, then file data.

use std::os::unix::fs::FileExt;

use super::BLOCK;
use super::data::DataWriter;
use super::disk::{self, GroupDesc, Inode, Superblock};
use super::layout::{
    BLOCKS_PER_GROUP, DESC_SIZE, Ext4Layout, FAST_SYMLINK_MAX, Geometry, INODE_SIZE, InodeKind, InodePlan, Run,
};
use super::tree::FileNode;
use crate::sink::{Sink, Source, copy_host_file, open_unchanged, write_nonzero};
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
            };
            let start = Geometry::group_start(group) * BLOCK;
            // The primary sits 1 KiB in; each backup at the start of its group.
            let offset = if group == 0 { 1024 } else { start };
            sink.write_at(offset, &superblock.encode()).map_err(Error::Write)?;
            sink.write_at(start + BLOCK, &table).map_err(Error::Write)?;
        }
        self.write_inode_tables(sink, seed)?;
        // Small files go through the staging writer; the rest one by one.
        let mut data = DataWriter::new();
        for (index, plan) in self.inodes.iter().enumerate() {
            if !data.stage(sink, plan)? {
                self.write_data(sink, Ext4Layout::ino(index), plan, seed)?;
            }
        }
        data.flush(sink)?;
        sink.finish(g.image_bytes).map_err(Error::Write)
    }

    /// Writes every group's bitmaps, returning the descriptors that describe them.
    fn write_bitmaps(&self, sink: &mut dyn Sink, seed: u32) -> Result<Vec<GroupDesc>> {
        let g = &self.geometry;
        let mut descriptors = Vec::with_capacity(g.groups as usize);
        for group in 0..g.groups {
            let start = Geometry::group_start(group);
            let len = g.blocks_in_group(group);
            let mut blocks = vec![0u8; BLOCK as usize];
            for bit in 0..BLOCKS_PER_GROUP {
                // Bits past the end of the last group are set, as the format asks.
                if bit >= len || self.block_used(start + bit) {
                    blocks[(bit / 8) as usize] |= 1 << (bit % 8);
                }
            }
            let ipg = g.inodes_per_group as usize;
            let used_inodes = self.used_inodes_in_group(group) as usize;
            let mut inodes = vec![0u8; BLOCK as usize];
            for bit in (0..used_inodes).chain(ipg..BLOCK as usize * 8) {
                inodes[bit / 8] |= 1 << (bit % 8);
            }
            let desc = GroupDesc {
                block_bitmap: g.block_bitmap(group),
                inode_bitmap: g.inode_bitmap(group),
                inode_table: g.inode_table(group),
                free_blocks: self.free_blocks(group) as u32,
                free_inodes: g.inodes_per_group - used_inodes as u32,
                used_dirs: self.dirs_in_group(group),
                block_bitmap_csum: disk::bitmap_csum(seed, &blocks),
                inode_bitmap_csum: disk::bitmap_csum(seed, &inodes[..ipg / 8]),
            };
            sink.write_at(desc.block_bitmap * BLOCK, &blocks).map_err(Error::Write)?;
            sink.write_at(desc.inode_bitmap * BLOCK, &inodes).map_err(Error::Write)?;
            descriptors.push(desc);
        }
        Ok(descriptors)
    }

    /// Writes the used inodes, group by group, at most `INODES_PER_WRITE`
    /// at a time (a whole group's table of 120,000 files was 5 MiB of peak
    /// RSS); the rest of each table stays zero.
    fn write_inode_tables(&self, sink: &mut dyn Sink, seed: u32) -> Result<()> {
        let g = &self.geometry;
        let size = INODE_SIZE as usize;
        let mut table = Vec::with_capacity(INODES_PER_WRITE * size);
        for group in 0..g.groups {
            let base = g.inode_table(group) * BLOCK;
            // The index in the group of the first inode in `table`.
            let mut first = 0;
            table.clear();
            for (ino, plan) in self.inodes_in_group(group) {
                let index = ((ino - 1) % g.inodes_per_group) as usize;
                if index >= first + INODES_PER_WRITE {
                    write_nonzero(sink, base + (first * size) as u64, &table).map_err(Error::Write)?;
                    first = index / INODES_PER_WRITE * INODES_PER_WRITE;
                    table.clear();
                }
                let at = (index - first) * size;
                table.resize(at + size, 0);
                table[at..].copy_from_slice(&inode_for(plan).encode(ino, seed));
            }
            if !table.is_empty() {
                write_nonzero(sink, base + (first * size) as u64, &table).map_err(Error::Write)?;
            }
        }
        Ok(())
    }

    fn write_data(&self, sink: &mut dyn Sink, ino: u32, plan: &InodePlan<'_>, seed: u32) -> Result<()> {
        match &plan.kind {
            InodeKind::Dir { parent, entries } => {
                let bytes = disk::dir_blocks(ino, *parent, entries, seed);
                write_runs(sink, &plan.runs, &bytes)
            }
            InodeKind::Symlink(target) if target.len() > FAST_SYMLINK_MAX => {
                write_runs(sink, &plan.runs, target.as_bytes())
            }
            InodeKind::Symlink(_) => Ok(()),
            InodeKind::File(file) => write_file_data(sink, &plan.runs, file),
        }
    }
}

/// The inode for a plan: type, metadata, size and block map.
fn inode_for(plan: &InodePlan<'_>) -> Inode {
    let meta = plan.meta;
    let (type_bits, size) = match &plan.kind {
        InodeKind::Dir { .. } => (disk::S_IFDIR, plan.data_blocks() * BLOCK),
        InodeKind::File(file) => (disk::S_IFREG, file.size),
        InodeKind::Symlink(target) => (disk::S_IFLNK, target.len() as u64),
    };
    let (flags, block) = match &plan.kind {
        InodeKind::Symlink(target) if target.len() <= FAST_SYMLINK_MAX => {
            let mut block = [0u8; 60];
            block[..target.len()].copy_from_slice(target.as_bytes());
            (0, block)
        }
        _ => (disk::INODE_FLAG_EXTENTS, disk::extent_root(&plan.runs)),
    };
    Inode {
        mode: type_bits | meta.mode,
        uid: meta.uid,
        gid: meta.gid,
        size,
        links: plan.links,
        data_blocks: plan.data_blocks(),
        flags,
        block,
        mtime: meta.mtime,
        mtime_nsec: meta.mtime_nsec,
    }
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

fn write_file_data(sink: &mut dyn Sink, runs: &[Run], file: &FileNode) -> Result<()> {
    let path = match &file.source {
        Source::Bytes(bytes) => return write_runs(sink, runs, bytes),
        Source::Host(path) => path,
    };
    let expected = file.size;
    if let [run] = runs {
        // One run: the kernel copies (or shares) the bytes.
        return copy_host_file(sink, run.start * BLOCK, path, expected, &mut |_| {});
    }
    let src = open_unchanged(path, expected)?;
    let changed = || Error::SourceChanged { path: path.clone(), expected };
    let mut buffer = vec![0u8; COPY_BUFFER];
    let mut offset = 0u64;
    for run in runs {
        let run_end = (offset + run.len * BLOCK).min(expected);
        let mut at = offset;
        while at < run_end {
            let want = ((run_end - at) as usize).min(COPY_BUFFER);
            src.read_exact_at(&mut buffer[..want], at).map_err(|_| changed())?;
            write_nonzero(sink, run.start * BLOCK + (at - offset), &buffer[..want]).map_err(Error::Write)?;
            at += want as u64;
        }
        offset = run_end;
    }
    Ok(())
}
