//! bzImage → vmlinux: the uncompressed ELF kernel cloud-hypervisor boots
//! through PVH, taken out of the bzImage QEMU boots.
//!
//! The x86 boot protocol (Documentation/arch/x86/boot.rst) puts a setup
//! header in the first sectors: `setup_sects` at 0x1f1 says how many 512-byte
//! setup sectors follow the boot sector, so the protected-mode part starts at
//! `(setup_sects + 1) * 512`; from protocol 2.08 on, `payload_offset` (0x248)
//! and `payload_length` (0x24c) locate the compressed vmlinux inside it. The
//! kernel build appends the uncompressed size as 4 little-endian bytes to the
//! payload, which this reader checks. Scanning for a compression magic
//! instead would be wrong: a zstd magic occurs by chance inside Debian's image.

use std::io::{self, Write};

use crate::{Error, Result};

const SETUP_SECTS: usize = 0x1f1;
const BOOT_FLAG: usize = 0x1fe;
const HEADER_MAGIC: usize = 0x202;
const VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
/// The lz4 "legacy" frame the kernel's `lz4 -l` writes.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Each legacy lz4 block decompresses to at most 8 MiB.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// How a bzImage's payload is compressed (the kernel's `CONFIG_KERNEL_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelCompression {
    Gzip,
    Xz,
    Lz4,
    Zstd,
    Bzip2,
    Lzma,
    Lzo,
}

impl KernelCompression {
    /// Recognises the compression from the payload's first bytes.
    fn detect(payload: &[u8]) -> Option<KernelCompression> {
        let magics: [(&[u8], KernelCompression); 7] = [
            (&[0x1f, 0x8b], KernelCompression::Gzip),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], KernelCompression::Xz),
            (&LZ4_LEGACY_MAGIC, KernelCompression::Lz4),
            (&[0x28, 0xb5, 0x2f, 0xfd], KernelCompression::Zstd),
            (b"BZh", KernelCompression::Bzip2),
            (&[0x5d, 0x00, 0x00], KernelCompression::Lzma),
            (&[0x89, b'L', b'Z', b'O'], KernelCompression::Lzo),
        ];
        magics.into_iter().find(|(magic, _)| payload.starts_with(magic)).map(|(_, kind)| kind)
    }

    /// The name `CONFIG_KERNEL_*` uses, lower-case.
    pub fn name(self) -> &'static str {
        match self {
            KernelCompression::Gzip => "gzip",
            KernelCompression::Xz => "xz",
            KernelCompression::Lz4 => "lz4",
            KernelCompression::Zstd => "zstd",
            KernelCompression::Bzip2 => "bzip2",
            KernelCompression::Lzma => "lzma",
            KernelCompression::Lzo => "lzo",
        }
    }
}

/// A parsed bzImage: where its compressed kernel is and how it is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BzImage<'a> {
    /// Boot protocol version, e.g. `0x020f` for 2.15.
    pub protocol: u16,
    /// Setup sectors after the boot sector (0 in the header means 4).
    pub setup_sects: u8,
    /// The compressed vmlinux, without the 4-byte size the build appends.
    pub payload: &'a [u8],
    /// The uncompressed size the build appended to the payload.
    pub uncompressed_len: u32,
    /// `None` when the payload's first bytes match no known format.
    pub compression: Option<KernelCompression>,
}

