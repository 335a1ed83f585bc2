//! Geometry and placement: every decision about the image, made from the
//! tree's metadata alone. Writing a [`FatLayout`] only copies bytes.

use std::io::{Seek, Write};
use std::path::Path;

use kiln_types::hash::Fnv1a64;

use super::names;
use super::time::DosTime;
use super::tree::{Dir, FileNode, Node};
use super::{FatOptions, FatSummary, FatTree, FatType};
use crate::qcow2::Unwritten;
use crate::{Error, Result};

pub(crate) const SECTOR: u32 = 512;
const DIR_ENTRY: u64 = 32;
/// Cluster counts per type, as the specification (and dosfstools) bound them.
const FAT12_MAX_CLUSTERS: u64 = 4084;
const FAT16_MAX_CLUSTERS: u64 = 65524;
const FAT32_MAX_CLUSTERS: u64 = 0x0FFF_FFF4;
/// The most 32-byte slots any directory may have (a 2 MiB directory).
const MAX_DIR_SLOTS: u64 = 65536;
/// The most root entries a FAT12/16 BPB can state: a multiple of 16 below 2^16.
const MAX_ROOT_ENTRIES: u32 = 65520;
/// Root entries of a FAT12/16 root directory unless more are needed.
const DEFAULT_ROOT_ENTRIES: u64 = 512;
/// Cluster sizes tried, in bytes. 4 KiB (a page, a filesystem block) comes
/// first so that file data sits block-aligned in the image, which keeps
/// `copy_file_range` and reflinks cheap.
const CLUSTER_SIZES: [u32; 7] = [4096, 8192, 16384, 32768, 2048, 1024, 512];
/// Largest cluster count before the automatic size prefers bigger clusters.
const PREFERRED_MAX_CLUSTERS: u64 = 4 << 20;
/// Automatic images are rounded up to this many sectors (1 MiB).
const SIZE_ROUNDING_SECTORS: u64 = 2048;

impl FatType {
    fn cluster_range(self) -> (u64, u64) {
        match self {
            FatType::Fat12 => (1, FAT12_MAX_CLUSTERS),
            FatType::Fat16 => (FAT12_MAX_CLUSTERS + 1, FAT16_MAX_CLUSTERS),
            FatType::Fat32 => (FAT16_MAX_CLUSTERS + 1, FAT32_MAX_CLUSTERS),
        }
    }

    /// The type the specification assigns to a volume of `clusters` clusters.
    fn for_clusters(clusters: u64) -> FatType {
        if clusters <= FAT12_MAX_CLUSTERS {
            FatType::Fat12
        } else if clusters <= FAT16_MAX_CLUSTERS {
            FatType::Fat16
        } else {
            FatType::Fat32
        }
    }
}

/// Where the regions of the volume sit, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) fat_type: FatType,
    pub(crate) sectors_per_cluster: u32,
    /// Includes the padding that aligns the data region to a cluster.
    pub(crate) reserved_sectors: u32,
    pub(crate) fat_sectors: u32,
    /// FAT12/16 only; 0 on FAT32, whose root is a cluster chain.
    pub(crate) root_entries: u32,
    pub(crate) total_sectors: u32,
    pub(crate) clusters: u32,
}

impl Geometry {
    pub(crate) fn cluster_bytes(&self) -> u64 {
        u64::from(self.sectors_per_cluster) * u64::from(SECTOR)
    }

    pub(crate) fn fat_offset(&self, copy: u32) -> u64 {
        u64::from(self.reserved_sectors + copy * self.fat_sectors) * u64::from(SECTOR)
    }

    pub(crate) fn root_dir_offset(&self) -> u64 {
        self.fat_offset(2)
    }

    fn root_dir_sectors(&self) -> u32 {
        self.root_entries * DIR_ENTRY as u32 / SECTOR
    }

