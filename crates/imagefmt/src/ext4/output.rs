//! Where a planned ext4 image goes besides a raw file: straight into a
//! qcow2 container, with no raw copy in between.

use std::path::Path;

use super::Ext4Summary;
use super::layout::Ext4Layout;
use crate::Result;
use crate::qcow2::{Qcow2Writer, Unwritten};

impl Ext4Layout<'_> {
    /// Writes the image as a qcow2 file at `path`, atomically (temporary
    /// file, then rename), with the same mode rule as
    /// [`write_file`](Self::write_file). Only clusters holding non-zero
    /// bytes are allocated, so free space costs nothing; the guest reads
    /// every byte exactly as the raw image holds it, even over a backing
    /// file in `options`.
    pub fn write_qcow2_file(&self, path: &Path, options: &crate::Qcow2Options) -> Result<Ext4Summary> {
        let mode = crate::sink::image_mode(self.tree.is_secret());
        crate::sink::write_atomically(path, mode, |sink| {
            let size = self.geometry.image_bytes;
            let mut qcow2 = Qcow2Writer::new(sink.file(), size, options, Unwritten::ReadsAsZero)?;
            self.emit(&mut qcow2)
        })?;
        Ok(self.summary())
    }
}
