//! The images a VM boots with: the service disk (reused while its inputs
//! are unchanged: the warm cache), the NoCloud seed, and the data disk.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_guest::{CONTAINER_CONFIG_FILE, ContainerConfig, DATA_DISK_LABEL};
use kiln_imagefmt::{Ext4Options, Ext4Tree, FatOptions, FatTree, NoCloudSeed};
use kiln_types::hash::Fnv1a64;

use super::plan::{VmFiles, mac_for};
use crate::state::LeaseInfo;
use crate::{DiskTree, Error, LaunchScript, Result, ServiceDisk, Spec};

/// Builds (or reuses) the service disk, writes the seed, and creates the
/// data disk (ext4, filled from `resources.storage_seed`) if it does not
/// exist or is blank; an existing data disk of another size than
/// `resources.storage` is refused ([`Error::DataDiskSizeChanged`]).
/// Returns whether the service disk was reused.
pub fn build_images(spec: &Spec, files: &VmFiles, lease: &LeaseInfo) -> Result<bool> {
    build_vm_images(spec, files, lease, None)
}

/// [`build_images`], for a VM of an OCI image when `container` is given:
/// its service disk then holds that config instead of `service` and `launch`.
pub(crate) fn build_vm_images(
    spec: &Spec,
    files: &VmFiles,
    lease: &LeaseInfo,
    container: Option<&ContainerConfig>,
) -> Result<bool> {
    if let (Some(data), Some(size)) = (&files.data, spec.resources.storage) {
        check_data_disk(data, size.0)?;
    }
    let reused = match container {
        None => build_service_disk(spec, &files.service, lease)?,
        Some(config) => build_container_disk(spec, &files.service, config)?,
    };
    let seed = seed(spec, lease);
    let tree = seed.tree()?;
    let options = FatOptions::default().with_label(NoCloudSeed::LABEL);
    tree.layout(&options)?.write_file(&files.seed, None)?;
    make_private(&files.seed)?;
    if let (Some(data), Some(size)) = (&files.data, spec.resources.storage)
        && needs_filesystem(data)?
    {
        create_data_disk(data, size.0, spec.resources.storage_seed.as_deref(), spec.name.as_str())?;
    }
    Ok(reused)
}

/// Whether the data disk at `path` is still to be made: it does not exist,
/// or an older kiln left it blank (all zeros, a sparse file) for kiln-init
/// to format, which kiln-init no longer does. An ext2/3/4 disk is left
/// alone; anything else is refused, never overwritten. The whole disk must
/// be zero, not only its start: btrfs, for one, writes nothing in its
/// first 64 KiB.
fn needs_filesystem(path: &Path) -> Result<bool> {
    let io = |source| Error::InputIo { path: path.to_path_buf(), source };
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(io(e)),
    };
    let mut magic = [0u8; 2];
    // The ext2/3/4 magic, 0xEF53, in the superblock at byte 1024.
    if std::os::unix::fs::FileExt::read_exact_at(&file, &mut magic, 0x438).is_ok() && magic == [0x53, 0xEF] {
        return Ok(false);
    }
    if all_zero(&file).map_err(io)? {
        return Ok(true);
    }
    Err(Error::DataDiskForeign { path: path.to_path_buf() })
}

/// Whether every byte of `file` is zero, reading only its data (a blank
/// disk an older kiln made is a hole from end to end).
fn all_zero(file: &fs::File) -> std::io::Result<bool> {
    use rustix::fs::SeekFrom;
    let len = file.metadata()?.len();
    let mut buffer = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let start = match rustix::fs::seek(file, SeekFrom::Data(at)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => return Ok(true),
            // No SEEK_DATA here: read everything.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOTSUP) => at,
            Err(errno) => return Err(errno.into()),
        };
        let end = rustix::fs::seek(file, SeekFrom::Hole(start)).unwrap_or(len).min(len);
        let mut offset = start;
        while offset < end {
            let want = ((end - offset) as usize).min(buffer.len());
            std::os::unix::fs::FileExt::read_exact_at(file, &mut buffer[..want], offset)?;
            if buffer[..want].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            offset += want as u64;
        }
        at = end.max(start + 1);
    }
    Ok(true)
}

