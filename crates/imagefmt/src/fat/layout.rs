//! Geometry and placement: everything about the image decided from metadata.
use std::path::Path;
use std::io::{Seek, Write};
use super::{FatOptions, FatSummary, FatTree};
use crate::Result;

/// A fully planned image: geometry, every name and every cluster chain.
/// Writing it only copies bytes.
#[derive(Debug)]
pub struct FatLayout<'t> {
    tree: &'t FatTree,
}

impl FatTree {
    /// Plans the image for `options`. Pure: reads no file contents.
    pub fn layout(&self, options: &FatOptions) -> Result<FatLayout<'_>> {
        let _ = options;
        todo!()
    }
}

impl FatLayout<'_> {
    /// What the image holds.
    pub fn summary(&self) -> FatSummary { todo!() }

    /// Writes the image to `out`, which must read as zeros (a new file or an
    /// empty buffer): regions that are zero in the image are skipped.
    pub fn write_to<W: Write + Seek>(&self, out: &mut W) -> Result<()> { let _ = out; todo!() }

    /// Writes the image to `path` atomically: into a temporary file in the
    /// same directory (mode 0600), then renamed over `path`. Mode 0600 stays
    /// for secret trees, others get 0644. File data moves with
    /// `copy_file_range`; `progress` is called with the data bytes written so far.
    pub fn write_file(&self, path: &Path, progress: Option<&mut dyn FnMut(u64)>) -> Result<FatSummary> {
        let _ = (path, progress, self.tree);
        todo!()
    }
}
