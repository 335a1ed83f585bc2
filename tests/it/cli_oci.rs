//! `kiln image oci ...`, `kiln render` and `kiln run` with OCI images made by
//! umoci (never by kiln), run as the real binary with a state directory of
//! the test's own.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::support::{assert_error, assert_success};

/// An OCI image layout made by umoci: a busybox base layer, and a second
/// layer that deletes a file (a `.wh.` whiteout), replaces a directory's
/// contents (an opaque marker) and adds one. Config: entrypoint
/// `/bin/sh -c`, a cmd that prints and exits 7, env, workdir, user.
pub(crate) struct UmociImage {
    pub(crate) layout: PathBuf,
    pub(crate) tag: &'static str,
}

impl UmociImage {
    /// `oci:LAYOUT:TAG`.
    pub(crate) fn source(&self) -> String {
        format!("oci:{}:{}", self.layout.display(), self.tag)
    }

    pub(crate) fn build(dir: &Path, umoci: &Path) -> UmociImage {
        let layout = dir.join("layout");
        let bundle = dir.join("bundle");
        let image = format!("{}:t", layout.display());
        let umoci_run = |args: &[&str]| {
            let output = Command::new(umoci).args(args).output().unwrap();
            assert!(output.status.success(), "umoci {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        };
        umoci_run(&["init", "--layout", layout.to_str().unwrap()]);
        umoci_run(&["new", "--image", &image]);
        umoci_run(&["unpack", "--image", &image, bundle.to_str().unwrap()]);
        let rootfs = bundle.join("rootfs");
        for sub in ["bin", "etc", "work", "data", "opq"] {
            std::fs::create_dir_all(rootfs.join(sub)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
        std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/work:/bin/sh\n")
            .unwrap();
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
        std::fs::write(rootfs.join("data/gone.txt"), "deleted by the upper layer\n").unwrap();
        std::fs::write(rootfs.join("opq/old.txt"), "hidden by the opaque dir\n").unwrap();
        // --refresh-bundle on every repack: without it the next one rebases
        // the tag and drops this layer.
        umoci_run(&["repack", "--refresh-bundle", "--image", &image, bundle.to_str().unwrap()]);
        // The second layer, stacked on the first.
        std::fs::remove_file(rootfs.join("data/gone.txt")).unwrap();
        std::fs::remove_dir_all(rootfs.join("opq")).unwrap();
        std::fs::create_dir(rootfs.join("opq")).unwrap();
        std::fs::write(rootfs.join("opq/new.txt"), "the upper layer's\n").unwrap();
        std::fs::write(rootfs.join("hello.txt"), "hello from the image\n").unwrap();
        umoci_run(&["repack", "--refresh-bundle", "--image", &image, bundle.to_str().unwrap()]);
        umoci_run(&[
            "config",
            "--image",
            &image,
            "--config.entrypoint",
            "/bin/sh",
            "--config.entrypoint",
            "-c",
            "--config.cmd",
            "echo cmd of the image; exit 7",
            "--config.env",
            "MODE=image",
            "--config.env",
            "PATH=/bin",
            "--config.workingdir",
            "/work",
            "--config.user",
            "app",
            "--config.stopsignal",
            "SIGQUIT",
        ]);
        UmociImage { layout, tag: "t" }
    }

    /// A JSON document of the layout, read without kiln.
    fn json(&self, path: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn blob(&self, digest: &str) -> Value {
        self.json(&self.layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap()))
    }

    /// (manifest digest, manifest, config) as the layout holds them.
    pub(crate) fn documents(&self) -> (String, Value, Value) {
        let index = self.json(&self.layout.join("index.json"));
        let entry = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == self.tag)
            .unwrap()
            .clone();
        let manifest_digest = entry["digest"].as_str().unwrap().to_owned();
        let manifest = self.blob(&manifest_digest);
        let config = self.blob(manifest["config"]["digest"].as_str().unwrap());
        (manifest_digest, manifest, config)
    }
}

/// `kiln ARGS` with the state directory `state`.
pub(crate) fn kiln_in(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_STATE_DIR", state)
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("KILN_K8S_DEFAULTS")
        .output()
        .unwrap()
}

fn umoci_image(test: &str, dir: &Path) -> Option<UmociImage> {
    let tools = kiln_testkit::require_tools(test, &["umoci"])?;
    Some(UmociImage::build(dir, &tools[0]))
}

#[test]
fn image_oci_inspect_reports_the_manifest_config_layers_and_diff_ids_umoci_wrote() {
    let test = kiln_testkit::current_test_name();
    let dir = tempfile::tempdir().unwrap();
    let Some(image) = umoci_image(&test, dir.path()) else { return };
    let state = dir.path().join("state");
    let (manifest_digest, manifest, config) = image.documents();

    let pulled = assert_success(&kiln_in(&state, &["image", "oci", "pull", &image.source()]));
    assert!(
        pulled.starts_with(&format!("Pulled {}: manifest {manifest_digest}, 2 layers", image.source())),
        "{pulled}"
    );

    let json = assert_success(&kiln_in(&state, &["image", "oci", "inspect", "--json", &image.source()]));
    let report: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["source"], image.source());
    assert_eq!(report["manifest"], manifest_digest);
    assert_eq!(report["config"], manifest["config"]["digest"]);
    assert_eq!(report["entrypoint"], config["config"]["Entrypoint"]);
    assert_eq!(report["cmd"], config["config"]["Cmd"]);
    assert_eq!(report["env"], config["config"]["Env"]);
    assert_eq!(report["working_dir"], "/work");
    assert_eq!(report["user"], "app");
    assert_eq!(report["stop_signal"], "SIGQUIT");
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for (index, layer) in layers.iter().enumerate() {
        assert_eq!(layer["digest"], manifest["layers"][index]["digest"], "layer {index}");
        assert_eq!(layer["media_type"], manifest["layers"][index]["mediaType"], "layer {index}");
        assert_eq!(layer["size"], manifest["layers"][index]["size"], "layer {index}");
        assert_eq!(layer["diff_id"], config["rootfs"]["diff_ids"][index], "layer {index}");
    }

    // The text form says the same, one fact a line.
    let text = assert_success(&kiln_in(&state, &["image", "oci", "inspect", &image.source()]));
    assert!(text.contains(&format!("manifest: {manifest_digest}\n")), "{text}");
    assert!(text.contains(&format!("  diff_id: {}\n", config["rootfs"]["diff_ids"][1].as_str().unwrap())), "{text}");
    assert!(text.contains("user: app\nstop_signal: SIGQUIT\n") && text.contains("env: MODE=image\n"), "{text}");
}

#[test]
fn image_oci_names_the_bad_source_the_missing_directory_and_the_missing_tag() {
    let test = kiln_testkit::current_test_name();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = kiln_in(&state, &["image", "oci", "pull", "ftp://example/x"]);
    assert_error(&out, 1, "ftp://example/x");
    let missing = dir.path().join("no-such-layout");
    let out = kiln_in(&state, &["image", "oci", "inspect", &format!("oci:{}", missing.display())]);
    assert_error(&out, 1, &missing.display().to_string());
    let Some(image) = umoci_image(&test, dir.path()) else { return };
    let wrong_tag = format!("oci:{}:v9", image.layout.display());
    let out = kiln_in(&state, &["image", "oci", "pull", &wrong_tag]);
    assert_error(&out, 1, "v9");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("t"), "the tags there are listed: {stderr}");
}

#[test]
fn image_oci_refuses_an_index_without_linux_amd64_naming_the_platforms_it_offers() {
    let test = kiln_testkit::current_test_name();
    let dir = tempfile::tempdir().unwrap();
    let Some(image) = umoci_image(&test, dir.path()) else { return };
    // Re-point the tag at an image index (written by the test, as a registry
    // would serve it) that offers the umoci manifest for linux/arm64 only.
    let (manifest_digest, _, _) = image.documents();
    let manifest_size =
        std::fs::metadata(image.layout.join("blobs/sha256").join(manifest_digest.strip_prefix("sha256:").unwrap()))
            .unwrap()
            .len();
    let nested = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": { "architecture": "arm64", "os": "linux" }
        }]
    });
    let bytes = serde_json::to_vec(&nested).unwrap();
    let digest = sha256_hex(&bytes);
    std::fs::write(image.layout.join("blobs/sha256").join(&digest), &bytes).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{digest}"),
            "size": bytes.len(),
            "annotations": { "org.opencontainers.image.ref.name": "multi" }
        }]
    });
    std::fs::write(image.layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let state = dir.path().join("state");
    let source = format!("oci:{}:multi", image.layout.display());
    let out = kiln_in(&state, &["image", "oci", "pull", &source]);
    assert_error(&out, 1, "linux/arm64");
    assert!(String::from_utf8_lossy(&out.stderr).contains("amd64"), "{}", String::from_utf8_lossy(&out.stderr));
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn render_vm_shows_the_image_and_its_digest_once_pulled_with_its_layer_disks() {
    let test = kiln_testkit::current_test_name();
    if kiln_testkit::require_tool(&test, "qemu-system-x86_64").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(image) = umoci_image(&test, dir.path()) else { return };
    let guest = dir.path().join("guest");
    std::fs::create_dir(&guest).unwrap();
    for file in ["vmlinuz", "initramfs.cpio.gz"] {
        std::fs::write(guest.join(file), b"").unwrap();
    }
    let spec = dir.path().join("bb.toml");
    // Relative to the spec file, like service.binary.
    std::fs::write(&spec, "name = \"bb\"\n[service]\nimage = \"oci:layout:t\"\n").unwrap();
    let state = dir.path().join("state");
    let render = |state: &Path| {
        let args = ["render", "--target", "vm", "--vmm", "qemu", "--guest-dir", guest.to_str().unwrap()];
        let mut args = args.to_vec();
        args.push(spec.to_str().unwrap());
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .env("KILN_STATE_DIR", state)
            .env("KILN_QEMU_ACCEL", "tcg")
            .env_remove("KILN_NET_CIDR")
            .output()
            .unwrap();
        assert_success(&out)
    };
    let before = render(&state);
    let first = before.lines().next().unwrap();
    assert!(first.starts_with(&format!("# service.image: {} (not in the image store yet", image.source())), "{before}");
    assert!(!before.contains("kiln-layer"), "no layer disks before the pull:\n{before}");

    assert_success(&kiln_in(&state, &["image", "oci", "pull", &image.source()]));
    let (manifest_digest, _, _) = image.documents();
    let after = render(&state);
    assert_eq!(
        after.lines().next().unwrap(),
        format!("# service.image: {} (manifest {manifest_digest})", image.source()),
        "{after}"
    );
    for serial in ["serial=kiln-layer0", "serial=kiln-layer1"] {
        assert!(after.contains(serial), "{serial}:\n{after}");
    }
    assert!(!after.contains("kiln-layer2"), "{after}");
}

#[cfg(feature = "k8s")]
#[test]
fn render_k8s_refuses_a_local_image_source_naming_service_image() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("web.toml");
    std::fs::write(&spec, "name = \"web\"\n[service]\nimage = \"oci:layout:t\"\n").unwrap();
    let out = kiln_in(&dir.path().join("state"), &["render", "--target", "k8s", spec.to_str().unwrap()]);
    assert_error(&out, 1, "service.image");
    assert!(String::from_utf8_lossy(&out.stderr).contains("a Pod cannot pull"));
}

