use std::time::Duration;

/// Everything that can go wrong in kiln-k8s.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The workload has no container image.
    #[error("workload `{workload}` has no image")]
    NoImage {
        /// The workload's name as given.
        workload: String,
    },
    /// A name that cannot be turned into a DNS label (RFC 1123).
    #[error("`{name}` cannot become a Kubernetes name: {why}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// A GPU policy that cannot be satisfied as written.
    #[error("workload `{workload}`: {why}")]
    InvalidGpu {
        /// The workload's name as given.
        workload: String,
        /// What is wrong.
        why: String,
    },
    /// `tee-required` on a cluster without the TEE runtime class.
    #[error(
        "workload `{workload}` requires a TEE, but the cluster has no RuntimeClass `{runtime_class}` (it has: {available})"
    )]
    NoTeeRuntime {
        /// The workload's name as given.
        workload: String,
        /// The RuntimeClass kiln looked for.
        runtime_class: String,
        /// The RuntimeClasses the cluster has, comma-separated, or `none`.
        available: String,
    },
    /// Any other field of the input that cannot be mapped.
    #[error("workload `{workload}`: {why}")]
    InvalidInput {
        /// The workload's name as given.
        workload: String,
        /// What is wrong.
        why: String,
    },
    /// The firewall description itself is invalid.
    #[error("workload `{workload}`: invalid firewall")]
    Firewall {
        /// The workload's name as given.
        workload: String,
        /// kiln-types' reason.
        #[source]
        source: kiln_types::Error,
    },
    /// Rendering manifests as YAML failed.
    #[error("cannot render {what} as YAML")]
    Yaml {
        /// The object being rendered.
        what: String,
        /// The serializer's reason.
        #[source]
        source: serde_saphyr::SerializeError,
    },
    /// No usable cluster configuration (kubeconfig or in-cluster).
    #[error("cannot load the Kubernetes configuration{}", context.as_ref().map(|c| format!(" for context `{c}`")).unwrap_or_default())]
    Config {
        /// The kubeconfig context asked for, if any.
        context: Option<String>,
        /// kube's reason.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A request to the API server failed other than by an error status
    /// (an unreadable answer, a client-side failure).
    #[error("{action} failed")]
    Api {
        /// What kiln was doing, e.g. "apply Pod kiln-demo in namespace default".
        action: String,
        /// kube's reason (for API errors: the server's status, code and message).
        #[source]
        source: kube::Error,
    },
    /// The API server answered a request with an error status.
    #[error("{action} failed: the API server answered {code} {reason}: {message}")]
    Rejected {
        /// What kiln was doing.
        action: String,
        /// The HTTP status code.
        code: u16,
        /// The machine-readable reason, e.g. `Forbidden`, `InternalError`.
        reason: String,
        /// The server's message.
        message: String,
    },
    /// The API server cannot be reached (connection refused, DNS, TLS, timeout).
    #[error("cannot reach the Kubernetes API server to {action}")]
    Unreachable {
        /// What kiln was doing.
        action: String,
        /// kube's reason.
        #[source]
        source: kube::Error,
    },
    /// Streaming a Pod's log, or writing it out, failed midway.
    #[error("following the log of Pod `{pod}` failed")]
    LogStream {
        /// The Pod's name.
        pod: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The Pod did not get an IP address in time.
    #[error("Pod `{pod}` has no IP address after {waited:?} (last state: {last_state})")]
    WaitTimedOut {
        /// The Pod's name.
        pod: String,
        /// How long kiln waited.
        waited: Duration,
        /// The Pod's last observed state.
        last_state: String,
    },
    /// The Pod ended (or cannot start) before it had an IP address.
    #[error("Pod `{pod}` will not get an IP address: {state}")]
    PodFailed {
        /// The Pod's name.
        pod: String,
        /// The Pod's state.
        state: String,
    },
    /// Objects `apply` was about to write exist and are not this
    /// instance's: not labelled as kiln's, or kiln's for another instance.
    /// Nothing was written.
    #[error("{}", not_owned_message(objects, namespace, instance))]
    NotOwned {
        /// Each object as `Kind/name (its labels)`.
        objects: Vec<String>,
        /// Their namespace.
        namespace: String,
        /// The instance kiln was applying.
        instance: String,
    },
    /// The Pod does not exist.
    #[error("Pod `{pod}` does not exist in namespace `{namespace}`")]
    NotFound {
        /// The Pod's name.
        pod: String,
        /// Its namespace.
        namespace: String,
    },
}

fn not_owned_message(objects: &[String], namespace: &str, instance: &str) -> String {
    let (subject, verbs, them) = match objects {
        [one] => (one.clone(), "exists in namespace `{ns}` and does not belong", "it"),
        [many @ .., last] => {
            (format!("{} and {last}", many.join(", ")), "exist in namespace `{ns}` and do not belong", "them")
        }
        [] => (String::from("no object"), "exists in namespace `{ns}` and does not belong", "it"),
    };
    format!(
        "{subject} {} to kiln instance `{instance}`; nothing was applied; `kiln k8s apply --adopt` takes {them} over",
        verbs.replace("{ns}", namespace)
    )
}

/// kiln-k8s's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
