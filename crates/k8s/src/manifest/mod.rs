//! The pure builders: a [`Workload`] and a [`Target`] in, Kubernetes
//! objects out. No cluster I/O; everything the builders need to know about
//! the cluster (RuntimeClasses, EndpointSlice support) is in the [`Target`].
//! [`render`] is the driver: it checks what spans objects, then calls one
//! builder per object kind (volumes with their Secrets and ConfigMaps, the
//! Services and endpoints, the NetworkPolicy, the Pod) in apply order.

mod checks;
mod pod;
mod policy;
mod service;
mod volumes;

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kiln_types::firewall::Protocol;
use kiln_types::syntax::{is_dns_label, is_image_reference};

use crate::input::{KubernetesOptions, Target, Workload};
use crate::names::instance_label;
use crate::{Error, Result};

/// `app.kubernetes.io/managed-by=kiln` marks every object kiln creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`], and kiln's server-side-apply field manager.
pub const MANAGER: &str = "kiln";
/// `kiln.dev/instance=<pod name>` ties an object to its instance.
pub const INSTANCE_LABEL: &str = "kiln.dev/instance";
/// The annotation holding the workload's name as given (before DNS mapping).
pub const NAME_ANNOTATION: &str = "kiln.dev/name";
/// The name of the one container in kiln's Pods.
pub const CONTAINER_NAME: &str = "service";

/// The host Service's suffix. The instance name is kept short enough for
/// `<instance>-host` to fit 63 bytes uncut, so the two stay recognisably
/// the same name; other suffixes (`-keystore`) are cut and hashed by
/// `derived` when needed.
const HOST_SUFFIX: &str = "host";

/// The most a Secret or ConfigMap may hold (etcd's object limit); a
/// larger tree has to come from the node (a host-path mount).
pub const MAX_INLINE_BYTES: usize = 1 << 20;

/// Every object of one instance, in the order they are applied (the Pod
/// last, so everything it mounts or reaches exists when it starts).
#[derive(Debug, Clone, PartialEq)]
pub struct Manifests {
    /// The namespace every object lives in.
    pub namespace: String,
    /// The instance's DNS name: the Pod's name and the `kiln.dev/instance` label.
    pub instance: String,
    /// Secrets: secret mounts (the keystore).
    pub secrets: Vec<Secret>,
    /// ConfigMaps: non-secret file mounts.
    pub config_maps: Vec<ConfigMap>,
    /// `<instance>-host`: a Service without selector for the host ports.
    pub host_service: Option<Service>,
    /// The host Service's endpoints: the host address and ports.
    pub host_endpoints: Option<HostEndpoints>,
    /// `<instance>`: a Service selecting the Pod, for the published ports.
    pub service: Option<Service>,
    /// `<instance>`: the firewall.
    pub network_policy: NetworkPolicy,
    /// `<instance>`: the Pod.
    pub pod: Pod,
    /// What the Pod cannot express of the workload, for the user to read.
    pub warnings: Vec<String>,
}

/// The host Service's endpoints, as the cluster supports them.
#[derive(Debug, Clone, PartialEq)]
pub enum HostEndpoints {
    /// `discovery.k8s.io/v1` (every cluster since 1.21).
    Slice(EndpointSlice),
    /// v1 Endpoints (deprecated since 1.33), only for clusters without slices.
    Legacy(Endpoints),
}

