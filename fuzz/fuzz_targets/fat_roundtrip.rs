//! Arbitrary tree and options -> kiln-imagefmt FAT image -> read back with
//! the `fatfs` crate -> must be the same tree.
//!
//! Invalid input (bad names, impossible geometry) must come back as an
//! `Err` of the right kind; any panic, and any image that reads back
//! different, is a bug. Inputs stay small (at most 200 entries and 1 MiB of
//! data, images of at most 40 MiB) so that each run takes milliseconds.
#![no_main]

use std::collections::BTreeMap;
use std::io::{Cursor, Read};

use arbitrary::Arbitrary;
use kiln_imagefmt::{ErrorKind, FatOptions, FatTree, FatType};
use libfuzzer_sys::fuzz_target;

const MAX_ENTRIES: usize = 200;
const MAX_DATA: usize = 1 << 20;
/// Fixed sizes are drawn up to this; larger images come only from forced
/// FAT32 (at least 65525 clusters, so about 33 MiB).
const MAX_FIXED_SIZE: u64 = 8 << 20;
const MAX_IMAGE: u64 = 40 << 20;

/// The tree is a flat list: each entry names its parent by index among the
/// directories accepted so far, so depth comes from the data without
/// recursive types (and without recursion in `Arbitrary`).
#[derive(Arbitrary, Debug)]
struct Input {
    entries: Vec<FuzzEntry>,
    fat_type: Option<u8>,
    /// Fixed size in sectors (reduced modulo [`MAX_FIXED_SIZE`]).
    size_sectors: Option<u32>,
    /// Cluster size as a power of two times 512 (64 KiB and up is invalid).
    cluster_shift: Option<u8>,
    label: Label,
    volume_id: Option<u32>,
    epoch: i64,
    secret: bool,
}

#[derive(Arbitrary, Debug)]
struct FuzzEntry {
    parent: u8,
    name: String,
    kind: Kind,
}

