//! The images a VM boots with: the service disk (reused while its inputs
//! are unchanged: the warm cache), the NoCloud seed, and the data disk.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kiln_imagefmt::{FatOptions, FatTree, NoCloudSeed};
use kiln_types::hash::Fnv1a64;

use super::plan::{VmFiles, mac_for};
use crate::state::LeaseInfo;
use crate::{DiskTree, Error, LaunchScript, Result, ServiceDisk, Spec};

/// Builds (or reuses) the service disk, writes the seed, and creates the
/// data disk if it does not exist; an existing data disk of another size
/// than `resources.storage` is refused ([`Error::DataDiskSizeChanged`]).
/// Returns whether the service disk was reused.
pub fn build_images(spec: &Spec, files: &VmFiles, lease: &LeaseInfo) -> Result<bool> {
    if let (Some(data), Some(size)) = (&files.data, spec.resources.storage) {
        check_data_disk(data, size.0)?;
    }
    let reused = build_service_disk(spec, &files.service, lease)?;
    let seed = seed(spec, lease);
    let tree = seed.tree()?;
    let options = FatOptions::default().with_label(NoCloudSeed::LABEL);
    tree.layout(&options)?.write_file(&files.seed, None)?;
    make_private(&files.seed)?;
    if let (Some(data), Some(size)) = (&files.data, spec.resources.storage)
        && !data.exists()
    {
        create_blank_disk(data, size.0)?;
    }
    Ok(reused)
}

/// An existing data disk must have the size the spec asks for: growing it
/// needs `resize2fs` in the guest (busybox has none), and shrinking loses data.
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
    let trees = spec
        .service
        .files
        .iter()
        .map(|(name, tree)| DiskTree { name: name.clone(), source: tree.path.clone(), secret: tree.secret })
        .collect();
    Ok(ServiceDisk { binary, launch, trees })
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
    let mut hasher = Fnv1a64::new();
    // The writer's version, then every layout option (label, epoch from
    // SOURCE_DATE_EPOCH, volume id, type, size, cluster size) as it stands.
    hasher.field(kiln_version.as_bytes()).field(format!("{options:?}").as_bytes());
    hasher.field(disk.launch.render()?.as_ref());
    let stat = |path: &Path, hasher: &mut Fnv1a64| -> Result<()> {
        let meta = fs::metadata(path).map_err(|source| Error::InputIo { path: path.to_path_buf(), source })?;
        hasher.field(path.as_os_str().as_bytes());
        for number in [meta.len(), meta.mtime() as u64, meta.mtime_nsec() as u64, meta.ino(), u64::from(meta.mode())] {
            hasher.feed(&number.to_le_bytes());
        }
        Ok(())
    };
    stat(&disk.binary, &mut hasher)?;
    for tree in &disk.trees {
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

fn create_blank_disk(path: &Path, size: u64) -> Result<()> {
    let temp = path.with_extension("img.tmp");
    let io = |source| Error::InputIo { path: path.to_path_buf(), source };
    let file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp).map_err(io)?;
    file.set_len(size).map_err(io)?;
    drop(file);
    fs::rename(&temp, path).map_err(io)
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
        create_blank_disk(&disk, 16 << 20).unwrap();
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
}
