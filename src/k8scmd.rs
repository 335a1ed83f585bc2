//! `kiln render --target k8s` and `kiln k8s …`: the spec as Kubernetes
//! objects, and the few calls that run, watch and remove them. Everything
//! that can be checked without the cluster is checked before connecting;
//! everything else (the TEE runtime) before the first object is applied.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

pub(crate) use crate::PlacementArgs;
use kiln::{ClusterDefaults, K8sWorkload, Spec};
use kiln_k8s::{Cluster, Confidentiality, ForeignObjects, Target, Workload};

/// The cluster and namespace `kiln k8s` talks to.
#[derive(Debug, Args)]
pub(crate) struct ClusterArgs {
    /// The namespace (overrides the spec's and the defaults'; default: the
    /// context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig context (default: the current one).
    #[arg(long, global = true)]
    context: Option<String>,
    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then
    /// the in-cluster service account).
    #[arg(long, global = true, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct K8sArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: K8sCommand,
}

#[derive(Debug, Subcommand)]
enum K8sCommand {
    /// Apply a spec's objects (server-side apply, the Pod last) and wait
    /// for the Pod's IP address; refuses objects that exist and are not the
    /// instance's, unless `--adopt`.
    Apply(ApplyArgs),
    /// Print a Pod's state: phase, the telling reason, exit code, IP, node.
    Status {
        /// The spec's name or the Pod's.
        name: String,
    },
    /// Print the service's log.
    Logs {
        /// The spec's name or the Pod's.
        name: String,
        /// Keep printing as the log grows, until the container ends.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<i64>,
    },
    /// Delete a Pod and every object kiln made for it, found by kiln's
    /// labels: objects not labelled as the instance's are left alone (gone
    /// already is fine).
    Delete {
        /// The spec's name or the Pod's.
        name: String,
    },
    /// List kiln's Pods in the namespace.
    Ps,
    /// Delete kiln's ended Pods and the leftovers of Pods that are gone
    /// (only objects labelled as kiln's).
    Gc,
}

#[derive(Debug, Args)]
struct ApplyArgs {
    /// The spec file.
    spec: PathBuf,
    #[command(flatten)]
    placement: PlacementArgs,
    /// Return once applied, without waiting for the Pod to run.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the Pod's IP address, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 180)]
    timeout: u64,
    /// Take over existing objects with the instance's names that are not
    /// labelled as its own (by default `apply` refuses and writes nothing).
    #[arg(long)]
    adopt: bool,
}

/// A spec ready to render: the workload, the target before detection, and
/// the spec's own warnings. Built without touching the cluster.
struct Prepared {
    workload: Workload,
    target: Target,
    warnings: Vec<String>,
}

fn prepare(spec_path: &Path, placement: &PlacementArgs, namespace: Option<&str>) -> Result<Prepared> {
    let spec = Spec::load(spec_path)?;
    let mut k8s = kiln::workload(&spec)?;
    let defaults = ClusterDefaults::find(placement.defaults.as_deref())?;
    // The bytes a VM of the spec runs, when kiln's image store has pulled them.
    if let Some(image) = &spec.service.image {
        let state = kiln::StateDir::open(&kiln::StateDir::default_root()?)?;
        if let Some(cached) = kiln::cached_image(&state, image)? {
            k8s.pin_image(&cached.manifest_digest().to_string(), &defaults.node_selector)?;
        }
    }
    let K8sWorkload { mut workload, warnings } = k8s;
    let mut target = defaults.target();
    if let Some(address) = placement.host_address {
        target.host_address = Some(address);
    }
    if let Some(namespace) = namespace {
        if !kiln_k8s::is_dns_label(namespace) {
            bail!("--namespace `{namespace}` is not a DNS label (lower-case letters, digits and `-`)");
        }
        workload.kubernetes.namespace = Some(namespace.to_owned());
    }
    if !workload.firewall.host_ports.is_empty() && target.host_address.is_none() {
        bail!(
            "{}: network.host_ports needs the host's address as Pods see it: pass --host-address or set host_address in the defaults file",
            spec_path.display()
        );
    }
    Ok(Prepared { workload, target, warnings })
}

fn print_warnings<'a>(warnings: impl IntoIterator<Item = &'a String>) {
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
}