#[test]
fn image_oci_convert_writes_the_layer_chain_ext4s_in_overlay_format_and_a_shared_base_is_built_once() {
    let test = kiln_testkit::current_test_name();
    let dir = tempfile::tempdir().unwrap();
    let Some(tools) = kiln_testkit::require_tools(&test, &["umoci", "e2fsck", "debugfs"]) else { return };
    let image = UmociImage::build(dir.path(), &tools[0]);
    let state = dir.path().join("state");
    let out = dir.path().join("rootfs");
    let line =
        assert_success(&kiln_in(&state, &["image", "oci", "convert", &image.source(), "-o", out.to_str().unwrap()]));
    assert!(line.contains("2 layer filesystems") && line.contains("(2 built, 0 from the store)"), "{line}");
    let mut names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["layer0.ext4", "layer1.ext4", "rootfs.json"]);
    let manifest: Value = serde_json::from_slice(&std::fs::read(out.join("rootfs.json")).unwrap()).unwrap();
    let (manifest_digest, _, config) = image.documents();
    assert_eq!(manifest["manifest"], manifest_digest);
    assert_eq!(manifest["disks"][0]["serial"], "kiln-layer0");
    assert_eq!(manifest["disks"][1]["serial"], "kiln-layer1");
    // ChainID(L0) = DiffID(L0) (image-spec config.md).
    assert_eq!(manifest["disks"][0]["chain_id"], config["rootfs"]["diff_ids"][0]);
    let debugfs = |image: &Path, request: &str| {
        let out = Command::new(&tools[2]).args(["-R", request]).arg(image).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for layer in ["layer0.ext4", "layer1.ext4"] {
        let fsck = Command::new(&tools[1]).arg("-fn").arg(out.join(layer)).output().unwrap();
        assert!(fsck.status.success(), "e2fsck {layer}: {}", String::from_utf8_lossy(&fsck.stdout));
    }
    let base = out.join("layer0.ext4");
    assert!(debugfs(&base, "stat /bin/busybox").contains("Type: regular"), "the base holds busybox");
    assert_eq!(debugfs(&base, "cat /data/gone.txt"), "deleted by the upper layer\n");
    let top = out.join("layer1.ext4");
    // The upper layer holds only its changes: the deletion as a 0:0 whiteout.
    assert_eq!(debugfs(&top, "cat /hello.txt"), "hello from the image\n");
    let whiteout = debugfs(&top, "stat /data/gone.txt");
    assert!(
        whiteout.contains("Type: character special") && whiteout.contains("Device major/minor number: 00:00"),
        "{whiteout}"
    );
    assert!(!debugfs(&top, "ls /bin").contains("busybox"), "the top layer does not repeat the base");

    // A second image on the same base: only its own layer is built.
    let bundle = dir.path().join("bundle2");
    let umoci = |args: &[&str]| assert!(Command::new(&tools[0]).args(args).status().unwrap().success(), "{args:?}");
    umoci(&["unpack", "--image", &format!("{}:t", image.layout.display()), bundle.to_str().unwrap()]);
    std::fs::write(bundle.join("rootfs/more.txt"), "a third layer\n").unwrap();
    umoci(&[
        "repack",
        "--refresh-bundle",
        "--image",
        &format!("{}:t2", image.layout.display()),
        bundle.to_str().unwrap(),
    ]);
    let second = format!("oci:{}:t2", image.layout.display());
    let out2 = dir.path().join("rootfs2");
    let line = assert_success(&kiln_in(&state, &["image", "oci", "convert", &second, "-o", out2.to_str().unwrap()]));
    assert!(line.contains("3 layer filesystems") && line.contains("(1 built, 2 from the store)"), "{line}");
    assert!(std::fs::read(out2.join("layer0.ext4")).unwrap() == std::fs::read(&base).unwrap(), "the same base bytes");

    // An existing OUT is refused and left alone.
    let again = kiln_in(&state, &["image", "oci", "convert", &image.source(), "-o", out.to_str().unwrap()]);
    assert_error(&again, 1, &out.display().to_string());
    assert!(out.join("rootfs.json").is_file());
}

