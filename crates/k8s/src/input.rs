//! kiln-k8s's own input: what to run, and where. kiln's spec (`kiln run`)
//! is converted into a [`Workload`]; the operator's cluster settings and
//! what the client detected about the cluster form a [`Target`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Toleration;
use kiln_net::Firewall;

/// One service to run as a Pod.
#[derive(Debug, Clone, Default, PartialEq)]
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

/// Compute resources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    /// CPUs in thousandths (`1500` = 1.5 CPUs); request and limit.
    pub millicpus: Option<u32>,
    /// Memory in bytes; request and limit.
    pub memory_bytes: Option<u64>,
    /// GPUs, if any.
    pub gpu: Option<Gpu>,
}

/// A GPU requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gpu {
    /// How many GPUs.
    pub count: u32,
    /// How hard the requirement is.
    pub policy: GpuPolicy,
    /// The least memory one GPU must have, in GiB.
    pub min_vram_gib: Option<u32>,
}

/// How hard a GPU requirement is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GpuPolicy {
    /// No GPU.
    #[default]
    None,
    /// Run on a GPU node when one fits, else on CPU.
    Preferred,
    /// Only run with the GPUs.
    Required,
}

/// Confidential-computing requirement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Confidentiality {
    /// No preference.
    #[default]
    Any,
    /// Must run in an ordinary (non-TEE) container runtime.
    StandardRequired,
    /// Use the TEE runtime class when the cluster has it.
    TeePreferred,
    /// Only run in a TEE; an error on clusters without one.
    TeeRequired,
}

/// Kubernetes settings, both the operator's defaults ([`Target::defaults`])
/// and per-instance overrides ([`Workload::kubernetes`]). Maps merge with
/// the instance winning on equal keys; lists are concatenated (duplicates
/// dropped); a `Some` or `true` in the instance wins.
#[derive(Debug, Clone, Default, PartialEq)]
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
    pub security: SecurityRelaxations,
}

/// What may be loosened in kiln's hardened default security context
/// (non-root, no privilege escalation, all capabilities dropped,
/// `RuntimeDefault` seccomp, read-only root filesystem). All off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityRelaxations {
    /// Allow the image to run as root (drops `runAsNonRoot`).
    pub run_as_root: bool,
    /// A writable root filesystem.
    pub writable_root_filesystem: bool,
    /// Allow setuid binaries to gain privileges.
    pub allow_privilege_escalation: bool,
    /// Capabilities added back after dropping `ALL`, e.g. `NET_BIND_SERVICE`.
    pub add_capabilities: Vec<String>,
    /// `Unconfined` seccomp instead of `RuntimeDefault`.
    pub unconfined_seccomp: bool,
    /// The user to run as.
    pub run_as_user: Option<i64>,
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
