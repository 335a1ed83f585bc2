//! The fast path of the data loop: small files whose blocks follow one
//! another are staged in one buffer and written with one `pwrite`, their
//! host files read by a few long-lived reader threads, a chunk each, while
//! the emitter stages the next.
//!
//! One `copy_file_range` per small file cost ~10 µs in syscalls alone (120,000
//! files: 1.2 s of `strace -c`), about what a whole small file may cost here.
//! Reading costs `open`, one `read`, `close`; the length check rides on the
//! read (one byte more is asked for). Big files, files in several runs and
//! everything that is not a regular file still go one at a time through the
//! emitter's own path, which [`DataWriter::stage`] declines.
//!
//! Chunks are written in the order they were staged, whichever reader
//! finishes first, so an image's writes (and a qcow2 image's cluster order)
//! do not depend on timing, and the first failing file in that order is
//! the error reported.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::{Scope, ScopedJoinHandle};

use super::BLOCK;
use super::layout::{InodeKind, InodePlan};
use crate::sink::{AlignedBuffer, FileSink, Sink, Source, write_nonzero};
use crate::{Error, Result};

/// The staging buffer: bounds memory whatever the tree holds. 1 MiB is
/// some 250 source-tree files per write, and directories cut the runs
/// more often than that; a bigger buffer only adds to peak RSS.
const CHUNK_BYTES: usize = 1 << 20;
/// Files up to this size are staged; bigger ones are copied by the kernel,
/// which shares their blocks on reflink filesystems.
const SMALL_FILE: u64 = 256 << 10;
/// Below this many host files in a chunk, handing it to a reader costs
/// more than reading it here.
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
    /// Where the file's bytes start in `path` when they are a range of it
    /// (which may then be longer); `None`: all of `path`.
    range_start: Option<u64>,
}

/// A staged chunk: where it goes, its bytes, and the host files still to
/// read into them.
struct Chunk<'t> {
    buffer: AlignedBuffer,
    /// The image block where the staged bytes start.
    start_block: u64,
    /// Bytes staged so far, a whole number of blocks.
    len: usize,
    reads: Vec<HostRead<'t>>,
    /// Written to the image file by the reader that filled it.
    written: bool,
}

impl Chunk<'_> {
    fn empty(buffer: AlignedBuffer) -> Self {
        Chunk { buffer, start_block: 0, len: 0, reads: Vec::new(), written: false }
    }

    fn read(&mut self) -> Result<()> {
        let chunk = &mut self.buffer.as_mut_slice()[..self.len];
        read_all(chunk, &self.reads)
    }
}

/// A chunk handed on: read already (its result kept), or with a reader.
enum Pending<'t> {
    Read(Chunk<'t>, Result<()>),
    WithReader(usize),
}

/// A reader thread: chunks go in, filled chunks come back in the same order.
struct Reader<'t> {
    jobs: Sender<Chunk<'t>>,
    done: Receiver<(Chunk<'t>, Result<()>)>,
}

/// Small files' data, staged block-contiguously and written a chunk at a time.
pub(crate) struct DataWriter<'scope, 'env, 't> {
    scope: &'scope Scope<'scope, 'env>,
    staging: Chunk<'t>,
    /// Chunks handed on and not yet written, oldest first.
    pending: VecDeque<Pending<'t>>,
    /// Buffers of written chunks, for the next ones.
    spare: Vec<AlignedBuffer>,
    readers: Vec<Reader<'t>>,
    max_readers: usize,
    next_reader: usize,
    handles: Vec<ScopedJoinHandle<'scope, ()>>,
    /// The image file, for readers to write their chunks to themselves.
    image: Option<Arc<File>>,
}

