//! Recognising images: FAT12/16/32, ext2/3/4, qcow2 and newc cpio (plain or gzip).
//! Everything read is untrusted: every offset and count is checked, reads
//! are bounded by the input, and malformed input is an error, never a panic.

use std::io::{self, Read, Seek, SeekFrom};

use crate::fat::FatType;
use crate::qcow2::Qcow2Header;
use crate::{Error, Result};

/// What `inspect` found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageInfo {
    Fat(FatInfo),
    Qcow2(Qcow2Info),
    Cpio(CpioInfo),
    Ext4(Ext4Info),
}

/// An ext2/3/4 filesystem's superblock facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Info {
    /// `ext4` when any ext4-only feature is on, else `ext3` with a journal, else `ext2`.
    pub kind: &'static str,
    pub label: Option<String>,
    pub uuid: [u8; 16],
    pub block_size: u32,
    pub blocks: u64,
    pub free_blocks: u64,
    pub inodes: u32,
    pub free_inodes: u32,
    /// Size of the filesystem as its superblock states it.
    pub volume_bytes: u64,
    /// Feature names as mke2fs spells them (`has_journal`, `extent`, …);
    /// bits without a name as `compat_0x…`, `incompat_0x…`, `ro_compat_0x…`.
    pub features: Vec<String>,
}

/// A FAT volume's boot-sector facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatInfo {
    pub fat_type: FatType,
    pub label: Option<String>,
    pub volume_id: u32,
    pub bytes_per_sector: u32,
    pub cluster_size: u32,
    pub clusters: u32,
    pub free_clusters: u32,
    /// Size of the volume as its boot sector states it.
    pub volume_bytes: u64,
}

/// A qcow2 image's header facts and allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    pub version: u32,
    pub virtual_size: u64,
    pub cluster_size: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Guest clusters mapped to host clusters.
    pub allocated_clusters: u64,
}

/// A newc cpio archive's contents, counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpioInfo {
    pub gzip: bool,
    pub entries: u64,
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    /// Device nodes, FIFOs and anything else.
    pub other: u64,
    /// Sum of regular file sizes.
    pub data_bytes: u64,
}

/// Identifies the image in `input` and summarises it.
pub fn inspect<R: Read + Seek>(input: &mut R) -> Result<ImageInfo> {
    let mut head = vec![0u8; 512];
    let got = read_up_to(input, &mut head).map_err(Error::ReadImage)?;
    head.truncate(got);
    let bad = |reason: String| Error::InvalidImage { reason };
    if head.starts_with(b"QFI\xfb") {
        return inspect_qcow2(input).map(ImageInfo::Qcow2);
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        input.seek(SeekFrom::Start(0)).map_err(Error::ReadImage)?;
        let decoder = flate2::read::GzDecoder::new(input);
        return count_cpio(decoder, true).map(ImageInfo::Cpio);
    }
    if head.starts_with(b"07070") {
        input.seek(SeekFrom::Start(0)).map_err(Error::ReadImage)?;
        return count_cpio(input, false).map(ImageInfo::Cpio);
    }
    if let Some(superblock) = ext4_superblock(input)? {
        return inspect_ext4(&superblock).map(ImageInfo::Ext4);
    }
    if head.len() == 512 && head[510..] == [0x55, 0xAA] {
        return inspect_fat(input, &head).map(ImageInfo::Fat);
    }
    Err(bad("not a FAT volume, qcow2 image or cpio archive, nor an ext2/3/4 filesystem".into()))
}

/// The 1 KiB superblock at byte 1024, if the input is long enough and it
/// carries the ext2/3/4 magic.
fn ext4_superblock<R: Read + Seek>(input: &mut R) -> Result<Option<Vec<u8>>> {
    let mut superblock = vec![0u8; 1024];
    input.seek(SeekFrom::Start(1024)).map_err(Error::ReadImage)?;
    let got = read_up_to(input, &mut superblock).map_err(Error::ReadImage)?;
    Ok((got == superblock.len() && superblock[0x38..0x3A] == [0x53, 0xEF]).then_some(superblock))
}

