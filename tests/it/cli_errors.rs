//! Bad input: one clear error naming the thing at fault, a non-zero exit,
//! and nothing left in the output directory (no image, no temp file).

use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::{assert_clean_failure, kiln};

/// A source directory and an empty output directory.
struct Fixture {
    _dir: tempfile::TempDir,
    src: PathBuf,
    out: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let out = dir.path().join("out");
        fs::create_dir(&src).unwrap();
        fs::create_dir(&out).unwrap();
        fs::write(src.join("ok.txt"), b"fine\n").unwrap();
        Fixture { _dir: dir, src, out }
    }

    fn image(&self) -> PathBuf {
        self.out.join("disk.img")
    }

    /// `kiln image fat -o OUT <extra...>`
    fn fat(&self, extra: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
        let mut args: Vec<OsString> = vec!["image".into(), "fat".into(), "-o".into(), self.image().into()];
        args.extend(extra.iter().map(|arg| arg.as_ref().to_owned()));
        kiln(args)
    }

    fn service_disk(&self, extra: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
        let binary = self.src.join("ok.txt");
        let mut args: Vec<OsString> = vec![
            "image".into(),
            "service-disk".into(),
            "-o".into(),
            self.image().into(),
            "--binary".into(),
            binary.into(),
        ];
        args.extend(extra.iter().map(|arg| arg.as_ref().to_owned()));
        kiln(args)
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn missing_source() {
    let fx = Fixture::new();
    let missing = fx.src.join("no-such-dir");
    let output = fx.fat(&[&missing]);
    assert_clean_failure(&output, 1, &display(&missing), &fx.out);
    assert!(String::from_utf8_lossy(&output.stderr).contains("No such file"), "the cause is printed");

    let output = fx.fat(&[&format!("etc={}", missing.display())]);
    assert_clean_failure(&output, 1, &display(&missing), &fx.out);
}

/// Runs `kiln image fat -o OUT SRC` as a user that mode 000 keeps out.
/// Root reads anything, so as root the run drops to `nobody` with
/// `setpriv` (from a copy of the binary that user can reach); without
/// setpriv the test is skipped.
fn fat_unprivileged(fx: &Fixture, test: &str) -> Option<Output> {
    if !kiln_testkit::is_root() {
        return Some(fx.fat(&[&fx.src]));
    }
    let setpriv = kiln_testkit::require_tool(test, "setpriv")?;
    let root = fx.src.parent().unwrap();
    let binary = root.join("kiln");
    fs::copy(env!("CARGO_BIN_EXE_kiln"), &binary).unwrap();
    for (path, mode) in [(root, 0o755), (fx.src.as_path(), 0o755), (fx.out.as_path(), 0o777)] {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }
    let run = || {
        Command::new(&setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&binary)
            .args(["image".as_ref(), "fat".as_ref(), "-o".as_ref(), fx.image().as_os_str(), fx.src.as_os_str()])
            .env_remove("SOURCE_DATE_EPOCH")
            .output()
            .unwrap()
    };
    // Another test's child, forked while the copy was open for writing, may
    // still hold it until it execs: the kernel then refuses to run the copy.
    let mut output = run();
    for _ in 0..20 {
        if !String::from_utf8_lossy(&output.stderr).contains("Text file busy") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        output = run();
    }
    Some(output)
}

#[test]
fn unreadable_file() {
    let fx = Fixture::new();
    let secret = fx.src.join("locked.key");
    fs::write(&secret, b"x").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
    let Some(output) = fat_unprivileged(&fx, "cli_errors::unreadable_file") else {
        return;
    };
    assert_clean_failure(&output, 1, &display(&secret), &fx.out);
    assert!(String::from_utf8_lossy(&output.stderr).contains("Permission denied"));
}

#[test]
fn unreadable_directory() {
    let fx = Fixture::new();
    let locked = fx.src.join("locked");
    fs::create_dir(&locked).unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let Some(output) = fat_unprivileged(&fx, "cli_errors::unreadable_directory") else {
        return;
    };
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();
    assert_clean_failure(&output, 1, &display(&locked), &fx.out);
    assert!(String::from_utf8_lossy(&output.stderr).contains("Permission denied"));
}

#[test]
fn name_invalid_for_fat() {
    let fx = Fixture::new();
    fs::write(fx.src.join("a:b"), b"colon").unwrap();
    let output = fx.fat(&[&fx.src]);
    assert_clean_failure(&output, 1, "a:b", &fx.out);

    let fx = Fixture::new();
    fs::write(fx.src.join("trailing."), b"dot").unwrap();
    assert_clean_failure(&fx.fat(&[&fx.src]), 1, "trailing.", &fx.out);

    // FAT ignores case: two names differing only in case cannot coexist.
    let fx = Fixture::new();
    fs::write(fx.src.join("README"), b"1").unwrap();
    fs::write(fx.src.join("readme"), b"2").unwrap();
    assert_clean_failure(&fx.fat(&[&fx.src]), 1, "readme", &fx.out);
}

#[test]
fn destination_escaping_the_root() {
    let fx = Fixture::new();
    let output = fx.fat(&[&format!("../evil={}", fx.src.join("ok.txt").display())]);
    assert_clean_failure(&output, 1, "../evil", &fx.out);
}

#[test]
fn content_larger_than_size() {
    let fx = Fixture::new();
    fs::write(fx.src.join("big.bin"), vec![0xa5; 2 << 20]).unwrap();
    let output = fx.fat(&[&"--size", &"1MiB", &fx.src]);
    assert_clean_failure(&output, 1, "1048576", &fx.out);
}

#[test]
fn file_over_4_gib() {
    let fx = Fixture::new();
    let huge = fx.src.join("huge.bin");
    // Sparse: no data is written, but the length is one past FAT's limit.
    File::create(&huge).unwrap().set_len(4 << 30).unwrap();
    let output = fx.fat(&[&fx.src]);
    assert_clean_failure(&output, 1, &display(&huge), &fx.out);
    assert!(String::from_utf8_lossy(&output.stderr).contains("4294967296"));
}

#[test]
fn symlink_loops() {
    let fx = Fixture::new();
    symlink("loop", fx.src.join("loop")).unwrap();
    assert_clean_failure(&fx.fat(&[&fx.src]), 1, &display(&fx.src.join("loop")), &fx.out);

    let fx = Fixture::new();
    let sub = fx.src.join("sub");
    fs::create_dir(&sub).unwrap();
    symlink("..", sub.join("up")).unwrap();
    assert_clean_failure(&fx.fat(&[&fx.src]), 1, &display(&sub.join("up")), &fx.out);

    // A loop given directly as SRC.
    let fx = Fixture::new();
    symlink("self", fx.src.join("self")).unwrap();
    assert_clean_failure(&fx.fat(&[&fx.src.join("self")]), 1, &display(&fx.src.join("self")), &fx.out);
}

#[test]
fn socket_in_tree() {
    let fx = Fixture::new();
    let socket = fx.src.join("control.sock");
    let _listener = UnixListener::bind(&socket).unwrap();
    let output = fx.fat(&[&fx.src]);
    assert_clean_failure(&output, 1, &display(&socket), &fx.out);
    assert!(String::from_utf8_lossy(&output.stderr).contains("socket"));
}

#[test]
fn fifo_in_tree() {
    let Some(mkfifo) = kiln_testkit::require_tool("cli_errors::fifo_in_tree", "mkfifo") else {
        return;
    };
    let fx = Fixture::new();
    let fifo = fx.src.join("pipe");
    assert!(Command::new(mkfifo).arg(&fifo).status().unwrap().success());
    let output = fx.fat(&[&fx.src]);
    assert_clean_failure(&output, 1, &display(&fifo), &fx.out);
    assert!(String::from_utf8_lossy(&output.stderr).contains("pipe"));
}

#[test]
fn device_in_tree() {
    let fx = Fixture::new();
    let output = fx.fat(&[&"null=/dev/null"]);
    assert_clean_failure(&output, 1, "/dev/null", &fx.out);
    assert!(String::from_utf8_lossy(&output.stderr).contains("character device"));
}

#[test]
fn label_too_long() {
    let fx = Fixture::new();
    let output = fx.fat(&[&"--label", &"LABEL_TOO_LONG", &fx.src]);
    assert_clean_failure(&output, 1, "LABEL_TOO_LONG", &fx.out);
}

#[test]
fn bad_fat_type_is_a_usage_error() {
    let fx = Fixture::new();
    let output = fx.fat(&[&"--fat-type", &"13", &fx.src]);
    assert_clean_failure(&output, 2, "13", &fx.out);
}

#[test]
fn impossible_fat_type() {
    let fx = Fixture::new();
    let output = fx.fat(&[&"--fat-type", &"32", &"--size", &"1MiB", &fx.src]);
    assert_clean_failure(&output, 1, "FAT32", &fx.out);
}

#[test]
fn bad_size_is_a_usage_error() {
    let fx = Fixture::new();
    for size in ["12XB", "lots", "1.5GiB", "99999999999999999999"] {
        let output = fx.fat(&[&"--size", &size, &fx.src]);
        assert_clean_failure(&output, 2, size, &fx.out);
    }
}

#[test]
fn existing_image_survives_a_failed_build() {
    let fx = Fixture::new();
    fs::write(fx.image(), b"previous image").unwrap();
    let missing = fx.src.join("gone");
    let output = fx.fat(&[&missing]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(fs::read(fx.image()).unwrap(), b"previous image");
    assert_eq!(fs::read_dir(&fx.out).unwrap().count(), 1, "no temp file next to the image");
}

#[test]
fn service_disk_bad_inputs() {
    let fx = Fixture::new();
    let keys = fx.src.join("keys");
    fs::create_dir(&keys).unwrap();

    assert_clean_failure(&fx.service_disk(&[&"--env", &"1BAD=x"]), 1, "1BAD", &fx.out);
    assert_clean_failure(&fx.service_disk(&[&"--env", &"A=1", &"--env", &"A=2"]), 1, "A is given twice", &fx.out);
    assert_clean_failure(&fx.service_disk(&[&"--env", &"NOVALUE"]), 2, "NOVALUE", &fx.out);
    let tree = |name: &str| format!("{name}={}", keys.display());
    assert_clean_failure(&fx.service_disk(&[&"--tree", &tree("..")]), 1, "\"..\"", &fx.out);
    assert_clean_failure(&fx.service_disk(&[&"--tree", &tree("a/b")]), 1, "a/b", &fx.out);
    assert_clean_failure(&fx.service_disk(&[&"--secret-tree", &tree("launch")]), 1, "launch", &fx.out);
    assert_clean_failure(&fx.service_disk(&[&"--tree", &tree("k"), &"--secret-tree", &tree("K")]), 1, "\"K\"", &fx.out);
    let file_tree = format!("keystore={}", fx.src.join("ok.txt").display());
    assert_clean_failure(&fx.service_disk(&[&"--tree", &file_tree]), 1, "ok.txt", &fx.out);
    let missing_tree = format!("keystore={}", fx.src.join("missing").display());
    assert_clean_failure(&fx.service_disk(&[&"--tree", &missing_tree]), 1, "missing", &fx.out);

    let missing_binary = fx.src.join("no-binary");
    let output = kiln([
        "image".as_ref(),
        "service-disk".as_ref(),
        "-o".as_ref(),
        fx.image().as_os_str(),
        "--binary".as_ref(),
        missing_binary.as_os_str(),
    ]);
    assert_clean_failure(&output, 1, &display(&missing_binary), &fx.out);
}

#[test]
fn cidata_bad_inputs() {
    let fx = Fixture::new();
    let present = fx.src.join("ok.txt");
    let missing = fx.src.join("no-user-data");
    let output = kiln([
        "image".as_ref(),
        "cidata".as_ref(),
        "-o".as_ref(),
        fx.image().as_os_str(),
        "--user-data".as_ref(),
        missing.as_os_str(),
        "--meta-data".as_ref(),
        present.as_os_str(),
    ]);
    assert_clean_failure(&output, 1, &display(&missing), &fx.out);

    let output =
        kiln(["image", "cidata", "-o", fx.image().to_str().unwrap(), "--meta-data", present.to_str().unwrap()]);
    assert_clean_failure(&output, 2, "--user-data", &fx.out);
}

#[test]
fn output_directory_missing() {
    let fx = Fixture::new();
    let image = fx.out.join("no-such-dir").join("disk.img");
    let output = kiln(["image", "fat", "-o", image.to_str().unwrap(), fx.src.to_str().unwrap()]);
    assert_clean_failure(&output, 1, &display(&image), &fx.out);
}

// qcow2, initramfs and `image info`.

/// `kiln image qcow2 ARGS...`
fn qcow2(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut full: Vec<OsString> = vec!["image".into(), "qcow2".into()];
    full.extend(args.iter().map(|arg| arg.as_ref().to_owned()));
    kiln(full)
}

#[test]
fn qcow2_create_bad_sizes() {
    let fx = Fixture::new();
    let out = fx.out.join("disk.qcow2");
    for (size, cluster, needle) in [
        ("0", None, "Invalid image size 0"),
        ("1000", None, "Invalid image size 1000"),
        ("1MB", None, "Invalid image size 1000000"),
        ("1TiB", Some("512"), "Invalid image size 1099511627776"),
        ("4096TiB", None, "Invalid image size 4503599627370496"),
        ("1MiB", Some("1000"), "Invalid cluster size 1000"),
        ("1MiB", Some("256"), "Invalid cluster size 256"),
        ("1MiB", Some("4MiB"), "Invalid cluster size 4194304"),
        ("1MiB", Some("64KB"), "Invalid cluster size 64000"),
        ("1MiB", Some("0"), "Invalid cluster size 0"),
    ] {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"create", &out, &"--size", &size];
        if let Some(cluster) = &cluster {
            args.extend([&"--cluster-size" as &dyn AsRef<std::ffi::OsStr>, cluster]);
        }
        assert_clean_failure(&qcow2(&args), 1, needle, &fx.out);
    }
}

#[test]
fn qcow2_create_usage_errors() {
    let fx = Fixture::new();
    let out = fx.out.join("disk.qcow2");
    // No --size and nothing to take it from.
    assert_clean_failure(&qcow2(&[&"create", &out]), 2, "--size", &fx.out);
    assert_clean_failure(&qcow2(&[&"create", &out, &"--size", &"lots"]), 2, "lots", &fx.out);
    assert_clean_failure(
        &qcow2(&[&"create", &out, &"--size", &"1MiB", &"--cluster-size", &"8GiB"]),
        2,
        "8GiB",
        &fx.out,
    );
    assert_clean_failure(
        &qcow2(&[&"create", &out, &"--size", &"1MiB", &"--backing-format", &"raw"]),
        2,
        "--backing",
        &fx.out,
    );
    let base = fx.src.join("ok.txt");
    assert_clean_failure(
        &qcow2(&[&"create", &out, &"--backing", &base, &"--backing-format", &"vmdk"]),
        2,
        "vmdk",
        &fx.out,
    );
}

#[test]
fn qcow2_create_bad_backing_files() {
    let fx = Fixture::new();
    let out = fx.out.join("thin.qcow2");
    let missing = fx.src.join("no-such-base.raw");
    let output = qcow2(&[&"create", &out, &"--backing", &missing, &"--size", &"1MiB"]);
    assert_clean_failure(&output, 1, &display(&missing), &fx.out);
    assert!(String::from_utf8_lossy(&output.stderr).contains("No such file"));

    // Relative names are looked up next to the image, and the error says where.
    let output = qcow2(&[&"create", &out, &"--backing", &"ok.txt"]);
    assert_clean_failure(&output, 1, &display(&fx.out.join("ok.txt")), &fx.out);

    assert_clean_failure(&qcow2(&[&"create", &out, &"--backing", &fx.src]), 1, &display(&fx.src), &fx.out);

    // A backing file whose length is not a whole number of sectors cannot size the image.
    let odd = fx.src.join("odd.raw");
    fs::write(&odd, vec![1u8; 1000]).unwrap();
    let output = qcow2(&[&"create", &out, &"--backing", &odd]);
    assert_clean_failure(&output, 1, &display(&odd), &fx.out);
    assert!(String::from_utf8_lossy(&output.stderr).contains("multiple of 512"));

    // A qcow2 magic with a broken header behind it, or qcow2 asked of a raw file.
    let broken = fx.src.join("broken.qcow2");
    let mut header = b"QFI\xfb".to_vec();
    header.resize(100, 0);
    fs::write(&broken, &header).unwrap();
    assert_clean_failure(&qcow2(&[&"create", &out, &"--backing", &broken]), 1, &display(&broken), &fx.out);
    let raw = fx.src.join("plain.raw");
    fs::write(&raw, vec![0u8; 4096]).unwrap();
    assert_clean_failure(
        &qcow2(&[&"create", &out, &"--backing", &raw, &"--backing-format", &"qcow2"]),
        1,
        &display(&raw),
        &fx.out,
    );
}

#[test]
fn qcow2_convert_bad_inputs() {
    let fx = Fixture::new();
    let out = fx.out.join("disk.qcow2");
    let missing = fx.src.join("missing.raw");
    let output = qcow2(&[&"convert", &missing, &out]);
    assert_clean_failure(&output, 1, &display(&missing), &fx.out);
    assert!(String::from_utf8_lossy(&output.stderr).contains("No such file"));

    assert_clean_failure(&qcow2(&[&"convert", &fx.src, &out]), 1, &display(&fx.src), &fx.out);

    let empty = fx.src.join("empty.raw");
    fs::write(&empty, b"").unwrap();
    assert_clean_failure(&qcow2(&[&"convert", &empty, &out]), 1, &display(&empty), &fx.out);

    let odd = fx.src.join("odd.raw");
    fs::write(&odd, vec![7u8; 1000]).unwrap();
    let output = qcow2(&[&"convert", &odd, &out]);
    assert_clean_failure(&output, 1, &display(&odd), &fx.out);
    assert!(String::from_utf8_lossy(&output.stderr).contains("Invalid image size 1000"));

    let raw = fx.src.join("disk.raw");
    fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    assert_clean_failure(&qcow2(&[&"convert", &raw, &out, &"--cluster-size", &"3K"]), 1, "3072", &fx.out);

    // Converting a qcow2 image as if it were raw would silently give the wrong disk.
    let already = fx.src.join("already.qcow2");
    assert!(qcow2(&[&"create", &already, &"--size", &"1MiB"]).status.success());
    if let Some(qemu) = crate::tools::QemuImg::find() {
        qemu.assert_valid(&already, 1 << 20);
    }
    assert_clean_failure(&qcow2(&[&"convert", &already, &out]), 1, &display(&already), &fx.out);

    let nowhere = fx.out.join("no-such-dir").join("disk.qcow2");
    assert_clean_failure(&qcow2(&[&"convert", &raw, &nowhere]), 1, &display(&nowhere), &fx.out);
}

#[test]
fn existing_qcow2_survives_a_failed_build() {
    let fx = Fixture::new();
    let out = fx.out.join("disk.qcow2");
    fs::write(&out, b"previous image").unwrap();
    assert_eq!(qcow2(&[&"create", &out, &"--size", &"1000"]).status.code(), Some(1));
    assert_eq!(qcow2(&[&"convert", &fx.src.join("gone"), &out]).status.code(), Some(1));
    assert_eq!(fs::read(&out).unwrap(), b"previous image");
    assert_eq!(fs::read_dir(&fx.out).unwrap().count(), 1, "no temp file next to the image");
}

fn initramfs(src: &Path, out: &Path) -> Output {
    kiln(["image".as_ref(), "initramfs".as_ref(), src.as_os_str(), "-o".as_ref(), out.as_os_str()])
}

#[test]
fn initramfs_bad_inputs() {
    let fx = Fixture::new();
    let out = fx.out.join("initrd.img");
    let missing = fx.src.join("no-such-dir");
    assert_clean_failure(&initramfs(&missing, &out), 1, &display(&missing), &fx.out);
    let file = fx.src.join("ok.txt");
    let output = initramfs(&file, &out);
    assert_clean_failure(&output, 1, &display(&file), &fx.out);
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a directory"));

    let socket = fx.src.join("control.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let output = initramfs(&fx.src, &out);
    assert_clean_failure(&output, 1, &display(&socket), &fx.out);
    assert!(String::from_utf8_lossy(&output.stderr).contains("socket"));
    drop(listener);
    fs::remove_file(&socket).unwrap();

    // cpio names are bytes, but kiln keeps them UTF-8 so every tool agrees on them.
    let bad_name = fx.src.join(std::ffi::OsStr::from_bytes(b"bad-\xff-name"));
    fs::write(&bad_name, b"x").unwrap();
    assert_clean_failure(&initramfs(&fx.src, &out), 1, "bad-", &fx.out);
    fs::remove_file(&bad_name).unwrap();

    let nowhere = fx.out.join("no-such-dir").join("initrd.img");
    assert_clean_failure(&initramfs(&fx.src, &nowhere), 1, &display(&nowhere), &fx.out);

    let output = kiln(["image", "initramfs", fx.src.to_str().unwrap()]);
    assert_clean_failure(&output, 2, "--output", &fx.out);
    let output = kiln([
        "image".as_ref(),
        "initramfs".as_ref(),
        fx.src.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--compress".as_ref(),
        "xz".as_ref(),
    ]);
    assert_clean_failure(&output, 2, "xz", &fx.out);
}

/// Runs `kiln image info` on `bytes` and checks the refusal: exit 1, one
/// error line naming the file and `reason`, nothing on stdout, nothing written.
fn assert_info_refuses(name: &str, bytes: &[u8], reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(name);
    fs::write(&image, bytes).unwrap();
    let output = kiln(["image".as_ref(), "info".as_ref(), "--json".as_ref(), image.as_os_str()]);
    crate::support::assert_error(&output, 1, &display(&image));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(reason), "{name}: the error should say {reason:?}:\n{stderr}");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "{name}: info writes nothing");
}

