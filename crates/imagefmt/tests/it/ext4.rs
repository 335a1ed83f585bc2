//! The ext4 writer, checked by e2fsprogs, which shares no code with it:
//! `e2fsck -fn` must find nothing, and `debugfs` reads every image back
//! (`rdump` for contents, link targets and times, `ls -l` for modes, owners
//! and inode numbers, `stat` for device numbers, `ea_list`/`ea_get` for
//! xattrs) to compare with the tree that went in.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Cursor;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_imagefmt::{DeviceKind, Error, ErrorKind, Ext4Options, Ext4Summary, Ext4Tree, Metadata};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestRunner};

use crate::support::pattern;

/// What a reader should find at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File(Vec<u8>),
    Link(String),
    Device(DeviceKind, u32, u32),
    Fifo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Want {
    pub(crate) kind: Kind,
    /// Permission bits (07777).
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// A tree built twice in step: as an `Ext4Tree` and as what debugfs should show.
#[derive(Debug, Clone)]
pub(crate) struct Case {
    pub(crate) tree: Ext4Tree,
    pub(crate) expected: BTreeMap<String, Want>,
    /// File paths and the mtime each should carry.
    pub(crate) mtimes: BTreeMap<String, i64>,
    /// Hard links and the path each is another name of (never itself a link).
    pub(crate) hardlinks: BTreeMap<String, String>,
    /// Each inode's xattrs (by its first path), by full name.
    pub(crate) xattrs: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Regular files, symlinks and specials added (hard links not counted).
    counts: (u64, u64, u64),
}

impl Case {
    pub(crate) fn new() -> Case {
        Case {
            tree: Ext4Tree::new(),
            expected: BTreeMap::new(),
            mtimes: BTreeMap::new(),
            hardlinks: BTreeMap::new(),
            xattrs: BTreeMap::new(),
            counts: (0, 0, 0),
        }
    }

    pub(crate) fn dir(mut self, path: &str, meta: Metadata) -> Case {
        self.tree.add_dir(path, meta).unwrap_or_else(|err| panic!("add_dir({path:?}): {err}"));
        self.expect_parents(path);
        self.expected.insert(path.to_owned(), want(Kind::Dir, meta));
        self
    }

    pub(crate) fn file(mut self, path: &str, bytes: Vec<u8>, meta: Metadata) -> Case {
        self.tree
            .add_file_from_bytes(path, bytes.clone(), meta)
            .unwrap_or_else(|err| panic!("add_file({path:?}): {err}"));
        self.expect_file(path, bytes, meta)
    }

    /// A sparse file: `segments` of data in `size` bytes of holes.
    pub(crate) fn sparse(mut self, path: &str, size: u64, segments: Vec<(u64, Vec<u8>)>, meta: Metadata) -> Case {
        let mut bytes = vec![0u8; size as usize];
        for (offset, data) in &segments {
            bytes[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        self.tree
            .add_file_from_segments(path, size, segments, meta)
            .unwrap_or_else(|err| panic!("add_file_from_segments({path:?}): {err}"));
        self.expect_file(path, bytes, meta)
    }

    /// The host file `src`, whose content is read now to compare with.
    pub(crate) fn host_file(mut self, path: &str, src: &Path, meta: Metadata) -> Case {
        self.tree
            .add_file_from_path(path, src, meta)
            .unwrap_or_else(|err| panic!("add_file_from_path({path:?}): {err}"));
        self.expect_file(path, fs::read(src).unwrap(), meta)
    }

    fn expect_file(mut self, path: &str, bytes: Vec<u8>, meta: Metadata) -> Case {
        self.expect_parents(path);
        self.expected.insert(path.to_owned(), want(Kind::File(bytes), meta));
        self.mtimes.insert(path.to_owned(), meta.mtime);
        self.counts.0 += 1;
        self
    }

    pub(crate) fn link(mut self, path: &str, target: &str, meta: Metadata) -> Case {
        self.tree.add_symlink(path, target, meta).unwrap_or_else(|err| panic!("add_symlink({path:?}): {err}"));
        self.expect_parents(path);
        self.expected.insert(path.to_owned(), want(Kind::Link(target.to_owned()), meta.with_mode(0o777)));
        self.counts.1 += 1;
        self
    }

    pub(crate) fn device(mut self, path: &str, kind: DeviceKind, major: u32, minor: u32, meta: Metadata) -> Case {
        self.tree
            .add_device(path, kind, major, minor, meta)
            .unwrap_or_else(|err| panic!("add_device({path:?}): {err}"));
        self.expect_parents(path);
        self.expected.insert(path.to_owned(), want(Kind::Device(kind, major, minor), meta));
        self.counts.2 += 1;
        self
    }

    pub(crate) fn fifo(mut self, path: &str, meta: Metadata) -> Case {
        self.tree.add_fifo(path, meta).unwrap_or_else(|err| panic!("add_fifo({path:?}): {err}"));
        self.expect_parents(path);
        self.expected.insert(path.to_owned(), want(Kind::Fifo, meta));
        self.counts.2 += 1;
        self
    }

    pub(crate) fn hardlink(mut self, path: &str, existing: &str) -> Case {
        self.tree.add_hardlink(path, existing).unwrap_or_else(|err| panic!("add_hardlink({path:?}): {err}"));
        let first = self.hardlinks.get(existing).cloned().unwrap_or_else(|| existing.to_owned());
        self.expect_parents(path);
        let shared = self.expected[&first].clone();
        self.expected.insert(path.to_owned(), shared);
        if let Some(mtime) = self.mtimes.get(&first).copied() {
            self.mtimes.insert(path.to_owned(), mtime);
        }
        self.hardlinks.insert(path.to_owned(), first);
        self
    }

    pub(crate) fn xattr(mut self, path: &str, name: &str, value: &[u8]) -> Case {
        self.tree.set_xattr(path, name, value).unwrap_or_else(|err| panic!("set_xattr({path:?}, {name:?}): {err}"));
        let first = self.hardlinks.get(path).cloned().unwrap_or_else(|| path.to_owned());
        self.xattrs.entry(first).or_default().insert(name.to_owned(), value.to_vec());
        self
    }

    /// Parents not added explicitly are made with mode 0755, owner 0:0.
    fn expect_parents(&mut self, path: &str) {
        let mut at = 0;
        while let Some(slash) = path[at..].find('/') {
            let parent = path[..at + slash].to_owned();
            self.expected.entry(parent).or_insert_with(|| want(Kind::Dir, Metadata::default().with_mode(0o755)));
            at += slash + 1;
        }
    }
}

pub(crate) fn want(kind: Kind, meta: Metadata) -> Want {
    Want { kind, mode: meta.mode, uid: meta.uid, gid: meta.gid }
}

pub(crate) fn meta(mode: u32) -> Metadata {
    Metadata::default().with_mode(mode)
}

/// The tools, or `None` after `SKIPPED:` (a failure under `KILN_REQUIRE_TOOLS=1`).
pub(crate) fn tools() -> Option<(PathBuf, PathBuf)> {
    let test = kiln_testkit::current_test_name();
    let found = kiln_testkit::require_tools(&test, &["e2fsck", "debugfs"])?;
    Some((found[0].clone(), found[1].clone()))
}

/// Plans and writes `case` both ways, checks the bytes agree, then has
/// e2fsck check it and debugfs read it back. Returns the summary and the image.
pub(crate) fn check(case: &Case, options: &Ext4Options) -> (Ext4Summary, Vec<u8>) {
    let layout = case.tree.layout(options).unwrap_or_else(|err| panic!("layout failed: {err}"));
    let summary = layout.summary();
    let (files, links, specials) = case.counts;
    let hardlinks = case.hardlinks.len() as u64;
    let dirs = case.expected.len() as u64 - files - links - specials - hardlinks;
    assert_eq!(
        (summary.files, summary.dirs, summary.symlinks, summary.specials, summary.hardlinks),
        (files, dirs, links, specials, hardlinks),
        "summary counts"
    );
    let mut buffer = Cursor::new(Vec::new());
    layout.write_to(&mut buffer).unwrap_or_else(|err| panic!("write_to failed: {err}"));
    let image = buffer.into_inner();
    assert_eq!(image.len() as u64, summary.image_bytes, "write_to's length against the summary");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.ext4");
    let written = layout.write_file(&path).unwrap_or_else(|err| panic!("write_file failed: {err}"));
    assert_eq!(written, summary);
    assert!(fs::read(&path).unwrap() == image, "write_file and write_to disagree");
    if let Some((e2fsck, debugfs)) = tools() {
        assert_e2fsck_clean(&e2fsck, &path);
        let out = dir.path().join("rdump");
        let actual = read_back(&debugfs, &path, &out, case, options.lost_found);
        assert_same_tree(&actual, &case.expected);
    }
    (summary, image)
}

pub(crate) fn assert_e2fsck_clean(e2fsck: &Path, image: &Path) {
    let out = Command::new(e2fsck).arg("-fn").arg(image).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "e2fsck -fn found problems ({}):\n{text}", out.status);
}

pub(crate) fn run_debugfs(debugfs: &Path, image: &Path, commands: &str) -> String {
    let script = image.with_extension("debugfs");
    fs::write(&script, commands).unwrap();
    let out = Command::new(debugfs).arg("-f").arg(&script).arg(image).output().unwrap();
    assert!(out.status.success(), "debugfs failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// One line of debugfs's `ls -l`.
struct Listed {
    ino: u64,
    /// The whole mode, type bits included.
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Everything debugfs sees: kinds, contents and targets from `rdump`,
/// inode numbers, modes and owners from `ls -l` of every directory, device
/// numbers from `stat`, xattrs from `ea_list` and `ea_get`. File mtimes are
/// checked here too, against `case.mtimes`, and that hard links share
/// their target's inode. The writer's `/lost+found` (when `lost_found`)
/// is checked and set aside; without it, one in the image must be the case's.
fn read_back(debugfs: &Path, image: &Path, out: &Path, case: &Case, lost_found: bool) -> BTreeMap<String, Want> {
    fs::create_dir(out).unwrap();
    run_debugfs(debugfs, image, &format!("rdump / {}\n", out.display()));
    let mut found = BTreeMap::new();
    walk_dump(out, "", &mut found);
    for (path, mtime) in &case.mtimes {
        let seen = fs::symlink_metadata(out.join(path)).unwrap().mtime();
        assert_eq!(seen, *mtime, "mtime of {path}");
    }
    let mut listed = list_dirs(debugfs, image, &found);
    if lost_found {
        let lost = listed.remove("lost+found").expect("lost+found is missing");
        assert_eq!((lost.mode & 0o7777, lost.uid, lost.gid), (0o700, 0, 0), "lost+found's mode and owner");
        found.remove("lost+found");
    }
    read_specials(debugfs, image, &listed, &mut found);
    for (link, target) in &case.hardlinks {
        assert_eq!(listed[link].ino, listed[target].ino, "hard link {link} and {target} share an inode");
    }
    for (path, xattrs) in &case.xattrs {
        let wanted: BTreeMap<String, Vec<u8>> =
            xattrs.iter().map(|(name, value)| (name.clone(), same_acl_ids(name, value))).collect();
        let got = read_xattrs(debugfs, image, path, xattrs.keys());
        let got: BTreeMap<String, Vec<u8>> =
            got.iter().map(|(name, value)| (name.clone(), same_acl_ids(name, value))).collect();
        assert_eq!(got, wanted, "xattrs of {path}");
    }
    found
        .into_iter()
        .map(|(path, kind)| {
            let entry = listed.get(&path).unwrap_or_else(|| panic!("debugfs ls -l missed {path}"));
            (path, Want { kind, mode: entry.mode & 0o7777, uid: entry.uid, gid: entry.gid })
        })
        .collect()
}

/// `ls -l` of the root and every directory `rdump` found.
fn list_dirs(debugfs: &Path, image: &Path, found: &BTreeMap<String, Kind>) -> BTreeMap<String, Listed> {
    let dirs: Vec<String> = std::iter::once(String::new())
        .chain(found.iter().filter(|(_, k)| **k == Kind::Dir).map(|(p, _)| p.clone()))
        .collect();
    let commands: String = dirs.iter().map(|d| format!("ls -l \"/{d}\"\n")).collect();
    let listing = run_debugfs(debugfs, image, &commands);
    let mut listed = BTreeMap::new();
    let mut dirs = dirs.iter();
    let mut current = String::new();
    for line in listing.lines() {
        if line.starts_with("debugfs:") {
            current = dirs.next().cloned().unwrap_or_default();
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 9 || fields[8] == "." || fields[8] == ".." {
            continue;
        }
        let entry = Listed {
            ino: fields[0].parse().unwrap(),
            mode: u32::from_str_radix(fields[1], 8).unwrap(),
            uid: fields[3].parse().unwrap(),
            gid: fields[4].parse().unwrap(),
        };
        let name = fields[8..].join(" ");
        listed.insert(if current.is_empty() { name } else { format!("{current}/{name}") }, entry);
    }
    listed
}

/// Devices and fifos, which `rdump` skips: their kind from `ls -l`, device numbers from `stat`.
fn read_specials(debugfs: &Path, image: &Path, listed: &BTreeMap<String, Listed>, found: &mut BTreeMap<String, Kind>) {
    let mut devices = Vec::new();
    for (path, entry) in listed {
        match entry.mode & 0o170000 {
            0o010000 => {
                found.insert(path.clone(), Kind::Fifo);
            }
            0o020000 => devices.push((path.clone(), DeviceKind::Char)),
            0o060000 => devices.push((path.clone(), DeviceKind::Block)),
            _ => {}
        }
    }
    if devices.is_empty() {
        return;
    }
    let commands: String = devices.iter().map(|(path, _)| format!("stat \"/{path}\"\n")).collect();
    let stats = run_debugfs(debugfs, image, &commands);
    let numbers: Vec<(u32, u32)> = stats
        .lines()
        .filter_map(|line| line.split_once("Device major/minor number: "))
        .map(|(_, rest)| {
            let (major, minor) = rest.split_whitespace().next().unwrap().split_once(':').unwrap();
            (major.parse().unwrap(), minor.parse().unwrap())
        })
        .collect();
    assert_eq!(numbers.len(), devices.len(), "a device number per device:\n{stats}");
    for ((path, kind), (major, minor)) in devices.into_iter().zip(numbers) {
        found.insert(path, Kind::Device(kind, major, minor));
    }
}

/// `value` with the ids of ACL entries that name no one (user::, group::,
/// mask::, other::) set to 0: the kernel returns them as -1, e2fsprogs as 0,
/// and ext4 stores none.
pub(crate) fn same_acl_ids(name: &str, value: &[u8]) -> Vec<u8> {
    let mut value = value.to_vec();
    if name.starts_with("system.posix_acl_") && value.len() >= 4 {
        for entry in value[4..].chunks_exact_mut(8) {
            if !matches!(entry[0], 0x02 | 0x08) {
                entry[4..].fill(0);
            }
        }
    }
    value
}

/// The names `ea_list` shows for `path` (which must be exactly `names`), and
/// each value as `ea_get -f` writes it (ACLs in getxattr's form).
fn read_xattrs<'n>(
    debugfs: &Path,
    image: &Path,
    path: &str,
    names: impl Iterator<Item = &'n String>,
) -> BTreeMap<String, Vec<u8>> {
    let names: Vec<&String> = names.collect();
    let listing = run_debugfs(debugfs, image, &format!("ea_list \"/{path}\"\n"));
    let listed: BTreeSet<&str> = listing
        .lines()
        .filter(|line| line.starts_with("  "))
        .filter_map(|line| line.trim_start().split_once(" (").map(|(name, _)| name))
        .collect();
    assert_eq!(listed, names.iter().map(|n| n.as_str()).collect(), "ea_list of {path}:\n{listing}");
    let dir = image.with_extension("xattrs");
    fs::create_dir_all(&dir).unwrap();
    let commands: String = names
        .iter()
        .enumerate()
        .map(|(n, name)| format!("ea_get -f {}/{n} \"/{path}\" {name}\n", dir.display()))
        .collect();
    run_debugfs(debugfs, image, &commands);
    let values =
        names.iter().enumerate().map(|(n, name)| ((*name).clone(), fs::read(dir.join(n.to_string())).unwrap()));
    let values = values.collect();
    fs::remove_dir_all(&dir).unwrap();
    values
}

fn walk_dump(dir: &Path, prefix: &str, found: &mut BTreeMap<String, Kind>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let path = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let file_type = entry.file_type().unwrap();
        if file_type.is_symlink() {
            let target = fs::read_link(entry.path()).unwrap().into_os_string().into_string().unwrap();
            found.insert(path, Kind::Link(target));
        } else if file_type.is_dir() {
            walk_dump(&entry.path(), &path, found);
            found.insert(path, Kind::Dir);
        } else if file_type.is_file() {
            found.insert(path, Kind::File(fs::read(entry.path()).unwrap()));
        }
    }
}

fn assert_same_tree(actual: &BTreeMap<String, Want>, expected: &BTreeMap<String, Want>) {
    for (path, want) in expected {
        match actual.get(path) {
            None => panic!("{path} is missing from the image"),
            Some(got) if got.kind != want.kind => {
                panic!("{path}: different content or kind ({} bytes expected)", describe(&want.kind))
            }
            Some(got) => assert_eq!(got, want, "{path}: metadata"),
        }
    }
    let extra: Vec<_> = actual.keys().filter(|p| !expected.contains_key(*p)).collect();
    assert!(extra.is_empty(), "unexpected entries in the image: {extra:?}");
}

fn describe(kind: &Kind) -> String {
    match kind {
        Kind::File(bytes) => bytes.len().to_string(),
        Kind::Link(target) => format!("link to {target}"),
        other => format!("{other:?}"),
    }
}

#[test]
fn an_empty_tree_is_a_clean_filesystem() {
    let (summary, _) = check(&Case::new(), &Ext4Options::default());
    assert_eq!((summary.block_size, summary.groups), (4096, 1));
    assert!(summary.image_bytes <= 1 << 20, "an empty image stays small: {summary:?}");
}

#[test]
fn a_typical_tree_keeps_contents_modes_owners_and_links() {
    let mut case = Case::new()
        .dir("etc", meta(0o755).with_owner(0, 0).with_mtime(1_700_000_000, 0))
        .dir("tmp", meta(0o1777))
        .dir("home/user", meta(0o700).with_owner(1000, 100))
        .dir("srv/shared", meta(0o2775).with_owner(100_000, 200_000))
        .file("bin/su", pattern(3000, 1), meta(0o4755))
        .file("bin/wall", pattern(10, 2), meta(0o2755).with_owner(0, 5))
        .file("home/user/notes", b"hi\n".to_vec(), meta(0o600).with_owner(1000, 100).with_mtime(86_400, 0))
        .file("etc/late", b"after 2038\n".to_vec(), meta(0o644).with_mtime(4_102_444_800, 999_999_999))
        .link("etc/fast", "../bin/su", meta(0).with_owner(1000, 100))
        .link("etc/slow", &"a/".repeat(100), meta(0))
        .link("etc/longest-fast", &"f".repeat(59), meta(0))
        .link("etc/shortest-slow", &"s".repeat(60), meta(0))
        .link("etc/max", &"m".repeat(4095), meta(0));
    for size in [0usize, 1, 4095, 4096, 4097, 1 << 20, (1 << 20) + 1] {
        case = case.file(&format!("data/size_{size}"), pattern(size, size as u64), meta(0o644));
    }
    check(&case, &Ext4Options::default().with_label("kiln-root"));
}

#[test]
fn nanosecond_times_and_high_owner_bits_are_stored() {
    let Some((_, debugfs)) = tools() else { return };
    let stamp = meta(0o640).with_owner(70_000, 80_000).with_mtime(1_700_000_000, 123_456_789);
    let case = Case::new().file("f", b"x".to_vec(), stamp);
    check(&case, &Ext4Options::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.ext4");
    case.tree.layout(&Ext4Options::default()).unwrap().write_file(&path).unwrap();
    let stat = run_debugfs(&debugfs, &path, "stat /f\n");
    let extra = 123_456_789u32 << 2;
    assert!(stat.contains(&format!("mtime: 0x{:08x}:{extra:08x}", 1_700_000_000u32)), "{stat}");
    assert!(stat.contains("User: 70000") && stat.contains("Group: 80000"), "{stat}");
}

#[test]
fn a_directory_of_2000_entries_spans_several_blocks() {
    let mut case = Case::new();
    for i in 0..2000 {
        case = case.file(&format!("many/entry-with-a-longish-name-{i:05}"), Vec::new(), meta(0o644));
    }
    case = case.file("many/last", b"end".to_vec(), meta(0o644));
    check(&case, &Ext4Options::default());
}

#[test]
fn a_host_file_across_a_backup_superblock_is_split_into_extents() {
    // 140 MiB spans groups 0 and 1, whose start holds a backup superblock,
    // and needs more than one 128 MiB extent. Allocated but unwritten
    // (fallocate), so cheap to make, yet with no holes to skip.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big");
    let file = fs::File::create(&src).unwrap();
    rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, 140 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"head", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"tail", (140 << 20) - 4).unwrap();
    let case = Case::new().host_file("big", &src, meta(0o644)).file(
        "after",
        b"placed after the big file".to_vec(),
        meta(0o644),
    );
    let (summary, _) = check(&case, &Ext4Options::default());
    assert!(summary.groups >= 2, "{summary:?}");
}

#[test]
fn the_same_tree_twice_gives_identical_images() {
    let build = |extra: &str| {
        Case::new().file("a/b", pattern(5000, 3), meta(0o644).with_mtime(1_000_000, 0)).link("a/c", "b", meta(0)).file(
            extra,
            b"1".to_vec(),
            meta(0o600),
        )
    };
    let (first, image) = check(&build("x"), &Ext4Options::default());
    let (_, again) = check(&build("x"), &Ext4Options::default());
    assert!(image == again, "two writes of one tree differ");
    let (other, _) = check(&build("y"), &Ext4Options::default());
    assert_ne!(first.uuid, other.uuid, "the UUID is derived from the content");
    let fixed = [7u8; 16];
    let (given, _) = check(&build("x"), &Ext4Options::default().with_uuid(fixed));
    assert_eq!(given.uuid, fixed);
}

#[test]
fn a_fixed_size_is_honoured() {
    let case = Case::new().file("f", pattern(10_000, 4), meta(0o644));
    let (summary, _) = check(&case, &Ext4Options::default().with_size(64 << 20));
    assert_eq!(summary.image_bytes, 64 << 20);
    assert!(summary.free_blocks > 15_000, "{summary:?}");
}

fn invalid_entry(err: &Error) -> &str {
    match err {
        Error::InvalidExt4Entry { path, .. } => path,
        other => panic!("expected InvalidExt4Entry, got {other:?}"),
    }
}

#[test]
fn a_name_over_255_bytes_is_refused_naming_it() {
    let long = format!("dir/{}", "n".repeat(256));
    let err = Ext4Tree::new().add_file_from_bytes(&long, b"x".to_vec(), meta(0o644)).unwrap_err();
    assert_eq!(invalid_entry(&err), long);
    assert!(err.to_string().contains("256 bytes"), "{err}");
    Ext4Tree::new().add_dir(&"n".repeat(255), meta(0o755)).unwrap();
}

#[test]
fn dot_and_dot_dot_components_are_refused_naming_the_path() {
    for bad in ["a/../b", "..", "a/./b", "x/.."] {
        let err = Ext4Tree::new().add_file_from_bytes(bad, b"x".to_vec(), meta(0o644)).unwrap_err();
        assert_eq!(invalid_entry(&err), bad);
        let err = Ext4Tree::new().add_symlink(bad, "t", meta(0)).unwrap_err();
        assert_eq!(invalid_entry(&err), bad);
    }
    let err = Ext4Tree::new().add_file_from_bytes("a\0b", b"x".to_vec(), meta(0o644)).unwrap_err();
    assert_eq!(invalid_entry(&err), "a\0b");
}

#[test]
fn bad_symlinks_modes_and_reserved_names_are_refused() {
    let mut tree = Ext4Tree::new();
    assert_eq!(invalid_entry(&tree.add_symlink("l", "", meta(0)).unwrap_err()), "l");
    assert_eq!(invalid_entry(&tree.add_symlink("l", &"t".repeat(4096), meta(0)).unwrap_err()), "l");
    assert_eq!(invalid_entry(&tree.add_file_from_bytes("f", Vec::new(), meta(0o10644)).unwrap_err()), "f");
    let mut late = meta(0o644);
    late.mtime_nsec = 1_000_000_000;
    assert_eq!(invalid_entry(&tree.add_file_from_bytes("n", Vec::new(), late).unwrap_err()), "n");
    tree.add_file_from_bytes("f", Vec::new(), meta(0o644)).unwrap();
    assert!(matches!(tree.add_symlink("f", "x", meta(0)), Err(Error::AlreadyExists { path }) if path == "f"));
    assert!(matches!(tree.add_dir("f/g", meta(0o755)), Err(Error::NotADirectory { path }) if path == "f"));
    let err = tree.layout(&Ext4Options::default().with_label("seventeen-bytes!!")).unwrap_err();
    assert!(matches!(err, Error::InvalidLabel { .. }), "{err:?}");
}

#[test]
fn a_file_past_ext4s_16_tib_is_refused_naming_it() {
    // 2^32 - 1 blocks is the most an extent file holds (the kernel's s_maxbytes).
    let max = ((1u64 << 32) - 1) * 4096;
    let mut tree = Ext4Tree::new();
    tree.add_file_from_segments("var/largest", max, Vec::new(), meta(0o644)).unwrap();
    let err = tree.add_file_from_segments("var/huge", max + 1, Vec::new(), meta(0o644)).unwrap_err();
    assert!(matches!(&err, Error::Ext4FileTooLarge { path, max: m, .. } if path == "var/huge" && *m == max), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::DoesNotFit);
}

#[test]
fn a_tree_too_big_for_the_size_is_refused_and_nothing_is_written() {
    let mut tree = Ext4Tree::new();
    tree.add_file_from_bytes("big", vec![1u8; 2 << 20], meta(0o644)).unwrap();
    let err = tree.layout(&Ext4Options::default().with_size(1 << 20)).unwrap_err();
    assert!(matches!(err, Error::DoesNotFit { size, .. } if size == 1 << 20), "{err:?}");
    let err = tree.layout(&Ext4Options::default().with_size(1000)).unwrap_err();
    assert!(matches!(err, Error::InvalidSize { size: 1000, .. }), "{err:?}");
}

#[test]
fn a_source_that_changes_before_writing_leaves_no_image() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, b"twelve bytes").unwrap();
    let mut tree = Ext4Tree::new();
    tree.add_file_from_path("f", &src, meta(0o644)).unwrap();
    let layout = tree.layout(&Ext4Options::default()).unwrap();
    fs::write(&src, b"short").unwrap();
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let err = layout.write_file(&out.join("image.ext4")).unwrap_err();
    assert!(matches!(err, Error::SourceChanged { .. }), "{err:?}");
    assert_eq!(fs::read_dir(&out).unwrap().count(), 0, "a failed write left a file");
}

/// A generated tree: files are (size, seed) so shrinking stays cheap.
#[derive(Debug, Clone)]
pub(crate) enum Gen {
    File {
        size: usize,
        seed: u64,
        mode: u32,
        xattrs: Vec<GenXattr>,
    },
    /// Data segments as (gap before, length), then a hole of `tail` bytes.
    Sparse {
        segments: Vec<(u64, usize)>,
        tail: u64,
        seed: u64,
    },
    Link(String),
    Device {
        block: bool,
        major: u32,
        minor: u32,
    },
    Fifo,
    Dir(Vec<(String, Gen)>, u32, Vec<GenXattr>),
}

/// An xattr: which of `XATTR_NAMES`, the value's length and seed.
type GenXattr = (usize, usize, u64);

const XATTR_NAMES: [&str; 6] = [
    "user.a",
    "user.mime_type",
    "security.capability",
    "trusted.overlay.opaque",
    "security.selinux",
    "user.a-much-longer-name-for-an-attribute-value",
];

fn gen_xattrs() -> impl Strategy<Value = Vec<GenXattr>> {
    // Three of at most 1,200 bytes fit the inode and one block together.
    let len = prop_oneof![4 => 0usize..40, 1 => 40usize..1200];
    prop::collection::vec((0..XATTR_NAMES.len(), len, any::<u64>()), 0..4)
}

fn gen_sparse() -> impl Strategy<Value = Gen> {
    let few = prop::collection::vec((0u64..20_000, 1usize..9000), 0..8);
    // Enough one-block extents to fill the inode's four and spill into a tree.
    let many = prop::collection::vec((4096u64..8192, 1usize..100), 300..400);
    (prop_oneof![3 => few, 1 => many], 0u64..10_000, any::<u64>()).prop_map(|(segments, tail, seed)| Gen::Sparse {
        segments,
        tail,
        seed,
    })
}

pub(crate) fn gen_tree() -> impl Strategy<Value = Gen> {
    let size = prop_oneof![
        3 => 0usize..300,
        3 => prop::sample::select(vec![0usize, 1, 4095, 4096, 4097, 8191, 8192, 8193, 12288]),
        1 => 0usize..40_000,
    ];
    let mode = prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o4755, 0o2711, 0o444]);
    let file = (size, any::<u64>(), mode, gen_xattrs()).prop_map(|(size, seed, mode, xattrs)| Gen::File {
        size,
        seed,
        mode,
        xattrs,
    });
    let link = prop_oneof!["[a-z/.]{1,40}", "[a-z]{58,62}", "[a-z/]{100,300}"].prop_map(Gen::Link);
    let major = prop::sample::select(vec![0u32, 1, 8, 255, 256, 259, 4095]);
    let minor = prop::sample::select(vec![0u32, 1, 3, 255, 256, 65_536, (1 << 20) - 1]);
    let device = (any::<bool>(), major, minor).prop_map(|(block, major, minor)| Gen::Device { block, major, minor });
    let leaf = prop_oneof![8 => file, 2 => link, 1 => device, 1 => Just(Gen::Fifo), 2 => gen_sparse()];
    let name = "[a-zA-Z0-9_.-]{1,20}|[a-z]{250,255}";
    let dir_mode = prop::sample::select(vec![0o755u32, 0o700, 0o1777, 0o2755]);
    leaf.prop_recursive(4, 80, 10, move |inner| {
        (prop::collection::vec((name, inner), 0..10), dir_mode.clone(), gen_xattrs())
            .prop_map(|(c, m, x)| Gen::Dir(c, m, x))
    })
}

