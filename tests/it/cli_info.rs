//! `kiln image info`: the right format and facts for images made by kiln
//! and by the usual tools (mkfs.fat + mtools, qemu-img, GNU cpio).

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use kiln_testkit::{current_test_name, require_tools};
use serde_json::{Map, Value};

use crate::support::{assert_success, keys, kiln, kiln_json};
use crate::tools::{Cpio, Noise, QemuImg};

const FAT_KEYS: [&str; 11] = [
    "bytes_per_sector",
    "cluster_size",
    "clusters",
    "fat_type",
    "file_bytes",
    "format",
    "free_clusters",
    "label",
    "path",
    "volume_bytes",
    "volume_id",
];
const QCOW2_KEYS: [&str; 9] = [
    "allocated_clusters",
    "backing_file",
    "backing_format",
    "cluster_size",
    "file_bytes",
    "format",
    "path",
    "version",
    "virtual_size",
];
const EXT4_KEYS: [&str; 13] = [
    "block_size",
    "blocks",
    "features",
    "file_bytes",
    "format",
    "free_blocks",
    "free_inodes",
    "inodes",
    "kind",
    "label",
    "path",
    "uuid",
    "volume_bytes",
];
const CPIO_KEYS: [&str; 10] =
    ["compression", "data_bytes", "dirs", "entries", "file_bytes", "files", "format", "other", "path", "symlinks"];

/// `kiln image info --json IMG`, with the keys its format promises.
fn info(image: &Path) -> Map<String, Value> {
    let report = kiln_json([OsStr::new("image"), OsStr::new("info"), OsStr::new("--json"), image.as_os_str()]);
    let expected_keys: &[&str] = match report["format"].as_str() {
        Some("fat") => &FAT_KEYS,
        Some("qcow2") => &QCOW2_KEYS,
        Some("cpio") => &CPIO_KEYS,
        Some("ext4") => &EXT4_KEYS,
        other => panic!("unexpected format {other:?}"),
    };
    assert_eq!(keys(&report), expected_keys);
    assert_eq!(report["path"], image.to_str().unwrap());
    assert_eq!(report["file_bytes"], fs::metadata(image).unwrap().len());
    report
}

fn run_ok(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Free bytes as mtools counts them: the `... bytes free` line of `mdir`.
fn mdir_bytes_free(mdir: &Path, image: &Path) -> u64 {
    let listing = run_ok(Command::new(mdir).env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(image).arg("::"));
    let line = listing.lines().find(|line| line.contains("bytes free")).unwrap_or_else(|| panic!("{listing}"));
    line.chars().filter(char::is_ascii_digit).collect::<String>().parse().unwrap()
}

#[test]
fn fat_volumes_made_by_kiln() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/data.bin"), Noise::new(1).bytes(150_000)).unwrap();
    fs::write(src.join("small.txt"), b"small\n").unwrap();
    for (fat_type, extra) in [
        ("FAT12", vec![]),
        ("FAT16", vec!["--fat-type", "16", "--size", "20MiB"]),
        ("FAT32", vec!["--fat-type", "32", "--size", "48MiB", "--label", "BIGVOL"]),
    ] {
        let image = dir.path().join(format!("{fat_type}.img"));
        let mut args: Vec<&OsStr> = ["image", "fat", "--json", "-o"].map(OsStr::new).to_vec();
        args.push(image.as_os_str());
        args.extend(extra.iter().map(OsStr::new));
        args.push(src.as_os_str());
        let built = kiln_json(&args);
        let found = info(&image);
        assert_eq!(found["format"], "fat");
        assert_eq!(found["fat_type"], fat_type);
        for key in ["fat_type", "cluster_size", "clusters", "free_clusters", "volume_id"] {
            assert_eq!(found[key], built[key], "{fat_type}: {key}");
        }
        assert_eq!(found["volume_bytes"], built["image_bytes"]);
        assert_eq!(found["bytes_per_sector"], 512);
        let label = if fat_type == "FAT32" { Value::from("BIGVOL") } else { Value::Null };
        assert_eq!(found["label"], label);
    }
}

