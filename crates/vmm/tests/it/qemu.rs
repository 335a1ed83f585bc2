//! Real QEMU under TCG booting the Debian cloud kernel with a busybox initramfs.

use std::path::PathBuf;
use std::time::Duration;

use kiln_testkit::{current_test_name, guest_assets, require_tools};
use kiln_vmm::{AccelChoice, Backend, Console, ErrorKind, LaunchOptions, ShutdownHow, Status, VmPlan, Vmm, launch};

use crate::support::{busybox_initramfs, process_exists, run_dir, wait_for};

/// Generous: TCG boots take 3-5 s alone, more on a loaded 2-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

struct Guest {
    vm: Box<dyn Vmm>,
    serial: PathBuf,
    marker: String,
    _dir: tempfile::TempDir,
}

/// Launches (not boots) a TCG VM whose init prints a marker and then runs `then`.
fn launch_guest(then: &str) -> Option<Guest> {
    let test = current_test_name();
    let tools = require_tools(&test, &["qemu-system-x86_64", "busybox"])?;
    let assets = guest_assets(&test, &["bzimage"])?;
    let dir = run_dir();
    let marker = format!("kiln-marker-{}", std::process::id());
    let script = format!("echo {marker}\n{then}\n");
    let initramfs = busybox_initramfs(&tools[1], dir.path(), &script);
    let serial = dir.path().join("serial.log");
    let mut plan = VmPlan::new("it", &assets.bzimage, "console=ttyS0 panic=-1 quiet no_timer_check");
    plan.memory.mib = 256;
    plan.initramfs = Some(initramfs);
    plan.serial = Console::File(serial.clone());
    let mut options = LaunchOptions::new(dir.path().join("run"));
    // This machine is a nested VM: KVM is present but stock kernels hang under it.
    options.accel = AccelChoice::Tcg;
    options.binary = Some(tools[0].clone());
    // TCG on a loaded 2-core machine can keep QEMU from answering QMP for
    // seconds (query-status once took over 5 s); these tests check what the
    // answers say, not how fast they come.
    options.request_timeout = Duration::from_secs(30);
    let vm = launch(Backend::Qemu, &plan, &options).expect("QEMU starts and answers QMP");
    Some(Guest { vm, serial, marker, _dir: dir })
}

impl Guest {
    fn wait_for_marker(&mut self) {
        let (serial, marker) = (&self.serial, &self.marker);
        wait_for("the guest's marker on the serial port", BOOT_TIMEOUT, || {
            std::fs::read_to_string(serial).ok().filter(|text| text.contains(marker.as_str())).map(drop)
        });
    }
}

#[test]
fn qemu_guest_powers_off_by_itself() {
    let Some(mut guest) = launch_guest("/bin/busybox poweroff -f") else { return };
    assert_eq!(guest.vm.status().expect("status"), Status::Created);
    guest.vm.boot().expect("boot");
    let running = guest.vm.status().expect("status after boot");
    // The guest may not get far before the first status: running, or already off.
    assert!(matches!(running, Status::Running | Status::ShutDown(ShutdownHow::Guest)), "{running:?}");
    let pid = guest.vm.pid();
    let vm = &mut guest.vm;
    let final_status = wait_for("the guest to power off", BOOT_TIMEOUT, || {
        let status = vm.status().expect("status while booting");
        (!matches!(status, Status::Running)).then_some(status)
    });
    assert_eq!(
        final_status,
        Status::ShutDown(ShutdownHow::Guest),
        "log: {:?}",
        std::fs::read_to_string(guest.vm.log_path())
    );
    let serial = std::fs::read_to_string(&guest.serial).expect("serial log");
    assert!(serial.contains(&guest.marker), "marker missing from the serial log:\n{serial}");
    assert!(!process_exists(pid), "QEMU {pid} was not reaped");
    // Shutting down a VM that is already off changes nothing.
    assert_eq!(guest.vm.shutdown(Duration::from_secs(1)).expect("idempotent"), final_status);
}