/// Feature bits and their mke2fs names: (which word, bit, name).
const EXT4_FEATURES: &[(usize, u32, &str)] = &[
    (0, 0x1, "dir_prealloc"),
    (0, 0x2, "imagic_inodes"),
    (0, 0x4, "has_journal"),
    (0, 0x8, "ext_attr"),
    (0, 0x10, "resize_inode"),
    (0, 0x20, "dir_index"),
    (0, 0x200, "sparse_super2"),
    (0, 0x400, "fast_commit"),
    (0, 0x800, "stable_inodes"),
    (0, 0x1000, "orphan_file"),
    (1, 0x1, "compression"),
    (1, 0x2, "filetype"),
    (1, 0x4, "needs_recovery"),
    (1, 0x8, "journal_dev"),
    (1, 0x10, "meta_bg"),
    (1, 0x40, "extent"),
    (1, 0x80, "64bit"),
    (1, 0x100, "mmp"),
    (1, 0x200, "flex_bg"),
    (1, 0x400, "ea_inode"),
    (1, 0x1000, "dirdata"),
    (1, 0x2000, "metadata_csum_seed"),
    (1, 0x4000, "large_dir"),
    (1, 0x8000, "inline_data"),
    (1, 0x10000, "encrypt"),
    (1, 0x20000, "casefold"),
    (2, 0x1, "sparse_super"),
    (2, 0x2, "large_file"),
    (2, 0x8, "huge_file"),
    (2, 0x10, "uninit_bg"),
    (2, 0x20, "dir_nlink"),
    (2, 0x40, "extra_isize"),
    (2, 0x100, "quota"),
    (2, 0x200, "bigalloc"),
    (2, 0x400, "metadata_csum"),
    (2, 0x1000, "read-only"),
    (2, 0x2000, "project"),
    (2, 0x4000, "shared_blocks"),
    (2, 0x8000, "verity"),
    (2, 0x10000, "orphan_present"),
];
const EXT4_WORDS: [&str; 3] = ["compat", "incompat", "ro_compat"];
/// Incompat bits only ext4 has: extent, 64bit, flex_bg and later ones.
const EXT4_ONLY_INCOMPAT: u32 = !0x1F;

fn inspect_ext4(sb: &[u8]) -> Result<Ext4Info> {
    let bad = |reason: &str| Error::InvalidImage { reason: format!("not a valid ext2/3/4 superblock: {reason}") };
    let words = [le32(sb, 0x5C), le32(sb, 0x60), le32(sb, 0x64)];
    if words[2] & 0x400 != 0 {
        let stored = le32(sb, 0x3FC);
        if crate::ext4::crc32c::update(!0, &sb[..0x3FC]) != stored {
            return Err(bad("the metadata_csum checksum does not match"));
        }
    }
    let log_block = le32(sb, 0x18);
    if log_block > 6 {
        return Err(bad("the block size is over 64 KiB"));
    }
    let block_size = 1024u32 << log_block;
    let wide = words[1] & 0x80 != 0;
    let high = |at: usize| if wide { u64::from(le32(sb, at)) << 32 } else { 0 };
    let blocks = u64::from(le32(sb, 0x04)) | high(0x150);
    let free_blocks = u64::from(le32(sb, 0x0C)) | high(0x158);
    let (inodes, free_inodes) = (le32(sb, 0x00), le32(sb, 0x10));
    if blocks == 0 || le32(sb, 0x20) == 0 || le32(sb, 0x28) == 0 {
        return Err(bad("blocks, blocks per group and inodes per group must all be non-zero"));
    }
    if free_blocks > blocks || free_inodes > inodes {
        return Err(bad("more free blocks or inodes than the filesystem has"));
    }
    let volume_bytes = blocks.checked_mul(u64::from(block_size)).ok_or_else(|| bad("the size overflows"))?;
    let mut features = Vec::new();
    for (word, value) in words.iter().enumerate() {
        let mut named = 0;
        for &(_, bit, name) in EXT4_FEATURES.iter().filter(|(w, ..)| *w == word) {
            named |= bit;
            if value & bit != 0 {
                features.push(name.to_owned());
            }
        }
        let mut rest = value & !named;
        while rest != 0 {
            let bit = rest & rest.wrapping_neg();
            features.push(format!("{}_{bit:#x}", EXT4_WORDS[word]));
            rest &= !bit;
        }
    }
    let kind = if words[1] & EXT4_ONLY_INCOMPAT != 0 || words[2] & !0x7 != 0 {
        "ext4"
    } else if words[0] & 0x4 != 0 {
        "ext3"
    } else {
        "ext2"
    };
    let label_bytes = &sb[0x78..0x88];
    let label_len = label_bytes.iter().position(|&b| b == 0).unwrap_or(label_bytes.len());
    let label = (label_len > 0).then(|| String::from_utf8_lossy(&label_bytes[..label_len]).into_owned());
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sb[0x68..0x78]);
    Ok(Ext4Info { kind, label, uuid, block_size, blocks, free_blocks, inodes, free_inodes, volume_bytes, features })
}

