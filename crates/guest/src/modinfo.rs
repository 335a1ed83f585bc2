//! Kernel modules: the `.modinfo` ELF section (`name=`, `depends=`, ...) and
//! the order to load a set of modules in. Debian's cloud kernel package
//! ships no `modules.dep`, and kiln-init has no `modprobe`, so the order is
//! computed on the host by `cargo xtask guest` and stored in the initramfs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};

use crate::{Error, Result};

/// What a module's `.modinfo` section says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    /// `name=` (kernels since 4.x record it), with `-` normalised to `_`.
    pub name: Option<String>,
    /// `depends=`: modules that must be loaded first, normalised.
    pub depends: Vec<String>,
    /// `vermagic=`: the kernel release and options the module was built for.
    pub vermagic: Option<String>,
}

impl ModInfo {
    /// Reads the `.modinfo` section of an uncompressed ELF64 little-endian
    /// module. Offsets and sizes are checked against `elf`'s length.
    pub fn parse(elf: &[u8]) -> Result<ModInfo> {
        let section = modinfo_section(elf)?;
        let mut info = ModInfo::default();
        for entry in section.split(|&b| b == 0).filter(|entry| !entry.is_empty()) {
            let entry = String::from_utf8_lossy(entry);
            let Some((key, value)) = entry.split_once('=') else { continue };
            match key {
                "name" => info.name = Some(normalise(value)),
                "depends" => info.depends = value.split(',').filter(|d| !d.is_empty()).map(normalise).collect(),
                "vermagic" => info.vermagic = Some(value.to_owned()),
                _ => {}
            }
        }
        Ok(info)
    }
}

/// `virtio-blk` and `virtio_blk` name the same module; the kernel uses `_`.
fn normalise(name: &str) -> String {
    name.trim().replace('-', "_")
}

/// The module name a file stands for: `virtio_blk.ko`, `virtio_blk.ko.xz`,
/// `virtio-blk.ko.zst` all give `virtio_blk`; `None` for other files.
pub fn module_name_from_file(file_name: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|suffix| file_name.strip_suffix(suffix))
        .filter(|stem| !stem.is_empty())?;
    Some(normalise(stem))
}

/// A module file's ELF bytes: `.ko` as is, `.ko.xz`, `.ko.zst` and `.ko.gz`
/// decompressed (recognised by magic, not by name), at most `limit` bytes.
/// `finit_module` takes compressed modules only on kernels built for it, so
/// kiln stores them uncompressed.
pub fn decompress_module(bytes: &[u8], limit: u64) -> Result<Vec<u8>> {
    let fail = |reason: String| Error::NotModule { reason };
    let mut out = Vec::new();
    let read = |reader: &mut dyn Read, out: &mut Vec<u8>| -> io::Result<()> {
        reader.take(limit + 1).read_to_end(out).map(drop)
    };
    if bytes.starts_with(b"\x7fELF") {
        out = bytes.to_vec();
    } else if bytes.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        let mut decompressed = Vec::new();
        lzma_rs::xz_decompress(&mut io::BufReader::new(bytes), &mut decompressed)
            .map_err(|e| fail(format!("cannot decompress xz: {e}")))?;
        out = decompressed;
    } else if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut source = bytes;
        let mut decoder = ruzstd::decoding::StreamingDecoder::new(&mut source)
            .map_err(|e| fail(format!("cannot decompress zstd: {e}")))?;
        read(&mut decoder, &mut out).map_err(|e| fail(format!("cannot decompress zstd: {e}")))?;
    } else if bytes.starts_with(&[0x1f, 0x8b]) {
        read(&mut flate2::read::GzDecoder::new(bytes), &mut out)
            .map_err(|e| fail(format!("cannot decompress gzip: {e}")))?;
    } else {
        let start = bytes[..bytes.len().min(4)].to_vec();
        return Err(fail(format!("neither ELF nor xz, zstd or gzip (it starts with {start:02x?})")));
    }
    if out.len() as u64 > limit {
        return Err(fail(format!("larger than {limit} bytes")));
    }
    if !out.starts_with(b"\x7fELF") {
        return Err(fail("decompressed, it is not an ELF file".to_owned()));
    }
    Ok(out)
}

