//! A VM's OCI image, on the host: kiln-oci's [`Store`] in the state
//! directory (`<state>/oci/`), pulling a source into it, and the image's
//! root filesystem as the VM boots it: one read-only ext4 per layer-chain
//! step, built once into the store (keyed by the chain's ChainID, where the
//! step starts, and [`ROOTFS_FORMAT`]) and shared by every VM and image
//! that has that chain. `kiln run`, `kiln image oci` and `kiln render` all
//! go through here, so they agree on what a VM of an image boots.

use std::ops::Range;
use std::path::{Path, PathBuf};

use kiln_imagefmt::Ext4Options;
use kiln_oci::{BlobProgress, Digest, Image, ImageSource, Store};
use serde::Serialize;

use super::container::ImageRuntime;
use crate::state::{VmClaim, VmImage};
use crate::{Result, StateDir};

/// The store's directory inside kiln's state directory.
pub const OCI_STORE_DIR: &str = "oci";

/// The most layer disks a VM gets; deeper images have their lowest layers
/// merged into the first disk (virtio-blk devices are PCI slots).
pub const MAX_LAYER_DISKS: usize = 8;

/// What a layer filesystem's bytes depend on besides its layers: kiln's
/// version (the ext4 writer and the layer semantics are in its tree) and
/// the revision of this layout (r2: no lost+found of the writer's). A kiln
/// of another version builds its own.
pub const ROOTFS_FORMAT: &str = concat!("kiln-", env!("CARGO_PKG_VERSION"), "-r2");

/// What happens as an image is pulled and converted, for a progress bar.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum ImageEvent<'a> {
    /// Bytes of one blob (config or layer) read from the source.
    Blob { digest: &'a Digest, done: u64, total: u64 },
    /// Layer filesystem `index` of `count` is being built.
    Converting { index: usize, count: usize },
}

/// Opens (creating) the image store of `state`.
pub fn open_image_store(state: &StateDir) -> Result<Store> {
    Ok(Store::open(state.root().join(OCI_STORE_DIR))?)
}

/// Parses a source string (`oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
/// `docker-archive:FILE[:REF]`, a registry reference); the error names it.
/// A relative local path is anchored at the current directory (a spec's
/// are anchored at the spec's already), so the store records one name per
/// image wherever kiln runs.
pub fn parse_image_source(text: &str) -> Result<ImageSource> {
    let source = text.parse::<ImageSource>()?;
    let anchored = match source {
        ImageSource::Layout { dir, tag } => ImageSource::Layout { dir: absolute(dir), tag },
        ImageSource::OciArchive { file, tag } => ImageSource::OciArchive { file: absolute(file), tag },
        ImageSource::DockerArchive { file, reference } => {
            ImageSource::DockerArchive { file: absolute(file), reference }
        }
        other => other,
    };
    Ok(anchored)
}

fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

/// Pulls `source` into `store` (every blob verified; warm, only its
/// manifest is read) and returns the image.
///
/// A registry is reached over HTTPS with the system's roots plus the CA
/// file [`REGISTRY_CA_ENV`] names, with credentials from Docker's
/// `config.json`; plain HTTP only to the hosts [`INSECURE_REGISTRIES_ENV`] lists.
pub fn pull_image(store: &Store, source: &ImageSource, events: &mut dyn FnMut(ImageEvent<'_>)) -> Result<Image> {
    let mut progress = |blob: &BlobProgress| {
        events(ImageEvent::Blob { digest: &blob.digest, done: blob.done, total: blob.total });
    };
    match source {
        ImageSource::Registry(reference) => {
            let client = registry_client()?;
            Ok(store.pull(&client.source(reference), &mut progress)?)
        }
        local => Ok(store.pull(local.open()?.as_ref(), &mut progress)?),
    }
}

/// A CA certificate file (PEM) registries are trusted with, besides the system's roots.
pub const REGISTRY_CA_ENV: &str = "KILN_REGISTRY_CA";
/// Registries (`host[:port]`, comma-separated) spoken to over plain HTTP.
pub const INSECURE_REGISTRIES_ENV: &str = "KILN_INSECURE_REGISTRIES";

fn registry_client() -> Result<kiln_oci::RegistryClient> {
    let mut builder = kiln_oci::RegistryClient::builder();
    if let Some(ca) = std::env::var_os(REGISTRY_CA_ENV).filter(|ca| !ca.is_empty()) {
        builder = builder.extra_ca_file(Path::new(&ca));
    }
    for host in std::env::var(INSECURE_REGISTRIES_ENV).unwrap_or_default().split(',').map(str::trim) {
        if !host.is_empty() {
            builder = builder.insecure_registry(host);
        }
    }
    Ok(builder.build()?)
}

/// The image's layers grouped into at most [`MAX_LAYER_DISKS`]
/// filesystems, bottom first: one per layer, except that an image deeper
/// than that has its lowest layers merged into the first.
pub(crate) fn layer_groups(count: usize) -> Vec<Range<usize>> {
    if count <= MAX_LAYER_DISKS {
        return (0..count).map(|index| index..index + 1).collect();
    }
    let merged = count - (MAX_LAYER_DISKS - 1);
    std::iter::once(0..merged).chain((merged..count).map(|index| index..index + 1)).collect()
}

/// One layer filesystem of an image, as [`image_rootfs`] made or found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LayerDisk {
    /// The ext4 image in the store.
    pub path: PathBuf,
    /// The ChainID of the layers up to and including its last.
    pub chain_id: String,
    /// The image's layers it holds the changes of (indices, bottom = 0).
    pub layers: Range<usize>,
    /// Whether this call built it (false: it was in the store).
    #[serde(skip)]
    pub built: bool,
}

