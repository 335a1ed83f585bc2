//! The journal of the writable profile: inode 8, an internal jbd2 log as
//! mke2fs makes it (e2fsprogs' lib/ext2fs/mkjournal.c; the format is the
//! kernel's Documentation/filesystems/ext4/journal.rst). Its size is
//! mke2fs's for the filesystem size; its blocks are contiguous and read
//! as zero except the first, the jbd2 superblock: version 2, no features
//! (mke2fs sets none; the kernel turns on `csum_v3` and `64bit` itself when
//! it first mounts the filesystem read-write), empty (`s_start` 0), the
//! filesystem's UUID, one user.

use super::BLOCK;
use super::disk::{self, Inode};
use super::layout::Run;
use crate::le::put32;

pub(crate) const JOURNAL_INO: u32 = 8;
/// The smallest filesystem mke2fs gives a journal (`ext2fs_default_journal_size`).
pub(crate) const MIN_FS_BLOCKS: u64 = 2048;
/// The largest journal the inode's own four extents map (512 MiB; mke2fs
/// makes 1 GiB ones from 128 GiB on, which need an extent index block).
pub(crate) const MAX_BLOCKS: u64 = super::INODE_EXTENTS as u64 * super::EXTENT_MAX_BLOCKS;
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

/// The journal's extents: its run cut into pieces one extent can map.
pub(crate) fn extents(run: Run) -> Vec<Run> {
    let max = super::EXTENT_MAX_BLOCKS;
    (0..run.len.div_ceil(max))
        .map(|n| Run { logical: n * max, start: run.start + n * max, len: max.min(run.len - n * max) })
        .collect()
}

/// The journal inode's `i_block`: its extents fit in the inode, since a
/// journal is at most [`MAX_BLOCKS`] long (four full extents).
fn extent_root(run: Run) -> [u8; 60] {
    let runs = extents(run);
    debug_assert!(runs.len() <= super::INODE_EXTENTS);
    super::extent::encode(&runs, &[], JOURNAL_INO, 0).0
}

/// Inode 8: a 0600 regular file owned by root holding the journal's blocks.
pub(crate) fn inode(run: Run, mtime: i64, mtime_nsec: u32) -> Inode {
    Inode {
        mode: disk::S_IFREG | 0o600,
        uid: 0,
        gid: 0,
        size: run.len * BLOCK,
        links: 1,
        blocks: run.len,
        flags: disk::INODE_FLAG_EXTENTS,
        block: extent_root(run),
        mtime,
        mtime_nsec,
        xattr_block: 0,
        xattrs: [0; super::xattr::IBODY_BYTES],
    }
}

/// The superblock's copy of the journal inode (`s_jnl_blocks`): its
/// `i_block` words, then its size's high and low halves.
pub(crate) fn backup(run: Run) -> [u8; 68] {
    let mut b = [0u8; 68];
    b[..60].copy_from_slice(&extent_root(run));
    let size = run.len * BLOCK;
    put32(&mut b, 60, (size >> 32) as u32);
    put32(&mut b, 64, size as u32);
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
}
