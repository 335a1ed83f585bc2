//! The thin I/O shell: a kube client and the handful of calls kiln makes.
//! Everything it decides is decided by the pure builders and [`pod_state`];
//! this module only sends requests and maps errors.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams, Preconditions};
use kube::config::KubeConfigOptions;
use kube::{Api, Client, Config, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::manifest::{CONTAINER_NAME, INSTANCE_LABEL, MANAGED_BY_LABEL, MANAGER, Manifests, Object};
use crate::ownership::{Owner, is_instance, is_kilns, owner};
use crate::status::{Phase, PodState, pod_state};
use crate::{Error, Result, Target};

/// How often [`Cluster::wait_for_ip`] asks for the Pod.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// A connection to one cluster and namespace.
#[derive(Clone)]
pub struct Cluster {
    client: Client,
    namespace: String,
}

impl Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

/// What [`Cluster::delete`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Whether kiln's Pod of the instance existed and was deleted.
    pub pod: bool,
    /// The other objects deleted, as `Kind/name`.
    pub others: Vec<String>,
}

/// What [`Cluster::apply`] does with an existing object of the same name
/// that is not this instance's (not labelled `managed-by=kiln` and
/// `kiln.dev/instance=<instance>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForeignObjects {
    /// Refuse the whole apply before writing anything (the default).
    Refuse,
    /// Take it over (`kiln k8s apply --adopt`): the forced apply gives it
    /// kiln's labels, so `delete` and `gc` manage it from then on.
    Adopt,
}

/// One object [`Cluster::apply`] applied.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Applied {
    /// `Kind/name`.
    pub object: String,
    /// Whether it existed and was not this instance's before (adopted).
    pub adopted: bool,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.object)?;
        if self.adopted { f.write_str(" (adopted)") } else { Ok(()) }
    }
}

/// One of kiln's instances in the namespace, as [`Cluster::list`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The Pod's name (the `kiln.dev/instance` label).
    pub name: String,
    /// Its state.
    pub state: PodState,
}

impl Cluster {
    /// Connects with the kubeconfig (`$KUBECONFIG` or `~/.kube/config`),
    /// using `context` if given, else its current context; with no
    /// kubeconfig and no context asked for, the in-cluster service account.
    /// No request is sent yet, so an unreachable cluster shows up at the
    /// first call.
    pub async fn connect(context: Option<&str>) -> Result<Cluster> {
        let config_error = |source: Box<dyn std::error::Error + Send + Sync>| Error::Config {
            context: context.map(str::to_owned),
            source,
        };
        let config = match context {
            Some(context) => {
                let options = KubeConfigOptions { context: Some(context.to_owned()), ..KubeConfigOptions::default() };
                Config::from_kubeconfig(&options).await.map_err(|err| config_error(Box::new(err)))?
            }
            None => Config::infer().await.map_err(|err| config_error(Box::new(err)))?,
        };
        let namespace = config.default_namespace.clone();
        let client = Client::try_from(config).map_err(|err| config_error(Box::new(err)))?;
        Ok(Cluster { client, namespace })
    }

