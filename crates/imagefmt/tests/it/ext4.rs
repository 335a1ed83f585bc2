//! The ext4 writer, checked by e2fsprogs, which shares no code with it:
//! `e2fsck -fn` must find nothing, and `debugfs` reads every image back
//! (`rdump` for contents, link targets and times, `ls -l` for modes and
//! owners) to compare with the tree that went in.

use std::collections::BTreeMap;
use std::fs;
use std::io::Cursor;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_imagefmt::{Error, ErrorKind, Ext4Options, Ext4Summary, Ext4Tree, Metadata};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestRunner};

use crate::support::pattern;

/// What a reader should find at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Link(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Want {
    kind: Kind,
    /// Permission bits (07777).
    mode: u32,
    uid: u32,
    gid: u32,
}

/// A tree built twice in step: as an `Ext4Tree` and as what debugfs should show.
#[derive(Debug, Clone)]
struct Case {
    tree: Ext4Tree,
    expected: BTreeMap<String, Want>,
    /// File paths and the mtime each should carry.
    mtimes: BTreeMap<String, i64>,
}

impl Case {
    fn new() -> Case {
        Case { tree: Ext4Tree::new(), expected: BTreeMap::new(), mtimes: BTreeMap::new() }
    }

    fn dir(mut self, path: &str, meta: Metadata) -> Case {
        self.tree.add_dir(path, meta).unwrap_or_else(|err| panic!("add_dir({path:?}): {err}"));
        self.expect_parents(path);
        self.expected.insert(path.to_owned(), want(Kind::Dir, meta));
        self
    }

    fn file(mut self, path: &str, bytes: Vec<u8>, meta: Metadata) -> Case {
        self.tree
            .add_file_from_bytes(path, bytes.clone(), meta)
            .unwrap_or_else(|err| panic!("add_file({path:?}): {err}"));
        self.expect_parents(path);
        self.expected.insert(path.to_owned(), want(Kind::File(bytes), meta));
        self.mtimes.insert(path.to_owned(), meta.mtime);
        self
    }

