//! Writing a planned layout: boot sector, FATs, directories, then file data,
//! in ascending offset order, skipping everything that is zero.

use std::fs::File;
use std::io::Read;

use super::FatType;
use super::layout::{DirPlan, EntryTarget, FatLayout, Geometry, SECTOR};
use super::names;
use super::time::DosTime;
use crate::le::{put16, put32};
use crate::sink::{Sink, Source, copy_host_file, read_host_range, write_nonzero};
use crate::{Error, Result};

const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_ARCHIVE: u8 = 0x20;
const MEDIA_FIXED_DISK: u8 = 0xF8;
/// FAT entries generated per chunk: bounds memory on huge volumes.
const FAT_CHUNK_ENTRIES: u32 = 1 << 16;
/// Files up to this size are read and written in batches: one
/// `copy_file_range` per 2 KiB key file was measured at ~64 µs, which
/// dominated a 200-file keystore.
const SMALL_FILE: u64 = 64 << 10;
/// Largest batch of small files held in memory.
const BATCH_BYTES: usize = 1 << 20;
/// FAT32's backup boot sector and the FSInfo sector.
const FSINFO_SECTOR: u16 = 1;
const BACKUP_BOOT_SECTOR: u16 = 6;

impl FatLayout<'_> {
    pub(crate) fn emit(&self, sink: &mut dyn Sink, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let g = &self.geometry;
        let boot = self.boot_sector();
        sink.write_at(0, &boot).map_err(Error::Write)?;
        if g.fat_type == FatType::Fat32 {
            let fsinfo = self.fsinfo_sector();
            let sector = u64::from(SECTOR);
            sink.write_at(u64::from(FSINFO_SECTOR) * sector, &fsinfo).map_err(Error::Write)?;
            sink.write_at(u64::from(BACKUP_BOOT_SECTOR) * sector, &boot).map_err(Error::Write)?;
            sink.write_at(u64::from(BACKUP_BOOT_SECTOR + FSINFO_SECTOR) * sector, &fsinfo).map_err(Error::Write)?;
        }
        for copy in 0..2 {
            self.write_fat(sink, g.fat_offset(copy))?;
        }
        for (index, dir) in self.dirs.iter().enumerate() {
            let bytes = self.dir_bytes(index, dir);
            let offset = if dir.first_cluster == 0 { g.root_dir_offset() } else { g.cluster_offset(dir.first_cluster) };
            write_nonzero(sink, offset, &bytes).map_err(Error::Write)?;
        }
        self.write_file_data(sink, progress)?;
        sink.finish(g.image_bytes()).map_err(Error::Write)
    }

    /// Copies file data in cluster order. Small files are read into one
    /// batch and written together (their clusters are adjacent); large ones
    /// go through the sink's `copy_file_at` (`copy_file_range` for files).
    fn write_file_data(&self, sink: &mut dyn Sink, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let cluster = self.geometry.cluster_bytes() as usize;
        let mut done = 0u64;
        let mut batch = Batch { offset: 0, bytes: Vec::with_capacity(BATCH_BYTES) };
        for file in self.files.iter().filter(|f| f.first_cluster != 0) {
            let offset = self.geometry.cluster_offset(file.first_cluster);
            let expected = file.node.size;
            if expected <= SMALL_FILE {
                let adjacent = batch.offset + batch.bytes.len() as u64 == offset;
                if !batch.bytes.is_empty() && (!adjacent || batch.bytes.len() + expected as usize > BATCH_BYTES) {
                    batch.flush(sink)?;
                    progress(done);
                }
                if batch.bytes.is_empty() {
                    batch.offset = offset;
                }
                match &file.node.source {
                    Source::Bytes(bytes) => batch.bytes.extend_from_slice(bytes),
                    Source::Host(path) => read_exactly(path, expected, &mut batch.bytes)?,
                    Source::HostRange { path, offset } => read_host_range(path, *offset, expected, &mut batch.bytes)?,
                }
                // Slack up to the cluster end, so the next file stays adjacent.
                batch.bytes.resize(batch.bytes.len().next_multiple_of(cluster), 0);
                done += expected;
                continue;
            }
            if !batch.bytes.is_empty() {
                batch.flush(sink)?;
                progress(done);
            }
            let (path, range_start) = match &file.node.source {
                Source::Bytes(bytes) => {
                    write_nonzero(sink, offset, bytes).map_err(Error::Write)?;
                    done += expected;
                    progress(done);
                    continue;
                }
                Source::Host(path) => (path.as_path(), None),
                Source::HostRange { path, offset } => (&**path, Some(*offset)),
            };
            let base = done;
            copy_host_file(sink, offset, path, range_start, expected, &mut |n| {
                done += n;
                progress(done);
            })?;
            done = base + expected;
        }
        batch.flush(sink)?;
        progress(done);
        Ok(())
    }

    /// Streams one FAT copy: chains are contiguous, so every entry is
    /// "next cluster" except at the chain ends. Free entries are zero and
    /// are not written.
    fn write_fat(&self, sink: &mut dyn Sink, offset: u64) -> Result<()> {
        let fat_type = self.geometry.fat_type;
        let eoc = end_of_chain(fat_type);
        let entries = 2 + self.used_clusters;
        let mut ends = self.chain_ends.iter().peekable();
        let mut bytes = Vec::new();
        let mut first = 0u32;
        while first < entries {
            let last = (first + FAT_CHUNK_ENTRIES).min(entries);
            let values = (first..last).map(|cluster| match cluster {
                0 => eoc & !0xFF | u32::from(MEDIA_FIXED_DISK),
                1 => eoc,
                _ if ends.peek() == Some(&&cluster) => {
                    ends.next();
                    eoc
                }
                _ => cluster + 1,
            });
            bytes.clear();
            pack_fat_entries(fat_type, values, &mut bytes);
            let chunk_offset = offset + u64::from(first) * u64::from(fat_type.bits()) / 8;
            sink.write_at(chunk_offset, &bytes).map_err(Error::Write)?;
            first = last;
        }
        Ok(())
    }

    fn dir_bytes(&self, index: usize, dir: &DirPlan<'_>) -> Vec<u8> {
        let t = self.time;
        let mut out = Vec::with_capacity((dir.slots * 32) as usize);
        match dir.parent {
            None => {
                if let Some(label) = &self.label {
                    out.extend_from_slice(&short_entry(label, ATTR_VOLUME_ID, 0, 0, t));
                }
            }
            Some(parent) => {
                let dot = *b".          ";
                let dotdot = *b"..         ";
                // `..` of a directory in the root points at cluster 0, even on FAT32.
                let parent_cluster = if parent == 0 { 0 } else { self.dirs[parent].first_cluster };
                out.extend_from_slice(&short_entry(&dot, ATTR_DIRECTORY, dir.first_cluster, 0, t));
                out.extend_from_slice(&short_entry(&dotdot, ATTR_DIRECTORY, parent_cluster, 0, t));
            }
        }
        for entry in &dir.entries {
            if entry.needs_long_name {
                names::push_lfn_entries(&mut out, entry.name, &entry.short);
            }
            let (attr, cluster, size) = match entry.target {
                EntryTarget::Dir(sub) => (ATTR_DIRECTORY, self.dirs[sub].first_cluster, 0),
                EntryTarget::File(file) => {
                    let plan = &self.files[file];
                    (ATTR_ARCHIVE, plan.first_cluster, plan.node.size as u32)
                }
            };
            out.extend_from_slice(&short_entry(&entry.short, attr, cluster, size, t));
        }
        debug_assert_eq!(out.len() as u64, dir.slots * 32, "directory {index} slot count");
        out
    }

    fn boot_sector(&self) -> [u8; 512] {
        let g: &Geometry = &self.geometry;
        let mut b = [0u8; 512];
        let fat32 = g.fat_type == FatType::Fat32;
        // Jump over the BPB to a halt loop, in case anyone boots this disk.
        let code_at: usize = if fat32 { 0x5A } else { 0x3E };
        b[..3].copy_from_slice(&[0xEB, (code_at - 2) as u8, 0x90]);
        b[code_at..code_at + 4].copy_from_slice(&[0xFA, 0xF4, 0xEB, 0xFD]);
        b[3..11].copy_from_slice(b"MSWIN4.1");
        put16(&mut b, 11, SECTOR as u16);
        b[13] = g.sectors_per_cluster as u8;
        put16(&mut b, 14, g.reserved_sectors as u16);
        b[16] = 2;
        put16(&mut b, 17, g.root_entries as u16);
        if !fat32 && g.total_sectors < 0x10000 {
            put16(&mut b, 19, g.total_sectors as u16);
        } else {
            put32(&mut b, 32, g.total_sectors);
        }
        b[21] = MEDIA_FIXED_DISK;
        put16(&mut b, 24, 63); // sectors per track: CHS geometry is unused on these disks
        put16(&mut b, 26, 255); // heads
        let ext = if fat32 {
            put32(&mut b, 36, g.fat_sectors);
            put32(&mut b, 44, 2); // root directory cluster
            put16(&mut b, 48, FSINFO_SECTOR);
            put16(&mut b, 50, BACKUP_BOOT_SECTOR);
            64
        } else {
            put16(&mut b, 22, g.fat_sectors as u16);
            36
        };
        b[ext] = 0x80; // drive number
        b[ext + 2] = 0x29; // extended boot signature: the next three fields are valid
        put32(&mut b, ext + 3, self.volume_id);
        b[ext + 7..ext + 18].copy_from_slice(&self.label.unwrap_or(*b"NO NAME    "));
        let fs_type: &[u8; 8] = match g.fat_type {
            FatType::Fat12 => b"FAT12   ",
            FatType::Fat16 => b"FAT16   ",
            FatType::Fat32 => b"FAT32   ",
        };
        b[ext + 18..ext + 26].copy_from_slice(fs_type);
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    fn fsinfo_sector(&self) -> [u8; 512] {
        let g = &self.geometry;
        let mut s = [0u8; 512];
        put32(&mut s, 0, 0x4161_5252);
        put32(&mut s, 484, 0x6141_7272);
        put32(&mut s, 488, g.clusters - self.used_clusters);
        let next_free = 2 + self.used_clusters;
        put32(&mut s, 492, if next_free < 2 + g.clusters { next_free } else { u32::MAX });
        put32(&mut s, 508, 0xAA55_0000);
        s
    }
}

