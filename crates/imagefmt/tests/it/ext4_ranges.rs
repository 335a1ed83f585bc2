//! Files whose data is a byte range of a host file (a member of a cached,
//! uncompressed layer tar): whatever path the writer takes for them
//! (staged small files, `copy_file_range` with a source offset, files in
//! several runs), the image must be the one the same tree gives with each
//! file's bytes held in memory, and debugfs must read each file back equal
//! to its range.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_imagefmt::{Error, Ext4Options, Ext4Tree, Metadata};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

use crate::ext4::{assert_e2fsck_clean, run_debugfs, tools};
use crate::support::{first_difference, pattern};

/// A host "archive" of `len` patterned bytes.
fn archive(dir: &Path, len: usize) -> (Arc<Path>, Vec<u8>) {
    let bytes = pattern(len, 7);
    let path = dir.join("layer.tar");
    fs::write(&path, &bytes).unwrap();
    (Arc::from(path.as_path()), bytes)
}

/// Writes both trees (one from ranges, one from the same bytes in memory),
/// checks the images are the same bytes through both write paths, and
/// returns the path of the image made from ranges.
fn assert_same_images(dir: &Path, from_ranges: &Ext4Tree, from_memory: &Ext4Tree) -> PathBuf {
    let options = Ext4Options::default();
    let ranges_image = dir.join("ranges.ext4");
    let memory_image = dir.join("memory.ext4");
    from_ranges.layout(&options).unwrap().write_file(&ranges_image).unwrap();
    from_memory.layout(&options).unwrap().write_file(&memory_image).unwrap();
    let (ranges, memory) = (fs::read(&ranges_image).unwrap(), fs::read(&memory_image).unwrap());
    assert_eq!(first_difference(&ranges, &memory), None, "write_file of ranges differs from memory");
    let mut cursor = std::io::Cursor::new(Vec::new());
    from_ranges.layout(&options).unwrap().write_to(&mut cursor).unwrap();
    assert_eq!(first_difference(cursor.get_ref(), &memory), None, "write_to of ranges differs from memory");
    ranges_image
}

#[test]
fn files_made_of_ranges_of_one_host_file_read_back_equal_to_those_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [0usize, 1, 100, 511, 4095, 4096, 4097, 12_289, 200_000, 262_144, 262_145, 1 << 20, 3 << 20];
    // Enough small ones to fill several staging chunks, each at an odd offset.
    let mut members: Vec<(String, usize, usize)> = Vec::new();
    let mut offset = 0;
    for round in 0..30 {
        for (index, &size) in sizes.iter().enumerate() {
            let size = size + round % 3;
            members.push((format!("d{round:02}/f{index:02}"), offset + 512 + round, size));
            offset += 512 + round + size;
        }
    }
    let (tar, bytes) = archive(dir.path(), offset + 1000);
    let meta = Metadata::default().with_mtime(1_700_000_000, 5);
    let (mut from_ranges, mut from_memory) = (Ext4Tree::new(), Ext4Tree::new());
    for (dest, start, len) in &members {
        from_ranges.add_file_from_host_range(dest, &tar, *start as u64, *len as u64, meta).unwrap();
        from_memory.add_file_from_bytes(dest, bytes[*start..start + len].to_vec(), meta).unwrap();
    }
    let image = assert_same_images(dir.path(), &from_ranges, &from_memory);
    let Some((e2fsck, debugfs)) = tools() else { return };
    assert_e2fsck_clean(&e2fsck, &image);
    let out = dir.path().join("rdump");
    fs::create_dir(&out).unwrap();
    run_debugfs(&debugfs, &image, &format!("rdump / {}\n", out.display()));
    for (dest, start, len) in &members {
        let got = fs::read(out.join(dest)).unwrap();
        assert!(got == bytes[*start..start + len], "{dest} read back differs from its range");
    }
}

