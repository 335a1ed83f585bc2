//! The on-disk structures, encoded to bytes: superblock, group descriptor,
//! inode, extent header, directory entries. Offsets and values follow the
//! kernel's Documentation/filesystems/ext4/ and e2fsprogs' `ext2_fs.h`;
//! every checksum is `metadata_csum`'s CRC-32C.

use super::layout::{BLOCKS_PER_GROUP, DESC_SIZE, INODE_SIZE};
use super::{BLOCK, crc32c, htree, xattr};
use crate::le::{put16, put32};

pub(crate) const FT_REG: u8 = 1;
pub(crate) const FT_DIR: u8 = 2;
pub(crate) const FT_CHRDEV: u8 = 3;
pub(crate) const FT_BLKDEV: u8 = 4;
pub(crate) const FT_FIFO: u8 = 5;
pub(crate) const FT_SYMLINK: u8 = 7;

pub(crate) const S_IFREG: u32 = 0o100000;
pub(crate) const S_IFDIR: u32 = 0o040000;
pub(crate) const S_IFLNK: u32 = 0o120000;
pub(crate) const S_IFCHR: u32 = 0o020000;
pub(crate) const S_IFBLK: u32 = 0o060000;
pub(crate) const S_IFIFO: u32 = 0o010000;

const MAGIC: u16 = 0xEF53;
const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_EXT_ATTR: u32 = 0x8;
/// Directories over one block are hashed trees (see `htree`).
const COMPAT_DIR_INDEX: u32 = 0x20;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// `user_xattr` and `acl`, as mke2fs sets them.
const DEFAULT_MOUNT_OPTS: u32 = 0x0004 | 0x0008;
/// Log2 of the flex group size mke2fs picks (16 groups).
const LOG_GROUPS_PER_FLEX: u8 = 4;
/// The extra inode fields every inode carries, up to and including `i_projid`.
pub(crate) const EXTRA_ISIZE: u16 = 32;
const BG_INODE_UNINIT: u16 = 0x1;
const BG_INODE_TABLE_ZEROED: u16 = 0x4;
pub(crate) const INODE_FLAG_EXTENTS: u32 = 0x80000;
/// Directory entry header: inode, record length, name length, file type.
const DIRENT_HEADER: usize = 8;
/// The checksum tail at the end of every directory block.
const DIRENT_TAIL: usize = 12;

/// The checksum seed of every per-object checksum: CRC-32C of the UUID.
pub(crate) fn csum_seed(uuid: &[u8; 16]) -> u32 {
    crc32c::update(!0, uuid)
}

/// The seed of one inode's checksums: its number and generation (always 0).
pub(crate) fn inode_seed(fs_seed: u32, ino: u32) -> u32 {
    crc32c::update(crc32c::update(fs_seed, &ino.to_le_bytes()), &0u32.to_le_bytes())
}

/// Block-bitmap or inode-bitmap checksum over the bitmap's meaningful bytes.
pub(crate) fn bitmap_csum(fs_seed: u32, bitmap: &[u8]) -> u32 {
    crc32c::update(fs_seed, bitmap)
}

/// The superblock's variable fields.
#[derive(Debug, Clone)]
pub(crate) struct Superblock {
    pub(crate) blocks: u64,
    pub(crate) free_blocks: u64,
    pub(crate) inodes: u32,
    pub(crate) free_inodes: u32,
    pub(crate) inodes_per_group: u32,
    pub(crate) uuid: [u8; 16],
    pub(crate) label: [u8; 16],
    pub(crate) hash_seed: [u8; 16],
    /// Which group this copy sits in (0 for the primary).
    pub(crate) group: u16,
    /// With a journal (inode 8), the copy of its `i_block` and size
    /// (`s_jnl_blocks`) that e2fsck restores a damaged journal inode from.
    pub(crate) journal_backup: Option<[u8; 68]>,
}

