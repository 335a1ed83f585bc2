//! Layer tars made by Python's `tarfile` (and umoci), flattened and split
//! into chain steps by kiln-oci, written as ext4 images, checked with
//! `e2fsck -fn` and read back through the host kernel: each image
//! loop-mounted, the chain steps stacked by the kernel's overlayfs. The
//! stack must show what the flattened image shows, and both what the
//! layers say (a hand-written expectation, a reference model, or
//! `umoci unpack`).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_imagefmt::{Ext4Options, Ext4Tree};
use kiln_oci::{ImageSource, LayerTar, Store, layer_tree};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};

/// Writes tars from a JSON description: a list of
/// `{"out", "format": pax|gnu|ustar, "global": {PAX global records}, "members": [{"name", "type", "data", "mode", "uid", "gid", "mtime",
/// "linkname", "devmajor", "devminor", "pax": {...}}]}`.
const MAKE_TARS: &str = r#"
import io, json, sys, tarfile
kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "link": tarfile.LNKTYPE,
         "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}
formats = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}
for layer in json.load(sys.stdin):
    fmt = formats[layer.get("format", "pax")]
    with tarfile.open(layer["out"], "w", format=fmt, pax_headers=layer.get("global")) as tar:
        for m in layer["members"]:
            info = tarfile.TarInfo(m["name"])
            info.type = kinds[m.get("type", "file")]
            info.mode = m.get("mode", 0o755 if m.get("type") == "dir" else 0o644)
            info.uid = m.get("uid", 0)
            info.gid = m.get("gid", 0)
            info.mtime = m.get("mtime", 1700000000)
            info.linkname = m.get("linkname", "")
            info.devmajor = m.get("devmajor", 0)
            info.devminor = m.get("devminor", 0)
            info.pax_headers = m.get("pax", {})
            data = m.get("data", "").encode()
            if info.type == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
"#;

/// The tools every test here needs, or `None` after `SKIPPED:`.
fn python() -> Option<PathBuf> {
    kiln_testkit::require_tool(&kiln_testkit::current_test_name(), "python3")
}

/// Makes one tar per layer description in `dir`, named `layer{N}.tar`,
/// and returns them as kiln-oci layers labelled `layer{N}`.
fn make_layers(python: &Path, dir: &Path, layers: &[Value]) -> Vec<LayerTar> {
    let mut spec = Vec::new();
    let mut tars = Vec::new();
    for (index, layer) in layers.iter().enumerate() {
        let out = dir.join(format!("layer{index}.tar"));
        let mut layer = layer.clone();
        layer["out"] = json!(out.to_str().unwrap());
        spec.push(layer);
        tars.push(LayerTar::new(&out, format!("layer{index}")));
    }
    let mut child = Command::new(python).arg("-c").arg(MAKE_TARS).stdin(Stdio::piped()).spawn().unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), &spec).unwrap();
    assert!(child.wait().unwrap().success(), "python3 tarfile failed on {spec:?}");
    tars
}

fn file(name: &str, data: &str) -> Value {
    json!({"name": name, "data": data})
}

fn dir_entry(name: &str) -> Value {
    json!({"name": name, "type": "dir"})
}

fn layer(members: Vec<Value>) -> Value {
    json!({"members": members})
}

/// Writes `tree` to `path` and checks it with `e2fsck -fn`.
fn write_image(tree: &Ext4Tree, path: &Path) {
    // As kiln writes layer disks: no lost+found of the writer's own.
    tree.layout(&Ext4Options::default().with_lost_found(false)).unwrap().write_file(path).unwrap();
    let e2fsck = kiln_testkit::require_tool(&kiln_testkit::current_test_name(), "e2fsck");
    if let Some(e2fsck) = e2fsck {
        let out = Command::new(e2fsck).arg("-fn").arg(path).output().unwrap();
        assert!(
            out.status.success(),
            "e2fsck -fn {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A mount, undone when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount(args: &[&str], at: &Path) -> Mounted {
    fs::create_dir_all(at).unwrap();
    let out = Command::new("mount").args(args).arg(at).output().unwrap();
    assert!(out.status.success(), "mount {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Mounted(at.to_path_buf())
}

fn mount_image(image: &Path, at: &Path) -> Mounted {
    mount(&["-t", "ext4", "-o", "loop,ro", image.to_str().unwrap()], at)
}

/// Stacks `lowers` (bottom first) with overlayfs, read-only, as kiln-init
/// does: lowerdir lists the top layer first. An empty directory at the
/// bottom lets a single layer stack too.
fn mount_overlay(lowers: &[PathBuf], empty: &Path, at: &Path) -> Mounted {
    fs::create_dir_all(empty).unwrap();
    let mut dirs: Vec<String> = lowers.iter().rev().map(|p| p.to_str().unwrap().to_owned()).collect();
    dirs.push(empty.to_str().unwrap().to_owned());
    let options = format!("ro,lowerdir={}", dirs.join(":"));
    mount(&["-t", "overlay", "-o", &options, "overlay"], at)
}

/// What a container sees of each entry below `root`: kind, mode, owner,
/// times, size and bytes, link targets, device numbers, link counts
/// (not of directories: overlayfs counts those its own way) and xattrs.
/// Nothing is set aside: the layer disks have no lost+found of the writer's.
fn manifest(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let rel = path.strip_prefix(root).unwrap().to_str().unwrap().to_owned();
        let meta = fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        let common = format!(
            "{:o} {}:{} mtime={}.{:09}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            meta.mtime(),
            meta.mtime_nsec()
        );
        let line = if ft.is_dir() {
            format!("dir {common}")
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).unwrap();
            format!("symlink {}:{} -> {} nlink={}", meta.uid(), meta.gid(), target.display(), meta.nlink())
        } else if ft.is_file() {
            let data = fs::read(&path).unwrap();
            format!("file {common} nlink={} {:?}", meta.nlink(), String::from_utf8_lossy(&data))
        } else if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() { "char" } else { "block" };
            let (major, minor) = (rustix::fs::major(meta.rdev()), rustix::fs::minor(meta.rdev()));
            format!("{kind} {common} {major}:{minor} nlink={}", meta.nlink())
        } else {
            format!("fifo {common} nlink={}", meta.nlink())
        };
        out.insert(rel.clone(), format!("{line} xattrs={:?}", xattrs(&path)));
        if ft.is_dir() {
            walk(root, &path, out);
        }
    }
}

