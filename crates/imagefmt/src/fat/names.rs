//! FAT names: long-name validation, 8.3 short names with `~N` tails, and
//! the VFAT long-name entries that carry the real name.

use std::collections::{HashMap, HashSet};

/// Longest long name, in UTF-16 code units.
const MAX_LFN_UNITS: usize = 255;
/// UTF-16 units held by one long-name directory entry.
pub(crate) const LFN_UNITS_PER_ENTRY: usize = 13;

/// Checks that `name` can be a VFAT long name, returning why not.
pub(crate) fn validate_long_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name == "." || name == ".." {
        return Err("\".\" and \"..\" are reserved".into());
    }
    if let Some(c) = name.chars().find(|&c| (c as u32) < 0x20 || "\"*/:<>?\\|".contains(c)) {
        return Err(format!("FAT names cannot contain {c:?}"));
    }
    if name.ends_with('.') || name.ends_with(' ') {
        return Err("FAT drops a trailing dot or space, so the name would change".into());
    }
    if name.encode_utf16().count() > MAX_LFN_UNITS {
        return Err(format!("longer than {MAX_LFN_UNITS} UTF-16 units"));
    }
    Ok(())
}

/// The key under which FAT considers two names equal.
pub(crate) fn fold_case(name: &str) -> String {
    name.to_uppercase()
}

/// Short-name characters besides `A-Z` and `0-9`.
pub(crate) fn is_short_char(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'()-@^_`{}~".contains(&b)
}

fn pad11(base: &[u8], ext: &[u8]) -> [u8; 11] {
    let mut out = [b' '; 11];
    out[..base.len()].copy_from_slice(base);
    out[8..8 + ext.len()].copy_from_slice(ext);
    out
}

/// `name` as a short name, if it already is a valid upper-case 8.3 name and
/// so needs no long-name entries.
pub(crate) fn exact_short_name(name: &str) -> Option<[u8; 11]> {
    let bytes = name.as_bytes();
    let (base, ext) = match name.find('.') {
        Some(at) => (&bytes[..at], &bytes[at + 1..]),
        None => (bytes, &bytes[bytes.len()..]),
    };
    let valid = (1..=8).contains(&base.len())
        && ext.len() <= 3
        && ext.is_empty() != name.contains('.')
        && base.iter().chain(ext).all(|&b| is_short_char(b));
    valid.then(|| pad11(base, ext))
}

/// Maps a long name to the short-name basis: upper-cased, invalid
/// characters replaced by `_`. Returns base, extension and whether
/// anything was lost (which forces a `~N` tail).
fn basis(name: &str) -> (Vec<u8>, Vec<u8>, bool) {
    let mut lossy = false;
    let stripped: String = name.chars().filter(|&c| c != ' ').collect();
    lossy |= stripped.len() != name.len();
    let trimmed = stripped.trim_start_matches('.');
    lossy |= trimmed.len() != stripped.len();
    let (base, ext) = match trimmed.rfind('.') {
        Some(at) => (&trimmed[..at], &trimmed[at + 1..]),
        None => (trimmed, ""),
    };
    let mut base = to_short_chars(base, &mut lossy);
    let mut ext = to_short_chars(ext, &mut lossy);
    if base.len() > 8 {
        lossy = true;
    }
    if ext.len() > 3 {
        lossy = true;
        ext.truncate(3);
    }
    if base.is_empty() {
        base.push(b'_');
        lossy = true;
    }
    (base, ext, lossy)
}

/// Upper-cases `part` into short-name characters: dots go, anything not
/// allowed becomes `_`. Sets `lossy` when a character did not survive.
fn to_short_chars(part: &str, lossy: &mut bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(part.len());
    for c in part.chars() {
        let up = c.to_ascii_uppercase();
        if up == '.' {
            *lossy = true;
        } else if up.is_ascii() && is_short_char(up as u8) {
            out.push(up as u8);
        } else {
            *lossy = true;
            out.push(b'_');
        }
    }
    out
}

/// The short names of one directory, and where each basis' `~N` search
/// left off, so that thousands of similar names stay linear.
#[derive(Debug, Default)]
pub(crate) struct ShortNames {
    taken: HashSet<[u8; 11]>,
    next_tail: HashMap<([u8; 8], [u8; 3]), u32>,
}

impl ShortNames {
    /// Reserves a name that is already exact 8.3; false if it was taken.
    pub(crate) fn reserve(&mut self, short: [u8; 11]) -> bool {
        self.taken.insert(short)
    }

