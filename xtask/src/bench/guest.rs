//! `cargo xtask bench guest`: boot-to-service time of kiln's minimal guest
//! under QEMU TCG (this machine is a nested VM whose KVM hangs the guest
//! kernel; see FACTS.md), against the floor: the same kernel with a
//! busybox-only initramfs whose `/init` powers off at once.
//!
//! Each guest is a `kiln_vmm::VmPlan` started by kiln-vmm's QEMU backend
//! (forced to TCG), as `kiln run` starts one. Per boot it records QEMU's
//! wall time (spawn to exit after the guest powered off) and, from the console, kiln-init's timing line
//! (`init_start`, `service_start`, seconds since kernel start on the guest's
//! monotonic clock). The service is a `launch` script that exits at once.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_imagefmt::{Compression, CpioArchive, FatOptions, FatTree};
use kiln_vmm::{AccelChoice, Backend, Console, Disk, DiskFormat, LaunchOptions, ShutdownHow, Status, VmPlan, launch};

use super::chart::{Bar, BarChart};
use super::{Machine, Options, Target, print_report, remove_path};
use crate::{announce, guest, target_dir};

const QEMU: &str = "qemu-system-x86_64";
const DEADLINE: Duration = Duration::from_secs(180);

pub(super) fn run(options: &Options) -> Result<()> {
    let assets = guest::guest_dir()?;
    for file in ["vmlinuz", "initramfs.cpio.gz"] {
        if !assets.join(file).is_file() {
            bail!("{} is missing: run `cargo xtask guest` first", assets.join(file).display());
        }
    }
    // Absolute: kiln-vmm hands paths to QEMU, which resolves its own way.
    let dir = std::env::current_dir()?.join(target_dir()).join("bench").join("guest");
    remove_path(&dir)?;
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (service_disk, floor_initramfs) = write_images(&dir)?;

    let kernel = assets.join("vmlinuz");
    let kiln_initramfs = assets.join("initramfs.cpio.gz");
    let mut kiln_runs = Vec::new();
    let mut floor_runs = Vec::new();
    announce(&format!("booting each guest {} times (after one warm-up), interleaved", options.runs));
    for round in 0..=options.runs {
        let kiln = boot(&dir, &kernel, &kiln_initramfs, Some(&service_disk))?;
        let floor = boot(&dir, &kernel, &floor_initramfs, None)?;
        if round > 0 {
            kiln_runs.push(kiln);
            floor_runs.push(floor);
        }
    }
    let machine = Machine::detect(&dir);
    remove_path(&dir)?;
    report(options, &machine, &kiln_runs, &floor_runs)
}

/// The service disk (a launch script that exits 0 at once) and the floor's
/// initramfs (busybox as the whole userspace, powering off from /init).
fn write_images(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let service_disk = dir.join("service.img");
    let mut tree = FatTree::new();
    tree.add_file_from_bytes("launch", b"#!/bin/sh\nexit 0\n".to_vec())?;
    let fat = FatOptions::default().with_label("SERVICEDISK");
    tree.layout(&fat)?.write_file(&service_disk, None)?;
    let floor_initramfs = dir.join("floor.cpio.gz");
    let mut floor = CpioArchive::new();
    floor.add_char_device("dev/console", 0o600, 5, 1)?;
    floor.add_dir("proc", 0o755)?;
    floor.add_file_from_path("bin/busybox", "/usr/bin/busybox", 0o755)?;
    floor.add_file_from_bytes(
        "init",
        b"#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n/bin/busybox echo floor: init_start $(/bin/busybox cut -d' ' -f1 /proc/uptime)\n/bin/busybox poweroff -f\n".to_vec(),
        0o755,
    )?;
    floor.write_file(&floor_initramfs, Compression::Gzip, 0)?;
    Ok((service_disk, floor_initramfs))
}

/// The median of `pick` over the runs that have it.
fn median_of(runs: &[BootRun], pick: fn(&BootRun) -> Option<f64>) -> Option<f64> {
    let mut values: Vec<f64> = runs.iter().filter_map(pick).collect();
    values.sort_by(f64::total_cmp);
    (!values.is_empty()).then(|| values[values.len() / 2])
}