fn xattrs(path: &Path) -> BTreeMap<String, String> {
    let mut names = vec![0u8; 65536];
    let len = rustix::fs::llistxattr(path, &mut names[..]).unwrap();
    let mut found = BTreeMap::new();
    for name in names[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(name).unwrap();
        let mut value = vec![0u8; 65536];
        let got = rustix::fs::lgetxattr(path, name, &mut value[..]).unwrap();
        found.insert(name.to_owned(), String::from_utf8_lossy(&value[..got]).into_owned());
    }
    found
}

/// Flattens `layers` and builds each chain step, writes them all, and
/// returns the manifest of the flattened image and of the overlay stack
/// of the steps, which must agree. Needs root (loop mounts, overlayfs).
fn flatten_and_stack(image: &str, dir: &Path, layers: &[LayerTar]) -> BTreeMap<String, String> {
    let flat = dir.join("flat.ext4");
    write_image(&layer_tree(image, &[], layers).unwrap(), &flat);
    let mut steps = Vec::new();
    let mut mounts = Vec::new();
    for index in 0..layers.len() {
        let step = dir.join(format!("step{index}.ext4"));
        write_image(&layer_tree(image, &layers[..index], &layers[index..=index]).unwrap(), &step);
        let at = dir.join(format!("step{index}"));
        mounts.push(mount_image(&step, &at));
        steps.push(at);
    }
    let stacked = {
        let _overlay = mount_overlay(&steps, &dir.join("empty"), &dir.join("stack"));
        manifest(&dir.join("stack"))
    };
    let flattened = {
        let _flat = mount_image(&flat, &dir.join("flat"));
        manifest(&dir.join("flat"))
    };
    drop(mounts);
    assert_eq!(stacked, flattened, "the overlay of the chain steps and the flattened image differ");
    flattened
}

fn needs_root() -> bool {
    kiln_testkit::require_root(&kiln_testkit::current_test_name(), "loop mounts and overlayfs")
}

/// `(path, kind word)` of a manifest, to compare against what the layers say.
fn kinds(manifest: &BTreeMap<String, String>) -> Vec<(String, String)> {
    manifest.iter().map(|(path, line)| (path.clone(), line.split(' ').next().unwrap().to_owned())).collect()
}

fn entry<'m>(manifest: &'m BTreeMap<String, String>, path: &str) -> &'m str {
    manifest.get(path).unwrap_or_else(|| panic!("{path} is missing from {manifest:#?}"))
}

