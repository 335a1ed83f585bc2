//! The reference design's way of building a service disk, kept as the peer
//! that `cargo xtask bench fat` times kiln against:
//!
//! ```text
//! fatfs_reference OUT SIZE_BYTES SRC_DIR
//! ```
//!
//! It creates OUT at SIZE_BYTES, formats it with `fatfs::format_volume`
//! (label `SERVICEDISK`), then walks SRC_DIR creating every directory and
//! file through the `fatfs` crate and copying data with `std::io::copy`.
//!
//! The image file is wrapped in `fscommon::BufStream`, because that is how
//! fatfs 0.3.6's own README and examples (`mkfatfs.rs`, `write.rs`) drive it;
//! a bare `File` would turn every FAT access into a syscall and make the peer
//! look slower than its authors intend it to be used.
//!
//! This is a benchmark peer, not a model: the images it makes have `.`/`..`
//! entries that `fsck.fat` rejects (see FACTS: fatfs `create_dir`).

use std::error::Error;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use fatfs::{FileSystem, FormatVolumeOptions, FsOptions};
use fscommon::BufStream;

type Image = BufStream<File>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fatfs_reference: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, size, src] = args.as_slice() else {
        return Err("usage: fatfs_reference OUT SIZE_BYTES SRC_DIR".into());
    };
    let size: u64 = size.parse().map_err(|err| format!("invalid SIZE_BYTES {size:?}: {err}"))?;
    let src = PathBuf::from(src);
    if !src.is_dir() {
        return Err(format!("{} is not a directory", src.display()).into());
    }

    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(out)?;
    file.set_len(size)?;
    let mut image = BufStream::new(file);
    fatfs::format_volume(&mut image, FormatVolumeOptions::new().volume_label(*b"SERVICEDISK"))?;
    // format_volume leaves the stream where it stopped; FileSystem::new reads from the start.
    io::Seek::seek(&mut image, io::SeekFrom::Start(0))?;
    let filesystem = FileSystem::new(image, FsOptions::new())?;
    copy_dir(&src, &filesystem.root_dir())?;
    filesystem.unmount()?;
    Ok(())
}

fn copy_dir(src: &Path, dest: &fatfs::Dir<'_, Image>) -> Result<(), Box<dyn Error>> {
    let mut entries: Vec<_> = fs::read_dir(src)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let name = entry.file_name().into_string().map_err(|name| format!("non-UTF-8 name {name:?}"))?;
        let path = entry.path();
        if fs::metadata(&path)?.is_dir() {
            copy_dir(&path, &dest.create_dir(&name)?)?;
        } else {
            let mut from = File::open(&path)?;
            let mut to = dest.create_file(&name)?;
            io::copy(&mut from, &mut to)?;
        }
    }
    Ok(())
}
