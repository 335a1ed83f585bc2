//! Image sources and the store, on images umoci and skopeo made: every
//! kind of source gives the same image, damage is caught naming the blob
//! and leaves nothing behind, and gc removes exactly what nobody uses.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kiln_oci::{BlobProgress, Compression, Digest, Image, ImageSource, Store};

use crate::images::{self, Busybox, TAG};

fn pull(store: &Store, source: &str) -> kiln_oci::Result<Image> {
    let mut events = Vec::new();
    let result = pull_reporting(store, source, &mut events);
    if let Ok(image) = &result {
        for layer in image.layers() {
            let last = events.iter().rev().find(|e| e.digest == *layer.digest()).expect("progress for every layer");
            assert_eq!((last.done, last.total), (layer.size(), layer.size()), "progress of {}", layer.digest());
        }
    }
    result
}

fn pull_reporting(store: &Store, source: &str, events: &mut Vec<BlobProgress>) -> kiln_oci::Result<Image> {
    let opened = source.parse::<ImageSource>()?.open()?;
    store.pull(opened.as_ref(), &mut |event| events.push(*event))
}

/// Every file under the store but its lock files, relative, sorted.
pub(crate) fn store_files(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_none_or(|e| e != "lock") {
                files.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    files.sort();
    files
}

fn sha256sum(path: &Path) -> Digest {
    let output = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    Digest::from_hex(text.split_whitespace().next().unwrap()).unwrap()
}

fn diff_ids(image: &Image) -> Vec<Digest> {
    image.layers().iter().map(|l| *l.diff_id()).collect()
}

fn images(test: &str) -> Option<Busybox> {
    images::busybox(test)
}

#[test]
fn every_source_kind_pulls_the_busybox_image_to_the_same_config_and_diff_ids() {
    let Some(images) = images("every_source_kind_pulls_the_busybox_image_to_the_same_config_and_diff_ids") else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let indexed = scratch.path().join("indexed");
    images::copy_dir(&images.layout, &indexed);
    images::mutate(&indexed, "amd64-index");
    let docker_types = scratch.path().join("docker-types");
    images::copy_dir(&images.layout, &docker_types);
    images::mutate(&docker_types, "docker-manifest-list");
    let sources = [
        (format!("oci:{}:{TAG}", images.layout.display()), Compression::Gzip),
        (format!("oci:{}", images.layout.display()), Compression::Gzip),
        (format!("oci:{}:{TAG}", indexed.display()), Compression::Gzip),
        (format!("oci:{}:{TAG}", docker_types.display()), Compression::Gzip),
        (format!("oci-archive:{}:{TAG}", images.oci_archive.display()), Compression::Gzip),
        (format!("oci-archive:{}", images.oci_archive.display()), Compression::Gzip),
        (format!("docker-archive:{}", images.docker_archive.display()), Compression::None),
        (format!("docker-archive:{}:kiln-test/busybox:{TAG}", images.docker_archive.display()), Compression::None),
        (format!("oci:{}:{TAG}", images.zstd_layout.display()), Compression::Zstd),
        (format!("oci:{}:{TAG}", images.plain_layout.display()), Compression::None),
    ];
    let mut first: Option<Image> = None;
    for (i, (source, compression)) in sources.iter().enumerate() {
        // A store of its own each, so every source's layer is decompressed and checked.
        let store = Store::open(scratch.path().join(format!("store-{i}"))).unwrap();
        let image = pull(&store, source).unwrap_or_else(|error| panic!("{source}: {error:?}"));
        assert_eq!(image.layers().len(), 1, "{source}");
        assert_eq!(image.layers()[0].compression(), Some(*compression), "{source}");
        let tar = store.layer_path(image.layers()[0].diff_id());
        assert_eq!(sha256sum(&tar), *image.layers()[0].diff_id(), "{source}: the layer tar is its diff_id");
        let listing = Command::new("tar").arg("-tvf").arg(&tar).output().unwrap();
        assert!(listing.status.success(), "{source}: tar -tf");
        assert!(String::from_utf8_lossy(&listing.stdout).contains("bin/busybox"), "{source}: busybox in the layer");
        let runtime = image.runtime();
        assert_eq!(runtime.entrypoint(), [images::ENTRYPOINT], "{source}");
        assert_eq!(runtime.cmd(), [images::CMD], "{source}");
        assert_eq!(runtime.env(), [images::ENV], "{source}");
        assert_eq!(runtime.working_dir(), Some(images::WORKDIR), "{source}");
        assert_eq!(runtime.user(), Some(images::USER), "{source}");
        assert_eq!(
            store.image(image.manifest_digest()).unwrap().as_ref(),
            Some(&image),
            "{source}: the record reads back"
        );
        match &first {
            None => first = Some(image),
            Some(first) => {
                assert_eq!(image.config_digest(), first.config_digest(), "{source}: same config");
                assert_eq!(diff_ids(&image), diff_ids(first), "{source}: same diff_ids");
                let recompressed = ["zstd", "plain", "docker-types"].iter().any(|kind| source.contains(kind));
                let same_blobs = source.starts_with("oci:") && !recompressed || source.starts_with("oci-archive:");
                if same_blobs {
                    assert_eq!(image.manifest_digest(), first.manifest_digest(), "{source}: same manifest");
                }
            }
        }
    }
}

#[test]
fn store_files_are_0644_and_its_directories_0755_whatever_the_umask() {
    let Some(images) = images("store_files_are_0644_and_its_directories_0755_whatever_the_umask") else { return };
    let scratch = tempfile::tempdir().unwrap();
    let store = Store::open(scratch.path().join("store")).unwrap();
    pull(&store, &format!("oci:{}:{TAG}", images.layout.display())).unwrap();
    let mut pending = vec![store.root().to_owned()];
    let mut checked = 0;
    while let Some(dir) = pending.pop() {
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777, 0o755, "{}", dir.display());
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                assert_eq!(
                    std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
                    0o644,
                    "{}",
                    path.display()
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 4, "manifest, config, layer tar, record (and locks): {checked}");
}

#[test]
fn warm_pull_reads_no_layer_blob_and_returns_the_same_image() {
    let Some(images) = images("warm_pull_reads_no_layer_blob_and_returns_the_same_image") else { return };
    let scratch = tempfile::tempdir().unwrap();
    let layout = scratch.path().join("layout");
    images::copy_dir(&images.layout, &layout);
    let store = Store::open(scratch.path().join("store")).unwrap();
    let source = format!("oci:{}:{TAG}", layout.display());
    let cold_start = Instant::now();
    let cold = pull(&store, &source).unwrap();
    let cold_time = cold_start.elapsed();
    // With the layer blob gone from the source, only a warm path can succeed.
    std::fs::remove_file(layout.join("blobs/sha256").join(cold.layers()[0].digest().hex())).unwrap();
    let warm_start = Instant::now();
    let warm = pull(&store, &source).unwrap();
    let warm_time = warm_start.elapsed();
    assert_eq!(warm, cold);
    eprintln!("busybox image: cold pull {cold_time:?}, warm pull {warm_time:?}");
    // A layer tar deleted from the store is fetched again, not assumed.
    std::fs::remove_file(store.layer_path(cold.layers()[0].diff_id())).unwrap();
    let error = pull(&store, &source).unwrap_err().to_string();
    assert!(error.contains(&cold.layers()[0].digest().to_string()), "{error}");
}

/// Pulls the busybox image damaged by `operation` into a fresh store and
/// checks the error names the layer and the store holds no file.
fn damaged_pull_fails(test: &str, operation: &str, says: &str) {
    let Some(images) = images(test) else { return };
    let scratch = tempfile::tempdir().unwrap();
    let layout = scratch.path().join("layout");
    images::copy_dir(&images.layout, &layout);
    // The layer as the undamaged image has it (no damage changes its blob digest).
    let good = Store::open(scratch.path().join("good")).unwrap();
    let layer = pull(&good, &format!("oci:{}:{TAG}", images.layout.display())).unwrap().layers()[0].clone();
    images::mutate(&layout, operation);
    let store = Store::open(scratch.path().join("store")).unwrap();
    let source = format!("oci:{}:{TAG}", layout.display());
    let error = pull(&store, &source).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&format!("layer {} of {source}", layer.digest())),
        "{operation}: the error names the layer and the image: {message}"
    );
    assert!(message.contains(says), "{operation}: {message}");
    assert_eq!(store_files(store.root()), Vec::<String>::new(), "{operation}: nothing left in the store");
}

