//! Hostile bytes -> kiln-imagefmt's ext2/3/4 superblock reader must answer
//! `Ok` or `Err`, never panic. The first byte says whether to seal the
//! superblock (store its `metadata_csum` checksum), so the fuzzer gets past
//! the checksum to every field behind it; the rest is the superblock,
//! zero-padded to 1 KiB, with the ext2/3/4 magic set. No seeds are kept
//! (fuzz/seeds holds finds only); the fuzzer reaches the fields from the magic.
//!
//! Consistency: `inspect` on an image that is 1 KiB of zeros and then the
//! same superblock gives the same answer as the reader called directly.
#![no_main]

use std::io::Cursor;

use kiln_imagefmt::fuzzing::{EXT4_SUPERBLOCK_BYTES, inspect_ext4_superblock, seal_ext4_superblock};
use kiln_imagefmt::{ImageInfo, inspect};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let mut superblock = [0u8; EXT4_SUPERBLOCK_BYTES];
    let len = rest.len().min(EXT4_SUPERBLOCK_BYTES);
    superblock[..len].copy_from_slice(&rest[..len]);
    superblock[0x38..0x3A].copy_from_slice(&[0x53, 0xEF]);
    if flags & 1 != 0 {
        seal_ext4_superblock(&mut superblock);
    }
    let direct = inspect_ext4_superblock(&superblock);
    if let Ok(info) = &direct {
        assert!(info.free_blocks <= info.blocks && info.free_inodes <= info.inodes, "{info:?}");
        assert_eq!(info.volume_bytes, info.blocks * u64::from(info.block_size), "{info:?}");
    }
    let mut image = vec![0u8; 1024];
    image.extend_from_slice(&superblock);
    match (inspect(&mut Cursor::new(&image)), direct) {
        (Ok(ImageInfo::Ext4(through_inspect)), Ok(direct)) => assert_eq!(through_inspect, direct),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("inspect said {a:?}, the superblock reader {b:?}"),
    }
});
