//! The Pod-side settings that the spec's `[kubernetes]` table, the
//! operator's defaults file and kiln-k8s all hold: tolerations and the
//! loosening of kiln's hardened security context. The serde attributes are
//! the spec's TOML syntax.

use serde::{Deserialize, Serialize};

/// A Kubernetes toleration (without `tolerationSeconds`, which kiln never sets).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Toleration {
    /// The taint key (absent with `operator = "Exists"` tolerates all).
    pub key: Option<String>,
    /// `Equal` (default) or `Exists`.
    pub operator: Option<String>,
    /// The taint value, for `Equal`.
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`; absent matches all.
    pub effect: Option<String>,
}

/// What may be loosened in kiln's hardened default security context
/// (non-root, no privilege escalation, all capabilities dropped,
/// `RuntimeDefault` seccomp, read-only root filesystem). All off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PodSecurity {
    /// Allow the image to run as root (drops `runAsNonRoot`).
    #[serde(default)]
    pub run_as_root: bool,
    /// A writable root filesystem.
    #[serde(default)]
    pub writable_root_filesystem: bool,
    /// Allow setuid binaries to gain privileges.
    #[serde(default)]
    pub allow_privilege_escalation: bool,
    /// Capabilities added back after dropping all, such as `NET_BIND_SERVICE`.
    #[serde(default)]
    pub add_capabilities: Vec<String>,
    /// `Unconfined` seccomp instead of `RuntimeDefault`.
    #[serde(default)]
    pub unconfined_seccomp: bool,
    /// The user id to run as.
    pub run_as_user: Option<i64>,
}
