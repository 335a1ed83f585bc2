//! One pipeline every interop test runs an image through: plan, write both
//! ways (`write_to` a buffer, `write_file` to disk), then read it back with
//! `fsck.fat`, mtools and the `fatfs` crate and compare with what went in.

use std::fs;
use std::io::Cursor;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kiln_imagefmt::{FatOptions, FatSummary, FatTree, FatType};
use kiln_testkit::{Entry, FatDateTime, Tree};

/// A tree being built twice in step: as a `FatTree` for the writer and as
/// the `Tree` a reader should find.
#[derive(Debug, Default, Clone)]
pub(crate) struct Case {
    pub(crate) tree: FatTree,
    pub(crate) expected: Tree,
}

impl Case {
    pub(crate) fn new() -> Case {
        Case::default()
    }

    pub(crate) fn dir(mut self, path: &str) -> Case {
        self.tree.add_dir(path).unwrap_or_else(|err| panic!("add_dir({path:?}): {err}"));
        self.expect_parents(&format!("{path}/x"));
        self
    }

    pub(crate) fn file(mut self, path: &str, bytes: impl Into<Vec<u8>>) -> Case {
        let bytes = bytes.into();
        self.tree.add_file_from_bytes(path, bytes.clone()).unwrap_or_else(|err| panic!("add_file({path:?}): {err}"));
        self.expect_parents(path);
        self.expected.insert(path.to_owned(), Entry::File(bytes));
        self
    }

    /// Records every ancestor directory of `path` as expected.
    fn expect_parents(&mut self, path: &str) {
        let mut at = 0;
        while let Some(slash) = path[at..].find('/') {
            self.expected.insert(path[..at + slash].to_owned(), Entry::Dir);
            at += slash + 1;
        }
    }
}

/// Deterministic, position-dependent filler: a cluster written to the
/// wrong place, or a chain cut short, cannot go unnoticed.
pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub(crate) fn options() -> FatOptions {
    // The default but for the epoch, which the default reads from SOURCE_DATE_EPOCH.
    FatOptions::default().with_epoch(0)
}

/// The FAT type the Microsoft specification assigns to a cluster count.
pub(crate) fn spec_fat_type(clusters: u32) -> FatType {
    match clusters {
        0..4085 => FatType::Fat12,
        4085..65525 => FatType::Fat16,
        _ => FatType::Fat32,
    }
}

/// Plans, writes and reads back `case` with `options`, asserting that every
/// reader agrees with the input and with the writer's own summary.
pub(crate) fn check(case: &Case, options: &FatOptions) -> FatSummary {
    let layout = case.tree.layout(options).unwrap_or_else(|err| panic!("layout failed: {err}"));
    let summary = layout.summary();
    check_summary(&summary, case, options);

    let mut buffer = Cursor::new(Vec::new());
    layout.write_to(&mut buffer).unwrap_or_else(|err| panic!("write_to failed: {err}"));
    let image = buffer.into_inner();
    assert_eq!(image.len() as u64, summary.image_bytes, "write_to wrote a different length than the summary says");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.img");
    let mut progress = Vec::new();
    let written = layout
        .write_file(&path, Some(&mut |done| progress.push(done)))
        .unwrap_or_else(|err| panic!("write_file failed: {err}"));
    assert_eq!(written, summary, "write_file's summary differs from layout's");
    check_progress(&progress, summary.data_bytes);
    let on_disk = fs::read(&path).unwrap();
    assert!(
        on_disk == image,
        "write_file and write_to disagree; first difference at byte {:?}",
        first_difference(&on_disk, &image)
    );
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, if case.tree.is_secret() { 0o600 } else { 0o644 }, "image mode");
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["image.img"], "write_file left something besides the image");

    check_with_tools(&path, case, options);
    crate::spec::check_boot_sector(&image, &summary, options.label.as_deref());
    check_with_fatfs(&image, &summary, case, options);
    summary
}

