//! `kiln ps`, `kiln gc`: the VMs in the state directory and their cleanup.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use kiln::{HostHandles, HostNet, StateDir, VmEntry};

#[derive(Debug, Args)]
pub(crate) struct PsArgs {
    /// Print JSON (one array of records with `alive`) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct GcArgs {
    /// Print what would be released, change nothing.
    #[arg(long)]
    dry_run: bool,
}

pub(crate) fn state() -> Result<StateDir> {
    let root = StateDir::default_root()?;
    StateDir::open(&root).with_context(|| format!("cannot open kiln's state directory {}", root.display()))
}

pub(crate) fn ps(args: &PsArgs) -> Result<ExitCode> {
    let entries = state()?.list()?;
    if args.json {
        let json: Vec<serde_json::Value> = entries
            .iter()
            .map(|entry| {
                let mut value = serde_json::to_value(&entry.record).unwrap_or_default();
                value["alive"] = entry.alive.into();
                value
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<24} {:<10} {:<10} {:<16} {:<16} {:<40} EXIT", "NAME", "STATE", "PHASE", "TAP", "GUEST", "IMAGE");
    for entry in &entries {
        let record = &entry.record;
        let guest = record.lease.map(|l| l.guest.to_string()).unwrap_or_else(|| "-".into());
        let exit = record.exit.as_ref().map_or_else(|| "-".to_owned(), exit_summary);
        let image = record.image.as_ref().map_or_else(|| "-".to_owned(), kiln::VmImage::short);
        println!(
            "{:<24} {:<10} {:<10} {:<16} {:<16} {image:<40} {exit}",
            record.name,
            state_word(entry),
            serde_json::to_value(record.phase).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
            record.tap.as_deref().unwrap_or("-"),
            guest,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The first line of how the VM ended, and who says so.
fn exit_summary(exit: &kiln::ExitInfo) -> String {
    let summary = exit.how.lines().next().unwrap_or_default();
    match exit.source {
        Some(source) => format!("{summary} ({source})"),
        None => summary.to_owned(),
    }
}

fn state_word(entry: &VmEntry) -> &'static str {
    match (entry.alive, entry.record.exit.is_some()) {
        (true, _) => "running",
        (false, true) => "exited",
        // The launcher died without recording an end: gc releases it.
        (false, false) => "dead",
    }
}

pub(crate) fn gc(args: &GcArgs) -> Result<ExitCode> {
    let state = state()?;
    let net = HostNet::from_env()?;
    let host = HostHandles::open(&state, &net)?;
    let actions = kiln::collect_garbage(&state, &host, args.dry_run)?;
    let verb = if args.dry_run { "would" } else { "did" };
    if actions.is_empty() {
        println!("kiln gc: nothing to release");
    }
    for action in &actions {
        println!("kiln gc: {verb} {action}");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub(crate) struct StopArgs {
    /// The VM's name (its spec's `name`).
    name: String,
    /// Seconds the service gets after SIGTERM before it is killed (0 to
    /// 86400; default: the spec's `kiln.grace=`, else 10).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=kiln_guest::MAX_GRACE_SECONDS))]
    timeout: Option<u64>,
}

#[derive(Debug, Args)]
pub(crate) struct LogsArgs {
    /// The VM's name (its spec's `name`).
    name: String,
    /// Keep printing new output until the VM stops.
    #[arg(short, long)]
    follow: bool,
}

fn find(state: &StateDir, name: &str) -> Result<VmEntry> {
    state
        .list()?
        .into_iter()
        .find(|entry| entry.record.name == name)
        .with_context(|| format!("no VM named `{name}` (see `kiln ps`)"))
}

/// Asks the VM's launcher to stop (SIGTERM: it powers the VM down, giving
/// the service its SIGTERM and the grace period), and waits for it.
pub(crate) fn stop(args: &StopArgs) -> Result<ExitCode> {
    let state = state()?;
    let entry = find(&state, &args.name)?;
    if !entry.alive {
        println!("kiln stop: VM `{}` is not running", args.name);
        return Ok(ExitCode::SUCCESS);
    }
    let pid = rustix::process::Pid::from_raw(i32::try_from(entry.record.launcher_pid).unwrap_or(0))
        .context("the record holds no launcher pid")?;
    // How long the launcher may take: the grace period it will use, its
    // margin, and the VMM's quit; past that it is stuck.
    let grace = kiln::request_stop(&entry.dir, args.timeout)?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)
        .with_context(|| format!("cannot signal kiln run (pid {pid:?})"))?;
    let deadline = Instant::now() + grace + kiln::STOP_MARGIN + Duration::from_secs(20);
    while Instant::now() < deadline {
        if !find(&state, &args.name).map(|e| e.alive).unwrap_or(false) {
            println!("kiln stop: VM `{}` stopped", args.name);
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The launcher is stuck: kill it. Its VMM dies with it (PDEATHSIG) and gc releases the rest.
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    bail!("kiln run of `{}` did not stop in time and was killed; run `kiln gc` to release what it held", args.name)
}

/// Prints the VM's console log; with `--follow`, keeps printing until the
/// VM's launcher exits.
pub(crate) fn logs(args: &LogsArgs) -> Result<ExitCode> {
    let state = state()?;
    let entry = find(&state, &args.name)?;
    let path =
        entry.record.console_log.clone().with_context(|| format!("VM `{}` has no console log yet", args.name))?;
    let mut file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut stdout = std::io::stdout().lock();
    loop {
        std::io::copy(&mut file, &mut stdout)?;
        stdout.flush()?;
        if !args.follow || !find(&state, &args.name).map(|e| e.alive).unwrap_or(false) {
            // One last read: the launcher may have written after our copy.
            std::io::copy(&mut file, &mut stdout)?;
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
