//! External tools that read what kiln writes without sharing its code:
//! `qemu-img` for qcow2 and GNU `cpio` for archives. Only exit codes and
//! `--output=json` are relied on, so Debian's qemu-utils 7.2 and the
//! backported 10.x both pass.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_testkit::{current_test_name, require_tool};

fn run(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"))
}

fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `qemu-img`, found for the running test (or `None` after a SKIPPED line).
#[derive(Debug)]
pub(crate) struct QemuImg(PathBuf);

impl QemuImg {
    pub(crate) fn find() -> Option<QemuImg> {
        require_tool(&current_test_name(), "qemu-img").map(QemuImg)
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.0);
        // Messages in English whatever the host says; nothing parses them anyway.
        command.env("LC_ALL", "C");
        command
    }

    /// `qemu-img check`: exit 0 means no corruptions and no leaks.
    pub(crate) fn check(&self, image: &Path) {
        let output = run(self.command().args(["check", "-f", "qcow2"]).arg(image));
        assert!(output.status.success(), "qemu-img check {}: {}", image.display(), describe(&output));
    }

    /// `qemu-img info --output=json` of a qcow2 image.
    pub(crate) fn info(&self, image: &Path) -> serde_json::Value {
        let output = run(self.command().args(["info", "--output=json", "-f", "qcow2"]).arg(image));
        assert!(output.status.success(), "qemu-img info {}: {}", image.display(), describe(&output));
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// Checks a qcow2 image and that QEMU sees exactly `virtual_size`;
    /// returns `qemu-img info`.
    pub(crate) fn assert_valid(&self, image: &Path, virtual_size: u64) -> serde_json::Value {
        self.check(image);
        let info = self.info(image);
        assert_eq!(info["format"], "qcow2", "{info}");
        assert_eq!(info["virtual-size"], virtual_size, "virtual size of {}: {info}", image.display());
        info
    }

    /// Whether `qemu-img compare` finds the raw image and the qcow2 image
    /// identical (exit 0) or different (exit 1); anything else fails the test.
    pub(crate) fn same_content(&self, raw: &Path, qcow2: &Path) -> bool {
        let output = run(self.command().args(["compare", "-f", "raw", "-F", "qcow2"]).arg(raw).arg(qcow2));
        match output.status.code() {
            Some(0) => true,
            Some(1) => false,
            _ => panic!("qemu-img compare {} {}: {}", raw.display(), qcow2.display(), describe(&output)),
        }
    }

    /// `qemu-img convert -O raw`.
    pub(crate) fn convert_to_raw(&self, qcow2: &Path, raw: &Path) {
        let output = run(self.command().args(["convert", "-f", "qcow2", "-O", "raw"]).arg(qcow2).arg(raw));
        assert!(output.status.success(), "qemu-img convert {}: {}", qcow2.display(), describe(&output));
    }

    /// Runs `qemu-img` with `args`, which must succeed.
    pub(crate) fn run_ok(&self, args: &[&std::ffi::OsStr]) {
        let output = run(self.command().args(args));
        assert!(output.status.success(), "qemu-img {args:?}: {}", describe(&output));
    }

    /// Guest clusters holding data in the image itself (not its backing
    /// file), from `qemu-img map --output=json`.
    pub(crate) fn data_clusters(&self, image: &Path, cluster_size: u64) -> u64 {
        let output = run(self.command().args(["map", "--output=json", "-f", "qcow2"]).arg(image));
        assert!(output.status.success(), "qemu-img map {}: {}", image.display(), describe(&output));
        let map: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let bytes: u64 = map
            .as_array()
            .unwrap()
            .iter()
            .filter(|range| range["data"] == true && range["depth"] == 0)
            .map(|range| range["length"].as_u64().unwrap())
            .sum();
        bytes.div_ceil(cluster_size)
    }
}

/// GNU `cpio`, found for the running test.
#[derive(Debug)]
pub(crate) struct Cpio(PathBuf);

impl Cpio {
    pub(crate) fn find() -> Option<Cpio> {
        require_tool(&current_test_name(), "cpio").map(Cpio)
    }

    fn run_with_input(&self, args: &[&str], dir: &Path, archive: &[u8]) -> Output {
        let mut child = Command::new(&self.0)
            .args(args)
            .current_dir(dir)
            .env("LC_ALL", "C")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // cpio may stop reading early on a bad archive; its exit status tells.
        let _ = child.stdin.take().unwrap().write_all(archive);
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "cpio {args:?}: {}", describe(&output));
        output
    }

    /// `cpio -t`: the names in an uncompressed archive, one per line.
    pub(crate) fn list(&self, archive: &[u8]) -> Vec<String> {
        let scratch = tempfile::tempdir().unwrap();
        let output = self.run_with_input(&["-t", "--quiet"], scratch.path(), archive);
        String::from_utf8(output.stdout).unwrap().lines().map(str::to_owned).collect()
    }

    /// `cpio -idm` into the empty directory `into`.
    pub(crate) fn extract(&self, archive: &[u8], into: &Path) {
        self.run_with_input(&["-idm", "--quiet"], into, archive);
    }

    /// `cpio -o -H newc` of `dir`'s contents, listed by `find` order.
    pub(crate) fn create(&self, dir: &Path, names: &[String]) -> Vec<u8> {
        let mut input = names.join("\n");
        input.push('\n');
        let mut child = Command::new(&self.0)
            .args(["-o", "-H", "newc", "--quiet"])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "cpio -o: {}", describe(&output));
        output.stdout
    }
}

/// A small, seedable generator (xorshift64*): test data that is the same
/// on every run without a dependency.
#[derive(Debug, Clone)]
pub(crate) struct Noise(u64);

impl Noise {
    pub(crate) fn new(seed: u64) -> Noise {
        Noise(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Writes `data` at `offset` in `path`, which must exist.
pub(crate) fn patch(path: &Path, offset: u64, data: &[u8]) {
    File::options().write(true).open(path).unwrap().write_all_at(data, offset).unwrap();
}
