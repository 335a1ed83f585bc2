//! The ext4 data path: small host files are staged and written a chunk at
//! a time, read by several threads, while big files, files from memory and
//! directories take other paths. Whatever path a file takes, the image must
//! be the one the same tree gives with every file's bytes held in memory.

use std::fs;

use kiln_imagefmt::{Ext4Options, Ext4Tree, Metadata};

use crate::ext4::{assert_e2fsck_clean, tools};
use crate::support::{first_difference, pattern};

/// File sizes around block boundaries, repeated enough times to fill more
/// than one 1 MiB staging chunk and give every reader thread a share, with
/// files too big to stage (over 256 KiB) in between.
fn sizes() -> Vec<usize> {
    let edges = [0, 1, 100, 4095, 4096, 4097, 8191, 8192, 12_289, 65_536, 200_000, 262_144, 262_145, 1 << 20];
    (0..40).flat_map(|round| edges.iter().map(move |&size| size + round % 3)).collect()
}

#[test]
fn staged_small_host_files_give_the_image_the_same_tree_from_memory_gives() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let meta = Metadata::default().with_mtime(1_700_000_000, 0);
    let (mut from_host, mut from_memory) = (Ext4Tree::new(), Ext4Tree::new());
    for (index, size) in sizes().into_iter().enumerate() {
        // A directory every 50 files, so staged runs are cut by directory blocks.
        let dest = format!("d{:02}/f{index:04}", index / 50);
        let bytes = pattern(size, index as u64);
        let path = src.join(format!("f{index:04}"));
        fs::create_dir_all(&src).unwrap();
        fs::write(&path, &bytes).unwrap();
        from_host.add_file_from_path(&dest, &path, meta).unwrap();
        from_memory.add_file_from_bytes(&dest, bytes, meta).unwrap();
    }
    from_host.add_symlink("d00/link", &"t".repeat(100), meta).unwrap();
    from_memory.add_symlink("d00/link", &"t".repeat(100), meta).unwrap();
    let options = Ext4Options::default();
    let host_image = dir.path().join("host.ext4");
    let memory_image = dir.path().join("memory.ext4");
    from_host.layout(&options).unwrap().write_file(&host_image).unwrap();
    from_memory.layout(&options).unwrap().write_file(&memory_image).unwrap();
    let (host, memory) = (fs::read(&host_image).unwrap(), fs::read(&memory_image).unwrap());
    assert!(host.len() > 8 << 20, "the tree is meant to span several staging chunks");
    assert_eq!(first_difference(&host, &memory), None, "the images differ");
    // write_to (a Write + Seek, no copy_file_range) agrees too.
    let mut cursor = std::io::Cursor::new(Vec::new());
    from_host.layout(&options).unwrap().write_to(&mut cursor).unwrap();
    assert_eq!(first_difference(cursor.get_ref(), &memory), None, "write_to differs");
    if let Some((e2fsck, _)) = tools() {
        assert_e2fsck_clean(&e2fsck, &host_image);
    }
}

#[test]
fn a_small_host_file_changed_after_it_was_added_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grows");
    fs::write(&path, b"short").unwrap();
    let mut tree = Ext4Tree::new();
    tree.add_file_from_path("grows", &path, Metadata::default()).unwrap();
    fs::write(&path, b"longer now").unwrap();
    let image = dir.path().join("image.ext4");
    let err = tree.layout(&Ext4Options::default()).unwrap().write_file(&image).unwrap_err();
    assert!(err.to_string().contains("grows"), "{err}");
    assert!(!image.exists(), "a failed write leaves no image");
}

/// A host directory big enough for its children to be read by several
/// scanner threads gives the image that the same entries added one by one
/// give: the order of names, hard links' first names, symlink targets and
/// xattrs do not depend on which thread read which entry.
#[test]
fn a_wide_host_directory_read_by_several_threads_gives_the_image_entries_added_in_order_give() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    let meta = |path: &std::path::Path| {
        let host = fs::symlink_metadata(path).unwrap();
        use std::os::unix::fs::MetadataExt;
        Metadata::default()
            .with_mode(host.mode() & 0o7777)
            .with_owner(host.uid(), host.gid())
            .with_mtime(host.mtime(), host.mtime_nsec() as u32)
    };
    let mut expected = Ext4Tree::new();
    for index in 0..400 {
        let name = format!("e{index:03}");
        let path = src.join(&name);
        match index % 4 {
            0 | 1 => {
                fs::write(&path, pattern(index * 37, index as u64)).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600 + (index as u32 % 8))).unwrap();
            }
            2 => symlink(format!("target-{index}"), &path).unwrap(),
            _ => fs::hard_link(src.join(format!("e{:03}", index - 3)), &path).unwrap(),
        }
    }
    expected.add_dir("", meta(&src)).unwrap();
    for index in 0..400 {
        let name = format!("e{index:03}");
        let path = src.join(&name);
        match index % 4 {
            0 | 1 => expected.add_file_from_bytes(&name, fs::read(&path).unwrap(), meta(&path)).unwrap(),
            2 => expected.add_symlink(&name, &format!("target-{index}"), meta(&path)).unwrap(),
            _ => expected.add_hardlink(&name, &format!("e{:03}", index - 3)).unwrap(),
        }
    }
    let mut from_host = Ext4Tree::new();
    from_host.add_host_path("", &src).unwrap();
    let options = Ext4Options::default();
    let (host_image, expected_image) = (dir.path().join("host.ext4"), dir.path().join("expected.ext4"));
    from_host.layout(&options).unwrap().write_file(&host_image).unwrap();
    expected.layout(&options).unwrap().write_file(&expected_image).unwrap();
    let (host, wanted) = (fs::read(&host_image).unwrap(), fs::read(&expected_image).unwrap());
    assert_eq!(first_difference(&host, &wanted), None, "the images differ");
}
