//! `kiln run` with `backend = "cloud-hypervisor"`, end to end: the real
//! `kiln` binary and a real cloud-hypervisor, in `run_e2e`'s `World`. A VMM
//! that dies is a crash with its own reason, through the launcher: the exit
//! code, the message, `kiln ps`; `kiln logs` still has the console, and
//! nothing is left for `kiln gc`.
//!
//! cloud-hypervisor is in no package registry CI can reach, so these SKIP
//! (and print so) when it is not on PATH or /dev/kvm cannot be opened, even
//! under `KILN_REQUIRE_TOOLS`, like kiln-vmm's `real_ch_*` tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::{current_test_name, find_tool, guest_assets, report_skip};

use crate::run_e2e::{RUN_DEADLINE, World, text, wait_with_deadline};

/// kiln's exit code when the VM crashed (docs/cli.md).
const CRASH_EXIT_CODE: i32 = 125;

/// The world, when cloud-hypervisor, a usable /dev/kvm and the guest's
/// vmlinux are here; `None` after SKIPPED otherwise.
fn ch_world(tag: &str) -> Option<World> {
    let test = current_test_name();
    if find_tool("cloud-hypervisor").is_none() {
        report_skip(&format!("{test}: `cloud-hypervisor` not on PATH (not required: no registry has it)"));
        return None;
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        report_skip(&format!("{test}: /dev/kvm cannot be opened"));
        return None;
    }
    let world = World::new(tag)?;
    guest_assets(&test, &["vmlinux"])?;
    Some(world)
}

/// Whether this host is itself a guest (the `hypervisor` CPU flag): the
/// Debian kernel then dies under cloud-hypervisor's KVM (FACTS.md).
fn host_is_nested() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|flag| flag == "hypervisor"))
}

fn ch_spec(world: &World, name: &str) -> PathBuf {
    world.spec(
        name,
        &format!(
            r#"name = "{name}"
[service]
binary = "{probe}"
args = ["--wait-for-sigterm"]
[resources]
memory = "256MiB"
storage = "16MiB"
[vm]
backend = "cloud-hypervisor"
"#,
            probe = world.probe().display()
        ),
    )
}

/// Starts `kiln run SPEC`, its output into files in the world's directory
/// (a pipe nobody reads could stall the console stream).
fn start_run(world: &World, spec: &Path, name: &str) -> Child {
    let file = |stream: &str| std::fs::File::create(world.dir.path().join(format!("{name}.{stream}"))).unwrap();
    world
        .kiln(&["run", spec.to_str().unwrap()])
        .stdout(Stdio::from(file("stdout")))
        .stderr(Stdio::from(file("stderr")))
        .spawn()
        .unwrap()
}

fn output_of(world: &World, name: &str, stream: &str) -> String {
    text(&std::fs::read(world.dir.path().join(format!("{name}.{stream}"))).unwrap_or_default())
}

/// The record of VM `name` in `kiln ps --json`.
fn record(world: &World, name: &str) -> Option<serde_json::Value> {
    let ps = world.kiln(&["ps", "--json"]).output().unwrap();
    let records: serde_json::Value = serde_json::from_slice(&ps.stdout).ok()?;
    records.as_array()?.iter().find(|record| record["name"] == name).cloned()
}

/// The `kiln ps` table, from the line of VM `name` on (a crash reason
/// carries the VMM's log on the lines after it).
fn ps_from(world: &World, name: &str) -> String {
    let ps = text(&world.kiln(&["ps"]).output().unwrap().stdout);
    let start = ps.lines().position(|line| line.starts_with(name)).unwrap_or_else(|| panic!("no {name} in:\n{ps}"));
    ps.lines().skip(start).collect::<Vec<_>>().join("\n")
}