#[derive(Arbitrary, Debug)]
enum Kind {
    Dir,
    /// A file of `len` bytes of a pattern, so large files cost no input.
    Pattern {
        len: u32,
        seed: u8,
    },
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Label {
    None,
    /// Drawn from characters every label may hold.
    Valid {
        len: u8,
        chars: [u8; 11],
    },
    /// Anything: the writer must refuse it cleanly or accept it.
    Raw(String),
}

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    File(Vec<u8>),
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

fuzz_target!(|input: Input| {
    let mut tree = FatTree::new();
    let mut expected = BTreeMap::new();
    let mut dirs = vec![String::new()];
    let mut data_left = MAX_DATA;
    for entry in input.entries.iter().take(MAX_ENTRIES) {
        // A `/` would make one name several components; the path form of
        // the API is exercised by the test suite, here names are single.
        if entry.name.is_empty() || entry.name.contains('/') {
            continue;
        }
        let parent = &dirs[usize::from(entry.parent) % dirs.len()];
        let path = if parent.is_empty() { entry.name.clone() } else { format!("{parent}/{}", entry.name) };
        let added = match &entry.kind {
            Kind::Dir => tree.add_dir(&path).map(|()| Entry::Dir),
            Kind::Pattern { len, seed } => {
                let bytes = pattern((*len as usize % 70_000).min(data_left), *seed);
                tree.add_file_from_bytes(&path, bytes.clone()).map(|()| Entry::File(bytes))
            }
            Kind::Bytes(bytes) => {
                let bytes = bytes[..bytes.len().min(data_left)].to_vec();
                tree.add_file_from_bytes(&path, bytes.clone()).map(|()| Entry::File(bytes))
            }
        };
        match added {
            Ok(entry) => {
                if let Entry::File(bytes) = &entry {
                    data_left -= bytes.len();
                } else if !expected.contains_key(&path) {
                    dirs.push(path.clone());
                }
                expected.insert(path, entry);
            }
            Err(err) => assert_eq!(err.kind(), ErrorKind::InvalidInput, "{path:?}: {err}"),
        }
    }
    if input.secret {
        tree.mark_secret();
    }
    let files = expected.values().filter(|e| matches!(e, Entry::File(_))).count() as u64;
    assert_eq!((tree.file_count(), tree.dir_count()), (files, expected.len() as u64 - files));

    let label = match &input.label {
        Label::None => None,
        Label::Valid { len, chars } => {
            const SET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-";
            let len = usize::from(*len) % 11 + 1;
            Some(chars[..len].iter().map(|&c| char::from(SET[usize::from(c) % SET.len()])).collect())
        }
        Label::Raw(raw) => Some(raw.clone()),
    };
    let mut options = FatOptions::default()
        .with_volume_id(input.volume_id)
        .with_epoch(input.epoch)
        .with_fat_type(input.fat_type.map(|t| [FatType::Fat12, FatType::Fat16, FatType::Fat32][usize::from(t) % 3]))
        .with_size(input.size_sectors.map(|s| (u64::from(s) % (MAX_FIXED_SIZE / 512) + 1) * 512))
        .with_cluster_size(input.cluster_shift.map(|shift| 512u32 << (shift % 8)));
    options.label = label.clone();
    let layout = match tree.layout(&options) {
        Ok(layout) => layout,
        Err(err) => {
            assert!(matches!(err.kind(), ErrorKind::InvalidInput | ErrorKind::DoesNotFit), "{options:?}: {err}");
            let automatic = options.fat_type.is_none() && options.size.is_none() && options.cluster_size.is_none();
            assert!(!(automatic && err.kind() == ErrorKind::DoesNotFit), "automatic geometry must fit: {err}");
            return;
        }
    };
    let summary = layout.summary();
    if summary.image_bytes > MAX_IMAGE {
        return; // Forced FAT32 with large clusters: valid, but too big to fuzz in memory.
    }
    let mut image = Cursor::new(Vec::new());
    layout.write_to(&mut image).expect("write_to a Vec cannot fail");
    let image = image.into_inner();
    assert_eq!(image.len() as u64, summary.image_bytes);
    if let Some(size) = options.size {
        assert_eq!(summary.image_bytes, size);
    }

    let fs = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).expect("fatfs mounts the image");
    let bits = match fs.fat_type() {
        fatfs::FatType::Fat12 => 12,
        fatfs::FatType::Fat16 => 16,
        fatfs::FatType::Fat32 => 32,
    };
    assert_eq!(bits, summary.fat_type.bits());
    let stats = fs.stats().expect("fatfs stats");
    assert_eq!(
        (stats.cluster_size(), stats.total_clusters(), stats.free_clusters()),
        (summary.cluster_size, summary.clusters, summary.free_clusters)
    );
    let root_label = fs.read_volume_label_from_root_dir().expect("read label");
    assert_eq!(root_label, label.map(|l| l.to_uppercase()));
    let mut found = BTreeMap::new();
    read_dir(&fs.root_dir(), "", &mut found);
    assert_eq!(found, expected);
    assert_eq!(summary.files, files);
});

fn read_dir<T: fatfs::ReadWriteSeek>(dir: &fatfs::Dir<'_, T>, prefix: &str, out: &mut BTreeMap<String, Entry>) {
    for entry in dir.iter() {
        let entry = entry.expect("fatfs reads the directory");
        let name = entry.file_name();
        if name == "." || name == ".." {
            continue;
        }
        let path = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        if entry.is_dir() {
            assert!(out.insert(path.clone(), Entry::Dir).is_none(), "{path} twice");
            read_dir(&entry.to_dir(), &path, out);
        } else {
            let mut bytes = Vec::new();
            entry.to_file().read_to_end(&mut bytes).expect("fatfs reads the file");
            assert!(out.insert(path.clone(), Entry::File(bytes)).is_none(), "{path} twice");
        }
    }
}
