//! The spec on Kubernetes: [`workload`] turns a [`Spec`] into kiln-k8s's
//! [`Workload`] (reading `service.files` trees, the only I/O here), and
//! [`ClusterDefaults`] is the operator's file of cluster-wide settings that
//! becomes a [`Target`]. Field by field in `docs/kubernetes.md`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use kiln_k8s::{
    DataVolume, KubernetesOptions, Mount, MountSource, PodContainer, RestartPolicy, SharedVolume, Target,
    VolumeMountSpec, Workload,
};
use serde::Deserialize;

use crate::spec::{FileSource, GpuPolicy, Medium, Restart, Spec, Toleration};
use crate::{Error, Result};

/// Where the data disk and `service.files` trees appear, as in the guest.
const DATA_MOUNT_PATH: &str = "/mnt/data";
const FILES_MOUNT_ROOT: &str = "/srv";

/// The environment variable naming the operator's defaults file, when
/// `--defaults` is not given.
pub const K8S_DEFAULTS_ENV: &str = "KILN_K8S_DEFAULTS";

/// A spec as a Kubernetes workload, and what of the spec the Pod cannot
/// express (for the user to read; `kiln-k8s` adds its own at render time).
#[derive(Debug, Clone, PartialEq)]
pub struct K8sWorkload {
    /// The workload.
    pub workload: Workload,
    /// Spec fields that have no Pod equivalent, or a different meaning there.
    pub warnings: Vec<String>,
}

/// Converts `spec` into a [`Workload`]. Reads the `service.files` trees
/// when they are carried inline (Secrets and ConfigMaps); fails when the
/// spec has no `service.image` or a tree cannot be carried.
pub fn workload(spec: &Spec) -> Result<K8sWorkload> {
    if spec.is_pod_form() {
        let mut warnings = Vec::new();
        let workload = pod_form_workload(spec, &mut warnings)?;
        return Ok(finish(spec, workload, warnings));
    }
    let image = pod_image(spec.service.image.clone().ok_or(Error::NoImage)?)?;
    let mut warnings = Vec::new();
    let resources = &spec.resources;
    let data_volume = resources.storage.map(|size| {
        warnings.push(format!(
            "resources.storage: {DATA_MOUNT_PATH} is an emptyDir with that size limit; it lasts as long as the Pod, not across runs like the VM's data disk"
        ));
        DataVolume { mount_path: DATA_MOUNT_PATH.to_owned(), size_bytes: size.0 }
    });
    let kubernetes = &spec.kubernetes;
    let mut mounts = Vec::new();
    for (name, tree) in &spec.service.files {
        let source = match kubernetes.files {
            FileSource::Inline => MountSource::Files { files: read_flat_tree(name, &tree.path)?, secret: tree.secret },
            FileSource::HostPath => MountSource::HostPath(
                tree.path
                    .to_str()
                    .ok_or_else(|| Error::K8sFiles {
                        tree: name.clone(),
                        why: format!("{} is not UTF-8, which a hostPath must be", tree.path.display()),
                    })?
                    .to_owned(),
            ),
        };
        mounts.push(Mount { name: name.clone(), mount_path: format!("{FILES_MOUNT_ROOT}/{name}"), source });
    }
    let mut workload = Workload::new(spec.name.as_str(), image);
    workload.args = spec.service.args.clone();
    workload.env = spec.service.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    workload.mounts = mounts;
    workload.data_volume = data_volume;
    workload.resources.millicpus = Some(u32::from(resources.cpus) * 1000);
    workload.resources.memory_bytes = Some(resources.memory.0);
    Ok(finish(spec, workload, warnings))
}

/// A spec image as a Pod's: a registry reference, without kiln's (and
/// skopeo's) `docker://` transport prefix.
fn pod_image(image: String) -> Result<String> {
    if crate::spec::is_local_image(&image) {
        return Err(Error::K8sLocalImage { image });
    }
    Ok(image.strip_prefix("docker://").map(str::to_owned).unwrap_or(image))
}