    pub(crate) fn cluster_offset(&self, cluster: u32) -> u64 {
        let data_start = u64::from(self.reserved_sectors + 2 * self.fat_sectors + self.root_dir_sectors());
        (data_start + u64::from(cluster - 2) * u64::from(self.sectors_per_cluster)) * u64::from(SECTOR)
    }

    pub(crate) fn image_bytes(&self) -> u64 {
        u64::from(self.total_sectors) * u64::from(SECTOR)
    }
}

/// Fixed part of a geometry: everything but the size.
#[derive(Debug, Clone, Copy)]
struct Shape {
    fat_type: FatType,
    sectors_per_cluster: u64,
    root_entries: u64,
}

impl Shape {
    fn base_reserved(&self) -> u64 {
        if self.fat_type == FatType::Fat32 { 32 } else { 1 }
    }

    fn root_sectors(&self) -> u64 {
        self.root_entries * DIR_ENTRY / u64::from(SECTOR)
    }

    fn fat_sectors_for(&self, clusters: u64) -> u64 {
        let entries = clusters + 2;
        let bytes = (entries * u64::from(self.fat_type.bits())).div_ceil(8);
        bytes.div_ceil(u64::from(SECTOR))
    }

    /// Reserved sectors (with alignment padding) and the data region's
    /// first sector, given the FAT size.
    fn metadata(&self, fat_sectors: u64) -> (u64, u64) {
        let unaligned = self.base_reserved() + 2 * fat_sectors + self.root_sectors();
        let pad = (self.sectors_per_cluster - unaligned % self.sectors_per_cluster) % self.sectors_per_cluster;
        (self.base_reserved() + pad, unaligned + pad)
    }

    fn finish(&self, reserved: u64, fat_sectors: u64, total: u64, clusters: u64) -> Option<Geometry> {
        let (low, high) = self.fat_type.cluster_range();
        if !(low..=high).contains(&clusters) {
            return None;
        }
        Some(Geometry {
            fat_type: self.fat_type,
            sectors_per_cluster: u32::try_from(self.sectors_per_cluster).ok()?,
            reserved_sectors: u32::try_from(reserved).ok().filter(|&r| r <= u32::from(u16::MAX))?,
            fat_sectors: u32::try_from(fat_sectors).ok()?,
            // The BPB holds the root's entry count in 16 bits.
            root_entries: u32::try_from(self.root_entries).ok().filter(|&r| r <= MAX_ROOT_ENTRIES)?,
            total_sectors: u32::try_from(total).ok()?,
            clusters: u32::try_from(clusters).ok()?,
        })
    }

    /// The smallest volume with exactly `clusters` clusters.
    fn with_clusters(&self, clusters: u64) -> Option<Geometry> {
        let fat_sectors = self.fat_sectors_for(clusters);
        let (reserved, data_start) = self.metadata(fat_sectors);
        self.finish(reserved, fat_sectors, data_start + clusters * self.sectors_per_cluster, clusters)
    }

    /// The volume filling `total` sectors. The FAT is sized for the most
    /// clusters the size could hold, so it may have a few spare entries.
    fn with_total(&self, total: u64) -> Option<Geometry> {
        let upper = total.checked_sub(self.base_reserved() + self.root_sectors())? / self.sectors_per_cluster;
        let fat_sectors = self.fat_sectors_for(upper);
        let (reserved, data_start) = self.metadata(fat_sectors);
        let clusters = total.checked_sub(data_start)? / self.sectors_per_cluster;
        self.finish(reserved, fat_sectors, total, clusters)
    }
}

/// One directory to write: its children in on-disk order and its chain.
#[derive(Debug)]
pub(crate) struct DirPlan<'t> {
    pub(crate) entries: Vec<EntryPlan<'t>>,
    /// 32-byte slots used, including `.`/`..` or the volume label.
    pub(crate) slots: u64,
    /// Index of the parent in `FatLayout::dirs`; `None` for the root.
    pub(crate) parent: Option<usize>,
    /// First cluster; 0 for a FAT12/16 root, which lives outside the data region.
    pub(crate) first_cluster: u32,
    pub(crate) cluster_count: u32,
}