#[test]
fn qemu_shutdown_escalates_when_the_guest_ignores_the_power_button() {
    // No acpid in the guest: the power button does nothing.
    let Some(mut guest) = launch_guest("exec /bin/busybox sleep 3600") else { return };
    guest.vm.boot().expect("boot");
    guest.wait_for_marker();
    assert_eq!(guest.vm.status().expect("status"), Status::Running);
    guest.vm.pause().expect("pause");
    assert_eq!(guest.vm.status().expect("status"), Status::Paused);
    guest.vm.resume().expect("resume");
    assert_eq!(guest.vm.status().expect("status"), Status::Running);
    let pid = guest.vm.pid();
    let status = guest.vm.shutdown(Duration::from_secs(2)).expect("shutdown");
    assert_eq!(status, Status::ShutDown(ShutdownHow::VmmQuit));
    assert!(!process_exists(pid), "QEMU {pid} was not reaped");
    assert_eq!(guest.vm.status().expect("status after shutdown"), status);
    assert_eq!(guest.vm.shutdown(Duration::from_secs(2)).expect("idempotent"), status);
    assert!(!guest.vm.log_path().parent().expect("run dir").join("qmp.sock").exists(), "QMP socket left behind");
}

#[test]
fn qemu_killed_from_outside_is_reported_as_crashed() {
    let Some(mut guest) = launch_guest("exec /bin/busybox sleep 3600") else { return };
    guest.vm.boot().expect("boot");
    guest.wait_for_marker();
    let pid = guest.vm.pid();
    let raw = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(raw, rustix::process::Signal::KILL).expect("SIGKILL QEMU");
    let vm = &mut guest.vm;
    let status = wait_for("QEMU to be seen dead", Duration::from_secs(30), || {
        let status = vm.status().expect("status");
        (status != Status::Running).then_some(status)
    });
    let log = std::fs::read_to_string(guest.vm.log_path()).expect("VMM log");
    match &status {
        Status::Crashed { reason, log_tail } => {
            assert!(reason.contains("SIGKILL"), "{reason}");
            assert_eq!(log_tail, log.trim_end(), "the crash report carries the log's tail");
            assert!(log_tail.starts_with("kiln: starting ") && log_tail.contains(" -accel tcg "), "{log_tail}");
        }
        other => panic!("expected crashed, got {other:?}"),
    }
    assert!(!process_exists(pid), "QEMU {pid} was not reaped");
    assert_eq!(guest.vm.shutdown(Duration::from_secs(1)).expect("shutdown of a crashed VM"), status);
}

#[test]
fn qemu_serial_pty_is_reported() {
    let test = current_test_name();
    let Some(tools) = require_tools(&test, &["qemu-system-x86_64"]) else { return };
    let Some(assets) = guest_assets(&test, &["bzimage"]) else { return };
    let dir = run_dir();
    let mut plan = VmPlan::new("it", &assets.bzimage, "console=ttyS0");
    plan.serial = Console::Pty;
    let mut options = LaunchOptions::new(dir.path().join("run"));
    options.accel = AccelChoice::Tcg;
    options.binary = Some(tools[0].clone());
    // Created, never booted: QEMU has allocated the pty already.
    let mut vm = launch(Backend::Qemu, &plan, &options).expect("launch");
    let pty = vm.serial_pty().expect("query-chardev").expect("a pty");
    assert!(pty.starts_with("/dev/pts/") && pty.exists(), "{}", pty.display());
    // Not running: no power button, straight to quit.
    assert_eq!(vm.shutdown(Duration::from_secs(600)).expect("shutdown"), Status::ShutDown(ShutdownHow::VmmQuit));
}

