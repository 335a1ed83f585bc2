//! Extended attributes: names split into ext4's namespace index and
//! suffix, values in their on-disk form, and the two places they live: the
//! space after the inode's extra fields, then one external block.
//!
//! Formats from the kernel's Documentation/filesystems/ext4/attributes.rst
//! and e2fsprogs' lib/ext2fs/ext_attr.c: an entry is a 16-byte header and
//! the name, padded to 4 bytes; values grow down from the end of the region
//! and are padded to 4 bytes too; a zero word ends the entries. The block's
//! entries are sorted by (index, name length, name), the order the kernel's
//! lookup relies on; the inode's are written in the same order. Every entry
//! carries its hash (`e_hash`), computed as the kernel and e2fsck compute it.

use super::crc32c;
use super::layout::INODE_SIZE;
use super::{BLOCK, disk};
use crate::le::{put16, put32};

/// `EXT4_XATTR_MAGIC`, at the start of the inode's region and of the block.
const MAGIC: u32 = 0xEA02_0000;
/// An entry's fixed part: name length, index, value offset, value inode, value size, hash.
const ENTRY_HEADER: usize = 16;
/// The block's header: magic, refcount, blocks, hash, checksum, reserved.
const BLOCK_HEADER: usize = 32;
/// Where the inode's xattr region starts: the 128-byte base inode and its extra fields.
const IBODY_START: usize = 128 + disk::EXTRA_ISIZE as usize;
/// The inode's region: magic, then entries and values.
pub(crate) const IBODY_BYTES: usize = INODE_SIZE as usize - IBODY_START;
/// Room for entries and values in the inode: less the magic and the terminating zero word.
const IBODY_ROOM: usize = IBODY_BYTES - 8;
/// Room for entries and values in the block: less its header and the terminating word.
const BLOCK_ROOM: usize = BLOCK as usize - BLOCK_HEADER - 4;

/// Namespaces by their prefix, as e2fsprogs' `ea_names` and the kernel's
/// handlers number them. The two ACL names are whole names (suffix "").
const PREFIXES: [(&str, u8); 5] =
    [("system.posix_acl_access", 2), ("system.posix_acl_default", 3), ("security.", 6), ("trusted.", 4), ("user.", 1)];

/// One extended attribute, ready to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Xattr {
    /// The namespace index (`e_name_index`).
    pub(crate) index: u8,
    /// The name less its namespace prefix.
    pub(crate) suffix: Box<[u8]>,
    /// The value as stored on disk (ACLs converted to ext4's own format).
    pub(crate) value: Box<[u8]>,
}

impl Xattr {
    /// Parses the full name `name` and converts `value` to its on-disk form.
    /// The error is the reason, for the caller to wrap with the entry's path.
    pub(crate) fn new(name: &str, value: &[u8]) -> Result<Xattr, String> {
        let Some(&(prefix, index)) = PREFIXES.iter().find(|(prefix, _)| name.starts_with(prefix)) else {
            return Err(format!(
                "xattr {name:?} is in no namespace ext4 stores (user., trusted., security., \
                 system.posix_acl_access, system.posix_acl_default)"
            ));
        };
        let suffix = &name[prefix.len()..];
        let is_acl = matches!(index, 2 | 3);
        if is_acl && !suffix.is_empty() {
            return Err(format!("xattr {name:?} is not a POSIX ACL name"));
        }
        if !is_acl && suffix.is_empty() {
            return Err(format!("xattr {name:?} has an empty name after its namespace"));
        }
        if suffix.len() > 255 || name.contains('\0') {
            return Err(format!("xattr {name:?}: at most 255 bytes after the namespace, no NUL"));
        }
        let value =
            if is_acl { acl_to_disk(value).map_err(|why| format!("xattr {name:?}: {why}"))? } else { value.into() };
        if entry_len(suffix.len()) + padded(value.len()) > BLOCK_ROOM {
            return Err(format!("xattr {name:?} is {} bytes; one xattr block holds at most about 4 KiB", value.len()));
        }
        Ok(Xattr { index, suffix: suffix.as_bytes().into(), value })
    }

    /// The order of a block's entries: index, then name length, then name.
    fn key(&self) -> (u8, usize, &[u8]) {
        (self.index, self.suffix.len(), &self.suffix)
    }

    fn space(&self) -> usize {
        entry_len(self.suffix.len()) + padded(self.value.len())
    }
}

/// Adds `xattr` to the sorted `list`, replacing one of the same name.
pub(crate) fn insert(list: &mut Vec<Xattr>, xattr: Xattr) {
    match list.binary_search_by(|probe| probe.key().cmp(&xattr.key())) {
        Ok(at) => list[at] = xattr,
        Err(at) => list.insert(at, xattr),
    }
}