#[derive(Debug)]
pub(crate) struct EntryPlan<'t> {
    pub(crate) name: &'t str,
    pub(crate) short: [u8; 11],
    pub(crate) needs_long_name: bool,
    pub(crate) target: EntryTarget,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum EntryTarget {
    Dir(usize),
    File(usize),
}

#[derive(Debug)]
pub(crate) struct FilePlan<'t> {
    pub(crate) node: &'t FileNode,
    pub(crate) first_cluster: u32,
}

/// A fully planned image: geometry, every name and every cluster chain.
/// Writing it only copies bytes.
#[derive(Debug)]
pub struct FatLayout<'t> {
    pub(crate) tree: &'t FatTree,
    pub(crate) geometry: Geometry,
    pub(crate) label: Option<[u8; 11]>,
    pub(crate) volume_id: u32,
    pub(crate) time: DosTime,
    /// Pre-order; index 0 is the root.
    pub(crate) dirs: Vec<DirPlan<'t>>,
    /// Pre-order, after all directories in the data region.
    pub(crate) files: Vec<FilePlan<'t>>,
    /// Clusters in use, allocated contiguously from cluster 2.
    pub(crate) used_clusters: u32,
    /// The last cluster of every chain, ascending: the FAT is derived from it.
    pub(crate) chain_ends: Vec<u32>,
}

impl FatTree {
    /// Plans the image for `options`. Pure: reads no file contents.
    pub fn layout(&self, options: &FatOptions) -> Result<FatLayout<'_>> {
        let label = options.label.as_deref().map(parse_label).transpose()?;
        if let Some(size) = options.cluster_size {
            check_cluster_size(size)?;
        }
        let (dirs, files) = plan_entries(self, label.is_some())?;
        let demand = Demand { dirs: &dirs, files: &files };
        let geometry = match options.size {
            Some(size) => fixed_size_geometry(&demand, options, size)?,
            None => automatic_geometry(&demand, options, true)?,
        };
        let mut layout = FatLayout {
            tree: self,
            geometry,
            label,
            volume_id: 0,
            time: DosTime::from_unix(options.epoch),
            dirs,
            files,
            used_clusters: 0,
            chain_ends: Vec::new(),
        };
        layout.allocate();
        layout.volume_id = options.volume_id.unwrap_or_else(|| layout.derived_volume_id(options.epoch));
        Ok(layout)
    }
}