/// Writes the data disk: journaled ext4 of exactly `size` bytes (inodes
/// and journal as mke2fs sizes them for a disk that size) labelled `KILNDATA`,
/// holding `seed`'s tree (owners, modes and times kept) when given,
/// atomically (temporary file, then rename over a blank disk), mode 0600:
/// it holds the service's data.
fn create_data_disk(path: &Path, size: u64, seed: Option<&Path>, vm: &str) -> Result<()> {
    let mut tree = Ext4Tree::new();
    if let Some(seed) = seed {
        if !seed.is_dir() {
            return Err(Error::StorageSeedNotADirectory { path: seed.to_path_buf() });
        }
        // The seed may be a symlink to its directory; nothing inside is followed.
        let seed = fs::canonicalize(seed).map_err(|source| Error::InputIo { path: seed.to_path_buf(), source })?;
        tree.add_host_path("", &seed).map_err(|source| Error::DataDisk { path: path.to_path_buf(), source })?;
    }
    let options = Ext4Options::default()
        .with_label(DATA_DISK_LABEL)
        .with_size(size)
        .with_journal(true)
        .with_uuid(data_disk_uuid(vm));
    // Mode 0600 from the first byte: the service's data goes here.
    tree.mark_secret();
    let data_disk = |source| Error::DataDisk { path: path.to_path_buf(), source };
    tree.layout(&options).map_err(data_disk)?.write_file(path).map_err(data_disk)?;
    make_private(path)
}

/// The data disk's UUID, from the VM's name: the writer's own derivation
/// sees only the tree's shape and the size, so every VM's empty disk of one
/// size would share a UUID, which clashes when two are attached or mounted
/// on one host.
fn data_disk_uuid(vm: &str) -> [u8; 16] {
    kiln_types::hash::Fnv1a64::new().field(b"kiln data disk").uuid(vm.as_bytes())
}

/// An existing data disk must have the size the spec asks for: growing it
/// needs `resize2fs` (busybox has none), and shrinking loses data.
fn check_data_disk(path: &Path, storage: u64) -> Result<()> {
    match fs::metadata(path) {
        Ok(meta) if meta.len() != storage => {
            Err(Error::DataDiskSizeChanged { path: path.to_path_buf(), disk: meta.len(), storage })
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::InputIo { path: path.to_path_buf(), source }),
    }
}

/// Images in the VM's directory are the owner's only, secret or not (the
/// image writer makes a non-secret image 0644).
fn make_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|source| Error::InputIo { path: path.to_path_buf(), source })
}

pub(super) fn service_disk(spec: &Spec, lease: &LeaseInfo) -> Result<ServiceDisk> {
    let binary = spec.service.binary.clone().ok_or(Error::NoBinary)?;
    if !binary.is_file() {
        return Err(Error::BinaryMissing { path: binary });
    }
    let launch = LaunchScript {
        args: spec.service.args.iter().map(|arg| arg.clone().into_bytes()).collect(),
        env: spec.guest_env(lease.host).into_iter().map(|(k, v)| (k, v.into_bytes())).collect(),
        ..LaunchScript::default()
    };
    Ok(ServiceDisk { binary, launch, trees: disk_trees(spec) })
}

/// The `files` trees of `spec`, as the service disk carries them.
fn disk_trees(spec: &Spec) -> Vec<DiskTree> {
    spec.service
        .files
        .iter()
        .map(|(name, tree)| DiskTree { name: name.clone(), source: tree.path.clone(), secret: tree.secret })
        .collect()
}

/// The service disk of a VM of an OCI image: `config` and the `files` trees.
pub(crate) fn container_disk(spec: &Spec, config: &ContainerConfig) -> Result<FatTree> {
    let text = config
        .to_text()
        .map_err(|source| Error::ContainerConfig { image: spec.service.image.clone().unwrap_or_default(), source })?;
    crate::service_disk::container_disk_tree(CONTAINER_CONFIG_FILE, text.as_bytes(), &disk_trees(spec))
}

/// [`build_service_disk`] for a VM of an OCI image, warm-cached the same way.
fn build_container_disk(spec: &Spec, path: &Path, config: &ContainerConfig) -> Result<bool> {
    let tree = container_disk(spec, config)?;
    let options = FatOptions::default().with_label(ServiceDisk::LABEL);
    let text = config.to_text().unwrap_or_default();
    let trees = disk_trees(spec);
    let key = format!("{:016x}", disk_key(text.as_bytes(), None, &trees, &options, env!("CARGO_PKG_VERSION"))?);
    let key_path = path.with_extension("key");
    if path.is_file() && fs::read_to_string(&key_path).is_ok_and(|old| old == key) {
        return Ok(true);
    }
    tree.layout(&options)?.write_file(path, None)?;
    make_private(path)?;
    crate::state::write_private_atomically(&key_path, key.as_bytes())?;
    Ok(false)
}

