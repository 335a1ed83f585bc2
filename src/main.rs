//! The `kiln` command line. Errors print as `error: ...` with one
//! `  caused by: ...` line per cause; exit status 1 for a failed command and
//! 2 for a usage error (clap's own).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, IsTerminal};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::builder::{OsStringValueParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::{DiskTree, LaunchScript, ServiceDisk, parse_size};
use kiln_imagefmt::{FatOptions, FatSummary, FatTree, FatType, NoCloudSeed};
use serde::Serialize;

/// Below this much file data a build takes well under a second: no bar.
const PROGRESS_MIN_BYTES: u64 = 16 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Pack a service into disk images and run it in a microVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build disk images.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Build a FAT image from host files and directories.
    Fat(FatArgs),
    /// Build a cloud-init NoCloud seed (label CIDATA).
    Cidata(CidataArgs),
    /// Build a service disk (label SERVICEDISK): binary, launch script, extra trees.
    ServiceDisk(ServiceDiskArgs),
}

/// What every image command shares.
#[derive(Debug, Args)]
struct OutputArgs {
    /// The image file to write (replaced atomically).
    #[arg(short, long, value_name = "OUT")]
    output: PathBuf,
    /// Timestamp for every entry, in seconds since 1970 [default: SOURCE_DATE_EPOCH or 0].
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    epoch: Option<i64>,
    /// Print one JSON object describing the image instead of a summary line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct FatArgs {
    #[command(flatten)]
    output: OutputArgs,
    /// Volume label (up to 11 characters).
    #[arg(long)]
    label: Option<String>,
    /// Image size, e.g. 64MiB [default: content plus headroom].
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
struct CidataArgs {
    #[command(flatten)]
    output: OutputArgs,
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
struct ServiceDiskArgs {
    #[command(flatten)]
    output: OutputArgs,
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
    /// Image size, e.g. 64MiB [default: content plus headroom].
    #[arg(long, value_parser = parse_size_arg)]
    size: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Image(ImageCommand::Fat(args)) => image_fat(args),
        Command::Image(ImageCommand::Cidata(args)) => image_cidata(args),
        Command::Image(ImageCommand::ServiceDisk(args)) => image_service_disk(args),
    }
}

fn image_fat(args: FatArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut tree = FatTree::new();
    for source in &args.sources {
        add_source(&mut tree, source)?;
    }
    let options = fat_options(&args.output, args.label, args.size, args.fat_type);
    build(&tree, &options, &args.output, started)
}

fn image_cidata(args: CidataArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let read = |flag: &str, path: &Path| {
        fs::read(path).with_context(|| format!("Cannot read {flag} file {}", path.display()))
    };
    let optional = |flag: &str, path: &Option<PathBuf>| {
        path.as_deref().map(|path| read(flag, path)).transpose()
    };
    let seed = NoCloudSeed {
        user_data: read("--user-data", &args.user_data)?,
        meta_data: read("--meta-data", &args.meta_data)?,
        network_config: optional("--network-config", &args.network_config)?,
        vendor_data: optional("--vendor-data", &args.vendor_data)?,
    };
    let tree = seed.tree()?;
    let mut options = fat_options(&args.output, None, None, None);
    options.label = Some(NoCloudSeed::LABEL.to_owned());
    build(&tree, &options, &args.output, started)
}

fn image_service_disk(args: ServiceDiskArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let launch = LaunchScript {
        args: args.args.into_iter().map(OsString::into_vec).collect(),
        env: args.env,
        ..LaunchScript::default()
    };
    let plain = args.trees.into_iter().map(|(name, source)| DiskTree {
        name,
        source,
        secret: false,
    });
    let secret = args
        .secret_trees
        .into_iter()
        .map(|(name, source)| DiskTree {
            name,
            source,
            secret: true,
        });
    let disk = ServiceDisk {
        binary: args.binary,
        launch,
        trees: plain.chain(secret).collect(),
    };
    let tree = disk.tree()?;
    let mut options = fat_options(&args.output, None, args.size, None);
    options.label = Some(ServiceDisk::LABEL.to_owned());
    build(&tree, &options, &args.output, started)
}

fn fat_options(
    output: &OutputArgs,
    label: Option<String>,
    size: Option<u64>,
    fat_type: Option<FatType>,
) -> FatOptions {
    let defaults = FatOptions::default();
    FatOptions {
        label,
        size,
        fat_type,
        epoch: output.epoch.unwrap_or(defaults.epoch),
        ..defaults
    }
}

/// Adds one `kiln image fat` SRC: `DIR`, `FILE` or `DEST=PATH`.
fn add_source(tree: &mut FatTree, source: &OsStr) -> anyhow::Result<()> {
    let path = Path::new(source);
    // A host path that happens to contain `=` is a path, not DEST=PATH.
    let exists = path.try_exists().unwrap_or(false);
    if let (false, Some(at)) = (exists, source.as_bytes().iter().position(|&b| b == b'=')) {
        let (dest, host) = source.as_bytes().split_at(at);
        let Ok(dest) = std::str::from_utf8(dest) else {
            bail!("The destination in {source:?} is not valid UTF-8");
        };
        tree.add_host_path(dest, OsStr::from_bytes(&host[1..]))?;
        return Ok(());
    }
    if fs::metadata(path).is_ok_and(|meta| meta.is_dir()) {
        tree.add_host_path("", path)?;
        return Ok(());
    }
    // A file (or a path that does not resolve, which add_host_path reports).
    let Some(name) = path.file_name() else {
        bail!(
            "{} has no file name to use in the image; write DEST={}",
            path.display(),
            path.display()
        );
    };
    let Some(name) = name.to_str() else {
        bail!(
            "The name of {} is not valid UTF-8; write DEST=PATH with a UTF-8 DEST",
            path.display()
        );
    };
    tree.add_host_path(name, path)?;
    Ok(())
}

/// Plans, writes and reports an image.
fn build(
    tree: &FatTree,
    options: &FatOptions,
    output: &OutputArgs,
    started: Instant,
) -> anyhow::Result<()> {
    let layout = tree.layout(options)?;
    let data_bytes = layout.summary().data_bytes;
    let bar = (data_bytes >= PROGRESS_MIN_BYTES && io::stderr().is_terminal())
        .then(|| progress_bar(data_bytes));
    let summary = match &bar {
        Some(bar) => layout.write_file(&output.output, Some(&mut |done| bar.set_position(done)))?,
        None => layout.write_file(&output.output, None)?,
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let mode = fs::metadata(&output.output)
        .with_context(|| format!("Cannot read back {}", output.output.display()))?
        .permissions()
        .mode()
        & 0o7777;
    let report = Report::new(&output.output, &summary, mode, started.elapsed());
    if output.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.human());
    }
    Ok(())
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// The `--json` summary: one object, documented in docs/cli.md.
#[derive(Debug, Serialize)]
struct Report {
    path: String,
    image_bytes: u64,
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
    fn new(path: &Path, summary: &FatSummary, mode: u32, elapsed: Duration) -> Report {
        Report {
            path: path.display().to_string(),
            image_bytes: summary.image_bytes,
            fat_type: summary.fat_type.to_string(),
            cluster_size: summary.cluster_size,
            clusters: summary.clusters,
            free_clusters: summary.free_clusters,
            files: summary.files,
            dirs: summary.dirs,
            data_bytes: summary.data_bytes,
            volume_id: format!(
                "{:04X}-{:04X}",
                summary.volume_id >> 16,
                summary.volume_id & 0xffff
            ),
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            mode: format!("{mode:04o}"),
        }
    }