#[test]
fn qemu_accepts_every_mapped_device() {
    // The argv mapping against the real QEMU: shared memory, raw and qcow2
    // disks (read-only, O_DIRECT, a comma in a name), serial on a socket,
    // the virtio console on a pty, entropy. QEMU checks every option when
    // it starts, so reaching `Created` means it took them all. (Taps need
    // root and kiln-net; vhost-vsock and VFIO need host devices.)
    let test = current_test_name();
    let Some(tools) = require_tools(&test, &["qemu-system-x86_64"]) else { return };
    let Some(assets) = guest_assets(&test, &["bzimage"]) else { return };
    let dir = run_dir();
    let raw = dir.path().join("seed,1.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).expect("raw disk");
    let qcow2 = dir.path().join("data.qcow2");
    kiln_imagefmt::create_qcow2(&qcow2, 64 << 20, &kiln_imagefmt::Qcow2Options::default()).expect("qcow2 disk");
    let mut plan = VmPlan::new("it", &assets.bzimage, "console=ttyS0");
    plan.memory = kiln_vmm::Memory::new(128);
    plan.memory.shared = true;
    plan.disks = vec![
        kiln_vmm::Disk::new(raw, kiln_vmm::DiskFormat::Raw).with_read_only(true),
        kiln_vmm::Disk::new(qcow2, kiln_vmm::DiskFormat::Qcow2).with_direct(true),
    ];
    plan.serial = Console::Socket(dir.path().join("serial.sock"));
    plan.console = Console::Pty;
    plan.entropy = true;
    let mut options = LaunchOptions::new(dir.path().join("run"));
    options.accel = AccelChoice::Tcg;
    options.binary = Some(tools[0].clone());
    let mut vm = launch(Backend::Qemu, &plan, &options).expect("QEMU accepts the arguments");
    assert_eq!(vm.status().expect("status"), Status::Created);
    assert!(dir.path().join("serial.sock").exists(), "QEMU listens on the serial socket");
    vm.kill().expect("kill");
    assert_eq!(vm.status().expect("status"), Status::ShutDown(ShutdownHow::Killed));
}

#[test]
fn qemu_hung_vmm_hits_deadlines_and_is_killed() {
    let test = current_test_name();
    let Some(tools) = require_tools(&test, &["qemu-system-x86_64"]) else { return };
    let Some(assets) = guest_assets(&test, &["bzimage"]) else { return };
    let dir = run_dir();
    let plan = VmPlan::new("it", &assets.bzimage, "console=ttyS0");
    let mut options = LaunchOptions::new(dir.path().join("run"));
    options.accel = AccelChoice::Tcg;
    options.binary = Some(tools[0].clone());
    options.request_timeout = Duration::from_millis(300);
    let mut vm = launch(Backend::Qemu, &plan, &options).expect("launch");
    let pid = vm.pid();
    // A stopped process keeps its sockets open and answers nothing: a hung VMM.
    let raw = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(raw, rustix::process::Signal::STOP).expect("SIGSTOP QEMU");
    let err = vm.status().expect_err("a stopped QEMU cannot answer");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    // Woken up, it answers the stale request first; kiln must skip that reply.
    rustix::process::kill_process(raw, rustix::process::Signal::CONT).expect("SIGCONT QEMU");
    // (Taking it for the answer to `cont` would make this status read `{}`.)
    vm.boot().expect("boot after the hang");
    assert_eq!(vm.status().expect("status after the hang"), Status::Running);
    rustix::process::kill_process(raw, rustix::process::Signal::STOP).expect("SIGSTOP QEMU again");
    assert_eq!(vm.shutdown(Duration::from_secs(600)).expect("shutdown"), Status::ShutDown(ShutdownHow::Killed));
    assert!(!process_exists(pid), "QEMU {pid} was not reaped");
}

#[test]
fn qemu_exiting_at_start_up_reports_its_log() {
    let test = current_test_name();
    let Some(tools) = require_tools(&test, &["qemu-system-x86_64"]) else { return };
    let dir = run_dir();
    let missing_kernel = dir.path().join("no-such-vmlinuz");
    let plan = VmPlan::new("it", &missing_kernel, "console=ttyS0");
    let mut options = LaunchOptions::new(dir.path().join("run"));
    options.accel = AccelChoice::Tcg;
    options.binary = Some(tools[0].clone());
    let err = launch(Backend::Qemu, &plan, &options).expect_err("no kernel");
    assert_eq!(err.kind(), ErrorKind::VmmExited, "{err}");
    let message = err.to_string();
    assert!(message.contains("no-such-vmlinuz"), "the log tail names the kernel: {message}");
    assert!(!dir.path().join("run/qmp.sock").exists(), "QMP socket left behind");
}

#[test]
fn a_run_dir_too_long_for_a_socket_is_refused_before_starting() {
    let dir = run_dir();
    let plan = VmPlan::new("it", "/boot/vmlinuz", "console=ttyS0");
    let long = dir.path().join("d".repeat(120));
    let options = LaunchOptions::new(&long);
    let err = launch(Backend::Qemu, &plan, &options).expect_err("too long");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().starts_with("Invalid VM plan: `run_dir`"), "{err}");
    assert!(!long.exists(), "nothing created");
}
