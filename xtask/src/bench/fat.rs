//! `cargo xtask bench fat`: a service disk's worth of data (a 100 MiB binary
//! plus a 200-file keystore) put into a FAT image by kiln, by the `fatfs`
//! crate path kiln replaces, and by `mkfs.fat` + `mcopy`; `cp -r` of the same
//! bytes on the same filesystem is the floor.
//!
//! Page cache cannot be dropped (no root assumed, and it would measure the
//! disk, not the tools), so every peer runs once unmeasured first and all of
//! them read warm inputs. Measured runs are interleaved round by round so
//! drift on a shared machine spreads over all peers alike.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::chart::BarChart;
use super::{
    Machine, Options, PeerRuns, Sample, Target, XorShift, kib_to_mib, measure, print_targets_and_markdown_heading,
    remove_path, render_table, sync_filesystems,
};
use crate::json::Json;
use crate::{announce, cargo, debian, format_bytes, run_command, target_dir};

use kiln_guest::SERVICE_DISK_LABEL as LABEL;
const SERVICE_BYTES: u64 = 100 << 20;
const KEYSTORE_DIRS: usize = 10;
const FILES_PER_DIR: usize = 20;
const KEY_BYTES: usize = 2 << 10;
const WORKLOAD_SEED: u64 = 0x6b69_6c6e;
const BIG_SEED: u64 = 0x0062_6967;
/// The kiln-only run that shows peak memory does not grow with the input.
const BIG_BYTES: u64 = 1 << 30;

// The issue's targets.
const MAX_TIMES_FLOOR: f64 = 1.5;
const MIN_SPEEDUP_OVER_FATFS: f64 = 10.0;
const MIN_SPEEDUP_OVER_MKFS: f64 = 2.0;
const MAX_PEAK_RSS_MIB: f64 = 32.0;

/// One way of producing the result, rebuilt for every run (`Command` is single-use).
struct Peer {
    runs: PeerRuns,
    output: PathBuf,
    commands: Box<dyn Fn() -> Vec<Command>>,
    /// `fsck.fat -n` verdict on the warm-up output; `None` when not an image.
    fsck: Option<String>,
}

impl Peer {
    fn new(name: &str, output: PathBuf, commands: impl Fn(&Path) -> Vec<Command> + 'static) -> Peer {
        let target = output.clone();
        Peer { runs: PeerRuns::new(name), output, commands: Box::new(move || commands(&target)), fsck: None }
    }

    /// The unmeasured first run: warms the page cache, and its output is
    /// checked with `fsck.fat` when it is an image.
    fn warm_up(&mut self, bench_dir: &Path) -> Result<Sample> {
        announce(&format!("warm-up: {}", self.runs.name));
        self.run_once(bench_dir)
    }

    fn run_once(&mut self, bench_dir: &Path) -> Result<Sample> {
        let sample = measure(&mut (self.commands)(), &log_path(bench_dir, &self.runs.name))?;
        if self.fsck.is_none() && self.output.is_file() {
            self.fsck = Some(fsck(&self.output)?);
        }
        remove_path(&self.output)?;
        Ok(sample)
    }
}

pub(super) fn run(options: &Options) -> Result<()> {
    debian::ensure_installed(&[&["dosfstools"], &["mtools"]])?;
    announce("building release kiln and the fatfs reference path");
    run_command(cargo().args(["build", "--release", "-p", "kiln", "--bin", "kiln"]))?;
    run_command(cargo().args(["build", "--release", "-p", "kiln-imagefmt", "--example", "fatfs_reference"]))?;
    let release = target_dir().join("release");
    let tools = Tools { kiln: release.join("kiln"), fatfs_reference: release.join("examples").join("fatfs_reference") };

    let bench_root = target_dir().join("bench");
    run_suite(&tools, &bench_root.join("fat"), options, options.big)?;
    if !options.xfs {
        return Ok(());
    }
    if !debian::is_root() {
        println!("\nskipping the XFS run: a loop mount needs root (or pass --no-xfs)");
        return Ok(());
    }
    // On a filesystem with reflinks, copy_file_range shares kiln's
    // block-aligned file data instead of copying it.
    debian::ensure_installed(&[&["xfsprogs"]])?;
    let mount = XfsLoopMount::create(&bench_root.join("xfs"))?;
    run_suite(&tools, &mount.dir.join("fat"), options, false)
}

struct Tools {
    kiln: PathBuf,
    fatfs_reference: PathBuf,
}