/// Small files staged for one write: `bytes` land at `offset`.
struct Batch {
    offset: u64,
    bytes: Vec<u8>,
}

impl Batch {
    fn flush(&mut self, sink: &mut dyn Sink) -> Result<()> {
        write_nonzero(sink, self.offset, &self.bytes).map_err(Error::Write)?;
        self.bytes.clear();
        Ok(())
    }
}

/// Appends exactly `expected` bytes of `path` to `out`, or fails with
/// `SourceChanged` if the file is now shorter or longer.
fn read_exactly(path: &std::path::Path, expected: u64, out: &mut Vec<u8>) -> Result<()> {
    let read_error = |source| Error::ReadSource { path: path.to_path_buf(), source };
    let before = out.len();
    File::open(path).and_then(|f| f.take(expected + 1).read_to_end(out)).map_err(read_error)?;
    if (out.len() - before) as u64 != expected {
        return Err(Error::SourceChanged { path: path.to_path_buf(), expected });
    }
    Ok(())
}

fn end_of_chain(fat_type: FatType) -> u32 {
    match fat_type {
        FatType::Fat12 => 0xFFF,
        FatType::Fat16 => 0xFFFF,
        FatType::Fat32 => 0x0FFF_FFFF,
    }
}

fn pack_fat_entries(fat_type: FatType, values: impl Iterator<Item = u32>, out: &mut Vec<u8>) {
    match fat_type {
        FatType::Fat12 => {
            // Two 12-bit entries share three bytes, low entry first.
            let mut pending: Option<u32> = None;
            for value in values {
                match pending.take() {
                    None => pending = Some(value),
                    Some(low) => out.extend_from_slice(&[
                        low as u8,
                        (low >> 8 & 0xF | (value & 0xF) << 4) as u8,
                        (value >> 4) as u8,
                    ]),
                }
            }
            if let Some(low) = pending {
                out.extend_from_slice(&[low as u8, (low >> 8 & 0xF) as u8]);
            }
        }
        FatType::Fat16 => values.for_each(|v| out.extend_from_slice(&(v as u16).to_le_bytes())),
        FatType::Fat32 => values.for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
    }
}

fn short_entry(name: &[u8; 11], attr: u8, cluster: u32, size: u32, t: DosTime) -> [u8; 32] {
    let mut e = [0u8; 32];
    e[..11].copy_from_slice(name);
    e[11] = attr;
    put16(&mut e, 14, t.time);
    put16(&mut e, 16, t.date);
    put16(&mut e, 18, t.date);
    put16(&mut e, 20, (cluster >> 16) as u16);
    put16(&mut e, 22, t.time);
    put16(&mut e, 24, t.date);
    put16(&mut e, 26, cluster as u16);
    put32(&mut e, 28, size);
    e
}
