//! Where images come from: the source strings kiln accepts (`oci:DIR[:TAG]`,
//! `oci-archive:FILE[:TAG]`, `docker-archive:FILE[:REF]`, `docker://REF` and
//! a bare registry reference), the [`BlobSource`] trait every kind of
//! source implements, and picking linux/amd64 out of an index.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::config::{Index, Manifest, ManifestKind, parse_json};
use crate::digest::{Digest, read_verified};
use crate::error::{Error, Result};

/// The largest manifest or index kiln reads (they are a few KiB; the
/// distribution spec lets registries refuse over 4 MiB).
pub(crate) const MANIFEST_LIMIT: u64 = 4 << 20;

/// Where blobs come from: an OCI layout directory, an archive, a registry.
///
/// A source hands out bytes; it need not verify them. The caller
/// ([`crate::Store::pull`]) checks every manifest, config and layer
/// against the digest and size its parent names, so a source cannot
/// smuggle content in. Implementations: the layout and the two archives
/// here, the distribution API in the registry module.
pub trait BlobSource {
    /// The image as the user named it (`oci:/images/app:1`), for errors.
    fn name(&self) -> &str;

    /// The document the source's reference names: a manifest or an index
    /// (a layout's tag, a registry's tag or digest, an archive's image).
    fn root(&self) -> Result<Fetched>;

    /// The manifest `digest` of an index, by digest (a blob in a layout;
    /// `/v2/NAME/manifests/DIGEST` on a registry).
    fn manifest(&self, digest: &Digest) -> Result<Fetched>;

    /// A config or layer blob, as a stream: layers are never held in memory.
    fn blob(&self, digest: &Digest) -> Result<Box<dyn Read + '_>>;
}

/// A manifest or index a [`BlobSource`] fetched.
#[derive(Debug, Clone)]
pub struct Fetched {
    bytes: Vec<u8>,
    media_type: Option<String>,
    expected: Option<(Digest, Option<u64>)>,
}

impl Fetched {
    /// `bytes` as fetched, with the media type the source declared
    /// (a registry's Content-Type, a descriptor's mediaType), if any.
    pub fn new(bytes: Vec<u8>, media_type: Option<String>) -> Fetched {
        Fetched { bytes, media_type, expected: None }
    }

    /// The digest (and size, when known) the bytes must have: a layout's
    /// index.json entry, a registry reference by digest. Checked by the caller.
    pub fn expecting(mut self, digest: Digest, size: Option<u64>) -> Fetched {
        self.expected = Some((digest, size));
        self
    }
}

/// A registry reference, `[HOST[:PORT]/]PATH[:TAG][@sha256:HEX]`, with
/// Docker's defaults: host `docker.io`, `library/` before a one-component
/// path on it, tag `latest` when neither tag nor digest is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryReference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl RegistryReference {
    /// The registry host (and port), `docker.io` by default.
    pub fn registry(&self) -> &str {
        &self.registry
    }
    /// The repository path, e.g. `library/busybox`.
    pub fn repository(&self) -> &str {
        &self.repository
    }
    /// The tag, if the reference has one (`latest` when it had neither tag nor digest).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }
    /// The digest, if the reference pins one; it wins over the tag.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }
}

impl fmt::Display for RegistryReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for RegistryReference {
    type Err = Error;

    fn from_str(text: &str) -> Result<RegistryReference> {
        let invalid = |reason: &str| Error::InvalidSource { spec: text.to_owned(), reason: reason.to_owned() };
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest.parse::<Digest>()?)),
            None => (text, None),
        };
        // A tag is after the last ':' that follows the last '/' (a port's ':' comes before it).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            if !is_tag(tag) || tag.starts_with(['.', '-']) {
                return Err(invalid("a tag is 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'"));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => (first, path),
            _ => ("docker.io", name),
        };
        // Docker Hub's old name is the same registry, with the same `library/` rule.
        let registry = if registry == "index.docker.io" { "docker.io" } else { registry };
        if path.is_empty() || !path.split('/').all(valid_path_component) {
            return Err(invalid(
                "a repository is lowercase components of [a-z0-9] joined by '.', '_', '__' or '-', separated by '/'",
            ));
        }
        let repository =
            if registry == "docker.io" && !path.contains('/') { format!("library/{path}") } else { path.to_owned() };
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_owned()),
            (tag, _) => tag.map(str::to_owned),
        };
        Ok(RegistryReference { registry: registry.to_owned(), repository, tag, digest })
    }
}

