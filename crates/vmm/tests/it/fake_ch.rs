//! The cloud-hypervisor backend against a FAKE API server in this process
//! (a UnixListener thread answering canned HTTP) and a fake VMM process (a
//! shell script that only waits to be told to exit). No cloud-hypervisor
//! runs here: these tests check kiln's side of the protocol (request
//! sequence, error bodies, deadlines, a VMM dying mid-request).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use expect_test::expect;
use kiln_vmm::{Backend, ErrorKind, LaunchOptions, ShutdownHow, Status, VmPlan, Vmm, ch_vm_config, launch};

use crate::support::{process_exists, process_has_exited, run_dir, wait_for};

/// What the fake server does with one request.
enum Reply {
    Respond(u16, &'static str),
    /// Read the request, never answer.
    Hang,
    /// Make the fake VMM exit with this code, then never answer.
    ExitVmm(i32),
    /// Answer, then make the fake VMM exit.
    RespondThenExit(u16, &'static str, Exit),
    /// Answer, remove the API socket and stop listening (as cloud-hypervisor
    /// does on its way out), then make the fake VMM exit.
    RespondThenVanish(u16, &'static str, Exit),
    /// Send half a `200` response, make the fake VMM exit, close the connection.
    PartialThenExit(Exit),
}

/// How the fake VMM exits: its code, a delay before it does (so the API
/// side is seen broken while the process still runs, the race the real one
/// shows), and lines it prints to stderr first.
#[derive(Clone, Copy)]
struct Exit {
    code: i32,
    delay: &'static str,
    stderr: &'static str,
}

impl Exit {
    const fn code(code: i32) -> Exit {
        Exit { code, delay: "0", stderr: "" }
    }

    const fn late(code: i32) -> Exit {
        Exit { code, delay: "0.2", stderr: "" }
    }
}

/// Tells the fake VMM in `run` to exit (written whole: the script polls for it).
fn signal_exit(run: &Path, exit: Exit) {
    let temp = run.join("exit-now.tmp");
    std::fs::write(&temp, format!("{}\n{}\n{}", exit.code, exit.delay, exit.stderr)).expect("write exit-now");
    std::fs::rename(&temp, run.join("exit-now")).expect("signal the fake VMM");
}

type Handler = Box<dyn FnMut(&str, &str) -> Reply + Send>;

struct FakeCh {
    dir: tempfile::TempDir,
    requests: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The fake VMM: records its arguments and pid, logs, and exits as
/// `exit-now` next to its API socket says: its exit code, a delay, then the
/// lines to print to stderr (see `signal_exit`).
const FAKE_VMM: &str = r#"#!/bin/sh
sock=${2#path=}
dir=$(dirname "$sock")
echo "$@" > "$dir/fake.args"
echo $$ > "$dir/fake.pid"
echo "fake cloud-hypervisor $$ listening on $sock" >&2
while [ ! -e "$dir/exit-now" ]; do sleep 0.02; done
sleep "$(sed -n 2p "$dir/exit-now")"
code=$(head -n 1 "$dir/exit-now")
echo "fake cloud-hypervisor exiting with $code" >&2
tail -n +3 "$dir/exit-now" >&2
exit "$code"
"#;

impl FakeCh {
    fn start(handler: Handler) -> FakeCh {
        let dir = run_dir();
        let binary = dir.path().join("fake-cloud-hypervisor");
        std::fs::write(&binary, FAKE_VMM).expect("write the fake VMM");
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let run = dir.path().join("run");
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || serve(&run, handler, &requests, &stop))
        };
        FakeCh { dir, requests, stop, thread: Some(thread) }
    }

    fn options(&self) -> LaunchOptions {
        let mut options = LaunchOptions::new(self.run());
        options.binary = Some(self.dir.path().join("fake-cloud-hypervisor"));
        options.request_timeout = Duration::from_secs(5);
        options
    }

    fn run(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn requests(&self) -> String {
        let requests = self.requests.lock().expect("lock");
        requests.iter().map(|(request, _)| request.as_str()).collect::<Vec<_>>().join("\n")
    }

    fn body_of(&self, endpoint: &str) -> String {
        let requests = self.requests.lock().expect("lock");
        requests
            .iter()
            .find(|(request, _)| request.ends_with(endpoint))
            .map(|(_, body)| body.clone())
            .unwrap_or_default()
    }

    /// The fake VMM's pid, once it has written it.
    fn vmm_pid(&self) -> u32 {
        let path = self.run().join("fake.pid");
        wait_for("the fake VMM's pid", Duration::from_secs(10), || {
            std::fs::read_to_string(&path).ok()?.trim().parse().ok()
        })
    }
}

impl Drop for FakeCh {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(run: &Path, mut handler: Handler, requests: &Mutex<Vec<(String, String)>>, stop: &AtomicBool) {
    // kiln creates the run directory and removes stale sockets, then starts
    // the VMM (which creates vmm.log): bind only after that.
    while !run.join("vmm.log").exists() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let listener = UnixListener::bind(run.join("api.sock")).expect("bind the fake API socket");
    listener.set_nonblocking(true).expect("nonblocking");
    let mut hung = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
        };
        stream.set_nonblocking(false).expect("blocking");
        let Some((method, endpoint, body)) = read_request(&mut stream) else { continue };
        requests.lock().expect("lock").push((format!("{method} {endpoint}"), body));
        let respond = |stream: &mut UnixStream, status: u16, body: &str| {
            let response = format!(
                "HTTP/1.1 {status} X\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes());
        };
        match handler(&method, &endpoint) {
            Reply::Respond(status, body) => {
                respond(&mut stream, status, body);
                // micro-http keeps connections open; kiln must not wait for EOF.
                hung.push(stream);
            }
            Reply::Hang => hung.push(stream),
            Reply::ExitVmm(code) => {
                signal_exit(run, Exit::code(code));
                hung.push(stream);
            }
            Reply::RespondThenExit(status, body, exit) => {
                respond(&mut stream, status, body);
                signal_exit(run, exit);
                hung.push(stream);
            }
            Reply::RespondThenVanish(status, body, exit) => {
                // Gone before kiln has the answer: its next request finds no socket.
                std::fs::remove_file(run.join("api.sock")).expect("remove the fake API socket");
                respond(&mut stream, status, body);
                signal_exit(run, exit);
                // The listener closes; connections already answered stay.
                break;
            }
            Reply::PartialThenExit(exit) => {
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"config\":{",
                );
                signal_exit(run, exit);
                // The connection closes mid-body.
            }
        }
    }
    drop(listener);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn read_request(stream: &mut UnixStream) -> Option<(String, String, String)> {
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(end) = bytes.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("Content-Length: "))
                .map_or(0, |value| value.trim().parse().expect("Content-Length"));
            if bytes.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&bytes[end + 4..end + 4 + length]).into_owned();
                let mut parts = head.split(' ');
                let method = parts.next()?.to_owned();
                let endpoint = parts.next()?.trim_start_matches("/api/v1/").to_owned();
                return Some((method, endpoint, body));
            }
        }
        let count = stream.read(&mut buffer).ok()?;
        if count == 0 {
            return None;
        }
        bytes.extend_from_slice(&buffer[..count]);
    }
}

