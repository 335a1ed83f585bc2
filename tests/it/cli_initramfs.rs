//! `kiln image initramfs`: archives GNU cpio lists and extracts back into
//! the tree they came from, byte-identical whenever the tree is the same.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{assert_success, keys, kiln, kiln_json};
use crate::tools::{Cpio, Noise};

const EPOCH: i64 = 1_700_000_000;

/// What a tree entry is, as far as an initramfs keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: PathBuf },
    Fifo { mode: u32 },
}

/// Reads `root` recursively without following symlinks.
fn read_nodes(root: &Path) -> BTreeMap<String, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.strip_prefix(root).unwrap().to_str().unwrap().to_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let node = if meta.file_type().is_symlink() {
                Node::Symlink { target: fs::read_link(&path).unwrap() }
            } else if meta.is_dir() {
                walk(root, &path, out);
                Node::Dir { mode }
            } else if meta.is_file() {
                Node::File { mode, data: fs::read(&path).unwrap() }
            } else if meta.file_type().is_fifo() {
                Node::Fifo { mode }
            } else {
                panic!("unexpected file type at {}", path.display());
            };
            out.insert(name, node);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A tree with what an initramfs holds: executables, private files, a
/// sticky world-writable dir, empty files and dirs, odd names, symlinks
/// (relative, absolute, dangling, to a directory) and, when `mkfifo`
/// exists, a FIFO. Entries are created in `reverse` order on request, so
/// two copies differ in inode numbers and directory order.
fn make_tree(root: &Path, reverse: bool) {
    let big = {
        let mut data = Noise::new(9).bytes(300_000);
        data[1000..100_000].fill(0);
        data
    };
    type Step<'a> = Box<dyn Fn(&Path) + 'a>;
    let file = |path: &'static str, data: Vec<u8>, mode: u32| -> Step<'_> {
        Box::new(move |root: &Path| {
            let at = root.join(path);
            fs::create_dir_all(at.parent().unwrap()).unwrap();
            fs::write(&at, &data).unwrap();
            fs::set_permissions(&at, fs::Permissions::from_mode(mode)).unwrap();
        })
    };
    let dir = |path: &'static str, mode: u32| -> Step<'_> {
        Box::new(move |root: &Path| {
            let at = root.join(path);
            fs::create_dir_all(&at).unwrap();
            fs::set_permissions(&at, fs::Permissions::from_mode(mode)).unwrap();
        })
    };
    let link = |path: &'static str, target: &'static str| -> Step<'_> {
        Box::new(move |root: &Path| {
            let at = root.join(path);
            fs::create_dir_all(at.parent().unwrap()).unwrap();
            symlink(target, at).unwrap();
        })
    };
    let mut steps: Vec<Step<'_>> = vec![
        dir("bin", 0o755),
        file("bin/init", b"#!/bin/sh\nexec /bin/service\n".to_vec(), 0o755),
        file("bin/service", big.clone(), 0o750),
        link("init", "bin/init"),
        dir("etc", 0o755),
        file("etc/hostname", b"kiln\n".to_vec(), 0o644),
        file("etc/shadow", b"root:*:19000::::::\n".to_vec(), 0o600),
        file("etc/empty", Vec::new(), 0o444),
        link("etc/mtab", "/proc/self/mounts"),
        dir("tmp", 0o1777),
        dir("empty-dir", 0o700),
        dir("usr/lib/deep/er", 0o755),
        file("usr/lib/deep/er/odd name ü.txt", b"unicode and spaces\n".to_vec(), 0o640),
        file("usr/lib/deep/er/three", b"123".to_vec(), 0o644),
        link("lib", "usr/lib"),
        link("dangling", "does/not/exist"),
        file("sbin/setuid-tool", b"\x7fELF".to_vec(), 0o4755),
    ];
    if reverse {
        steps.reverse();
    }
    for step in &steps {
        step(root);
    }
    // Directories created as parents of later steps got the umask's mode: set them last.
    for (path, mode) in [("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("usr", 0o755), ("sbin", 0o711)] {
        fs::set_permissions(root.join(path), fs::Permissions::from_mode(mode)).unwrap();
    }
    if let Some(mkfifo) = kiln_testkit::find_tool("mkfifo") {
        assert!(Command::new(mkfifo).arg(root.join("etc/initctl")).status().unwrap().success());
    }
}

