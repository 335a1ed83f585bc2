//! kiln's minimal guest booted by the real Linux kernel under QEMU TCG:
//! `kiln-init` from `cargo xtask guest`'s initramfs, a service disk built by
//! `ServiceDisk` and the seed by `NoCloudSeed` (so the kernel's vfat reads
//! kiln's FAT writer, and its initramfs unpacker kiln's cpio writer), and a
//! data disk made by kiln's ext4 writer (kiln-init formats nothing).
//!
//! Each guest is a `kiln_vmm::VmPlan` started by kiln-vmm's QEMU backend
//! under TCG, as `kiln run` starts one, with a NIC on QEMU's user-mode
//! network (no tap: these tests need no root). Boots are few (each ~4-10 s
//! under TCG) and a hung guest is killed after a deadline.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln::{DiskTree, LaunchScript, ServiceDisk};
use kiln_imagefmt::{Ext4Options, Ext4Tree, FatOptions, NoCloudSeed, Qcow2Options};
use kiln_testkit::{GuestAssets, guest_assets, require_tools};
use kiln_vmm::{
    AccelChoice, Backend, Console as VmConsole, Disk, DiskFormat, LaunchOptions, ShutdownHow, Status, VmPlan, launch,
};

/// Generous: TCG on a loaded 2-core CI machine; a good boot takes ~5 s.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const QEMU: &str = "qemu-system-x86_64";
/// An environment value the launch script must carry byte for byte.
const TRICKY_VALUE: &str = "say \"hi\" & 'bye'\n$HOME `id` \\n\nlast line";
const TRICKY_ARG: &str = "it's \"quoted\"\nand on two lines";

/// How the guest is booted.
struct Boot<'a> {
    assets: &'a GuestAssets,
    /// Boot the ELF `vmlinux` (PVH) instead of the bzImage.
    elf_kernel: bool,
    service_disk: Option<&'a Path>,
    seed: Option<&'a Path>,
    data_disk: Option<&'a Path>,
    /// Press the ACPI power button (QMP `system_powerdown`) once the console shows this.
    power_button_after: Option<&'a str>,
    /// kiln-init's grace period between SIGTERM and SIGKILL (`kiln.grace=`).
    grace_seconds: u32,
}

/// What a boot left: the serial console and how long it took.
struct Console {
    log: String,
    took: Duration,
}

impl Console {
    fn assert_line(&self, line: &str) {
        assert!(
            self.log.lines().any(|l| l.trim_end_matches('\r') == line),
            "console lacks the line {line:?}:\n{}",
            self.log
        );
    }

    /// The position of the first line starting with `prefix`.
    fn position(&self, prefix: &str) -> usize {
        self.log.find(prefix).unwrap_or_else(|| panic!("console lacks {prefix:?}:\n{}", self.log))
    }

    fn assert_clean_power_off(&self) {
        self.assert_line("kiln-init: powering off");
        assert!(!self.log.contains("Kernel panic"), "the kernel panicked:\n{}", self.log);
        assert!(!self.log.contains("kiln-init: FAILED"), "kiln-init failed:\n{}", self.log);
    }
}

