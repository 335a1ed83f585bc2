//! Shapes of trees, each written and read back by `fsck.fat`, mtools and
//! the `fatfs` crate (see `support::check`).

use kiln_imagefmt::FatType;

use crate::support::{Case, check, options, pattern};

#[test]
fn empty_tree() {
    let checked = check(&Case::new(), &options());
    assert_eq!(checked.fat_type, FatType::Fat12, "an empty volume is small: {:?}", checked);
}

#[test]
fn one_empty_file() {
    check(&Case::new().file("empty", Vec::new()), &options());
}

#[test]
fn empty_directories() {
    check(&Case::new().dir("a").dir("b/c/d").dir("Mixed Case Dir").file("b/f", *b"x"), &options());
}

#[test]
fn file_sizes_around_sectors_and_pages() {
    let mut case = Case::new();
    for size in [0usize, 1, 2, 511, 512, 513, 1023, 1024, 4095, 4096, 4097, 65535, 65536, 65537, 1 << 20] {
        case = case.file(&format!("size_{size}"), pattern(size, size as u64));
    }
    check(&case, &options());
}

/// Sizes on either side of one, two and three clusters, for every cluster size.
#[test]
fn file_sizes_around_cluster_boundaries() {
    for cluster_size in [512u32, 1024, 2048, 4096, 8192, 16384, 32768] {
        let cs = cluster_size as usize;
        let mut case = Case::new();
        for size in [cs - 1, cs, cs + 1, 2 * cs - 1, 2 * cs, 2 * cs + 1, 3 * cs + 7] {
            case = case
                .file(&format!("cs{cluster_size}/len_{size}"), pattern(size, size as u64 ^ u64::from(cluster_size)));
        }
        let checked = check(&case, &options().with_cluster_size(cluster_size));
        assert_eq!(checked.cluster_size, cluster_size);
    }
}

/// The automatic cluster size, whatever it is, with files on its boundaries.
#[test]
fn file_sizes_around_the_automatic_cluster_size() {
    let probe = Case::new().file("probe", pattern(10, 1));
    let cs = probe.tree.layout(&options()).unwrap().summary().cluster_size as usize;
    let mut case = Case::new();
    for size in [cs - 1, cs, cs + 1, 2 * cs - 1, 2 * cs, 2 * cs + 1] {
        case = case.file(&format!("len_{size}"), pattern(size, size as u64));
    }
    assert_eq!(check(&case, &options()).cluster_size as usize, cs);
}

#[test]
fn deep_nesting() {
    let mut case = Case::new();
    let mut path = String::new();
    for depth in 1..=10 {
        path.push_str(&format!("level {depth} with a long name/"));
        case = case.file(&format!("{path}file{depth}.txt"), pattern(depth * 100, depth as u64));
        case = case.dir(&format!("{path}EMPTY{depth}"));
    }
    check(&case, &options());
}

#[test]
fn unicode_names() {
    let names = [
        "é",
        "café.txt",
        "日本語",
        "日本語.md",
        "Ünïcödé Dïr",
        "😀",
        "emoji 😀🎉.txt",
        "𝄞 music",
        "mixé日😀.bin",
        "e\u{301} combining",
        "Ωmega",
        "привет.txt",
        "ﬁ ligature",
    ];
    let mut case = Case::new();
    for (i, name) in names.iter().enumerate() {
        case = case.file(&format!("files/{name}"), pattern(i * 37, i as u64));
        case = case.dir(&format!("dirs/{name}"));
    }
    check(&case, &options());
}

/// Names that need long-name entries and collide once squeezed into 8.3.
#[test]
fn long_names_and_short_name_collisions() {
    let mut case = Case::new();
    for i in 1..=50 {
        case = case.file(&format!("lfn/long file name {i}.txt"), format!("file {i}\n"));
    }
    for name in [
        "a+b",
        "a+c",
        ".hidden",
        ".hidden2",
        "x.tar.gz",
        "x.tar.bz2",
        "README.md",
        "Readme.txt",
        "readme",
        "UPPER.TXT",
        "lower.txt",
        "MiXeD.TxT",
        "abcdefgh.txt",
        "abcdefghi.txt",
        "abcdefghij.txt",
        "a.b.c.d",
        "..leading dots",
        ".txt",
        "a,b;c=d[e]f",
        "trailing spaces inside  x",
        " leading space",
        "12345678.1234",
        "name.with.many.dots.ext",
    ] {
        case = case.file(&format!("lfn/{name}"), name.as_bytes().to_vec());
    }
    // Names that are themselves the short name another entry would get:
    // the writer must not hand the same 8.3 name out twice.
    for name in ["+x", "_X~1", "1 2", "12~1", "long file name 51.txt", "LONGFI~1.TXT", "ab~1", "a b"] {
        case = case.file(&format!("taken/{name}"), name.as_bytes().to_vec());
    }
    check(&case, &options());
}