impl<'a> BzImage<'a> {
    /// Reads the setup header of `image`. Every offset is checked against
    /// the input's length.
    pub fn parse(image: &'a [u8]) -> Result<BzImage<'a>> {
        let fail = |reason: String| Err(Error::NotBzImage { reason });
        if image.len() < PAYLOAD_LENGTH + 4 {
            return fail(format!("{} bytes is too short for a setup header", image.len()));
        }
        if image[BOOT_FLAG..BOOT_FLAG + 2] != [0x55, 0xaa] {
            return fail("no boot flag 0xAA55 at 0x1fe".to_owned());
        }
        if &image[HEADER_MAGIC..HEADER_MAGIC + 4] != b"HdrS" {
            return fail("no \"HdrS\" setup header magic at 0x202".to_owned());
        }
        let protocol = u16::from_le_bytes([image[VERSION], image[VERSION + 1]]);
        if protocol < 0x0208 {
            return fail(format!(
                "boot protocol {}.{:02} predates payload fields (2.08)",
                protocol >> 8,
                protocol & 0xff
            ));
        }
        let setup_sects = image[SETUP_SECTS];
        // The boot protocol: "if this field is 0, the real value is 4".
        let sectors = if setup_sects == 0 { 4 } else { usize::from(setup_sects) };
        let protected_mode_start = (sectors + 1) * 512;
        let offset = read_u32(image, PAYLOAD_OFFSET) as usize;
        let length = read_u32(image, PAYLOAD_LENGTH) as usize;
        let start = protected_mode_start.checked_add(offset);
        let end = start.and_then(|start| start.checked_add(length));
        let (Some(start), Some(end)) = (start, end) else {
            return fail("payload offset and length overflow".to_owned());
        };
        if end > image.len() {
            return fail(format!("payload at {start}..{end} lies beyond the end of the file ({} bytes)", image.len()));
        }
        if length < 4 {
            return fail(format!("payload of {length} bytes has no room for its size trailer"));
        }
        let payload = &image[start..end - 4];
        let uncompressed_len = read_u32(image, end - 4);
        Ok(BzImage {
            protocol,
            setup_sects,
            payload,
            uncompressed_len,
            compression: KernelCompression::detect(payload),
        })
    }

    /// Decompresses the payload, refusing output beyond `limit` bytes and
    /// anything that is not an ELF file of the size the trailer announced.
    pub fn decompress(&self, limit: u64) -> Result<Vec<u8>> {
        let Some(compression) = self.compression else {
            let start = self.payload[..self.payload.len().min(8)].to_vec();
            return Err(Error::NotBzImage {
                reason: format!("unknown payload compression (it starts with {start:02x?})"),
            });
        };
        if u64::from(self.uncompressed_len) > limit {
            return Err(Error::TooLarge { limit });
        }
        let expected = self.uncompressed_len as usize;
        let decompress_error = |reason: String| Error::Decompress { compression: compression.name(), reason };
        let mut out = LimitedVec { bytes: Vec::with_capacity(expected), limit: expected };
        let result = match compression {
            KernelCompression::Gzip => {
                io::copy(&mut flate2::read::GzDecoder::new(self.payload), &mut out).map(drop).map_err(|e| e.to_string())
            }
            KernelCompression::Xz => {
                lzma_rs::xz_decompress(&mut io::BufReader::new(self.payload), &mut out).map_err(|e| e.to_string())
            }
            KernelCompression::Zstd => {
                let mut source = self.payload;
                match ruzstd::decoding::StreamingDecoder::new(&mut source) {
                    Ok(mut decoder) => io::copy(&mut decoder, &mut out).map(drop).map_err(|e| e.to_string()),
                    Err(err) => Err(err.to_string()),
                }
            }
            KernelCompression::Lz4 => lz4_legacy(self.payload, &mut out.bytes, expected),
            KernelCompression::Bzip2 | KernelCompression::Lzma | KernelCompression::Lzo => {
                return Err(Error::UnsupportedCompression { compression: compression.name() });
            }
        };
        result.map_err(decompress_error)?;
        let bytes = out.bytes;
        if bytes.len() != expected {
            return Err(decompress_error(format!("it gave {} bytes, the size trailer says {expected}", bytes.len())));
        }
        if !bytes.starts_with(b"\x7fELF") {
            return Err(Error::NotElfKernel { start: bytes[..bytes.len().min(4)].to_vec() });
        }
        Ok(bytes)
    }
}

/// The uncompressed vmlinux ELF inside the bzImage `image`, at most
/// `limit` bytes (Debian's cloud kernel is ~53 MB).
pub fn extract_vmlinux(image: &[u8], limit: u64) -> Result<Vec<u8>> {
    BzImage::parse(image)?.decompress(limit)
}

/// The kernel's lz4 legacy format: a magic, then blocks, each a 4-byte
/// little-endian compressed length and an lz4 block of at most 8 MiB output.
/// A repeated magic starts a new (concatenated) stream.
fn lz4_legacy(payload: &[u8], out: &mut Vec<u8>, limit: usize) -> std::result::Result<(), String> {
    let mut rest = &payload[LZ4_LEGACY_MAGIC.len()..];
    while rest.len() >= 4 {
        let chunk = read_u32(rest, 0) as usize;
        rest = &rest[4..];
        if chunk == u32::from_le_bytes(LZ4_LEGACY_MAGIC) as usize {
            continue;
        }
        if chunk > rest.len() {
            return Err(format!("block of {chunk} bytes, but only {} remain", rest.len()));
        }
        let (block, after) = rest.split_at(chunk);
        let start = out.len();
        let room = LZ4_LEGACY_BLOCK.min(limit.saturating_sub(start));
        if room == 0 {
            return Err(format!("output exceeds the announced {limit} bytes"));
        }
        out.resize(start + room, 0);
        let written = lz4_flex::block::decompress_into(block, &mut out[start..]).map_err(|e| e.to_string())?;
        out.truncate(start + written);
        rest = after;
    }
    if !rest.is_empty() {
        return Err(format!("{} stray bytes after the last block", rest.len()));
    }
    Ok(())
}

/// A `Vec` writer that fails once more than `limit` bytes arrive.
struct LimitedVec {
    bytes: Vec<u8>,
    limit: usize,
}

impl Write for LimitedVec {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            return Err(io::Error::other(format!("output exceeds the announced {} bytes", self.limit)));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use expect_test::{Expect, expect};

