//! `cargo xtask bench qcow2`: kiln's qcow2 writer against `qemu-img`.
//!
//! Two workloads. **Create** an empty 20 GiB image with 64 KiB clusters:
//! kiln's library call timed inside a process (the `qcow2_bench` example),
//! which is what a caller embedding kiln pays per disk, against spawning
//! `qemu-img create`, which is what the reference design pays; the spawned
//! `kiln image qcow2 create` is shown too, process against process.
//! **Convert** a 512 MiB raw image that is half zeros: the spawned
//! `kiln image qcow2 convert` against `qemu-img convert -O qcow2`, both
//! processes, with peak memory from `wait4`.
//!
//! As in `bench fat`, every peer runs once unmeasured first (its output is
//! checked by `qemu-img`), inputs are read from a warm page cache, and the
//! measured runs are interleaved round by round.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::chart::BarChart;
use super::{
    Machine, Options, PeerRuns, Sample, Target, XorShift, measure, print_targets_and_markdown_heading, remove_path,
    render_table, sync_filesystems,
};
use crate::json::Json;
use crate::{announce, cargo, debian, format_bytes, run_command, target_dir};

/// The data disk size the reference design creates with `qemu-img create`.
const VIRTUAL_SIZE: u64 = 20 << 30;
/// qemu-img's default, and kiln's.
const CLUSTER_SIZE: u64 = 64 << 10;
const RAW_BYTES: u64 = 512 << 20;
/// The raw image alternates a stripe of random data and a stripe of zeros.
const STRIPE_BYTES: usize = 1 << 20;
const WORKLOAD_SEED: u64 = 0x7163_6f77;

// The targets.
const MIN_CREATE_SPEEDUP: f64 = 10.0;
const MIN_CONVERT_SPEEDUP: f64 = 1.0;

/// How a peer's time is taken.
#[derive(Debug, Clone, Copy)]
enum Timing {
    /// Spawn to reap of its commands.
    Process,
    /// What the `qcow2_bench` example reports for the library call.
    InProcess,
}

/// What `qemu-img` said about a peer's warm-up output.
#[derive(Debug)]
struct Verdict {
    cells: Vec<String>,
    ok: bool,
}

/// One way of producing the result, rebuilt for every run (`Command` is single-use).
struct Peer {
    runs: PeerRuns,
    timing: Timing,
    /// Where the commands write; for [`Timing::InProcess`], the example says.
    output: PathBuf,
    commands: Box<dyn Fn() -> Vec<Command>>,
    verdict: Option<Verdict>,
}

impl Peer {
    fn new(name: &str, timing: Timing, output: PathBuf, commands: impl Fn(&Path) -> Vec<Command> + 'static) -> Peer {
        let target = output.clone();
        Peer { runs: PeerRuns::new(name), timing, output, commands: Box::new(move || commands(&target)), verdict: None }
    }

    /// The unmeasured first run: warms the page cache and the binaries, and
    /// its output is checked by `verify`.
    fn warm_up(&mut self, bench_dir: &Path, verify: &dyn Fn(&Path) -> Result<Verdict>) -> Result<()> {
        announce(&format!("warm-up: {}", self.runs.name));
        let (_, output) = self.run(bench_dir)?;
        let verdict = verify(&output).with_context(|| format!("cannot check the output of {}", self.runs.name))?;
        self.verdict = Some(verdict);
        remove_path(&output)
    }

    fn measured_run(&mut self, bench_dir: &Path) -> Result<()> {
        sync_filesystems();
        let (sample, output) = self.run(bench_dir)?;
        self.runs.record(&sample);
        remove_path(&output)
    }

