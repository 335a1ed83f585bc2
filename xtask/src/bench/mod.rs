//! `cargo xtask bench [AREA...]`: kiln against its peers, one run, medians
//! and ratios, plus a Markdown snippet for BENCHMARKS.md.
//!
//! Adding an area is one module here and one entry in [`AREAS`]. This module
//! holds what areas share: spawning a peer and measuring its wall time and
//! peak memory, statistics, tables, the machine description, and a seeded
//! PRNG for workloads.

mod chart;
mod ext4;
mod fat;
mod guest;
mod launch;
mod net;
mod oci;
mod oci_run;
mod qcow2;
mod vmm;

use std::fs;
use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::{announce, flag_value, show_command};

/// Every benchmark area, in the order `cargo xtask bench` runs them.
const AREAS: &[(&str, Area)] = &[
    ("fat", fat::run),
    ("ext4", ext4::run),
    ("qcow2", qcow2::run),
    ("net", net::run),
    ("vmm", vmm::run),
    ("guest", guest::run),
    ("launch", launch::run),
    ("oci", oci::run),
    ("oci", oci_run::run),
];

type Area = fn(&Options) -> Result<()>;

const DEFAULT_RUNS: usize = 7;

/// Options shared by all areas.
#[derive(Debug)]
struct Options {
    /// Measured runs per peer, after one warm-up run each.
    runs: usize,
    /// Also measure kiln alone on a much larger input, to show memory stays flat.
    big: bool,
    /// As root, also run on a loop-mounted XFS with reflinks.
    xfs: bool,
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let mut options = Options { runs: DEFAULT_RUNS, big: true, xfs: true };
    let mut areas = Vec::new();
    let mut index = 0;
    while index < args.len() {
        if let Some(value) = flag_value(args, &mut index, "--runs")? {
            options.runs = value.parse().with_context(|| format!("--runs wants a count, got `{value}`"))?;
            if options.runs == 0 {
                bail!("--runs must be at least 1");
            }
        } else {
            match args[index].as_str() {
                "--no-big" => options.big = false,
                "--no-xfs" => options.xfs = false,
                flag if flag.starts_with('-') => {
                    bail!(
                        "unknown option `{flag}`\nusage: cargo xtask bench [AREA...] [--runs N] [--no-big] [--no-xfs]"
                    )
                }
                // A name selects every area of that name, in order (`oci` has two halves).
                name => {
                    let before = areas.len();
                    areas.extend(AREAS.iter().filter(|(area, _)| *area == name));
                    if areas.len() == before {
                        bail!("unknown bench area `{name}`; areas: {}", area_names());
                    }
                }
            }
        }
        index += 1;
    }
    if areas.is_empty() {
        areas.extend_from_slice(AREAS);
    }
    for (name, bench) in areas {
        announce(&format!("bench {name}"));
        bench(&options).with_context(|| format!("bench {name}"))?;
    }
    Ok(())
}

fn area_names() -> String {
    let mut names: Vec<&str> = AREAS.iter().map(|(name, _)| *name).collect();
    names.dedup();
    names.join(", ")
}

/// One timed execution of a peer: its commands run one after the other.
#[derive(Debug)]
struct Sample {
    elapsed: Duration,
    /// The largest peak resident set of any of the commands.
    peak_rss_kib: u64,
    /// The last command's stdout, when it was captured.
    stdout: String,
}