    use super::*;

    /// A fake vmlinux: an ELF magic and a pattern that compresses a bit.
    fn vmlinux(len: usize) -> Vec<u8> {
        let mut bytes = b"\x7fELF".to_vec();
        let mut state = 0x2545_f491_u32;
        while bytes.len() < len {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            bytes.push(if state % 3 == 0 { (state >> 8) as u8 } else { b'k' });
        }
        bytes
    }

    /// A bzImage with `setup_sects` setup sectors around `payload` (plus the size trailer).
    fn bzimage(setup_sects: u8, compressed: &[u8], uncompressed_len: usize) -> Vec<u8> {
        let sectors = if setup_sects == 0 { 4 } else { usize::from(setup_sects) };
        let pm_start = (sectors + 1) * 512;
        let offset = 0x3a0;
        let mut image = vec![0; pm_start + offset];
        image[SETUP_SECTS] = setup_sects;
        image[BOOT_FLAG..BOOT_FLAG + 2].copy_from_slice(&[0x55, 0xaa]);
        image[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        image[VERSION..VERSION + 2].copy_from_slice(&0x020f_u16.to_le_bytes());
        image[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&(offset as u32).to_le_bytes());
        image[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&(compressed.len() as u32 + 4).to_le_bytes());
        image.extend_from_slice(compressed);
        image.extend_from_slice(&(uncompressed_len as u32).to_le_bytes());
        image.extend_from_slice(b"trailing setup data");
        image
    }

    fn lz4_legacy_compress(data: &[u8]) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_vec();
        for block in data.chunks(LZ4_LEGACY_BLOCK) {
            let compressed = lz4_flex::block::compress(block);
            out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            out.extend_from_slice(&compressed);
        }
        out
    }

    fn compress(kind: KernelCompression, data: &[u8]) -> Vec<u8> {
        match kind {
            KernelCompression::Gzip => {
                let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder.write_all(data).unwrap();
                encoder.finish().unwrap()
            }
            KernelCompression::Xz => {
                let mut out = Vec::new();
                lzma_rs::xz_compress(&mut &data[..], &mut out).unwrap();
                out
            }
            KernelCompression::Zstd => {
                ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
            }
            KernelCompression::Lz4 => lz4_legacy_compress(data),
            other => panic!("no test compressor for {other:?}"),
        }
    }