/// Long names whose UTF-16 length sits on the 13-unit boundaries of long-name entries.
#[test]
fn long_name_entry_boundaries() {
    let mut case = Case::new();
    for units in [1, 8, 12, 13, 14, 25, 26, 27, 128, 254, 255] {
        case = case.file(&format!("ascii/{}", "n".repeat(units)), pattern(units, 0));
    }
    check(&case, &options());
}

/// A long name of 255 UTF-16 units that is more than 255 bytes of UTF-8:
/// no Linux directory can hold it, so mtools cannot extract it and only
/// `fatfs` (and `fsck.fat`) read it here.
#[test]
fn longest_unicode_name() {
    let name = format!("{}{}", "é".repeat(200), "😀".repeat(27)); // 200 + 54 = 254 units
    assert_eq!(name.encode_utf16().count(), 254);
    let case = Case::new().file(&name, *b"long");
    let layout = case.tree.layout(&options()).unwrap();
    let mut image = std::io::Cursor::new(Vec::new());
    layout.write_to(&mut image).unwrap();
    let tree = kiln_testkit::read_fat_with_fatfs(image.get_ref()).unwrap();
    assert_eq!(tree, case.expected);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.img");
    std::fs::write(&path, image.get_ref()).unwrap();
    kiln_testkit::fsck_fat_clean(&path).unwrap_or_else(|err| panic!("{err}"));
}

#[test]
fn directory_with_1000_entries() {
    let mut case = Case::new();
    for i in 0..1000 {
        case = case.file(&format!("many/entry number {i:04}.dat"), format!("{i}"));
    }
    check(&case, &options());
}

/// The root directory of FAT12/16 is a fixed region; 1000 long names need
/// about 3000 slots there.
#[test]
fn root_with_1000_entries_on_every_fat_type() {
    let mut case = Case::new();
    for i in 0..1000 {
        case = case.file(&format!("root entry {i:04}.dat"), format!("{i}"));
    }
    for fat_type in [None, Some(FatType::Fat12), Some(FatType::Fat16), Some(FatType::Fat32)] {
        check(&case, &options().with_fat_type(fat_type));
    }
}

#[test]
fn labels() {
    let case = Case::new().file("launch", *b"#!/bin/sh\n");
    for label in ["SERVICEDISK", "CIDATA", "lower", "A", "LABEL_12345", "DISK-1"] {
        check(&case, &options().with_label(label));
    }
    // The label entry and a file share the root and the same 8.3 name.
    check(&Case::new().file("LAUNCH", *b"x").file("launch2", *b"y"), &options().with_label("LAUNCH"));
    // An empty root with a label: the label entry is the only one there.
    check(&Case::new(), &options().with_label("ONLYLABEL"));
}

#[test]
fn volume_id_is_honoured() {
    let case = Case::new().file("f", *b"x");
    check(&case, &options().with_volume_id(0xDEAD_BEEF));
}

fn typical_tree() -> Case {
    Case::new()
        .file("service", pattern(300_000, 7))
        .file("launch", *b"#!/bin/sh\nexec /srv/service\n")
        .file("keystore/a/key.pem", pattern(1700, 8))
        .file("keystore/b/Long Key Name.json", pattern(5000, 9))
        .dir("keystore/empty")
}

#[test]
fn forced_fat_types_with_automatic_size() {
    for fat_type in [FatType::Fat12, FatType::Fat16, FatType::Fat32] {
        check(&typical_tree(), &options().with_fat_type(fat_type).with_label("SERVICEDISK"));
    }
}

#[test]
fn fixed_sizes_with_automatic_type() {
    // The type follows from the cluster count (checked in `check`); 1 MiB
    // is too small for anything but FAT12.
    for size in [1 << 20, 16 << 20, 40 << 20, 200 << 20] {
        let checked = check(&typical_tree(), &options().with_size(size));
        if size == 1 << 20 {
            assert_eq!(checked.fat_type, FatType::Fat12, "{:?}", checked);
        }
    }
}

#[test]
fn fixed_sizes_with_forced_types() {
    for (size, fat_type) in [
        (1 << 20, FatType::Fat12),
        (4 << 20, FatType::Fat12),
        (8 << 20, FatType::Fat16),
        (64 << 20, FatType::Fat16),
        (40 << 20, FatType::Fat32),
        (300 << 20, FatType::Fat32),
    ] {
        check(&typical_tree(), &options().with_size(size).with_fat_type(fat_type));
    }
}

