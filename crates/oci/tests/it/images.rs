//! Test images, made by third-party tools only (umoci, skopeo, python3),
//! never by kiln: built once per machine under `target/test-images/<VERSION>/`
//! and shared by every test (and test process) that needs them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump when a recipe changes, so stale images are not reused.
const VERSION: &str = "v2";

/// The tag every test image carries.
pub(crate) const TAG: &str = "1";

/// The runtime config the busybox image is given (`umoci config`).
pub(crate) const ENTRYPOINT: &str = "/bin/busybox";
pub(crate) const CMD: &str = "sh";
pub(crate) const ENV: &str = "PATH=/bin";
pub(crate) const WORKDIR: &str = "/tmp";
pub(crate) const USER: &str = "1000:1000";

/// The busybox-only image in every form kiln reads.
#[derive(Debug)]
pub(crate) struct Busybox {
    /// An OCI layout, one gzip layer holding Debian's static busybox, tag [`TAG`].
    pub(crate) layout: PathBuf,
    /// The same image as an oci-archive (`skopeo copy`).
    pub(crate) oci_archive: PathBuf,
    /// The same image as a docker-archive, tagged `kiln-test/busybox:1` (`skopeo copy`).
    pub(crate) docker_archive: PathBuf,
    /// The same image, its layer recompressed with zstd (`skopeo copy --dest-compress-format zstd`).
    pub(crate) zstd_layout: PathBuf,
    /// The same image, its layer stored as a plain tar: skopeo 1.9 cannot
    /// write one (it labels an uncompressed layer `+gzip`), so python3
    /// gunzips the blob and rewrites manifest and index.json.
    pub(crate) plain_layout: PathBuf,
    /// Two images in one layout: tag `1` (the busybox layer) and tag `2`,
    /// the same layer plus a second one (a small file, `umoci repack`),
    /// so the two share their base layer.
    pub(crate) two_tags: PathBuf,
}

/// The busybox images for test `test`, or `None` after printing `SKIPPED:`
/// when a tool is missing and tools are not required.
pub(crate) fn busybox(test: &str) -> Option<Busybox> {
    let tools = kiln_testkit::require_tools(test, &["umoci", "skopeo", "python3", "busybox"])?;
    let busybox = &tools[3];
    let layout = build_once("busybox-oci", |out| {
        let image = format!("{}:{TAG}", out.display());
        run(Command::new("umoci").args(["init", "--layout"]).arg(out));
        run(Command::new("umoci").args(["new", "--image", &image]));
        // unpack + repack, not `umoci insert`: umoci 0.4.7's insert writes a
        // layer tar cut off after the last file's data (no padding, no end blocks).
        let bundle = out.with_extension("bundle");
        run(Command::new("umoci").args(["unpack", "--image", &image]).arg(&bundle));
        std::fs::create_dir_all(bundle.join("rootfs/bin")).expect("mkdir bin");
        std::fs::copy(busybox, bundle.join("rootfs/bin/busybox")).expect("copy busybox");
        run(Command::new("umoci").args(["repack", "--image", &image]).arg(&bundle));
        run(Command::new("umoci").args([
            "config",
            "--image",
            &image,
            "--config.entrypoint",
            ENTRYPOINT,
            "--config.cmd",
            CMD,
            "--config.env",
            ENV,
            "--config.workingdir",
            WORKDIR,
            "--config.user",
            USER,
        ]));
        run(Command::new("umoci").args(["gc", "--layout"]).arg(out));
        std::fs::remove_dir_all(&bundle).expect("remove the bundle");
    });
    let from = format!("oci:{}:{TAG}", layout.display());
    let oci_archive = build_once("busybox.oci-archive", |out| {
        skopeo(&[&from, &format!("oci-archive:{}:{TAG}", out.display())]);
    });
    let docker_archive = build_once("busybox.docker-archive", |out| {
        skopeo(&[&from, &format!("docker-archive:{}:kiln-test/busybox:{TAG}", out.display())]);
    });
    let zstd_layout = build_once("busybox-zstd-oci", |out| {
        skopeo(&["--dest-compress-format", "zstd", &from, &format!("oci:{}:{TAG}", out.display())]);
    });
    let plain_layout = build_once("busybox-plain-oci", |out| {
        copy_dir(&layout, out);
        mutate(out, "decompress-layers");
    });
    let two_tags = build_once("busybox-two-tags-oci", |out| {
        copy_dir(&layout, out);
        let one = format!("{}:{TAG}", out.display());
        let two = format!("{}:2", out.display());
        let bundle = out.with_extension("bundle");
        run(Command::new("umoci").args(["unpack", "--image", &one]).arg(&bundle));
        std::fs::write(bundle.join("rootfs/bin/motd"), "the second layer\n").expect("write motd");
        run(Command::new("umoci").args(["repack", "--image", &two]).arg(&bundle));
        run(Command::new("umoci").args(["gc", "--layout"]).arg(out));
        std::fs::remove_dir_all(&bundle).expect("remove the bundle");
    });
    Some(Busybox { layout, oci_archive, docker_archive, zstd_layout, plain_layout, two_tags })
}

/// `target/test-images/<VERSION>/<name>`, built by `recipe` into a temp
/// path and renamed into place, so a half-built image is never seen and
/// concurrent test processes at worst build it twice.
fn build_once(name: &str, recipe: impl FnOnce(&Path)) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .join("test-images")
        .join(VERSION);
    let done = root.join(name);
    if done.exists() {
        return done;
    }
    std::fs::create_dir_all(&root).expect("create target/test-images");
    let scratch = tempfile::Builder::new().prefix(&format!(".{name}-")).tempdir_in(&root).expect("scratch dir");
    let out = scratch.path().join(name);
    recipe(&out);
    if std::fs::rename(&out, &done).is_err() && !done.exists() {
        panic!("cannot move {} to {}", out.display(), done.display());
    }
    done
}

