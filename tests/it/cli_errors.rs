//! Bad input: one clear error naming the thing at fault, a non-zero exit,
//! and nothing left in the output directory (no image, no temp file).

use std::ffi::OsString;
use std::fs::{self, File};
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
        Fixture {
            _dir: dir,
            src,
            out,
        }
    }

    fn image(&self) -> PathBuf {
        self.out.join("disk.img")
    }

    /// `kiln image fat -o OUT <extra...>`
    fn fat(&self, extra: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
        let mut args: Vec<OsString> = vec![
            "image".into(),
            "fat".into(),
            "-o".into(),
            self.image().into(),
        ];
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
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("No such file"),
        "the cause is printed"
    );

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
    for (path, mode) in [
        (root, 0o755),
        (fx.src.as_path(), 0o755),
        (fx.out.as_path(), 0o777),
    ] {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }
    let output = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&binary)
        .args([
            "image".as_ref(),
            "fat".as_ref(),
            "-o".as_ref(),
            fx.image().as_os_str(),
            fx.src.as_os_str(),
        ])
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .unwrap();
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
    assert_clean_failure(
        &fx.fat(&[&fx.src]),
        1,
        &display(&fx.src.join("loop")),
        &fx.out,
    );

    let fx = Fixture::new();
    let sub = fx.src.join("sub");
    fs::create_dir(&sub).unwrap();
    symlink("..", sub.join("up")).unwrap();
    assert_clean_failure(&fx.fat(&[&fx.src]), 1, &display(&sub.join("up")), &fx.out);

    // A loop given directly as SRC.
    let fx = Fixture::new();
    symlink("self", fx.src.join("self")).unwrap();
    assert_clean_failure(
        &fx.fat(&[&fx.src.join("self")]),
        1,
        &display(&fx.src.join("self")),
        &fx.out,
    );
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
    assert_eq!(
        fs::read_dir(&fx.out).unwrap().count(),
        1,
        "no temp file next to the image"
    );
}

#[test]
fn service_disk_bad_inputs() {
    let fx = Fixture::new();
    let keys = fx.src.join("keys");
    fs::create_dir(&keys).unwrap();

    assert_clean_failure(&fx.service_disk(&[&"--env", &"1BAD=x"]), 1, "1BAD", &fx.out);
    assert_clean_failure(
        &fx.service_disk(&[&"--env", &"A=1", &"--env", &"A=2"]),
        1,
        "A is given twice",
        &fx.out,
    );
    assert_clean_failure(
        &fx.service_disk(&[&"--env", &"NOVALUE"]),
        2,
        "NOVALUE",
        &fx.out,
    );
    let tree = |name: &str| format!("{name}={}", keys.display());
    assert_clean_failure(
        &fx.service_disk(&[&"--tree", &tree("..")]),
        1,
        "\"..\"",
        &fx.out,
    );
    assert_clean_failure(
        &fx.service_disk(&[&"--tree", &tree("a/b")]),
        1,
        "a/b",
        &fx.out,
    );
    assert_clean_failure(
        &fx.service_disk(&[&"--secret-tree", &tree("launch")]),
        1,
        "launch",
        &fx.out,
    );
    assert_clean_failure(
        &fx.service_disk(&[&"--tree", &tree("k"), &"--secret-tree", &tree("K")]),
        1,
        "\"K\"",
        &fx.out,
    );
    let file_tree = format!("keystore={}", fx.src.join("ok.txt").display());
    assert_clean_failure(
        &fx.service_disk(&[&"--tree", &file_tree]),
        1,
        "ok.txt",
        &fx.out,
    );
    let missing_tree = format!("keystore={}", fx.src.join("missing").display());
    assert_clean_failure(
        &fx.service_disk(&[&"--tree", &missing_tree]),
        1,
        "missing",
        &fx.out,
    );

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

    let output = kiln([
        "image",
        "cidata",
        "-o",
        fx.image().to_str().unwrap(),
        "--meta-data",
        present.to_str().unwrap(),
    ]);
    assert_clean_failure(&output, 2, "--user-data", &fx.out);
}

#[test]
fn output_directory_missing() {
    let fx = Fixture::new();
    let image = fx.out.join("no-such-dir").join("disk.img");
    let output = kiln([
        "image",
        "fat",
        "-o",
        image.to_str().unwrap(),
        fx.src.to_str().unwrap(),
    ]);
    assert_clean_failure(&output, 1, &display(&image), &fx.out);
}
