//! Debian packages the test suite needs, installed with one `apt-get` call.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Packages `cargo xtask test` needs, as groups that are always installed
/// together: if any package of a group is missing, the whole group goes into
/// the (single) `apt-get install`. That matters for QEMU on Debian 12, where
/// installing `qemu-system-x86` alone replaces a backported `qemu-utils`; the
/// group `&["qemu-system-x86", "qemu-utils"]` keeps the two in step.
pub(crate) const TEST_PACKAGES: &[&[&str]] = &[
    // fsck.fat and mkfs.fat: the interop checks on every image.
    &["dosfstools"],
    // mdir, mcopy: read images back without mounting.
    &["mtools"],
    // cpio -t / -idm: read initramfs archives back.
    &["cpio"],
    // qemu-img check / info / compare / convert: the qcow2 interop checks.
    &["qemu-utils"],
    // libFuzzer (built by libfuzzer-sys for `cargo fuzz`) is C++.
    &["g++"],
    // nft: kiln-net's firewall rules, applied inside test namespaces.
    &["nftables"],
    // ip netns / ip link (veth pairs): kiln-net's namespace tests.
    &["iproute2"],
    // python3 -m venv: the venv xtask pip-installs kubernetes-validate into (kiln-k8s).
    &["python3-venv"],
];

/// Makes sure every package in `groups` is installed. As root, installs the
/// missing ones; otherwise fails with the exact command to run.
pub(crate) fn ensure_installed(groups: &[&[&str]]) -> Result<()> {
    let missing = missing_packages(groups)?;
    if missing.is_empty() {
        println!("all installed: {}", groups.concat().join(" "));
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "missing Debian packages: {list}\ninstall them with:\n    sudo apt-get install -y --no-install-recommends {list}"
        );
    }
    println!("missing: {list}; installing");
    crate::run_command(Command::new("apt-get").arg("update"))?;
    crate::run_command(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )?;
    let still_missing = missing_packages(groups)?;
    if !still_missing.is_empty() {
        bail!("apt-get succeeded but these are still not installed: {}", still_missing.join(" "));
    }
    Ok(())
}

/// Every package of every group that has at least one package missing.
fn missing_packages(groups: &[&[&str]]) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for group in groups {
        let mut group_complete = true;
        for package in *group {
            group_complete &= is_installed(package)?;
        }
        if !group_complete {
            missing.extend(group.iter().map(|package| package.to_string()));
        }
    }
    Ok(missing)
}

fn is_installed(package: &str) -> Result<bool> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("cannot run dpkg-query: `cargo xtask test` needs a Debian-based system")?;
    // Unknown packages make dpkg-query exit 1 with nothing on stdout: not installed.
    Ok(output.status.success() && output.stdout == b"install ok installed")
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::missing_packages;

    #[test]
    fn a_group_with_a_missing_package_is_installed_whole() {
        // dpkg is installed on every Debian system; the other name cannot exist.
        let groups: &[&[&str]] = &[&["dpkg"], &["dpkg", "kiln-no-such-package"]];
        let missing = missing_packages(groups).expect("dpkg-query runs");
        assert_eq!(missing, ["dpkg", "kiln-no-such-package"]);
        assert!(missing_packages(&[&["dpkg"]]).expect("dpkg-query runs").is_empty());
    }
}
