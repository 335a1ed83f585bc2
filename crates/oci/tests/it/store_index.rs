//! `Store::find`: the image a source string was last pulled as, read from
//! the store's small index, on images umoci made; a warm pull writes
//! nothing, a tag that moved is found at its new image, gc drops what it
//! removed.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use kiln_oci::{Image, ImageSource, Store};

use crate::images::{self, TAG};

fn pull(store: &Store, source: &str) -> Image {
    let opened = source.parse::<ImageSource>().unwrap().open().unwrap();
    store.pull(opened.as_ref(), &mut |_| {}).unwrap_or_else(|error| panic!("{source}: {error}"))
}

/// The name the store files a source under: the source as kiln displays it.
fn key(source: &str) -> String {
    source.parse::<ImageSource>().unwrap().to_string()
}

/// The index's identity and time: any rewrite changes the inode (temp + rename).
fn stamp(path: &Path) -> (u64, i64, i64) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.ino(), meta.mtime(), meta.mtime_nsec())
}

#[test]
fn find_returns_what_a_source_was_last_pulled_as_and_a_warm_pull_rewrites_no_index() {
    let test = kiln_testkit::current_test_name();
    let Some(images) = images::busybox(&test) else { return };
    let Some(umoci) = kiln_testkit::require_tool(&test, "umoci") else { return };
    let scratch = tempfile::tempdir().unwrap();
    let layout = scratch.path().join("layout");
    images::copy_dir(&images.two_tags, &layout);
    let store = Store::open(scratch.path().join("store")).unwrap();
    let (source_one, source_two) = (format!("oci:{}:{TAG}", layout.display()), format!("oci:{}:2", layout.display()));
    assert_eq!(store.find(&key(&source_one)).unwrap(), None, "nothing pulled yet");

    let one = pull(&store, &source_one);
    assert_eq!(store.find(&key(&source_one)).unwrap().as_ref(), Some(&one));
    assert_eq!(store.find(&key(&source_two)).unwrap(), None, "tag 2 was never pulled");
    let two = pull(&store, &source_two);
    assert_eq!(store.find(&key(&source_two)).unwrap().as_ref(), Some(&two));
    assert_eq!(store.find(&key(&source_one)).unwrap().as_ref(), Some(&one));

    // Warm: the index already says so, and is not rewritten.
    let index = store.root().join("sources.json");
    let before = stamp(&index);
    assert_eq!(pull(&store, &source_one), one);
    assert_eq!(stamp(&index), before, "a warm pull rewrote sources.json");

    // Tag 1 moves to image two: the next pull of tag 1 finds image two.
    let tagged = Command::new(&umoci).args(["tag", "--image"]).arg(format!("{}:2", layout.display())).arg(TAG).output();
    let tagged = tagged.unwrap();
    assert!(tagged.status.success(), "umoci tag: {}", String::from_utf8_lossy(&tagged.stderr));
    assert_eq!(store.find(&key(&source_one)).unwrap().as_ref(), Some(&one), "no pull since: still image one");
    pull(&store, &source_one);
    let moved = store.find(&key(&source_one)).unwrap().expect("tag 1 is in the store");
    assert_eq!(moved.manifest_digest(), two.manifest_digest(), "tag 1 after it moved");

    // gc with no references removes both images, and the index with them.
    let report = store.gc().unwrap();
    assert_eq!(report.images, 2);
    assert_eq!(store.find(&key(&source_one)).unwrap(), None);
    assert_eq!(store.find(&key(&source_two)).unwrap(), None);
    assert!(!index.exists(), "an index of nothing is left behind");
}

#[test]
fn a_record_of_another_kiln_version_whatever_its_shape_is_not_here_and_a_pull_writes_it_again() {
    let test = kiln_testkit::current_test_name();
    let Some(images) = images::busybox(&test) else { return };
    let scratch = tempfile::tempdir().unwrap();
    let store = Store::open(scratch.path().join("store")).unwrap();
    let source = format!("oci:{}:{TAG}", images.layout.display());
    let image = pull(&store, &source);
    let record = store.root().join("images/sha256").join(format!("{}.json", image.manifest_digest().hex()));
    // An older and a newer kiln's records: another version, fields renamed or retyped.
    let others = [
        serde_json::json!({"version": 0, "manifest": image.manifest_digest().to_string(), "layers": "one string"}),
        // Version 1 kept no StopSignal: its image would stop with SIGTERM.
        serde_json::json!({"version": 1, "manifest": image.manifest_digest().to_string()}),
        serde_json::json!({"version": 99, "image": {"manifest": image.manifest_digest().to_string()}, "cmd": 7}),
    ];
    for other in others {
        std::fs::write(&record, serde_json::to_vec(&other).unwrap()).unwrap();
        assert_eq!(store.image(image.manifest_digest()).unwrap(), None, "{other}");
        assert_eq!(store.find(&key(&source)).unwrap(), None, "{other}");
        // Not here: the pull writes this kiln's record again.
        assert_eq!(pull(&store, &source), image);
        assert_eq!(store.image(image.manifest_digest()).unwrap().as_ref(), Some(&image));
    }
    // A record of this version that is not one is still an error, naming the file.
    std::fs::write(&record, br#"{"version": 2, "manifest": 3}"#).unwrap();
    let error = store.image(image.manifest_digest()).unwrap_err().to_string();
    assert!(error.contains(&record.display().to_string()), "{error}");
}

/// Every file and directory under the store but its lock files, relative, sorted.
fn store_entries(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() {
                pending.push(path);
                found.push(format!("{rel}/"));
            } else if path.extension().is_none_or(|e| e != "lock") {
                found.push(rel);
            }
        }
    }
    found.sort();
    found
}

