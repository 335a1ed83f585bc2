//! Hashed directories (`dir_index`, the "htree"): a directory over one
//! block is a tree keyed by the hash of each name, so the kernel finds a
//! name by reading two or three blocks instead of the whole directory.
//!
//! Block 0 is the `dx_root`: the `.` and `..` entries (`..` spanning the
//! block, so old readers see an empty directory), `dx_root_info`, then
//! (hash, block) pairs and a checksum tail. Blocks 1 to N are leaves:
//! ordinary directory blocks, entries sorted by hash, each leaf's hash
//! range starting where the index says. When N is more than the root holds
//! (507), one level of `dx_node` blocks sits after the leaves, each indexing
//! up to 510 of them; the root then indexes the nodes. Two levels of nodes
//! need `large_dir`, which this writer does not set: a directory needing
//! more than 507 × 510 leaves is refused naming it.
//!
//! Names are hashed with half MD4 over signed chars and the superblock's
//! seed, as mke2fs sets up a filesystem on x86-64 (`s_def_hash_version` 1,
//! `EXT2_FLAGS_SIGNED_HASH`), following the kernel's fs/ext4/hash.c and
//! e2fsprogs' lib/ext2fs/dirhash.c.
//!
//! Leaf fill: e2fsck -D packs leaves greedily in hash order and leaves 20%
//! slack (`indexed_dir_slack_percentage`); mke2fs -d writes big directories
//! linear. This writer packs fully, for images sized to their content, and
//! balances the leaves so that their number depends on the entry sizes
//! alone: N = ceil(total / (usable - largest entry)) leaves, entry i in
//! leaf floor(offset_i × N / total). Each leaf then holds at most
//! total / N + largest bytes, which fits, and the layout can count blocks
//! before the hash seed is known. Equal hashes that fall across a leaf
//! boundary get the continuation bit on the second leaf's index entry, as
//! e2fsck's rehash and the kernel's splits do, so lookups go on to it.

use super::disk::{self, DirEntry, FT_DIR};
use super::{BLOCK, crc32c};
use crate::le::{put16, put32};
use crate::{Error, Result};

/// `s_def_hash_version` and every root's hash version: half MD4, mke2fs's default.
pub(crate) const HASH_HALF_MD4: u8 = 1;
/// `s_flags`: names hash as signed chars, as mke2fs decides on x86-64.
pub(crate) const FLAGS_SIGNED_HASH: u32 = 0x1;
/// `EXT4_INDEX_FL`: the directory is a hashed tree.
pub(crate) const INODE_FLAG_INDEX: u32 = 0x1000;
/// `dx_tail`: a reserved word and the checksum, after the last index entry.
const DX_TAIL: usize = 8;
/// Where the count and limit sit in a root: after `.`, `..` and `dx_root_info`.
const ROOT_COUNT_AT: usize = 32;
/// Where they sit in a node: after an empty entry spanning the block.
const NODE_COUNT_AT: usize = 8;
/// Index entries a root holds (507).
const ROOT_LIMIT: usize = (BLOCK as usize - ROOT_COUNT_AT - DX_TAIL) / 8;
/// Index entries a node holds (510).
const NODE_LIMIT: usize = (BLOCK as usize - NODE_COUNT_AT - DX_TAIL) / 8;
/// The most leaves a root and one level of nodes index.
pub(crate) const MAX_LEAVES: u64 = (ROOT_LIMIT * NODE_LIMIT) as u64;
/// The kernel reserves the top hash value for end-of-directory (`EXT4_HTREE_EOF_32BIT`).
const HASH_EOF: u32 = 0x7FFF_FFFF << 1;

/// A name's hash: the major value orders entries (low bit clear), the
/// minor one breaks ties between equal majors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct NameHash {
    pub(crate) major: u32,
    pub(crate) minor: u32,
}

/// The superblock's hash seed as the hash reads it: four little-endian
/// words, or MD4's initial state when the seed is all zero.
pub(crate) fn seed_words(seed: &[u8; 16]) -> [u32; 4] {
    if seed.iter().all(|&b| b == 0) {
        return [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476];
    }
    let word = |n: usize| u32::from_le_bytes([seed[4 * n], seed[4 * n + 1], seed[4 * n + 2], seed[4 * n + 3]]);
    [word(0), word(1), word(2), word(3)]
}

/// Half MD4 of `name` over signed chars (`DX_HASH_HALF_MD4`), keyed by `seed`.
pub(crate) fn name_hash(name: &[u8], seed: &[u32; 4]) -> NameHash {
    let mut state = *seed;
    let mut rest = name;
    while !rest.is_empty() {
        half_md4_transform(&mut state, &hash_words(rest));
        rest = &rest[rest.len().min(32)..];
    }
    let mut major = state[1] & !1;
    if major == HASH_EOF {
        major = HASH_EOF - 2;
    }
    NameHash { major, minor: state[2] }
}