impl Superblock {
    pub(crate) fn encode(&self) -> [u8; 1024] {
        let mut b = [0u8; 1024];
        put32(&mut b, 0x00, self.inodes);
        put32(&mut b, 0x04, self.blocks as u32);
        put32(&mut b, 0x0C, self.free_blocks as u32);
        put32(&mut b, 0x10, self.free_inodes);
        put32(&mut b, 0x14, 0); // first data block: 0 with blocks over 1 KiB
        put32(&mut b, 0x18, 2); // log2(block size) - 10
        put32(&mut b, 0x1C, 2); // cluster size: the block size, no bigalloc
        put32(&mut b, 0x20, BLOCKS_PER_GROUP as u32);
        put32(&mut b, 0x24, BLOCKS_PER_GROUP as u32);
        put32(&mut b, 0x28, self.inodes_per_group);
        put16(&mut b, 0x36, 0xFFFF); // max mount count: no forced checks
        put16(&mut b, 0x38, MAGIC);
        put16(&mut b, 0x3A, 1); // state: cleanly unmounted
        put16(&mut b, 0x3C, 1); // errors: continue
        put32(&mut b, 0x4C, 1); // revision: dynamic inode sizes
        put32(&mut b, 0x54, 11); // first non-reserved inode
        put16(&mut b, 0x58, INODE_SIZE as u16);
        put16(&mut b, 0x5A, self.group);
        // No reserved blocks for root (0x08), no reserved descriptor blocks
        // (0xCE, no resize_inode), no kilobytes written yet (0x178): all 0.
        let journal = if self.journal_backup.is_some() { COMPAT_HAS_JOURNAL } else { 0 };
        put32(&mut b, 0x5C, COMPAT_EXT_ATTR | COMPAT_DIR_INDEX | journal);
        put32(&mut b, 0x60, INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG);
        let ro_compat = RO_COMPAT_SPARSE_SUPER
            | RO_COMPAT_LARGE_FILE
            | RO_COMPAT_HUGE_FILE
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE
            | RO_COMPAT_METADATA_CSUM;
        put32(&mut b, 0x64, ro_compat);
        b[0x68..0x78].copy_from_slice(&self.uuid);
        b[0x78..0x88].copy_from_slice(&self.label);
        b[0xEC..0xFC].copy_from_slice(&self.hash_seed);
        b[0xFC] = htree::HASH_HALF_MD4; // default hash, as mke2fs
        if let Some(backup) = &self.journal_backup {
            // An internal journal: inode 8, no journal device or UUID (0xD0, 0xE4).
            put32(&mut b, 0xE0, super::journal::JOURNAL_INO);
            b[0xFD] = 1; // s_jnl_backup_type: EXT3_JNL_BACKUP_BLOCKS
            b[0x10C..0x150].copy_from_slice(backup);
        }
        put16(&mut b, 0xFE, DESC_SIZE as u16);
        put32(&mut b, 0x100, DEFAULT_MOUNT_OPTS);
        put32(&mut b, 0x150, (self.blocks >> 32) as u32);
        put32(&mut b, 0x158, (self.free_blocks >> 32) as u32);
        put16(&mut b, 0x15C, EXTRA_ISIZE); // min extra isize
        put16(&mut b, 0x15E, EXTRA_ISIZE); // wanted extra isize
        put32(&mut b, 0x160, htree::FLAGS_SIGNED_HASH); // as mke2fs on x86, where char is signed
        b[0x174] = LOG_GROUPS_PER_FLEX;
        b[0x175] = 1; // checksum type: crc32c
        let csum = crc32c::update(!0, &b[..0x3FC]);
        put32(&mut b, 0x3FC, csum);
        b
    }
}

/// One group's descriptor.
#[derive(Debug, Clone, Default)]
pub(crate) struct GroupDesc {
    pub(crate) block_bitmap: u64,
    pub(crate) inode_bitmap: u64,
    pub(crate) inode_table: u64,
    pub(crate) free_blocks: u32,
    pub(crate) free_inodes: u32,
    pub(crate) used_dirs: u32,
    pub(crate) block_bitmap_csum: u32,
    pub(crate) inode_bitmap_csum: u32,
    /// No inode of the group is in use (`INODE_UNINIT`): e2fsck and the
    /// kernel skip its table, which reads as zero anyway.
    pub(crate) inodes_unused: bool,
}

