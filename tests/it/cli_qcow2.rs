//! qcow2 images from `kiln image qcow2 create|convert` and `kiln image fat
//! --format qcow2`, each checked by `qemu-img` (check, info, compare, map,
//! convert), which shares no code with kiln's writer.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::cli_images::parse_report;
use crate::support::{assert_success, keys, kiln, kiln_json, repo_root};
use crate::tools::{Noise, QemuImg};

const REPORT_KEYS: [&str; 9] = [
    "backing_file",
    "backing_format",
    "cluster_size",
    "data_clusters",
    "elapsed_ms",
    "file_bytes",
    "format",
    "path",
    "virtual_size",
];

fn os(args: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    args.iter().map(|arg| arg.as_ref().to_owned()).collect()
}

/// Runs `kiln image qcow2 ARGS... --json` and checks the report against the file.
fn qcow2_json(args: &[&dyn AsRef<OsStr>], image: &Path) -> serde_json::Map<String, serde_json::Value> {
    let mut full = os(&[&"image", &"qcow2"]);
    full.extend(os(args));
    full.push("--json".into());
    let report = kiln_json(&full);
    assert_eq!(keys(&report), REPORT_KEYS);
    assert_eq!(report["path"], image.to_str().unwrap());
    assert_eq!(report["format"], "qcow2");
    assert_eq!(report["file_bytes"], fs::metadata(image).unwrap().len());
    assert_eq!(fs::metadata(image).unwrap().permissions().mode() & 0o777, 0o644);
    report
}

/// `kiln image info --json IMG` of a qcow2 image.
fn kiln_info(image: &Path) -> serde_json::Map<String, serde_json::Value> {
    let info = kiln_json([OsStr::new("image"), OsStr::new("info"), OsStr::new("--json"), image.as_os_str()]);
    assert_eq!(info["format"], "qcow2", "{info:?}");
    info
}

/// How many `cluster`-sized pieces of `content` hold a non-zero byte.
fn nonzero_clusters(content: &[u8], cluster: usize) -> u64 {
    content.chunks(cluster).filter(|chunk| chunk.iter().any(|&b| b != 0)).count() as u64
}

#[test]
fn created_images_are_valid_and_exactly_sized() {
    let Some(qemu) = QemuImg::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Option<&str>, u64, u64); 7] = [
        ("1MiB", None, 1 << 20, 64 << 10),
        ("20GiB", None, 20 << 30, 64 << 10),
        ("512", Some("512"), 512, 512),
        ("3000K", Some("4K"), 3000 << 10, 4 << 10),
        ("1000MB", Some("2MiB"), 1_000_000_000, 2 << 20),
        ("2TiB", Some("1M"), 2 << 40, 1 << 20),
        // The largest size with 512-byte clusters: an L1 table of QEMU's 32 MiB maximum.
        ("128GiB", Some("512B"), 128 << 30, 512),
    ];
    for (index, (size, cluster, virtual_size, cluster_bytes)) in cases.into_iter().enumerate() {
        let image = dir.path().join(format!("empty-{index}.qcow2"));
        let mut args = os(&[&"create", &image, &"--size", &size]);
        if let Some(cluster) = cluster {
            args.extend(os(&[&"--cluster-size", &cluster]));
        }
        let args: Vec<&dyn AsRef<OsStr>> = args.iter().map(|arg| arg as &dyn AsRef<OsStr>).collect();
        let report = qcow2_json(&args, &image);
        assert_eq!(report["virtual_size"], virtual_size, "{size}");
        assert_eq!(report["cluster_size"], cluster_bytes, "{size}");
        assert_eq!(report["data_clusters"], 0);
        assert_eq!(report["backing_file"], serde_json::Value::Null);

        let info = qemu.assert_valid(&image, virtual_size);
        assert_eq!(info["cluster-size"], cluster_bytes);
        assert!(info.get("backing-filename").is_none(), "{info}");
        assert_eq!(qemu.data_clusters(&image, cluster_bytes), 0);
        let ours = kiln_info(&image);
        assert_eq!(ours["virtual_size"], virtual_size);
        assert_eq!(ours["cluster_size"], cluster_bytes);
        assert_eq!(ours["allocated_clusters"], 0);
        assert_eq!(ours["version"], 3);
    }
}

#[test]
fn human_summary_without_json() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("plain.qcow2");
    let stdout = assert_success(&kiln([
        OsStr::new("image"),
        OsStr::new("qcow2"),
        OsStr::new("create"),
        image.as_os_str(),
        OsStr::new("--size"),
        OsStr::new("20GiB"),
    ]));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with(&format!("Wrote {}: qcow2 20.0 GiB virtual", image.display())), "{stdout}");
    if let Some(qemu) = QemuImg::find() {
        qemu.assert_valid(&image, 20 << 30);
    }
}

