//! `cargo xtask guest`: kiln's minimal guest in `target/guest/`:
//!
//! - `vmlinuz`: Debian's cloud kernel (bzImage) for QEMU, and `vmlinux`,
//!   the ELF inside it (`kiln_guest::extract_vmlinux`) for cloud-hypervisor;
//! - `initramfs.cpio.gz` (written by `kiln_imagefmt::CpioArchive`):
//!   `kiln-init` as `/init`, busybox (for `/srv/launch`'s `sh`), and the modules the guest needs with their load order;
//! - `service-probe`: the static test service the boot tests put on a
//!   service disk; `tree-manifest`: the static tree lister the ext4 boot
//!   tests run in the guest and on the host; `manifest.txt`: kernel,
//!   modules, sizes.
//!
//! The kernel `.deb` is fetched with `apt-get download` into
//! `target/guest/cache/` once and unpacked with `dpkg-deb -x`; later runs
//! are offline. `--kernel BZIMAGE [--modules DIR]` uses a kernel of your own.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kiln_guest::{ModInfo, decompress_module, load_order, module_name_from_file};
use kiln_imagefmt::{Compression, CpioArchive};

use crate::{announce, cargo, flag_value, format_bytes, format_duration, run_command, show_command, target_dir};

/// The Debian metapackage that always points at the current cloud kernel.
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
/// Modules kiln-init loads, in the order wanted (dependencies come first
/// anyway): virtio PCI transport, disks, network, console, vsock, the
/// service disk's vfat with its code pages, the ACPI power button and the
/// evdev interface kiln-init reads it through, and overlayfs, which stacks
/// an OCI container's layer disks.
const WANTED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "vmw_vsock_virtio_transport",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "button",
    "evdev",
    "overlay",
];
/// kiln-guest's examples the boot tests run, built static and copied to
/// `target/guest/` under these names.
const TEST_SERVICES: [&str; 2] = ["service-probe", "tree-manifest"];
/// The largest vmlinux accepted (Debian's is ~53 MB).
const VMLINUX_LIMIT: u64 = 512 << 20;
const MODULE_LIMIT: u64 = 64 << 20;
const TARGET: &str = "x86_64-unknown-linux-gnu";
const BUSYBOX: &str = "/usr/bin/busybox";
/// The initramfs is stamped with one fixed mtime, so rebuilds are identical.
const EPOCH: i64 = 0;

const USAGE: &str = "usage: cargo xtask guest [--kernel BZIMAGE [--modules DIR]] [--busybox PATH]";

pub(crate) fn run(args: &[String]) -> Result<()> {
    let mut kernel = None;
    let mut modules = None;
    let mut busybox = PathBuf::from(BUSYBOX);
    let mut index = 0;
    while index < args.len() {
        if let Some(value) = flag_value(args, &mut index, "--kernel")? {
            kernel = Some(PathBuf::from(value));
        } else if let Some(value) = flag_value(args, &mut index, "--modules")? {
            modules = Some(PathBuf::from(value));
        } else if let Some(value) = flag_value(args, &mut index, "--busybox")? {
            busybox = PathBuf::from(value);
        } else {
            bail!("unknown argument `{}`\n{USAGE}", args[index]);
        }
        index += 1;
    }
    if modules.is_some() && kernel.is_none() {
        bail!("--modules needs --kernel: Debian's modules only fit Debian's kernel\n{USAGE}");
    }
    build(kernel, modules, &busybox)
}

/// Where the guest files go: `target/guest` (absolute, for KILN_GUEST_DIR).
pub(crate) fn guest_dir() -> Result<PathBuf> {
    let dir = target_dir().join("guest");
    Ok(if dir.is_absolute() { dir } else { std::env::current_dir()?.join(dir) })
}

