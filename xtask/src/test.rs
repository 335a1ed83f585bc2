//! `cargo xtask test`: everything CI checks, in the order that fails cheapest first.
//!
//! The package step must succeed for the rest to mean anything; after it,
//! every step runs even when an earlier one failed, so one CI run reports
//! all problems at once.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::{announce, cargo, command_succeeds, debian, format_duration, fuzz, guest, k8s_validate, run_command, tidy};

/// Set for the test run so a test whose external tool is missing fails
/// instead of skipping (see kiln-testkit).
const REQUIRE_TOOLS_ENV: (&str, &str) = ("KILN_REQUIRE_TOOLS", "1");
// The absolute path of `target/guest`, for tests that boot the guest.
use kiln_guest::GUEST_DIR_ENV;

type Step = fn() -> Result<()>;

pub(crate) fn run(args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        bail!("`cargo xtask test` takes no arguments, got `{arg}`");
    }
    let started = Instant::now();
    let steps: [(&str, Step); 7] = [
        ("Debian packages", packages),
        ("cargo fmt --check", fmt),
        ("tidy (cargo xtask tidy)", tidy_step),
        ("clippy -D warnings", clippy),
        ("guest (cargo xtask guest)", guest_step),
        ("tests", tests),
        ("fuzz smoke", fuzz_smoke),
    ];
    let mut outcomes: Vec<(&str, Duration, bool)> = Vec::new();
    for (index, (name, step)) in steps.iter().enumerate() {
        announce(&format!("[{}/{}] {name}", index + 1, steps.len()));
        let step_started = Instant::now();
        let result = step();
        if let Err(err) = &result {
            println!("xtask: {name} failed: {err:#}");
        }
        outcomes.push((name, step_started.elapsed(), result.is_ok()));
        // Without the packages the tests fail for a reason the log already gave.
        if index == 0 && result.is_err() {
            break;
        }
    }
    let timings: Vec<String> = outcomes
        .iter()
        .map(|(name, took, ok)| format!("{name} {}{}", format_duration(*took), if *ok { "" } else { " FAILED" }))
        .collect();
    let failed: Vec<&str> = outcomes.iter().filter(|(_, _, ok)| !ok).map(|(name, _, _)| *name).collect();
    let total = format_duration(started.elapsed());
    if failed.is_empty() {
        println!("xtask test: all {} steps passed in {total} ({})", outcomes.len(), timings.join(", "));
        Ok(())
    } else {
        println!("xtask test: FAILED in {total} ({})", timings.join(", "));
        bail!("failed steps: {}", failed.join(", "))
    }
}

fn packages() -> Result<()> {
    debian::ensure_installed(debian::TEST_PACKAGES)?;
    // PyPI, not Debian: kiln-k8s's schema checks (Debian has no kubernetes-validate).
    k8s_validate::ensure_installed()
}

fn fmt() -> Result<()> {
    let workspace = run_command(cargo().args(["fmt", "--all", "--check"]));
    // fuzz/ is outside the workspace, so `--all` does not reach it.
    let fuzz = match fuzz::manifest() {
        Some(manifest) => run_command(cargo().args(["fmt", "--check", "--manifest-path"]).arg(manifest)),
        None => Ok(()),
    };
    workspace.and(fuzz)
}

/// File and function lengths, lib docs, dependency rules: seconds, before clippy's minutes.
fn tidy_step() -> Result<()> {
    tidy::run(&[])
}

fn clippy() -> Result<()> {
    let workspace = run_command(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]));
    // kiln's VM-only build (no `k8s` feature) must compile too; the tidy
    // step checks its dependency tree, this checks its code.
    let vm_only = run_command(cargo().args([
        "clippy",
        "-p",
        "kiln",
        "--no-default-features",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]));
    workspace.and(vm_only)
}

/// Builds the guest the boot tests run (kernel, vmlinux, initramfs). Its
/// failure does not stop the tests: they then fail, naming the missing file.
fn guest_step() -> Result<()> {
    guest::run(&[])
}

fn tests() -> Result<()> {
    let guest_dir = guest::guest_dir()?;
    let path = k8s_validate::path_with_bin()?;
    let with_tools = || {
        let mut command = cargo();
        command.env(REQUIRE_TOOLS_ENV.0, REQUIRE_TOOLS_ENV.1).env("PATH", &path);
        // Where the boot tests find `cargo xtask guest`'s output (kiln-testkit's guest_assets).
        command.env(GUEST_DIR_ENV, &guest_dir);
        command
    };
    if command_succeeds(cargo().args(["nextest", "--version"])) {
        // nextest does not run doctests. They go first, so that nextest's
        // summary ("N tests run: N passed") is the last word of the log.
        let doctests = run_command(with_tools().args(["test", "--workspace", "--doc"]));
        let nextest = run_command(with_tools().args(["nextest", "run", "--workspace", "--no-fail-fast"]));
        doctests.and(nextest)
    } else {
        println!("cargo-nextest is not installed; using cargo test");
        run_command(with_tools().args(["test", "--workspace", "--no-fail-fast"]))
    }
}

fn fuzz_smoke() -> Result<()> {
    fuzz::smoke()
}