impl FatLayout<'_> {
    /// What the image holds.
    pub fn summary(&self) -> FatSummary {
        FatSummary {
            fat_type: self.geometry.fat_type,
            cluster_size: self.geometry.cluster_bytes() as u32,
            clusters: self.geometry.clusters,
            free_clusters: self.geometry.clusters - self.used_clusters,
            image_bytes: self.geometry.image_bytes(),
            files: self.tree.file_count(),
            dirs: self.tree.dir_count(),
            data_bytes: self.tree.data_bytes(),
            volume_id: self.volume_id,
        }
    }

    /// Writes the image to `out`, which must be empty (a new file or an
    /// empty buffer; anything else is refused): regions that are zero in
    /// the image are skipped, so old bytes would show through.
    pub fn write_to<W: Write + Seek>(&self, out: &mut W) -> Result<()> {
        let mut sink = crate::sink::WriteSeekSink::new(out).map_err(Error::Write)?;
        self.emit(&mut sink, &mut |_| {})
    }

    /// Writes the image to `path` atomically: into a temporary file in the
    /// same directory, committed (the buffer flushed, errors checked) and renamed over
    /// `path` once complete. Secret trees ([`FatTree::is_secret`]) get mode
    /// 0600 from the start, others 0644, less the umask. File data moves
    /// with `copy_file_range`, and `progress` sees the data bytes written so far.
    pub fn write_file(&self, path: &Path, progress: Option<&mut dyn FnMut(u64)>) -> Result<FatSummary> {
        let mut ignore = |_| {};
        let progress = progress.unwrap_or(&mut ignore);
        let mode = crate::sink::image_mode(self.tree.is_secret());
        crate::sink::write_atomically(path, mode, |sink| self.emit(sink, progress))?;
        Ok(self.summary())
    }

    /// Writes the image as qcow2 to `path`, atomically and with the same
    /// mode as [`FatLayout::write_file`], with no raw intermediate: only
    /// clusters holding non-zero bytes are allocated. With a backing file in
    /// `options`, the rest are written as zero clusters, so the image reads
    /// as this volume and nothing of the backing file shows through.
    pub fn write_qcow2_file(
        &self,
        path: &Path,
        options: &crate::Qcow2Options,
        progress: Option<&mut dyn FnMut(u64)>,
    ) -> Result<FatSummary> {
        let mut ignore = |_| {};
        let progress = progress.unwrap_or(&mut ignore);
        let mode = crate::sink::image_mode(self.tree.is_secret());
        crate::sink::write_atomically(path, mode, |sink| {
            let size = self.geometry.image_bytes();
            let mut qcow2 = crate::qcow2::Qcow2Writer::new(sink.file(), size, options, Unwritten::ReadsAsZero)?;
            self.emit(&mut qcow2, progress)
        })?;
        Ok(self.summary())
    }

    /// Gives each directory and file its clusters: the FAT32 root, then the
    /// other directories, then file data, each in pre-order.
    fn allocate(&mut self) {
        let cluster_bytes = self.geometry.cluster_bytes();
        let fat32 = self.geometry.fat_type == FatType::Fat32;
        let mut next = 2u32;
        for (index, dir) in self.dirs.iter_mut().enumerate() {
            if index == 0 && !fat32 {
                continue;
            }
            dir.cluster_count = clusters_for(dir.slots * DIR_ENTRY, cluster_bytes).max(1) as u32;
            dir.first_cluster = next;
            next += dir.cluster_count;
            self.chain_ends.push(next - 1);
        }
        for file in &mut self.files {
            let count = clusters_for(file.node.size, cluster_bytes) as u32;
            if count == 0 {
                continue;
            }
            file.first_cluster = next;
            next += count;
            self.chain_ends.push(next - 1);
        }
        self.used_clusters = next - 2;
    }

    /// A serial number that changes with the content but not between runs.
    fn derived_volume_id(&self, epoch: i64) -> u32 {
        let mut hash = Fnv1a64::new();
        hash.feed(&self.label.unwrap_or(*b"NO NAME    "));
        hash.feed(&epoch.to_le_bytes());
        for dir in &self.dirs {
            for entry in &dir.entries {
                hash.feed(entry.name.as_bytes());
                if let EntryTarget::File(index) = entry.target {
                    hash.feed(&self.files[index].node.size.to_le_bytes());
                }
            }
        }
        let hash = hash.finish();
        (hash ^ (hash >> 32)) as u32
    }
}

fn clusters_for(bytes: u64, cluster_bytes: u64) -> u64 {
    bytes.div_ceil(cluster_bytes)
}

fn parse_label(label: &str) -> Result<[u8; 11]> {
    let invalid = |reason: &str| Error::InvalidLabel { label: label.to_owned(), reason: reason.to_owned() };
    let upper = label.to_ascii_uppercase();
    if upper.is_empty() {
        return Err(invalid("it is empty"));
    }
    if upper.len() > 11 {
        return Err(invalid(&format!("{} bytes; a FAT label holds at most 11", upper.len())));
    }
    if let Some(c) = upper.chars().find(|&c| !(c == ' ' || c.is_ascii() && names::is_short_char(c as u8))) {
        return Err(invalid(&format!("{c:?} is not allowed; use A-Z, 0-9, space and !#$%&'()-@^_`{{}}~")));
    }
    if upper.starts_with(' ') {
        return Err(invalid("it starts with a space"));
    }
    // Labels are space-padded: a trailing space could not be read back.
    if upper.ends_with(' ') {
        return Err(invalid("it ends with a space, which FAT cannot tell from its padding"));
    }
    let mut out = [b' '; 11];
    out[..upper.len()].copy_from_slice(upper.as_bytes());
    Ok(out)
}