fn build(kernel: Option<PathBuf>, modules: Option<PathBuf>, busybox: &Path) -> Result<()> {
    let started = Instant::now();
    let out = guest_dir()?;
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let source = match kernel {
        Some(bzimage) => KernelSource { description: format!("--kernel {}", bzimage.display()), bzimage, modules },
        None => debian_kernel(&out.join("cache"))?,
    };

    announce("extracting vmlinux from the bzImage");
    let image = fs::read(&source.bzimage).with_context(|| format!("cannot read {}", source.bzimage.display()))?;
    let parsed = kiln_guest::BzImage::parse(&image).with_context(|| format!("{}", source.bzimage.display()))?;
    let compression = parsed.compression.map_or("unknown", |c| c.name());
    let vmlinux = parsed.decompress(VMLINUX_LIMIT).with_context(|| format!("{}", source.bzimage.display()))?;
    println!(
        "vmlinuz {} ({compression} payload, boot protocol {}.{:02}) -> vmlinux {}",
        format_bytes(image.len() as u64),
        parsed.protocol >> 8,
        parsed.protocol & 0xff,
        format_bytes(vmlinux.len() as u64)
    );

    announce("resolving module dependencies from .modinfo");
    let modules = match &source.modules {
        Some(dir) => resolve_modules(dir)?,
        None => {
            println!("no modules directory: assuming the kernel has the drivers built in");
            Vec::new()
        }
    };
    println!("load order: {}", modules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(" "));

    announce("building kiln-init, service-probe and tree-manifest (static)");
    let build_dir = out.join("build");
    run_command(
        cargo()
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            // Symbols and line tables would triple kiln-init's size in the initramfs.
            .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
            .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
            .args(["build", "--release", "--locked", "-p", "kiln-guest", "--bin", "kiln-init"])
            .args(TEST_SERVICES.iter().flat_map(|name| ["--example", name]))
            .args(["--target", TARGET, "--target-dir"])
            .arg(&build_dir),
    )?;
    let release = build_dir.join(TARGET).join("release");
    let init = release.join("kiln-init");
    let examples = TEST_SERVICES.map(|name| release.join("examples").join(name));
    for binary in [&init, &busybox.to_path_buf()].into_iter().chain(&examples) {
        require_static(binary)?;
    }
    let example_bytes = examples
        .iter()
        .map(|path| fs::read(path).with_context(|| format!("cannot read {}", path.display())))
        .collect::<Result<Vec<_>>>()?;

    announce("assembling initramfs.cpio.gz");
    let mut archive = CpioArchive::new();
    for dir in ["bin", "dev", "etc", "mnt", "proc", "run", "srv", "sys", "tmp", "lib/modules/kiln"] {
        archive.add_dir(dir, 0o755)?;
    }
    // The kernel opens /dev/console for PID 1's stdio before /dev is mounted.
    archive.add_char_device("dev/console", 0o600, 5, 1)?;
    archive.add_file_from_path("init", &init, 0o755)?;
    archive.add_file_from_path("bin/busybox", busybox, 0o755)?;
    let applets = busybox_applets(busybox)?;
    for applet in &applets {
        archive.add_symlink(&format!("bin/{applet}"), "busybox")?;
    }
    let mut order = String::new();
    for module in &modules {
        let file = format!("{}.ko", module.name);
        archive.add_file_from_bytes(&format!("lib/modules/kiln/{file}"), module.elf.clone(), 0o644)?;
        order.push_str(&file);
        order.push('\n');
    }
    archive.add_file_from_bytes("lib/modules/kiln/load-order", order, 0o644)?;
    // Every input has been read and checked; only now is target/guest
    // touched, so a failed run never pairs a new kernel with old modules.
    let initramfs = out.join("initramfs.cpio.gz");
    let summary = archive.write_file(&initramfs, Compression::Gzip, EPOCH)?;
    write_atomically(&out.join("vmlinuz"), &image)?;
    write_atomically(&out.join("vmlinux"), &vmlinux)?;
    for (name, bytes) in TEST_SERVICES.iter().zip(&example_bytes) {
        let copy = out.join(name);
        write_atomically(&copy, bytes)?;
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {} executable", copy.display()))?;
    }
    println!(
        "{}: {} entries, {} ({} uncompressed)",
        initramfs.display(),
        summary.entries,
        format_bytes(summary.file_bytes),
        format_bytes(summary.archive_bytes)
    );

    let manifest = format!(
        "kernel: {}\nvmlinuz: {} bytes, {compression} payload\nvmlinux: {} bytes\nmodules (load order): {}\nbusybox applets: {}\ninitramfs: {} bytes\n",
        source.description,
        image.len(),
        vmlinux.len(),
        modules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(" "),
        applets.len(),
        summary.file_bytes,
    );
    write_atomically(&out.join("manifest.txt"), manifest.as_bytes())?;
    println!("xtask guest: {} ready in {}", out.display(), format_duration(started.elapsed()));
    Ok(())
}