/// The line the image's program prints in the guest, as its user, in its
/// working directory, with the spec's env merged over the image's, on the
/// image's merged tree (the upper layer's whiteout and new file).
const RUN_PROBE: &str = "echo run-oci: uid=$(busybox id -u) gid=$(busybox id -g) pwd=$(pwd) mode=$MODE path=$PATH \
     data=[$(busybox ls /data)] opq=[$(busybox ls /opq)] hello=$(busybox cat /hello.txt) \
     conf=$(busybox cat /srv/conf/greeting) ro=$(busybox touch /srv/conf/x 2>/dev/null && echo no || echo yes); exit 7";

#[test]
fn run_of_a_umoci_busybox_image_runs_its_program_as_its_user_and_exits_with_its_status_then_warm_builds_nothing() {
    use crate::run_e2e::{RUN_DEADLINE, World, text, wait_with_deadline};
    let test = kiln_testkit::current_test_name();
    let Some(world) = World::new("oci") else { return };
    let Some(tools) = kiln_testkit::require_tools(&test, &["umoci"]) else { return };
    let image = UmociImage::build(world.dir.path(), &tools[0]);
    std::fs::create_dir(world.dir.path().join("conf")).unwrap();
    std::fs::write(world.dir.path().join("conf/greeting"), "from-the-files-tree").unwrap();
    let spec = world.spec(
        "bbimg",
        &format!(
            "name = \"bbimg\"\n[service]\nimage = \"{}\"\nargs = [{:?}]\nenv = {{ MODE = \"spec\" }}\nfiles = {{ conf = {{ path = \"conf\" }} }}\n[resources]\nmemory = \"256MiB\"\n",
            image.source(),
            RUN_PROBE
        ),
    );
    let run = || {
        let child = world
            .kiln(&["-v", "run", spec.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_with_deadline(child, RUN_DEADLINE)
    };
    let first = run();
    let (stdout, stderr) = (text(&first.stdout), text(&first.stderr));
    assert_eq!(first.status.code(), Some(7), "the image's program's status\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains(
            "run-oci: uid=1000 gid=1000 pwd=/work mode=spec path=/bin data=[] opq=[new.txt] hello=hello from the image conf=from-the-files-tree ro=yes"
        ),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stderr.contains("layers_built=2"), "the first run builds both layer filesystems:\n{stderr}");

    // kiln ps names the image the VM ran, by digest.
    let (manifest_digest, _, _) = image.documents();
    let ps = world.kiln(&["ps", "--json"]).output().unwrap();
    let records: Value = serde_json::from_slice(&ps.stdout).unwrap();
    let record = records.as_array().unwrap().iter().find(|r| r["name"] == "bbimg").unwrap();
    assert_eq!(record["image"]["source"], image.source());
    assert_eq!(record["image"]["manifest"], manifest_digest);
    let table = text(&world.kiln(&["ps"]).output().unwrap().stdout);
    let short = &manifest_digest["sha256:".len().."sha256:".len() + 12];
    assert!(table.contains(&format!("{}@sha256:{short}", image.source())), "{table}");

    // Warm: the same image again converts nothing and reads no layer: the
    // source's layer blobs are gone and the store's layer tars emptied, so
    // only the layer filesystems run 1 built can give the same tree. The
    // store's source index is not rewritten either.
    let (_, manifest, config) = image.documents();
    for layer in manifest["layers"].as_array().unwrap() {
        let hex = layer["digest"].as_str().unwrap().trim_start_matches("sha256:");
        std::fs::remove_file(image.layout.join("blobs/sha256").join(hex)).unwrap();
    }
    for diff_id in config["rootfs"]["diff_ids"].as_array().unwrap() {
        let hex = diff_id.as_str().unwrap().trim_start_matches("sha256:");
        let tar = world.state_dir().join("oci/layers/sha256").join(format!("{hex}.tar"));
        std::fs::OpenOptions::new().write(true).open(&tar).unwrap().set_len(0).unwrap();
    }
    let index_stamp = || {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(world.state_dir().join("oci/sources.json")).unwrap();
        (meta.ino(), meta.mtime(), meta.mtime_nsec())
    };
    let index_before = index_stamp();
    let second = run();
    let (stdout, stderr) = (text(&second.stdout), text(&second.stderr));
    assert_eq!(second.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains("layers_built=0"), "a warm run builds nothing:\n{stderr}");
    assert!(stdout.contains("run-oci: uid=1000 gid=1000 pwd=/work"), "the warm run's tree:\n{stdout}\n{stderr}");
    assert_eq!(index_stamp(), index_before, "a warm run rewrote the store's source index");
    let image_ms = |stderr: &str| -> f64 {
        stderr
            .split("image_ms=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.trim_start_matches("Some(").trim_end_matches(')').parse().ok())
            .unwrap_or_else(|| panic!("no image_ms in:\n{stderr}"))
    };
    println!(
        "image host-side work: cold {:.2} ms (pull + 2 layer filesystems), warm {:.2} ms",
        image_ms(&text(&first.stderr)),
        image_ms(&stderr)
    );

    // The VM's store reference went with it; gc then sweeps the unused image.
    let refs = std::fs::read_to_string(world.state_dir().join("oci/refs.json")).unwrap_or_default();
    assert!(!refs.contains("bbimg"), "the stopped VM still holds its image: {refs}");
    world.assert_nothing_left();
    let gc = world.kiln(&["gc"]).output().unwrap();
    assert!(gc.status.success(), "{}", text(&gc.stderr));
    let derived = std::fs::read_dir(world.state_dir().join("oci/derived/sha256")).unwrap().count();
    assert_eq!(derived, 0, "gc removed the layer filesystems no VM uses: {}", text(&gc.stdout));
}

/// A `docker-registry serve` on 127.0.0.1 inside a network namespace the
/// test creates; the registry and the namespace go on drop.
#[cfg(feature = "k8s")]
struct NetnsRegistry {
    netns: String,
    port: u16,
    child: std::process::Child,
}

#[cfg(feature = "k8s")]
impl NetnsRegistry {
    fn start(dir: &Path) -> NetnsRegistry {
        let netns = format!("kiln-oci-reg-{}", std::process::id());
        assert!(Command::new("ip").args(["netns", "add", &netns]).status().unwrap().success());
        assert!(
            Command::new("ip")
                .args(["netns", "exec", &netns, "ip", "link", "set", "lo", "up"])
                .status()
                .unwrap()
                .success()
        );
        let port = 5000;
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("registry-data").display()
            ),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &netns, "docker-registry", "serve"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        NetnsRegistry { netns, port, child }
    }

    /// `ARGV` inside the namespace.
    fn exec(&self, argv: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns]).args(argv);
        command
    }
}

