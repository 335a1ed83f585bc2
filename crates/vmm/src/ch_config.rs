//! `VmPlan` -> cloud-hypervisor's `VmConfig` (the `vm.create` body). Pure.

use serde_json::{Value, json};

use crate::plan::{Console, DiskFormat, VmPlan};

/// The `vm.create` request body for `plan` (API 0.3.0; fields kiln leaves
/// out take cloud-hypervisor's defaults). The plan should be validated.
pub fn ch_vm_config(plan: &VmPlan) -> Value {
    let mut config = json!({
        "cpus": { "boot_vcpus": plan.cpus, "max_vcpus": plan.cpus },
        "memory": {
            "size": plan.memory.mib << 20,
            "shared": plan.memory.shared,
            "hugepages": plan.memory.hugepages,
        },
        "payload": { "kernel": plan.kernel, "cmdline": plan.cmdline },
        "serial": console(&plan.serial),
        "console": console(&plan.console),
    });
    if let Some(initramfs) = &plan.initramfs {
        config["payload"]["initramfs"] = json!(initramfs);
    }
    if !plan.disks.is_empty() {
        config["disks"] = plan
            .disks
            .iter()
            .map(|disk| {
                let mut config = json!({
                    "path": disk.path,
                    "readonly": disk.read_only,
                    "direct": disk.direct,
                    // Stated, never probed (see DiskFormat).
                    "image_type": match disk.format { DiskFormat::Raw => "Raw", DiskFormat::Qcow2 => "Qcow2" },
                });
                if let Some(serial) = &disk.serial {
                    config["serial"] = json!(serial);
                }
                config
            })
            .collect();
    }
    if !plan.networks.is_empty() {
        config["net"] = plan
            .networks
            .iter()
            .map(|network| {
                let mut net = json!({ "tap": network.tap, "mac": network.mac.to_string() });
                if let Some((address, prefix)) = network.host {
                    net["ip"] = json!(address.to_string());
                    net["mask"] = json!(netmask(prefix).to_string());
                }
                net
            })
            .collect();
    }
    if let Some(vsock) = &plan.vsock {
        config["vsock"] = json!({ "cid": vsock.cid, "socket": vsock.socket });
    }
    if plan.entropy {
        config["rng"] = json!({ "src": "/dev/urandom" });
    }
    if !plan.vfio.is_empty() {
        config["devices"] = plan
            .vfio
            .iter()
            .map(|address| json!({ "path": format!("/sys/bus/pci/devices/{}/", address.as_str()) }))
            .collect();
    }
    config
}

fn console(console: &Console) -> Value {
    match console {
        Console::Off => json!({ "mode": "Off" }),
        Console::Pty => json!({ "mode": "Pty" }),
        Console::File(path) => json!({ "mode": "File", "file": path }),
        Console::Socket(path) => json!({ "mode": "Socket", "socket": path }),
    }
}

pub(crate) fn netmask(prefix: u8) -> std::net::Ipv4Addr {
    let bits = u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0);
    std::net::Ipv4Addr::from(bits)
}

#[cfg(test)]
mod tests {
    use expect_test::expect;

    use super::*;
    use crate::plan::tests_support::full_plan;

    #[test]
    fn minimal_plan() {
        let plan = VmPlan::new("vm1", "/k/vmlinux", "console=hvc0");
        let json = serde_json::to_string(&ch_vm_config(&plan)).expect("serialises");
        expect![[r#"{"console":{"mode":"Off"},"cpus":{"boot_vcpus":1,"max_vcpus":1},"memory":{"hugepages":false,"shared":false,"size":536870912},"payload":{"cmdline":"console=hvc0","kernel":"/k/vmlinux"},"serial":{"mode":"Off"}}"#]].assert_eq(&json);
    }

    #[test]
    fn full_plan_maps_every_field() {
        let json = serde_json::to_string_pretty(&ch_vm_config(&full_plan())).expect("serialises");
        expect![[r#"
            {
              "console": {
                "mode": "Pty"
              },
              "cpus": {
                "boot_vcpus": 2,
                "max_vcpus": 2
              },
              "devices": [
                {
                  "path": "/sys/bus/pci/devices/0000:01:00.0/"
                }
              ],
              "disks": [
                {
                  "direct": true,
                  "image_type": "Qcow2",
                  "path": "/vms/web-1/root.qcow2",
                  "readonly": false,
                  "serial": "kiln-data"
                },
                {
                  "direct": false,
                  "image_type": "Raw",
                  "path": "/vms/web-1/seed,1.img",
                  "readonly": true
                }
              ],
              "memory": {
                "hugepages": true,
                "shared": true,
                "size": 1073741824
              },
              "net": [
                {
                  "ip": "10.0.0.1",
                  "mac": "52:54:00:12:34:56",
                  "mask": "255.255.255.252",
                  "tap": "kt-web-1"
                }
              ],
              "payload": {
                "cmdline": "console=ttyS0 panic=-1 quiet",
                "initramfs": "/var/lib/kiln/initramfs.cpio.gz",
                "kernel": "/var/lib/kiln/vmlinux"
              },
              "rng": {
                "src": "/dev/urandom"
              },
              "serial": {
                "file": "/run/kiln/web-1/serial.log",
                "mode": "File"
              },
              "vsock": {
                "cid": 7,
                "socket": "/run/kiln/web-1/vsock"
              }
            }"#]]
        .assert_eq(&json);
    }

    #[test]
    fn netmasks() {
        assert_eq!(netmask(30).to_string(), "255.255.255.252");
        assert_eq!(netmask(32).to_string(), "255.255.255.255");
        assert_eq!(netmask(1).to_string(), "128.0.0.0");
    }
}
