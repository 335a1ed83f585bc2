//! kiln's ext4 images read and written by another kernel: Debian 12's cloud
//! kernel (Linux 6.1) under QEMU TCG, booted through kiln-vmm with
//! `cargo xtask guest`'s kiln-init. The service is `tree-manifest` (a
//! kiln-guest example, built static): it mounts the extra disks by virtio
//! serial, prints manifests and writes files. kiln-init runs it as root and
//! leaves disks without its labels alone.
//!
//! A guest manifest goes to a raw "output" disk, not the console, which the
//! kernel writes too; the host reads it back up to its NUL. The host runs
//! the same static binary over the source tree, so both manifests come
//! from one program and are compared line by line.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln::{LaunchScript, ServiceDisk};
use kiln_imagefmt::{Ext4Options, Ext4Tree, FatOptions};
use kiln_testkit::{GuestAssets, guest_assets, require_root, require_tools};
use kiln_vmm::{AccelChoice, Backend, Console, Disk, DiskFormat, LaunchOptions, ShutdownHow, Status, VmPlan, launch};
use rustix::fs::{AtFlags, CWD, FileType, Gid, Mode, Timespec, Timestamps, Uid, XattrFlags};

/// Generous: TCG on a loaded 2-core machine; a good boot takes ~5 s, and
/// these guests also read and write tens of MiB.
const BOOT_DEADLINE: Duration = Duration::from_secs(300);
const QEMU: &str = "qemu-system-x86_64";
/// virtio serials the guest finds the disks by (kiln-init ignores them).
const TREE_SERIAL: &str = "kiln-tree";
const WRITABLE_SERIAL: &str = "kiln-writable";
const OUTPUT_SERIAL: &str = "kiln-out";
/// Files the guest writes to the writable disk.
const WRITTEN_FILES: u32 = 1000;
/// `security.capability`, version 2: CAP_NET_BIND_SERVICE (bit 10) permitted and effective.
const CAPABILITY: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// The guest files, the manifest tool, or `None` after a skip message.
fn setup(test: &str) -> Option<(GuestAssets, PathBuf)> {
    if !require_root(test, "mknod, chown, security.capability and loop mounts of the images") {
        return None;
    }
    require_tools(test, &[QEMU, "e2fsck", "dumpe2fs", "mount", "umount"])?;
    let assets = guest_assets(test, &["bzimage", "initramfs"])?;
    let tool = assets.dir.join("tree-manifest");
    assert!(tool.is_file(), "{} is missing; run `cargo xtask guest`", tool.display());
    Some((assets, tool))
}

/// A pseudo-random, never-zero block pattern, so no block of it is a hole.
fn bytes(len: usize, seed: u32) -> Vec<u8> {
    let mut state = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8 | 1
        })
        .collect()
}

fn set_mtime(path: &Path, seconds: i64, nanoseconds: i64) {
    let time = Timespec { tv_sec: seconds, tv_nsec: nanoseconds };
    let times = Timestamps { last_access: time, last_modification: time };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|err| panic!("utimensat {}: {err}", path.display()));
}

fn chown(path: &Path, uid: u32, gid: u32) {
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    rustix::fs::chownat(CWD, path, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|err| panic!("chown {}: {err}", path.display()));
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, XattrFlags::empty())
        .unwrap_or_else(|err| panic!("setxattr {name} on {}: {err}", path.display()));
}

/// Writes `len` bytes of `bytes(.., seed)` at each offset of a file of `size`.
fn sparse_file(path: &Path, size: u64, data: &[(u64, usize)]) {
    use std::os::unix::fs::FileExt;
    let file = fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    for (index, &(offset, len)) in data.iter().enumerate() {
        file.write_all_at(&bytes(len, 900 + index as u32), offset).unwrap();
    }
}