/// 1 to 128 of `[A-Za-z0-9_.-]`: a tag (a registry's also does not start
/// with `.` or `-`), and what may follow a local path's last `:`.
fn is_tag(text: &str) -> bool {
    !text.is_empty() && text.len() <= 128 && text.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// A registry reference with its tag written out (`busybox:1`,
/// `team/app:v2`): what a docker-archive's RepoTags hold.
fn is_tagged_reference(text: &str) -> bool {
    let last = &text[text.rfind('/').map_or(0, |i| i + 1)..];
    // `/srv/a:b/d.tar:busybox` is the archive `/srv/a:b/d.tar`, not the
    // reference `b/d.tar:busybox`: no repository names a `.tar`.
    let names_a_tar = text.split(['/', ':']).any(|part| part.ends_with(".tar"));
    last.contains(':')
        && !names_a_tar
        && text.parse::<RegistryReference>().is_ok_and(|reference| reference.digest.is_none())
}

/// A repository name of one component (`busybox`): a docker-archive
/// reference without its tag, as skopeo takes it (`:latest` implied).
/// One component only: `b/d.tar` is more likely a path's end.
fn is_bare_name(text: &str) -> bool {
    valid_path_component(text)
}

/// Whether `path`'s text after its last `:` would parse as a tag.
fn ends_like_a_tag(path: &Path) -> bool {
    let text = path.to_string_lossy();
    text.rfind(':').is_some_and(|at| is_tag(&text[at + 1..]))
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, the distribution spec's path component.
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(&bytes[0]) || !bytes.last().is_some_and(alnum) {
        return false;
    }
    let mut separator = String::new();
    for b in bytes {
        if alnum(b) {
            if !(separator.is_empty()
                || separator == "."
                || separator == "_"
                || separator == "__"
                || separator.bytes().all(|s| s == b'-'))
            {
                return false;
            }
            separator.clear();
        } else if b".-_".contains(b) {
            separator.push(char::from(*b));
        } else {
            return false;
        }
    }
    true
}

/// An image source as the user writes it.
///
/// The path of a local kind may hold `:` (a spec's directory anchors it):
/// a layout's or oci-archive's tag follows the last `:` when what follows
/// is a tag (1 to 128 of `[A-Za-z0-9_.-]`, so never a `/`), and a
/// docker-archive's reference the first `:` that starts a tagged
/// reference, else the last `:` before a one-component name; otherwise
/// the whole text is the path. A docker-archive's images are named by
/// tag, never by digest. skopeo cuts at the first `:` and refuses a path
/// holding one.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// `oci:DIR[:TAG]`: an OCI image layout directory; the tag is an
    /// `org.opencontainers.image.ref.name` annotation in its index.json.
    Layout { dir: PathBuf, tag: Option<String> },
    /// `oci-archive:FILE[:TAG]`: a tar of an OCI image layout.
    OciArchive { file: PathBuf, tag: Option<String> },
    /// `docker-archive:FILE[:REF]`: a `docker save` tar; REF picks one of
    /// its images by `RepoTags` when it holds several.
    DockerArchive { file: PathBuf, reference: Option<String> },
    /// `docker://REF` or a bare `REF`: a registry, over the distribution API.
    Registry(RegistryReference),
}

impl FromStr for ImageSource {
    type Err = Error;