impl GroupDesc {
    pub(crate) fn encode(&self, group: u32, fs_seed: u32) -> [u8; DESC_SIZE as usize] {
        let mut d = [0u8; DESC_SIZE as usize];
        put32(&mut d, 0x00, self.block_bitmap as u32);
        put32(&mut d, 0x04, self.inode_bitmap as u32);
        put32(&mut d, 0x08, self.inode_table as u32);
        put16(&mut d, 0x0C, self.free_blocks as u16);
        put16(&mut d, 0x0E, self.free_inodes as u16);
        put16(&mut d, 0x10, self.used_dirs as u16);
        let uninit = if self.inodes_unused { BG_INODE_UNINIT } else { 0 };
        put16(&mut d, 0x12, BG_INODE_TABLE_ZEROED | uninit);
        put16(&mut d, 0x18, self.block_bitmap_csum as u16);
        put16(&mut d, 0x1A, self.inode_bitmap_csum as u16);
        // Used inodes are the first of each table: the unused ones are
        // the free ones (`bg_itable_unused`).
        put16(&mut d, 0x1C, self.free_inodes as u16);
        put32(&mut d, 0x20, (self.block_bitmap >> 32) as u32);
        put32(&mut d, 0x24, (self.inode_bitmap >> 32) as u32);
        put32(&mut d, 0x28, (self.inode_table >> 32) as u32);
        put16(&mut d, 0x2C, (self.free_blocks >> 16) as u16);
        put16(&mut d, 0x2E, (self.free_inodes >> 16) as u16);
        put16(&mut d, 0x30, (self.used_dirs >> 16) as u16);
        put16(&mut d, 0x32, (self.free_inodes >> 16) as u16);
        put16(&mut d, 0x38, (self.block_bitmap_csum >> 16) as u16);
        put16(&mut d, 0x3A, (self.inode_bitmap_csum >> 16) as u16);
        // The checksum covers the group number and the descriptor with its own field zero.
        let csum = crc32c::update(crc32c::update(fs_seed, &group.to_le_bytes()), &d);
        put16(&mut d, 0x1E, csum as u16);
        d
    }
}

/// One inode's fields.
#[derive(Debug, Clone)]
pub(crate) struct Inode {
    /// File type and permission bits.
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) size: u64,
    pub(crate) links: u32,
    /// Every block the inode owns: data, extent tree and xattr block.
    pub(crate) blocks: u64,
    pub(crate) flags: u32,
    /// `i_block`: the extent tree root, a fast symlink's target, or a device number.
    pub(crate) block: [u8; 60],
    pub(crate) mtime: i64,
    pub(crate) mtime_nsec: u32,
    /// The external xattr block (`i_file_acl`), or 0.
    pub(crate) xattr_block: u64,
    /// The in-inode xattr region after the extra fields.
    pub(crate) xattrs: [u8; xattr::IBODY_BYTES],
}