#[cfg(feature = "k8s")]
impl Drop for NetnsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
    }
}

#[cfg(feature = "k8s")]
#[test]
fn render_k8s_of_a_registry_image_the_store_has_pulled_names_it_by_digest() {
    let test = kiln_testkit::current_test_name();
    if !kiln_testkit::require_root(&test, "a network namespace for the registry") {
        return;
    }
    let Some(tools) = kiln_testkit::require_tools(&test, &["umoci", "skopeo", "docker-registry", "ip"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = UmociImage::build(dir.path(), &tools[0]);
    let registry = NetnsRegistry::start(dir.path());
    let reference = format!("127.0.0.1:{}/team/bb:1", registry.port);
    // skopeo pushes (third party); retried while the registry starts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let push = registry
            .exec(&["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", &image.source()])
            .arg(format!("docker://{reference}"))
            .output()
            .unwrap();
        if push.status.success() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "skopeo copy: {}", String::from_utf8_lossy(&push.stderr));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let remote = registry
        .exec(&["skopeo", "inspect", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    let remote: Value = serde_json::from_slice(&remote.stdout).unwrap();
    let digest = remote["Digest"].as_str().unwrap().to_owned();

    let state = dir.path().join("state");
    let spec = dir.path().join("web.toml");
    std::fs::write(&spec, format!("name = \"web\"\n[service]\nimage = \"{reference}\"\n")).unwrap();
    let kiln = |args: &[&str]| {
        registry
            .exec(&[env!("CARGO_BIN_EXE_kiln")])
            .args(args)
            .env("KILN_STATE_DIR", &state)
            .env("KILN_INSECURE_REGISTRIES", format!("127.0.0.1:{}", registry.port))
            .env_remove("KILN_K8S_DEFAULTS")
            .output()
            .unwrap()
    };
    let render_yaml = || assert_success(&kiln(&["render", "--target", "k8s", spec.to_str().unwrap()]));
    let image_line = |yaml: &str| {
        // The container's image, a long one folded (`image: >-` and the next line).
        let lines: Vec<&str> = yaml.lines().collect();
        let at = lines.iter().position(|line| line.contains("image: ")).unwrap_or_else(|| panic!("no image:\n{yaml}"));
        let value = lines[at].split_once("image: ").unwrap().1;
        let value = if value == ">-" { lines[at + 1].trim() } else { value };
        format!("image: {value}")
    };
    let render = || image_line(&render_yaml());
    let unpinned = render_yaml();
    assert_eq!(image_line(&unpinned), format!("image: {reference}"), "not pulled: the spec's reference as it is");
    assert!(!unpinned.contains("nodeSelector"), "{unpinned}");
    let pulled = assert_success(&kiln(&["image", "oci", "pull", &reference]));
    assert!(pulled.contains(&format!("manifest {digest}")), "the registry's digest: {pulled}");
    assert_eq!(
        render(),
        format!("image: 127.0.0.1:{}/team/bb@{digest}", registry.port),
        "the Pod runs the bytes the store holds"
    );
    // Those bytes are the store's linux/amd64 manifest: the Pod lands on such nodes only.
    let pinned = render_yaml();
    assert!(
        pinned.contains("  nodeSelector:\n    kubernetes.io/arch: amd64\n    kubernetes.io/os: linux\n"),
        "{pinned}"
    );
    kiln_testkit::assert_k8s_valid(&pinned, kiln_k8s::KUBERNETES_VERSION);
    // Without the insecure opt-in, kiln speaks only HTTPS, and says which registry failed.
    let refused = registry
        .exec(&[env!("CARGO_BIN_EXE_kiln"), "image", "oci", "pull", &reference])
        .env("KILN_STATE_DIR", dir.path().join("state2"))
        .env_remove("KILN_INSECURE_REGISTRIES")
        .output()
        .unwrap();
    assert_error(&refused, 1, "127.0.0.1");
}

#[test]
fn a_launcher_killed_after_its_image_was_referenced_leaves_gc_the_reference_to_release_and_the_store_to_sweep() {
    use std::io::Read;

    use crate::run_e2e::{RUN_DEADLINE, World, text};
    let test = kiln_testkit::current_test_name();
    let Some(world) = World::new("ocikill") else { return };
    let Some(tools) = kiln_testkit::require_tools(&test, &["umoci"]) else { return };
    let image = UmociImage::build(world.dir.path(), &tools[0]);
    let spec = world.spec("killed", &format!("name = \"killed\"\n[service]\nimage = \"{}\"\n", image.source()));
    // Held once the images step is over: pulled, referenced, layers built.
    let mut child = world
        .kiln(&["run", spec.to_str().unwrap()])
        .env("KILN_CRASH_TEST_HOLD_AFTER", "images")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let deadline = std::time::Instant::now() + RUN_DEADLINE;
    let (mut seen, mut buffer) = (Vec::new(), [0u8; 4096]);
    while !String::from_utf8_lossy(&seen).contains("holding after") {
        assert!(std::time::Instant::now() < deadline, "never held: {}", String::from_utf8_lossy(&seen));
        let n = stderr.read(&mut buffer).unwrap();
        assert!(n > 0, "kiln run exited first: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buffer[..n]);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let refs_path = world.state_dir().join("oci/refs.json");
    assert!(std::fs::read_to_string(&refs_path).unwrap().contains("killed"), "the dead VM still holds its image");

    let left = |sub: &str| std::fs::read_dir(world.state_dir().join("oci").join(sub)).unwrap().count();
    // A dry run says what the store sweep would remove once the dead VM's
    // reference is released, and removes nothing.
    let dry = world.kiln(&["gc", "--dry-run"]).output().unwrap();
    let planned = text(&dry.stdout);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(planned.contains("would release the image store's reference of VM killed"), "{planned}");
    assert!(
        planned.contains(
            "would remove from the image store 1 images, 2 layer tars, 2 blobs and 2 layer filesystem directories no VM uses"
        ),
        "{planned}"
    );
    assert!(std::fs::read_to_string(&refs_path).unwrap().contains("killed"), "a dry run released the reference");
    assert_eq!((left("images/sha256"), left("layers/sha256"), left("derived/sha256")), (1, 2, 2), "{planned}");

    let gc = world.kiln(&["gc"]).output().unwrap();
    let said = text(&gc.stdout);
    assert!(gc.status.success(), "{}", text(&gc.stderr));
    assert!(said.contains("release the image store's reference of VM killed"), "{said}");
    assert!(said.contains("from the image store"), "{said}");
    assert!(!std::fs::read_to_string(&refs_path).unwrap().contains("killed"));
    assert_eq!((left("images/sha256"), left("layers/sha256"), left("derived/sha256")), (0, 0, 0), "{said}");
    world.assert_nothing_left();
}

#[test]
fn image_oci_convert_of_a_ten_layer_image_merges_the_lowest_three_so_a_vm_gets_eight_disks() {
    let test = kiln_testkit::current_test_name();
    let Some(tools) = kiln_testkit::require_tools(&test, &["umoci", "e2fsck", "debugfs"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let bundle = dir.path().join("bundle");
    let image = format!("{}:deep", layout.display());
    let umoci = |args: &[&str]| assert!(Command::new(&tools[0]).args(args).status().unwrap().success(), "{args:?}");
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--image", &image, bundle.to_str().unwrap()]);
    for layer in 0..10 {
        std::fs::write(bundle.join(format!("rootfs/layer{layer}.txt")), format!("layer {layer}\n")).unwrap();
        umoci(&["repack", "--refresh-bundle", "--image", &image, bundle.to_str().unwrap()]);
    }
    let state = dir.path().join("state");
    let out = dir.path().join("rootfs");
    let source = format!("oci:{image}");
    let json =
        assert_success(&kiln_in(&state, &["image", "oci", "convert", "--json", &source, "-o", out.to_str().unwrap()]));
    let manifest: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 10);
    let disks = manifest["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 8, "{json}");
    assert_eq!(disks[0]["layers"], serde_json::json!([0, 2]), "the lowest three merged");
    assert_eq!(disks[7]["layers"], serde_json::json!([9, 9]));
    let debugfs = |image: &Path, request: &str| {
        let out = Command::new(&tools[2]).args(["-R", request]).arg(image).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = out.join("layer0.ext4");
    for layer in 0..3 {
        assert_eq!(debugfs(&first, &format!("cat /layer{layer}.txt")), format!("layer {layer}\n"));
    }
    assert_eq!(debugfs(&first, "cat /layer3.txt"), "", "layer 3 has a disk of its own");
    assert_eq!(debugfs(&out.join("layer1.ext4"), "cat /layer3.txt"), "layer 3\n");
    for index in 0..8 {
        let fsck = Command::new(&tools[1]).arg("-fn").arg(out.join(format!("layer{index}.ext4"))).output().unwrap();
        assert!(fsck.status.success(), "layer{index}: {}", String::from_utf8_lossy(&fsck.stdout));
    }
}

#[test]
fn run_refuses_a_bad_image_spec_naming_the_field_and_a_missing_layout_naming_its_path() {
    use crate::run_e2e::{World, text};
    let Some(world) = World::new("ocibad") else { return };
    let missing = world.dir.path().join("no-layout");
    let cases: &[(&str, String, String)] = &[
        (
            "both",
            "name = \"x\"\n[service]\nbinary = \"/bin/true\"\nimage = \"oci:img\"\n".into(),
            "set vm.uses = \"binary\" or \"image\"".into(),
        ),
        ("transport", "name = \"x\"\n[service]\nimage = \"ftp://host/img\"\n".into(), "service.image: ".into()),
        (
            "uses-unset",
            "name = \"x\"\n[service]\nbinary = \"/bin/true\"\n[vm]\nuses = \"image\"\n".into(),
            "vm.uses is \"image\" but service.image is not set".into(),
        ),
        (
            "missing-layout",
            format!("name = \"x\"\n[service]\nimage = \"oci:{}\"\n", missing.display()),
            missing.join("oci-layout").display().to_string(),
        ),
        ("neither", "name = \"x\"\n[service]\n".into(), "neither service.binary nor service.image".into()),
    ];
    for (name, spec, needle) in cases {
        let path = world.spec(name, spec);
        let output = world.run(&path);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(needle.as_str()), "{name}: {needle:?} in\n{stderr}");
    }
    world.assert_nothing_left();
    // The image store holds nothing from the failed pull.
    let images = world.state_dir().join("oci/images/sha256");
    assert!(std::fs::read_dir(&images).map_or(true, |mut d| d.next().is_none()), "a failed pull left an image record");
}