/// A valid image of each kind, made by kiln, to damage.
fn valid_images(dir: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let src = dir.join("src");
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::write(src.join("bin/init"), b"#!/bin/sh\n").unwrap();
    let fat = dir.join("fat.img");
    let qcow2_image = dir.join("disk.qcow2");
    let cpio = dir.join("initrd.cpio");
    let ok = |output: Output| assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    ok(kiln(["image".as_ref(), "fat".as_ref(), "-o".as_ref(), fat.as_os_str(), src.as_os_str()]));
    ok(qcow2(&[&"create", &qcow2_image, &"--size", &"1GiB"]));
    ok(kiln([
        "image".as_ref(),
        "initramfs".as_ref(),
        src.as_os_str(),
        "-o".as_ref(),
        cpio.as_os_str(),
        "--compress".as_ref(),
        "none".as_ref(),
    ]));
    // Damage is only meaningful on an image QEMU accepts as it is.
    if let Some(qemu) = crate::tools::QemuImg::find() {
        qemu.assert_valid(&qcow2_image, 1 << 30);
    }
    (fs::read(fat).unwrap(), fs::read(qcow2_image).unwrap(), fs::read(cpio).unwrap())
}

#[test]
fn info_refuses_truncated_and_hostile_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (fat, qcow2_image, cpio) = valid_images(dir.path());

    assert_info_refuses("empty.img", b"", "not a FAT volume, qcow2 image or cpio archive");
    let mut noise = Vec::new();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    while noise.len() < 1 << 16 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        noise.extend_from_slice(&state.to_le_bytes());
    }
    noise[..2].copy_from_slice(b"RN");
    assert_info_refuses("random.bin", &noise, "not a FAT volume, qcow2 image or cpio archive");

    // qcow2: a 100-byte file with the magic; header fields out of range.
    let mut short = qcow2_image[..100].to_vec();
    short[..4].copy_from_slice(b"QFI\xfb");
    assert_info_refuses("short.qcow2", &short, "past the end of the file");
    let mut bad = qcow2_image.clone();
    bad[20..24].copy_from_slice(&30u32.to_be_bytes());
    assert_info_refuses("cluster-bits.qcow2", &bad, "cluster_bits 30");
    let mut bad = qcow2_image.clone();
    bad[4..8].copy_from_slice(&7u32.to_be_bytes());
    assert_info_refuses("version.qcow2", &bad, "version 7");
    let mut bad = qcow2_image.clone();
    bad[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
    assert_info_refuses("l1-offset.qcow2", &bad, "L1 table");
    let mut bad = qcow2_image.clone();
    bad[36..40].copy_from_slice(&1u32.to_be_bytes());
    assert_info_refuses("l1-small.qcow2", &bad, "cannot map");
    let mut bad = qcow2_image.clone();
    bad[8..16].copy_from_slice(&65_000u64.to_be_bytes());
    bad[16..20].copy_from_slice(&900u32.to_be_bytes());
    assert_info_refuses("backing-name.qcow2", &bad, "out of bounds");
    // Cut inside the L1 table, which follows the 64 KiB header cluster.
    assert_info_refuses("truncated.qcow2", &qcow2_image[..65_540], "past the end of the file");

    // FAT: a boot sector with 0 sectors per cluster, or no sectors at all.
    let mut bad = fat.clone();
    bad[13] = 0;
    assert_info_refuses("spc0.img", &bad, "sectors per cluster");
    let mut bad = fat.clone();
    bad[11..13].copy_from_slice(&100u16.to_le_bytes());
    assert_info_refuses("bps.img", &bad, "bytes per sector");
    let mut bad = fat.clone();
    bad[19..21].copy_from_slice(&0u16.to_le_bytes());
    bad[32..36].copy_from_slice(&0u32.to_le_bytes());
    assert_info_refuses("total0.img", &bad, "non-zero");
    assert_info_refuses("truncated-fat.img", &fat[..600], "past the end of the file");

    // cpio: a bad hex field, a missing trailer, an absurd name size, a broken gzip stream.
    let mut bad = cpio.clone();
    bad[6 + 6 * 8] = b'G';
    assert_info_refuses("hex.cpio", &bad, "bad hex field");
    assert_info_refuses("no-trailer.cpio", &cpio[..cpio.len() - 124], "TRAILER!!!");
    let mut bad = cpio.clone();
    bad[6 + 11 * 8..6 + 12 * 8].copy_from_slice(b"FFFFFFFF");
    assert_info_refuses("namesize.cpio", &bad, "name size");
    let gzip = |bytes: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut encoder, bytes).unwrap();
        encoder.finish().unwrap()
    };
    let gz = gzip(&cpio);
    assert_info_refuses("truncated.cpio.gz", &gz[..gz.len() / 2], "cannot read archive");
    assert_info_refuses("not-cpio.gz", &gzip("not an archive, just text\n".repeat(10).as_bytes()), "bad cpio magic");
}

