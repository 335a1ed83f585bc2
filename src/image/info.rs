//! `kiln image info`: what an image file is, from its own headers.

use std::fs::{self, File};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use kiln_imagefmt::{ImageInfo, inspect};
use serde::Serialize;

use super::{human_bytes, volume_id};

#[derive(Debug, Args)]
pub(crate) struct InfoArgs {
    /// The image to inspect: a FAT volume, an ext2/3/4 filesystem, a qcow2 image or a cpio archive (plain or gzip).
    #[arg(value_name = "IMG")]
    image: PathBuf,
    /// Print one JSON object instead of one line per fact.
    #[arg(long)]
    json: bool,
}

pub(super) fn info(args: InfoArgs) -> anyhow::Result<()> {
    let path = &args.image;
    let meta = fs::metadata(path).with_context(|| format!("Cannot read {}", path.display()))?;
    if meta.is_dir() {
        bail!("{} is a directory, not an image", path.display());
    }
    let mut file = File::open(path).with_context(|| format!("Cannot read {}", path.display()))?;
    let info = inspect(&mut file).with_context(|| format!("Cannot inspect {}", path.display()))?;
    let report = Report { path: path.display().to_string(), facts: Facts::new(info)?, file_bytes: meta.len() };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", human(&report)?);
    }
    Ok(())
}

/// The `--json` object, documented in docs/cli.md.
#[derive(Debug, Serialize)]
struct Report {
    path: String,
    /// `format` and that format's facts.
    #[serde(flatten)]
    facts: Facts,
    /// Length of the image file (for qcow2 and gzip, not the contents' size).
    file_bytes: u64,
}

#[derive(Debug, Serialize)]
#[serde(tag = "format", rename_all = "lowercase")]
enum Facts {
    Fat {
        fat_type: String,
        label: Option<String>,
        volume_id: String,
        bytes_per_sector: u32,
        cluster_size: u32,
        clusters: u32,
        free_clusters: u32,
        volume_bytes: u64,
    },
    Ext4 {
        /// `ext2`, `ext3` or `ext4`, from the features the superblock names.
        kind: &'static str,
        label: Option<String>,
        uuid: String,
        block_size: u32,
        blocks: u64,
        free_blocks: u64,
        inodes: u32,
        free_inodes: u32,
        volume_bytes: u64,
        features: Vec<String>,
    },
    Qcow2 {
        version: u32,
        virtual_size: u64,
        cluster_size: u32,
        backing_file: Option<String>,
        backing_format: Option<String>,
        allocated_clusters: u64,
    },
    Cpio {
        compression: &'static str,
        entries: u64,
        dirs: u64,
        files: u64,
        symlinks: u64,
        other: u64,
        data_bytes: u64,
    },
}

impl Facts {
    fn new(info: ImageInfo) -> anyhow::Result<Facts> {
        Ok(match info {
            ImageInfo::Fat(fat) => Facts::Fat {
                fat_type: fat.fat_type.to_string(),
                label: fat.label,
                volume_id: volume_id(fat.volume_id),
                bytes_per_sector: fat.bytes_per_sector,
                cluster_size: fat.cluster_size,
                clusters: fat.clusters,
                free_clusters: fat.free_clusters,
                volume_bytes: fat.volume_bytes,
            },
            ImageInfo::Ext4(ext4) => Facts::Ext4 {
                kind: ext4.kind,
                label: ext4.label,
                uuid: uuid_text(&ext4.uuid),
                block_size: ext4.block_size,
                blocks: ext4.blocks,
                free_blocks: ext4.free_blocks,
                inodes: ext4.inodes,
                free_inodes: ext4.free_inodes,
                volume_bytes: ext4.volume_bytes,
                features: ext4.features,
            },
            ImageInfo::Qcow2(qcow2) => Facts::Qcow2 {
                version: qcow2.version,
                virtual_size: qcow2.virtual_size,
                cluster_size: qcow2.cluster_size,
                backing_file: qcow2.backing_file,
                backing_format: qcow2.backing_format,
                allocated_clusters: qcow2.allocated_clusters,
            },
            ImageInfo::Cpio(cpio) => Facts::Cpio {
                compression: if cpio.gzip { "gzip" } else { "none" },
                entries: cpio.entries,
                dirs: cpio.dirs,
                files: cpio.files,
                symlinks: cpio.symlinks,
                other: cpio.other,
                data_bytes: cpio.data_bytes,
            },
            // ImageInfo is non-exhaustive: a kind this binary does not know yet.
            other => bail!("kiln does not know how to report {other:?}"),
        })
    }
}

/// A UUID as `blkid` and `dumpe2fs` print it: 8-4-4-4-12 lower-case hex.
pub(super) fn uuid_text(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// One `name: value` line per fact of the JSON object (path and format
/// first, then by name); sizes in bytes also get a human-readable figure.
fn human(report: &Report) -> anyhow::Result<String> {
    let serde_json::Value::Object(fields) = serde_json::to_value(report)? else {
        bail!("the report is not an object");
    };
    let mut fields: Vec<(&String, &serde_json::Value)> = fields.iter().collect();
    fields.sort_by_key(|(key, _)| (key.as_str() != "path", key.as_str() != "format", key.as_str()));
    let width = fields.iter().map(|(key, _)| key.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in fields {
        let text = match value {
            serde_json::Value::Null => "none".to_owned(),
            serde_json::Value::String(text) => text.clone(),
            serde_json::Value::Number(n) if key.ends_with("_bytes") || key.ends_with("_size") => match n.as_u64() {
                Some(bytes) if bytes >= 1024 => format!("{bytes} ({})", human_bytes(bytes)),
                _ => n.to_string(),
            },
            // Feature lists read as dumpe2fs prints them: names and spaces.
            serde_json::Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().map_or_else(|| item.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(" "),
            other => other.to_string(),
        };
        let label = format!("{}:", key.replace('_', " "));
        out.push_str(&format!("{label:width$} {text}\n"));
    }
    Ok(out)
}
