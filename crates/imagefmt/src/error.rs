use std::io;
use std::path::PathBuf;

/// The result type of every fallible kiln-imagefmt call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, for callers that branch on it (exit codes, retries).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Reading a source or writing the image failed.
    Io,
    /// A name, label, size or option is not valid for the format.
    InvalidInput,
    /// The content does not fit, or the format cannot hold it.
    DoesNotFit,
    /// A source file changed between planning and writing.
    SourceChanged,
}

/// Every error kiln-imagefmt returns. Messages name the path or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read {}", path.display())]
    ReadSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot write image {}", path.display())]
    WriteImage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot write image")]
    Write(#[source] io::Error),
    #[error("Cannot read image")]
    ReadImage(#[source] io::Error),
    #[error("Symlink loop at {}", path.display())]
    SymlinkLoop { path: PathBuf },
    #[error("{} is a {kind}; only regular files and directories can go into an image", path.display())]
    UnsupportedFileType { path: PathBuf, kind: &'static str },
    #[error("Invalid name {path:?} for a FAT image: {reason}")]
    InvalidName { path: String, reason: String },
    #[error("{first:?} and {second:?} in {dir:?} are the same name on FAT, which ignores case")]
    NameCollision { dir: String, first: String, second: String },
    #[error("{path:?} is already in the image")]
    AlreadyExists { path: String },
    #[error("{path:?} is a file, so nothing can go under it")]
    NotADirectory { path: String },
    #[error("{} is {size} bytes; a FAT file holds at most 4294967295 (4 GiB - 1)", path.display())]
    FileTooLarge { path: PathBuf, size: u64 },
    #[error("Invalid volume label {label:?}: {reason}")]
    InvalidLabel { label: String, reason: String },
    #[error("Invalid image size {size}: {reason}")]
    InvalidSize { size: u64, reason: String },
    #[error("Invalid cluster size {size}: {reason}")]
    InvalidClusterSize { size: u32, reason: String },
    #[error("The content needs {needed} bytes but the image is {size} bytes")]
    DoesNotFit { needed: u64, size: u64 },
    #[error("Directory {dir:?} needs {slots} entries (long names take several); FAT allows at most 65536")]
    TooManyEntries { dir: String, slots: u64 },
    #[error("{fat_type} is impossible for this image: {reason}")]
    FatTypeImpossible { fat_type: crate::FatType, reason: String },
    #[error("Invalid entry {path:?} for an ext4 image: {reason}")]
    InvalidExt4Entry { path: String, reason: String },
    #[error("{path:?} is {size} bytes; an ext4 file holds at most {max} bytes (2^32 - 1 blocks)")]
    Ext4FileTooLarge { path: String, size: u64, max: u64 },
    #[error("The tree needs {inodes} inodes; ext4 numbers at most {max}")]
    Ext4TooManyInodes { inodes: u64, max: u64 },
    #[error(
        "Directory {path:?} holds {entries} entries, {leaves} leaf blocks; a hashed directory of two index levels (no large_dir) holds at most {max}"
    )]
    Ext4DirectoryTooLarge { path: String, entries: usize, leaves: u64, max: u64 },
    #[error("Not a readable image: {reason}")]
    InvalidImage { reason: String },
    #[error("{} changed while the image was being written (expected {expected} bytes)", path.display())]
    SourceChanged { path: PathBuf, expected: u64 },
}

impl Error {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::ReadSource { .. } | Error::WriteImage { .. } | Error::Write(_) | Error::ReadImage(_) => {
                ErrorKind::Io
            }
            Error::SymlinkLoop { .. }
            | Error::UnsupportedFileType { .. }
            | Error::InvalidName { .. }
            | Error::NameCollision { .. }
            | Error::AlreadyExists { .. }
            | Error::NotADirectory { .. }
            | Error::InvalidLabel { .. }
            | Error::InvalidSize { .. }
            | Error::InvalidClusterSize { .. }
            | Error::InvalidExt4Entry { .. }
            | Error::InvalidImage { .. } => ErrorKind::InvalidInput,
            Error::FileTooLarge { .. }
            | Error::DoesNotFit { .. }
            | Error::FatTypeImpossible { .. }
            | Error::TooManyEntries { .. }
            | Error::Ext4FileTooLarge { .. }
            | Error::Ext4TooManyInodes { .. }
            | Error::Ext4DirectoryTooLarge { .. } => ErrorKind::DoesNotFit,
            Error::SourceChanged { .. } => ErrorKind::SourceChanged,
        }
    }
}