    fn from_str(text: &str) -> Result<ImageSource> {
        let invalid = |reason: &str| Error::InvalidSource { spec: text.to_owned(), reason: reason.to_owned() };
        let path_and_name = |rest: &str, is_name: fn(&str) -> bool, first: bool| -> Result<(PathBuf, Option<String>)> {
            let mut colons: Vec<usize> = rest.match_indices(':').map(|(at, _)| at).collect();
            if !first {
                colons.reverse();
            }
            let split = match colons.iter().find(|&&at| is_name(&rest[at + 1..])) {
                Some(&at) => Some(at),
                // `PATH:` stays an error rather than a path ending in ':'.
                None => rest.strip_suffix(':').map(str::len),
            };
            let (path, name) = match split {
                Some(at) => (&rest[..at], Some(&rest[at + 1..])),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(invalid("the path is empty"));
            }
            if name.is_some_and(str::is_empty) {
                return Err(invalid("nothing follows the ':' after the path"));
            }
            Ok((PathBuf::from(path), name.map(str::to_owned)))
        };
        if let Some(rest) = text.strip_prefix("oci:") {
            let (dir, tag) = path_and_name(rest, is_tag, false)?;
            Ok(ImageSource::Layout { dir, tag })
        } else if let Some(rest) = text.strip_prefix("oci-archive:") {
            let (file, tag) = path_and_name(rest, is_tag, false)?;
            Ok(ImageSource::OciArchive { file, tag })
        } else if let Some(rest) = text.strip_prefix("docker-archive:") {
            if rest.contains("@sha256:") {
                return Err(invalid("a docker-archive's images are named by tag (its RepoTags), not by digest"));
            }
            let (file, reference) = match path_and_name(rest, is_tagged_reference, true)? {
                (_, None) if !rest.ends_with(':') => path_and_name(rest, is_bare_name, false)?,
                tagged => tagged,
            };
            Ok(ImageSource::DockerArchive { file, reference })
        } else if let Some(rest) = text.strip_prefix("docker://") {
            Ok(ImageSource::Registry(rest.parse()?))
        } else if let Some((scheme, _)) = text.split_once("://") {
            Err(invalid(&format!("unknown transport {scheme:?}; use oci:, oci-archive:, docker-archive: or docker://")))
        } else {
            Ok(ImageSource::Registry(text.parse()?))
        }
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with_name = |f: &mut fmt::Formatter<'_>, prefix: &str, path: &PathBuf, name: &Option<String>| {
            write!(f, "{prefix}:{}", path.display())?;
            match name {
                Some(name) => write!(f, ":{name}"),
                // A directory `/srv/a:b` would read back as `/srv/a` tagged
                // `b`: its trailing `/` keeps it one path.
                None if prefix == "oci" && ends_like_a_tag(path) => write!(f, "/"),
                None => Ok(()),
            }
        };
        match self {
            ImageSource::Layout { dir, tag } => with_name(f, "oci", dir, tag),
            ImageSource::OciArchive { file, tag } => with_name(f, "oci-archive", file, tag),
            ImageSource::DockerArchive { file, reference } => with_name(f, "docker-archive", file, reference),
            ImageSource::Registry(reference) => write!(f, "docker://{reference}"),
        }
    }
}

impl ImageSource {
    /// Opens a local source (layout or archive) for reading its blobs.
    /// Registry sources are opened by the registry module, which needs
    /// credentials and TLS settings this call does not take.
    pub fn open(&self) -> Result<Box<dyn BlobSource>> {
        let name = self.to_string();
        match self {
            ImageSource::Layout { dir, tag } => {
                Ok(Box::new(crate::layout::Layout::open(dir.clone(), tag.clone(), name)?))
            }
            ImageSource::OciArchive { file, tag } => {
                Ok(Box::new(crate::archive::OciArchive::open(file.clone(), tag.clone(), name)?))
            }
            ImageSource::DockerArchive { file, reference } => {
                Ok(Box::new(crate::archive::DockerArchive::open(file.clone(), reference.as_deref(), name)?))
            }
            ImageSource::Registry(_) => Err(Error::InvalidSource {
                spec: name,
                reason:
                    "a registry source is opened with its credentials by the registry client, not ImageSource::open"
                        .to_owned(),
            }),
        }
    }
}

/// The platform kiln runs: the guest is x86-64 Linux.
const WANTED_OS: &str = "linux";
const WANTED_ARCHITECTURE: &str = "amd64";

/// A manifest, resolved through any index to the one for linux/amd64.
#[derive(Debug)]
pub(crate) struct ResolvedManifest {
    pub(crate) bytes: Vec<u8>,
    pub(crate) digest: Digest,
    pub(crate) manifest: Manifest,
}

