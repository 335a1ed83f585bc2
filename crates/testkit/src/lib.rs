//! kiln-testkit: test support shared by kiln's crates. It finds the
//! external tools interop tests need, enforces the suite's rule about them,
//! and reads FAT images back three independent ways (`fsck.fat`, mtools and
//! the `fatfs` crate) as trees to compare, and checks Kubernetes manifests
//! against the OpenAPI schema with `kubernetes-validate`, and builds the
//! Debian root filesystem (`debootstrap`) the OCI test images start from. It is a dev-dependency only and
//! never part of a shipped binary.
//!
//! The rule: under `cargo xtask test` (which sets `KILN_REQUIRE_TOOLS=1`) a
//! missing tool fails the test. Under a bare `cargo test` the test prints
//! that it skipped and passes.

mod debian;
mod fat;
mod k8s;

pub use debian::{debian_rootfs, debian_rootfs_with};
pub use fat::{
    Entry, FatDateTime, FatfsView, Tree, as_mtools_names, fsck_fat_clean, inspect_fat_with_fatfs, mdir_listing,
    mtools_extract, mtools_label, read_fat_file_with_fatfs, read_fat_with_fatfs, read_fat_with_mtools, read_tree,
    tree_diff,
};
pub use k8s::{assert_k8s_valid, fake_apiserver, kubernetes_validate};

use std::env;
use std::path::PathBuf;

/// The environment variable `cargo xtask test` sets to make missing tools fatal.
pub const REQUIRE_TOOLS_ENV: &str = "KILN_REQUIRE_TOOLS";

/// Whether missing tools must fail tests rather than skip them.
pub fn tools_required() -> bool {
    env::var_os(REQUIRE_TOOLS_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Finds `tool` on `PATH` (or as given, if it contains a `/`): kiln-vmm's
/// lookup, the one every kiln crate uses.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    kiln_vmm::find_on_path(tool)
}

/// Returns the path of `tool` for test `test`, or `None` after printing
/// `SKIPPED: ...` when the tool is missing and tools are not required.
///
/// # Panics
/// When the tool is missing and [`tools_required`] is true.
pub fn require_tool(test: &str, tool: &str) -> Option<PathBuf> {
    if let Some(found) = find_tool(tool) {
        return Some(found);
    }
    assert!(
        !tools_required(),
        "{test}: required tool `{tool}` is not installed ({REQUIRE_TOOLS_ENV} is set; `cargo xtask test` installs it)"
    );
    report_skip(&format!("{test}: `{tool}` not found on PATH"));
    None
}

/// The name of the running test: libtest names each test's thread after
/// it, so helpers can report which test skipped without being told.
pub fn current_test_name() -> String {
    std::thread::current().name().unwrap_or("<unnamed test>").to_owned()
}

/// Prints `SKIPPED: <reason>` where a person running the tests sees it.
/// `eprintln!` would be swallowed by the test harness's output capture for
/// a passing test; a direct write to the stderr handle is not captured.
pub fn report_skip(reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
}

/// Like [`require_tool`] for several tools at once: `Some(paths)` only if all are present.
pub fn require_tools(test: &str, tools: &[&str]) -> Option<Vec<PathBuf>> {
    tools.iter().map(|tool| require_tool(test, tool)).collect()
}

/// Whether root-only test `test` may run: `true` as root. Otherwise it
/// prints `SKIPPED: <test>: needs root for <why>` and returns `false`.
///
/// # Panics
/// When not root and [`tools_required`] is true: under `cargo xtask test`
/// a test that cannot run fails, like a missing tool.
pub fn require_root(test: &str, why: &str) -> bool {
    match root_verdict(is_root(), tools_required()) {
        RootVerdict::Run => true,
        RootVerdict::Fail => panic!(
            "{test}: needs root for {why} ({REQUIRE_TOOLS_ENV} is set; run the suite as root, as `cargo xtask test` expects)"
        ),
        RootVerdict::Skip => {
            report_skip(&format!("{test}: needs root for {why}"));
            false
        }
    }
}

/// What [`require_root`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RootVerdict {
    Run,
    Skip,
    Fail,
}

fn root_verdict(root: bool, required: bool) -> RootVerdict {
    match (root, required) {
        (true, _) => RootVerdict::Run,
        (false, true) => RootVerdict::Fail,
        (false, false) => RootVerdict::Skip,
    }
}

/// Whether the test runs as root, for tests that need it (namespaces,
/// loop devices). Tests call [`require_root`], which enforces the rule.
pub fn is_root() -> bool {
    // /proc/self/status avoids a libc dependency: "Uid:\t<real>\t<effective>...".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:").map(|rest| rest.split_whitespace().nth(1) == Some("0")))
        })
        .unwrap_or(false)
}