/// Where the filesystem of layer group `group` ending in chain `chain` lives.
fn layer_disk_path(store: &Store, chain: &Digest, group: &Range<usize>) -> Result<PathBuf> {
    Ok(store.derived_dir(chain)?.join(layer_disk_name(group)))
}

fn layer_disk_name(group: &Range<usize>) -> String {
    format!("from{}.{ROOTFS_FORMAT}.ext4", group.start)
}

/// `kiln gc`'s sweep of the image store: images no VM references and what
/// only they used, and in the layer filesystem directories that stay,
/// killed builds' temp files. Layer filesystems of another
/// [`ROOTFS_FORMAT`] go with their directory, not before: a VM of another
/// kiln that uses the chain may not have opened them yet. With
/// `dry_run`, what it would remove once the references of `releasing` (the
/// dead VMs a real pass releases first) are gone; nothing is removed.
pub(crate) fn sweep_image_store(store: &Store, dry_run: Option<&[String]>) -> Result<kiln_oci::GcReport> {
    let options = kiln_oci::GcOptions::default();
    let options = match dry_run {
        Some(releasing) => options.dry_run(true).as_if_released(releasing),
        None => options,
    };
    Ok(store.gc_with(&options)?)
}

/// The layer filesystems a VM of `image` would attach, bottom first, as
/// [`image_rootfs`] names them, without creating anything (for `kiln
/// render`): the store's `derived/sha256/<chain>/` directories.
pub(crate) fn planned_layer_disks(state: &StateDir, image: &Image) -> Vec<PathBuf> {
    let chains = image.chain_ids();
    let derived = state.root().join(OCI_STORE_DIR).join("derived/sha256");
    layer_groups(image.layers().len())
        .iter()
        .map(|group| derived.join(chains[group.end - 1].hex()).join(layer_disk_name(group)))
        .collect()
}

