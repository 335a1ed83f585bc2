//! `kiln image ext4`: an ext4 filesystem from host files and directories,
//! with their POSIX metadata, written raw or as qcow2.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use kiln_imagefmt::{Ext4Options, Ext4Summary, Ext4Tree, Metadata, Qcow2Options};
use serde::Serialize;

use super::{DiskFormat, OutputArgs, count, elapsed_ms, human_bytes, parse_size_arg, print_report};

#[derive(Debug, Args)]
pub(crate) struct Ext4Args {
    #[command(flatten)]
    output: OutputArgs,
    /// Container format of the image file.
    #[arg(long, value_enum, default_value_t = DiskFormat::Raw)]
    format: DiskFormat,
    /// Volume label (up to 16 bytes).
    #[arg(long)]
    label: Option<String>,
    /// Filesystem size, e.g. 64MiB, a multiple of 4 KiB [default: content plus headroom].
    #[arg(long, value_parser = parse_size_arg)]
    size: Option<u64>,
    /// Filesystem UUID, as 8-4-4-4-12 hex digits [default: derived from the content].
    #[arg(long, value_parser = parse_uuid)]
    uuid: Option<[u8; 16]>,
    /// DIR (its contents go to the root), FILE (to the root under its name)
    /// or DEST=PATH (PATH placed at DEST).
    #[arg(value_name = "SRC", required = true)]
    sources: Vec<std::ffi::OsString>,
}

pub(super) fn image_ext4(args: Ext4Args, started: Instant) -> anyhow::Result<()> {
    let epoch = epoch_override(&args.output);
    let mut tree = Ext4Tree::new();
    for source in &args.sources {
        add_source(&mut tree, source, epoch)?;
    }
    let mut options = Ext4Options::default().with_size(args.size).with_uuid(args.uuid);
    options.label = args.label;
    let path = &args.output.output;
    let layout = tree.layout(&options)?;
    let summary = match args.format {
        DiskFormat::Raw => layout.write_file(path)?,
        DiskFormat::Qcow2 => layout.write_qcow2_file(path, &Qcow2Options::default())?,
    };
    let meta = fs::metadata(path).with_context(|| format!("Cannot read back {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o7777;
    let report = Report::new(path, args.format, &summary, meta.len(), mode, elapsed_ms(started));
    print_report(args.output.json, &report, Report::human)
}

/// The time stamped on every entry instead of its own: `--epoch`, else
/// `SOURCE_DATE_EPOCH` when set, else none (each entry keeps its mtime).
fn epoch_override(output: &OutputArgs) -> Option<i64> {
    output.epoch.or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok()?.trim().parse().ok())
}

/// Adds one SRC: `DIR`, `FILE` or `DEST=PATH`, as `kiln image fat` reads them.
fn add_source(tree: &mut Ext4Tree, source: &OsStr, epoch: Option<i64>) -> anyhow::Result<()> {
    let path = Path::new(source);
    // A host path that happens to contain `=` is a path, not DEST=PATH.
    let exists = path.try_exists().unwrap_or(false);
    if let (false, Some(at)) = (exists, source.as_bytes().iter().position(|&b| b == b'=')) {
        let (dest, host) = source.as_bytes().split_at(at);
        let Ok(dest) = std::str::from_utf8(dest) else {
            bail!("The destination in {source:?} is not valid UTF-8");
        };
        return add_host_path(tree, dest, Path::new(OsStr::from_bytes(&host[1..])), epoch);
    }
    if fs::metadata(path).is_ok_and(|meta| meta.is_dir()) {
        return add_host_path(tree, "", path, epoch);
    }
    let Some(name) = path.file_name() else {
        bail!("{} has no file name to use in the image; write DEST={}", path.display(), path.display());
    };
    let Some(name) = name.to_str() else {
        bail!("The name of {} is not valid UTF-8; write DEST=PATH with a UTF-8 DEST", path.display());
    };
    add_host_path(tree, name, path, epoch)
}

/// Puts host path `src` at `dest` with its mode, owner and mtime (or
/// `epoch`): a directory with everything under it, symlinks inside kept as
/// symlinks; `src` itself is followed if it is a symlink.
///
/// Written with std against the tree's entry API until kiln-imagefmt's own
/// host walk (`Ext4Tree::add_host_path`: hardlinks, devices, xattrs, holes)
/// lands; until then a hardlinked file is stored once per name.
fn add_host_path(tree: &mut Ext4Tree, dest: &str, src: &Path, epoch: Option<i64>) -> anyhow::Result<()> {
    let meta = fs::metadata(src).with_context(|| format!("Cannot read {}", src.display()))?;
    let mut stack: Vec<(String, PathBuf, fs::Metadata)> = vec![(dest.to_owned(), src.to_path_buf(), meta)];
    while let Some((dest, src, meta)) = stack.pop() {
        let entry = entry_meta(&meta, epoch);
        let kind = meta.file_type();
        if kind.is_dir() {
            tree.add_dir(&dest, entry)?;
            let mut children = Vec::new();
            for child in fs::read_dir(&src).with_context(|| format!("Cannot list {}", src.display()))? {
                let child = child.with_context(|| format!("Cannot list {}", src.display()))?;
                let path = child.path();
                let Some(name) = child.file_name().to_str().map(str::to_owned) else {
                    bail!("The name of {} is not valid UTF-8; ext4 entries here are UTF-8", path.display());
                };
                let meta = fs::symlink_metadata(&path).with_context(|| format!("Cannot read {}", path.display()))?;
                children.push((join_dest(&dest, &name), path, meta));
            }
            // Popped in name order, so errors come in the order `ls` shows.
            children.sort_by(|a, b| b.0.cmp(&a.0));
            stack.extend(children);
        } else if kind.is_file() {
            tree.add_file_from_path(&dest, &src, entry)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&src).with_context(|| format!("Cannot read the symlink {}", src.display()))?;
            let Some(target) = target.to_str() else {
                bail!("The target of the symlink {} is not valid UTF-8", src.display());
            };
            tree.add_symlink(&dest, target, entry)?;
        } else {
            bail!(
                "{} is a socket, FIFO or device; this kiln stores only files, directories and symlinks in ext4",
                src.display()
            );
        }
    }
    Ok(())
}

