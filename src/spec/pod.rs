//! The pod form of the spec: `[[container]]` entries, `[[volume]]` entries
//! and the pod's `restart` policy, and [`Pod`], the normalised view that
//! the single-service form (a pod of one) yields too.
//!
//! Checks that span several entries run after serde, on the spans serde
//! kept, so each error still names its line and column (see [`at`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};

use kiln_types::syntax::{is_dns_label, is_image_reference};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{ByteSize, FileTree, Spec};

/// The name of the one container of the single-service form (also the
/// Pod's container name on Kubernetes).
pub const SERVICE_CONTAINER: &str = "service";

/// One `[[container]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Container {
    /// The container's name: a DNS label, unique in the pod.
    pub name: Spanned<ContainerName>,
    /// Whether it is an init container: it must exit 0 before the next
    /// one (init containers in order, then the app containers) starts.
    pub init: Option<Spanned<bool>>,
    /// The OCI image (as `service.image`).
    pub image: Option<String>,
    /// A binary instead of an image (VMs only, as `service.binary`).
    pub binary: Option<PathBuf>,
    /// Arguments, passed exactly.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Extra trees, as `service.files`.
    #[serde(default)]
    pub files: BTreeMap<String, FileTree>,
    /// The working directory (absolute).
    pub working_dir: Option<AbsolutePath>,
    /// The user: `UID`, `UID:GID` or a name from the image.
    pub user: Option<String>,
    /// What it may use: informational in one VM, limits on Kubernetes.
    #[serde(default)]
    pub resources: ContainerResources,
    /// Volumes mounted into it.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
}

/// A container's resources (see [`Container::resources`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerResources {
    /// Whole CPUs.
    pub cpus: Option<u8>,
    /// Memory.
    pub memory: Option<ByteSize>,
}

/// One entry of [`Container::mounts`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// The `[[volume]]` it mounts.
    pub volume: Spanned<String>,
    /// Where, in the container.
    pub path: AbsolutePath,
    /// Whether the container may only read it.
    #[serde(default)]
    pub read_only: bool,
}

/// One `[[volume]]` entry: an `emptyDir` shared by the containers that mount it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// Its name: a DNS label, unique in the pod.
    pub name: Spanned<ContainerName>,
    /// Where it lives.
    #[serde(default)]
    pub medium: Medium,
    /// The most it may hold (a disk volume's must fit the data disk).
    pub size_limit: Option<Spanned<ByteSize>>,
}

/// The value of [`Volume::medium`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Medium {
    /// On the data disk (`resources.storage`).
    #[default]
    Disk,
    /// A tmpfs, counted in the VM's memory.
    Memory,
}

/// The pod's `restart` policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// A container that exits stays exited.
    #[default]
    Never,
    /// A container that exits non-zero is restarted, with backoff.
    OnFailure,
    /// A container that exits is restarted, with backoff.
    Always,
}

/// A container or volume name: a DNS label (lowercase letters, digits and
/// `-`, at most 63 bytes).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ContainerName(String);

impl ContainerName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ContainerName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        if !is_dns_label(&name) {
            return Err(de::Error::custom(format!(
                "the name `{}` is not a DNS label (lowercase letters, digits and `-`, starting with a letter, at most 63 bytes)",
                name.escape_debug()
            )));
        }
        Ok(ContainerName(name))
    }
}

/// An absolute path inside a container, without `..` (so it cannot
/// escape what it names) and not `/` itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct AbsolutePath(String);

impl AbsolutePath {
    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for AbsolutePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let path = String::deserialize(deserializer)?;
        let shown = path.escape_debug();
        if !path.starts_with('/') {
            return Err(de::Error::custom(format!("the path `{shown}` is not absolute")));
        }
        if Path::new(&path).components().any(|c| c == Component::ParentDir) {
            return Err(de::Error::custom(format!("the path `{shown}` holds `..`, which could escape")));
        }
        if path.trim_end_matches('/').is_empty() || path.contains('\0') {
            return Err(de::Error::custom(format!("the path `{shown}` names no directory below `/`")));
        }
        // Kubernetes refuses these, so they are refused for both.
        if path.trim_end_matches('/').split('/').skip(1).any(|part| part.is_empty() || part == ".") {
            return Err(de::Error::custom(format!("the path `{shown}` has an empty or `.` component")));
        }
        Ok(AbsolutePath(path))
    }
}

