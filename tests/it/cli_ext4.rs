//! `kiln image ext4`: what the CLI writes is a clean ext4 filesystem
//! (`e2fsck -fn`), read back by `debugfs`, the same bytes from the same
//! input, the same filesystem inside qcow2 (`qemu-img check` and `compare`),
//! and bad input is one error naming the thing at fault, with no file left.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::{current_test_name, require_tools};

use crate::support::{assert_clean_failure, assert_success, keys, kiln, kiln_json};

const JSON_KEYS: [&str; 20] = [
    "block_size",
    "blocks",
    "data_bytes",
    "dirs",
    "elapsed_ms",
    "file_bytes",
    "files",
    "format",
    "free_blocks",
    "free_inodes",
    "groups",
    "hardlinks",
    "image_bytes",
    "inodes",
    "journal_blocks",
    "mode",
    "path",
    "specials",
    "symlinks",
    "uuid",
];

/// A small tree with what the CLI must carry: nested directories, a mode
/// with setuid, a private directory, a symlink, a file spanning blocks.
fn source_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(src.join("etc/private")).unwrap();
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::write(src.join("etc/motd"), b"hello from kiln\n").unwrap();
    fs::write(src.join("etc/private/key"), b"not for others\n").unwrap();
    fs::set_permissions(src.join("etc/private"), fs::Permissions::from_mode(0o750)).unwrap();
    let tool: Vec<u8> = (0..10_000_u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    fs::write(src.join("bin/tool"), &tool).unwrap();
    fs::set_permissions(src.join("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    symlink("motd", src.join("etc/issue")).unwrap();
    fs::hard_link(src.join("etc/motd"), src.join("etc/motd.hardlink")).unwrap();
    assert!(Command::new("mkfifo").arg(src.join("etc/fifo")).status().unwrap().success(), "mkfifo");
    src
}

fn e2fsck_clean(e2fsck: &Path, image: &Path) {
    let out = Command::new(e2fsck).arg("-fn").arg(image).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "e2fsck -fn {} found problems ({}):\n{text}", image.display(), out.status);
}

fn debugfs(debugfs: &Path, image: &Path, request: &str) -> String {
    let out = Command::new(debugfs).args(["-R", request]).arg(image).output().unwrap();
    assert!(out.status.success(), "debugfs -R {request:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path_arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn ext4_cli_writes_raw_and_qcow2_that_e2fsck_debugfs_and_qemu_img_accept() {
    let test = current_test_name();
    let Some(tools) = require_tools(&test, &["e2fsck", "debugfs", "qemu-img"]) else { return };
    let [e2fsck_tool, debugfs_tool, qemu_img] = [&tools[0], &tools[1], &tools[2]];
    let dir = tempfile::tempdir().unwrap();
    let src = source_tree(dir.path());
    let extra = dir.path().join("extra.txt");
    fs::write(&extra, b"placed by DEST=PATH\n").unwrap();
    let raw = dir.path().join("out.img");
    let dest = format!("opt/extra.txt={}", extra.display());
    let args = ["image", "ext4", "-o", path_arg(&raw), "--label", "root", "--epoch", "1700000000", "--json"];
    let report = kiln_json(args.iter().copied().chain([path_arg(&src), dest.as_str()]));
    assert_eq!(keys(&report), JSON_KEYS);
    assert_eq!(report["format"], "raw");
    assert_eq!(report["files"], 4);
    assert_eq!(report["symlinks"], 1);
    assert_eq!(report["hardlinks"], 1);
    assert_eq!(report["specials"], 1, "the FIFO");
    assert_eq!(report["dirs"], 4, "etc, etc/private, bin, opt");
    assert_eq!(report["data_bytes"], 16 + 15 + 10_000 + 20);
    assert_eq!(report["image_bytes"], fs::metadata(&raw).unwrap().len());
    assert_eq!(report["file_bytes"], report["image_bytes"]);
    assert_eq!(report["journal_blocks"], 0, "no journal unless asked");
    e2fsck_clean(e2fsck_tool, &raw);

    assert_eq!(debugfs(debugfs_tool, &raw, "cat /etc/motd"), "hello from kiln\n");
    assert_eq!(debugfs(debugfs_tool, &raw, "cat /opt/extra.txt"), "placed by DEST=PATH\n");
    let out = dir.path().join("rdump");
    fs::create_dir(&out).unwrap();
    debugfs(debugfs_tool, &raw, &format!("rdump /bin {}", out.display()));
    assert!(fs::read(out.join("bin/tool")).unwrap() == fs::read(src.join("bin/tool")).unwrap(), "bin/tool differs");
    let tool = debugfs(debugfs_tool, &raw, "stat /bin/tool");
    assert!(tool.contains("Mode:  04755"), "setuid kept: {tool}");
    assert!(tool.contains("mtime: 0x6553f100"), "--epoch stamps every entry: {tool}");
    assert!(debugfs(debugfs_tool, &raw, "stat /etc/private").contains("Mode:  0750"));
    assert!(debugfs(debugfs_tool, &raw, "stat /etc/issue").contains("Fast link dest: \"motd\""));
    let inode =
        |path: &str| debugfs(debugfs_tool, &raw, &format!("stat {path}")).split_whitespace().nth(1).map(str::to_owned);
    assert_eq!(inode("/etc/motd"), inode("/etc/motd.hardlink"), "a host hardlink stays one inode");
    assert!(debugfs(debugfs_tool, &raw, "stat /etc/fifo").contains("Type: FIFO"));

    let qcow2 = dir.path().join("out.qcow2");
    let args =
        ["image", "ext4", "-o", path_arg(&qcow2), "--format", "qcow2", "--label", "root", "--epoch", "1700000000"];
    let stdout = assert_success(&kiln(args.iter().copied().chain([path_arg(&src), dest.as_str()])));
    assert!(
        stdout.starts_with(&format!("Wrote {}: ext4 ", qcow2.display())) && stdout.contains(" as qcow2 "),
        "{stdout}"
    );
    let check = Command::new(qemu_img).arg("check").arg(&qcow2).output().unwrap();
    assert!(check.status.success(), "qemu-img check: {}", String::from_utf8_lossy(&check.stdout));
    let compare =
        Command::new(qemu_img).args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&raw).arg(&qcow2).output().unwrap();
    assert!(compare.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&compare.stdout));
}