fn add_xattrs(mut case: Case, path: &str, xattrs: &[GenXattr]) -> Case {
    for (name, len, seed) in xattrs {
        case = case.xattr(path, XATTR_NAMES[*name], &pattern(*len, *seed));
    }
    case
}

pub(crate) fn add_gen(case: Case, path: &str, node: &Gen, depth: u32) -> Case {
    let owner = meta(0).with_owner(depth * 1000, depth).with_mtime(i64::from(depth) * 100_000, 0);
    match node {
        Gen::File { size, seed, mode, xattrs } => {
            let case = case.file(path, pattern(*size, *seed), owner.with_mode(*mode));
            add_xattrs(case, path, xattrs)
        }
        Gen::Sparse { segments, tail, seed } => {
            let mut at = 0;
            let mut data = Vec::new();
            for (n, (gap, len)) in segments.iter().enumerate() {
                data.push((at + gap, pattern(*len, seed + n as u64)));
                at += gap + *len as u64;
            }
            case.sparse(path, at + tail, data, owner.with_mode(0o640))
        }
        Gen::Link(target) => case.link(path, target, owner),
        Gen::Device { block, major, minor } => {
            let kind = if *block { DeviceKind::Block } else { DeviceKind::Char };
            case.device(path, kind, *major, *minor, owner.with_mode(0o660))
        }
        Gen::Fifo => case.fifo(path, owner.with_mode(0o620)),
        Gen::Dir(children, mode, xattrs) => {
            let mut case = add_xattrs(case.dir(path, owner.with_mode(*mode)), path, xattrs);
            let mut seen = std::collections::HashSet::new();
            for (name, child) in children {
                if name == "." || name == ".." || !seen.insert(name.clone()) {
                    continue;
                }
                case = add_gen(case, &format!("{path}/{name}"), child, depth + 1);
            }
            case
        }
    }
}

