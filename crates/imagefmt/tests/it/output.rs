//! `write_file` as the filesystem sees it: reproducible, sparse, atomic,
//! with the right mode.

use std::fs;
use std::io::Cursor;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use kiln_imagefmt::{ErrorKind, FatOptions, FatTree, FatType};

use crate::support::{Case, first_difference, options, pattern};

fn image_of(tree: &FatTree, options: &FatOptions) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    tree.layout(options).unwrap().write_to(&mut out).unwrap();
    out.into_inner()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn same_inputs_give_identical_images() {
    let build = |reverse: bool| {
        let mut paths: Vec<(String, Vec<u8>)> =
            (0..40).map(|i| (format!("d{}/Name Number {i}.txt", i % 5), pattern(i * 300, i as u64))).collect();
        if reverse {
            paths.reverse();
        }
        let mut tree = FatTree::new();
        for (path, bytes) in paths {
            tree.add_file_from_bytes(&path, bytes).unwrap();
        }
        tree
    };
    for fat_type in [None, Some(FatType::Fat12), Some(FatType::Fat16), Some(FatType::Fat32)] {
        let opts = options().with_label("REPRO").with_epoch(1_700_000_000).with_fat_type(fat_type);
        let first = image_of(&build(false), &opts);
        let second = image_of(&build(false), &opts);
        assert!(first == second, "{fat_type:?}: two builds differ at {:?}", first_difference(&first, &second));
        let reordered = image_of(&build(true), &opts);
        assert!(
            first == reordered,
            "{fat_type:?}: insertion order changed the image at {:?}",
            first_difference(&first, &reordered)
        );
    }
    // The volume id is derived from the inputs, so different inputs get different ids.
    let a = build(false).layout(&options()).unwrap().summary().volume_id;
    let b = Case::new().file("other", *b"x").tree.layout(&options()).unwrap().summary().volume_id;
    assert_ne!(a, b, "volume id ignores the content");
}

/// Reproducible builds: where the sources sit on the host, and whether
/// they come from files or bytes, does not change the image.
#[test]
fn source_location_does_not_change_the_image() {
    let files =
        [("service", pattern(70_000, 1)), ("keystore/a.pem", pattern(900, 2)), ("launch", b"#!/bin/sh\n".to_vec())];
    let mut trees = Vec::new();
    for _ in 0..2 {
        let src = tempfile::tempdir().unwrap();
        for (path, bytes) in &files {
            let host = src.path().join(path);
            fs::create_dir_all(host.parent().unwrap()).unwrap();
            fs::write(host, bytes).unwrap();
        }
        let mut tree = FatTree::new();
        tree.add_host_path("", src.path()).unwrap();
        trees.push((tree, src));
    }
    let mut from_bytes = FatTree::new();
    for (path, bytes) in &files {
        from_bytes.add_file_from_bytes(path, bytes.clone()).unwrap();
    }
    let opts = options().with_label("SERVICEDISK");
    let first = image_of(&trees[0].0, &opts);
    let second = image_of(&trees[1].0, &opts);
    assert!(first == second, "two source directories, same content: differ at {:?}", first_difference(&first, &second));
    let bytes = image_of(&from_bytes, &opts);
    assert!(first == bytes, "host files and the same bytes: differ at {:?}", first_difference(&first, &bytes));
}

#[test]
fn write_file_is_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let case = Case::new().file("small", pattern(10_000, 1)).file("a/b/c", *b"c");
    for fat_type in [FatType::Fat16, FatType::Fat32] {
        let path = dir.path().join(format!("{fat_type}.img"));
        let opts = options().with_size(1 << 30).with_fat_type(fat_type);
        case.tree.layout(&opts).unwrap().write_file(&path, None).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        let allocated = meta.blocks() * 512;
        assert!(allocated < 1 << 20, "{fat_type}: a 1 GiB image with 10 KiB of data allocates {allocated} bytes");
        crate::support::check_with_tools(&path, &case, &opts);
    }
}

#[test]
fn modes_follow_secrecy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let mut case = Case::new().file("keystore/key", *b"secret");
    case.tree.mark_secret();
    case.tree.layout(&options()).unwrap().write_file(&path, None).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    // Rebuilding over it without secrets gives a fresh 0644 file.
    let public = Case::new().file("readme", *b"public");
    public.tree.layout(&options()).unwrap().write_file(&path, None).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
    assert_eq!(entries(dir.path()), ["disk.img"]);
}

/// A build that fails while writing leaves the directory as it was: no
/// image, no temporary file, and an older image at the path untouched.
#[test]
fn failed_builds_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("disk.img");
    let source = dir.path().join("service");

    type Spoil = fn(&Path);
    let spoilers: [(&str, Spoil); 3] = [
        ("removed", |p| fs::remove_file(p).unwrap()),
        ("grown", |p| fs::write(p, pattern(300_000, 9)).unwrap()),
        ("shrunk", |p| fs::write(p, pattern(1000, 9)).unwrap()),
    ];
    for (what, spoil) in spoilers {
        for existing in [false, true] {
            if existing {
                fs::write(&out, b"an older image").unwrap();
            } else {
                let _ = fs::remove_file(&out);
            }
            fs::write(&source, pattern(200_000, 8)).unwrap();
            let mut tree = FatTree::new();
            tree.add_file_from_bytes("launch", *b"#!/bin/sh\n").unwrap();
            tree.add_file_from_path("service", &source).unwrap();
            let layout = tree.layout(&options()).unwrap();
            spoil(&source);
            let err = layout.write_file(&out, None).expect_err(what);
            let expected_kind = if what == "removed" {
                [ErrorKind::Io, ErrorKind::SourceChanged]
            } else {
                [ErrorKind::SourceChanged; 2]
            };
            assert!(expected_kind.contains(&err.kind()), "{what}: {:?}: {err}", err.kind());
            assert!(err.to_string().contains(&source.display().to_string()), "{what}: error names the source: {err}");
            if existing {
                assert_eq!(entries(&out_dir), ["disk.img"], "{what}");
                assert_eq!(fs::read(&out).unwrap(), b"an older image", "{what}: the old image was touched");
            } else {
                assert!(entries(&out_dir).is_empty(), "{what}: left behind {:?}", entries(&out_dir));
            }
        }
    }
}

#[test]
fn unwritable_destination_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("no such dir").join("disk.img");
    let case = Case::new().file("f", *b"x");
    let err = case.tree.layout(&options()).unwrap().write_file(&out, None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(err.to_string().contains("disk.img"), "{err}");
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn a_directory_in_the_way_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("disk.img");
    fs::create_dir(&out).unwrap();
    let case = Case::new().file("f", *b"x");
    let err = case.tree.layout(&options()).unwrap().write_file(&out, None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(err.to_string().contains("disk.img"), "{err}");
    assert_eq!(entries(dir.path()), ["disk.img"], "only the directory that was there");
    assert!(out.is_dir());
}

#[test]
fn write_to_needs_no_file() {
    // A growing buffer, not pre-sized: the writer must produce the full length itself.
    let case = Case::new().file("f", pattern(5000, 5));
    let image = image_of(&case.tree, &options().with_size(8 << 20));
    assert_eq!(image.len(), 8 << 20);
    assert_eq!(kiln_testkit::read_fat_with_fatfs(&image).unwrap(), case.expected);
}