/// One full run of every peer in `bench_dir`, and its report.
fn run_suite(tools: &Tools, bench_dir: &Path, options: &Options, big: bool) -> Result<()> {
    remove_path(bench_dir)?;
    let work = bench_dir.join("work");
    let out = bench_dir.join("out");
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    announce(&format!("generating the workload in {}", work.display()));
    let data_bytes = generate_workload(&work)?;
    sync_filesystems();

    let mut peers = vec![kiln_peer(tools.kiln.clone(), work.clone(), out.join("kiln.img"))];
    // kiln's warm-up run also sizes the other peers' images.
    let warm_up = peers[0].warm_up(bench_dir)?;
    let summary = Json::parse(warm_up.stdout.trim()).context("cannot read kiln's --json summary")?;
    let image_bytes = summary.u64_field("image_bytes")?;
    let image = format!(
        "{} {} image with {}-byte clusters",
        format_bytes(image_bytes),
        summary.text_field("fat_type")?,
        summary.u64_field("cluster_size")?
    );
    peers.extend(reference_peers(tools.fatfs_reference.clone(), &work, &out, image_bytes));
    for peer in &mut peers[1..] {
        peer.warm_up(bench_dir)?;
    }

    announce(&format!("{} measured runs of each peer, interleaved", options.runs));
    for round in 1..=options.runs {
        for peer in &mut peers {
            sync_filesystems();
            let sample = peer.run_once(bench_dir)?;
            peer.runs.record(&sample);
        }
        println!("round {round}/{}: {}", options.runs, round_line(&peers));
    }

    let big = if big { Some(big_run(&tools.kiln, bench_dir)?) } else { None };
    let machine = Machine::detect(bench_dir);
    remove_path(bench_dir)?;
    let report = Report { peers: &peers, data_bytes, image, runs: options.runs, big: big.as_ref(), machine };
    report.print();
    report.chart().write(&format!("fat-{}", report.machine.filesystem))?;
    Ok(())
}

/// A sparse file formatted as XFS with reflinks and loop-mounted; unmounted
/// and removed on drop, whatever happened in between.
struct XfsLoopMount {
    image: PathBuf,
    dir: PathBuf,
}

impl XfsLoopMount {
    const SIZE: u64 = 4 << 30;

    fn create(root: &Path) -> Result<XfsLoopMount> {
        let image = root.with_extension("img");
        let dir = root.to_path_buf();
        // A mount left by an interrupted run would make mkfs fail; clear it.
        let _ = Command::new("umount").arg(&dir).output();
        remove_path(&image)?;
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        File::create(&image)
            .and_then(|file| file.set_len(Self::SIZE))
            .with_context(|| format!("cannot create {}", image.display()))?;
        announce(&format!("formatting {} as XFS with reflink=1 and loop-mounting it", image.display()));
        run_command(Command::new("mkfs.xfs").args(["-q", "-f", "-m", "reflink=1"]).arg(&image))?;
        run_command(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&dir))?;
        Ok(XfsLoopMount { image, dir })
    }
}

impl Drop for XfsLoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = fs::remove_dir(&self.dir);
        let _ = fs::remove_file(&self.image);
    }
}

fn kiln_peer(kiln: PathBuf, work: PathBuf, output: PathBuf) -> Peer {
    Peer::new("kiln", output, move |output| {
        let mut command = Command::new(&kiln);
        command
            .args(["image", "fat", "-o"])
            .arg(output)
            .args(["--label", LABEL, "--json"])
            .arg(format!("service={}", work.join("service").display()))
            .arg(format!("keystore={}", work.join("keystore").display()));
        vec![command]
    })
}

/// The peers kiln is compared with, the `cp -r` floor last.
fn reference_peers(fatfs_reference: PathBuf, work: &Path, out: &Path, image_bytes: u64) -> Vec<Peer> {
    let fatfs = Peer::new("fatfs crate", out.join("fatfs.img"), {
        let work = work.to_path_buf();
        move |output| {
            let mut command = Command::new(&fatfs_reference);
            command.arg(output).arg(image_bytes.to_string()).arg(&work);
            vec![command]
        }
    });
    let mkfs_mcopy = Peer::new("mkfs.fat + mcopy", out.join("mkfs.img"), {
        let work = work.to_path_buf();
        move |output| {
            let mut mkfs = Command::new("mkfs.fat");
            mkfs.args(["-C", "-n", LABEL]).arg(output).arg(image_bytes.div_ceil(1024).to_string());
            let mut mcopy = Command::new("mcopy");
            mcopy
                .env("MTOOLS_SKIP_CHECK", "1")
                .env("LC_ALL", "C.UTF-8")
                .args(["-s", "-i"])
                .arg(output)
                .arg(work.join("service"))
                .arg(work.join("keystore"))
                .arg("::/");
            vec![mkfs, mcopy]
        }
    });
    let cp = Peer::new("cp -r (floor)", out.join("cp"), {
        let work = work.to_path_buf();
        move |output| {
            let mut cp = Command::new("cp");
            cp.arg("-r").arg(&work).arg(output);
            vec![cp]
        }
    });
    vec![fatfs, mkfs_mcopy, cp]
}