/// The layer filesystems a VM of `image` boots, bottom first, building
/// those the store does not hold yet (each written to a temporary file and
/// renamed, so a failure leaves none half-written). A base two images
/// share is built once: the file is named by the chain it ends.
pub fn image_rootfs(store: &Store, image: &Image, events: &mut dyn FnMut(ImageEvent<'_>)) -> Result<Vec<LayerDisk>> {
    // gc waits while the guard lives, and waits for us: nothing it removes
    // can be in use here.
    let _guard = store.guard()?;
    let chains = image.chain_ids();
    let groups = layer_groups(image.layers().len());
    let count = groups.len();
    let mut disks = Vec::with_capacity(count);
    for (index, group) in groups.into_iter().enumerate() {
        let chain = chains[group.end - 1];
        let path = layer_disk_path(store, &chain, &group)?;
        let built = !path.is_file();
        if built {
            events(ImageEvent::Converting { index, count });
            write_layer_disk(store, image, &group, &path)?;
        }
        disks.push(LayerDisk { path, chain_id: chain.to_string(), layers: group, built });
    }
    Ok(disks)
}

/// Builds the filesystem of `group`'s layers over the ones below it
/// (their metadata replayed, their data not read): what overlayfs needs of
/// that step, file data as byte ranges of the store's layer tars.
fn write_layer_disk(store: &Store, image: &Image, group: &Range<usize>, path: &Path) -> Result<()> {
    let tars: Vec<kiln_oci::LayerTar> = image.layers()[..group.end]
        .iter()
        .map(|layer| kiln_oci::LayerTar::new(store.layer_path(layer.diff_id()), layer.diff_id().to_string()))
        .collect();
    let (lower, upper) = tars.split_at(group.start);
    let tree = kiln_oci::layer_tree(image.source(), lower, upper)?;
    // From the file's name (chain, start, format): two hosts build the same bytes.
    let name = path.file_name().map(|name| name.as_encoded_bytes()).unwrap_or_default();
    let chain = path.parent().and_then(Path::file_name).map(|name| name.as_encoded_bytes()).unwrap_or_default();
    let uuid = kiln_types::hash::Fnv1a64::new().field(b"kiln oci layer").field(chain).uuid(name);
    // No lost+found of the writer's: the container's / holds exactly the image's
    // (a read-only disk is never repaired, so e2fsck needs none).
    let options = Ext4Options::default().with_uuid(uuid).with_lost_found(false);
    tree.layout(&options)?.write_file(path)?;
    Ok(())
}

/// An image made ready for one VM: pulled, referenced in the store for the
/// VM, and its layer filesystems there.
#[derive(Debug)]
pub(crate) struct PreparedImage {
    pub(crate) image: Image,
    pub(crate) disks: Vec<LayerDisk>,
    /// Milliseconds of host-side work, from parsing the source to the last
    /// layer filesystem found or built.
    pub(crate) host_ms: f64,
}

/// Pulls `source` for VM `claim` names, records the image in the VM's
/// record *before* the store reference is taken (so `kiln gc` of a killed
/// launcher finds and releases it), takes it, and finds or builds the
/// layer filesystems. A store gc waits until all of that is done.
pub(crate) fn prepare_for_vm(
    store: &Store,
    source: &str,
    claim: &mut VmClaim,
    events: &mut dyn FnMut(ImageEvent<'_>),
) -> Result<PreparedImage> {
    let started = std::time::Instant::now();
    let source = parse_image_source(source)?;
    let _guard = store.guard()?;
    let image = pull_image(store, &source, events)?;
    claim.record.image =
        Some(VmImage { source: image.source().to_owned(), manifest: image.manifest_digest().to_string() });
    claim.save()?;
    store.retain(&claim.record.name, image.manifest_digest())?;
    let disks = image_rootfs(store, &image, events)?;
    Ok(PreparedImage { image, disks, host_ms: started.elapsed().as_secs_f64() * 1e3 })
}

/// What of `image`'s config a container runs with.
pub(crate) fn image_runtime(image: &Image) -> ImageRuntime {
    let runtime = image.runtime();
    ImageRuntime {
        entrypoint: runtime.entrypoint().to_vec(),
        cmd: runtime.cmd().to_vec(),
        env: runtime.env().to_vec(),
        working_dir: runtime.working_dir().unwrap_or_default().to_owned(),
        user: runtime.user().unwrap_or_default().to_owned(),
        stop_signal: runtime.stop_signal().unwrap_or_default().to_owned(),
    }
}

/// The image the store holds for source string `source`, if a pull of it
/// recorded one; of several (a tag that moved), the latest pulled. No
/// source is opened and nothing is written: `kiln render` touches nothing.
/// A source kiln cannot parse (a Pod's image may be any reference the
/// cluster's runtime takes) is in no store: `None`.
pub fn cached_image(state: &StateDir, source: &str) -> Result<Option<Image>> {
    let Ok(wanted) = parse_image_source(source) else { return Ok(None) };
    // No store yet: none is created just to look.
    if !state.root().join(OCI_STORE_DIR).join("images/sha256").is_dir() {
        return Ok(None);
    }
    Ok(open_image_store(state)?.find(&wanted.to_string())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_images_merge_their_lowest_layers_so_a_vm_gets_at_most_eight_disks() {
        let shown = |count| format!("{:?}", layer_groups(count));
        assert_eq!(shown(0), "[]");
        assert_eq!(shown(1), "[0..1]");
        assert_eq!(shown(8), "[0..1, 1..2, 2..3, 3..4, 4..5, 5..6, 6..7, 7..8]");
        assert_eq!(shown(9), "[0..2, 2..3, 3..4, 4..5, 5..6, 6..7, 7..8, 8..9]");
        assert_eq!(shown(20), "[0..13, 13..14, 14..15, 15..16, 16..17, 17..18, 18..19, 19..20]");
    }
}
