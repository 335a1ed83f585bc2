//! `kiln image initramfs`: a host directory as a newc cpio archive.

use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use kiln_imagefmt::{Compression, CpioArchive};
use serde::Serialize;

use super::{OutputArgs, count, elapsed_ms, human_bytes, print_report};

#[derive(Debug, Args)]
pub(crate) struct InitramfsArgs {
    /// The directory whose contents become the archive's root.
    #[arg(value_name = "DIR")]
    source: PathBuf,
    #[command(flatten)]
    output: OutputArgs,
    /// Compress the archive with gzip, or not at all.
    #[arg(long, value_enum, default_value_t = CompressArg::Gzip)]
    compress: CompressArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CompressArg {
    Gzip,
    None,
}

impl CompressArg {
    fn compression(self) -> Compression {
        match self {
            CompressArg::Gzip => Compression::Gzip,
            CompressArg::None => Compression::None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            CompressArg::Gzip => "gzip",
            CompressArg::None => "none",
        }
    }
}

pub(super) fn initramfs(args: InitramfsArgs, started: Instant) -> anyhow::Result<()> {
    let source = &args.source;
    let meta = fs::metadata(source).with_context(|| format!("Cannot read {}", source.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory; an initramfs is built from a directory's contents", source.display());
    }
    let mut archive = CpioArchive::new();
    archive.add_host_tree("", source)?;
    let path = &args.output.output;
    let summary = archive.write_file(path, args.compress.compression(), args.output.epoch())?;
    let report = Report {
        path: path.display().to_string(),
        format: "cpio",
        compression: args.compress.name(),
        entries: summary.entries,
        archive_bytes: summary.archive_bytes,
        file_bytes: summary.file_bytes,
        elapsed_ms: elapsed_ms(started),
    };
    print_report(args.output.json, &report, Report::human)
}

/// The `--json` summary, documented in docs/cli.md.
#[derive(Debug, Serialize)]
struct Report {
    path: String,
    format: &'static str,
    compression: &'static str,
    entries: u64,
    archive_bytes: u64,
    file_bytes: u64,
    elapsed_ms: u64,
}

impl Report {
    fn human(&self) -> String {
        let compressed = match self.compression {
            "none" => String::new(),
            other => format!(", {} {other}", human_bytes(self.file_bytes)),
        };
        format!(
            "Wrote {}: cpio (newc) {}, {}{compressed}, {} ms",
            self.path,
            count(self.entries, "entry", "entries"),
            human_bytes(self.archive_bytes),
            self.elapsed_ms,
        )
    }
}