    /// Connects with the kubeconfig file at `path` (`--kubeconfig`), using
    /// `context` if given, else the file's current context.
    pub async fn connect_with_kubeconfig(path: &std::path::Path, context: Option<&str>) -> Result<Cluster> {
        let config_error = |source: Box<dyn std::error::Error + Send + Sync>| Error::Config {
            context: context.map(str::to_owned),
            source,
        };
        let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|err| config_error(Box::new(err)))?;
        let options = KubeConfigOptions { context: context.map(str::to_owned), ..KubeConfigOptions::default() };
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &options).await.map_err(|err| config_error(Box::new(err)))?;
        let namespace = config.default_namespace.clone();
        let client = Client::try_from(config).map_err(|err| config_error(Box::new(err)))?;
        Ok(Cluster { client, namespace })
    }

    /// Wraps a ready client (tests, or a caller with its own config); the
    /// namespace is the client's default.
    pub fn from_client(client: Client) -> Cluster {
        let namespace = client.default_namespace().to_owned();
        Cluster { client, namespace }
    }

    /// The same cluster, another namespace (for `--namespace`).
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Cluster {
        self.namespace = namespace.into();
        self
    }

    /// The namespace status, logs, delete and list work in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The names of the cluster's RuntimeClasses.
    pub async fn runtime_classes(&self) -> Result<Vec<String>> {
        let api: Api<RuntimeClass> = Api::all(self.client.clone());
        let list = api.list(&ListParams::default()).await.map_err(api_error("list RuntimeClasses"))?;
        let mut names: Vec<String> = list.items.into_iter().filter_map(|class| class.metadata.name).collect();
        names.sort();
        Ok(names)
    }

    /// Whether the cluster serves `discovery.k8s.io/v1` EndpointSlices.
    pub async fn endpoint_slices_supported(&self) -> Result<bool> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.namespace);
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => Ok(true),
            Err(err) if status_code(&err) == Some(404) => Ok(false),
            Err(err) => Err(api_error("list EndpointSlices")(err)),
        }
    }

    /// `base` with what the builders need to know about this cluster filled
    /// in: its RuntimeClasses and EndpointSlice support. The CLI calls this,
    /// then [`crate::render`], then [`Cluster::apply`].
    pub async fn detect(&self, mut base: Target) -> Result<Target> {
        base.runtime_classes = self.runtime_classes().await?;
        base.endpoint_slices = self.endpoint_slices_supported().await?;
        // The context's (or `--namespace`'s) namespace, unless a workload or the defaults name one.
        base.fallback_namespace = self.namespace.clone();
        Ok(base)
    }

    /// Creates `namespace` unless it exists. A 409 (created meanwhile by
    /// someone else) is success.
    pub async fn ensure_namespace(&self, namespace: &str) -> Result<()> {
        if self.namespace_exists(namespace).await? { Ok(()) } else { self.create_namespace(namespace).await }
    }

    async fn namespace_exists(&self, namespace: &str) -> Result<bool> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        match api.get(namespace).await {
            Ok(_) => Ok(true),
            Err(err) if status_code(&err) == Some(404) => Ok(false),
            Err(err) => Err(api_error(format!("get Namespace {namespace}"))(err)),
        }
    }

    async fn create_namespace(&self, namespace: &str) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let wanted = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.to_owned()),
                labels: Some([(MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match api
            .create(&PostParams { field_manager: Some(MANAGER.to_owned()), ..PostParams::default() }, &wanted)
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if status_code(&err) == Some(409) => Ok(()),
            Err(err) => Err(api_error(format!("create Namespace {namespace}"))(err)),
        }
    }

    /// Server-side applies every object (field manager `kiln`) in order,
    /// the Pod last, into `manifests.namespace`, creating it if needed.
    ///
    /// First, before writing anything, it reads the metadata of every
    /// object under its name: an object that exists and is not this
    /// instance's (not labelled `managed-by=kiln` and
    /// `kiln.dev/instance=<instance>`) fails the whole apply with
    /// [`Error::NotOwned`], unless `foreign` is [`ForeignObjects::Adopt`].
    /// Objects that existed (kiln's own, or adopted) are applied forced:
    /// kiln's fields win. Objects that were absent are applied unforced, so
    /// one created by someone else in between conflicts (409) instead of
    /// being taken over silently.
    ///
    /// Stops at the first failure. Returns the objects applied. The
    /// objects go to `manifests.namespace`, which may differ from
    /// [`Cluster::namespace`]; follow up with
    /// `with_namespace(&manifests.namespace)` for status, logs and delete.
    pub async fn apply(&self, manifests: &Manifests, foreign: ForeignObjects) -> Result<Vec<Applied>> {
        let ns = manifests.namespace.as_str();
        // In a namespace that does not exist yet no object does either.
        let namespace_exists = self.namespace_exists(ns).await?;
        let mut owners = Vec::new();
        for object in manifests.objects() {
            let existing = if namespace_exists {
                match object {
                    Object::Secret(o) => self.existing(ns, o).await?,
                    Object::ConfigMap(o) => self.existing(ns, o).await?,
                    Object::Service(o) => self.existing(ns, o).await?,
                    Object::EndpointSlice(o) => self.existing(ns, o).await?,
                    Object::Endpoints(o) => self.existing(ns, o).await?,
                    Object::NetworkPolicy(o) => self.existing(ns, o).await?,
                    Object::Pod(o) => self.existing(ns, o).await?,
                }
            } else {
                None
            };
            owners.push((object, owner(&manifests.instance, existing.as_ref())));
        }
        let refused: Vec<String> = owners
            .iter()
            .filter_map(|(object, owner)| match owner {
                Owner::Foreign(what) if foreign == ForeignObjects::Refuse => {
                    Some(format!("{} ({what})", object.describe()))
                }
                _ => None,
            })
            .collect();
        if !refused.is_empty() {
            return Err(Error::NotOwned {
                objects: refused,
                namespace: ns.to_owned(),
                instance: manifests.instance.clone(),
            });
        }
        if !namespace_exists {
            self.create_namespace(ns).await?;
        }
        let mut applied = Vec::new();
        for (object, owner) in owners {
            let force = owner != Owner::Absent;
            match object {
                Object::Secret(o) => self.apply_one(ns, o, force).await?,
                Object::ConfigMap(o) => self.apply_one(ns, o, force).await?,
                Object::Service(o) => self.apply_one(ns, o, force).await?,
                Object::EndpointSlice(o) => self.apply_one(ns, o, force).await?,
                Object::Endpoints(o) => self.apply_one(ns, o, force).await?,
                Object::NetworkPolicy(o) => self.apply_one(ns, o, force).await?,
                Object::Pod(o) => self.apply_one(ns, o, force).await?,
            }
            applied.push(Applied { object: object.describe(), adopted: matches!(owner, Owner::Foreign(_)) });
        }
        Ok(applied)
    }

    /// The metadata of the object named like `object`, if one exists.
    /// Metadata only: a foreign Secret's data is none of kiln's business.
    async fn existing<K>(&self, namespace: &str, object: &K) -> Result<Option<ObjectMeta>>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let found = api
            .get_metadata_opt(&name)
            .await
            .map_err(api_error(format!("get {}/{name} in namespace {namespace}", K::kind(&()))))?;
        Ok(found.map(|partial| partial.metadata))
    }

    async fn apply_one<K>(&self, namespace: &str, object: &K, force: bool) -> Result<()>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let params = PatchParams::apply(MANAGER);
        let params = if force { params.force() } else { params };
        let action = format!("apply {}/{name} in namespace {namespace}", K::kind(&()));
        match api.patch(&name, &params, &Patch::Apply(object)).await {
            Ok(_) => Ok(()),
            // Unforced, a conflict means another manager's object took the name since kiln checked.
            Err(err) if !force && status_code(&err) == Some(409) => Err(api_error(format!(
                "{action} (it did not exist when kiln checked; something else created it since)"
            ))(err)),
            Err(err) => Err(api_error(action)(err)),
        }
    }

    /// The Pod's state.
    pub async fn status(&self, name: &str) -> Result<PodState> {
        Ok(pod_state(&self.get_pod(name).await?))
    }

    async fn get_pod(&self, name: &str) -> Result<Pod> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        api.get(name).await.map_err(|err| self.not_found_or(err, name, format!("get Pod {name}")))
    }

    /// Polls the Pod until it runs and has an IP address. Fails early when
    /// it cannot get there (it ended, its image cannot be pulled, its
    /// container cannot be created, it was OOM-killed) and after `timeout`.
    pub async fn wait_for_ip(&self, name: &str, timeout: Duration) -> Result<IpAddr> {
        let started = tokio::time::Instant::now();
        loop {
            let state = self.status(name).await?;
            if matches!(state.phase, Phase::Failed | Phase::Succeeded)
                || state.reason.as_ref().is_some_and(|r| r.is_fatal())
            {
                return Err(Error::PodFailed { pod: name.to_owned(), state: state.to_string() });
            }
            // A Pending Pod can have its IP before the container runs (image pull).
            if let (Some(ip), Phase::Running) = (state.pod_ip, state.phase) {
                return Ok(ip);
            }
            if started.elapsed() + POLL_INTERVAL > timeout {
                return Err(Error::WaitTimedOut {
                    pod: name.to_owned(),
                    waited: started.elapsed(),
                    last_state: state.to_string(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The service container's log; the last `tail_lines` lines if given.
    pub async fn logs(&self, name: &str, tail_lines: Option<i64>) -> Result<String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let params = LogParams { container: Some(CONTAINER_NAME.to_owned()), tail_lines, ..LogParams::default() };
        api.logs(name, &params).await.map_err(|err| self.not_found_or(err, name, format!("read the log of Pod {name}")))
    }

    /// Follows the service container's log (`kiln k8s logs -f`), writing
    /// it to `out` as it arrives, until the container ends or the stream
    /// breaks.
    pub async fn follow_logs(&self, name: &str, mut out: impl std::io::Write) -> Result<()> {
        use futures::AsyncReadExt;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let params = LogParams { container: Some(CONTAINER_NAME.to_owned()), follow: true, ..LogParams::default() };
        let stream = api
            .log_stream(name, &params)
            .await
            .map_err(|err| self.not_found_or(err, name, format!("follow the log of Pod {name}")))?;
        let mut stream = std::pin::pin!(stream);
        let mut buffer = vec![0; 16 * 1024];
        let failed = |source| Error::LogStream { pod: name.to_owned(), source };
        loop {
            let read = stream.read(&mut buffer).await.map_err(failed)?;
            if read == 0 {
                return Ok(());
            }
            out.write_all(&buffer[..read]).and_then(|()| out.flush()).map_err(failed)?;
        }
    }

    /// Deletes an instance: its Pod, then every other object labelled as
    /// kiln's for it (`managed-by=kiln`, `kiln.dev/instance=<name>`). Each
    /// kind is listed by that label selector, the labels are checked again
    /// on every object listed, and each is deleted with a UID
    /// precondition, so an object that is not kiln's (even one named like
    /// the instance, even one that replaced kiln's meanwhile) is never
    /// deleted. Gone already (404) is fine.
    pub async fn delete(&self, name: &str) -> Result<Deleted> {
        let selector = format!("{MANAGED_BY_LABEL}={MANAGER},{INSTANCE_LABEL}={name}");
        let pod = !self.delete_labelled::<Pod>(name, &selector).await?.is_empty();
        let mut others = Vec::new();
        others.extend(self.delete_labelled::<NetworkPolicy>(name, &selector).await?);
        others.extend(self.delete_labelled::<Service>(name, &selector).await?);
        others.extend(self.delete_labelled::<EndpointSlice>(name, &selector).await?);
        others.extend(self.delete_labelled::<Endpoints>(name, &selector).await?);
        others.extend(self.delete_labelled::<Secret>(name, &selector).await?);
        others.extend(self.delete_labelled::<ConfigMap>(name, &selector).await?);
        Ok(Deleted { pod, others })
    }

    /// Lists objects of kind `K` matching `selector` (kiln's labels for
    /// `instance`) and deletes each that carries them; 404s (a kind the
    /// cluster does not serve, an object already gone) and 409s (the UID
    /// precondition failed: the name now holds another object) are fine.
    async fn delete_labelled<K>(&self, instance: &str, selector: &str) -> Result<Vec<String>>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        let kind = K::kind(&());
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = match api.list(&ListParams::default().labels(selector)).await {
            Ok(list) => list,
            Err(err) if status_code(&err) == Some(404) => return Ok(Vec::new()),
            Err(err) => return Err(api_error(format!("list {kind}s labelled {selector}"))(err)),
        };
        let mut deleted = Vec::new();
        for item in list.items {
            let meta = item.meta();
            // The server filtered by the selector; kiln does not rely on it.
            if !is_instance(meta, instance) {
                continue;
            }
            let Some(object_name) = meta.name.clone() else { continue };
            let params = DeleteParams {
                preconditions: meta.uid.clone().map(|uid| Preconditions { uid: Some(uid), resource_version: None }),
                ..DeleteParams::default()
            };
            match api.delete(&object_name, &params).await {
                Ok(_) => deleted.push(format!("{kind}/{object_name}")),
                Err(err) if matches!(status_code(&err), Some(404 | 409)) => {}
                Err(err) => return Err(api_error(format!("delete {kind}/{object_name}"))(err)),
            }
        }
        Ok(deleted)
    }

    /// kiln's instances in the namespace (Pods labelled `managed-by=kiln`), sorted by name.
    pub async fn list(&self) -> Result<Vec<Instance>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = format!("{MANAGED_BY_LABEL}={MANAGER}");
        let pods = api.list(&ListParams::default().labels(&selector)).await.map_err(api_error("list kiln's Pods"))?;
        let mut instances: Vec<Instance> = pods
            .items
            .iter()
            .filter(|pod| is_kilns(&pod.metadata))
            .filter_map(|pod| Some(Instance { name: pod.metadata.name.clone()?, state: pod_state(pod) }))
            .collect();
        instances.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(instances)
    }

    /// Deletes stale instances: those whose Pod has ended (Succeeded or
    /// Failed; with restart policy Never it will not run again) and the
    /// leftovers of instances whose Pod is gone. Returns the instances reaped.
    pub async fn reap(&self) -> Result<Vec<String>> {
        let instances = self.list().await?;
        let live: BTreeSet<&str> = instances
            .iter()
            .filter(|i| !matches!(i.state.phase, Phase::Succeeded | Phase::Failed))
            .map(|i| i.name.as_str())
            .collect();
        let mut stale: BTreeSet<String> =
            instances.iter().filter(|i| !live.contains(i.name.as_str())).map(|i| i.name.clone()).collect();
        stale.extend(self.labelled_instances::<Service>().await?);
        stale.extend(self.labelled_instances::<NetworkPolicy>().await?);
        stale.extend(self.labelled_instances::<Secret>().await?);
        stale.extend(self.labelled_instances::<ConfigMap>().await?);
        stale.retain(|name| !live.contains(name.as_str()));
        for name in &stale {
            self.delete(name).await?;
        }
        Ok(stale.into_iter().collect())
    }

    /// The `kiln.dev/instance` values on kiln's objects of kind `K`.
    async fn labelled_instances<K>(&self) -> Result<BTreeSet<String>>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = format!("{MANAGED_BY_LABEL}={MANAGER}");
        let list = api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(api_error(format!("list kiln's {}s", K::kind(&()))))?;
        Ok(list
            .items
            .iter()
            .filter(|item| is_kilns(item.meta()))
            .filter_map(|item| item.meta().labels.as_ref()?.get(INSTANCE_LABEL).cloned())
            .collect())
    }

    fn not_found_or(&self, err: kube::Error, pod: &str, action: String) -> Error {
        if status_code(&err) == Some(404) {
            Error::NotFound { pod: pod.to_owned(), namespace: self.namespace.clone() }
        } else {
            api_error(action)(err)
        }
    }
}

/// The HTTP status of an API error, if the server answered with one.
fn status_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Maps kube's error: transport failures (the server was never reached)
/// apart from the server's own answers.
fn api_error(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| match source {
        kube::Error::Service(_) | kube::Error::HyperError(_) => Error::Unreachable { action, source },
        kube::Error::Api(status) => Error::Rejected {
            action,
            code: status.code,
            reason: status.reason.clone(),
            message: status.message.clone(),
        },
        source => Error::Api { action, source },
    }
}