/// Adds hard links: each picks an entry that is not a directory and a
/// directory to put its new name in.
fn add_hardlinks(mut case: Case, links: &[(prop::sample::Index, prop::sample::Index)]) -> Case {
    let targets: Vec<String> = case
        .expected
        .iter()
        .filter(|(path, want)| want.kind != Kind::Dir && !case.hardlinks.contains_key(*path))
        .map(|(path, _)| path.clone())
        .collect();
    let dirs: Vec<String> = std::iter::once(String::new())
        .chain(case.expected.iter().filter(|(_, want)| want.kind == Kind::Dir).map(|(path, _)| path.clone()))
        .collect();
    if targets.is_empty() {
        return case;
    }
    for (n, (target, dir)) in links.iter().enumerate() {
        let dir = dir.get(&dirs);
        let path = if dir.is_empty() { format!("hardlink{n}") } else { format!("{dir}/hardlink{n}") };
        if !case.expected.contains_key(&path) {
            case = case.hardlink(&path, target.get(&targets).as_str());
        }
    }
    case
}

#[test]
fn a_root_lost_and_found_of_the_tree_is_refused_at_layout_unless_the_writer_leaves_its_own_out() {
    let mut tree = Ext4Tree::new();
    tree.add_file_from_bytes("lost+found/x", b"mine".to_vec(), meta(0o644)).unwrap();
    let err = tree.layout(&Ext4Options::default()).unwrap_err();
    assert_eq!(invalid_entry(&err), "lost+found", "{err}");
    assert!(err.to_string().contains("with_lost_found(false)"), "{err}");
    tree.layout(&Ext4Options::default().with_lost_found(false)).unwrap();
}

