//! `cargo xtask bench net`: kiln-net's lease pool, in memory and through
//! the persistent ledger.
//!
//! The figures come from the `lease_bench` example, timed inside its own
//! process after an untimed warm-up round: in-memory allocate+release pairs
//! per second on a busy /8 pool, and ledger operations (one locked
//! read-modify-write of the state file each) per second. The ledger never
//! fsyncs by design (see its module doc), so fsyncs per operation are 0.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{Machine, Options, Target, print_targets_and_markdown_heading, remove_path, render_table};
use crate::{announce, cargo, run_command, target_dir};

/// The target for in-memory allocate+release pairs per second.
const MEMORY_TARGET_PAIRS_PER_SEC: f64 = 5_000_000.0;
/// The ledger writes with temp file + rename and no fsync.
const LEDGER_FSYNCS_PER_OP: u32 = 0;

pub(super) fn run(options: &Options) -> Result<()> {
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
    println!();
    println!("workload: {workload}");
    println!("{method}");
    println!();
    print!("{}", render_table(&header, &rows, false));
    print_targets_and_markdown_heading(&targets, "Lease pool: `cargo xtask bench net`", &machine, workload, &method);
    println!();
    print!("{}", render_table(&header, &rows, true));
    println!();
    for target in &targets {
        println!("- {}", target.line());
    }
    println!("--- end ---");
    Ok(())
}

#[derive(Debug, PartialEq)]
struct Round {
    memory_pairs_per_sec: f64,
    ledger_ops_per_sec: f64,
}

/// Parses `memory_pairs_per_sec N ledger_ops_per_sec M` lines.
fn parse_rounds(stdout: &str) -> Result<Vec<Round>> {
    stdout
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                ["memory_pairs_per_sec", memory, "ledger_ops_per_sec", ledger] => Ok(Round {
                    memory_pairs_per_sec: memory.parse().with_context(|| format!("bad number in `{line}`"))?,
                    ledger_ops_per_sec: ledger.parse().with_context(|| format!("bad number in `{line}`"))?,
                }),
                _ => bail!("unexpected lease_bench line `{line}`"),
            }
        })
        .collect()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => values[len / 2],
        len => (values[len / 2 - 1] + values[len / 2]) / 2.0,
    }
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
}