/// `kiln render SPEC --target k8s`: every object as YAML on stdout,
/// warnings on stderr. Without a cluster to ask, the TEE runtime class is
/// assumed to exist (`kiln k8s apply` checks it) and EndpointSlices served.
pub(crate) fn render(spec_path: &Path, placement: &PlacementArgs, namespace: Option<&str>) -> Result<ExitCode> {
    let Prepared { workload, mut target, mut warnings } = prepare(spec_path, placement, namespace)?;
    if matches!(workload.confidentiality, Confidentiality::TeeRequired | Confidentiality::TeePreferred) {
        warnings.push(format!(
            "rendered without a cluster: assumes it has RuntimeClass `{}` (`kiln k8s apply` checks)",
            target.tee_runtime_class
        ));
        target.runtime_classes = vec![target.tee_runtime_class.clone()];
    }
    let manifests = kiln_k8s::render(&workload, &target)?;
    print_warnings(warnings.iter().chain(&manifests.warnings));
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(manifests.to_yaml()?.as_bytes())?;
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn k8s(args: &K8sArgs) -> Result<ExitCode> {
    let cluster = &args.cluster;
    match &args.command {
        K8sCommand::Apply(apply) => {
            // Spec errors come before any connection.
            let prepared = prepare(&apply.spec, &apply.placement, cluster.namespace.as_deref())?;
            on_cluster(cluster, |c| apply_spec(c, apply, prepared))
        }
        K8sCommand::Status { name } => on_cluster(cluster, |c| status(c, name)),
        K8sCommand::Logs { name, follow, tail } => on_cluster(cluster, |c| logs(c, name, *follow, *tail)),
        K8sCommand::Delete { name } => on_cluster(cluster, |c| delete(c, name)),
        K8sCommand::Ps => on_cluster(cluster, ps),
        K8sCommand::Gc => on_cluster(cluster, gc),
    }
}

/// Connects and runs `command` on a current-thread runtime of its own:
/// kube is async, the rest of kiln is not.
fn on_cluster<F, Fut>(args: &ClusterArgs, command: F) -> Result<ExitCode>
where
    F: FnOnce(Cluster) -> Fut,
    Fut: Future<Output = Result<ExitCode>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime for the Kubernetes client")?;
    runtime.block_on(async { command(connect(args).await?).await })
}

async fn status(cluster: Cluster, name: &str) -> Result<ExitCode> {
    let pod = kiln_k8s::instance_name(name)?;
    let state = cluster.status(&pod).await?;
    println!("{pod}: {state}");
    if let Some(ip) = state.pod_ip {
        println!("  ip: {ip}");
    }
    if let Some(node) = &state.node {
        println!("  node: {node}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn logs(cluster: Cluster, name: &str, follow: bool, tail: Option<i64>) -> Result<ExitCode> {
    let pod = kiln_k8s::instance_name(name)?;
    if follow {
        cluster.follow_logs(&pod, std::io::stdout()).await?;
    } else {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(cluster.logs(&pod, tail).await?.as_bytes())?;
        stdout.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn delete(cluster: Cluster, name: &str) -> Result<ExitCode> {
    let pod = kiln_k8s::instance_name(name)?;
    let deleted = cluster.delete(&pod).await?;
    if !deleted.pod && deleted.others.is_empty() {
        println!("kiln: nothing of kiln's named {pod} in namespace {}", cluster.namespace());
    }
    if deleted.pod {
        println!("kiln: deleted Pod/{pod}");
    }
    for other in &deleted.others {
        println!("kiln: deleted {other}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn ps(cluster: Cluster) -> Result<ExitCode> {
    let instances = cluster.list().await?;
    println!("{:<40} {:<24} IP", "NAME", "STATE");
    for instance in instances {
        let ip = instance.state.pod_ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".to_owned());
        println!("{:<40} {:<24} {ip}", instance.name, instance.state.to_string());
    }
    Ok(ExitCode::SUCCESS)
}

async fn gc(cluster: Cluster) -> Result<ExitCode> {
    let reaped = cluster.reap().await?;
    if reaped.is_empty() {
        println!("kiln: nothing to collect in namespace {}", cluster.namespace());
    }
    for name in reaped {
        println!("kiln: deleted {name} and its objects");
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(args: &ClusterArgs) -> Result<Cluster> {
    let cluster = match &args.kubeconfig {
        Some(path) => Cluster::connect_with_kubeconfig(path, args.context.as_deref()).await?,
        None => Cluster::connect(args.context.as_deref()).await?,
    };
    Ok(match &args.namespace {
        Some(namespace) => cluster.with_namespace(namespace.clone()),
        None => cluster,
    })
}

async fn apply_spec(cluster: Cluster, args: &ApplyArgs, prepared: Prepared) -> Result<ExitCode> {
    let Prepared { workload, target, warnings } = prepared;
    let target = cluster.detect(target).await?;
    let manifests = kiln_k8s::render(&workload, &target)?;
    print_warnings(warnings.iter().chain(&manifests.warnings));
    let foreign = if args.adopt { ForeignObjects::Adopt } else { ForeignObjects::Refuse };
    for applied in cluster.apply(&manifests, foreign).await? {
        eprintln!("kiln: applied {applied}");
    }
    let (pod, namespace) = (&manifests.instance, &manifests.namespace);
    let cluster = cluster.with_namespace(namespace.clone());
    if args.no_wait {
        println!("kiln: {} applied as Pod {pod} in namespace {namespace}", workload.name);
    } else {
        let ip = cluster.wait_for_ip(pod, Duration::from_secs(args.timeout)).await?;
        println!("kiln: {} runs as Pod {pod} in namespace {namespace} (IP {ip})", workload.name);
    }
    println!("      logs: kiln k8s logs -n {namespace} -f {pod}; delete: kiln k8s delete -n {namespace} {pod}");
    Ok(ExitCode::SUCCESS)
}