/// A FAT12 volume with as many clusters as FAT12 allows, filled to the
/// last cluster: every FAT entry, including those straddling sectors, is used.
#[test]
fn fat12_at_its_cluster_limit() {
    let fat12 = |size: u64| options().with_size(size).with_fat_type(FatType::Fat12).with_cluster_size(512);
    // The largest size FAT12 with 512-byte clusters accepts.
    let size = (4000u64..4200)
        .rev()
        .map(|sectors| sectors * 512)
        .find(|&size| Case::new().tree.layout(&fat12(size)).is_ok())
        .expect("no size near 4085 clusters is FAT12");
    let empty = Case::new().tree.layout(&fat12(size)).unwrap().summary();
    assert!((4070..4085).contains(&empty.clusters), "FAT12 at its limit: {empty:?}");
    // Filled by one file: a single chain through every cluster.
    let free = u64::from(empty.free_clusters);
    let full = Case::new().file("all", pattern((free * 512) as usize, 3));
    let checked = check(&full, &fat12(size));
    assert_eq!(checked.free_clusters, 0);
    // One byte more does not fit.
    let over = Case::new().file("all", pattern((free * 512) as usize + 1, 3));
    let err = over.tree.layout(&fat12(size)).expect_err("one byte over a full volume");
    assert_eq!(err.kind(), kiln_imagefmt::ErrorKind::DoesNotFit, "{err}");

    // Filled by one-cluster files: every FAT entry an end-of-chain mark.
    // Upper-case 8.3 names need no long-name entries, leaving room for
    // the four directories' own clusters.
    let mut many = Case::new();
    for i in 0..free - 300 {
        many = many.file(&format!("D{}/F{i}", i % 4), pattern(300, i));
    }
    check(&many, &fat12(size));
}

#[test]
fn epochs() {
    let case = typical_tree();
    // 0 and anything before 1980 clamp to 1980-01-01, anything after 2107
    // to 2107-12-31 23:59:58; the others are exact (even seconds, FAT's
    // resolution).
    for epoch in [
        0,
        -1,
        i64::MIN,
        100_000_000,
        315_532_800,
        1_717_243_200,
        1_735_689_598,
        4_102_444_798,
        4_354_819_198,
        5_000_000_000,
        i64::MAX,
    ] {
        check(&case, &options().with_epoch(epoch));
    }
}

#[test]
fn secret_tree() {
    let mut case = Case::new().file("keystore/key", pattern(64, 1));
    case.tree.mark_secret();
    assert!(case.tree.is_secret());
    check(&case, &options().with_label("SERVICEDISK"));
}

#[test]
fn host_paths() {
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("keystore/sub")).unwrap();
    std::fs::create_dir_all(src.path().join("empty")).unwrap();
    std::fs::write(src.path().join("keystore/sub/k.pem"), pattern(3000, 1)).unwrap();
    std::fs::write(src.path().join("top.txt"), b"top").unwrap();
    // Big enough that copy_file_range needs more than one call.
    std::fs::write(src.path().join("keystore/large.bin"), pattern((5 << 20) + 123, 4)).unwrap();
    let binary = src.path().join("bin");
    std::fs::write(&binary, pattern(100_000, 2)).unwrap();
    let mut expected = kiln_testkit::read_tree(src.path()).unwrap();
    // Symlinks are followed: the link becomes a regular file.
    std::os::unix::fs::symlink("top.txt", src.path().join("link to top")).unwrap();
    expected.insert("link to top".into(), kiln_testkit::Entry::File(b"top".to_vec()));
    std::os::unix::fs::symlink("keystore/sub", src.path().join("linked dir")).unwrap();
    expected.insert("linked dir".into(), kiln_testkit::Entry::Dir);
    expected.insert("linked dir/k.pem".into(), kiln_testkit::Entry::File(pattern(3000, 1)));

    let mut case = Case::new();
    case.tree.add_host_path("", src.path()).unwrap();
    case.tree.add_host_path("copy", src.path()).unwrap();
    case.tree.add_file_from_path("service", &binary).unwrap();
    for (path, entry) in expected.clone() {
        case.expected.insert(format!("copy/{path}"), entry);
    }
    case.expected.insert("copy".into(), kiln_testkit::Entry::Dir);
    case.expected.extend(expected);
    case.expected.insert("service".into(), kiln_testkit::Entry::File(pattern(100_000, 2)));
    check(&case, &options());
}

#[test]
fn cloud_init_seed() {
    let seed = kiln_imagefmt::NoCloudSeed {
        user_data: b"#cloud-config\nruncmd: [echo hi]\n".to_vec(),
        meta_data: kiln_imagefmt::NoCloudSeed::meta_data("i-1", "host"),
        network_config: Some(b"version: 2\n".to_vec()),
        vendor_data: None,
    };
    let case = Case {
        tree: seed.tree().unwrap(),
        expected: [
            ("user-data", seed.user_data.clone()),
            ("meta-data", seed.meta_data.clone()),
            ("network-config", b"version: 2\n".to_vec()),
        ]
        .into_iter()
        .map(|(name, bytes)| (name.to_owned(), kiln_testkit::Entry::File(bytes)))
        .collect(),
    };
    check(&case, &options().with_label(kiln_imagefmt::NoCloudSeed::LABEL));
}