/// Writes the service disk unless the one there was built from the same
/// inputs (same kiln, same image options and epoch, same launch script, and
/// every input file with the same path, size, mtime, inode and mode): a
/// warm start then costs a few `stat`s.
fn build_service_disk(spec: &Spec, path: &Path, lease: &LeaseInfo) -> Result<bool> {
    let disk = service_disk(spec, lease)?;
    let options = FatOptions::default().with_label(ServiceDisk::LABEL);
    let key = format!("{:016x}", inputs_key(&disk, &options, env!("CARGO_PKG_VERSION"))?);
    let key_path = path.with_extension("key");
    if path.is_file() && fs::read_to_string(&key_path).is_ok_and(|old| old == key) {
        return Ok(true);
    }
    let tree: FatTree = disk.tree()?;
    tree.layout(&options)?.write_file(path, None)?;
    make_private(path)?;
    crate::state::write_private_atomically(&key_path, key.as_bytes())?;
    Ok(false)
}

/// The warm cache key: everything the service disk's bytes depend on, each
/// field length-delimited into kiln's stable hash (a toolchain upgrade
/// keeps the key, so the cache stays warm).
fn inputs_key(disk: &ServiceDisk, options: &FatOptions, kiln_version: &str) -> Result<u64> {
    disk_key(disk.launch.render()?.as_ref(), Some(&disk.binary), &disk.trees, options, kiln_version)
}

/// The key of a service disk holding `script` (the launch script, or a
/// container's config), `binary` if any, and `trees`.
fn disk_key(
    script: &[u8],
    binary: Option<&Path>,
    trees: &[DiskTree],
    options: &FatOptions,
    kiln_version: &str,
) -> Result<u64> {
    let mut hasher = Fnv1a64::new();
    // The writer's version, then every layout option (label, epoch from
    // SOURCE_DATE_EPOCH, volume id, type, size, cluster size) as it stands.
    hasher.field(kiln_version.as_bytes()).field(format!("{options:?}").as_bytes());
    hasher.field(script);
    let stat = |path: &Path, hasher: &mut Fnv1a64| -> Result<()> {
        let meta = fs::metadata(path).map_err(|source| Error::InputIo { path: path.to_path_buf(), source })?;
        hasher.field(path.as_os_str().as_bytes());
        for number in [meta.len(), meta.mtime() as u64, meta.mtime_nsec() as u64, meta.ino(), u64::from(meta.mode())] {
            hasher.feed(&number.to_le_bytes());
        }
        Ok(())
    };
    match binary {
        Some(binary) => stat(binary, &mut hasher)?,
        None => {
            hasher.field(b"container");
        }
    }
    for tree in trees {
        hasher.field(tree.name.as_bytes()).feed(&[u8::from(tree.secret)]);
        let mut stack = vec![tree.source.clone()];
        while let Some(dir) = stack.pop() {
            stat(&dir, &mut hasher)?;
            let mut entries: Vec<PathBuf> = fs::read_dir(&dir)
                .map_err(|source| Error::InputIo { path: dir.clone(), source })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            for entry in entries {
                if entry.is_dir() { stack.push(entry) } else { stat(&entry, &mut hasher)? }
            }
        }
    }
    Ok(hasher.finish())
}