#[test]
fn fat_volumes_made_by_mkfs_fat() {
    let Some(tools) = require_tools(&current_test_name(), &["mkfs.fat", "mcopy", "mdir"]) else { return };
    let [mkfs, mcopy, mdir] = [&tools[0], &tools[1], &tools[2]];
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("payload.bin");
    fs::write(&payload, Noise::new(2).bytes(100_000)).unwrap();
    for (bits, kib, label, id) in [
        ("12", "4096", "TWELVE", "0badcafe"),
        ("16", "20480", "SIXTEEN", "12345678"),
        ("32", "40960", "THIRTYTWO", "deadbeef"),
    ] {
        let image = dir.path().join(format!("mkfs{bits}.img"));
        run_ok(Command::new(mkfs).args(["-C", "-F", bits, "-n", label, "-i", id]).arg(&image).arg(kib));
        run_ok(
            Command::new(mcopy).env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(&image).arg(&payload).arg("::/payload.bin"),
        );
        let found = info(&image);
        assert_eq!(found["format"], "fat");
        assert_eq!(found["fat_type"], format!("FAT{bits}"));
        assert_eq!(found["label"], label);
        let id = id.to_ascii_uppercase();
        assert_eq!(found["volume_id"], format!("{}-{}", &id[..4], &id[4..]));
        assert_eq!(found["volume_bytes"], kib.parse::<u64>().unwrap() * 1024);
        assert_eq!(found["bytes_per_sector"], 512);
        let free = found["free_clusters"].as_u64().unwrap() * found["cluster_size"].as_u64().unwrap();
        assert_eq!(free, mdir_bytes_free(mdir, &image), "FAT{bits}: free space as mtools counts it");
        assert!(found["free_clusters"].as_u64() < found["clusters"].as_u64(), "the payload uses clusters");
    }
}

#[test]
fn ext_filesystems_made_by_mke2fs() {
    let Some(tools) = require_tools(&current_test_name(), &["mke2fs", "dumpe2fs"]) else { return };
    let [mke2fs, dumpe2fs] = [&tools[0], &tools[1]];
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    fs::create_dir_all(source.join("etc")).unwrap();
    fs::write(source.join("etc/motd"), "hello from mke2fs\n").unwrap();
    for (kind, options, label) in
        [("ext2", &["-t", "ext2"][..], "TWO"), ("ext4", &["-t", "ext4", "-O", "metadata_csum,64bit"][..], "FOUR")]
    {
        let image = dir.path().join(format!("{kind}.img"));
        run_ok(
            Command::new(mke2fs)
                .args(["-q", "-F", "-b", "4096", "-L", label, "-U", "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"])
                .args(options)
                .arg("-d")
                .arg(&source)
                .arg(&image)
                .arg("16M"),
        );
        let found = info(&image);
        assert_eq!(found["format"], "ext4");
        assert_eq!(found["kind"], kind);
        assert_eq!(found["label"], label);
        assert_eq!(found["uuid"], "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9");
        assert_eq!(found["block_size"], 4096);
        assert_eq!(found["volume_bytes"], 16 << 20);
        // The counts and features as e2fsprogs itself reports them.
        let header = run_ok(Command::new(dumpe2fs).arg("-h").arg(&image));
        let field = |name: &str| {
            let line = header.lines().find(|line| line.starts_with(name)).unwrap_or_else(|| panic!("{header}"));
            line[name.len()..].trim().to_owned()
        };
        assert_eq!(found["blocks"], field("Block count:").parse::<u64>().unwrap());
        assert_eq!(found["free_blocks"], field("Free blocks:").parse::<u64>().unwrap());
        assert_eq!(found["inodes"], field("Inode count:").parse::<u64>().unwrap());
        assert_eq!(found["free_inodes"], field("Free inodes:").parse::<u64>().unwrap());
        let features: Vec<&str> = found["features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
        assert_eq!(features.join(" "), field("Filesystem features:"), "{kind}: features in mke2fs's names");
    }
}

#[test]
fn qcow2_images_made_by_qemu_img() {
    let Some(qemu) = QemuImg::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("qemu.qcow2");
    let arg = |s: &'static str| OsStr::new(s);
    qemu.run_ok(&[
        arg("create"),
        arg("-f"),
        arg("qcow2"),
        arg("-o"),
        arg("cluster_size=4096"),
        image.as_os_str(),
        arg("1G"),
    ]);
    let found = info(&image);
    assert_eq!(found["format"], "qcow2");
    assert_eq!(found["version"], 3);
    assert_eq!(found["virtual_size"], 1 << 30);
    assert_eq!(found["cluster_size"], 4096);
    assert_eq!(found["allocated_clusters"], 0);
    assert_eq!(found["backing_file"], Value::Null);

    // Version 2 (compat 0.10), as old tools write it.
    let old = dir.path().join("old.qcow2");
    qemu.run_ok(&[arg("create"), arg("-f"), arg("qcow2"), arg("-o"), arg("compat=0.10"), old.as_os_str(), arg("100M")]);
    let found = info(&old);
    assert_eq!(found["version"], 2);
    assert_eq!(found["virtual_size"], 100 << 20);
    assert_eq!(found["cluster_size"], 65536);

    // With data and a backing file.
    let raw = dir.path().join("data.raw");
    let mut content = Noise::new(4).bytes(2 << 20);
    content[300_000..1_500_000].fill(0);
    fs::write(&raw, &content).unwrap();
    let converted = dir.path().join("converted.qcow2");
    qemu.run_ok(&[
        arg("convert"),
        arg("-f"),
        arg("raw"),
        arg("-O"),
        arg("qcow2"),
        raw.as_os_str(),
        converted.as_os_str(),
    ]);
    let found = info(&converted);
    assert_eq!(found["virtual_size"], content.len());
    let mapped = qemu.data_clusters(&converted, 65536);
    assert!(mapped > 0);
    assert_eq!(found["allocated_clusters"], mapped, "allocated clusters as qemu-img map counts them");

    let thin = dir.path().join("thin.qcow2");
    qemu.run_ok(&[
        arg("create"),
        arg("-f"),
        arg("qcow2"),
        arg("-b"),
        arg("converted.qcow2"),
        arg("-F"),
        arg("qcow2"),
        thin.as_os_str(),
    ]);
    let found = info(&thin);
    assert_eq!(found["backing_file"], "converted.qcow2");
    assert_eq!(found["backing_format"], "qcow2");
    assert_eq!(found["virtual_size"], content.len());
    assert_eq!(found["allocated_clusters"], 0);
}

/// A small tree and its expected counts: (entries, dirs, files, symlinks, data bytes).
fn cpio_tree(root: &Path) -> (u64, u64, u64, u64, u64) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("etc/empty")).unwrap();
    fs::write(root.join("bin/init"), b"#!/bin/sh\n").unwrap();
    fs::write(root.join("etc/data"), Noise::new(6).bytes(70_001)).unwrap();
    fs::write(root.join("etc/none"), b"").unwrap();
    symlink("bin/init", root.join("init")).unwrap();
    (7, 3, 3, 1, 10 + 70_001)
}

