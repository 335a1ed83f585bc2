//! Free space kept while a layer is decompressed into the store.

use std::io::{self, Write};
use std::path::PathBuf;

/// Free space a layer's decompression must leave on the store's filesystem:
/// a small hostile blob (gzip reaches 1000:1) must not fill the disk that
/// holds the VMs' data disks and records.
pub(crate) const MIN_FREE_BYTES: u64 = 1 << 30;
/// Bytes written between two looks at the free space.
const HEADROOM_CHECK_BYTES: u64 = 64 << 20;

/// A decompressed layer's file: stops with `StorageFull` before the
/// filesystem would keep less than `min_free` bytes.
pub(crate) struct Headroom<W> {
    pub(crate) inner: W,
    pub(crate) dir: PathBuf,
    pub(crate) unchecked: u64,
    /// [`MIN_FREE_BYTES`], but for tests.
    pub(crate) min_free: u64,
}

impl<W: Write> Write for Headroom<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.unchecked >= HEADROOM_CHECK_BYTES {
            self.unchecked = 0;
            let stat = rustix::fs::statvfs(&self.dir)?;
            if stat.f_bavail.saturating_mul(stat.f_frsize) < self.min_free {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!(
                        "it decompresses to more than the image store's filesystem can hold with {} bytes left free",
                        self.min_free
                    ),
                ));
            }
        }
        let written = self.inner.write(buf)?;
        self.unchecked += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decompression_stops_before_the_filesystem_keeps_less_than_the_minimum_free() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = vec![0u8; 1 << 20];
        let write = |min_free: u64| -> io::Result<()> {
            let mut room = Headroom { inner: io::sink(), dir: dir.path().to_path_buf(), unchecked: 0, min_free };
            for _ in 0..(HEADROOM_CHECK_BYTES >> 20) + 2 {
                room.write_all(&chunk)?;
            }
            Ok(())
        };
        assert!(write(0).is_ok());
        assert_eq!(write(u64::MAX).unwrap_err().kind(), io::ErrorKind::StorageFull);
    }
}