/// Which of the sorted `xattrs` go in the inode and which in the block:
/// each, in order, in the inode if it still fits there, else in the block.
/// `Err` holds the bytes the block would need when they do not fit both.
pub(crate) fn split(xattrs: &[Xattr]) -> Result<(Vec<&Xattr>, Vec<&Xattr>), usize> {
    let (mut ibody, mut block) = (Vec::new(), Vec::new());
    let (mut ibody_used, mut block_used) = (0, 0);
    for xattr in xattrs {
        if ibody_used + xattr.space() <= IBODY_ROOM {
            ibody_used += xattr.space();
            ibody.push(xattr);
        } else {
            block_used += xattr.space();
            block.push(xattr);
        }
    }
    if block_used > BLOCK_ROOM {
        return Err(block_used + BLOCK_HEADER + 4);
    }
    Ok((ibody, block))
}

/// Whether the xattrs need an external block.
pub(crate) fn needs_block(xattrs: &[Xattr]) -> bool {
    split(xattrs).is_ok_and(|(_, block)| !block.is_empty())
}

/// The inode's xattr region (bytes `IBODY_START..INODE_SIZE`): zeros if
/// nothing is stored there, else the magic, entries and values.
pub(crate) fn ibody(entries: &[&Xattr]) -> [u8; IBODY_BYTES] {
    let mut region = [0u8; IBODY_BYTES];
    if !entries.is_empty() {
        put32(&mut region, 0, MAGIC);
        // Value offsets count from the first entry, just past the magic.
        write_entries(&mut region[4..], entries, 0);
    }
    region
}

/// The external block at `block` holding `entries`, with its header and
/// `metadata_csum` checksum.
pub(crate) fn block(entries: &[&Xattr], block: u64, fs_seed: u32) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK as usize];
    put32(&mut out, 0x00, MAGIC);
    put32(&mut out, 0x04, 1); // refcount: one inode uses it
    put32(&mut out, 0x08, 1); // blocks
    // Value offsets count from the block's start.
    let hashes = write_entries(&mut out[BLOCK_HEADER..], entries, BLOCK_HEADER);
    put32(&mut out, 0x0C, block_hash(&hashes));
    let csum = crc32c::update(crc32c::update(fs_seed, &block.to_le_bytes()), &out);
    put32(&mut out, 0x10, csum);
    out
}

/// Writes the entries from the start of `region` and their values down from
/// its end, returning each entry's hash.
fn write_entries(region: &mut [u8], entries: &[&Xattr], offset_base: usize) -> Vec<u32> {
    let mut at = 0;
    let mut end = region.len();
    let mut hashes = Vec::with_capacity(entries.len());
    for xattr in entries {
        end -= padded(xattr.value.len());
        region[end..end + xattr.value.len()].copy_from_slice(&xattr.value);
        let hash = entry_hash(&xattr.suffix, &region[end..end + padded(xattr.value.len())]);
        region[at] = xattr.suffix.len() as u8;
        region[at + 1] = xattr.index;
        put16(region, at + 2, if xattr.value.is_empty() { 0 } else { (end + offset_base) as u16 });
        put32(region, at + 8, xattr.value.len() as u32);
        put32(region, at + 12, hash);
        region[at + ENTRY_HEADER..at + ENTRY_HEADER + xattr.suffix.len()].copy_from_slice(&xattr.suffix);
        at += entry_len(xattr.suffix.len());
        hashes.push(hash);
    }
    hashes
}

/// `ext4_xattr_hash_entry`: the name's bytes, then the padded value's
/// little-endian words.
fn entry_hash(name: &[u8], padded_value: &[u8]) -> u32 {
    let mut hash = 0u32;
    for &byte in name {
        hash = hash.rotate_left(5) ^ u32::from(byte);
    }
    for word in padded_value.chunks_exact(4) {
        hash = hash.rotate_left(16) ^ u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
    }
    hash
}

/// `ext4_xattr_rehash`: the block's hash over its entries' hashes.
fn block_hash(hashes: &[u32]) -> u32 {
    if hashes.contains(&0) {
        return 0; // an entry without a hash marks the block as not shareable
    }
    hashes.iter().fold(0, |hash, &entry| hash.rotate_left(16) ^ entry)
}

fn entry_len(name_len: usize) -> usize {
    (ENTRY_HEADER + name_len).next_multiple_of(4)
}

fn padded(len: usize) -> usize {
    len.next_multiple_of(4)
}

/// POSIX ACL tags (`ACL_USER_OBJ` … `ACL_OTHER`); the two that name an id.
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;
const ACL_TAGS: [u16; 6] = [0x01, ACL_USER, 0x04, ACL_GROUP, 0x10, 0x20];

