//! `cargo xtask bench oci`, the run half: what a VM of an OCI image costs
//! against a VM of a binary, both started by `kiln::run` (QEMU under TCG).
//!
//! - Warm cache: host-side work on the image (`RunOutcome::image_ms`: the
//!   pull from the store, the reference, finding or building the layer
//!   filesystems) cold (empty state directory) and warm (the second run),
//!   and kiln's whole host-side work (`host_ms`) next to a binary VM's.
//! - Boot: kiln-init's console timing line, init to service and kernel to
//!   service, for the image VM (layer disks overlaid, the container set up)
//!   and the binary VM.
//!
//! The image is made by umoci (never by kiln): busybox, static from the
//! host, in two layers, with an entrypoint that exits 0 at once. It is
//! cached under target/bench/. The binary VM runs `service-probe`, which
//! also exits 0 at once. The figures come from the `oci_run_bench` example,
//! which calls `kiln::run` inside a network namespace created here (root
//! only) and boots the real guest each time.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::chart::{Bar, BarChart};
use super::{Machine, Options, Target, median, number, parse_lines, print_report, remove_path};
use crate::{announce, cargo, guest, run_command, target_dir};

const WARM_IMAGE_TARGET_MS: f64 = 5.0;
/// The umoci image's directory under target/bench/; bump the suffix when
/// [`build_image`] changes what it makes.
const IMAGE_CACHE: &str = "oci-run-image-v1";
const TAG: &str = "bench";
const BUSYBOX: &str = "/usr/bin/busybox";

pub(super) fn run(options: &Options) -> Result<()> {
    if !crate::debian::is_root() {
        println!("bench oci (run): needs root (a namespace, a tap, nftables); skipped");
        return Ok(());
    }
    let guest_dir = guest::guest_dir()?;
    let probe = guest_dir.join("service-probe");
    if !probe.is_file() {
        bail!("{} is missing: run `cargo xtask guest` first", probe.display());
    }
    let bench_dir = std::path::absolute(target_dir().join("bench"))?;
    let layout = cached_image(&bench_dir.join(IMAGE_CACHE))?;
    announce("building the release oci_run_bench example");
    run_command(cargo().args(["build", "--release", "-p", "kiln", "--example", "oci_run_bench"]))?;
    let bench = target_dir().join("release").join("examples").join("oci_run_bench");

    let dir = bench_dir.join("oci-run");
    remove_path(&dir)?;
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::copy(&probe, dir.join("service-probe")).with_context(|| format!("cannot copy {}", probe.display()))?;
    // The same resources for both, no data disk: the image's upper layer is a tmpfs.
    let image_spec = dir.join("image.toml");
    fs::write(
        &image_spec,
        format!(
            "name = \"bench-img\"\n[service]\nimage = \"oci:{}:{TAG}\"\n[resources]\nmemory = \"256MiB\"\n",
            layout.display()
        ),
    )?;
    let binary_spec = dir.join("binary.toml");
    fs::write(
        &binary_spec,
        "name = \"bench-bin\"\n[service]\nbinary = \"service-probe\"\n[resources]\nmemory = \"256MiB\"\n",
    )?;

    let netns = format!("kiln-bench-oci-{}", std::process::id());
    run_command(Command::new("ip").args(["netns", "add", &netns]))?;
    announce(&format!(
        "oci_run_bench: {} rounds of (cold image, warm image, warm binary), each booting the guest",
        options.runs
    ));
    let output = Command::new(&bench)
        .arg(&netns)
        .arg(dir.join("state"))
        .arg(&guest_dir)
        .arg(&image_spec)
        .arg(&binary_spec)
        .arg(options.runs.to_string())
        .env("KILN_QEMU_ACCEL", "tcg")
        .output();
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    let output = output.with_context(|| format!("cannot run {}", bench.display()))?;
    if !output.status.success() {
        bail!("oci_run_bench failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr).trim_end());
    }
    let runs = parse_lines(&String::from_utf8_lossy(&output.stdout), "oci_run_bench", parse_run)?;
    let of = |kind: Kind| runs.iter().filter(|run| run.kind == kind).cloned().collect::<Vec<_>>();
    let (cold, warm, binary) = (of(Kind::ColdImage), of(Kind::WarmImage), of(Kind::WarmBinary));
    if [&cold, &warm, &binary].iter().any(|kind| kind.len() != options.runs) {
        bail!(
            "oci_run_bench printed {} cold image, {} warm image and {} warm binary runs, expected {} each",
            cold.len(),
            warm.len(),
            binary.len(),
            options.runs
        );
    }
    let machine = Machine::detect(&dir);
    remove_path(&dir)?;
    report(options, &machine, &[cold, warm, binary])
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    ColdImage,
    WarmImage,
    WarmBinary,
}

/// One line of `oci_run_bench`.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    kind: Kind,
    host_ms: f64,
    image_ms: Option<f64>,
    layers_built: usize,
    init_start: f64,
    modules_loaded: f64,
    disks_ready: f64,
    service_start: f64,
}