    /// Picks a short name for long name `name`, unique in this directory.
    /// Mirrors Windows: the plain basis when only case differs, otherwise
    /// the first free `BASE~N.EXT`.
    pub(crate) fn generate(&mut self, name: &str) -> [u8; 11] {
        let (base, ext, lossy) = basis(name);
        if !lossy {
            let plain = pad11(&base, &ext);
            if self.taken.insert(plain) {
                return plain;
            }
        }
        let key_short = pad11(&base[..base.len().min(8)], &ext);
        let mut key = ([b' '; 8], [b' '; 3]);
        key.0.copy_from_slice(&key_short[..8]);
        key.1.copy_from_slice(&key_short[8..]);
        let start = self.next_tail.get(&key).copied().unwrap_or(1);
        for n in start.. {
            let tail = format!("~{n}");
            let keep = base.len().min(8 - tail.len());
            let mut candidate = base[..keep].to_vec();
            candidate.extend_from_slice(tail.as_bytes());
            let short = pad11(&candidate, &ext);
            if self.taken.insert(short) {
                self.next_tail.insert(key, n + 1);
                return short;
            }
        }
        unreachable!("a directory holds fewer than 2^32 entries")
    }
}

/// The checksum of a short name that ties its long-name entries to it.
pub(crate) fn lfn_checksum(short: &[u8; 11]) -> u8 {
    short.iter().fold(0u8, |sum, &b| ((sum & 1) << 7).wrapping_add(sum >> 1).wrapping_add(b))
}

/// Number of long-name entries `name` needs.
pub(crate) fn lfn_entry_count(name: &str) -> usize {
    name.encode_utf16().count().div_ceil(LFN_UNITS_PER_ENTRY)
}

/// Appends the long-name entries for `name` to `out`, in on-disk order
/// (highest sequence number first).
pub(crate) fn push_lfn_entries(out: &mut Vec<u8>, name: &str, short: &[u8; 11]) {
    let units: Vec<u16> = name.encode_utf16().collect();
    let count = units.len().div_ceil(LFN_UNITS_PER_ENTRY);
    let checksum = lfn_checksum(short);
    for seq in (1..=count).rev() {
        let mut entry = [0u8; 32];
        entry[0] = seq as u8 | if seq == count { 0x40 } else { 0 };
        entry[11] = 0x0F;
        entry[13] = checksum;
        let start = (seq - 1) * LFN_UNITS_PER_ENTRY;
        // Name slots: 5 at byte 1, 6 at byte 14, 2 at byte 28. After the
        // name comes one NUL (if there is room), then 0xFFFF padding.
        const SLOTS: [usize; 13] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
        for (i, &offset) in SLOTS.iter().enumerate() {
            let unit = match start + i {
                at if at < units.len() => units[at],
                at if at == units.len() => 0x0000,
                _ => 0xFFFF,
            };
            entry[offset..offset + 2].copy_from_slice(&unit.to_le_bytes());
        }
        out.extend_from_slice(&entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    fn check_short(names: &[&str], expect: Expect) {
        let mut shorts = ShortNames::default();
        let mut out = Vec::new();
        for name in names {
            if let Some(short) = exact_short_name(name) {
                shorts.reserve(short);
            }
        }
        for name in names {
            let short = exact_short_name(name).unwrap_or_else(|| shorts.generate(name));
            out.push(format!("{name} -> {}", String::from_utf8_lossy(&short)));
        }
        expect.assert_eq(&out.join("\n"));
    }

    #[test]
    fn short_names() {
        check_short(
            &[
                "SERVICE",
                "launch",
                "README.TXT",
                "readme.md",
                "keystore",
                "long file name.json",
                "long file name2.json",
                "a+b",
                ".bashrc",
                "x.tar.gz",
                "ünïcödé",
                "FOO~1",
                "foo bar",
            ],
            expect![[r#"
                SERVICE -> SERVICE    
                launch -> LAUNCH     
                README.TXT -> README  TXT
                readme.md -> README  MD 
                keystore -> KEYSTORE   
                long file name.json -> LONGFI~1JSO
                long file name2.json -> LONGFI~2JSO
                a+b -> A_B~1      
                .bashrc -> BASHRC~1   
                x.tar.gz -> XTAR~1  GZ 
                ünïcödé -> _N_C_D~1   
                FOO~1 -> FOO~1      
                foo bar -> FOOBAR~1   "#]],
        );
    }

    #[test]
    fn many_collisions_stay_unique() {
        let mut names = ShortNames::default();
        let shorts: HashSet<_> = (0..2000).map(|i| names.generate(&format!("same prefix {i}.txt"))).collect();
        assert_eq!(shorts.len(), 2000);
        assert!(shorts.contains(b"SAMEP~10TXT") && shorts.contains(b"SAME~100TXT"));
    }

    #[test]
    fn checksum_matches_the_specification_example() {
        // Computed by hand from the spec's rotate-right-and-add definition.
        assert_eq!(lfn_checksum(b"README  TXT"), 0x73);
    }

    #[test]
    fn invalid_names_say_why() {
        for (name, reason) in [("", "empty"), ("a/b", "'/'"), ("a:b", "':'"), ("end.", "trailing"), ("..", "reserved")]
        {
            let err = validate_long_name(name).unwrap_err();
            assert!(err.contains(reason), "{name:?}: {err}");
        }
        assert!(validate_long_name(&"x".repeat(256)).is_err());
        assert!(validate_long_name(&"x".repeat(255)).is_ok());
    }
}
