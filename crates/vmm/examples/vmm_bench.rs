//! Launcher-side boot latency, for `cargo xtask bench vmm`: from a
//! `VmPlan` to the VMM acknowledging the boot request (the guest's own boot
//! is not included), kiln against a bare client doing the same VMM work in
//! the same run.
//!
//! Usage: `vmm_bench WORK_DIR RUNS BZIMAGE [VMLINUX]`. Prints one line per
//! measured round and backend: `BACKEND floor_ms F kiln_ms K`. QEMU runs
//! under TCG; cloud-hypervisor only when on PATH and VMLINUX is given.
//!
//! - QEMU floor: spawn `qemu-system-x86_64` with the same arguments kiln
//!   uses (paused, QMP socket), connect, read the greeting, send
//!   `qmp_capabilities` and `cont`, read the reply.
//! - cloud-hypervisor floor: spawn with `--api-socket`, poll `vmm.ping`,
//!   `vm.create` with the same config, `vm.boot`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_vmm::{Accel, AccelChoice, Backend, LaunchOptions, VmPlan, ch_vm_config, launch, qemu_args};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, work, runs, bzimage, rest @ ..] = args.as_slice() else {
        eprintln!("usage: vmm_bench WORK_DIR RUNS BZIMAGE [VMLINUX]");
        std::process::exit(2);
    };
    let work = PathBuf::from(work);
    let runs: usize = runs.parse().expect("RUNS is a count");
    let plan = |kernel: &str| {
        let mut plan = VmPlan::new("bench", kernel, "console=ttyS0 panic=-1");
        plan.memory.mib = 256;
        plan
    };
    let qemu_plan = plan(bzimage);
    // One warm-up round of each, then interleaved measured rounds.
    for round in 0..=runs {
        let floor = qemu_floor(&qemu_plan, &work.join("floor"));
        let kiln = kiln_boot(Backend::Qemu, &qemu_plan, &work.join("kiln"));
        if round > 0 {
            println!("qemu floor_ms {:.3} kiln_ms {:.3}", ms(floor), ms(kiln));
        }
    }
    if let Some(vmlinux) = rest.first() {
        let ch_plan = plan(vmlinux);
        for round in 0..=runs {
            let floor = ch_floor(&ch_plan, &work.join("chfloor"));
            let kiln = kiln_boot(Backend::CloudHypervisor, &ch_plan, &work.join("chkiln"));
            if round > 0 {
                println!("cloud-hypervisor floor_ms {:.3} kiln_ms {:.3}", ms(floor), ms(kiln));
            }
        }
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn kiln_boot(backend: Backend, plan: &VmPlan, run_dir: &Path) -> Duration {
    let mut options = LaunchOptions::new(run_dir);
    options.accel = AccelChoice::Tcg;
    let started = Instant::now();
    let mut vm = launch(backend, plan, &options).expect("kiln launches the VMM");
    vm.boot().expect("kiln boots the VM");
    let elapsed = started.elapsed();
    vm.kill().expect("kill");
    elapsed
}

fn spawn_quiet(command: &mut Command) -> Child {
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn the VMM")
}

fn connect_retrying(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => return stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Err(err) => panic!("cannot connect to {}: {err}", socket.display()),
        }
    }
}

fn qemu_floor(plan: &VmPlan, dir: &Path) -> Duration {
    std::fs::create_dir_all(dir).expect("work dir");
    let socket = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&socket);
    let started = Instant::now();
    let mut child = spawn_quiet(Command::new("qemu-system-x86_64").args(qemu_args(plan, Accel::Tcg, &socket)));
    let stream = connect_retrying(&socket);
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting");
    for command in ["qmp_capabilities", "cont"] {
        writer.write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes()).expect("send");
        loop {
            line.clear();
            reader.read_line(&mut line).expect("reply");
            if line.contains("\"return\"") {
                break;
            }
            assert!(!line.contains("\"error\""), "{command}: {line}");
        }
    }
    let elapsed = started.elapsed();
    child.kill().expect("kill");
    child.wait().expect("reap");
    elapsed
}

fn ch_floor(plan: &VmPlan, dir: &Path) -> Duration {
    std::fs::create_dir_all(dir).expect("work dir");
    let socket = dir.join("api.sock");
    let _ = std::fs::remove_file(&socket);
    let config = ch_vm_config(plan).to_string();
    let started = Instant::now();
    let mut child =
        spawn_quiet(Command::new("cloud-hypervisor").arg("--api-socket").arg(format!("path={}", socket.display())));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(stream) = UnixStream::connect(&socket) {
            if http(stream, "GET", "vmm.ping", "") == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no vmm.ping");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(http(UnixStream::connect(&socket).expect("connect"), "PUT", "vm.create", &config), 204);
    assert_eq!(http(UnixStream::connect(&socket).expect("connect"), "PUT", "vm.boot", ""), 204);
    let elapsed = started.elapsed();
    child.kill().expect("kill");
    child.wait().expect("reap");
    elapsed
}

/// One request; returns the status. Reads the head and `Content-Length` body.
fn http(mut stream: UnixStream, method: &str, endpoint: &str, body: &str) -> u16 {
    let request = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let count = stream.read(&mut buffer).expect("read");
        bytes.extend_from_slice(&buffer[..count]);
        let text = String::from_utf8_lossy(&bytes);
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .map_or(0, |value| value.parse().unwrap_or(0));
            if bytes.len() >= end + 4 + length {
                return text[9..12].parse().unwrap_or(0);
            }
        }
        assert!(count > 0, "connection closed");
    }
}
