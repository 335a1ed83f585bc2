//! A Debian-based OCI image in kiln-init's container mode, booted: Debian's
//! cloud kernel under QEMU TCG, the image's layers pulled and converted by
//! kiln-oci as `kiln run` does it (`oci_guest`'s helpers, reused).
//!
//! The image is made by third-party tools only: layer 1 is kiln-testkit's
//! `debootstrap --variant=minbase bookworm` rootfs as it is (setuid and
//! setgid binaries, hard links, symlinks, `/dev` nodes); layer 2 adds a
//! user the Debian way (Debian's own `groupadd`/`useradd`, chrooted into
//! umoci's bundle), its WORKDIR, a character and a block device node
//! (`mknod`), a setuid+setgid copy of Debian's `id`, a hard link to a
//! layer-1 file, the probe and the static `tree-manifest` (setuid root:
//! the probe runs as the user, the manifest must read root-only files);
//! `umoci config`
//! sets the user by NAME (resolved through the image's `/etc/passwd` and
//! `/etc/group`), the workdir, entrypoint, cmd and env. The probe runs on
//! Debian's userland (`/bin/sh` is dash; coreutils' `id`, `stat`), and the
//! container's `/` is held against `umoci unpack`'s rootfs of the image.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kiln_guest::{ContainerConfig, combine_argv, merge_env};
use kiln_testkit::{debian_rootfs, report_skip, require_tools, tools_required};

use crate::oci_guest::{
    boot, chown, data_disk, diff, json_strings, layer_disks_of_image, normalise_written, read_out, run, service_disk,
    setup, umoci, write_mode,
};

const HOSTNAME: &str = "debian-guest";
/// The probe's exit status, which kiln-init must report.
const PROBE_STATUS: u8 = 7;
const UID: u32 = 1234;
/// A supplementary group of the user's (`useradd -G`).
const EXTRA_GID: u32 = 2345;
/// Debian's `staff` group: the setuid+setgid tool's group, so its
/// effective gid is neither the user's nor root's.
const STAFF_GID: u32 = 50;
const WORKDIR: &str = "/app";
/// What kiln-init mounts or writes at run time, left out of both
/// manifests (and only that, as `docker run` replaces the same paths):
/// `/proc`, `/sys`, `/dev` (the image's own `/dev` nodes are under
/// kiln-init's tmpfs, as under docker's), the data disk's mount point and
/// the three `/etc` files.
const RUNTIME_PATHS: [&str; 7] = ["proc", "sys", "dev", "mnt/data", "etc/hostname", "etc/hosts", "etc/resolv.conf"];
/// Directories the runtime writes into, so overlayfs copies them up and
/// their mtime is the boot's: `/etc` (the three files), `/mnt` (kiln-init
/// makes `mnt/data`). Measured: nothing else differs, `/` included (the
/// Debian image has every mount point, and kiln-init gives the overlay's
/// upper the image's root attributes; before that `/` had the boot's mtime).
const RUNTIME_WRITTEN_DIRS: [&str; 2] = ["etc", "mnt"];

/// The probe, the image's entrypoint (`@SKIPS@` is [`RUNTIME_PATHS`] as
/// `--skip` options): the manifest of `/` first (the checks below write to
/// the WORKDIR), then one `key=value` line per fact, to the data disk.
const PROBE: &str = r#"#!/bin/sh
out=/mnt/data/out
start=$(date +%s)
tree-manifest @SKIPS@ --manifest / - > "$out/manifest" 2> "$out/manifest.err"
echo "manifest-seconds=$(( $(date +%s) - start ))" > "$out/timing"
{
echo "argc=$#"
for arg in "$@"; do echo "arg=$arg"; done
echo "shell=$(readlink /proc/$$/exe)"
echo "id=$(id)"
echo groups=$(sed -n 's/^Groups:[[:space:]]*//p' /proc/self/status)
echo "no-new-privs=$(sed -n 's/^NoNewPrivs:[[:space:]]*//p' /proc/self/status)"
echo "pwd=$(pwd)"
echo "umask=$(umask)"
env | sort | sed 's/^/env:/'
echo "setuid-tool=$(/opt/suid/id-as-root)"
for file in /opt/suid/id-as-root /usr/bin/su /usr/bin/passwd /usr/bin/mount /usr/bin/chage; do
  echo "mode=$file $(stat -c '%a %U:%G' "$file")"
done
for node in /opt/nodes/full /opt/nodes/loop0; do
  echo "node=$node $(stat -c '%F %t:%T %a' "$node")"
  if head -c 1 "$node" > /dev/null 2>&1; then echo "node-open=$node usable"; else echo "node-open=$node unusable"; fi
done
touch /app/new && echo "writable=/app"
touch /usr/new 2>/dev/null || echo "denied=/usr"
while read -r _ target fstype options _; do
  case "$target" in /|/proc|/sys|/dev|/mnt/data) echo "mount=$target $fstype $options";; esac