#[test]
fn info_missing_or_not_a_file() {
    let fx = Fixture::new();
    let missing = fx.src.join("nothing.img");
    let output = kiln(["image".as_ref(), "info".as_ref(), missing.as_os_str()]);
    crate::support::assert_error(&output, 1, &display(&missing));
    assert!(String::from_utf8_lossy(&output.stderr).contains("No such file"));
    let output = kiln(["image".as_ref(), "info".as_ref(), fx.src.as_os_str()]);
    crate::support::assert_error(&output, 1, &display(&fx.src));
    assert!(String::from_utf8_lossy(&output.stderr).contains("directory"));
}

/// Regression: a 34 MiB qcow2 whose 4 Mi L1 entries all point at the same
/// 2 MiB L2 table once made `inspect` read 8 TiB. Shared L2 tables are now
/// refused, so reads stay bounded by the file's size.
#[test]
fn info_is_fast_on_an_l1_table_of_repeated_l2_pointers() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("repeated-l2.qcow2");
    let cluster_bits = 21u32;
    let cluster = 1u64 << cluster_bits;
    let l1_entries = 4u32 << 20;
    let mut header = vec![0u8; cluster as usize];
    header[..4].copy_from_slice(b"QFI\xfb");
    header[4..8].copy_from_slice(&3u32.to_be_bytes());
    header[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
    header[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
    header[36..40].copy_from_slice(&l1_entries.to_be_bytes());
    header[40..48].copy_from_slice(&cluster.to_be_bytes());
    header[96..100].copy_from_slice(&4u32.to_be_bytes());
    header[100..104].copy_from_slice(&104u32.to_be_bytes());
    let mut bytes = header;
    bytes.extend(std::iter::repeat_n(cluster.to_be_bytes(), l1_entries as usize).flatten());
    fs::write(&image, &bytes).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["image".as_ref(), "info".as_ref(), image.as_os_str()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(20) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("kiln image info still running after 20 s on a 34 MiB file");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A disk that fills up mid-conversion: one clear error, no leftover, and no
/// hang. Regression: the reader thread once waited for ever for a buffer
/// when the writer failed while the reader was ahead. Runs `kiln` in a
/// private mount namespace over a 6 MiB tmpfs, so nothing touches the host.
#[test]
fn convert_fails_cleanly_when_the_disk_fills() {
    let test = "cli_errors::convert_fails_cleanly_when_the_disk_fills";
    if !kiln_testkit::require_root(test, "mounting a tmpfs in a private namespace") {
        return;
    }
    let Some(unshare) = kiln_testkit::require_tool(test, "unshare") else { return };
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("mixed.raw");
    let mount_point = dir.path().join("small");
    fs::create_dir(&mount_point).unwrap();
    // 32 MiB of 4 MiB stripes, data then zeros: the reader runs ahead while
    // the writer fills the 6 MiB disk.
    let mut bytes = vec![0u8; 32 << 20];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for stripe in bytes.chunks_mut(4 << 20).step_by(2) {
        for byte in stripe.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
    }
    fs::write(&raw, &bytes).unwrap();
    let script = r#"mount -t tmpfs -o size=6m tmpfs "$1" || exit 99
"$2" image qcow2 convert "$3" "$1/x.qcow2"
rc=$?
echo "left behind: [$(ls -A "$1")]"
exit $rc"#;
    let mut child = Command::new(unshare)
        .args(["-m", "sh", "-c", script, "sh"])
        .arg(&mount_point)
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .arg(&raw)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("kiln image qcow2 convert hung on a full disk");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(99), "could not mount the tmpfs: {stderr}");
    assert_eq!(output.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("x.qcow2") && stderr.contains("No space left"), "{stderr}");
    assert!(stdout.contains("left behind: []"), "{stdout}");
}
