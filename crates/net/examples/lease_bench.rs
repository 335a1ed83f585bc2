//! The in-process side of the lease part of `cargo xtask bench net`.
//!
//! ```text
//! lease_bench DIR RUNS
//! ```
//!
//! Each of RUNS rounds measures, after one untimed warm-up round:
//! - in memory: 2,000,000 allocate+release pairs on a `10.0.0.0/8` pool of
//!   /30s while 1,000 other leases stay held (a busy host, not an empty pool);
//! - the ledger in DIR: 500 allocate+release pairs, each one locked
//!   read-modify-write of the state file, with 100 other leases held.
//!
//! Prints one line per round: `memory_pairs_per_sec N ledger_ops_per_sec M`.
//! The ledger never fsyncs (see the ledger's module doc), so its fsyncs per
//! operation are 0 by construction; the caller reports that.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use kiln_net::{LeasePool, Ledger};

const MEMORY_PAIRS: u32 = 2_000_000;
const MEMORY_HELD: u32 = 1_000;
const LEDGER_PAIRS: u32 = 500;
const LEDGER_HELD: u32 = 100;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lease_bench: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(runs), None) = (args.next(), args.next(), args.next()) else {
        return Err("usage: lease_bench DIR RUNS".into());
    };
    let dir = PathBuf::from(dir);
    let runs: usize = runs.parse().map_err(|_| format!("RUNS must be a count, got `{runs}`"))?;
    for round in 0..=runs {
        let memory = memory_pairs_per_sec()?;
        let ledger = ledger_ops_per_sec(&dir.join(format!("round-{round}")))?;
        if round > 0 {
            println!("memory_pairs_per_sec {memory:.0} ledger_ops_per_sec {ledger:.0}");
        }
    }
    Ok(())
}

fn memory_pairs_per_sec() -> Result<f64, Box<dyn Error>> {
    let pool = LeasePool::new("10.0.0.0/8".parse()?, 30)?;
    let held = (0..MEMORY_HELD).map(|n| pool.allocate(&format!("held-{n}"))).collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    for _ in 0..MEMORY_PAIRS {
        let lease = pool.allocate("vm-churn")?;
        std::hint::black_box(lease.guest_addr());
        lease.release();
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(pool.leased(), held.len(), "every churned lease came back");
    Ok(f64::from(MEMORY_PAIRS) / elapsed)
}

/// Operations (an allocate or a release each) per second.
fn ledger_ops_per_sec(dir: &std::path::Path) -> Result<f64, Box<dyn Error>> {
    let ledger = Ledger::open(dir, "10.0.0.0/16".parse()?, 30)?;
    let pid = std::process::id();
    for n in 0..LEDGER_HELD {
        ledger.allocate(&format!("held-{n}"), pid)?;
    }
    let started = Instant::now();
    for _ in 0..LEDGER_PAIRS {
        ledger.allocate("vm-churn", pid)?;
        ledger.release("vm-churn")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir)?;
    Ok(f64::from(2 * LEDGER_PAIRS) / elapsed)
}