/// Converts an ACL from the form `getxattr` returns (version 2, 8-byte
/// entries) to ext4's (version 1, 4-byte entries unless they name an id),
/// as e2fsprogs' `convert_posix_acl_to_disk_buffer` does.
fn acl_to_disk(value: &[u8]) -> Result<Box<[u8]>, String> {
    let Some((version, entries)) = value.split_first_chunk::<4>() else {
        return Err("a POSIX ACL starts with a 4-byte version".into());
    };
    if u32::from_le_bytes(*version) != 2 || entries.is_empty() || entries.len() % 8 != 0 {
        return Err("not a POSIX ACL as getxattr returns it (version 2, 8-byte entries)".into());
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    let mut previous: Option<(usize, u32)> = None;
    let mut counts = [0usize; 6];
    for entry in entries.chunks_exact(8) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let Some(rank) = ACL_TAGS.iter().position(|&t| t == tag) else {
            return Err(format!("unknown ACL tag {tag:#x}"));
        };
        let keeps_id = tag == ACL_USER || tag == ACL_GROUP;
        let id = if keeps_id { u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]) } else { 0 };
        // The kernel reads an ACL from disk without checking it and stops at
        // the first matching entry, so an ACL out of order would grant what
        // its mask denies: accept only what posix_acl_valid accepts.
        if previous.is_some_and(|p| p >= (rank, id)) {
            return Err(
                "ACL entries out of order or repeated (user::, user:ID…, group::, group:ID…, mask::, other::)".into()
            );
        }
        previous = Some((rank, id));
        counts[rank] += 1;
        out.extend_from_slice(&entry[..if keeps_id { 8 } else { 4 }]);
    }
    let [user_obj, users, group_obj, groups, mask, other] = counts;
    if user_obj != 1 || group_obj != 1 || other != 1 {
        return Err("an ACL has exactly one user::, one group:: and one other:: entry".into());
    }
    if users + groups > 0 && mask == 0 {
        return Err("an ACL naming users or groups needs a mask:: entry".into());
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_their_namespace_index() {
        let cases = [
            ("user.mime_type", 1, "mime_type"),
            ("system.posix_acl_access", 2, ""),
            ("trusted.overlay.opaque", 4, "overlay.opaque"),
            ("security.capability", 6, "capability"),
        ];
        let acl = [2u32.to_le_bytes(), [1, 0, 6, 0], [0; 4], [4, 0, 4, 0], [0; 4], [0x20, 0, 4, 0], [0; 4]].concat();
        for (name, index, suffix) in cases {
            let x = Xattr::new(name, &acl).unwrap();
            assert_eq!((x.index, &*x.suffix), (index, suffix.as_bytes()), "{name}");
        }
        for bad in ["nope.x", "user.", "system.data", "system.posix_acl_accessx", "gnu.x"] {
            assert!(Xattr::new(bad, b"v").is_err(), "{bad}");
        }
    }

    #[test]
    fn an_acl_is_stored_in_ext4s_short_form() {
        // user::rw-, user:1000:r--, group::r--, mask::r--, other::---
        let entries: [(u16, u16, u32); 5] = [(1, 6, 0), (2, 4, 1000), (4, 4, 0), (0x10, 4, 0), (0x20, 0, 0)];
        let mut vfs = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            vfs.extend([tag.to_le_bytes(), perm.to_le_bytes()].concat());
            vfs.extend(id.to_le_bytes());
        }
        let disk = acl_to_disk(&vfs).unwrap();
        assert_eq!(disk.len(), 4 + 4 + 8 + 4 + 4 + 4);
        assert_eq!(&disk[..4], &1u32.to_le_bytes());
        assert_eq!(&disk[8..16], &[2, 0, 4, 0, 0xE8, 0x03, 0, 0]);
    }

    #[test]
    fn an_acl_linux_would_refuse_is_refused() {
        let encode = |entries: &[(u16, u16, u32)]| {
            let mut vfs = 2u32.to_le_bytes().to_vec();
            for (tag, perm, id) in entries {
                vfs.extend([tag.to_le_bytes(), perm.to_le_bytes()].concat());
                vfs.extend(id.to_le_bytes());
            }
            vfs
        };
        let valid = [(1, 6, 0), (2, 7, 1000), (4, 4, 0), (0x10, 4, 0), (0x20, 0, 0)];
        assert!(acl_to_disk(&encode(&valid)).is_ok());
        // The mask before the named user: the kernel would grant uid 1000 rwx.
        let mask_first = [(1, 6, 0), (0x10, 4, 0), (2, 7, 1000), (4, 4, 0), (0x20, 0, 0)];
        let repeated_user = [(1, 6, 0), (2, 7, 1000), (2, 7, 1000), (4, 4, 0), (0x10, 4, 0), (0x20, 0, 0)];
        let no_mask = [(1, 6, 0), (2, 7, 1000), (4, 4, 0), (0x20, 0, 0)];
        let no_other = [(1, 6, 0), (4, 4, 0)];
        for bad in [&mask_first[..], &repeated_user, &no_mask, &no_other] {
            assert!(acl_to_disk(&encode(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_hash_matches_the_kernels_for_a_known_entry() {
        // hash("a") = 'a' = 0x61; then one word "bc\0\0": rotl(0x61, 16) ^ 0x6362.
        assert_eq!(entry_hash(b"a", b"bc\0\0"), (0x61u32 << 16) ^ 0x6362);
        assert_eq!(block_hash(&[1, 2]), (1u32 << 16) ^ 2);
    }
}
