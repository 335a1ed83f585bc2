//! `kiln gc` against live launchers, and the state directory's modes, end
//! to end in the `World` of `run_e2e` (root, a network namespace, QEMU TCG).
//!
//! The race test uses `KILN_GC_TEST_PAUSE_MS`, which makes `kiln gc` pause
//! between its listing and its orphan pass, and starts each VM inside that
//! pause: without the lock protocol the starting VM's lease, tap and
//! firewall elements look like orphans and are taken away.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use kiln::{Phase, StateDir};

use crate::run_e2e::{RUN_DEADLINE, World, text};

const VMS: usize = 4;
/// How long each `kiln gc` pass pauses after listing: longer than a
/// launcher needs from its claim to its firewall.
const GC_PAUSE_MS: &str = "1500";

/// A VM whose service waits for SIGTERM; `service` and `resources` add
/// lines to those tables.
fn waiting_spec(world: &World, name: &str, service: &str, resources: &str) -> PathBuf {
    let probe = world.probe();
    world.spec(
        name,
        &format!(
            "name = \"{name}\"\n[service]\nbinary = \"{}\"\nargs = [\"--wait-for-sigterm\"]\n{service}\n\
             [resources]\nmemory = \"256MiB\"\n{resources}\n",
            probe.display()
        ),
    )
}

/// What one look at the host found wrong, if anything.
fn violations(world: &World, state: &StateDir) -> Vec<String> {
    let running = |state: &StateDir| -> BTreeMap<String, (u64, kiln::VmRecord)> {
        state
            .list()
            .unwrap()
            .into_iter()
            .filter(|e| e.alive && e.record.phase == Phase::Running)
            .map(|e| (e.record.name.clone(), (e.record.started, e.record)))
            .collect()
    };
    let before = running(state);
    let links = text(&world.exec(&["ip", "-o", "link"]).stdout);
    let elements = kiln_net::Nft::in_namespace(&world.netns).list_vms().unwrap();
    let ledger = kiln_net::Ledger::open(state.ledger_dir(), kiln::DEFAULT_CIDR.parse().unwrap(), 30).unwrap();
    let leases = ledger.leases().unwrap();
    let after = running(state);
    let mut found = Vec::new();
    let mut subnets = BTreeMap::new();
    for lease in &leases {
        if let Some(other) = subnets.insert(lease.subnet, lease.owner.clone()) {
            found.push(format!("subnet {} leased to both {other} and {}", lease.subnet, lease.owner));
        }
    }
    // Only VMs running before *and* after the look (the same run) count.
    for (name, (started, record)) in &before {
        if after.get(name).is_none_or(|(again, _)| again != started) {
            continue;
        }
        let tap = record.tap.clone().unwrap_or_default();
        if !links.contains(&format!(": {tap}:")) {
            found.push(format!("running VM {name} has no tap {tap}"));
        }
        if !elements.contains(name) {
            found.push(format!("running VM {name} has no nftables elements"));
        }
        match (leases.iter().find(|l| &l.owner == name), record.lease) {
            (Some(lease), Some(recorded)) if lease.guest_addr == recorded.guest => {}
            (held, recorded) => found.push(format!("running VM {name}: ledger {held:?}, record {recorded:?}")),
        }
    }
    found
}

