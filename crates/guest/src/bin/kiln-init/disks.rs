//! The disks: found by what they hold, never by order; the service disk
//! and seed mounted read-only; the data disk chosen and mounted (the host
//! makes its filesystem; kiln-init never formats anything).

use std::fs::{self, File};
use std::io::{self, Read};
use std::time::{Duration, Instant};

use kiln_guest::{DATA_DISK_LABEL, DATA_DISK_SERIAL, DiskKind, LAYER_SERIAL_PREFIX, classify_disk};

use crate::{Context, Failure, Result, say, sys};

/// How long to wait for virtio block devices to get their disks: virtio
/// probing is synchronous, so this only matters on a slow host.
const DISK_WAIT: Duration = Duration::from_secs(5);

/// A virtio disk and what it holds.
#[derive(Debug)]
pub(crate) struct Disk {
    pub(crate) name: String,
    pub(crate) device: String,
    pub(crate) serial: String,
    pub(crate) kind: DiskKind,
}

impl Disk {
    pub(crate) fn is_fat(&self, label: &str) -> bool {
        matches!(&self.kind, DiskKind::Fat { label: Some(found) } if found == label)
    }
}

pub(crate) fn describe(disks: &[Disk]) -> String {
    if disks.is_empty() {
        return "none".to_owned();
    }
    disks.iter().map(|d| format!("{} {:?}", d.name, d.kind)).collect::<Vec<_>>().join(", ")
}

/// Every `/sys/block/vd*` disk, classified by its first sectors, once every
/// virtio block device has its disk (at most [`DISK_WAIT`]).
pub(crate) fn find_disks() -> Result<Vec<Disk>> {
    let started = Instant::now();
    while pending_virtio_disks() > 0 && started.elapsed() < DISK_WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    scan_disks()
}

/// Virtio block devices (virtio device id 2) whose disk has not appeared
/// yet. The driver usually probes while its module loads, so this is 0 and
/// a missing service disk is reported at once, not after a timeout.
fn pending_virtio_disks() -> usize {
    let Ok(devices) = fs::read_dir("/sys/bus/virtio/devices") else { return 0 };
    devices
        .flatten()
        .filter(|device| {
            let id = fs::read_to_string(device.path().join("device")).unwrap_or_default();
            id.trim() == "0x0002" && !device.path().join("block").is_dir()
        })
        .count()
}

fn scan_disks() -> Result<Vec<Disk>> {
    let mut names: Vec<String> = fs::read_dir("/sys/block")
        .context(|| "cannot list /sys/block".to_owned())?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("vd"))
        .collect();
    names.sort();
    let mut disks = Vec::new();
    for name in names {
        let device = format!("/dev/{name}");
        let mut head = vec![0; 2048];
        let read = File::open(&device).and_then(|mut file| read_up_to(&mut file, &mut head));
        let kind = match read {
            Ok(len) => classify_disk(&head[..len]),
            Err(err) => return Err(Failure(format!("cannot read {device}: {err}"))),
        };
        let serial = fs::read_to_string(format!("/sys/block/{name}/serial")).unwrap_or_default().trim().to_owned();
        disks.push(Disk { name, device, serial, kind });
    }
    Ok(disks)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Mounts a FAT disk read-only: UTF-8 long names, and vfat's default masks
/// (every file executable), which the service disk relies on.
pub(crate) fn mount_fat(device: &str, target: &str) -> Result<()> {
    fs::create_dir_all(target).context(|| format!("cannot create {target}"))?;
    sys::mount(device, target, "vfat", libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID, "utf8")
        .context(|| format!("cannot mount {device} (vfat, read-only) on {target}"))
}

/// Layer disk `index` of a container: the disk with virtio serial
/// `kiln-layer<index>` (0 is the bottom layer).
pub(crate) fn layer_disk(disks: &[Disk], index: u32) -> Result<&Disk> {
    let serial = format!("{LAYER_SERIAL_PREFIX}{index}");
    disks.iter().find(|d| d.serial == serial).ok_or_else(|| {
        Failure(format!("layer disk {index} not found: no disk has the serial {serial} (disks: {})", describe(disks)))
    })
}

/// The ext4 mount options of the data disk: a filesystem error makes it
/// read-only rather than letting the service write on into a damaged
/// filesystem (the superblock's own choice, "continue", is mke2fs's
/// default and older kiln's ext2 disks carry it).
const DATA_MOUNT_OPTIONS: &str = "errors=remount-ro";

