//! Shared helpers: short run directories, busybox initramfs images, waits.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_imagefmt::{Compression, CpioArchive};

/// A fresh directory under /tmp with a short name, so socket paths fit `sun_path`.
pub(crate) fn run_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("kvm-").tempdir_in("/tmp").expect("create a run directory in /tmp")
}

/// An initramfs whose `/init` is `script` run by Debian's static busybox
/// (`busybox-static`), with `/dev/console` so init has a stdout.
pub(crate) fn busybox_initramfs(busybox: &Path, dir: &Path, script: &str) -> PathBuf {
    let mut archive = CpioArchive::new();
    archive.add_dir("bin", 0o755).expect("bin");
    archive.add_dir("dev", 0o755).expect("dev");
    archive.add_char_device("dev/console", 0o600, 5, 1).expect("console");
    archive.add_file_from_path("bin/busybox", busybox, 0o755).expect("busybox");
    archive.add_symlink("bin/sh", "busybox").expect("sh");
    archive.add_file_from_bytes("init", format!("#!/bin/busybox sh\n{script}"), 0o755).expect("init");
    let path = dir.join("initramfs.cpio.gz");
    archive.write_file(&path, Compression::Gzip, 0).expect("write the initramfs");
    path
}

/// Polls `done` every 50 ms until it returns `Some` or `timeout` passes.
pub(crate) fn wait_for<T>(what: &str, timeout: Duration, mut done: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = done() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether process `pid` exists (a zombie counts).
pub(crate) fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether process `pid` has exited: gone, or a zombie not yet reaped.
pub(crate) fn process_has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}