done < /proc/self/mounts
echo "done"
} > "$out/report" 2>&1
exit 7
"#;

fn probe_script() -> String {
    let skips: Vec<String> = RUNTIME_PATHS.iter().map(|path| format!("--skip {path}")).collect();
    PROBE.replace("@SKIPS@", &skips.join(" "))
}

/// The Debian rootfs, or `None` (skipped) where debootstrap cannot run and
/// tools are not required.
fn debian(test: &str) -> Option<PathBuf> {
    require_tools(test, &["debootstrap", "chroot", "mknod", "cp", "ln"])?;
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target dir").join("test-images");
    match debian_rootfs(&cache) {
        Ok(root) => Some(root),
        Err(err) if tools_required() => panic!("{test}: cannot build the Debian rootfs: {err}"),
        Err(err) => {
            report_skip(&format!("{test}: cannot build the Debian rootfs: {err}"));
            None
        }
    }
}

/// Runs `args` chrooted into `rootfs`: the image's own programs and libraries.
fn chrooted(rootfs: &Path, args: &[&str]) -> String {
    run(Command::new("chroot").arg(rootfs).args(args).env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
}

/// The umoci image in layout `dir/layout` tag `t`; returns `umoci unpack`'s
/// bundle of it (the reference).
fn build_debian_image(dir: &Path, debian: &Path, tool: &Path) -> PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let image = format!("{}:t", layout.display());
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--image", &image, bundle.to_str().unwrap()]);
    let rootfs = bundle.join("rootfs");
    // Layer 1: the debootstrap rootfs as it is (cp -a keeps owners, modes,
    // times, hard links, device nodes and xattrs).
    run(Command::new("cp").arg("-a").arg(debian.join(".")).arg(&rootfs));
    // --refresh-bundle: the next repack stacks on this layer (without it,
    // umoci diffs against the empty image and this layer is dropped).
    umoci(&["repack", "--refresh-bundle", "--image", &image, bundle.to_str().unwrap()]);
    // Layer 2: a user made by Debian's tools, with a supplementary group.
    chrooted(&rootfs, &["groupadd", "-g", &EXTRA_GID.to_string(), "extra"]);
    chrooted(&rootfs, &["useradd", "-m", "-u", &UID.to_string(), "-U", "-G", "extra", "-s", "/bin/sh", "app"]);
    let workdir = rootfs.join(WORKDIR.trim_start_matches('/'));
    fs::create_dir(&workdir).unwrap();
    chrooted(&rootfs, &["chmod", "0750", WORKDIR]);
    chown(&workdir, UID, UID);
    // Device nodes outside /dev, usable-looking (0666): the overlay is
    // nodev, so they must open nothing (docker's device cgroup refuses them too).
    fs::create_dir_all(rootfs.join("opt/nodes")).unwrap();
    // (mknod -m needs /proc in the chroot: chmod after it.)
    chrooted(&rootfs, &["mknod", "/opt/nodes/full", "c", "1", "7"]);
    chrooted(&rootfs, &["mknod", "/opt/nodes/loop0", "b", "7", "0"]);
    chrooted(&rootfs, &["chmod", "0666", "/opt/nodes/full", "/opt/nodes/loop0"]);
    // A setuid-root, setgid-staff copy of Debian's `id` (chmod after chown,
    // which clears the bits).
    fs::create_dir_all(rootfs.join("opt/suid")).unwrap();
    chrooted(&rootfs, &["cp", "/usr/bin/id", "/opt/suid/id-as-root"]);
    chown(&rootfs.join("opt/suid/id-as-root"), 0, STAFF_GID);
    chrooted(&rootfs, &["chmod", "6755", "/opt/suid/id-as-root"]);
    // A hard link in this layer to a file of layer 1.
    run(Command::new("ln").arg(rootfs.join("usr/bin/dash")).arg(rootfs.join("opt/dash-again")));
    write_mode(&rootfs.join("usr/local/bin/probe"), probe_script().as_bytes(), 0o755);
    // setuid root: the probe runs as the user, but the manifest must read
    // what only root may (/etc/shadow, /root, ...), as the host's does.
    write_mode(&rootfs.join("usr/local/bin/tree-manifest"), &fs::read(tool).unwrap(), 0o4755);
    umoci(&["repack", "--refresh-bundle", "--image", &image, bundle.to_str().unwrap()]);
    let config = |args: &[&str]| umoci(&[&["config", "--image", &image][..], args].concat());
    config(&[
        "--config.user",
        "app",
        "--config.workingdir",
        WORKDIR,
        "--config.entrypoint",
        "/usr/local/bin/probe",
        "--config.cmd",
        "first",
        "--config.cmd",
        "second arg",
        "--config.env",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "--config.env",
        "IMAGE_VAR=from the image",
        "--config.env",
        "SHARED=image",
    ]);
    let reference = dir.join("reference");
    umoci(&["unpack", "--image", &image, reference.to_str().unwrap()]);
    reference
}

