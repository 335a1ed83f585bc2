//! The ext4 builder: a tree with POSIX metadata in, a spec-valid ext4
//! filesystem out (4 KiB blocks), checked by `e2fsck` and read back by
//! `debugfs` in the tests. Two profiles: read-only (no journal, sized to
//! its content, inodes for its content) and writable
//! ([`Ext4Options::with_journal`]: a disk of a given size with mke2fs's
//! journal and inode count, the rest free).
//!
//! Entries: directories, regular files (sparse ones keep their holes),
//! symlinks (fast and slow), hard links, character and block devices and
//! fifos, each with mode, owner, nanosecond mtime and xattrs (`user.*`,
//! `trusted.*`, `security.*`, POSIX ACLs), entry by entry or from a host
//! directory ([`Ext4Tree::add_host_path`]).
//!
//! Pure core, thin shell, as for FAT: [`Ext4Tree`] checks names and xattrs
//! as they are added (`tree`; the host walk is `host`),
//! [`Ext4Tree::layout`] places every inode and block from metadata alone
//! (`geometry` decides where groups, metadata and the journal sit), and
//! [`Ext4Layout`] encodes the structures (`disk`, `extent` for extent
//! trees, `xattr` for the inode's xattr region and the xattr block,
//! `journal` for the jbd2 superblock and inode 8) and
//! streams them with the file data into a sink (`emit`).

pub(crate) mod crc32c;
mod data;
mod disk;
mod emit;
mod extent;
mod geometry;
mod host;
mod htree;
mod journal;
mod layout;
mod output;
mod tree;
mod xattr;

pub use layout::Ext4Layout;
pub use tree::Ext4Tree;

/// Bytes per block: the page size, what mke2fs picks for all but tiny filesystems.
pub(crate) const BLOCK: u64 = 4096;
/// The longest name a directory entry holds.
pub(crate) const MAX_NAME_BYTES: usize = 255;
/// The longest symlink target: one block, less the terminating NUL the kernel expects room for.
pub(crate) const MAX_SYMLINK_BYTES: usize = BLOCK as usize - 1;
/// Extents (or index entries) the inode itself holds; more go in an extent tree.
pub(crate) const INODE_EXTENTS: usize = 4;
/// The most blocks one initialized extent covers.
pub(crate) const EXTENT_MAX_BLOCKS: u64 = 32768;
/// The largest file, the kernel's `s_maxbytes` for extent files with
/// `huge_file`: 2^32 - 1 blocks (16 TiB less one block), as extents number
/// logical blocks in 32 bits. Holes cost nothing, so a file this large fits
/// a small image if little of it is data.
pub(crate) const MAX_FILE_BYTES: u64 = ((1 << 32) - 1) * BLOCK;
/// `EXT4_LINK_MAX`: the most hard links to a file (a directory past it stores 1).
pub(crate) const MAX_LINKS: u32 = 65_000;

/// Which kind of device node [`Ext4Tree::add_device`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// A character device (`S_IFCHR`).
    Char,
    /// A block device (`S_IFBLK`).
    Block,
}

/// An entry's POSIX metadata: permission bits (including setuid 04000,
/// setgid 02000 and sticky 01000), owner and modification time, which
/// ext4 also stamps as the access, change and creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Metadata {
    /// Permission bits, at most 0o7777; the file type comes from the entry.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the Unix epoch.
    pub mtime: i64,
    /// Nanoseconds within the second, below 1e9.
    pub mtime_nsec: u32,
}

impl Default for Metadata {
    /// Mode 0644, owner 0:0, time 0 (1970-01-01).
    fn default() -> Metadata {
        Metadata { mode: 0o644, uid: 0, gid: 0, mtime: 0, mtime_nsec: 0 }
    }
}

impl Metadata {
    /// Sets [`mode`](Self::mode).
    pub fn with_mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    /// Sets [`uid`](Self::uid) and [`gid`](Self::gid).
    pub fn with_owner(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Sets [`mtime`](Self::mtime) and [`mtime_nsec`](Self::mtime_nsec)
    /// (taken modulo one second).
    pub fn with_mtime(mut self, seconds: i64, nanoseconds: u32) -> Self {
        self.mtime = seconds;
        self.mtime_nsec = nanoseconds % 1_000_000_000;
        self
    }
}

/// How to lay out the filesystem. Every field has an automatic default.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Ext4Options {
    /// Volume label, at most 16 bytes.
    pub label: Option<String>,
    /// Image size in bytes, a multiple of 4096; by default the content plus a little headroom.
    pub size: Option<u64>,
    /// Filesystem UUID; by default derived from the tree and the label, so
    /// that the same inputs give the same image.
    pub uuid: Option<[u8; 16]>,
    /// The writable profile: a journal sized as mke2fs sizes it, and as
    /// many inodes as mke2fs would give the size (at least what the tree
    /// needs). Needs at least 8 MiB.
    pub journal: bool,
    /// The seed of the directory name hash (mke2fs `-E hash_seed=`); by
    /// default derived from the tree and the label, like the UUID.
    pub hash_seed: Option<[u8; 16]>,
    /// Whether the writer makes `/lost+found` (inode 11, mode 0700) for
    /// `e2fsck` to reconnect orphans into; on by default, as mke2fs does.
    /// Off, the tree's first entry is inode 11 and a root `lost+found` of
    /// the tree's own is an ordinary directory: what a read-only image of
    /// someone else's tree (an OCI layer) wants, since e2fsck only needs
    /// the directory to repair, and a read-only image is never repaired.
    pub lost_found: bool,
}

impl Default for Ext4Options {
    fn default() -> Ext4Options {
        Ext4Options { label: None, size: None, uuid: None, journal: false, hash_seed: None, lost_found: true }
    }
}

impl Ext4Options {
    /// Sets [`label`](Self::label).
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Sets [`size`](Self::size).
    pub fn with_size(mut self, size: impl Into<Option<u64>>) -> Self {
        self.size = size.into();
        self
    }

    /// Sets [`journal`](Self::journal).
    pub fn with_journal(mut self, journal: bool) -> Self {
        self.journal = journal;
        self
    }

    /// Sets [`uuid`](Self::uuid).
    pub fn with_uuid(mut self, uuid: impl Into<Option<[u8; 16]>>) -> Self {
        self.uuid = uuid.into();
        self
    }

    /// Sets [`hash_seed`](Self::hash_seed).
    pub fn with_hash_seed(mut self, seed: impl Into<Option<[u8; 16]>>) -> Self {
        self.hash_seed = seed.into();
        self
    }

    /// Sets [`lost_found`](Self::lost_found).
    pub fn with_lost_found(mut self, lost_found: bool) -> Self {
        self.lost_found = lost_found;
        self
    }
}

/// What a layout holds, for reports and `--json` summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext4Summary {
    /// The image's length in bytes.
    pub image_bytes: u64,
    pub block_size: u32,
    pub blocks: u64,
    pub free_blocks: u64,
    pub inodes: u32,
    pub free_inodes: u32,
    pub groups: u32,
    pub files: u64,
    /// Directories, not counting the root and the writer's lost+found.
    pub dirs: u64,
    pub symlinks: u64,
    /// Directory entries that are hard links to an inode already counted.
    pub hardlinks: u64,
    /// Character and block devices and fifos.
    pub specials: u64,
    /// Sum of the file sizes (holes included).
    pub data_bytes: u64,
    /// The journal's blocks, 0 without one.
    pub journal_blocks: u64,
    pub uuid: [u8; 16],
}
