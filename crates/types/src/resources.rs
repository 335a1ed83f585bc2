//! What a service needs of its machine beyond CPUs and memory: GPUs and a
//! trusted execution environment. The spec's `[resources]` table holds
//! them (the serde attributes are its TOML syntax); kiln-k8s maps them onto
//! scheduling constraints.

use serde::{Deserialize, Serialize};

/// GPU needs (the spec's `resources.gpu`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// How many.
    #[serde(default)]
    pub count: u32,
    /// Whether they are needed.
    #[serde(default)]
    pub policy: GpuPolicy,
    /// The least memory per GPU, in GB (GiB on Kubernetes node labels).
    pub min_vram_gb: Option<u32>,
}

/// Whether GPUs are needed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuPolicy {
    /// No GPU.
    #[default]
    None,
    /// A GPU if one is available, else CPU.
    Preferred,
    /// A GPU or nothing.
    Required,
}

/// Whether the service needs a trusted execution environment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Confidentiality {
    /// Anything.
    #[default]
    Any,
    /// Explicitly not a TEE.
    StandardRequired,
    /// A TEE when available.
    TeePreferred,
    /// A TEE or nothing.
    TeeRequired,
}