/// The OCI image config (`config.config`) of tag `t`, read from the layout
/// with serde_json alone: what `docker run` starts from.
fn image_config(layout: &Path) -> serde_json::Value {
    let blob = |digest: &str| -> serde_json::Value {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(hex)).unwrap()).unwrap()
    };
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    let tagged = manifests.iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "t").unwrap();
    let manifest = blob(tagged["digest"].as_str().unwrap());
    blob(manifest["config"]["digest"].as_str().unwrap())["config"].clone()
}

/// A Debian-based image with a non-root USER (a name), an ENTRYPOINT and
/// a WORKDIR runs in the guest as `docker run IMAGE ARGS -e ...` would run
/// it: entrypoint + the spec's args (cmd replaced), the image's env with
/// the spec's on top, uid, primary gid and supplementary groups resolved
/// through the image's own `/etc/passwd` and `/etc/group`, the WORKDIR;
/// setuid and setgid work (kiln-init, like docker, mounts the root neither
/// nosuid nor sets no_new_privs), device nodes show but open nothing (the
/// overlay is nodev); and the container's `/` is `umoci unpack`'s rootfs,
/// entry for entry and field for field, but for the runtime's paths.
#[test]
fn debian_image_with_a_user_entrypoint_and_workdir_runs_as_docker_run_would_and_its_root_is_umocis_rootfs() {
    let test = "oci_debian_guest";
    let started = Instant::now();
    let Some((assets, tool)) = setup(test) else { return };
    let Some(debian) = debian(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let reference = build_debian_image(dir.path(), &debian, &tool);
    let image = image_config(&dir.path().join("layout"));
    let runtime: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(reference.join("config.json")).unwrap()).unwrap();
    let process = &runtime["process"];
    let entrypoint = json_strings(&image["Entrypoint"]);
    assert_eq!(entrypoint, ["/usr/local/bin/probe"], "the image's entrypoint");
    assert_eq!(
        json_strings(&process["args"]),
        [&entrypoint[..], &json_strings(&image["Cmd"])[..]].concat(),
        "umoci's argv is entrypoint + cmd"
    );
    let built = started.elapsed();
    let layers = layer_disks_of_image(&dir.path().join("layout"), dir.path());
    let converted = started.elapsed();
    assert_eq!(layers.len(), 2, "one layer disk per image layer");
    let spec_args = ["from the spec".to_owned(), "two  spaces".to_owned()];
    let spec_env = [("SHARED".to_owned(), "from the spec".to_owned()), ("SPEC_VAR".to_owned(), "a=b c".to_owned())];
    let mut config = ContainerConfig::new(
        layers.len() as u32,
        combine_argv(&entrypoint, &json_strings(&image["Cmd"]), Some(&spec_args[..])),
    );
    config.env = merge_env(&json_strings(&image["Env"]), &spec_env);
    config.workdir = image["WorkingDir"].as_str().unwrap().to_owned();
    config.user = image["User"].as_str().unwrap().to_owned();
    assert_eq!((config.user.as_str(), config.workdir.as_str()), ("app", WORKDIR), "the image's USER and WORKDIR");
    config.hostname = Some(HOSTNAME.to_owned());
    let data = data_disk(dir.path());
    let service = service_disk(dir.path(), &config, &[]);
    let console = boot(test, dir.path(), &assets, &service, &layers, &data);
    let booted = started.elapsed();
    assert!(
        console.lines().any(|l| l.trim_end() == format!("kiln-init: service exited with status {PROBE_STATUS}")),
        "the probe's exit status did not come back:\n{console}"
    );
    let [report, manifest, manifest_err, timing] = <[String; 4]>::try_from(read_out(
        &data,
        dir.path(),
        &["out/report", "out/manifest", "out/manifest.err", "out/timing"],
    ))
    .unwrap();
    eprintln!(
        "{test}: image built {:.1} s, converted {:.1} s, booted and probed {:.1} s; in the guest {}",
        built.as_secs_f64(),
        (converted - built).as_secs_f64(),
        (booted - converted).as_secs_f64(),
        timing.trim_end()
    );
    assert!(report.ends_with("done\n"), "the probe's report is cut short:\n{report}\nconsole:\n{console}");
    let lines: BTreeSet<&str> = report.lines().collect();
    let has = |line: &str| assert!(lines.contains(line), "the report lacks {line:?}:\n{report}");

    // argv: the entrypoint, then the spec's args in place of the image's cmd.
    has("argc=2");
    has("arg=from the spec");
    has("arg=two  spaces");
    // Debian's userland runs it: /bin/sh is dash.
    has("shell=/usr/bin/dash");
    // The user as umoci resolved it through the image's files, and as
    // Debian's `id` (glibc NSS, the image's /etc/group) names it.
    let user = &process["user"];
    assert_eq!((user["uid"].as_u64(), user["gid"].as_u64()), (Some(UID.into()), Some(UID.into())), "umoci's user");
    let mut groups: Vec<u64> = vec![user["gid"].as_u64().unwrap()];
    for gid in user["additionalGids"].as_array().into_iter().flatten().filter_map(|g| g.as_u64()) {
        if !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    assert_eq!(groups, [u64::from(UID), u64::from(EXTRA_GID)], "umoci's groups");
    has(&format!("groups={UID} {EXTRA_GID}"));
    has(&format!("id=uid={UID}(app) gid={UID}(app) groups={UID}(app),{EXTRA_GID}(extra)"));
    has(&format!("pwd={WORKDIR}"));
    has("umask=0022");
    for entry in &config.env {
        has(&format!("env:{entry}"));
    }
    has("env:SHARED=from the spec");
    has("env:IMAGE_VAR=from the image");
    has("env:HOME=/home/app");
    has(&format!("env:HOSTNAME={HOSTNAME}"));
    // setuid and setgid take effect, as under `docker run` (its rootfs is
    // not nosuid and no_new_privs is off by default): kiln-init mounts the
    // overlay nodev only (container.rs) and sets no no_new_privs.
    has("no-new-privs=0");
    // (coreutils' `id` lists the effective gid among the groups.)
    has(&format!(
        "setuid-tool=uid={UID}(app) gid={UID}(app) euid=0(root) egid={STAFF_GID}(staff) groups={STAFF_GID}(staff),{UID}(app),{EXTRA_GID}(extra)"
    ));
    has("mode=/opt/suid/id-as-root 6755 root:staff");
    has("mode=/usr/bin/su 4755 root:root");
    has("mode=/usr/bin/passwd 4755 root:root");
    has("mode=/usr/bin/mount 4755 root:root");
    has("mode=/usr/bin/chage 2755 root:shadow");
    // Device nodes show with their numbers but open nothing (nodev).
    has("node=/opt/nodes/full character special file 1:7 666");
    has("node=/opt/nodes/loop0 block special file 7:0 666");
    has("node-open=/opt/nodes/full unusable");
    has("node-open=/opt/nodes/loop0 unusable");
    has(&format!("writable={WORKDIR}"));
    has("denied=/usr");
    let root_mount = report.lines().find(|l| l.starts_with("mount=/ overlay ")).unwrap_or_else(|| {
        panic!("the report has no overlay at /:\n{report}");
    });
    let options: BTreeSet<&str> = root_mount["mount=/ overlay ".len()..].split(',').collect();
    assert!(options.contains("nodev") && !options.contains("nosuid"), "/ is not nodev,suid: {root_mount}");

    // The container's `/` is umoci's rootfs (manifests by the same program,
    // the same runtime paths left out of both).
    assert!(manifest.ends_with(" entries\n"), "the container's manifest is cut short ({manifest_err}):\n{manifest}");
    let mut reference_manifest = Command::new(&tool);
    for path in RUNTIME_PATHS {
        reference_manifest.args(["--skip", path]);
    }
    reference_manifest.arg("--manifest").arg(reference.join("rootfs")).arg("-");
    let expected = normalise_written(&run(&mut reference_manifest), &RUNTIME_WRITTEN_DIRS);
    let found = normalise_written(&manifest, &RUNTIME_WRITTEN_DIRS);
    assert!(expected.len() > 3000, "the reference holds only {} entries: not a Debian rootfs", expected.len());
    assert!(expected == found, "the container's / differs from umoci's rootfs:\n{}", diff(&expected, &found));
    eprintln!("{test}: {} entries compared, {:.1} s in all", expected.len(), started.elapsed().as_secs_f64());
}
