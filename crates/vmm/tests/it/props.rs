//! Property tests: any valid `VmPlan` survives both mappings. The QEMU
//! arguments are parsed back with QEMU's option rules (`,` separates,
//! `,,` is a literal comma), the cloud-hypervisor config read as JSON.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_vmm::{Accel, Console, Disk, DiskFormat, Memory, SerialPort, VmPlan, ch_vm_config, qemu_args};
use proptest::prelude::*;

fn path() -> impl Strategy<Value = PathBuf> {
    // Commas, '=', spaces, quotes and non-ASCII: everything QEMU's option syntax could trip on.
    proptest::collection::vec(prop_oneof![Just(",".to_owned()), Just("=".to_owned()), "[ a-z0-9_.'\"é=,-]{1,8}"], 1..6)
        .prop_map(|parts| PathBuf::from(format!("/{}", parts.concat())))
}

fn disk() -> impl Strategy<Value = Disk> {
    (path(), any::<bool>(), any::<bool>(), any::<bool>(), proptest::option::of("[A-Za-z0-9._-]{1,20}")).prop_map(
        |(path, read_only, direct, qcow2, serial)| {
            let disk = Disk::new(path, if qcow2 { DiskFormat::Qcow2 } else { DiskFormat::Raw })
                .with_read_only(read_only)
                .with_direct(direct);
            match serial {
                Some(serial) => disk.with_serial(serial),
                None => disk,
            }
        },
    )
}

fn plan() -> impl Strategy<Value = VmPlan> {
    (
        "[a-z0-9._-]{1,20}",
        1u8..=254,
        (16u64..65536, any::<bool>(), any::<bool>()),
        path(),
        proptest::option::of(path()),
        "[ -~]{0,100}",
        proptest::collection::vec(disk(), 0..4),
        proptest::option::of(path()),
        proptest::option::of(("[A-Za-z0-9._-]{1,64}", path())),
    )
        .prop_map(|(name, cpus, (mib, shared, hugepages), kernel, initramfs, cmdline, disks, serial, control)| {
            let mut plan = VmPlan::new(name, kernel, cmdline);
            plan.cpus = cpus;
            plan.memory = Memory::new(if hugepages { mib & !1 } else { mib });
            (plan.memory.shared, plan.memory.hugepages) = (shared, hugepages);
            plan.initramfs = initramfs;
            plan.disks = disks;
            plan.serial = serial.map_or(Console::Off, Console::File);
            plan.control = control.map(|(name, socket)| SerialPort::new(name, socket));
            plan
        })
}

/// Splits a QEMU option string the way QEMU does.
fn qemu_options(value: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = vec![Vec::new()];
    let mut index = 0;
    while index < value.len() {
        match (value[index], value.get(index + 1)) {
            (b',', Some(b',')) => {
                parts.last_mut().expect("one part").push(b',');
                index += 2;
            }
            (b',', _) => {
                parts.push(Vec::new());
                index += 1;
            }
            (byte, _) => {
                parts.last_mut().expect("one part").push(byte);
                index += 1;
            }
        }
    }
    parts
}

fn values_of<'a>(args: &'a [OsString], flag: &str) -> Vec<&'a [u8]> {
    args.windows(2).filter(|pair| pair[0] == flag).map(|pair| pair[1].as_bytes()).collect()
}

fn option<'a>(parts: &'a [Vec<u8>], key: &str) -> Option<&'a [u8]> {
    parts.iter().find_map(|part| part.strip_prefix(format!("{key}=").as_bytes()))
}

