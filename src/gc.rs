//! Releasing what a VM held on the host: used by `kiln run` when its VM
//! stops, and by `kiln gc` for VMs whose launcher died at any step.
//!
//! Every step is idempotent and tolerates the resource never having been
//! created (the record names a resource *before* it exists), so the same
//! code serves a clean stop, a crash mid-launch and a second gc.
//!
//! A gc pass holds the state directory's `gc.lock` exclusively from its
//! listing to its last orphan (see [`crate::state`] for the protocol), so
//! no VM is claimed in between and two passes never overlap.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_net::{Ledger, Nft, Tap, tap_name};
use kiln_oci::Store;

use crate::state::{StateDir, VmRecord, VmmInfo};
use crate::{HostNet, Result};

/// The host handles cleanup needs.
#[derive(Debug)]
pub struct HostHandles {
    pub nft: Nft,
    pub ledger: Ledger,
    /// Where the OCI image store is (VMs of images hold references there);
    /// opened only when an image is run or released, so a kiln that never
    /// ran one has none.
    pub images: PathBuf,
}

impl HostHandles {
    /// `nft` in the current namespace, the ledger and the image store's place in `state`.
    pub fn open(state: &StateDir, net: &HostNet) -> Result<HostHandles> {
        let ledger = Ledger::open(state.ledger_dir(), net.cidr, net.prefix)?;
        Ok(HostHandles { nft: Nft::new(), ledger, images: state.root().join(crate::run::OCI_STORE_DIR) })
    }

    /// The image store, created if need be.
    pub fn image_store(&self) -> Result<Store> {
        Ok(Store::open(&self.images)?)
    }
}

/// One thing gc did or, with `--dry-run`, would do.
pub type GcAction = String;

/// Releases everything `record` names: kills its VMM (only if that pid is
/// still the VMM: see `is_recorded_vmm`), deletes
/// its tap, its firewall elements and its lease. Returns what it did.
pub fn release_vm(record: &VmRecord, host: &HostHandles, dry_run: bool) -> Result<Vec<GcAction>> {
    let name = &record.name;
    let mut actions = Vec::new();
    if let Some(vmm) = &record.vmm
        && is_recorded_vmm(vmm)
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
    // Named in the record before the reference is taken, like every resource.
    if record.image.is_some() {
        let store = host.image_store()?;
        if !store.references(name)?.is_empty() {
            actions.push(format!("release the image store's reference of VM {name}"));
            if !dry_run {
                store.release(name)?;
            }
        }
    }
    Ok(actions)
}

/// `kiln gc`: releases every VM whose launcher is gone, then whatever kiln
/// holds that no live VM claims (rules, leases, `kt-` taps).
pub fn collect_garbage(state: &StateDir, host: &HostHandles, dry_run: bool) -> Result<Vec<GcAction>> {
    let mut actions = Vec::new();
    // Held until the orphans are done: no claim and no other gc meanwhile.
    let gc_lock = state.lock_for_gc()?;
    let entries = state.list()?;
    let alive: Vec<&VmRecord> = entries.iter().filter(|e| e.alive).map(|e| &e.record).collect();
    for entry in entries.iter().filter(|e| !e.alive) {
        if dry_run {
            actions.extend(release_vm(&entry.record, host, true)?);
            actions.push(format!("remove the state of VM {}", entry.record.name));
            continue;
        }
        // No launcher claims it while gc holds its lock; the VM lock is taken
        // all the same, so a launcher that was alive after all is never robbed.
        let Some(claim) = state.claim_dead(&gc_lock, &entry.record.name)? else { continue };
        actions.extend(release_vm(&claim.record, host, false)?);
        actions.push(format!("remove the state of VM {}", claim.record.name));
        claim.remove()?;
    }

    pause_if_asked();
    // By name, not by what the records name yet: a VM listed while still
    // starting may take its lease, tap and elements during this pass.
    let alive_names: Vec<&str> = alive.iter().map(|r| r.name.as_str()).collect();
    let orphans: Vec<String> =
        host.nft.list_vms()?.into_iter().filter(|id| !alive_names.contains(&id.as_str())).collect();
    for id in &orphans {
        actions.push(format!("remove orphaned nftables elements of {id}"));
    }
    // Even with no orphaned elements: a launcher killed between removing its
    // elements and restoring its uplink's forwarding left only that record.
    if !dry_run {
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
    let alive_taps: Vec<String> =
        alive.iter().flat_map(|r| r.tap.clone().into_iter().chain(tap_name(&r.name).ok())).collect();
    for tap in kiln_taps() {
        if !alive_taps.contains(&tap) {
            actions.push(format!("delete orphaned tap {tap}"));
            if !dry_run {
                Tap::delete(&tap)?;
            }
        }
    }
    // Launchers may claim again: the store sweep below waits for running
    // pulls (the store's own locks keep it correct), and a launcher must
    // not wait on gc.lock behind a slow pull.
    drop(gc_lock);
    // Last, once every dead VM's reference is gone: images no VM uses, and
    // the layer tars and layer filesystems only they had. Dry, the dead
    // VMs' references (released first by a real pass) count as released.
    if host.images.is_dir() {
        let dead: Vec<String> = entries.iter().filter(|e| !e.alive).map(|e| e.record.name.clone()).collect();
        let swept = crate::run::sweep_image_store(&host.image_store()?, dry_run.then_some(&dead[..]))?;
        let mut parts = Vec::new();
        if swept.images + swept.layers + swept.blobs + swept.derived > 0 {
            parts.push(format!(
                "{} images, {} layer tars, {} blobs and {} layer filesystem directories no VM uses",
                swept.images, swept.layers, swept.blobs, swept.derived
            ));
        }
        if swept.derived_files > 0 {
            parts.push(format!(
                "{} killed builds' temp files in layer filesystem directories VMs use",
                swept.derived_files
            ));
        }
        if swept.temp_files > 0 {
            parts.push(format!("{} killed pulls' temp files", swept.temp_files));
        }
        if !parts.is_empty() {
            actions.push(format!("remove from the image store {} ({} bytes)", parts.join(", and "), swept.bytes));
        }
    }
    Ok(actions)
}

/// For race tests only: `kiln gc` pauses this many milliseconds between
/// its listing and its orphan pass, the window in which a VM that starts
/// would look like an orphan if launchers did not wait for gc.
pub(crate) const GC_TEST_PAUSE_ENV: &str = "KILN_GC_TEST_PAUSE_MS";

fn pause_if_asked() {
    let Some(ms) = std::env::var(GC_TEST_PAUSE_ENV).ok().and_then(|v| v.parse::<u64>().ok()) else { return };
    eprintln!("kiln gc: {GC_TEST_PAUSE_ENV}: pausing {ms} ms after listing");
    std::thread::sleep(Duration::from_millis(ms));
}

/// kiln's taps (`kt-*`) in this network namespace.
fn kiln_taps() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else { return Vec::new() };
    let mut taps: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(kiln_net::TAP_PREFIX))
        .collect();
    taps.sort();
    taps
}