fn build(src: &Path, out: &Path, compress: &str) -> serde_json::Map<String, serde_json::Value> {
    let report = kiln_json([
        OsStr::new("image"),
        OsStr::new("initramfs"),
        src.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
        OsStr::new("--compress"),
        OsStr::new(compress),
        OsStr::new("--epoch"),
        OsStr::new(&EPOCH.to_string()),
        OsStr::new("--json"),
    ]);
    assert_eq!(
        keys(&report),
        ["archive_bytes", "compression", "elapsed_ms", "entries", "file_bytes", "format", "path"]
    );
    assert_eq!(report["path"], out.to_str().unwrap());
    assert_eq!(report["format"], "cpio");
    assert_eq!(report["compression"], compress);
    assert_eq!(report["file_bytes"], fs::metadata(out).unwrap().len());
    report
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

#[test]
fn cpio_lists_and_extracts_the_input_tree() {
    let Some(cpio) = Cpio::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("root");
    make_tree(&src, false);
    let expected = read_nodes(&src);

    for compress in ["none", "gzip"] {
        let archive = dir.path().join(format!("initramfs.{compress}"));
        let report = build(&src, &archive, compress);
        let bytes = fs::read(&archive).unwrap();
        let plain = if compress == "gzip" {
            assert_eq!(&bytes[..2], [0x1f, 0x8b], "gzip magic");
            gunzip(&bytes)
        } else {
            bytes
        };
        assert_eq!(report["archive_bytes"], plain.len());
        assert_eq!(report["entries"], expected.len());

        let mut listed = cpio.list(&plain);
        listed.sort();
        let expected_names: Vec<&String> = expected.keys().collect();
        assert_eq!(listed.iter().collect::<Vec<_>>(), expected_names, "cpio -t lists every entry, once");

        let into = dir.path().join(format!("extracted-{compress}"));
        fs::create_dir(&into).unwrap();
        cpio.extract(&plain, &into);
        let extracted = read_nodes(&into);
        assert_eq!(extracted, expected, "cpio -idm gives back the tree ({compress})");
        // -m keeps the archive's mtime: every regular file carries the epoch.
        for (name, node) in &extracted {
            if matches!(node, Node::File { .. }) {
                assert_eq!(fs::metadata(into.join(name)).unwrap().mtime(), EPOCH, "{name}");
            }
        }
    }
}

#[test]
fn the_same_tree_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    make_tree(&first, false);
    // Built in the opposite order: other inode numbers, other readdir order, other mtimes.
    make_tree(&second, true);
    assert_eq!(read_nodes(&first), read_nodes(&second));

    for compress in ["none", "gzip"] {
        let a = dir.path().join(format!("a.{compress}"));
        let b = dir.path().join(format!("b.{compress}"));
        let again = dir.path().join(format!("again.{compress}"));
        build(&first, &a, compress);
        build(&second, &b, compress);
        build(&first, &again, compress);
        let a = fs::read(&a).unwrap();
        assert!(a == fs::read(&b).unwrap(), "{compress}: copies of a tree give identical archives");
        assert!(a == fs::read(&again).unwrap(), "{compress}: rebuilding gives an identical archive");
    }

    // The epoch is in the archive: a different one changes the bytes.
    let other = dir.path().join("other-epoch.cpio");
    assert_success(&kiln([
        OsStr::new("image"),
        OsStr::new("initramfs"),
        first.as_os_str(),
        OsStr::new("-o"),
        other.as_os_str(),
        OsStr::new("--compress"),
        OsStr::new("none"),
        OsStr::new("--epoch"),
        OsStr::new("5"),
    ]));
    assert!(fs::read(other).unwrap() != fs::read(dir.path().join("a.none")).unwrap());
}

#[test]
fn default_is_gzip_with_a_summary_line() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("root");
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::write(src.join("bin/init"), b"#!/bin/sh\n").unwrap();
    let out = dir.path().join("initrd.img");
    let stdout = assert_success(&kiln([
        OsStr::new("image"),
        OsStr::new("initramfs"),
        src.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
    ]));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with(&format!("Wrote {}: cpio (newc) 2 entries", out.display())), "{stdout}");
    let bytes = fs::read(&out).unwrap();
    assert_eq!(&bytes[..2], [0x1f, 0x8b], "gzip by default");
    assert!(gunzip(&bytes).starts_with(b"070701"), "a newc archive inside");
    assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o644);
}
