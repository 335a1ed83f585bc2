//! Hashed directories (`dir_index`), checked by readers that share no code
//! with the writer: `e2fsck -fn` verifies every index block, hash range and
//! checksum; `debugfs htree` walks the tree, hashing each name itself;
//! `debugfs ls` reads the blocks linearly, as a reader without `dir_index`
//! would; `debugfs dx_hash` hashes names on its own; the host kernel looks
//! names up through the index.
//!
//! Speed, measured on this machine (2 cores, shared, release build) for one
//! directory of 100,000 empty files named `file-with-a-long-name-NNNNNN`:
//! building the tree takes 0.2-0.3 s, layout 0.12-0.20 s, layout and
//! writing the image 0.31-0.39 s; `mke2fs -t ext4 -O ^has_journal -N 110000
//! -d` on the same files took 32 min wall clock (8 min CPU, the machine
//! shared), its linear directory growing one insert at a time.
//! `cargo xtask bench ext4` times it properly.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use kiln_imagefmt::{Ext4Options, Ext4Tree};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

use crate::ext4::{Case, Mounted, assert_e2fsck_clean, check, meta, run_debugfs, tools};

/// The seed the colliding names below were found under (0x5A × 16).
const COLLISION_SEED: [u8; 16] = [0x5A; 16];
const COLLISION_SEED_UUID: &str = "5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a5a";

/// Two 246-byte names with equal half_md4 hashes under [`COLLISION_SEED`],
/// found by hashing "c" × 240 followed by 0, 1, 2, … (the test checks
/// that debugfs agrees they collide).
fn colliding_pair() -> (String, String) {
    let prefix = "c".repeat(240);
    (format!("{prefix}134431"), format!("{prefix}176086"))
}

/// One name of each length from 1 to 255 bytes.
fn names_of_every_length() -> Vec<String> {
    let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyz0123456789".chars().collect();
    (1..=255usize).map(|len| (0..len).map(|i| alphabet[(i * 7 + len) % alphabet.len()]).collect()).collect()
}

/// 400 names with bytes over 0x7F, where half_md4 over signed and unsigned
/// chars differ (mke2fs on x86-64 and this writer use signed).
fn names_beyond_ascii() -> Vec<String> {
    (0..400).map(|i| format!("{}-{i}-{}", ["é", "日本語", "ß", "Ωμέγα", "ü"][i % 5], "ä".repeat(i % 7))).collect()
}

/// One hashed directory as `debugfs htree` shows it.
#[derive(Debug, Default)]
struct HtreeDump {
    indirect_levels: u32,
    /// The names in each leaf block, by logical block number.
    leaves: BTreeMap<u64, Vec<String>>,
}

impl HtreeDump {
    fn names(&self) -> Vec<&str> {
        self.leaves.values().flatten().map(String::as_str).collect()
    }
}

/// Parses `htree DIR` output for each directory in `dirs`, one debugfs run.
fn htree_dumps(debugfs: &Path, image: &Path, dirs: &[&str]) -> Vec<HtreeDump> {
    let commands: String = dirs.iter().map(|dir| format!("htree {dir}\n")).collect();
    let out = run_debugfs(debugfs, image, &commands);
    let mut dumps: Vec<HtreeDump> = Vec::new();
    let mut leaf: Option<u64> = None;
    for line in out.lines() {
        if line.starts_with("debugfs: htree") {
            dumps.push(HtreeDump::default());
            leaf = None;
            continue;
        }
        let Some(dump) = dumps.last_mut() else { continue };
        if let Some(levels) = line.trim().strip_prefix("Indirect levels: ") {
            dump.indirect_levels = levels.parse().unwrap();
        } else if let Some(rest) = line.strip_prefix("Reading directory block ") {
            let block = rest.split(',').next().unwrap().parse().unwrap();
            dump.leaves.insert(block, Vec::new());
            leaf = Some(block);
        } else if line.starts_with(['E', 'N', '-']) {
            // "Entry #", "Number of entries", the closing "-----" (blank
            // lines come inside leaves, before an entry too long to share one).
            leaf = None;
        } else if let Some(block) = leaf {
            // "INO 0xHASH-MINOR (REC_LEN) NAME" entries, several to a line,
            // and "leaf block checksum: 0x…" for the tail.
            let tokens: Vec<&str> = line.split_whitespace().collect();
            let mut at = 0;
            while at < tokens.len() {
                if tokens[at] == "leaf" {
                    at += 4;
                    continue;
                }
                assert!(tokens[at + 1].starts_with("0x") && tokens[at + 2].starts_with('('), "{line}");
                dump.leaves.get_mut(&block).unwrap().push(tokens[at + 3].to_owned());
                at += 4;
            }
        }
    }
    assert_eq!(dumps.len(), dirs.len(), "debugfs htree output:\n{out}");
    dumps
}