impl Inode {
    pub(crate) fn encode(&self, ino: u32, fs_seed: u32) -> [u8; INODE_SIZE as usize] {
        let mut i = [0u8; INODE_SIZE as usize];
        let (seconds, extra) = encode_time(self.mtime, self.mtime_nsec);
        put16(&mut i, 0x00, self.mode as u16);
        put16(&mut i, 0x02, self.uid as u16);
        put32(&mut i, 0x04, self.size as u32);
        for at in [0x08, 0x0C, 0x10, 0x90] {
            put32(&mut i, at, seconds); // atime, ctime, mtime, crtime
        }
        put16(&mut i, 0x18, self.gid as u16);
        // dir_nlink: a directory with more links than ext4 counts (65,000)
        // says 1, "many", as the kernel and e2fsck expect.
        put16(&mut i, 0x1A, if self.links > MAX_LINK_COUNT { 1 } else { self.links as u16 });
        // huge_file without EXT4_HUGE_FILE_FL: 48 bits of 512-byte sectors.
        let sectors = self.blocks * (BLOCK / 512);
        put32(&mut i, 0x1C, sectors as u32);
        put32(&mut i, 0x20, self.flags);
        i[0x28..0x64].copy_from_slice(&self.block);
        put32(&mut i, 0x68, self.xattr_block as u32);
        put32(&mut i, 0x6C, (self.size >> 32) as u32);
        put16(&mut i, 0x74, (sectors >> 32) as u16);
        put16(&mut i, 0x76, (self.xattr_block >> 32) as u16);
        put16(&mut i, 0x78, (self.uid >> 16) as u16);
        put16(&mut i, 0x7A, (self.gid >> 16) as u16);
        put16(&mut i, 0x80, EXTRA_ISIZE);
        for at in [0x84, 0x88, 0x8C, 0x94] {
            put32(&mut i, at, extra); // ctime, mtime, atime, crtime extra
        }
        let xattrs_at = INODE_SIZE as usize - xattr::IBODY_BYTES;
        i[xattrs_at..].copy_from_slice(&self.xattrs);
        let csum = crc32c::update(inode_seed(fs_seed, ino), &i);
        put16(&mut i, 0x7C, csum as u16);
        put16(&mut i, 0x82, (csum >> 16) as u16);
        i
    }
}

/// EXT4_LINK_MAX: above it a directory's link count is stored as 1.
const MAX_LINK_COUNT: u32 = 65_000;

/// The seconds an inode time can hold: signed 32 bits extended by two epoch bits.
pub(crate) const TIME_RANGE: std::ops::RangeInclusive<i64> = -(1 << 31)..=(1 << 31) - 1 + 3 * (1 << 32);

/// Seconds and the `_extra` word: two epoch bits extending the signed
/// 32-bit seconds, then 30 bits of nanoseconds.
fn encode_time(seconds: i64, nanoseconds: u32) -> (u32, u32) {
    let low = seconds as u32;
    let epoch = ((seconds - i64::from(low as i32)) >> 32) as u32 & 3;
    (low, epoch | nanoseconds << 2)
}

/// A device number in `i_block`, as the kernel's `ext4_encode_dev` and
/// e2fsprogs write it: the old 16-bit form in word 0 when both numbers are
/// below 256, else the new form (minor's low byte, major, minor's high
/// bits) in word 1.
pub(crate) fn device_block(major: u32, minor: u32) -> [u8; 60] {
    let mut block = [0u8; 60];
    if major < 256 && minor < 256 {
        put32(&mut block, 0, major << 8 | minor);
    } else {
        put32(&mut block, 4, (minor & 0xFF) | major << 8 | (minor & !0xFF) << 12);
    }
    block
}

/// One directory entry other than `.` and `..`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DirEntry<'t> {
    pub(crate) name: &'t str,
    pub(crate) ino: u32,
    pub(crate) file_type: u8,
}

/// The bytes an entry takes in a block: header and name, 4-byte aligned.
pub(crate) fn dirent_len(name_len: usize) -> usize {
    (DIRENT_HEADER + name_len).next_multiple_of(4)
}

/// The bytes of a directory block entries can use: all but the checksum tail.
pub(crate) const DIRENT_USABLE: usize = BLOCK as usize - DIRENT_TAIL;
/// What `.` and `..` take at the start of a directory's first block.
pub(crate) const DOT_ENTRIES_LEN: usize = 12 + 12;

