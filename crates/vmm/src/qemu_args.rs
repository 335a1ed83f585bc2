//! `VmPlan` -> `qemu-system-x86_64` arguments. Pure.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use crate::plan::{Console, DiskFormat, VmPlan};

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation: slow, but runs anywhere.
    Tcg,
}

/// The arguments (after the binary) that run `plan` with QMP on `qmp_socket`.
/// QEMU starts paused (`-S`): the VM is *created*, and QMP `cont` boots it.
/// The plan should be validated.
pub fn qemu_args(plan: &VmPlan, accel: Accel, qmp_socket: &Path) -> Vec<OsString> {
    let mut args = Args::default();
    args.push(["-name", &plan.name]);
    args.push(["-S", "-no-user-config", "-nodefaults", "-no-reboot", "-nographic"]);
    // Keep the firmware off the serial console: SeaBIOS would otherwise
    // print its banner there and clear the screen of whoever follows it.
    args.push(["-fw_cfg", "name=etc/sercon-port,string=0"]);
    let mut machine = String::from("pc");
    match accel {
        Accel::Kvm => args.push(["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => args.push(["-accel", "tcg"]),
    }
    args.push(["-smp".to_owned(), plan.cpus.to_string()]);
    args.push(["-m".to_owned(), format!("{}M", plan.memory.mib)]);
    if plan.memory.shared || plan.memory.hugepages {
        let mut backend = format!("memory-backend-memfd,id=ram0,size={}M", plan.memory.mib);
        if plan.memory.shared {
            backend.push_str(",share=on");
        }
        if plan.memory.hugepages {
            backend.push_str(",hugetlb=on");
        }
        args.push(["-object".to_owned(), backend]);
        machine.push_str(",memory-backend=ram0");
    }
    args.push(["-machine".to_owned(), machine]);
    args.push_os("-kernel", plan.kernel.as_os_str().to_owned());
    if let Some(initramfs) = &plan.initramfs {
        args.push_os("-initrd", initramfs.as_os_str().to_owned());
    }
    args.push(["-append", &plan.cmdline]);
    args.push_os("-qmp", option("unix:", qmp_socket, ",server=on,wait=off"));
    if let Some(chardev) = chardev("serial0", &plan.serial) {
        args.push_os("-chardev", chardev);
        args.push(["-serial", "chardev:serial0"]);
    }
    let console = chardev("console0", &plan.console);
    if console.is_some() || plan.control.is_some() {
        // One virtio-serial device carries the console and the named ports.
        args.push(["-device", "virtio-serial-pci,id=vser0"]);
    }
    if let Some(chardev) = console {
        args.push_os("-chardev", chardev);
        args.push(["-device", "virtconsole,chardev=console0"]);
    }
    if let Some(port) = &plan.control {
        args.push_os("-chardev", option("socket,id=control0,path=", &port.socket, ",server=on,wait=off"));
        args.push(["-device".to_owned(), format!("virtserialport,bus=vser0.0,chardev=control0,name={}", port.name)]);
    }
    for (index, disk) in plan.disks.iter().enumerate() {
        let format = match disk.format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        };
        let mut tail = format!(",format={format},if=none,id=disk{index}");
        if disk.read_only {
            tail.push_str(",readonly=on");
        }
        if disk.direct {
            tail.push_str(",cache.direct=on");
        }
        args.push_os("-drive", option("file=", &disk.path, &tail));
        let serial = disk.serial.as_ref().map(|serial| format!(",serial={serial}")).unwrap_or_default();
        args.push(["-device".to_owned(), format!("virtio-blk-pci,drive=disk{index}{serial}")]);
    }
    for (index, network) in plan.networks.iter().enumerate() {
        args.push(["-netdev".to_owned(), format!("tap,id=net{index},ifname={},script=no,downscript=no", network.tap)]);
        args.push(["-device".to_owned(), format!("virtio-net-pci,netdev=net{index},mac={},romfile=", network.mac)]);
    }
    if plan.user_network {
        args.push(["-netdev", "user,id=usernet0", "-device", "virtio-net-pci,netdev=usernet0,romfile="]);
    }
    if let Some(vsock) = &plan.vsock {
        // QEMU's vsock is the host kernel's vhost-vsock: only the cid applies.
        args.push(["-device".to_owned(), format!("vhost-vsock-pci,guest-cid={}", vsock.cid)]);
    }
    if plan.entropy {
        args.push(["-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0"]);
    }
    for address in &plan.vfio {
        args.push(["-device".to_owned(), format!("vfio-pci,host={}", address.as_str())]);
    }
    args.0
}

fn chardev(id: &str, console: &Console) -> Option<OsString> {
    match console {
        Console::Off => None,
        Console::Pty => Some(format!("pty,id={id}").into()),
        Console::File(path) => Some(option(&format!("file,id={id},path="), path, "")),
        Console::Socket(path) => Some(option(&format!("socket,id={id},path="), path, ",server=on,wait=off")),
    }
}

/// `prefix` + `path` with QEMU's option escaping (`,` doubled) + `suffix`.
fn option(prefix: &str, path: &Path, suffix: &str) -> OsString {
    let mut bytes = prefix.as_bytes().to_vec();
    for &byte in path.as_os_str().as_bytes() {
        bytes.push(byte);
        if byte == b',' {
            bytes.push(b',');
        }
    }
    bytes.extend_from_slice(suffix.as_bytes());
    OsString::from_vec(bytes)
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push<S: AsRef<OsStr>>(&mut self, args: impl IntoIterator<Item = S>) {
        self.0.extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
    }

    fn push_os(&mut self, flag: &str, value: OsString) {
        self.0.push(flag.into());
        self.0.push(value);
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;
    use crate::plan::tests_support::full_plan;

    fn check(plan: &VmPlan, accel: Accel, expected: Expect) {
        let args = qemu_args(plan, accel, Path::new("/run/kiln/vm/qmp.sock"));
        // One option per line: flag and value together.
        let mut text = String::new();
        for arg in args {
            let arg = arg.to_string_lossy();
            if arg.starts_with('-') && !text.is_empty() {
                text.push('\n');
            } else if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(&arg);
        }
        expected.assert_eq(&text);
    }

    #[test]
    fn minimal_plan_under_tcg() {
        let plan = VmPlan::new("vm1", "/k/vmlinuz", "console=ttyS0 panic=-1");
        check(
            &plan,
            Accel::Tcg,
            expect![[r#"
                -name vm1
                -S
                -no-user-config
                -nodefaults
                -no-reboot
                -nographic
                -fw_cfg name=etc/sercon-port,string=0
                -accel tcg
                -smp 1
                -m 512M
                -machine pc
                -kernel /k/vmlinuz
                -append console=ttyS0 panic=-1
                -qmp unix:/run/kiln/vm/qmp.sock,server=on,wait=off"#]],
        );
    }

    #[test]
    fn a_user_mode_network_comes_after_the_taps() {
        let mut plan = full_plan();
        plan.user_network = true;
        let args: Vec<String> = qemu_args(&plan, Accel::Tcg, Path::new("/run/kiln/vm/qmp.sock"))
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        let tap = args.iter().position(|arg| arg.starts_with("tap,id=net0")).expect("the tap");
        let user = args.iter().position(|arg| arg == "user,id=usernet0").expect("the user-mode network");
        assert!(tap < user, "{args:?}");
        assert_eq!(
            args[user - 1..user + 3],
            ["-netdev", "user,id=usernet0", "-device", "virtio-net-pci,netdev=usernet0,romfile="]
        );
    }

    #[test]
    fn control_port_alone_gets_its_own_virtio_serial_device() {
        let mut plan = VmPlan::new("vm1", "/k/vmlinuz", "console=ttyS0");
        plan.control =
            Some(crate::SerialPort { name: "org.kiln.control".into(), socket: "/run/kiln/vm,1/control.sock".into() });
        let args = qemu_args(&plan, Accel::Tcg, Path::new("/run/kiln/vm/qmp.sock"));
        let tail: Vec<String> = args.iter().rev().take(6).rev().map(|a| a.to_string_lossy().into_owned()).collect();
        expect![[r#"
            [
                "-device",
                "virtio-serial-pci,id=vser0",
                "-chardev",
                "socket,id=control0,path=/run/kiln/vm,,1/control.sock,server=on,wait=off",
                "-device",
                "virtserialport,bus=vser0.0,chardev=control0,name=org.kiln.control",
            ]
        "#]]
        .assert_debug_eq(&tail);
    }

    #[test]
    fn full_plan_under_kvm() {
        check(
            &full_plan(),
            Accel::Kvm,
            expect![[r#"
                -name web-1
                -S
                -no-user-config
                -nodefaults
                -no-reboot
                -nographic
                -fw_cfg name=etc/sercon-port,string=0
                -accel kvm
                -cpu host
                -smp 2
                -m 1024M
                -object memory-backend-memfd,id=ram0,size=1024M,share=on,hugetlb=on
                -machine pc,memory-backend=ram0
                -kernel /var/lib/kiln/vmlinux
                -initrd /var/lib/kiln/initramfs.cpio.gz
                -append console=ttyS0 panic=-1 quiet
                -qmp unix:/run/kiln/vm/qmp.sock,server=on,wait=off
                -chardev file,id=serial0,path=/run/kiln/web-1/serial.log
                -serial chardev:serial0
                -device virtio-serial-pci,id=vser0
                -chardev pty,id=console0
                -device virtconsole,chardev=console0
                -chardev socket,id=control0,path=/run/kiln/web-1/control.sock,server=on,wait=off
                -device virtserialport,bus=vser0.0,chardev=control0,name=org.kiln.control
                -drive file=/vms/web-1/root.qcow2,format=qcow2,if=none,id=disk0,cache.direct=on
                -device virtio-blk-pci,drive=disk0,serial=kiln-data
                -drive file=/vms/web-1/seed,,1.img,format=raw,if=none,id=disk1,readonly=on
                -device virtio-blk-pci,drive=disk1
                -netdev tap,id=net0,ifname=kt-web-1,script=no,downscript=no
                -device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,romfile=
                -device vhost-vsock-pci,guest-cid=7
                -object rng-random,id=rng0,filename=/dev/urandom
                -device virtio-rng-pci,rng=rng0
                -device vfio-pci,host=0000:01:00.0"#]],
        );
    }
}