/// Fetches the source's root document, verifies it when the source knows
/// its digest, and follows indexes (at most two deep) to linux/amd64.
pub(crate) fn resolve_manifest(source: &dyn BlobSource) -> Result<ResolvedManifest> {
    let image = source.name().to_owned();
    let mut fetched = source.root()?;
    let mut what = format!("the manifest of {image}");
    for _depth in 0..3 {
        let bytes = read_verified(&fetched.bytes[..], &what, fetched.expected, MANIFEST_LIMIT)?;
        let digest = Digest::of(&bytes);
        match ManifestKind::of(&bytes, fetched.media_type.as_deref(), &what)? {
            ManifestKind::Manifest => {
                let manifest: Manifest = parse_json(&bytes, &what)?;
                return Ok(ResolvedManifest { bytes, digest, manifest });
            }
            ManifestKind::Index => {
                let index: Index = parse_json(&bytes, &format!("the index of {image}"))?;
                let chosen = pick_platform(&index, &image)?;
                what = format!("manifest {} of {image}", chosen.digest);
                let media_type = (!chosen.media_type.is_empty()).then(|| chosen.media_type.clone());
                let child = source.manifest(&chosen.digest)?;
                fetched = Fetched {
                    bytes: child.bytes,
                    media_type: media_type.or(child.media_type),
                    expected: Some((chosen.digest, Some(chosen.size))),
                };
            }
        }
    }
    Err(Error::InvalidImage { what: image, reason: "indexes nest more than two deep".to_owned() })
}