/// The bytes of the `.modinfo` section of an ELF64 little-endian file.
fn modinfo_section(elf: &[u8]) -> Result<&[u8]> {
    let fail = |reason: &str| Err(Error::NotModule { reason: reason.to_owned() });
    if elf.len() < 64 || !elf.starts_with(b"\x7fELF") {
        return fail("not an ELF file");
    }
    if elf[4] != 2 || elf[5] != 1 {
        return fail("not a 64-bit little-endian ELF file");
    }
    let shoff = u64_at(elf, 0x28);
    let shentsize = u64::from(u16_at(elf, 0x3a));
    let shnum = u64::from(u16_at(elf, 0x3c));
    let shstrndx = u64::from(u16_at(elf, 0x3e));
    if shentsize < 64 {
        return fail("section headers smaller than 64 bytes");
    }
    let header = |index: u64| -> Option<&[u8]> {
        let start = index.checked_mul(shentsize)?.checked_add(shoff)?;
        let end = start.checked_add(64)?;
        elf.get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
    };
    let contents = |header: &[u8]| -> Option<&[u8]> {
        let offset = u64_at(header, 0x18);
        let size = u64_at(header, 0x20);
        let end = offset.checked_add(size)?;
        elf.get(usize::try_from(offset).ok()?..usize::try_from(end).ok()?)
    };
    let Some(names) = (shstrndx < shnum).then(|| header(shstrndx)).flatten().and_then(contents) else {
        return fail("no readable section name table");
    };
    for index in 0..shnum {
        let Some(section) = header(index) else {
            return fail("section headers lie beyond the end of the file");
        };
        let name_start = u32_at(section, 0) as usize;
        let name = names.get(name_start..).and_then(|rest| rest.split(|&b| b == 0).next());
        if name == Some(b".modinfo") {
            return match contents(section) {
                Some(bytes) => Ok(bytes),
                None => fail("the .modinfo section lies beyond the end of the file"),
            };
        }
    }
    fail("no .modinfo section")
}

/// The order to load `wanted` and everything they depend on: each module
/// after its dependencies, otherwise in the order `wanted` gives (so the
/// result is deterministic). `modules` maps every available module name to
/// its [`ModInfo`].
pub fn load_order(modules: &BTreeMap<String, ModInfo>, wanted: &[&str]) -> Result<Vec<String>> {
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    for name in wanted {
        let name = normalise(name);
        if !modules.contains_key(&name) {
            return Err(Error::ModuleNotFound { module: name });
        }
        visit(modules, &name, &mut Vec::new(), &mut done, &mut order)?;
    }
    Ok(order)
}

