//! `kiln image fat`, `cidata` and `service-disk`: FAT volumes, written raw or as qcow2.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, IsTerminal};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use clap::builder::{OsStringValueParser, TypedValueParser};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::{DiskTree, LaunchScript, ServiceDisk};
use kiln_imagefmt::{FatOptions, FatSummary, FatTree, FatType, NoCloudSeed, Qcow2Options};
use serde::Serialize;

use super::{
    DiskFormat, OutputArgs, container_note, count, elapsed_ms, human_bytes, parse_size_arg, print_report,
    source_placement, volume_id, written_file,
};

/// Below this much file data a build takes well under a second: no bar.
const PROGRESS_MIN_BYTES: u64 = 16 << 20;

/// What the FAT commands share: where and how to write the volume.
#[derive(Debug, Args)]
pub(crate) struct FatOutputArgs {
    #[command(flatten)]
    output: OutputArgs,
    /// Container format of the image file.
    #[arg(long, value_enum, default_value_t = DiskFormat::Raw)]
    format: DiskFormat,
}

#[derive(Debug, Args)]
pub(crate) struct FatArgs {
    #[command(flatten)]
    output: FatOutputArgs,
    /// Volume label (up to 11 characters).
    #[arg(long)]
    label: Option<String>,
    /// Volume size, e.g. 64MiB [default: content plus headroom].
    #[arg(long, value_parser = parse_size_arg)]
    size: Option<u64>,
    /// Force the FAT type: 12, 16 or 32 [default: by cluster count].
    #[arg(long, value_name = "12|16|32")]
    fat_type: Option<FatType>,
    /// DIR (its contents go to the root), FILE (to the root under its name)
    /// or DEST=PATH (PATH placed at DEST).
    #[arg(value_name = "SRC", required = true)]
    sources: Vec<OsString>,
}

#[derive(Debug, Args)]
pub(crate) struct CidataArgs {
    #[command(flatten)]
    output: FatOutputArgs,
    /// The user-data file (e.g. starting with #cloud-config).
    #[arg(long, value_name = "FILE")]
    user_data: PathBuf,
    /// The meta-data file (instance-id, local-hostname).
    #[arg(long, value_name = "FILE")]
    meta_data: PathBuf,
    /// A network-config file (version 2).
    #[arg(long, value_name = "FILE")]
    network_config: Option<PathBuf>,
    /// A vendor-data file.
    #[arg(long, value_name = "FILE")]
    vendor_data: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct ServiceDiskArgs {
    #[command(flatten)]
    output: FatOutputArgs,
    /// The service binary, stored as `service`.
    #[arg(long, value_name = "PATH")]
    binary: PathBuf,
    /// An argument for the service (repeat for more; passed byte for byte).
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    args: Vec<OsString>,
    /// An environment variable for the service (repeat for more).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = OsStringValueParser::new().try_map(split_env))]
    env: Vec<(String, Vec<u8>)>,
    /// A host directory placed on the disk as NAME.
    #[arg(long = "tree", value_name = "NAME=DIR", value_parser = OsStringValueParser::new().try_map(split_tree))]
    trees: Vec<(String, PathBuf)>,
    /// Like --tree, for secrets: the image is then created mode 0600.
    #[arg(long = "secret-tree", value_name = "NAME=DIR", value_parser = OsStringValueParser::new().try_map(split_tree))]
    secret_trees: Vec<(String, PathBuf)>,
    /// Volume size, e.g. 64MiB [default: content plus headroom].
    #[arg(long, value_parser = parse_size_arg)]
    size: Option<u64>,
}

pub(super) fn image_fat(args: FatArgs, started: Instant) -> anyhow::Result<()> {
    let mut tree = FatTree::new();
    for source in &args.sources {
        add_source(&mut tree, source)?;
    }
    let options = fat_options(&args.output.output, args.label, args.size, args.fat_type);
    build(&tree, &options, &args.output, started)
}

pub(super) fn image_cidata(args: CidataArgs, started: Instant) -> anyhow::Result<()> {
    // user-data often holds passwords or keys: a private seed file makes the image private.
    let mut secret = false;
    let user_data = read_seed_file("--user-data", &args.user_data, &mut secret)?;
    let meta_data = read_seed_file("--meta-data", &args.meta_data, &mut secret)?;
    let mut optional = |flag: &str, path: &Option<PathBuf>| {
        path.as_deref().map(|path| read_seed_file(flag, path, &mut secret)).transpose()
    };
    let network_config = optional("--network-config", &args.network_config)?;
    let vendor_data = optional("--vendor-data", &args.vendor_data)?;
    let seed = NoCloudSeed { user_data, meta_data, network_config, vendor_data };
    let mut tree = seed.tree()?;
    if secret {
        tree.mark_secret();
    }
    let options = fat_options(&args.output.output, Some(NoCloudSeed::LABEL.to_owned()), None, None);
    build(&tree, &options, &args.output, started)
}

pub(super) fn image_service_disk(args: ServiceDiskArgs, started: Instant) -> anyhow::Result<()> {
    let launch = LaunchScript {
        args: args.args.into_iter().map(OsString::into_vec).collect(),
        env: args.env,
        ..LaunchScript::default()
    };
    let plain = args.trees.into_iter().map(|(name, source)| DiskTree { name, source, secret: false });
    let secret = args.secret_trees.into_iter().map(|(name, source)| DiskTree { name, source, secret: true });
    let disk = ServiceDisk { binary: args.binary, launch, trees: plain.chain(secret).collect() };
    let tree = disk.tree()?;
    let options = fat_options(&args.output.output, Some(ServiceDisk::LABEL.to_owned()), args.size, None);
    build(&tree, &options, &args.output, started)
}

/// Reads a cidata seed file, setting `secret` if its group or others cannot
/// read it (the rule kiln-imagefmt applies to every host file it adds).
fn read_seed_file(flag: &str, path: &Path, secret: &mut bool) -> anyhow::Result<Vec<u8>> {
    let context = || format!("Cannot read {flag} file {}", path.display());
    let mut file = fs::File::open(path).with_context(context)?;
    let mode = file.metadata().with_context(context)?.permissions().mode();
    *secret |= mode & 0o044 != 0o044;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut file, &mut bytes).with_context(context)?;
    Ok(bytes)
}