fn join_dest(parent: &str, name: &str) -> String {
    if parent.is_empty() { name.to_owned() } else { format!("{parent}/{name}") }
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

/// `--uuid`: 32 hex digits, dashes anywhere ignored (the 8-4-4-4-12 form
/// `blkid` prints is the usual one).
fn parse_uuid(input: &str) -> Result<[u8; 16], String> {
    let digits: Vec<u8> = input.bytes().filter(|&b| b != b'-').collect();
    let invalid = || format!("{input:?} is not a UUID (32 hex digits, as in 0123abcd-4567-89ab-cdef-0123456789ab)");
    if digits.len() != 32 {
        return Err(invalid());
    }
    let mut uuid = [0u8; 16];
    for (byte, pair) in uuid.iter_mut().zip(digits.chunks(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| invalid())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
    }
    Ok(uuid)
}

/// The UUID in the 8-4-4-4-12 form.
fn uuid_text(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// The `--json` summary: one object, documented in docs/cli.md.
#[derive(Debug, Serialize)]
struct Report {
    path: String,
    format: &'static str,
    image_bytes: u64,
    file_bytes: u64,
    block_size: u32,
    blocks: u64,
    free_blocks: u64,
    inodes: u32,
    free_inodes: u32,
    groups: u32,
    files: u64,
    dirs: u64,
    symlinks: u64,
    data_bytes: u64,
    uuid: String,
    elapsed_ms: u64,
    mode: String,
}

impl Report {
    fn new(
        path: &Path,
        format: DiskFormat,
        summary: &Ext4Summary,
        file_bytes: u64,
        mode: u32,
        elapsed_ms: u64,
    ) -> Report {
        Report {
            path: path.display().to_string(),
            format: format.name(),
            image_bytes: summary.image_bytes,
            file_bytes,
            block_size: summary.block_size,
            blocks: summary.blocks,
            free_blocks: summary.free_blocks,
            inodes: summary.inodes,
            free_inodes: summary.free_inodes,
            groups: summary.groups,
            files: summary.files,
            dirs: summary.dirs,
            symlinks: summary.symlinks,
            data_bytes: summary.data_bytes,
            uuid: uuid_text(&summary.uuid),
            elapsed_ms,
            mode: format!("{mode:04o}"),
        }
    }

    fn human(&self) -> String {
        let container = match self.format {
            "raw" => String::new(),
            other => format!(" as {other} ({} file)", human_bytes(self.file_bytes)),
        };
        format!(
            "Wrote {}: ext4 {}{container}, {}, {}, {}, {} of data, {} of {} blocks free, UUID {}, mode {}, {} ms",
            self.path,
            human_bytes(self.image_bytes),
            count(self.files, "file", "files"),
            count(self.dirs, "directory", "directories"),
            count(self.symlinks, "symlink", "symlinks"),
            human_bytes(self.data_bytes),
            self.free_blocks,
            self.blocks,
            self.uuid,
            self.mode,
            self.elapsed_ms,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_uuid_reads_the_blkid_form_and_refuses_anything_else() {
        let uuid = parse_uuid("0123abcd-4567-89ab-cdef-0123456789ab").unwrap();
        assert_eq!(uuid_text(&uuid), "0123abcd-4567-89ab-cdef-0123456789ab");
        assert_eq!(parse_uuid("0123ABCD456789abcdef0123456789ab").unwrap(), uuid);
        for bad in ["", "0123abcd", "0123abcd-4567-89ab-cdef-0123456789zz", "0123abcd-4567-89ab-cdef-0123456789abcd"] {
            assert!(parse_uuid(bad).unwrap_err().contains("is not a UUID"), "{bad:?}");
        }
    }
}
