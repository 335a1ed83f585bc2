use std::process::Command;

use proptest::prelude::*;

use super::*;
use crate::ext4::disk::FT_REG;

/// Seeds as debugfs takes them (a UUID) and as the superblock stores them.
const SEEDS: [&str; 3] = [
    "00000000-0000-0000-0000-000000000000",
    "11111111-2222-3333-4444-555555555555",
    "9a3c2f1e-47b5-4d2e-8c61-0f7e2d9b4a85",
];

fn parse_uuid(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    for (n, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * n..2 * n + 2], 16).unwrap();
    }
    out
}

/// Names of every length from 1 to 255 bytes, some with bytes over 0x7F
/// (where signed and unsigned hashing differ) and across the 32-byte chunks.
fn sample_names() -> Vec<Vec<u8>> {
    // No "-": debugfs would take a name starting with it for an option.
    let alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+=";
    let mut names = Vec::new();
    for len in 1..=255usize {
        names.push((0..len).map(|i| alphabet[(i * 7 + len) % alphabet.len()]).collect());
        if len % 5 == 0 || len > 250 {
            // UTF-8 é (0xC3 0xA9) and raw high bytes.
            names.push((0..len).map(|i| [0xC3, 0xA9, b'x', 0xFF, 0x80][(i + len) % 5]).collect());
        }
    }
    names
}

/// Hashes `names` with debugfs's `dx_hash -h half_md4 -s SEED`, one script for all.
fn debugfs_hashes(debugfs: &std::path::Path, seed: &str, names: &[Vec<u8>]) -> Vec<NameHash> {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("hashes.debugfs");
    let mut commands = Vec::new();
    for name in names {
        commands.extend_from_slice(format!("dx_hash -h half_md4 -s {seed} ").as_bytes());
        commands.extend_from_slice(name);
        commands.push(b'\n');
    }
    std::fs::write(&script, commands).unwrap();
    let out = Command::new(debugfs).arg("-f").arg(&script).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let hashes: Vec<NameHash> = text
        .lines()
        .filter(|line| line.starts_with("Hash of "))
        .map(|line| {
            let (_, values) = line.rsplit_once(" is ").unwrap();
            let (major, minor) = values.split_once(" (minor ").unwrap();
            NameHash { major: hex(major), minor: hex(minor.trim_end_matches(')')) }
        })
        .collect();
    assert_eq!(hashes.len(), names.len(), "debugfs answered {} of {} names", hashes.len(), names.len());
    hashes
}

#[test]
fn half_md4_hashes_agree_with_debugfs_dx_hash() {
    let test = kiln_testkit::current_test_name();
    let Some(debugfs) = kiln_testkit::require_tool(&test, "debugfs") else { return };
    let names = sample_names();
    for seed in SEEDS {
        let expected = debugfs_hashes(&debugfs, seed, &names);
        let words = seed_words(&parse_uuid(seed));
        for (name, want) in names.iter().zip(expected) {
            let got = name_hash(name, &words);
            assert_eq!(got, want, "seed {seed}, {}-byte name {:?}", name.len(), String::from_utf8_lossy(name));
        }
    }
}

fn entries_named<'t>(names: &'t [String]) -> Vec<DirEntry<'t>> {
    names.iter().enumerate().map(|(i, name)| DirEntry { name, ino: 100 + i as u32, file_type: FT_REG }).collect()
}

