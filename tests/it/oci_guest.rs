//! kiln-init's container mode, booted: Debian's cloud kernel under QEMU
//! TCG with `cargo xtask guest`'s kiln-init, a service disk holding a
//! `container.conf` (kiln-guest's `ContainerConfig`) and layer disks
//! found by their virtio serials `kiln-layerN`.
//!
//! The image is made by umoci (third party), never by kiln: a busybox
//! base layer, a layer adding a non-root user, a WORKDIR and a setuid
//! file, and a layer with the probe (a shell script) and the static
//! `tree-manifest`; `umoci config` sets the user, workdir, entrypoint, cmd
//! and env. `umoci unpack` (as root, so owners are real) gives the rootfs
//! and umoci's own runtime config (argv, env, cwd, uid/gid), the reference
//! the guest is held to. The layout is pulled and converted as `kiln run`
//! does it (kiln-oci: one ext4 per layer-chain step, stacked by
//! overlayfs), so the container's `/` is kiln's conversion of the image
//! held against umoci's own unpack of it. The probe writes
//! its report and the container's manifest of `/` to the data disk, read
//! back through the host's loop driver after power-off.
//!
//! The second guest stacks two layer disks written with `Ext4Tree`
//! directly, in overlayfs's format (the one kiln-oci's layers writer
//! uses): a whiteout is a char device 0:0, an opaque directory has
//! `trusted.overlay.opaque=y`.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_guest::{CONTAINER_CONFIG_FILE, ContainerConfig, FilesMount, LAYER_SERIAL_PREFIX, UpperKind, merge_env};
use kiln_imagefmt::{DeviceKind, Ext4Options, Ext4Tree, FatOptions, FatTree, Metadata as Ext4Metadata};
use kiln_testkit::{GuestAssets, guest_assets, require_root, require_tools};
use kiln_vmm::{AccelChoice, Backend, Console, Disk, DiskFormat, LaunchOptions, ShutdownHow, Status, VmPlan, launch};
use rustix::fs::{AtFlags, CWD, Gid, Uid};

/// Generous: TCG on a loaded 2-core machine; a good boot takes ~5 s.
const BOOT_DEADLINE: Duration = Duration::from_secs(300);
pub(crate) const QEMU: &str = "qemu-system-x86_64";
const BUSYBOX: &str = "/usr/bin/busybox";
const HOSTNAME: &str = "oci-guest";
const NAMESERVER: &str = "10.0.2.3";
/// The probe's exit status, which kiln-init must report.
const PROBE_STATUS: u8 = 7;
// The probe's manifest skips what kiln-init mounts or writes at run time
// (and the overlay's mount points for them): /proc /sys /dev /mnt /srv
// /etc/app (the keys tree) /etc/hostname /etc/hosts /etc/resolv.conf.
// /tmp is the image's own, as with `docker run`, so it is compared.

/// The probe, run by the image's entrypoint: one `key=value` line per
/// fact, to the data disk (the console is the kernel's too).
const PROBE: &str = r#"#!/bin/sh
out=/mnt/data/out
# The manifest first: the checks below write to the container's /tmp and /work.
tree-manifest --skip proc --skip sys --skip dev --skip mnt --skip srv --skip etc/app --skip etc/hostname \
  --skip etc/hosts --skip etc/resolv.conf --skip lost+found --manifest / - > "$out/manifest" 2> "$out/manifest.err"
{
echo "argc=$#"
for arg in "$@"; do echo "arg=$arg"; done
echo "ids=$(id -u) $(id -g)"
echo groups=$(sed -n 's/^Groups:[[:space:]]*//p' /proc/self/status)
echo "pwd=$(pwd)"
echo "umask=$(umask)"
env | sort | sed 's/^/env:/'
echo "hostname-file=$(cat /etc/hostname)"
echo "uname-n=$(uname -n)"
sed 's/^/hosts:/' /etc/hosts
sed 's/^/resolv:/' /etc/resolv.conf
for path in /proc/self/status /sys/kernel /dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty /dev/pts/ptmx /dev/shm; do
  [ -e "$path" ] && echo "exists=$path"
done
ls /dev/vda >/dev/null 2>&1 && echo "sees=/dev/vda"
[ -e /run/kiln ] && echo "sees=/run/kiln"
echo "zero=$(head -c 4 /dev/zero | od -An -tx1 | tr -d ' ')"
echo "greeting=$(cat /srv/config/greeting)"
echo "key=$(cat /etc/app/keys/key)"
touch /srv/config/new 2>/dev/null && echo "writable=/srv/config"
touch /etc/app/keys/new 2>/dev/null && echo "writable=/etc/app/keys"
touch /sys/kernel/new 2>/dev/null && echo "writable=/sys"
touch /usr/new 2>/dev/null || echo "denied=/usr"
touch /tmp/new && echo "writable=/tmp"
touch /work/new && echo "writable=/work"
echo "setuid=$(stat -c %a /usr/local/bin/setuid-tool)"
while read -r _ target fstype options _; do
  case "$target" in /|/proc|/sys|/dev|/dev/pts|/dev/shm|/srv/config|/etc/app/keys|/mnt/data) echo "mount=$target $fstype $options";; esac
done < /proc/self/mounts
echo "done"
} > "$out/report" 2>&1
exit 7
"#;

pub(crate) fn setup(test: &str) -> Option<(GuestAssets, PathBuf)> {
    if !require_root(test, "umoci unpack with real owners, loop mounts of the data disk") {
        return None;
    }
    require_tools(test, &[QEMU, "umoci", "mount", "umount", "e2fsck", BUSYBOX])?;
    let assets = guest_assets(test, &["bzimage", "initramfs"])?;
    let tool = assets.dir.join("tree-manifest");
    assert!(tool.is_file(), "{} is missing; run `cargo xtask guest`", tool.display());
    Some((assets, tool))
}