fn boot(test: &str, dir: &Path, spec: &Boot<'_>) -> Console {
    let log = dir.join(format!("{test}.console"));
    let _ = fs::remove_file(&log);
    let kernel = if spec.elf_kernel { &spec.assets.vmlinux } else { &spec.assets.bzimage };
    let cmdline = format!("console=ttyS0 panic=-1 no_timer_check kiln.grace={}", spec.grace_seconds);
    let mut plan = VmPlan::new(test, kernel, cmdline);
    plan.initramfs = Some(spec.assets.initramfs.clone());
    plan.serial = VmConsole::File(log.clone());
    // The seed's network config names eth0: QEMU's user-mode network gives it one.
    plan.user_network = true;
    // Data disk first: kiln-init must find disks by label, not by order.
    if let Some(data) = spec.data_disk {
        plan.disks.push(disk(data, false, Some("kiln-data")));
    }
    for path in [spec.seed, spec.service_disk].into_iter().flatten() {
        plan.disks.push(disk(path, true, None));
    }
    let mut options = LaunchOptions::new(dir.join(test));
    options.accel = AccelChoice::Tcg;
    let started = Instant::now();
    let mut vm =
        launch(Backend::Qemu, &plan, &options).unwrap_or_else(|err| panic!("{test}: cannot start {QEMU}: {err}"));
    vm.boot().unwrap_or_else(|err| panic!("{test}: cannot boot: {err}"));
    let console = |took: Duration| Console { log: fs::read_to_string(&log).unwrap_or_default(), took };
    loop {
        match vm.status().unwrap_or_else(|err| panic!("{test}: cannot read the VM's status: {err}")) {
            Status::ShutDown(ShutdownHow::Guest) => return console(started.elapsed()),
            Status::Created | Status::Running | Status::Paused => {}
            other => panic!("{QEMU} failed ({other}): {:?}\nconsole:\n{}", other, console(started.elapsed()).log),
        }
        if started.elapsed() > BOOT_DEADLINE {
            let _ = vm.kill();
            let log = console(started.elapsed()).log;
            panic!("{test}: the guest did not power off within {BOOT_DEADLINE:?} (hung?); console:\n{log}");
        }
        if let Some(marker) = spec.power_button_after
            && fs::read_to_string(&log).unwrap_or_default().contains(marker)
        {
            // The power button (QMP `system_powerdown`); the guest must power
            // off on its own before the deadline, or kiln-vmm quits QEMU.
            let grace = BOOT_DEADLINE.saturating_sub(started.elapsed());
            let stopped =
                vm.shutdown(grace).unwrap_or_else(|err| panic!("{test}: cannot press the power button: {err}"));
            let console = console(started.elapsed());
            assert_eq!(
                stopped,
                Status::ShutDown(ShutdownHow::Guest),
                "{test}: the guest did not power off within {BOOT_DEADLINE:?} after the power button; console:\n{}",
                console.log
            );
            return console;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// kiln writes both formats; QEMU is told which by the file name.
fn image_format(path: &Path) -> &'static str {
    if path.extension().is_some_and(|ext| ext == "qcow2") { "qcow2" } else { "raw" }
}

fn disk(path: &Path, read_only: bool, serial: Option<&str>) -> Disk {
    let format = if image_format(path) == "qcow2" { DiskFormat::Qcow2 } else { DiskFormat::Raw };
    let disk = Disk::new(path, format).with_read_only(read_only);
    match serial {
        Some(serial) => disk.with_serial(serial),
        None => disk,
    }
}

/// The tools and files every boot test needs, or `None` after a skip message.
fn setup(test: &str) -> Option<GuestAssets> {
    require_tools(test, &[QEMU, "qemu-img", "sha256sum", "e2fsck", "mke2fs", "debugfs"])?;
    guest_assets(test, &["bzimage", "vmlinux", "initramfs"])
}

/// The static test service `cargo xtask guest` builds next to the kernel.
fn probe(assets: &GuestAssets) -> PathBuf {
    let probe = assets.dir.join("service-probe");
    assert!(probe.is_file(), "{} is missing; run `cargo xtask guest`", probe.display());
    probe
}

fn service_disk(dir: &Path, name: &str, probe: &Path, launch: LaunchScript, keystore: Option<&Path>) -> PathBuf {
    let trees = keystore
        .map(|source| vec![DiskTree { name: "keystore".to_owned(), source: source.to_path_buf(), secret: true }])
        .unwrap_or_default();
    let disk = ServiceDisk { binary: probe.to_path_buf(), launch, trees };
    let path = dir.join(name);
    let options = FatOptions::default().with_label(ServiceDisk::LABEL);
    let tree = disk.tree().unwrap();
    let layout = tree.layout(&options).unwrap();
    if image_format(&path) == "qcow2" {
        layout.write_qcow2_file(&path, &Qcow2Options::default(), None).unwrap();
    } else {
        layout.write_file(&path, None).unwrap();
    }
    path
}

fn seed(dir: &Path) -> PathBuf {
    let seed = NoCloudSeed {
        user_data: b"#cloud-config\n".to_vec(),
        meta_data: NoCloudSeed::meta_data("kiln-test-1", "kiln-guest-test"),
        // QEMU's user-mode network: 10.0.2.0/24, gateway 10.0.2.2.
        network_config: Some(
            b"version: 2\nethernets:\n  eth0:\n    addresses: [10.0.2.15/24]\n    routes:\n      - to: default\n        via: 10.0.2.2\n"
                .to_vec(),
        ),
        vendor_data: None,
    };
    let path = dir.join("seed.img");
    let options = FatOptions::default().with_label(NoCloudSeed::LABEL);
    seed.tree().unwrap().layout(&options).unwrap().write_file(&path, None).unwrap();
    path
}

fn sha256sum(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

/// The `service_start` timestamp of kiln-init's timing line.
fn service_start(console: &Console) -> f64 {
    let line = &console.log[console.position("kiln-init: timing kernel_start=")..];
    let value = line.lines().next().unwrap().rsplit("service_start=").next().unwrap();
    value.trim().parse().unwrap()
}

#[test]
fn guest_runs_the_service_and_keeps_its_data_across_boots() {
    let test = "guest_runs_the_service";
    let Some(assets) = setup(test) else { return };
    let probe = probe(&assets);
    let dir = tempfile::tempdir().unwrap();
    let keystore = dir.path().join("keystore-src");
    fs::create_dir(&keystore).unwrap();
    let key: Vec<u8> = (0..2048_u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    fs::write(keystore.join("key.bin"), &key).unwrap();
    let seed = seed(dir.path());
    // The data disk as kiln creates it: ext4 labelled KILNDATA, written here
    // straight into qcow2 by kiln's ext4 writer, which the guest mounts.
    let data = dir.path().join("data.qcow2");
    let options = Ext4Options::default().with_label(kiln_guest::DATA_DISK_LABEL).with_size(64 << 20);
    Ext4Tree::new().layout(&options).unwrap().write_qcow2_file(&data, &Qcow2Options::default()).unwrap();

    // First boot: everything the service is given reaches it intact, and
    // its exit status comes back on the console.
    let args = [
        "--env",
        "KILN_PROBE_VALUE",
        "--sha256",
        "/srv/keystore/key.bin",
        "--write",
        "/mnt/data/note=kept across boots",
        "--net",
        TRICKY_ARG,
        "--exit",
        "7",
    ];
    let launch = LaunchScript {
        args: args.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: vec![("KILN_PROBE_VALUE".to_owned(), TRICKY_VALUE.as_bytes().to_vec())],
        ..LaunchScript::default()
    };
    let first_disk = service_disk(dir.path(), "service-1.img", &probe, launch, Some(&keystore));
    let spec = Boot {
        assets: &assets,
        elf_kernel: false,
        service_disk: Some(&first_disk),
        seed: Some(&seed),
        data_disk: Some(&data),
        power_button_after: None,
        grace_seconds: 20,
    };
    let first = boot("first-boot", dir.path(), &spec);
    for (index, arg) in args.iter().enumerate() {
        first.assert_line(&format!("probe: arg[{index}]={arg:?}"));
    }
    first.assert_line(&format!("probe: env KILN_PROBE_VALUE={:?}", Some(OsString::from(TRICKY_VALUE))));
    first.assert_line(&format!("probe: sha256 /srv/keystore/key.bin {}", sha256sum(&keystore.join("key.bin"))));
    first.assert_line("probe: wrote /mnt/data/note");
    first.assert_line("probe: hostname \"kiln-guest-test\"");
    // /proc/net/route in hex, little-endian: the default route via 10.0.2.2
    // and the connected /24 that the address 10.0.2.15/24 implies.
    first.assert_line("probe: route eth0 dst=00000000 gw=0202000A mask=00000000");
    first.assert_line("probe: route eth0 dst=0002000A gw=00000000 mask=00FFFFFF");
    first.assert_line("kiln-init: service exited with status 7");
    first.assert_clean_power_off();
    assert!(first.position("kiln-init: service exited") < first.position("kiln-init: powering off"));
    let service_started = service_start(&first);
    assert!(service_started > 0.0, "service_start must be a time since boot");
    report(&format!(
        "first boot: service started {service_started:.2} s after kernel start, QEMU ran {:.2} s",
        first.took.as_secs_f64()
    ));

    // QEMU grew kiln's qcow2 consistently, and kiln-init unmounted the data
    // disk before powering off: e2fsck finds the filesystem clean.
    let check = Command::new("qemu-img").arg("check").arg(&data).output().unwrap();
    assert!(check.status.success(), "qemu-img check on the data disk: {}", String::from_utf8_lossy(&check.stdout));
    let raw = dir.path().join("data.raw");
    let convert = Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&data).arg(&raw).output().unwrap();
    assert!(convert.status.success(), "qemu-img convert: {}", String::from_utf8_lossy(&convert.stderr));
    let fsck = Command::new("e2fsck").args(["-fn"]).arg(&raw).output().unwrap();
    assert!(fsck.status.success(), "e2fsck -fn on the data disk: {}", String::from_utf8_lossy(&fsck.stdout));

    // Second boot: the data survived, and the power button gives the service
    // its SIGTERM before the machine powers off.
    let launch = LaunchScript {
        args: ["--read", "/mnt/data/note", "--wait-for-sigterm"].iter().map(|a| a.as_bytes().to_vec()).collect(),
        ..LaunchScript::default()
    };
    // This time the service disk is qcow2, written by kiln's FAT-into-qcow2 path.
    let second_disk = service_disk(dir.path(), "service-2.qcow2", &probe, launch, None);
    let spec =
        Boot { service_disk: Some(&second_disk), power_button_after: Some("probe: waiting for SIGTERM"), ..spec };
    let second = boot("second-boot", dir.path(), &spec);
    second.assert_line("probe: read /mnt/data/note \"kept across boots\"");
    assert!(!second.log.contains("making a filesystem"), "the data disk was formatted again:\n{}", second.log);
    let pressed = second.position("kiln-init: power button: sending SIGTERM");
    let got = second.position("probe: got signal 15");
    let exited = second.position("kiln-init: service exited with status 0");
    assert!(pressed < got && got < exited, "order: button, SIGTERM, exit:\n{}", second.log);
    second.assert_clean_power_off();

    // Third boot: an ext2 data disk as earlier kilns had the guest make it
    // (busybox mke2fs, label KILNDATA) still mounts, keeps what it held,
    // takes writes, and is clean afterwards. kiln-init no longer formats.
    let old = dir.path().join("old-data.raw");
    fs::File::create(&old).unwrap().set_len(32 << 20).unwrap();
    let mkfs = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext2", "-L", kiln_guest::DATA_DISK_LABEL])
        .arg(&old)
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "mke2fs: {}", String::from_utf8_lossy(&mkfs.stderr));
    let note = dir.path().join("old-note");
    fs::write(&note, b"from an older kiln").unwrap();
    let write = Command::new("debugfs")
        .args(["-w", "-R"])
        .arg(format!("write {} note", note.display()))
        .arg(&old)
        .output()
        .unwrap();
    assert!(write.status.success(), "debugfs write: {}", String::from_utf8_lossy(&write.stderr));
    let launch = LaunchScript {
        args: ["--read", "/mnt/data/note", "--write", "/mnt/data/later=written by this kiln"]
            .iter()
            .map(|a| a.as_bytes().to_vec())
            .collect(),
        ..LaunchScript::default()
    };
    let third_disk = service_disk(dir.path(), "service-3.img", &probe, launch, None);
    let spec = Boot { service_disk: Some(&third_disk), data_disk: Some(&old), power_button_after: None, ..spec };
    let third = boot("third-boot-ext2", dir.path(), &spec);
    third.assert_line("probe: read /mnt/data/note \"from an older kiln\"");
    third.assert_line("probe: wrote /mnt/data/later");
    third.assert_clean_power_off();
    let fsck = Command::new("e2fsck").args(["-fn"]).arg(&old).output().unwrap();
    assert!(fsck.status.success(), "e2fsck -fn on the ext2 disk: {}", String::from_utf8_lossy(&fsck.stdout));
}

#[test]
fn guest_without_a_service_disk_says_so_and_powers_off() {
    let test = "guest_without_a_service_disk";
    let Some(assets) = setup(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let seed = seed(dir.path());
    // The ELF vmlinux (PVH entry), so the extracted kernel is booted too.
    let spec = Boot {
        assets: &assets,
        elf_kernel: true,
        service_disk: None,
        seed: Some(&seed),
        data_disk: None,
        power_button_after: None,
        grace_seconds: 20,
    };
    let console = boot(test, dir.path(), &spec);
    let failure = console.position("kiln-init: FAILED: service disk not found: no disk labelled SERVICEDISK");
    assert!(failure < console.position("kiln-init: powering off"));
    assert!(!console.log.contains("Kernel panic"), "the kernel panicked:\n{}", console.log);
}

#[test]
fn guest_kills_a_service_that_ignores_sigterm_after_the_grace_period() {
    let test = "guest_grace_period";
    let Some(assets) = setup(test) else { return };
    let probe = probe(&assets);
    let dir = tempfile::tempdir().unwrap();
    let launch = LaunchScript { args: vec![b"--ignore-sigterm".to_vec()], ..LaunchScript::default() };
    let disk = service_disk(dir.path(), "service.img", &probe, launch, None);
    let spec = Boot {
        assets: &assets,
        elf_kernel: false,
        service_disk: Some(&disk),
        seed: None,
        data_disk: None,
        power_button_after: Some("probe: ignoring SIGTERM"),
        grace_seconds: 1,
    };
    let console = boot(test, dir.path(), &spec);
    let pressed = console.position("kiln-init: power button: sending SIGTERM to the service, grace 1.0s");
    let killed = console.position("kiln-init: grace period over: sending SIGKILL");
    let reported = console.position("kiln-init: service killed by signal 9");
    assert!(pressed < killed && killed < reported, "order: button, SIGKILL, report:\n{}", console.log);
    console.assert_clean_power_off();
}

/// A figure for a person reading the test output (not asserted).
fn report(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}