proptest! {
    #[test]
    fn plans_survive_both_mappings(plan in plan()) {
        plan.validate().expect("generated plans are valid");
        let args = qemu_args(&plan, Accel::Tcg, Path::new("/run/q.sock"));
        prop_assert_eq!(values_of(&args, "-kernel"), vec![plan.kernel.as_os_str().as_bytes()]);
        prop_assert_eq!(values_of(&args, "-append"), vec![plan.cmdline.as_bytes()]);
        let cpus = plan.cpus.to_string();
        prop_assert_eq!(values_of(&args, "-smp"), vec![cpus.as_bytes()]);
        let drives = values_of(&args, "-drive");
        prop_assert_eq!(drives.len(), plan.disks.len());
        for (drive, disk) in drives.iter().zip(&plan.disks) {
            let parts = qemu_options(drive);
            prop_assert_eq!(option(&parts, "file"), Some(disk.path.as_os_str().as_bytes()));
            let format: &[u8] = if disk.format == DiskFormat::Qcow2 { b"qcow2" } else { b"raw" };
            prop_assert_eq!(option(&parts, "format"), Some(format));
            prop_assert_eq!(option(&parts, "readonly").is_some(), disk.read_only);
            prop_assert_eq!(option(&parts, "cache.direct").is_some(), disk.direct);
        }
        let blk_devices: Vec<_> =
            values_of(&args, "-device").into_iter().filter(|d| d.starts_with(b"virtio-blk-pci")).collect();
        prop_assert_eq!(blk_devices.len(), plan.disks.len());
        for (device, disk) in blk_devices.iter().zip(&plan.disks) {
            let parts = qemu_options(device);
            prop_assert_eq!(option(&parts, "serial"), disk.serial.as_deref().map(str::as_bytes));
        }
        if let Console::File(serial) = &plan.serial {
            let chardev = qemu_options(values_of(&args, "-chardev")[0]);
            prop_assert_eq!(option(&chardev, "path"), Some(serial.as_os_str().as_bytes()));
        }
        let control_chardevs: Vec<Vec<Vec<u8>>> = values_of(&args, "-chardev")
            .into_iter()
            .map(qemu_options)
            .filter(|parts| option(parts, "id") == Some(b"control0"))
            .collect();
        let ports: Vec<Vec<Vec<u8>>> =
            values_of(&args, "-device").into_iter().filter(|d| d.starts_with(b"virtserialport")).map(qemu_options).collect();
        prop_assert_eq!(control_chardevs.len(), usize::from(plan.control.is_some()));
        prop_assert_eq!(ports.len(), usize::from(plan.control.is_some()));
        if let Some(control) = &plan.control {
            prop_assert_eq!(option(&control_chardevs[0], "path"), Some(control.socket.as_os_str().as_bytes()));
            prop_assert_eq!(option(&ports[0], "name"), Some(control.name.as_bytes()));
        }

        let config = ch_vm_config(&plan);
        prop_assert_eq!(config["cpus"]["boot_vcpus"].as_u64(), Some(u64::from(plan.cpus)));
        prop_assert_eq!(config["memory"]["size"].as_u64(), Some(plan.memory.mib << 20));
        prop_assert_eq!(config["payload"]["kernel"].as_str(), plan.kernel.to_str());
        prop_assert_eq!(config["payload"]["cmdline"].as_str(), Some(plan.cmdline.as_str()));
        let disks = config["disks"].as_array().map_or(0, Vec::len);
        prop_assert_eq!(disks, plan.disks.len());
        for (index, disk) in plan.disks.iter().enumerate() {
            prop_assert_eq!(config["disks"][index]["path"].as_str(), disk.path.to_str());
            prop_assert_eq!(config["disks"][index]["readonly"].as_bool(), Some(disk.read_only));
        }
    }
}

#[test]
fn non_utf8_paths_are_refused_by_name() {
    let kernel = PathBuf::from(<OsString as std::os::unix::ffi::OsStringExt>::from_vec(b"/k\xff".to_vec()));
    let err = VmPlan::new("vm", kernel, "").validate().expect_err("not UTF-8");
    assert_eq!(err.to_string(), "Invalid VM plan: `kernel` `/k\u{fffd}` is not valid UTF-8");
}