fn log_path(bench_dir: &Path, peer: &str) -> PathBuf {
    let name: String = peer.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    bench_dir.join(format!("{name}.log"))
}

/// Writes the workload: `service` and `keystore/dNN/secret-NN.key`, from a
/// fixed seed so every run and machine sees the same bytes. Returns the data size.
pub(super) fn generate_workload(work: &Path) -> Result<u64> {
    let mut random = XorShift::new(WORKLOAD_SEED);
    write_random_file(&work.join("service"), SERVICE_BYTES, &mut random)?;
    let mut key = vec![0u8; KEY_BYTES];
    for dir_index in 0..KEYSTORE_DIRS {
        let dir = work.join("keystore").join(format!("d{dir_index:02}"));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for file_index in 0..FILES_PER_DIR {
            random.fill(&mut key);
            let path = dir.join(format!("secret-{file_index:02}.key"));
            fs::write(&path, &key).with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(SERVICE_BYTES + (KEYSTORE_DIRS * FILES_PER_DIR * KEY_BYTES) as u64)
}

pub(super) fn write_random_file(path: &Path, size: u64, random: &mut XorShift) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = BufWriter::new(file);
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let len = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        random.fill(&mut chunk[..len]);
        writer.write_all(&chunk[..len]).with_context(|| format!("cannot write {}", path.display()))?;
        left -= len as u64;
    }
    writer.flush().with_context(|| format!("cannot write {}", path.display()))
}

/// `fsck.fat -n` on an image: "clean" when it prints only its version and
/// summary lines, else the number of lines it complained with.
fn fsck(image: &Path) -> Result<String> {
    let output = Command::new("fsck.fat").arg("-n").arg(image).output().context("cannot run fsck.fat")?;
    let lines = String::from_utf8_lossy(&output.stdout).lines().count();
    Ok(if output.status.success() && lines <= 2 {
        "clean".to_owned()
    } else {
        format!("{} complaint lines", lines.saturating_sub(2).max(1))
    })
}

fn round_line(peers: &[Peer]) -> String {
    let times: Vec<String> = peers
        .iter()
        .filter_map(|peer| Some(format!("{} {:.0} ms", peer.runs.name, peer.runs.times.last()?.as_secs_f64() * 1000.0)))
        .collect();
    times.join(", ")
}

/// kiln alone on one file ten times the size of the main workload.
fn big_run(kiln: &Path, bench_dir: &Path) -> Result<Sample> {
    let work = bench_dir.join("work-big");
    announce(&format!("kiln alone on a {} file", format_bytes(BIG_BYTES)));
    write_random_file(&work.join("service"), BIG_BYTES, &mut XorShift::new(BIG_SEED))?;
    sync_filesystems();
    let output = bench_dir.join("out").join("big.img");
    let mut command = Command::new(kiln);
    command
        .args(["image", "fat", "-o"])
        .arg(&output)
        .args(["--label", LABEL, "--json"])
        .arg(format!("service={}", work.join("service").display()));
    let sample = measure(&mut [command], &bench_dir.join("kiln-big.log"))?;
    remove_path(&output)?;
    remove_path(&work)?;
    Ok(sample)
}

struct Report<'a> {
    peers: &'a [Peer],
    data_bytes: u64,
    image: String,
    runs: usize,
    big: Option<&'a Sample>,
    machine: Machine,
}

