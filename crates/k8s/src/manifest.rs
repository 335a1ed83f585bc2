//! The pure builders: a [`Workload`] and a [`Target`] in, Kubernetes
//! objects out. No cluster I/O; everything the builders need to know about
//! the cluster (RuntimeClasses, EndpointSlice support) is in the [`Target`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EndpointAddress, EndpointPort as CoreEndpointPort, EndpointSubset, Endpoints, EnvVar, HostPathVolumeSource,
    LocalObjectReference, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PodSecurityContext, PodSpec, PreferredSchedulingTerm, ResourceRequirements, SeccompProfile, Secret,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kiln_net::Protocol;

use crate::input::{Confidentiality, GpuPolicy, KubernetesOptions, MountSource, Target, Workload};
use crate::names::{derived, instance_label};
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

/// The extended resource NVIDIA's device plugin serves.
const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Node label set by NVIDIA GPU Feature Discovery on GPU nodes.
const GPU_PRESENT_LABEL: &str = "nvidia.com/gpu.present";
/// Node label set by GPU Feature Discovery: memory of one GPU, in MiB.
const GPU_MEMORY_LABEL: &str = "nvidia.com/gpu.memory";
/// Weight of the preferred GPU node affinity (out of 100).
const GPU_PREFERRED_WEIGHT: i32 = 80;
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
    let invalid = |why: String| Error::InvalidInput { workload: workload.name.clone(), why };
    let instance = instance_name(&workload.name)?;
    if workload.image.trim().is_empty() {
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
    if !crate::names::is_dns_label(&namespace) {
        return Err(invalid(format!("namespace `{namespace}` is not a DNS label (lower-case letters, digits, `-`)")));
    }
    check_options(&options).map_err(invalid)?;
    let mut warnings = Vec::new();

    let labels = object_labels(&instance, &options.labels);
    let meta = |name: String| ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.clone()),
        labels: Some(labels.clone()),
        ..ObjectMeta::default()
    };

    // File mounts: Secrets, ConfigMaps, hostPaths.
    let mut secrets = Vec::new();
    let mut config_maps = Vec::new();
    let mut volumes = Vec::new();
    let mut volume_mounts = Vec::new();
    let mut mount_names = BTreeSet::new();
    let mut mount_paths = BTreeSet::new();
    for mount in &workload.mounts {
        let volume_name =
            instance_label(&mount.name, 0).map_err(|err| invalid(format!("mount `{}`: {err}", mount.name)))?;
        if !mount_names.insert(volume_name.clone()) {
            return Err(invalid(format!("mount `{}` is given twice", mount.name)));
        }
        check_mount_path(&mount.mount_path).map_err(|why| invalid(format!("mount `{}`: {why}", mount.name)))?;
        if !mount_paths.insert(mount.mount_path.trim_end_matches('/').to_owned()) {
            return Err(invalid(format!("two mounts at `{}`", mount.mount_path)));
        }
        let object_name = derived(&instance, &volume_name);
        let mut volume = Volume { name: volume_name.clone(), ..Volume::default() };
        match &mount.source {
            MountSource::Files { files, secret } => {
                for file in files.keys() {
                    check_file_key(file)
                        .map_err(|why| invalid(format!("mount `{}`: file `{file}` {why}", mount.name)))?;
                }
                let total: usize = files.values().map(Vec::len).sum();
                if total > MAX_INLINE_BYTES {
                    return Err(invalid(format!(
                        "mount `{}` holds {total} bytes, more than the {MAX_INLINE_BYTES} a {} can; mount it from the node instead",
                        mount.name,
                        if *secret { "Secret" } else { "ConfigMap" }
                    )));
                }
                if *secret {
                    secrets.push(Secret {
                        metadata: meta(object_name.clone()),
                        type_: Some("Opaque".to_owned()),
                        data: Some(files.iter().map(|(k, v)| (k.clone(), ByteString(v.clone()))).collect()),
                        ..Secret::default()
                    });
                    volume.secret = Some(SecretVolumeSource {
                        secret_name: Some(object_name),
                        default_mode: Some(0o400),
                        ..SecretVolumeSource::default()
                    });
                } else {
                    let (text, binary): (BTreeMap<_, _>, BTreeMap<_, _>) = files
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .partition(|(_, v)| std::str::from_utf8(v).is_ok());
                    let text: BTreeMap<String, String> =
                        text.into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned())).collect();
                    let binary: BTreeMap<String, ByteString> =
                        binary.into_iter().map(|(k, v)| (k, ByteString(v))).collect();
                    config_maps.push(ConfigMap {
                        metadata: meta(object_name.clone()),
                        data: (!text.is_empty()).then_some(text),
                        binary_data: (!binary.is_empty()).then_some(binary),
                        ..ConfigMap::default()
                    });
                    volume.config_map = Some(ConfigMapVolumeSource {
                        name: object_name,
                        default_mode: Some(0o444),
                        ..ConfigMapVolumeSource::default()
                    });
                }
            }
            MountSource::HostPath(path) => {
                check_mount_path(path).map_err(|why| invalid(format!("mount `{}`: host path {why}", mount.name)))?;
                volume.host_path =
                    Some(HostPathVolumeSource { path: path.clone(), type_: Some("Directory".to_owned()) });
                warnings.push(format!(
                    "mount `{}` is the node's directory `{path}`: the Pod only works on nodes that have it",
                    mount.name
                ));
            }
        }
        volumes.push(volume);
        volume_mounts.push(VolumeMount {
            name: volume_name,
            mount_path: mount.mount_path.clone(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    if let Some(data) = &workload.data_volume {
        check_mount_path(&data.mount_path).map_err(|why| invalid(format!("data volume: {why}")))?;
        if data.size_bytes == 0 {
            return Err(invalid("data volume of 0 bytes".to_owned()));
        }
        if !mount_names.insert("data".to_owned())
            || !mount_paths.insert(data.mount_path.trim_end_matches('/').to_owned())
        {
            return Err(invalid(format!(
                "the data volume clashes with a mount named `data` or at `{}`",
                data.mount_path
            )));
        }
        volumes.push(Volume {
            name: "data".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(memory_quantity(data.size_bytes)),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        });
        volume_mounts.push(VolumeMount {
            name: "data".to_owned(),
            mount_path: data.mount_path.clone(),
            ..VolumeMount::default()
        });
    }
    let security = &options.security;
    if !security.writable_root_filesystem && !mount_paths.contains("/tmp") && !mount_names.contains("tmp") {
        // A read-only root still needs somewhere to write scratch files.
        volumes.push(Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
        volume_mounts.push(VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        });
    }

    // Host ports: a selector-less Service plus its endpoints.
    let host_ports = &workload.firewall.host_ports;
    let host_address = target.host_address;
    let (host_service, host_endpoints) = if host_ports.is_empty() {
        (None, None)
    } else {
        let address = host_address.ok_or_else(|| {
            invalid("the firewall lists host ports, but the target has no host address for Pods to reach".to_owned())
        })?;
        let name = derived(&instance, HOST_SUFFIX);
        let service = Service {
            metadata: meta(name.clone()),
            spec: Some(ServiceSpec {
                ports: Some(
                    host_ports
                        .iter()
                        .map(|hp| ServicePort {
                            name: Some(port_name(hp.protocol, hp.port)),
                            protocol: Some(protocol(hp.protocol)),
                            port: i32::from(hp.port),
                            target_port: Some(IntOrString::Int(i32::from(hp.port))),
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        let endpoints = if target.endpoint_slices {
            let mut slice_meta = meta(name.clone());
            let slice_labels = slice_meta.labels.get_or_insert_with(BTreeMap::new);
            slice_labels.insert("kubernetes.io/service-name".to_owned(), name.clone());
            // Without this label the EndpointSlice controller would treat it as its own.
            slice_labels.insert("endpointslice.kubernetes.io/managed-by".to_owned(), "kiln.dev".to_owned());
            HostEndpoints::Slice(EndpointSlice {
                metadata: slice_meta,
                address_type: if address.is_ipv4() { "IPv4" } else { "IPv6" }.to_owned(),
                endpoints: Some(vec![Endpoint {
                    addresses: vec![address.to_string()],
                    conditions: Some(EndpointConditions { ready: Some(true), ..EndpointConditions::default() }),
                    ..Endpoint::default()
                }]),
                ports: Some(
                    host_ports
                        .iter()
                        .map(|hp| EndpointPort {
                            name: Some(port_name(hp.protocol, hp.port)),
                            port: Some(i32::from(hp.port)),
                            protocol: Some(protocol(hp.protocol)),
                            ..EndpointPort::default()
                        })
                        .collect(),
                ),
            })
        } else {
            HostEndpoints::Legacy(Endpoints {
                metadata: meta(name),
                subsets: Some(vec![EndpointSubset {
                    addresses: Some(vec![EndpointAddress { ip: address.to_string(), ..EndpointAddress::default() }]),
                    ports: Some(
                        host_ports
                            .iter()
                            .map(|hp| CoreEndpointPort {
                                name: Some(port_name(hp.protocol, hp.port)),
                                port: i32::from(hp.port),
                                protocol: Some(protocol(hp.protocol)),
                                ..CoreEndpointPort::default()
                            })
                            .collect(),
                    ),
                    ..EndpointSubset::default()
                }]),
            })
        };
        (Some(service), Some(endpoints))
    };

    // Published ports: a Service selecting the Pod.
    let selector: BTreeMap<String, String> =
        [(MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned()), (INSTANCE_LABEL.to_owned(), instance.clone())].into();
    let published = &workload.firewall.published_ports;
    let service = (!published.is_empty()).then(|| Service {
        metadata: meta(instance.clone()),
        spec: Some(ServiceSpec {
            selector: Some(selector.clone()),
            ports: Some(
                published
                    .iter()
                    .map(|p| ServicePort {
                        name: Some(port_name(p.protocol, p.host_port)),
                        protocol: Some(protocol(p.protocol)),
                        port: i32::from(p.host_port),
                        target_port: Some(IntOrString::Int(i32::from(p.guest_port))),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    });

    let network_policy = network_policy(workload, target, meta(instance.clone()), &selector);

    // Environment, with loopback URLs pointed at the host.
    let mut env = Vec::new();
    let mut env_names = BTreeSet::new();
    for (name, value) in &workload.env {
        if name.is_empty() || name.contains('=') {
            return Err(invalid(format!("environment variable name `{name}` is not valid")));
        }
        if !env_names.insert(name.as_str()) {
            return Err(invalid(format!("environment variable `{name}` is set twice")));
        }
        let value = match (loopback_url_rewrite(value, host_address), host_address) {
            (Some(rewritten), _) => rewritten,
            (None, None) if loopback_url_rewrite(value, Some(IpAddr::from([0, 0, 0, 0]))).is_some() => {
                warnings.push(format!(
                    "environment variable `{name}` points at the loopback address, which inside a Pod is the Pod itself; give the target a host address to rewrite it"
                ));
                value.clone()
            }
            (None, _) => value.clone(),
        };
        env.push(EnvVar { name: name.clone(), value: Some(value), ..EnvVar::default() });
    }

    // Scheduling: resources, GPU, TEE.
    let mut node_selector = options.node_selector.clone();
    let mut tolerations = options.tolerations.clone();
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(millicpus) = workload.resources.millicpus {
        if millicpus == 0 {
            return Err(invalid("0 CPUs requested".to_owned()));
        }
        requests.insert("cpu".to_owned(), cpu_quantity(millicpus));
        limits.insert("cpu".to_owned(), cpu_quantity(millicpus));
    }
    if let Some(memory) = workload.resources.memory_bytes {
        if memory == 0 {
            return Err(invalid("0 bytes of memory requested".to_owned()));
        }
        requests.insert("memory".to_owned(), memory_quantity(memory));
        limits.insert("memory".to_owned(), memory_quantity(memory));
    }
    let mut affinity = None;
    if let Some(gpu) = workload.resources.gpu.filter(|gpu| gpu.policy != GpuPolicy::None) {
        let gpu_error = |why: String| Error::InvalidGpu { workload: workload.name.clone(), why };
        if gpu.count == 0 {
            return Err(gpu_error(format!(
                "GPU {} with count 0; ask for at least one GPU or set the policy to none",
                if gpu.policy == GpuPolicy::Required { "required" } else { "preferred" }
            )));
        }
        if gpu.min_vram_gib == Some(0) {
            return Err(gpu_error("a minimum of 0 GiB of GPU memory; leave it unset instead".to_owned()));
        }
        let present = NodeSelectorRequirement {
            key: GPU_PRESENT_LABEL.to_owned(),
            operator: "In".to_owned(),
            values: Some(vec!["true".to_owned()]),
        };
        let mut expressions = Vec::new();
        if let Some(gib) = gpu.min_vram_gib {
            // GPU Feature Discovery labels memory in MiB; `Gt` is strict.
            let at_least_mib = u64::from(gib) * 1024;
            expressions.push(NodeSelectorRequirement {
                key: GPU_MEMORY_LABEL.to_owned(),
                operator: "Gt".to_owned(),
                values: Some(vec![(at_least_mib - 1).to_string()]),
            });
        }
        let term = |expressions: Vec<NodeSelectorRequirement>| NodeSelectorTerm {
            match_expressions: Some(expressions),
            ..NodeSelectorTerm::default()
        };
        tolerations.push(Toleration {
            key: Some(GPU_RESOURCE.to_owned()),
            operator: Some("Exists".to_owned()),
            effect: Some("NoSchedule".to_owned()),
            ..Toleration::default()
        });
        let node_affinity = match gpu.policy {
            GpuPolicy::Required => {
                limits.insert(GPU_RESOURCE.to_owned(), Quantity(gpu.count.to_string()));
                // The selector says "a GPU node"; only a VRAM floor needs an affinity term.
                node_selector.insert(GPU_PRESENT_LABEL.to_owned(), "true".to_owned());
                (!expressions.is_empty()).then(|| NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                        node_selector_terms: vec![term(expressions)],
                    }),
                    ..NodeAffinity::default()
                })
            }
            _ => {
                warnings.push(
                        "GPU preferred: the Pod is steered to GPU nodes (weight 80) but requests no `nvidia.com/gpu`, so it can start on a CPU node; the device plugin hands GPUs only to Pods that request them, so use `required` to be given one".to_owned(),
                    );
                expressions.insert(0, present);
                Some(NodeAffinity {
                    preferred_during_scheduling_ignored_during_execution: Some(vec![PreferredSchedulingTerm {
                        weight: GPU_PREFERRED_WEIGHT,
                        preference: term(expressions),
                    }]),
                    ..NodeAffinity::default()
                })
            }
        };
        affinity =
            node_affinity.map(|node_affinity| Affinity { node_affinity: Some(node_affinity), ..Affinity::default() });
    }
    dedup(&mut tolerations);

    let tee_available = target.runtime_classes.contains(&target.tee_runtime_class);
    let runtime_class_name = match workload.confidentiality {
        Confidentiality::TeeRequired if !tee_available => {
            return Err(Error::NoTeeRuntime {
                workload: workload.name.clone(),
                runtime_class: target.tee_runtime_class.clone(),
                available: if target.runtime_classes.is_empty() {
                    "none".to_owned()
                } else {
                    target.runtime_classes.join(", ")
                },
            });
        }
        Confidentiality::TeeRequired | Confidentiality::TeePreferred if tee_available => {
            Some(target.tee_runtime_class.clone())
        }
        Confidentiality::TeePreferred => {
            warnings.push(format!(
                "TEE preferred, but the cluster has no RuntimeClass `{}`: the Pod runs without one",
                target.tee_runtime_class
            ));
            None
        }
        _ => None,
    };

    let container = Container {
        name: CONTAINER_NAME.to_owned(),
        image: Some(workload.image.clone()),
        command: (!workload.command.is_empty()).then(|| workload.command.clone()),
        args: (!workload.args.is_empty()).then(|| workload.args.clone()),
        env: (!env.is_empty()).then_some(env),
        ports: (!published.is_empty()).then(|| {
            published
                .iter()
                .map(|p| ContainerPort {
                    container_port: i32::from(p.guest_port),
                    protocol: Some(protocol(p.protocol)),
                    ..ContainerPort::default()
                })
                .collect()
        }),
        resources: (!requests.is_empty() || !limits.is_empty()).then(|| ResourceRequirements {
            requests: (!requests.is_empty()).then_some(requests),
            limits: (!limits.is_empty()).then_some(limits),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(security.allow_privilege_escalation),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: (!security.add_capabilities.is_empty()).then(|| security.add_capabilities.clone()),
            }),
            read_only_root_filesystem: Some(!security.writable_root_filesystem),
            ..SecurityContext::default()
        }),
        volume_mounts: (!volume_mounts.is_empty()).then_some(volume_mounts),
        ..Container::default()
    };

    let mut annotations = options.annotations.clone();
    annotations.insert(NAME_ANNOTATION.to_owned(), workload.name.clone());
    let pod = Pod {
        metadata: ObjectMeta { annotations: Some(annotations), ..meta(instance.clone()) },
        spec: Some(PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".to_owned()),
            // The service gets no Kubernetes API credentials unless the operator names an account.
            automount_service_account_token: Some(options.service_account.is_some()),
            service_account_name: options.service_account.clone(),
            enable_service_links: Some(false),
            image_pull_secrets: (!options.image_pull_secrets.is_empty()).then(|| {
                options.image_pull_secrets.iter().map(|name| LocalObjectReference { name: name.clone() }).collect()
            }),
            node_selector: (!node_selector.is_empty()).then_some(node_selector),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            affinity,
            runtime_class_name,
            security_context: Some(PodSecurityContext {
                run_as_non_root: (!security.run_as_root).then_some(true),
                run_as_user: security.run_as_user,
                seccomp_profile: Some(SeccompProfile {
                    type_: if security.unconfined_seccomp { "Unconfined" } else { "RuntimeDefault" }.to_owned(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            volumes: (!volumes.is_empty()).then_some(volumes),
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    if security.run_as_root && security.run_as_user.is_some_and(|uid| uid != 0) {
        warnings.push("run as root is allowed but a non-zero user is set: the user wins".to_owned());
    }

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

/// Whether `image` can be a container image reference as written: not
/// empty, and no whitespace or control characters (which would smuggle
/// extra words into a runtime's command line). The registry resolves the rest.
pub fn is_image_reference(image: &str) -> bool {
    !image.is_empty() && !image.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The Pod's name (and `kiln.dev/instance` label) for a workload name:
/// the name itself when it is a DNS label short enough to leave room for
/// the `-host` Service, else a mapped, hashed form (see `docs/kubernetes.md`).
/// `kiln k8s status NAME` maps NAME through this, so the spec's name and
/// the Pod's name both work.
pub fn instance_name(workload_name: &str) -> Result<String> {
    instance_label(workload_name, HOST_SUFFIX.len() + 1)
}

/// The firewall as a NetworkPolicy: ingress only to published ports,
/// egress to the host's listed ports (and cluster DNS, if allowed), or
/// anywhere when egress is on.
fn network_policy(
    workload: &Workload,
    target: &Target,
    metadata: ObjectMeta,
    selector: &BTreeMap<String, String>,
) -> NetworkPolicy {
    let firewall = &workload.firewall;
    let ingress: Vec<NetworkPolicyIngressRule> = if firewall.published_ports.is_empty() {
        Vec::new()
    } else {
        vec![NetworkPolicyIngressRule {
            ports: Some(firewall.published_ports.iter().map(|p| policy_port(p.protocol, p.guest_port)).collect()),
            ..NetworkPolicyIngressRule::default()
        }]
    };
    let mut egress = Vec::new();
    if firewall.egress {
        egress.push(NetworkPolicyEgressRule::default());
    } else {
        if let (Some(address), false) = (target.host_address, firewall.host_ports.is_empty()) {
            let cidr = match address {
                IpAddr::V4(_) => format!("{address}/32"),
                IpAddr::V6(_) => format!("{address}/128"),
            };
            egress.push(NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    ip_block: Some(IPBlock { cidr, except: None }),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(firewall.host_ports.iter().map(|hp| policy_port(hp.protocol, hp.port)).collect()),
            });
        }
        if target.allow_cluster_dns {
            egress.push(NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    namespace_selector: Some(LabelSelector {
                        match_labels: Some(
                            [("kubernetes.io/metadata.name".to_owned(), "kube-system".to_owned())].into(),
                        ),
                        ..LabelSelector::default()
                    }),
                    pod_selector: Some(LabelSelector {
                        match_labels: Some([("k8s-app".to_owned(), "kube-dns".to_owned())].into()),
                        ..LabelSelector::default()
                    }),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(vec![policy_port(Protocol::Udp, 53), policy_port(Protocol::Tcp, 53)]),
            });
        }
    }
    NetworkPolicy {
        metadata,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector { match_labels: Some(selector.clone()), ..LabelSelector::default() }),
            policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
            ingress: (!ingress.is_empty()).then_some(ingress),
            egress: (!egress.is_empty()).then_some(egress),
        }),
    }
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
    let mut tolerations: Vec<Toleration> = defaults.tolerations.iter().chain(&instance.tolerations).cloned().collect();
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
        security: crate::input::SecurityRelaxations {
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

/// Label and annotation keys and values, selector values and object
/// references, checked here so a bad one is refused before anything is
/// sent rather than by the API server halfway through an apply.
fn check_options(options: &KubernetesOptions) -> Result<(), String> {
    for (key, value) in options.labels.iter().chain(&options.node_selector) {
        check_qualified_name(key).map_err(|why| format!("label key `{key}` {why}"))?;
        if !value.is_empty() {
            check_name_part(value).map_err(|why| format!("label value `{value}` (key `{key}`) {why}"))?;
        }
    }
    for key in options.annotations.keys() {
        check_qualified_name(key).map_err(|why| format!("annotation key `{key}` {why}"))?;
    }
    for toleration in &options.tolerations {
        let key = toleration.key.as_deref().unwrap_or("");
        if !key.is_empty() {
            check_qualified_name(key).map_err(|why| format!("toleration key `{key}` {why}"))?;
        }
        match toleration.operator.as_deref() {
            None | Some("Equal") if key.is_empty() => {
                return Err("a toleration with operator `Equal` needs a key".to_owned());
            }
            None | Some("Equal") => {}
            Some("Exists") if toleration.value.as_deref().is_some_and(|v| !v.is_empty()) => {
                return Err(format!("toleration `{key}` has operator `Exists` and a value; drop the value"));
            }
            Some("Exists") => {}
            Some(other) => return Err(format!("toleration operator `{other}` is not `Equal` or `Exists`")),
        }
        if let Some(effect) = toleration.effect.as_deref().filter(|e| !e.is_empty())
            && !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute")
        {
            return Err(format!("toleration effect `{effect}` is not `NoSchedule`, `PreferNoSchedule` or `NoExecute`"));
        }
    }
    let references = options.image_pull_secrets.iter().chain(&options.service_account);
    for name in references {
        if !is_dns_subdomain(name) {
            return Err(format!("`{name}` is not a valid Secret or ServiceAccount name (a lower-case DNS subdomain)"));
        }
    }
    Ok(())
}

/// `[prefix/]name`: prefix a DNS subdomain, name as [`check_name_part`].
fn check_qualified_name(key: &str) -> Result<(), String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if !is_dns_subdomain(prefix) {
                return Err(format!("has prefix `{prefix}`, which is not a DNS subdomain"));
            }
            name
        }
        None => key,
    };
    check_name_part(name)
}

/// At most 63 bytes of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn check_name_part(text: &str) -> Result<(), String> {
    let bytes = text.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err("must be 1-63 letters, digits, `-`, `_` or `.`, starting and ending with a letter or digit".to_owned())
    }
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 bytes.
fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(crate::names::is_dns_label)
}

/// An absolute, normalised path: no `..`, `.` or empty components.
fn check_mount_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("`{path}` is not an absolute path"));
    }
    if path == "/" {
        return Err("`/` cannot be a mount point".to_owned());
    }
    if path.trim_end_matches('/').split('/').skip(1).any(|part| part.is_empty() || part == "." || part == "..") {
        return Err(format!("`{path}` has an empty, `.` or `..` component"));
    }
    Ok(())
}

/// Secret and ConfigMap keys: `[-._a-zA-Z0-9]+`, not `.` or `..`.
fn check_file_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key == "." || key == ".." || key.len() > 253 {
        return Err("is not a file name".to_owned());
    }
    match key.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        Some(bad) => Err(format!("has {bad:?}; file names may hold letters, digits, `-`, `_` and `.`")),
        None => Ok(()),
    }
}

fn protocol(protocol: Protocol) -> String {
    protocol.as_str().to_ascii_uppercase()
}

/// Port names must be unique within a Service: `tcp-8545`.
fn port_name(protocol: Protocol, port: u16) -> String {
    format!("{protocol}-{port}")
}

fn policy_port(protocol: Protocol, port: u16) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(i32::from(port))),
        protocol: Some(self::protocol(protocol)),
        end_port: None,
    }
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