/// The data disk is an ext filesystem labelled `KILNDATA`, or else the
/// disk with virtio serial `kiln-data` if it holds an ext filesystem. kiln
/// makes that filesystem on the host (ext2 from older kilns, ext4 now; the
/// kernel's ext4 driver mounts both), so a blank or foreign disk there is
/// an error naming the device, never formatted.
fn choose_data_disk(disks: &[Disk]) -> Result<Option<&Disk>> {
    let labelled = disks.iter().find(|d| matches!(&d.kind, DiskKind::Ext { label: Some(l) } if l == DATA_DISK_LABEL));
    if let Some(disk) = labelled {
        return Ok(Some(disk));
    }
    let Some(disk) = disks.iter().find(|d| d.serial == DATA_DISK_SERIAL) else {
        return Ok(None);
    };
    match &disk.kind {
        DiskKind::Ext { .. } => Ok(Some(disk)),
        other => Err(Failure(format!(
            "data disk {} (serial {DATA_DISK_SERIAL}) holds {other:?}, not an ext filesystem; kiln makes the data disk on the host, and kiln-init formats nothing",
            disk.device
        ))),
    }
}

/// Mounts the data disk at `/mnt/data` (see [`choose_data_disk`]) with
/// [`DATA_MOUNT_OPTIONS`].
pub(crate) fn mount_data_disk(disks: &[Disk]) -> Result<()> {
    let Some(disk) = choose_data_disk(disks)? else { return Ok(()) };
    fs::create_dir_all("/mnt/data").context(|| "cannot create /mnt/data".to_owned())?;
    sys::mount(&disk.device, "/mnt/data", "ext4", libc::MS_NODEV | libc::MS_NOSUID, DATA_MOUNT_OPTIONS)
        .context(|| format!("cannot mount the data disk {} (ext4, {DATA_MOUNT_OPTIONS}) on /mnt/data", disk.device))?;
    say(&format!("data disk {} mounted on /mnt/data", disk.device));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, serial: &str, kind: DiskKind) -> Disk {
        Disk { name: name.to_owned(), device: format!("/dev/{name}"), serial: serial.to_owned(), kind }
    }

    fn choice(disks: &[Disk]) -> String {
        match choose_data_disk(disks) {
            Ok(None) => "none".to_owned(),
            Ok(Some(disk)) => format!("mount {}", disk.name),
            Err(err) => format!("error: {err}"),
        }
    }

    #[test]
    fn data_disk_choice_mounts_ext_and_never_formats() {
        let ext = |label: &str| DiskKind::Ext { label: Some(label.to_owned()) };
        let fat = |label: &str| DiskKind::Fat { label: Some(label.to_owned()) };
        let service = disk("vda", "", fat("SERVICEDISK"));
        assert_eq!(choice(&[]), "none");
        assert_eq!(
            choice(&[disk("vda", "", DiskKind::Blank)]),
            "none",
            "a blank disk without the serial is left alone"
        );
        assert_eq!(
            choice(&[disk("vdb", "kiln-data", DiskKind::Blank)]),
            "error: data disk /dev/vdb (serial kiln-data) holds Blank, not an ext filesystem; kiln makes the data disk on the host, and kiln-init formats nothing"
        );
        assert_eq!(choice(&[disk("vdb", "kiln-data", ext("KILNDATA"))]), "mount vdb");
        assert_eq!(choice(&[disk("vdb", "kiln-data", ext("other"))]), "mount vdb");
        assert_eq!(choice(&[disk("vdc", "", ext("KILNDATA")), disk("vdb", "kiln-data", DiskKind::Blank)]), "mount vdc");
        assert_eq!(
            choice(&[disk("vdb", "kiln-data", fat("SERVICEDISK"))]),
            "error: data disk /dev/vdb (serial kiln-data) holds Fat { label: Some(\"SERVICEDISK\") }, not an ext filesystem; kiln makes the data disk on the host, and kiln-init formats nothing"
        );
        assert_eq!(
            choice(&[service, disk("vdb", "kiln-data", DiskKind::Unknown)]),
            "error: data disk /dev/vdb (serial kiln-data) holds Unknown, not an ext filesystem; kiln makes the data disk on the host, and kiln-init formats nothing"
        );
    }
}
