//! `cargo xtask`: kiln's project tasks (CI, demo, benchmarks, fuzzing) as
//! plain Rust, so they run the same on a laptop and in CI.
//!
//! One module per task; arguments are parsed by hand. Dependencies are
//! `anyhow`, `libc`, `plotters` (the benchmark charts, SVG only), and kiln's
//! own pure libraries `kiln-imagefmt` and `kiln-guest` for `cargo xtask
//! guest` (in-process, no CLI round trip).

mod bench;
mod debian;
mod demo;
mod fuzz;
mod guest;
mod json;
mod k8s_validate;
mod test;
mod tidy;

use std::env;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  test                              what CI runs: Debian packages, fmt, tidy, clippy, tests, fuzz smoke
  demo                              build the example service disk and cloud-init seed into target/demo/
  bench [AREA...] [--runs N] [--no-big]
                                    compare kiln with its peers (areas: all by default)
  fuzz [TARGET] [--time SECS] [--smoke] [-- LIBFUZZER_ARGS...]
                                    run cargo-fuzz targets in fuzz/ (all by default, 60 s each)
  guest [--kernel BZIMAGE [--modules DIR]] [--busybox PATH]
                                    build the minimal guest into target/guest/: kernel
                                    (Debian's cloud kernel by default), vmlinux, initramfs
  tidy                              the shape rules: lib.rs docs, file and function lengths,
                                    one-way dependencies (also a step of `test`)
  help                              this text
";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args = env::args().skip(1);
    let command = args.next();
    let rest: Vec<String> = args.collect();
    env::set_current_dir(project_root()).context("cannot enter the project root")?;
    match command.as_deref() {
        Some("test") => test::run(&rest),
        Some("demo") => demo::run(&rest),
        Some("bench") => bench::run(&rest),
        Some("fuzz") => fuzz::run(&rest),
        Some("guest") => guest::run(&rest),
        Some("tidy") => tidy::run(&rest),
        Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            Ok(())
        }
        None => bail!("no command given\n\n{USAGE}"),
        Some(other) => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}

/// The workspace root: xtask lives one level below it.
fn project_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Cargo's target directory, relative to the project root unless overridden.
fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from)
}

/// The cargo that started us, so nested builds use the same toolchain.
fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Prints a step announcement; every task uses the same marker so CI logs scan easily.
fn announce(message: &str) {
    println!("==> {message}");
}

/// Runs `command` with inherited stdio after echoing it; fails unless it exits 0.
fn run_command(command: &mut Command) -> Result<()> {
    let shown = show_command(command);
    println!("$ {shown}");
    let status = command.status().with_context(|| format!("cannot run `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Whether `command` can be started and exits 0, with its output discarded.
fn command_succeeds(command: &mut Command) -> bool {
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The command line as a user would type it (env overrides first).
fn show_command(command: &Command) -> String {
    let env =
        command.get_envs().filter_map(|(key, value)| Some(format!("{}={}", key.to_string_lossy(), shell_word(value?))));
    // Our own cargo is usually a long toolchain path; show it as users type it.
    let cargo = env::var_os("CARGO");
    let program =
        if Some(command.get_program()) == cargo.as_deref() { OsStr::new("cargo") } else { command.get_program() };
    let words = std::iter::once(shell_word(program)).chain(command.get_args().map(shell_word));
    env.chain(words).collect::<Vec<_>>().join(" ")
}

/// Quotes a word for display only when a shell would need it.
fn shell_word(word: &OsStr) -> String {
    let text = word.to_string_lossy();
    let plain = !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain { text.into_owned() } else { format!("'{}'", text.replace('\'', r"'\''")) }
}

/// `1m05s`, `12.3s`, `850ms`: durations for humans in step summaries.
fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds >= 60.0 {
        let whole = duration.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else if seconds >= 1.0 {
        format!("{seconds:.1}s")
    } else {
        format!("{}ms", duration.as_millis())
    }
}

/// `104.9 MiB`, `2.0 KiB`, `512 B`: sizes for humans.
fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Parses the value of `--flag VALUE` / `--flag=VALUE` from `args` at `index`,
/// advancing `index` past what it consumed. `None` when `args[index]` is not `flag`.
fn flag_value(args: &[String], index: &mut usize, flag: &str) -> Result<Option<String>> {
    let arg = &args[*index];
    if let Some(value) = arg.strip_prefix(flag).and_then(|rest| rest.strip_prefix('=')) {
        return Ok(Some(value.to_owned()));
    }
    if arg != flag {
        return Ok(None);
    }
    *index += 1;
    match args.get(*index) {
        Some(value) => Ok(Some(value.clone())),
        None => bail!("{flag} needs a value"),
    }
}
