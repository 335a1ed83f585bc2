//! The real cloud-hypervisor, when a `cloud-hypervisor` binary is on PATH.
//! It is in no package registry CI can reach, so these tests SKIP (and
//! print so) when it is missing, even under `KILN_REQUIRE_TOOLS`: the one
//! documented exception to the fail-if-missing rule. Build one and put it on
//! PATH to run them (README: "cloud-hypervisor").

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_testkit::{current_test_name, find_tool, guest_assets, report_skip};
use kiln_vmm::{Backend, ChVm, Console, LaunchOptions, ShutdownHow, Status, VmPlan, Vmm, launch};

use crate::support::{process_exists, process_has_exited, run_dir, wait_for};

fn cloud_hypervisor() -> Option<PathBuf> {
    let found = find_tool("cloud-hypervisor");
    if found.is_none() {
        report_skip(&format!(
            "{}: `cloud-hypervisor` not on PATH (not required: no registry has it)",
            current_test_name()
        ));
    }
    found
}

/// cloud-hypervisor and a KVM it can open; `None` (after SKIPPED) otherwise.
fn cloud_hypervisor_with_kvm() -> Option<PathBuf> {
    let binary = cloud_hypervisor()?;
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        report_skip(&format!("{}: /dev/kvm cannot be opened", current_test_name()));
        return None;
    }
    Some(binary)
}

/// The guest load address; cloud-hypervisor refuses ELF entries below 1 MiB.
const LOAD_ADDRESS: u32 = 0x10_0000;
/// 32-bit code: `out 0x600, 0x34` (cloud-hypervisor's ACPI sleep register:
/// S5, that is power off), then `hlt` forever.
const POWER_OFF: &[u8] = &[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd];
/// 32-bit code: `hlt` forever.
const IDLE: &[u8] = &[0xf4, 0xeb, 0xfd];

/// Writes a minimal PVH kernel: an ELF64 with `code` loaded at 1 MiB and a
/// `XEN_ELFNOTE_PHYS32_ENTRY` note pointing at it. It runs on a nested host
/// where the Debian kernel does not; ten bytes are all a power-off needs.
fn pvh_kernel(dir: &Path, code: &[u8]) -> PathBuf {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_offset = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    for word in [4u32, 4, 18] {
        note.extend_from_slice(&word.to_le_bytes()); // namesz, descsz, type
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&LOAD_ADDRESS.to_le_bytes());
    let code_offset = note_offset + note.len();

    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&u64::from(LOAD_ADDRESS).to_le_bytes()); // e_entry
    elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [EHDR as u16, PHDR as u16, 2, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    let mut phdr = |kind: u32, flags: u32, offset: usize, address: u64, size: usize| {
        elf.extend_from_slice(&kind.to_le_bytes());
        elf.extend_from_slice(&flags.to_le_bytes());
        for field in [offset as u64, address, address, size as u64, size as u64, 4] {
            elf.extend_from_slice(&field.to_le_bytes());
        }
    };
    phdr(4, 4, note_offset, 0, note.len()); // PT_NOTE
    phdr(1, 5, code_offset, u64::from(LOAD_ADDRESS), code.len()); // PT_LOAD, R+X
    assert_eq!(elf.len(), note_offset);
    elf.extend_from_slice(&note);
    elf.extend_from_slice(code);
    let path = dir.join("pvh-kernel");
    std::fs::write(&path, elf).expect("write the PVH kernel");
    path
}

fn tiny_vm(binary: PathBuf, dir: &Path, code: &[u8]) -> (VmPlan, LaunchOptions) {
    let mut plan = VmPlan::new("real-ch", pvh_kernel(dir, code), "console=ttyS0");
    plan.memory.mib = 64;
    plan.serial = Console::File(dir.join("serial.log"));
    let mut options = LaunchOptions::new(dir.join("run"));
    options.binary = Some(binary);
    (plan, options)
}

#[test]
fn real_ch_guest_power_off_is_a_guest_shutdown_when_installed() {
    let Some(binary) = cloud_hypervisor_with_kvm() else { return };
    let dir = run_dir();
    let (plan, options) = tiny_vm(binary, dir.path(), POWER_OFF);
    let mut vm = launch(Backend::CloudHypervisor, &plan, &options).expect("spawn, ping, create");
    vm.boot().expect("boot");
    let pid = vm.pid();
    let status = wait_for("the guest to power off", Duration::from_secs(30), || {
        let status = vm.status().expect("status");
        (status != Status::Running).then_some(status)
    });
    assert_eq!(status, Status::ShutDown(ShutdownHow::Guest));
    // `--no-shutdown`: the VMM waits to be told, so its exit is never ambiguous.
    assert!(!process_has_exited(pid), "cloud-hypervisor exited on the guest's power-off");
    assert_eq!(vm.shutdown(Duration::from_secs(5)).expect("shutdown"), Status::ShutDown(ShutdownHow::Guest));
    assert!(!process_exists(pid), "cloud-hypervisor {pid} was not reaped");
    assert!(!options.run_dir.join("api.sock").exists(), "API socket left behind");
}