    /// One run: its sample (wall time replaced by the in-process figure when
    /// that is how this peer is timed) and the image it wrote.
    fn run(&mut self, bench_dir: &Path) -> Result<(Sample, PathBuf)> {
        let mut sample = measure(&mut (self.commands)(), &log_path(bench_dir, &self.runs.name))?;
        let output = match self.timing {
            Timing::Process => self.output.clone(),
            Timing::InProcess => {
                let (elapsed, output) = parse_in_process(&sample.stdout)?;
                sample.elapsed = elapsed;
                output
            }
        };
        Ok((sample, output))
    }
}

/// The `qcow2_bench` example's one line per timed call: nanoseconds and the image path.
fn parse_in_process(stdout: &str) -> Result<(Duration, PathBuf)> {
    let line = stdout.lines().last().context("qcow2_bench printed nothing")?;
    let (nanos, path) = line.split_once(' ').with_context(|| format!("unexpected qcow2_bench line `{line}`"))?;
    let nanos: u64 = nanos.parse().with_context(|| format!("unexpected qcow2_bench duration `{nanos}`"))?;
    Ok((Duration::from_nanos(nanos), PathBuf::from(path)))
}

struct Tools {
    kiln: PathBuf,
    qcow2_bench: PathBuf,
}

pub(super) fn run(options: &Options) -> Result<()> {
    debian::ensure_installed(&[&["qemu-utils"]])?;
    announce("building release kiln and the in-process qcow2_bench example");
    run_command(cargo().args(["build", "--release", "-p", "kiln", "--bin", "kiln"]))?;
    run_command(cargo().args(["build", "--release", "-p", "kiln-imagefmt", "--example", "qcow2_bench"]))?;
    let release = target_dir().join("release");
    let tools = Tools { kiln: release.join("kiln"), qcow2_bench: release.join("examples").join("qcow2_bench") };
    let qemu_img = qemu_img_version()?;

    let bench_dir = target_dir().join("bench").join("qcow2");
    remove_path(&bench_dir)?;
    let out = bench_dir.join("out");
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;

    let create = create_suite(&tools, &bench_dir, &out, options.runs)?;
    let convert = convert_suite(&tools, &bench_dir, &out, options.runs)?;

    let machine = Machine::detect(&bench_dir);
    remove_path(&bench_dir)?;
    let report = Report { create, convert, runs: options.runs, qemu_img, machine };
    report.print();
    for (name, suite) in [("qcow2-create", &report.create), ("qcow2-convert", &report.convert)] {
        let peers = suite.peers.iter().map(|peer| (peer.runs.name.clone(), peer.runs.median_ms())).collect();
        BarChart::peers(
            format!("{} (lower is better)", suite.title),
            format!("median ms of {} runs", report.runs),
            peers,
        )
        .write(name)?;
    }
    let failed: Vec<&str> = report.suites().flat_map(|suite| suite.failed_checks()).collect();
    if !failed.is_empty() {
        bail!("qemu-img rejected the output of: {}", failed.join(", "));
    }
    Ok(())
}

/// Creating an empty 20 GiB image, the reference design's per-VM data disk.
fn create_suite(tools: &Tools, bench_dir: &Path, out: &Path, runs: usize) -> Result<Suite> {
    let size = VIRTUAL_SIZE.to_string();
    let in_process = Peer::new("kiln in-process (create_qcow2)", Timing::InProcess, out.to_path_buf(), {
        let (qcow2_bench, size) = (tools.qcow2_bench.clone(), size.clone());
        move |dir| {
            let mut command = Command::new(&qcow2_bench);
            command.arg("create").arg(dir).arg(&size).arg("1");
            vec![command]
        }
    });
    let cli = Peer::new("kiln image qcow2 create (CLI)", Timing::Process, out.join("kiln-cli.qcow2"), {
        let (kiln, size) = (tools.kiln.clone(), size.clone());
        move |output| {
            let mut command = Command::new(&kiln);
            command.args(["image", "qcow2", "create"]).arg(output).args(["--size", &size]);
            vec![command]
        }
    });
    let qemu = Peer::new("qemu-img create -f qcow2", Timing::Process, out.join("qemu.qcow2"), |output| {
        let mut command = Command::new("qemu-img");
        command.args(["create", "-f", "qcow2"]).arg(output).arg("20G");
        vec![command]
    });
    let mut suite = Suite {
        title: format!("Create an empty {} qcow2", format_bytes(VIRTUAL_SIZE)),
        peers: vec![in_process, cli, qemu],
        verdict_header: &["qemu-img check", "qemu-img info"],
        decimals: 3,
    };
    suite.run(bench_dir, runs, &|image| {
        let (check, check_ok) = qemu_img_check(image)?;
        let (info, info_ok) = qemu_img_info(image)?;
        Ok(Verdict { cells: vec![check, info], ok: check_ok && info_ok })
    })?;
    Ok(suite)
}