/// The names `ls -p DIR` lists (debugfs reading the blocks in order), less
/// `.`, `..` and unused entries (inode 0: the index nodes' empty entries).
fn listed_names(debugfs: &Path, image: &Path, dir: &str) -> Vec<String> {
    let out = run_debugfs(debugfs, image, &format!("ls -p {dir}\n"));
    // "/INO/MODE/UID/GID/NAME/SIZE/" per entry.
    out.lines()
        .filter_map(|line| line.strip_prefix('/'))
        .map(|line| line.split('/').collect::<Vec<_>>())
        .filter(|fields| fields[0] != "0" && fields[4] != "." && fields[4] != "..")
        .map(|fields| fields[4].to_owned())
        .collect()
}

/// `stat DIR`'s inode flags.
fn inode_flags(debugfs: &Path, image: &Path, dir: &str) -> u32 {
    let out = run_debugfs(debugfs, image, &format!("stat {dir}\n"));
    let flags = out.split("Flags: 0x").nth(1).unwrap().split_whitespace().next().unwrap();
    u32::from_str_radix(flags, 16).unwrap()
}

/// Asserts `found` holds each of `expected` once and nothing else, naming the differences.
fn assert_same_names<S: AsRef<str>>(found: &[S], expected: &[String], what: &str) {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for name in found {
        *seen.entry(name.as_ref()).or_default() += 1;
    }
    let missing: Vec<&String> = expected.iter().filter(|name| !seen.contains_key(name.as_str())).collect();
    let wanted: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    let extra: Vec<(&str, usize)> =
        seen.iter().filter(|(name, count)| **count > 1 || !wanted.contains(*name)).map(|(n, c)| (*n, *c)).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && found.len() == expected.len(),
        "{what}: {} names found, {} expected; missing {missing:?}; extra or repeated {extra:?}",
        found.len(),
        expected.len()
    );
}

fn write_image(tree: &Ext4Tree, options: &Ext4Options, path: &Path) {
    tree.layout(options).unwrap_or_else(|err| panic!("layout: {err}")).write_file(path).unwrap();
}

const INDEX_FLAG: u32 = 0x1000;