    fn human(&self) -> String {
        format!(
            "Wrote {}: {} {}, {}, {}, {} of data, {} clusters, volume {}, mode {}, {} ms",
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
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn parse_size_arg(input: &str) -> Result<u64, String> {
    parse_size(input).map_err(|err| err.to_string())
}

/// `--env NAME=VALUE`: the value stays bytes, so it need not be UTF-8.
fn split_env(arg: OsString) -> Result<(String, Vec<u8>), String> {
    let (name, value) = split_at_equals(&arg)?;
    let name = String::from_utf8(name.to_vec())
        .map_err(|_| format!("the name in {arg:?} is not valid UTF-8"))?;
    Ok((name, value.to_vec()))
}

/// `--tree NAME=DIR`.
fn split_tree(arg: OsString) -> Result<(String, PathBuf), String> {
    let (name, dir) = split_at_equals(&arg)?;
    let name = String::from_utf8(name.to_vec())
        .map_err(|_| format!("the name in {arg:?} is not valid UTF-8"))?;
    Ok((name, PathBuf::from(OsStr::from_bytes(dir))))
}

fn split_at_equals(arg: &OsStr) -> Result<(&[u8], &[u8]), String> {
    let bytes = arg.as_bytes();
    match bytes.iter().position(|&b| b == b'=') {
        Some(at) => Ok((&bytes[..at], &bytes[at + 1..])),
        None => Err(format!("expected NAME=VALUE, got {arg:?}")),
    }
}