fn assert_cpio_counts(found: &Map<String, Value>, compression: &str, counts: (u64, u64, u64, u64, u64)) {
    let (entries, dirs, files, symlinks, data_bytes) = counts;
    assert_eq!(found["format"], "cpio");
    assert_eq!(found["compression"], compression);
    assert_eq!(found["entries"], entries);
    assert_eq!(found["dirs"], dirs);
    assert_eq!(found["files"], files);
    assert_eq!(found["symlinks"], symlinks);
    assert_eq!(found["other"], 0);
    assert_eq!(found["data_bytes"], data_bytes);
}

#[test]
fn cpio_archives_made_by_kiln() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let counts = cpio_tree(&root);
    for compression in ["none", "gzip"] {
        let archive = dir.path().join(format!("initramfs.{compression}"));
        assert_success(&kiln([
            OsStr::new("image"),
            OsStr::new("initramfs"),
            root.as_os_str(),
            OsStr::new("-o"),
            archive.as_os_str(),
            OsStr::new("--compress"),
            OsStr::new(compression),
        ]));
        assert_cpio_counts(&info(&archive), compression, counts);
    }
}

#[test]
fn cpio_archives_made_by_gnu_cpio() {
    let Some(cpio) = Cpio::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let counts = cpio_tree(&root);
    let names: Vec<String> =
        ["bin", "bin/init", "etc", "etc/empty", "etc/data", "etc/none", "init"].map(String::from).to_vec();
    let archive = cpio.create(&root, &names);
    let plain = dir.path().join("gnu.cpio");
    fs::write(&plain, &archive).unwrap();
    assert_cpio_counts(&info(&plain), "none", counts);

    let gz = dir.path().join("gnu.cpio.gz");
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&archive).unwrap();
    fs::write(&gz, encoder.finish().unwrap()).unwrap();
    assert_cpio_counts(&info(&gz), "gzip", counts);
}

#[test]
fn human_output_is_one_line_per_fact() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    assert_success(&kiln([
        OsStr::new("image"),
        OsStr::new("qcow2"),
        OsStr::new("create"),
        image.as_os_str(),
        OsStr::new("--size"),
        OsStr::new("2GiB"),
    ]));
    if let Some(qemu) = QemuImg::find() {
        qemu.assert_valid(&image, 2 << 30);
    }
    let stdout = assert_success(&kiln([OsStr::new("image"), OsStr::new("info"), image.as_os_str()]));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), QCOW2_KEYS.len(), "{stdout}");
    assert!(lines[0].starts_with("path:") && lines[0].ends_with(image.to_str().unwrap()), "{stdout}");
    assert!(lines[1].starts_with("format:") && lines[1].ends_with(" qcow2"), "{stdout}");
    assert!(
        lines.iter().any(|line| line.starts_with("virtual size:") && line.ends_with("2147483648 (2.0 GiB)")),
        "{stdout}"
    );
    assert!(lines.iter().any(|line| line.starts_with("backing file:") && line.ends_with(" none")), "{stdout}");
}