fn check_cluster_size(size: u32) -> Result<()> {
    if size.is_power_of_two() && (512..=32768).contains(&size) {
        return Ok(());
    }
    Err(Error::InvalidClusterSize { size, reason: "it must be a power of two from 512 to 32768 bytes".into() })
}

/// Flattens the tree in pre-order and names every entry.
fn plan_entries(tree: &FatTree, has_label: bool) -> Result<(Vec<DirPlan<'_>>, Vec<FilePlan<'_>>)> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    plan_dir(&tree.root, None, has_label, &mut dirs, &mut files);
    if let Some(index) = dirs.iter().position(|d| d.slots > MAX_DIR_SLOTS) {
        return Err(Error::TooManyEntries { dir: dir_path(&dirs, index), slots: dirs[index].slots });
    }
    Ok((dirs, files))
}

/// The `/`-separated path of directory `index`, for error messages.
fn dir_path(dirs: &[DirPlan<'_>], index: usize) -> String {
    let mut parts = Vec::new();
    let mut at = index;
    while let Some(parent) = dirs[at].parent {
        let name = dirs[parent].entries.iter().find(|e| matches!(e.target, EntryTarget::Dir(d) if d == at));
        parts.push(name.map_or("?", |e| e.name));
        at = parent;
    }
    parts.reverse();
    format!("/{}", parts.join("/"))
}

fn plan_dir<'t>(
    dir: &'t Dir,
    parent: Option<usize>,
    has_label: bool,
    dirs: &mut Vec<DirPlan<'t>>,
    files: &mut Vec<FilePlan<'t>>,
) {
    let index = dirs.len();
    // Exact 8.3 names keep their name; generated ones must avoid them all.
    let mut shorts = names::ShortNames::default();
    for short in dir.children.keys().filter_map(|n| names::exact_short_name(n)) {
        shorts.reserve(short);
    }
    let mut entries = Vec::with_capacity(dir.children.len());
    let mut slots = if parent.is_none() { u64::from(has_label) } else { 2 };
    for name in dir.children.keys() {
        let exact = names::exact_short_name(name);
        let short = exact.unwrap_or_else(|| shorts.generate(name));
        let needs_long_name = exact.is_none();
        slots += 1 + if needs_long_name { names::lfn_entry_count(name) as u64 } else { 0 };
        entries.push(EntryPlan { name, short, needs_long_name, target: EntryTarget::File(0) });
    }
    dirs.push(DirPlan { entries, slots, parent, first_cluster: 0, cluster_count: 0 });
    // Children: directories get pre-order indices as they are visited.
    for (position, node) in dir.children.values().enumerate() {
        let target = match node {
            Node::Dir(sub) => {
                let sub_index = dirs.len();
                plan_dir(sub, Some(index), false, dirs, files);
                EntryTarget::Dir(sub_index)
            }
            Node::File(file) => {
                files.push(FilePlan { node: file, first_cluster: 0 });
                EntryTarget::File(files.len() - 1)
            }
        };
        dirs[index].entries[position].target = target;
    }
}

/// Clusters the content needs at a given cluster size.
struct Demand<'a, 't> {
    dirs: &'a [DirPlan<'t>],
    files: &'a [FilePlan<'t>],
}

impl Demand<'_, '_> {
    fn clusters(&self, cluster_bytes: u64, fat_type: FatType) -> u64 {
        let fat32 = fat_type == FatType::Fat32;
        let dirs: u64 = self
            .dirs
            .iter()
            .enumerate()
            .filter(|(index, _)| fat32 || *index != 0)
            .map(|(_, dir)| clusters_for(dir.slots * DIR_ENTRY, cluster_bytes).max(1))
            .sum();
        let files: u64 = self.files.iter().map(|f| clusters_for(f.node.size, cluster_bytes)).sum();
        dirs + files
    }

