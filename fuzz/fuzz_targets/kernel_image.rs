//! Hostile bytes -> `kiln_guest::extract_vmlinux` must answer `Ok` or
//! `Err`, never panic or allocate without bound. The first byte picks a
//! shape: raw bytes, or a valid setup header around the input with a gzip,
//! xz, lz4-legacy or zstd magic in front, so the fuzzer reaches each
//! decompressor.
//!
//! Round trip: an ELF-looking payload compressed here (gzip or the kernel's
//! lz4 legacy frame) and wrapped in a setup header comes back byte for byte.
#![no_main]

use std::io::Write;

use arbitrary::{Arbitrary, Unstructured};
use kiln_guest::{BzImage, extract_vmlinux};
use libfuzzer_sys::fuzz_target;

const LIMIT: u64 = 4 << 20;

#[derive(Arbitrary, Debug)]
enum Shape {
    Raw,
    Header { setup_sects: u8, magic: u8, claimed_len: u32 },
    RoundTrip { setup_sects: u8, lz4: bool },
}

fn bzimage(setup_sects: u8, payload: &[u8], uncompressed_len: u32) -> Vec<u8> {
    let sectors = if setup_sects == 0 { 4 } else { usize::from(setup_sects) };
    let mut image = vec![0; (sectors + 1) * 512];
    image[0x1f1] = setup_sects;
    image[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020f_u16.to_le_bytes());
    image[0x248..0x24c].copy_from_slice(&0_u32.to_le_bytes());
    image[0x24c..0x250].copy_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
    image.extend_from_slice(payload);
    image.extend_from_slice(&uncompressed_len.to_le_bytes());
    image
}

fuzz_target!(|data: &[u8]| {
    let mut unstructured = Unstructured::new(data);
    let Ok(shape) = Shape::arbitrary(&mut unstructured) else { return };
    let rest = unstructured.take_rest();
    match shape {
        Shape::Raw => {
            let _ = extract_vmlinux(rest, LIMIT);
        }
        Shape::Header { setup_sects, magic, claimed_len } => {
            let magics: [&[u8]; 4] =
                [&[0x1f, 0x8b], &[0xfd, b'7', b'z', b'X', b'Z', 0], &[2, 0x21, 0x4c, 0x18], &[0x28, 0xb5, 0x2f, 0xfd]];
            let mut payload = magics[usize::from(magic) % magics.len()].to_vec();
            payload.extend_from_slice(rest);
            let image = bzimage(setup_sects, &payload, claimed_len % (LIMIT as u32 * 2));
            if let Ok(bytes) = extract_vmlinux(&image, LIMIT) {
                assert!(bytes.starts_with(b"\x7fELF") && bytes.len() as u64 <= LIMIT);
            }
        }
        Shape::RoundTrip { setup_sects, lz4 } => {
            let mut kernel = b"\x7fELF".to_vec();
            kernel.extend_from_slice(rest);
            let payload = if lz4 {
                let mut out = vec![2, 0x21, 0x4c, 0x18];
                let block = lz4_flex::block::compress(&kernel);
                out.extend_from_slice(&(block.len() as u32).to_le_bytes());
                out.extend_from_slice(&block);
                out
            } else {
                let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder.write_all(&kernel).unwrap();
                encoder.finish().unwrap()
            };
            let image = bzimage(setup_sects, &payload, kernel.len() as u32);
            let parsed = BzImage::parse(&image).expect("a header built here parses");
            assert_eq!(parsed.uncompressed_len as usize, kernel.len());
            assert_eq!(extract_vmlinux(&image, LIMIT).expect("a kernel built here extracts"), kernel);
        }
    }
});