#[test]
fn without_lost_found_the_first_entry_is_inode_11_and_e2fsck_is_clean() {
    let Some((e2fsck, debugfs)) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let off = Ext4Options::default().with_lost_found(false);
    // Empty: the root is the only inode, yet 1 to 10 stay reserved and used.
    let empty = dir.path().join("empty.ext4");
    let summary = Ext4Tree::new().layout(&off).unwrap().write_file(&empty).unwrap();
    assert_eq!(summary.free_inodes, summary.inodes - 10, "inodes 1 to 10 in use, nothing else");
    assert_e2fsck_clean(&e2fsck, &empty);
    let listing = run_debugfs(&debugfs, &empty, "ls -l /\n");
    assert!(!listing.contains("lost+found"), "the writer made lost+found:\n{listing}");
    let mut tree = Ext4Tree::new();
    tree.add_file_from_bytes("a", b"first".to_vec(), meta(0o644)).unwrap();
    tree.add_dir("lost+found", meta(0o755).with_owner(7, 8)).unwrap();
    let image = dir.path().join("tree.ext4");
    tree.layout(&off).unwrap().write_file(&image).unwrap();
    assert_e2fsck_clean(&e2fsck, &image);
    let stat = run_debugfs(&debugfs, &image, "stat /a\nstat /lost+found\n");
    assert!(stat.contains("Inode: 11 "), "the first entry is not inode 11:\n{stat}");
    assert!(stat.contains("Inode: 12 ") && stat.contains("User:     7"), "lost+found is not the tree's:\n{stat}");
    if let Some((facts, _)) = dumpe2fs_facts(&image) {
        assert_eq!(facts["First inode"], "11");
    }
}

