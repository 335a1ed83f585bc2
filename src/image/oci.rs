//! `kiln image oci pull|inspect|convert`: the steps `kiln run` takes with
//! an OCI image, one at a time. All three go through the image store in
//! kiln's state directory (`<state>/oci/`), so what they pull or build is
//! what a VM of the image then finds there; `kiln gc` removes what no VM
//! holds.

use std::collections::HashMap;
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kiln::{ImageEvent, LayerDisk, StateDir};
use kiln_oci::Image;
use serde::Serialize;

use super::{elapsed_ms, human_bytes};

#[derive(Debug, Subcommand)]
pub(crate) enum OciCommand {
    /// Pull an image into kiln's image store, verifying every blob.
    Pull(SourceArgs),
    /// Print an image's manifest digest, config and layers (pulling it if need be).
    Inspect(SourceArgs),
    /// Write the root filesystem a VM of the image boots: its layer-chain ext4 images and a manifest.
    Convert(ConvertArgs),
}

#[derive(Debug, Args)]
pub(crate) struct SourceArgs {
    /// oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:REF], or a registry reference.
    #[arg(value_name = "SOURCE")]
    source: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ConvertArgs {
    #[command(flatten)]
    image: SourceArgs,
    /// The directory to write (must not exist; written beside it, then renamed).
    #[arg(short, long, value_name = "OUT")]
    output: PathBuf,
}

pub(crate) fn run(command: OciCommand) -> anyhow::Result<()> {
    let started = Instant::now();
    match command {
        OciCommand::Pull(args) => {
            let image = pull(&args.source)?;
            let report = ImageReport::new(&image);
            super::print_report(args.json, &report, |r| {
                format!(
                    "Pulled {}: manifest {}, {} ({} as stored in the source), {} ms",
                    r.source,
                    r.manifest,
                    super::count(r.layers.len() as u64, "layer", "layers"),
                    human_bytes(r.layers.iter().map(|l| l.size).sum()),
                    elapsed_ms(started)
                )
            })
        }
        OciCommand::Inspect(args) => {
            let image = pull(&args.source)?;
            let report = ImageReport::new(&image);
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", inspect_text(&report));
            }
            Ok(())
        }
        OciCommand::Convert(args) => convert(&args, started),
    }
}

fn state() -> anyhow::Result<StateDir> {
    let root = StateDir::default_root()?;
    StateDir::open(&root).with_context(|| format!("cannot open kiln's state directory {}", root.display()))
}

fn pull(text: &str) -> anyhow::Result<Image> {
    let source = kiln::parse_image_source(text)?;
    let store = kiln::open_image_store(&state()?)?;
    let mut bars = Bars::new();
    let image = kiln::pull_image(&store, &source, &mut |event| bars.event(event));
    bars.finish();
    image.with_context(|| format!("Cannot pull {text}"))
}

/// The `--json` object of `pull` and `inspect` (docs/cli.md).
#[derive(Debug, Serialize)]
struct ImageReport {
    source: String,
    manifest: String,
    config: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    working_dir: Option<String>,
    user: Option<String>,
    /// As the image names it; `kiln run` sends SIGTERM when it names none.
    stop_signal: Option<String>,
    layers: Vec<LayerReport>,
}

#[derive(Debug, Serialize)]
struct LayerReport {
    digest: String,
    diff_id: String,
    media_type: String,
    size: u64,
}

impl ImageReport {
    fn new(image: &Image) -> ImageReport {
        let runtime = image.runtime();
        ImageReport {
            source: image.source().to_owned(),
            manifest: image.manifest_digest().to_string(),
            config: image.config_digest().to_string(),
            entrypoint: runtime.entrypoint().to_vec(),
            cmd: runtime.cmd().to_vec(),
            env: runtime.env().to_vec(),
            working_dir: runtime.working_dir().map(str::to_owned),
            user: runtime.user().map(str::to_owned),
            stop_signal: runtime.stop_signal().map(str::to_owned),
            layers: image
                .layers()
                .iter()
                .map(|layer| LayerReport {
                    digest: layer.digest().to_string(),
                    diff_id: layer.diff_id().to_string(),
                    media_type: layer.media_type().to_owned(),
                    size: layer.size(),
                })
                .collect(),
        }
    }
}

/// `name: value` lines, then one block per layer.
fn inspect_text(report: &ImageReport) -> String {
    let list = |items: &[String]| if items.is_empty() { "-".to_owned() } else { format!("{items:?}") };
    let mut text = format!(
        "source: {}\nmanifest: {}\nconfig: {}\nentrypoint: {}\ncmd: {}\nworking_dir: {}\nuser: {}\nstop_signal: {}\n",
        report.source,
        report.manifest,
        report.config,
        list(&report.entrypoint),
        list(&report.cmd),
        report.working_dir.as_deref().unwrap_or("-"),
        report.user.as_deref().unwrap_or("-"),
        report.stop_signal.as_deref().unwrap_or("-"),
    );
    for entry in &report.env {
        text.push_str(&format!("env: {entry}\n"));
    }
    for (index, layer) in report.layers.iter().enumerate() {
        text.push_str(&format!(
            "layer {index}: {}\n  diff_id: {}\n  media_type: {}\n  size: {} ({})\n",
            layer.digest,
            layer.diff_id,
            layer.media_type,
            layer.size,
            human_bytes(layer.size)
        ));
    }
    text
}