/// The normalised pod: what both forms of the spec mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Init containers first (in spec order), then app containers.
    pub containers: Vec<PodContainer>,
    /// The volumes.
    pub volumes: Vec<PodVolume>,
    /// The restart policy.
    pub restart: Restart,
}

/// One container of a [`Pod`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// Its name ([`SERVICE_CONTAINER`] for the single-service form).
    pub name: String,
    /// Whether it is an init container.
    pub init: bool,
    /// The image, if any.
    pub image: Option<String>,
    /// The binary, if any.
    pub binary: Option<PathBuf>,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Extra trees.
    pub files: BTreeMap<String, FileTree>,
    /// The working directory.
    pub working_dir: Option<String>,
    /// The user.
    pub user: Option<String>,
    /// Its resources.
    pub resources: ContainerResources,
    /// Its mounts.
    pub mounts: Vec<PodMount>,
}

/// A mount of a [`PodContainer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMount {
    /// The volume's name.
    pub volume: String,
    /// Where.
    pub path: String,
    /// Read-only.
    pub read_only: bool,
}

/// A volume of a [`Pod`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodVolume {
    /// Its name.
    pub name: String,
    /// Where it lives.
    pub medium: Medium,
    /// Its size limit in bytes.
    pub size_limit: Option<u64>,
}

impl Spec {
    /// Whether the spec is in the pod form (`[[container]]`).
    pub fn is_pod_form(&self) -> bool {
        !self.container.is_empty()
    }

    /// The spec as a pod: its containers (init ones first), or the one
    /// container [`SERVICE_CONTAINER`] of the single-service form.
    pub fn pod(&self) -> Pod {
        let containers = if self.container.is_empty() {
            let service = &self.service;
            vec![PodContainer {
                name: SERVICE_CONTAINER.to_owned(),
                init: false,
                image: service.image.clone(),
                binary: service.binary.clone(),
                args: service.args.clone(),
                env: service.env.clone(),
                files: service.files.clone(),
                working_dir: None,
                user: None,
                resources: ContainerResources { cpus: Some(self.resources.cpus), memory: Some(self.resources.memory) },
                mounts: Vec::new(),
            }]
        } else {
            let (init, apps): (Vec<&Container>, Vec<&Container>) = self.container.iter().partition(|c| is_init(c));
            init.into_iter().chain(apps).map(pod_container).collect()
        };
        let volumes = self
            .volume
            .iter()
            .map(|v| PodVolume {
                name: v.name.get_ref().to_string(),
                medium: v.medium,
                size_limit: v.size_limit.as_ref().map(|s| s.get_ref().0),
            })
            .collect();
        Pod { containers, volumes, restart: self.restart }
    }
}

fn is_init(container: &Container) -> bool {
    container.init.as_ref().is_some_and(|init| *init.get_ref())
}

fn pod_container(container: &Container) -> PodContainer {
    PodContainer {
        name: container.name.get_ref().to_string(),
        init: is_init(container),
        image: container.image.clone(),
        binary: container.binary.clone(),
        args: container.args.clone(),
        env: container.env.clone(),
        files: container.files.clone(),
        working_dir: container.working_dir.as_ref().map(|p| p.0.clone()),
        user: container.user.clone(),
        resources: container.resources,
        mounts: container
            .mounts
            .iter()
            .map(|m| PodMount { volume: m.volume.get_ref().clone(), path: m.path.0.clone(), read_only: m.read_only })
            .collect(),
    }
}

/// `message` at `span` of `text`, shown as toml shows its own errors: the
/// line and column, the line itself and a caret under the span.
pub(super) fn at(text: &str, span: std::ops::Range<usize>, message: &str) -> String {
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line_number = text[..start].matches('\n').count() + 1;
    let column = text[line_start..start].chars().count() + 1;
    let line = &text[line_start..line_end];
    let carets = text[start..span.end.clamp(start, line_end)].chars().count().max(1);
    let gutter = " ".repeat(line_number.to_string().len());
    format!(
        "error at line {line_number}, column {column}\n{gutter} |\n{line_number} | {line}\n{gutter} | {}{}\n{message}",
        " ".repeat(column - 1),
        "^".repeat(carets)
    )
}