#[test]
fn real_ch_sigkilled_vmm_is_a_crash_naming_the_signal_when_installed() {
    let Some(binary) = cloud_hypervisor_with_kvm() else { return };
    let dir = run_dir();
    let (plan, options) = tiny_vm(binary, dir.path(), IDLE);
    let mut vm = launch(Backend::CloudHypervisor, &plan, &options).expect("spawn, ping, create");
    vm.boot().expect("boot");
    assert_eq!(vm.status().expect("status"), Status::Running);
    let pid = vm.pid();
    // SIGKILL, not SIGSEGV: Rust's stack-overflow handler swallows a SIGSEGV sent by kill.
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill");
    assert!(killed.success());
    wait_for("cloud-hypervisor to die", Duration::from_secs(10), || process_has_exited(pid).then_some(()));
    match vm.status().expect("status") {
        Status::Crashed { reason, log_tail } => {
            assert!(reason.contains("SIGKILL"), "{reason}");
            assert!(log_tail.contains("kiln: starting"), "{log_tail}");
        }
        other => panic!("expected a crash, got {other:?}"),
    }
    assert!(matches!(vm.shutdown(Duration::from_secs(5)).expect("shutdown"), Status::Crashed { .. }));
    assert!(!process_exists(pid), "cloud-hypervisor {pid} was not reaped");
    assert!(!options.run_dir.join("api.sock").exists(), "API socket left behind");
}

#[test]
fn real_ch_api_lifecycle_when_installed() {
    let Some(binary) = cloud_hypervisor() else { return };
    let Some(assets) = guest_assets(&current_test_name(), &["vmlinux"]) else { return };
    let dir = run_dir();
    let mut plan = VmPlan::new("real-ch", &assets.vmlinux, "console=ttyS0 panic=-1");
    plan.memory.mib = 256;
    plan.serial = Console::File(dir.path().join("serial.log"));
    let mut options = LaunchOptions::new(dir.path().join("run"));
    options.binary = Some(binary.clone());
    let mut vm = launch(Backend::CloudHypervisor, &plan, &options).expect("spawn, ping, create");
    assert_eq!(vm.status().expect("status"), Status::Created);
    vm.boot().expect("boot");
    // Under nested virtualisation the guest gets nowhere, but the VMM says Running.
    assert_eq!(vm.status().expect("status"), Status::Running);
    vm.pause().expect("pause");
    assert_eq!(vm.status().expect("status"), Status::Paused);
    vm.resume().expect("resume");
    assert_eq!(vm.status().expect("status"), Status::Running);
    let pid = vm.pid();
    let status = vm.shutdown(Duration::from_secs(2)).expect("shutdown");
    assert!(matches!(status, Status::ShutDown(_)), "{status:?}");
    assert!(!process_exists(pid), "cloud-hypervisor {pid} was not reaped");

    // Counters and info straight from the concrete type.
    let mut vm = ChVm::launch(&plan, &options).expect("launch again");
    vm.boot().expect("boot");
    vm.counters().expect("vm.counters");
    assert_eq!(vm.info().expect("vm.info")["state"], "Running");
    vm.kill().expect("kill");
    assert!(matches!(vm.status().expect("status"), Status::ShutDown(kiln_vmm::ShutdownHow::Killed)));
}

#[test]
fn real_ch_error_bodies_are_surfaced_verbatim_when_installed() {
    let Some(binary) = cloud_hypervisor() else { return };
    let dir = run_dir();
    let plan = VmPlan::new("real-ch", dir.path().join("no-such-vmlinux"), "console=ttyS0");
    let mut options = LaunchOptions::new(dir.path().join("run"));
    options.binary = Some(binary);
    let err = match launch(Backend::CloudHypervisor, &plan, &options) {
        Ok(mut vm) => vm.boot().expect_err("no kernel to boot"),
        Err(err) => err,
    };
    assert_eq!(err.kind(), kiln_vmm::ErrorKind::Api, "{err}");
    let message = err.to_string();
    assert!(message.contains("(HTTP 500): [\"Error from API\""), "{message}");
    println!("{message}");
}