#[test]
fn a_range_file_bigger_than_a_block_group_is_copied_from_its_offset_in_every_run() {
    // 130 MiB cannot sit in one 128 MiB block group: several runs, the
    // per-run copy path. The host file is sparse, with data at both ends.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.tar");
    let start = 1_000_003u64;
    let len = 130u64 << 20;
    let file = fs::File::create(&path).unwrap();
    file.set_len(start + len + 10).unwrap();
    let head = pattern(70_000, 1);
    let tail = pattern(70_000, 2);
    file.write_all_at(&head, start).unwrap();
    file.write_all_at(&tail, start + len - tail.len() as u64).unwrap();
    file.write_all_at(b"not part of the file", start - 20).unwrap();
    let tar: Arc<Path> = Arc::from(path.as_path());
    let mut tree = Ext4Tree::new();
    tree.add_file_from_host_range("big", &tar, start, len, Metadata::default()).unwrap();
    let image = dir.path().join("image.ext4");
    tree.layout(&Ext4Options::default()).unwrap().write_file(&image).unwrap();
    let Some((e2fsck, debugfs)) = tools() else { return };
    assert_e2fsck_clean(&e2fsck, &image);
    let out = dir.path().join("big.out");
    run_debugfs(&debugfs, &image, &format!("dump /big {}\n", out.display()));
    let got = fs::read(&out).unwrap();
    assert_eq!(got.len() as u64, len);
    assert!(got[..head.len()] == head[..], "the head differs");
    assert!(got[got.len() - tail.len()..] == tail[..], "the tail differs");
    assert!(got[head.len()..got.len() - tail.len()].iter().all(|&b| b == 0), "the middle is not zeros");
}

#[test]
fn a_range_past_the_end_of_its_host_file_is_refused_when_added() {
    let dir = tempfile::tempdir().unwrap();
    let (tar, _) = archive(dir.path(), 1000);
    let mut tree = Ext4Tree::new();
    let err = tree.add_file_from_host_range("f", &tar, 900, 101, Metadata::default()).unwrap_err();
    assert!(err.to_string().contains("\"f\"") || err.to_string().contains("f:"), "{err}");
    assert!(err.to_string().contains("past the end"), "{err}");
    let err = tree.add_file_from_host_range("f", &tar, u64::MAX, 2, Metadata::default()).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    tree.add_file_from_host_range("f", &tar, 900, 100, Metadata::default()).unwrap();
}

#[test]
fn a_host_file_cut_short_after_ranges_were_added_is_refused_naming_it() {
    // A small member (the staged path) and a big one (copy_file_range).
    for (start, len) in [(100u64, 5000u64), (100, 2 << 20)] {
        let dir = tempfile::tempdir().unwrap();
        let (tar, _) = archive(dir.path(), (start + len) as usize + 10);
        let mut tree = Ext4Tree::new();
        tree.add_file_from_host_range("member", &tar, start, len, Metadata::default()).unwrap();
        fs::OpenOptions::new().write(true).open(&*tar).unwrap().set_len(start + len - 1).unwrap();
        let image = dir.path().join("image.ext4");
        let err = tree.layout(&Ext4Options::default()).unwrap().write_file(&image).unwrap_err();
        match &err {
            Error::SourceChanged { path, .. } => assert_eq!(path.as_path(), &*tar, "{err}"),
            other => panic!("{len} bytes: expected SourceChanged, got {other}"),
        }
        assert!(err.to_string().contains("layer.tar"), "{err}");
        assert!(!image.exists(), "a failed write leaves no image");
    }
}

#[test]
fn random_ranges_of_a_host_file_give_the_image_their_bytes_give() {
    let dir = tempfile::tempdir().unwrap();
    let (tar, bytes) = archive(dir.path(), 3 << 20);
    let total = bytes.len() as u64;
    let members = prop::collection::vec((0..total, prop_oneof![0..9000u64, 0..600_000u64]), 1..40);
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let mut runner = TestRunner::new(ProptestConfig::with_cases(cases));
    let checked_with_tools = std::cell::Cell::new(false);
    runner
        .run(&members, |members| {
            let (mut from_ranges, mut from_memory) = (Ext4Tree::new(), Ext4Tree::new());
            for (index, (start, len)) in members.iter().enumerate() {
                let len = (*len).min(total - start);
                let dest = format!("d{}/m{index}", index % 3);
                let meta = Metadata::default().with_mode(0o640).with_mtime(index as i64, 0);
                from_ranges.add_file_from_host_range(&dest, &tar, *start, len, meta).unwrap();
                let slice = bytes[*start as usize..(start + len) as usize].to_vec();
                from_memory.add_file_from_bytes(&dest, slice, meta).unwrap();
            }
            let case_dir = tempfile::tempdir_in(dir.path()).unwrap();
            let image = assert_same_images(case_dir.path(), &from_ranges, &from_memory);
            if !checked_with_tools.replace(true) {
                if let Some((e2fsck, _)) = tools() {
                    assert_e2fsck_clean(&e2fsck, &image);
                }
            }
            Ok(())
        })
        .unwrap();
}
