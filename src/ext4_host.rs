//! Host directories into an [`Ext4Tree`], for `kiln image ext4` and the
//! data disk's `resources.storage_seed`.
//!
//! A stand-in written with std against the tree's entry API until
//! kiln-imagefmt's own host walk (`Ext4Tree::add_host_path`, with
//! hardlinks, devices, xattrs and holes) lands: until then a hardlinked
//! file is stored once per name, and sockets, FIFOs and devices are refused.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_imagefmt::{Ext4Tree, Metadata};

use crate::{Error, Result};

/// Puts host path `src` at `dest` (`""` is the root) with its mode, owner
/// and mtime, or `epoch` as every entry's time: a directory with everything
/// under it, symlinks inside kept as symlinks; `src` itself is followed if
/// it is a symlink. Errors name the host path at fault.
pub fn add_host_path_to_ext4(tree: &mut Ext4Tree, dest: &str, src: &Path, epoch: Option<i64>) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::InputIo { path, source }
    };
    let meta = fs::metadata(src).map_err(io(src))?;
    let mut stack: Vec<(String, PathBuf, fs::Metadata)> = vec![(dest.to_owned(), src.to_path_buf(), meta)];
    while let Some((dest, src, meta)) = stack.pop() {
        let entry = entry_meta(&meta, epoch);
        let kind = meta.file_type();
        if kind.is_dir() {
            tree.add_dir(&dest, entry)?;
            let mut children = Vec::new();
            for child in fs::read_dir(&src).map_err(io(&src))? {
                let path = child.map_err(io(&src))?.path();
                let name = path.file_name().and_then(|name| name.to_str()).map(str::to_owned);
                let Some(name) = name else {
                    let reason = "the name is not valid UTF-8".to_owned();
                    return Err(
                        kiln_imagefmt::Error::InvalidExt4Entry { path: path.display().to_string(), reason }.into()
                    );
                };
                let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
                let child_dest = if dest.is_empty() { name } else { format!("{dest}/{name}") };
                children.push((child_dest, path, meta));
            }
            // Popped in name order, so the first error is the one `ls` shows first.
            children.sort_by(|a, b| b.0.cmp(&a.0));
            stack.extend(children);
        } else if kind.is_file() {
            tree.add_file_from_path(&dest, &src, entry)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&src).map_err(io(&src))?;
            let Some(target) = target.to_str() else {
                let reason = "the symlink's target is not valid UTF-8".to_owned();
                return Err(kiln_imagefmt::Error::InvalidExt4Entry { path: src.display().to_string(), reason }.into());
            };
            tree.add_symlink(&dest, target, entry)?;
        } else {
            return Err(kiln_imagefmt::Error::UnsupportedFileType { path: src, kind: "socket, FIFO or device" }.into());
        }
    }
    Ok(())
}

/// A host entry's metadata as the image stores it.
fn entry_meta(meta: &fs::Metadata, epoch: Option<i64>) -> Metadata {
    let (seconds, nanoseconds) = match epoch {
        Some(epoch) => (epoch, 0),
        None => (meta.mtime(), u32::try_from(meta.mtime_nsec()).unwrap_or(0)),
    };
    Metadata::default()
        .with_mode(meta.mode() & 0o7777)
        .with_owner(meta.uid(), meta.gid())
        .with_mtime(seconds, nanoseconds)
}