#[test]
fn random_trees_without_lost_found_round_trip_through_e2fsck_and_debugfs() {
    if tools().is_none() {
        return;
    }
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    let config = ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        source_file: Some(file!()),
        ..ProptestConfig::with_cases(cases)
    };
    let mut runner = TestRunner::new(config);
    runner
        .run(&(prop::collection::vec(gen_tree(), 0..3), any::<bool>()), |(roots, own)| {
            let mut case = Case::new();
            for (i, root) in roots.iter().enumerate() {
                // Sometimes the tree has a lost+found of its own, as an image may.
                let name = if i == 0 && own { "lost+found".to_owned() } else { format!("top{i}") };
                case = add_gen(case, &name, root, 1);
            }
            check(&case, &Ext4Options::default().with_lost_found(false));
            Ok(())
        })
        .unwrap();
}

#[test]
fn random_trees_round_trip_through_e2fsck_and_debugfs() {
    if tools().is_none() {
        return;
    }
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let config = ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        source_file: Some(file!()),
        ..ProptestConfig::with_cases(cases)
    };
    let mut runner = TestRunner::new(config);
    let links = prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..6);
    runner
        .run(&(prop::collection::vec(gen_tree(), 1..4), links), |(roots, links)| {
            let mut case = Case::new();
            for (i, root) in roots.iter().enumerate() {
                case = add_gen(case, &format!("top{i}"), root, 1);
            }
            check(&add_hardlinks(case, &links), &Ext4Options::default());
            Ok(())
        })
        .unwrap();
}