impl<'scope, 'env, 't: 'scope> DataWriter<'scope, 'env, 't> {
    /// A writer whose reader threads, started at the first chunk that
    /// needs them, live in `scope`.
    /// With `image`, a reader writes the chunk it filled itself, taking
    /// the copy into the page cache off the emitting thread.
    pub(crate) fn new(scope: &'scope Scope<'scope, 'env>, image: Option<File>) -> DataWriter<'scope, 'env, 't> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        DataWriter {
            scope,
            staging: Chunk::empty(AlignedBuffer::new(CHUNK_BYTES)),
            pending: VecDeque::new(),
            spare: Vec::new(),
            readers: Vec::new(),
            max_readers: if cores > 1 { cores.min(MAX_READERS) } else { 0 },
            next_reader: 0,
            handles: Vec::new(),
            image: image.map(Arc::new),
        }
    }

    /// Stages `plan`'s data if it is a small regular file in one run with
    /// no holes, handing the staged chunk on first when the file does not
    /// follow it or would overflow it. Returns `false` for anything else,
    /// after writing all that was staged, so that the caller's own write of
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
        let staging = &self.staging;
        let follows = staging.start_block + (staging.len as u64) / BLOCK == run.start;
        if staging.len > 0 && (!follows || staging.len + bytes > CHUNK_BYTES) {
            self.hand_on(sink)?;
        }
        let staging = &mut self.staging;
        if staging.len == 0 {
            staging.start_block = run.start;
        }
        let at = staging.len;
        match &file.source {
            Source::Bytes(data) => {
                let slot = &mut staging.buffer.as_mut_slice()[at..at + bytes];
                slot[..data.len()].copy_from_slice(data);
                slot[data.len()..].fill(0);
            }
            Source::Host(path) => {
                staging.reads.push(HostRead { at, len: bytes, path, size: file.size, range_start: None });
            }
            Source::HostRange { path, offset } => {
                staging.reads.push(HostRead { at, len: bytes, path, size: file.size, range_start: Some(*offset) });
            }
        }
        staging.len += bytes;
        Ok(true)
    }

    /// Writes everything staged and handed on, in order.
    pub(crate) fn flush(&mut self, sink: &mut dyn Sink) -> Result<()> {
        if self.staging.len > 0 {
            self.hand_on(sink)?;
        }
        while !self.pending.is_empty() {
            self.write_oldest(sink)?;
        }
        Ok(())
    }

    /// Hands the staged chunk to a reader (or reads it here when it has
    /// few host files or there is no core to spare), first writing the
    /// oldest chunk if every reader is busy, and starts a fresh one.
    fn hand_on(&mut self, sink: &mut dyn Sink) -> Result<()> {
        let buffer = self.spare.pop().unwrap_or_else(|| AlignedBuffer::new(CHUNK_BYTES));
        let mut chunk = std::mem::replace(&mut self.staging, Chunk::empty(buffer));
        if chunk.reads.len() < MIN_FILES_PER_READER || self.max_readers == 0 {
            let result = chunk.read();
            self.pending.push_back(Pending::Read(chunk, result));
        } else {
            if self.readers.len() < self.max_readers {
                self.start_reader();
            }
            let index = self.next_reader;
            self.next_reader = (index + 1) % self.readers.len();
            if self.readers[index].jobs.send(chunk).is_err() {
                return Err(reader_gone());
            }
            self.pending.push_back(Pending::WithReader(index));
        }
        // Each reader holds at most one chunk besides the one being staged here.
        while self.pending.len() > self.readers.len().max(1) {
            self.write_oldest(sink)?;
        }
        Ok(())
    }

    fn start_reader(&mut self) {
        let (jobs, job_queue) = channel::<Chunk<'t>>();
        let (done_queue, done) = channel();
        let image = self.image.clone();
        self.handles.push(self.scope.spawn(move || {
            for mut chunk in job_queue {
                let mut result = chunk.read();
                if let (Ok(()), Some(image)) = (&result, &image) {
                    let bytes = &chunk.buffer.as_slice()[..chunk.len];
                    result = write_nonzero(&mut FileSink::new(image), chunk.start_block * BLOCK, bytes)
                        .map_err(Error::Write);
                    chunk.written = true;
                }
                if done_queue.send((chunk, result)).is_err() {
                    return;
                }
            }
        }));
        self.readers.push(Reader { jobs, done });
    }

    fn write_oldest(&mut self, sink: &mut dyn Sink) -> Result<()> {
        let (chunk, result) = match self.pending.pop_front() {
            None => return Ok(()),
            Some(Pending::Read(chunk, result)) => (chunk, result),
            Some(Pending::WithReader(index)) => match self.readers[index].done.recv() {
                Ok(done) => done,
                Err(_) => return Err(reader_gone()),
            },
        };
        result?;
        if !chunk.written {
            let bytes = &chunk.buffer.as_slice()[..chunk.len];
            write_nonzero(sink, chunk.start_block * BLOCK, bytes).map_err(Error::Write)?;
        }
        self.spare.push(chunk.buffer);
        Ok(())
    }
}