/// One object of [`Manifests`], borrowed, in apply order.
#[derive(Debug, Clone, Copy)]
pub enum Object<'a> {
    /// A Secret.
    Secret(&'a Secret),
    /// A ConfigMap.
    ConfigMap(&'a ConfigMap),
    /// A Service.
    Service(&'a Service),
    /// An EndpointSlice.
    EndpointSlice(&'a EndpointSlice),
    /// A v1 Endpoints.
    Endpoints(&'a Endpoints),
    /// A NetworkPolicy.
    NetworkPolicy(&'a NetworkPolicy),
    /// The Pod.
    Pod(&'a Pod),
}

impl Object<'_> {
    /// `Kind/name`, for messages.
    pub fn describe(&self) -> String {
        let (kind, meta) = match self {
            Object::Secret(o) => ("Secret", &o.metadata),
            Object::ConfigMap(o) => ("ConfigMap", &o.metadata),
            Object::Service(o) => ("Service", &o.metadata),
            Object::EndpointSlice(o) => ("EndpointSlice", &o.metadata),
            Object::Endpoints(o) => ("Endpoints", &o.metadata),
            Object::NetworkPolicy(o) => ("NetworkPolicy", &o.metadata),
            Object::Pod(o) => ("Pod", &o.metadata),
        };
        format!("{kind}/{}", meta.name.as_deref().unwrap_or(""))
    }

    /// The object as JSON, as the API server receives it.
    pub fn to_json(self) -> serde_json::Value {
        let value = match self {
            Object::Secret(o) => serde_json::to_value(o),
            Object::ConfigMap(o) => serde_json::to_value(o),
            Object::Service(o) => serde_json::to_value(o),
            Object::EndpointSlice(o) => serde_json::to_value(o),
            Object::Endpoints(o) => serde_json::to_value(o),
            Object::NetworkPolicy(o) => serde_json::to_value(o),
            Object::Pod(o) => serde_json::to_value(o),
        };
        // k8s-openapi's types serialize infallibly: string keys, no floats.
        value.unwrap_or_else(|err| unreachable!("Kubernetes object does not serialize as JSON: {err}"))
    }

    /// The object as one YAML document.
    pub fn to_yaml(self) -> Result<String> {
        let rendered = match self {
            Object::Secret(o) => serde_saphyr::to_string(o),
            Object::ConfigMap(o) => serde_saphyr::to_string(o),
            Object::Service(o) => serde_saphyr::to_string(o),
            Object::EndpointSlice(o) => serde_saphyr::to_string(o),
            Object::Endpoints(o) => serde_saphyr::to_string(o),
            Object::NetworkPolicy(o) => serde_saphyr::to_string(o),
            Object::Pod(o) => serde_saphyr::to_string(o),
        };
        rendered.map_err(|source| Error::Yaml { what: self.describe(), source })
    }
}

impl Manifests {
    /// Every object, in apply order.
    pub fn objects(&self) -> Vec<Object<'_>> {
        let mut objects: Vec<Object<'_>> = Vec::new();
        objects.extend(self.secrets.iter().map(Object::Secret));
        objects.extend(self.config_maps.iter().map(Object::ConfigMap));
        objects.extend(self.host_service.iter().map(Object::Service));
        match &self.host_endpoints {
            Some(HostEndpoints::Slice(slice)) => objects.push(Object::EndpointSlice(slice)),
            Some(HostEndpoints::Legacy(endpoints)) => objects.push(Object::Endpoints(endpoints)),
            None => {}
        }
        objects.extend(self.service.iter().map(Object::Service));
        objects.push(Object::NetworkPolicy(&self.network_policy));
        objects.push(Object::Pod(&self.pod));
        objects
    }

    /// All objects as one multi-document YAML stream (`---` between
    /// documents), what `kiln render --target k8s` prints.
    pub fn to_yaml(&self) -> Result<String> {
        let documents = self.objects().into_iter().map(Object::to_yaml).collect::<Result<Vec<_>>>()?;
        Ok(documents.join("---\n"))
    }
}

/// Maps a workload onto Kubernetes objects. Every check runs here, before
/// anything could be applied: a workload that renders is one the cluster
/// can be asked to run.
pub fn render(workload: &Workload, target: &Target) -> Result<Manifests> {
    let cx = Context::new(workload, target)?;
    let mut warnings = Vec::new();
    let volumes::Volumes { secrets, config_maps, volumes, mounts, .. } = volumes::volumes(&cx, &mut warnings)?;
    let (host_service, host_endpoints) = service::host_service(&cx)?;
    let service = service::published_service(&cx);
    let network_policy = policy::network_policy(&cx);
    let pod = pod::pod(&cx, volumes, mounts, &mut warnings)?;
    let Context { namespace, instance, .. } = cx;
    Ok(Manifests {
        namespace,
        instance,
        secrets,
        config_maps,
        host_service,
        host_endpoints,
        service,
        network_policy,
        pod,
        warnings,
    })
}

/// What every builder needs: the input, the merged options, and the
/// instance's names and labels.
struct Context<'a> {
    workload: &'a Workload,
    target: &'a Target,
    /// The operator's options overlaid with the instance's.
    options: KubernetesOptions,
    /// The instance's DNS name.
    instance: String,
    namespace: String,
    /// kiln's labels plus the user's, on every object.
    labels: BTreeMap<String, String>,
}

impl<'a> Context<'a> {
    /// Checks what is not any one object's: the names, the image, the
    /// firewall and the merged options.
    fn new(workload: &'a Workload, target: &'a Target) -> Result<Context<'a>> {
        let invalid = |why: String| Error::InvalidInput { workload: workload.name.clone(), why };
        let instance = instance_name(&workload.name)?;
        if !workload.containers.is_empty() {
            checks::check_pod_form(workload).map_err(invalid)?;
        } else if workload.image.trim().is_empty() {
            return Err(Error::NoImage { workload: workload.name.clone() });
        }
        if !is_image_reference(&workload.image) {
            return Err(invalid(format!(
                "image `{}` contains whitespace or control characters",
                workload.image.escape_debug()
            )));
        }
        workload.firewall.validate().map_err(|source| Error::Firewall { workload: workload.name.clone(), source })?;
        let options = merge(&target.defaults, &workload.kubernetes);
        let namespace = options.namespace.clone().unwrap_or_else(|| target.fallback_namespace.clone());
        if !is_dns_label(&namespace) {
            return Err(invalid(format!(
                "namespace `{namespace}` is not a DNS label (lower-case letters, digits, `-`)"
            )));
        }
        checks::check_options(&options).map_err(invalid)?;
        let labels = object_labels(&instance, &options.labels);
        Ok(Context { workload, target, options, instance, namespace, labels })
    }

    /// An object's metadata: its name, the namespace and the labels.
    fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels.clone()),
            ..ObjectMeta::default()
        }
    }

    /// The labels that select the instance's Pod.
    fn selector(&self) -> BTreeMap<String, String> {
        [(MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned()), (INSTANCE_LABEL.to_owned(), self.instance.clone())].into()
    }

    fn invalid(&self, why: String) -> Error {
        Error::InvalidInput { workload: self.workload.name.clone(), why }
    }
}

