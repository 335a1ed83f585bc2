//! The checks themselves must be able to fail: damaged images and the
//! `fatfs` crate's own (known-bad) output are caught by each reader.

use std::io::Cursor;

use kiln_imagefmt::{FatOptions, FatType};

use crate::support::{Case, options, pattern};

fn image(case: &Case, options: &FatOptions) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    case.tree.layout(options).unwrap().write_to(&mut out).unwrap();
    out.into_inner()
}

fn to_file(dir: &tempfile::TempDir, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.path().join("damaged.img");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_wrong_fsinfo_free_count_is_caught() {
    let case = Case::new().file("f", pattern(10_000, 1));
    let mut bytes = image(&case, &options().with_fat_type(FatType::Fat32));
    let fsinfo = usize::from(u16::from_le_bytes([bytes[0x30], bytes[0x31]])) * 512;
    assert_eq!(&bytes[fsinfo..fsinfo + 4], b"RRaA", "FSInfo lead signature");
    let free = u32::from_le_bytes(bytes[fsinfo + 488..fsinfo + 492].try_into().unwrap());
    bytes[fsinfo + 488..fsinfo + 492].copy_from_slice(&(free - 1).to_le_bytes());

    let view = kiln_testkit::inspect_fat_with_fatfs(&bytes).unwrap();
    assert_eq!(view.free_clusters, free - 1, "fatfs reports FSInfo's count");
    let dir = tempfile::tempdir().unwrap();
    let path = to_file(&dir, &bytes);
    if kiln_testkit::require_tool(&kiln_testkit::current_test_name(), "fsck.fat").is_some() {
        let complaint = kiln_testkit::fsck_fat_clean(&path).expect_err("fsck.fat must notice");
        assert!(complaint.contains("Free cluster summary"), "{complaint}");
    }
}

#[test]
fn damaged_file_data_is_caught() {
    let case = Case::new().file("dir/file", pattern(5000, 2));
    let mut bytes = image(&case, &options());
    let needle = pattern(5000, 2);
    let at = bytes.windows(64).position(|w| w == &needle[..64]).expect("file data in the image") + 4000;
    bytes[at] ^= 0xFF;
    let tree = kiln_testkit::read_fat_with_fatfs(&bytes).unwrap();
    let diff = kiln_testkit::tree_diff(&tree, &case.expected).expect("fatfs sees the damage");
    assert!(diff.contains("first difference at byte 4000"), "{diff}");
    let dir = tempfile::tempdir().unwrap();
    let path = to_file(&dir, &bytes);
    if let Some(extracted) = kiln_testkit::read_fat_with_mtools(&path).unwrap() {
        assert!(kiln_testkit::tree_diff(&extracted, &case.expected).is_some(), "mtools sees the damage");
    }
}

/// FACTS: the `fatfs` crate's `create_dir` writes `.`/`..` entries that
/// `fsck.fat` rejects; the clean check must say so.
#[test]
fn fatfs_crate_directories_fail_fsck() {
    let mut disk = Cursor::new(vec![0u8; 4 << 20]);
    fatfs::format_volume(&mut disk, fatfs::FormatVolumeOptions::new()).unwrap();
    disk.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).unwrap();
        fs.root_dir().create_dir("keystore").unwrap().create_dir("sub").unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = to_file(&dir, disk.get_ref());
    if kiln_testkit::require_tool(&kiln_testkit::current_test_name(), "fsck.fat").is_some() {
        let complaint = kiln_testkit::fsck_fat_clean(&path).expect_err("fsck.fat rejects fatfs's directories");
        assert!(complaint.contains("'.'") || complaint.contains("'..'"), "{complaint}");
    }
}

#[test]
fn a_cut_cluster_chain_is_caught() {
    // FAT12/16 FAT starts right after the reserved sectors; cut the first
    // file's chain after its first cluster.
    let case = Case::new().file("f", pattern(20_000, 3));
    let opts = options().with_fat_type(FatType::Fat16).with_cluster_size(2048);
    let mut bytes = image(&case, &opts);
    let reserved = usize::from(u16::from_le_bytes([bytes[14], bytes[15]])) * 512;
    // Cluster 2 is the first data cluster; which one the file starts at
    // does not matter: marking every used chain link after entry 2 as
    // end-of-chain cuts whichever chain passes through.
    for entry in 3..12 {
        let at = reserved + entry * 2;
        if bytes[at..at + 2] != [0, 0] {
            bytes[at..at + 2].copy_from_slice(&[0xFF, 0xFF]);
        }
    }
    let broken = kiln_testkit::read_fat_with_fatfs(&bytes);
    assert!(broken.map_or(true, |tree| tree != case.expected), "fatfs reads a cut chain as the whole file");
    let dir = tempfile::tempdir().unwrap();
    let path = to_file(&dir, &bytes);
    if kiln_testkit::require_tool(&kiln_testkit::current_test_name(), "fsck.fat").is_some() {
        kiln_testkit::fsck_fat_clean(&path).expect_err("fsck.fat notices a cut chain");
    }
}