/// Checks the pod form against itself and the rest of `spec` (`text` is
/// the spec's source, for the spans).
pub(super) fn check(spec: &Spec, text: &str) -> std::result::Result<(), String> {
    let err = |span: std::ops::Range<usize>, message: String| Err(at(text, span, &message));
    if spec.container.is_empty() {
        if !spec.service.declared {
            return err(0..1, "the spec has neither a [service] table nor [[container]] entries".to_owned());
        }
        if let Some(volume) = spec.volume.first() {
            return err(
                volume.name.span(),
                format!(
                    "volume `{}` is declared, but only [[container]] entries can mount volumes",
                    volume.name.get_ref()
                ),
            );
        }
        return Ok(());
    }
    let first = &spec.container[0].name;
    if spec.service.declared {
        return err(
            first.span(),
            "[service] and [[container]] are both given: a spec is one service or a pod of containers, not both; move the service into a [[container]]".to_owned(),
        );
    }
    let mut volumes = BTreeMap::new();
    for volume in &spec.volume {
        let name = volume.name.get_ref().as_str();
        if volumes.insert(name, volume).is_some() {
            return err(volume.name.span(), format!("volume `{name}` is declared twice"));
        }
        if volume.medium != Medium::Disk {
            continue;
        }
        let Some(storage) = spec.resources.storage else {
            return err(
                volume.name.span(),
                format!("disk volume `{name}` lives on the data disk, but resources.storage (its size) is not set"),
            );
        };
        if let Some(limit) = &volume.size_limit
            && limit.get_ref().0 > storage.0
        {
            return err(
                limit.span(),
                format!(
                    "disk volume `{name}` may hold {} bytes, more than the {} bytes of the data disk (resources.storage)",
                    limit.get_ref().0,
                    storage.0
                ),
            );
        }
    }
    if let Some(last) = spec.container.last()
        && spec.container.iter().all(is_init)
    {
        return err(
            last.name.span(),
            "the pod has only init containers: at least one must be an app container".to_owned(),
        );
    }
    let mut names = BTreeSet::new();
    for container in &spec.container {
        let name = container.name.get_ref().as_str();
        let span = container.name.span();
        if !names.insert(name) {
            return err(span, format!("container `{name}` is declared twice: container names must be unique"));
        }
        match (&container.image, &container.binary, &container.init) {
            (None, None, Some(init)) if *init.get_ref() => {
                return err(init.span(), format!("init container `{name}` has neither an image nor a binary to run"));
            }
            (None, None, _) => {
                return err(span, format!("container `{name}` has neither an image nor a binary to run"));
            }
            (Some(_), Some(_), _) => {
                return err(span, format!("container `{name}` has both an image and a binary: give one"));
            }
            (Some(image), None, _) if !is_image_reference(image) => {
                return err(
                    span,
                    format!("container `{name}`: image `{}` is empty or holds whitespace", image.escape_debug()),
                );
            }
            _ => {}
        }
        for env in container.env.keys() {
            crate::launch::validate_env_name(env)
                .map_err(|e| at(text, span.clone(), &format!("container `{name}` env: {e}")))?;
        }
        for tree in container.files.keys() {
            crate::service_disk::validate_tree_name(tree)
                .map_err(|e| at(text, span.clone(), &format!("container `{name}` files: {e}")))?;
        }
        let mut paths = BTreeSet::new();
        for mount in &container.mounts {
            let volume = mount.volume.get_ref();
            if !volumes.contains_key(volume.as_str()) {
                return err(
                    mount.volume.span(),
                    format!("container `{name}` mounts volume `{volume}`, which no [[volume]] declares"),
                );
            }
            if !paths.insert(mount.path.0.trim_end_matches('/')) {
                return err(
                    mount.volume.span(),
                    format!("container `{name}` mounts two volumes at `{}`", mount.path.0),
                );
            }
        }
    }
    Ok(())
}

