//! kiln-imagefmt's integration tests: every image is read back by tools
//! that share no code with the writer (`fsck.fat`, mtools, the `fatfs`
//! crate). See docs/TESTING.md.
#![allow(clippy::unwrap_used)]

mod errors;
mod ext4;
mod ext4_data;
mod ext4_entries;
mod ext4_htree;
mod ext4_journal;
mod ext4_ranges;
mod harness;
mod interop;
mod output;
mod props;
mod qcow2;
mod spec;
mod support;
