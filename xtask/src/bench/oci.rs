//! `cargo xtask bench oci`, the conversion half: an OCI image layout to
//! the bootable rootfs a VM of it boots, kiln against `umoci unpack`
//! followed by `mke2fs -d`, on two images made by umoci (never by kiln):
//!
//! - a Debian 12 image with Python, about 100 MiB as Debian-based
//!   application images are (kiln-testkit's slimmed debootstrap minbase
//!   rootfs with `python3` included, one layer), with a non-root user, a
//!   working directory and an entrypoint;
//! - a 10,000-file image: small files in 250 directories, symlinks and
//!   hard links, some owned by another user.
//!
//! Every kiln run starts from an empty state directory, so it pulls the
//! image (each blob's digest verified, layers decompressed into its store),
//! builds the layer filesystems and copies them into `OUT`: the whole cold
//! path. `mke2fs` gets the features, block and inode counts of kiln's
//! filesystem (read back with `dumpe2fs`), the options `bench ext4` gives
//! it, so both make the same filesystem from the same tree.
//!
//! Then the shared base: an `app` image made by umoci on the Debian image's
//! very layer (same blob) plus a few MiB of its own, converted into a state
//! directory that holds the Debian image already (a fresh copy per run),
//! against converting it cold. Every kiln run's own line must say how many
//! layer filesystems it built (1 warm, 2 cold), and every ext4 of the
//! warm-up runs must pass `e2fsck -fn`, so the bench cannot time a broken
//! conversion. Page cache stays warm; peers run interleaved.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::chart::BarChart;
use super::ext4::{e2fsck, features_of, mke2fs_command};
use super::{
    Machine, Options, PeerRuns, Sample, Target, XorShift, measure, print_report, remove_path, small_file,
    small_file_pool, sync_filesystems,
};
use crate::json::Json;
use crate::{announce, cargo, debian, format_bytes, run_command, show_command, target_dir};

/// Bumped when what an image holds changes, so stale cached layouts are not reused.
const LAYOUT_VERSION: &str = "v2";
const FILE_DIRS: usize = 250;
const FILES_PER_DIR: usize = 38;
const SYMLINKS: usize = 300;
const HARD_LINKS: usize = 200;
const FILES_SEED: u64 = 0x6f63_6966_696c_6573;
/// The app layer: one binary and a few configuration files.
const APP_BINARY_BYTES: usize = 4 << 20;
const APP_CONFIG_FILES: usize = 50;
const APP_SEED: u64 = 0x6f63_6961_7070;
/// kiln's state-directory variable (src/state.rs `STATE_DIR_ENV`).
const STATE_DIR_ENV: &str = "KILN_STATE_DIR";

// The targets.
const MIN_SPEEDUP: f64 = 2.0;
/// A conversion over a base already in the store costs its own layer plus
/// fixed work (the manifest, the base's metadata replayed, `OUT` written):
/// at most this share of the cold conversion.
const MAX_WARM_SHARE: f64 = 0.5;

pub(super) fn run(options: &Options) -> Result<()> {
    if !debian::is_root() {
        println!("bench oci: needs root (umoci unpack keeps the images' owners only as root); skipped");
        return Ok(());
    }
    debian::ensure_installed(&[&["umoci"], &["e2fsprogs"], &["debootstrap", "debian-archive-keyring"]])?;
    announce("building release kiln");
    run_command(cargo().args(["build", "--release", "-p", "kiln", "--bin", "kiln"]))?;
    let kiln = std::path::absolute(target_dir().join("release").join("kiln"))?;
    let images = std::path::absolute(target_dir().join("bench").join("oci-images"))?;
    let debian = debian_layout(&images)?;
    let files = files_layout(&images)?;
    let bench_dir = std::path::absolute(target_dir().join("bench").join("oci"))?;
    remove_path(&bench_dir)?;
    fs::create_dir_all(&bench_dir).with_context(|| format!("cannot create {}", bench_dir.display()))?;

    let runs = options.runs;
    let conversions = vec![
        convert_against_peer(&kiln, "Debian 12 + python3", &source(&debian, "base"), &bench_dir.join("debian"), runs)?,
        convert_against_peer(&kiln, "10,000 files", &source(&files, "files"), &bench_dir.join("files"), runs)?,
    ];
    let shared = shared_base(&kiln, &debian, &bench_dir.join("shared"), runs)?;
    let machine = Machine::detect(&bench_dir);
    remove_path(&bench_dir)?;
    report(&conversions, &shared, &machine, runs)
}

