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
    // qemu-system-x86_64 boots guests under TCG (kiln-vmm's and the guest's
    // boot tests); qemu-img check / info / compare / convert: the qcow2
    // interop checks. One group, installed pinned to the release, so
    // Debian 12's qemu-system-x86 and qemu-utils stay the same version.
    &["qemu-system-x86", "qemu-utils"],
    // A static busybox: /init of kiln-vmm's tiny test initramfs, and
    // /bin/busybox in the guest (`sh` for /srv/launch; `cargo xtask guest`
    // copies it).
    &["busybox-static"],
    // e2fsck -fn: the boot tests check the guest left its data disk clean.
    &["e2fsprogs"],
    // libFuzzer (built by libfuzzer-sys for `cargo fuzz`) is C++.
    &["g++"],
    // nft: kiln-net's firewall rules, applied inside test namespaces.
    &["nftables"],
    // ip netns / ip link (veth pairs): kiln-net's namespace tests.
    &["iproute2"],
    // umoci (init/new/unpack/repack/config) and skopeo (copy to oci-archive,
    // docker-archive, zstd layers): kiln-oci's test images, made by
    // third-party tools, never by kiln; umoci also makes the images of the
    // container boot tests (tests/it/oci_guest.rs), kiln's `image oci` and
    // `run` tests (tests/it/cli_oci.rs) and the layer tests' reference
    // (`umoci unpack`).
    &["umoci"],
    &["skopeo"],
    // docker-registry (the distribution reference server) serves kiln-oci's
    // registry tests on 127.0.0.1; openssl makes their throwaway CA and certificates.
    &["docker-registry"],
    &["openssl"],
    // htpasswd -B: the bcrypt password file of the registry tests' Basic-auth registry.
    &["apache2-utils"],
    // python3 -m venv: the venv xtask pip-installs kubernetes-validate into (kiln-k8s).
    &["python3-venv"],
    // debootstrap: the Debian 12 rootfs the Debian-based OCI test images
    // and `cargo xtask bench oci` start from (kiln-testkit's debian_rootfs),
    // with the archive keyring it checks the mirror's Release file against.
    &["debootstrap", "debian-archive-keyring"],
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
            "missing Debian packages: {list}\ninstall them with:\n    sudo apt-get install -y --no-install-recommends --allow-downgrades {list}"
        );
    }
    println!("missing: {list}; installing");
    crate::run_command(Command::new("apt-get").arg("update"))?;
    crate::run_command(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends", "--allow-downgrades"])
            .args(&missing),
    )?;
    let still_missing = missing_packages(groups)?;
    if !still_missing.is_empty() {
        bail!("apt-get succeeded but these are still not installed: {}", still_missing.join(" "));
    }
    Ok(())
}

/// Every package of every group that has at least one package missing. The
/// packages of a group of several are pinned to the distribution's release
/// (`qemu-utils/bookworm`): a machine may carry a newer, backported
/// `qemu-utils` that the release's `qemu-system-x86` refuses to sit beside,
/// and apt keeps the newer one unless told (hence `--allow-downgrades`).
fn missing_packages(groups: &[&[&str]]) -> Result<Vec<String>> {
    let codename = release_codename();
    let mut missing = Vec::new();
    for group in groups {
        let mut group_complete = true;
        for package in *group {
            group_complete &= is_installed(package)?;
        }
        if !group_complete {
            missing.extend(group.iter().map(|package| match (&codename, group.len()) {
                (Some(codename), 2..) => format!("{package}/{codename}"),
                _ => package.to_string(),
            }));
        }
    }
    Ok(missing)
}

/// `VERSION_CODENAME` from /etc/os-release (`bookworm`).
fn release_codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("VERSION_CODENAME="))
        .map(|value| value.trim_matches('"').to_owned())
        .filter(|value| !value.is_empty())
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
        let pin = super::release_codename().map(|c| format!("/{c}")).unwrap_or_default();
        assert_eq!(missing, [format!("dpkg{pin}"), format!("kiln-no-such-package{pin}")]);
        assert!(missing_packages(&[&["dpkg"]]).expect("dpkg-query runs").is_empty());
    }
}
