//! `cargo xtask bench net`: kiln-net's lease pool, in memory and through
//! the persistent ledger, and its nftables rules for 1,000 VMs.
//!
//! The figures come from the `lease_bench` example, timed inside its own
//! process after an untimed warm-up round: in-memory allocate+release pairs
//! per second on a busy /8 pool, and ledger operations (one locked
//! read-modify-write of the state file each) per second. The ledger never
//! fsyncs by design (see its module doc), so fsyncs per operation are 0.
//!
//! The nftables figures come from the `nft_bench` example, run as root in a
//! network namespace created here and deleted after: 1,000 VMs added one at
//! a time, then removed one at a time, then the same VMs written as per-VM
//! chains and rules (how per-tap firewalls are usually written) as the peer.
//! "The 10th" and "the 1,000th" add are the medians of the 19 adds centred
//! on the 10th and of the last 19, so one noisy sample does not decide.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::chart::LineChart;
use super::{Machine, Options, Target, median, number, parse_lines, print_report, remove_path};
use crate::{announce, cargo, run_command, target_dir};

/// The target for in-memory allocate+release pairs per second.
const MEMORY_TARGET_PAIRS_PER_SEC: f64 = 5_000_000.0;
/// The ledger writes with temp file + rename and no fsync.
const LEDGER_FSYNCS_PER_OP: u32 = 0;

/// VMs added and removed one at a time by the nftables part.
const NFT_VMS: usize = 1_000;
/// The targets: median add <= 5 ms, the 1,000th add <= 2x the 10th.
const NFT_MEDIAN_ADD_TARGET_MS: f64 = 5.0;
const NFT_GROWTH_TARGET: f64 = 2.0;
/// Samples in the windows that stand for "the 10th" and "the 1,000th" add.
const WINDOW: usize = 19;

pub(super) fn run(options: &Options) -> Result<()> {
    leases(options)?;
    nftables()
}

