//! Hostile layer tars -> kiln-oci's tar reader and layer semantics must
//! answer `Ok` or `Err`, never panic, and hold memory bounded by the
//! input. The input is up to four layer tars separated by `KILNLAYER`;
//! its first byte's low two bits say how many of them are lower layers
//! (replayed for metadata only) of the chain step, the rest being its
//! uppers, and bit 2 has every block with the ustar magic get a right
//! checksum, so the fuzzer gets past the checksum to the fields behind it.
//!
//! Consistency: whatever chain step is accepted, the flattening of the
//! same stack is decided too (`Ok` or `Err`), and an accepted tree plans
//! an ext4 layout or says why not, without a panic. The seeds in
//! fuzz/seeds/oci_layer are stacks made by Python's `tarfile`.
#![no_main]

use kiln_imagefmt::Ext4Options;
use kiln_oci::fuzzing::layer_tree_from_bytes;
use libfuzzer_sys::fuzz_target;

const SEPARATOR: &[u8] = b"KILNLAYER";

fn split_layers(mut data: &[u8]) -> Vec<&[u8]> {
    let mut layers = Vec::new();
    while layers.len() < 3 {
        let Some(at) = data.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) else { break };
        layers.push(&data[..at]);
        data = &data[at + SEPARATOR.len()..];
    }
    layers.push(data);
    layers
}

/// Gives every 512-byte block holding the ustar magic its right checksum.
fn seal_headers(tar: &mut [u8]) {
    for header in tar.chunks_exact_mut(512) {
        if &header[257..262] == b"ustar" {
            header[148..156].fill(b' ');
            let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
            header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let mut owned: Vec<Vec<u8>> = split_layers(rest).into_iter().map(<[u8]>::to_vec).collect();
    if flags & 4 != 0 {
        owned.iter_mut().for_each(|tar| seal_headers(tar));
    }
    let layers: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
    let lower = usize::from(flags & 3).min(layers.len() - 1);
    let (lower_layers, upper_layers) = layers.split_at(lower);
    let step = layer_tree_from_bytes("fuzz", lower_layers, upper_layers);
    let flat = layer_tree_from_bytes("fuzz", &[], &layers);
    for tree in [step, flat].into_iter().flatten() {
        assert!(tree.data_bytes() <= data.len() as u64, "more file data than the input holds");
        let _ = tree.layout(&Ext4Options::default());
    }
});