/// The pod form's containers and volumes as a [`Workload`]'s.
fn pod_form_workload(spec: &Spec, warnings: &mut Vec<String>) -> Result<Workload> {
    let pod = spec.pod();
    if spec.resources.storage.is_some() {
        warnings.push(
            "resources.storage: the disk volumes are emptyDirs on the node's disk; they last as long as the Pod, not across runs like the VM's data disk".to_owned(),
        );
    }
    let mut containers = Vec::new();
    for container in &pod.containers {
        let image =
            container.image.clone().ok_or_else(|| Error::K8sContainerNoImage { container: container.name.clone() })?;
        let mut out = PodContainer::new(container.name.clone(), pod_image(image)?);
        out.init = container.init;
        out.args = container.args.clone();
        out.env = container.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        out.working_dir = container.working_dir.clone();
        out.user = container.user.clone();
        out.resources.millicpus = container.resources.cpus.map(|cpus| u32::from(cpus) * 1000);
        out.resources.memory_bytes = container.resources.memory.map(|memory| memory.0);
        out.mounts = container
            .mounts
            .iter()
            .map(|m| VolumeMountSpec { volume: m.volume.clone(), path: m.path.clone(), read_only: m.read_only })
            .collect();
        if !container.files.is_empty() {
            warnings.push(format!(
                "container `{}`: files are not carried into the Pod yet (only [service] files are); mount them from a volume",
                container.name
            ));
        }
        containers.push(out);
    }
    let first_app = containers.iter().find(|c| !c.init).map(|c| c.image.clone()).unwrap_or_default();
    let mut workload = Workload::new(spec.name.as_str(), first_app);
    workload.containers = containers;
    workload.volumes = pod
        .volumes
        .iter()
        .map(|v| SharedVolume { name: v.name.clone(), memory: v.medium == Medium::Memory, size_limit: v.size_limit })
        .collect();
    Ok(workload)
}

/// What both forms share: the restart policy, GPU, confidentiality, the
/// firewall and the `[kubernetes]` table, and the warnings of the fields a
/// Pod ignores.
fn finish(spec: &Spec, mut workload: Workload, mut warnings: Vec<String>) -> K8sWorkload {
    let (resources, kubernetes) = (&spec.resources, &spec.kubernetes);
    for port in &spec.network.publish {
        warnings.push(format!(
            "network.publish {}: port {} is the Service's port inside the cluster, not a port on a node",
            String::from(*port),
            port.0.host_port
        ));
    }
    let ignored = [
        ("guest.kernel", spec.guest.kernel.is_some()),
        ("guest.initramfs", spec.guest.initramfs.is_some()),
        ("guest.cmdline", spec.guest.cmdline.is_some()),
        ("vm.backend", spec.vm.backend != crate::Backend::Auto),
        ("vm.vfio", !spec.vm.vfio.is_empty()),
    ];
    for (field, set) in ignored {
        if set {
            warnings.push(format!("{field} has no Pod equivalent and is ignored"));
        }
    }
    workload.restart = match spec.restart {
        Restart::Never => RestartPolicy::Never,
        Restart::OnFailure => RestartPolicy::OnFailure,
        Restart::Always => RestartPolicy::Always,
    };
    workload.resources.gpu = (resources.gpu.policy != GpuPolicy::None).then_some(resources.gpu);
    workload.confidentiality = resources.confidentiality;
    workload.firewall = spec.firewall();
    workload.kubernetes = placement(
        kubernetes.namespace.clone(),
        &kubernetes.node_selector,
        &kubernetes.tolerations,
        &kubernetes.annotations,
        &kubernetes.labels,
    );
    workload.kubernetes.image_pull_secrets = kubernetes.pull_secret.iter().cloned().collect();
    workload.kubernetes.service_account = kubernetes.service_account.clone();
    workload.kubernetes.security = kubernetes.security.clone();
    K8sWorkload { workload, warnings }
}

/// `image` (a registry reference) pinned to `manifest` (`sha256:...`), the
/// digest kiln's image store resolved it to: `repo@sha256:...`, the tag
/// dropped, so the Pod runs the bytes a VM of the spec runs. A reference
/// that carries a digest already is the user's pin and stays as it is.
pub(crate) fn pin_image(image: &str, manifest: &str) -> String {
    if image.contains('@') {
        return image.to_owned();
    }
    // A `:` after the last `/` starts the tag; one before it is a registry's port.
    let name_end = image.rfind(':').filter(|&colon| !image[colon..].contains('/')).unwrap_or(image.len());
    format!("{}@{manifest}", &image[..name_end])
}

/// The node labels of the platform kiln's store pulls: it resolves an
/// index to its linux/amd64 manifest (and refuses any other platform), so
/// a Pod pinned to that manifest runs on such a node only.
const PINNED_PLATFORM: [(&str, &str); 2] = [("kubernetes.io/os", "linux"), ("kubernetes.io/arch", "amd64")];