/// `dumpe2fs -h`'s facts: block and inode counts, label, features.
pub(crate) fn dumpe2fs_facts(image: &Path) -> Option<(BTreeMap<String, String>, std::collections::BTreeSet<String>)> {
    let test = kiln_testkit::current_test_name();
    let dumpe2fs = kiln_testkit::require_tool(&test, "dumpe2fs")?;
    let out = Command::new(dumpe2fs).arg("-h").arg(image).output().unwrap();
    assert!(out.status.success(), "dumpe2fs failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let facts: BTreeMap<String, String> = text
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let features = facts["Filesystem features"].split_whitespace().map(str::to_owned).collect();
    Some((facts, features))
}

fn assert_info_matches_dumpe2fs(info: &kiln_imagefmt::Ext4Info, image: &Path) {
    let Some((facts, features)) = dumpe2fs_facts(image) else { return };
    assert_eq!(info.blocks.to_string(), facts["Block count"]);
    assert_eq!(info.free_blocks.to_string(), facts["Free blocks"]);
    assert_eq!(info.inodes.to_string(), facts["Inode count"]);
    assert_eq!(info.free_inodes.to_string(), facts["Free inodes"]);
    assert_eq!(info.block_size.to_string(), facts["Block size"]);
    assert_eq!(info.label.clone().unwrap_or_else(|| "<none>".into()), facts["Filesystem volume name"]);
    let ours: std::collections::BTreeSet<String> = info.features.iter().cloned().collect();
    assert_eq!(ours, features, "feature names against dumpe2fs");
}

fn inspect_ext4(image: &Path) -> kiln_imagefmt::Ext4Info {
    match kiln_imagefmt::inspect(&mut fs::File::open(image).unwrap()) {
        Ok(kiln_imagefmt::ImageInfo::Ext4(info)) => info,
        other => panic!("not recognised as ext4: {other:?}"),
    }
}

#[test]
fn inspect_reads_back_what_the_writer_wrote() {
    let case = Case::new().file("a", pattern(9000, 5), meta(0o644)).link("b", "a", meta(0));
    let layout = case.tree.layout(&Ext4Options::default().with_label("KILNROOT")).unwrap();
    let summary = layout.summary();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.ext4");
    layout.write_file(&path).unwrap();
    let info = inspect_ext4(&path);
    assert_eq!(info.kind, "ext4");
    assert_eq!(info.label.as_deref(), Some("KILNROOT"));
    assert_eq!((info.uuid, info.block_size, info.blocks), (summary.uuid, 4096, summary.blocks));
    assert_eq!(
        (info.free_blocks, info.inodes, info.free_inodes),
        (summary.free_blocks, summary.inodes, summary.free_inodes)
    );
    assert_eq!(info.volume_bytes, summary.image_bytes);
    let expected = "ext_attr dir_index filetype extent 64bit flex_bg sparse_super large_file huge_file dir_nlink extra_isize metadata_csum";
    assert_eq!(info.features, expected.split(' ').collect::<Vec<_>>());
    assert_info_matches_dumpe2fs(&info, &path);
}

#[test]
fn inspect_reads_a_filesystem_mke2fs_made() {
    let Some(mke2fs) = kiln_testkit::require_tool(&kiln_testkit::current_test_name(), "mke2fs") else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("made.ext4");
    let out = Command::new(mke2fs)
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-L", "made-by-mke2fs"])
        .arg(&path)
        .arg("16M")
        .env("MKE2FS_CONFIG", "/etc/mke2fs.conf")
        .output()
        .unwrap();
    assert!(out.status.success(), "mke2fs failed: {}", String::from_utf8_lossy(&out.stderr));
    let info = inspect_ext4(&path);
    assert_eq!((info.kind, info.label.as_deref(), info.blocks), ("ext4", Some("made-by-mke2fs"), 4096));
    assert!(info.features.iter().any(|f| f == "has_journal"), "{:?}", info.features);
    assert_info_matches_dumpe2fs(&info, &path);
}

#[test]
fn inspect_refuses_an_ext4_superblock_whose_checksum_is_wrong() {
    let (_, mut image) = check(&Case::new(), &Ext4Options::default());
    image[1024 + 0x10] ^= 1; // free inodes count
    let err = kiln_imagefmt::inspect(&mut Cursor::new(&image)).unwrap_err();
    assert!(err.to_string().contains("checksum does not match"), "{err}");
}

#[test]
fn inodes_past_the_first_group_are_placed_and_counted() {
    // A fixed 130 MiB gives two groups sharing the inodes: the last ones
    // sit in the second group's table, and its bitmap and counts.
    let mut case = Case::new();
    for i in 0..60 {
        case = case.file(&format!("d{}/f{i}", i % 4), pattern(i * 100, i as u64), meta(0o644));
    }
    let (summary, _) = check(&case, &Ext4Options::default().with_size(130 << 20));
    let used = summary.inodes - summary.free_inodes;
    assert!(summary.groups == 2 && used > summary.inodes / 2, "{summary:?}");
}

/// Unmounts on drop, so a failed assertion leaves no mount behind.
pub(crate) struct Mounted(pub(crate) PathBuf);

/// Loop-mounts `image` read-only at `target` (made here) through the host kernel.
pub(crate) fn mount_read_only(image: &Path, target: &Path) -> Mounted {
    fs::create_dir(target).unwrap();
    let status = Command::new("mount").args(["-t", "ext4", "-o", "loop,ro"]).arg(image).arg(target).status().unwrap();
    assert!(status.success(), "mount failed: {status}");
    Mounted(target.to_path_buf())
}

/// What the kernel shows under `target` is `case`: kinds, modes, owners,
/// contents, link targets, device numbers, link counts and xattrs.
pub(crate) fn assert_kernel_sees(target: &Path, case: &Case) {
    let mut names: BTreeMap<&str, u64> = BTreeMap::new();
    for first in case.hardlinks.values() {
        *names.entry(first).or_insert(1) += 1;
    }
    for (path, want) in &case.expected {
        let at = target.join(path);
        let host = fs::symlink_metadata(&at).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!((host.mode() & 0o7777, host.uid(), host.gid()), (want.mode, want.uid, want.gid), "{path}");
        let file_type = host.file_type();
        match &want.kind {
            Kind::Dir => assert!(host.is_dir(), "{path}"),
            Kind::File(bytes) => assert!(fs::read(&at).unwrap() == *bytes, "{path}: content"),
            Kind::Link(to) => assert_eq!(fs::read_link(&at).unwrap(), Path::new(to), "{path}"),
            Kind::Fifo => assert!(std::os::unix::fs::FileTypeExt::is_fifo(&file_type), "{path}"),
            Kind::Device(kind, major, minor) => {
                let is_char = std::os::unix::fs::FileTypeExt::is_char_device(&file_type);
                assert_eq!(is_char, *kind == DeviceKind::Char, "{path}: kind");
                let rdev = host.rdev();
                assert_eq!((rustix::fs::major(rdev), rustix::fs::minor(rdev)), (*major, *minor), "{path}: rdev");
            }
        }
        if !host.is_dir() {
            let first = case.hardlinks.get(path).map_or(path.as_str(), String::as_str);
            assert_eq!(host.nlink(), names.get(first).copied().unwrap_or(1), "{path}: link count");
        }
    }
    for (path, xattrs) in &case.xattrs {
        let at = target.join(path);
        let mut listed = vec![0u8; 65536];
        let len = rustix::fs::llistxattr(&at, &mut listed[..]).unwrap();
        let listed: BTreeSet<&[u8]> = listed[..len].split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
        let wanted: BTreeSet<&[u8]> = xattrs.keys().map(|name| name.as_bytes()).collect();
        assert_eq!(listed, wanted, "{path}: xattr names the kernel lists");
        for (name, value) in xattrs {
            let mut got = vec![0u8; 65536];
            let len = rustix::fs::lgetxattr(&at, name.as_str(), &mut got[..])
                .unwrap_or_else(|e| panic!("{path} {name}: {e}"));
            let (got, value) = (same_acl_ids(name, &got[..len]), same_acl_ids(name, value));
            assert!(got == value, "{path}: xattr {name} as the kernel reads it");
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.0).status().is_ok_and(|status| status.success());
        if !unmounted {
            // Never leave a mount behind on the machine: detach it lazily, and fail the test.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            if !std::thread::panicking() {
                panic!("{} was busy at unmount: a test left a file open in it", self.0.display());
            }
        }
    }
}

