//! A host directory into an ext4 image through kiln-imagefmt's public API
//! alone, timing each phase: the profiling aid behind the ext4 data path
//! (`cargo xtask bench ext4` times the `kiln image ext4` command itself):
//!
//! ```text
//! ext4_from_dir OUT SRC_DIR [--size BYTES]
//! ```
//!
//! It walks SRC_DIR with std (entries in any order: the tree sorts them),
//! adds each directory, file and symlink with its host mode, owner and
//! modification time, writes OUT atomically and prints the summary as one
//! JSON line. The time each phase took goes to stderr.

use std::error::Error;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use kiln_imagefmt::{Ext4Options, Ext4Tree, Metadata};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let mut message = err.to_string();
            let mut source = err.source();
            while let Some(cause) = source {
                message += &format!(": {cause}");
                source = cause.source();
            }
            eprintln!("ext4_from_dir: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (out, src, size) = match args.as_slice() {
        [out, src] => (out, src, None),
        [out, src, flag, size] if flag == "--size" => {
            (out, src, Some(size.parse::<u64>().map_err(|err| format!("invalid --size {size:?}: {err}"))?))
        }
        _ => return Err("usage: ext4_from_dir OUT SRC_DIR [--size BYTES]".into()),
    };
    let started = Instant::now();
    let mut tree = Ext4Tree::new();
    add_dir(&mut tree, Path::new(src), "")?;
    let walked = Instant::now();
    let layout = tree.layout(&Ext4Options::default().with_size(size))?;
    let planned = Instant::now();
    let summary = layout.write_file(Path::new(out))?;
    let written = Instant::now();
    eprintln!(
        "walk {:.0} ms, layout {:.0} ms, write {:.0} ms",
        (walked - started).as_secs_f64() * 1000.0,
        (planned - walked).as_secs_f64() * 1000.0,
        (written - planned).as_secs_f64() * 1000.0,
    );
    println!(
        "{{\"image_bytes\":{},\"blocks\":{},\"inodes\":{},\"files\":{},\"dirs\":{},\"data_bytes\":{}}}",
        summary.image_bytes, summary.blocks, summary.inodes, summary.files, summary.dirs, summary.data_bytes
    );
    Ok(())
}

fn metadata_of(host: &fs::Metadata) -> Metadata {
    Metadata::default()
        .with_mode(host.mode() & 0o7777)
        .with_owner(host.uid(), host.gid())
        .with_mtime(host.mtime(), host.mtime_nsec() as u32)
}

/// Adds `dir`'s entries under `dest` (`""` is the root), recursively.
fn add_dir(tree: &mut Ext4Tree, dir: &Path, dest: &str) -> Result<(), Box<dyn Error>> {
    tree.add_dir(dest, metadata_of(&fs::metadata(dir)?))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().into_string().map_err(|name| format!("non-UTF-8 name {name:?}"))?;
        let child = if dest.is_empty() { name } else { format!("{dest}/{name}") };
        let host = entry.metadata()?;
        let kind = host.file_type();
        if kind.is_dir() {
            add_dir(tree, &entry.path(), &child)?;
        } else if kind.is_file() {
            tree.add_file_from_path(&child, entry.path(), metadata_of(&host))?;
        } else if kind.is_symlink() {
            let target = fs::read_link(entry.path())?;
            let target = target.to_str().ok_or_else(|| format!("non-UTF-8 link target {}", target.display()))?;
            tree.add_symlink(&child, target, metadata_of(&host))?;
        } else {
            return Err(format!("{}: not a directory, file or symlink", entry.path().display()).into());
        }
    }
    Ok(())
}
