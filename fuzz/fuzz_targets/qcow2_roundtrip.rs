//! Arbitrary virtual size, cluster size, backing file and writes -> a qcow2
//! file written by kiln-imagefmt -> `inspect` must report the same virtual
//! size, cluster size and backing file, and exactly the clusters that hold
//! non-zero bytes. Then the same header with fields overwritten by fuzz
//! data goes to the header parser, which must not panic.
#![no_main]

use std::io::Cursor;

use arbitrary::Arbitrary;
use kiln_imagefmt::{ErrorKind, ImageInfo, Qcow2Options, convert_to_qcow2, inspect};
use libfuzzer_sys::fuzz_target;

const MAX_VIRTUAL: u64 = 4 << 20;

#[derive(Arbitrary, Debug)]
struct Input {
    sectors: u16,
    cluster_shift: u8,
    backing: Option<(String, bool)>,
    writes: Vec<(u32, Vec<u8>)>,
    /// (offset, value) patches applied to the written header before reparsing.
    patches: Vec<(u16, u8)>,
}

fuzz_target!(|input: Input| {
    let virtual_size = u64::from(input.sectors) * 512 % (MAX_VIRTUAL + 512);
    let cluster_size = 1u32 << (input.cluster_shift % 14 + 8); // 256 B .. 2 MiB: 256 B is invalid
    let options = match &input.backing {
        Some((name, qcow2)) => Qcow2Options::default().with_backing(name.clone(), if *qcow2 { "qcow2" } else { "raw" }),
        None => Qcow2Options::default(),
    }
    .with_cluster_size(cluster_size);

    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("a temporary directory");
    let raw_path = dir.path().join("raw");
    let mut raw = vec![0u8; virtual_size as usize];
    for (offset, bytes) in input.writes.iter().take(16) {
        let start = (*offset as usize).min(raw.len());
        let end = (start + bytes.len()).min(raw.len());
        raw[start..end].copy_from_slice(&bytes[..end - start]);
    }
    std::fs::write(&raw_path, &raw).expect("write the raw source");
    let qcow2_path = dir.path().join("image.qcow2");
    let summary = match convert_to_qcow2(&raw_path, &qcow2_path, &options) {
        Ok(summary) => summary,
        Err(err) => {
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
            assert!(!qcow2_path.exists(), "a refused conversion left a file");
            return;
        }
    };
    let nonzero = raw.chunks(cluster_size as usize).filter(|c| c.iter().any(|&b| b != 0)).count() as u64;
    assert_eq!(summary.data_clusters, nonzero);
    let mut bytes = std::fs::read(&qcow2_path).expect("read the image back");
    match inspect(&mut Cursor::new(&bytes)).expect("kiln's own qcow2 must inspect") {
        ImageInfo::Qcow2(info) => {
            assert_eq!(info.virtual_size, virtual_size);
            assert_eq!(info.cluster_size, cluster_size);
            assert_eq!(info.backing_file, options.backing_file);
            assert_eq!(info.backing_format, options.backing_format);
            assert_eq!(info.allocated_clusters, nonzero);
        }
        other => panic!("kiln's qcow2 inspected as {other:?}"),
    }
    for (offset, value) in input.patches.iter().take(32) {
        let at = usize::from(*offset) % bytes.len().min(4096);
        bytes[at] = *value;
    }
    let _ = inspect(&mut Cursor::new(&bytes));
});