/// The linux/amd64 entry of an index (the variant is ignored: amd64 has
/// none that matters to a guest kernel), or an error listing what it offers.
pub(crate) fn pick_platform<'a>(index: &'a Index, image: &str) -> Result<&'a crate::config::Descriptor> {
    let matches = |d: &&crate::config::Descriptor| {
        d.platform.as_ref().is_some_and(|p| p.os == WANTED_OS && p.architecture == WANTED_ARCHITECTURE)
    };
    if let Some(found) = index.manifests.iter().find(matches) {
        return Ok(found);
    }
    let offered: Vec<String> = index
        .manifests
        .iter()
        .map(|d| match &d.platform {
            Some(p) => match &p.variant {
                Some(variant) => format!("{}/{}/{variant}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            },
            None => "unknown".to_owned(),
        })
        .collect();
    Err(Error::NoMatchingPlatform {
        image: image.to_owned(),
        offered: if offered.is_empty() { "nothing".to_owned() } else { offered.join(", ") },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(text: &str) -> String {
        match text.parse::<ImageSource>() {
            Ok(source) => format!("{source:?}"),
            Err(error) => format!("error: {error}"),
        }
    }

    #[test]
    fn source_strings_parse_to_their_kind_path_and_name() {
        expect_test::expect![[r#"
            oci:/images/app -> Layout { dir: "/images/app", tag: None }
            oci:/images/app:1.0 -> Layout { dir: "/images/app", tag: Some("1.0") }
            oci:/srv/a:b/images/app -> Layout { dir: "/srv/a:b/images/app", tag: None }
            oci:/srv/a:b/images/app:1.0 -> Layout { dir: "/srv/a:b/images/app", tag: Some("1.0") }
            oci:/srv/a:b -> Layout { dir: "/srv/a", tag: Some("b") }
            oci-archive:a.tar:t -> OciArchive { file: "a.tar", tag: Some("t") }
            oci-archive:/srv/a:b/a.tar -> OciArchive { file: "/srv/a:b/a.tar", tag: None }
            oci-archive:/srv/a:b/a.tar:t -> OciArchive { file: "/srv/a:b/a.tar", tag: Some("t") }
            docker-archive:d.tar -> DockerArchive { file: "d.tar", reference: None }
            docker-archive:d.tar:docker.io/library/busybox:t -> DockerArchive { file: "d.tar", reference: Some("docker.io/library/busybox:t") }
            docker-archive:/srv/a:b/d.tar -> DockerArchive { file: "/srv/a:b/d.tar", reference: None }
            docker-archive:/srv/a:b/d.tar:kiln-test/busybox:1 -> DockerArchive { file: "/srv/a:b/d.tar", reference: Some("kiln-test/busybox:1") }
            docker-archive:/srv/a:b/d.tar:127.0.0.1:5000/bb:1 -> DockerArchive { file: "/srv/a:b/d.tar", reference: Some("127.0.0.1:5000/bb:1") }
            docker-archive:d.tar:busybox -> DockerArchive { file: "d.tar", reference: Some("busybox") }
            docker-archive:/srv/a:b/d.tar:busybox -> DockerArchive { file: "/srv/a:b/d.tar", reference: Some("busybox") }
            docker-archive:d.tar:busybox@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 -> error: Invalid image source "docker-archive:d.tar:busybox@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855": a docker-archive's images are named by tag (its RepoTags), not by digest
            busybox -> Registry(RegistryReference { registry: "docker.io", repository: "library/busybox", tag: Some("latest"), digest: None })
            index.docker.io/busybox:1 -> Registry(RegistryReference { registry: "docker.io", repository: "library/busybox", tag: Some("1"), digest: None })
            docker://127.0.0.1:5000/team/app:v2 -> Registry(RegistryReference { registry: "127.0.0.1:5000", repository: "team/app", tag: Some("v2"), digest: None })
            localhost/app@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 -> Registry(RegistryReference { registry: "localhost", repository: "app", tag: None, digest: Some(sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855) })
            ghcr.io/a/b:1@sha512:00 -> error: Invalid digest "sha512:00": algorithm "sha512" is not supported; kiln accepts sha256 only
            Busybox -> error: Invalid image source "Busybox": a repository is lowercase components of [a-z0-9] joined by '.', '_', '__' or '-', separated by '/'
            app:-x -> error: Invalid image source "app:-x": a tag is 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'
            oci: -> error: Invalid image source "oci:": the path is empty
            oci:dir: -> error: Invalid image source "oci:dir:": nothing follows the ':' after the path
            ftp://x/y -> error: Invalid image source "ftp://x/y": unknown transport "ftp"; use oci:, oci-archive:, docker-archive: or docker://
        "#]]
        .assert_eq(
            &[
                "oci:/images/app",
                "oci:/images/app:1.0",
                "oci:/srv/a:b/images/app",
                "oci:/srv/a:b/images/app:1.0",
                "oci:/srv/a:b",
                "oci-archive:a.tar:t",
                "oci-archive:/srv/a:b/a.tar",
                "oci-archive:/srv/a:b/a.tar:t",
                "docker-archive:d.tar",
                "docker-archive:d.tar:docker.io/library/busybox:t",
                "docker-archive:/srv/a:b/d.tar",
                "docker-archive:/srv/a:b/d.tar:kiln-test/busybox:1",
                "docker-archive:/srv/a:b/d.tar:127.0.0.1:5000/bb:1",
                "docker-archive:d.tar:busybox",
                "docker-archive:/srv/a:b/d.tar:busybox",
                "docker-archive:d.tar:busybox@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "busybox",
                "index.docker.io/busybox:1",
                "docker://127.0.0.1:5000/team/app:v2",
                "localhost/app@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "ghcr.io/a/b:1@sha512:00",
                "Busybox",
                "app:-x",
                "oci:",
                "oci:dir:",
                "ftp://x/y",
            ]
            .iter()
            .map(|text| format!("{text} -> {}\n", reference(text)))
            .collect::<String>(),
        );
    }

    #[test]
    fn source_display_parses_back_to_the_same_source() {
        for text in [
            "oci:/a/b:t",
            "oci:/a:b/c",
            "oci:/a:b/c:t",
            "oci-archive:x.tar",
            "docker-archive:d.tar:busybox:t",
            "docker-archive:/a:b/d.tar:busybox:t",
            "docker-archive:/a:b/d.tar:busybox",
            "docker://quay.io/a/b:c",
        ] {
            let source: ImageSource = text.parse().unwrap();
            assert_eq!(source.to_string().parse::<ImageSource>().unwrap(), source, "{text}");
        }
        // `oci:.` in /srv/a:b anchors to this (the path made absolute drops the `.`).
        let layout = ImageSource::Layout { dir: PathBuf::from("/srv/a:b"), tag: None };
        assert_eq!(layout.to_string(), "oci:/srv/a:b/");
        assert_eq!(layout.to_string().parse::<ImageSource>().unwrap(), layout);
    }

    #[test]
    fn index_without_linux_amd64_names_the_platforms_it_offers() {
        let index: Index = serde_json::from_str(&format!(
            r#"{{"manifests":[
              {{"mediaType":"{m}","digest":"{d}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
              {{"mediaType":"{m}","digest":"{d}","size":1,"platform":{{"os":"windows","architecture":"amd64"}}}}]}}"#,
            m = crate::config::OCI_MANIFEST,
            d = Digest::of(b""),
        ))
        .unwrap();
        let error = pick_platform(&index, "oci:/x:t").unwrap_err().to_string();
        assert_eq!(error, "oci:/x:t has no linux/amd64 image; it offers linux/arm64/v8, windows/amd64");
    }
}