/// The Pod's name (and `kiln.dev/instance` label) for a workload name:
/// the name itself when it is a DNS label short enough to leave room for
/// the `-host` Service, else a mapped, hashed form (see `docs/kubernetes.md`).
/// `kiln k8s status NAME` maps NAME through this, so the spec's name and
/// the Pod's name both work.
pub fn instance_name(workload_name: &str) -> Result<String> {
    instance_label(workload_name, HOST_SUFFIX.len() + 1)
}

/// The operator's options overlaid with the instance's.
fn merge(defaults: &KubernetesOptions, instance: &KubernetesOptions) -> KubernetesOptions {
    let map = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| {
        a.iter().chain(b.iter()).map(|(k, v)| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>()
    };
    let list = |a: &[String], b: &[String]| {
        let mut out: Vec<String> = a.iter().chain(b.iter()).cloned().collect();
        dedup(&mut out);
        out
    };
    let mut tolerations: Vec<_> = defaults.tolerations.iter().chain(&instance.tolerations).cloned().collect();
    dedup(&mut tolerations);
    let (d, i) = (&defaults.security, &instance.security);
    KubernetesOptions {
        namespace: instance.namespace.clone().or_else(|| defaults.namespace.clone()),
        node_selector: map(&defaults.node_selector, &instance.node_selector),
        tolerations,
        annotations: map(&defaults.annotations, &instance.annotations),
        labels: map(&defaults.labels, &instance.labels),
        image_pull_secrets: list(&defaults.image_pull_secrets, &instance.image_pull_secrets),
        service_account: instance.service_account.clone().or_else(|| defaults.service_account.clone()),
        security: kiln_types::pod::PodSecurity {
            run_as_root: d.run_as_root || i.run_as_root,
            writable_root_filesystem: d.writable_root_filesystem || i.writable_root_filesystem,
            allow_privilege_escalation: d.allow_privilege_escalation || i.allow_privilege_escalation,
            add_capabilities: list(&d.add_capabilities, &i.add_capabilities),
            unconfined_seccomp: d.unconfined_seccomp || i.unconfined_seccomp,
            run_as_user: i.run_as_user.or(d.run_as_user),
        },
    }
}

/// Removes later duplicates, keeping the first occurrence's position.
fn dedup<T: PartialEq + Clone>(items: &mut Vec<T>) {
    let mut kept: Vec<T> = Vec::with_capacity(items.len());
    for item in items.drain(..) {
        if !kept.contains(&item) {
            kept.push(item);
        }
    }
    *items = kept;
}

/// kiln's labels plus the user's; the user cannot override kiln's.
fn object_labels(instance: &str, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut labels = extra.clone();
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned());
    labels.insert(INSTANCE_LABEL.to_owned(), instance.to_owned());
    labels
}

fn protocol(protocol: Protocol) -> String {
    protocol.as_str().to_ascii_uppercase()
}

/// Port names must be unique within a Service: `tcp-8545`.
fn port_name(protocol: Protocol, port: u16) -> String {
    format!("{protocol}-{port}")
}

