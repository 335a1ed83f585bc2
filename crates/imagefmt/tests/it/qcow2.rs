//! qcow2 over a backing file that holds data: an image whose writer
//! defines the whole content (a conversion, a FAT volume) must read as that
//! content, with nothing of the backing file showing through its zero
//! clusters. `qemu-img` (check, compare, map), which shares no code with
//! the writer, is the judge.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_imagefmt::{Qcow2Options, convert_to_qcow2, create_qcow2};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::support::{Case, options, pattern};

struct QemuImg(PathBuf);

impl QemuImg {
    fn find() -> Option<QemuImg> {
        kiln_testkit::require_tool(&kiln_testkit::current_test_name(), "qemu-img").map(QemuImg)
    }

    fn run(&self, args: &[&std::ffi::OsStr]) -> std::process::Output {
        Command::new(&self.0).env("LC_ALL", "C").args(args).output().unwrap()
    }

    /// `qemu-img check`: no corruptions, no leaks.
    fn check(&self, image: &Path) {
        let output = self.run(&["check".as_ref(), "-f".as_ref(), "qcow2".as_ref(), image.as_os_str()]);
        assert!(
            output.status.success(),
            "qemu-img check {}: {}",
            image.display(),
            String::from_utf8_lossy(&output.stdout)
        );
    }

    /// `qemu-img compare` of a raw file and a qcow2 image (its backing chain included).
    fn same_content(&self, raw: &Path, qcow2: &Path) -> bool {
        let args = ["compare".as_ref(), "-f".as_ref(), "raw".as_ref(), "-F".as_ref(), "qcow2".as_ref()];
        let output = self.run(&[&args[..], &[raw.as_os_str(), qcow2.as_os_str()]].concat());
        match output.status.code() {
            Some(0) => true,
            Some(1) => false,
            _ => panic!("qemu-img compare: {}", String::from_utf8_lossy(&output.stderr)),
        }
    }

    /// Bytes the image itself (depth 0) says hold data, from `qemu-img map`.
    fn data_bytes(&self, image: &Path) -> u64 {
        let output =
            self.run(&["map".as_ref(), "--output=json".as_ref(), "-f".as_ref(), "qcow2".as_ref(), image.as_os_str()]);
        assert!(output.status.success(), "qemu-img map: {}", String::from_utf8_lossy(&output.stderr));
        // Each range is one JSON object; sum "length" where "data": true and "depth": 0.
        let text = String::from_utf8(output.stdout).unwrap();
        text.split('}')
            .filter(|range| range.contains("\"data\": true") && range.contains("\"depth\": 0"))
            .map(|range| {
                let at = range.find("\"length\": ").unwrap() + "\"length\": ".len();
                range[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<u64>().unwrap()
            })
            .sum()
    }
}

fn raw_backing(options: &mut Qcow2Options) {
    *options = options.clone().with_backing("base.raw", "raw");
}

/// Content with zero stretches of every shape: whole clusters, part of a
/// cluster, the start and the end.
fn content(len: usize, seed: u64, cluster: usize) -> Vec<u8> {
    let mut bytes = pattern(len, seed);
    let mut at = cluster / 2;
    while at < len {
        let run = (cluster * ((at / cluster) % 3 + 1)).min(len - at);
        bytes[at..at + run].fill(0);
        at += run + cluster + 7;
    }
    bytes[..len.min(100)].fill(0);
    bytes
}

/// A raw source, a backing file of noise under it, the conversion with
/// the backing file set: qemu-img must find the image identical to the source.
fn check_conversion(qemu: &QemuImg, dir: &Path, source: &[u8], cluster: u32) -> Result<(), TestCaseError> {
    let raw = dir.join("source.raw");
    fs::write(&raw, source).unwrap();
    // Non-zero everywhere, and longer than the image: any cluster that read
    // through would differ from the source.
    fs::write(dir.join("base.raw"), pattern(source.len() + 4096, 99).iter().map(|b| b | 1).collect::<Vec<u8>>())
        .unwrap();
    let image = dir.join("image.qcow2");
    let mut opts = Qcow2Options::default().with_cluster_size(cluster);
    raw_backing(&mut opts);
    let summary = convert_to_qcow2(&raw, &image, &opts).unwrap();
    let nonzero = source.chunks(cluster as usize).filter(|c| c.iter().any(|&b| b != 0)).count() as u64;
    prop_assert_eq!(summary.data_clusters, nonzero);
    qemu.check(&image);
    prop_assert!(qemu.same_content(&raw, &image), "the image reads differently from its source");
    // Zero clusters take no data: only the source's non-zero clusters do.
    prop_assert_eq!(qemu.data_bytes(&image).div_ceil(u64::from(cluster)), nonzero);
    Ok(())
}

#[test]
fn converted_images_over_a_backing_file_read_as_their_source() {
    let Some(qemu) = QemuImg::find() else { return };
    let strategy = (1usize..=3000, any::<u64>(), 9u32..=17, any::<bool>());
    let config = Config { cases: 16, failure_persistence: None, ..Config::default() };
    let result = TestRunner::new(config).run(&strategy, |(sectors, seed, cluster_bits, all_zero)| {
        let dir = tempfile::tempdir().unwrap();
        let cluster = 1usize << cluster_bits;
        let source = if all_zero { vec![0; sectors * 512] } else { content(sectors * 512, seed, cluster) };
        check_conversion(&qemu, dir.path(), &source, cluster as u32)
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

#[test]
fn fat_written_as_qcow2_over_a_backing_file_reads_as_the_volume() {
    let Some(qemu) = QemuImg::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut data = pattern(300_000, 4);
    data[70_000..270_000].fill(0);
    let case = Case::new().file("data.bin", data).file("etc/motd", *b"hello\n");
    let layout = case.tree.layout(&options().with_size(8 << 20)).unwrap();
    let raw = dir.path().join("volume.raw");
    layout.write_file(&raw, None).unwrap();
    fs::write(dir.path().join("base.raw"), vec![0xa5u8; 8 << 20]).unwrap();
    let image = dir.path().join("volume.qcow2");
    let mut opts = Qcow2Options::default();
    raw_backing(&mut opts);
    layout.write_qcow2_file(&image, &opts, None).unwrap();
    qemu.check(&image);
    assert!(qemu.same_content(&raw, &image), "the backing file shows through the FAT volume");
}

#[test]
fn created_images_over_a_backing_file_stay_thin() {
    // The one writer that defines no content: everything reads through.
    let Some(qemu) = QemuImg::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    fs::write(&base, pattern(1 << 20, 5)).unwrap();
    let image = dir.path().join("thin.qcow2");
    let mut opts = Qcow2Options::default();
    raw_backing(&mut opts);
    create_qcow2(&image, 1 << 20, &opts).unwrap();
    qemu.check(&image);
    assert!(qemu.same_content(&base, &image));
    assert_eq!(qemu.data_bytes(&image), 0);
}