fn plan() -> VmPlan {
    let mut plan = VmPlan::new("fake", "/var/lib/kiln/vmlinux", "console=hvc0");
    plan.serial = kiln_vmm::Console::Pty;
    plan
}

const PING: Reply = Reply::Respond(200, r#"{"build_version":"fake","version":"v54.0","pid":1,"features":[]}"#);

/// A fake that keeps a VM state like cloud-hypervisor does; `on_power_button`
/// is the state the guest goes to when the button is pressed; `vmm.shutdown`
/// makes the fake VMM exit 0 when `quit_exits`.
fn stateful(on_power_button: &'static str, quit_exits: bool) -> Handler {
    let mut state = "none";
    Box::new(move |_method: &str, endpoint: &str| match endpoint {
        "vmm.ping" => PING,
        "vm.create" => {
            state = "Created";
            Reply::Respond(204, "")
        }
        "vm.boot" | "vm.resume" => {
            state = "Running";
            Reply::Respond(204, "")
        }
        "vm.pause" => {
            state = "Paused";
            Reply::Respond(204, "")
        }
        "vm.power-button" => {
            state = on_power_button;
            Reply::Respond(204, "")
        }
        "vm.info" => Reply::Respond(
            200,
            match state {
                "Created" => r#"{"config":{"serial":{"mode":"Pty","file":"/dev/pts/9"}},"state":"Created"}"#,
                "Running" => r#"{"config":{"serial":{"mode":"Pty","file":"/dev/pts/9"}},"state":"Running"}"#,
                "Paused" => r#"{"config":{"serial":{"mode":"Pty","file":"/dev/pts/9"}},"state":"Paused"}"#,
                _ => r#"{"config":{"serial":{"mode":"Pty","file":"/dev/pts/9"}},"state":"Shutdown"}"#,
            },
        ),
        "vm.counters" => Reply::Respond(200, r#"{"_disk0":{"read_bytes":4096}}"#),
        "vmm.shutdown" if quit_exits => Reply::ExitVmm(0),
        "vmm.shutdown" => Reply::Respond(200, ""),
        _ => Reply::Respond(404, r#"["unknown endpoint"]"#),
    })
}

#[test]
fn fake_ch_lifecycle_sends_the_expected_requests() {
    let fake = FakeCh::start(stateful("Shutdown", true));
    let plan = plan();
    let mut vm = launch(Backend::CloudHypervisor, &plan, &fake.options()).expect("launch");
    assert_eq!(vm.status().expect("status"), Status::Created);
    vm.boot().expect("boot");
    assert_eq!(vm.status().expect("status"), Status::Running);
    vm.pause().expect("pause");
    assert_eq!(vm.status().expect("status"), Status::Paused);
    vm.resume().expect("resume");
    assert_eq!(vm.serial_pty().expect("pty"), Some(PathBuf::from("/dev/pts/9")));
    let pid = vm.pid();
    assert_eq!(vm.shutdown(Duration::from_secs(5)).expect("shutdown"), Status::ShutDown(ShutdownHow::Guest));
    assert!(!process_exists(pid), "fake VMM {pid} was not reaped");
    assert_eq!(vm.shutdown(Duration::from_secs(5)).expect("idempotent"), Status::ShutDown(ShutdownHow::Guest));
    assert_eq!(vm.status().expect("status"), Status::ShutDown(ShutdownHow::Guest));
    assert!(!fake.run().join("api.sock").exists(), "API socket left behind");
    expect![[r#"
        GET vmm.ping
        PUT vm.create
        GET vm.info
        PUT vm.boot
        GET vm.info
        PUT vm.pause
        GET vm.info
        PUT vm.resume
        GET vm.info
        GET vm.info
        PUT vm.power-button
        GET vm.info
        PUT vmm.shutdown"#]]
    .assert_eq(&fake.requests());
    let sent: serde_json::Value = serde_json::from_str(&fake.body_of("vm.create")).expect("vm.create body is JSON");
    assert_eq!(sent, ch_vm_config(&plan));
}

#[test]
fn fake_ch_counters_are_returned_as_reported() {
    let fake = FakeCh::start(stateful("Shutdown", true));
    let mut vm = kiln_vmm::ChVm::launch(&plan(), &fake.options()).expect("launch");
    vm.boot().expect("boot");
    assert_eq!(vm.counters().expect("counters")["_disk0"]["read_bytes"], 4096);
}

#[test]
fn fake_ch_error_bodies_are_surfaced_verbatim() {
    let fake = FakeCh::start(Box::new(|_: &str, endpoint: &str| match endpoint {
        "vmm.ping" => PING,
        "vm.create" => Reply::Respond(204, ""),
        _ => Reply::Respond(500, r#"["Error from API","The VM could not boot","VM config is missing"]"#),
    }));
    let mut vm = launch(Backend::CloudHypervisor, &plan(), &fake.options()).expect("launch");
    let err = vm.boot().expect_err("boot refused");
    assert_eq!(err.kind(), ErrorKind::Api);
    expect![[r#"cloud-hypervisor refused vm.boot (HTTP 500): ["Error from API","The VM could not boot","VM config is missing"]"#]].assert_eq(&err.to_string());
    let pid = vm.pid();
    drop(vm);
    assert!(!process_exists(pid), "dropping the VM must kill and reap the VMM");
}

#[test]
fn fake_ch_hung_api_hits_the_deadline_and_kills_the_vmm() {
    let fake = FakeCh::start(Box::new(|_: &str, endpoint: &str| match endpoint {
        "vmm.ping" => PING,
        _ => Reply::Hang,
    }));
    let mut options = fake.options();
    options.request_timeout = Duration::from_millis(300);
    let err = launch(Backend::CloudHypervisor, &plan(), &options).expect_err("vm.create never answers");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    expect!["cloud-hypervisor vm.create did not finish within 300ms"].assert_eq(&err.to_string());
    let pid = fake.vmm_pid();
    assert!(!process_exists(pid), "fake VMM {pid} left running after a failed launch");
    assert!(!fake.run().join("api.sock").exists(), "API socket left behind");
}

#[test]
fn fake_ch_silent_vmm_hits_the_start_deadline() {
    // A VMM process that runs but never opens its API socket; no fake server.
    let dir = run_dir();
    let silent = dir.path().join("silent-vmm");
    std::fs::write(&silent, "#!/bin/sh\nexec sleep 600\n").expect("write");
    std::fs::set_permissions(&silent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut options = LaunchOptions::new(dir.path().join("run"));
    options.binary = Some(silent);
    options.start_timeout = Duration::from_millis(300);
    let err = launch(Backend::CloudHypervisor, &plan(), &options).expect_err("never answers");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    expect!["cloud-hypervisor vmm.ping did not finish within 300ms"].assert_eq(&err.to_string());
}

#[test]
fn fake_ch_vmm_exiting_during_boot_is_reported_with_its_log() {
    let fake = FakeCh::start(Box::new(|_: &str, endpoint: &str| match endpoint {
        "vmm.ping" => PING,
        "vm.create" => Reply::Respond(204, ""),
        _ => Reply::ExitVmm(1),
    }));
    let mut vm = launch(Backend::CloudHypervisor, &plan(), &fake.options()).expect("launch");
    let err = vm.boot().expect_err("the VMM dies");
    assert_eq!(err.kind(), ErrorKind::VmmExited, "{err}");
    let message = err.to_string();
    assert!(message.starts_with("The VMM exited during vm.boot (exit status: 1)"), "{message}");
    assert!(message.ends_with("fake cloud-hypervisor exiting with 1"), "{message}");
    match vm.status().expect("status") {
        Status::Crashed { reason, log_tail } => {
            assert_eq!(reason, "exit status: 1");
            assert!(log_tail.ends_with("fake cloud-hypervisor exiting with 1"), "{log_tail}");
        }
        other => panic!("expected crashed, got {other:?}"),
    }
}

#[test]
fn fake_ch_guest_ignoring_the_power_button_is_quit() {
    let fake = FakeCh::start(stateful("Running", true));
    let mut vm = launch(Backend::CloudHypervisor, &plan(), &fake.options()).expect("launch");
    vm.boot().expect("boot");
    assert_eq!(vm.shutdown(Duration::from_millis(200)).expect("shutdown"), Status::ShutDown(ShutdownHow::VmmQuit));
    assert!(fake.requests().ends_with("PUT vmm.shutdown"), "{}", fake.requests());
}

#[test]
fn fake_ch_vmm_ignoring_shutdown_is_killed() {
    let fake = FakeCh::start(stateful("Running", false));
    let mut options = fake.options();
    options.request_timeout = Duration::from_millis(300);
    let mut vm = launch(Backend::CloudHypervisor, &plan(), &options).expect("launch");
    vm.boot().expect("boot");
    let pid = vm.pid();
    assert_eq!(vm.shutdown(Duration::from_millis(200)).expect("shutdown"), Status::ShutDown(ShutdownHow::Killed));
    assert!(!process_exists(pid), "fake VMM {pid} was not reaped");
}

#[test]
fn fake_ch_unbooted_vm_is_quit_without_the_power_button() {
    let fake = FakeCh::start(stateful("Shutdown", true));
    let mut vm = launch(Backend::CloudHypervisor, &plan(), &fake.options()).expect("launch");
    // A long grace: it must not be waited out for a VM that never booted.
    assert_eq!(vm.shutdown(Duration::from_secs(600)).expect("shutdown"), Status::ShutDown(ShutdownHow::VmmQuit));
    expect![[r#"
        GET vmm.ping
        PUT vm.create
        GET vm.info
        PUT vmm.shutdown"#]]
    .assert_eq(&fake.requests());
}

#[test]
fn fake_ch_missing_binary_is_named() {
    let dir = run_dir();
    let mut options = LaunchOptions::new(dir.path().join("run"));
    options.binary = Some(dir.path().join("no-cloud-hypervisor"));
    let err = launch(Backend::CloudHypervisor, &plan(), &options).expect_err("missing");
    assert_eq!(err.kind(), ErrorKind::BinaryMissing);
}

/// What cloud-hypervisor v54 printed on this nested host when the guest
/// kernel died under KVM, then exited with status 0 (FACTS.md).
const VCPU_ERROR: &str = "cloud-hypervisor: 100.633141s: <vcpu0> ERROR:vmm/src/cpu.rs:1487 -- VCPU generated error: VcpuRun(Failed to run vcpu

Caused by:
    Unexpected exit reason on vcpu run: InternalError

Stack backtrace:
   0: <unknown>
   4: start_thread
             at ./nptl/pthread_create.c:442:8
   5: clone3
             at ./misc/../sysdeps/unix/sysv/linux/x86_64/clone3.S:81:0)";

/// A fake that answers like a healthy cloud-hypervisor, except that
/// `special` answers the first request to `endpoint` from `vm.boot` on.
fn booted_then(endpoint: &'static str, special: Reply) -> Handler {
    let mut booted = false;
    let mut special = Some(special);
    let mut healthy = stateful("Running", true);
    Box::new(move |method: &str, asked: &str| {
        booted |= asked == "vm.boot";
        if booted
            && asked == endpoint
            && let Some(reply) = special.take()
        {
            return reply;
        }
        healthy(method, asked)
    })
}

/// Asserts `status` is a crash whose reason is `reason`, and that the VMM
/// and its socket are gone.
fn assert_crashed(status: Status, reason: &str, fake: &FakeCh) {
    match status {
        Status::Crashed { reason: actual, log_tail } => {
            assert_eq!(actual, reason, "log tail:\n{log_tail}");
            assert!(log_tail.contains("fake cloud-hypervisor exiting with"), "{log_tail}");
        }
        other => panic!("expected a crash, got {other:?}"),
    }
    let pid = fake.vmm_pid();
    assert!(!process_exists(pid), "fake VMM {pid} was not reaped");
    assert!(!fake.run().join("api.sock").exists(), "API socket left behind");
}

#[test]
fn fake_ch_vmm_vanishing_after_boot_is_a_crash_not_a_socket_error() {
    // Run 2 of issue 19: the socket is gone a moment before the process exits.
    let fake = FakeCh::start(booted_then("vm.boot", Reply::RespondThenVanish(204, "", Exit::late(0))));
    let mut vm = launch(Backend::CloudHypervisor, &plan(), &fake.options()).expect("launch");
    vm.boot().expect("boot is acknowledged");
    let status = vm.status().expect("a vanished socket is the VMM exiting, not an error");
    assert_crashed(status, "exit status: 0 without a guest power-off", &fake);
    // Classified once: asking again gives the same answer.
    assert_eq!(vm.status().expect("status"), vm.shutdown(Duration::from_secs(5)).expect("shutdown"));
}

#[test]
fn fake_ch_vmm_exiting_mid_reply_is_a_crash() {
    let fake = FakeCh::start(booted_then("vm.info", Reply::PartialThenExit(Exit::late(0))));
    let mut vm = launch(Backend::CloudHypervisor, &plan(), &fake.options()).expect("launch");
    vm.boot().expect("boot");
    let status = vm.status().expect("a cut reply from an exiting VMM is not a protocol error");
    assert_crashed(status, "exit status: 0 without a guest power-off", &fake);
}

#[test]
fn fake_ch_vmm_whose_control_loop_is_gone_is_a_crash_not_an_api_error() {
    // What the real v54 answered on this host while it exited after the vCPU error.
    let gone = r#"["Error from API","API response receive error","receiving on a closed channel"]"#;
    let fake = FakeCh::start(booted_then("vm.info", Reply::RespondThenExit(500, gone, Exit::late(0))));
    let mut vm = launch(Backend::CloudHypervisor, &plan(), &fake.options()).expect("launch");
    vm.boot().expect("boot");
    let status = vm.status().expect("an exiting VMM's API thread is not an API error");
    assert_crashed(status, "exit status: 0 without a guest power-off", &fake);
}

#[test]
fn fake_ch_vmm_exiting_during_the_power_button_grace_is_a_crash() {
    let fake = FakeCh::start(booted_then("vm.power-button", Reply::RespondThenExit(204, "", Exit::code(0))));
    let mut vm = launch(Backend::CloudHypervisor, &plan(), &fake.options()).expect("launch");
    vm.boot().expect("boot");
    let started = std::time::Instant::now();
    let status = vm.shutdown(Duration::from_secs(60)).expect("shutdown");
    assert!(started.elapsed() < Duration::from_secs(10), "the grace was waited out: {:?}", started.elapsed());
    assert_crashed(status, "exit status: 0 without a guest power-off", &fake);
    assert!(!fake.requests().contains("vmm.shutdown"), "{}", fake.requests());
}

#[test]
fn fake_ch_vmm_logging_an_error_and_exiting_0_is_a_crash_with_that_error() {
    // Run 1 of issue 19: the vCPU error, a backtrace, exit status 0.
    let fake = FakeCh::start(stateful("Running", true));
    let mut vm = launch(Backend::CloudHypervisor, &plan(), &fake.options()).expect("launch");
    vm.boot().expect("boot");
    assert_eq!(vm.status().expect("status"), Status::Running);
    signal_exit(&fake.run(), Exit { code: 0, delay: "0", stderr: VCPU_ERROR });
    let status = wait_for("the fake VMM to exit", Duration::from_secs(10), || {
        let status = vm.status().expect("status");
        (status != Status::Running).then_some(status)
    });
    assert_crashed(
        status.clone(),
        "VCPU generated error: VcpuRun(Failed to run vcpu: Unexpected exit reason on vcpu run: InternalError (exit status: 0)",
        &fake,
    );
    let Status::Crashed { log_tail, .. } = &status else { unreachable!() };
    assert!(log_tail.contains("Stack backtrace:"), "{log_tail}");
    assert_eq!(vm.shutdown(Duration::from_secs(5)).expect("shutdown"), status, "a crash stays a crash");
    vm.kill().expect("kill after the exit");
    assert_eq!(vm.status().expect("status"), status);
}

#[test]
fn fake_ch_guest_power_off_then_vmm_exit_is_a_guest_shutdown() {
    // cloud-hypervisor v54 with `--no-shutdown` puts a VM whose guest powered
    // off back in `Created`; an older answer is `Shutdown`. Either, seen from
    // a live VMM, makes a later exit at status 0 a clean stop.
    for state_after_power_off in ["Created", "Shutdown"] {
        let mut booted = false;
        let fake = FakeCh::start(Box::new(move |method: &str, endpoint: &str| match endpoint {
            "vm.boot" => {
                booted = true;
                Reply::Respond(204, "")
            }
            "vm.info" if booted => Reply::Respond(
                200,
                if state_after_power_off == "Created" { r#"{"state":"Created"}"# } else { r#"{"state":"Shutdown"}"# },
            ),
            _ => stateful("Running", true)(method, endpoint),
        }));
        let mut vm = launch(Backend::CloudHypervisor, &plan(), &fake.options()).expect("launch");
        fake.vmm_pid(); // written after fake.args
        let args = std::fs::read_to_string(fake.run().join("fake.args")).expect("the fake's arguments");
        assert!(args.contains("--no-shutdown"), "a guest power-off must leave the VMM running: {args}");
        vm.boot().expect("boot");
        assert_eq!(vm.status().expect("status"), Status::ShutDown(ShutdownHow::Guest), "{state_after_power_off}");
        let pid = vm.pid();
        assert!(process_exists(pid), "the fake VMM is still running");
        signal_exit(&fake.run(), Exit::code(0));
        wait_for("the fake VMM to exit", Duration::from_secs(10), || process_has_exited(pid).then_some(()));
        assert_eq!(vm.status().expect("status"), Status::ShutDown(ShutdownHow::Guest), "{state_after_power_off}");
        assert!(!fake.run().join("api.sock").exists(), "API socket left behind");
    }
}
