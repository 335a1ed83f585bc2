//! kiln-k8s's own input: what to run, and where. kiln's spec (`kiln run`)
//! is converted into a [`Workload`]; the operator's cluster settings and
//! what the client detected about the cluster form a [`Target`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use kiln_types::firewall::Firewall;
use kiln_types::pod::{PodSecurity, Toleration};
use kiln_types::resources::{Confidentiality, Gpu};

/// One service to run as a Pod. Built with [`Workload::new`], then its
/// public fields set; `#[non_exhaustive]` so it can grow without breaking
/// callers.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Workload {
    /// The instance name; every object name is derived from it.
    pub name: String,
    /// The container image (`registry/repo:tag` or `…@sha256:…`).
    pub image: String,
    /// The image's entrypoint replacement, if any (`command` in the Pod).
    pub command: Vec<String>,
    /// Arguments (`args` in the Pod).
    pub args: Vec<String>,
    /// Environment variables, in order.
    pub env: Vec<(String, String)>,
    /// File trees mounted read-only into the container (the keystore is one).
    pub mounts: Vec<Mount>,
    /// A writable scratch directory (the microVM's data disk), if any.
    pub data_volume: Option<DataVolume>,
    /// CPUs, memory, GPU.
    pub resources: Resources,
    /// Whether the workload must, may or must not run in a TEE.
    pub confidentiality: Confidentiality,
    /// What the Pod may reach and what it publishes (the same description
    /// kiln-net turns into nftables rules).
    pub firewall: Firewall,
    /// Per-instance Kubernetes settings; they override the operator's.
    pub kubernetes: KubernetesOptions,
    /// The pod form: its containers, init ones marked. When empty the Pod
    /// has the one container of the fields above (`image`, `command`,
    /// `args`, `env`, `mounts`, `data_volume`, CPU and memory); when not,
    /// those are unused, except `resources.gpu`, which goes to the first
    /// app container.
    pub containers: Vec<PodContainer>,
    /// The pod form's shared volumes (`emptyDir`s).
    pub volumes: Vec<SharedVolume>,
    /// The Pod's `restartPolicy`.
    pub restart: RestartPolicy,
}

/// One container of the pod form (see [`Workload::containers`]).
/// `#[non_exhaustive]`: start from [`PodContainer::new`].
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct PodContainer {
    /// Its name: a DNS label, unique in the Pod.
    pub name: String,
    /// Whether it is an init container (`initContainers`, in order).
    pub init: bool,
    /// Its image.
    pub image: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment variables, in order.
    pub env: Vec<(String, String)>,
    /// The working directory (absolute).
    pub working_dir: Option<String>,
    /// The user: `UID` or `UID:GID` becomes `runAsUser`/`runAsGroup`; a
    /// name cannot be expressed, which is a render warning.
    pub user: Option<String>,
    /// CPUs and memory (requests equal limits).
    pub resources: Resources,
    /// Its mounts of [`Workload::volumes`].
    pub mounts: Vec<VolumeMountSpec>,
}

impl PodContainer {
    /// A container `name` running `image`, with nothing else.
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> PodContainer {
        PodContainer { name: name.into(), image: image.into(), ..PodContainer::default() }
    }
}

/// A mount of a [`SharedVolume`] in a [`PodContainer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMountSpec {
    /// The volume's name.
    pub volume: String,
    /// Where it appears (absolute path).
    pub path: String,
    /// Whether it is mounted read-only.
    pub read_only: bool,
}

/// A volume shared by the pod form's containers: an `emptyDir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedVolume {
    /// Its name: a DNS label, unique in the Pod.
    pub name: String,
    /// Whether it is a tmpfs (`medium: Memory`) rather than node disk.
    pub memory: bool,
    /// Its `sizeLimit` in bytes, if any.
    pub size_limit: Option<u64>,
}

/// The Pod's `restartPolicy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RestartPolicy {
    /// `Never` (kiln's default, as a VM's service is not restarted).
    #[default]
    Never,
    /// `OnFailure`.
    OnFailure,
    /// `Always`.
    Always,
}

impl RestartPolicy {
    /// The value of `restartPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Never => "Never",
            RestartPolicy::OnFailure => "OnFailure",
            RestartPolicy::Always => "Always",
        }
    }
}