#[test]
fn three_layers_that_whiteout_and_opaque_each_other_flatten_and_stack_as_the_spec_says() {
    let Some(python) = python() else { return };
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layers = make_layers(
        &python,
        dir.path(),
        &[
            layer(vec![
                dir_entry("a"),
                file("a/x", "x1"),
                file("a/y", "y1"),
                dir_entry("b"),
                file("b/old", "old"),
                dir_entry("b/sub"),
                file("b/sub/deep", "deep"),
                file("c", "c1"),
                dir_entry("keep"),
                file("keep/k", "k1"),
                file("gone", "g"),
            ]),
            layer(vec![
                // The whiteouts come after entries of their own layer: they
                // still hide only what the layers below made.
                file("a/x", "x2"),
                file("a/.wh.x", ""),
                file("b/new", "new"),
                file("b/.wh..wh..opq", ""),
                file(".wh.c", ""),
                dir_entry("d"),
                file("d/f", "f2"),
                file(".wh.gone", ""),
            ]),
            layer(vec![
                dir_entry("c"),
                file("c/inside", "c3"),
                file("a/.wh..wh..opq", ""),
                file("a/z", "z3"),
                file("d/.wh.f", ""),
                file("keep/k2", "k3"),
                json!({"name": "b", "type": "dir", "mode": 0o700, "uid": 5, "gid": 6}),
            ]),
        ],
    );
    let seen = flatten_and_stack("whiteouts:test", dir.path(), &layers);
    let expected: Vec<(String, String)> = [
        ("a", "dir"),
        ("a/z", "file"),
        ("b", "dir"),
        ("b/new", "file"),
        ("c", "dir"),
        ("c/inside", "file"),
        ("d", "dir"),
        ("keep", "dir"),
        ("keep/k", "file"),
        ("keep/k2", "file"),
    ]
    .iter()
    .map(|(p, k)| ((*p).to_owned(), (*k).to_owned()))
    .collect();
    assert_eq!(kinds(&seen), expected, "{seen:#?}");
    assert!(entry(&seen, "b").starts_with("dir 700 5:6"), "{}", entry(&seen, "b"));
    assert!(entry(&seen, "keep/k").contains("\"k1\""));
    // The step of layer 1 in overlayfs's format: whiteouts and an opaque directory.
    let step1 = dir.path().join("step1");
    let _mounted = mount_image(&dir.path().join("step1.ext4"), &step1);
    let step = manifest(&step1);
    assert!(entry(&step, "c").starts_with("char 0 0:0 mtime=0.000000000 0:0"), "{}", entry(&step, "c"));
    assert!(entry(&step, "gone").starts_with("char 0 0:0"), "{}", entry(&step, "gone"));
    assert!(entry(&step, "b").contains("\"trusted.overlay.opaque\": \"y\""), "{}", entry(&step, "b"));
    assert!(entry(&step, "a/x").starts_with("file") && entry(&step, "a/x").contains("\"x2\""));
    assert!(!step.contains_key("keep"), "an unchanged directory is not in the step: {step:#?}");
}

/// `RUN rm /a /b && mkdir /a /b` over a lower file `a` and symlink `b`:
/// Docker's and containers/storage's differs write `a/`, `a/.wh..wh..opq`
/// (the kernel marks a directory made over a whited-out name opaque). The
/// marker hides nothing there, and the layer must not be refused for it.
#[test]
fn a_directory_made_opaque_over_a_lower_file_or_symlink_replaces_it() {
    let Some(python) = python() else { return };
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let symlink = |name: &str, target: &str| json!({"name": name, "type": "symlink", "linkname": target});
    let layers = make_layers(
        &python,
        dir.path(),
        &[
            layer(vec![file("a", "was a file"), symlink("b", "a")]),
            layer(vec![
                dir_entry("a"),
                file("a/.wh..wh..opq", ""),
                file("a/new", "new"),
                dir_entry("b"),
                file("b/.wh..wh..opq", ""),
                file("b/.wh.nothing", ""),
            ]),
        ],
    );
    let seen = flatten_and_stack("replaced:test", dir.path(), &layers);
    let expected: Vec<(String, String)> = [("a", "dir"), ("a/new", "file"), ("b", "dir")]
        .iter()
        .map(|(p, k)| ((*p).to_owned(), (*k).to_owned()))
        .collect();
    assert_eq!(kinds(&seen), expected, "{seen:#?}");
    // A whiteout through a symlink the layer leaves a symlink is still refused.
    assert_refused(
        &python,
        &[layer(vec![dir_entry("d"), symlink("s", "d")]), layer(vec![file("s/.wh.x", "")])],
        "s/.wh.x",
        "layer1",
        "is a symlink",
    );
}

#[test]
fn an_images_own_lost_and_found_is_an_ordinary_directory_of_its_layer_disks() {
    let Some(python) = python() else { return };
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let own = json!({"name": "lost+found", "type": "dir", "mode": 0o751, "uid": 3, "gid": 4});
    let layers =
        make_layers(&python, dir.path(), &[layer(vec![own, file("a", "a0")]), layer(vec![file("lost+found/x", "x1")])]);
    let seen = flatten_and_stack("lost-found:test", dir.path(), &layers);
    let expected: Vec<(String, String)> =
        [("a", "file"), ("lost+found", "dir"), ("lost+found/x", "file")].map(|(p, k)| (p.into(), k.into())).into();
    assert_eq!(kinds(&seen), expected, "{seen:#?}");
    assert!(entry(&seen, "lost+found").starts_with("dir 751 3:4"), "{}", entry(&seen, "lost+found"));
    // The bottom disk holds exactly the image's empty one, nothing of the writer's.
    let step0 = dir.path().join("step0");
    let _mounted = mount_image(&dir.path().join("step0.ext4"), &step0);
    let step = manifest(&step0);
    assert_eq!(kinds(&step), [("a", "file"), ("lost+found", "dir")].map(|(p, k)| (p.into(), k.into())), "{step:#?}");
    assert!(entry(&step, "lost+found").starts_with("dir 751 3:4"), "{}", entry(&step, "lost+found"));
}

