//! kiln's example service: what a service sees inside the microVM. It
//! prints its arguments and `GREETING_STYLE` (both set by the service disk's
//! `launch` script), then reads the keystore: every file under
//! `/srv/keystore`, or under `$KEYSTORE_DIR` when that is set, printing each
//! file's name and length. It exits 0, or 1 if the keystore cannot be read.
//!
//! Std only and without dependencies, so it builds for any guest target.

use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const DEFAULT_KEYSTORE: &str = "/srv/keystore";

fn main() -> ExitCode {
    let args: Vec<String> = env::args_os().skip(1).map(|arg| arg.to_string_lossy().into_owned()).collect();
    println!("hello from kiln: args {args:?}");
    match env::var_os("GREETING_STYLE") {
        Some(style) => println!("GREETING_STYLE={}", style.to_string_lossy()),
        None => println!("GREETING_STYLE is not set"),
    }
    let keystore = env::var_os("KEYSTORE_DIR").map_or_else(|| PathBuf::from(DEFAULT_KEYSTORE), PathBuf::from);
    match list_files(&keystore) {
        Ok(files) => {
            println!("keystore {}: {} files", keystore.display(), files.len());
            for (path, len) in files {
                println!("  {} {len} bytes", path.strip_prefix(&keystore).unwrap_or(&path).display());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("cannot read keystore {}: {err}", keystore.display());
            ExitCode::FAILURE
        }
    }
}

/// Every file under `dir`, recursively, sorted, with its length. Each file
/// is read in full, so an unreadable key fails here rather than later.
fn list_files(dir: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current)? {
            let path = entry?.path();
            let meta = fs::metadata(&path)?;
            if meta.is_dir() {
                pending.push(path);
            } else {
                let len = fs::read(&path)?.len() as u64;
                files.push((path, len));
            }
        }
    }
    files.sort();
    Ok(files)
}
