//! The FAT12/16/32 builder: a tree in, a spec-valid volume out, in one pass.
//!
//! Pure core, thin shell: [`FatTree`] checks names as they are added,
//! [`FatTree::layout`] computes the whole geometry and every cluster
//! placement from metadata alone, and [`FatLayout`] streams the bytes into a
//! sink in ascending offset order, writing nothing where the image is zero.

mod emit;
mod layout;
mod names;
mod time;
mod tree;

use std::fmt;
use std::str::FromStr;

pub use layout::FatLayout;
pub use tree::FatTree;

/// The FAT variant. The Microsoft specification decides it by cluster
/// count alone: fewer than 4085 clusters is FAT12, fewer than 65525 FAT16,
/// anything more FAT32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FatType {
    Fat12,
    Fat16,
    Fat32,
}

impl FatType {
    /// The bits per FAT entry: 12, 16 or 32.
    pub fn bits(self) -> u32 {
        match self {
            FatType::Fat12 => 12,
            FatType::Fat16 => 16,
            FatType::Fat32 => 32,
        }
    }
}

impl fmt::Display for FatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FAT{}", self.bits())
    }
}

impl FromStr for FatType {
    type Err = String;

    /// Accepts `12`, `16`, `32`, or the same with a `FAT`/`fat` prefix.
    fn from_str(s: &str) -> Result<FatType, String> {
        let digits = s.strip_prefix("FAT").or_else(|| s.strip_prefix("fat")).unwrap_or(s);
        match digits {
            "12" => Ok(FatType::Fat12),
            "16" => Ok(FatType::Fat16),
            "32" => Ok(FatType::Fat32),
            _ => Err(format!("unknown FAT type {s:?}: expected 12, 16 or 32")),
        }
    }
}

/// How to lay out the volume. Every field has a sensible automatic default.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FatOptions {
    /// Volume label: at most 11 bytes of the 8.3 character set or spaces
    /// (neither leading nor trailing), upper-cased as Windows does.
    pub label: Option<String>,
    /// Volume serial number; by default derived from the label, the epoch
    /// and the tree, so that the same inputs give the same image.
    pub volume_id: Option<u32>,
    /// Seconds since the Unix epoch (read as UTC), stamped on every entry.
    /// FAT stores 1980-01-01 to 2107-12-31 in two-second steps: earlier times
    /// (such as the default 0) become 1980-01-01, later ones 2107-12-31 23:59:58.
    pub epoch: i64,
    /// Force a FAT type; an error if the size makes it impossible.
    pub fat_type: Option<FatType>,
    /// Image size in bytes (a multiple of 512); by default content plus headroom.
    pub size: Option<u64>,
    /// Bytes per cluster (a power of two from 512 to 32 KiB); by default
    /// 4 KiB where the FAT type allows, larger on very large volumes.
    pub cluster_size: Option<u32>,
}

impl Default for FatOptions {
    /// No label, automatic type, size and cluster size, and the epoch from
    /// `SOURCE_DATE_EPOCH` (or 0 when it is unset or not a number).
    fn default() -> FatOptions {
        let epoch = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        FatOptions { label: None, volume_id: None, epoch, fat_type: None, size: None, cluster_size: None }
    }
}

/// Builders, so that options can gain fields without breaking callers
/// (the struct is `#[non_exhaustive]`): `FatOptions::default().with_label("BOOT")`.
impl FatOptions {
    /// Sets [`label`](Self::label).
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Sets [`volume_id`](Self::volume_id).
    pub fn with_volume_id(mut self, volume_id: impl Into<Option<u32>>) -> Self {
        self.volume_id = volume_id.into();
        self
    }

    /// Sets [`epoch`](Self::epoch).
    pub fn with_epoch(mut self, epoch: i64) -> Self {
        self.epoch = epoch;
        self
    }

    /// Sets [`fat_type`](Self::fat_type).
    pub fn with_fat_type(mut self, fat_type: impl Into<Option<FatType>>) -> Self {
        self.fat_type = fat_type.into();
        self
    }

    /// Sets [`size`](Self::size).
    pub fn with_size(mut self, size: impl Into<Option<u64>>) -> Self {
        self.size = size.into();
        self
    }

    /// Sets [`cluster_size`](Self::cluster_size).
    pub fn with_cluster_size(mut self, cluster_size: impl Into<Option<u32>>) -> Self {
        self.cluster_size = cluster_size.into();
        self
    }
}

/// What a layout holds, for reports and `--json` summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FatSummary {
    pub fat_type: FatType,
    pub cluster_size: u32,
    /// Data clusters on the volume.
    pub clusters: u32,
    /// Data clusters not used by any file or directory.
    pub free_clusters: u32,
    /// The image's length in bytes.
    pub image_bytes: u64,
    pub files: u64,
    /// Directories, not counting the root.
    pub dirs: u64,
    /// Sum of the file sizes.
    pub data_bytes: u64,
    pub volume_id: u32,
}
