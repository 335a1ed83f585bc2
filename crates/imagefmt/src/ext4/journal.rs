//! The journal of the writable profile: inode 8, an internal jbd2 log as
//! mke2fs makes it (e2fsprogs' lib/ext2fs/mkjournal.c; the format is the
//! kernel's Documentation/filesystems/ext4/journal.rst). Its size is
//! mke2fs's for the filesystem size; its blocks are contiguous and read
//! as zero except the first, the jbd2 superblock: version 2, no features
//! (mke2fs sets none; the kernel turns on `csum_v3` and `64bit` itself when
//! it first mounts the filesystem read-write), empty (`s_start` 0), the
//! filesystem's UUID, one user.

use super::disk::{self, Inode};
use super::layout::Run;
use super::{BLOCK, EXTENT_MAX_BLOCKS, extent, xattr};
use crate::le::put32;

pub(crate) const JOURNAL_INO: u32 = 8;
/// The smallest filesystem mke2fs gives a journal (`ext2fs_default_journal_size`).
pub(crate) const MIN_FS_BLOCKS: u64 = 2048;
const JBD2_MAGIC: u32 = 0xC03B_3998;
const JBD2_SUPERBLOCK_V2: u32 = 4;

/// `ext2fs_default_journal_size`: the journal mke2fs makes for a
/// filesystem of `fs_blocks` blocks, or `None` below 2048 blocks.
pub(crate) fn default_blocks(fs_blocks: u64) -> Option<u64> {
    let blocks = match fs_blocks {
        b if b < MIN_FS_BLOCKS => return None,
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    };
    Some(blocks)
}

/// Where the journal sits: one run of blocks holding its extent tree's
/// blocks (a journal of more than four extents, 1 GiB from 128 GiB
/// filesystems on, needs one leaf), then the journal itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) start: u64,
    /// The journal's blocks, not counting its tree's.
    pub(crate) len: u64,
}

impl Placement {
    fn tree_blocks(&self) -> u64 {
        extent::tree_blocks(self.len.div_ceil(EXTENT_MAX_BLOCKS) as usize)
    }

    /// The first block past it.
    pub(crate) fn end(&self) -> u64 {
        self.start + self.tree_blocks() + self.len
    }

    /// Where the journal superblock goes: the journal's first block.
    pub(crate) fn first_block(&self) -> u64 {
        self.start + self.tree_blocks()
    }

    /// `i_block` and the tree blocks to write.
    pub(crate) fn extents(&self, fs_seed: u32) -> ([u8; 60], Vec<(u64, Vec<u8>)>) {
        let first = self.first_block();
        let runs: Vec<Run> = (0..self.len.div_ceil(EXTENT_MAX_BLOCKS))
            .map(|n| n * EXTENT_MAX_BLOCKS)
            .map(|logical| Run { logical, start: first + logical, len: EXTENT_MAX_BLOCKS.min(self.len - logical) })
            .collect();
        let tree: Vec<u64> = (self.start..first).collect();
        extent::encode(&runs, &tree, JOURNAL_INO, fs_seed)
    }

    /// Inode 8: a 0600 regular file owned by root holding the journal.
    pub(crate) fn inode(&self, fs_seed: u32, mtime: i64, mtime_nsec: u32) -> Inode {
        Inode {
            mode: disk::S_IFREG | 0o600,
            uid: 0,
            gid: 0,
            size: self.len * BLOCK,
            links: 1,
            blocks: self.end() - self.start,
            flags: disk::INODE_FLAG_EXTENTS,
            block: self.extents(fs_seed).0,
            mtime,
            mtime_nsec,
            xattr_block: 0,
            xattrs: [0; xattr::IBODY_BYTES],
        }
    }

    /// The superblock's copy of the journal inode (`s_jnl_blocks`): its
    /// `i_block` words, then its size's high and low halves.
    pub(crate) fn backup(&self, fs_seed: u32) -> [u8; 68] {
        let mut b = [0u8; 68];
        b[..60].copy_from_slice(&self.extents(fs_seed).0);
        let size = self.len * BLOCK;
        put32(&mut b, 60, (size >> 32) as u32);
        put32(&mut b, 64, size as u32);
        b
    }
}

/// The jbd2 superblock, the journal's first block (big-endian fields).
pub(crate) fn superblock(uuid: &[u8; 16], journal_blocks: u64) -> [u8; 1024] {
    let mut b = [0u8; 1024];
    let mut put = |at: usize, value: u32| b[at..at + 4].copy_from_slice(&value.to_be_bytes());
    put(0x00, JBD2_MAGIC);
    put(0x04, JBD2_SUPERBLOCK_V2);
    put(0x0C, BLOCK as u32); // s_blocksize
    put(0x10, journal_blocks as u32); // s_maxlen
    put(0x14, 1); // s_first: the log starts after this block
    put(0x18, 1); // s_sequence: the first transaction's
    put(0x40, 1); // s_nr_users
    b[0x30..0x40].copy_from_slice(uuid);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_mke2fs() {
        let cases =
            [(2047, None), (2048, Some(1024)), (32768, Some(4096)), (16 << 20, Some(131072)), (1 << 40, Some(262144))];
        for (fs_blocks, journal) in cases {
            assert_eq!(default_blocks(fs_blocks), journal, "{fs_blocks}");
        }
    }

    #[test]
    fn a_journal_of_more_than_four_extents_starts_with_its_leaf() {
        let small = Placement { start: 100, len: 131072 };
        assert_eq!((small.first_block(), small.end()), (100, 100 + 131072));
        let large = Placement { start: 100, len: 262144 };
        assert_eq!((large.first_block(), large.end()), (101, 101 + 262144));
        let (root, tree) = large.extents(0);
        assert_eq!(&root[..8], &[0x0A, 0xF3, 1, 0, 4, 0, 1, 0], "one index entry, depth 1");
        assert_eq!(tree.len(), 1);
        assert_eq!(tree[0].0, 100);
    }
}