/// `KIND host_ms H image_ms I|- layers_built N init_start S modules_loaded S disks_ready S service_start S`.
fn parse_run(fields: &[&str]) -> Result<Option<Run>> {
    let [
        kind,
        "host_ms",
        host,
        "image_ms",
        image,
        "layers_built",
        layers,
        "init_start",
        init,
        "modules_loaded",
        modules,
        "disks_ready",
        disks,
        "service_start",
        service,
    ] = fields
    else {
        return Ok(None);
    };
    let kind = match *kind {
        "cold-image" => Kind::ColdImage,
        "warm-image" => Kind::WarmImage,
        "warm-binary" => Kind::WarmBinary,
        _ => return Ok(None),
    };
    Ok(Some(Run {
        kind,
        host_ms: number(host)?,
        image_ms: if *image == "-" { None } else { Some(number(image)?) },
        layers_built: layers.parse().with_context(|| format!("`{layers}` is not a count"))?,
        init_start: number(init)?,
        modules_loaded: number(modules)?,
        disks_ready: number(disks)?,
        service_start: number(service)?,
    }))
}

/// Medians of one kind's runs.
#[derive(Debug)]
struct Medians {
    host_ms: f64,
    image_ms: Option<f64>,
    layers_built: usize,
    init_start: f64,
    service_start: f64,
    init_to_service: f64,
    modules: f64,
    disks: f64,
    /// Where the image VM differs most: its layer disks overlaid and the
    /// container set up (the binary VM only spawns its launch script).
    disks_to_service: f64,
}

impl Medians {
    fn of(runs: &[Run]) -> Medians {
        let pick = |value: fn(&Run) -> f64| median(runs.iter().map(value).collect());
        let images: Vec<f64> = runs.iter().filter_map(|run| run.image_ms).collect();
        Medians {
            host_ms: pick(|run| run.host_ms),
            image_ms: (!images.is_empty()).then(|| median(images)),
            layers_built: runs.iter().map(|run| run.layers_built).max().unwrap_or(0),
            init_start: pick(|run| run.init_start),
            service_start: pick(|run| run.service_start),
            init_to_service: pick(|run| run.service_start - run.init_start),
            modules: pick(|run| run.modules_loaded - run.init_start),
            disks: pick(|run| run.disks_ready - run.modules_loaded),
            disks_to_service: pick(|run| run.service_start - run.disks_ready),
        }
    }
}

