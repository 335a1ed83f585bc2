//! The boot sector, FATs and FSInfo checked field by field against the
//! Microsoft FAT specification and what Linux's `fat_fill_super` insists on
//! at mount time, some of which neither `fsck.fat` nor the readers check
//! (a root entry count that is not a whole number of sectors, say).

use kiln_imagefmt::{FatSummary, FatType};

fn u16_at(image: &[u8], at: usize) -> u32 {
    u32::from(u16::from_le_bytes([image[at], image[at + 1]]))
}

fn u32_at(image: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([image[at], image[at + 1], image[at + 2], image[at + 3]])
}

/// Asserts that `image` is a well-formed FAT volume matching `summary`.
pub(crate) fn check_boot_sector(image: &[u8], summary: &FatSummary, label: Option<&str>) {
    let sector = |n: u32| &image[n as usize * 512..(n as usize + 1) * 512];
    let boot = sector(0);
    assert!(boot[0] == 0xEB && boot[2] == 0x90 || boot[0] == 0xE9, "jump instruction {:02x?}", &boot[..3]);
    assert_eq!(&boot[510..], [0x55, 0xAA], "boot signature");
    let bytes_per_sector = u16_at(boot, 11);
    assert_eq!(bytes_per_sector, 512, "bytes per sector");
    let sectors_per_cluster = u32::from(boot[13]);
    assert!(
        sectors_per_cluster.is_power_of_two() && sectors_per_cluster <= 128,
        "sectors per cluster {sectors_per_cluster}"
    );
    assert_eq!(sectors_per_cluster * 512, summary.cluster_size, "cluster size");
    let reserved = u16_at(boot, 14);
    assert!(reserved >= 1, "reserved sectors");
    let fats = u32::from(boot[16]);
    assert_eq!(fats, 2, "number of FATs");
    let root_entries = u16_at(boot, 17);
    let total16 = u16_at(boot, 19);
    let media = boot[21];
    assert!(media == 0xF0 || media >= 0xF8, "media byte {media:#x}");
    let fat16_size = u16_at(boot, 22);
    let total32 = u32_at(boot, 32);
    let fat32 = summary.fat_type == FatType::Fat32;

    let total = if total16 != 0 { total16 } else { total32 };
    assert!(total16 == 0 || total32 == 0, "both total-sector fields set: {total16} and {total32}");
    assert!(total16 != 0 || total32 >= 0x10000 || fat32, "TotSec32 used for {total32} sectors, which fits TotSec16");
    assert_eq!(u64::from(total) * 512, summary.image_bytes, "total sectors against the image size");
    let fat_size = if fat32 {
        assert_eq!((root_entries, total16, fat16_size), (0, 0, 0), "FAT32 must zero RootEntCnt, TotSec16, FATSz16");
        u32_at(boot, 36)
    } else {
        assert!(root_entries > 0 && root_entries % 16 == 0, "root entries {root_entries} must fill whole sectors");
        fat16_size
    };
    assert!(fat_size > 0, "FAT size");
    let root_sectors = root_entries * 32 / 512;
    let data_start = reserved + fats * fat_size + root_sectors;
    let clusters = (total - data_start) / sectors_per_cluster;
    assert_eq!(clusters, summary.clusters, "cluster count the spec's formula gives");
    let bits = summary.fat_type.bits();
    assert!(fat_size * 512 * 8 / bits >= clusters + 2, "FAT of {fat_size} sectors too small for {clusters} clusters");

    // Extended boot record: signature, id, label, type string.
    let ebr = if fat32 { 64 } else { 36 };
    assert_eq!(boot[ebr + 2], 0x29, "extended boot signature");
    assert_eq!(u32_at(boot, ebr + 3), summary.volume_id, "volume id");
    let want_label = format!("{:<11}", label.map_or("NO NAME".to_owned(), str::to_uppercase));
    assert_eq!(String::from_utf8_lossy(&boot[ebr + 7..ebr + 18]), want_label, "boot sector label");
    assert_eq!(&boot[ebr + 18..ebr + 26], format!("FAT{bits:<5}").as_bytes(), "file system type string");

    // The FATs: identical copies, media byte in entry 0, clusters past the
    // last one never used.
    let fat_bytes = fat_size as usize * 512;
    let first_fat = reserved as usize * 512;
    let fat = &image[first_fat..first_fat + fat_bytes];
    for copy in 1..fats as usize {
        assert!(
            fat == &image[first_fat + copy * fat_bytes..first_fat + (copy + 1) * fat_bytes],
            "FAT copy {copy} differs"
        );
    }
    assert_eq!(fat[0], media, "FAT entry 0 carries the media byte");
    let entry = |n: u32| -> u32 {
        match bits {
            12 => {
                let at = (n + n / 2) as usize;
                let pair = u32::from(u16::from_le_bytes([fat[at], fat[at + 1]]));
                if n % 2 == 0 { pair & 0xFFF } else { pair >> 4 }
            }
            16 => u16_at(fat, n as usize * 2),
            _ => u32_at(fat, n as usize * 4) & 0x0FFF_FFFF,
        }
    };
    let free = (2..clusters + 2).filter(|&n| entry(n) == 0).count() as u32;
    assert_eq!(free, summary.free_clusters, "free clusters counted in the FAT");
    let max_entries = fat_bytes as u32 * 8 / bits;
    assert!((clusters + 2..max_entries).all(|n| entry(n) == 0), "FAT entries past the last cluster are used");

    if fat32 {
        assert_eq!(u16_at(boot, 42), 0, "FAT32 version 0.0");
        let root_cluster = u32_at(boot, 44);
        assert!((2..clusters + 2).contains(&root_cluster) && entry(root_cluster) != 0, "root cluster {root_cluster}");
        let fsinfo_sector = u16_at(boot, 48);
        let backup = u16_at(boot, 50);
        assert_eq!((fsinfo_sector, backup), (1, 6), "FSInfo and backup boot sector numbers");
        assert!(sector(backup) == boot, "backup boot sector differs from sector 0");
        let fsinfo = sector(fsinfo_sector);
        assert_eq!(
            (u32_at(fsinfo, 0), u32_at(fsinfo, 484), u32_at(fsinfo, 508)),
            (0x4161_5252, 0x6141_7272, 0xAA55_0000),
            "FSInfo signatures"
        );
        assert_eq!(u32_at(fsinfo, 488), summary.free_clusters, "FSInfo free count");
        let next_free = u32_at(fsinfo, 492);
        assert!(next_free == 0xFFFF_FFFF || (2..clusters + 2).contains(&next_free), "FSInfo next free {next_free}");
        assert!(sector(backup + 1) == fsinfo, "backup FSInfo differs");
    }
}
