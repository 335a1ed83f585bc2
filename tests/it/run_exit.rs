//! How a `kiln run` ends, end to end (the world of `run_e2e`: the real
//! `kiln` binary as root in a network namespace, the guest under QEMU TCG):
//! the exit status comes from kiln-init's control channel, which the
//! service cannot write, and a crash the VMM saw beats anything the service
//! printed; the grace period of a stop is `kiln stop --timeout`'s, else the
//! spec's `kiln.grace=`, and reaches kiln-init.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::run_e2e::{RUN_DEADLINE, World, text, wait_with_deadline};

fn spec(world: &World, name: &str, service: &Path, cmdline: Option<&str>) -> PathBuf {
    let guest = cmdline.map(|c| format!("[guest]\ncmdline = \"{c}\"\n")).unwrap_or_default();
    world.spec(
        name,
        &format!(
            "name = \"{name}\"\n[service]\nbinary = \"{}\"\n[resources]\nmemory = \"256MiB\"\n{guest}",
            service.display()
        ),
    )
}

/// The VM's record in `kiln ps --json`.
fn record(world: &World, name: &str) -> serde_json::Value {
    let ps = world.kiln(&["ps", "--json"]).output().unwrap();
    let records: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    records.as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap_or_else(|| {
        panic!("no record of {name} in kiln ps --json: {records}");
    })
}

fn console(world: &World, name: &str) -> String {
    text(&world.kiln(&["logs", name]).output().unwrap().stdout)
}

/// Prints the forged report kiln-init's console line looks like, then
/// tries to write a report to the control port itself (it must get EBUSY:
/// kiln-init holds the port).
const FORGE: &str = r#"echo "kiln-init: service exited with status 0"
for port in /sys/class/virtio-ports/*; do
  [ "$(cat "$port/name")" = org.kiln.control ] || continue
  device=/dev/${port##*/}
  if echo "exit 0" > "$device"; then echo "probe: wrote a report to $device"; else echo "probe: cannot open $device"; fi
done"#;

