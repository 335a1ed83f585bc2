//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` on the stable
//! toolchain.
//!
//! `fuzz/` is its own workspace (sanitizer flags must not leak into normal
//! builds). Each target reads `fuzz/corpus/T` (gitignored, grows as libFuzzer
//! finds inputs) and the committed seeds in `fuzz/seeds/T`, if any.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{announce, cargo, command_succeeds, flag_value, run_command};

const FUZZ_DIR: &str = "fuzz";
/// Per-target run time for a plain `cargo xtask fuzz`.
const DEFAULT_SECONDS: u64 = 60;
/// Per-target run time under `cargo xtask test`: enough to catch a target
/// that no longer builds or crashes at once, cheap enough for every CI run.
const SMOKE_SECONDS: u64 = 20;
/// A smoke run only needs to say whether it crashed, not log every new input
/// (crash reports are printed at any verbosity).
const SMOKE_ARGS: &[&str] = &["-verbosity=0", "-print_final_stats=1"];

pub(crate) fn run(args: &[String]) -> Result<()> {
    let mut target = None;
    let mut seconds = None;
    let mut smoke = false;
    let mut libfuzzer_args = Vec::new();
    let mut index = 0;
    while index < args.len() {
        if let Some(value) = flag_value(args, &mut index, "--time")? {
            let parsed = value.parse().with_context(|| format!("--time wants whole seconds, got `{value}`"))?;
            seconds = Some(parsed);
        } else {
            match args[index].as_str() {
                "--smoke" => smoke = true,
                "--" => {
                    libfuzzer_args.extend_from_slice(&args[index + 1..]);
                    break;
                }
                flag if flag.starts_with('-') => bail!(
                    "unknown option `{flag}`\nusage: cargo xtask fuzz [TARGET] [--time SECS] [--smoke] [-- LIBFUZZER_ARGS...]"
                ),
                name if target.is_none() => target = Some(name.to_owned()),
                extra => bail!("only one fuzz target at a time, got a second one: `{extra}`"),
            }
        }
        index += 1;
    }
    let seconds = seconds.unwrap_or(if smoke { SMOKE_SECONDS } else { DEFAULT_SECONDS });
    if smoke {
        libfuzzer_args.splice(0..0, SMOKE_ARGS.iter().map(|arg| arg.to_string()));
    }
    fuzz(target.as_deref(), seconds, &libfuzzer_args)
}

/// The `cargo xtask test` step: every target, briefly.
pub(crate) fn smoke() -> Result<()> {
    let args: Vec<String> = SMOKE_ARGS.iter().map(|arg| arg.to_string()).collect();
    fuzz(None, SMOKE_SECONDS, &args)
}

/// The fuzz project's manifest, if there is one.
pub(crate) fn manifest() -> Option<PathBuf> {
    let manifest = Path::new(FUZZ_DIR).join("Cargo.toml");
    manifest.is_file().then_some(manifest)
}

fn fuzz(only: Option<&str>, seconds: u64, libfuzzer_args: &[String]) -> Result<()> {
    if manifest().is_none() {
        bail!("{FUZZ_DIR}/Cargo.toml not found: the fuzz project is missing");
    }
    let fuzz_dir = Path::new(FUZZ_DIR);
    ensure_cargo_fuzz()?;
    let all_targets = list_targets()?;
    let targets: Vec<&str> = match only {
        Some(name) if all_targets.iter().any(|target| target == name) => vec![name],
        Some(name) => bail!("no fuzz target `{name}`; targets: {}", all_targets.join(", ")),
        None => all_targets.iter().map(String::as_str).collect(),
    };
    if targets.is_empty() {
        bail!("`cargo fuzz list` found no targets in {FUZZ_DIR}/");
    }
    // Build once up front so the per-target time budget is spent fuzzing.
    announce(&format!("building fuzz targets: {}", targets.join(", ")));
    let mut build = cargo_fuzz("build");
    if let Some(name) = only {
        build.arg(name);
    }
    run_command(&mut build)?;
    for target in &targets {
        announce(&format!("fuzzing {target} for {seconds} s"));
        let corpus = fuzz_dir.join("corpus").join(target);
        fs::create_dir_all(&corpus).with_context(|| format!("cannot create {}", corpus.display()))?;
        let seeds = fuzz_dir.join("seeds").join(target);
        // libFuzzer adds new inputs to the first directory only, so the
        // committed seeds stay as they are.
        let mut command = cargo_fuzz("run");
        command.arg(target).arg(&corpus);
        if seeds.is_dir() {
            command.arg(&seeds);
        }
        command.arg("--").arg(format!("-max_total_time={seconds}")).args(libfuzzer_args);
        run_command(&mut command)?;
    }
    println!("fuzz: {} target(s) ran {seconds} s each without a crash", targets.len());
    Ok(())
}

/// `cargo fuzz SUBCOMMAND` on stable: RUSTC_BOOTSTRAP unlocks the `-Z`
/// sanitizer flags it passes to rustc.
fn cargo_fuzz(subcommand: &str) -> Command {
    let mut command = cargo();
    command.env("RUSTC_BOOTSTRAP", "1").args(["fuzz", subcommand, "--fuzz-dir", FUZZ_DIR]);
    command
}

fn ensure_cargo_fuzz() -> Result<()> {
    if command_succeeds(cargo().args(["fuzz", "--version"])) {
        return Ok(());
    }
    announce("cargo-fuzz is not installed; installing it (cargo install cargo-fuzz --locked)");
    run_command(cargo().args(["install", "cargo-fuzz", "--locked"]))
}

fn list_targets() -> Result<Vec<String>> {
    let output = cargo_fuzz("list").output().context("cannot run `cargo fuzz list`")?;
    if !output.status.success() {
        bail!("`cargo fuzz list` failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let stdout = String::from_utf8(output.stdout).context("`cargo fuzz list` printed non-UTF-8")?;
    Ok(stdout.lines().map(str::trim).filter(|line| !line.is_empty()).map(str::to_owned).collect())
}