#[test]
fn directories_over_one_block_are_hashed_trees_that_e2fsck_and_debugfs_read() {
    let Some((e2fsck, debugfs)) = tools() else { return };
    let mut dirs: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    dirs.insert("one", (0..20).map(|i| format!("small-{i}")).collect());
    // 120 entries of 36 bytes overflow one block: the smallest hashed tree.
    dirs.insert("two", (0..120).map(|i| format!("file-with-a-long-name-{i:05}")).collect());
    dirs.insert("thousands", (0..4000).map(|i| format!("entry-{i}")).collect());
    dirs.insert("lengths", names_of_every_length());
    let mut case = Case::new();
    for (dir, names) in &dirs {
        for (i, name) in names.iter().enumerate() {
            case =
                case.file(&format!("{dir}/{name}"), if i % 50 == 0 { vec![b'x'; i] } else { Vec::new() }, meta(0o644));
        }
    }
    // e2fsck -fn, then rdump and ls -l compare every entry's content and metadata.
    check(&case, &Ext4Options::default());
    // Names beyond ASCII (which `check`'s `ls -l` parsing cannot take) in
    // the same image, for e2fsck and the htree and ls readings below.
    let mut tree = case.tree.clone();
    dirs.insert("utf8", names_beyond_ascii());
    for name in &dirs["utf8"] {
        tree.add_file_from_bytes(&format!("utf8/{name}"), Vec::new(), meta(0o644)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("dirs.ext4");
    write_image(&tree, &Ext4Options::default(), &image);
    assert_e2fsck_clean(&e2fsck, &image);
    assert_eq!(inode_flags(&debugfs, &image, "/one") & INDEX_FLAG, 0, "a one-block directory stays linear");
    let indexed = ["/two", "/thousands", "/lengths", "/utf8"];
    let dumps = htree_dumps(&debugfs, &image, &indexed);
    for (path, dump) in indexed.iter().zip(&dumps) {
        let names = &dirs[&path[1..]];
        assert_ne!(inode_flags(&debugfs, &image, path) & INDEX_FLAG, 0, "{path} is not flagged as indexed");
        assert_eq!(dump.indirect_levels, 0, "{path}");
        assert!(dump.leaves.len() >= 2, "{path}: {} leaves", dump.leaves.len());
        assert_same_names(&dump.names(), names, &format!("{path}: names in the htree's leaves"));
        assert_same_names(&listed_names(&debugfs, &image, path), names, &format!("{path}: ls"));
    }
    assert_eq!(dumps[0].leaves.len(), 2, "two blocks of entries make two leaves");
}

/// A tree with one directory, `big`, of `count` empty files.
fn one_big_directory(count: usize) -> (Ext4Tree, Vec<String>) {
    let mut tree = Ext4Tree::new();
    let names: Vec<String> = (0..count).map(|i| format!("file-with-a-long-name-{i:06}")).collect();
    for name in &names {
        tree.add_file_from_bytes(&format!("big/{name}"), Vec::new(), meta(0o644)).unwrap();
    }
    (tree, names)
}

#[test]
fn a_directory_of_100000_entries_is_a_two_level_tree_that_e2fsck_and_debugfs_read() {
    let Some((e2fsck, debugfs)) = tools() else { return };
    let (tree, names) = one_big_directory(100_000);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.ext4");
    let started = std::time::Instant::now();
    write_image(&tree, &Ext4Options::default(), &image);
    eprintln!("layout and write of 100,000 entries: {:?} (debug build)", started.elapsed());
    assert_e2fsck_clean(&e2fsck, &image);
    let dump = htree_dumps(&debugfs, &image, &["/big"]).pop().unwrap();
    assert_eq!(dump.indirect_levels, 1, "over 507 leaves need a level of index nodes");
    assert!(dump.leaves.len() > 507, "{} leaves", dump.leaves.len());
    assert_same_names(&dump.names(), &names, "names in the htree's leaves");
    assert_same_names(&listed_names(&debugfs, &image, "/big"), &names, "ls");
}

/// The names of the collision directory with `fillers` other entries.
fn collision_dir(fillers: usize) -> Vec<String> {
    let (first, second) = colliding_pair();
    let mut names: Vec<String> = (0..fillers).map(|i| format!("filler-{i:04}-{}", "f".repeat(i % 40))).collect();
    names.extend([first, second]);
    names
}

#[test]
fn equal_hashes_across_a_leaf_boundary_are_found_by_e2fsck_debugfs_and_the_kernel() {
    let Some((e2fsck, debugfs)) = tools() else { return };
    let (first, second) = colliding_pair();
    let dx_hash = |name: &str| {
        let out = run_debugfs_no_image(&debugfs, &format!("dx_hash -h half_md4 -s {COLLISION_SEED_UUID} {name}\n"));
        out.split(" is ").nth(1).unwrap().split_whitespace().next().unwrap().to_owned()
    };
    assert_eq!(dx_hash(&first), dx_hash(&second), "the pair collides under the seed, as debugfs hashes it");
    // Directories with different numbers of fillers place the leaf
    // boundaries differently; some put one between the pair.
    let counts: Vec<usize> = (120..260).collect();
    let mut tree = Ext4Tree::new();
    for &count in &counts {
        for name in collision_dir(count) {
            tree.add_file_from_bytes(&format!("c{count}/{name}"), Vec::new(), meta(0o644)).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("collisions.ext4");
    write_image(&tree, &Ext4Options::default().with_hash_seed(COLLISION_SEED), &image);
    assert_e2fsck_clean(&e2fsck, &image);
    let paths: Vec<String> = counts.iter().map(|count| format!("/c{count}")).collect();
    let dumps = htree_dumps(&debugfs, &image, &paths.iter().map(String::as_str).collect::<Vec<_>>());
    let leaf_of = |dump: &HtreeDump, name: &str| -> u64 {
        let leaf = dump.leaves.iter().find(|(_, names)| names.iter().any(|n| n == name));
        *leaf.unwrap_or_else(|| panic!("{}… is in no leaf debugfs htree shows", &name[..8])).0
    };
    let straddling: Vec<&String> = paths
        .iter()
        .zip(&dumps)
        .filter(|(_, dump)| leaf_of(dump, &first) != leaf_of(dump, &second))
        .map(|(path, _)| path)
        .collect();
    assert!(!straddling.is_empty(), "no directory put a leaf boundary between the colliding names");
    let test = kiln_testkit::current_test_name();
    if !kiln_testkit::require_root(&test, "a loop mount") {
        return;
    }
    let target = dir.path().join("mnt");
    let mounted = mount(&image, &target, "ro");
    for path in &straddling {
        for name in [&first, &second] {
            fs::symlink_metadata(target.join(&path[1..]).join(name))
                .unwrap_or_else(|err| panic!("the kernel does not find {path}/{}…: {err}", &name[..8]));
        }
    }
    drop(mounted);
}

/// debugfs with no filesystem open, for commands that need none (`dx_hash`).
fn run_debugfs_no_image(debugfs: &Path, commands: &str) -> String {
    let out = Command::new(debugfs).args(["-R", commands.trim_end()]).output().unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Loop-mounts `image` at `target` with `options`; unmounted on drop.
fn mount(image: &Path, target: &Path, options: &str) -> Mounted {
    fs::create_dir_all(target).unwrap();
    let status = Command::new("mount")
        .args(["-t", "ext4", "-o", &format!("loop,{options}")])
        .arg(image)
        .arg(target)
        .status()
        .unwrap();
    assert!(status.success(), "mount -o {options} failed: {status}");
    Mounted(target.to_owned())
}

#[test]
fn the_host_kernel_finds_every_name_in_hashed_directories_and_can_change_them() {
    let test = kiln_testkit::current_test_name();
    let Some((e2fsck, debugfs)) = tools() else { return };
    if kiln_testkit::require_tools(&test, &["mount", "umount"]).is_none()
        || !kiln_testkit::require_root(&test, "a loop mount")
    {
        return;
    }
    let (mut tree, names) = one_big_directory(100_000);
    let lengths: Vec<String> = names_of_every_length().into_iter().chain(names_beyond_ascii()).collect();
    for name in &lengths {
        tree.add_file_from_bytes(&format!("lengths/{name}"), name.as_bytes().to_vec(), meta(0o600)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lookup.ext4");
    // Room to grow: the kernel splits full leaves when entries are added.
    write_image(&tree, &Ext4Options::default().with_size(512 << 20), &image);
    for dir in ["/big", "/lengths"] {
        assert_ne!(inode_flags(&debugfs, &image, dir) & INDEX_FLAG, 0, "{dir} is not a hashed directory");
    }
    let target = dir.path().join("mnt");
    let mounted = mount(&image, &target, "ro");
    for name in &names {
        let found =
            fs::symlink_metadata(target.join("big").join(name)).unwrap_or_else(|err| panic!("big/{name}: {err}"));
        assert!(found.is_file() && found.len() == 0, "big/{name}");
    }
    for name in &lengths {
        assert_eq!(fs::read(target.join("lengths").join(name)).unwrap(), name.as_bytes(), "lengths/{name}");
    }
    let listed: BTreeSet<String> =
        fs::read_dir(target.join("big")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(listed.len(), names.len(), "readdir of big");
    drop(mounted);
    assert_e2fsck_clean(&e2fsck, &image);
    // Read-write (no journal): new names go into the full leaves, which split.
    let mounted = mount(&image, &target, "rw");
    let big = target.join("big");
    for i in (0..names.len()).step_by(97) {
        fs::hard_link(big.join(&names[i]), big.join(format!("added-{i}"))).unwrap();
        fs::remove_file(big.join(&names[i + 1])).unwrap();
    }
    for i in (0..names.len()).step_by(97) {
        assert_eq!(fs::symlink_metadata(big.join(format!("added-{i}"))).unwrap().nlink(), 2, "added-{i}");
        assert!(fs::symlink_metadata(big.join(&names[i + 1])).is_err(), "{} was removed", names[i + 1]);
    }
    drop(mounted);
    assert_e2fsck_clean(&e2fsck, &image);
}

#[test]
fn random_directories_under_random_seeds_are_clean_hashed_trees() {
    let Some((e2fsck, debugfs)) = tools() else { return };
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let mut runner = TestRunner::new(ProptestConfig::with_cases(cases));
    let name = "[a-zA-Z0-9_.é日-]{1,40}|[a-z]{200,255}";
    let strategy = (prop::collection::btree_set(name, 150..700), any::<[u8; 16]>());
    let indexed_cases = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&strategy, |(names, seed)| {
            let names: Vec<String> = names.into_iter().filter(|n| n != "." && n != "..").collect();
            let mut tree = Ext4Tree::new();
            for name in &names {
                tree.add_file_from_bytes(&format!("d/{name}"), Vec::new(), meta(0o644)).unwrap();
            }
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("random.ext4");
            write_image(&tree, &Ext4Options::default().with_hash_seed(seed), &image);
            assert_e2fsck_clean(&e2fsck, &image);
            let indexed = inode_flags(&debugfs, &image, "/d") & INDEX_FLAG != 0;
            if indexed {
                indexed_cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let dump = htree_dumps(&debugfs, &image, &["/d"]).pop().unwrap();
                assert_same_names(&dump.names(), &names, "names in the htree's leaves");
            }
            assert_same_names(&listed_names(&debugfs, &image, "/d"), &names, "ls");
            Ok(())
        })
        .unwrap();
    assert!(indexed_cases.into_inner() > 0, "no generated directory was big enough to be hashed");
}