/// Prints the table and targets and writes the boot chart.
fn report(options: &Options, machine: &Machine, kinds: &[Vec<Run>; 3]) -> Result<()> {
    let [cold, warm, binary] = kinds.each_ref().map(|runs| Medians::of(runs));
    let ms = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    let row = |label: String, m: &Medians| {
        vec![
            label,
            format!("{:.1}", m.host_ms),
            ms(m.image_ms),
            format!("{:.2}", m.init_start),
            format!("{:.2}", m.service_start),
            format!("{:.3}", m.init_to_service),
            format!("{:.3}", m.modules),
            format!("{:.3}", m.disks),
            format!("{:.3}", m.disks_to_service),
        ]
    };
    let header = [
        "run (QEMU TCG)",
        "kiln's host-side work ms",
        "of which the image ms",
        "init start s",
        "service start s",
        "init to service s",
        "of which modules s",
        "of which disks s",
        "of which disks ready to service s",
    ];
    // Paired within each round, so load that drifts between rounds (these
    // machines are shared) falls on both sides of a difference alike.
    let [_, warm_runs, binary_runs] = kinds;
    let added = |value: fn(&Run) -> f64| {
        let differences = warm_runs.iter().zip(binary_runs).map(|(image, binary)| value(image) - value(binary));
        median(differences.collect())
    };
    let host_added = added(|run| run.host_ms);
    let rows = vec![
        row(format!("image, cold (pull, {} layer filesystems built)", cold.layers_built), &cold),
        row("image, warm (layer filesystems reused)".to_owned(), &warm),
        row("binary, warm (service-probe)".to_owned(), &binary),
        vec![
            "warm image - warm binary (median of per-round differences)".to_owned(),
            format!("{host_added:+.1}"),
            "-".to_owned(),
            format!("{:+.2}", added(|run| run.init_start)),
            format!("{:+.2}", added(|run| run.service_start)),
            format!("{:+.3}", added(|run| run.service_start - run.init_start)),
            format!("{:+.3}", added(|run| run.modules_loaded - run.init_start)),
            format!("{:+.3}", added(|run| run.disks_ready - run.modules_loaded)),
            format!("{:+.3}", added(|run| run.service_start - run.disks_ready)),
        ],
    ];
    let warm_image_ms = warm.image_ms.unwrap_or(f64::NAN);
    let targets = [Target {
        description: format!(
            "warm: what an image adds to kiln's host-side work (image_ms: store, reference, layer filesystems) <= \
             {WARM_IMAGE_TARGET_MS} ms"
        ),
        met: warm_image_ms <= WARM_IMAGE_TARGET_MS,
        actual: format!(
            "{warm_image_ms:.2} ms; whole host-side work {:.1} ms against the binary VM's {:.1} ms",
            warm.host_ms, binary.host_ms
        ),
    }];
    let workload = "a umoci-made image (busybox static from the host in two layers, entrypoint /bin/true) as \
                    `service.image = \"oci:LAYOUT:TAG\"` against `service.binary` = service-probe (exits at once); \
                    256 MiB, no data disk (the image's upper layer is a tmpfs); QEMU under TCG, inside a fresh \
                    network namespace";
    let method = format!(
        "median of {} rounds of (cold image, warm image, warm binary), interleaved after one untimed round, each \
         booted by `kiln::run`; cold empties the image VM's state directory (store included) first; host-side \
         figures from `RunOutcome` (`host_ms`: `kiln::run` start to the VMM spawn; `image_ms`: the image's part of \
         it), boot figures from kiln-init's console timing line (seconds since kernel start, guest clock; for the \
         image, service start is after the container's setup, when its program runs)",
        options.runs
    );
    print_report("OCI run: `cargo xtask bench oci`", machine, workload, &method, (&header, &rows), &targets);
    BarChart {
        title: "kiln run under QEMU TCG: image VM against binary VM, kernel start to the service".to_owned(),
        axis: format!("seconds since kernel start, median of {} boots", options.runs),
        segments: vec![
            "kernel to kiln-init".into(),
            "modules".into(),
            "disks".into(),
            "disks ready to the service (container setup)".into(),
        ],
        // The longest bar first: the legend sits in the lower right.
        bars: [("image, cold", &cold), ("image, warm", &warm), ("binary, warm", &binary)]
            .into_iter()
            .map(|(label, m)| Bar::new(label, vec![m.init_start, m.modules, m.disks, m.disks_to_service]))
            .collect(),
    }
    .write("oci-run")?;
    Ok(())
}

