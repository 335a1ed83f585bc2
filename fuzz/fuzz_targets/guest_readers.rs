//! Hostile bytes into the readers kiln-init and `cargo xtask guest` trust
//! least: a module's `.modinfo` (and compressed modules), a disk's first
//! sectors, the seed's `meta-data`/`network-config`, netlink replies. Each
//! must answer, never panic.
//!
//! Round trip: a module ELF built here from arbitrary `name`/`depends`
//! reads back the same name and dependencies.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use kiln_guest::{GuestConfig, ModInfo, classify_disk, decompress_module, netlink};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Shape {
    Module,
    CompressedModule,
    Disk,
    Seed { split: u16 },
    NetlinkReply { seq: u32 },
    BuiltModule { name: String, depends: Vec<String> },
}

/// A minimal ELF64 module with `.modinfo` holding `modinfo`.
fn module(modinfo: &[u8]) -> Vec<u8> {
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
    for (name, offset, size) in
        [(0_u32, 0, 0), (1, modinfo_at, modinfo.len() as u64), (10, names_at, names.len() as u64)]
    {
        let mut header = vec![0_u8; 64];
        header[..4].copy_from_slice(&name.to_le_bytes());
        header[0x18..0x20].copy_from_slice(&offset.to_le_bytes());
        header[0x20..0x28].copy_from_slice(&size.to_le_bytes());
        elf.extend(header);
    }
    elf
}

/// Module names as the kernel writes them: no NUL, `,` or `=`, trimmed.
fn clean(name: &str) -> String {
    name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
}

fuzz_target!(|data: &[u8]| {
    let mut unstructured = Unstructured::new(data);
    let Ok(shape) = Shape::arbitrary(&mut unstructured) else { return };
    let rest = unstructured.take_rest();
    match shape {
        Shape::Module => {
            let _ = ModInfo::parse(rest);
            let _ = ModInfo::parse(&module(rest));
        }
        Shape::CompressedModule => {
            if let Ok(elf) = decompress_module(rest, 1 << 20) {
                assert!(elf.starts_with(b"\x7fELF") && elf.len() <= 1 << 20);
            }
        }
        Shape::Disk => {
            let _ = classify_disk(rest);
        }
        Shape::Seed { split } => {
            let text = String::from_utf8_lossy(rest);
            let split = text.char_indices().nth(usize::from(split)).map_or(text.len(), |(at, _)| at);
            let (meta, network) = text.split_at(split);
            let _ = GuestConfig::parse(meta, Some(network));
        }
        Shape::NetlinkReply { seq } => {
            let _ = netlink::parse_ack(rest, seq);
        }
        Shape::BuiltModule { name, depends } => {
            let name = clean(&name);
            let depends: Vec<String> = depends.iter().map(|d| clean(d)).filter(|d| !d.is_empty()).collect();
            if name.is_empty() {
                return;
            }
            let modinfo = format!("license=GPL\0depends={}\0name={name}\0", depends.join(","));
            let info = ModInfo::parse(&module(modinfo.as_bytes())).expect("a module built here parses");
            assert_eq!(info.name.as_deref(), Some(name.as_str()));
            assert_eq!(info.depends, depends);
        }
    }
});