/// Writes `name` in the derived directory of `chain`, as a layer-filesystem writer would.
fn derived(store: &Store, chain: &kiln_oci::Digest, name: &str) -> String {
    let dir = store.derived_dir(chain).unwrap();
    std::fs::write(dir.join(name), name.as_bytes()).unwrap();
    format!("derived/sha256/{}/{name}", chain.hex())
}

#[test]
fn gc_removes_a_killed_writers_temp_files_from_a_derived_directory_still_used() {
    let test = kiln_testkit::current_test_name();
    let Some(images) = images::busybox(&test) else { return };
    let scratch = tempfile::tempdir().unwrap();
    let store = Store::open(scratch.path().join("store")).unwrap();
    let image = pull(&store, &format!("oci:{}:{TAG}", images.layout.display()));
    store.retain("vm", image.manifest_digest()).unwrap();
    let chain = image.chain_ids()[0];
    let disk = derived(&store, &chain, "from0.ext4");
    // What kiln-imagefmt's temp file + rename leaves when its writer is killed.
    let temp = derived(&store, &chain, ".from0.ext4.Ab12Cd.kiln-tmp");
    let report = store.gc().unwrap();
    assert_eq!((report.images, report.derived, report.derived_files), (0, 0, 1), "{report:?}");
    let left = store_entries(store.root());
    assert!(left.contains(&disk), "the layer filesystem stays: {left:?}");
    assert!(!left.contains(&temp), "the killed writer's temp file is gone: {left:?}");
}

#[test]
fn gc_dry_run_reports_exactly_what_gc_then_removes_and_removes_nothing() {
    let test = kiln_testkit::current_test_name();
    let Some(images) = images::busybox(&test) else { return };
    let scratch = tempfile::tempdir().unwrap();
    let store = Store::open(scratch.path().join("store")).unwrap();
    let dir = images.two_tags.display();
    let (source_one, source_two) = (format!("oci:{dir}:{TAG}"), format!("oci:{dir}:2"));
    let one = pull(&store, &source_one);
    let two = pull(&store, &source_two);
    store.retain("vm", one.manifest_digest()).unwrap();
    let (base, top) = (one.chain_ids()[0], two.chain_ids()[1]);
    let kept = derived(&store, &base, "from0.new.ext4");
    let other_format = derived(&store, &base, "from0.old.ext4");
    let temp = derived(&store, &base, ".from0.new.ext4.x1.kiln-tmp");
    derived(&store, &top, "from1.new.ext4");
    std::fs::write(store.root().join("tmp/4242-0-1"), b"a killed pull's").unwrap();
    let options = kiln_oci::GcOptions::default;

    let before = store_entries(store.root());
    let plan = store.gc_with(&options().dry_run(true)).unwrap();
    assert_eq!(store_entries(store.root()), before, "a dry run removed something");
    assert_eq!(store.find(&key(&source_two)).unwrap().as_ref(), Some(&two), "a dry run edited the index");
    // Image two (record, top layer, manifest, config), its top chain's
    // directory, and in the base's the temp file (another format's file stays).
    assert_eq!((plan.images, plan.layers, plan.blobs, plan.derived, plan.derived_files), (1, 1, 2, 1, 1), "{plan:?}");
    assert_eq!(plan.temp_files, 1, "the killed pull's file in tmp/: {plan:?}");
    assert!(plan.bytes > 0, "{plan:?}");

    let done = store.gc_with(&options()).unwrap();
    assert_eq!(done, plan, "gc removed other than its dry run said");
    let after = store_entries(store.root());
    let removed: Vec<&String> = before.iter().filter(|entry| !after.contains(entry)).collect();
    let top_dir = format!("derived/sha256/{}/", top.hex());
    // Record, layer tar, 2 blobs, the temp file, the top directory and its file, the temp file in tmp/.
    assert_eq!(removed.len(), 1 + 1 + 2 + 1 + 2 + 1, "{removed:#?}");
    for gone in [&temp, &top_dir, &"tmp/4242-0-1".to_owned()] {
        assert!(removed.contains(&gone), "{gone} stayed: {after:#?}");
    }
    assert!(after.contains(&kept), "{after:#?}");
    assert!(after.contains(&other_format), "another format's file goes with its directory only: {after:#?}");
    assert_eq!(store.find(&key(&source_one)).unwrap().as_ref(), Some(&one));
    assert_eq!(store.find(&key(&source_two)).unwrap(), None);
    // Nothing left to remove: a dry run says so.
    assert_eq!(store.gc_with(&options().dry_run(true)).unwrap(), kiln_oci::GcReport::default());
    // Unless it counts vm's reference as released (as `kiln gc --dry-run` does a dead VM's).
    let vm = ["vm".to_owned()];
    let plan = store.gc_with(&options().dry_run(true).as_if_released(&vm)).unwrap();
    assert_eq!((plan.images, plan.layers, plan.blobs, plan.derived), (1, 1, 2, 1), "{plan:?}");
    assert_eq!(store_entries(store.root()), after, "a dry run removed something");
    assert_eq!(store.references("vm").unwrap(), vec![*one.manifest_digest()]);
}
