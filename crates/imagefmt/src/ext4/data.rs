//! The fast path of the data loop: small files whose blocks follow one
//! another are staged in one buffer and written with one `pwrite`, their
//! host files read by a few threads at once.
//!
//! One `copy_file_range` per small file cost ~10 µs in syscalls alone (120,000
//! files: 1.2 s of `strace -c`), about what a whole small file may cost here.
//! Reading costs `open`, one `read`, `close`; the length check rides on the
//! read (one byte more is asked for). Big files, files in several runs and
//! everything that is not a regular file still go one at a time through the
//! emitter's own path, which [`DataWriter::stage`] declines.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::BLOCK;
use super::layout::{InodeKind, InodePlan};
use crate::sink::{AlignedBuffer, Sink, Source, write_nonzero};
use crate::{Error, Result};

/// The staging buffer: bounds memory whatever the tree holds. 1 MiB is
/// some 250 source-tree files per write, and directories cut the runs
/// more often than that; a bigger buffer only adds to peak RSS.
const CHUNK_BYTES: usize = 1 << 20;
/// Files up to this size are staged; bigger ones are copied by the kernel,
/// which shares their blocks on reflink filesystems.
const SMALL_FILE: u64 = 256 << 10;
/// Below this many host files in a chunk, threads cost more than they save.
const MIN_FILES_PER_READER: usize = 16;
/// Reader threads at most: reads of cached small files scale to a few cores,
/// and more threads would only contend on the directory inodes' locks.
const MAX_READERS: usize = 4;

/// A host file to read into its place in the staged chunk.
struct HostRead<'t> {
    /// Byte offset in the chunk.
    at: usize,
    /// Bytes of the chunk it fills: its size rounded up to whole blocks.
    len: usize,
    path: &'t Path,
    size: u64,
}

/// Small files' data, staged block-contiguously and written a chunk at a time.
pub(crate) struct DataWriter<'t> {
    buffer: AlignedBuffer,
    /// The image block where the staged bytes start.
    start_block: u64,
    /// Bytes staged so far, a whole number of blocks.
    len: usize,
    reads: Vec<HostRead<'t>>,
    readers: usize,
}

impl<'t> DataWriter<'t> {
    pub(crate) fn new() -> DataWriter<'t> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        DataWriter {
            buffer: AlignedBuffer::new(CHUNK_BYTES),
            start_block: 0,
            len: 0,
            reads: Vec::new(),
            readers: cores.clamp(1, MAX_READERS),
        }
    }

    /// Stages `plan`'s data if it is a small regular file in one run with
    /// no holes, writing the staged chunk first when the file does not
    /// follow it or would overflow it. Returns `false` for anything else,
    /// after writing what was staged, so that the caller's own write of
    /// the inode lands after the bytes before it, as without staging.
    pub(crate) fn stage(&mut self, sink: &mut dyn Sink, plan: &InodePlan<'t>) -> Result<bool> {
        let file = match (&plan.kind, plan.runs.as_slice()) {
            // A file with data ranges holds only their bytes, not the whole file.
            (InodeKind::File(file), [run])
                if file.ranges.is_none() && file.size <= SMALL_FILE && run.len == file.size.div_ceil(BLOCK) =>
            {
                file
            }
            _ => {
                self.flush(sink)?;
                return Ok(false);
            }
        };
        let run = plan.runs[0];
        let bytes = (run.len * BLOCK) as usize;
        let follows = self.start_block + (self.len as u64) / BLOCK == run.start;
        if self.len > 0 && (!follows || self.len + bytes > CHUNK_BYTES) {
            self.flush(sink)?;
        }
        if self.len == 0 {
            self.start_block = run.start;
        }
        let at = self.len;
        match &file.source {
            Source::Bytes(data) => {
                let slot = &mut self.buffer.as_mut_slice()[at..at + bytes];
                slot[..data.len()].copy_from_slice(data);
                slot[data.len()..].fill(0);
            }
            Source::Host(path) => self.reads.push(HostRead { at, len: bytes, path, size: file.size }),
        }
        self.len += bytes;
        Ok(true)
    }

    /// Reads the staged host files into place and writes the chunk.
    pub(crate) fn flush(&mut self, sink: &mut dyn Sink) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let chunk = &mut self.buffer.as_mut_slice()[..self.len];
        read_all(chunk, &self.reads, self.readers)?;
        write_nonzero(sink, self.start_block * BLOCK, chunk).map_err(Error::Write)?;
        self.reads.clear();
        self.len = 0;
        Ok(())
    }
}

