//! The in-process side of `cargo xtask bench qcow2`: times the library call
//! itself, which is what a caller embedding kiln-imagefmt pays per disk.
//!
//! ```text
//! qcow2_bench create DIR VIRTUAL_SIZE_BYTES RUNS
//! ```
//!
//! Calls `create_qcow2` (default options: 64 KiB clusters) once untimed, so
//! code and allocator are warm as in a long-running caller, then RUNS times
//! timed, each to a new path in DIR after removing the previous one (outside
//! the timing). Prints one line per timed run: its duration in nanoseconds,
//! a space, and the image's path. The last image is kept for the caller to
//! check.

use std::error::Error;
use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use kiln_imagefmt::{Qcow2Options, create_qcow2};

const USAGE: &str = "usage: qcow2_bench create DIR VIRTUAL_SIZE_BYTES RUNS";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("qcow2_bench: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, dir, size, runs] = args.as_slice() else {
        return Err(USAGE.into());
    };
    if mode != "create" {
        return Err(format!("unknown mode {mode:?}; {USAGE}").into());
    }
    let dir = PathBuf::from(dir);
    let size: u64 = size.parse().map_err(|err| format!("invalid VIRTUAL_SIZE_BYTES {size:?}: {err}"))?;
    let runs: usize = runs.parse().map_err(|err| format!("invalid RUNS {runs:?}: {err}"))?;
    let options = Qcow2Options::default();

    let warm_up = dir.join("warm-up.qcow2");
    create_qcow2(&warm_up, size, &options)?;
    fs::remove_file(&warm_up)?;

    let mut previous: Option<PathBuf> = None;
    for run in 0..runs {
        if let Some(path) = previous.take() {
            fs::remove_file(&path)?;
        }
        let path = dir.join(format!("kiln-{run}.qcow2"));
        let started = Instant::now();
        create_qcow2(&path, size, &options)?;
        let elapsed = started.elapsed();
        println!("{} {}", elapsed.as_nanos(), path.display());
        previous = Some(path);
    }
    Ok(())
}
