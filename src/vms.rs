//! `kiln ps`, `kiln gc`: the VMs in the state directory and their cleanup.

use std::process::ExitCode;

use anyhow::{Context, Result};
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
    println!("{:<24} {:<10} {:<10} {:<16} {:<16} EXIT", "NAME", "STATE", "PHASE", "TAP", "GUEST");
    for entry in &entries {
        let record = &entry.record;
        let guest = record.lease.map(|l| l.guest.to_string()).unwrap_or_else(|| "-".into());
        let exit = record.exit.as_ref().map(|e| e.how.clone()).unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:<10} {:<10} {:<16} {:<16} {exit}",
            record.name,
            state_word(entry),
            serde_json::to_value(record.phase).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
            record.tap.as_deref().unwrap_or("-"),
            guest,
        );
    }
    Ok(ExitCode::SUCCESS)
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