/// Anchors the pod form's relative paths at `base`, as the service's.
pub(super) fn resolve_paths(containers: &mut [Container], base: &Path) {
    for container in containers {
        if let Some(binary) = &mut container.binary
            && binary.is_relative()
        {
            *binary = base.join(&*binary);
        }
        if let Some(image) = &mut container.image {
            *image = super::resolve_local_image(image, base);
        }
        for tree in container.files.values_mut() {
            if tree.path.is_relative() {
                tree.path = base.join(&tree.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use expect_test::expect;

    use super::*;

    /// A valid three-container pod; each error case changes one thing.
    const POD: &str = r#"name = "pod"
restart = "on-failure"
[resources]
storage = "64MiB"
[[volume]]
name = "seed"
size_limit = "16MiB"
[[volume]]
name = "feed"
medium = "memory"
size_limit = "8MiB"
[[container]]
name = "prepare"
init = true
image = "busybox:1"
mounts = [{ volume = "seed", path = "/seed" }]
[[container]]
name = "producer"
image = "busybox:1"
mounts = [{ volume = "feed", path = "/feed" }]
[[container]]
name = "consumer"
image = "busybox:1"
user = "1000:1000"
working_dir = "/srv"
resources = { cpus = 1, memory = "64MiB" }
mounts = [{ volume = "seed", path = "/seed", read_only = true }, { volume = "feed", path = "/feed", read_only = true }]
"#;

    #[test]
    fn pod_form_errors_name_the_fault_with_line_and_column() {
        let cases = [
            POD.replace("name = \"producer\"", "name = \"prepare\""),
            POD.replace(
                "volume = \"feed\", path = \"/feed\" }]\n[[container]]",
                "volume = \"food\", path = \"/feed\" }]\n[[container]]",
            ),
            POD.replace("size_limit = \"16MiB\"", "size_limit = \"65MiB\""),
            POD.replace("storage = \"64MiB\"", "memory = \"512MiB\""),
            POD.replace("name = \"producer\"", "name = \"Producer_1\""),
            POD.replace("medium = \"memory\"", "medium = \"ssd\""),
            POD.replace("restart = \"on-failure\"", "restart = \"sometimes\""),
            POD.replace("path = \"/seed\" }]\n[[container]]", "path = \"seed\" }]\n[[container]]"),
            POD.replace("path = \"/feed\" }]\n[[container]]", "path = \"/feed/../etc\" }]\n[[container]]"),
            POD.replace("init = true\nimage = \"busybox:1\"\n", "init = true\n"),
            format!("{POD}[service]\nimage = \"busybox:1\"\n"),
            "name = \"a\"\n".to_owned(),
            POD.replace(
                "[[container]]\nname = \"producer\"",
                "[[volume]]\nname = \"feed\"\n[[container]]\nname = \"producer\"",
            ),
            POD.replace("path = \"/feed\" }]\n[[container]]", "path = \"/feed/./x\" }]\n[[container]]"),
            POD.replace("name = \"producer\"\n", "name = \"producer\"\ninit = true\n")
                .replace("name = \"consumer\"\n", "name = \"consumer\"\ninit = true\n"),
        ];
        let actual: String = cases
            .iter()
            .map(|text| match Spec::parse(text, Path::new("pod.toml")) {
                Ok(_) => "ok\n---\n".to_owned(),
                Err(e) => format!("{e}\n---\n"),
            })
            .collect();
        expect![[r#"
            Spec pod.toml: error at line 18, column 8
               |
            18 | name = "prepare"
               |        ^^^^^^^^^
            container `prepare` is declared twice: container names must be unique
            ---
            Spec pod.toml: error at line 20, column 22
               |
            20 | mounts = [{ volume = "food", path = "/feed" }]
               |                      ^^^^^^
            container `producer` mounts volume `food`, which no [[volume]] declares
            ---
            Spec pod.toml: error at line 7, column 14
              |
            7 | size_limit = "65MiB"
              |              ^^^^^^^
            disk volume `seed` may hold 68157440 bytes, more than the 67108864 bytes of the data disk (resources.storage)
            ---
            Spec pod.toml: error at line 6, column 8
              |
            6 | name = "seed"
              |        ^^^^^^
            disk volume `seed` lives on the data disk, but resources.storage (its size) is not set
            ---
            Spec pod.toml: TOML parse error at line 18, column 8
               |
            18 | name = "Producer_1"
               |        ^^^^^^^^^^^^
            the name `Producer_1` is not a DNS label (lowercase letters, digits and `-`, starting with a letter, at most 63 bytes)
            ---
            Spec pod.toml: TOML parse error at line 10, column 10
               |
            10 | medium = "ssd"
               |          ^^^^^
            unknown variant `ssd`, expected `disk` or `memory`
            ---
            Spec pod.toml: TOML parse error at line 2, column 11
              |
            2 | restart = "sometimes"
              |           ^^^^^^^^^^^
            unknown variant `sometimes`, expected one of `never`, `on-failure`, `always`
            ---
            Spec pod.toml: TOML parse error at line 16, column 37
               |
            16 | mounts = [{ volume = "seed", path = "seed" }]
               |                                     ^^^^^^
            the path `seed` is not absolute
            ---
            Spec pod.toml: TOML parse error at line 20, column 37
               |
            20 | mounts = [{ volume = "feed", path = "/feed/../etc" }]
               |                                     ^^^^^^^^^^^^^^
            the path `/feed/../etc` holds `..`, which could escape
            ---
            Spec pod.toml: error at line 14, column 8
               |
            14 | init = true
               |        ^^^^
            init container `prepare` has neither an image nor a binary to run
            ---
            Spec pod.toml: error at line 13, column 8
               |
            13 | name = "prepare"
               |        ^^^^^^^^^
            [service] and [[container]] are both given: a spec is one service or a pod of containers, not both; move the service into a [[container]]
            ---
            Spec pod.toml: error at line 1, column 1
              |
            1 | name = "a"
              | ^
            the spec has neither a [service] table nor [[container]] entries
            ---
            Spec pod.toml: error at line 18, column 8
               |
            18 | name = "feed"
               |        ^^^^^^
            volume `feed` is declared twice
            ---
            Spec pod.toml: TOML parse error at line 20, column 37
               |
            20 | mounts = [{ volume = "feed", path = "/feed/./x" }]
               |                                     ^^^^^^^^^^^
            the path `/feed/./x` has an empty or `.` component
            ---
            Spec pod.toml: error at line 23, column 8
               |
            23 | name = "consumer"
               |        ^^^^^^^^^^
            the pod has only init containers: at least one must be an app container
            ---
        "#]].assert_eq(&actual);
    }

    #[test]
    fn the_pod_form_yields_init_containers_first_then_apps() {
        let spec = Spec::parse(POD, Path::new("/s/pod.toml")).unwrap();
        let pod = spec.pod();
        let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["prepare", "producer", "consumer"]);
        assert_eq!(pod.restart, Restart::OnFailure);
        assert_eq!(
            pod.volumes[1],
            PodVolume { name: "feed".to_owned(), medium: Medium::Memory, size_limit: Some(8 << 20) }
        );
        assert_eq!(
            pod.containers[2].mounts[1],
            PodMount { volume: "feed".to_owned(), path: "/feed".to_owned(), read_only: true }
        );
        assert_eq!(pod.containers[2].user.as_deref(), Some("1000:1000"));
        assert!(spec.is_pod_form());
    }

    #[test]
    fn the_single_service_form_is_a_pod_of_one() {
        let spec =
            Spec::parse("name = \"a\"\n[service]\nimage = \"x:1\"\nargs = [\"-v\"]\n", Path::new("/s/a.toml")).unwrap();
        let pod = spec.pod();
        assert!(!spec.is_pod_form());
        assert_eq!(pod.containers.len(), 1);
        let service = &pod.containers[0];
        assert_eq!(
            (service.name.as_str(), service.init, service.image.as_deref()),
            (SERVICE_CONTAINER, false, Some("x:1"))
        );
        assert_eq!(service.args, ["-v"]);
        assert_eq!(pod.restart, Restart::Never);
    }

    #[test]
    fn the_pod_form_of_the_docs_and_the_example_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let docs = std::fs::read_to_string(root.join("docs/spec.md")).unwrap();
        let pod_section = docs.split("## The pod form").nth(1).unwrap();
        let toml = pod_section.split("```toml\n").nth(1).and_then(|rest| rest.split("```").next()).unwrap();
        let spec = Spec::parse(toml, &root.join("docs/pod.toml")).unwrap();
        assert_eq!(spec.pod().containers.len(), 2);
        let example = Spec::load(&root.join("examples/pod/kiln.toml")).unwrap();
        let pod = example.pod();
        let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["prepare", "producer", "consumer"]);
        assert_eq!(pod.volumes.iter().map(|v| v.medium).collect::<Vec<_>>(), [Medium::Disk, Medium::Memory]);
    }
}
