//! The real cloud-hypervisor, when a `cloud-hypervisor` binary is on PATH.
//! It is in no package registry CI can reach, so these tests SKIP (and
//! print so) when it is missing, even under `KILN_REQUIRE_TOOLS`: the one
//! documented exception to the fail-if-missing rule. Build one and put it on
//! PATH to run them (README: "cloud-hypervisor").

use std::path::PathBuf;
use std::time::Duration;

use kiln_testkit::{current_test_name, find_tool, guest_assets, report_skip};
use kiln_vmm::{Backend, ChVm, Console, LaunchOptions, Status, VmPlan, Vmm, launch};

use crate::support::{process_exists, run_dir};

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