fn source(layout: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", layout.display())
}

/// Runs `command`, its output kept unless it fails.
fn quiet(command: &mut Command) -> Result<()> {
    let shown = show_command(command);
    let output = command.output().with_context(|| format!("cannot run `{shown}`"))?;
    if !output.status.success() {
        bail!("`{shown}` failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr).trim_end());
    }
    Ok(())
}

fn umoci(args: &[&str], paths: &[&Path]) -> Result<()> {
    quiet(Command::new("umoci").args(args).args(paths))
}

/// The layout `images/<name>-vN`, made by `fill` (given the layout and a
/// scratch directory for bundles) the first time, in a staging directory
/// renamed at the end so a failed build is never reused.
fn cached_layout(images: &Path, name: &str, fill: impl FnOnce(&Path, &Path) -> Result<()>) -> Result<PathBuf> {
    let layout = images.join(format!("{name}-{LAYOUT_VERSION}"));
    if layout.join("index.json").is_file() {
        println!("reusing {}", layout.display());
        return Ok(layout);
    }
    announce(&format!("making the {name} image with umoci in {}", layout.display()));
    let staging = images.join(format!(".{name}-{LAYOUT_VERSION}.{}", std::process::id()));
    remove_path(&staging)?;
    fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let staged = staging.join("layout");
    umoci(&["init", "--layout"], &[&staged])?;
    fill(&staged, &staging)?;
    fs::rename(&staged, &layout)
        .with_context(|| format!("cannot rename {} to {}", staged.display(), layout.display()))?;
    remove_path(&staging)?;
    Ok(layout)
}

/// Tag `base`: the Debian rootfs as one layer, with a config like a real
/// image's; tag `app`: `base`'s very layer plus one of its own.
fn debian_layout(images: &Path) -> Result<PathBuf> {
    cached_layout(images, "debian", |layout, scratch| {
        let rootfs = kiln_testkit::debian_rootfs_with(&target_dir().join("test-images"), &["python3"])
            .map_err(anyhow::Error::msg)
            .context("cannot make the Debian rootfs")?;
        let base = format!("{}:base", layout.display());
        let bundle = scratch.join("base");
        umoci(&["new", "--image", &base], &[])?;
        umoci(&["unpack", "--image", &base], &[&bundle])?;
        // `cp -a` keeps owners, modes, links, device nodes, xattrs and times.
        quiet(Command::new("cp").arg("-a").arg(rootfs.join(".")).arg(bundle.join("rootfs")))?;
        umoci(&["repack", "--image", &base], &[&bundle])?;
        umoci(
            &[
                "config",
                "--image",
                &base,
                "--config.user=nobody:nogroup",
                "--config.workingdir=/srv/app",
                "--config.entrypoint=/srv/app/bin/app",
                "--config.env=APP_MODE=production",
            ],
            &[],
        )?;
        let app_bundle = scratch.join("app");
        umoci(&["unpack", "--image", &base], &[&app_bundle])?;
        write_app(&app_bundle.join("rootfs/srv/app"))?;
        umoci(&["repack", "--image", &format!("{}:app", layout.display())], &[&app_bundle])
    })
}

/// The app layer's tree: a 4 MiB binary and small configuration files.
fn write_app(dir: &Path) -> Result<()> {
    let mut random = XorShift::new(APP_SEED);
    fs::create_dir_all(dir.join("bin")).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::create_dir_all(dir.join("conf"))?;
    let mut binary = vec![0u8; APP_BINARY_BYTES];
    random.fill(&mut binary);
    let path = dir.join("bin/app");
    fs::write(&path, &binary).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    for index in 0..APP_CONFIG_FILES {
        let text = format!("# setting {index}\nvalue = {}\n", random.next());
        fs::write(dir.join(format!("conf/{index:02}.toml")), text)?;
    }
    Ok(())
}

/// Tag `files`: the 10,000-file tree under `/data` as one layer.
fn files_layout(images: &Path) -> Result<PathBuf> {
    cached_layout(images, "files", |layout, scratch| {
        let image = format!("{}:files", layout.display());
        let bundle = scratch.join("files");
        umoci(&["new", "--image", &image], &[])?;
        umoci(&["unpack", "--image", &image], &[&bundle])?;
        write_files(&bundle.join("rootfs/data"))?;
        umoci(&["repack", "--image", &image], &[&bundle])?;
        umoci(&["config", "--image", &image, "--config.workingdir=/data"], &[])
    })
}

/// `FILE_DIRS` directories of `FILES_PER_DIR` files (85% under 4 KiB, 14%
/// of 4 to 16 KiB, 1% of 16 to 128 KiB, every seventh owned by 1000:1000
/// with mode 0600), then `SYMLINKS` symlinks and `HARD_LINKS` hard links
/// to files in other directories: 10,000 non-directory entries.
fn write_files(root: &Path) -> Result<()> {
    let mut random = XorShift::new(FILES_SEED);
    let pool = small_file_pool(&mut random);
    let file = |dir: usize, index: usize| format!("d{dir:03}/file{index:02}");
    for dir in 0..FILE_DIRS {
        let path = root.join(format!("d{dir:03}"));
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        for index in 0..FILES_PER_DIR {
            let bytes = small_file(&mut random, &pool);
            let path = root.join(file(dir, index));
            fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
            if (dir * FILES_PER_DIR + index) % 7 == 0 {
                std::os::unix::fs::chown(&path, Some(1000), Some(1000))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    let mut pick = || (random.next() as usize % FILE_DIRS, random.next() as usize % FILES_PER_DIR);
    for index in 0..SYMLINKS {
        let ((dir, _), (to_dir, to_file)) = (pick(), pick());
        let link = root.join(format!("d{dir:03}/link{index:03}"));
        std::os::unix::fs::symlink(format!("../{}", file(to_dir, to_file)), &link)
            .with_context(|| format!("cannot create {}", link.display()))?;
    }
    for index in 0..HARD_LINKS {
        let ((dir, _), (to_dir, to_file)) = (pick(), pick());
        let link = root.join(format!("d{dir:03}/hard{index:03}"));
        fs::hard_link(root.join(file(to_dir, to_file)), &link)
            .with_context(|| format!("cannot create {}", link.display()))?;
    }
    Ok(())
}

/// One way of converting, rerun from scratch for every run.
struct Contender {
    runs: PeerRuns,
    /// Everything a run writes; emptied before each run, outside the timing.
    dir: PathBuf,
    kind: Kind,
}

enum Kind {
    /// `kiln image oci convert SOURCE -o DIR/out` with state `DIR/state`,
    /// a copy of `base` when given, else empty; `built` is how many layer
    /// filesystems each run must say it built.
    Kiln { kiln: PathBuf, source: String, base: Option<PathBuf>, built: usize },
    /// `umoci unpack` into `DIR/bundle`, then `mke2fs -d` of its rootfs
    /// into `DIR/rootfs.ext4` with kiln's geometry.
    Peer { image: String, features: String, blocks: u64, inodes: u64 },
}

impl Contender {
    fn kiln(name: &str, dir: PathBuf, kiln: &Path, source: &str, base: Option<PathBuf>, built: usize) -> Contender {
        let kind = Kind::Kiln { kiln: kiln.to_path_buf(), source: source.to_owned(), base, built };
        Contender { runs: PeerRuns::new(name), dir, kind }
    }

    fn commands(&self) -> Vec<Command> {
        match &self.kind {
            Kind::Kiln { kiln, source, .. } => {
                let mut command = Command::new(kiln);
                command.env(STATE_DIR_ENV, self.dir.join("state"));
                command.args(["image", "oci", "convert", source, "-o"]).arg(self.dir.join("out"));
                vec![command]
            }
            Kind::Peer { image, features, blocks, inodes } => {
                let bundle = self.dir.join("bundle");
                let mut unpack = Command::new("umoci");
                unpack.args(["unpack", "--image", image]).arg(&bundle);
                let rootfs = bundle.join("rootfs");
                vec![unpack, mke2fs_command(&rootfs, &self.dir.join("rootfs.ext4"), features, *blocks, *inodes)]
            }
        }
    }

    /// The ext4 files a run wrote.
    fn outputs(&self) -> Result<Vec<PathBuf>> {
        match self.kind {
            Kind::Kiln { .. } => {
                let out = self.dir.join("out");
                let mut files: Vec<PathBuf> = fs::read_dir(&out)
                    .with_context(|| format!("cannot read {}", out.display()))?
                    .map(|entry| Ok(entry?.path()))
                    .collect::<std::io::Result<_>>()?;
                files.retain(|path| path.extension().is_some_and(|ext| ext == "ext4"));
                files.sort();
                Ok(files)
            }
            Kind::Peer { .. } => Ok(vec![self.dir.join("rootfs.ext4")]),
        }
    }

    /// One run from scratch. kiln's line must say it built what it should;
    /// with `check`, every ext4 written must pass `e2fsck -fn`.
    fn run_once(&self, check: bool) -> Result<Sample> {
        remove_path(&self.dir)?;
        fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        if let Kind::Kiln { base: Some(base), .. } = &self.kind {
            quiet(Command::new("cp").arg("-a").arg(base).arg(self.dir.join("state")))?;
        }
        sync_filesystems();
        let log = self.dir.with_extension("log");
        let sample = measure(&mut self.commands(), &log)?;
        if let Kind::Kiln { built: wanted, .. } = self.kind {
            let built = built_count(&sample.stdout)?;
            if built != wanted {
                bail!("{}: kiln built {built} layer filesystems, expected {wanted}: {}", self.runs.name, sample.stdout);
            }
        }
        if check {
            let outputs = self.outputs()?;
            if outputs.is_empty() {
                bail!("{}: no ext4 written in {}", self.runs.name, self.dir.display());
            }
            for image in outputs {
                let verdict = e2fsck(&image)?;
                if verdict != "clean" {
                    bail!("{}: e2fsck -fn {} failed: {verdict}", self.runs.name, image.display());
                }
            }
        }
        Ok(sample)
    }
}

/// The `N` of convert's `(N built, M from the store)`.
fn built_count(line: &str) -> Result<usize> {
    let count = line
        .split_once(" built, ")
        .and_then(|(before, _)| before.rsplit_once('(').map(|(_, count)| count))
        .with_context(|| format!("kiln's line does not say what it built: `{}`", line.trim()))?;
    count.parse().with_context(|| format!("`{count}` is not a count in `{}`", line.trim()))
}

/// One unmeasured run, its outputs checked.
fn warm_up(contender: &Contender) -> Result<()> {
    announce(&format!("warm-up: {}", contender.runs.name));
    contender.run_once(true).map(drop)
}

/// `runs` measured rounds, each running every contender once.
fn timed_rounds(contenders: &mut [Contender], runs: usize) -> Result<()> {
    announce(&format!("{runs} measured runs of each, interleaved"));
    for round in 1..=runs {
        let mut line = Vec::new();
        for contender in contenders.iter_mut() {
            let sample = contender.run_once(false)?;
            contender.runs.record(&sample);
            line.push(format!("{} {:.0} ms", contender.runs.name, sample.elapsed.as_secs_f64() * 1000.0));
        }
        println!("round {round}/{runs}: {}", line.join(", "));
    }
    Ok(())
}

/// What one image's conversion measured: kiln, then the peer.
struct Conversion {
    image: &'static str,
    contenders: Vec<Contender>,
    /// The tree as `umoci unpack` wrote it, and kiln's filesystem.
    tree: TreeStats,
    kiln_image: String,
}

fn convert_against_peer(kiln: &Path, image: &'static str, source: &str, dir: &Path, runs: usize) -> Result<Conversion> {
    let kiln_runs = Contender::kiln("kiln", dir.join("kiln"), kiln, source, None, 1);
    warm_up(&kiln_runs)?;
    let layer = kiln_runs.dir.join("out/layer0.ext4");
    let features = features_of(&layer)?;
    let (blocks, inodes) = counts_of(&layer)?;
    let kiln_image = format!("{} ext4, {blocks} blocks, {inodes} inodes", format_bytes(blocks * 4096));
    let image_ref = source.strip_prefix("oci:").unwrap_or(source).to_owned();
    let peer = Contender {
        runs: PeerRuns::new("umoci unpack + mke2fs -d"),
        dir: dir.join("peer"),
        kind: Kind::Peer { image: image_ref, features, blocks, inodes },
    };
    warm_up(&peer)?;
    let tree = TreeStats::of(&peer.dir.join("bundle/rootfs"))?;
    let mut contenders = vec![kiln_runs, peer];
    timed_rounds(&mut contenders, runs)?;
    remove_path(dir)?;
    Ok(Conversion { image, contenders, tree, kiln_image })
}

/// Block and inode counts of an ext4 image, from `dumpe2fs -h`.
fn counts_of(image: &Path) -> Result<(u64, u64)> {
    let output = Command::new("dumpe2fs").arg("-h").arg(image).output().context("cannot run dumpe2fs")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| -> Result<u64> {
        let value = text.lines().find_map(|line| line.strip_prefix(name)).map(str::trim);
        let value = value.with_context(|| format!("dumpe2fs -h {} printed no `{name}`", image.display()))?;
        value.parse().with_context(|| format!("`{value}` is not a count"))
    };
    Ok((field("Block count:")?, field("Inode count:")?))
}

/// Entries and data bytes of a tree (a hard-linked file's bytes once).
struct TreeStats {
    entries: u64,
    data_bytes: u64,
}

impl TreeStats {
    fn of(root: &Path) -> Result<TreeStats> {
        let mut stats = TreeStats { entries: 0, data_bytes: 0 };
        let mut seen = HashSet::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
                let entry = entry?;
                let metadata = entry.metadata()?;
                stats.entries += 1;
                if metadata.is_dir() {
                    pending.push(entry.path());
                } else if metadata.is_file() && seen.insert(metadata.ino()) {
                    stats.data_bytes += metadata.len();
                }
            }
        }
        Ok(stats)
    }
}

/// The shared-base measurement: `app` over a store holding `base`, and cold.
struct SharedBase {
    contenders: Vec<Contender>,
    /// `(gzip blob, layer filesystem)` bytes of the base layer and of app's own.
    base_layer: (u64, u64),
    own_layer: (u64, u64),
}

fn shared_base(kiln: &Path, layout: &Path, dir: &Path, runs: usize) -> Result<SharedBase> {
    announce("shared base: converting the Debian image into a state directory, untimed");
    let prepared = Contender::kiln("base", dir.join("base"), kiln, &source(layout, "base"), None, 1);
    prepared.run_once(true)?;
    let base_state = prepared.dir.join("state");
    let app = source(layout, "app");
    let mut contenders = vec![
        Contender::kiln("kiln, base in store", dir.join("warm"), kiln, &app, Some(base_state), 1),
        Contender::kiln("kiln, cold", dir.join("cold"), kiln, &app, None, 2),
    ];
    for contender in &contenders {
        warm_up(contender)?;
    }
    let (base_layer, own_layer) = layer_sizes(&contenders[1].dir.join("out/rootfs.json"))?;
    timed_rounds(&mut contenders, runs)?;
    Ok(SharedBase { contenders, base_layer, own_layer })
}

/// From a two-layer image's `rootfs.json`: `(blob, layer ext4)` bytes of
/// layer 0 and of layer 1.
fn layer_sizes(manifest: &Path) -> Result<((u64, u64), (u64, u64))> {
    let text = fs::read_to_string(manifest).with_context(|| format!("cannot read {}", manifest.display()))?;
    let json = Json::parse(&text).with_context(|| format!("cannot parse {}", manifest.display()))?;
    let array = |key: &str| match json.get(key) {
        Some(Json::Array(items)) if items.len() == 2 => Ok(items.clone()),
        other => bail!("{}: `{key}` is not two entries: {other:?}", manifest.display()),
    };
    let (layers, disks) = (array("layers")?, array("disks")?);
    let sizes = |index: usize| -> Result<(u64, u64)> {
        Ok((layers[index].u64_field("size")?, disks[index].u64_field("bytes")?))
    };
    Ok((sizes(0)?, sizes(1)?))
}

fn report(conversions: &[Conversion], shared: &SharedBase, machine: &Machine, runs: usize) -> Result<()> {
    let header = ["Image", "Converter", "Median ms", "Min ms", "Peak RSS MiB", "First row faster by"];
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    let mut group = |image: &str, contenders: &[Contender]| {
        let first = contenders[0].runs.median_ms();
        for (index, contender) in contenders.iter().enumerate() {
            let median = contender.runs.median_ms();
            rows.push(vec![
                image.to_owned(),
                contender.runs.name.clone(),
                format!("{median:.0}"),
                format!("{:.0}", contender.runs.min_ms()),
                format!("{:.1}", contender.runs.peak_rss_mib()),
                if index == 0 { "-".into() } else { format!("{:.2}x", median / first) },
            ]);
            bars.push((format!("{image}: {}", contender.runs.name), median));
        }
    };
    for conversion in conversions {
        group(conversion.image, &conversion.contenders);
    }
    group("app on Debian", &shared.contenders);

    let mut targets: Vec<Target> = conversions
        .iter()
        .map(|conversion| {
            let ratio = conversion.contenders[1].runs.median_ms() / conversion.contenders[0].runs.median_ms();
            Target {
                description: format!(
                    "{}: kiln >= {MIN_SPEEDUP}x faster than umoci unpack + mke2fs -d",
                    conversion.image
                ),
                met: ratio >= MIN_SPEEDUP,
                actual: format!("{ratio:.2}x"),
            }
        })
        .collect();
    let (warm, cold) = (shared.contenders[0].runs.median_ms(), shared.contenders[1].runs.median_ms());
    let (own_blob, own_fs) = shared.own_layer;
    let (base_blob, base_fs) = shared.base_layer;
    targets.push(Target {
        description: format!(
            "shared base: converting app over its base in the store (1 layer filesystem built, checked on every \
             run) takes <= {MAX_WARM_SHARE} of converting it cold"
        ),
        met: warm / cold <= MAX_WARM_SHARE,
        actual: format!(
            "{warm:.0} ms against {cold:.0} ms, {:.2} of it; own layer {} blob, {} ext4, against the base's {} blob, \
             {} ext4 ({:.1}% of the image's blob bytes)",
            warm / cold,
            format_bytes(own_blob),
            format_bytes(own_fs),
            format_bytes(base_blob),
            format_bytes(base_fs),
            100.0 * own_blob as f64 / (own_blob + base_blob) as f64
        ),
    });

    let images: Vec<String> = conversions
        .iter()
        .map(|c| {
            format!(
                "{}: {} entries, {} of data ({} from kiln)",
                c.image,
                c.tree.entries,
                format_bytes(c.tree.data_bytes),
                c.kiln_image
            )
        })
        .collect();
    let workload = format!(
        "OCI image layouts made by umoci: {}; app on Debian: the Debian image's layer (same blob) plus its own \
         ({} gzip)",
        images.join("; "),
        format_bytes(own_blob)
    );
    let method = format!(
        "median of {runs} runs each after one warm-up, page cache warm, runs interleaved; kiln is `kiln image oci \
         convert oci:LAYOUT:TAG -o OUT` from an empty KILN_STATE_DIR (pull, digests verified, layers decompressed, \
         layer ext4 built, copied into OUT), or from a fresh copy of a state holding the Debian image; the peer is \
         `umoci unpack` then `mke2fs -d` with kiln's features, block and inode counts (from dumpe2fs); every ext4 of \
         the warm-up runs passed `e2fsck -fn`"
    );
    print_report("OCI conversion: `cargo xtask bench oci`", machine, &workload, &method, (&header, &rows), &targets);
    BarChart::peers(
        "OCI image layout to bootable ext4 rootfs (lower is better)",
        format!("median ms of {runs} runs"),
        bars,
    )
    .write("oci")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convert_line_says_how_many_layer_filesystems_it_built() {
        let line = "Wrote out: 2 layer filesystems of oci:/l:app (1 built, 1 from the store), 90.1 MiB of ext4, 9 ms\n";
        assert_eq!(built_count(line).expect("a count"), 1);
        assert!(built_count("Wrote out: 2 layer filesystems, 9 ms").is_err());
    }
}
