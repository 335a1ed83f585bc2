//! Hostile bytes into the readers kiln-init and `cargo xtask guest` trust
//! least: a module's `.modinfo` (and compressed modules), a disk's first
//! sectors, the seed's `meta-data`/`network-config`, netlink replies and
//! requests (kiln-rtnetlink), the control channel's lines (both ways), a
//! container config and the passwd/group text a user is resolved in. Each
//! must answer, never panic.
//!
//! Round trip: a module ELF built here from arbitrary `name`/`depends`
//! reads back the same name and dependencies.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use kiln_guest::fuzzing::fake_module;
use kiln_guest::{
    ContainerConfig, GuestConfig, GuestReport, HostCommand, LineBuffer, MAX_LINE, ModInfo, classify_disk,
    decompress_module, netlink, resolve_user,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Shape {
    Module,
    CompressedModule,
    Disk,
    Seed { split: u16 },
    NetlinkReply { seq: u32 },
    ControlLines,
    BuiltModule { name: String, depends: Vec<String> },
    // Last, so that the corpus's inputs keep selecting the shapes they did.
    NetlinkRequest,
    // After the others, for the same reason.
    Container { user: String },
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
            let _ = ModInfo::parse(&fake_module(rest));
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
        Shape::NetlinkRequest => {
            // What decodes is a request kiln sends: encoding it gives the same bytes back.
            if let Ok((seq, request)) = kiln_rtnetlink::Request::decode(rest) {
                let again = kiln_rtnetlink::Request::decode(&request.encode(seq)).expect("an encoded request decodes");
                assert_eq!(again, (seq, request));
            }
            let read = kiln_rtnetlink::messages(rest).flatten().flat_map(|m| kiln_rtnetlink::attributes(m.payload));
            let _ = read.count();
        }
        Shape::ControlLines => {
            // Whatever arrives, lines come out bounded, and what parses prints back the same.
            for line in LineBuffer::new().push(rest) {
                assert!(line.chars().count() < MAX_LINE); // (lossy UTF-8 may add bytes, never characters)
                if let Ok(report) = GuestReport::parse(&line) {
                    assert_eq!(GuestReport::parse(report.to_line().trim_end_matches('\n')).ok(), Some(report));
                }
                if let Ok(command) = HostCommand::parse(&line) {
                    assert_eq!(command.to_line(), format!("{line}\n"));
                }
            }
        }
        Shape::Container { user } => {
            // What parses writes back to text that parses to the same config.
            let text = String::from_utf8_lossy(rest);
            if let Ok(config) = ContainerConfig::parse(&text) {
                let again = config.to_text().expect("a parsed config writes");
                assert_eq!(ContainerConfig::parse(&again).ok(), Some(config));
            }
            let _ = resolve_user(&user, Some(&text), Some(&text));
        }
        Shape::BuiltModule { name, depends } => {
            let name = clean(&name);
            let depends: Vec<String> = depends.iter().map(|d| clean(d)).filter(|d| !d.is_empty()).collect();
            if name.is_empty() {
                return;
            }
            let modinfo = format!("license=GPL\0depends={}\0name={name}\0", depends.join(","));
            let info = ModInfo::parse(&fake_module(modinfo.as_bytes())).expect("a module built here parses");
            assert_eq!(info.name.as_deref(), Some(name.as_str()));
            assert_eq!(info.depends, depends);
        }
    }
});
