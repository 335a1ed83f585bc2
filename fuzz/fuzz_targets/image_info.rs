//! Hostile bytes -> `kiln_imagefmt::inspect` must answer `Ok` or `Err`,
//! never panic or run away. The first input byte picks a prefix (none, the
//! qcow2 magic, gzip, a cpio header, a FAT boot-sector signature, or an
//! ext4 superblock magic with or without `metadata_csum`) so the
//! fuzzer reaches each parser's depths instead of failing format detection.
//!
//! Round trip: when the input is a valid cpio built here from the same
//! bytes, `inspect` must count exactly the entries that were written; the
//! same for an ext4 image, whose superblock facts must equal the writer's
//! summary.
#![no_main]

use std::io::Cursor;

use arbitrary::{Arbitrary, Unstructured};
use kiln_imagefmt::{CpioArchive, Ext4Options, Ext4Tree, ImageInfo, Metadata, inspect};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Shape {
    Raw,
    Qcow2Magic,
    Gzip,
    Cpio,
    FatBoot,
    /// A small archive built from names and sizes, then inspected.
    BuiltCpio(Vec<(String, u16)>),
    // New shapes go last, so earlier corpus entries keep their meaning.
    /// The rest as a superblock at byte 1024, with the ext2/3/4 magic; the
    /// flag clears `metadata_csum` so the fuzzer gets past the checksum.
    Ext4Superblock(bool),
    /// A small ext4 image built from names and sizes, then inspected.
    BuiltExt4(Vec<(String, u16)>),
}

fuzz_target!(|data: &[u8]| {
    let mut unstructured = Unstructured::new(data);
    let Ok(shape) = Shape::arbitrary(&mut unstructured) else { return };
    let rest = unstructured.take_rest();
    let mut image = match &shape {
        Shape::Raw => rest.to_vec(),
        Shape::Qcow2Magic => [b"QFI\xfb".as_slice(), rest].concat(),
        Shape::Gzip => [[0x1f, 0x8b].as_slice(), rest].concat(),
        Shape::Cpio => [b"070701".as_slice(), rest].concat(),
        Shape::FatBoot => {
            let mut sector = rest.to_vec();
            sector.resize(sector.len().max(512), 0);
            sector[510] = 0x55;
            sector[511] = 0xAA;
            sector
        }
        Shape::BuiltCpio(entries) => {
            let mut archive = CpioArchive::new();
            for (name, size) in entries.iter().take(64) {
                // Invalid or duplicate names are the writer's to refuse.
                let _ = archive.add_file_from_bytes(name, vec![7u8; usize::from(*size)], 0o644);
            }
            let mut out = Vec::new();
            archive.write_to(&mut out, 0).expect("writing to a Vec cannot fail");
            match inspect(&mut Cursor::new(&out)) {
                Ok(ImageInfo::Cpio(info)) => assert_eq!(info.entries, archive.len() as u64),
                other => panic!("a cpio kiln wrote was not read back as cpio: {other:?}"),
            }
            return;
        }
        Shape::Ext4Superblock(no_checksum) => {
            let mut image = vec![0u8; 1024];
            image.extend_from_slice(rest);
            image.resize(image.len().max(2048), 0);
            image[1024 + 0x38..1024 + 0x3A].copy_from_slice(&[0x53, 0xEF]);
            if *no_checksum {
                image[1024 + 0x65] &= !0x04; // ro_compat bit 0x400
            }
            image
        }
        Shape::BuiltExt4(entries) => {
            let mut tree = Ext4Tree::new();
            for (name, size) in entries.iter().take(64) {
                // Invalid or duplicate names are the writer's to refuse.
                let _ = tree.add_file_from_bytes(name, vec![7u8; usize::from(*size)], Metadata::default());
            }
            let layout = tree.layout(&Ext4Options::default()).expect("a small tree always fits");
            let summary = layout.summary();
            let mut out = Cursor::new(Vec::new());
            layout.write_to(&mut out).expect("writing to a Vec cannot fail");
            match inspect(&mut Cursor::new(out.into_inner())) {
                Ok(ImageInfo::Ext4(info)) => {
                    assert_eq!((info.blocks, info.free_blocks), (summary.blocks, summary.free_blocks));
                    assert_eq!((info.inodes, info.free_inodes), (summary.inodes, summary.free_inodes));
                }
                other => panic!("an ext4 image kiln wrote was not read back as ext4: {other:?}"),
            }
            return;
        }
    };
    image.truncate(1 << 20);
    let _ = inspect(&mut Cursor::new(&image));
});