/// Converting a raw image that is half real (written) zeros.
fn convert_suite(tools: &Tools, bench_dir: &Path, out: &Path, runs: usize) -> Result<Suite> {
    let raw = bench_dir.join("raw.img");
    announce(&format!("generating the {} raw image {}", format_bytes(RAW_BYTES), raw.display()));
    write_half_zero_raw(&raw)?;
    sync_filesystems();

    let kiln = Peer::new("kiln image qcow2 convert", Timing::Process, out.join("kiln.qcow2"), {
        let (kiln, raw) = (tools.kiln.clone(), raw.clone());
        move |output| {
            let mut command = Command::new(&kiln);
            command.args(["image", "qcow2", "convert"]).arg(&raw).arg(output);
            vec![command]
        }
    });
    let qemu = Peer::new("qemu-img convert -O qcow2", Timing::Process, out.join("qemu.qcow2"), {
        let raw = raw.clone();
        move |output| {
            let mut command = Command::new("qemu-img");
            command.args(["convert", "-O", "qcow2"]).arg(&raw).arg(output);
            vec![command]
        }
    });
    let mut suite = Suite {
        title: format!("Convert a {} raw image, half zeros, to qcow2", format_bytes(RAW_BYTES)),
        peers: vec![kiln, qemu],
        verdict_header: &["qemu-img check", "qemu-img compare", "qcow2 file"],
        decimals: 0,
    };
    suite.run(bench_dir, runs, &|image| {
        let (check, check_ok) = qemu_img_check(image)?;
        let (compare, compare_ok) = qemu_img_compare(&raw, image)?;
        let file_bytes = fs::metadata(image).with_context(|| format!("cannot stat {}", image.display()))?.len();
        Ok(Verdict { cells: vec![check, compare, format_bytes(file_bytes)], ok: check_ok && compare_ok })
    })?;
    remove_path(&raw)?;
    Ok(suite)
}

/// Writes the convert workload: 1 MiB stripes, alternately xorshift data and
/// zeros that are really written (not holes), so both tools must read and
/// test every byte.
fn write_half_zero_raw(path: &Path) -> Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = BufWriter::new(file);
    let mut random = XorShift::new(WORKLOAD_SEED);
    let mut data = vec![0u8; STRIPE_BYTES];
    let zeros = vec![0u8; STRIPE_BYTES];
    for stripe in 0..RAW_BYTES / STRIPE_BYTES as u64 {
        let bytes = if stripe % 2 == 0 {
            random.fill(&mut data);
            &data
        } else {
            &zeros
        };
        writer.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    writer.flush().with_context(|| format!("cannot write {}", path.display()))
}

/// The first line of `qemu-img --version`, for the record.
fn qemu_img_version() -> Result<String> {
    let output = Command::new("qemu-img").arg("--version").output().context("cannot run qemu-img --version")?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.lines().next().unwrap_or("qemu-img, unknown version").trim().to_owned())
}

/// `qemu-img SUBCOMMAND --output=json -f qcow2 IMAGE`, its status not checked.
fn qemu_img_json(subcommand: &str, image: &Path) -> Result<std::process::Output> {
    Command::new("qemu-img")
        .args([subcommand, "--output=json", "-f", "qcow2"])
        .arg(image)
        .output()
        .with_context(|| format!("cannot run qemu-img {subcommand}"))
}

