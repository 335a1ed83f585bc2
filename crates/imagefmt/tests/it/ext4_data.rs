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