/// One stretch of a generated raw image.
#[derive(Debug, Clone)]
enum Run {
    /// Zeros written out (allocated on the host, still zero).
    Zeros(usize),
    /// Random bytes.
    Random(usize, u64),
    /// Not written: a hole in the raw file.
    Hole(usize),
    /// A hole ending in one non-zero byte.
    Speck(usize, u8),
}

fn run_strategy() -> impl Strategy<Value = Run> {
    let len = prop_oneof![1usize..=600, 512usize..=70_000, 65_536usize..=1_500_000];
    (0u8..4, len, any::<u64>()).prop_map(|(kind, len, seed)| match kind {
        0 => Run::Zeros(len),
        1 => Run::Random(len, seed),
        2 => Run::Hole(len),
        _ => Run::Speck(len, (seed as u8).max(1)),
    })
}

/// At most this much content, so each case stays small and fast.
const MAX_CONTENT: usize = 8 << 20;

/// Writes the runs (then `tail` more bytes of hole) to `path`, rounded up
/// to whole 512-byte sectors, and returns the image's content.
fn write_raw(path: &Path, runs: &[Run], tail: usize) -> Vec<u8> {
    let file = File::create(path).unwrap();
    let mut content = Vec::new();
    for run in runs {
        let start = content.len();
        match *run {
            Run::Zeros(len) => content.resize(start + len, 0),
            Run::Random(len, seed) => content.extend(Noise::new(seed).bytes(len)),
            Run::Hole(len) => content.resize(start + len, 0),
            Run::Speck(len, byte) => {
                content.resize(start + len, 0);
                content[start + len - 1] = byte;
            }
        }
        content.truncate(MAX_CONTENT);
        let end = content.len();
        if start >= end {
            break;
        }
        match run {
            Run::Hole(_) => {}
            Run::Speck(..) => file.write_all_at(&content[end - 1..end], (end - 1) as u64).unwrap(),
            _ => file.write_all_at(&content[start..end], start as u64).unwrap(),
        }
    }
    let len = (content.len() + tail).next_multiple_of(512).max(512);
    content.resize(len, 0);
    file.set_len(len as u64).unwrap();
    content
}

