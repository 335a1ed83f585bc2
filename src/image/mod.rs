//! `kiln image ...`: one module per kind of image, plus what they share
//! (output options, sizes, reports). Every command that writes does so
//! through kiln-imagefmt's atomic writers, so a failure leaves nothing behind.

mod ext4;
mod fat;
mod info;
mod initramfs;
mod oci;
mod qcow2;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use kiln::parse_size;
use kiln_imagefmt::FatOptions;
use serde::Serialize;

#[derive(Debug, Subcommand)]
pub(crate) enum ImageCommand {
    /// Build a FAT image from host files and directories.
    Fat(fat::FatArgs),
    /// Build an ext4 filesystem from host files and directories, with their POSIX metadata.
    Ext4(ext4::Ext4Args),
    /// Build a cloud-init NoCloud seed (label CIDATA).
    Cidata(fat::CidataArgs),
    /// Build a service disk (label SERVICEDISK): binary, launch script, extra trees.
    ServiceDisk(fat::ServiceDiskArgs),
    /// Create or convert qcow2 disk images.
    #[command(subcommand)]
    Qcow2(qcow2::Qcow2Command),
    /// Build a newc cpio initramfs from a directory.
    Initramfs(initramfs::InitramfsArgs),
    /// Identify an image (FAT, ext2/3/4, qcow2, cpio) and summarise it.
    Info(info::InfoArgs),
    /// Pull, inspect and convert OCI container images, as `kiln run` does.
    #[command(subcommand)]
    Oci(oci::OciCommand),
}

pub(crate) fn run(command: ImageCommand) -> anyhow::Result<()> {
    let started = Instant::now();
    match command {
        ImageCommand::Fat(args) => fat::image_fat(args, started),
        ImageCommand::Ext4(args) => ext4::image_ext4(args, started),
        ImageCommand::Cidata(args) => fat::image_cidata(args, started),
        ImageCommand::ServiceDisk(args) => fat::image_service_disk(args, started),
        ImageCommand::Qcow2(qcow2::Qcow2Command::Create(args)) => qcow2::create(args, started),
        ImageCommand::Qcow2(qcow2::Qcow2Command::Convert(args)) => qcow2::convert(args, started),
        ImageCommand::Initramfs(args) => initramfs::initramfs(args, started),
        ImageCommand::Info(args) => info::info(args),
        ImageCommand::Oci(command) => oci::run(command),
    }
}

/// What every command that builds an image from a tree shares.
#[derive(Debug, Args)]
struct OutputArgs {
    /// The image file to write (replaced atomically).
    #[arg(short, long, value_name = "OUT")]
    output: std::path::PathBuf,
    /// Timestamp for every entry, in seconds since 1970 [default: SOURCE_DATE_EPOCH, else 0;
    /// for ext4, else each entry's own time].
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    epoch: Option<i64>,
    /// Print one JSON object describing the image instead of a summary line.
    #[arg(long)]
    json: bool,
}

impl OutputArgs {
    /// `--epoch`, else `SOURCE_DATE_EPOCH`, else 0 (the rule FatOptions implements).
    fn epoch(&self) -> i64 {
        self.epoch.unwrap_or_else(|| FatOptions::default().epoch)
    }
}

/// A disk image's container format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
enum DiskFormat {
    /// The bytes of the disk, as they are.
    #[default]
    Raw,
    /// QEMU's copy-on-write format: only clusters holding data take space.
    Qcow2,
}

impl DiskFormat {
    fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

fn parse_size_arg(input: &str) -> Result<u64, String> {
    parse_size(input).map_err(|err| err.to_string())
}

/// `--cluster-size`: a size like `64K`; kiln-imagefmt checks it is a power of two in range.
fn parse_cluster_size_arg(input: &str) -> Result<u32, String> {
    let bytes = parse_size_arg(input)?;
    u32::try_from(bytes).map_err(|_| format!("cluster size {input:?} ({bytes} bytes) is far above qcow2's 2 MiB"))
}

/// Prints `report` as one line of JSON, or its human summary.
fn print_report<R: Serialize>(json: bool, report: &R, human: impl FnOnce(&R) -> String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{}", human(report));
    }
    Ok(())
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// A FAT volume id as `1A2B-3C4D`, the way `dir` and `blkid` show it.
fn volume_id(id: u32) -> String {
    format!("{:04X}-{:04X}", id >> 16, id & 0xffff)
}

/// Where one `SRC` of `kiln image fat` or `ext4` goes: `DEST=PATH` puts
/// `PATH` at `DEST`, a `DIR` its contents at the root (`""`), a `FILE` at
/// the root under its own name. A host path that happens to contain `=`
/// is a path, not `DEST=PATH`.
fn source_placement(source: &OsStr) -> anyhow::Result<(&str, &Path)> {
    let path = Path::new(source);
    let exists = path.try_exists().unwrap_or(false);
    if let (false, Some(at)) = (exists, source.as_bytes().iter().position(|&b| b == b'=')) {
        let (dest, host) = source.as_bytes().split_at(at);
        let Ok(dest) = std::str::from_utf8(dest) else {
            bail!("The destination in {source:?} is not valid UTF-8");
        };
        return Ok((dest, Path::new(OsStr::from_bytes(&host[1..]))));
    }
    if std::fs::metadata(path).is_ok_and(|meta| meta.is_dir()) {
        return Ok(("", path));
    }
    // A file (or a path that does not resolve, which the writer reports).
    let Some(name) = path.file_name() else {
        bail!("{} has no file name to use in the image; write DEST={}", path.display(), path.display());
    };
    let Some(name) = name.to_str() else {
        bail!("The name of {} is not valid UTF-8; write DEST=PATH with a UTF-8 DEST", path.display());
    };
    Ok((name, path))
}

/// The written image file's length and permission bits, for the report.
fn written_file(path: &Path) -> anyhow::Result<(u64, u32)> {
    let meta = std::fs::metadata(path).with_context(|| format!("Cannot read back {}", path.display()))?;
    Ok((meta.len(), meta.permissions().mode() & 0o7777))
}

/// The summary line's note on the container: nothing for raw.
fn container_note(format: &str, file_bytes: u64) -> String {
    match format {
        "raw" => String::new(),
        other => format!(" as {other} ({} file)", human_bytes(file_bytes)),
    }
}