#[test]
fn the_host_kernel_mounts_an_image_and_sees_the_tree() {
    let test = kiln_testkit::current_test_name();
    if kiln_testkit::require_tools(&test, &["mount", "umount"]).is_none()
        || !kiln_testkit::require_root(&test, "a loop mount")
    {
        return;
    }
    let case = Case::new()
        .dir("tmp", meta(0o1777).with_mtime(1_600_000_000, 500))
        .file("bin/su", pattern(5000, 9), meta(0o4755).with_mtime(-86_400, 42))
        .file("srv/data", pattern(70_000, 10), meta(0o640).with_owner(100_000, 70_000).with_mtime(4_102_444_800, 1))
        .link("etc/fast", "../bin/su", meta(0).with_owner(1000, 100))
        .link("etc/slow", &"s/".repeat(200), meta(0));
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.ext4");
    case.tree.layout(&Ext4Options::default()).unwrap().write_file(&image).unwrap();
    let target = dir.path().join("mnt");
    let mounted = mount_read_only(&image, &target);
    assert_kernel_sees(&target, &case);
    let times = |path: &str| {
        let host = fs::symlink_metadata(target.join(path)).unwrap();
        (host.mtime(), host.mtime_nsec())
    };
    assert_eq!(times("tmp"), (1_600_000_000, 500));
    assert_eq!(times("bin/su"), (-86_400, 42), "a time before 1970");
    assert_eq!(times("srv/data"), (4_102_444_800, 1), "a time after 2038");
    drop(mounted);
}

