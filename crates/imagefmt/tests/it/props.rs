//! Random trees through the writer and back out of the `fatfs` crate, with
//! `fsck.fat` and mtools on a fraction of the cases.
//!
//! `PROPTEST_CASES` overrides the number of cases (default below).

use std::collections::HashSet;
use std::io::Cursor;

use kiln_imagefmt::{FatOptions, FatType};
use kiln_testkit::Entry;
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestRunner};

use crate::support::{Case, options, pattern, spec_fat_type};

const DEFAULT_CASES: u32 = 48;
/// Keeps every case small enough for forced FAT12 with 512-byte clusters.
const MAX_TREE_BYTES: usize = 1 << 20;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        // Shrunk failures are kept next to this file and replayed first.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        source_file: Some(file!()),
        ..ProptestConfig::with_cases(cases)
    }
}

/// A generated tree: files are (size, seed) so shrinking stays cheap.
#[derive(Debug, Clone)]
enum Node {
    File { size: usize, seed: u64 },
    Dir(Vec<(String, Node)>),
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9]{1,8}(\\.[a-z]{1,3})?",
        2 => "[A-Z0-9_]{1,8}(\\.[A-Z]{1,3})?",
        2 => "[a-zA-Z0-9 _+,;=.\\[\\]-]{1,60}[a-zA-Z0-9]",
        1 => "[a-z]{0,3}[éüß日本語😀Ωй][a-z .]{0,10}[a-zé😀]",
        1 => "\\.[a-z]{1,12}",
        1 => "[a-zA-Z]{13,26}",
    ]
}

fn file_size() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0usize..200,
        3 => prop::sample::select(vec![0usize, 1, 511, 512, 513, 1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096, 4097, 8191, 8192, 8193, 16384, 32767, 32768, 32769]),
        1 => 0usize..70_000,
    ]
}

fn node() -> impl Strategy<Value = Node> {
    let file = (file_size(), any::<u64>()).prop_map(|(size, seed)| Node::File { size, seed });
    // Depth up to 4 below the root, up to ~12 entries per directory.
    file.prop_recursive(4, 120, 12, |inner| prop::collection::vec((name(), inner), 0..12).prop_map(Node::Dir))
}

fn root() -> impl Strategy<Value = Vec<(String, Node)>> {
    prop::collection::vec((name(), node()), 0..16)
}

/// Fills `case` from generated entries, dropping names FAT would take for
/// duplicates (the API refuses those; that is tested elsewhere) and files
/// past the byte budget.
fn add(case: &mut Case, prefix: &str, entries: &[(String, Node)], budget: &mut usize) {
    let mut seen = HashSet::new();
    for (name, node) in entries {
        if !seen.insert(name.to_uppercase()) {
            continue;
        }
        let path = format!("{prefix}{name}");
        match node {
            Node::File { size, seed } => {
                let size = (*size).min(*budget);
                *budget -= size;
                let bytes = pattern(size, *seed);
                case.tree.add_file_from_bytes(&path, bytes.clone()).unwrap_or_else(|err| panic!("{path:?}: {err}"));
                case.expected.insert(path, Entry::File(bytes));
            }
            Node::Dir(children) => {
                case.tree.add_dir(&path).unwrap_or_else(|err| panic!("{path:?}: {err}"));
                case.expected.insert(path.clone(), Entry::Dir);
                add(case, &format!("{path}/"), children, budget);
            }
        }
    }
}

fn fat_options() -> impl Strategy<Value = FatOptions> {
    // Forced cluster sizes only where the forced type stays small enough
    // to build in memory (FAT16 with 32 KiB clusters needs 128 MiB).
    let typed = prop_oneof![
        4 => Just((None, None)),
        1 => prop::option::of(prop::sample::select(vec![512u32, 1024, 2048, 4096, 8192, 16384, 32768])).prop_map(|cs| (None, cs)),
        1 => prop::option::of(prop::sample::select(vec![512u32, 1024, 4096, 32768])).prop_map(|cs| (Some(FatType::Fat12), cs)),
        1 => prop::option::of(prop::sample::select(vec![512u32, 1024, 2048])).prop_map(|cs| (Some(FatType::Fat16), cs)),
        1 => prop::option::of(Just(512u32)).prop_map(|cs| (Some(FatType::Fat32), cs)),
    ];
    let label = prop::option::of("[A-Z0-9_]{1,11}");
    let epoch = prop::sample::select(vec![0i64, 1_000_000_000, 1_717_243_200, 4_000_000_000]);
    (typed, label, epoch).prop_map(|((fat_type, cluster_size), label, epoch)| {
        let mut options = options().with_epoch(epoch).with_fat_type(fat_type).with_cluster_size(cluster_size);
        options.label = label;
        options
    })
}

fn run_case(entries: &[(String, Node)], opts: &FatOptions, with_tools: bool) -> Result<(), TestCaseError> {
    let mut case = Case::new();
    let mut budget = MAX_TREE_BYTES;
    add(&mut case, "", entries, &mut budget);
    let layout = case.tree.layout(opts).map_err(|err| TestCaseError::fail(format!("layout: {err}")))?;
    let summary = layout.summary();
    prop_assert_eq!(summary.fat_type, spec_fat_type(summary.clusters));
    if let Some(fat_type) = opts.fat_type {
        prop_assert_eq!(summary.fat_type, fat_type);
    }
    let mut image = Cursor::new(Vec::new());
    layout.write_to(&mut image).map_err(|err| TestCaseError::fail(format!("write_to: {err}")))?;
    let image = image.into_inner();
    prop_assert_eq!(image.len() as u64, summary.image_bytes);
    crate::spec::check_boot_sector(&image, &summary, opts.label.as_deref());
    let view =
        kiln_testkit::inspect_fat_with_fatfs(&image).map_err(|err| TestCaseError::fail(format!("fatfs: {err}")))?;
    if let Some(diff) = kiln_testkit::tree_diff(&view.tree, &case.expected) {
        return Err(TestCaseError::fail(format!("fatfs reads a different tree:\n{diff}")));
    }
    prop_assert_eq!(view.free_clusters, summary.free_clusters);
    prop_assert_eq!(view.root_label, opts.label.clone());
    if with_tools {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.img");
        std::fs::write(&path, &image).unwrap();
        kiln_testkit::fsck_fat_clean(&path).map_err(TestCaseError::fail)?;
        if let Some(tree) = kiln_testkit::read_fat_with_mtools(&path).map_err(TestCaseError::fail)? {
            if let Some(diff) = crate::support::mtools_diff(&tree, &case.expected) {
                return Err(TestCaseError::fail(format!("mcopy extracted a different tree:\n{diff}")));
            }
        }
    }
    Ok(())
}

#[test]
fn random_trees_read_back_equal() {
    // Looked up once, outside the cases: a missing tool under
    // KILN_REQUIRE_TOOLS=1 fails here, not as a "shrunk" case.
    let tools =
        kiln_testkit::require_tools(&kiln_testkit::current_test_name(), &["fsck.fat", "mcopy", "mdir"]).is_some();
    let strategy = (root(), fat_options(), prop::bool::weighted(0.25));
    let mut runner = TestRunner::new(config());
    if let Err(err) =
        runner.run(&strategy, |(entries, opts, with_tools)| run_case(&entries, &opts, with_tools && tools))
    {
        panic!("{err}");
    }
}
