//! kiln-k8s runs a kiln service as a Kubernetes Pod. Its core is pure:
//! [`render`] maps a [`Workload`] (what to run: image, environment, files,
//! resources, GPU and TEE policy, firewall) and a [`Target`] (the
//! operator's cluster settings and what kiln detected about the cluster)
//! onto a Pod, Services, EndpointSlice, NetworkPolicy, Secrets and
//! ConfigMaps, checking everything before anything is sent. Around it sits
//! a thin client, [`Cluster`]: server-side apply (refusing to take over
//! objects that are not the instance's unless told to adopt them), status,
//! waiting for the Pod IP, logs, delete and reaping, by kiln's labels.
//!
//! It is NOT a controller: nothing watches or reconciles after a call
//! returns. It never parses kiln's spec file (the `kiln` crate converts the
//! spec into a [`Workload`]), and it is the only kiln crate that uses
//! tokio (kube is async); its async functions need a tokio runtime with
//! the time driver.
//!
//! ```
//! use kiln_k8s::{Target, Workload, render};
//!
//! let workload = Workload::new("hello", "ghcr.io/example/hello:1.0");
//! let manifests = render(&workload, &Target::default())?;
//! assert_eq!(manifests.pod.metadata.name.as_deref(), Some("hello"));
//! assert!(manifests.to_yaml()?.contains("restartPolicy: Never"));
//! # Ok::<(), kiln_k8s::Error>(())
//! ```

mod client;
mod error;
mod input;
mod manifest;
mod names;
mod ownership;
mod status;

pub use client::{Applied, Cluster, Deleted, ForeignObjects, Instance};
pub use error::{Error, Result};
pub use input::{
    DataVolume, KubernetesOptions, Mount, MountSource, PodContainer, Resources, RestartPolicy, SharedVolume, Target,
    VolumeMountSpec, Workload,
};
/// The shared vocabulary kiln's spec speaks too (kiln-types), re-exported
/// so callers name the types the [`Workload`] holds.
pub use kiln_types::firewall::{Firewall, HostPort, Protocol, PublishedPort};
pub use kiln_types::pod::{PodSecurity, Toleration};
pub use kiln_types::resources::{Confidentiality, Gpu, GpuPolicy};
pub use kiln_types::syntax::{MAX_DNS_LABEL_LEN as MAX_NAME_LEN, is_dns_label, is_image_reference};
pub use manifest::instance_name;
pub use manifest::{
    CONTAINER_NAME, HostEndpoints, INSTANCE_LABEL, MANAGED_BY_LABEL, MANAGER, MAX_INLINE_BYTES, Manifests,
    NAME_ANNOTATION, Object, render,
};
pub use status::{Phase, PodState, Reason, pod_state};

/// The Kubernetes version kiln-k8s's API types and schema checks target
/// (k8s-openapi's `v1_37` feature; `kubernetes-validate -k 1.37.0`).
pub const KUBERNETES_VERSION: &str = "1.37";

/// Re-exported so callers name the same types the manifests hold.
pub use k8s_openapi;
/// Re-exported so callers can build a [`Cluster`] from their own client.
pub use kube;

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