/// After a crashed run: `kiln logs` still has the console, `kiln gc` finds
/// nothing to release but the record, and no tap, rule, lease or
/// cloud-hypervisor is left.
fn assert_crash_left_nothing(world: &World, name: &str) {
    let logs = world.kiln(&["logs", name]).output().unwrap();
    assert!(logs.status.success(), "kiln logs {name}: {}", text(&logs.stderr));
    let console = record(world, name).and_then(|record| record["console_log"].as_str().map(PathBuf::from));
    let console = std::fs::read(console.expect("the record names its console log")).unwrap();
    assert_eq!(text(&logs.stdout), text(&console), "kiln logs is not the console");
    // gc forgets the finished run's record; it must find nothing of the host's to release.
    let gc = world.kiln(&["gc"]).output().unwrap();
    assert!(gc.status.success(), "kiln gc: {}", text(&gc.stderr));
    let released = text(&gc.stdout);
    assert!(
        released.lines().all(|line| line == format!("kiln gc: did remove the state of VM {name}")),
        "kiln gc found something the crashed run left:\n{released}"
    );
    let again = text(&world.kiln(&["gc"]).output().unwrap().stdout);
    assert!(again.contains("nothing to release"), "a second kiln gc found more:\n{again}");
    world.assert_nothing_left();
    let vmms = Command::new("pgrep").args(["-f", "cloud-hypervisor.*api-socket"]).output().unwrap();
    let vmms = String::from_utf8_lossy(&vmms.stdout);
    let ours = vmms.lines().filter(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&*world.state_dir().to_string_lossy()))
    });
    assert_eq!(ours.count(), 0, "a cloud-hypervisor of this test is left");
}

#[test]
fn run_ch_sigkilled_vmm_is_a_crash_naming_the_signal() {
    let Some(world) = ch_world("chkill") else { return };
    let name = "chkill";
    let spec = ch_spec(&world, name);
    let child = start_run(&world, &spec, name);
    // Booted: the record says running, with the VMM's pid.
    let deadline = Instant::now() + RUN_DEADLINE;
    let pid = loop {
        let running = record(&world, name).filter(|record| record["phase"] == "running");
        if let Some(pid) = running.and_then(|record| record["vmm"]["pid"].as_u64()).filter(|pid| *pid > 0) {
            break pid;
        }
        assert!(Instant::now() < deadline, "kiln run never got running:\n{}", output_of(&world, name, "stderr"));
        std::thread::sleep(Duration::from_millis(100));
    };
    let killed = Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(killed.success(), "kill -KILL {pid}");
    let output = wait_with_deadline(child, RUN_DEADLINE);
    let stderr = output_of(&world, name, "stderr");
    println!("{stderr}");
    assert_eq!(output.status.code(), Some(CRASH_EXIT_CODE), "{stderr}");
    assert!(
        stderr.contains("crashed") && stderr.contains("SIGKILL"),
        "kiln run must say crashed, by SIGKILL:\n{stderr}"
    );
    let ps = ps_from(&world, name);
    assert!(ps.contains("crashed") && ps.contains("SIGKILL"), "kiln ps:\n{ps}");
    assert_crash_left_nothing(&world, name);
}

#[test]
fn run_ch_guest_dying_under_nested_kvm_is_a_crash_naming_the_vcpu_error() {
    if !host_is_nested() {
        report_skip(&format!(
            "{}: this host is not nested (no `hypervisor` CPU flag): the guest kernel runs under KVM here",
            current_test_name()
        ));
        return;
    }
    let Some(world) = ch_world("chnest") else { return };
    let name = "chnest";
    let spec = ch_spec(&world, name);
    let started = Instant::now();
    // About a minute alone (FACTS.md); two when the machine is busy.
    let output = wait_with_deadline(start_run(&world, &spec, name), RUN_DEADLINE * 2);
    let stderr = output_of(&world, name, "stderr");
    println!("kiln run ended after {:.1} s:\n{stderr}", started.elapsed().as_secs_f64());
    // cloud-hypervisor logs the vCPU error and exits with status 0.
    assert_eq!(output.status.code(), Some(CRASH_EXIT_CODE), "{stderr}");
    assert!(
        stderr.contains("crashed") && stderr.contains("InternalError") && stderr.contains("exit status: 0"),
        "kiln run must say crashed and name the vCPU error:\n{stderr}"
    );
    let ps = ps_from(&world, name);
    assert!(ps.contains("crashed") && ps.contains("InternalError"), "kiln ps:\n{ps}");
    assert_crash_left_nothing(&world, name);
}