#[test]
fn flipped_byte_in_a_layer_blob_names_the_layer_and_leaves_nothing_in_the_store() {
    damaged_pull_fails(
        "flipped_byte_in_a_layer_blob_names_the_layer_and_leaves_nothing_in_the_store",
        "flip-layer-byte",
        "does not match its digest",
    );
}

#[test]
fn wrong_layer_size_names_the_layer_and_leaves_nothing_in_the_store() {
    damaged_pull_fails(
        "wrong_layer_size_names_the_layer_and_leaves_nothing_in_the_store",
        "shrink-layer-size",
        "but its descriptor says",
    );
}

#[test]
fn wrong_diff_id_names_the_layer_and_leaves_nothing_in_the_store() {
    damaged_pull_fails(
        "wrong_diff_id_names_the_layer_and_leaves_nothing_in_the_store",
        "wrong-diff-id",
        "but the image config's diff_id is sha256:",
    );
}

/// A layer whose digests are right but whose entries are hostile is
/// refused at pull, naming entry, layer and image, and the store keeps
/// nothing of it: no record, no layer tar, no blob.
#[test]
fn hostile_layer_with_right_digests_is_refused_at_pull_and_leaves_nothing_in_the_store() {
    let Some(images) = images("hostile_layer_with_right_digests_is_refused_at_pull_and_leaves_nothing_in_the_store")
    else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let layout = scratch.path().join("layout");
    images::copy_dir(&images.layout, &layout);
    images::mutate(&layout, "hostile-layer");
    let store = Store::open(scratch.path().join("store")).unwrap();
    let source = format!("oci:{}:{TAG}", layout.display());
    let message = pull(&store, &source).unwrap_err().to_string();
    assert!(message.contains(&source) && message.contains("\"../evil\""), "{message}");
    assert_eq!(store_files(store.root()), Vec::<String>::new(), "nothing left in the store");
}

