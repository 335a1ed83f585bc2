//! The lease pool and ledger against a reference model, plus real processes:
//! a SIGKILLed holder's leases are reclaimed exactly, and two processes
//! allocating at once never get the same subnet.
//!
//! The child processes are this test binary run again with
//! `KILN_NET_TEST_CHILD` set, executing only the ignored `ledger_child` test.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use expect_test::expect;
use ipnet::Ipv4Net;
use kiln_net::{Error, LeasePool, Ledger, pid_is_alive};
use proptest::prelude::*;

const CHILD_ENV: &str = "KILN_NET_TEST_CHILD";
const DIR_ENV: &str = "KILN_NET_TEST_LEDGER_DIR";
const COUNT_ENV: &str = "KILN_NET_TEST_COUNT";
const NAME_ENV: &str = "KILN_NET_TEST_NAME";
const CIDR: &str = "10.77.0.0/24";

fn cidr() -> Ipv4Net {
    CIDR.parse().unwrap()
}

#[derive(Clone, Debug)]
enum PoolOp {
    Allocate(u8),
    Release(u8),
    Drop(u8),
}

fn pool_op() -> impl Strategy<Value = PoolOp> {
    prop_oneof![
        3 => (0u8..7).prop_map(PoolOp::Allocate),
        1 => (0u8..7).prop_map(PoolOp::Release),
        1 => (0u8..7).prop_map(PoolOp::Drop),
    ]
}

proptest! {
    /// The in-memory pool against a BTreeMap: no duplicate subnet, no lost
    /// subnet, exhaustion exactly at capacity (4 subnets, 7 owners).
    #[test]
    fn pool_matches_model(prefix in 30u8..=31, ops in proptest::collection::vec(pool_op(), 1..60)) {
        let cidr: Ipv4Net = if prefix == 30 { "10.9.0.16/28" } else { "10.9.0.16/29" }.parse().unwrap();
        let pool = LeasePool::new(cidr, prefix).unwrap();
        prop_assert_eq!(pool.capacity(), 4);
        let mut held = BTreeMap::new();
        let mut model: BTreeMap<String, Ipv4Net> = BTreeMap::new();
        for op in ops {
            match op {
                PoolOp::Allocate(n) => {
                    let owner = format!("vm-{n}");
                    match pool.allocate(&owner) {
                        Ok(lease) => {
                            prop_assert!(!model.contains_key(&owner), "{owner} leased twice");
                            prop_assert!(model.len() < 4, "allocated beyond capacity");
                            prop_assert!(!model.values().any(|s| *s == lease.subnet()), "duplicate {}", lease.subnet());
                            prop_assert!(cidr.contains(&lease.subnet()));
                            prop_assert!(lease.subnet().contains(&lease.host_addr()));
                            prop_assert!(lease.subnet().contains(&lease.guest_addr()));
                            prop_assert_ne!(lease.host_addr(), lease.guest_addr());
                            prop_assert_eq!(lease.owner(), owner.as_str());
                            model.insert(owner.clone(), lease.subnet());
                            held.insert(owner, lease);
                        }
                        Err(Error::LeaseOwnerExists { .. }) => prop_assert!(model.contains_key(&owner)),
                        Err(Error::LeasePoolExhausted { capacity, .. }) => {
                            prop_assert_eq!(capacity, 4);
                            prop_assert_eq!(model.len(), 4);
                        }
                        Err(other) => prop_assert!(false, "unexpected error {other}"),
                    }
                }
                PoolOp::Release(n) => {
                    let owner = format!("vm-{n}");
                    if let Some(lease) = held.remove(&owner) {
                        lease.release();
                    }
                    model.remove(&owner);
                }
                PoolOp::Drop(n) => {
                    let owner = format!("vm-{n}");
                    drop(held.remove(&owner));
                    model.remove(&owner);
                }
            }
            prop_assert_eq!(pool.leased(), model.len());
        }
        // No loss: once everything is given back, all 4 subnets are there again.
        drop(held);
        let again: Vec<_> = (0..4).map(|n| pool.allocate(&format!("again-{n}")).unwrap()).collect();
        let distinct: BTreeSet<Ipv4Net> = again.iter().map(|lease| lease.subnet()).collect();
        prop_assert_eq!(distinct.len(), 4);
        let exhausted = matches!(pool.allocate("one-too-many"), Err(Error::LeasePoolExhausted { .. }));
        prop_assert!(exhausted, "a fifth subnet out of 4");
    }
}

#[derive(Clone, Debug)]
enum LedgerOp {
    Allocate(u8),
    Release(u8),
    /// Re-open the ledger, as a restarted launcher does.
    Restart,
    /// Reclaim with the owners in the mask counted as dead.
    Reclaim(u8),
}