pub(crate) fn run(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    assert!(out.status.success(), "{command:?} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn umoci(args: &[&str]) -> String {
    run(Command::new("umoci").args(args))
}

pub(crate) fn chown(path: &Path, uid: u32, gid: u32) {
    rustix::fs::chownat(CWD, path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|err| panic!("chown {}: {err}", path.display()));
}

pub(crate) fn write_mode(path: &Path, bytes: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// The umoci image: three layers and a config, in layout `layout` tag `t`.
fn build_umoci_image(dir: &Path, tool: &Path) -> PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let image = format!("{}:t", layout.display());
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--image", &image, bundle.to_str().unwrap()]);
    let rootfs = bundle.join("rootfs");
    // Layer 1: busybox and root.
    write_mode(&rootfs.join("bin/busybox"), &fs::read(BUSYBOX).unwrap(), 0o755);
    for applet in ["sh", "id", "env", "sort", "sed", "cat", "uname", "ls", "head", "od", "tr", "touch", "stat"] {
        symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    write_mode(&rootfs.join("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n", 0o644);
    write_mode(&rootfs.join("etc/group"), b"root:x:0:\n", 0o644);
    fs::create_dir_all(rootfs.join("tmp")).unwrap();
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::create_dir_all(rootfs.join("usr/local/bin")).unwrap();
    umoci(&["repack", "--refresh-bundle", "--image", &image, bundle.to_str().unwrap()]);
    // Layer 2: a non-root user with a supplementary group, its WORKDIR, a setuid file.
    write_mode(
        &rootfs.join("etc/passwd"),
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:App:/home/app:/bin/sh\n",
        0o644,
    );
    write_mode(&rootfs.join("etc/group"), b"root:x:0:\napp:x:1001:\nextra:x:2000:app\n", 0o644);
    for (path, mode) in [("home/app", 0o750), ("work", 0o755)] {
        fs::create_dir_all(rootfs.join(path)).unwrap();
        fs::set_permissions(rootfs.join(path), fs::Permissions::from_mode(mode)).unwrap();
        chown(&rootfs.join(path), 1000, 1001);
    }
    write_mode(&rootfs.join("usr/local/bin/setuid-tool"), b"#!/bin/sh\nid\n", 0o755);
    fs::set_permissions(rootfs.join("usr/local/bin/setuid-tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    umoci(&["repack", "--refresh-bundle", "--image", &image, bundle.to_str().unwrap()]);
    // Layer 3: the probe (a test program, not kiln's).
    write_mode(&rootfs.join("usr/local/bin/probe"), PROBE.as_bytes(), 0o755);
    write_mode(&rootfs.join("usr/local/bin/tree-manifest"), &fs::read(tool).unwrap(), 0o755);
    umoci(&["repack", "--refresh-bundle", "--image", &image, bundle.to_str().unwrap()]);
    let config = |args: &[&str]| umoci(&[&["config", "--image", &image][..], args].concat());
    config(&[
        "--config.user",
        "app",
        "--config.workingdir",
        "/work",
        "--config.entrypoint",
        "/usr/local/bin/probe",
        "--config.cmd",
        "first",
        "--config.cmd",
        "second arg",
        "--config.env",
        "PATH=/usr/local/bin:/bin",
        "--config.env",
        "IMAGE_VAR=from the image",
        "--config.env",
        "SHARED=image",
    ]);
    // The reference: umoci's own unpack of the finished image.
    let reference = dir.join("reference");
    umoci(&["unpack", "--image", &image, reference.to_str().unwrap()]);
    reference
}

/// The image's layer disks as `kiln run` makes them: the umoci layout
/// pulled into a store in `dir` and converted by kiln-oci, one read-only
/// ext4 per layer-chain step, bottom first.
pub(crate) fn layer_disks_of_image(layout: &Path, dir: &Path) -> Vec<PathBuf> {
    let store = kiln_oci::Store::open(dir.join("store")).unwrap();
    let source = kiln::parse_image_source(&format!("oci:{}:t", layout.display())).unwrap();
    let image = kiln::pull_image(&store, &source, &mut |_| {}).unwrap();
    let disks = kiln::image_rootfs(&store, &image, &mut |_| {}).unwrap();
    assert_eq!(disks.len(), image.layers().len(), "one disk per layer");
    disks.into_iter().map(|disk| disk.path).collect()
}

/// A data disk whose `out` directory anyone may write (the probe runs as uid 1000).
pub(crate) fn data_disk(dir: &Path) -> PathBuf {
    let mut tree = Ext4Tree::new();
    tree.add_dir("out", Ext4Metadata::default().with_mode(0o777)).unwrap();
    // Where a hostile image's symlinks aim (`/proc/1/root/mnt/data/escape`): must stay empty.
    tree.add_dir("escape", Ext4Metadata::default().with_mode(0o755)).unwrap();
    let path = dir.join("data.ext4");
    let options = Ext4Options::default().with_label(kiln_guest::DATA_DISK_LABEL).with_journal(true).with_size(64 << 20);
    tree.layout(&options).unwrap().write_file(&path).unwrap();
    path
}

pub(crate) fn service_disk(dir: &Path, config: &ContainerConfig, trees: &[(&str, &[(&str, &str)])]) -> PathBuf {
    let mut fat = FatTree::new();
    fat.add_file_from_bytes(CONTAINER_CONFIG_FILE, config.to_text().unwrap()).unwrap();
    for (name, files) in trees {
        fat.add_dir(name).unwrap();
        for (file, text) in *files {
            fat.add_file_from_bytes(&format!("{name}/{file}"), text.as_bytes().to_vec()).unwrap();
        }
    }
    let path = dir.join("service.img");
    fat.layout(&FatOptions::default().with_label(kiln_guest::SERVICE_DISK_LABEL))
        .unwrap()
        .write_file(&path, None)
        .unwrap();
    path
}

/// Boots the guest; returns the console once it powered off, kiln-init
/// having failed at nothing.
pub(crate) fn boot(
    test: &str,
    dir: &Path,
    assets: &GuestAssets,
    service: &Path,
    layers: &[PathBuf],
    data: &Path,
) -> String {
    let log = boot_guest(test, dir, assets, service, layers, data, None);
    assert!(!log.contains("kiln-init: FAILED"), "{test}: kiln-init failed:\n{log}");
    log
}

/// Boots the guest; returns the console once it powered off. With
/// `power_button_after`, presses the ACPI power button (QMP
/// `system_powerdown`) once the console shows that line.
fn boot_guest(
    test: &str,
    dir: &Path,
    assets: &GuestAssets,
    service: &Path,
    layers: &[PathBuf],
    data: &Path,
    power_button_after: Option<&str>,
) -> String {
    let log = dir.join(format!("{test}.console"));
    let mut plan = VmPlan::new(test, &assets.bzimage, "console=ttyS0 panic=-1 no_timer_check kiln.grace=5");
    plan.initramfs = Some(assets.initramfs.clone());
    plan.serial = Console::File(log.clone());
    plan.disks.push(Disk::new(data, DiskFormat::Raw).with_serial(kiln_guest::DATA_DISK_SERIAL));
    // Top layer first on the bus: kiln-init must go by serial, not order.
    for (index, layer) in layers.iter().enumerate().rev() {
        let serial = format!("{LAYER_SERIAL_PREFIX}{index}");
        plan.disks.push(Disk::new(layer, DiskFormat::Raw).with_read_only(true).with_serial(&serial));
    }
    plan.disks.push(Disk::new(service, DiskFormat::Raw).with_read_only(true));
    let mut options = LaunchOptions::new(dir.join(test));
    options.accel = AccelChoice::Tcg;
    let started = Instant::now();
    let mut vm =
        launch(Backend::Qemu, &plan, &options).unwrap_or_else(|err| panic!("{test}: cannot start {QEMU}: {err}"));
    vm.boot().unwrap_or_else(|err| panic!("{test}: cannot boot: {err}"));
    let console = || fs::read_to_string(&log).unwrap_or_default();
    loop {
        match vm.status().unwrap_or_else(|err| panic!("{test}: cannot read the VM's status: {err}")) {
            Status::ShutDown(ShutdownHow::Guest) => break,
            Status::Created | Status::Running | Status::Paused => {}
            other => panic!("{test}: {QEMU} failed ({other}); console:\n{}", console()),
        }
        if started.elapsed() > BOOT_DEADLINE {
            let _ = vm.kill();
            panic!("{test}: the guest did not power off within {BOOT_DEADLINE:?} (hung?); console:\n{}", console());
        }
        if let Some(marker) = power_button_after
            && console().lines().any(|line| line.trim_end() == marker)
        {
            let grace = BOOT_DEADLINE.saturating_sub(started.elapsed());
            let stopped =
                vm.shutdown(grace).unwrap_or_else(|err| panic!("{test}: cannot press the power button: {err}"));
            assert_eq!(
                stopped,
                Status::ShutDown(ShutdownHow::Guest),
                "{test}: the guest ignored the power button:\n{}",
                console()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{test}: the guest ran {:.1} s", started.elapsed().as_secs_f64());
    let log = console();
    // A figure for the reader (not asserted): disks_ready to service_start
    // is the overlay's and the container setup's cost.
    if let Some(timing) = log.lines().find(|l| l.contains("kiln-init: timing kernel_start")) {
        eprintln!("{test}: {}", timing.trim_end());
    }
    assert!(!log.contains("Kernel panic"), "{test}: the kernel panicked:\n{log}");
    log
}

/// Files of the data disk (paths from its root), read through the host's loop driver.
pub(crate) fn read_out(data: &Path, dir: &Path, names: &[&str]) -> Vec<String> {
    let mnt = dir.join("data-mnt");
    fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount").args(["-t", "ext4", "-o", "loop,ro"]).arg(data).arg(&mnt));
    let read = names
        .iter()
        .map(|name| {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            match fs::symlink_metadata(mnt.join(name)) {
                Ok(meta) if meta.file_type().is_char_device() => {
                    format!("char {}:{}", rustix::fs::major(meta.rdev()), rustix::fs::minor(meta.rdev()))
                }
                _ => fs::read_to_string(mnt.join(name)).unwrap_or_else(|err| format!("<{name}: {err}>")),
            }
        })
        .collect();
    run(Command::new("umount").arg(&mnt));
    read
}

fn without_field(line: &str, name: &str) -> String {
    let prefix = format!("{name}=");
    line.split(' ').filter(|field| !field.starts_with(&prefix)).collect::<Vec<_>>().join(" ")
}

/// A manifest made comparable: what overlayfs and the runtime legitimately
/// change, and only that:
/// - a directory's size is its filesystem's (the host's, the layer disk's);
/// - a directory's link count: overlayfs reports 1 for a directory merged
///   from several layers (measured), and otherwise the count is the
///   number of subdirectories plus two, which the entries themselves
///   already show; a file's link count is compared;
/// - `/` and `/etc` are the only directories the runtime writes into (its
///   mount points, the `/etc` files), which copies them up: their times are
///   the boot's.
///
/// Nothing else is set aside: layer disks carry no `lost+found` of the
/// writer's, so one in the container would be a difference.
pub(crate) fn normalise(manifest: &str) -> Vec<String> {
    normalise_written(manifest, &[".", "etc"])
}

/// [`normalise`] with the directories the runtime writes into (so copies
/// up) named: `written_dirs`' times are the boot's.
pub(crate) fn normalise_written(manifest: &str, written_dirs: &[&str]) -> Vec<String> {
    let mut lines = Vec::new();
    for line in manifest.lines() {
        let path = line.split(' ').next().unwrap_or_default();
        if line.starts_with("# ") {
            continue;
        }
        let mut line = line.to_owned();
        if line.split(' ').nth(1) == Some("dir") {
            line = without_field(&without_field(&line, "size"), "nlink");
            if written_dirs.contains(&path) {
                line = without_field(&line, "mtime");
            }
        }
        lines.push(line);
    }
    lines
}

pub(crate) fn diff(host: &[String], guest: &[String]) -> String {
    let host: BTreeSet<&String> = host.iter().collect();
    let guest: BTreeSet<&String> = guest.iter().collect();
    let mut out = String::new();
    for line in host.difference(&guest).take(40) {
        out.push_str(&format!("umoci only: {line}\n"));
    }
    for line in guest.difference(&host).take(40) {
        out.push_str(&format!("guest only: {line}\n"));
    }
    out
}

pub(crate) fn json_strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// An image made by umoci runs in the guest as `docker run` would run it:
/// argv (entrypoint + cmd), the image's env with the spec's on top, the
/// image's user and groups, its WORKDIR, `/proc`, a read-only `/sys`, a
/// `/dev` of the usual nodes only, the VM's hostname, hosts and
/// resolv.conf, files trees read-only at their paths, the data disk, the
/// exit status reported; and the container's `/` is umoci's rootfs, entry
/// for entry, but for the runtime's files.
#[test]
fn umoci_image_runs_in_the_guest_as_docker_run_would_and_its_root_is_umocis_rootfs() {
    let test = "oci_guest_umoci";
    let Some((assets, tool)) = setup(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let reference = build_umoci_image(dir.path(), &tool);
    let runtime: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(reference.join("config.json")).unwrap()).unwrap();
    let process = &runtime["process"];
    let argv = json_strings(&process["args"]);
    assert_eq!(argv, ["/usr/local/bin/probe", "first", "second arg"], "umoci's argv");
    let spec_env = [("SHARED".to_owned(), "from the spec".to_owned()), ("SPEC_VAR".to_owned(), "a=b c".to_owned())];
    let layers = layer_disks_of_image(&dir.path().join("layout"), dir.path());
    // umoci repacks a diff against the bundle's last state: without
    // --refresh-bundle on the first repack, the second would hold both.
    assert_eq!(layers.len(), 3, "the busybox, user and probe layers");
    let mut config = ContainerConfig::new(layers.len() as u32, argv.clone());
    config.env = merge_env(&json_strings(&process["env"]), &spec_env);
    config.workdir = process["cwd"].as_str().unwrap().to_owned();
    config.user = "app".to_owned();
    config.hostname = Some(HOSTNAME.to_owned());
    config.nameservers = vec![NAMESERVER.parse().unwrap()];
    config.files = vec![
        FilesMount { name: "config".to_owned(), path: "/srv/config".to_owned() },
        FilesMount { name: "keys".to_owned(), path: "/etc/app/keys".to_owned() },
    ];
    let data = data_disk(dir.path());
    let trees: [(&str, &[(&str, &str)]); 2] = [("config", &[("greeting", "hello")]), ("keys", &[("key", "s3cret")])];
    let service = service_disk(dir.path(), &config, &trees);
    let console = boot(test, dir.path(), &assets, &service, &layers, &data);
    assert!(
        console.lines().any(|l| l.trim_end() == format!("kiln-init: service exited with status {PROBE_STATUS}")),
        "the probe's exit status did not come back:\n{console}"
    );
    let [report, manifest, manifest_err] =
        <[String; 3]>::try_from(read_out(&data, dir.path(), &["out/report", "out/manifest", "out/manifest.err"]))
            .unwrap();
    assert!(report.ends_with("done\n"), "the probe's report is cut short:\n{report}\nconsole:\n{console}");
    let lines: BTreeSet<&str> = report.lines().collect();
    let has = |line: &str| assert!(lines.contains(line), "the report lacks {line:?}:\n{report}");
    let lacks = |prefix: &str| {
        assert!(!report.lines().any(|l| l.starts_with(prefix)), "the report has {prefix:?}:\n{report}");
    };
    // argv as umoci combined it; ids as umoci resolved the image's user.
    has("argc=2");
    has("arg=first");
    has("arg=second arg");
    let user = &process["user"];
    // The primary gid is a supplementary group too (CVE-2022-36109), once.
    let mut groups: Vec<u64> = vec![user["gid"].as_u64().unwrap()];
    for gid in user["additionalGids"].as_array().into_iter().flatten().filter_map(|g| g.as_u64()) {
        if !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    let groups: Vec<String> = groups.iter().map(u64::to_string).collect();
    has(&format!("ids={} {}", user["uid"], user["gid"]));
    has(&format!("groups={}", groups.join(" ")));
    has("ids=1000 1001");
    has("groups=1001 2000");
    has("pwd=/work");
    has("umask=0022");
    for entry in &config.env {
        has(&format!("env:{entry}"));
    }
    has("env:SHARED=from the spec");
    has("env:IMAGE_VAR=from the image");
    has("env:HOME=/home/app");
    has(&format!("hostname-file={HOSTNAME}"));
    has(&format!("uname-n={HOSTNAME}"));
    has("hosts:127.0.0.1\tlocalhost");
    has(&format!("hosts:127.0.1.1\t{HOSTNAME}"));
    has(&format!("resolv:nameserver {NAMESERVER}"));
    for path in [
        "/proc/self/status",
        "/sys/kernel",
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
        "/dev/tty",
        "/dev/pts/ptmx",
        "/dev/shm",
    ] {
        has(&format!("exists={path}"));
    }
    lacks("sees=");
    has("zero=00000000");
    has("greeting=hello");
    has("key=s3cret");
    has("denied=/usr");
    has("writable=/tmp");
    has("writable=/work");
    lacks("writable=/srv/config");
    lacks("writable=/etc/app/keys");
    lacks("writable=/sys");
    has("setuid=4755");
    has(&format!("env:HOSTNAME={HOSTNAME}"));
    // Every option that matters, not just the first.
    let mount_has = |target: &str, fstype: &str, wanted: &[&str]| {
        let prefix = format!("mount={target} {fstype} ");
        let line = report.lines().find(|l| l.starts_with(&prefix));
        let line = line.unwrap_or_else(|| panic!("the report has no {prefix:?} line:\n{report}"));
        let options: BTreeSet<&str> = line[prefix.len()..].split(',').collect();
        for option in wanted {
            assert!(options.contains(option), "{target} is mounted without {option}: {line}");
        }
    };
    mount_has("/", "overlay", &["rw", "nodev"]);
    mount_has("/proc", "proc", &["rw", "nosuid", "nodev", "noexec"]);
    mount_has("/sys", "sysfs", &["ro", "nosuid", "nodev", "noexec"]);
    mount_has("/dev", "tmpfs", &["rw", "nosuid"]);
    mount_has("/dev/pts", "devpts", &["rw", "nosuid", "noexec"]);
    mount_has("/dev/shm", "tmpfs", &["rw", "nosuid", "nodev", "noexec"]);
    mount_has("/srv/config", "vfat", &["ro", "nosuid", "nodev"]);
    mount_has("/etc/app/keys", "vfat", &["ro", "nosuid", "nodev"]);
    mount_has("/mnt/data", "ext4", &["rw", "nosuid", "nodev"]);

    // The container's `/` is umoci's rootfs (manifests by the same program).
    assert!(manifest.ends_with(" entries\n"), "the container's manifest is cut short ({manifest_err}):\n{manifest}");
    let expected = normalise(&run(Command::new(&tool).arg(reference.join("rootfs"))));
    let found = normalise(&manifest);
    assert!(expected == found, "the container's / differs from umoci's rootfs:\n{}", diff(&expected, &found));
}

fn meta(mode: u32) -> Ext4Metadata {
    Ext4Metadata::default().with_mode(mode).with_mtime(1_700_000_000, 5)
}

/// Two layer disks in overlayfs's format stack as overlayfs should: the
/// upper layer's whiteouts hide the lower's file and directory, its opaque
/// directory hides the lower's entries there, a merged directory shows
/// both layers', the upper's version of a file wins, and neither the
/// whiteouts nor the opaque xattr show in the container. The upper layer
/// is on the data disk: what the container writes (and deletes) is there
/// after power-off, in overlayfs's format, and the container cannot see it.
#[test]
fn two_layer_disks_merge_with_whiteouts_and_opaque_directories() {
    let test = "oci_guest_layers";
    let Some((assets, tool)) = setup(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut lower = Ext4Tree::new();
    for path in ["bin", "opaque", "merged", "gone-dir", "mnt"] {
        lower.add_dir(path, meta(0o755)).unwrap();
    }
    lower.add_file_from_path("bin/busybox", BUSYBOX, meta(0o755)).unwrap();
    lower.add_symlink("bin/sh", "busybox", meta(0o777)).unwrap();
    lower.add_file_from_path("bin/tree-manifest", &tool, meta(0o755)).unwrap();
    for (path, text) in [
        ("keep", "kept"),
        ("gone", "whited out"),
        ("replaced", "old"),
        ("opaque/old", "hidden by opaque"),
        ("merged/low", "from below"),
        ("gone-dir/inside", "whited out with its dir"),
    ] {
        lower.add_file_from_bytes(path, text.as_bytes().to_vec(), meta(0o644)).unwrap();
    }
    let mut upper = Ext4Tree::new();
    for path in ["opaque", "merged"] {
        upper.add_dir(path, meta(0o755)).unwrap();
    }
    upper.set_xattr("opaque", "trusted.overlay.opaque", b"y").unwrap();
    // The image's / has an xattr (umoci writes the root as a layer's `.`
    // entry): the container's / shows it, from the data-disk upper.
    upper.set_xattr("", "user.kiln.root", b"of the image").unwrap();
    upper.add_device("gone", DeviceKind::Char, 0, 0, meta(0)).unwrap();
    upper.add_device("gone-dir", DeviceKind::Char, 0, 0, meta(0)).unwrap();
    for (path, text) in
        [("replaced", "new"), ("opaque/new", "above"), ("merged/high", "from above"), ("added", "added")]
    {
        upper.add_file_from_bytes(path, text.as_bytes().to_vec(), meta(0o644)).unwrap();
    }
    let mut layers = Vec::new();
    for (index, tree) in [lower, upper].iter().enumerate() {
        let path = dir.path().join(format!("layer{index}.ext4"));
        tree.layout(&Ext4Options::default()).unwrap().write_file(&path).unwrap();
        layers.push(path);
    }
    let script = "tree-manifest --skip proc --skip sys --skip dev --skip mnt --skip etc --skip lost+found \
                  --manifest / - > /mnt/data/out/manifest 2> /mnt/data/out/manifest.err \
                  && echo persisted > /persisted && busybox rm /keep \
                  && busybox ls -A /mnt/data/.kiln-upper > /mnt/data/out/upper-seen";
    // argv[0] without a `/`: looked up in the container's PATH.
    let mut config = ContainerConfig::new(2, ["sh", "-c", script].map(str::to_owned).to_vec());
    config.env = merge_env(&[], &[("PATH".to_owned(), "/bin".to_owned())]);
    config.upper = UpperKind::DataDisk { dir: ".kiln-upper/layers".to_owned() };
    let service = service_disk(dir.path(), &config, &[]);
    let data = data_disk(dir.path());
    let console = boot(test, dir.path(), &assets, &service, &layers, &data);
    assert!(console.contains("kiln-init: service exited with status 0"), "the program failed:\n{console}");
    let written = [
        "out/manifest",
        "out/manifest.err",
        ".kiln-upper/layers/upper/persisted",
        ".kiln-upper/layers/upper/keep",
        "out/upper-seen",
    ];
    let [manifest, manifest_err, persisted, deleted, upper_seen] =
        <[String; 5]>::try_from(read_out(&data, dir.path(), &written)).unwrap();
    assert_eq!(upper_seen, "", "the container sees its own upper layer on the data disk");
    // kiln-init unmounted the overlay before the data disk holding its upper.
    let fsck = Command::new("e2fsck").args(["-fn"]).arg(&data).output().unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn of the data disk after the boot: {}\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    assert_eq!(persisted, "persisted\n", "a file the container wrote is not in its upper layer on the data disk");
    assert_eq!(deleted, "char 0:0", "a file the container deleted is not a whiteout in its upper layer");
    assert!(manifest.ends_with(" entries\n"), "the manifest is cut short ({manifest_err}):\n{manifest}");
    let paths: Vec<&str> =
        manifest.lines().filter(|l| !l.starts_with("# ")).filter_map(|l| l.split(' ').next()).collect();
    assert_eq!(
        paths,
        [
            ".",
            "added",
            "bin",
            "bin/busybox",
            "bin/sh",
            "bin/tree-manifest",
            "keep",
            "merged",
            "merged/high",
            "merged/low",
            "opaque",
            "opaque/new",
            "replaced"
        ],
        "the merged tree:\n{manifest}"
    );
    let sha = |text: &str| {
        use sha2::Digest;
        sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let line = |path: &str| manifest.lines().find(|l| l.split(' ').next() == Some(path)).unwrap().to_owned();
    assert!(
        line("replaced").contains(&format!("sha256={}", sha("new"))),
        "the upper file must win: {}",
        line("replaced")
    );
    assert!(line("merged/low").contains(&format!("sha256={}", sha("from below"))));
    assert!(!manifest.contains("trusted.overlay"), "overlayfs's own xattrs show in the container:\n{manifest}");
    assert!(!manifest.contains("rdev=0:0"), "a whiteout shows in the container:\n{manifest}");
    let root_xattr =
        format!("xattrs=user.kiln.root={}", b"of the image".iter().map(|b| format!("{b:02x}")).collect::<String>());
    assert!(line(".").ends_with(&root_xattr), "the image's / xattr: {}", line("."));
}

/// A container that cannot start is a failure kiln-init reports with the
/// reason (its `FAILED` line, which also goes to the control channel), not
/// an exit status: here the image has no such user.
#[test]
fn container_that_cannot_start_is_reported_as_a_failure_naming_the_cause() {
    let test = "oci_guest_failure";
    let Some((assets, _tool)) = setup(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut layer = Ext4Tree::new();
    layer.add_dir("bin", meta(0o755)).unwrap();
    layer.add_file_from_path("bin/busybox", BUSYBOX, meta(0o755)).unwrap();
    layer.add_dir("etc", meta(0o755)).unwrap();
    layer.add_file_from_bytes("etc/passwd", b"root:x:0:0::/root:/bin/sh\n".to_vec(), meta(0o644)).unwrap();
    let layers = vec![dir.path().join("layer0.ext4")];
    layer.layout(&Ext4Options::default()).unwrap().write_file(&layers[0]).unwrap();
    let mut config = ContainerConfig::new(1, vec!["/bin/busybox".to_owned(), "true".to_owned()]);
    config.user = "ghost".to_owned();
    let service = service_disk(dir.path(), &config, &[]);
    let data = data_disk(dir.path());
    let log = boot_guest(test, dir.path(), &assets, &service, &layers, &data, None);
    let want = "kiln-init: FAILED: container: Cannot run the container as user \"ghost\": no user \"ghost\" in the image's /etc/passwd";
    assert!(log.lines().any(|l| l.trim_end() == want), "the console lacks {want:?}:\n{log}");
    assert!(!log.contains("service exited"), "a failure is not an exit:\n{log}");
}

/// The power button stops a container with its image's stop signal, as
/// `docker stop` does: umoci's image sets `StopSignal` SIGQUIT, kiln-oci
/// reads it, and SIGQUIT (not SIGTERM) reaches the container's program (a
/// numeric uid without a passwd entry, so gid 0), whose own exit status,
/// saying which signal came, is reported.
#[test]
fn power_button_stops_the_container_and_its_exit_status_is_reported() {
    let test = "oci_guest_power";
    let Some((assets, _tool)) = setup(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (layout, bundle) = (dir.path().join("layout"), dir.path().join("bundle"));
    let image = format!("{}:t", layout.display());
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--image", &image, bundle.to_str().unwrap()]);
    let rootfs = bundle.join("rootfs");
    write_mode(&rootfs.join("bin/busybox"), &fs::read(BUSYBOX).unwrap(), 0o755);
    for applet in ["sh", "sleep", "id"] {
        symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    umoci(&["repack", "--image", &image, bundle.to_str().unwrap()]);
    // The status says which signal came: 3 for SIGQUIT, 4 for SIGTERM.
    let script = "trap 'echo container: got SIGQUIT; exit 3' QUIT; trap 'echo container: got SIGTERM; exit 4' TERM; \
                  echo \"container: ready as $(id -u):$(id -g)\"; while :; do sleep 1; done";
    umoci(&[
        "config",
        "--image",
        &image,
        "--config.user",
        "4242",
        "--config.env",
        "PATH=/bin",
        "--config.entrypoint",
        "sh",
        "--config.entrypoint",
        "-c",
        "--config.cmd",
        script,
        "--config.stopsignal",
        "SIGQUIT",
    ]);
    // Pulled and converted as `kiln run` does it.
    let store = kiln_oci::Store::open(dir.path().join("store")).unwrap();
    let source = kiln::parse_image_source(&format!("oci:{image}")).unwrap();
    let pulled = kiln::pull_image(&store, &source, &mut |_| {}).unwrap();
    let runtime = pulled.runtime();
    assert_eq!(runtime.stop_signal(), Some("SIGQUIT"), "kiln-oci lost the image's StopSignal");
    let layers: Vec<PathBuf> =
        kiln::image_rootfs(&store, &pulled, &mut |_| {}).unwrap().into_iter().map(|disk| disk.path).collect();
    let argv = kiln_guest::combine_argv(runtime.entrypoint(), runtime.cmd(), None);
    let mut config = ContainerConfig::new(u32::try_from(layers.len()).unwrap(), argv);
    config.env = merge_env(runtime.env(), &[]);
    config.user = runtime.user().unwrap_or_default().to_owned();
    config.stop_signal = kiln_guest::StopSignal::parse(runtime.stop_signal().unwrap()).unwrap();
    let service = service_disk(dir.path(), &config, &[]);
    let data = data_disk(dir.path());
    let log = boot_guest(test, dir.path(), &assets, &service, &layers, &data, Some("container: ready as 4242:0"));
    let position = |line: &str| {
        log.lines().position(|l| l.trim_end() == line).unwrap_or_else(|| panic!("the console lacks {line:?}:\n{log}"))
    };
    let pressed = position("kiln-init: power button: sending SIGQUIT to the service, grace 5.0s");
    let trapped = position("container: got SIGQUIT");
    let exited = position("kiln-init: service exited with status 3");
    assert!(pressed < trapped && trapped < exited, "out of order:\n{log}");
    assert!(!log.contains("kiln-init: FAILED"), "kiln-init failed:\n{log}");
}

/// A hostile image layer, written by Python's tarfile (not kiln) and
/// converted by kiln-oci's layer writer: `escape` has `/etc` ->
/// `/proc/1/root/mnt/data/escape` (PID 1's view of the data disk, reached
/// once the container's /proc is mounted); `passwd-fifo` has /etc/passwd
/// a FIFO; `replaced` has /etc/hosts a FIFO, /etc/hostname a device node,
/// /etc/resolv.conf a link out, and a usable-looking `/node` (c 1:5, 0666).
const HOSTILE_LAYER: &str = r#"
import io, sys, tarfile
out, variant, busybox = sys.argv[1:4]
tar = tarfile.open(out, "w", format=tarfile.PAX_FORMAT)
def add(name, kind, mode=0o755, data=b"", link="", dev=(0, 0)):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.linkname = kind, mode, 1700000000, link
    info.devmajor, info.devminor = dev
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data else None)
add("bin", tarfile.DIRTYPE)
add("bin/busybox", tarfile.REGTYPE, data=open(busybox, "rb").read())
for applet in ["sh", "cat", "stat", "ls", "sed", "head", "true", "pwd"]:
    add("bin/" + applet, tarfile.SYMTYPE, 0o777, link="busybox")
add("mnt", tarfile.DIRTYPE)
if variant == "escape":
    add("etc", tarfile.SYMTYPE, 0o777, link="/proc/1/root/mnt/data/escape")
elif variant == "passwd-fifo":
    add("etc", tarfile.DIRTYPE)
    add("etc/passwd", tarfile.FIFOTYPE, 0o644)
else:
    add("etc", tarfile.DIRTYPE)
    add("etc/hosts", tarfile.FIFOTYPE, 0o644)
    add("etc/hostname", tarfile.CHRTYPE, 0o666, dev=(1, 3))
    add("etc/resolv.conf", tarfile.SYMTYPE, 0o777, link="/proc/1/root/mnt/data/escape/resolv.conf")
    add("etc/passwd", tarfile.REGTYPE, 0o644, data=b"root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/:/bin/sh\n")
    add("etc/group", tarfile.REGTYPE, 0o644, data=b"root:x:0:\napp:x:1001:\nextra:x:2000:app\n")
    add("node", tarfile.CHRTYPE, 0o666, dev=(1, 5))
tar.close()
"#;

/// The program of the `replaced` variant (as uid 1000): the fds a child
/// inherits (busybox ash keeps its own fd 10 close-on-exec; whatever
/// kiln-init leaked would pass through), then a report on the data disk.
const HOSTILE_PROBE: &str = r#"out=/mnt/data/out
ls /proc/self/fd > $out/fds
{
echo "hostname=$(cat /etc/hostname)"
sed 's/^/hosts:/' /etc/hosts
sed 's/^/resolv:/' /etc/resolv.conf
echo "node=$(stat -c '%F %t:%T' /node)"
head -c 1 /node > /dev/null 2>&1 && echo "node=usable" || echo "node=unusable"
echo groups=$(sed -n 's/^Groups:[[:space:]]*//p' /proc/self/status)
echo "pwd=$(pwd)"
echo done
} > $out/report 2>&1
"#;

fn hostile_layer(dir: &Path, variant: &str) -> Vec<PathBuf> {
    let tar = dir.join(format!("{variant}.tar"));
    run(Command::new("python3").arg("-c").arg(HOSTILE_LAYER).arg(&tar).arg(variant).arg(BUSYBOX));
    let tree = kiln_oci::layer_tree(variant, &[], &[kiln_oci::LayerTar::new(&tar, variant)])
        .unwrap_or_else(|err| panic!("kiln-oci refused the {variant} layer: {err}"));
    let path = dir.join(format!("{variant}.ext4"));
    tree.layout(&Ext4Options::default()).unwrap().write_file(&path).unwrap();
    vec![path]
}

/// Boots the `variant` image; returns the console and what the data disk's
/// `escape` directory holds (must be nothing).
fn boot_hostile(test: &str, dir: &Path, assets: &GuestAssets, variant: &str, config: &ContainerConfig) -> String {
    let layers = hostile_layer(dir, variant);
    let service = service_disk(dir, config, &[]);
    let data = data_disk(dir);
    let log = boot_guest(test, dir, assets, &service, &layers, &data, None);
    let mnt = dir.join("escape-mnt");
    fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount").args(["-t", "ext4", "-o", "loop,ro"]).arg(&data).arg(&mnt));
    let escaped: Vec<String> = fs::read_dir(mnt.join("escape"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let out: Vec<(String, String)> = fs::read_dir(mnt.join("out"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), fs::read_to_string(e.path()).unwrap_or_default()))
        .collect();
    run(Command::new("umount").arg(&mnt));
    assert!(escaped.is_empty(), "{test}: kiln-init wrote outside the container, into PID 1's view: {escaped:?}\n{log}");
    let mut text = log;
    for (name, content) in out {
        text.push_str(&format!("\n=== out/{name}\n{content}"));
    }
    text
}

fn hostile_setup(test: &str) -> Option<GuestAssets> {
    if !require_root(test, "loop mounts of the data disk") {
        return None;
    }
    require_tools(test, &[QEMU, "python3", "mount", "umount", BUSYBOX])?;
    guest_assets(test, &["bzimage", "initramfs"])
}

/// `/etc` -> `/proc/1/root/mnt/data/escape`: kiln-init's writes of the
/// `/etc` files must not follow it into PID 1's namespace (openat2
/// RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS refuses the magic link); the
/// container fails to start with a FAILED line naming /etc.
#[test]
fn image_symlinks_never_lead_kiln_init_writes_out_of_the_container() {
    let test = "oci_guest_hostile_escape";
    let Some(assets) = hostile_setup(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = ContainerConfig::new(1, vec!["/bin/true".to_owned()]);
    let log = boot_hostile(test, dir.path(), &assets, "escape", &config);
    let failed = log.lines().find(|l| l.starts_with("kiln-init: FAILED: container: "));
    let failed = failed.unwrap_or_else(|| panic!("no FAILED line:\n{log}"));
    assert!(
        failed.contains("cannot open /etc/ in the container") && failed.contains("leads out of the container"),
        "the failure does not name /etc and why: {failed}"
    );
    assert!(!log.contains("service exited"), "a failure is not an exit:\n{log}");
}

/// /etc/passwd as a FIFO: kiln-init opens it without blocking and refuses
/// it (not a regular file) instead of hanging the boot.
#[test]
fn passwd_that_is_a_fifo_fails_the_start_instead_of_hanging_it() {
    let test = "oci_guest_hostile_passwd";
    let Some(assets) = hostile_setup(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = ContainerConfig::new(1, vec!["/bin/true".to_owned()]);
    let log = boot_hostile(test, dir.path(), &assets, "passwd-fifo", &config);
    let want = "kiln-init: FAILED: container: the image's /etc/passwd is not a regular file";
    assert!(log.lines().any(|l| l.starts_with(want)), "the console lacks {want:?}:\n{log}");
}

/// /etc/hosts a FIFO, /etc/hostname a device node, /etc/resolv.conf a
/// link out of the container: each is replaced by kiln-init's file (never
/// written through or opened), the container starts as its user with the
/// primary gid among its groups, the image's device node shows but opens
/// nothing (the overlay is nodev), and the program inherits fds 0, 1, 2 only.
#[test]
fn hostile_etc_entries_are_replaced_and_image_device_nodes_are_unusable() {
    let test = "oci_guest_hostile_replaced";
    let Some(assets) = hostile_setup(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut config = ContainerConfig::new(1, ["/bin/sh", "-c", HOSTILE_PROBE].map(str::to_owned).to_vec());
    config.user = "app".to_owned();
    config.workdir = "/made/deep".to_owned();
    config.hostname = Some(HOSTNAME.to_owned());
    config.nameservers = vec![NAMESERVER.parse().unwrap()];
    let log = boot_hostile(test, dir.path(), &assets, "replaced", &config);
    assert!(!log.contains("kiln-init: FAILED"), "kiln-init failed:\n{log}");
    assert!(log.contains("kiln-init: service exited with status 0"), "the program failed:\n{log}");
    let section = |name: &str| {
        let start = log.find(&format!("=== out/{name}\n")).unwrap_or_else(|| panic!("no out/{name}:\n{log}"));
        log[start..].lines().skip(1).take_while(|l| !l.starts_with("=== ")).collect::<Vec<_>>().join("\n")
    };
    let report = section("report");
    for line in [
        &format!("hostname={HOSTNAME}")[..],
        "hosts:127.0.0.1\tlocalhost",
        &format!("resolv:nameserver {NAMESERVER}"),
        "node=character special file 1:5",
        "node=unusable",
        "groups=1001 2000",
        "pwd=/made/deep",
        "done",
    ] {
        assert!(report.lines().any(|l| l == line), "the report lacks {line:?}:\n{report}");
    }
    // 3 is `ls`'s own handle on the directory it lists.
    assert_eq!(section("fds").trim_end(), "0\n1\n2\n3", "the program inherited more than 0, 1, 2:\n{log}");
}