/// The first line of a tool's message, trimmed.
fn first_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr).lines().next().unwrap_or("").trim().to_owned()
}

/// `qemu-img check`: "clean", or what it found; and whether it was clean.
fn qemu_img_check(image: &Path) -> Result<(String, bool)> {
    let output = qemu_img_json("check", image)?;
    if output.status.success() {
        return Ok(("clean".to_owned(), true));
    }
    // Exit 2 means corruptions, 3 leaks, 1 that the check itself failed.
    let report = Json::parse(String::from_utf8_lossy(&output.stdout).trim());
    let found: Vec<String> = ["corruptions", "leaks", "check-errors"]
        .iter()
        .filter_map(|key| {
            let count = report.as_ref().ok()?.u64_field(key).ok()?;
            (count > 0).then(|| format!("{count} {key}"))
        })
        .collect();
    let verdict = if found.is_empty() {
        format!("failed ({}): {}", output.status, first_line(&output.stderr))
    } else {
        found.join(", ")
    };
    Ok((verdict, false))
}

/// `qemu-img info`: the virtual size and cluster size it reads, and whether they are the requested ones.
fn qemu_img_info(image: &Path) -> Result<(String, bool)> {
    let output = qemu_img_json("info", image)?;
    if !output.status.success() {
        return Ok((format!("failed: {}", first_line(&output.stderr)), false));
    }
    let info = Json::parse(String::from_utf8_lossy(&output.stdout).trim()).context("cannot read qemu-img info")?;
    let virtual_size = info.u64_field("virtual-size")?;
    let cluster_size = info.u64_field("cluster-size")?;
    let ok = virtual_size == VIRTUAL_SIZE && cluster_size == CLUSTER_SIZE;
    let shown = format!("{}, {} clusters", format_bytes(virtual_size), format_bytes(cluster_size));
    Ok((if ok { shown } else { format!("WRONG: {shown} ({virtual_size} bytes)") }, ok))
}

/// `qemu-img compare` of the raw source with a conversion: "identical" or what differs.
fn qemu_img_compare(raw: &Path, image: &Path) -> Result<(String, bool)> {
    let output = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(raw)
        .arg(image)
        .output()
        .context("cannot run qemu-img compare")?;
    // Exit 0 means identical, 1 different, anything else an error.
    Ok(match output.status.code() {
        Some(0) => ("identical".to_owned(), true),
        Some(1) => {
            let stdout = String::from_utf8_lossy(&output.stdout);
            (format!("differs: {}", stdout.lines().next().unwrap_or("").trim()), false)
        }
        _ => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            (format!("failed ({}): {}", output.status, stderr.lines().next().unwrap_or("").trim()), false)
        }
    })
}

fn log_path(bench_dir: &Path, peer: &str) -> PathBuf {
    let name: String = peer.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    bench_dir.join(format!("{name}.log"))
}

/// One workload and its peers; the first peer is the kiln figure the others
/// are compared with.
struct Suite {
    title: String,
    peers: Vec<Peer>,
    verdict_header: &'static [&'static str],
    /// Decimals for milliseconds: sub-millisecond library calls need three.
    decimals: usize,
}

impl Suite {
    fn run(&mut self, bench_dir: &Path, runs: usize, verify: &dyn Fn(&Path) -> Result<Verdict>) -> Result<()> {
        announce(&self.title);
        for peer in &mut self.peers {
            peer.warm_up(bench_dir, verify)?;
        }
        for peer in &self.peers {
            if let Some(verdict) = &peer.verdict {
                let checks: Vec<String> = self
                    .verdict_header
                    .iter()
                    .zip(&verdict.cells)
                    .map(|(what, said)| format!("{what}: {said}"))
                    .collect();
                println!("verified {}: {}", peer.runs.name, checks.join("; "));
            }
        }
        announce(&format!("{runs} measured runs of each peer, interleaved"));
        for round in 1..=runs {
            for peer in &mut self.peers {
                peer.measured_run(bench_dir)?;
            }
            println!("round {round}/{runs}: {}", self.round_line());
        }
        Ok(())
    }

