//! Content digests (`sha256:<64 lowercase hex>`, the only algorithm kiln
//! accepts) and readers/writers that hash what streams through them.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// A sha256 content digest, as OCI writes it: `sha256:<64 lowercase hex>`.
/// Other algorithms (`sha512:`, ...) are refused when parsed: kiln's cache
/// is keyed by sha256 alone.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// The 64 lowercase hex digits, without `sha256:`: the file name of a
    /// blob in an OCI layout and in the store.
    pub fn hex(&self) -> String {
        let mut hex = String::with_capacity(64);
        for byte in self.0 {
            hex.push(char::from(HEX[usize::from(byte >> 4)]));
            hex.push(char::from(HEX[usize::from(byte & 15)]));
        }
        hex
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 lowercase hex digits (a file name in `blobs/sha256/`).
    pub fn from_hex(hex: &str) -> Result<Digest> {
        let invalid =
            |reason: &str| Error::InvalidDigest { digest: format!("sha256:{hex}"), reason: reason.to_owned() };
        if hex.len() != 64 {
            return Err(invalid("a sha256 digest has 64 hex digits"));
        }
        let mut bytes = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
            let high = hex_value(pair[0]).ok_or_else(|| invalid("only lowercase hex digits may follow sha256:"))?;
            let low = hex_value(pair[1]).ok_or_else(|| invalid("only lowercase hex digits may follow sha256:"))?;
            bytes[i] = high << 4 | low;
        }
        Ok(Digest(bytes))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

impl FromStr for Digest {
    type Err = Error;

    fn from_str(text: &str) -> Result<Digest> {
        let Some((algorithm, hex)) = text.split_once(':') else {
            return Err(Error::InvalidDigest {
                digest: text.to_owned(),
                reason: "a digest is ALGORITHM:HEX, e.g. sha256:<64 hex digits>".to_owned(),
            });
        };
        if algorithm != "sha256" {
            return Err(Error::InvalidDigest {
                digest: text.to_owned(),
                reason: format!("algorithm {algorithm:?} is not supported; kiln accepts sha256 only"),
            });
        }
        Digest::from_hex(hex).map_err(|_| Error::InvalidDigest {
            digest: text.to_owned(),
            reason: "sha256: must be followed by 64 lowercase hex digits".to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Digest, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The OCI ChainID of each prefix of `diff_ids` (image-spec config.md):
/// `ChainID(L0) = DiffID(L0)`, `ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))`.
/// The n-th entry names the filesystem made of layers 0..=n, so two images
/// that share their base layers share those chain ids.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut chain = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => *diff_id,
            Some(parent) => Digest::of(format!("{parent} {diff_id}").as_bytes()),
        };
        chain.push(next);
    }
    chain
}

/// Hashes and counts the bytes read through it, and checks them against a
/// descriptor's digest and size: reading past the size fails at once (so a
/// lying source cannot make kiln read forever), and [`VerifyingReader::finish`]
/// checks the count and the digest once the stream is done.
pub(crate) struct VerifyingReader<R> {
    inner: R,
    blob: String,
    expected: Digest,
    size: Option<u64>,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> VerifyingReader<R> {
    /// `blob` names the blob in errors ("layer sha256:... of oci:DIR:TAG").
    pub(crate) fn new(inner: R, blob: String, expected: Digest, size: Option<u64>) -> Self {
        VerifyingReader { inner, blob, expected, size, hasher: Sha256::new(), count: 0 }
    }

    /// Whether more bytes came than the descriptor's size allows.
    fn oversized(&self) -> bool {
        self.size.is_some_and(|size| self.count > size)
    }

    /// The size error, if the blob is already known to be too long.
    pub(crate) fn size_error(&self) -> Option<Error> {
        self.oversized().then(|| self.size_mismatch(format!("more than {}", self.size.unwrap_or(0))))
    }

    fn size_mismatch(&self, actual: String) -> Error {
        Error::SizeMismatch { blob: self.blob.clone(), expected: self.size.unwrap_or(0), actual }
    }

    /// Reads whatever is left (a decompressor may stop before the end of
    /// its input), then checks size and digest.
    pub(crate) fn finish(mut self) -> Result<()> {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match self.read(&mut buffer) {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) => {
                    return Err(self
                        .size_error()
                        .unwrap_or_else(|| Error::ReadBlob { blob: self.blob.clone(), source: error }));
                }
            }
        }
        if let Some(size) = self.size {
            if self.count != size {
                return Err(self.size_mismatch(self.count.to_string()));
            }
        }
        let actual = Digest(self.hasher.finalize().into());
        if actual != self.expected {
            return Err(Error::DigestMismatch { blob: self.blob, expected: self.expected, actual });
        }
        Ok(())
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.oversized() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "blob longer than its descriptor's size"));
        }
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self.oversized() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "blob longer than its descriptor's size"));
        }
        Ok(n)
    }
}

