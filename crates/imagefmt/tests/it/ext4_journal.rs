//! The writable ext4 profile: a journal, mke2fs's inode count and exact
//! free space, on disks from 8 MiB to 128 GiB. Checked against e2fsprogs
//! (e2fsck, dumpe2fs, debugfs's logdump), against what `mke2fs -t ext4`
//! makes for the same size, and by the host kernel mounting it read-write.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_imagefmt::{Error, Ext4Options, Ext4Summary, Ext4Tree};

use proptest::prelude::*;
use proptest::test_runner::TestRunner;

use crate::ext4::{
    Case, Mounted, add_gen, assert_e2fsck_clean, check, dumpe2fs_facts, gen_tree, meta, run_debugfs, tools, within,
};
use crate::support::pattern;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn journaled(size: u64) -> Ext4Options {
    Ext4Options::default().with_journal(true).with_size(size)
}

fn a_few_files() -> Ext4Tree {
    let mut tree = Ext4Tree::new();
    tree.add_file_from_bytes("etc/hostname", b"kiln\n".to_vec(), meta(0o644)).unwrap();
    tree.add_file_from_bytes("srv/blob", pattern(300_000, 7), meta(0o600).with_owner(1000, 1000)).unwrap();
    tree.add_symlink("srv/latest", "blob", meta(0o777)).unwrap();
    tree
}

/// Writes `tree` with `options` to `dir/name`, returning the path and summary.
fn write(dir: &Path, name: &str, tree: &Ext4Tree, options: &Ext4Options) -> (PathBuf, Ext4Summary) {
    let path = dir.join(name);
    let layout = tree.layout(options).unwrap_or_else(|err| panic!("layout of {name}: {err}"));
    let summary = layout.write_file(&path).unwrap_or_else(|err| panic!("write of {name}: {err}"));
    (path, summary)
}