/// Fills each read's slot of `chunk` (its file's bytes, then zeros to the
/// block end), on up to `readers` threads, each taking a contiguous share.
/// The error of the first failing file in chunk order wins, whichever
/// thread saw it, so the error does not depend on timing.
fn read_all(chunk: &mut [u8], reads: &[HostRead<'_>], readers: usize) -> Result<()> {
    let mut slots = Vec::with_capacity(reads.len());
    let mut rest = chunk;
    let mut offset = 0;
    // Reads are in chunk order and never overlap; bytes between them were
    // staged from memory and stay as they are.
    for read in reads {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(read.at - offset);
        let (slot, tail) = tail.split_at_mut(read.len);
        slots.push((read, slot));
        rest = tail;
        offset = read.at + read.len;
    }
    let threads = readers.min(slots.len() / MIN_FILES_PER_READER).max(1);
    if threads == 1 {
        return slots.into_iter().try_for_each(|(read, slot)| read_into(read, slot));
    }
    let share = slots.len().div_ceil(threads);
    let mut groups = Vec::with_capacity(threads);
    while !slots.is_empty() {
        let tail = slots.split_off(share.min(slots.len()));
        groups.push(std::mem::replace(&mut slots, tail));
    }
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|group| scope.spawn(move || group.into_iter().try_for_each(|(read, slot)| read_into(read, slot))))
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });
    results.into_iter().collect()
}

/// Reads the whole of `read.path` into the start of `slot` and zeros the
/// rest: `SourceChanged` if the file is no longer `read.size` bytes long.
/// One byte more than expected is asked for, so the common case is one
/// `read`: a regular file reads short only at its end.
fn read_into(read: &HostRead<'_>, slot: &mut [u8]) -> Result<()> {
    let path = read.path;
    let read_error = |source| Error::ReadSource { path: path.to_path_buf(), source };
    let changed = || Error::SourceChanged { path: path.to_path_buf(), expected: read.size };
    let size = read.size as usize;
    let file = File::open(path).map_err(read_error)?;
    // With no slack in the slot (a size of whole blocks), the extra byte goes here.
    let mut probe = [0u8; 1];
    let want = (size + 1).min(slot.len());
    let mut got = 0;
    while got < size {
        match file.read_at(&mut slot[got..want], got as u64) {
            Ok(0) => return Err(changed()),
            Ok(n) => got += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(read_error(error)),
        }
    }
    let longer = got > size || (want == size && file.read_at(&mut probe, read.size).map_err(read_error)? > 0);
    if longer {
        return Err(changed());
    }
    slot[size..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ext4::{Ext4Options, Ext4Tree, Metadata};

    /// Counts the writes an image takes.
    #[derive(Default)]
    struct CountingSink {
        writes: usize,
    }

    impl Sink for CountingSink {
        fn write_at(&mut self, _offset: u64, _data: &[u8]) -> io::Result<()> {
            self.writes += 1;
            Ok(())
        }

        fn finish(&mut self, _len: u64) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn small_host_files_that_follow_one_another_take_one_write_not_one_each() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = Ext4Tree::new();
        for index in 0..200 {
            let path = dir.path().join(format!("f{index:03}"));
            std::fs::write(&path, vec![index as u8 | 1; 1000 + index]).unwrap();
            tree.add_file_from_path(&format!("f{index:03}"), &path, Metadata::default()).unwrap();
        }
        let mut sink = CountingSink::default();
        tree.layout(&Ext4Options::default()).unwrap().emit(&mut sink).unwrap();
        // Superblock, descriptors, two bitmaps, inode table, two directories: 7;
        // the 200 files' 800 KiB of data: one.
        assert_eq!(sink.writes, 8);
    }

    fn slot_after_reading(content: &[u8], expected: u64, slot_len: usize) -> Result<Vec<u8>> {
        let dir = tempfile::tempdir().map_err(Error::Write)?;
        let path = dir.path().join("file");
        std::fs::write(&path, content).map_err(Error::Write)?;
        let mut slot = vec![0xAAu8; slot_len];
        read_into(&HostRead { at: 0, len: slot_len, path: &path, size: expected }, &mut slot)?;
        Ok(slot)
    }

    #[test]
    fn a_small_file_fills_its_slot_and_zeros_the_rest() {
        let slot = slot_after_reading(b"hello", 5, 4096).unwrap();
        assert_eq!(&slot[..5], b"hello");
        assert!(slot[5..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_file_that_grew_or_shrank_since_it_was_added_is_refused() {
        for (content, expected, slot) in
            [(vec![1u8; 4097], 4096, 4096), (vec![1; 11], 10, 4096), (vec![1; 9], 10, 4096)]
        {
            let err = slot_after_reading(&content, expected, slot).unwrap_err();
            assert!(matches!(err, Error::SourceChanged { .. }), "{} bytes, {expected} expected: {err}", content.len());
        }
        // Exactly one block, no slack: the probe read finds the end.
        assert!(slot_after_reading(&[7u8; 4096], 4096, 4096).is_ok());
    }
}