#[test]
fn hard_links_within_and_across_layers_keep_one_inode_and_their_link_count() {
    let Some(python) = python() else { return };
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let link = |name: &str, target: &str| json!({"name": name, "type": "link", "linkname": target});
    let layers = make_layers(
        &python,
        dir.path(),
        &[
            layer(vec![file("bin/tool", "tool"), link("bin/tool2", "bin/tool"), file("etc/conf", "c")]),
            layer(vec![link("usr/tool3", "bin/tool")]),
            layer(vec![file("bin/.wh.tool2", ""), link("etc/conf2", "etc/conf")]),
        ],
    );
    let seen = flatten_and_stack("hardlinks:test", dir.path(), &layers);
    for name in ["bin/tool", "usr/tool3"] {
        assert!(entry(&seen, name).contains("nlink=2 \"tool\""), "{name}: {}", entry(&seen, name));
    }
    assert!(!seen.contains_key("bin/tool2"));
    assert!(entry(&seen, "etc/conf2").contains("nlink=2 \"c\""), "{}", entry(&seen, "etc/conf2"));
    // The step of layer 1 copied the lower file up with all its names.
    let step1 = dir.path().join("step1");
    let _mounted = mount_image(&dir.path().join("step1.ext4"), &step1);
    let step = manifest(&step1);
    for name in ["bin/tool", "bin/tool2", "usr/tool3"] {
        assert!(entry(&step, name).contains("nlink=3 \"tool\""), "{name}: {}", entry(&step, name));
    }
    let inode = |name: &str| fs::metadata(step1.join(name)).unwrap().ino();
    assert_eq!(inode("bin/tool"), inode("usr/tool3"));
}

#[test]
fn pax_and_gnu_long_names_xattrs_devices_setuid_and_nanoseconds_survive_flattening() {
    let Some(python) = python() else { return };
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let long_dir = format!("p/{}", "d".repeat(120));
    let long_pax = format!("{long_dir}/{}", "n".repeat(200));
    let long_gnu = format!("g/{}", "m".repeat(180));
    let long_target = format!("../{}", "t".repeat(150));
    let layers = make_layers(
        &python,
        dir.path(),
        &[
            json!({"format": "pax", "members": [
                {"name": long_pax, "data": "long", "pax": {
                    "SCHILY.xattr.user.note": "hello", "SCHILY.xattr.trusted.kiln": "t",
                    "mtime": "1700000000.123456789"}},
                {"name": "bin/su", "data": "su", "mode": 0o4755, "uid": 0, "gid": 0},
                {"name": "bin/sg", "data": "sg", "mode": 0o2711, "uid": 1000, "gid": 1000},
                {"name": "tmp", "type": "dir", "mode": 0o1777},
                {"name": "dev/null", "type": "char", "mode": 0o666, "devmajor": 1, "devminor": 3},
                {"name": "dev/loop0", "type": "block", "mode": 0o660, "gid": 6, "devmajor": 7, "devminor": 0},
                {"name": "run/pipe", "type": "fifo", "mode": 0o600},
            ]}),
            json!({"format": "gnu", "members": [
                {"name": long_gnu, "data": "gnu", "uid": 3_000_000, "gid": 3_000_001},
                {"name": "g/link", "type": "symlink", "linkname": long_target},
            ]}),
        ],
    );
    let seen = flatten_and_stack("formats:test", dir.path(), &layers);
    let long = entry(&seen, &long_pax);
    assert!(long.starts_with("file 644 0:0 mtime=1700000000.123456789"), "{long}");
    assert!(long.contains("\"user.note\": \"hello\"") && long.contains("\"trusted.kiln\": \"t\""), "{long}");
    assert!(entry(&seen, "bin/su").starts_with("file 4755 0:0"));
    assert!(entry(&seen, "bin/sg").starts_with("file 2711 1000:1000"));
    assert!(entry(&seen, "tmp").starts_with("dir 1777"));
    assert!(entry(&seen, "dev/null").starts_with("char 666 0:0 mtime=1700000000.000000000 1:3"));
    assert!(entry(&seen, "dev/loop0").starts_with("block 660 0:6 mtime=1700000000.000000000 7:0"));
    assert!(entry(&seen, "run/pipe").starts_with("fifo 600"));
    assert!(entry(&seen, &long_gnu).starts_with("file 644 3000000:3000001"), "{}", entry(&seen, &long_gnu));
    assert!(entry(&seen, "g/link").contains(&format!("-> {long_target}")));
}

#[test]
fn pax_global_records_are_ignored_as_go_containerd_and_umoci_ignore_them() {
    let Some(python) = python() else { return };
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layers = make_layers(
        &python,
        dir.path(),
        &[json!({"global": {"uid": "77", "mtime": "1600000000.25", "comment": "made by git archive"}, "members": [
            file("a", "a"),
            {"name": "b", "data": "b", "pax": {"uid": "88"}},
        ]})],
    );
    let seen = flatten_and_stack("global:test", dir.path(), &layers);
    assert!(entry(&seen, "a").starts_with("file 644 0:0 "), "{}", entry(&seen, "a"));
    assert!(!entry(&seen, "a").contains("mtime=1600000000.25"), "{}", entry(&seen, "a"));
    assert!(entry(&seen, "b").starts_with("file 644 88:0 "), "{}", entry(&seen, "b"));
}