    fn root_entries(&self, fat_type: FatType) -> u64 {
        if fat_type == FatType::Fat32 {
            return 0;
        }
        // A multiple of 16 keeps the root region whole sectors.
        self.dirs[0].slots.next_multiple_of(16).max(DEFAULT_ROOT_ENTRIES)
    }

    fn shape(&self, fat_type: FatType, cluster_size: u32) -> Shape {
        Shape {
            fat_type,
            sectors_per_cluster: u64::from(cluster_size / SECTOR),
            root_entries: self.root_entries(fat_type),
        }
    }
}

fn cluster_candidates(options: &FatOptions) -> Vec<u32> {
    match options.cluster_size {
        Some(size) => vec![size],
        None => CLUSTER_SIZES.to_vec(),
    }
}

/// Content plus headroom, as small as the FAT type allows. With no type
/// forced, 4 KiB clusters (larger for very large content) and the type the
/// cluster count implies; with a type forced, the cluster size that gives
/// the smallest valid image.
fn automatic_geometry(demand: &Demand<'_, '_>, options: &FatOptions, headroom: bool) -> Result<Geometry> {
    let mut best: Option<Geometry> = None;
    for cluster_size in cluster_candidates(options) {
        let cluster_bytes = u64::from(cluster_size);
        let types = match options.fat_type {
            Some(forced) => vec![forced],
            None => {
                let needed = demand.clusters(cluster_bytes, FatType::Fat16);
                let fat_type = FatType::for_clusters(needed + headroom_clusters(needed, cluster_bytes, headroom));
                // FAT32 puts the root in the data region, which can move the count.
                vec![fat_type, FatType::Fat32]
            }
        };
        for fat_type in types {
            let needed = demand.clusters(cluster_bytes, fat_type);
            let (low, _) = fat_type.cluster_range();
            let clusters = (needed + headroom_clusters(needed, cluster_bytes, headroom)).max(low);
            let shape = demand.shape(fat_type, cluster_size);
            let Some(exact) = shape.with_clusters(clusters) else { continue };
            // Round to whole MiB when that keeps the type.
            let rounded = u64::from(exact.total_sectors).next_multiple_of(SIZE_ROUNDING_SECTORS);
            let geometry = shape.with_total(rounded).filter(|g| u64::from(g.clusters) >= needed).unwrap_or(exact);
            if options.fat_type.is_none() {
                // The first cluster size that works, unless it means too many clusters.
                if u64::from(geometry.clusters) <= PREFERRED_MAX_CLUSTERS || cluster_size == 32768 {
                    return Ok(geometry);
                }
                best = best.or(Some(geometry));
                break;
            }
            if best.is_none_or(|b| geometry.total_sectors < b.total_sectors) {
                best = Some(geometry);
            }
        }
    }
    best.ok_or_else(|| match options.fat_type {
        Some(fat_type) => {
            Error::FatTypeImpossible { fat_type, reason: "the content needs more clusters than it can address".into() }
        }
        None => Error::DoesNotFit { needed: demand_bytes(demand), size: u64::from(u32::MAX) * u64::from(SECTOR) },
    })
}

fn headroom_clusters(needed: u64, cluster_bytes: u64, headroom: bool) -> u64 {
    if !headroom {
        return 0;
    }
    // 1/32 of the content plus 256 KiB: room to grow, cheap in a sparse file.
    needed / 32 + (256 << 10) / cluster_bytes
}

fn demand_bytes(demand: &Demand<'_, '_>) -> u64 {
    demand.clusters(4096, FatType::Fat32) * 4096
}

