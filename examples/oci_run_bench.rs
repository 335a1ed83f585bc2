//! The in-process side of `cargo xtask bench oci` (its run half).
//!
//! ```text
//! oci_run_bench NETNS STATE_DIR GUEST_DIR IMAGE_SPEC BINARY_SPEC RUNS
//! ```
//!
//! Enters the network namespace NETNS (created by the caller), then runs
//! one untimed round and RUNS timed rounds of, in this order:
//!
//! - `cold-image`: IMAGE_SPEC (a `service.image` VM) with its state
//!   directory (`STATE_DIR/image`) emptied first, so the image is pulled
//!   into an empty store and every layer filesystem is built;
//! - `warm-image`: IMAGE_SPEC again on that state directory (nothing built);
//! - `warm-binary`: BINARY_SPEC (a `service.binary` VM) on a state
//!   directory of its own (`STATE_DIR/binary`), warm from the untimed round.
//!
//! Each run boots a real guest with [`kiln::run`]; the service exits 0 at
//! once. Prints one line per timed run:
//!
//! ```text
//! KIND host_ms H image_ms I|- layers_built N init_start S modules_loaded S disks_ready S service_start S
//! ```
//!
//! where `host_ms` and `image_ms` are [`kiln::RunOutcome`]'s and the four
//! times (seconds since kernel start) come from kiln-init's `timing` line
//! on the console, as the observer received it.

use std::error::Error;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kiln::{HostNet, Phase, RunObserver, RunOptions, Spec, StateDir};

/// Keeps the console, for kiln-init's timing line; ignores the phases.
#[derive(Default)]
struct ConsoleRecorder {
    console: Vec<u8>,
}

impl RunObserver for ConsoleRecorder {
    fn phase(&mut self, _: Phase, _: &str) {}
    fn console(&mut self, bytes: &[u8]) {
        self.console.extend_from_slice(bytes);
    }
}

/// The `init_start`, `modules_loaded`, `disks_ready` and `service_start` of
/// kiln-init's `timing kernel_start=0.000000 init_start=... service_start=...` line.
fn boot_timing(console: &str) -> Option<[f64; 4]> {
    let line = console.lines().find(|line| line.contains("timing kernel_start="))?;
    let value = |key: &str| line.split(key).nth(1)?.split_whitespace().next()?.parse::<f64>().ok();
    Some([value("init_start=")?, value("modules_loaded=")?, value("disks_ready=")?, value("service_start=")?])
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("oci_run_bench: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [netns, state_dir, guest_dir, image_spec, binary_spec, runs] = args.as_slice() else {
        return Err("usage: oci_run_bench NETNS STATE_DIR GUEST_DIR IMAGE_SPEC BINARY_SPEC RUNS".into());
    };
    let runs: usize = runs.parse()?;
    let file = std::fs::File::open(format!("/run/netns/{netns}"))?;
    rustix::thread::move_into_link_name_space(file.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))?;
    let image_spec = PathBuf::from(image_spec);
    let binary_spec = PathBuf::from(binary_spec);
    let image_state = Path::new(state_dir).join("image");
    let binary_state = Path::new(state_dir).join("binary");
    let mut options = RunOptions::new(HostNet::from_env()?);
    options.guest_dir = Some(PathBuf::from(guest_dir));
    // One untimed round (it also makes the binary's state warm), then the
    // three kinds interleaved so load on the machine falls on all alike.
    for round in 0..=runs {
        for kind in ["cold-image", "warm-image", "warm-binary"] {
            let (spec_path, state_dir) = match kind {
                "warm-binary" => (&binary_spec, &binary_state),
                _ => (&image_spec, &image_state),
            };
            if kind == "cold-image" {
                let _ = std::fs::remove_dir_all(state_dir);
            }
            let spec = Spec::load(spec_path)?;
            let state = StateDir::open(state_dir)?;
            let mut recorder = ConsoleRecorder::default();
            let outcome = kiln::run(&spec, spec_path, &state, &options, &mut recorder)?;
            let console = String::from_utf8_lossy(&recorder.console);
            if outcome.exit_code != 0 {
                return Err(format!(
                    "{kind}: the service exited {}: {}\n{console}",
                    outcome.exit_code, outcome.exit.how
                )
                .into());
            }
            let built_expected = match kind {
                "cold-image" => outcome.layers_built > 0 && outcome.image_ms.is_some(),
                "warm-image" => outcome.layers_built == 0 && outcome.image_ms.is_some(),
                _ => outcome.image_ms.is_none(),
            };
            if !built_expected || (round > 0 && kind != "cold-image" && !outcome.images_reused) {
                return Err(format!(
                    "{kind}: unexpected cache state: {} layer filesystems built, image_ms {:?}, images reused {}",
                    outcome.layers_built, outcome.image_ms, outcome.images_reused
                )
                .into());
            }
            let Some([init_start, modules_loaded, disks_ready, service_start]) = boot_timing(&console) else {
                return Err(format!("{kind}: no kiln-init timing line on the console:\n{console}").into());
            };
            if round > 0 {
                let image_ms = outcome.image_ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.3}"));
                println!(
                    "{kind} host_ms {:.3} image_ms {image_ms} layers_built {} init_start {init_start:.6} \
                     modules_loaded {modules_loaded:.6} disks_ready {disks_ready:.6} service_start {service_start:.6}",
                    outcome.host_ms, outcome.layers_built
                );
            }
        }
    }
    Ok(())
}