/// `mke2fs -t ext4` on a sparse file of `size`, with the features this
/// writer leaves out turned off, 4 KiB blocks and no reserved blocks.
fn mke2fs_made(dir: &Path, size: u64) -> Option<PathBuf> {
    let mke2fs = kiln_testkit::require_tool(&kiln_testkit::current_test_name(), "mke2fs")?;
    let path = dir.join(format!("mke2fs-{size}.ext4"));
    fs::File::create(&path).unwrap().set_len(size).unwrap();
    let out = Command::new(mke2fs)
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-O", "^resize_inode"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg(&path)
        .env("MKE2FS_CONFIG", "/etc/mke2fs.conf")
        .output()
        .unwrap();
    assert!(out.status.success(), "mke2fs failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(path)
}

fn number(facts: &BTreeMap<String, String>, key: &str) -> u64 {
    facts[key].parse().unwrap_or_else(|_| panic!("{key}: {:?}", facts[key]))
}

/// Blocks of `/lost+found` in an image, as debugfs reports its size.
fn lost_and_found_blocks(debugfs: &Path, image: &Path) -> u64 {
    let stat = run_debugfs(debugfs, image, "stat /lost+found\n");
    let size = stat.split("Size: ").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap();
    size.parse::<u64>().unwrap() / 4096
}

/// Bytes the image file really occupies on the host.
fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn journaled_disks_get_the_journal_inodes_and_free_blocks_mke2fs_gives_them() {
    let Some((e2fsck, debugfs)) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    // 128 GiB is the first size whose journal (1 GiB) needs an extent leaf block.
    for size in [8 * MIB, 64 * MIB, GIB, 10 * GIB, 64 * GIB, 128 * GIB] {
        let (ours, summary) = write(dir.path(), &format!("kiln-{size}.ext4"), &Ext4Tree::new(), &journaled(size));
        assert_e2fsck_clean(&e2fsck, &ours);
        assert!(allocated(&ours) < 8 * MIB, "{size}: {} bytes allocated", allocated(&ours));
        let Some(theirs) = mke2fs_made(dir.path(), size) else { return };
        let Some((facts, features)) = dumpe2fs_facts(&ours) else { return };
        let (mke2fs, _) = dumpe2fs_facts(&theirs).unwrap();
        assert!(features.contains("has_journal"), "{size}: {features:?}");
        for key in ["Block count", "Inode count", "Total journal blocks", "Total journal size", "Journal inode"] {
            assert_eq!(facts[key], mke2fs[key], "{size}: {key}");
        }
        assert_eq!(number(&facts, "Total journal blocks"), summary.journal_blocks, "{size}");
        assert_eq!(number(&facts, "Free blocks"), summary.free_blocks, "{size}");
        assert_eq!(number(&facts, "Free inodes"), u64::from(summary.free_inodes), "{size}");
        // Both used the same blocks but lost+found: mke2fs gives it 16 KiB, kiln one block.
        let extra = lost_and_found_blocks(&debugfs, &theirs) - lost_and_found_blocks(&debugfs, &ours);
        assert_eq!(number(&facts, "Free blocks"), number(&mke2fs, "Free blocks") + extra, "{size}: free blocks");
        // debugfs reads the journal superblock as it reads mke2fs's.
        let logdump = |image: &Path| run_debugfs(&debugfs, image, "logdump -S\n");
        assert_eq!(logdump(&ours), logdump(&theirs), "{size}: logdump -S");
        fs::remove_file(&ours).unwrap();
        fs::remove_file(&theirs).unwrap();
    }
}

#[test]
fn random_trees_on_journaled_disks_of_random_sizes_round_trip() {
    // Sizes from the smallest journaled disk to two groups and a bit,
    // crowded around the group boundary where a short last group is dropped.
    if tools().is_none() {
        return;
    }
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let blocks = prop_oneof![2048u64..32_000, 32_700u64..33_000, 65_000u64..66_000];
    let mut runner = TestRunner::new(ProptestConfig::with_cases(cases));
    runner
        .run(&(blocks, prop::collection::vec(gen_tree(), 0..3)), |(blocks, roots)| {
            let mut case = Case::new();
            for (i, root) in roots.iter().enumerate() {
                case = add_gen(case, &format!("top{i}"), root, 1);
            }
            let options = journaled(blocks * 4096);
            if let Err(Error::DoesNotFit { .. }) = case.tree.layout(&options) {
                return Ok(()); // a generated tree can outgrow a small disk
            }
            let (summary, _) = check(&case, &options);
            prop_assert!(summary.journal_blocks >= 1024 && summary.free_blocks > 0, "{summary:?}");
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_64_gib_disk_is_laid_out_and_written_in_seconds_and_stays_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.ext4");
    let target = path.clone();
    let started = Instant::now();
    let summary = within(Duration::from_secs(20), move || {
        a_few_files().layout(&journaled(64 * GIB)).unwrap().write_file(&target).unwrap()
    });
    let took = started.elapsed();
    println!("64 GiB journaled disk: laid out and written in {took:?}, {} bytes allocated", allocated(&path));
    assert_eq!((fs::metadata(&path).unwrap().len(), summary.image_bytes), (64 * GIB, 64 * GIB));
    assert_eq!((summary.groups, summary.inodes, summary.journal_blocks), (512, 4_194_304, 131_072));
    assert!(allocated(&path) < 8 * MIB, "{} bytes allocated", allocated(&path));
    let Some((e2fsck, debugfs)) = tools() else { return };
    assert_e2fsck_clean(&e2fsck, &path);
    let blob = run_debugfs(&debugfs, &path, "stat /srv/blob\n");
    assert!(blob.contains("Size: 300000"), "{blob}");
    // Inode tables are zero and say so; groups with no inode in use say
    // that too, so e2fsck and the kernel skip their tables.
    let Some(dumpe2fs) = kiln_testkit::require_tool(&kiln_testkit::current_test_name(), "dumpe2fs") else { return };
    let groups = String::from_utf8(Command::new(dumpe2fs).arg(&path).output().unwrap().stdout).unwrap();
    let flags = |group: u32| {
        let line = groups.lines().find(|line| line.starts_with(&format!("Group {group}: "))).unwrap();
        line[line.find('[').unwrap()..].to_owned()
    };
    assert_eq!(flags(0), "[ITABLE_ZEROED]");
    assert_eq!(flags(511), "[INODE_UNINIT, ITABLE_ZEROED]");
}

#[test]
fn a_journaled_disk_is_the_same_bytes_every_time_and_not_the_read_only_image() {
    let bytes = |options: &Ext4Options| {
        let mut out = std::io::Cursor::new(Vec::new());
        let tree = a_few_files();
        let layout = tree.layout(options).unwrap();
        layout.write_to(&mut out).unwrap();
        (layout.summary(), out.into_inner())
    };
    let (first, image) = bytes(&journaled(16 * MIB));
    let (_, again) = bytes(&journaled(16 * MIB));
    assert!(image == again, "two writes of one journaled disk differ");
    let (read_only, _) = bytes(&Ext4Options::default().with_size(16 * MIB));
    assert_ne!(first.uuid, read_only.uuid, "the writable disk has a UUID of its own");
    let (bigger, _) = bytes(&journaled(32 * MIB));
    assert_ne!(first.uuid, bigger.uuid, "the size is part of the derived UUID");
    // The journal superblock carries the filesystem's UUID, as mke2fs writes it.
    let journal_start = image.windows(4).position(|w| w == [0xC0, 0x3B, 0x39, 0x98]).unwrap();
    assert_eq!(journal_start % 4096, 0);
    assert_eq!(image[journal_start + 0x30..journal_start + 0x40], first.uuid);
}

#[test]
fn a_size_too_small_for_a_journal_is_refused_naming_it() {
    let err = a_few_files().layout(&journaled(4 * MIB)).unwrap_err();
    assert!(matches!(err, Error::InvalidSize { size, .. } if size == 4 * MIB), "{err:?}");
    assert!(err.to_string().contains(&(4 * MIB).to_string()), "{err}");
    a_few_files().layout(&journaled(8 * MIB)).unwrap();
}

#[test]
fn a_tree_too_big_for_a_journaled_disk_is_refused_naming_the_size() {
    let mut tree = a_few_files();
    tree.add_file_from_bytes("big", vec![1u8; 7 << 20], meta(0o644)).unwrap();
    let err = tree.layout(&journaled(8 * MIB)).unwrap_err();
    assert!(matches!(err, Error::DoesNotFit { size, .. } if size == 8 * MIB), "{err:?}");
    assert!(err.to_string().contains(&(8 * MIB).to_string()), "{err}");
    // Without the journal's 4 MiB it fits.
    tree.layout(&Ext4Options::default().with_size(8 * MIB)).unwrap();
}

#[test]
fn a_journaled_disk_without_a_size_holds_its_tree_and_a_journal() {
    let Some((e2fsck, _)) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let options = Ext4Options::default().with_journal(true);
    let (path, summary) = write(dir.path(), "auto.ext4", &a_few_files(), &options);
    assert_eq!((summary.image_bytes, summary.journal_blocks), (8 * MIB, 1024), "{summary:?}");
    assert_e2fsck_clean(&e2fsck, &path);
}

#[test]
fn a_read_only_image_over_16_groups_places_metadata_in_each_flex_group() {
    // 3 GiB is 24 groups: groups 16 to 23 keep their bitmaps and inode
    // tables at the start of group 16, and data placed across it skips them.
    let Some((e2fsck, debugfs)) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, summary) = write(dir.path(), "ro.ext4", &a_few_files(), &Ext4Options::default().with_size(3 * GIB));
    assert_eq!((summary.groups, summary.journal_blocks), (24, 0));
    assert_e2fsck_clean(&e2fsck, &path);
    let groups = run_debugfs(&debugfs, &path, "stats\n");
    let group_16 = groups.split(" Group 16: ").nth(1).unwrap();
    assert!(group_16.contains(&format!("block bitmap at {}", 16 * 32768)), "{group_16}");
}

#[test]
fn a_tree_of_480000_inodes_spreads_its_inode_tables_over_groups() {
    // The first slice kept every inode table in group 0 and refused this.
    let Some((e2fsck, _)) = tools() else { return };
    let mut tree = Ext4Tree::new();
    for i in 0..480_000 {
        tree.add_symlink(&format!("d{}/l{i}", i % 64), "t", meta(0)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, summary) = write(dir.path(), "many.ext4", &tree, &Ext4Options::default());
    assert!(summary.groups > 1 && summary.inodes >= 480_075, "{summary:?}");
    assert_e2fsck_clean(&e2fsck, &path);
}

/// `stat -f`'s free blocks of a mounted filesystem.
fn statfs_free(target: &Path) -> u64 {
    let out = Command::new("stat").args(["-f", "-c", "%f"]).arg(target).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
}

#[test]
fn the_host_kernel_mounts_a_journaled_disk_read_write_and_e2fsck_is_clean_after() {
    let test = kiln_testkit::current_test_name();
    if kiln_testkit::require_tools(&test, &["mount", "umount", "stat", "sync"]).is_none()
        || !kiln_testkit::require_root(&test, "a loop mount")
    {
        return;
    }
    let Some((e2fsck, debugfs)) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    // One group, journal after its metadata; 512 groups in 32 flex groups,
    // journal in four whole groups mid-disk.
    for size in [64 * MIB, 64 * GIB] {
        let (image, summary) = write(dir.path(), &format!("disk-{size}.ext4"), &a_few_files(), &journaled(size));
        let target = dir.path().join(format!("mnt-{size}"));
        fs::create_dir(&target).unwrap();
        let status =
            Command::new("mount").args(["-t", "ext4", "-o", "loop"]).arg(&image).arg(&target).status().unwrap();
        assert!(status.success(), "{size}: mount failed: {status}");
        let mounted = Mounted(target.clone());
        // The kernel's free count is the image's.
        assert_eq!(statfs_free(&target), summary.free_blocks, "{size}");
        assert_eq!(fs::read(target.join("srv/blob")).unwrap(), pattern(300_000, 7));
        for i in 0..300 {
            fs::write(target.join(format!("srv/new-{i}")), pattern(i * 37, i as u64)).unwrap();
        }
        fs::write(target.join("large"), pattern(5 << 20, 99)).unwrap();
        fs::remove_file(target.join("etc/hostname")).unwrap();
        assert!(Command::new("sync").status().unwrap().success());
        drop(mounted);
        assert_e2fsck_clean(&e2fsck, &image);
        // The kernel used the journal: it turned on the features it logs with.
        let Some((facts, _)) = dumpe2fs_facts(&image) else { return };
        assert!(facts["Journal features"].contains("journal_checksum_v3"), "{size}: {facts:?}");
        let out = dir.path().join("large.out");
        run_debugfs(&debugfs, &image, &format!("dump /large {}\n", out.display()));
        assert!(fs::read(&out).unwrap() == pattern(5 << 20, 99), "{size}: a file the kernel wrote reads back");
        fs::remove_file(&image).unwrap();
    }
}

#[test]
fn journaled_sizes_just_past_a_group_boundary_are_laid_out_and_clean() {
    // Past 128, 256 and 384 MiB the short last group is dropped, and
    // mke2fs's one inode per 4 KiB, counted for the whole size, was more
    // than the remaining groups' bitmaps hold.
    let dir = tempfile::tempdir().unwrap();
    for blocks in [33_368u64, 66_536, 99_538] {
        let (path, summary) = write(dir.path(), &format!("{blocks}.ext4"), &a_few_files(), &journaled(blocks * 4096));
        assert_eq!(summary.image_bytes, blocks * 4096, "{summary:?}");
        if let Some((e2fsck, _)) = tools() {
            assert_e2fsck_clean(&e2fsck, &path);
        }
        fs::remove_file(&path).unwrap();
    }
}