impl K8sWorkload {
    /// Pins the workload's image to `manifest` (see [`pin_image`]), the
    /// linux/amd64 manifest kiln's store resolved (of an index, one
    /// platform's), and so selects linux/amd64 nodes: `kubernetes.io/os`
    /// and `kubernetes.io/arch`, unless the spec's node selector sets them
    /// already. Another value there, or in the operator's defaults
    /// (`defaults`, which the spec's would silently override), is an error
    /// naming both. An image the spec pins itself (`@sha256:`, maybe an
    /// index) is left as it is.
    pub fn pin_image(&mut self, manifest: &str, defaults: &BTreeMap<String, String>) -> Result<()> {
        let pinned = pin_image(&self.workload.image, manifest);
        if pinned == self.workload.image {
            return Ok(());
        }
        let selector = &mut self.workload.kubernetes.node_selector;
        for (key, value) in PINNED_PLATFORM {
            let set = [
                ("kubernetes.node_selector", selector.get(key)),
                ("the Kubernetes defaults' node_selector", defaults.get(key)),
            ];
            if let Some((setter, Some(other))) = set.into_iter().find(|(_, set)| set.is_some_and(|set| set != value)) {
                return Err(Error::K8sPinnedPlatform {
                    setter: setter.to_owned(),
                    key: key.to_owned(),
                    spec: other.clone(),
                    pinned: value.to_owned(),
                    manifest: manifest.to_owned(),
                });
            }
            selector.entry(key.to_owned()).or_insert_with(|| value.to_owned());
        }
        self.workload.image = pinned;
        Ok(())
    }
}

/// The Kubernetes options that the spec's `[kubernetes]` table and the
/// operator's defaults file both set, the same way.
fn placement(
    namespace: Option<String>,
    node_selector: &BTreeMap<String, String>,
    tolerations: &[Toleration],
    annotations: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> KubernetesOptions {
    let mut options = KubernetesOptions::default();
    options.namespace = namespace;
    options.node_selector = node_selector.clone();
    options.tolerations = tolerations.to_vec();
    options.annotations = annotations.clone();
    options.labels = labels.clone();
    options
}

/// The files of a flat directory (symlinks followed, as on the service
/// disk), by name. A Secret or ConfigMap holds one flat directory of at
/// most [`kiln_k8s::MAX_INLINE_BYTES`]; each file is read only up to what
/// is left of that budget plus one byte, so a tree that is too big (or a
/// file that grows while it is read) is refused after at most that much.
fn read_flat_tree(tree: &str, dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::InputIo { path, source }
    };
    let refuse = |why: String| Error::K8sFiles { tree: tree.to_owned(), why };
    let mut files = BTreeMap::new();
    let mut budget = kiln_k8s::MAX_INLINE_BYTES as u64;
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let meta = fs::metadata(&path).map_err(io(&path))?;
        if meta.is_dir() {
            return Err(refuse(format!(
                "{} is a directory; a Secret or ConfigMap holds one flat directory, so set kubernetes.files = \"host-path\"",
                path.display()
            )));
        }
        // A FIFO or device would block or never end.
        if !meta.is_file() {
            return Err(refuse(format!("{} is not a regular file", path.display())));
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .ok_or_else(|| refuse(format!("{} has a file name that is not UTF-8", path.display())))?;
        let mut contents = Vec::new();
        fs::File::open(&path).and_then(|file| file.take(budget + 1).read_to_end(&mut contents)).map_err(io(&path))?;
        budget = budget.checked_sub(contents.len() as u64).ok_or_else(|| {
            refuse(format!(
                "{} holds more than the {} bytes a Secret or ConfigMap can; set kubernetes.files = \"host-path\"",
                dir.display(),
                kiln_k8s::MAX_INLINE_BYTES
            ))
        })?;
        files.insert(name, contents);
    }
    Ok(files)
}

/// The operator's cluster-wide settings (`kiln render --target k8s
/// --defaults FILE`, `kiln k8s --defaults FILE`, or `$KILN_K8S_DEFAULTS`):
/// a TOML file. Maps merge with the spec's `[kubernetes]` table, the spec
/// winning on equal keys; lists are joined.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterDefaults {
    /// The namespace when the spec names none (else the context's).
    pub namespace: Option<String>,
    /// Node labels every Pod must land on.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Taints every Pod tolerates.
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// Annotations on every Pod.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Labels on every object.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Image pull secrets every Pod gets.
    #[serde(default)]
    pub pull_secrets: Vec<String>,
    /// The service account when the spec names none.
    pub service_account: Option<String>,
    /// The host's address as Pods see it: where `network.host_ports` and
    /// rewritten loopback URLs point.
    pub host_address: Option<IpAddr>,
    /// The RuntimeClass that means "TEE" (default `kata`).
    pub tee_runtime_class: Option<String>,
    /// Whether Pods without egress may still query the cluster DNS (default true).
    pub cluster_dns: Option<bool>,
}