/// Prints the table and writes the timeline chart.
fn report(options: &Options, machine: &Machine, kiln_runs: &[BootRun], floor_runs: &[BootRun]) -> Result<()> {
    let show = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    let kiln_wall = median_of(kiln_runs, |r| Some(r.wall)).unwrap_or(f64::NAN);
    let floor_wall = median_of(floor_runs, |r| Some(r.wall)).unwrap_or(f64::NAN);
    let kiln_service = median_of(kiln_runs, |r| r.service_start);
    let kiln_init = median_of(kiln_runs, |r| r.init_start);
    let floor_init = median_of(floor_runs, |r| r.init_start);
    let kiln_modules = median_of(kiln_runs, |r| Some(r.modules_loaded? - r.init_start?));
    let kiln_disks = median_of(kiln_runs, |r| Some(r.disks_ready? - r.modules_loaded?));
    let header = [
        "guest (QEMU TCG, -M pc)",
        "init start s",
        "service start s",
        "init to service s",
        "of which modules s",
        "of which disks s",
        "QEMU wall s",
        "vs floor",
    ];
    let rows = vec![
        vec![
            "kiln (kiln-init + modules, service disk)".to_owned(),
            show(kiln_init),
            show(kiln_service),
            show(kiln_service.zip(kiln_init).map(|(s, i)| s - i)),
            show(kiln_modules),
            show(kiln_disks),
            format!("{kiln_wall:.2}"),
            format!("{:.2}x", kiln_wall / floor_wall),
        ],
        vec![
            "floor (busybox /init, poweroff)".to_owned(),
            show(floor_init),
            "-".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
            format!("{floor_wall:.2}"),
            "1.00x".to_owned(),
        ],
    ];
    let targets = [Target {
        description: "boot-to-service <= 300 ms under KVM with cloud-hypervisor".to_owned(),
        met: false,
        actual: format!(
            "not measurable here (nested KVM hangs the guest); under TCG service_start {} s",
            show(kiln_service)
        ),
    }];
    let workload = "Debian's cloud kernel (`cargo xtask guest`), 512 MiB, 1 vCPU, serial console to a file, \
                    a service whose launch script exits 0";
    let method = format!(
        "median of {} boots per guest after one warm-up each, interleaved; times since kernel start from the guest's \
         monotonic clock (kiln-init's timing line, /proc/uptime for the floor), wall from QEMU spawn to exit",
        options.runs
    );
    print_report("Guest boot: `cargo xtask bench guest`", machine, workload, &method, (&header, &rows), &targets);
    let phase = |value: Option<f64>| value.unwrap_or(f64::NAN);
    BarChart {
        title: "Guest boot under QEMU TCG: where the time goes".to_owned(),
        axis: format!("seconds since kernel start, median of {} boots", options.runs),
        segments: vec!["kernel to /init".into(), "modules".into(), "disks".into(), "to the service".into()],
        bars: vec![
            Bar::new(
                "kiln (kiln-init, service disk)",
                vec![
                    phase(kiln_init),
                    phase(kiln_modules),
                    phase(kiln_disks),
                    phase(median_of(kiln_runs, |r| Some(r.service_start? - r.disks_ready?))),
                ],
            ),
            Bar::new("floor (busybox /init)", vec![phase(floor_init), 0.0, 0.0, 0.0]),
        ],
    }
    .write("guest")?;
    Ok(())
}

#[derive(Debug)]
struct BootRun {
    wall: f64,
    init_start: Option<f64>,
    modules_loaded: Option<f64>,
    disks_ready: Option<f64>,
    service_start: Option<f64>,
}

fn boot(dir: &Path, kernel: &Path, initramfs: &Path, service_disk: Option<&Path>) -> Result<BootRun> {
    let log = dir.join("console.log");
    let _ = fs::remove_file(&log);
    let mut plan = VmPlan::new("bench-guest", kernel, "console=ttyS0 panic=-1");
    plan.initramfs = Some(initramfs.to_path_buf());
    plan.serial = Console::File(log.clone());
    if let Some(disk) = service_disk {
        plan.disks.push(Disk::new(disk, DiskFormat::Raw).with_read_only(true));
    }
    let mut launch_options = LaunchOptions::new(dir.join("vm"));
    launch_options.accel = AccelChoice::Tcg;
    // QMP answers from QEMU's main loop, which a loaded 2-core host can starve for seconds.
    launch_options.request_timeout = Duration::from_secs(30);
    let started = Instant::now();
    let mut vm = launch(Backend::Qemu, &plan, &launch_options)
        .with_context(|| format!("cannot start {QEMU}; install qemu-system-x86"))?;
    vm.boot().context("cannot boot the guest")?;
    let status = loop {
        let status = vm.status().context("cannot read the VM's status")?;
        if !matches!(status, Status::Created | Status::Running | Status::Paused) {
            break status;
        }
        if started.elapsed() > DEADLINE {
            vm.kill()?;
            bail!("the guest did not power off within {DEADLINE:?}; console in {}", log.display());
        }
        // Each poll of a live VM is a QMP round trip through QEMU's main
        // loop: 20 ms keeps that traffic small beside a TCG guest on 2 cores,
        // at a resolution still 1/100 of a boot.
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = started.elapsed().as_secs_f64();
    let console = fs::read_to_string(&log).unwrap_or_default();
    if status != Status::ShutDown(ShutdownHow::Guest) {
        bail!("{QEMU} failed ({status}); console:\n{console}");
    }
    let value = |key: &str| console.split(key).nth(1)?.split_whitespace().next()?.parse::<f64>().ok();
    let run = if service_disk.is_some() {
        if !console.contains("kiln-init: service exited with status 0") {
            bail!("kiln's guest did not run the service; console:\n{console}");
        }
        BootRun {
            wall,
            init_start: value("kiln-init: timing kernel_start=0.000000 init_start="),
            modules_loaded: value("modules_loaded="),
            disks_ready: value("disks_ready="),
            service_start: value("service_start="),
        }
    } else {
        BootRun {
            wall,
            init_start: value("floor: init_start "),
            modules_loaded: None,
            disks_ready: None,
            service_start: None,
        }
    };
    Ok(run)
}