fn ledger_op() -> impl Strategy<Value = LedgerOp> {
    prop_oneof![
        4 => (0u8..7).prop_map(LedgerOp::Allocate),
        2 => (0u8..7).prop_map(LedgerOp::Release),
        1 => Just(LedgerOp::Restart),
        1 => any::<u8>().prop_map(LedgerOp::Reclaim),
    ]
}

/// Each owner's fake pid, so reclaim can be told which owners are dead.
fn fake_pid(owner: u8) -> u32 {
    1_000_000 + u32::from(owner)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The ledger against a BTreeMap of owner -> subnet index, across
    /// re-opens: the lowest free subnet is taken, nothing duplicated or
    /// lost, exhaustion exactly at capacity (4 subnets, 7 owners).
    #[test]
    fn ledger_matches_model(ops in proptest::collection::vec(ledger_op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let cidr: Ipv4Net = "10.9.0.0/28".parse().unwrap();
        let mut ledger = Ledger::open(dir.path(), cidr, 30).unwrap();
        let mut model: BTreeMap<u8, u32> = BTreeMap::new();
        for op in ops {
            match op {
                LedgerOp::Allocate(n) => {
                    let result = ledger.allocate(&format!("vm-{n}"), fake_pid(n));
                    let used: BTreeSet<u32> = model.values().copied().collect();
                    let lowest_free = (0..4).find(|index| !used.contains(index));
                    match (model.contains_key(&n), lowest_free, result) {
                        (true, _, Err(Error::LeaseOwnerExists { .. })) => {}
                        (false, None, Err(Error::LeasePoolExhausted { capacity: 4, .. })) => {}
                        (false, Some(index), Ok(record)) => {
                            prop_assert_eq!(record.subnet, subnet_at(cidr, index));
                            prop_assert_eq!(record.pid, fake_pid(n));
                            model.insert(n, index);
                        }
                        (held, free, result) => {
                            prop_assert!(false, "held {held}, lowest free {free:?}, got {result:?}")
                        }
                    }
                }
                LedgerOp::Release(n) => {
                    prop_assert_eq!(ledger.release(&format!("vm-{n}")).unwrap(), model.remove(&n).is_some());
                }
                LedgerOp::Restart => {
                    drop(ledger);
                    ledger = Ledger::open(dir.path(), cidr, 30).unwrap();
                }
                LedgerOp::Reclaim(dead_mask) => {
                    let is_dead = |owner: u8| dead_mask & (1 << owner) != 0;
                    let reclaimed = ledger.reclaim(|pid| !is_dead(u8::try_from(pid - 1_000_000).unwrap())).unwrap();
                    let expected: Vec<String> =
                        model.keys().filter(|owner| is_dead(**owner)).map(|owner| format!("vm-{owner}")).collect();
                    prop_assert_eq!(reclaimed, expected);
                    model.retain(|owner, _| !is_dead(*owner));
                }
            }
            let on_disk: BTreeMap<String, Ipv4Net> =
                ledger.leases().unwrap().into_iter().map(|record| (record.owner, record.subnet)).collect();
            let expected: BTreeMap<String, Ipv4Net> =
                model.iter().map(|(owner, index)| (format!("vm-{owner}"), subnet_at(cidr, *index))).collect();
            prop_assert_eq!(on_disk, expected);
        }
    }
}

fn subnet_at(cidr: Ipv4Net, index: u32) -> Ipv4Net {
    Ipv4Net::new((u32::from(cidr.network()) + 4 * index).into(), 30).unwrap()
}

#[test]
fn ledger_file_is_private_and_documented_shape() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path(), cidr(), 30).unwrap();
    let record = ledger.allocate("vm-a", 4242).unwrap();
    expect![[r#"vm-a 10.77.0.0/30 host 10.77.0.1 guest 10.77.0.2 pid 4242"#]].assert_eq(&format!(
        "{} {} host {} guest {} pid {}",
        record.owner, record.subnet, record.host_addr, record.guest_addr, record.pid
    ));
    let state_path = dir.path().join("leases.json");
    let mode = std::fs::metadata(&state_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "state file mode {mode:o}");
    let text = std::fs::read_to_string(&state_path).unwrap();
    let text = text.replace(&record.created.to_string(), "<created>");
    expect![[r#"
        {"version":1,"cidr":"10.77.0.0/24","prefix":30,"leases":{"vm-a":{"index":0,"pid":4242,"created":<created>}}}
    "#]]
    .assert_eq(&text);
    // Only the state and lock files: no temporary file left behind.
    let mut names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["leases.json", "leases.lock"]);
}