    fn round_line(&self) -> String {
        let decimals = self.decimals;
        let times: Vec<String> = self
            .peers
            .iter()
            .filter_map(|peer| {
                let ms = peer.runs.times.last()?.as_secs_f64() * 1000.0;
                Some(format!("{} {ms:.decimals$} ms", peer.runs.name))
            })
            .collect();
        times.join(", ")
    }

    fn kiln(&self) -> &PeerRuns {
        &self.peers[0].runs
    }

    /// How many times faster kiln is than the peer whose name starts with `name_prefix`.
    fn speedup_over(&self, name_prefix: &str) -> f64 {
        let peer = self.peers.iter().find(|peer| peer.runs.name.starts_with(name_prefix));
        peer.map_or(f64::NAN, |peer| peer.runs.median_ms() / self.kiln().median_ms())
    }

    fn failed_checks(&self) -> impl Iterator<Item = &str> {
        self.peers
            .iter()
            .filter(|peer| peer.verdict.as_ref().is_none_or(|verdict| !verdict.ok))
            .map(|peer| peer.runs.name.as_str())
    }

    fn rows(&self) -> Vec<Vec<String>> {
        let kiln = self.kiln().median_ms();
        let decimals = self.decimals;
        self.peers
            .iter()
            .enumerate()
            .map(|(index, peer)| {
                let median = peer.runs.median_ms();
                let mut row = vec![
                    peer.runs.name.clone(),
                    format!("{median:.decimals$}"),
                    format!("{:.decimals$}", peer.runs.min_ms()),
                    format!("{:.1}", peer.runs.peak_rss_mib()),
                    if index == 0 { "-".into() } else { format!("{:.1}x", median / kiln) },
                ];
                match &peer.verdict {
                    Some(verdict) => row.extend(verdict.cells.iter().cloned()),
                    None => row.extend(self.verdict_header.iter().map(|_| "-".to_owned())),
                }
                row
            })
            .collect()
    }

    fn table(&self, markdown: bool) -> String {
        let mut header = vec!["Peer", "Median ms", "Min ms", "Peak RSS MiB", "kiln faster by"];
        header.extend_from_slice(self.verdict_header);
        render_table(&header, &self.rows(), markdown)
    }

    /// "kiln is 3.0x faster than qemu-img ..." for every qemu-img peer.
    fn ratio_lines(&self) -> Vec<String> {
        let kiln = &self.kiln().name;
        self.peers[1..]
            .iter()
            .filter(|peer| peer.runs.name.starts_with("qemu-img"))
            .map(|peer| ratio_line(kiln, self.kiln().median_ms(), &peer.runs.name, peer.runs.median_ms()))
            .collect()
    }
}

fn ratio_line(fast: &str, fast_ms: f64, slow: &str, slow_ms: f64) -> String {
    let ratio = slow_ms / fast_ms;
    if ratio >= 1.0 {
        format!("{fast} is {ratio:.1}x faster than {slow}")
    } else {
        format!("{fast} takes {:.2}x the time of {slow}", 1.0 / ratio)
    }
}

struct Report {
    create: Suite,
    convert: Suite,
    runs: usize,
    qemu_img: String,
    machine: Machine,
}

impl Report {
    fn suites(&self) -> impl Iterator<Item = &Suite> {
        [&self.create, &self.convert].into_iter()
    }