fn fat_options(output: &OutputArgs, label: Option<String>, size: Option<u64>, fat_type: Option<FatType>) -> FatOptions {
    let mut options = FatOptions::default().with_size(size).with_fat_type(fat_type).with_epoch(output.epoch());
    options.label = label;
    options
}

/// Adds one `kiln image fat` SRC: `DIR`, `FILE` or `DEST=PATH`.
fn add_source(tree: &mut FatTree, source: &OsStr) -> anyhow::Result<()> {
    let (dest, path) = source_placement(source)?;
    tree.add_host_path(dest, path)?;
    Ok(())
}

/// Plans, writes and reports an image.
fn build(tree: &FatTree, options: &FatOptions, output: &FatOutputArgs, started: Instant) -> anyhow::Result<()> {
    let path = &output.output.output;
    let layout = tree.layout(options)?;
    let data_bytes = layout.summary().data_bytes;
    let bar = (data_bytes >= PROGRESS_MIN_BYTES && io::stderr().is_terminal()).then(|| progress_bar(data_bytes));
    let mut on_progress = |done| {
        if let Some(bar) = &bar {
            bar.set_position(done);
        }
    };
    let progress: Option<&mut dyn FnMut(u64)> = if bar.is_some() { Some(&mut on_progress) } else { None };
    let summary = match output.format {
        DiskFormat::Raw => layout.write_file(path, progress)?,
        DiskFormat::Qcow2 => layout.write_qcow2_file(path, &Qcow2Options::default(), progress)?,
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let (file_bytes, mode) = written_file(path)?;
    let report = Report::new(path, output.format, &summary, file_bytes, mode, elapsed_ms(started));
    print_report(output.output.json, &report, Report::human)
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}") {
        bar.set_style(style);
    }
    bar
}

/// The `--json` summary: one object, documented in docs/cli.md.
#[derive(Debug, Serialize)]
struct Report {
    path: String,
    format: &'static str,
    image_bytes: u64,
    file_bytes: u64,
    fat_type: String,
    cluster_size: u32,
    clusters: u32,
    free_clusters: u32,
    files: u64,
    dirs: u64,
    data_bytes: u64,
    volume_id: String,
    elapsed_ms: u64,
    mode: String,
}

impl Report {
    fn new(
        path: &Path,
        format: DiskFormat,
        summary: &FatSummary,
        file_bytes: u64,
        mode: u32,
        elapsed_ms: u64,
    ) -> Report {
        Report {
            path: path.display().to_string(),
            format: format.name(),
            image_bytes: summary.image_bytes,
            file_bytes,
            fat_type: summary.fat_type.to_string(),
            cluster_size: summary.cluster_size,
            clusters: summary.clusters,
            free_clusters: summary.free_clusters,
            files: summary.files,
            dirs: summary.dirs,
            data_bytes: summary.data_bytes,
            volume_id: volume_id(summary.volume_id),
            elapsed_ms,
            mode: format!("{mode:04o}"),
        }
    }

    fn human(&self) -> String {
        let container = container_note(self.format, self.file_bytes);
        format!(
            "Wrote {}: {} {}{container}, {}, {}, {} of data, {} clusters, volume {}, mode {}, {} ms",
            self.path,
            self.fat_type,
            human_bytes(self.image_bytes),
            count(self.files, "file", "files"),
            count(self.dirs, "directory", "directories"),
            human_bytes(self.data_bytes),
            human_bytes(u64::from(self.cluster_size)),
            self.volume_id,
            self.mode,
            self.elapsed_ms,
        )
    }
}

/// `--env NAME=VALUE`: the value stays bytes, so it need not be UTF-8.
fn split_env(arg: OsString) -> Result<(String, Vec<u8>), String> {
    let (name, value) = split_at_equals(&arg)?;
    let name = String::from_utf8(name.to_vec()).map_err(|_| format!("the name in {arg:?} is not valid UTF-8"))?;
    Ok((name, value.to_vec()))
}

/// `--tree NAME=DIR`.
fn split_tree(arg: OsString) -> Result<(String, PathBuf), String> {
    let (name, dir) = split_at_equals(&arg)?;
    let name = String::from_utf8(name.to_vec()).map_err(|_| format!("the name in {arg:?} is not valid UTF-8"))?;
    Ok((name, PathBuf::from(OsStr::from_bytes(dir))))
}

fn split_at_equals(arg: &OsStr) -> Result<(&[u8], &[u8]), String> {
    let bytes = arg.as_bytes();
    match bytes.iter().position(|&b| b == b'=') {
        Some(at) => Ok((&bytes[..at], &bytes[at + 1..])),
        None => Err(format!("expected NAME=VALUE, got {arg:?}")),
    }
}