#[test]
fn ext4_cli_gives_identical_bytes_for_the_same_input_and_takes_the_uuid_given() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_tree(dir.path());
    let [first, second] = [dir.path().join("a.img"), dir.path().join("b.img")];
    for out in [&first, &second] {
        assert_success(&kiln(["image", "ext4", "-o", path_arg(out), path_arg(&src)]));
    }
    assert!(fs::read(&first).unwrap() == fs::read(&second).unwrap(), "two builds of one tree differ");

    let uuid = "0123abcd-4567-89ab-cdef-0123456789ab";
    let report = kiln_json(["image", "ext4", "-o", path_arg(&first), "--uuid", uuid, "--json", path_arg(&src)]);
    assert_eq!(report["uuid"], uuid);
    let info = kiln_json(["image", "info", path_arg(&first), "--json"]);
    assert_eq!(info["uuid"], uuid, "{info:?}");
    assert_eq!(info["format"], "ext4");
}

#[test]
fn ext4_cli_refuses_a_tree_too_big_for_size_naming_the_size_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("big"), vec![1u8; 3 << 20]).unwrap();
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("small.img");
    let output = kiln(["image", "ext4", "-o", path_arg(&out), "--size", "2MiB", path_arg(&src)]);
    assert_clean_failure(&output, 1, "the image is 2097152 bytes", &out_dir);
}

#[test]
fn ext4_cli_refuses_bad_destinations_naming_the_entry_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file.txt");
    fs::write(&file, b"x").unwrap();
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("bad.img");
    let long = "n".repeat(256);
    for (dest, needle) in [
        (format!("dir/{long}"), long.as_str()),
        ("a/../b".to_owned(), "a/../b"),
        ("lost+found".to_owned(), "lost+found"),
    ] {
        let source = format!("{dest}={}", file.display());
        let output = kiln(["image", "ext4", "-o", path_arg(&out), source.as_str()]);
        assert_clean_failure(&output, 1, needle, &out_dir);
    }
}

#[test]
fn ext4_cli_journal_writes_a_journaled_disk_of_the_size_that_info_shows_with_has_journal() {
    let test = current_test_name();
    let Some(tools) = require_tools(&test, &["e2fsck", "debugfs"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let src = source_tree(dir.path());
    let disk = dir.path().join("disk.img");
    let args = ["image", "ext4", "-o", path_arg(&disk), "--journal", "--size", "64MiB", "--label", "data", "--json"];
    let report = kiln_json(args.iter().copied().chain([path_arg(&src)]));
    assert_eq!(report["image_bytes"], 64 << 20);
    assert_eq!(fs::metadata(&disk).unwrap().len(), 64 << 20);
    // mke2fs -t ext4 on 64 MiB: a 4 MiB journal and 16384 inodes.
    assert_eq!(report["journal_blocks"], 1024);
    assert_eq!(report["inodes"], 16384);
    e2fsck_clean(&tools[0], &disk);
    assert_eq!(debugfs(&tools[1], &disk, "cat /etc/motd"), "hello from kiln\n");

    let info = kiln_json(["image", "info", path_arg(&disk), "--json"]);
    let features: Vec<&str> = info["features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(features.contains(&"has_journal"), "{features:?}");
    let human = assert_success(&kiln(["image", "info", path_arg(&disk)]));
    assert!(human.lines().any(|line| line.starts_with("features:") && line.contains("has_journal")), "{human}");
}

#[test]
fn ext4_cli_refuses_a_signed_uuid_and_a_source_date_epoch_that_is_no_number() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_tree(dir.path());
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("e.img");
    let signed = "+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1";
    let output = kiln(["image", "ext4", "-o", path_arg(&out), "--uuid", signed, path_arg(&src)]);
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains(signed), "{output:?}");
    assert!(!out.exists());
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["image", "ext4", "-o", path_arg(&out), path_arg(&src)])
        .env("SOURCE_DATE_EPOCH", "abc")
        .output()
        .unwrap();
    assert_clean_failure(&output, 1, "SOURCE_DATE_EPOCH", &out_dir);
}
