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

use crate::support::{process_exists, run_dir, wait_for};

/// What the fake server does with one request.
enum Reply {
    Respond(u16, &'static str),
    /// Read the request, never answer.
    Hang,
    /// Make the fake VMM exit with this code, then never answer.
    ExitVmm(i32),
}

type Handler = Box<dyn FnMut(&str, &str) -> Reply + Send>;

struct FakeCh {
    dir: tempfile::TempDir,
    requests: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The fake VMM: records its pid, logs, and exits with the code written to
/// `exit-now` next to its API socket.
const FAKE_VMM: &str = r#"#!/bin/sh
sock=${2#path=}
dir=$(dirname "$sock")
echo $$ > "$dir/fake.pid"
echo "fake cloud-hypervisor $$ listening on $sock" >&2
while [ ! -e "$dir/exit-now" ]; do sleep 0.02; done
code=$(cat "$dir/exit-now")
echo "fake cloud-hypervisor exiting with $code" >&2
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
        match handler(&method, &endpoint) {
            Reply::Respond(status, body) => {
                let response = format!(
                    "HTTP/1.1 {status} X\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes());
                // micro-http keeps connections open; kiln must not wait for EOF.
                hung.push(stream);
            }
            Reply::Hang => hung.push(stream),
            Reply::ExitVmm(code) => {
                std::fs::write(run.join("exit-now"), code.to_string()).expect("signal the fake VMM");
                hung.push(stream);
            }
        }
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