impl Report<'_> {
    fn kiln(&self) -> &PeerRuns {
        &self.peers[0].runs
    }

    fn floor(&self) -> &PeerRuns {
        &self.peers[self.peers.len() - 1].runs
    }

    fn rows(&self) -> Vec<Vec<String>> {
        let kiln = self.kiln().median_ms();
        let floor = self.floor().median_ms();
        self.peers
            .iter()
            .map(|peer| {
                let median = peer.runs.median_ms();
                vec![
                    peer.runs.name.clone(),
                    format!("{median:.0}"),
                    format!("{:.0}", peer.runs.min_ms()),
                    format!("{:.1}", peer.runs.peak_rss_mib()),
                    format!("{:.2}x", median / floor),
                    if peer.runs.name == self.kiln().name { "-".into() } else { format!("{:.1}x", median / kiln) },
                    peer.fsck.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect()
    }

    fn table(&self, markdown: bool) -> String {
        let header = ["Peer", "Median ms", "Min ms", "Peak RSS MiB", "vs cp floor", "kiln faster by", "fsck.fat -n"];
        render_table(&header, &self.rows(), markdown)
    }

    /// How many times faster kiln is than the peer whose name starts with `name_prefix`.
    fn speedup_over(&self, name_prefix: &str) -> f64 {
        let peer = self.peers.iter().find(|peer| peer.runs.name.starts_with(name_prefix));
        peer.map_or(f64::NAN, |peer| peer.runs.median_ms() / self.kiln().median_ms())
    }

    fn kiln_peak_rss_mib(&self) -> f64 {
        let big = self.big.map_or(0, |big| big.peak_rss_kib);
        kib_to_mib(self.kiln().peak_rss_kib.max(big))
    }

    fn targets(&self) -> Vec<Target> {
        let times_floor = self.kiln().median_ms() / self.floor().median_ms();
        let over_fatfs = self.speedup_over("fatfs");
        let over_mkfs = self.speedup_over("mkfs");
        let peak = self.kiln_peak_rss_mib();
        vec![
            Target {
                description: format!("kiln <= {MAX_TIMES_FLOOR}x the cp floor"),
                met: times_floor <= MAX_TIMES_FLOOR,
                actual: format!("{times_floor:.2}x"),
            },
            Target {
                description: format!("kiln >= {MIN_SPEEDUP_OVER_FATFS}x faster than the fatfs crate path"),
                met: over_fatfs >= MIN_SPEEDUP_OVER_FATFS,
                actual: format!("{over_fatfs:.1}x"),
            },
            Target {
                description: format!("kiln >= {MIN_SPEEDUP_OVER_MKFS}x faster than mkfs.fat + mcopy"),
                met: over_mkfs >= MIN_SPEEDUP_OVER_MKFS,
                actual: format!("{over_mkfs:.1}x"),
            },
            Target {
                description: format!(
                    "kiln peak RSS <= {MAX_PEAK_RSS_MIB} MiB{}",
                    if self.big.is_some() { " (both inputs)" } else { "" }
                ),
                met: peak <= MAX_PEAK_RSS_MIB,
                actual: format!("{peak:.1} MiB"),
            },
        ]
    }

    fn workload(&self) -> String {
        format!(
            "{} `service` + {} files of {} in {} `keystore/` dirs ({} of data) -> {}",
            format_bytes(SERVICE_BYTES),
            KEYSTORE_DIRS * FILES_PER_DIR,
            format_bytes(KEY_BYTES as u64),
            KEYSTORE_DIRS,
            format_bytes(self.data_bytes),
            self.image,
        )
    }

    fn big_line(&self) -> Option<String> {
        let big = self.big?;
        Some(format!(
            "kiln alone on a {} file: {:.0} ms, peak RSS {:.1} MiB (on the {} workload: {:.1} MiB)",
            format_bytes(BIG_BYTES),
            big.elapsed.as_secs_f64() * 1000.0,
            kib_to_mib(big.peak_rss_kib),
            format_bytes(self.data_bytes),
            self.kiln().peak_rss_mib(),
        ))
    }

    fn chart(&self) -> BarChart {
        BarChart::peers(
            format!(
                "FAT builder on {}: {} of data into a FAT image (lower is better)",
                self.machine.filesystem,
                format_bytes(self.data_bytes)
            ),
            format!("median ms of {} runs", self.runs),
            self.peers.iter().map(|peer| (peer.runs.name.clone(), peer.runs.median_ms())).collect(),
        )
    }

    fn print(&self) {
        let machine = &self.machine;
        let method =
            format!("median of {} runs per peer after one warm-up each, page cache warm, runs interleaved", self.runs);
        let targets = self.targets();
        println!();
        println!("workload: {}", self.workload());
        println!("{method}");
        println!();
        print!("{}", self.table(false));
        println!();
        for peer in &self.peers[1..] {
            let ratio = peer.runs.median_ms() / self.kiln().median_ms();
            let name = &peer.runs.name;
            if ratio >= 1.0 {
                println!("kiln is {ratio:.1}x faster than {name}");
            } else {
                println!("kiln takes {:.2}x the time of {name}", 1.0 / ratio);
            }
        }
        if let Some(line) = self.big_line() {
            println!("{line}");
        }
        print_targets_and_markdown_heading(
            &targets,
            &format!("FAT builder on {}: `cargo xtask bench fat`", machine.filesystem),
            machine,
            &self.workload(),
            &method,
        );
        println!();
        print!("{}", self.table(true));
        println!();
        if let Some(line) = self.big_line() {
            println!("{line}.");
            println!();
        }
        for target in &targets {
            println!("- {}", target.line());
        }
        println!("--- end ---");
    }
}