impl ClusterDefaults {
    /// Reads the defaults file at `path`.
    pub fn load(path: &Path) -> Result<ClusterDefaults> {
        let text = fs::read_to_string(path).map_err(|source| Error::SpecRead { path: path.to_path_buf(), source })?;
        ClusterDefaults::parse(&text, path)
    }

    /// Parses `text` (the contents of `path`, which only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<ClusterDefaults> {
        toml::from_str(text)
            .map_err(|e| Error::K8sDefaults { path: path.to_path_buf(), message: e.to_string().trim_end().to_owned() })
    }

    /// `explicit` if given, else `$KILN_K8S_DEFAULTS` if set, else none.
    pub fn find(explicit: Option<&Path>) -> Result<ClusterDefaults> {
        match explicit.map(Path::to_path_buf).or_else(|| std::env::var_os(K8S_DEFAULTS_ENV).map(PathBuf::from)) {
            Some(path) => ClusterDefaults::load(&path),
            None => Ok(ClusterDefaults::default()),
        }
    }

    /// The target these defaults describe, before anything is known about
    /// the cluster (`kiln_k8s::Cluster::detect` fills that in).
    pub fn target(&self) -> Target {
        let base = Target::default();
        let mut defaults =
            placement(self.namespace.clone(), &self.node_selector, &self.tolerations, &self.annotations, &self.labels);
        defaults.image_pull_secrets = self.pull_secrets.clone();
        defaults.service_account = self.service_account.clone();
        Target {
            defaults,
            host_address: self.host_address,
            tee_runtime_class: self.tee_runtime_class.clone().unwrap_or(base.tee_runtime_class.clone()),
            allow_cluster_dns: self.cluster_dns.unwrap_or(base.allow_cluster_dns),
            ..base
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_pods_image_is_pinned_by_digest_tag_dropped_port_kept() {
        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let cases = [
            ("registry.example/web:1", "registry.example/web@"),
            ("127.0.0.1:5000/team/web:1.2", "127.0.0.1:5000/team/web@"),
            ("127.0.0.1:5000/team/web", "127.0.0.1:5000/team/web@"),
            ("busybox", "busybox@"),
        ];
        for (image, pinned) in cases {
            assert_eq!(pin_image(image, digest), format!("{pinned}{digest}"), "{image}");
        }
        let already = "registry.example/web@sha256:ffff";
        assert_eq!(pin_image(already, digest), already, "the spec's own pin stays");
    }

    #[test]
    fn a_pods_image_is_the_bare_reference_of_a_docker_transport_source() {
        let spec = Spec::parse(
            "name = \"web\"\n[service]\nimage = \"docker://127.0.0.1:5000/team/web:1\"\n",
            Path::new("/specs/web.toml"),
        )
        .unwrap();
        let mut pod = workload(&spec).unwrap();
        assert_eq!(pod.workload.image, "127.0.0.1:5000/team/web:1");
        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        pod.pin_image(digest, &BTreeMap::new()).unwrap();
        assert_eq!(pod.workload.image, format!("127.0.0.1:5000/team/web@{digest}"));
    }

    #[test]
    fn a_pod_pinned_to_the_stores_linux_amd64_manifest_selects_linux_amd64_nodes() {
        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let pinned_over = |image: &str, selector: &str, defaults: &[(&str, &str)]| {
            let text = format!(
                "name = \"web\"\n[service]\nimage = \"{image}\"\n[kubernetes]\nnode_selector = {{ {selector} }}\n"
            );
            let mut pod = workload(&Spec::parse(&text, Path::new("/specs/web.toml")).unwrap()).unwrap();
            let defaults = defaults.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            match pod.pin_image(digest, &defaults) {
                Ok(()) => format!("{} {:?}", pod.workload.image, pod.workload.kubernetes.node_selector),
                Err(error) => format!("error: {error}"),
            }
        };
        let pinned = |image: &str, selector: &str| pinned_over(image, selector, &[]);
        let actual = [
            pinned_over("registry.example/web:1", "", &[("kubernetes.io/arch", "arm64")]),
            pinned_over("registry.example/web:1", "", &[("kubernetes.io/os", "linux"), ("pool", "b")]),
            pinned("registry.example/web:1", ""),
            pinned("registry.example/web:1", "pool = \"a\", \"kubernetes.io/os\" = \"linux\""),
            pinned("registry.example/web:1", "\"kubernetes.io/arch\" = \"arm64\""),
            pinned("registry.example/web:1", "\"kubernetes.io/os\" = \"windows\""),
            pinned("registry.example/web@sha256:ffff", "\"kubernetes.io/arch\" = \"arm64\""),
        ]
        .join("\n");
        expect_test::expect![[r#"
            error: the Kubernetes defaults' node_selector sets `kubernetes.io/arch` to `arm64`, but the Pod's image is pinned to sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef, the linux/amd64 manifest kiln's image store holds, which needs `kubernetes.io/arch` = `amd64`
            registry.example/web@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef {"kubernetes.io/arch": "amd64", "kubernetes.io/os": "linux"}
            registry.example/web@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef {"kubernetes.io/arch": "amd64", "kubernetes.io/os": "linux"}
            registry.example/web@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef {"kubernetes.io/arch": "amd64", "kubernetes.io/os": "linux", "pool": "a"}
            error: kubernetes.node_selector sets `kubernetes.io/arch` to `arm64`, but the Pod's image is pinned to sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef, the linux/amd64 manifest kiln's image store holds, which needs `kubernetes.io/arch` = `amd64`
            error: kubernetes.node_selector sets `kubernetes.io/os` to `windows`, but the Pod's image is pinned to sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef, the linux/amd64 manifest kiln's image store holds, which needs `kubernetes.io/os` = `linux`
            registry.example/web@sha256:ffff {"kubernetes.io/arch": "arm64"}"#]]
        .assert_eq(&actual);
    }

    #[test]
    fn a_pod_refuses_a_local_image_source_naming_service_image() {
        let spec =
            Spec::parse("name = \"web\"\n[service]\nimage = \"oci:img:1\"\n", Path::new("/specs/web.toml")).unwrap();
        let err = workload(&spec).unwrap_err().to_string();
        assert_eq!(
            err,
            "service.image `oci:/specs/img:1` is a local image source, which a Pod cannot pull: push it to a registry and name it there"
        );
    }
}

/// The single-service form is a pod of one: written either way, a service
/// renders as the same Pod.
#[cfg(test)]
mod pod_of_one {
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;

    fn quoted(text: &str) -> String {
        // A JSON string of printable ASCII is a TOML basic string too.
        serde_json::to_string(text).unwrap()
    }

    fn rendered_pod(text: &str) -> serde_json::Value {
        let spec = Spec::parse(text, Path::new("/s/kiln.toml")).unwrap();
        let manifests = kiln_k8s::render(&workload(&spec).unwrap().workload, &Target::default()).unwrap();
        let pods: Vec<serde_json::Value> =
            manifests.objects().into_iter().map(|object| object.to_json()).filter(|o| o["kind"] == "Pod").collect();
        assert_eq!(pods.len(), 1);
        pods[0].clone()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn a_service_and_its_one_container_pod_render_the_same_pod(
            image in "[a-z]{1,8}(/[a-z]{1,8})?:[0-9]{1,3}",
            args in proptest::collection::vec("[ -~]{0,12}", 0..4),
            env in proptest::collection::btree_map("[A-Z_][A-Z0-9_]{0,6}", "[ -~]{0,12}", 0..4),
            cpus in 1u8..5,
            memory_mib in 64u64..2048,
            publish in proptest::option::of(1u16..65535),
            restart in prop_oneof![Just("never"), Just("on-failure"), Just("always")],
        ) {
            let args = format!("[{}]", args.iter().map(|a| quoted(a)).collect::<Vec<_>>().join(", "));
            let env = format!("{{ {} }}", env.iter().map(|(k, v)| format!("{k} = {}", quoted(v))).collect::<Vec<_>>().join(", "));
            let network = publish.map(|port| format!("[network]\npublish = [\"{port}:{port}\"]\n")).unwrap_or_default();
            let head = format!("name = \"svc\"\nrestart = \"{restart}\"\n{network}");
            let service = format!(
                "{head}[resources]\ncpus = {cpus}\nmemory = \"{memory_mib}MiB\"\n[service]\nimage = {}\nargs = {args}\nenv = {env}\n",
                quoted(&image)
            );
            let pod = format!(
                "{head}[[container]]\nname = \"service\"\nimage = {}\nargs = {args}\nenv = {env}\nresources = {{ cpus = {cpus}, memory = \"{memory_mib}MiB\" }}\n",
                quoted(&image)
            );
            prop_assert_eq!(rendered_pod(&service), rendered_pod(&pod));
        }
    }
}