/// Runs `commands` in order, each to completion, and measures them as one:
/// total wall time (spawn to reap) and the largest peak RSS.
/// The last command's stdout is captured; the others' is discarded. All
/// stderr goes to `log` (not the terminal, so progress bars cost nothing)
/// and is shown if a command fails.
fn measure(commands: &mut [Command], log: &Path) -> Result<Sample> {
    let log_file = fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut sample = Sample { elapsed: Duration::ZERO, peak_rss_kib: 0, stdout: String::new() };
    let count = commands.len();
    for (index, command) in commands.iter_mut().enumerate() {
        let capture = index + 1 == count;
        let shown = show_command(command);
        let stderr = log_file.try_clone().with_context(|| format!("cannot share {}", log.display()))?;
        command.stdin(Stdio::null()).stdout(if capture { Stdio::piped() } else { Stdio::null() }).stderr(stderr);
        // SAFETY: the hook does nothing, so it is trivially async-signal-safe.
        // Its presence makes std fork+exec instead of posix_spawn: a vfork'd
        // child execs from *our* address space, and Linux then reports
        // xtask's own lifetime peak RSS as the child's ru_maxrss floor.
        unsafe { command.pre_exec(|| Ok(())) };
        let started = Instant::now();
        let mut child = command.spawn().with_context(|| format!("cannot run `{shown}`"))?;
        let mut stdout = String::new();
        if let Some(mut pipe) = child.stdout.take() {
            pipe.read_to_string(&mut stdout).with_context(|| format!("cannot read the output of `{shown}`"))?;
        }
        let (status, peak_rss_kib) = reap(child.id())?;
        sample.elapsed += started.elapsed();
        if !status.success() {
            let errors = fs::read_to_string(log).unwrap_or_default();
            bail!("`{shown}` failed ({status}):\n{}", errors.trim_end());
        }
        sample.peak_rss_kib = sample.peak_rss_kib.max(peak_rss_kib);
        sample.stdout = stdout;
    }
    Ok(sample)
}

/// Waits for child `pid` with `wait4`, which (unlike `Child::wait`) reports
/// the child's own resource usage: returns its exit status and peak RSS in KiB.
fn reap(pid: u32) -> Result<(ExitStatus, u64)> {
    let pid = libc::pid_t::try_from(pid).context("child pid out of range")?;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain integers and timevals, for which all-zero is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our own child, not yet reaped (std never waited for
        // it); `status` and `usage` are live locals wait4 may write.
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if reaped == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err).context("wait4 failed");
        }
    }
    // Linux reports ru_maxrss in KiB.
    Ok((ExitStatus::from_raw(status), u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}

/// Flushes dirty pages (outside any timing) so one peer's writeback does not
/// land in the next peer's measurement.
fn sync_filesystems() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Removes a file or directory tree if it exists.
fn remove_path(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    };
    result.with_context(|| format!("cannot remove {}", path.display()))
}

/// The measured runs of one peer.
#[derive(Debug)]
struct PeerRuns {
    name: String,
    times: Vec<Duration>,
    peak_rss_kib: u64,
}

impl PeerRuns {
    fn new(name: impl Into<String>) -> Self {
        PeerRuns { name: name.into(), times: Vec::new(), peak_rss_kib: 0 }
    }

    fn record(&mut self, sample: &Sample) {
        self.times.push(sample.elapsed);
        self.peak_rss_kib = self.peak_rss_kib.max(sample.peak_rss_kib);
    }

    fn median_ms(&self) -> f64 {
        let mut times: Vec<f64> = self.times.iter().map(|time| time.as_secs_f64() * 1000.0).collect();
        times.sort_by(f64::total_cmp);
        match times.len() {
            0 => f64::NAN,
            len if len % 2 == 1 => times[len / 2],
            len => (times[len / 2 - 1] + times[len / 2]) / 2.0,
        }
    }

    fn min_ms(&self) -> f64 {
        self.times.iter().map(|time| time.as_secs_f64() * 1000.0).fold(f64::NAN, f64::min)
    }

    fn peak_rss_mib(&self) -> f64 {
        kib_to_mib(self.peak_rss_kib)
    }
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Renders rows as a column-aligned table; `markdown` adds the pipes and the
/// header rule (numbers right-aligned), so the same table pastes into docs.
fn render_table(header: &[&str], rows: &[Vec<String>], markdown: bool) -> String {
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(
                |(column, (cell, &width))| {
                    if column == 0 { format!("{cell:<width$}") } else { format!("{cell:>width$}") }
                },
            )
            .collect();
        if markdown { format!("| {} |", padded.join(" | ")) } else { padded.join("  ").trim_end().to_owned() }
    };
    let mut lines = vec![line(header.iter().map(|cell| cell.to_string()).collect())];
    if markdown {
        let rule: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(column, &width)| if column == 0 { "-".repeat(width) } else { format!("{}:", "-".repeat(width - 1)) })
            .collect();
        lines.push(format!("| {} |", rule.join(" | ")));
    }
    lines.extend(rows.iter().map(|row| line(row.clone())));
    lines.join("\n") + "\n"
}