fn leases(options: &Options) -> Result<()> {
    announce("building the release lease_bench example");
    run_command(cargo().args(["build", "--release", "-p", "kiln-net", "--example", "lease_bench"]))?;
    let lease_bench = target_dir().join("release").join("examples").join("lease_bench");
    let bench_dir = target_dir().join("bench").join("net");
    remove_path(&bench_dir)?;
    fs::create_dir_all(&bench_dir).with_context(|| format!("cannot create {}", bench_dir.display()))?;

    let mut command = Command::new(&lease_bench);
    command.arg(&bench_dir).arg(options.runs.to_string());
    let output = command.output().with_context(|| format!("cannot run {}", lease_bench.display()))?;
    if !output.status.success() {
        bail!("lease_bench failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr).trim_end());
    }
    let rounds = parse_rounds(&String::from_utf8_lossy(&output.stdout))?;
    if rounds.len() != options.runs {
        bail!("lease_bench printed {} rounds, expected {}", rounds.len(), options.runs);
    }
    let machine = Machine::detect(&bench_dir);
    remove_path(&bench_dir)?;

    let memory = median(rounds.iter().map(|round| round.memory_pairs_per_sec).collect());
    let ledger = median(rounds.iter().map(|round| round.ledger_ops_per_sec).collect());
    let header = ["lease pool", "median ops/s", "fsyncs per op"];
    let rows = vec![
        vec!["in memory: allocate+release pair".to_owned(), format!("{memory:.0}"), "-".to_owned()],
        vec![
            format!("ledger on {}: allocate or release", machine.filesystem),
            format!("{ledger:.0}"),
            LEDGER_FSYNCS_PER_OP.to_string(),
        ],
    ];
    let targets = [Target {
        description: "in-memory lease allocate+release >= 5 M pairs/s".to_owned(),
        met: memory >= MEMORY_TARGET_PAIRS_PER_SEC,
        actual: format!("{:.2} M pairs/s", memory / 1e6),
    }];
    let workload = "2,000,000 allocate+release pairs on 10.0.0.0/8 cut into /30 with 1,000 leases held; \
                    500 ledger allocate+release pairs on 10.0.0.0/16 with 100 leases held";
    let method = format!(
        "median of {} rounds timed inside the `lease_bench` example after one warm-up round; \
         the ledger does no fsync (0 per operation) by design",
        options.runs
    );
    print_report("Lease pool: `cargo xtask bench net`", &machine, workload, &method, (&header, &rows), &targets);
    Ok(())
}

fn nftables() -> Result<()> {
    if !crate::debian::is_root() {
        println!("bench net: the nftables part needs root (network namespaces); skipped");
        return Ok(());
    }
    announce("building the release nft_bench example");
    run_command(cargo().args(["build", "--release", "-p", "kiln-net", "--example", "nft_bench"]))?;
    let nft_bench = target_dir().join("release").join("examples").join("nft_bench");
    let netns = Netns::create(&format!("kiln-bench-{}", std::process::id()))?;
    announce(&format!("nft_bench: {NFT_VMS} VMs in namespace {}", netns.0));
    let output = Command::new(&nft_bench)
        .arg(&netns.0)
        .arg(NFT_VMS.to_string())
        .output()
        .with_context(|| format!("cannot run {}", nft_bench.display()))?;
    drop(netns);
    if !output.status.success() {
        bail!("nft_bench failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr).trim_end());
    }
    let series = parse_series(&String::from_utf8_lossy(&output.stdout))?;
    let get = |name: &str| -> Result<&Vec<f64>> {
        let found = series.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        let values = found.with_context(|| format!("nft_bench printed no `{name}` series"))?;
        if values.len() != NFT_VMS {
            bail!("nft_bench's `{name}` has {} values, expected {NFT_VMS}", values.len());
        }
        Ok(values)
    };
    let (add, remove, rules_add) = (get("kiln_add")?, get("kiln_remove")?, get("rules_add")?);
    let machine = Machine::detect(&target_dir());

    let header = ["one VM at a time, 1,000 VMs", "median ms", "10th ms", "1,000th ms", "1,000th / 10th"];
    let row = |name: &str, values: &[f64]| {
        let growth = Growth::of(values);
        vec![
            name.to_owned(),
            format!("{:.2}", median(values.to_vec())),
            format!("{:.2}", growth.early),
            format!("{:.2}", growth.late),
            format!("{:.2}x", growth.ratio()),
        ]
    };
    let rows = vec![
        row("kiln add (`Nft::apply`)", add),
        row("kiln remove (`Nft::remove`)", remove),
        row("peer: per-VM chain and rules, add", rules_add),
    ];
    let add_median = median(add.clone());
    let add_growth = Growth::of(add);
    let targets = [
        Target {
            description: "nftables median add <= 5 ms".to_owned(),
            met: add_median <= NFT_MEDIAN_ADD_TARGET_MS,
            actual: format!("{add_median:.2} ms"),
        },
        Target {
            description: "nftables 1,000th add <= 2x the 10th".to_owned(),
            met: add_growth.ratio() <= NFT_GROWTH_TARGET,
            actual: format!("{:.2}x", add_growth.ratio()),
        },
    ];
    let workload = "1,000 VMs, each with a tap, a host port, egress through an uplink and a published port, \
                    added one at a time and then removed one at a time, each change one `nft -j -f -` transaction";
    let method = format!(
        "one pass inside a fresh network namespace; \"10th\" and \"1,000th\" are the medians of the {WINDOW} \
         operations around the 10th and of the last {WINDOW}; the peer writes each VM as its own chain plus a jump"
    );
    print_report("nftables: `cargo xtask bench net`", &machine, workload, &method, (&header, &rows), &targets);
    LineChart {
        title: format!("nftables: one VM's change against the VMs already there ({NFT_VMS} VMs)"),
        x_axis: "VMs in the table".to_owned(),
        y_axis: format!("ms, rolling median of {WINDOW}"),
        series: vec![
            ("kiln add (set elements)".to_owned(), rolling_median(add, VmCount::Growing)),
            ("kiln remove".to_owned(), rolling_median(remove, VmCount::Shrinking)),
            ("peer add (per-VM chain and rules)".to_owned(), rolling_median(rules_add, VmCount::Growing)),
        ],
    }
    .write("net-nft")?;
    Ok(())
}

/// A network namespace for the benchmark, deleted on drop.
struct Netns(String);

impl Netns {
    fn create(name: &str) -> Result<Netns> {
        run_command(Command::new("ip").args(["netns", "add", name]))?;
        Ok(Netns(name.to_owned()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// How an operation's cost moved from early (around the 10th) to late (the end).
#[derive(Debug, PartialEq)]
struct Growth {
    early: f64,
    late: f64,
}

impl Growth {
    fn of(values: &[f64]) -> Growth {
        let early_start = 10usize.saturating_sub(1 + WINDOW / 2).min(values.len());
        let early_end = (early_start + WINDOW).min(values.len());
        let late_start = values.len().saturating_sub(WINDOW);
        Growth { early: median(values[early_start..early_end].to_vec()), late: median(values[late_start..].to_vec()) }
    }

    fn ratio(&self) -> f64 {
        self.late / self.early
    }
}

/// How the table's size moves over a series: adds grow it, removals
/// (from the full table down) shrink it.
#[derive(Debug, Clone, Copy)]
enum VmCount {
    Growing,
    Shrinking,
}

/// `(VMs in the table, median of the WINDOW values around that operation)`:
/// the curve without single scheduler hiccups. The n-th add (from 1) finds
/// n VMs once it is done; the n-th removal starts from `len - n + 1`.
fn rolling_median(values: &[f64], count: VmCount) -> Vec<(f64, f64)> {
    (0..values.len())
        .map(|index| {
            let start = index.saturating_sub(WINDOW / 2).min(values.len().saturating_sub(WINDOW));
            let end = (start + WINDOW).min(values.len());
            let vms = match count {
                VmCount::Growing => index + 1,
                VmCount::Shrinking => values.len() - index,
            };
            (vms as f64, median(values[start..end].to_vec()))
        })
        .collect()
}

/// Parses `NAME v1 v2 ...` lines.
fn parse_series(stdout: &str) -> Result<Vec<(String, Vec<f64>)>> {
    stdout
        .lines()
        .map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next().with_context(|| "empty nft_bench line")?.to_owned();
            let values = fields
                .map(|v| v.parse::<f64>().with_context(|| format!("bad number `{v}` in series `{name}`")))
                .collect::<Result<Vec<f64>>>()?;
            Ok((name, values))
        })
        .collect()
}

#[derive(Debug, PartialEq)]
struct Round {
    memory_pairs_per_sec: f64,
    ledger_ops_per_sec: f64,
}

/// Parses `memory_pairs_per_sec N ledger_ops_per_sec M` lines.
fn parse_rounds(stdout: &str) -> Result<Vec<Round>> {
    parse_lines(stdout, "lease_bench", |fields| {
        Ok(match fields {
            ["memory_pairs_per_sec", memory, "ledger_ops_per_sec", ledger] => {
                Some(Round { memory_pairs_per_sec: number(memory)?, ledger_ops_per_sec: number(ledger)? })
            }
            _ => None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_parsed() {
        let rounds = parse_rounds("memory_pairs_per_sec 8800000 ledger_ops_per_sec 3900\n").expect("a valid line");
        assert_eq!(rounds, [Round { memory_pairs_per_sec: 8.8e6, ledger_ops_per_sec: 3900.0 }]);
        assert!(parse_rounds("memory_pairs_per_sec fast ledger_ops_per_sec 1").is_err());
        assert!(parse_rounds("hello").is_err());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn rolling_medians_are_plotted_against_the_vms_in_the_table() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let adds = rolling_median(&values, VmCount::Growing);
        assert_eq!(adds.first(), Some(&(1.0, 10.0)), "the first window is the first {WINDOW} values");
        assert_eq!(adds[49], (50.0, 50.0));
        let removals = rolling_median(&values, VmCount::Shrinking);
        assert_eq!(removals.first().map(|p| p.0), Some(100.0), "the first removal starts from the full table");
        assert_eq!(removals.last(), Some(&(1.0, 91.0)));
    }

    #[test]
    fn series_and_growth() {
        let series = parse_series("kiln_add 1.5 2\nrules_add 3\n").expect("valid lines");
        assert_eq!(series, [("kiln_add".to_owned(), vec![1.5, 2.0]), ("rules_add".to_owned(), vec![3.0])]);
        assert!(parse_series("kiln_add x").is_err());
        let values: Vec<f64> = (1..=1000).map(f64::from).collect();
        // Window 1..=19 around the 10th, and 982..=1000.
        assert_eq!(Growth::of(&values), Growth { early: 10.0, late: 991.0 });
        assert_eq!(Growth::of(&[2.0, 4.0]), Growth { early: 3.0, late: 3.0 });
    }
}
