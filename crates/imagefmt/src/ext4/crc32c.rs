//! CRC-32C (Castagnoli), the checksum of ext4's `metadata_csum`.
//!
//! ext4 chains the raw register: a checksum starts from a seed (`!0`, or
//! the filesystem's seed), each call continues from the last, and nothing is
//! inverted at the end. [`update`] is that register; the standard CRC-32C
//! is `!update(!0, bytes)`.

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82F6_3B78;

const TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// Continues the CRC register `crc` over `bytes`.
pub(crate) fn update(crc: u32, bytes: &[u8]) -> u32 {
    bytes.iter().fold(crc, |crc, &b| TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_check_value() {
        assert_eq!(!update(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn chaining_equals_one_pass() {
        assert_eq!(update(update(!0, b"12345"), b"6789"), update(!0, b"123456789"));
    }
}
