//! FNV-1a, the one stable hash of kiln.
//!
//! Used wherever a hash ends up outside the process (a tap name, a MAC
//! address, a Kubernetes object name, a FAT volume id, a cache key, a
//! fingerprint stored in nftables), so it must not change between Rust
//! releases or platforms, as `std`'s `DefaultHasher` may. It is not
//! collision-resistant against an adversary; nothing kiln uses it for needs
//! that.
//!
//! [`Fnv1a64`] is fed bytes explicitly rather than through `std::hash::Hash`,
//! whose impls (for `str`, `usize`, tuples) are not promised to stay the same.

const OFFSET_64: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME_64: u64 = 0x0000_0100_0000_01b3;
const OFFSET_32: u32 = 0x811c_9dc5;
const PRIME_32: u32 = 0x0100_0193;

/// FNV-1a 64 of `bytes`.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    Fnv1a64::new().feed(bytes).finish()
}

/// FNV-1a 32 of `bytes` (kiln-net's tap names use it; keep it for them).
pub fn fnv1a_32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(OFFSET_32, |hash, &b| (hash ^ u32::from(b)).wrapping_mul(PRIME_32))
}

/// A streaming FNV-1a 64: feed it bytes, in order, then [`finish`](Self::finish).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64(OFFSET_64)
    }
}

impl Fnv1a64 {
    /// A hasher in its initial state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hashes `bytes` into the state.
    pub fn feed(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(PRIME_64);
        }
        self
    }

    /// Hashes `field`'s bytes, then its length, so that consecutive fields
    /// cannot run into each other (`"ab","c"` differs from `"a","bc"`).
    pub fn field(&mut self, field: &[u8]) -> &mut Self {
        self.feed(field).feed(&(field.len() as u64).to_le_bytes())
    }

    /// The hash of everything fed so far.
    pub fn finish(&self) -> u64 {
        self.0
    }

    /// Sixteen bytes derived from the state and a purpose (two hashes:
    /// with `purpose` as a field, then with `"second half"` fed on), with
    /// the version and variant bits of an RFC 4122 version 4 UUID set, so
    /// that tools show them as one. The state itself is left as it was.
    pub fn uuid(&self, purpose: &[u8]) -> [u8; 16] {
        let mut first = *self;
        first.field(purpose);
        let mut second = first;
        second.feed(b"second half");
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&first.finish().to_le_bytes());
        out[8..].copy_from_slice(&second.finish().to_le_bytes());
        out[6] = out[6] & 0x0F | 0x40;
        out[8] = out[8] & 0x3F | 0x80;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_carry_the_version_4_bits_and_differ_by_purpose() {
        let mut state = Fnv1a64::new();
        state.field(b"tree");
        let (uuid, seed) = (state.uuid(b"uuid"), state.uuid(b"hash seed"));
        assert_eq!((uuid[6] >> 4, uuid[8] >> 6), (4, 0b10));
        assert_ne!(uuid, seed);
        assert_eq!(state.uuid(b"uuid"), uuid, "the state is left as it was");
    }

    // The published FNV test vectors (draft-eastlake-fnv, section 6).
    #[test]
    fn matches_the_published_vectors() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn streaming_equals_one_shot_and_fields_do_not_run_together() {
        assert_eq!(Fnv1a64::new().feed(b"foo").feed(b"bar").finish(), fnv1a_64(b"foobar"));
        let ab_c = Fnv1a64::new().field(b"ab").field(b"c").finish();
        let a_bc = Fnv1a64::new().field(b"a").field(b"bc").finish();
        assert_ne!(ab_c, a_bc);
    }
}