/// A target from an issue, checked against a measured value.
#[derive(Debug)]
struct Target {
    description: String,
    met: bool,
    actual: String,
}

impl Target {
    fn line(&self) -> String {
        format!("{} {} (measured: {})", if self.met { "PASS" } else { "MISS" }, self.description, self.actual)
    }
}

/// The machine a benchmark ran on, for the record.
#[derive(Debug)]
struct Machine {
    cpu: String,
    cores: usize,
    memory_gib: f64,
    kernel: String,
    filesystem: String,
}

impl Machine {
    /// Describes this machine; `dir` is where the benchmark writes.
    fn detect(dir: &Path) -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name")?.split_once(':').map(|(_, name)| name.trim().to_owned()))
            .unwrap_or_else(|| "unknown CPU".into());
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: u64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").map(|text| text.trim().to_owned());
        let filesystem = mount_type(dir);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_gib: memory_kib as f64 / (1024.0 * 1024.0),
            kernel: kernel.unwrap_or_else(|_| "unknown".into()),
            filesystem: filesystem.unwrap_or_else(|| "unknown".into()),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{}, {} cores, {:.1} GiB RAM, Linux {}, output on {}",
            self.cpu, self.cores, self.memory_gib, self.kernel, self.filesystem
        )
    }
}

/// Prints a benchmark's result: workload and method, the table, each
/// target's PASS/MISS line, then the Markdown block for BENCHMARKS.md.
fn print_report(
    title: &str,
    machine: &Machine,
    workload: &str,
    method: &str,
    table: (&[&str], &[Vec<String>]),
    targets: &[Target],
) {
    let (header, rows) = table;
    println!();
    println!("workload: {workload}");
    println!("{method}");
    println!();
    print!("{}", render_table(header, rows, false));
    print_targets_and_markdown_heading(targets, title, machine, workload, method);
    println!();
    print!("{}", render_table(header, rows, true));
    println!();
    for target in targets {
        println!("- {}", target.line());
    }
    println!("--- end ---");
}

/// The median of `values` (NaN when empty).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => values[len / 2],
        len => (values[len / 2 - 1] + values[len / 2]) / 2.0,
    }
}

/// Prints each target's PASS/MISS line, then opens the Markdown block for
/// BENCHMARKS.md with its heading, machine, workload and method.
fn print_targets_and_markdown_heading(
    targets: &[Target],
    title: &str,
    machine: &Machine,
    workload: &str,
    method: &str,
) {
    println!();
    for target in targets {
        println!("{}", target.line());
    }
    println!();
    println!("--- Markdown for BENCHMARKS.md ---");
    println!("### {title} ({}, commit {})", today(), revision());
    println!();
    println!("Machine: {}.", machine.describe());
    println!("Workload: {workload}; {method}.");
}

/// The type of the filesystem holding `dir`, from the longest matching
/// mount point in /proc/self/mounts (`stat -f` cannot tell ext4 from ext2).
fn mount_type(dir: &Path) -> Option<String> {
    let dir = fs::canonicalize(dir).ok()?;
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            // Mount points escape spaces as \040.
            let point = PathBuf::from(point.replace("\\040", " "));
            dir.starts_with(&point).then(|| (point.as_os_str().len(), kind.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, kind)| kind)
}

/// The checked-out commit, `+dirty` when the work tree has changes, so
/// recorded figures say which code they measured.
fn revision() -> String {
    let git = |args: &[&str]| {
        let output = Command::new("git").args(args).stderr(Stdio::null()).output().ok()?;
        output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    match (git(&["rev-parse", "--short", "HEAD"]), git(&["status", "--porcelain", "--untracked-files=no"])) {
        (Some(commit), Some(changes)) if !changes.is_empty() => format!("{commit}+dirty"),
        (Some(commit), _) => commit,
        (None, _) => "unknown".into(),
    }
}

/// Parses a benchmark helper's output line by line: `parse` turns one
/// line's fields into a value, or `None` for a line it does not expect.
fn parse_lines<T>(stdout: &str, helper: &str, parse: impl Fn(&[&str]) -> Result<Option<T>>) -> Result<Vec<T>> {
    stdout
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match parse(&fields).with_context(|| format!("bad number in `{line}`"))? {
                Some(value) => Ok(value),
                None => bail!("unexpected {helper} line `{line}`"),
            }
        })
        .collect()
}