/// Depth-first, dependencies first; `path` detects cycles.
fn visit(
    modules: &BTreeMap<String, ModInfo>,
    name: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> Result<()> {
    if done.contains(name) {
        return Ok(());
    }
    if let Some(start) = path.iter().position(|seen| seen == name) {
        let mut cycle = path[start..].to_vec();
        cycle.push(name.to_owned());
        return Err(Error::ModuleCycle { cycle: cycle.join(" -> ") });
    }
    path.push(name.to_owned());
    let info = &modules[name];
    for dependency in &info.depends {
        if !modules.contains_key(dependency) {
            return Err(Error::MissingModule { module: name.to_owned(), dependency: dependency.clone() });
        }
        visit(modules, dependency, path, done, order)?;
    }
    path.pop();
    done.insert(name.to_owned());
    order.push(name.to_owned());
    Ok(())
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// A minimal ELF64 LE relocatable with a null section, `.modinfo` and
/// `.shstrtab`, the shape the kernel's modpost leaves. For the unit tests
/// and the fuzz target (`kiln_guest::fuzzing`), never for real modules.
pub fn fake_module(modinfo: &[u8]) -> Vec<u8> {
    let names = b"\0.modinfo\0.shstrtab\0";
    let mut elf = vec![0_u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    let modinfo_at = elf.len() as u64;
    elf.extend_from_slice(modinfo);
    let names_at = elf.len() as u64;
    elf.extend_from_slice(names);
    let shoff = elf.len() as u64;
    elf[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
    elf[0x3a..0x3c].copy_from_slice(&64_u16.to_le_bytes());
    elf[0x3c..0x3e].copy_from_slice(&3_u16.to_le_bytes());
    elf[0x3e..0x40].copy_from_slice(&2_u16.to_le_bytes());
    let section = |name: u32, offset: u64, size: u64| {
        let mut header = vec![0_u8; 64];
        header[..4].copy_from_slice(&name.to_le_bytes());
        header[0x18..0x20].copy_from_slice(&offset.to_le_bytes());
        header[0x20..0x28].copy_from_slice(&size.to_le_bytes());
        header
    };
    elf.extend(section(0, 0, 0));
    elf.extend(section(1, modinfo_at, modinfo.len() as u64));
    elf.extend(section(10, names_at, names.len() as u64));
    elf
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use expect_test::{Expect, expect};

    use super::*;

    fn check_parse(elf: &[u8], expect: Expect) {
        let actual = match ModInfo::parse(elf) {
            Ok(info) => format!("{info:?}"),
            Err(err) => format!("error: {err}"),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn parses_modinfo() {
        check_parse(
            &fake_module(b"license=GPL\0depends=virtio_ring,virtio\0name=virtio_pci\0vermagic=6.1.0 SMP mod_unload\0"),
            expect![[
                r#"ModInfo { name: Some("virtio_pci"), depends: ["virtio_ring", "virtio"], vermagic: Some("6.1.0 SMP mod_unload") }"#
            ]],
        );
        check_parse(
            &fake_module(b"depends=\0name=virtio-ring\0"),
            expect![[r#"ModInfo { name: Some("virtio_ring"), depends: [], vermagic: None }"#]],
        );
        check_parse(b"\x7fELF", expect!["error: Not a kernel module: not an ELF file"]);
        let mut elf = fake_module(b"name=x\0");
        elf[4] = 1;
        check_parse(&elf, expect!["error: Not a kernel module: not a 64-bit little-endian ELF file"]);
        let mut elf = fake_module(b"name=x\0");
        elf[0x3e] = 9;
        check_parse(&elf, expect!["error: Not a kernel module: no readable section name table"]);
        let elf = fake_module(b"name=x\0");
        let cut = elf.len() - 10;
        check_parse(&elf[..cut], expect!["error: Not a kernel module: no readable section name table"]);
    }

    #[test]
    fn module_names_from_files() {
        let names: Vec<_> = ["virtio_blk.ko", "virtio-blk.ko.xz", "fat.ko.zst", "x.ko.gz", ".ko", "modules.order"]
            .iter()
            .map(|file| module_name_from_file(file))
            .collect();
        expect![[r#"[Some("virtio_blk"), Some("virtio_blk"), Some("fat"), Some("x"), None, None]"#]]
            .assert_eq(&format!("{names:?}"));
    }

    #[test]
    fn compressed_modules_are_unpacked() {
        let elf = fake_module(b"name=fat\0");
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &elf[..], &mut xz).unwrap();
        assert_eq!(decompress_module(&xz, 1 << 20).unwrap(), elf);
        let zstd = ruzstd::encoding::compress_to_vec(&elf[..], ruzstd::encoding::CompressionLevel::Fastest);
        assert_eq!(decompress_module(&zstd, 1 << 20).unwrap(), elf);
        assert_eq!(decompress_module(&elf, 1 << 20).unwrap(), elf);
        expect!["Not a kernel module: larger than 10 bytes"]
            .assert_eq(&decompress_module(&zstd, 10).unwrap_err().to_string());
        expect!["Not a kernel module: neither ELF nor xz, zstd or gzip (it starts with [42, 5a, 68])"]
            .assert_eq(&decompress_module(b"BZh", 10).unwrap_err().to_string());
    }

    fn check_order(graph: &[(&str, &[&str])], wanted: &[&str], expect: Expect) {
        let modules: BTreeMap<String, ModInfo> = graph
            .iter()
            .map(|(name, deps)| {
                let info = ModInfo {
                    name: Some(name.to_string()),
                    depends: deps.iter().map(|d| d.to_string()).collect(),
                    vermagic: None,
                };
                (name.to_string(), info)
            })
            .collect();
        let actual = match load_order(&modules, wanted) {
            Ok(order) => order.join(" "),
            Err(err) => format!("error: {err}"),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn dependency_order() {
        // The Debian 12 cloud kernel's graph for the modules kiln loads.
        let debian: &[(&str, &[&str])] = &[
            ("virtio", &[]),
            ("virtio_ring", &[]),
            ("virtio_pci_modern_dev", &[]),
            ("virtio_pci_legacy_dev", &[]),
            ("virtio_pci", &["virtio_pci_modern_dev", "virtio_ring", "virtio", "virtio_pci_legacy_dev"]),
            ("virtio_blk", &["virtio", "virtio_ring"]),
            ("fat", &[]),
            ("vfat", &["fat"]),
        ];
        check_order(
            debian,
            &["virtio_pci", "virtio_blk", "vfat"],
            expect!["virtio_pci_modern_dev virtio_ring virtio virtio_pci_legacy_dev virtio_pci virtio_blk fat vfat"],
        );
        check_order(debian, &["virtio-blk", "virtio_blk"], expect!["virtio virtio_ring virtio_blk"]);
        check_order(debian, &["ext4"], expect![[r#"error: Module "ext4" is not among the modules given"#]]);
        check_order(
            &[("a", &["b"])],
            &["a"],
            expect![[r#"error: Module "a" depends on "b", which is not among the modules given"#]],
        );
        check_order(
            &[("a", &["b"]), ("b", &["c"]), ("c", &["a"])],
            &["a"],
            expect!["error: Modules depend on each other in a cycle: a -> b -> c -> a"],
        );
    }
}