/// The umoci image under `dir`, built there once: returns its layout.
fn cached_image(dir: &Path) -> Result<PathBuf> {
    let layout = dir.join("layout");
    if layout.join("index.json").is_file() {
        announce(&format!("reusing the umoci image in {}", layout.display()));
        return Ok(layout);
    }
    let umoci = kiln_vmm::find_on_path("umoci").context("umoci is not on PATH; install Debian's umoci")?;
    announce(&format!("building the benchmark's image with umoci in {}", dir.display()));
    // Built aside and renamed, so a failed build never passes for a cached image.
    let building = dir.with_extension("building");
    remove_path(&building)?;
    fs::create_dir_all(&building).with_context(|| format!("cannot create {}", building.display()))?;
    build_image(&umoci, &building)?;
    remove_path(dir)?;
    fs::rename(&building, dir).with_context(|| format!("cannot rename {} to {}", building.display(), dir.display()))?;
    Ok(layout)
}

/// A two-layer busybox image made by umoci in `dir/layout` (tag
/// [`TAG`]): busybox and root's passwd/group, then a small second layer;
/// the entrypoint `/bin/true` exits 0 at once.
fn build_image(umoci: &Path, dir: &Path) -> Result<()> {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let image = format!("{}:{TAG}", layout.display());
    let umoci_run = |args: &[&str]| run_command(Command::new(umoci).args(args));
    umoci_run(&["init", "--layout", &layout.to_string_lossy()])?;
    umoci_run(&["new", "--image", &image])?;
    umoci_run(&["unpack", "--image", &image, &bundle.to_string_lossy()])?;
    let rootfs = bundle.join("rootfs");
    for sub in ["bin", "etc", "tmp"] {
        fs::create_dir_all(rootfs.join(sub)).with_context(|| format!("cannot create {sub} in the bundle"))?;
    }
    fs::copy(BUSYBOX, rootfs.join("bin/busybox"))
        .with_context(|| format!("cannot copy {BUSYBOX}; install busybox-static"))?;
    for applet in ["sh", "true"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    // --refresh-bundle: without it the next repack rebases the tag and drops this layer.
    umoci_run(&["repack", "--refresh-bundle", "--image", &image, &bundle.to_string_lossy()])?;
    fs::write(rootfs.join("etc/motd"), "the benchmark's second layer\n")?;
    umoci_run(&["repack", "--refresh-bundle", "--image", &image, &bundle.to_string_lossy()])?;
    umoci_run(&["config", "--image", &image, "--config.entrypoint", "/bin/true", "--config.env", "PATH=/bin"])?;
    remove_path(&bundle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_of_oci_run_bench_parses_and_others_do_not() {
        let line = "warm-image host_ms 7.250 image_ms 0.910 layers_built 0 init_start 2.170000 modules_loaded 2.5 disks_ready 2.700000 \
                    service_start 2.900000";
        let fields: Vec<&str> = line.split_whitespace().collect();
        let run = parse_run(&fields).unwrap().unwrap();
        assert_eq!(
            run,
            Run {
                kind: Kind::WarmImage,
                host_ms: 7.25,
                image_ms: Some(0.91),
                layers_built: 0,
                init_start: 2.17,
                modules_loaded: 2.5,
                disks_ready: 2.7,
                service_start: 2.9
            }
        );
        let binary = "warm-binary host_ms 6 image_ms - layers_built 0 init_start 2 modules_loaded 2.3 disks_ready 2.4 service_start 2.5";
        let fields: Vec<&str> = binary.split_whitespace().collect();
        assert_eq!(parse_run(&fields).unwrap().unwrap().image_ms, None);
        let fields: Vec<&str> = "cold host_ms 1 boot_request_ms 2".split_whitespace().collect();
        assert!(parse_run(&fields).unwrap().is_none());
        let bad = line.replace("7.250", "fast");
        let fields: Vec<&str> = bad.split_whitespace().collect();
        assert!(parse_run(&fields).is_err());
    }
}