/// Hashes and counts what is written through it (a layer's decompressed
/// tar on its way into the store, checked against its diff_id).
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), count: 0 }
    }

    /// The inner writer, the digest and the number of bytes written.
    pub(crate) fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest(self.hasher.finalize().into()), self.count)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads all of a small blob (a manifest, an index, a config), refusing
/// one longer than `limit` and checking it against `expected` if given.
pub(crate) fn read_verified(
    reader: impl Read,
    blob: &str,
    expected: Option<(Digest, Option<u64>)>,
    limit: u64,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| Error::ReadBlob { blob: blob.to_owned(), source })?;
    if bytes.len() as u64 > limit {
        return Err(Error::TooLarge { what: blob.to_owned(), limit });
    }
    if let Some((digest, size)) = expected {
        let verifier = VerifyingReader::new(&bytes[..], blob.to_owned(), digest, size);
        verifier.finish()?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_of_empty_input_is_the_well_known_sha256_and_round_trips() {
        let digest = Digest::of(b"");
        assert_eq!(digest.to_string(), EMPTY);
        assert_eq!(EMPTY.parse::<Digest>().unwrap(), digest);
    }

    #[test]
    fn digest_refuses_other_algorithms_uppercase_and_short_hex() {
        for (text, says) in [
            ("sha512:abcd", "\"sha512\" is not supported"),
            (&EMPTY.to_uppercase().replace("SHA256", "sha256"), "lowercase"),
            ("sha256:abc", "64 lowercase hex"),
            ("e3b0c442", "ALGORITHM:HEX"),
        ] {
            let error = text.parse::<Digest>().unwrap_err().to_string();
            assert!(error.contains(says) && error.contains(text), "{text}: {error}");
        }
    }

    #[test]
    fn chain_id_of_two_layers_follows_the_image_spec() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let chain = chain_ids(&[a, b]);
        assert_eq!(chain[0], a);
        assert_eq!(chain[1], Digest::of(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn verifying_reader_names_the_blob_on_a_wrong_digest_or_size() {
        let data = b"hello";
        let ok = VerifyingReader::new(&data[..], "blob x".into(), Digest::of(data), Some(5));
        ok.finish().unwrap();
        let wrong = VerifyingReader::new(&data[..], "blob x".into(), Digest::of(b"other"), Some(5));
        let error = wrong.finish().unwrap_err().to_string();
        assert!(error.contains("blob x") && error.contains("digest"), "{error}");
        let short = VerifyingReader::new(&data[..], "blob y".into(), Digest::of(data), Some(4));
        let error = short.finish().unwrap_err().to_string();
        assert!(error.contains("blob y") && error.contains("4"), "{error}");
        let long = VerifyingReader::new(&data[..], "blob z".into(), Digest::of(data), Some(6));
        let error = long.finish().unwrap_err().to_string();
        assert!(error.contains("blob z") && error.contains("6"), "{error}");
    }

    proptest::proptest! {
        #[test]
        fn digest_display_and_parse_round_trip(bytes: [u8; 32]) {
            let digest = Digest(bytes);
            proptest::prop_assert_eq!(digest.to_string().parse::<Digest>().unwrap(), digest);
            proptest::prop_assert_eq!(Digest::from_hex(&digest.hex()).unwrap(), digest);
        }
    }
}