/// The command line of process `pid`, split at NULs, as a VMM record keeps
/// it; `None` if it cannot be read or is not UTF-8.
pub(crate) fn process_argv(pid: u32) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let bytes = bytes.strip_suffix(b"\0")?;
    bytes.split(|&b| b == 0).map(|arg| String::from_utf8(arg.to_vec()).ok()).collect()
}

/// Whether `vmm.pid` is still the VMM the record names: its
/// `/proc/<pid>/cmdline` is the recorded argv byte for byte, and it leads
/// its own process group (kiln-vmm starts it so). A pid reused by any other
/// process, even one whose command line mentions the VM's files, fails.
fn is_recorded_vmm(vmm: &VmmInfo) -> bool {
    if vmm.pid == 0 || vmm.argv.is_empty() {
        return false;
    }
    let expected: Vec<u8> = vmm.argv.iter().flat_map(|arg| arg.bytes().chain([0])).collect();
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", vmm.pid)) else { return false };
    cmdline == expected && process_group(vmm.pid) == Some(vmm.pid)
}

/// Field 5 of `/proc/<pid>/stat` (after the parenthesised command name).
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(2)?.parse().ok()
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

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};

    use super::*;

    /// A `sh` (blocked in its builtin `read`, so no child of its own)
    /// whose command line names the run directory.
    fn vmm_info(child: &Child, run_dir: &Path) -> VmmInfo {
        // Until the exec is done /proc shows the forked test binary.
        let deadline = Instant::now() + Duration::from_secs(5);
        let argv = loop {
            match process_argv(child.id()) {
                Some(argv) if argv.first().is_some_and(|a| a == "sh") => break argv,
                _ if Instant::now() > deadline => panic!("sh never started"),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        VmmInfo { backend: "qemu".into(), pid: child.id(), run_dir: run_dir.to_path_buf(), argv }
    }

    #[test]
    fn gc_kills_only_the_recorded_vmm_by_exact_argv_and_process_group() {
        let run_dir = tempfile::tempdir().unwrap();
        let mention = run_dir.path().join("qmp.sock");
        // A process whose command line mentions the run directory but is
        // not the recorded VMM (the old check matched it).
        let mut bystander = Command::new("sh")
            .args(["-c", "read -r line", "sh"])
            .arg(&mention)
            .stdin(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut recorded = vmm_info(&bystander, run_dir.path());
        recorded.argv = vec!["qemu-system-x86_64".into(), "-qmp".into(), mention.display().to_string()];
        assert!(!is_recorded_vmm(&recorded), "a process merely mentioning the run dir matched");
        let ledger_dir = tempfile::tempdir().unwrap();
        let host = HostHandles {
            nft: Nft::new(),
            ledger: Ledger::open(ledger_dir.path(), "10.213.0.0/16".parse().unwrap(), 30).unwrap(),
            images: ledger_dir.path().join("oci"),
        };
        let record = VmRecord { name: "web".into(), vmm: Some(recorded), ..VmRecord::default() };
        let actions = release_vm(&record, &host, false).unwrap();
        assert!(actions.is_empty(), "{actions:?}");
        assert!(bystander.try_wait().unwrap().is_none(), "gc killed a bystander");

        // The exact argv, but not its own process group leader.
        let mut not_leader =
            Command::new("sh").args(["-c", "read -r line", "sh"]).arg(&mention).stdin(Stdio::piped()).spawn().unwrap();
        let info = vmm_info(&not_leader, run_dir.path());
        assert_eq!(process_group(not_leader.id()), process_group(std::process::id()));
        assert!(!is_recorded_vmm(&info), "a process outside its own group matched");

        // The recorded VMM itself: exact argv, its own group; gc kills it.
        let info = vmm_info(&bystander, run_dir.path());
        assert!(is_recorded_vmm(&info));
        let record = VmRecord { name: "web".into(), vmm: Some(info.clone()), ..VmRecord::default() };
        let actions = release_vm(&record, &host, false).unwrap();
        assert_eq!(actions.len(), 1, "{actions:?}");
        let status = bystander.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
        // The pid left behind by a dead VMM matches nothing.
        assert!(!is_recorded_vmm(&info));
        assert!(!is_recorded_vmm(&VmmInfo { argv: Vec::new(), ..info }), "no recorded argv, no kill");
        not_leader.kill().unwrap();
        not_leader.wait().unwrap();
    }
}
