//! The Pod: its one container (environment, resources, hardened security
//! context, mounts) and its scheduling (node selector, tolerations, GPU
//! affinity, the TEE runtime class).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, LocalObjectReference, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSecurityContext, PodSpec, PreferredSchedulingTerm,
    ResourceRequirements, SeccompProfile, SecurityContext, Toleration as K8sToleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kiln_types::pod::Toleration;
use kiln_types::resources::{Confidentiality, Gpu, GpuPolicy};

use super::{CONTAINER_NAME, Context, NAME_ANNOTATION, cpu_quantity, dedup, loopback_url_rewrite, memory_quantity};
use crate::{Error, Resources, Result};

/// The extended resource NVIDIA's device plugin serves.
const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Node label set by NVIDIA GPU Feature Discovery on GPU nodes.
const GPU_PRESENT_LABEL: &str = "nvidia.com/gpu.present";
/// Node label set by GPU Feature Discovery: memory of one GPU, in MiB.
const GPU_MEMORY_LABEL: &str = "nvidia.com/gpu.memory";
/// Weight of the preferred GPU node affinity (out of 100).
const GPU_PREFERRED_WEIGHT: i32 = 80;

/// Where the Pod may run and what it asks for.
struct Scheduling {
    node_selector: BTreeMap<String, String>,
    tolerations: Vec<Toleration>,
    requests: BTreeMap<String, Quantity>,
    limits: BTreeMap<String, Quantity>,
    affinity: Option<Affinity>,
}

