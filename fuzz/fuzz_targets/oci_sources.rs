//! Hostile archives -> kiln-oci's image sources and store must answer `Ok`
//! or `Err`, never panic, run away or leave a file that is not verified.
//! The input is written to a file and opened as an `oci-archive` and as a
//! `docker-archive`, and whatever opens is pulled into a fresh store.
//!
//! Round trip: the `Built` shape makes a valid oci-archive here (one plain
//! layer of arbitrary bytes, a config naming its diff_id, a manifest, a
//! tagged index.json); it must pull, and the store's layer tar must hold
//! exactly those bytes, unless the pull refuses the layer's entries (the
//! bytes need not be a tar), keeping nothing of it. With `damage` set, one byte of the layer is
//! flipped after the descriptors were computed: the pull must fail and
//! the store must hold no layer.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use kiln_oci::{ImageSource, Store};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest as _, Sha256};

#[derive(Arbitrary, Debug)]
enum Shape {
    /// The rest of the input is the archive.
    Raw,
    /// Named entries, so the fuzzer reaches the JSON readers.
    Entries(Vec<(u8, Vec<u8>)>),
    /// A valid oci-archive of one layer (see the top of the file).
    Built { layer: Vec<u8>, damage: Option<u16> },
}

const NAMES: &[&str] = &["oci-layout", "index.json", "manifest.json", "config.json", "layer.tar", "blobs/sha256/x"];

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// One ustar entry (a regular file), header and padded data.
fn entry(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut header = [0u8; 512];
    header[..name.len().min(100)].copy_from_slice(&name.as_bytes()[..name.len().min(100)]);
    header[100..108].copy_from_slice(b"0000644\0");
    header[108..116].copy_from_slice(b"0000000\0");
    header[116..124].copy_from_slice(b"0000000\0");
    header[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    header[136..148].copy_from_slice(b"00000000000\0");
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn built(layer: &[u8], damage: Option<u16>) -> Vec<u8> {
    let diff_id = hex(layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["sha256:{diff_id}"]}}}}"#
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{diff_id}","size":{}}}]}}"#,
        hex(config.as_bytes()),
        config.len(),
        layer.len()
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"t"}}}}]}}"#,
        hex(manifest.as_bytes()),
        manifest.len()
    );
    let mut stored = layer.to_vec();
    if let Some(at) = damage {
        if !stored.is_empty() {
            let at = usize::from(at) % stored.len();
            stored[at] ^= 0x01;
        }
    }
    let mut out = Vec::new();
    entry(&mut out, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    entry(&mut out, "index.json", index.as_bytes());
    entry(&mut out, &format!("blobs/sha256/{}", hex(manifest.as_bytes())), manifest.as_bytes());
    entry(&mut out, &format!("blobs/sha256/{}", hex(config.as_bytes())), config.as_bytes());
    entry(&mut out, &format!("blobs/sha256/{diff_id}"), &stored);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn pull(text: &str, dir: &std::path::Path) -> Option<kiln_oci::Result<kiln_oci::Image>> {
    let source = text.parse::<ImageSource>().ok()?.open().ok()?;
    let store = Store::open(dir).expect("store");
    Some(store.pull(source.as_ref(), &mut |_| {}))
}

fuzz_target!(|data: &[u8]| {
    let mut unstructured = Unstructured::new(data);
    let Ok(shape) = Shape::arbitrary(&mut unstructured) else { return };
    let archive = match &shape {
        Shape::Raw => unstructured.take_rest().to_vec(),
        Shape::Entries(entries) => {
            let mut out = Vec::new();
            for (name, bytes) in entries.iter().take(16) {
                entry(&mut out, NAMES[usize::from(*name) % NAMES.len()], bytes);
            }
            out.extend_from_slice(&[0u8; 1024]);
            out
        }
        Shape::Built { layer, damage } => built(layer, *damage),
    };
    let scratch = tempfile::tempdir().expect("scratch");
    let file = scratch.path().join("archive.tar");
    std::fs::write(&file, &archive).expect("write the archive");
    let oci = pull(&format!("oci-archive:{}:t", file.display()), &scratch.path().join("store-oci"));
    let _ = pull(&format!("docker-archive:{}", file.display()), &scratch.path().join("store-docker"));
    if let Shape::Built { layer, damage } = &shape {
        let store = Store::open(scratch.path().join("store-oci")).expect("store");
        let diff_id = format!("sha256:{}", hex(layer)).parse().expect("digest");
        let damaged = damage.is_some() && !layer.is_empty();
        match oci {
            Some(Ok(image)) => {
                assert!(!damaged, "a damaged layer was accepted");
                assert_eq!(*image.layers()[0].diff_id(), diff_id);
                assert_eq!(std::fs::read(store.layer_path(&diff_id)).expect("layer tar"), *layer);
            }
            Some(Err(error)) => {
                // The layer's bytes are the fuzzer's, not always a tar: the
                // pull reads its entries and may refuse them, keeping nothing.
                let entries_refused = matches!(
                    error,
                    kiln_oci::Error::BadLayerEntry { .. }
                        | kiln_oci::Error::LayerEntryForExt4 { .. }
                        | kiln_oci::Error::ReadLayer { .. }
                );
                assert!(damaged || entries_refused, "a valid archive was refused: {error}");
                assert!(!store.layer_path(&diff_id).exists(), "a refused layer was kept");
            }
            None => panic!("a valid archive did not open"),
        }
    }
});