#[test]
fn run_gc_in_a_loop_never_takes_what_a_starting_or_running_vm_holds() {
    let Some(world) = World::new("gc") else { return };
    let world = Arc::new(world);
    let state = StateDir::open(world.state_dir()).unwrap();
    let specs: Vec<PathBuf> = (0..VMS).map(|i| waiting_spec(&world, &format!("g{i}"), "", "")).collect();

    // `kiln gc` in a loop; each pause after listing is announced.
    let done = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicUsize::new(0));
    let (paused_tx, paused) = mpsc::channel::<()>();
    let gc_loop = {
        let (world, done, passes) = (Arc::clone(&world), Arc::clone(&done), Arc::clone(&passes));
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let mut child = world
                    .kiln(&["gc"])
                    .env("KILN_GC_TEST_PAUSE_MS", GC_PAUSE_MS)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut stderr = String::new();
                for line in BufReader::new(child.stderr.take().unwrap()).lines() {
                    let line = line.unwrap();
                    if line.contains("pausing") {
                        let _ = paused_tx.send(());
                    }
                    stderr.push_str(&line);
                    stderr.push('\n');
                }
                let output = child.wait_with_output().unwrap();
                assert!(output.status.success(), "kiln gc failed: {stderr}");
                passes.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Look at the host all the time.
    let problems = Arc::new(Mutex::new(Vec::<String>::new()));
    let checker = {
        let (world, done, problems) = (Arc::clone(&world), Arc::clone(&done), Arc::clone(&problems));
        let state = state.clone();
        std::thread::spawn(move || {
            let mut looks = 0usize;
            while !done.load(Ordering::SeqCst) {
                problems.lock().unwrap().extend(violations(&world, &state));
                looks += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            looks
        })
    };

    let pauses_seen = AtomicUsize::new(0);
    let next_pause = || {
        // Drop stale announcements, then wait for a fresh one. A kiln
        // without the hook never pauses: then the loop races unaided.
        while paused.try_recv().is_ok() {}
        if paused.recv_timeout(Duration::from_secs(10)).is_ok() {
            pauses_seen.fetch_add(1, Ordering::SeqCst);
        }
    };
    // Each VM starts while a gc pass that did not list it is paused.
    let starts: Vec<_> = specs
        .iter()
        .map(|spec| {
            next_pause();
            let (world, spec) = (Arc::clone(&world), spec.clone());
            std::thread::spawn(move || world.run_detached(&spec))
        })
        .collect();
    for (i, start) in starts.into_iter().enumerate() {
        let output = start.join().unwrap();
        assert!(output.status.success(), "kiln run --detach g{i}: {}", text(&output.stderr));
    }
    let all_running = state.list().unwrap().iter().filter(|e| e.alive && e.record.phase == Phase::Running).count();
    assert_eq!(all_running, VMS, "every VM runs: {:?}", state.list().unwrap());
    // A few more gc passes over four running VMs.
    let seen = passes.load(Ordering::SeqCst);
    let deadline = Instant::now() + RUN_DEADLINE;
    while passes.load(Ordering::SeqCst) < seen + 2 {
        assert!(Instant::now() < deadline, "gc stopped looping");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Stop them all, each inside a gc pause, while gc keeps looping.
    let stops: Vec<_> = (0..VMS)
        .map(|i| {
            next_pause();
            let world = Arc::clone(&world);
            std::thread::spawn(move || world.kiln(&["stop", &format!("g{i}"), "--timeout", "5"]).output().unwrap())
        })
        .collect();
    for (i, stop) in stops.into_iter().enumerate() {
        let output = stop.join().unwrap();
        assert!(output.status.success(), "kiln stop g{i}: {}", text(&output.stderr));
    }
    done.store(true, Ordering::SeqCst);
    gc_loop.join().unwrap();
    let looks = checker.join().unwrap();
    let mut problems = problems.lock().unwrap().clone();
    problems.sort();
    problems.dedup();
    assert!(problems.is_empty(), "while gc looped ({looks} looks at the host):\n{}", problems.join("\n"));
    assert!(looks > 10, "the checker looked only {looks} times");
    assert_eq!(pauses_seen.load(Ordering::SeqCst), 2 * VMS, "kiln gc ignored KILN_GC_TEST_PAUSE_MS");

    let gc = world.kiln(&["gc"]).output().unwrap();
    assert!(gc.status.success(), "{}", text(&gc.stderr));
    world.assert_nothing_left();
    assert!(state.list().unwrap().iter().all(|e| !e.alive), "a launcher is left");
}

/// Every directory under `root` 0700, every file and socket without group
/// or other bits; returns what it saw, by kind.
fn assert_private(root: &Path, when: &str) -> BTreeMap<&'static str, Vec<PathBuf>> {
    let mut seen: BTreeMap<&'static str, Vec<PathBuf>> = BTreeMap::new();
    let mut loose = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let kind = meta.file_type();
        let (what, ok) = if kind.is_dir() {
            stack.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            ("dir", mode == 0o700)
        } else if kind.is_socket() {
            ("socket", mode & 0o077 == 0)
        } else if kind.is_file() {
            ("file", mode & 0o077 == 0)
        } else {
            ("other", false)
        };
        if !ok {
            loose.push(format!("{what} {} is {mode:04o}", path.display()));
        }
        seen.entry(what).or_default().push(path);
    }
    assert!(loose.is_empty(), "{when}: not private:\n{}", loose.join("\n"));
    seen
}

#[test]
fn run_state_directory_is_private_while_a_vm_runs_and_after() {
    let Some(world) = World::new("modes") else { return };
    // A permissive umask, as a user's shell has: kiln must not rely on it.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    fs::create_dir(world.dir.path().join("keystore")).unwrap();
    fs::write(world.dir.path().join("keystore/key"), b"secret\n").unwrap();
    let spec = waiting_spec(
        &world,
        "private",
        "files = { keystore = { path = \"keystore\", secret = true } }",
        "storage = \"16MiB\"",
    );

    let output = world.run_detached(&spec);
    assert!(output.status.success(), "kiln run --detach: {}", text(&output.stderr));
    // `kiln ps` and `kiln gc` while it runs create their own files too.
    assert!(world.kiln(&["ps"]).output().unwrap().status.success());
    assert!(world.kiln(&["gc"]).output().unwrap().status.success());
    let seen = assert_private(&world.state_dir(), "while the VM runs");
    let names = |kind: &str| -> Vec<String> {
        seen.get(kind).into_iter().flatten().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
    };
    for file in ["launcher.log", "console.log", "service.img", "seed.img", "service.key", "record.json", "private.img"]
    {
        assert!(names("file").iter().any(|n| n == file), "no {file} in the state directory: {seen:?}");
    }
    assert!(!names("socket").is_empty(), "no VMM socket seen: {seen:?}");

    let stop = world.kiln(&["stop", "private", "--timeout", "5"]).output().unwrap();
    assert!(stop.status.success(), "kiln stop: {}", text(&stop.stderr));
    let seen = assert_private(&world.state_dir(), "after the VM stopped");
    assert!(seen["file"].iter().any(|p| p.ends_with("data/private.img")), "the data disk is kept: {seen:?}");
    // The console (the service's output) is in console.log only; the
    // detached launcher's log is kiln's own words.
    let vm_dir = world.state_dir().join("vms/private");
    let console = std::fs::read_to_string(vm_dir.join("console.log")).unwrap();
    let launcher = std::fs::read_to_string(vm_dir.join("launcher.log")).unwrap();
    assert!(console.contains("kiln-init: "), "{console}");
    assert!(!launcher.contains("kiln-init: "), "launcher.log duplicates the console:\n{launcher}");
    world.assert_nothing_left();
}