/// `str2hashbuf_signed`: up to 32 bytes of `rest` as eight words, each
/// byte sign-extended and shifted in, padded with the remaining length.
fn hash_words(rest: &[u8]) -> [u32; 8] {
    let len = rest.len() as u32;
    let pad = (len | len << 8) | (len | len << 8) << 16;
    let mut words = [pad; 8];
    for (word, chunk) in words.iter_mut().zip(rest[..rest.len().min(32)].chunks(4)) {
        *word = chunk.iter().fold(pad, |value, &byte| (value << 8).wrapping_add(i32::from(byte as i8) as u32));
    }
    words
}

/// One round of half MD4: its mixing function, constant, the order it
/// takes the eight words in and its four rotations.
struct Round {
    mix: fn(u32, u32, u32) -> u32,
    constant: u32,
    order: [usize; 8],
    shifts: [u32; 4],
}

const ROUNDS: [Round; 3] = [
    Round { mix: |x, y, z| z ^ (x & (y ^ z)), constant: 0, order: [0, 1, 2, 3, 4, 5, 6, 7], shifts: [3, 7, 11, 19] },
    Round {
        mix: |x, y, z| (x & y).wrapping_add((x ^ y) & z),
        constant: 0o13240474631,
        order: [1, 3, 5, 7, 0, 2, 4, 6],
        shifts: [3, 5, 9, 13],
    },
    Round {
        mix: |x, y, z| x ^ y ^ z,
        constant: 0o15666365641,
        order: [3, 7, 2, 6, 1, 5, 0, 4],
        shifts: [3, 9, 11, 15],
    },
];

/// The kernel's `half_md4_transform`: three rounds of eight steps over `input`, added into `state`.
fn half_md4_transform(state: &mut [u32; 4], input: &[u32; 8]) {
    let [mut a, mut b, mut c, mut d] = *state;
    for round in &ROUNDS {
        let step = |a: u32, b: u32, c: u32, d: u32, n: usize| {
            let word = input[round.order[n]].wrapping_add(round.constant);
            a.wrapping_add((round.mix)(b, c, d)).wrapping_add(word).rotate_left(round.shifts[n % 4])
        };
        for pass in [0, 4] {
            a = step(a, b, c, d, pass);
            d = step(d, a, b, c, pass + 1);
            c = step(c, d, a, b, pass + 2);
            b = step(b, c, d, a, pass + 3);
        }
    }
    for (word, add) in state.iter_mut().zip([a, b, c, d]) {
        *word = word.wrapping_add(add);
    }
}

/// How a directory's blocks are arranged, decided from its entries' sizes alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DirShape {
    /// Fits in one block with `.` and `..`: a plain block, as mke2fs leaves it.
    Linear,
    /// A root, `leaves` leaf blocks and `nodes` index blocks (0 when the root indexes every leaf).
    Indexed { leaves: u64, nodes: u64 },
}