/// The source tree, made as root: every kind of entry ext4 holds, sizes
/// around block boundaries, owners other than root, setuid/setgid/sticky,
/// xattrs and nanosecond times on everything.
fn build_source(root: &Path) {
    fs::create_dir(root).unwrap();
    let sizes = root.join("sizes");
    fs::create_dir(&sizes).unwrap();
    for (index, size) in
        [0, 1, 59, 60, 61, 4095, 4096, 4097, 8191, 8192, 8193, 49_152, 49_153, 1 << 20].into_iter().enumerate()
    {
        fs::write(sizes.join(format!("size-{size}")), bytes(size, index as u32)).unwrap();
    }
    // Holes: a file past 4 GiB with three data runs (one at the very end),
    // and one whose tail is a hole. Runs are whole blocks of non-zero bytes.
    let sparse = root.join("sparse");
    fs::create_dir(&sparse).unwrap();
    let big: u64 = 5 << 30;
    sparse_file(&sparse.join("five-gib"), big, &[(0, 65_536), (1 << 30, 4096), (big - 8192, 8192)]);
    sparse_file(&sparse.join("tail-hole"), 1 << 20, &[(0, 8192)]);
    sparse_file(&sparse.join("all-hole"), 3 << 20, &[]);
    // Directories of many entries (htree), names long and odd.
    let many = root.join("many");
    fs::create_dir(&many).unwrap();
    for index in 0..3000_u32 {
        let name = match index % 4 {
            0 => format!("entry-{index}"),
            1 => format!("{index:04}-{}", "n".repeat(196 + (index as usize % 55))),
            2 => format!("spaced name {index} é"),
            _ => format!(".hidden-{index}"),
        };
        fs::write(many.join(name), bytes((index as usize * 37) % 300, index)).unwrap();
    }
    let wide = root.join("wide");
    for index in 0..150 {
        fs::create_dir_all(wide.join(format!("sub-{index:03}"))).unwrap();
    }
    // Symlinks: fast (in the inode), slow (a block), dangling, to a dir.
    let links = root.join("links");
    fs::create_dir(&links).unwrap();
    symlink("../sizes/size-1", links.join("fast")).unwrap();
    symlink("x".repeat(59), links.join("fast-59")).unwrap();
    symlink("y".repeat(60), links.join("slow-60")).unwrap();
    symlink(format!("/{}", "long/".repeat(800)), links.join("slow-4001")).unwrap();
    symlink("nowhere/at/all", links.join("dangling")).unwrap();
    symlink("../many", links.join("to-dir")).unwrap();
    // Hardlinks, within and across directories.
    let hard = root.join("hard");
    fs::create_dir(&hard).unwrap();
    fs::write(hard.join("one"), bytes(5000, 77)).unwrap();
    fs::hard_link(hard.join("one"), hard.join("two")).unwrap();
    fs::hard_link(hard.join("one"), root.join("sizes").join("three")).unwrap();
    fs::write(hard.join("empty"), b"").unwrap();
    fs::hard_link(hard.join("empty"), hard.join("empty-too")).unwrap();
    // Devices and a fifo.
    let dev = root.join("dev");
    fs::create_dir(&dev).unwrap();
    let node = |name: &str, kind, major, minor| {
        rustix::fs::mknodat(CWD, dev.join(name), kind, Mode::from_raw_mode(0o620), rustix::fs::makedev(major, minor))
            .unwrap_or_else(|err| panic!("mknod {name}: {err}"));
    };
    node("null", FileType::CharacterDevice, 1, 3);
    node("big-numbers", FileType::CharacterDevice, 4000, 1_000_000);
    node("vda1", FileType::BlockDevice, 254, 1);
    node("fifo", FileType::Fifo, 0, 0);
    for name in ["null", "big-numbers", "vda1", "fifo"] {
        // mknod's mode went through the umask.
        fs::set_permissions(dev.join(name), fs::Permissions::from_mode(0o620)).unwrap();
    }
    // Modes and owners.
    let modes = root.join("modes");
    fs::create_dir(&modes).unwrap();
    for (name, mode, uid, gid) in [
        ("setuid", 0o4755, 0, 0),
        ("setgid", 0o2755, 1000, 50),
        ("all-bits", 0o7777, 65_534, 65_534),
        ("no-bits", 0o0000, 123_456, 654_321),
        ("user-file", 0o640, 1000, 1000),
    ] {
        let path = modes.join(name);
        fs::write(&path, name).unwrap();
        // chown first: it clears setuid/setgid.
        chown(&path, uid, gid);
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }
    for (name, mode) in [("sticky", 0o1777), ("setgid-dir", 0o2775), ("private", 0o700)] {
        fs::create_dir(modes.join(name)).unwrap();
        fs::set_permissions(modes.join(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    chown(&modes.join("private"), 4242, 4343);
    chown(&links.join("fast"), 1000, 1000);
    // xattrs: small (in the inode), large (an xattr block), on a dir too.
    let caps = root.join("caps");
    fs::create_dir(&caps).unwrap();
    fs::write(caps.join("ping"), b"#!/bin/true\n").unwrap();
    fs::set_permissions(caps.join("ping"), fs::Permissions::from_mode(0o755)).unwrap();
    set_xattr(&caps.join("ping"), "security.capability", &CAPABILITY);
    set_xattr(&caps.join("ping"), "user.note", b"hello");
    set_xattr(&caps.join("ping"), "user.binary", &[0, 1, 2, 255, 0]);
    fs::write(caps.join("big-xattr"), b"x").unwrap();
    set_xattr(&caps.join("big-xattr"), "user.big", &bytes(1500, 5));
    set_xattr(&caps, "user.dir", b"on a directory");
    stamp_times(root);
}

/// Nanosecond times on every entry (one before 1970, one past 2038),
/// children before their directory, whose time adding them would change.
fn stamp_times(root: &Path) {
    let mut paths = Vec::new();
    collect(root, &mut paths);
    for (index, path) in paths.iter().rev().enumerate() {
        let index = index as i64;
        let seconds = match index % 7 {
            0 => -86_400 * 365 - index,
            1 => 4_102_444_800 + index, // 2100-01-01
            _ => 1_700_000_000 + index * 3_600,
        };
        set_mtime(path, seconds, (index * 123_456_789 + 1) % 1_000_000_000);
    }
}

/// Every path under `dir`, parents first.
fn collect(dir: &Path, paths: &mut Vec<PathBuf>) {
    paths.push(dir.to_path_buf());
    let mut children: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    children.sort();
    for child in children {
        if fs::symlink_metadata(&child).unwrap().is_dir() {
            collect(&child, paths);
        } else {
            paths.push(child);
        }
    }
}

fn kiln_ext4_image(source: &Path, path: &Path) {
    let mut tree = Ext4Tree::new();
    tree.add_host_path("", source).unwrap_or_else(|err| panic!("kiln's Ext4Tree refused {}: {err}", source.display()));
    let layout = tree.layout(&Ext4Options::default().with_label("kiln-tree")).unwrap();
    layout.write_file(path).unwrap();
}

/// kiln's writable profile: a journaled disk of `size` bytes, with
/// mke2fs's inode count for that size and its free space accounted.
fn writable_profile(size: u64) -> Ext4Options {
    Ext4Options::default().with_label("kiln-rw").with_journal(true).with_size(size)
}

/// An empty kiln ext4 disk of `size` bytes for the guest to write to.
fn kiln_writable_disk(path: &Path, size: u64) {
    let tree = Ext4Tree::new();
    tree.layout(&writable_profile(size)).unwrap().write_file(path).unwrap();
}

fn assert_e2fsck_clean(image: &Path, when: &str) {
    let out = Command::new("e2fsck").arg("-fn").arg(image).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {when} found problems ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tree-manifest DIR` on the host.
fn host_manifest(tool: &Path, dir: &Path) -> String {
    let out = Command::new(tool).arg(dir).output().unwrap();
    assert!(out.status.success(), "tree-manifest {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A blank raw disk the guest writes a manifest to.
fn output_disk(path: &Path) {
    fs::File::create(path).unwrap().set_len(16 << 20).unwrap();
}

/// The manifest the guest wrote to the output disk: up to the NUL, ending
/// with its `# N entries` line.
fn read_output_disk(path: &Path) -> String {
    let raw = fs::read(path).unwrap();
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    let text = String::from_utf8(raw[..end].to_vec()).unwrap();
    assert!(
        text.lines().last().is_some_and(|last| last.starts_with("# ") && last.ends_with(" entries")),
        "the guest's manifest is cut short or missing: {:?}",
        &text[text.len().saturating_sub(300)..]
    );
    text
}

/// Lines in one manifest and not the other, for the failure message.
fn diff(host: &str, guest: &str) -> String {
    let host: std::collections::BTreeSet<&str> = host.lines().collect();
    let guest: std::collections::BTreeSet<&str> = guest.lines().collect();
    let mut out = String::new();
    for line in host.difference(&guest).take(40) {
        out.push_str(&format!("host only:  {line}\n"));
    }
    for line in guest.difference(&host).take(40) {
        out.push_str(&format!("guest only: {line}\n"));
    }
    out
}

/// A manifest line without one `name=value` field.
fn without_field(line: &str, name: &str) -> String {
    let prefix = format!("{name}=");
    line.split(' ').filter(|field| !field.starts_with(&prefix)).collect::<Vec<_>>().join(" ")
}

/// The guest's manifest of the image, made comparable with the source's.
/// What ext4 or the image legitimately changes, and only that:
/// - `lost+found` is the writer's (e2fsck reconnects orphans into it), so
///   its line goes and the root's link count is one lower;
/// - a directory's size is how many blocks its entries took on that
///   filesystem (the host's grew as the test added entries), so it goes;
/// - the entry count line follows.
fn normalise(manifest: &str, image: bool) -> String {
    let mut lines = Vec::new();
    for line in manifest.lines() {
        if line.starts_with("# ") || (image && line.starts_with("lost+found ")) {
            continue;
        }
        let mut line =
            if line.split(' ').nth(1) == Some("dir") { without_field(line, "size") } else { line.to_owned() };
        if image && line.starts_with(". ") {
            let nlink: u64 = field(&line, "nlink").parse().unwrap();
            line = line.replace(&format!(" nlink={nlink} "), &format!(" nlink={} ", nlink - 1));
        }
        lines.push(line);
    }
    lines.join("\n")
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}=");
    line.split(' ').find_map(|f| f.strip_prefix(prefix.as_str())).unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// How one guest runs: the service disk's tree-manifest steps and the extra disks.
struct Guest<'a> {
    assets: &'a GuestAssets,
    tool: &'a Path,
    steps: Vec<String>,
    /// (image, virtio serial, read-only)
    disks: Vec<(&'a Path, &'a str, bool)>,
    /// SIGKILL QEMU as soon as the console has a line saying this.
    kill_at: Option<&'a str>,
}

/// The console, once the guest powered off (or was killed, with `kill_at`).
fn run_guest(test: &str, dir: &Path, guest: &Guest<'_>) -> String {
    let service = ServiceDisk {
        binary: guest.tool.to_path_buf(),
        launch: LaunchScript {
            args: guest.steps.iter().map(|s| s.as_bytes().to_vec()).collect(),
            ..Default::default()
        },
        trees: Vec::new(),
    };
    let service_image = dir.join(format!("{test}-service.img"));
    let options = FatOptions::default().with_label(ServiceDisk::LABEL);
    service.tree().unwrap().layout(&options).unwrap().write_file(&service_image, None).unwrap();
    let log = dir.join(format!("{test}.console"));
    let cmdline = "console=ttyS0 panic=-1 no_timer_check kiln.grace=5";
    let mut plan = VmPlan::new(test, &guest.assets.bzimage, cmdline);
    plan.initramfs = Some(guest.assets.initramfs.clone());
    plan.serial = Console::File(log.clone());
    plan.disks.push(Disk::new(&service_image, DiskFormat::Raw).with_read_only(true));
    for (image, serial, read_only) in &guest.disks {
        plan.disks.push(Disk::new(image, DiskFormat::Raw).with_read_only(*read_only).with_serial(*serial));
    }
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
        if let Some(marker) = guest.kill_at
            && console().lines().any(|line| line.trim_end_matches('\r') == marker)
        {
            vm.kill().unwrap();
            break;
        }
        assert!(
            started.elapsed() < BOOT_DEADLINE,
            "{test}: the guest did not finish within {BOOT_DEADLINE:?} (hung?); console:\n{}",
            console()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    report(&format!("{test}: the guest ran {:.1} s", started.elapsed().as_secs_f64()));
    let log = console();
    assert!(!log.contains("Kernel panic"), "{test}: the kernel panicked:\n{log}");
    // The kernel checks every checksum and extent it reads; it says so here.
    for complaint in ["EXT4-fs error", "EXT4-fs warning"] {
        assert!(!log.contains(complaint), "{test}: the kernel found fault with a kiln disk:\n{log}");
    }
    log
}

/// The guest's kernel mounts kiln's image read-only and sees the source
/// tree exactly; in the same boot it writes 1,000 files to a writable kiln
/// disk, after which e2fsck finds it clean and a host mount finds every file.
#[test]
fn guest_kernel_sees_kiln_ext4_as_its_source_and_writes_a_kiln_disk_clean() {
    let test = "ext4_guest_tree";
    let Some((assets, tool)) = setup(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    build_source(&source);
    let image = dir.path().join("tree.ext4");
    kiln_ext4_image(&source, &image);
    assert_e2fsck_clean(&image, "on the image of the source tree");
    let writable = dir.path().join("writable.ext4");
    kiln_writable_disk(&writable, 256 << 20);
    assert_e2fsck_clean(&writable, "on the new writable disk");
    let output = dir.path().join("out.raw");
    output_disk(&output);

    let steps = format!(
        "--mount {TREE_SERIAL} /mnt/tree ro --manifest /mnt/tree disk:{OUTPUT_SERIAL} --umount /mnt/tree \
         --mount {WRITABLE_SERIAL} /mnt/rw rw --write-files /mnt/rw/written {WRITTEN_FILES} --umount /mnt/rw"
    );
    let guest = Guest {
        assets: &assets,
        tool: &tool,
        steps: steps.split_whitespace().map(str::to_owned).collect(),
        disks: vec![(&image, TREE_SERIAL, true), (&writable, WRITABLE_SERIAL, false), (&output, OUTPUT_SERIAL, false)],
        kill_at: None,
    };
    let console = run_guest(test, dir.path(), &guest);

    // The kernel's view of the image is the source, line for line.
    assert_console_line(&console, "tree-manifest: unmounted /mnt/tree");
    let host = normalise(&host_manifest(&tool, &source), false);
    let guest = normalise(&read_output_disk(&output), true);
    assert!(host == guest, "the guest's manifest of kiln's image differs from the source's:\n{}", diff(&host, &guest));

    assert_console_line(&console, &format!("tree-manifest: wrote {WRITTEN_FILES} files in /mnt/rw/written"));
    assert_console_line(&console, "tree-manifest: unmounted /mnt/rw");
    assert_console_line(&console, "kiln-init: service exited with status 0");

    // The disk the guest wrote: e2fsck is clean, and the host kernel finds
    // the same 1,000 files the tool makes on the host.
    assert_e2fsck_clean(&writable, "after the guest wrote 1,000 files");
    let expected_dir = dir.path().join("expected");
    let made = Command::new(&tool)
        .arg("--write-files")
        .arg(expected_dir.join("written"))
        .arg(WRITTEN_FILES.to_string())
        .output()
        .unwrap();
    assert!(made.status.success(), "tree-manifest --write-files on the host: {made:?}");
    let mounted = LoopMount::new(&writable, &dir.path().join("mnt"));
    let found = files_without_mtime(&host_manifest(&tool, &mounted.dir.join("written")));
    let expected = files_without_mtime(&host_manifest(&tool, &expected_dir.join("written")));
    assert_eq!(found.len(), WRITTEN_FILES as usize);
    assert!(found == expected, "the written files differ:\n{}", diff(&expected.join("\n"), &found.join("\n")));
}

fn assert_console_line(console: &str, line: &str) {
    assert!(console.lines().any(|l| l.trim_end_matches('\r') == line), "console lacks {line:?}:\n{console}");
}

/// The file lines of a manifest, without their times (made at write time).
fn files_without_mtime(manifest: &str) -> Vec<String> {
    manifest.lines().filter(|l| l.split(' ').nth(1) == Some("file")).map(|l| without_field(l, "mtime")).collect()
}

/// An image mounted read-only through the host's loop driver, unmounted on drop.
struct LoopMount {
    dir: PathBuf,
}

impl LoopMount {
    fn new(image: &Path, dir: &Path) -> LoopMount {
        fs::create_dir_all(dir).unwrap();
        let out =
            Command::new("mount").args(["-t", "ext4", "-o", "loop,ro,noload"]).arg(image).arg(dir).output().unwrap();
        assert!(out.status.success(), "mount -o loop {}: {}", image.display(), String::from_utf8_lossy(&out.stderr));
        LoopMount { dir: dir.to_path_buf() }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// A figure for a person reading the test output (not asserted).
fn report(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{message}");
}

fn dumpe2fs_features(image: &Path) -> String {
    let out = Command::new("dumpe2fs").arg("-h").arg(image).output().unwrap();
    assert!(out.status.success(), "dumpe2fs -h: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let features = text.lines().find_map(|l| l.strip_prefix("Filesystem features:"));
    features.unwrap_or_else(|| panic!("dumpe2fs -h shows no features:\n{text}")).trim().to_owned()
}

/// The guest fsyncs file after file to a journaled kiln disk and QEMU is
/// SIGKILLed mid-write; the next boot's kernel replays the journal, and
/// every file fsynced before the kill is there with its content, after
/// which e2fsck finds the disk clean.
#[test]
fn guest_killed_mid_write_keeps_every_fsynced_file_after_journal_replay() {
    let test = "ext4_guest_journal";
    let Some((assets, tool)) = setup(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("journaled.ext4");
    kiln_writable_disk(&disk, 256 << 20);
    assert_e2fsck_clean(&disk, "on the new journaled disk");
    assert!(dumpe2fs_features(&disk).split(' ').any(|f| f == "has_journal"), "kiln's disk has no journal");
    const KILL_AFTER: u32 = 40;
    let steps = format!("--mount {WRITABLE_SERIAL} /mnt/j rw --write-files-fsync /mnt/j/written 100000");
    let kill_at = format!("tree-manifest: fsynced {KILL_AFTER}");
    let writer = Guest {
        assets: &assets,
        tool: &tool,
        steps: steps.split_whitespace().map(str::to_owned).collect(),
        disks: vec![(&disk, WRITABLE_SERIAL, false)],
        kill_at: Some(&kill_at),
    };
    let console = run_guest(&format!("{test}-killed"), dir.path(), &writer);
    // Every line was printed after its fsync returned; the last one counts.
    let fsynced = console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("tree-manifest: fsynced "))
        .filter_map(|n| n.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    assert!(fsynced >= KILL_AFTER, "the guest was killed before it fsynced {KILL_AFTER} files:\n{console}");
    assert!(!console.contains("kiln-init: service exited"), "the writer ended before the kill:\n{console}");
    let features = dumpe2fs_features(&disk);
    assert!(
        features.split(' ').any(|f| f == "needs_recovery"),
        "after the kill the journal should need replaying; features: {features}"
    );

    let output = dir.path().join("out.raw");
    output_disk(&output);
    let steps = format!("--mount {WRITABLE_SERIAL} /mnt/j rw --manifest /mnt/j disk:{OUTPUT_SERIAL} --umount /mnt/j");
    let reader = Guest {
        steps: steps.split_whitespace().map(str::to_owned).collect(),
        disks: vec![(&disk, WRITABLE_SERIAL, false), (&output, OUTPUT_SERIAL, false)],
        kill_at: None,
        ..writer
    };
    let console = run_guest(&format!("{test}-replayed"), dir.path(), &reader);
    assert!(
        console.lines().any(|l| l.contains("EXT4-fs (vd") && l.contains("recovery complete")),
        "the second boot's kernel did not say it replayed the journal:\n{console}"
    );
    assert_console_line(&console, "tree-manifest: unmounted /mnt/j");

    let expected_dir = dir.path().join("expected");
    let made = Command::new(&tool).arg("--write-files").arg(&expected_dir).arg(fsynced.to_string()).output().unwrap();
    assert!(made.status.success(), "tree-manifest --write-files on the host: {made:?}");
    let expected = files_without_mtime(&host_manifest(&tool, &expected_dir));
    let found: Vec<String> = files_without_mtime(&read_output_disk(&output))
        .into_iter()
        .filter_map(|line| line.strip_prefix("written/").map(str::to_owned))
        .filter(|line| expected.iter().any(|want| want.split(' ').next() == line.split(' ').next()))
        .collect();
    assert!(
        found == expected,
        "files fsynced before the kill are lost or changed ({fsynced} fsynced):\n{}",
        diff(&expected.join("\n"), &found.join("\n"))
    );
    report(&format!("{test}: {fsynced} files fsynced before the kill, all found after the replay"));
    assert!(!dumpe2fs_features(&disk).split(' ').any(|f| f == "needs_recovery"), "the guest left the journal dirty");
    assert_e2fsck_clean(&disk, "after the replay and a clean unmount");
}