#[test]
fn index_without_linux_amd64_names_the_image_and_the_platforms_it_offers() {
    let Some(images) = images("index_without_linux_amd64_names_the_image_and_the_platforms_it_offers") else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let layout = scratch.path().join("layout");
    images::copy_dir(&images.layout, &layout);
    images::mutate(&layout, "foreign-platform-index");
    let store = Store::open(scratch.path().join("store")).unwrap();
    let source = format!("oci:{}:{TAG}", layout.display());
    let error = pull(&store, &source).unwrap_err().to_string();
    assert_eq!(error, format!("{source} has no linux/amd64 image; it offers linux/arm64/v8, windows/amd64"));
    assert_eq!(store_files(store.root()), Vec::<String>::new());
}

#[test]
fn layout_with_two_tags_needs_a_tag_and_names_the_tags_it_has() {
    let Some(images) = images("layout_with_two_tags_needs_a_tag_and_names_the_tags_it_has") else { return };
    let scratch = tempfile::tempdir().unwrap();
    let store = Store::open(scratch.path().join("store")).unwrap();
    let dir = images.two_tags.display();
    let error = pull(&store, &format!("oci:{dir}")).unwrap_err().to_string();
    assert_eq!(error, format!("oci:{dir} holds 2 images; name one with :TAG (its tags: 1, 2)"));
    let error = pull(&store, &format!("oci:{dir}:3")).unwrap_err().to_string();
    assert_eq!(error, format!("oci:{dir}:3 has no tag \"3\"; its tags: 1, 2"));
    let two = pull(&store, &format!("oci:{dir}:2")).unwrap();
    assert_eq!(two.layers().len(), 2);
}