/// The Pod, with `volumes` mounted into its container as `mounts`.
pub(super) fn pod(
    cx: &Context<'_>,
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
    warnings: &mut Vec<String>,
) -> Result<Pod> {
    let env = env(cx, &cx.workload.env, warnings)?;
    let mut scheduling = resources(cx)?;
    if let Some(gpu) = cx.workload.resources.gpu.filter(|gpu| gpu.policy != GpuPolicy::None) {
        gpu_scheduling(cx, gpu, &mut scheduling, warnings)?;
    }
    dedup(&mut scheduling.tolerations);
    let runtime_class_name = runtime_class(cx, warnings)?;
    let Scheduling { node_selector, tolerations, requests, limits, affinity } = scheduling;
    let (containers, init_containers) = if cx.workload.containers.is_empty() {
        (vec![container(cx, env, requests, limits, mounts)], Vec::new())
    } else {
        pod_form_containers(cx, limits.get(GPU_RESOURCE), &mounts, warnings)?
    };
    let (options, security) = (&cx.options, &cx.options.security);
    let mut annotations = options.annotations.clone();
    annotations.insert(NAME_ANNOTATION.to_owned(), cx.workload.name.clone());
    let tolerations: Vec<K8sToleration> = tolerations.into_iter().map(k8s_toleration).collect();
    let pod = Pod {
        metadata: ObjectMeta { annotations: Some(annotations), ..cx.meta(cx.instance.clone()) },
        spec: Some(PodSpec {
            containers,
            init_containers: (!init_containers.is_empty()).then_some(init_containers),
            restart_policy: Some(cx.workload.restart.as_str().to_owned()),
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
    Ok(pod)
}

fn k8s_toleration(toleration: Toleration) -> K8sToleration {
    let Toleration { key, operator, value, effect } = toleration;
    K8sToleration { key, operator, value, effect, toleration_seconds: None }
}

/// The environment, with loopback URLs pointed at the host.
fn env(cx: &Context<'_>, vars: &[(String, String)], warnings: &mut Vec<String>) -> Result<Vec<EnvVar>> {
    let host_address = cx.target.host_address;
    let mut env = Vec::new();
    let mut env_names = BTreeSet::new();
    for (name, value) in vars {
        if name.is_empty() || name.contains('=') {
            return Err(cx.invalid(format!("environment variable name `{name}` is not valid")));
        }
        if !env_names.insert(name.as_str()) {
            return Err(cx.invalid(format!("environment variable `{name}` is set twice")));
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
    Ok(env)
}

/// CPU and memory as requests equal to limits, and the operator's placement.
fn resources(cx: &Context<'_>) -> Result<Scheduling> {
    let mut scheduling = Scheduling {
        node_selector: cx.options.node_selector.clone(),
        tolerations: cx.options.tolerations.clone(),
        requests: BTreeMap::new(),
        limits: BTreeMap::new(),
        affinity: None,
    };
    if cx.workload.containers.is_empty() {
        (scheduling.requests, scheduling.limits) = quantities(cx, &cx.workload.resources)?;
    }
    Ok(scheduling)
}

/// CPU and memory requests and (equal) limits.
fn quantities(
    cx: &Context<'_>,
    resources: &Resources,
) -> Result<(BTreeMap<String, Quantity>, BTreeMap<String, Quantity>)> {
    let (mut requests, mut limits) = (BTreeMap::new(), BTreeMap::new());
    if let Some(millicpus) = resources.millicpus {
        if millicpus == 0 {
            return Err(cx.invalid("0 CPUs requested".to_owned()));
        }
        requests.insert("cpu".to_owned(), cpu_quantity(millicpus));
        limits.insert("cpu".to_owned(), cpu_quantity(millicpus));
    }
    if let Some(memory) = resources.memory_bytes {
        if memory == 0 {
            return Err(cx.invalid("0 bytes of memory requested".to_owned()));
        }
        requests.insert("memory".to_owned(), memory_quantity(memory));
        limits.insert("memory".to_owned(), memory_quantity(memory));
    }
    Ok((requests, limits))
}

/// The pod form's app and init containers (in order), each with its own
/// image, args, env, resources, user and mounts. `gpu` (a limit) goes to
/// the first app container, the published ports to the last (`containerPort`
/// is informational: the Service targets the port number); `scratch` (the
/// `/tmp` of a read-only root) to every container without a mount there.
fn pod_form_containers(
    cx: &Context<'_>,
    gpu: Option<&Quantity>,
    scratch: &[VolumeMount],
    warnings: &mut Vec<String>,
) -> Result<(Vec<Container>, Vec<Container>)> {
    let last_app = cx.workload.containers.iter().rposition(|c| !c.init);
    let first_app = cx.workload.containers.iter().position(|c| !c.init);
    let (mut apps, mut inits) = (Vec::new(), Vec::new());
    for (index, spec) in cx.workload.containers.iter().enumerate() {
        let env = env(cx, &spec.env, warnings)?;
        let (requests, mut limits) = quantities(cx, &spec.resources)?;
        if let Some(gpu) = gpu.filter(|_| Some(index) == first_app) {
            limits.insert(GPU_RESOURCE.to_owned(), gpu.clone());
        }
        let mut mounts: Vec<VolumeMount> = spec
            .mounts
            .iter()
            .map(|m| VolumeMount {
                name: m.volume.clone(),
                mount_path: m.path.clone(),
                read_only: m.read_only.then_some(true),
                ..VolumeMount::default()
            })
            .collect();
        let has_tmp = |mounts: &[VolumeMount]| mounts.iter().any(|m| m.mount_path.trim_end_matches('/') == "/tmp");
        if !has_tmp(&mounts) {
            mounts.extend(scratch.iter().cloned());
        }
        let mut container = container(cx, env, requests, limits, mounts);
        container.name = spec.name.clone();
        container.image = Some(spec.image.clone());
        container.command = None;
        container.args = (!spec.args.is_empty()).then(|| spec.args.clone());
        container.working_dir = spec.working_dir.clone();
        if Some(index) != last_app {
            container.ports = None;
        }
        if let Some(user) = &spec.user {
            match numeric_user(user) {
                Some((uid, gid)) => {
                    let security = container.security_context.get_or_insert_with(SecurityContext::default);
                    security.run_as_user = Some(uid);
                    security.run_as_group = gid;
                }
                None => warnings.push(format!(
                    "container `{}`: user `{user}` is a name, which a Pod cannot express (runAsUser takes a number): the image's user runs",
                    spec.name
                )),
            }
        }
        if spec.init { inits.push(container) } else { apps.push(container) }
    }
    Ok((apps, inits))
}

/// `UID` or `UID:GID`, both numbers.
fn numeric_user(user: &str) -> Option<(i64, Option<i64>)> {
    let number = |text: &str| text.parse::<u32>().ok().map(i64::from);
    match user.split_once(':') {
        None => Some((number(user)?, None)),
        Some((uid, gid)) => Some((number(uid)?, Some(number(gid)?))),
    }
}

/// A GPU requirement: `required` asks the device plugin for the GPUs and
/// selects GPU nodes; `preferred` only steers the Pod towards them.
fn gpu_scheduling(cx: &Context<'_>, gpu: Gpu, scheduling: &mut Scheduling, warnings: &mut Vec<String>) -> Result<()> {
    let gpu_error = |why: String| Error::InvalidGpu { workload: cx.workload.name.clone(), why };
    if gpu.count == 0 {
        return Err(gpu_error(format!(
            "GPU {} with count 0; ask for at least one GPU or set the policy to none",
            if gpu.policy == GpuPolicy::Required { "required" } else { "preferred" }
        )));
    }
    if gpu.min_vram_gb == Some(0) {
        return Err(gpu_error("a minimum of 0 GiB of GPU memory; leave it unset instead".to_owned()));
    }
    let present = NodeSelectorRequirement {
        key: GPU_PRESENT_LABEL.to_owned(),
        operator: "In".to_owned(),
        values: Some(vec!["true".to_owned()]),
    };
    let mut expressions = Vec::new();
    if let Some(gib) = gpu.min_vram_gb {
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
    scheduling.tolerations.push(Toleration {
        key: Some(GPU_RESOURCE.to_owned()),
        operator: Some("Exists".to_owned()),
        effect: Some("NoSchedule".to_owned()),
        ..Toleration::default()
    });
    let node_affinity = match gpu.policy {
        GpuPolicy::Required => {
            scheduling.limits.insert(GPU_RESOURCE.to_owned(), Quantity(gpu.count.to_string()));
            // The selector says "a GPU node"; only a VRAM floor needs an affinity term.
            scheduling.node_selector.insert(GPU_PRESENT_LABEL.to_owned(), "true".to_owned());
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
    scheduling.affinity =
        node_affinity.map(|node_affinity| Affinity { node_affinity: Some(node_affinity), ..Affinity::default() });
    Ok(())
}

/// The TEE runtime class, if the workload wants one and the cluster has it.
fn runtime_class(cx: &Context<'_>, warnings: &mut Vec<String>) -> Result<Option<String>> {
    let target = cx.target;
    let tee_available = target.runtime_classes.contains(&target.tee_runtime_class);
    Ok(match cx.workload.confidentiality {
        Confidentiality::TeeRequired if !tee_available => {
            return Err(Error::NoTeeRuntime {
                workload: cx.workload.name.clone(),
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
    })
}

/// The one container, with kiln's hardened security context as loosened
/// by the options.
fn container(
    cx: &Context<'_>,
    env: Vec<EnvVar>,
    requests: BTreeMap<String, Quantity>,
    limits: BTreeMap<String, Quantity>,
    mounts: Vec<VolumeMount>,
) -> Container {
    let (workload, security) = (cx.workload, &cx.options.security);
    let published = &workload.firewall.published_ports;
    Container {
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
                    protocol: Some(super::protocol(p.protocol)),
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
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Container::default()
    }
}