/// The NoCloud seed: hostname, and eth0's address and default route.
pub(crate) fn seed(spec: &Spec, lease: &LeaseInfo) -> NoCloudSeed {
    let network_config = format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"{mac}\"\n    addresses: [\"{guest}/{prefix}\"]\n    routes:\n      - to: default\n        via: \"{host}\"\n",
        mac = mac_for(spec.name.as_str()),
        guest = lease.guest,
        prefix = lease.prefix_len,
        host = lease.host,
    );
    NoCloudSeed {
        user_data: b"#cloud-config\n".to_vec(),
        meta_data: NoCloudSeed::meta_data(spec.name.as_str(), spec.name.as_str()),
        network_config: Some(network_config.into_bytes()),
        vendor_data: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_cache_key_covers_kiln_version_epoch_label_and_every_fat_option() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("service");
        fs::write(&binary, b"#!/bin/sh\n").unwrap();
        let disk = ServiceDisk { binary, launch: LaunchScript::default(), trees: Vec::new() };
        let base = FatOptions::default().with_label(ServiceDisk::LABEL).with_epoch(0);
        let key = |options: &FatOptions, version: &str| inputs_key(&disk, options, version).unwrap();
        let reference = key(&base, "0.1.0");
        assert_eq!(reference, key(&base.clone(), "0.1.0"), "the key is stable");
        let changed: Vec<(&str, u64)> = vec![
            ("kiln version", key(&base, "0.1.1")),
            ("epoch (SOURCE_DATE_EPOCH)", key(&base.clone().with_epoch(1_700_000_000), "0.1.0")),
            ("label", key(&base.clone().with_label("OTHER"), "0.1.0")),
            ("volume id", key(&base.clone().with_volume_id(7), "0.1.0")),
            ("FAT type", key(&base.clone().with_fat_type(kiln_imagefmt::FatType::Fat32), "0.1.0")),
            ("size", key(&base.clone().with_size(64 << 20), "0.1.0")),
            ("cluster size", key(&base.clone().with_cluster_size(512), "0.1.0")),
        ];
        for (what, changed) in changed {
            assert_ne!(changed, reference, "changing the {what} kept the cached service disk");
        }
        // And the epoch the writer uses is SOURCE_DATE_EPOCH's: the key sees it.
        assert_eq!(
            FatOptions::default().epoch,
            std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        );
    }

    #[test]
    fn run_refuses_a_data_disk_whose_size_differs_from_storage() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("web.img");
        check_data_disk(&disk, 16 << 20).unwrap();
        create_data_disk(&disk, 16 << 20, None, "web").unwrap();
        check_data_disk(&disk, 16 << 20).unwrap();
        let err = check_data_disk(&disk, 32 << 20).unwrap_err().to_string();
        assert!(
            err.contains(&disk.display().to_string())
                && err.contains("16777216 bytes (16 MiB)")
                && err.contains("33554432 bytes (32 MiB)"),
            "{err}"
        );
        assert_eq!(fs::metadata(&disk).unwrap().len(), 16 << 20, "the disk is left as it was");
    }

    #[test]
    fn run_gives_each_vms_data_disk_its_own_uuid() {
        let dir = tempfile::tempdir().unwrap();
        let uuid_of = |vm: &str| {
            let disk = dir.path().join(format!("{vm}.img"));
            create_data_disk(&disk, 16 << 20, None, vm).unwrap();
            match kiln_imagefmt::inspect(&mut fs::File::open(&disk).unwrap()).unwrap() {
                kiln_imagefmt::ImageInfo::Ext4(info) => info.uuid,
                other => panic!("{vm}: not ext4: {other:?}"),
            }
        };
        let web = uuid_of("web");
        assert_ne!(web, uuid_of("db"), "two VMs' empty disks of one size");
        assert_eq!(web, data_disk_uuid("web"), "the disk carries the UUID derived from its VM");
    }

    fn storage_spec(dir: &Path, seed: &str) -> (Spec, VmFiles) {
        let binary = dir.join("service");
        fs::write(&binary, b"#!/bin/sh\n").unwrap();
        let text = format!("name = \"web\"\n[service]\nbinary = \"service\"\n[resources]\nstorage = \"16MiB\"\n{seed}");
        let spec = Spec::parse(&text, &dir.join("kiln.toml")).unwrap();
        let files = VmFiles {
            service: dir.join("service.img"),
            seed: dir.join("seed.img"),
            data: Some(dir.join("data.img")),
            console_log: dir.join("console.log"),
            run_dir: dir.join("run"),
            control_socket: dir.join("run/control.sock"),
            vsock_socket: dir.join("run/vsock.sock"),
        };
        (spec, files)
    }

    fn lease() -> LeaseInfo {
        LeaseInfo { host: [10, 0, 0, 1].into(), guest: [10, 0, 0, 2].into(), prefix_len: 30 }
    }

    #[test]
    fn run_writes_the_data_disk_as_kilndata_ext4_of_exactly_storage_bytes_filled_once_from_storage_seed() {
        use std::os::unix::fs::PermissionsExt;
        use std::process::Command;
        let test = kiln_testkit::current_test_name();
        let Some(tools) = kiln_testkit::require_tools(&test, &["e2fsck", "debugfs"]) else { return };
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("seed/conf")).unwrap();
        fs::write(dir.path().join("seed/conf/app.toml"), b"port = 80\n").unwrap();
        fs::set_permissions(dir.path().join("seed/conf"), fs::Permissions::from_mode(0o750)).unwrap();
        let (spec, files) = storage_spec(dir.path(), "storage_seed = \"seed\"\n");
        let data = files.data.clone().unwrap();
        build_images(&spec, &files, &lease()).unwrap();

        let meta = fs::metadata(&data).unwrap();
        assert_eq!(meta.len(), 16 << 20, "exactly resources.storage bytes");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "the data disk is the owner's only");
        let fsck = Command::new(&tools[0]).arg("-fn").arg(&data).output().unwrap();
        assert!(fsck.status.success(), "e2fsck: {}", String::from_utf8_lossy(&fsck.stdout));
        let mut image = fs::File::open(&data).unwrap();
        match kiln_imagefmt::inspect(&mut image).unwrap() {
            kiln_imagefmt::ImageInfo::Ext4(info) => {
                assert_eq!(info.label.as_deref(), Some(DATA_DISK_LABEL));
                assert_eq!(info.volume_bytes, 16 << 20);
                assert!(info.features.iter().any(|f| f == "has_journal"), "journaled: {:?}", info.features);
                // mke2fs -t ext4 gives a 16 MiB disk 4096 inodes: room for the service's files.
                assert_eq!(info.inodes, 4096);
            }
            other => panic!("the data disk is not ext4: {other:?}"),
        }
        let debugfs = |request: &str| {
            let out = Command::new(&tools[1]).args(["-R", request]).arg(&data).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(debugfs("cat /conf/app.toml"), "port = 80\n", "the seed's file is on the disk");
        assert!(debugfs("stat /conf").contains("Mode:  0750"), "the seed's modes are kept: {}", debugfs("stat /conf"));

        // Later runs leave the disk alone, whatever the seed now holds.
        let before = fs::read(&data).unwrap();
        fs::write(dir.path().join("seed/conf/app.toml"), b"port = 81\n").unwrap();
        build_images(&spec, &files, &lease()).unwrap();
        assert!(fs::read(&data).unwrap() == before, "an existing data disk was rewritten");
    }

    #[test]
    fn run_formats_a_blank_data_disk_from_an_older_kiln_and_refuses_a_foreign_one() {
        let dir = tempfile::tempdir().unwrap();
        let (spec, files) = storage_spec(dir.path(), "");
        let data = files.data.clone().unwrap();
        // What kiln made before: a sparse file of zeros for the guest to format.
        fs::File::create(&data).unwrap().set_len(16 << 20).unwrap();
        build_images(&spec, &files, &lease()).unwrap();
        let head = fs::read(&data).unwrap();
        assert_eq!(head.len(), 16 << 20);
        assert_eq!(&head[0x438..0x43A], &[0x53, 0xEF], "the blank disk now holds ext4");

        let mut foreign = vec![0u8; 16 << 20];
        foreign[..4].copy_from_slice(b"XFSB");
        fs::write(&data, &foreign).unwrap();
        let err = build_images(&spec, &files, &lease()).unwrap_err().to_string();
        assert!(err.contains(&data.display().to_string()) && err.contains("neither an ext2/3/4"), "{err}");
        assert!(fs::read(&data).unwrap() == foreign, "a foreign disk is never overwritten");

        // btrfs writes nothing in its first 64 KiB: zeros there are not a blank disk.
        let mut btrfs = vec![0u8; 16 << 20];
        btrfs[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
        fs::write(&data, &btrfs).unwrap();
        let err = build_images(&spec, &files, &lease()).unwrap_err().to_string();
        assert!(err.contains("neither an ext2/3/4"), "{err}");
        assert!(fs::read(&data).unwrap() == btrfs, "a disk with data past its first blocks is never overwritten");

        // Zeros written out (not a hole) are blank too.
        fs::write(&data, vec![0u8; 16 << 20]).unwrap();
        build_images(&spec, &files, &lease()).unwrap();
        assert_eq!(&fs::read(&data).unwrap()[0x438..0x43A], &[0x53, 0xEF]);
    }

    #[test]
    fn run_names_the_data_disk_when_the_seed_does_not_fit_storage() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("seed")).unwrap();
        fs::write(dir.path().join("seed/big"), vec![1u8; 12 << 20]).unwrap();
        let (spec, files) = storage_spec(dir.path(), "storage_seed = \"seed\"\n");
        let err = build_images(&spec, &files, &lease()).unwrap_err();
        let data = files.data.clone().unwrap();
        let text = format!("{err}");
        assert!(text.contains(&data.display().to_string()) && text.contains("resources.storage_seed"), "{text}");
        assert!(!data.exists(), "no data disk is left behind");
    }

    #[test]
    fn run_refuses_a_storage_seed_that_is_not_a_directory_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("seed.txt"), b"not a tree").unwrap();
        let (spec, files) = storage_spec(dir.path(), "storage_seed = \"seed.txt\"\n");
        let err = build_images(&spec, &files, &lease()).unwrap_err().to_string();
        assert!(err.contains("resources.storage_seed") && err.contains("seed.txt"), "{err}");
        assert!(!files.data.unwrap().exists(), "no data disk is left behind");
    }
}
