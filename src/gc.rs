//! Releasing what a VM held on the host: used by `kiln run` when its VM
//! stops, and by `kiln gc` for VMs whose launcher died at any step.
//!
//! Every step is idempotent and tolerates the resource never having been
//! created (the record names a resource *before* it exists), so the same
//! code serves a clean stop, a crash mid-launch and a second gc.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_net::{Ledger, Nft, Tap};

use crate::state::{StateDir, VmRecord};
use crate::{HostNet, Result};

/// The host handles cleanup needs.
#[derive(Debug)]
pub struct HostHandles {
    pub nft: Nft,
    pub ledger: Ledger,
}

impl HostHandles {
    /// `nft` in the current namespace and the ledger in `state`.
    pub fn open(state: &StateDir, net: &HostNet) -> Result<HostHandles> {
        let ledger = Ledger::open(state.ledger_dir(), net.cidr, net.prefix)?;
        Ok(HostHandles { nft: Nft::new(), ledger })
    }
}

/// One thing gc did or, with `--dry-run`, would do.
pub type GcAction = String;

/// Releases everything `record` names: kills its VMM (only if that pid is
/// still the VMM: its command line names the VM's run directory), deletes
/// its tap, its firewall elements and its lease. Returns what it did.
pub fn release_vm(record: &VmRecord, host: &HostHandles, dry_run: bool) -> Result<Vec<GcAction>> {
    let name = &record.name;
    let mut actions = Vec::new();
    if let Some(vmm) = &record.vmm
        && vmm_still_runs(vmm.pid, &vmm.run_dir)
    {
        actions.push(format!("kill {} (pid {}) of VM {name}", vmm.backend, vmm.pid));
        if !dry_run {
            kill_group_and_wait(vmm.pid);
        }
    }
    if let Some(tap) = &record.tap {
        if Path::new("/sys/class/net").join(tap).exists() {
            actions.push(format!("delete tap {tap} of VM {name}"));
        }
        if !dry_run {
            Tap::delete(tap)?;
        }
    }
    // One listing (or one locked ledger read) each: a real run asks the
    // host to remove and reports what was there. A record that never
    // reached the firewall (or whose rules were already removed) has none.
    let has_elements = match (record.firewall, dry_run) {
        (false, _) => false,
        (true, true) => host.nft.list_vms()?.contains(name.as_str()),
        (true, false) => host.nft.remove_vm(name)?,
    };
    if has_elements {
        actions.push(format!("remove nftables elements of VM {name}"));
    }
    let had_lease = if dry_run {
        host.ledger.leases()?.iter().any(|lease| &lease.owner == name)
    } else {
        host.ledger.release(name)?
    };
    if had_lease {
        actions.push(format!("release the lease of VM {name}"));
    }
    Ok(actions)
}

/// `kiln gc`: releases every VM whose launcher is gone, then whatever kiln
/// holds that no live VM claims (rules, leases, `kt-` taps).
pub fn collect_garbage(state: &StateDir, host: &HostHandles, dry_run: bool) -> Result<Vec<GcAction>> {
    let mut actions = Vec::new();
    let entries = state.list()?;
    let alive: Vec<&VmRecord> = entries.iter().filter(|e| e.alive).map(|e| &e.record).collect();
    for entry in entries.iter().filter(|e| !e.alive) {
        if dry_run {
            actions.extend(release_vm(&entry.record, host, true)?);
            actions.push(format!("remove the state of VM {}", entry.record.name));
            continue;
        }
        // Between list and claim a launcher may have taken it: then it is not ours.
        let Some(claim) = state.claim_dead(&entry.record.name)? else { continue };
        actions.extend(release_vm(&claim.record, host, false)?);
        actions.push(format!("remove the state of VM {}", claim.record.name));
        claim.remove()?;
    }

    let alive_names: Vec<&str> = alive.iter().map(|r| r.name.as_str()).collect();
    let orphans: Vec<String> =
        host.nft.list_vms()?.into_iter().filter(|id| !alive_names.contains(&id.as_str())).collect();
    for id in &orphans {
        actions.push(format!("remove orphaned nftables elements of {id}"));
    }
    if !dry_run && !orphans.is_empty() {
        host.nft.reconcile(&alive_names)?;
    }
    for lease in host.ledger.leases()? {
        if !alive_names.contains(&lease.owner.as_str()) {
            actions.push(format!("release orphaned lease {} of {}", lease.subnet, lease.owner));
            if !dry_run {
                host.ledger.release(&lease.owner)?;
            }
        }
    }
    let alive_taps: Vec<&str> = alive.iter().filter_map(|r| r.tap.as_deref()).collect();
    for tap in kiln_taps() {
        if !alive_taps.contains(&tap.as_str()) {
            actions.push(format!("delete orphaned tap {tap}"));
            if !dry_run {
                Tap::delete(&tap)?;
            }
        }
    }
    Ok(actions)
}

/// kiln's taps (`kt-*`) in this network namespace.
fn kiln_taps() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else { return Vec::new() };
    let mut taps: Vec<String> =
        entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|name| name.starts_with("kt-")).collect();
    taps.sort();
    taps
}

/// Whether `pid` runs and its command line mentions `run_dir` (so a reused
/// pid is never killed).
fn vmm_still_runs(pid: u32, run_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let needle = run_dir.as_os_str().as_encoded_bytes();
    !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}

/// SIGKILLs the process group `pid` leads and waits (up to 5 s) for `pid`
/// to disappear. It is not our child, so it cannot be waited for; its
/// parent (the dead launcher's reaper, init) reaps it.
fn kill_group_and_wait(pid: u32) {
    let Some(pid) = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0)) else { return };
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    let stat = format!("/proc/{}/stat", pid.as_raw_nonzero());
    while Instant::now() < deadline {
        match std::fs::read_to_string(&stat) {
            // A zombie (state `Z`) is dead; only its parent can reap it.
            Ok(text) if text.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')) => return,
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => return,
        }
    }
}
