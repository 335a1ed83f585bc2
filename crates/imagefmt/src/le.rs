//! Little-endian fields of the on-disk structures (FAT and ext4 both store
//! theirs so), written into a block buffer at a byte offset.

pub(crate) fn put16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn put32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_le_bytes());
}