fn check_summary(summary: &FatSummary, case: &Case, options: &FatOptions) {
    let files = case.expected.values().filter(|e| matches!(e, Entry::File(_))).count() as u64;
    let dirs = case.expected.len() as u64 - files;
    let data: u64 = case.expected.values().map(|e| if let Entry::File(b) = e { b.len() as u64 } else { 0 }).sum();
    assert_eq!(
        (summary.files, summary.dirs, summary.data_bytes),
        (files, dirs, data),
        "summary counts (files, dirs, bytes)"
    );
    assert_eq!(
        summary.fat_type,
        spec_fat_type(summary.clusters),
        "FAT type against the spec's cluster-count rule: {summary:?}"
    );
    if let Some(fat_type) = options.fat_type {
        assert_eq!(summary.fat_type, fat_type, "forced FAT type not honoured");
    }
    if let Some(size) = options.size {
        assert_eq!(summary.image_bytes, size, "fixed size not honoured");
    }
    if let Some(cluster_size) = options.cluster_size {
        assert_eq!(summary.cluster_size, cluster_size, "forced cluster size not honoured");
    }
    if let Some(volume_id) = options.volume_id {
        assert_eq!(summary.volume_id, volume_id, "volume id not honoured");
    }
    assert!(summary.free_clusters <= summary.clusters, "{summary:?}");
    assert_eq!(summary.image_bytes % 512, 0, "image is not whole sectors: {summary:?}");
}

fn check_progress(progress: &[u64], data_bytes: u64) {
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "progress went backwards: {progress:?}");
    if data_bytes > 0 {
        assert_eq!(progress.last().copied(), Some(data_bytes), "progress must end at the data size");
    } else {
        assert!(progress.iter().all(|&p| p == 0), "progress for an image without data: {progress:?}");
    }
}

pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then_some(a.len().min(b.len())))
}

fn expected_label(options: &FatOptions) -> Option<String> {
    options.label.as_ref().map(|label| label.to_uppercase())
}

/// `fsck.fat -n` clean, mcopy extracts the input byte for byte, and mdir
/// reports the label.
pub(crate) fn check_with_tools(path: &Path, case: &Case, options: &FatOptions) {
    if let Err(complaint) = kiln_testkit::fsck_fat_clean(path) {
        panic!("fsck.fat is not happy:\n{complaint}");
    }
    match kiln_testkit::read_fat_with_mtools(path) {
        Err(err) => panic!("mtools could not read the image: {err}"),
        Ok(None) => {}
        Ok(Some(tree)) => {
            if let Some(diff) = mtools_diff(&tree, &case.expected) {
                panic!("mcopy extracted a different tree:\n{diff}");
            }
        }
    }
    if let Some(listing) = kiln_testkit::mdir_listing(path).unwrap_or_else(|err| panic!("{err}")) {
        assert_eq!(kiln_testkit::mtools_label(&listing), expected_label(options), "label mdir reports:\n{listing}");
    }
}

/// How what mcopy extracted differs from `expected`, allowing for mtools
/// spelling a character outside the BMP as `__` (see `as_mtools_names`).
pub(crate) fn mtools_diff(extracted: &Tree, expected: &Tree) -> Option<String> {
    let diff = kiln_testkit::tree_diff(extracted, expected)?;
    match kiln_testkit::as_mtools_names(expected) {
        Some(mangled) => kiln_testkit::tree_diff(extracted, &mangled).map(|_| diff),
        None => {
            eprintln!("mtools comparison skipped: names differing only outside the BMP collide in mtools");
            None
        }
    }
}

fn check_with_fatfs(image: &[u8], summary: &FatSummary, case: &Case, options: &FatOptions) {
    let view =
        kiln_testkit::inspect_fat_with_fatfs(image).unwrap_or_else(|err| panic!("fatfs cannot read the image: {err}"));
    if let Some(diff) = kiln_testkit::tree_diff(&view.tree, &case.expected) {
        panic!("fatfs reads a different tree:\n{diff}");
    }
    assert_eq!(view.fat_bits, summary.fat_type.bits(), "FAT type fatfs derives");
    assert_eq!(
        (view.cluster_size, view.total_clusters, view.free_clusters, view.volume_id),
        (summary.cluster_size, summary.clusters, summary.free_clusters, summary.volume_id),
        "fatfs's (cluster size, clusters, free clusters, volume id) against the summary"
    );
    let label = expected_label(options);
    assert_eq!(view.boot_label, label.clone().unwrap_or_else(|| "NO NAME".into()), "boot sector label");
    assert_eq!(view.root_label, label, "root directory label entry");
    if !case.expected.is_empty() {
        let stamp = FatDateTime::from_unix(options.epoch);
        assert_eq!(view.modified_times.iter().copied().collect::<Vec<_>>(), [stamp], "modification times");
        assert_eq!(view.created_times.iter().copied().collect::<Vec<_>>(), [stamp], "creation times");
    }
}