/// Runs `body` on its own thread and fails if it takes longer than
/// `limit`, so a sizing loop that never ends fails instead of hanging.
pub(crate) fn within<T: Send + 'static>(limit: std::time::Duration, body: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(body());
    });
    result.recv_timeout(limit).unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

/// A host file of `bytes`, allocated (fallocate) but unwritten: no holes,
/// yet cheap to make.
fn allocated_file(path: &Path, bytes: u64) {
    let file = fs::File::create(path).unwrap();
    rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, bytes).unwrap();
}

/// A tree of one host file of `bytes` with no holes. Layout reads no
/// content, so the file is removed again at once.
fn one_dense_file(dir: &Path, bytes: u64) -> Ext4Tree {
    let src = dir.join(format!("dense-{bytes}"));
    allocated_file(&src, bytes);
    let mut tree = Ext4Tree::new();
    tree.add_file_from_path("big", &src, meta(0o644)).unwrap();
    fs::remove_file(&src).unwrap();
    tree
}

#[test]
fn automatic_sizes_just_past_a_group_boundary_are_found() {
    // Files whose automatic size lands a few blocks past a group's end,
    // where the short last group is dropped: sizing must grow past it, not
    // ask for the same size forever (126 MiB files hung before).
    let dir = tempfile::tempdir().unwrap();
    for blocks in (32_150..32_300).chain(64_900..65_000) {
        let tree = one_dense_file(dir.path(), blocks * 4096);
        let summary = within(std::time::Duration::from_secs(30), move || {
            tree.layout(&Ext4Options::default()).map(|l| l.summary())
        })
        .unwrap_or_else(|err| panic!("{blocks} blocks: {err}"));
        assert!(summary.free_blocks > 0 && summary.free_blocks < summary.blocks, "{blocks} blocks: {summary:?}");
    }
    // One of them written and checked whole.
    let src = dir.path().join("dense-132067328");
    allocated_file(&src, 132_067_328);
    check(&Case::new().host_file("big", &src, meta(0o644)), &Ext4Options::default());
}

#[test]
fn a_last_group_too_short_for_its_backup_is_dropped() {
    // Group 6561 = 3^8 carries a backup superblock and descriptor table
    // (104 blocks): 64 blocks of it cannot hold that, so it is dropped
    // rather than counted with negative free space.
    let size = (6561 * 32768 + 64) * 4096;
    let tree = Case::new().file("f", b"x".to_vec(), meta(0o644)).tree;
    let summary = tree.layout(&Ext4Options::default().with_size(size)).unwrap().summary();
    assert_eq!((summary.groups, summary.blocks), (6561, 6561 * 32768), "{summary:?}");
    assert!(summary.free_blocks < summary.blocks, "{summary:?}");
}

#[test]
fn a_directory_with_more_than_65000_subdirectories_counts_as_many_links() {
    // ext4 counts at most 65,000 links; above that dir_nlink stores 1.
    let Some((e2fsck, debugfs)) = tools() else { return };
    let mut tree = Ext4Tree::new();
    for i in 0..65_001 {
        tree.add_dir(&format!("many/d{i}"), meta(0o755)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("many.ext4");
    tree.layout(&Ext4Options::default()).unwrap().write_file(&image).unwrap();
    assert_e2fsck_clean(&e2fsck, &image);
    let stat = run_debugfs(&debugfs, &image, "stat /many\n");
    assert!(stat.contains("Links: 1 "), "{stat}");
}

#[test]
fn times_ext4_cannot_store_are_refused_naming_the_entry() {
    for seconds in [i64::MAX, i64::MIN, -(1 << 31) - 1, (1 << 31) + 3 * (1 << 32)] {
        let mut tree = Ext4Tree::new();
        let err = tree.add_file_from_bytes("etc/stamp", b"x".to_vec(), meta(0o644).with_mtime(seconds, 0)).unwrap_err();
        assert_eq!(invalid_entry(&err), "etc/stamp", "{seconds}: {err}");
        assert!(err.to_string().contains("outside what ext4 stores"), "{err}");
    }
    // The edges themselves are accepted (debugfs's rdump decodes neither
    // pre-1970 nor post-2038 times; the kernel mount test reads both).
    let mut tree = Ext4Tree::new();
    for (name, seconds) in [("old", -(1 << 31)), ("new", (1 << 31) - 1 + 3 * (1 << 32))] {
        tree.add_file_from_bytes(name, b"x".to_vec(), meta(0o644).with_mtime(seconds, 0)).unwrap();
    }
    tree.layout(&Ext4Options::default()).unwrap();
}