/// A read-only file tree in the container.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    /// A short name for the tree, e.g. `keystore`; the volume and the
    /// Secret or ConfigMap are named after it.
    pub name: String,
    /// Where the tree appears in the container (absolute path).
    pub mount_path: String,
    /// Where its contents come from.
    pub source: MountSource,
}

/// The contents of a [`Mount`].
#[derive(Debug, Clone, PartialEq)]
pub enum MountSource {
    /// Files carried in the manifests: a Secret (mode 0400) when `secret`,
    /// else a ConfigMap (mode 0444). Keys are file names (no `/`).
    Files {
        /// File name to contents.
        files: BTreeMap<String, Vec<u8>>,
        /// Whether the files are secret.
        secret: bool,
    },
    /// A directory on the node, mounted read-only (the reference
    /// behaviour; ties the Pod to nodes that have the directory).
    HostPath(String),
}

/// A writable directory that lives as long as the Pod: an `emptyDir`
/// with a size limit. The microVM's data disk outlives runs; this does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataVolume {
    /// Where it appears in the container (absolute path).
    pub mount_path: String,
    /// The most it may hold, in bytes (`sizeLimit`); the kubelet evicts
    /// the Pod beyond it.
    pub size_bytes: u64,
}

/// Compute resources. `#[non_exhaustive]`: start from
/// `Resources::default()` and set the fields.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Resources {
    /// CPUs in thousandths (`1500` = 1.5 CPUs); request and limit.
    pub millicpus: Option<u32>,
    /// Memory in bytes; request and limit.
    pub memory_bytes: Option<u64>,
    /// GPUs, if any.
    pub gpu: Option<Gpu>,
}

/// Kubernetes settings, both the operator's defaults ([`Target::defaults`])
/// and per-instance overrides ([`Workload::kubernetes`]). Maps merge with
/// the instance winning on equal keys; lists are concatenated (duplicates
/// dropped); a `Some` or `true` in the instance wins. `#[non_exhaustive]`:
/// start from `KubernetesOptions::default()` and set the fields.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct KubernetesOptions {
    /// The namespace.
    pub namespace: Option<String>,
    /// Node labels the Pod must run on.
    pub node_selector: BTreeMap<String, String>,
    /// Taints the Pod tolerates.
    pub tolerations: Vec<Toleration>,
    /// Annotations on the Pod.
    pub annotations: BTreeMap<String, String>,
    /// Extra labels on every object (kiln's own labels cannot be overridden).
    pub labels: BTreeMap<String, String>,
    /// Secrets holding registry credentials.
    pub image_pull_secrets: Vec<String>,
    /// The service account; `None` uses the namespace's default.
    pub service_account: Option<String>,
    /// Loosening of the hardened security context.
    pub security: PodSecurity,
}

/// The cluster side: the operator's defaults and what kiln detected.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The namespace when neither the instance nor the defaults name one.
    pub fallback_namespace: String,
    /// The operator's Kubernetes settings.
    pub defaults: KubernetesOptions,
    /// The host's address as Pods see it: the target of the host Service's
    /// endpoints and of rewritten loopback URLs. Required when the
    /// firewall lists host ports.
    pub host_address: Option<IpAddr>,
    /// The RuntimeClasses the cluster has (from [`crate::Cluster::runtime_classes`]).
    pub runtime_classes: Vec<String>,
    /// The RuntimeClass that means "TEE", `kata` by default.
    pub tee_runtime_class: String,
    /// Whether the cluster serves `discovery.k8s.io/v1` EndpointSlices
    /// (every cluster since 1.21); if not, a v1 Endpoints is emitted.
    pub endpoint_slices: bool,
    /// Whether the NetworkPolicy lets the Pod resolve names through the
    /// cluster DNS (`kube-system`, `k8s-app: kube-dns`) even without egress.
    pub allow_cluster_dns: bool,
}

impl Workload {
    /// A workload running `image` under the instance name `name`, with
    /// nothing else: no environment, mounts or resources, the default
    /// (deny-all) firewall.
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> Workload {
        Workload { name: name.into(), image: image.into(), ..Workload::default() }
    }
}

impl Default for Target {
    fn default() -> Self {
        Target {
            fallback_namespace: "default".to_owned(),
            defaults: KubernetesOptions::default(),
            host_address: None,
            runtime_classes: Vec::new(),
            tee_runtime_class: "kata".to_owned(),
            endpoint_slices: true,
            allow_cluster_dns: true,
        }
    }
}