/// How many entries each block of a linear directory holds, `.` and `..`
/// counted in the first: the one packing both layout and encoding use.
pub(crate) fn dir_block_split(entries: &[DirEntry<'_>]) -> Vec<usize> {
    let mut blocks = vec![2];
    let mut used = DOT_ENTRIES_LEN;
    for entry in entries {
        let len = dirent_len(entry.name.len());
        if used + len > DIRENT_USABLE {
            blocks.push(0);
            used = 0;
        }
        used += len;
        *blocks.last_mut().unwrap_or(&mut 0) += 1;
    }
    blocks
}

/// A linear directory's blocks, each ending in its checksum tail.
pub(crate) fn dir_blocks(ino: u32, parent: u32, entries: &[DirEntry<'_>], fs_seed: u32) -> Vec<u8> {
    let split = dir_block_split(entries);
    let dot = [DirEntry { name: ".", ino, file_type: FT_DIR }, DirEntry { name: "..", ino: parent, file_type: FT_DIR }];
    let all: Vec<DirEntry<'_>> = dot.iter().chain(entries).copied().collect();
    let mut out = vec![0u8; split.len() * BLOCK as usize];
    let mut first = 0;
    for (block, count) in out.chunks_exact_mut(BLOCK as usize).zip(&split) {
        dir_leaf_block(block, &all[first..first + count], ino, fs_seed);
        first += count;
    }
    out
}

/// Fills one zeroed block with `entries` (the last stretched to the tail,
/// or one empty entry if there are none) and seals it with the checksum
/// tail. Linear directories and htree leaves share it.
pub(crate) fn dir_leaf_block(block: &mut [u8], entries: &[DirEntry<'_>], ino: u32, fs_seed: u32) {
    let mut at = 0;
    if entries.is_empty() {
        put16(block, 4, DIRENT_USABLE as u16);
    }
    for (n, entry) in entries.iter().enumerate() {
        let len = if n + 1 == entries.len() { DIRENT_USABLE - at } else { dirent_len(entry.name.len()) };
        put32(block, at, entry.ino);
        put16(block, at + 4, len as u16);
        block[at + 6] = entry.name.len() as u8;
        block[at + 7] = entry.file_type;
        block[at + DIRENT_HEADER..at + DIRENT_HEADER + entry.name.len()].copy_from_slice(entry.name.as_bytes());
        at += len;
    }
    // The tail looks like an empty entry: inode 0, length 12, type 0xDE.
    put16(block, DIRENT_USABLE + 4, DIRENT_TAIL as u16);
    block[DIRENT_USABLE + 7] = 0xDE;
    let csum = crc32c::update(inode_seed(fs_seed, ino), &block[..DIRENT_USABLE]);
    put32(block, DIRENT_USABLE + 8, csum);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_use_the_old_form_below_256_and_the_new_one_above() {
        assert_eq!(&device_block(1, 3)[..8], &[3, 1, 0, 0, 0, 0, 0, 0]);
        // 259:65536 (an NVMe partition): minor 0x10000 -> bits 20 and up.
        let new = device_block(259, 0x1_0000);
        assert_eq!(u32::from_le_bytes([new[4], new[5], new[6], new[7]]), 259 << 8 | 0x1000_0000);
        assert_eq!(&new[..4], &[0; 4]);
    }

    #[test]
    fn times_before_1970_and_after_2038_keep_their_seconds() {
        for seconds in [-1i64, 0, 1, i64::from(i32::MAX), i64::from(i32::MAX) + 1, 1 << 33, -(1 << 31)] {
            let (low, extra) = encode_time(seconds, 7);
            let decoded = i64::from(low as i32) + (i64::from(extra & 3) << 32);
            assert_eq!(decoded, seconds);
            assert_eq!(extra >> 2, 7);
        }
    }

    #[test]
    fn a_full_block_spills_into_the_next() {
        let name = "n".repeat(200);
        let entries: Vec<DirEntry<'_>> =
            (0..40).map(|i| DirEntry { name: &name, ino: 20 + i, file_type: FT_REG }).collect();
        // 208 bytes each; (4096 - 12 - 24) / 208 = 19 fit beside . and ..
        assert_eq!(dir_block_split(&entries), vec![21, 19, 2]);
    }
}