/// A figure in a helper's output.
fn number(text: &str) -> Result<f64> {
    text.parse().with_context(|| format!("`{text}` is not a number"))
}

/// Today's UTC date as YYYY-MM-DD.
fn today() -> String {
    utc_date(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs()))
}

/// The UTC date of a Unix time, from coreutils' `date`: the calendar
/// arithmetic is not written again here (kiln-imagefmt has it for FAT times).
fn utc_date(seconds: u64) -> String {
    let output = Command::new("date").args(["-u", "-d", &format!("@{seconds}"), "+%Y-%m-%d"]).output();
    match output {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        _ => "unknown date".to_owned(),
    }
}

/// xorshift64*: deterministic, fast, and incompressible enough that no
/// filesystem or tool can treat the workload as sparse.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Small files are cut from one pool of random bytes, so generating many
/// thousands of them costs their writes, not the PRNG.
const SMALL_FILE_POOL_BYTES: usize = 1 << 20;

/// The pool [`small_file`] cuts from, filled by `random`.
fn small_file_pool(random: &mut XorShift) -> Vec<u8> {
    let mut pool = vec![0u8; SMALL_FILE_POOL_BYTES];
    random.fill(&mut pool);
    pool
}

/// One small file's bytes, sized as a source tree's are (85% under 4 KiB,
/// 14% up to 16 KiB, 1% up to 128 KiB), cut from `pool` at a random offset.
fn small_file<'p>(random: &mut XorShift, pool: &'p [u8]) -> &'p [u8] {
    let size = match random.next() % 100 {
        0..85 => random.next() % 4096,
        85..99 => 4096 + random.next() % (12 << 10),
        _ => (16 << 10) + random.next() % (112 << 10),
    } as usize;
    let start = (random.next() % (pool.len() - size) as u64) as usize;
    &pool[start..start + size]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_763_942_399), "2025-11-23");
    }

    #[test]
    fn median_and_min() {
        let mut peer = PeerRuns::new("p");
        for ms in [30, 10, 20, 40] {
            peer.times.push(Duration::from_millis(ms));
        }
        assert_eq!(peer.median_ms(), 25.0);
        assert_eq!(peer.min_ms(), 10.0);
        peer.times.push(Duration::from_millis(5));
        assert_eq!(peer.median_ms(), 20.0);
    }

    #[test]
    fn xorshift_is_deterministic_and_not_zero() {
        let (mut a, mut b) = (XorShift::new(7), XorShift::new(7));
        let (mut left, mut right) = (vec![0u8; 4099], vec![0u8; 4099]);
        a.fill(&mut left);
        b.fill(&mut right);
        assert_eq!(left, right);
        assert!(left.iter().filter(|&&byte| byte == 0).count() < 100);
    }

    #[test]
    fn markdown_table_is_aligned() {
        let rows = vec![vec!["kiln".into(), "1.5".into()], vec!["cp -r".into(), "10.25".into()]];
        let table = render_table(&["Peer", "ms"], &rows, true);
        assert_eq!(table, "| Peer  |    ms |\n| ----- | ----: |\n| kiln  |   1.5 |\n| cp -r | 10.25 |\n");
    }

    #[test]
    fn measure_reports_failure_and_rss() {
        let log = std::env::temp_dir().join(format!("xtask-measure-{}.log", std::process::id()));
        let sample = measure(&mut [Command::new("true"), Command::new("echo")], &log).expect("true and echo run");
        assert!(sample.peak_rss_kib > 0);
        assert_eq!(sample.stdout, "\n");
        let mut failing = Command::new("sh");
        failing.args(["-c", "echo broken >&2; exit 3"]);
        let err = measure(&mut [failing], &log).expect_err("exit 3 is a failure");
        assert!(format!("{err:#}").contains("broken"), "{err:#}");

        // Our own peak must not leak into the child's figure (see `measure`).
        let ballast = vec![1u8; 64 << 20];
        std::hint::black_box(&ballast);
        drop(ballast);
        let sample = measure(&mut [Command::new("true")], &log).expect("true runs");
        assert!(sample.peak_rss_kib < 16 << 10, "`true` peaked at {} KiB", sample.peak_rss_kib);
        fs::remove_file(&log).expect("log was written");
    }
}
