//! Recognising images: FAT12/16/32, qcow2 and newc cpio (plain or gzip).
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
    if head.len() == 512 && head[510..] == [0x55, 0xAA] {
        return inspect_fat(input, &head).map(ImageInfo::Fat);
    }
    Err(bad("not a FAT volume, qcow2 image or cpio archive".into()))
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