/// The environment variable naming the directory `cargo xtask guest` wrote
/// (`cargo xtask test` sets it to the absolute path of `target/guest`);
/// kiln-guest owns it.
pub use kiln_guest::GUEST_DIR_ENV;

/// The guest files `cargo xtask guest` writes, for tests that boot a VM.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    /// The directory holding them.
    pub dir: PathBuf,
    /// The kernel as a bzImage, for QEMU's `-kernel`.
    pub bzimage: PathBuf,
    /// The uncompressed ELF kernel, for cloud-hypervisor's PVH boot.
    pub vmlinux: PathBuf,
    /// kiln's initramfs: `kiln-init` and the modules the guest loads.
    pub initramfs: PathBuf,
}

/// The guest files for test `test`, or `None` after printing `SKIPPED: ...`
/// when [`GUEST_DIR_ENV`] is unset and tools are not required. Only the
/// files a test asks for in `needs` (`"bzimage"`, `"vmlinux"`,
/// `"initramfs"`) must exist.
///
/// # Panics
/// When the directory or a needed file is missing and [`tools_required`] is true.
pub fn guest_assets(test: &str, needs: &[&str]) -> Option<GuestAssets> {
    let missing = |what: String| {
        assert!(
            !tools_required(),
            "{test}: {what} ({REQUIRE_TOOLS_ENV} is set; `cargo xtask test` builds the guest and sets {GUEST_DIR_ENV})"
        );
        report_skip(&format!("{test}: {what}; run `cargo xtask guest` and set {GUEST_DIR_ENV}"));
        None
    };
    let Some(dir) = env::var_os(GUEST_DIR_ENV).map(PathBuf::from) else {
        return missing(format!("{GUEST_DIR_ENV} is not set"));
    };
    let assets = GuestAssets {
        bzimage: dir.join("vmlinuz"),
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio.gz"),
        dir,
    };
    for need in needs {
        let path = match *need {
            "bzimage" => &assets.bzimage,
            "vmlinux" => &assets.vmlinux,
            "initramfs" => &assets.initramfs,
            other => panic!("{test}: unknown guest asset `{other}`"),
        };
        if !path.is_file() {
            return missing(format!("guest file {} does not exist", path.display()));
        }
    }
    Some(assets)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn require_root_fails_when_required_skips_otherwise() {
        assert_eq!(root_verdict(true, true), RootVerdict::Run);
        assert_eq!(root_verdict(true, false), RootVerdict::Run);
        assert_eq!(root_verdict(false, true), RootVerdict::Fail);
        assert_eq!(root_verdict(false, false), RootVerdict::Skip);
    }

    /// Only does something when the test below starts it as `nobody`.
    #[test]
    fn require_root_child_probe() {
        if env::var_os("KILN_TESTKIT_ROOT_PROBE").is_some() {
            assert!(!is_root(), "the probe runs unprivileged");
            assert!(!require_root("probe", "a namespace"), "skipped, not run");
            println!("probe: went on after SKIPPED");
        }
    }

    /// The real thing, not just the decision: this test binary, re-run as
    /// `nobody` via `setpriv`, fails under KILN_REQUIRE_TOOLS=1 and skips
    /// without it.
    #[test]
    fn require_root_fails_unprivileged_under_require_tools() {
        let test = current_test_name();
        if !require_root(&test, "setpriv to drop to nobody") {
            return;
        }
        let Some(setpriv) = require_tool(&test, "setpriv") else { return };
        // A copy nobody can reach: the build directory may be private.
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("testkit-tests");
        std::fs::copy(env::current_exe().unwrap(), &binary).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let run = |required: &str| {
            std::process::Command::new(&setpriv)
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&binary)
                .args(["--exact", "tests::require_root_child_probe", "--nocapture", "--test-threads=1"])
                .env("KILN_TESTKIT_ROOT_PROBE", "1")
                .env(REQUIRE_TOOLS_ENV, required)
                .output()
                .unwrap()
        };
        let required = run("1");
        let stderr = String::from_utf8_lossy(&required.stderr);
        let stdout = String::from_utf8_lossy(&required.stdout);
        assert!(!required.status.success(), "passed unprivileged under {REQUIRE_TOOLS_ENV}=1:\n{stdout}\n{stderr}");
        assert!(stderr.contains("probe: needs root for a namespace"), "{stderr}");
        let relaxed = run("");
        let stderr = String::from_utf8_lossy(&relaxed.stderr);
        let stdout = String::from_utf8_lossy(&relaxed.stdout);
        assert!(relaxed.status.success(), "{stdout}\n{stderr}");
        assert!(stderr.contains("SKIPPED: probe: needs root for a namespace"), "{stderr}");
        assert!(stdout.contains("probe: went on after SKIPPED"), "{stdout}");
    }
}