fn fixed_size_geometry(demand: &Demand<'_, '_>, options: &FatOptions, size: u64) -> Result<Geometry> {
    let invalid = |reason: &str| Error::InvalidSize { size, reason: reason.to_owned() };
    if size == 0 {
        return Err(invalid("it must be more than 0"));
    }
    if size % u64::from(SECTOR) != 0 {
        return Err(invalid("it must be a multiple of 512 bytes"));
    }
    let total = size / u64::from(SECTOR);
    if total > u64::from(u32::MAX) {
        return Err(invalid("FAT addresses at most 2 TiB - 512 bytes"));
    }
    let mut candidates = cluster_candidates(options);
    // Prefer the cluster size that keeps the cluster count moderate.
    if options.cluster_size.is_none() {
        candidates.sort_by_key(|&c| (u64::from(c) * PREFERRED_MAX_CLUSTERS < size, c < 4096, c));
    }
    let types = match options.fat_type {
        Some(forced) => vec![forced],
        None => vec![FatType::Fat12, FatType::Fat16, FatType::Fat32],
    };
    let mut smallest_need: Option<u64> = None;
    let mut type_possible = false;
    for &cluster_size in &candidates {
        for &fat_type in &types {
            let shape = demand.shape(fat_type, cluster_size);
            let Some(geometry) = shape.with_total(total) else { continue };
            type_possible = true;
            let needed = demand.clusters(u64::from(cluster_size), fat_type);
            if needed <= u64::from(geometry.clusters) {
                return Ok(geometry);
            }
            let need_bytes = size + (needed - u64::from(geometry.clusters)) * u64::from(cluster_size);
            smallest_need = Some(smallest_need.map_or(need_bytes, |n| n.min(need_bytes)));
        }
    }
    if !type_possible && let Some(fat_type) = options.fat_type {
        let (low, high) = fat_type.cluster_range();
        return Err(Error::FatTypeImpossible {
            fat_type,
            reason: format!(
                "{fat_type} needs {low} to {high} clusters, and a {size}-byte image cannot have that many with any cluster size{}",
                options.cluster_size.map(|c| format!(" (forced to {c} bytes)")).unwrap_or_default()
            ),
        });
    }
    let needed = match smallest_need {
        Some(n) => n,
        // No geometry fits at all: report what the content would need.
        None => {
            let auto = automatic_geometry(demand, options, false)?;
            auto.image_bytes()
        }
    };
    Err(Error::DoesNotFit { needed, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    fn check(build: impl FnOnce(&mut FatTree), options: FatOptions, expect: Expect) {
        let mut tree = FatTree::new();
        build(&mut tree);
        let actual = match tree.layout(&options) {
            Ok(layout) => {
                let g = layout.geometry;
                format!(
                    "{} cluster={} reserved={} fat={} root={} total={} clusters={} used={}",
                    g.fat_type,
                    g.cluster_bytes(),
                    g.reserved_sectors,
                    g.fat_sectors,
                    g.root_entries,
                    g.total_sectors,
                    g.clusters,
                    layout.used_clusters
                )
            }
            Err(e) => format!("error: {e}"),
        };
        expect.assert_eq(&actual);
    }

    fn opts(fat_type: Option<FatType>, size: Option<u64>) -> FatOptions {
        FatOptions { epoch: 0, fat_type, size, ..FatOptions::default() }
    }

    fn file(size: usize) -> impl FnOnce(&mut FatTree) {
        move |t| t.add_file_from_bytes("f", vec![1u8; size]).unwrap()
    }

    #[test]
    fn geometries() {
        check(
            |_| {},
            opts(None, None),
            expect!["FAT12 cluster=4096 reserved=6 fat=1 root=512 total=2048 clusters=251 used=0"],
        );
        check(
            file(100 << 20),
            opts(None, None),
            expect!["FAT16 cluster=4096 reserved=8 fat=104 root=512 total=212992 clusters=26593 used=25600"],
        );
        check(
            file(300 << 20),
            opts(None, None),
            expect!["FAT32 cluster=4096 reserved=36 fat=622 root=0 total=636928 clusters=79456 used=76801"],
        );
        check(
            |_| {},
            opts(Some(FatType::Fat32), None),
            expect!["FAT32 cluster=512 reserved=32 fat=528 root=0 total=67584 clusters=66496 used=1"],
        );
        check(
            |_| {},
            opts(Some(FatType::Fat16), None),
            expect!["FAT16 cluster=512 reserved=1 fat=24 root=512 total=6144 clusters=6063 used=0"],
        );
        check(
            |_| {},
            opts(None, Some(64 << 20)),
            expect!["FAT16 cluster=4096 reserved=8 fat=64 root=512 total=131072 clusters=16363 used=0"],
        );
        check(
            |_| {},
            opts(Some(FatType::Fat32), Some(40 << 20)),
            expect!["FAT32 cluster=512 reserved=32 fat=640 root=0 total=81920 clusters=80608 used=1"],
        );
        check(
            |_| {},
            opts(Some(FatType::Fat16), Some(1 << 20)),
            expect![
                "error: FAT16 is impossible for this image: FAT16 needs 4085 to 65524 clusters, and a 1048576-byte image cannot have that many with any cluster size"
            ],
        );
        check(
            |_| {},
            opts(Some(FatType::Fat12), Some(1 << 30)),
            expect![
                "error: FAT12 is impossible for this image: FAT12 needs 1 to 4084 clusters, and a 1073741824-byte image cannot have that many with any cluster size"
            ],
        );
        check(
            file(3 << 20),
            opts(None, Some(2 << 20)),
            expect!["error: The content needs 3166208 bytes but the image is 2097152 bytes"],
        );
        check(
            |_| {},
            opts(None, Some(1000)),
            expect!["error: Invalid image size 1000: it must be a multiple of 512 bytes"],
        );
    }

    #[test]
    fn directory_slot_limits() {
        // Names of 37 characters take 4 slots each (3 long + 1 short).
        let many_long = |t: &mut FatTree| {
            for i in 0..17_000 {
                t.add_file_from_bytes(&format!("big/a rather long file name number {i:06}"), Vec::new()).unwrap();
            }
        };
        check(
            many_long,
            opts(None, None),
            expect![[
                r#"error: Directory "/big" needs 68002 entries (long names take several); FAT allows at most 65536"#
            ]],
        );
        // 65,528 root slots: more than a FAT12/16 BPB can state, so FAT32.
        let full_root = |t: &mut FatTree| {
            for i in 0..65_528 {
                t.add_file_from_bytes(&format!("F{i:06}"), Vec::new()).unwrap();
            }
        };
        check(
            full_root,
            opts(None, None),
            expect!["FAT32 cluster=4096 reserved=36 fat=514 root=0 total=526336 clusters=65659 used=512"],
        );
    }

    #[test]
    fn labels() {
        let check_label = |label: &str, expect: Expect| {
            let actual = match parse_label(label) {
                Ok(bytes) => format!("{:?}", String::from_utf8_lossy(&bytes)),
                Err(e) => e.to_string(),
            };
            expect.assert_eq(&actual);
        };
        check_label("servicedisk", expect![[r#""SERVICEDISK""#]]);
        check_label("CIDATA", expect![[r#""CIDATA     ""#]]);
        check_label("MY DISK", expect![[r#""MY DISK    ""#]]);
        // Found by fuzzing: "x " was stored as "X" plus padding.
        check_label(
            "x ",
            expect![[r#"Invalid volume label "x ": it ends with a space, which FAT cannot tell from its padding"#]],
        );
        check_label(
            "TWELVE CHARS",
            expect![[r#"Invalid volume label "TWELVE CHARS": 12 bytes; a FAT label holds at most 11"#]],
        );
        check_label(
            "a.b",
            expect![[r#"Invalid volume label "a.b": '.' is not allowed; use A-Z, 0-9, space and !#$%&'()-@^_`{}~"#]],
        );
    }
}
