//! `kiln image ext4`: an ext4 filesystem from host files and directories,
//! with their POSIX metadata, written raw or as qcow2.

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use kiln_imagefmt::{Ext4Options, Ext4Summary, Ext4Tree, Qcow2Options};
use serde::Serialize;

use super::info::uuid_text;
use super::{
    DiskFormat, OutputArgs, container_note, count, elapsed_ms, human_bytes, parse_size_arg, print_report,
    source_placement, written_file,
};

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
    /// A writable disk: a journal, and inodes for the size as mke2fs gives them.
    #[arg(long)]
    journal: bool,
    /// Filesystem UUID, as 8-4-4-4-12 hex digits [default: derived from the content].
    #[arg(long, value_parser = parse_uuid)]
    uuid: Option<[u8; 16]>,
    /// DIR (its contents go to the root), FILE (to the root under its name)
    /// or DEST=PATH (PATH placed at DEST).
    #[arg(value_name = "SRC", required = true)]
    sources: Vec<std::ffi::OsString>,
}

pub(super) fn image_ext4(args: Ext4Args, started: Instant) -> anyhow::Result<()> {
    let mut tree = Ext4Tree::new();
    for source in &args.sources {
        let (dest, path) = source_placement(source)?;
        add_host_path(&mut tree, dest, path)?;
    }
    let epoch = epoch_override(&args.output)?;
    tree.set_epoch(epoch).with_context(|| match (args.output.epoch, epoch) {
        (None, Some(_)) => "SOURCE_DATE_EPOCH is a time ext4 cannot hold".to_owned(),
        _ => "--epoch is a time ext4 cannot hold".to_owned(),
    })?;
    let mut options = Ext4Options::default().with_size(args.size).with_uuid(args.uuid).with_journal(args.journal);
    options.label = args.label;
    let path = &args.output.output;
    let layout = tree.layout(&options)?;
    let summary = match args.format {
        DiskFormat::Raw => layout.write_file(path)?,
        DiskFormat::Qcow2 => layout.write_qcow2_file(path, &Qcow2Options::default())?,
    };
    let written = Written { path, format: args.format, file: written_file(path)?, elapsed_ms: elapsed_ms(started) };
    let report = Report::new(&written, &summary);
    print_report(args.output.json, &report, Report::human)
}

/// The time stamped on every entry instead of its own: `--epoch`, else
/// `SOURCE_DATE_EPOCH` when set, else none (each entry keeps its mtime).
/// A `SOURCE_DATE_EPOCH` that is not a number is an error, not ignored:
/// the build would silently stop being reproducible.
fn epoch_override(output: &OutputArgs) -> anyhow::Result<Option<i64>> {
    if let Some(epoch) = output.epoch {
        return Ok(Some(epoch));
    }
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(value) => match value.trim().parse() {
            Ok(seconds) => Ok(Some(seconds)),
            Err(_) => anyhow::bail!("SOURCE_DATE_EPOCH={value:?} is not a whole number of seconds"),
        },
        Err(_) => Ok(None),
    }
}

/// Adds `src` at `dest` as `cp -a` copies it (modes, owners, nanosecond
/// times, symlinks, hard links, devices, FIFOs, xattrs, holes), except that
/// `src` itself is followed when it is a symlink, as a command-line path.
fn add_host_path(tree: &mut Ext4Tree, dest: &str, src: &Path) -> anyhow::Result<()> {
    let resolved;
    let src = if fs::symlink_metadata(src).is_ok_and(|meta| meta.file_type().is_symlink()) {
        resolved = fs::canonicalize(src).with_context(|| format!("Cannot follow the symlink {}", src.display()))?;
        &resolved
    } else {
        src
    };
    tree.add_host_path(dest, src)?;
    Ok(())
}

/// `--uuid`: 32 hex digits, dashes anywhere ignored (the 8-4-4-4-12 form
/// `blkid` prints is the usual one).
fn parse_uuid(input: &str) -> Result<[u8; 16], String> {
    let digits: Vec<u8> = input.bytes().filter(|&b| b != b'-').collect();
    let invalid = || format!("{input:?} is not a UUID (32 hex digits, as in 0123abcd-4567-89ab-cdef-0123456789ab)");
    // from_str_radix alone would take a `+` sign.
    if digits.len() != 32 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(invalid());
    }
    let mut uuid = [0u8; 16];
    for (byte, pair) in uuid.iter_mut().zip(digits.chunks(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| invalid())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
    }
    Ok(uuid)
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
    hardlinks: u64,
    specials: u64,
    data_bytes: u64,
    journal_blocks: u64,
    uuid: String,
    elapsed_ms: u64,
    mode: String,
}

/// What writing gave: the file, its container, its length and mode, the time.
struct Written<'p> {
    path: &'p Path,
    format: DiskFormat,
    file: (u64, u32),
    elapsed_ms: u64,
}

impl Report {
    fn new(written: &Written<'_>, summary: &Ext4Summary) -> Report {
        let (file_bytes, mode) = written.file;
        Report {
            path: written.path.display().to_string(),
            format: written.format.name(),
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
            hardlinks: summary.hardlinks,
            specials: summary.specials,
            data_bytes: summary.data_bytes,
            journal_blocks: summary.journal_blocks,
            uuid: uuid_text(&summary.uuid),
            elapsed_ms: written.elapsed_ms,
            mode: format!("{mode:04o}"),
        }
    }

    fn human(&self) -> String {
        let journal = match self.journal_blocks {
            0 => String::new(),
            blocks => format!(", {} journal", human_bytes(blocks * u64::from(self.block_size))),
        };
        let container = container_note(self.format, self.file_bytes);
        format!(
            "Wrote {}: ext4 {}{container}{journal}, {}, {}, {}, {} of data, {} of {} blocks free, UUID {}, mode {}, {} ms",
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