#[test]
fn gc_removes_exactly_the_unreferenced_images_layers_blobs_and_derived_files() {
    let Some(images) = images("gc_removes_exactly_the_unreferenced_images_layers_blobs_and_derived_files") else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let store = Store::open(scratch.path().join("store")).unwrap();
    let dir = images.two_tags.display();
    let one = pull(&store, &format!("oci:{dir}:1")).unwrap();
    let two = pull(&store, &format!("oci:{dir}:2")).unwrap();
    assert_eq!(one.layers()[0], two.layers()[0], "the two images share their base layer");
    assert_eq!(one.chain_ids()[0], two.chain_ids()[0]);
    let (base, top) = (*one.layers()[0].diff_id(), *two.layers()[1].diff_id());
    // A derived file per chain, as the layer-filesystem writer will register.
    for chain in two.chain_ids() {
        std::fs::write(store.derived_dir(&chain).unwrap().join("fs.ext4"), b"derived").unwrap();
    }

    // Nothing referenced: gc empties the store.
    let fresh = Store::open(scratch.path().join("copy")).unwrap();
    pull(&fresh, &format!("oci:{dir}:1")).unwrap();
    let report = fresh.gc().unwrap();
    assert_eq!((report.images, report.layers, report.blobs), (1, 1, 2));
    assert_eq!(store_files(fresh.root()), Vec::<String>::new());

    store.retain("vm-a", one.manifest_digest()).unwrap();
    store.retain("vm-b", two.manifest_digest()).unwrap();
    let everything = store_files(store.root());
    let report = store.gc().unwrap();
    assert_eq!((report.images, report.layers, report.blobs, report.derived), (0, 0, 0, 0));
    assert_eq!(store_files(store.root()), everything, "both referenced: gc removes nothing");

    // vm-b gone: image two, its top layer, its blobs and its top chain's
    // derived file go; the shared base (image one uses it) stays.
    store.release("vm-b").unwrap();
    let report = store.gc().unwrap();
    assert_eq!((report.images, report.layers, report.blobs, report.derived), (1, 1, 2, 1));
    assert!(store.image(two.manifest_digest()).unwrap().is_none());
    assert!(store.image(one.manifest_digest()).unwrap().is_some());
    assert!(store.layer_path(&base).is_file());
    assert!(!store.layer_path(&top).exists());
    assert!(store.derived_dir(&two.chain_ids()[0]).unwrap().join("fs.ext4").is_file());
    assert_eq!(store.references("vm-a").unwrap(), vec![*one.manifest_digest()]);

    // A reference to an image gc removed is refused.
    let error = store.retain("vm-b", two.manifest_digest()).unwrap_err().to_string();
    assert!(error.contains(&two.manifest_digest().to_string()), "{error}");

    store.release("vm-a").unwrap();
    store.gc().unwrap();
    assert_eq!(store_files(store.root()), vec!["refs.json".to_owned()]);
}

#[test]
fn two_pulls_of_the_same_image_at_once_leave_one_consistent_copy() {
    let Some(images) = images("two_pulls_of_the_same_image_at_once_leave_one_consistent_copy") else { return };
    let scratch = tempfile::tempdir().unwrap();
    let root: PathBuf = scratch.path().join("store");
    let source = format!("oci:{}:{TAG}", images.layout.display());
    let pulled: Vec<Image> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (root, source) = (root.clone(), source.clone());
                // Separate Store values, as separate kiln processes would have.
                scope.spawn(move || pull(&Store::open(root).unwrap(), &source).unwrap())
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert!(pulled.windows(2).all(|pair| pair[0] == pair[1]));
    let store = Store::open(&root).unwrap();
    let image = &pulled[0];
    assert_eq!(sha256sum(&store.layer_path(image.layers()[0].diff_id())), *image.layers()[0].diff_id());
    let mut expected = vec![
        format!("blobs/sha256/{}", image.manifest_digest().hex()),
        format!("blobs/sha256/{}", image.config_digest().hex()),
        format!("images/sha256/{}.json", image.manifest_digest().hex()),
        format!("layers/sha256/{}.tar", image.layers()[0].diff_id().hex()),
        "sources.json".to_owned(),
    ];
    expected.sort();
    assert_eq!(store_files(&root), expected, "no temp file left, one copy of each");
}

#[test]
fn gc_waits_for_a_guard_holder_before_removing_anything() {
    let Some(images) = images("gc_waits_for_a_guard_holder_before_removing_anything") else { return };
    let scratch = tempfile::tempdir().unwrap();
    let store = Store::open(scratch.path().join("store")).unwrap();
    let image = pull(&store, &format!("oci:{}:{TAG}", images.layout.display())).unwrap();
    // As the layer-filesystem writer would: hold the guard while working on an unreferenced image.
    let guard = store.guard().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let gc_store = store.clone();
    let gc = std::thread::spawn(move || {
        let report = gc_store.gc();
        done_tx.send(()).unwrap();
        report
    });
    assert!(done_rx.recv_timeout(std::time::Duration::from_millis(500)).is_err(), "gc finished while a guard was held");
    assert!(store.image(image.manifest_digest()).unwrap().is_some());
    drop(guard);
    let report = gc.join().unwrap().unwrap();
    assert_eq!((report.images, report.layers), (1, 1));
    assert!(store.image(image.manifest_digest()).unwrap().is_none());
}
