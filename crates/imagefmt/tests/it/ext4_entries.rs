//! Every entry kind the ext4 writer holds beyond files, directories and
//! symlinks: hard links, device nodes, fifos, xattrs, sparse and large
//! files with extent trees, and trees read from a host directory. Each
//! image is checked by `e2fsck -fn` and read back by `debugfs` (and, as
//! root, by the host kernel through a loop mount).

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use kiln_imagefmt::{DeviceKind, Error, Ext4Options, Ext4Tree};

use crate::ext4::{Case, assert_e2fsck_clean, assert_kernel_sees, check, meta, mount_read_only, run_debugfs, tools};
use crate::support::pattern;

/// An ACL as `getxattr` returns it: version 2, then (tag, perm, id) entries.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend(tag.to_le_bytes());
        out.extend(perm.to_le_bytes());
        out.extend(id.to_le_bytes());
    }
    out
}

/// user::rw-, user:1000:r--, group::r--, mask::r--, other::r--, with the
/// undefined id (-1) getxattr gives entries that name no one.
fn user_acl() -> Vec<u8> {
    let none = u32::MAX;
    acl(&[(0x01, 6, none), (0x02, 4, 1000), (0x04, 4, none), (0x10, 4, none), (0x20, 4, none)])
}

/// A `security.capability` value (v2): cap_net_bind_service permitted and effective.
fn capability() -> Vec<u8> {
    let mut value = vec![0u8; 20];
    value[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    value[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes());
    value
}

/// A tree with one of everything: hard links to a file, a symlink and a
/// device; devices on both sides of the old encoding's 255 limit; a fifo;
/// xattrs that fit the inode and ones that need the block; ACLs; a sparse
/// file with unaligned segments; an xattr on the root.
fn every_kind() -> Case {
    let big_value = pattern(3000, 7);
    Case::new()
        .file("bin/ping", pattern(5000, 1), meta(0o755).with_mtime(1_700_000_000, 5))
        .xattr("bin/ping", "security.capability", &capability())
        .hardlink("bin/ping-again", "bin/ping")
        .hardlink("sbin/ping", "bin/ping-again")
        .link("etc/fast", "../bin/ping", meta(0).with_owner(7, 8))
        .hardlink("etc/fast-too", "etc/fast")
        .device("dev/null", DeviceKind::Char, 1, 3, meta(0o666))
        .device("dev/sda1", DeviceKind::Block, 8, 1, meta(0o660).with_owner(0, 6))
        .device("dev/edge", DeviceKind::Char, 255, 255, meta(0o600))
        .device("dev/nvme0n1p1", DeviceKind::Block, 259, 65_536, meta(0o660))
        .device("dev/wide", DeviceKind::Char, 256, 0, meta(0o600))
        .device("dev/largest", DeviceKind::Char, 4095, (1 << 20) - 1, meta(0o600))
        .hardlink("dev/null-too", "dev/null")
        .fifo("run/initctl", meta(0o600).with_owner(1, 2))
        .dir("srv/shared", meta(0o2775).with_owner(1000, 1000))
        .xattr("srv/shared", "system.posix_acl_default", &user_acl())
        .xattr("srv/shared", "system.posix_acl_access", &user_acl())
        .xattr("srv/shared", "user.empty", b"")
        .file("srv/shared/notes", b"hello".to_vec(), meta(0o644))
        .xattr("srv/shared/notes", "user.mime_type", b"text/plain")
        .xattr("srv/shared/notes", "trusted.overlay.opaque", b"y")
        .xattr("srv/shared/notes", "user.big", &big_value)
        .xattr("srv/shared/notes", "security.selinux", b"system_u:object_r:var_t:s0\0")
        .xattr("dev/null", "trusted.on-a-device", b"ok")
        .xattr("", "security.selinux", b"system_u:object_r:root_t:s0\0")
        .sparse(
            "var/sparse",
            50_000,
            vec![(10, b"start".to_vec()), (20_000, pattern(9000, 3)), (49_999, b"!".to_vec())],
            meta(0o640),
        )
}

#[test]
fn every_entry_kind_is_e2fsck_clean_and_read_back_by_debugfs() {
    check(&every_kind(), &Ext4Options::default());
}

/// `debugfs stat` of each path, in order.
fn stats(image: &Path, paths: &[&str]) -> Option<Vec<String>> {
    let (_, debugfs) = tools()?;
    let commands: String = paths.iter().map(|p| format!("stat \"/{p}\"\n")).collect();
    let out = run_debugfs(&debugfs, image, &commands);
    let mut parts: Vec<String> = out.split("Inode: ").skip(1).map(str::to_owned).collect();
    assert_eq!(parts.len(), paths.len(), "{out}");
    parts.iter_mut().for_each(|p| p.insert_str(0, "Inode: "));
    Some(parts)
}

fn write(tree: &Ext4Tree, dir: &Path) -> std::path::PathBuf {
    let image = dir.join("image.ext4");
    tree.layout(&Ext4Options::default()).unwrap().write_file(&image).unwrap();
    if let Some((e2fsck, _)) = tools() {
        assert_e2fsck_clean(&e2fsck, &image);
    }
    image
}

#[test]
fn hard_links_share_one_inode_counted_once_with_a_link_per_name() {
    let case = every_kind();
    let dir = tempfile::tempdir().unwrap();
    let image = write(&case.tree, dir.path());
    let summary = case.tree.layout(&Ext4Options::default()).unwrap().summary();
    // Inodes 1 to 11 (the reserved ones, the root, lost+found), then 8
    // directories, 3 files, 1 symlink and 7 devices and fifos: no inode per link.
    assert_eq!(summary.inodes - summary.free_inodes, 11 + 8 + 3 + 1 + 7, "{summary:?}");
    let Some(stats) = stats(&image, &["bin/ping", "sbin/ping", "etc/fast", "dev/null-too"]) else { return };
    assert!(stats[0].contains("Links: 3 "), "{}", stats[0]);
    assert_eq!(stats[0].lines().next(), stats[1].lines().next(), "one inode for both names");
    assert!(stats[2].contains("Links: 2 "), "{}", stats[2]);
    assert!(stats[3].contains("Links: 2 ") && stats[3].contains("character special"), "{}", stats[3]);
}

#[test]
fn device_numbers_use_the_old_encoding_below_256_and_the_new_one_above() {
    let dir = tempfile::tempdir().unwrap();
    let image = write(&every_kind().tree, dir.path());
    let Some(stats) = stats(&image, &["dev/null", "dev/edge", "dev/wide", "dev/nvme0n1p1", "dev/largest"]) else {
        return;
    };
    let number = |stat: &str| stat.lines().find(|l| l.contains("Device major/minor")).unwrap().to_owned();
    assert!(number(&stats[0]).starts_with("Device major/minor number: 01:03"), "{}", stats[0]);
    assert!(number(&stats[1]).starts_with("Device major/minor number: 255:255"), "{}", stats[1]);
    assert!(number(&stats[2]).starts_with("(New-style) Device major/minor number: 256:00"), "{}", stats[2]);
    assert!(number(&stats[3]).starts_with("(New-style) Device major/minor number: 259:65536"), "{}", stats[3]);
    assert!(number(&stats[4]).starts_with("(New-style) Device major/minor number: 4095:1048575"), "{}", stats[4]);
}

#[test]
fn xattrs_fill_the_inode_first_then_one_checksummed_block() {
    let mut tree = Ext4Tree::new();
    tree.add_file_from_bytes("small", b"x".to_vec(), meta(0o644)).unwrap();
    tree.set_xattr("small", "user.a", b"1").unwrap();
    tree.set_xattr("small", "security.capability", &capability()).unwrap();
    tree.add_file_from_bytes("large", b"x".to_vec(), meta(0o644)).unwrap();
    tree.set_xattr("large", "user.a", b"1").unwrap();
    tree.set_xattr("large", "user.b", &[9; 100]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = write(&tree, dir.path());
    let Some(stats) = stats(&image, &["small", "large"]) else { return };
    assert!(stats[0].contains("File ACL: 0"), "in the inode, no block:\n{}", stats[0]);
    assert!(stats[0].contains("Blockcount: 8"), "{}", stats[0]);
    assert!(!stats[1].contains("File ACL: 0"), "a 100-byte value needs the block:\n{}", stats[1]);
    assert!(stats[1].contains("Blockcount: 16"), "the block counts in i_blocks:\n{}", stats[1]);
}

#[test]
fn more_xattrs_than_the_inode_and_one_block_hold_are_refused_naming_the_entry() {
    let mut tree = Ext4Tree::new();
    tree.add_file_from_bytes("etc/full", b"x".to_vec(), meta(0o644)).unwrap();
    for i in 0..3 {
        tree.set_xattr("etc/full", &format!("user.v{i}"), &[1; 1300]).unwrap();
    }
    let err = tree.set_xattr("etc/full", "user.v3", &[1; 1300]).unwrap_err();
    assert!(matches!(&err, Error::InvalidExt4Entry { path, .. } if path == "etc/full"), "{err:?}");
    assert!(err.to_string().contains("xattr block"), "{err}");
    // The refused one left the others as they were, and the tree still writes cleanly.
    let dir = tempfile::tempdir().unwrap();
    write(&tree, dir.path());
}

#[test]
fn xattr_names_outside_the_known_namespaces_or_too_long_are_refused_naming_the_entry() {
    let mut tree = Ext4Tree::new();
    tree.add_file_from_bytes("f", b"x".to_vec(), meta(0o644)).unwrap();
    let long = format!("user.{}", "n".repeat(256));
    let bad_names = ["nonamespace", "os2.name", "system.data", "user.", &long, "system.posix_acl_accessx"];
    for name in bad_names {
        let err = tree.set_xattr("f", name, b"v").unwrap_err();
        assert!(matches!(&err, Error::InvalidExt4Entry { path, .. } if path == "f"), "{name}: {err:?}");
    }
    let err = tree.set_xattr("f", "system.posix_acl_access", b"not an acl").unwrap_err();
    assert!(err.to_string().contains("POSIX ACL"), "{err}");
    tree.add_fifo("fifo", meta(0o600)).unwrap();
    let err = tree.set_xattr("fifo", "user.a", b"v").unwrap_err();
    assert!(err.to_string().contains("regular files and directories"), "{err}");
    tree.set_xattr("fifo", "trusted.a", b"v").unwrap();
    let err = tree.set_xattr("missing", "user.a", b"v").unwrap_err();
    assert!(matches!(&err, Error::InvalidExt4Entry { path, .. } if path == "missing"), "{err:?}");
    tree.set_xattr("f", &format!("user.{}", "n".repeat(255)), b"v").unwrap();
}

#[test]
fn a_hard_link_to_a_directory_or_to_a_missing_entry_is_refused_naming_it() {
    let mut tree = Ext4Tree::new();
    tree.add_dir("etc", meta(0o755)).unwrap();
    tree.add_file_from_bytes("etc/passwd", b"root\n".to_vec(), meta(0o644)).unwrap();
    for (dest, existing, why) in [
        ("etc-again", "etc", "is a directory"),
        ("root-again", "", "root"),
        ("shadow", "etc/shadow", "not in the tree"),
        ("nested", "etc/passwd/x", "not in the tree"),
    ] {
        let err = tree.add_hardlink(dest, existing).unwrap_err();
        assert!(matches!(&err, Error::InvalidExt4Entry { path, .. } if path == dest), "{dest}: {err:?}");
        assert!(err.to_string().contains(why), "{err}");
    }
    let err = tree.add_hardlink("etc/passwd", "etc/passwd").unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    let err = tree.add_device("dev/bad", DeviceKind::Char, 4096, 0, meta(0o600)).unwrap_err();
    assert!(matches!(&err, Error::InvalidExt4Entry { path, .. } if path == "dev/bad"), "{err:?}");
}

/// The extents `debugfs ex` lists for `path`: (level, logical start, physical start, length).
fn extents(image: &Path, path: &str) -> Option<Vec<(u32, u64, u64, u64)>> {
    let (_, debugfs) = tools()?;
    let out = run_debugfs(&debugfs, image, &format!("ex \"/{path}\"\n"));
    let parsed = out
        .lines()
        .filter_map(|line| {
            // " 1/ 1   1/340      0 -     0  1234 -  1234      1 "
            let (level, rest) = line.trim_start().split_once('/')?;
            let level: u32 = level.trim().parse().ok()?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            let logical: u64 = fields[dash - 1].parse().ok()?;
            let physical: u64 = fields[dash + 2].parse().ok()?;
            let len: u64 = fields.get(dash + 5)?.parse().ok()?;
            Some((level, logical, physical, len))
        })
        .collect();
    Some(parsed)
}

#[test]
fn files_of_more_than_four_extents_get_an_extent_tree_one_or_two_levels_deep() {
    // Data in one block of every two: one extent each. Five need a leaf
    // block (depth 1); 1,361 need more leaves than the inode indexes (depth 2).
    let segments =
        |n: u64| (0..n).map(|i| (i * 8192 + (i % 7) * 100, pattern(1 + (i as usize * 37) % 3000, i))).collect();
    let case = Case::new()
        .sparse("five", 5 * 8192, segments(5), meta(0o644))
        .sparse("many", 1400 * 8192, segments(1400), meta(0o644))
        .file("after", b"placed after the trees".to_vec(), meta(0o644));
    check(&case, &Ext4Options::default());
    let dir = tempfile::tempdir().unwrap();
    let image = write(&case.tree, dir.path());
    let Some(five) = extents(&image, "five") else { return };
    let deepest = |list: &[(u32, u64, u64, u64)]| list.iter().map(|e| e.0).max().unwrap();
    assert_eq!((deepest(&five), five.len()), (1, 5), "five extents a level down: {five:?}");
    let many = extents(&image, "many").unwrap();
    assert_eq!(deepest(&many), 2, "a second level for 1,400 extents");
    assert_eq!(many.iter().filter(|e| e.0 == 2).count(), 1400);
}

#[test]
fn a_5_gib_sparse_file_keeps_its_size_and_allocates_only_its_data() {
    // Data at the start, the middle (past 4 GiB's i_size_lo) and the end.
    const SIZE: u64 = 5 << 30;
    let middle = (9u64 << 29) + 123;
    let segments = vec![(0, b"start".to_vec()), (middle, pattern(10_000, 4)), (SIZE - 3, b"end".to_vec())];
    let mut tree = Ext4Tree::new();
    tree.add_file_from_segments("big", SIZE, segments.clone(), meta(0o644)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = write(&tree, dir.path());
    assert!(fs::metadata(&image).unwrap().len() < 1 << 20, "the image holds only the data");
    let Some(stat) = stats(&image, &["big"]) else { return };
    assert!(stat[0].contains(&format!("Size: {SIZE}")), "{}", stat[0]);
    // 1 + 3 + 1 blocks of data, 8 sectors each.
    assert!(stat[0].contains("Blockcount: 40"), "{}", stat[0]);
    let image_file = fs::File::open(&image).unwrap();
    let list = extents(&image, "big").unwrap();
    for (offset, data) in &segments {
        let block = offset / 4096;
        let (_, logical, physical, _) =
            *list.iter().find(|e| e.1 <= block && block < e.1 + e.3).unwrap_or_else(|| panic!("{offset}: {list:?}"));
        let mut read = vec![0u8; data.len()];
        image_file.read_exact_at(&mut read, (physical + block - logical) * 4096 + offset % 4096).unwrap();
        assert!(read == *data, "data at {offset} as debugfs maps it");
    }
}

#[test]
fn set_epoch_stamps_every_entry_whatever_time_it_was_added_with() {
    let mut case = Case::new()
        .file("a", b"1".to_vec(), meta(0o644).with_mtime(5, 7))
        .dir("d", meta(0o755).with_mtime(-100, 0))
        .file("d/b", b"2".to_vec(), meta(0o644).with_mtime(4_000_000_000, 1));
    case.tree.set_epoch(Some(1_234_567_890)).unwrap();
    case.mtimes.values_mut().for_each(|t| *t = 1_234_567_890);
    check(&case, &Ext4Options::default());
    let dir = tempfile::tempdir().unwrap();
    let image = write(&case.tree, dir.path());
    let Some(stats) = stats(&image, &["", "lost+found", "d"]) else { return };
    for stat in &stats {
        assert!(stat.contains(&format!("mtime: 0x{:08x}:00000000", 1_234_567_890)), "{stat}");
    }
    let err = case.tree.set_epoch(Some(i64::MAX)).unwrap_err();
    assert!(err.to_string().contains("outside what ext4 stores"), "{err}");
}

/// Makes `path` a fifo or a device node.
fn mknod(path: &Path, kind: rustix::fs::FileType, major: u32, minor: u32) {
    let mode = rustix::fs::Mode::from_raw_mode(0o640);
    rustix::fs::mknodat(rustix::fs::CWD, path, kind, mode, rustix::fs::makedev(major, minor)).unwrap();
}

fn set_times(path: &Path, seconds: i64, nanoseconds: i64) {
    let time = rustix::fs::Timespec { tv_sec: seconds, tv_nsec: nanoseconds };
    let times = rustix::fs::Timestamps { last_access: time, last_modification: time };
    rustix::fs::utimensat(rustix::fs::CWD, path, &times, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

#[test]
fn add_host_path_copies_kinds_metadata_xattrs_holes_and_hard_links() {
    let root = kiln_testkit::is_root();
    let host = tempfile::tempdir().unwrap();
    let src = host.path().join("src");
    let at = |p: &str| src.join(p);
    fs::create_dir_all(at("etc/conf.d")).unwrap();
    fs::write(at("etc/motd"), b"hello\n").unwrap();
    fs::hard_link(at("etc/motd"), at("etc/conf.d/motd-link")).unwrap();
    std::os::unix::fs::symlink("../motd", at("etc/conf.d/up")).unwrap();
    let sparse = fs::File::create(at("sparse")).unwrap();
    sparse.set_len(3 << 20).unwrap();
    sparse.write_all_at(b"middle", 1 << 20).unwrap();
    mknod(&at("fifo"), rustix::fs::FileType::Fifo, 0, 0);
    let _socket = std::os::unix::net::UnixListener::bind(at("socket")).unwrap();
    let xattrs_work =
        rustix::fs::lsetxattr(at("etc/motd"), "user.origin", b"host", rustix::fs::XattrFlags::empty()).is_ok();
    if root {
        mknod(&at("null"), rustix::fs::FileType::CharacterDevice, 1, 3);
        mknod(&at("disk"), rustix::fs::FileType::BlockDevice, 259, 70_000);
        std::os::unix::fs::lchown(at("etc/conf.d/up"), Some(33), None).unwrap();
        std::os::unix::fs::chown(at("etc/motd"), Some(1000), Some(100)).unwrap();
        rustix::fs::lsetxattr(at("etc"), "trusted.note", b"dir", rustix::fs::XattrFlags::empty()).unwrap();
    }
    fs::set_permissions(at("etc/conf.d"), std::os::unix::fs::PermissionsExt::from_mode(0o2750)).unwrap();
    for (path, seconds) in [("etc/motd", 1_600_000_000), ("etc/conf.d/up", 1_500_000_000), ("etc", 1_400_000_000)] {
        set_times(&at(path), seconds, 123_456_789);
    }

    // What the tree should hold, under the root and again under srv/copy.
    let mut case = Case::new();
    for prefix in ["", "srv/copy/"] {
        let host_meta = |p: &str| {
            let m = fs::symlink_metadata(at(p)).unwrap();
            meta(m.mode() & 0o7777).with_owner(m.uid(), m.gid()).with_mtime(m.mtime(), m.mtime_nsec() as u32)
        };
        let path = |p: &str| format!("{prefix}{p}");
        if !prefix.is_empty() {
            case = case.dir("srv/copy", host_meta(""));
        }
        case = case
            .dir(&path("etc"), host_meta("etc"))
            .dir(&path("etc/conf.d"), host_meta("etc/conf.d"))
            .file(&path("etc/motd"), b"hello\n".to_vec(), host_meta("etc/motd"))
            .hardlink(&path("etc/conf.d/motd-link"), &path("etc/motd"))
            .link(&path("etc/conf.d/up"), "../motd", host_meta("etc/conf.d/up"))
            .sparse(&path("sparse"), 3 << 20, vec![(1 << 20, b"middle".to_vec())], host_meta("sparse"))
            .fifo(&path("fifo"), host_meta("fifo"));
        if xattrs_work {
            case = case.xattr(&path("etc/motd"), "user.origin", b"host");
        }
        if root {
            case = case
                .device(&path("null"), DeviceKind::Char, 1, 3, host_meta("null"))
                .device(&path("disk"), DeviceKind::Block, 259, 70_000, host_meta("disk"))
                .xattr(&path("etc"), "trusted.note", b"dir");
        }
    }
    if !root {
        kiln_testkit::report_skip("devices, owners and trusted.* need root; the rest is checked");
    }
    let mut tree = Ext4Tree::new();
    tree.add_host_path("", &src).unwrap();
    tree.add_host_path("srv/copy", &src).unwrap();
    case.tree = tree;
    check(&case, &Ext4Options::default());
    // The host's holes stay holes: 1 MiB into a 3 MiB file is one block of data.
    let dir = tempfile::tempdir().unwrap();
    let image = write(&case.tree, dir.path());
    if let Some(stats) = stats(&image, &["sparse"]) {
        assert!(stats[0].contains("Blockcount: 8"), "{}", stats[0]);
    }
    // A failure leaves the tree as it was.
    let before = case.tree.file_count();
    let err = case.tree.add_host_path("srv/copy", &src).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    assert_eq!(case.tree.file_count(), before);
}

#[test]
fn the_host_kernel_reads_every_entry_kind_and_the_holes_of_a_5_gib_file() {
    let test = kiln_testkit::current_test_name();
    if kiln_testkit::require_tools(&test, &["mount", "umount"]).is_none()
        || !kiln_testkit::require_root(&test, "a loop mount")
    {
        return;
    }
    let mut case = every_kind();
    const SIZE: u64 = 5 << 30;
    let segments = vec![(0, b"start".to_vec()), ((9 << 29) + 5, b"middle".to_vec()), (SIZE - 3, b"end".to_vec())];
    case.tree.add_file_from_segments("big", SIZE, segments.clone(), meta(0o600)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = write(&case.tree, dir.path());
    let target = dir.path().join("mnt");
    let mounted = mount_read_only(&image, &target);
    assert_kernel_sees(&target, &case);
    let big = fs::File::open(target.join("big")).unwrap();
    let host = big.metadata().unwrap();
    assert_eq!((host.len(), host.blocks()), (SIZE, 3 * 8), "size and allocated 512-byte sectors");
    for (offset, data) in &segments {
        let mut read = vec![0u8; data.len()];
        big.read_exact_at(&mut read, *offset).unwrap();
        assert!(read == *data, "data at {offset}");
        let mut hole = [1u8; 4096];
        big.read_exact_at(&mut hole, offset + (8 << 20)).unwrap_or_else(|_| hole = [0; 4096]);
        assert_eq!(hole, [0; 4096], "8 MiB past {offset} is a hole");
    }
    let sparse = fs::symlink_metadata(target.join("var/sparse")).unwrap();
    assert_eq!(sparse.blocks(), 6 * 8, "var/sparse's 50,000 bytes take blocks 0, 4 to 7 and 12");
    // An open file would keep the mount busy.
    drop(big);
    drop(mounted);
}

#[test]
fn a_host_roots_lost_and_found_is_skipped_not_an_error() {
    // A tree copied from an ext4 root, or from a mounted image, has one.
    let host = tempfile::tempdir().unwrap();
    let src = host.path().join("src");
    fs::create_dir_all(src.join("lost+found")).unwrap();
    fs::write(src.join("lost+found/#12"), b"an orphan of the host").unwrap();
    fs::create_dir_all(src.join("srv/lost+found")).unwrap();
    fs::write(src.join("srv/lost+found/kept"), b"not at the root: content").unwrap();
    let mut tree = Ext4Tree::new();
    tree.add_host_path("", &src).unwrap();
    assert_eq!((tree.file_count(), tree.dir_count()), (1, 2), "srv, srv/lost+found and its file");
    let dir = tempfile::tempdir().unwrap();
    let image = write(&tree, dir.path());
    let Some((_, debugfs)) = tools() else { return };
    let listing = run_debugfs(&debugfs, &image, "ls -l /lost+found\nls -l /srv/lost+found\n");
    assert!(!listing.contains("#12"), "the host's orphan stays out:\n{listing}");
    assert!(listing.contains("kept"), "a deeper lost+found is content:\n{listing}");
}

#[test]
fn acls_where_linux_refuses_them_are_refused_naming_the_entry() {
    let mut tree = Ext4Tree::new();
    tree.add_symlink("link", "target", meta(0o777)).unwrap();
    tree.add_file_from_bytes("file", b"x".to_vec(), meta(0o644)).unwrap();
    tree.add_dir("dir", meta(0o755)).unwrap();
    for (dest, name) in [("link", "system.posix_acl_access"), ("file", "system.posix_acl_default")] {
        let err = tree.set_xattr(dest, name, &user_acl()).unwrap_err();
        assert!(matches!(&err, Error::InvalidExt4Entry { path, .. } if path == dest), "{dest} {name}: {err}");
    }
    tree.set_xattr("file", "system.posix_acl_access", &user_acl()).unwrap();
    tree.set_xattr("dir", "system.posix_acl_default", &user_acl()).unwrap();
}
