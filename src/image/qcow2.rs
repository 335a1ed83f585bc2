//! `kiln image qcow2 create|convert`: qcow2 disks written in-process, no qemu-img.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use kiln_imagefmt::{ImageInfo, Qcow2Options, Qcow2Summary, convert_to_qcow2, create_qcow2, inspect};
use serde::Serialize;

use super::{DiskFormat, count, elapsed_ms, human_bytes, parse_cluster_size_arg, parse_size_arg, print_report};

/// The first four bytes of every qcow2 image: "QFI\xfb".
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

#[derive(Debug, Subcommand)]
pub(crate) enum Qcow2Command {
    /// Create an empty (sparse) qcow2 image, optionally over a backing file.
    Create(CreateArgs),
    /// Convert a raw image to qcow2, allocating only clusters that hold data.
    Convert(ConvertArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// The qcow2 image to write (replaced atomically).
    #[arg(value_name = "OUT")]
    output: PathBuf,
    /// Virtual disk size, e.g. 20GiB [default with --backing: the backing file's size].
    #[arg(long, value_parser = parse_size_arg, required_unless_present = "backing")]
    size: Option<u64>,
    /// Bytes per cluster: a power of two from 512 to 2MiB, e.g. 64K [default: 64K].
    #[arg(long, value_name = "SIZE", value_parser = parse_cluster_size_arg)]
    cluster_size: Option<u32>,
    /// A file this image is a thin layer over: clusters never written read
    /// from it. Stored as given; a relative path is relative to OUT's directory.
    #[arg(long, value_name = "FILE")]
    backing: Option<PathBuf>,
    /// The backing file's format [default: detected from its first bytes].
    #[arg(long, value_enum, requires = "backing")]
    backing_format: Option<DiskFormat>,
    /// Print one JSON object describing the image instead of a summary line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ConvertArgs {
    /// The raw image to read; its length is the virtual size.
    #[arg(value_name = "IN")]
    input: PathBuf,
    /// The qcow2 image to write (replaced atomically).
    #[arg(value_name = "OUT")]
    output: PathBuf,
    /// Bytes per cluster: a power of two from 512 to 2MiB, e.g. 64K [default: 64K].
    #[arg(long, value_name = "SIZE", value_parser = parse_cluster_size_arg)]
    cluster_size: Option<u32>,
    /// Print one JSON object describing the image instead of a summary line.
    #[arg(long)]
    json: bool,
}

pub(super) fn create(args: CreateArgs, started: Instant) -> anyhow::Result<()> {
    let mut options = options(args.cluster_size);
    let mut backing_size = None;
    if let Some(backing) = &args.backing {
        let Some(name) = backing.to_str() else {
            bail!("The backing file name {} is not valid UTF-8, which qcow2 requires", backing.display());
        };
        let probed = probe_backing(&args.output, backing, args.backing_format)?;
        options.backing_file = Some(name.to_owned());
        options.backing_format = Some(probed.format.name().to_owned());
        backing_size = Some(probed.virtual_size);
    }
    let summary = match (args.size, backing_size) {
        (Some(size), _) => create_qcow2(&args.output, size, &options)?,
        (None, Some(size)) => create_qcow2(&args.output, size, &options).map_err(|err| {
            // The size came from the backing file: say so.
            let backing = args.backing.as_deref().unwrap_or(Path::new("")).display();
            explain_size(err, || format!("The size of backing file {backing} cannot be the image's size; give --size"))
        })?,
        // clap requires --size unless --backing is given.
        (None, None) => bail!("--size is required without --backing"),
    };
    let report = Report::new(&args.output, &summary, &options, elapsed_ms(started));
    print_report(args.json, &report, Report::human)
}

pub(super) fn convert(args: ConvertArgs, started: Instant) -> anyhow::Result<()> {
    if read_magic(&args.input).with_context(|| format!("Cannot read {}", args.input.display()))? == QCOW2_MAGIC {
        bail!("{} is already a qcow2 image; `kiln image qcow2 convert` reads raw images", args.input.display());
    }
    let options = options(args.cluster_size);
    let summary = convert_to_qcow2(&args.input, &args.output, &options).map_err(|err| {
        // The size is the input's length: say whose.
        explain_size(err, || {
            format!("Cannot convert {} to qcow2: its length is not a valid disk size", args.input.display())
        })
    })?;
    let report = Report::new(&args.output, &summary, &options, elapsed_ms(started));
    print_report(args.json, &report, Report::human)
}

/// Puts `context` above an invalid-size error, whose message names only the number.
fn explain_size(err: kiln_imagefmt::Error, context: impl FnOnce() -> String) -> anyhow::Error {
    match err {
        kiln_imagefmt::Error::InvalidSize { .. } => anyhow::Error::new(err).context(context()),
        other => other.into(),
    }
}

fn options(cluster_size: Option<u32>) -> Qcow2Options {
    let defaults = Qcow2Options::default();
    match cluster_size {
        Some(cluster_size) => defaults.with_cluster_size(cluster_size),
        None => defaults,
    }
}

/// What `create --backing` learns from the backing file.
#[derive(Debug)]
struct ProbedBacking {
    format: DiskFormat,
    virtual_size: u64,
}

/// Opens the backing file where QEMU will look for it (relative names are
/// relative to the new image's directory) and finds its format and size.
fn probe_backing(output: &Path, backing: &Path, format: Option<DiskFormat>) -> anyhow::Result<ProbedBacking> {
    let on_disk = match output.parent() {
        Some(dir) if backing.is_relative() => dir.join(backing),
        _ => backing.to_path_buf(),
    };
    let shown = if on_disk == backing {
        format!("backing file {}", backing.display())
    } else {
        format!("backing file {} (at {}, relative to the image)", backing.display(), on_disk.display())
    };
    let mut file = File::open(&on_disk).with_context(|| format!("Cannot read {shown}"))?;
    let meta = file.metadata().with_context(|| format!("Cannot read {shown}"))?;
    if meta.is_dir() {
        bail!("The {shown} is a directory");
    }
    let mut magic = [0u8; 4];
    let got = read_up_to(&mut file, &mut magic).with_context(|| format!("Cannot read {shown}"))?;
    let detected = if got == 4 && magic == QCOW2_MAGIC { DiskFormat::Qcow2 } else { DiskFormat::Raw };
    let format = format.unwrap_or(detected);
    let virtual_size = match format {
        DiskFormat::Raw => meta.len(),
        DiskFormat::Qcow2 => {
            file.rewind().with_context(|| format!("Cannot read {shown}"))?;
            match inspect(&mut file).with_context(|| format!("The {shown} is not a usable qcow2 image"))? {
                ImageInfo::Qcow2(info) => info.virtual_size,
                _ => bail!("The {shown} is not a qcow2 image"),
            }
        }
    };
    Ok(ProbedBacking { format, virtual_size })
}

/// The first four bytes of `path` (fewer if it is shorter, zero-padded).
fn read_magic(path: &Path) -> std::io::Result<[u8; 4]> {
    let mut file = File::open(path)?;
    let mut magic = [0u8; 4];
    read_up_to(&mut file, &mut magic)?;
    Ok(magic)
}

fn read_up_to(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match input.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The `--json` summary of `create` and `convert`, documented in docs/cli.md.
#[derive(Debug, Serialize)]
struct Report {
    path: String,
    format: &'static str,
    virtual_size: u64,
    file_bytes: u64,
    cluster_size: u32,
    data_clusters: u64,
    backing_file: Option<String>,
    backing_format: Option<String>,
    elapsed_ms: u64,
}

impl Report {
    fn new(path: &Path, summary: &Qcow2Summary, options: &Qcow2Options, elapsed_ms: u64) -> Report {
        Report {
            path: path.display().to_string(),
            format: DiskFormat::Qcow2.name(),
            virtual_size: summary.virtual_size,
            file_bytes: summary.file_bytes,
            cluster_size: summary.cluster_size,
            data_clusters: summary.data_clusters,
            backing_file: options.backing_file.clone(),
            backing_format: options.backing_format.clone(),
            elapsed_ms,
        }
    }

    fn human(&self) -> String {
        let backing = match (&self.backing_file, &self.backing_format) {
            (Some(file), Some(format)) => format!(", over {file} ({format})"),
            _ => String::new(),
        };
        format!(
            "Wrote {}: qcow2 {} virtual, {} file, {} clusters, {} of data{backing}, {} ms",
            self.path,
            human_bytes(self.virtual_size),
            human_bytes(self.file_bytes),
            human_bytes(u64::from(self.cluster_size)),
            count(self.data_clusters, "cluster", "clusters"),
            self.elapsed_ms,
        )
    }
}
