//! The in-process side of `cargo xtask bench launch`.
//!
//! ```text
//! launch_bench NETNS STATE_DIR GUEST_DIR SPEC RUNS
//! ```
//!
//! Enters the network namespace NETNS (created by the caller), then runs
//! SPEC with [`kiln::run`] RUNS times *cold* (the state directory emptied
//! first, so every image is built) and RUNS times *warm* (images reused),
//! interleaved. The service exits at once; each run boots a real guest.
//! Prints one line per run: `cold|warm host_ms H boot_request_ms B`.

use std::error::Error;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;

use kiln::{HostNet, Phase, RunObserver, RunOptions, Spec, StateDir};

struct Quiet;

impl RunObserver for Quiet {
    fn phase(&mut self, _: Phase, _: &str) {}
    fn console(&mut self, _: &[u8]) {}
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("launch_bench: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [netns, state_dir, guest_dir, spec_path, runs] = args.as_slice() else {
        return Err("usage: launch_bench NETNS STATE_DIR GUEST_DIR SPEC RUNS".into());
    };
    let runs: usize = runs.parse()?;
    let file = std::fs::File::open(format!("/run/netns/{netns}"))?;
    rustix::thread::move_into_link_name_space(file.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))?;
    let spec_path = PathBuf::from(spec_path);
    let spec = Spec::load(&spec_path)?;
    let mut options = RunOptions::new(HostNet::from_env()?);
    options.guest_dir = Some(PathBuf::from(guest_dir));
    // One untimed warm-up, then cold and warm runs interleaved.
    for round in 0..=runs {
        for kind in ["cold", "warm"] {
            if kind == "cold" {
                let _ = std::fs::remove_dir_all(state_dir);
            }
            let state = StateDir::open(state_dir)?;
            let outcome = kiln::run(&spec, &spec_path, &state, &options, &mut Quiet)?;
            if outcome.exit_code != 0 {
                return Err(format!("the service exited {}: {}", outcome.exit_code, outcome.exit.how).into());
            }
            if outcome.images_reused != (kind == "warm") {
                return Err(format!("a {kind} run reused images: {}", outcome.images_reused).into());
            }
            if round > 0 {
                println!("{kind} host_ms {:.3} boot_request_ms {:.3}", outcome.host_ms, outcome.boot_request_ms);
            }
        }
    }
    Ok(())
}