/// The name of the manifest `convert` writes into `OUT`.
const ROOTFS_MANIFEST: &str = "rootfs.json";

/// `OUT/rootfs.json` (docs/cli.md).
#[derive(Debug, Serialize)]
struct RootfsManifest {
    /// `ROOTFS_FORMAT`: what the layer files' bytes depend on.
    format: &'static str,
    #[serde(flatten)]
    image: ImageReport,
    /// The layer filesystems, bottom first, as `kiln run` attaches them.
    disks: Vec<DiskReport>,
}

#[derive(Debug, Serialize)]
struct DiskReport {
    /// The file in `OUT`.
    file: String,
    /// The virtio-blk serial `kiln run` gives it.
    serial: String,
    chain_id: String,
    /// The image's layers it holds the changes of, `[first, last]`.
    layers: [usize; 2],
    bytes: u64,
}

fn convert(args: &ConvertArgs, started: Instant) -> anyhow::Result<()> {
    let out = &args.output;
    if fs::symlink_metadata(out).is_ok() {
        bail!("{} exists; convert writes a new directory (remove it first)", out.display());
    }
    let store = kiln::open_image_store(&state()?)?;
    // Held from the pull to the last copy into OUT: a `kiln gc` meanwhile
    // waits, rather than sweeping the unreferenced image from under us.
    let _guard = store.guard().with_context(|| format!("Cannot lock the image store {}", store.root().display()))?;
    let image = pull(&args.image.source)?;
    let mut bars = Bars::new();
    let disks = kiln::image_rootfs(&store, &image, &mut |event| bars.event(event));
    bars.finish();
    let disks = disks.with_context(|| format!("Cannot convert {}", args.image.source))?;
    let built = disks.iter().filter(|disk| disk.built).count();
    let manifest = write_rootfs_dir(out, &image, &disks)?;
    let total: u64 = manifest.disks.iter().map(|d| d.bytes).sum();
    super::print_report(args.image.json, &manifest, |m| {
        format!(
            "Wrote {}: {} of {} ({} built, {} from the store), {} of ext4, {} ms",
            out.display(),
            super::count(m.disks.len() as u64, "layer filesystem", "layer filesystems"),
            m.image.source,
            built,
            m.disks.len() - built,
            human_bytes(total),
            elapsed_ms(started)
        )
    })
}

/// Copies the layer filesystems into a temporary directory beside `out`,
/// writes the manifest, and renames it to `out`: a failure leaves nothing.
fn write_rootfs_dir(out: &Path, image: &Image, disks: &[LayerDisk]) -> anyhow::Result<RootfsManifest> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let temp = tempfile::Builder::new()
        .prefix(".kiln-convert-")
        .tempdir_in(parent)
        .with_context(|| format!("Cannot write {}", out.display()))?;
    let mut reports = Vec::with_capacity(disks.len());
    for (index, disk) in disks.iter().enumerate() {
        let file = format!("layer{index}.ext4");
        let bytes = fs::copy(&disk.path, temp.path().join(&file))
            .with_context(|| format!("Cannot copy {} into {}", disk.path.display(), out.display()))?;
        reports.push(DiskReport {
            file,
            serial: format!("{}{index}", kiln_guest::LAYER_SERIAL_PREFIX),
            chain_id: disk.chain_id.clone(),
            layers: [disk.layers.start, disk.layers.end - 1],
            bytes,
        });
    }
    let manifest = RootfsManifest { format: kiln::ROOTFS_FORMAT, image: ImageReport::new(image), disks: reports };
    let json = serde_json::to_vec_pretty(&manifest)?;
    fs::write(temp.path().join(ROOTFS_MANIFEST), json).with_context(|| format!("Cannot write {}", out.display()))?;
    let temp = temp.keep();
    if let Err(err) = fs::rename(&temp, out) {
        let _ = fs::remove_dir_all(&temp);
        return Err(err).with_context(|| format!("Cannot write {}", out.display()));
    }
    Ok(manifest)
}

/// Progress on stderr when it is a terminal: a bar per blob being read,
/// a spinner per layer filesystem being built; nothing otherwise.
struct Bars {
    multi: Option<MultiProgress>,
    blobs: HashMap<String, ProgressBar>,
    converting: Option<ProgressBar>,
}

impl Bars {
    fn new() -> Bars {
        let multi = std::io::stderr().is_terminal().then(MultiProgress::new);
        Bars { multi, blobs: HashMap::new(), converting: None }
    }

    fn event(&mut self, event: ImageEvent<'_>) {
        let Some(multi) = &self.multi else { return };
        match event {
            ImageEvent::Blob { digest, done, total } => {
                let key = digest.to_string();
                let bar = self.blobs.entry(key.clone()).or_insert_with(|| {
                    let bar = multi.add(ProgressBar::new(total));
                    if let Ok(style) =
                        ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
                    {
                        bar.set_style(style);
                    }
                    bar.set_message(key.chars().take(19).collect::<String>());
                    bar
                });
                bar.set_position(done);
                if done >= total {
                    bar.finish();
                }
            }
            ImageEvent::Converting { index, count } => {
                if let Some(previous) = self.converting.take() {
                    previous.finish();
                }
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_message(format!("building layer filesystem {}/{count}", index + 1));
                bar.enable_steady_tick(Duration::from_millis(100));
                self.converting = Some(bar);
            }
            _ => {}
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.converting.take() {
            bar.finish();
        }
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
    }
}