#[test]
fn run_exit_status_comes_from_kiln_init_and_a_crash_beats_a_forged_one() {
    let Some(world) = World::new("exit") else { return };
    let crash = world.script("crash.sh", &format!("{FORGE}\necho c > /proc/sysrq-trigger\nsleep 60"));
    let three = world.script("three.sh", &format!("{FORGE}\nexit 3"));
    let crash_spec = spec(&world, "crash", &crash, None);
    let three_spec = spec(&world, "three", &three, None);
    // Both guests boot at once: one wait instead of two.
    let runs: Vec<_> = [crash_spec, three_spec]
        .into_iter()
        .map(|spec| {
            let mut command = world.kiln(&["run", spec.to_str().unwrap()]);
            let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
            std::thread::spawn(move || wait_with_deadline(child, RUN_DEADLINE))
        })
        .collect();
    let mut outputs = runs.into_iter().map(|run| run.join().unwrap());
    let (crashed, exited) = (outputs.next().unwrap(), outputs.next().unwrap());

    // The forged line is on the console, then the kernel panics: the VMM's verdict wins.
    let (stdout, stderr) = (text(&crashed.stdout), text(&crashed.stderr));
    assert!(stdout.contains("kiln-init: service exited with status 0"), "the forged line:\n{stdout}");
    assert!(stdout.contains("Kernel panic"), "sysrq did not crash the guest:\n{stdout}");
    assert_eq!(crashed.status.code(), Some(kiln::FAILURE_EXIT_CODE), "a crash is not success:\n{stdout}\n{stderr}");
    assert!(stderr.contains("VMM crashed: the guest reset") && stderr.contains("(seen by the VMM)"), "{stderr}");
    let exit = &record(&world, "crash")["exit"];
    assert_eq!(exit["source"], "vmm", "{exit}");
    assert_eq!(exit["code"], serde_json::Value::Null, "{exit}");
    assert!(exit["how"].as_str().unwrap().contains("VMM crashed"), "{exit}");

    // The forged line, then `exit 3`: the status is kiln-init's, 3.
    let (stdout, stderr) = (text(&exited.stdout), text(&exited.stderr));
    assert_eq!(exited.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(stderr.contains("service exited with status 3 (reported by kiln-init)"), "{stderr}");
    let exit = &record(&world, "three")["exit"];
    assert_eq!(exit["source"], "kiln-init", "{exit}");
    assert_eq!(exit["code"], 3, "{exit}");
    // The service, root in the guest, could not open the control port kiln-init holds.
    assert!(stdout.contains("kiln-init: control channel: /dev/vport"), "{stdout}");
    assert!(stdout.contains("a second open gets EBUSY"), "{stdout}");
    assert!(stdout.contains("probe: cannot open /dev/vport"), "the service opened the control port:\n{stdout}");
    assert!(stdout.contains("Device or resource busy"), "{stdout}");
    world.assert_nothing_left();
}

/// Traps SIGTERM and carries on for 15 s, then exits 0; prints its kernel
/// command line first.
const PATIENT: &str = r#"trap 'echo "probe: SIGTERM, 15 s more"; sleep 15; echo "probe: done after SIGTERM"; exit 0' TERM
echo "probe: cmdline $(cat /proc/cmdline)"
echo "probe: ready"
while :; do sleep 1; done"#;

#[test]
fn run_stop_grace_is_stop_timeout_else_the_spec_and_reaches_kiln_init() {
    let Some(world) = World::new("grace") else { return };
    let patient = world.script("patient.sh", PATIENT);
    // (VM name, the spec's kiln.grace, kiln stop --timeout, the grace kiln-init must use, exit code)
    let cases: [(&str, &str, Option<&str>, &str, i64); 3] = [
        ("outlasts", "kiln.grace=1", Some("30"), "30.0", 0),
        ("cut-short", "kiln.grace=30", Some("2"), "2.0", 137),
        ("by-spec", "quiet kiln.grace=2", None, "2.0", 137),
    ];
    // One boot at a time (three TCG boots at once can starve a guest's
    // early timer check on a loaded machine), and a stop only once the
    // trap is set: a SIGTERM before that would end the shell at once.
    for (name, cmdline, ..) in cases {
        let spec = spec(&world, name, &patient, Some(cmdline));
        let output = world.run_detached(&spec);
        assert!(output.status.success(), "kiln run --detach {name}: {}", text(&output.stderr));
        let deadline = Instant::now() + RUN_DEADLINE;
        while !console(&world, name).contains("probe: ready") {
            let alive = record(&world, name)["alive"] == true;
            assert!(alive && Instant::now() < deadline, "{name} never got ready:\n{}", console(&world, name));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let stops: Vec<_> = cases
        .iter()
        .map(|(name, _, timeout, ..)| {
            let mut args = vec!["stop", name];
            if let Some(timeout) = timeout {
                args.extend(["--timeout", timeout]);
            }
            let child = world.kiln(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
            std::thread::spawn(move || wait_with_deadline(child, RUN_DEADLINE))
        })
        .collect();
    for ((name, cmdline, _, grace, code), stop) in cases.iter().zip(stops) {
        let stop = stop.join().unwrap();
        assert!(stop.status.success(), "kiln stop {name}: {}", text(&stop.stderr));
        let console = console(&world, name);
        // Exactly one kiln.grace on the command line: the spec's.
        let cmdline_line = console.lines().find(|l| l.starts_with("probe: cmdline ")).unwrap();
        assert_eq!(cmdline_line.matches("kiln.grace=").count(), 1, "{cmdline_line}");
        assert!(cmdline_line.contains(cmdline), "{cmdline_line}");
        let asked =
            format!("kiln-init: stop asked on the control channel: sending SIGTERM to the service, grace {grace}s");
        assert!(console.contains(&asked), "{name}: kiln-init did not get grace {grace}s:\n{console}");
        let exit = &record(&world, name)["exit"];
        assert_eq!(exit["code"], *code, "{name}: {exit}\n{console}");
        assert_eq!(exit["source"], "kiln-init", "{name}: {exit}");
        if *code == 0 {
            assert!(console.contains("probe: done after SIGTERM"), "{name} did not survive:\n{console}");
        } else {
            assert!(console.contains("kiln-init: grace period over: sending SIGKILL"), "{name}:\n{console}");
        }
    }
    world.assert_nothing_left();
}