    fn link(mut self, path: &str, target: &str, meta: Metadata) -> Case {
        self.tree.add_symlink(path, target, meta).unwrap_or_else(|err| panic!("add_symlink({path:?}): {err}"));
        self.expect_parents(path);
        self.expected.insert(path.to_owned(), want(Kind::Link(target.to_owned()), meta.with_mode(0o777)));
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

fn want(kind: Kind, meta: Metadata) -> Want {
    Want { kind, mode: meta.mode, uid: meta.uid, gid: meta.gid }
}

fn meta(mode: u32) -> Metadata {
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
fn check(case: &Case, options: &Ext4Options) -> (Ext4Summary, Vec<u8>) {
    let layout = case.tree.layout(options).unwrap_or_else(|err| panic!("layout failed: {err}"));
    let summary = layout.summary();
    let files = case.expected.values().filter(|w| matches!(w.kind, Kind::File(_))).count() as u64;
    let links = case.expected.values().filter(|w| matches!(w.kind, Kind::Link(_))).count() as u64;
    let dirs = case.expected.len() as u64 - files - links;
    assert_eq!((summary.files, summary.dirs, summary.symlinks), (files, dirs, links), "summary counts");
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
        let actual = read_back(&debugfs, &path, &out, case);
        assert_same_tree(&actual, &case.expected);
    }
    (summary, image)
}

pub(crate) fn assert_e2fsck_clean(e2fsck: &Path, image: &Path) {
    let out = Command::new(e2fsck).arg("-fn").arg(image).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "e2fsck -fn found problems ({}):\n{text}", out.status);
}

fn run_debugfs(debugfs: &Path, image: &Path, commands: &str) -> String {
    let script = image.with_extension("debugfs");
    fs::write(&script, commands).unwrap();
    let out = Command::new(debugfs).arg("-f").arg(&script).arg(image).output().unwrap();
    assert!(out.status.success(), "debugfs failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Everything debugfs sees: kinds, contents and targets from `rdump`,
/// modes and owners from `ls -l` of every directory. File mtimes are checked
/// here too, against `case.mtimes`.
fn read_back(debugfs: &Path, image: &Path, out: &Path, case: &Case) -> BTreeMap<String, Want> {
    fs::create_dir(out).unwrap();
    run_debugfs(debugfs, image, &format!("rdump / {}\n", out.display()));
    let mut found = BTreeMap::new();
    walk_dump(out, "", &mut found);
    for (path, mtime) in &case.mtimes {
        let seen = fs::symlink_metadata(out.join(path)).unwrap().mtime();
        assert_eq!(seen, *mtime, "mtime of {path}");
    }
    let dirs: Vec<String> = std::iter::once(String::new())
        .chain(found.iter().filter(|(_, k)| **k == Kind::Dir).map(|(p, _)| p.clone()))
        .collect();
    let commands: String = dirs.iter().map(|d| format!("ls -l \"/{d}\"\n")).collect();
    let listing = run_debugfs(debugfs, image, &commands);
    let mut owners = BTreeMap::new();
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
        let mode = u32::from_str_radix(fields[1], 8).unwrap();
        let (uid, gid) = (fields[3].parse().unwrap(), fields[4].parse().unwrap());
        let name = fields[8..].join(" ");
        let path = if current.is_empty() { name } else { format!("{current}/{name}") };
        owners.insert(path, (mode & 0o7777, uid, gid));
    }
    let lost = owners.remove("lost+found").expect("lost+found is missing");
    assert_eq!(lost, (0o700, 0, 0), "lost+found's mode and owner");
    found.remove("lost+found");
    found
        .into_iter()
        .map(|(path, kind)| {
            let (mode, uid, gid) = *owners.get(&path).unwrap_or_else(|| panic!("debugfs ls -l missed {path}"));
            (path, Want { kind, mode, uid, gid })
        })
        .collect()
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
        } else {
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
        Kind::Dir => "dir".into(),
        Kind::File(bytes) => bytes.len().to_string(),
        Kind::Link(target) => format!("link to {target}"),
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
    // and needs more than one 128 MiB extent. Sparse, so cheap to make.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big");
    let file = fs::File::create(&src).unwrap();
    file.set_len(140 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"head", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"tail", (140 << 20) - 4).unwrap();
    let mut case = Case::new();
    case.tree.add_file_from_path("big", &src, meta(0o644)).unwrap();
    let mut bytes = fs::read(&src).unwrap();
    case.expected.insert("big".into(), want(Kind::File(std::mem::take(&mut bytes)), meta(0o644)));
    case = case.file("after", b"placed after the big file".to_vec(), meta(0o644));
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
    assert_eq!(invalid_entry(&tree.add_dir("lost+found/x", meta(0o755)).unwrap_err()), "lost+found/x");
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
fn a_file_beyond_four_extents_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("huge");
    fs::File::create(&src).unwrap().set_len((512 << 20) + 1).unwrap();
    let err = Ext4Tree::new().add_file_from_path("var/huge", &src, meta(0o644)).unwrap_err();
    assert!(matches!(&err, Error::Ext4FileTooLarge { path, .. } if path == "var/huge"), "{err:?}");
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
enum Gen {
    File { size: usize, seed: u64, mode: u32 },
    Link(String),
    Dir(Vec<(String, Gen)>, u32),
}

fn gen_tree() -> impl Strategy<Value = Gen> {
    let size = prop_oneof![
        3 => 0usize..300,
        3 => prop::sample::select(vec![0usize, 1, 4095, 4096, 4097, 8191, 8192, 8193, 12288]),
        1 => 0usize..40_000,
    ];
    let mode = prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o4755, 0o2711, 0o444]);
    let file = (size, any::<u64>(), mode).prop_map(|(size, seed, mode)| Gen::File { size, seed, mode });
    let link = prop_oneof!["[a-z/.]{1,40}", "[a-z]{58,62}", "[a-z/]{100,300}"].prop_map(Gen::Link);
    let leaf = prop_oneof![4 => file, 1 => link];
    let name = "[a-zA-Z0-9_.-]{1,20}|[a-z]{250,255}";
    let dir_mode = prop::sample::select(vec![0o755u32, 0o700, 0o1777, 0o2755]);
    leaf.prop_recursive(4, 80, 10, move |inner| {
        (prop::collection::vec((name, inner), 0..10), dir_mode.clone()).prop_map(|(c, m)| Gen::Dir(c, m))
    })
}

fn add_gen(case: Case, path: &str, node: &Gen, depth: u32) -> Case {
    let owner = meta(0).with_owner(depth * 1000, depth).with_mtime(i64::from(depth) * 100_000, 0);
    match node {
        Gen::File { size, seed, mode } => case.file(path, pattern(*size, *seed), owner.with_mode(*mode)),
        Gen::Link(target) => case.link(path, target, owner),
        Gen::Dir(children, mode) => {
            let mut case = case.dir(path, owner.with_mode(*mode));
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
    runner
        .run(&prop::collection::vec(gen_tree(), 1..4), |roots| {
            let mut case = Case::new();
            for (i, root) in roots.iter().enumerate() {
                case = add_gen(case, &format!("top{i}"), root, 1);
            }
            check(&case, &Ext4Options::default());
            Ok(())
        })
        .unwrap();
}

/// `dumpe2fs -h`'s facts: block and inode counts, label, features.
fn dumpe2fs_facts(image: &Path) -> Option<(BTreeMap<String, String>, std::collections::BTreeSet<String>)> {
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
    let expected =
        "ext_attr filetype extent 64bit flex_bg sparse_super large_file huge_file dir_nlink extra_isize metadata_csum";
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

#[test]
fn more_inodes_than_the_first_group_can_table_is_refused() {
    let mut tree = Ext4Tree::new();
    for i in 0..480_000 {
        tree.add_symlink(&format!("d{}/l{i}", i % 64), "t", meta(0)).unwrap();
    }
    let err = tree.layout(&Ext4Options::default()).unwrap_err();
    assert!(matches!(err, Error::Ext4TooManyInodes { max: 480_000, .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::DoesNotFit);
}

/// Unmounts on drop, so a failed assertion leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
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
    fs::create_dir(&target).unwrap();
    let status = Command::new("mount").args(["-t", "ext4", "-o", "loop,ro"]).arg(&image).arg(&target).status().unwrap();
    assert!(status.success(), "mount failed: {status}");
    let mounted = Mounted(target.clone());
    for (path, want) in &case.expected {
        let host = fs::symlink_metadata(target.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!((host.mode() & 0o7777, host.uid(), host.gid()), (want.mode, want.uid, want.gid), "{path}");
        match &want.kind {
            Kind::Dir => assert!(host.is_dir(), "{path}"),
            Kind::File(bytes) => assert!(fs::read(target.join(path)).unwrap() == *bytes, "{path}: content"),
            Kind::Link(to) => assert_eq!(fs::read_link(target.join(path)).unwrap(), Path::new(to), "{path}"),
        }
    }
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
fn within<T: Send + 'static>(limit: std::time::Duration, body: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(body());
    });
    result.recv_timeout(limit).unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

/// A tree of one sparse host file of `bytes` (its content is not read by layout).
fn one_sparse_file(dir: &Path, bytes: u64) -> Ext4Tree {
    let src = dir.join(format!("sparse-{bytes}"));
    fs::File::create(&src).unwrap().set_len(bytes).unwrap();
    let mut tree = Ext4Tree::new();
    tree.add_file_from_path("big", &src, meta(0o644)).unwrap();
    tree
}

#[test]
fn automatic_sizes_just_past_a_group_boundary_are_found() {
    // Files whose automatic size lands a few blocks past a group's end,
    // where the short last group is dropped: sizing must grow past it, not
    // ask for the same size forever (126 MiB files hung before).
    let dir = tempfile::tempdir().unwrap();
    for blocks in (32_150..32_300).chain(64_900..65_000) {
        let tree = one_sparse_file(dir.path(), blocks * 4096);
        let summary = within(std::time::Duration::from_secs(30), move || {
            tree.layout(&Ext4Options::default()).map(|l| l.summary())
        })
        .unwrap_or_else(|err| panic!("{blocks} blocks: {err}"));
        assert!(summary.free_blocks > 0 && summary.free_blocks < summary.blocks, "{blocks} blocks: {summary:?}");
    }
    // One of them written and checked whole.
    let mut case = Case::new();
    let src = dir.path().join("sparse-132067328");
    case.tree.add_file_from_path("big", &src, meta(0o644)).unwrap();
    case.expected.insert("big".into(), want(Kind::File(fs::read(&src).unwrap()), meta(0o644)));
    check(&case, &Ext4Options::default());
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