/// `2`, `1500m`.
fn cpu_quantity(millicpus: u32) -> Quantity {
    Quantity(if millicpus.is_multiple_of(1000) { (millicpus / 1000).to_string() } else { format!("{millicpus}m") })
}

/// `512Mi`, `2Gi`, or plain bytes.
fn memory_quantity(bytes: u64) -> Quantity {
    const UNITS: [(u64, &str); 4] = [(1 << 40, "Ti"), (1 << 30, "Gi"), (1 << 20, "Mi"), (1 << 10, "Ki")];
    for (size, suffix) in UNITS {
        if bytes.is_multiple_of(size) {
            return Quantity(format!("{}{suffix}", bytes / size));
        }
    }
    Quantity(bytes.to_string())
}

/// If `value` is a URL (`scheme://host…`) whose host is a loopback name or
/// address, the same URL with the host replaced by `host`. Inside a Pod the
/// loopback address is the Pod itself, so `http://127.0.0.1:8545` written
/// for the microVM's host must become the host's address.
pub(crate) fn loopback_url_rewrite(value: &str, host: Option<IpAddr>) -> Option<String> {
    let host = host?;
    let (scheme, rest) = value.split_once("://")?;
    if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) {
        return None;
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((user, hostport)) => (Some(user), hostport),
        None => (None, authority),
    };
    let (hostname, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (inner, after) = bracketed.split_once(']')?;
        (inner, after)
    } else {
        match hostport.find(':') {
            Some(colon) => hostport.split_at(colon),
            None => (hostport, ""),
        }
    };
    let loopback =
        hostname.eq_ignore_ascii_case("localhost") || hostname.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return None;
    }
    let new_host = match host {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let user = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    Some(format!("{scheme}://{user}{new_host}{port}{tail}"))
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn check_rewrite(value: &str, expect: Expect) {
        let v4 = loopback_url_rewrite(value, Some(IpAddr::from([10, 0, 0, 1])));
        let v6 = loopback_url_rewrite(value, Some("fd00::1".parse().expect("IPv6")));
        let show = |r: Option<String>| r.unwrap_or_else(|| "unchanged".to_owned());
        expect.assert_eq(&format!("{} | {}", show(v4), show(v6)));
    }

    #[test]
    fn loopback_urls_point_at_the_host() {
        check_rewrite("http://127.0.0.1:8545", expect!["http://10.0.0.1:8545 | http://[fd00::1]:8545"]);
        check_rewrite("http://localhost", expect!["http://10.0.0.1 | http://[fd00::1]"]);
        check_rewrite("HTTP://LocalHost:1/a?b#c", expect!["HTTP://10.0.0.1:1/a?b#c | HTTP://[fd00::1]:1/a?b#c"]);
        check_rewrite(
            "https://user:p%40ss@localhost:8443/x",
            expect!["https://user:p%40ss@10.0.0.1:8443/x | https://user:p%40ss@[fd00::1]:8443/x"],
        );
        check_rewrite("ws://[::1]:8546/", expect!["ws://10.0.0.1:8546/ | ws://[fd00::1]:8546/"]);
        check_rewrite("http://127.8.9.10:80", expect!["http://10.0.0.1:80 | http://[fd00::1]:80"]);
        check_rewrite("http://localhost.example.com:80", expect!["unchanged | unchanged"]);
        check_rewrite("http://10.1.2.3:80", expect!["unchanged | unchanged"]);
        check_rewrite("http://0.0.0.0:80", expect!["unchanged | unchanged"]);
        check_rewrite("127.0.0.1:8545", expect!["unchanged | unchanged"]);
        check_rewrite("http://[::1", expect!["unchanged | unchanged"]);
        check_rewrite("not a url", expect!["unchanged | unchanged"]);
        check_rewrite("a b://localhost", expect!["unchanged | unchanged"]);
    }

    #[test]
    fn quantities() {
        let cpu: Vec<String> = [1, 250, 1000, 1500, 64_000].into_iter().map(|m| cpu_quantity(m).0).collect();
        expect![[r#"["1m", "250m", "1", "1500m", "64"]"#]].assert_eq(&format!("{cpu:?}"));
        let memory: Vec<String> = [1, 1024, 1536, 512 << 20, 3 << 30, 1 << 40, (1 << 30) + 1]
            .into_iter()
            .map(|b| memory_quantity(b).0)
            .collect();
        expect![[r#"["1", "1Ki", "1536", "512Mi", "3Gi", "1Ti", "1073741825"]"#]].assert_eq(&format!("{memory:?}"));
    }
}