impl Drop for DataWriter<'_, '_, '_> {
    /// Closes the readers' queues, so their threads end with the scope,
    /// and passes on a reader's panic.
    fn drop(&mut self) {
        self.readers.clear();
        for handle in self.handles.drain(..) {
            if let Err(panic) = handle.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
}

/// A reader thread ended without answering: only a panic does that, and
/// dropping the writer passes the panic on.
fn reader_gone() -> Error {
    Error::Write(io::Error::other("an ext4 data reader thread stopped"))
}

/// Fills each read's slot of `chunk` (its file's bytes, then zeros to the
/// block end), in chunk order, stopping at the first file that fails.
fn read_all(chunk: &mut [u8], reads: &[HostRead<'_>]) -> Result<()> {
    for read in reads {
        read_into(read, &mut chunk[read.at..read.at + read.len])?;
    }
    Ok(())
}

/// Reads the whole of `read.path` into the start of `slot` and zeros the
/// rest: `SourceChanged` if the file is no longer `read.size` bytes long.
/// One byte more than expected is asked for, so the common case is one
/// `read`: a regular file reads short only at its end.
fn read_into(read: &HostRead<'_>, slot: &mut [u8]) -> Result<()> {
    let path = read.path;
    let read_error = |source| Error::ReadSource { path: path.to_path_buf(), source };
    let size = read.size as usize;
    let file = File::open(path).map_err(read_error)?;
    if let Some(start) = read.range_start {
        // A range of a longer file: exactly its bytes must be there.
        let expected = start.saturating_add(read.size);
        let changed = || Error::SourceChanged { path: path.to_path_buf(), expected };
        let mut got = 0;
        while got < size {
            match file.read_at(&mut slot[got..size], start + got as u64) {
                Ok(0) => return Err(changed()),
                Ok(n) => got += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(read_error(error)),
            }
        }
        slot[size..].fill(0);
        return Ok(());
    }
    let changed = || Error::SourceChanged { path: path.to_path_buf(), expected: read.size };
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

    #[test]
    fn of_files_changed_in_chunks_read_by_the_readers_the_first_in_image_order_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = Ext4Tree::new();
        // 600 files of 4 KiB: three chunks, each with enough files for a reader.
        for index in 0..600 {
            let path = dir.path().join(format!("f{index:03}"));
            std::fs::write(&path, [index as u8 | 1; 4000]).unwrap();
            tree.add_file_from_path(&format!("f{index:03}"), &path, Metadata::default()).unwrap();
        }
        // One in the last chunk changes, then one in the second.
        std::fs::write(dir.path().join("f550"), [1u8; 10]).unwrap();
        std::fs::write(dir.path().join("f300"), [1u8; 10]).unwrap();
        let err = tree.layout(&Ext4Options::default()).unwrap().emit(&mut CountingSink::default()).unwrap_err();
        match err {
            Error::SourceChanged { path, .. } => assert_eq!(path, dir.path().join("f300")),
            other => panic!("expected SourceChanged, got {other}"),
        }
    }

    fn slot_after_reading(content: &[u8], expected: u64, slot_len: usize) -> Result<Vec<u8>> {
        let dir = tempfile::tempdir().map_err(Error::Write)?;
        let path = dir.path().join("file");
        std::fs::write(&path, content).map_err(Error::Write)?;
        let mut slot = vec![0xAAu8; slot_len];
        read_into(&HostRead { at: 0, len: slot_len, path: &path, size: expected, range_start: None }, &mut slot)?;
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