/// Builds `layers`, asks for the flattened tree and the last layer's chain
/// step, and checks both are refused naming the entry, the layer and the
/// image; then pulls them as an image and checks that is refused too.
fn assert_refused(python: &Path, layers: &[Value], entry: &str, layer: &str, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let tars = make_layers(python, dir.path(), layers);
    let last = tars.len() - 1;
    for result in [layer_tree("hostile:test", &[], &tars), layer_tree("hostile:test", &tars[..last], &tars[last..])] {
        let err = result.err().unwrap_or_else(|| panic!("{entry}: not refused"));
        let text = err.to_string();
        assert!(text.contains("hostile:test") && text.contains(layer), "{entry}: {text}");
        assert!(text.contains(&format!("{entry:?}")), "{entry}: {text}");
        let chain = format!("{text}: {}", std::error::Error::source(&err).map(|s| s.to_string()).unwrap_or_default());
        assert!(chain.contains(reason), "{entry}: expected {reason:?} in {chain}");
    }
    // The same layers as an image: its pull is refused the same way, and
    // the store keeps nothing of it.
    let layout = write_layout(dir.path(), layers.len());
    let store = Store::open(dir.path().join("store")).unwrap();
    let source = format!("oci:{}:hostile", layout.display());
    let opened = source.parse::<ImageSource>().unwrap().open().unwrap();
    let err = store.pull(opened.as_ref(), &mut |_| {}).err().unwrap_or_else(|| panic!("{entry}: pull not refused"));
    let text = err.to_string();
    assert!(text.contains(&source) && text.contains(&format!("{entry:?}")), "{entry}: {text}");
    assert_eq!(super::sources::store_files(store.root()), Vec::<String>::new(), "{entry}: left in the store");
}

/// An OCI image layout in `dir/layout` whose layers are `dir/layer{N}.tar`
/// as they are (uncompressed), tagged `hostile`: the JSON is the test's,
/// the tars Python's.
fn write_layout(dir: &Path, layers: usize) -> PathBuf {
    use sha2::{Digest, Sha256};
    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let add = |bytes: &[u8]| -> (String, usize) {
        let hex: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let descriptor =
        |media: &str, (digest, size): (String, usize)| json!({"mediaType": media, "digest": digest, "size": size});
    let tars: Vec<(String, usize)> =
        (0..layers).map(|index| add(&fs::read(dir.join(format!("layer{index}.tar"))).unwrap())).collect();
    let diff_ids: Vec<&str> = tars.iter().map(|(digest, _)| digest.as_str()).collect();
    let config = json!({"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", add(config.to_string().as_bytes())),
        "layers": tars.iter().cloned().map(|tar| descriptor("application/vnd.oci.image.layer.v1.tar", tar)).collect::<Vec<_>>(),
    });
    let mut top = descriptor("application/vnd.oci.image.manifest.v1+json", add(manifest.to_string().as_bytes()));
    top["annotations"] = json!({"org.opencontainers.image.ref.name": "hostile"});
    fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(layout.join("index.json"), json!({"schemaVersion": 2, "manifests": [top]}).to_string()).unwrap();
    layout
}

#[test]
fn hostile_layers_are_refused_naming_the_entry_the_layer_and_the_image() {
    let Some(python) = python() else { return };
    let link = |name: &str, target: &str| json!({"name": name, "type": "link", "linkname": target});
    let symlink = |name: &str, target: &str| json!({"name": name, "type": "symlink", "linkname": target});
    let ok = layer(vec![dir_entry("etc"), file("etc/passwd", "root")]);
    assert_refused(&python, &[ok.clone(), layer(vec![file("/etc/shadow", "x")])], "/etc/shadow", "layer1", "absolute");
    assert_refused(&python, &[ok.clone(), layer(vec![file("../escape", "x")])], "../escape", "layer1", "\"..\"");
    assert_refused(&python, &[ok.clone(), layer(vec![file("etc/../../x", "x")])], "etc/../../x", "layer1", "\"..\"");
    // Through a symlink of a lower layer, and of the same layer.
    assert_refused(
        &python,
        &[layer(vec![symlink("evil", "/etc")]), layer(vec![file("evil/passwd", "x")])],
        "evil/passwd",
        "layer1",
        "symlink",
    );
    assert_refused(
        &python,
        &[ok.clone(), layer(vec![symlink("up", "../../.."), file("up/x", "x")])],
        "up/x",
        "layer1",
        "symlink",
    );
    assert_refused(&python, &[ok.clone(), layer(vec![link("h", "nothing")])], "h", "layer1", "not there");
    assert_refused(&python, &[ok.clone(), layer(vec![link("h", "etc")])], "h", "layer1", "directory");
    assert_refused(&python, &[ok.clone(), layer(vec![link("h", "../etc/passwd")])], "h", "layer1", "\"..\"");
    assert_refused(&python, &[ok.clone(), layer(vec![link("h", "/etc/passwd")])], "h", "layer1", "absolute");
    assert_refused(
        &python,
        &[layer(vec![symlink("s", "/etc")]), layer(vec![link("h", "s/passwd")])],
        "h",
        "layer1",
        "symlink",
    );
    let overlay_xattr = json!({"name": "d", "type": "dir", "pax": {"SCHILY.xattr.trusted.overlay.opaque": "y"}});
    assert_refused(&python, &[ok.clone(), layer(vec![overlay_xattr])], "d", "layer1", "overlayfs");
    let whiteout_device = json!({"name": "etc/passwd", "type": "char"});
    assert_refused(&python, &[ok.clone(), layer(vec![whiteout_device])], "etc/passwd", "layer1", "whiteout");
    let long = "n".repeat(256);
    assert_refused(&python, &[ok.clone(), layer(vec![file(&long, "x")])], &long, "layer1", "255");
    assert_refused(&python, &[ok.clone(), layer(vec![file(".wh...", "")])], ".wh...", "layer1", "no name");
}

