//! kiln-imagefmt writes disk images: FAT12/16/32 volumes (and the NoCloud
//! seeds built on them) and read-only ext4 filesystems with POSIX metadata
//! ([`Ext4Tree`]), to any `Write + Seek`, or straight to a file with
//! `copy_file_range`, sparse output and an atomic rename.
//!
//! It is a pure writer: it never mounts anything, never needs root and never
//! spawns a process. Layout is computed up front from the tree's metadata
//! (see [`FatTree::layout`]), so memory is bounded by the number of entries,
//! not by the bytes copied, and the same inputs always give the same bytes.
//!
//! ```
//! use kiln_imagefmt::{FatOptions, FatTree};
//!
//! let mut tree = FatTree::new();
//! tree.add_file_from_bytes("hello.txt", b"hello\n".to_vec())?;
//! tree.add_file_from_bytes("etc/motd", b"kiln\n".to_vec())?;
//! let options = FatOptions::default().with_label("DEMO").with_epoch(0);
//! let layout = tree.layout(&options)?;
//! let mut image = std::io::Cursor::new(Vec::new());
//! layout.write_to(&mut image)?;
//! assert_eq!(image.get_ref().len() as u64, layout.summary().image_bytes);
//! # Ok::<(), kiln_imagefmt::Error>(())
//! ```

mod cidata;
mod cpio;
mod error;
mod ext4;
mod fat;
mod inspect;
mod le;
mod qcow2;
mod sink;

pub use cidata::NoCloudSeed;
pub use cpio::{Compression, CpioArchive, CpioSummary};
pub use error::{Error, ErrorKind, Result};
pub use ext4::{DeviceKind, Ext4Layout, Ext4Options, Ext4Summary, Ext4Tree, Metadata};
pub use fat::{FatLayout, FatOptions, FatSummary, FatTree, FatType};
pub use inspect::{CpioInfo, Ext4Info, FatInfo, ImageInfo, Qcow2Info, inspect};
pub use qcow2::{Qcow2Options, Qcow2Summary, convert_to_qcow2, create_qcow2};

/// Readers the fuzz targets reach without a whole image around each input.
#[doc(hidden)]
pub use inspect::fuzzing;

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