    #[test]
    fn every_supported_compression_round_trips() {
        // lz4 gets 9 MiB: more than one 8 MiB legacy block. The others
        // stream, so a small kernel covers them (lzma-rs compresses slowly).
        let big = vmlinux(9 << 20);
        let small = vmlinux(300 << 10);
        for kind in [KernelCompression::Gzip, KernelCompression::Xz, KernelCompression::Lz4, KernelCompression::Zstd] {
            let kernel = if kind == KernelCompression::Lz4 { &big } else { &small };
            for setup_sects in [0, 1, 30] {
                let image = bzimage(setup_sects, &compress(kind, kernel), kernel.len());
                let parsed = BzImage::parse(&image).unwrap();
                assert_eq!(parsed.compression, Some(kind));
                let out = extract_vmlinux(&image, 64 << 20).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
                assert!(&out == kernel, "{kind:?} with {setup_sects} setup sectors changed the kernel");
            }
        }
    }

    fn check(image: &[u8], expect: Expect) {
        let actual = match extract_vmlinux(image, 1 << 20) {
            Ok(bytes) => format!("ok: {} bytes", bytes.len()),
            Err(err) => format!("error: {err}"),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn hostile_headers_get_one_clear_error() {
        let kernel = vmlinux(4096);
        let good = bzimage(2, &compress(KernelCompression::Gzip, &kernel), kernel.len());
        check(&good, expect!["ok: 4096 bytes"]);
        check(&good[..100], expect!["error: Not a bzImage kernel: 100 bytes is too short for a setup header"]);
        let mut bad = good.clone();
        bad[BOOT_FLAG] = 0;
        check(&bad, expect!["error: Not a bzImage kernel: no boot flag 0xAA55 at 0x1fe"]);
        let mut bad = good.clone();
        bad[HEADER_MAGIC] = b'X';
        check(&bad, expect![[r#"error: Not a bzImage kernel: no "HdrS" setup header magic at 0x202"#]]);
        let mut bad = good.clone();
        bad[VERSION..VERSION + 2].copy_from_slice(&0x0206_u16.to_le_bytes());
        check(&bad, expect!["error: Not a bzImage kernel: boot protocol 2.06 predates payload fields (2.08)"]);
        let mut bad = good.clone();
        bad[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        check(
            &bad,
            expect![
                "error: Not a bzImage kernel: payload at 2464..4294969759 lies beyond the end of the file (5497 bytes)"
            ],
        );
        let mut bad = good.clone();
        bad[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&3_u32.to_le_bytes());
        check(&bad, expect!["error: Not a bzImage kernel: payload of 3 bytes has no room for its size trailer"]);
        let image = bzimage(2, b"BZh91AY&SY", 10);
        check(&image, expect!["error: The kernel payload is compressed with bzip2, which kiln cannot decompress"]);
        let image = bzimage(2, b"\x00\x01\x02\x03", 10);
        check(
            &image,
            expect!["error: Not a bzImage kernel: unknown payload compression (it starts with [00, 01, 02, 03])"],
        );
        let image = bzimage(2, &compress(KernelCompression::Gzip, &kernel), kernel.len() + 1);
        check(
            &image,
            expect![
                "error: Cannot decompress the kernel payload (gzip): it gave 4096 bytes, the size trailer says 4097"
            ],
        );
        let image = bzimage(2, &compress(KernelCompression::Lz4, &kernel), kernel.len() - 1);
        check(
            &image,
            expect![
                "error: Cannot decompress the kernel payload (lz4): provided output is too small for the decompressed data, actual 4095, expected 4096"
            ],
        );
        let image = bzimage(2, &compress(KernelCompression::Zstd, b"not an elf"), 10);
        check(&image, expect!["error: The decompressed kernel is not an ELF file (it starts with [6e, 6f, 74, 20])"]);
        let image = bzimage(2, &compress(KernelCompression::Xz, &kernel), 2 << 20);
        check(&image, expect!["error: The decompressed kernel would exceed 1048576 bytes"]);
    }
}