/// A tar made by Python, then damaged by `damage`: refused naming `entry`.
fn assert_damaged_refused(python: &Path, damage: impl Fn(&mut Vec<u8>), entry: &str, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let tars = make_layers(python, dir.path(), &[layer(vec![file("first", "1"), file("victim", &"v".repeat(3000))])]);
    let path = dir.path().join("layer0.tar");
    let mut bytes = fs::read(&path).unwrap();
    damage(&mut bytes);
    fs::write(&path, &bytes).unwrap();
    let err = layer_tree("damaged:test", &[], &tars).err().unwrap_or_else(|| panic!("{reason}: not refused"));
    let text = err.to_string();
    assert!(text.contains("damaged:test") && text.contains("layer0") && text.contains(entry), "{text}");
    assert!(text.contains(reason), "expected {reason:?}: {text}");
}

#[test]
fn a_size_that_lies_a_bad_checksum_or_a_bad_number_is_refused_naming_the_entry() {
    let Some(python) = python() else { return };
    // Python's PAX tars start with the member's header: the second member's is at 1024.
    let victim = 1024;
    // Cut inside the victim's data: its size says 3000 bytes that are not there.
    assert_damaged_refused(&python, |b| b.truncate(victim + 512 + 1000), "victim", "archive ends first");
    // A size that says more than the archive holds, checksum fixed up.
    let lie = |b: &mut Vec<u8>| {
        b[victim + 124..victim + 136].copy_from_slice(b"77777777777\0");
        reseal(&mut b[victim..victim + 512]);
    };
    assert_damaged_refused(&python, lie, "victim", "archive ends first");
    assert_damaged_refused(&python, |b| b[victim + 10] ^= 1, "victi", "checksum");
    let bad_octal = |b: &mut Vec<u8>| {
        b[victim + 100..victim + 108].copy_from_slice(b"0000x44\0");
        reseal(&mut b[victim..victim + 512]);
    };
    assert_damaged_refused(&python, bad_octal, "victim", "octal");
}

/// Recomputes a ustar header's checksum.
fn reseal(header: &mut [u8]) {
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// A generated layer operation on a small name space.
#[derive(Debug, Clone)]
enum Op {
    File(usize, u8),
    Dir(usize),
    Symlink(usize),
    Hardlink(usize, usize),
    Whiteout(usize),
    Opaque(usize),
}

/// Paths drawn from: two levels, so opaque and whiteout hit directories with content.
const NAMES: [&str; 8] = ["a", "b", "a/x", "a/y", "b/x", "a/x/p", "b/q", "c"];

fn op() -> impl Strategy<Value = Op> {
    let name = 0..NAMES.len();
    prop_oneof![
        3 => (name.clone(), any::<u8>()).prop_map(|(n, v)| Op::File(n, v)),
        2 => name.clone().prop_map(Op::Dir),
        1 => name.clone().prop_map(Op::Symlink),
        1 => (name.clone(), name.clone()).prop_map(|(n, t)| Op::Hardlink(n, t)),
        2 => name.clone().prop_map(Op::Whiteout),
        1 => name.prop_map(Op::Opaque),
    ]
}

/// The reference model: path -> (kind, content), applied the simple way.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    Dir,
    File(String),
    Link(String),
}

fn parent(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(p, _)| p)
}