fn skopeo(args: &[&str]) {
    run(Command::new("skopeo").args(["--insecure-policy", "copy", "-q"]).args(args));
}

fn run(command: &mut Command) {
    let output = command.output().unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A copy of layout `from` at `to` (cp -a), for a test to damage.
pub(crate) fn copy_dir(from: &Path, to: &Path) {
    run(Command::new("cp").arg("-a").arg(from).arg(to));
}

/// Edits the first image of layout `layout` with python3 (never kiln):
/// - `flip-layer-byte`: flips a byte in the middle of the first layer's blob;
/// - `shrink-layer-size`: the manifest says the first layer is a byte shorter;
/// - `wrong-diff-id`: the config's first diff_id is the sha256 of something else;
/// - `decompress-layers`: gunzips every layer and relabels it a plain tar;
/// - `foreign-platform-index`: wraps the manifest in an index offering only linux/arm64/v8 and windows/amd64;
/// - `amd64-index`: wraps it in an index offering linux/arm64/v8 and then linux/amd64;
/// - `hostile-layer`: replaces the layer by a plain tar whose one entry is `../evil`;
/// - `docker-manifest-list`: relabels manifest, config and layers with Docker's
///   v2 schema 2 media types and wraps the manifest in a Docker manifest list.
///
/// Manifest, config and index.json are rewritten with their new digests,
/// so only the damage asked for is wrong.
pub(crate) fn mutate(layout: &Path, operation: &str) {
    run(Command::new("python3").arg("-c").arg(MUTATE).arg(operation).arg(layout));
}

const MUTATE: &str = r#"
import gzip, hashlib, json, os, sys
op, layout = sys.argv[1], sys.argv[2]
def path(digest): return os.path.join(layout, 'blobs', 'sha256', digest.split(':')[1])
def put(data):
    digest = 'sha256:' + hashlib.sha256(data).hexdigest()
    with open(path(digest), 'wb') as f: f.write(data)
    return digest, len(data)
def save_index():
    with open(os.path.join(layout, 'index.json'), 'w') as f: json.dump(index, f)
index = json.load(open(os.path.join(layout, 'index.json')))
entry = index['manifests'][0]
manifest = json.load(open(path(entry['digest'])))
def save_manifest():
    entry['digest'], entry['size'] = put(json.dumps(manifest).encode())
    save_index()
def wrap(platforms, index_type='application/vnd.oci.image.index.v1+json'):
    sub = {'schemaVersion': 2, 'mediaType': index_type, 'manifests': [
        {'mediaType': entry['mediaType'], 'digest': entry['digest'], 'size': entry['size'], 'platform': p} for p in platforms]}
    entry['digest'], entry['size'] = put(json.dumps(sub).encode())
    entry['mediaType'] = index_type
    save_index()
layer = manifest['layers'][0]
if op == 'flip-layer-byte':
    data = bytearray(open(path(layer['digest']), 'rb').read())
    data[len(data) // 2] ^= 0xff
    with open(path(layer['digest']), 'wb') as f: f.write(data)
elif op == 'shrink-layer-size':
    layer['size'] -= 1
    save_manifest()
elif op == 'wrong-diff-id':
    config = json.load(open(path(manifest['config']['digest'])))
    config['rootfs']['diff_ids'][0] = 'sha256:' + hashlib.sha256(b'not this layer').hexdigest()
    manifest['config']['digest'], manifest['config']['size'] = put(json.dumps(config).encode())
    save_manifest()
elif op == 'decompress-layers':
    for layer in manifest['layers']:
        layer['digest'], layer['size'] = put(gzip.decompress(open(path(layer['digest']), 'rb').read()))
        layer['mediaType'] = 'application/vnd.oci.image.layer.v1.tar'
    save_manifest()
elif op == 'foreign-platform-index':
    wrap([{'architecture': 'arm64', 'os': 'linux', 'variant': 'v8'}, {'architecture': 'amd64', 'os': 'windows'}])
elif op == 'amd64-index':
    wrap([{'architecture': 'arm64', 'os': 'linux', 'variant': 'v8'}, {'architecture': 'amd64', 'os': 'linux'}])
elif op == 'docker-manifest-list':
    manifest['mediaType'] = 'application/vnd.docker.distribution.manifest.v2+json'
    manifest['config']['mediaType'] = 'application/vnd.docker.container.image.v1+json'
    for layer in manifest['layers']:
        layer['mediaType'] = 'application/vnd.docker.image.rootfs.diff.tar.gzip'
    entry['digest'], entry['size'] = put(json.dumps(manifest).encode())
    entry['mediaType'] = manifest['mediaType']
    wrap([{'architecture': 'amd64', 'os': 'linux'}], 'application/vnd.docker.distribution.manifest.list.v2+json')
elif op == 'hostile-layer':
    import io, tarfile
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode='w', format=tarfile.PAX_FORMAT) as tar:
        member = tarfile.TarInfo('../evil')
        member.size = 4
        tar.addfile(member, io.BytesIO(b'evil'))
    plain = data.getvalue()
    layer['digest'], layer['size'] = put(plain)
    layer['mediaType'] = 'application/vnd.oci.image.layer.v1.tar'
    config = json.load(open(path(manifest['config']['digest'])))
    config['rootfs']['diff_ids'][0] = layer['digest']
    manifest['config']['digest'], manifest['config']['size'] = put(json.dumps(config).encode())
    save_manifest()
else:
    sys.exit('unknown operation ' + op)
"#;