impl DirShape {
    pub(crate) fn of(entries: &[DirEntry<'_>]) -> DirShape {
        let (total, largest) = entries.iter().fold((0u64, 0u64), |(total, largest), entry| {
            let len = disk::dirent_len(entry.name.len()) as u64;
            (total + len, largest.max(len))
        });
        DirShape::for_sizes(total, largest)
    }

    /// The shape for entries of `total` bytes, the largest `largest`.
    fn for_sizes(total: u64, largest: u64) -> DirShape {
        let usable = disk::DIRENT_USABLE as u64;
        if total + disk::DOT_ENTRIES_LEN as u64 <= usable {
            return DirShape::Linear;
        }
        let leaves = total.div_ceil(usable - largest);
        let nodes = if leaves <= ROOT_LIMIT as u64 { 0 } else { leaves.div_ceil(NODE_LIMIT as u64) };
        DirShape::Indexed { leaves, nodes }
    }

    pub(crate) fn blocks(self) -> u64 {
        match self {
            DirShape::Linear => 1,
            DirShape::Indexed { leaves, nodes } => 1 + leaves + nodes,
        }
    }

    pub(crate) fn is_indexed(self) -> bool {
        matches!(self, DirShape::Indexed { .. })
    }

    /// Refuses a directory two index levels cannot hold (it would need `large_dir`).
    pub(crate) fn check(self, path: &str, entries: usize) -> Result<()> {
        match self {
            DirShape::Indexed { leaves, .. } if leaves > MAX_LEAVES => {
                Err(Error::Ext4DirectoryTooLarge { path: path.to_owned(), entries, leaves, max: MAX_LEAVES })
            }
            _ => Ok(()),
        }
    }
}

/// A directory's blocks: one linear block, or the hashed tree the module
/// doc describes, keyed by `hash_seed` (the superblock's).
pub(crate) fn dir_blocks(
    ino: u32,
    parent: u32,
    entries: &[DirEntry<'_>],
    hash_seed: &[u8; 16],
    fs_seed: u32,
) -> Vec<u8> {
    let DirShape::Indexed { leaves, nodes } = DirShape::of(entries) else {
        return disk::dir_blocks(ino, parent, entries, fs_seed);
    };
    let seed = seed_words(hash_seed);
    let mut sorted: Vec<(NameHash, DirEntry<'_>)> =
        entries.iter().map(|entry| (name_hash(entry.name.as_bytes(), &seed), *entry)).collect();
    sorted.sort_unstable_by(|(a, x), (b, y)| a.cmp(b).then_with(|| x.name.cmp(y.name)));
    let starts = leaf_starts(&sorted, leaves as usize);
    let block = BLOCK as usize;
    let mut out = vec![0u8; (1 + leaves + nodes) as usize * block];
    let (root, rest) = out.split_at_mut(block);
    let (leaf_blocks, node_blocks) = rest.split_at_mut(leaves as usize * block);
    let csum_seed = disk::inode_seed(fs_seed, ino);
    let mut index = Vec::with_capacity(starts.len());
    for (n, leaf) in leaf_blocks.chunks_exact_mut(block).enumerate() {
        let (first, end) = (starts[n], starts.get(n + 1).copied().unwrap_or(sorted.len()));
        let leaf_entries: Vec<DirEntry<'_>> = sorted[first..end].iter().map(|(_, entry)| *entry).collect();
        disk::dir_leaf_block(leaf, &leaf_entries, ino, fs_seed);
        // A leaf whose first hash goes on from the previous leaf says so in its low bit.
        let hash = sorted[first].0.major;
        let continued = first > 0 && sorted[first - 1].0.major == hash;
        index.push(DxEntry { hash: hash | u32::from(continued), block: 1 + n as u32 });
    }
    let levels = if nodes == 0 {
        dx_root(root, ino, parent, 0, &index, csum_seed);
        0
    } else {
        let mut node_index = Vec::with_capacity(nodes as usize);
        for (n, (node, chunk)) in node_blocks.chunks_exact_mut(block).zip(index.chunks(NODE_LIMIT)).enumerate() {
            dx_node(node, chunk, csum_seed);
            node_index.push(DxEntry { hash: chunk[0].hash, block: (1 + leaves) as u32 + n as u32 });
        }
        dx_root(root, ino, parent, 1, &node_index, csum_seed);
        1
    };
    debug_assert!(levels <= 1);
    out
}

/// Where each leaf starts in the hash-sorted entries: entry i goes to leaf
/// floor(offset_i × leaves / total), every leaf non-empty and within a block.
fn leaf_starts(sorted: &[(NameHash, DirEntry<'_>)], leaves: usize) -> Vec<usize> {
    let total: u64 = sorted.iter().map(|(_, e)| disk::dirent_len(e.name.len()) as u64).sum();
    let mut starts = Vec::with_capacity(leaves);
    let mut offset = 0u64;
    for (i, (_, entry)) in sorted.iter().enumerate() {
        let leaf = (offset * leaves as u64 / total) as usize;
        if leaf == starts.len() {
            starts.push(i);
        }
        offset += disk::dirent_len(entry.name.len()) as u64;
    }
    debug_assert_eq!(starts.len(), leaves, "a leaf got no entries");
    starts
}

/// One index entry: the lowest hash under `block` (and the continuation bit).
#[derive(Debug, Clone, Copy)]
struct DxEntry {
    hash: u32,
    block: u32,
}

/// Block 0: `.`, `..` over the rest of the block, `dx_root_info`, the index.
fn dx_root(block: &mut [u8], ino: u32, parent: u32, levels: u8, index: &[DxEntry], csum_seed: u32) {
    for (at, entry_ino, name, len) in [(0, ino, &b"."[..], 12), (12, parent, &b".."[..], BLOCK as usize - 12)] {
        put32(block, at, entry_ino);
        put16(block, at + 4, len as u16);
        block[at + 6] = name.len() as u8;
        block[at + 7] = FT_DIR;
        block[at + 8..at + 8 + name.len()].copy_from_slice(name);
    }
    // dx_root_info: reserved zero, hash version, its own length, depth, flags.
    block[28] = HASH_HALF_MD4;
    block[29] = 8;
    block[30] = levels;
    dx_entries(block, ROOT_COUNT_AT, ROOT_LIMIT, index, csum_seed);
}

/// An index block below the root: an empty entry spanning it, then the index.
fn dx_node(block: &mut [u8], index: &[DxEntry], csum_seed: u32) {
    put16(block, 4, BLOCK as u16);
    dx_entries(block, NODE_COUNT_AT, NODE_LIMIT, index, csum_seed);
}

/// Limit, count and entries from `at` (the first entry's hash is implied by
/// the parent, its place holds limit and count), then the `dx_tail`, whose
/// checksum covers the block up to the last entry and the tail's reserved
/// word (kernel `ext4_dx_csum`).
fn dx_entries(block: &mut [u8], at: usize, limit: usize, index: &[DxEntry], csum_seed: u32) {
    debug_assert!(!index.is_empty() && index.len() <= limit);
    for (n, entry) in index.iter().enumerate() {
        put32(block, at + 8 * n, entry.hash);
        put32(block, at + 8 * n + 4, entry.block);
    }
    put16(block, at, limit as u16);
    put16(block, at + 2, index.len() as u16);
    let tail = at + 8 * limit;
    let covered = at + 8 * index.len();
    let csum = crc32c::update(crc32c::update(csum_seed, &block[..covered]), &[0u8; 8]);
    put32(block, tail + 4, csum);
}

#[cfg(test)]
mod tests;
