//! Extent trees: the root in the inode's `i_block` holds up to four
//! extents; a file with more gets a tree, built bottom up and packed full
//! so that it is as shallow and narrow as e2fsck wants it: leaf blocks of
//! up to 340 extents, index blocks of up to 340 entries above them, until
//! four entries remain for the root. Each tree block ends in its
//! `metadata_csum` tail (`ext4_extent_tail`). Layout from the kernel's
//! Documentation/filesystems/ext4/ifork.rst.

use super::layout::Run;
use super::{BLOCK, EXTENT_MAX_BLOCKS, INODE_EXTENTS, crc32c, disk};
use crate::le::{put16, put32};

const MAGIC: u16 = 0xF30A;
/// Header, extents and index entries are all 12 bytes.
const ENTRY: usize = 12;
/// Entries per tree block: (4096 - 12) / 12, as the kernel's `ext4_ext_space_block`.
pub(crate) const PER_BLOCK: usize = (BLOCK as usize - ENTRY) / ENTRY;
/// The checksum tail's offset: just past `PER_BLOCK` entries.
const TAIL: usize = ENTRY + ENTRY * PER_BLOCK;
/// The deepest tree the kernel reads (`EXT4_MAX_EXTENT_DEPTH`). Five levels
/// of 340 map far more extents than a file of 2^32 blocks can have, so no
/// file is ever refused for its extent count.
const MAX_DEPTH: usize = 5;

/// Blocks a tree for `extents` extents needs outside the inode.
pub(crate) fn tree_blocks(extents: usize) -> u64 {
    let mut total = 0;
    let mut nodes = extents;
    while nodes > INODE_EXTENTS {
        nodes = nodes.div_ceil(PER_BLOCK);
        total += nodes as u64;
    }
    total
}

/// One 12-byte entry of a node: an extent at the leaves, an index above.
#[derive(Clone, Copy)]
struct Entry {
    /// The first logical block it covers.
    logical: u64,
    /// The extent's length, or 0 for an index entry.
    len: u64,
    /// The first data block, or the child node's block.
    block: u64,
}

impl Entry {
    fn encode(&self, out: &mut [u8]) {
        put32(out, 0, self.logical as u32);
        if self.len > 0 {
            debug_assert!(self.len <= EXTENT_MAX_BLOCKS);
            put16(out, 4, self.len as u16);
            put16(out, 6, (self.block >> 32) as u16);
            put32(out, 8, self.block as u32);
        } else {
            put32(out, 4, self.block as u32);
            put16(out, 8, (self.block >> 32) as u16);
        }
    }
}

fn header(out: &mut [u8], entries: usize, max: usize, depth: usize) {
    put16(out, 0, MAGIC);
    put16(out, 2, entries as u16);
    put16(out, 4, max as u16);
    put16(out, 6, depth as u16);
}

/// The inode's `i_block` for a file whose data sits in `runs`, and the tree
/// blocks to write, each at its block number from `tree` (which holds
/// exactly [`tree_blocks`]`(runs.len())` blocks), checksummed for inode `ino`.
pub(crate) fn encode(runs: &[Run], tree: &[u64], ino: u32, fs_seed: u32) -> ([u8; 60], Vec<(u64, Vec<u8>)>) {
    debug_assert_eq!(tree.len() as u64, tree_blocks(runs.len()));
    let mut level: Vec<Entry> =
        runs.iter().map(|run| Entry { logical: run.logical, len: run.len, block: run.start }).collect();
    let mut blocks = Vec::with_capacity(tree.len());
    let mut free = tree.iter();
    let mut depth = 0;
    let seed = disk::inode_seed(fs_seed, ino);
    while level.len() > INODE_EXTENTS {
        let mut above = Vec::with_capacity(level.len().div_ceil(PER_BLOCK));
        for chunk in level.chunks(PER_BLOCK) {
            let Some(&at) = free.next() else { break };
            let mut block = vec![0u8; BLOCK as usize];
            header(&mut block, chunk.len(), PER_BLOCK, depth);
            for (n, entry) in chunk.iter().enumerate() {
                entry.encode(&mut block[ENTRY * (n + 1)..ENTRY * (n + 2)]);
            }
            let csum = crc32c::update(seed, &block[..TAIL]);
            put32(&mut block, TAIL, csum);
            blocks.push((at, block));
            above.push(Entry { logical: chunk[0].logical, len: 0, block: at });
        }
        level = above;
        depth += 1;
    }
    debug_assert!(depth <= MAX_DEPTH);
    let mut root = [0u8; 60];
    header(&mut root, level.len(), INODE_EXTENTS, depth);
    for (n, entry) in level.iter().enumerate() {
        entry.encode(&mut root[ENTRY * (n + 1)..ENTRY * (n + 2)]);
    }
    (root, blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_grow_a_level_past_four_then_past_1360_extents() {
        assert_eq!(PER_BLOCK, 340);
        assert_eq!(TAIL, 4092);
        assert_eq!(tree_blocks(0), 0);
        assert_eq!(tree_blocks(4), 0);
        assert_eq!(tree_blocks(5), 1);
        assert_eq!(tree_blocks(4 * 340), 4);
        assert_eq!(tree_blocks(4 * 340 + 1), 5 + 1);
        assert_eq!(tree_blocks(4 * 340 * 340), 4 * 340 + 4);
    }

    #[test]
    fn a_two_level_tree_indexes_each_leafs_first_block() {
        let runs: Vec<Run> = (0..1400).map(|i| Run { logical: 2 * i, start: 1000 + i, len: 1 }).collect();
        let tree: Vec<u64> = (50..56).collect();
        let (root, blocks) = encode(&runs, &tree, 12, 0);
        assert_eq!(&root[..8], &[0x0A, 0xF3, 1, 0, 4, 0, 2, 0], "one index entry, depth 2");
        assert_eq!(blocks.len(), 6);
        let (top, top_block) = &blocks[5];
        assert_eq!(*top, 55);
        assert_eq!(u16::from_le_bytes([top_block[2], top_block[3]]), 5, "five leaves");
        // The second leaf starts at extent 340, logical block 680.
        assert_eq!(&top_block[24..32], &[0xA8, 0x02, 0, 0, 51, 0, 0, 0]);
    }
}