    fn targets(&self) -> Vec<Target> {
        let create = self.create.speedup_over("qemu-img");
        let convert = self.convert.speedup_over("qemu-img");
        vec![
            Target {
                description: format!(
                    "kiln in-process creates a {} qcow2 >= {MIN_CREATE_SPEEDUP}x faster than qemu-img create",
                    format_bytes(VIRTUAL_SIZE)
                ),
                met: create >= MIN_CREATE_SPEEDUP,
                actual: format!("{create:.1}x"),
            },
            Target {
                description: format!(
                    "kiln converts {} half-zero raw to qcow2 at least as fast as qemu-img convert",
                    format_bytes(RAW_BYTES)
                ),
                met: convert >= MIN_CONVERT_SPEEDUP,
                actual: format!("{convert:.2}x"),
            },
        ]
    }

    /// The process-against-process comparison for create, shown for transparency.
    fn cli_line(&self) -> Option<String> {
        let find = |prefix: &str| self.create.peers.iter().find(|peer| peer.runs.name.starts_with(prefix));
        let (cli, qemu) = (find("kiln image")?, find("qemu-img")?);
        Some(ratio_line(
            &format!("{} (a process, like qemu-img)", cli.runs.name),
            cli.runs.median_ms(),
            &qemu.runs.name,
            qemu.runs.median_ms(),
        ))
    }

    fn workload(&self) -> String {
        format!(
            "create: an empty {} qcow2 with {} clusters; convert: a {} raw image of alternating {} stripes of \
             xorshift data and written zeros ({} of data); both tools with default options; {}",
            format_bytes(VIRTUAL_SIZE),
            format_bytes(CLUSTER_SIZE),
            format_bytes(RAW_BYTES),
            format_bytes(STRIPE_BYTES as u64),
            format_bytes(RAW_BYTES / 2),
            self.qemu_img,
        )
    }

    fn method(&self) -> String {
        format!(
            "median of {} runs per peer after one warm-up each, page cache warm, runs interleaved; \
             kiln in-process is the `create_qcow2` call timed inside a process that made one untimed call first, \
             every other row is spawn to exit; peak RSS from wait4; every warm-up output checked by qemu-img",
            self.runs
        )
    }

    fn lines(&self) -> Vec<String> {
        let mut lines = self.create.ratio_lines();
        lines.extend(self.cli_line());
        lines.extend(self.convert.ratio_lines());
        lines
    }

    fn print(&self) {
        let machine = &self.machine;
        let method = self.method();
        let targets = self.targets();
        println!();
        println!("workload: {}", self.workload());
        println!("{method}");
        for suite in self.suites() {
            println!();
            println!("{}:", suite.title);
            print!("{}", suite.table(false));
        }
        println!();
        for line in self.lines() {
            println!("{line}");
        }
        print_targets_and_markdown_heading(
            &targets,
            &format!("qcow2 writer on {}: `cargo xtask bench qcow2`", machine.filesystem),
            machine,
            &self.workload(),
            &method,
        );
        for suite in self.suites() {
            println!();
            println!("{}:", suite.title);
            println!();
            print!("{}", suite.table(true));
        }
        println!();
        for line in self.lines() {
            println!("{line}.");
        }
        println!();
        for target in &targets {
            println!("- {}", target.line());
        }
        println!("--- end ---");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_process_line_is_parsed() {
        let (elapsed, path) = parse_in_process("81234 /tmp/x/kiln-0.qcow2\n").expect("a valid line");
        assert_eq!(elapsed, Duration::from_nanos(81_234));
        assert_eq!(path, Path::new("/tmp/x/kiln-0.qcow2"));
        assert!(parse_in_process("").is_err());
        assert!(parse_in_process("soon /tmp/x").is_err());
    }

    #[test]
    fn ratio_lines_read_both_ways() {
        assert_eq!(ratio_line("kiln", 2.0, "qemu-img", 6.0), "kiln is 3.0x faster than qemu-img");
        assert_eq!(ratio_line("kiln", 4.0, "qemu-img", 2.0), "kiln takes 2.00x the time of qemu-img");
    }
}
