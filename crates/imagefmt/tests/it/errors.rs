//! Options and trees the writer must refuse, with the kind of error callers
//! branch on and a message naming what is at fault.

use kiln_imagefmt::{ErrorKind, FatOptions, FatTree, FatType};

use crate::support::{Case, options, pattern};

fn layout_error(tree: &FatTree, options: &FatOptions) -> kiln_imagefmt::Error {
    match tree.layout(options) {
        Ok(layout) => panic!("expected an error for {options:?}, got {:?}", layout.summary()),
        Err(err) => err,
    }
}

#[test]
fn forced_type_impossible_at_size() {
    let tree = Case::new().file("f", *b"x").tree;
    for (fat_type, size) in [(FatType::Fat16, 1u64 << 20), (FatType::Fat32, 16 << 20), (FatType::Fat12, 1 << 30)] {
        let err = layout_error(&tree, &options().with_fat_type(fat_type).with_size(size));
        assert_eq!(err.kind(), ErrorKind::DoesNotFit, "{fat_type} at {size}: {err}");
        assert!(err.to_string().contains(&fat_type.to_string()), "message names the type: {err}");
    }
}

#[test]
fn forced_cluster_size_can_make_a_type_impossible() {
    let tree = Case::new().file("f", *b"x").tree;
    // FAT32 with 32 KiB clusters needs 2 GiB; FAT16 with 32 KiB clusters 128 MiB.
    for (fat_type, size) in [(FatType::Fat32, 1u64 << 30), (FatType::Fat16, 64 << 20)] {
        let opts = options().with_fat_type(fat_type).with_size(size).with_cluster_size(32768);
        assert_eq!(layout_error(&tree, &opts).kind(), ErrorKind::DoesNotFit);
    }
}

#[test]
fn content_larger_than_size() {
    let tree = Case::new().file("big", pattern(2 << 20, 1)).tree;
    let err = layout_error(&tree, &options().with_size(1 << 20));
    assert_eq!(err.kind(), ErrorKind::DoesNotFit, "{err}");
    assert!(err.to_string().contains(&(1u64 << 20).to_string()), "message gives the size: {err}");
}

#[test]
fn content_exactly_filling_a_fixed_size_fits_and_one_more_cluster_does_not() {
    let sized = options().with_size(2 << 20).with_cluster_size(1024);
    let free = Case::new().tree.layout(&sized).unwrap().summary().free_clusters as usize;
    let fits = Case::new().file("f", pattern(free * 1024, 2));
    crate::support::check(&fits, &sized);
    let over = Case::new().file("f", pattern(free * 1024 + 1, 2)).tree;
    assert_eq!(layout_error(&over, &sized).kind(), ErrorKind::DoesNotFit);
}

#[test]
fn invalid_options() {
    let tree = Case::new().file("f", *b"x").tree;
    let cases = [
        options().with_label("TWELVE CHARS"),
        options().with_label("BAD*LABEL"),
        options().with_label("ÜMLAUT"),
        options().with_size(1_000_000 + 1),
        options().with_size(0),
        options().with_cluster_size(3000),
        options().with_cluster_size(256),
        options().with_cluster_size(65536 * 2),
    ];
    for opts in cases {
        let err = layout_error(&tree, &opts);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{opts:?}: {err}");
    }
}

#[test]
fn invalid_names_are_refused_when_added() {
    for name in [
        "",
        ".",
        "..",
        "a/./b/..",
        "trailing.",
        "trailing ",
        "a*b",
        "a?b",
        "a:b",
        "a<b",
        "a>b",
        "a|b",
        "a\\b",
        "a\"b",
        "tab\tname",
        &"x".repeat(256),
    ] {
        let mut tree = FatTree::new();
        let err = tree.add_file_from_bytes(name, *b"x").expect_err(name);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{name:?}: {err}");
    }
}

#[test]
fn case_insensitive_duplicates_are_refused() {
    let mut tree = FatTree::new();
    tree.add_file_from_bytes("dir/README.md", *b"1").unwrap();
    for clash in ["dir/readme.md", "DIR/README.MD", "Dir/ReadMe.Md"] {
        let err = tree.add_file_from_bytes(clash, *b"2").expect_err(clash);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{clash}: {err}");
    }
    tree.add_dir("dir/Sub").unwrap();
    assert_eq!(tree.add_dir("dir/SUB").map_err(|e| e.kind()), Err(ErrorKind::InvalidInput));
    // A file where a directory is needed, and the other way round.
    assert!(tree.add_file_from_bytes("dir/README.md/x", *b"3").is_err());
    assert!(tree.add_file_from_bytes("dir/Sub", *b"4").is_err());
}

#[test]
fn host_path_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let err = FatTree::new().add_file_from_path("x", &missing).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.to_string().contains(&missing.display().to_string()), "{err}");

    let err = FatTree::new().add_file_from_path("x", dir.path()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");

    let looped = dir.path().join("loop");
    std::fs::create_dir(&looped).unwrap();
    std::os::unix::fs::symlink("..", looped.join("up")).unwrap();
    let err = FatTree::new().add_host_path("", &looped).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");

    let Some(mkfifo) = kiln_testkit::require_tool(&kiln_testkit::current_test_name(), "mkfifo") else {
        return;
    };
    let fifo_dir = dir.path().join("with fifo");
    std::fs::create_dir(&fifo_dir).unwrap();
    assert!(std::process::Command::new(mkfifo).arg(fifo_dir.join("pipe")).status().unwrap().success());
    let mut tree = FatTree::new();
    let err = tree.add_host_path("", &fifo_dir).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("pipe"), "{err}");
    assert_eq!((tree.file_count(), tree.dir_count()), (0, 0), "a failed add_host_path changed the tree");
}

#[test]
fn files_over_4_gib_are_refused_and_4_gib_less_one_fits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(1 << 32).unwrap(); // sparse: costs no disk
    let err = FatTree::new().add_file_from_path("big", &path).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DoesNotFit, "{err}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");

    file.set_len((1 << 32) - 1).unwrap();
    let mut tree = FatTree::new();
    tree.add_file_from_path("big", &path).unwrap();
    let summary = tree.layout(&options()).unwrap().summary();
    assert_eq!((summary.fat_type, summary.data_bytes), (FatType::Fat32, (1 << 32) - 1));
    assert!(summary.image_bytes > 1 << 32);
    let err = layout_error(&tree, &options().with_fat_type(FatType::Fat16));
    assert_eq!(err.kind(), ErrorKind::DoesNotFit, "{err}");
}

#[test]
fn sizes_past_what_fat_addresses_are_refused() {
    let tree = Case::new().file("f", *b"x").tree;
    // 2^32 - 1 sectors of 512 bytes is the most a FAT boot sector can count.
    for size in [2u64 << 40, 3 << 40, u64::MAX - 511] {
        let err = layout_error(&tree, &options().with_size(size));
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{size}: {err}");
    }
}