fn read_up_to<R: Read>(input: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match input.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn read_exact_at<R: Read + Seek>(input: &mut R, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
    input.seek(SeekFrom::Start(offset)).map_err(Error::ReadImage)?;
    let got = read_up_to(input, buf).map_err(Error::ReadImage)?;
    if got < buf.len() {
        return Err(Error::InvalidImage { reason: format!("{what} at byte {offset} is past the end of the file") });
    }
    Ok(())
}

fn le16(b: &[u8], at: usize) -> u32 {
    u32::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn inspect_fat<R: Read + Seek>(input: &mut R, boot: &[u8]) -> Result<FatInfo> {
    let bad = |reason: &str| Error::InvalidImage { reason: format!("not a valid FAT boot sector: {reason}") };
    let bytes_per_sector = le16(boot, 11);
    if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096) {
        return Err(bad("bytes per sector is not 512, 1024, 2048 or 4096"));
    }
    let sectors_per_cluster = u32::from(boot[13]);
    if !sectors_per_cluster.is_power_of_two() {
        return Err(bad("sectors per cluster is not a power of two"));
    }
    let reserved = le16(boot, 14);
    let fats = u32::from(boot[16]);
    let root_entries = le16(boot, 17);
    let total = match le16(boot, 19) {
        0 => le32(boot, 32),
        small => small,
    };
    let fat_size = match le16(boot, 22) {
        0 => le32(boot, 36),
        small => small,
    };
    if reserved == 0 || fats == 0 || fat_size == 0 || total == 0 {
        return Err(bad("reserved sectors, FAT count, FAT size and total sectors must all be non-zero"));
    }
    let root_sectors = (root_entries * 32).div_ceil(bytes_per_sector);
    let meta = u64::from(reserved) + u64::from(fats) * u64::from(fat_size) + u64::from(root_sectors);
    let data_sectors = u64::from(total).checked_sub(meta).ok_or_else(|| bad("metadata is larger than the volume"))?;
    let clusters = (data_sectors / u64::from(sectors_per_cluster)) as u32;
    let fat_type = if le16(boot, 22) == 0 {
        FatType::Fat32
    } else if clusters <= 4084 {
        FatType::Fat12
    } else {
        FatType::Fat16
    };
    // The FAT must have an entry for every cluster.
    let fat_entries = u64::from(fat_size) * u64::from(bytes_per_sector) * 8 / u64::from(fat_type.bits());
    if fat_entries < u64::from(clusters) + 2 {
        return Err(bad("the FAT is too small for the cluster count"));
    }
    let ext = if fat_type == FatType::Fat32 { 64 } else { 36 };
    let (volume_id, label) = if boot[ext + 2] == 0x29 {
        let label = String::from_utf8_lossy(&boot[ext + 7..ext + 18]).trim_end().to_owned();
        (le32(boot, ext + 3), Some(label).filter(|l| !l.is_empty() && l != "NO NAME"))
    } else {
        (0, None)
    };
    let free_clusters =
        count_free_clusters(input, fat_type, u64::from(reserved) * u64::from(bytes_per_sector), clusters)?;
    Ok(FatInfo {
        fat_type,
        label,
        volume_id,
        bytes_per_sector,
        cluster_size: sectors_per_cluster * bytes_per_sector,
        clusters,
        free_clusters,
        volume_bytes: u64::from(total) * u64::from(bytes_per_sector),
    })
}

/// Counts zero entries in the first FAT, reading it in chunks.
fn count_free_clusters<R: Read + Seek>(input: &mut R, fat_type: FatType, offset: u64, clusters: u32) -> Result<u32> {
    let entries = u64::from(clusters) + 2;
    let fat_bytes = (entries * u64::from(fat_type.bits())).div_ceil(8);
    const CHUNK: u64 = 1 << 20; // a multiple of 3 bytes would matter for FAT12, which is < 6 KiB
    let mut free = 0u32;
    let mut chunk = Vec::new();
    let mut at = 0u64;
    while at < fat_bytes {
        let len = CHUNK.min(fat_bytes - at) as usize;
        chunk.resize(len, 0);
        read_exact_at(input, offset + at, &mut chunk, "the FAT")?;
        let first_entry = at * 8 / u64::from(fat_type.bits());
        let entry_at = |index: u64| -> u32 {
            let local = (index - first_entry) as usize;
            match fat_type {
                FatType::Fat12 => {
                    let byte = local * 3 / 2;
                    let pair = le16(&chunk, byte);
                    if local % 2 == 0 { pair & 0xFFF } else { pair >> 4 }
                }
                FatType::Fat16 => le16(&chunk, local * 2),
                FatType::Fat32 => le32(&chunk, local * 4) & 0x0FFF_FFFF,
            }
        };
        let last_entry = ((at + len as u64) * 8 / u64::from(fat_type.bits())).min(entries);
        for index in first_entry.max(2)..last_entry {
            // FAT12's last entry may straddle the chunk; FAT12 fits one chunk.
            if fat_type == FatType::Fat12 && (index - first_entry) as usize * 3 / 2 + 2 > chunk.len() {
                break;
            }
            if entry_at(index) == 0 {
                free += 1;
            }
        }
        at += len as u64;
    }
    Ok(free)
}

fn inspect_qcow2<R: Read + Seek>(input: &mut R) -> Result<Qcow2Info> {
    // The header, its extensions and the backing name all fit in the first cluster (>= 512 B).
    let mut head = vec![0u8; 512];
    read_exact_at(input, 0, &mut head, "the qcow2 header")?;
    let cluster_bits = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
    if (9..=21).contains(&cluster_bits) {
        head.resize(1 << cluster_bits, 0);
        input.seek(SeekFrom::Start(0)).map_err(Error::ReadImage)?;
        let got = read_up_to(input, &mut head).map_err(Error::ReadImage)?;
        head.truncate(got);
    }
    let header = Qcow2Header::parse(&head).map_err(|reason| Error::InvalidImage { reason })?;
    let cluster = 1u64 << header.cluster_bits;
    let mut l1 = vec![0u8; header.l1_entries as usize * 8];
    read_exact_at(input, header.l1_offset, &mut l1, "the L1 table")?;
    let mut l2 = vec![0u8; cluster as usize];
    let mut allocated = 0u64;
    // A valid image never shares an L2 table between L1 entries; refusing
    // repeats bounds the reads by the file's size.
    let mut seen = std::collections::HashSet::new();
    for entry in l1.chunks_exact(8) {
        let l2_offset = u64::from_be_bytes(entry.try_into().unwrap_or([0; 8])) & crate::qcow2::OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        if !seen.insert(l2_offset) {
            return Err(Error::InvalidImage { reason: format!("L2 table at byte {l2_offset} is referenced twice") });
        }
        read_exact_at(input, l2_offset, &mut l2, "an L2 table")?;
        allocated += l2
            .chunks_exact(8)
            .filter(|e| u64::from_be_bytes((*e).try_into().unwrap_or([0; 8])) & crate::qcow2::OFFSET_MASK != 0)
            .count() as u64;
    }
    Ok(Qcow2Info {
        version: header.version,
        virtual_size: header.virtual_size,
        cluster_size: cluster as u32,
        backing_file: header.backing_file,
        backing_format: header.backing_format,
        allocated_clusters: allocated,
    })
}

fn count_cpio<R: Read>(mut input: R, gzip: bool) -> Result<CpioInfo> {
    let bad = |reason: String| Error::InvalidImage { reason };
    let mut info = CpioInfo { gzip, ..CpioInfo::default() };
    let mut offset = 0u64;
    let mut header = [0u8; 110];
    let mut scratch = vec![0u8; 64 << 10];
    loop {
        let got = read_up_to(&mut input, &mut header).map_err(|e| bad(format!("cannot read archive: {e}")))?;
        if got < header.len() {
            return Err(bad(format!("archive ends at byte {} without a TRAILER!!! entry", offset + got as u64)));
        }
        if &header[..6] != b"070701" && &header[..6] != b"070702" {
            return Err(bad(format!("bad cpio magic at byte {offset}")));
        }
        let field = |index: usize| -> Result<u32> {
            let text = std::str::from_utf8(&header[6 + index * 8..14 + index * 8]).unwrap_or("");
            u32::from_str_radix(text, 16)
                .map_err(|_| bad(format!("bad hex field {index} in the header at byte {offset}")))
        };
        let mode = field(1)?;
        let size = u64::from(field(6)?);
        let namesize = field(11)? as usize;
        if namesize == 0 || namesize > 4096 {
            return Err(bad(format!("name size {namesize} at byte {offset} is out of range")));
        }
        let name_padded = (110 + namesize).next_multiple_of(4) - 110;
        let mut name = vec![0u8; name_padded];
        let got = read_up_to(&mut input, &mut name).map_err(|e| bad(format!("cannot read archive: {e}")))?;
        if got < name_padded {
            return Err(bad(format!("archive ends inside the name at byte {offset}")));
        }
        if &name[..namesize] == b"TRAILER!!!\0" {
            return Ok(info);
        }
        info.entries += 1;
        match mode & 0o170_000 {
            0o040_000 => info.dirs += 1,
            0o100_000 => {
                info.files += 1;
                info.data_bytes += size;
            }
            0o120_000 => info.symlinks += 1,
            _ => info.other += 1,
        }
        let mut remaining = size.next_multiple_of(4);
        while remaining > 0 {
            let want = (scratch.len() as u64).min(remaining) as usize;
            let got =
                read_up_to(&mut input, &mut scratch[..want]).map_err(|e| bad(format!("cannot read archive: {e}")))?;
            if got == 0 {
                return Err(bad(format!("archive ends inside the data of the entry at byte {offset}")));
            }
            remaining -= got as u64;
        }
        offset += 110 + name_padded as u64 + size.next_multiple_of(4);
    }
}

/// The ext4 superblock reader, reachable from the `ext4_info` fuzz target
/// without building a whole image around each input.
#[doc(hidden)]
pub mod fuzzing {
    use super::{Ext4Info, inspect_ext4};
    use crate::Result;

    /// The length of an ext2/3/4 superblock.
    pub const EXT4_SUPERBLOCK_BYTES: usize = 1024;

    /// Reads `superblock` (exactly [`EXT4_SUPERBLOCK_BYTES`] long, the
    /// magic already checked by the caller) as `inspect` would.
    pub fn inspect_ext4_superblock(superblock: &[u8; EXT4_SUPERBLOCK_BYTES]) -> Result<Ext4Info> {
        inspect_ext4(superblock)
    }

    /// Stores the `metadata_csum` checksum of `superblock` in its last four
    /// bytes, so that a fuzzer reaches the fields behind the checksum.
    pub fn seal_ext4_superblock(superblock: &mut [u8; EXT4_SUPERBLOCK_BYTES]) {
        let sum = crate::ext4::crc32c::update(!0, &superblock[..0x3FC]);
        superblock[0x3FC..].copy_from_slice(&sum.to_le_bytes());
    }
}