struct KernelSource {
    description: String,
    bzimage: PathBuf,
    modules: Option<PathBuf>,
}

/// Debian's current cloud kernel: the metapackage's dependency, downloaded
/// once into `cache` and unpacked there.
fn debian_kernel(cache: &Path) -> Result<KernelSource> {
    announce("fetching Debian's cloud kernel");
    fs::create_dir_all(cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let package = resolve_kernel_package()?;
    let deb = match find_deb(cache, &package)? {
        Some(deb) => {
            println!("cached: {}", deb.display());
            deb
        }
        None => {
            run_command(Command::new("apt-get").arg("download").arg(&package).current_dir(cache))
                .with_context(|| format!("cannot download {package}; is the network or a Debian mirror reachable?"))?;
            find_deb(cache, &package)?.with_context(|| format!("apt-get download left no {package}_*.deb"))?
        }
    };
    let root = cache.join(format!("{package}.root"));
    if !root.join(".unpacked").is_file() {
        // Unpack into a fresh directory, then mark it complete: a cut-short
        // unpack is redone, never used.
        let _ = fs::remove_dir_all(&root);
        run_command(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        fs::write(root.join(".unpacked"), b"").context("cannot mark the unpacked kernel")?;
    }
    let release = package.strip_prefix("linux-image-").unwrap_or(&package).to_owned();
    let bzimage = root.join("boot").join(format!("vmlinuz-{release}"));
    let modules = root.join("lib/modules").join(&release);
    if !bzimage.is_file() || !modules.is_dir() {
        bail!("{} has no boot/vmlinuz-{release} or lib/modules/{release}", deb.display());
    }
    let description = format!("{}", deb.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    Ok(KernelSource { description, bzimage, modules: Some(modules) })
}

/// `linux-image-cloud-amd64` only depends on the versioned package
/// (`linux-image-6.1.0-NN-cloud-amd64`); `apt-cache depends` names it.
fn resolve_kernel_package() -> Result<String> {
    let mut command = Command::new("apt-cache");
    command.args(["depends", KERNEL_METAPACKAGE]);
    let shown = show_command(&command);
    let output = command.output().with_context(|| format!("cannot run `{shown}`: kiln's guest needs Debian's apt"))?;
    match kernel_package_in(&String::from_utf8_lossy(&output.stdout)) {
        Some(package) => Ok(package),
        None => bail!(
            "`{shown}` names no linux-image-*-cloud-amd64 ({}); run `apt-get update` first",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    }
}

/// The versioned kernel package in `apt-cache depends` output.
fn kernel_package_in(depends: &str) -> Option<String> {
    depends
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-") && name.ends_with("-cloud-amd64"))
        .map(str::to_owned)
}

fn find_deb(cache: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(cache).with_context(|| format!("cannot list {}", cache.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

struct Module {
    name: String,
    elf: Vec<u8>,
}

/// The wanted modules and their dependencies, in load order, decompressed.
/// Wanted modules the kernel has built in (listed in `modules.builtin`)
/// are skipped.
fn resolve_modules(dir: &Path) -> Result<Vec<Module>> {
    let mut files = BTreeMap::new();
    index_modules(dir, &mut files)?;
    let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let builtin: Vec<String> =
        builtin.lines().filter_map(|line| line.rsplit('/').next().and_then(module_name_from_file)).collect();
    let wanted: Vec<&str> = WANTED_MODULES
        .iter()
        .copied()
        .filter(|name| files.contains_key(*name) || !builtin.iter().any(|b| b == name))
        .collect();
    // Read .modinfo only for the modules reachable from the wanted ones.
    let mut infos: BTreeMap<String, ModInfo> = BTreeMap::new();
    let mut elves: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut queue: Vec<String> = wanted.iter().map(|name| name.to_string()).collect();
    while let Some(name) = queue.pop() {
        if infos.contains_key(&name) {
            continue;
        }
        let Some(path) = files.get(&name) else {
            if builtin.contains(&name) {
                continue;
            }
            bail!("module {name} is neither in {} nor built into the kernel", dir.display());
        };
        let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let elf = decompress_module(&bytes, MODULE_LIMIT).with_context(|| format!("{}", path.display()))?;
        let info = ModInfo::parse(&elf).with_context(|| format!("{}", path.display()))?;
        // Dependencies built into the kernel need no loading.
        let info = ModInfo { depends: info.depends.into_iter().filter(|d| !builtin.contains(d)).collect(), ..info };
        queue.extend(info.depends.iter().cloned());
        infos.insert(name.clone(), info);
        elves.insert(name, elf);
    }
    let order = load_order(&infos, &wanted)?;
    Ok(order.into_iter().map(|name| Module { elf: elves.remove(&name).unwrap_or_default(), name }).collect())
}

fn index_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            index_modules(&path, files)?;
        } else if let Some(name) = module_name_from_file(&entry.file_name().to_string_lossy()) {
            files.entry(name).or_insert(path);
        }
    }
    Ok(())
}

/// busybox's applets, for `/bin/<applet>` links (`sh` among them).
fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let output = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("cannot run {}; install busybox-static", busybox.display()))?;
    if !output.status.success() {
        bail!("`{} --list` failed ({})", busybox.display(), output.status);
    }
    let applets: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && *name != "busybox" && !name.contains('/'))
        .map(str::to_owned)
        .collect();
    if !applets.iter().any(|a| a == "sh") {
        bail!("{} has no `sh` applet; /srv/launch needs one", busybox.display());
    }
    Ok(applets)
}

/// Fails unless `path` is an ELF with no program interpreter: inside the
/// guest there is no dynamic loader and no libc.
fn require_static(path: &Path) -> Result<()> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let fail = |why: &str| bail!("{} {why}; the guest has no dynamic loader", path.display());
    if bytes.len() < 64 || !bytes.starts_with(b"\x7fELF") || bytes[4] != 2 {
        return fail("is not a 64-bit ELF file");
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for index in 0..phnum {
        let at = phoff + index * phentsize;
        let Some(header) = bytes.get(at..at + 4) else { return fail("has truncated program headers") };
        // PT_INTERP: a dynamic loader is required.
        if u32::from_le_bytes(header.try_into()?) == 3 {
            return fail("is dynamically linked (it has PT_INTERP)");
        }
    }
    Ok(())
}

/// Writes `path` through a temporary file and a rename: never half-written.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = path.with_extension("tmp-xtask");
    fs::write(&temporary, bytes).with_context(|| format!("cannot write {}", temporary.display()))?;
    fs::rename(&temporary, path).with_context(|| format!("cannot rename {} to {}", temporary.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_package_from_apt_cache_depends() {
        let output = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(kernel_package_in(output).as_deref(), Some("linux-image-6.1.0-56-cloud-amd64"));
        // A virtual or unrelated dependency is not the kernel.
        assert_eq!(kernel_package_in("x\n  Depends: <linux-image>\n  Depends: initramfs-tools\n"), None);
        assert_eq!(kernel_package_in(""), None);
    }

    #[test]
    fn dynamic_binaries_are_refused() {
        // This test binary is dynamically linked; Debian's busybox-static is not.
        let me = std::env::current_exe().expect("the test binary's path");
        let err = require_static(&me).expect_err("a test binary has PT_INTERP");
        assert!(err.to_string().contains("is dynamically linked"), "{err}");
        if Path::new(BUSYBOX).is_file() {
            require_static(Path::new(BUSYBOX)).expect("busybox-static is static");
        }
        let not_elf = std::env::temp_dir().join(format!("xtask-not-elf-{}", std::process::id()));
        fs::write(&not_elf, b"#!/bin/sh\n").expect("a temporary file");
        let err = require_static(&not_elf).expect_err("a script is not an ELF file");
        let _ = fs::remove_file(&not_elf);
        assert!(err.to_string().contains("is not a 64-bit ELF file"), "{err}");
    }
}
