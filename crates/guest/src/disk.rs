//! What a disk holds, from its first 2 KiB: kiln-init finds its disks by
//! label, never by the order the VMM attached them in.

/// Bytes [`classify_disk`] needs: the boot sector and the ext superblock.
pub const CLASSIFY_BYTES: usize = 2048;

/// A disk's content as far as kiln-init cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskKind {
    /// A FAT volume with this label (trailing spaces removed; `None` when
    /// the boot sector has no extended signature or the label is `NO NAME`).
    Fat { label: Option<String> },
    /// An ext2/3/4 filesystem with this volume name.
    Ext { label: Option<String> },
    /// The first bytes are all zero: nothing was ever written.
    Blank,
    /// Something else (a partition table, another filesystem).
    Unknown,
}

/// Classifies a disk from its first bytes (at least [`CLASSIFY_BYTES`] for
/// ext; a FAT boot sector needs 512). Never panics on short input.
pub fn classify_disk(head: &[u8]) -> DiskKind {
    if head.len() >= CLASSIFY_BYTES && u16_at(head, 1024 + 0x38) == 0xef53 {
        return DiskKind::Ext { label: text(&head[1024 + 0x78..1024 + 0x88]) };
    }
    if let Some(label) = fat_label(head) {
        return DiskKind::Fat { label };
    }
    if !head.is_empty() && head.iter().all(|&b| b == 0) {
        return DiskKind::Blank;
    }
    DiskKind::Unknown
}

/// `Some(label)` for a FAT boot sector: the 0x55AA signature, a plausible
/// BPB (bytes per sector a power of two from 512 to 4096, a non-zero power
/// of two of sectors per cluster, at least one FAT), and the label from the
/// FAT12/16 or FAT32 extended boot record.
fn fat_label(sector: &[u8]) -> Option<Option<String>> {
    if sector.len() < 512 || sector[510..512] != [0x55, 0xaa] {
        return None;
    }
    let bytes_per_sector = u16_at(sector, 0x0b);
    let sectors_per_cluster = sector[0x0d];
    let fats = sector[0x10];
    if !(512..=4096).contains(&bytes_per_sector)
        || !bytes_per_sector.is_power_of_two()
        || !sectors_per_cluster.is_power_of_two()
        || fats == 0
    {
        return None;
    }
    // FAT32 has a zero 16-bit FAT size; its extended record sits further on.
    let (signature, label) = if u16_at(sector, 0x16) == 0 { (0x42, 0x47) } else { (0x26, 0x2b) };
    if sector[signature] != 0x29 {
        return Some(None);
    }
    Some(text(&sector[label..label + 11]).filter(|label| label != "NO NAME"))
}

/// A fixed-width text field: NUL/space padding removed, `None` if empty.
fn text(field: &[u8]) -> Option<String> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let value = String::from_utf8_lossy(&field[..end]).trim_end_matches(' ').to_owned();
    (!value.is_empty()).then_some(value)
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn fat_boot_sector(fat32: bool, label: &[u8; 11]) -> Vec<u8> {
        let mut sector = vec![0_u8; CLASSIFY_BYTES];
        sector[0x0b..0x0d].copy_from_slice(&512_u16.to_le_bytes());
        sector[0x0d] = 8;
        sector[0x10] = 2;
        if fat32 {
            sector[0x42] = 0x29;
            sector[0x47..0x52].copy_from_slice(label);
        } else {
            sector[0x16] = 4;
            sector[0x26] = 0x29;
            sector[0x2b..0x36].copy_from_slice(label);
        }
        sector[510] = 0x55;
        sector[511] = 0xaa;
        sector
    }

    fn check(head: &[u8], expect: Expect) {
        expect.assert_eq(&format!("{:?}", classify_disk(head)));
    }

    #[test]
    fn classifies_disks() {
        check(&fat_boot_sector(false, b"SERVICEDISK"), expect![[r#"Fat { label: Some("SERVICEDISK") }"#]]);
        check(&fat_boot_sector(true, b"CIDATA     "), expect![[r#"Fat { label: Some("CIDATA") }"#]]);
        check(&fat_boot_sector(true, b"NO NAME    "), expect!["Fat { label: None }"]);
        let mut no_ebr = fat_boot_sector(false, b"SERVICEDISK");
        no_ebr[0x26] = 0;
        check(&no_ebr, expect!["Fat { label: None }"]);
        let mut bad_bpb = fat_boot_sector(false, b"SERVICEDISK");
        bad_bpb[0x0b] = 0x11;
        check(&bad_bpb, expect!["Unknown"]);
        let mut ext = vec![0_u8; CLASSIFY_BYTES];
        ext[1024 + 0x38..1024 + 0x3a].copy_from_slice(&0xef53_u16.to_le_bytes());
        ext[1024 + 0x78..1024 + 0x80].copy_from_slice(b"KILNDATA");
        check(&ext, expect![[r#"Ext { label: Some("KILNDATA") }"#]]);
        check(&ext[..1500], expect!["Unknown"]);
        check(&[0; CLASSIFY_BYTES], expect!["Blank"]);
        check(&[], expect!["Unknown"]);
        check(b"\x01", expect!["Unknown"]);
    }
}