#[test]
fn one_block_stays_linear_and_two_levels_hold_507_times_510_leaves() {
    let fits = vec!["n".repeat(250); 15]; // 15 × 260 + 24 = 3924 bytes
    assert_eq!(DirShape::of(&entries_named(&fits)), DirShape::Linear);
    let spills = vec!["n".repeat(250); 16];
    assert_eq!(DirShape::of(&entries_named(&spills)), DirShape::Indexed { leaves: 2, nodes: 0 });
    let per_leaf = (disk::DIRENT_USABLE - 264) as u64;
    assert_eq!(DirShape::for_sizes(507 * per_leaf, 264), DirShape::Indexed { leaves: 507, nodes: 0 });
    assert_eq!(DirShape::for_sizes(507 * per_leaf + 1, 264), DirShape::Indexed { leaves: 508, nodes: 1 });
    let full = DirShape::for_sizes(MAX_LEAVES * per_leaf, 264);
    assert_eq!(full, DirShape::Indexed { leaves: MAX_LEAVES, nodes: 507 });
    full.check("big", 1).unwrap();
    let over = DirShape::for_sizes(MAX_LEAVES * per_leaf + 1, 264);
    let err = over.check("srv/big", 4_000_000).unwrap_err();
    assert!(matches!(&err, Error::Ext4DirectoryTooLarge { path, .. } if path == "srv/big"), "{err:?}");
    assert!(err.to_string().contains("large_dir"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn every_leaf_gets_entries_and_fits_its_block(names in prop::collection::vec("[a-z0-9]{1,255}", 16..1500)) {
        let entries = entries_named(&names);
        let DirShape::Indexed { leaves, .. } = DirShape::of(&entries) else { return Ok(()) };
        let sorted: Vec<(NameHash, DirEntry<'_>)> =
            entries.iter().map(|e| (name_hash(e.name.as_bytes(), &[1, 2, 3, 4]), *e)).collect();
        let starts = leaf_starts(&sorted, leaves as usize);
        prop_assert_eq!(starts.len() as u64, leaves);
        for (n, &first) in starts.iter().enumerate() {
            let end = starts.get(n + 1).copied().unwrap_or(sorted.len());
            prop_assert!(end > first, "leaf {} is empty", n);
            let bytes: usize = sorted[first..end].iter().map(|(_, e)| disk::dirent_len(e.name.len())).sum();
            prop_assert!(bytes <= disk::DIRENT_USABLE, "leaf {} holds {} bytes", n, bytes);
        }
    }
}

/// Two names of 246 bytes whose major hashes are equal under the seed
/// 0x5A × 16, in the middle half of the range (so a few leaves put a boundary
/// near them): found by hashing "c" × 240 followed by 0, 1, 2, … until two
/// met there (176,087 names).
fn colliding_pair() -> (String, String) {
    let prefix = "c".repeat(240);
    (format!("{prefix}134431"), format!("{prefix}176086"))
}

/// (hash, block) of each index entry of a one-level tree's root.
fn root_index(blocks: &[u8]) -> Vec<(u32, u32)> {
    let count = u16::from_le_bytes([blocks[34], blocks[35]]) as usize;
    (0..count)
        .map(|n| {
            let at = ROOT_COUNT_AT + 8 * n;
            let hash = if n == 0 { 0 } else { u32::from_le_bytes(blocks[at..at + 4].try_into().unwrap()) };
            (hash, u32::from_le_bytes(blocks[at + 4..at + 8].try_into().unwrap()))
        })
        .collect()
}

/// The logical block holding `name` in an encoded directory.
fn block_of(blocks: &[u8], name: &str) -> usize {
    let needle = [&[name.len() as u8, FT_REG][..], name.as_bytes()].concat();
    blocks.windows(needle.len()).position(|w| w == needle).unwrap() / BLOCK as usize
}

#[test]
fn equal_hashes_split_across_leaves_set_the_continuation_bit() {
    let hash_seed = [0x5Au8; 16];
    let seed = seed_words(&hash_seed);
    let (first, second) = colliding_pair();
    let hash = name_hash(first.as_bytes(), &seed).major;
    assert_eq!(hash, name_hash(second.as_bytes(), &seed).major, "the pair collides");
    let mut straddled = 0;
    // Fillers move the leaf boundaries; some counts put one between the pair.
    for fillers in 100..400 {
        let mut names: Vec<String> = (0..fillers).map(|i| format!("filler-{i:04}-{}", "f".repeat(i % 40))).collect();
        names.push(first.clone());
        names.push(second.clone());
        let entries = entries_named(&names);
        assert!(matches!(DirShape::of(&entries), DirShape::Indexed { nodes: 0, .. }));
        let blocks = dir_blocks(2, 2, &entries, &hash_seed, 7);
        let (a, b) = (block_of(&blocks, &first), block_of(&blocks, &second));
        let index = root_index(&blocks);
        if a != b {
            straddled += 1;
            let later = a.max(b) as u32;
            let entry = index.iter().find(|(_, block)| *block == later).unwrap();
            assert_eq!(entry.0, hash | 1, "{fillers} fillers: the continued leaf's index entry");
        }
        for (n, (entry_hash, _)) in index.iter().enumerate().skip(1) {
            assert!(*entry_hash & 1 == 0 || *entry_hash == hash | 1, "{fillers} fillers: entry {n} continued");
        }
    }
    assert!(straddled > 0, "no filler count put a boundary between the colliding pair");
}