#[test]
fn converted_images_match_their_raw_source() {
    let Some(qemu) = QemuImg::find() else { return };
    let strategy = (proptest::collection::vec(run_strategy(), 0..10), 9u32..=21, 0usize..=1_000_000);
    let config = Config { cases: 24, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |(runs, cluster_bits, tail)| {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let image = dir.path().join("disk.qcow2");
        let content = write_raw(&raw, &runs, tail);
        let cluster = 1usize << cluster_bits;

        let cluster_arg = cluster.to_string();
        let report = qcow2_json(&[&"convert", &raw, &image, &"--cluster-size", &cluster_arg], &image);
        let expected_clusters = nonzero_clusters(&content, cluster);
        prop_assert_eq!(&report["virtual_size"], &serde_json::json!(content.len()));
        prop_assert_eq!(&report["cluster_size"], &serde_json::json!(cluster));
        prop_assert_eq!(&report["data_clusters"], &serde_json::json!(expected_clusters));

        qemu.assert_valid(&image, content.len() as u64);
        prop_assert!(qemu.same_content(&raw, &image), "qemu-img compare finds a difference");
        prop_assert_eq!(qemu.data_clusters(&image, cluster as u64), expected_clusters);
        prop_assert_eq!(&kiln_info(&image)["allocated_clusters"], &serde_json::json!(expected_clusters));
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

#[test]
fn converted_edge_cases() {
    let Some(qemu) = QemuImg::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let image = dir.path().join("disk.qcow2");

    // All zeros, written out: nothing is allocated.
    fs::write(&raw, vec![0u8; 3 << 20]).unwrap();
    let report = qcow2_json(&[&"convert", &raw, &image], &image);
    assert_eq!(report["data_clusters"], 0);
    qemu.assert_valid(&image, 3 << 20);
    assert!(qemu.same_content(&raw, &image));

    // Data only in the last sector of a size that is not a whole number of clusters.
    let len = (5 << 20) + 1536;
    File::create(&raw).unwrap().set_len(len).unwrap();
    crate::tools::patch(&raw, len - 512, &Noise::new(7).bytes(512));
    let report = qcow2_json(&[&"convert", &raw, &image], &image);
    assert_eq!(report["data_clusters"], 1);
    qemu.assert_valid(&image, len);
    assert!(qemu.same_content(&raw, &image));

    // The comparison can fail: one flipped byte is a difference.
    crate::tools::patch(&raw, len - 7, &[0xff ^ fs::read(&raw).unwrap()[(len - 7) as usize]]);
    assert!(!qemu.same_content(&raw, &image), "qemu-img compare must see a changed byte");
    crate::tools::patch(&raw, 12345, &[1]);
    assert!(!qemu.same_content(&raw, &image), "nor miss a byte in an unallocated cluster");

    // A raw FAT image converts too: its first bytes are not mistaken for qcow2.
    let fat = dir.path().join("fat.img");
    let fat_qcow2 = dir.path().join("fat.qcow2");
    let keystore = repo_root().join("examples/hello/keystore");
    assert_success(&kiln([
        OsStr::new("image"),
        OsStr::new("fat"),
        OsStr::new("-o"),
        fat.as_os_str(),
        keystore.as_os_str(),
    ]));
    qcow2_json(&[&"convert", &fat, &fat_qcow2, &"--cluster-size", &"4K"], &fat_qcow2);
    qemu.assert_valid(&fat_qcow2, fs::metadata(&fat).unwrap().len());
    assert!(qemu.same_content(&fat, &fat_qcow2));
}

#[test]
fn thin_images_over_a_backing_file() {
    let Some(qemu) = QemuImg::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mut content = Noise::new(42).bytes(3 << 20);
    content[1 << 20..2 << 20].fill(0);
    fs::write(&base, &content).unwrap();

    // A relative backing name is relative to the image, as QEMU reads it.
    let thin = dir.path().join("thin.qcow2");
    let report = qcow2_json(&[&"create", &thin, &"--backing", &"base.raw"], &thin);
    assert_eq!(report["virtual_size"], content.len(), "size taken from the backing file");
    assert_eq!(report["backing_file"], "base.raw");
    assert_eq!(report["backing_format"], "raw", "detected");
    assert_eq!(report["data_clusters"], 0);
    let info = qemu.assert_valid(&thin, content.len() as u64);
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    assert!(qemu.same_content(&base, &thin), "the thin image reads as its base");
    let ours = kiln_info(&thin);
    assert_eq!(ours["backing_file"], "base.raw");
    assert_eq!(ours["backing_format"], "raw");

    // A qcow2 base (absolute name): detected as qcow2, its virtual size used.
    let base_qcow2 = dir.path().join("base.qcow2");
    qcow2_json(&[&"convert", &base, &base_qcow2, &"--cluster-size", &"16K"], &base_qcow2);
    let thin2 = dir.path().join("thin2.qcow2");
    let report = qcow2_json(&[&"create", &thin2, &"--backing", &base_qcow2, &"--cluster-size", &"128K"], &thin2);
    assert_eq!(report["backing_format"], "qcow2");
    assert_eq!(report["virtual_size"], content.len());
    assert_eq!(report["cluster_size"], 128 << 10);
    let info = qemu.assert_valid(&thin2, content.len() as u64);
    assert_eq!(info["backing-filename"], base_qcow2.to_str().unwrap());
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert!(qemu.same_content(&base, &thin2), "two layers down, still the base's bytes");

    // The comparison can fail: the thin image does not read as another file.
    let other = dir.path().join("other.raw");
    let mut changed = content.clone();
    changed[(2 << 20) + 3] ^= 1;
    fs::write(&other, &changed).unwrap();
    assert!(!qemu.same_content(&other, &thin));

    // Explicit format and a larger size: the rest of the disk reads as zeros.
    let grown = dir.path().join("grown.qcow2");
    let report =
        qcow2_json(&[&"create", &grown, &"--backing", &base, &"--backing-format", &"raw", &"--size", &"64MiB"], &grown);
    assert_eq!(report["virtual_size"], 64 << 20);
    let info = qemu.assert_valid(&grown, 64 << 20);
    assert_eq!(info["backing-filename-format"], "raw");
    let grown_raw = dir.path().join("grown.raw");
    qemu.convert_to_raw(&grown, &grown_raw);
    let mut expected = content.clone();
    expected.resize(64 << 20, 0);
    assert!(fs::read(&grown_raw).unwrap() == expected, "base bytes, then zeros");

    // --backing-format raw over a qcow2 file exposes the qcow2 file's own bytes, as asked.
    let raw_view = dir.path().join("raw-view.qcow2");
    let report = qcow2_json(&[&"create", &raw_view, &"--backing", &base_qcow2, &"--backing-format", &"raw"], &raw_view);
    assert_eq!(report["backing_format"], "raw");
    assert_eq!(report["virtual_size"], fs::metadata(&base_qcow2).unwrap().len());
    qemu.assert_valid(&raw_view, fs::metadata(&base_qcow2).unwrap().len());
    assert!(qemu.same_content(&base_qcow2, &raw_view));
}

#[test]
fn thin_image_over_a_qemu_made_base() {
    let Some(qemu) = QemuImg::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("seed.raw");
    fs::write(&raw, Noise::new(3).bytes(1 << 20)).unwrap();
    let base = dir.path().join("qemu-base.qcow2");
    qemu.run_ok(&[
        "convert".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        raw.as_os_str(),
        base.as_os_str(),
    ]);
    let thin = dir.path().join("thin.qcow2");
    let report = qcow2_json(&[&"create", &thin, &"--backing", &"qemu-base.qcow2"], &thin);
    assert_eq!(report["backing_format"], "qcow2");
    assert_eq!(report["virtual_size"], 1 << 20);
    qemu.assert_valid(&thin, 1 << 20);
    assert!(qemu.same_content(&raw, &thin));
}

/// A source tree with zero stretches inside a file, so qcow2 output skips
/// clusters in the middle of file data, not only in free space.
fn fat_source(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    let mut data = Noise::new(11).bytes(300_000);
    data[70_000..270_000].fill(0);
    fs::write(src.join("data.bin"), &data).unwrap();
    fs::write(src.join("etc/motd"), b"hello from qcow2\n").unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    src
}

/// Builds `kiln image ARGS... -o OUT --format F --json` as raw and as qcow2
/// and checks that QEMU reads the qcow2 as exactly the raw image.
fn assert_qcow2_build_equals_raw(qemu: &QemuImg, dir: &Path, name: &str, args: &[OsString]) -> u64 {
    let raw = dir.join(format!("{name}.img"));
    let qcow2 = dir.join(format!("{name}.qcow2"));
    let build = |out: &Path, format: &str| {
        let mut full: Vec<OsString> = vec!["image".into()];
        full.extend(args.iter().cloned());
        full.extend(os(&[&"-o", &out, &"--format", &format, &"--epoch", &"1700000000", &"--json"]));
        parse_report(&assert_success(&kiln(&full)), out)
    };
    let mut raw_report = build(&raw, "raw");
    let mut qcow2_report = build(&qcow2, "qcow2");
    assert_eq!(raw_report["format"], "raw");
    assert_eq!(qcow2_report["format"], "qcow2");
    let image_bytes = raw_report["image_bytes"].as_u64().unwrap();
    assert_eq!(qcow2_report["image_bytes"], image_bytes);
    for key in ["path", "format", "file_bytes", "elapsed_ms"] {
        raw_report.remove(key);
        qcow2_report.remove(key);
    }
    assert_eq!(raw_report, qcow2_report, "the same volume either way");
    assert_eq!(
        fs::metadata(&raw).unwrap().permissions().mode(),
        fs::metadata(&qcow2).unwrap().permissions().mode(),
        "same file mode"
    );

    qemu.assert_valid(&qcow2, image_bytes);
    let back = dir.join(format!("{name}.back.raw"));
    qemu.convert_to_raw(&qcow2, &back);
    assert!(fs::read(&back).unwrap() == fs::read(&raw).unwrap(), "{name}: qcow2 content differs from the raw build");
    fs::metadata(&qcow2).unwrap().len()
}

#[test]
fn fat_written_as_qcow2_equals_the_raw_build() {
    let Some(qemu) = QemuImg::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let src = fat_source(dir.path());
    let keystore = format!("keystore={}", repo_root().join("examples/hello/keystore").display());
    for (name, extra) in [
        ("fat12", vec![]),
        ("fat16", vec!["--fat-type", "16", "--size", "16MiB"]),
        ("fat32", vec!["--fat-type", "32", "--size", "40MiB"]),
    ] {
        let mut args = os(&[&"fat", &"--label", &"QCOWTEST"]);
        args.extend(extra.iter().map(OsString::from));
        args.extend(os(&[&src, &keystore]));
        let file_bytes = assert_qcow2_build_equals_raw(&qemu, dir.path(), name, &args);
        if name == "fat32" {
            assert!(file_bytes < 4 << 20, "a mostly empty 40 MiB volume takes little space as qcow2: {file_bytes}");
        }
    }
}

#[test]
fn service_disk_written_as_qcow2_equals_the_raw_build() {
    let Some(qemu) = QemuImg::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("service");
    fs::write(&binary, Noise::new(5).bytes(200_000)).unwrap();
    let keystore = format!("keystore={}", repo_root().join("examples/hello/keystore").display());
    let args = os(&[
        &"service-disk",
        &"--binary",
        &binary,
        &"--arg",
        &"--port=8080",
        &"--env",
        &"MODE=prod",
        &"--secret-tree",
        &keystore,
    ]);
    assert_qcow2_build_equals_raw(&qemu, dir.path(), "service", &args);
    let qcow2 = dir.path().join("service.qcow2");
    assert_eq!(fs::metadata(&qcow2).unwrap().permissions().mode() & 0o777, 0o600, "secrets: 0600 as qcow2 too");
}