fn under(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

/// Applies one layer's ops to `model` and returns the tar members. Ops
/// kiln would refuse (a path through a symlink or a file, a hard link to
/// nothing or to a directory) are left out of the layer.
fn model_layer(model: &mut BTreeMap<String, Want>, ops: &[Op], seed: usize) -> Vec<Value> {
    // Whiteouts first, against the layers below only (and earlier
    // whiteouts of this layer, which only remove).
    let mut refused = vec![false; ops.len()];
    for (index, op) in ops.iter().enumerate() {
        let (walked, path, opaque) = match op {
            Op::Whiteout(n) => (parent(NAMES[*n]).map_or(Ok(true), |p| walk_model(model, p)), NAMES[*n], false),
            Op::Opaque(n) => (walk_model(model, NAMES[*n]), NAMES[*n], true),
            _ => continue,
        };
        match walked {
            Err(()) => refused[index] = true,
            Ok(true) if opaque => model.retain(|p, _| !under(p, path)),
            Ok(true) => model.retain(|p, _| p != path && !under(p, path)),
            Ok(false) => {}
        }
    }
    let mut members = Vec::new();
    for (index, op) in ops.iter().enumerate() {
        let (path, member, want) = match op {
            Op::File(n, v) => {
                let data = format!("{v}-{seed}-{index}");
                (NAMES[*n], file(NAMES[*n], &data), Want::File(data))
            }
            Op::Dir(n) => (NAMES[*n], dir_entry(NAMES[*n]), Want::Dir),
            Op::Symlink(n) => {
                (NAMES[*n], json!({"name": NAMES[*n], "type": "symlink", "linkname": "c"}), Want::Link("c".into()))
            }
            Op::Hardlink(n, t) => {
                // A hard link may name a file or a symlink, not a directory.
                let target = match model.get(NAMES[*t]) {
                    Some(Want::Dir) | None => continue,
                    Some(target) => target.clone(),
                };
                if n == t {
                    continue;
                }
                (NAMES[*n], json!({"name": NAMES[*n], "type": "link", "linkname": NAMES[*t]}), target)
            }
            Op::Whiteout(n) | Op::Opaque(n) if !refused[index] => {
                let path = NAMES[*n];
                let name = match (op, path.rsplit_once('/')) {
                    (Op::Opaque(_), _) => format!("{path}/.wh..wh..opq"),
                    (_, Some((dir, base))) => format!("{dir}/.wh.{base}"),
                    (_, None) => format!(".wh.{path}"),
                };
                members.push(file(&name, ""));
                continue;
            }
            Op::Whiteout(_) | Op::Opaque(_) => continue,
        };
        // Parents must be directories, or missing (made as 0755 directories).
        if parent(path).is_some_and(|p| walk_model(model, p).is_err()) {
            continue;
        }
        let mut ancestor = parent(path);
        while let Some(p) = ancestor {
            model.entry(p.to_owned()).or_insert(Want::Dir);
            ancestor = parent(p);
        }
        match (&want, model.get(path)) {
            (Want::Dir, Some(Want::Dir)) => {}
            _ => {
                model.retain(|p, _| p != path && !under(p, path));
                model.insert(path.to_owned(), want);
            }
        }
        members.push(member);
    }
    members
}

/// Walks `path` from the root: `Ok(true)` if every component is a
/// directory, `Ok(false)` if one is missing first, `Err` if one is not a
/// directory first (kiln refuses the entry).
fn walk_model(model: &BTreeMap<String, Want>, path: &str) -> Result<bool, ()> {
    let mut prefix = String::new();
    for component in path.split('/') {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(component);
        match model.get(&prefix) {
            Some(Want::Dir) => {}
            None => return Ok(false),
            Some(_) => return Err(()),
        }
    }
    Ok(true)
}

#[test]
fn random_layer_stacks_flatten_and_stack_to_what_a_reference_model_says() {
    let Some(python) = python() else { return };
    if !needs_root() {
        return;
    }
    let stacks = prop::collection::vec(prop::collection::vec(op(), 1..10), 1..5);
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32);
    let mut runner = TestRunner::new(ProptestConfig::with_cases(cases));
    runner
        .run(&stacks, |stack| {
            let mut model = BTreeMap::new();
            let mut layers = Vec::new();
            for (seed, ops) in stack.iter().enumerate() {
                layers.push(layer(model_layer(&mut model, ops, seed)));
            }
            let dir = tempfile::tempdir().unwrap();
            let tars = make_layers(&python, dir.path(), &layers);
            let seen = flatten_and_stack("random:test", dir.path(), &tars);
            let got: BTreeMap<String, Want> = seen
                .iter()
                .map(|(path, line)| {
                    let want = if line.starts_with("dir") {
                        Want::Dir
                    } else if let Some((_, target)) = line.split_once(" -> ") {
                        Want::Link(target.split(' ').next().unwrap().to_owned())
                    } else {
                        let quoted = line.split_once(" \"").unwrap().1;
                        Want::File(quoted.split('"').next().unwrap().to_owned())
                    };
                    (path.clone(), want)
                })
                .collect();
            prop_assert_eq!(got, model, "layers: {:#?}", layers);
            Ok(())
        })
        .unwrap();
}