#[test]
fn ledger_errors_name_the_file_and_the_fault() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path(), cidr(), 30).unwrap();
    ledger.allocate("vm-a", 1).unwrap();
    let message = |error: Error| error.to_string().replace(&dir.path().display().to_string(), "<dir>");

    expect![[r#"Owner `vm-a` already holds lease 10.77.0.0/30"#]]
        .assert_eq(&message(ledger.allocate("vm-a", 2).unwrap_err()));
    expect![[r#"Lease ledger <dir>/leases.json is invalid: it was made for 10.77.0.0/24 cut into /30, not 10.78.0.0/24 cut into /30"#]]
        .assert_eq(&message(Ledger::open(dir.path(), "10.78.0.0/24".parse().unwrap(), 30).unwrap_err()));
    expect![[r#"Lease ledger <dir>/leases.json is invalid: it was made for 10.77.0.0/24 cut into /30, not 10.77.0.0/24 cut into /31"#]]
        .assert_eq(&message(Ledger::open(dir.path(), cidr(), 31).unwrap_err()));

    let state_path = dir.path().join("leases.json");
    std::fs::write(&state_path, r#"{"version":1,"cidr":"10.77.0.0/24","prefix":30,"leases":{"a":{"index":3,"pid":1,"created":0},"b":{"index":3,"pid":2,"created":0}}}"#).unwrap();
    expect![[r#"Lease ledger <dir>/leases.json is invalid: owners `a` and `b` share subnet index 3"#]]
        .assert_eq(&message(ledger.leases().unwrap_err()));
    std::fs::write(
        &state_path,
        r#"{"version":1,"cidr":"10.77.0.0/24","prefix":30,"leases":{"a":{"index":64,"pid":1,"created":0}}}"#,
    )
    .unwrap();
    expect![[r#"Lease ledger <dir>/leases.json is invalid: owner `a` has subnet index 64 but the pool holds 64"#]]
        .assert_eq(&message(ledger.allocate("vm-b", 1).unwrap_err()));
    std::fs::write(&state_path, "{not json").unwrap();
    expect![[r#"Lease ledger <dir>/leases.json cannot be parsed"#]].assert_eq(&message(ledger.leases().unwrap_err()));
    // A failed operation wrote nothing.
    assert_eq!(std::fs::read_to_string(&state_path).unwrap(), "{not json");
    // An empty file (what a host crash before writeback may leave) is an empty ledger.
    std::fs::write(&state_path, "").unwrap();
    assert_eq!(ledger.leases().unwrap(), []);

    expect![[r#"CIDR 10.77.0.0/31 is too small for one /30 lease subnet"#]]
        .assert_eq(&message(Ledger::open(dir.path(), "10.77.0.0/31".parse().unwrap(), 30).unwrap_err()));
    let tiny = tempfile::tempdir().unwrap();
    let tiny_ledger = Ledger::open(tiny.path(), "10.77.0.0/30".parse().unwrap(), 31).unwrap();
    tiny_ledger.allocate("x", 1).unwrap();
    tiny_ledger.allocate("y", 1).unwrap();
    expect![[r#"Lease pool 10.77.0.0/30 is exhausted: all 2 /31 subnets are leased"#]]
        .assert_eq(&message(tiny_ledger.allocate("z", 1).unwrap_err()));
}

#[test]
fn pid_liveness() {
    assert!(pid_is_alive(std::process::id()));
    assert!(pid_is_alive(1), "pid 1 always exists (possibly another user's: EPERM counts as alive)");
    assert!(!pid_is_alive(0));
    assert!(!pid_is_alive(u32::MAX));
    let mut child = Command::new(std::env::current_exe().unwrap()).arg("--list").stdout(Stdio::null()).spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    // Reaped, so the pid is gone (until the kernel reuses it, which takes a full wrap of the pid space).
    assert!(!pid_is_alive(pid));
}

/// Runs this binary again as a child in `role`, stdin and stdout piped.
fn spawn_child(role: &str, dir: &Path, count: usize, name: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "lease::ledger_child", "--ignored", "--nocapture", "--test-threads=1", "--quiet"])
        .env(CHILD_ENV, role)
        .env(DIR_ENV, dir)
        .env(COUNT_ENV, count.to_string())
        .env(NAME_ENV, name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sigkilled_holder_is_reclaimed_exactly() {
    const HELD: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path(), cidr(), 30).unwrap();
    // A lease of a live process (this one) that reclaim must keep.
    ledger.allocate("parent-vm", std::process::id()).unwrap();

    let mut holder = KillOnDrop(spawn_child("ledger-holder", dir.path(), HELD, "held"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = ledger.leases().unwrap().iter().filter(|r| r.owner.starts_with("held-")).count();
        if held == HELD {
            break;
        }
        assert!(holder.0.try_wait().unwrap().is_none(), "holder exited before taking {HELD} leases");
        assert!(Instant::now() < deadline, "holder took only {held} of {HELD} leases in time");
        std::thread::sleep(Duration::from_millis(5));
    }
    let holder_pid = holder.0.id();
    assert!(ledger.leases().unwrap().iter().filter(|r| r.owner.starts_with("held-")).all(|r| r.pid == holder_pid));
    // Nothing to reclaim while the holder runs.
    assert_eq!(ledger.reclaim(pid_is_alive).unwrap(), Vec::<String>::new());

    holder.0.kill().unwrap(); // SIGKILL: no chance to clean up.
    let status = holder.0.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    drop(ledger);

    let restarted = Ledger::open(dir.path(), cidr(), 30).unwrap();
    let reclaimed = restarted.reclaim(pid_is_alive).unwrap();
    let expected: Vec<String> = (0..HELD).map(|n| format!("held-{n}")).collect();
    assert_eq!(reclaimed, expected);
    let left: Vec<String> = restarted.leases().unwrap().into_iter().map(|r| r.owner).collect();
    assert_eq!(left, ["parent-vm"]);
    // The reclaimed subnets are handed out again, lowest first.
    assert_eq!(restarted.allocate("next-vm", std::process::id()).unwrap().subnet.to_string(), "10.77.0.4/30");
}

#[test]
fn concurrent_processes_never_share_a_subnet() {
    const EACH: usize = 25;
    let dir = tempfile::tempdir().unwrap();
    // Create the ledger first so both children open an existing one.
    drop(Ledger::open(dir.path(), cidr(), 30).unwrap());
    let mut racers: Vec<KillOnDrop> =
        ["a", "b"].iter().map(|name| KillOnDrop(spawn_child("ledger-racer", dir.path(), EACH, name))).collect();
    // Start both at once: each waits for one byte on stdin.
    for racer in &mut racers {
        racer.0.stdin.as_mut().unwrap().write_all(b"g").unwrap();
    }
    let mut handed_out = Vec::new();
    for racer in &mut racers {
        let mut out = String::new();
        racer.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert!(racer.0.wait().unwrap().success(), "racer failed; its output:\n{out}");
        handed_out.extend(out.lines().filter_map(|line| line.strip_prefix("LEASE ")).map(str::to_owned));
    }
    assert_eq!(handed_out.len(), 2 * EACH, "{handed_out:?}");
    let distinct: BTreeSet<&String> = handed_out.iter().collect();
    assert_eq!(distinct.len(), 2 * EACH, "a subnet was handed out twice: {handed_out:?}");
    let ledger = Ledger::open(dir.path(), cidr(), 30).unwrap();
    let recorded: BTreeSet<String> = ledger.leases().unwrap().iter().map(|r| r.subnet.to_string()).collect();
    assert_eq!(recorded, distinct.into_iter().cloned().collect::<BTreeSet<_>>());
}

/// Not a test on its own: the body of the child processes above.
#[test]
#[ignore = "child process of the ledger crash and concurrency tests"]
fn ledger_child() {
    let Ok(role) = std::env::var(CHILD_ENV) else { return };
    let dir = std::env::var(DIR_ENV).unwrap();
    let count: usize = std::env::var(COUNT_ENV).unwrap().parse().unwrap();
    let name = std::env::var(NAME_ENV).unwrap();
    let ledger = Ledger::open(&dir, cidr(), 30).unwrap();
    let mut stdin = BufReader::new(std::io::stdin());
    match role.as_str() {
        "ledger-holder" => {
            for n in 0..count {
                ledger.allocate(&format!("{name}-{n}"), std::process::id()).unwrap();
            }
            // Hold until killed; if the parent goes away, stdin closes and we exit.
            let mut line = String::new();
            let _ = stdin.read_line(&mut line);
        }
        "ledger-racer" => {
            let mut go = [0u8];
            stdin.read_exact(&mut go).unwrap();
            let mut out = std::io::stdout().lock();
            for n in 0..count {
                let record = ledger.allocate(&format!("{name}-{n}"), std::process::id()).unwrap();
                writeln!(out, "LEASE {}", record.subnet).unwrap();
            }
        }
        other => panic!("unknown {CHILD_ENV} role `{other}`"),
    }
}

#[test]
fn threads_sharing_one_ledger_never_share_a_subnet() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path(), cidr(), 30).unwrap();
    let subnets: Vec<Ipv4Net> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|thread| {
                let ledger = &ledger;
                scope.spawn(move || {
                    (0..10).map(|n| ledger.allocate(&format!("t{thread}-{n}"), 1).unwrap().subnet).collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|worker| worker.join().unwrap()).collect()
    });
    let distinct: BTreeSet<Ipv4Net> = subnets.iter().copied().collect();
    assert_eq!(distinct.len(), 40, "{subnets:?}");
    assert_eq!(ledger.leases().unwrap().len(), 40);
}
