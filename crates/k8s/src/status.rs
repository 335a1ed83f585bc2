//! What a Pod's status means for the user: a pure function over the Pod
//! object the API server returns.

use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

/// The Pod's phase, as Kubernetes reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, not all containers running yet (scheduling, pulling).
    Pending,
    /// Bound to a node, the container started.
    Running,
    /// The container exited 0 (restart policy is Never).
    Succeeded,
    /// The container exited non-zero or was killed.
    Failed,
    /// No phase reported, or one kiln does not know.
    Unknown,
}

/// Why a Pod is not (or no longer) running as it should.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// The image cannot be pulled and the kubelet is backing off.
    ImagePullBackOff,
    /// The last pull failed.
    ErrImagePull,
    /// The container keeps exiting (only with restarts; kiln uses Never).
    CrashLoopBackOff,
    /// The container was killed for exceeding its memory limit.
    OomKilled,
    /// No node fits the Pod (resources, selectors, taints).
    Unschedulable,
    /// The container cannot be created from its spec (a missing Secret,
    /// an image that runs as root under `runAsNonRoot`, …).
    CreateContainerConfigError,
    /// The container exited with a code other than 0.
    Error,
    /// Any other reason Kubernetes gave.
    Other(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::ImagePullBackOff => "ImagePullBackOff",
            Reason::ErrImagePull => "ErrImagePull",
            Reason::CrashLoopBackOff => "CrashLoopBackOff",
            Reason::OomKilled => "OOMKilled",
            Reason::Unschedulable => "Unschedulable",
            Reason::CreateContainerConfigError => "CreateContainerConfigError",
            Reason::Error => "Error",
            Reason::Other(other) => other,
        })
    }
}

impl Reason {
    fn parse(reason: &str) -> Reason {
        match reason {
            "ImagePullBackOff" => Reason::ImagePullBackOff,
            "ErrImagePull" => Reason::ErrImagePull,
            "CrashLoopBackOff" => Reason::CrashLoopBackOff,
            "OOMKilled" => Reason::OomKilled,
            "Unschedulable" => Reason::Unschedulable,
            "CreateContainerConfigError" => Reason::CreateContainerConfigError,
            "Error" => Reason::Error,
            other => Reason::Other(other.to_owned()),
        }
    }

    /// Whether the Pod cannot recover without a change by someone: waiting
    /// longer will not give it an IP address worth having.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Reason::ImagePullBackOff | Reason::ErrImagePull | Reason::CreateContainerConfigError | Reason::OomKilled
        )
    }
}

/// A Pod's state in the terms `kiln k8s status` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodState {
    /// The phase.
    pub phase: Phase,
    /// Why it is not running, if Kubernetes said.
    pub reason: Option<Reason>,
    /// Kubernetes' message for the reason, if any.
    pub message: Option<String>,
    /// The exit code of a terminated container.
    pub exit_code: Option<i32>,
    /// The Pod's IP address once it has one.
    pub pod_ip: Option<IpAddr>,
    /// The node it runs on.
    pub node: Option<String>,
}

impl fmt::Display for PodState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.phase)?;
        if let Some(reason) = &self.reason {
            write!(f, " ({reason})")?;
        }
        if let Some(code) = self.exit_code {
            write!(f, ", exit code {code}")?;
        }
        if let Some(message) = &self.message {
            write!(f, ": {message}")?;
        }
        Ok(())
    }
}

/// Interprets a Pod's status. The most telling reason wins: a container's
/// own (OOMKilled, image pull, crash) over the Pod's scheduling condition
/// over the Pod-level reason (e.g. `Evicted`).
pub fn pod_state(pod: &Pod) -> PodState {
    let status = pod.status.as_ref();
    let phase = match status.and_then(|s| s.phase.as_deref()) {
        Some("Pending") => Phase::Pending,
        Some("Running") => Phase::Running,
        Some("Succeeded") => Phase::Succeeded,
        Some("Failed") => Phase::Failed,
        _ => Phase::Unknown,
    };
    let pod_ip = status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok());
    let node = pod.spec.as_ref().and_then(|spec| spec.node_name.clone());
    let mut state = PodState { phase, reason: None, message: None, exit_code: None, pod_ip, node };

    let containers: &[ContainerStatus] = status.and_then(|s| s.container_statuses.as_deref()).unwrap_or(&[]);
    for container in containers {
        let current = container.state.as_ref();
        if let Some(terminated) = current.and_then(|s| s.terminated.as_ref()) {
            state.exit_code = Some(terminated.exit_code);
            if let Some(reason) = terminated.reason.as_deref().filter(|r| *r != "Completed") {
                state.reason = Some(Reason::parse(reason));
                state.message = terminated.message.clone();
            }
            return state;
        }
        if let Some(waiting) = current.and_then(|s| s.waiting.as_ref())
            && let Some(reason) = waiting.reason.as_deref().filter(|r| *r != "ContainerCreating")
        {
            state.reason = Some(Reason::parse(reason));
            state.message = waiting.message.clone();
            // A crash loop caused by the memory limit is reported as what it is.
            let last = container.last_state.as_ref().and_then(|s| s.terminated.as_ref());
            if let Some(last) = last {
                state.exit_code = Some(last.exit_code);
                if last.reason.as_deref() == Some("OOMKilled") {
                    state.reason = Some(Reason::OomKilled);
                }
            }
            return state;
        }
    }
    let conditions = status.and_then(|s| s.conditions.as_deref()).unwrap_or(&[]);
    if let Some(unscheduled) =
        conditions.iter().find(|c| c.type_ == "PodScheduled" && c.status == "False" && c.reason.is_some())
    {
        state.reason = unscheduled.reason.as_deref().map(Reason::parse);
        state.message = unscheduled.message.clone();
        return state;
    }
    if let Some(reason) = status.and_then(|s| s.reason.as_deref()) {
        state.reason = Some(Reason::parse(reason));
        state.message = status.and_then(|s| s.message.clone());
    }
    state
}