/// Builds a three-layer image with umoci in `dir` (a deleted file, a
/// replaced directory, a hard link across layers, one of its names
/// deleted, a device node, a setuid file, an owner) and returns its
/// layers, decompressed with gzip, bottom first.
fn umoci_image(umoci: &Path, gzip: &Path, dir: &Path) -> Vec<LayerTar> {
    let script = r#"set -eu
umoci="$1"; cd "$2"
"$umoci" init --layout L
"$umoci" new --image L:t
"$umoci" unpack --image L:t B >/dev/null
R=B/rootfs
mkdir -p $R/etc $R/bin $R/old/sub $R/dev $R/tmp
echo hi > $R/etc/motd; chown 1000:1000 $R/etc/motd
echo tool > $R/bin/tool; ln $R/bin/tool $R/bin/tool2
echo su > $R/bin/su; chmod 4755 $R/bin/su
echo o > $R/old/sub/f; echo gone > $R/etc/gone
mknod $R/dev/null c 1 3; chmod 1777 $R/tmp
"$umoci" repack --refresh-bundle --image L:t B
rm $R/etc/gone; rm -rf $R/old; mkdir -p $R/old/new; echo n > $R/old/new/g
ln $R/bin/tool $R/bin/tool3
"$umoci" repack --refresh-bundle --image L:t B
rm $R/bin/tool2; echo new > $R/etc/motd
"$umoci" repack --refresh-bundle --image L:t B
"#;
    let out = Command::new("bash").arg("-c").arg(script).arg("bash").arg(umoci).arg(dir).output().unwrap();
    assert!(out.status.success(), "umoci: {}", String::from_utf8_lossy(&out.stderr));
    let blob = |digest: &str| dir.join("L/blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let index: Value = serde_json::from_slice(&fs::read(dir.join("L/index.json")).unwrap()).unwrap();
    let manifest: Value =
        serde_json::from_slice(&fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap()).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "{manifest}");
    layers
        .iter()
        .enumerate()
        .map(|(index, layer)| {
            let digest = layer["digest"].as_str().unwrap();
            let tar = dir.join(format!("layer{index}.tar"));
            let out = Command::new(gzip).arg("-dc").arg(blob(digest)).output().unwrap();
            assert!(out.status.success());
            fs::write(&tar, out.stdout).unwrap();
            LayerTar::new(&tar, digest)
        })
        .collect()
}

#[test]
fn a_umoci_image_flattened_and_stacked_equals_umoci_unpack() {
    let test = kiln_testkit::current_test_name();
    let Some(tools) = kiln_testkit::require_tools(&test, &["umoci", "gzip"]) else { return };
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layers = umoci_image(&tools[0], &tools[1], dir.path());
    let seen = flatten_and_stack("umoci:t", dir.path(), &layers);
    let out = Command::new(&tools[0]).args(["unpack", "--image", "L:t", "U"]).current_dir(dir.path()).output().unwrap();
    assert!(out.status.success(), "umoci unpack: {}", String::from_utf8_lossy(&out.stderr));
    let unpacked = manifest(&dir.path().join("U/rootfs"));
    assert_eq!(seen, unpacked, "kiln's flattened image and umoci unpack's rootfs differ");
    assert!(entry(&seen, "bin/tool3").contains("nlink=2"), "{}", entry(&seen, "bin/tool3"));
    assert!(!seen.contains_key("etc/gone") && !seen.contains_key("old/sub"), "{seen:#?}");
}

/// ext4's time range with 256-byte inodes (the kernel's `s_time_min` and
/// `s_time_max`): signed 32-bit seconds plus two epoch bits.
const EXT4_TIME_MIN: i64 = -(1 << 31);
const EXT4_TIME_MAX: i64 = (1 << 34) - 1 - (1 << 31);

#[test]
fn times_outside_ext4s_range_are_clamped_to_it_as_linux_clamps_them() {
    let Some(python) = python() else { return };
    if !needs_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // PAX `mtime` records (python writes them for times ustar cannot hold)
    // and GNU base-256 numbers, before 1901-12-13 and after 2446-05-10.
    let layers = make_layers(
        &python,
        dir.path(),
        &[
            json!({"format": "pax", "members": [
                {"name": "old", "data": "1800", "mtime": -5_364_662_400_i64},
                {"name": "late", "data": "3000", "mtime": 32_503_680_000_i64},
                {"name": "late-ns", "data": "far", "pax": {"mtime": "99999999999.5"}},
                {"name": "edge", "data": "edge", "mtime": EXT4_TIME_MAX},
                {"name": "d", "type": "dir", "mtime": -(1_i64 << 40)},
            ]}),
            json!({"format": "gnu", "members": [
                {"name": "gnu-old", "data": "gnu", "mtime": -(1_i64 << 35)},
                {"name": "gnu-late", "data": "gnu", "mtime": 1_i64 << 36},
            ]}),
        ],
    );
    let seen = flatten_and_stack("times:test", dir.path(), &layers);
    let min = format!("mtime={EXT4_TIME_MIN}.000000000");
    let max = format!("mtime={EXT4_TIME_MAX}.000000000");
    for (name, want) in [
        ("old", &min),
        ("late", &max),
        ("late-ns", &max),
        ("edge", &max),
        ("d", &min),
        ("gnu-old", &min),
        ("gnu-late", &max),
    ] {
        assert!(entry(&seen, name).contains(want.as_str()), "{name}: {}", entry(&seen, name));
    }
}
