//! The spec: one TOML file describing a service, which `kiln run` turns into
//! a microVM and `kiln render --target k8s` into Kubernetes objects. See
//! `docs/spec.md` for every field.
//!
//! Everything that can be checked without touching the host is checked
//! while parsing, inside the serde impls, so that the error points at the
//! line and column of the bad value. Unknown fields are errors everywhere.
//! Relative paths are resolved against the spec file's directory.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use kiln_types::firewall::{Firewall, HostPort, Protocol, PublishedPort};
/// Shared with kiln-k8s (through kiln-types), so the spec's tables are the
/// types the Pod builders take.
pub use kiln_types::pod::{PodSecurity, Toleration};
pub use kiln_types::resources::{Confidentiality, Gpu, GpuPolicy};
use kiln_types::syntax::{MAX_DNS_LABEL_LEN as MAX_NAME_LEN, is_dns_label, is_image_reference};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, parse_size};

mod pod;
pub use pod::{
    AbsolutePath, Container, ContainerName, ContainerResources, Medium, MountSpec, Pod, PodContainer, PodMount,
    PodVolume, Restart, SERVICE_CONTAINER, Volume,
};

/// A parsed, validated spec.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The service's name: lowercase letters, digits and `-`, starting with a
    /// letter, at most 63 bytes.
    pub name: Name,
    /// The pod's restart policy (`never` by default).
    #[serde(default)]
    pub restart: Restart,
    /// What runs: the single-service form, a pod of one. Either this or
    /// [`Spec::container`], not both (checked while parsing).
    #[serde(default)]
    pub service: Service,
    /// What runs: the pod form (see `docs/spec.md`).
    #[serde(default)]
    pub container: Vec<Container>,
    /// The pod's volumes.
    #[serde(default)]
    pub volume: Vec<Volume>,
    /// What it gets.
    #[serde(default)]
    pub resources: Resources,
    /// What it may reach and what it publishes.
    #[serde(default)]
    pub network: Network,
    /// The guest kernel and initramfs (default: `cargo xtask guest`'s).
    #[serde(default)]
    pub guest: Guest,
    /// How the VM runs.
    #[serde(default)]
    pub vm: VmSettings,
    /// How the Pod runs (`kiln render --target k8s`, `kiln k8s`).
    #[serde(default)]
    pub kubernetes: Kubernetes,
}

/// A spec name (see [`Spec::name`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    /// Checks `name` against the rules of [`Spec::name`].
    pub fn new(name: &str) -> std::result::Result<Name, String> {
        if name.is_empty() {
            return Err("the name is empty".to_owned());
        }
        if name.len() > MAX_NAME_LEN {
            return Err(format!("the name `{name}` is longer than {MAX_NAME_LEN} bytes"));
        }
        if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(format!("the name `{name}` may only hold lowercase ASCII letters, digits and `-`"));
        }
        if !name.as_bytes()[0].is_ascii_lowercase() || name.ends_with('-') {
            return Err(format!("the name `{name}` must start with a letter and not end with `-`"));
        }
        Ok(Name(name.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Name::new(&name).map_err(de::Error::custom)
    }
}

/// The service: a binary or an OCI image for VMs, the image for
/// Kubernetes, and what both get.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The service binary, copied onto the service disk (VMs only).
    pub binary: Option<PathBuf>,
    /// The OCI image: what a Pod runs, and what a VM runs when it has no
    /// binary (or `vm.uses = "image"`). A registry reference, or a local
    /// source (`oci:DIR[:TAG]`, `oci-archive:FILE`, `docker-archive:FILE`)
    /// for VMs.
    pub image: Option<String>,
    /// Arguments, passed exactly (the launch script quotes them). With an
    /// image they replace its cmd, as `docker run IMAGE ARGS...` does.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment. Loopback URLs (`127.0.0.1`, `localhost`, `[::1]`) are
    /// rewritten to the host's address as the guest sees it.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Extra trees on the service disk (`/srv/<name>` in the guest), such as
    /// `keystore = { path = "./keystore", secret = true }`.
    #[serde(default)]
    pub files: BTreeMap<String, FileTree>,
    /// Whether the spec has a `[service]` table (a missing one is the
    /// default, with this false).
    #[serde(skip, default = "table_given")]
    pub(crate) declared: bool,
}

fn table_given() -> bool {
    true
}

/// One extra tree of [`Service::files`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileTree {
    /// The directory on the host.
    pub path: PathBuf,
    /// Secret trees make the service disk file mode 0600 (and a Secret, not
    /// a ConfigMap or hostPath, on Kubernetes).
    #[serde(default)]
    pub secret: bool,
}

/// A byte size written as `512MiB` (or a plain number of bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"512MiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> std::result::Result<ByteSize, E> {
                parse_size(value).map(ByteSize).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> std::result::Result<ByteSize, E> {
                u64::try_from(value).map(ByteSize).map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// CPUs, memory, the data disk, GPUs and confidentiality.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Virtual CPUs (1 by default).
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// Guest memory (512 MiB by default).
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    /// The data disk (`/mnt/data`), kept across runs; none when absent.
    pub storage: Option<ByteSize>,
    /// A host directory copied onto the data disk when kiln creates it
    /// (VMs only); an existing disk is never refilled.
    pub storage_seed: Option<PathBuf>,
    /// GPUs.
    #[serde(default)]
    pub gpu: Gpu,
    /// Whether the service needs a trusted execution environment.
    #[serde(default)]
    pub confidentiality: Confidentiality,
}

fn default_cpus() -> u8 {
    1
}

fn default_memory() -> ByteSize {
    ByteSize(512 << 20)
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpus: default_cpus(),
            memory: default_memory(),
            storage: None,
            storage_seed: None,
            gpu: Gpu::default(),
            confidentiality: Confidentiality::default(),
        }
    }
}

/// What the guest may reach and what is published.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Host ports the guest may reach, on the host's address on the VM's
    /// link: `7000`, `"tcp/7000"` or `"udp/53"`.
    #[serde(default)]
    pub host_ports: Vec<PortSpec>,
    /// Whether the guest may open connections to the outside (masqueraded).
    #[serde(default)]
    pub egress: bool,
    /// Host ports forwarded to the guest: `"8080:80"` or `"udp/5353:53"`.
    #[serde(default)]
    pub publish: Vec<PublishSpec>,
}

/// A host port the guest may reach (see [`Network::host_ports`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct PortSpec(pub HostPort);

impl From<PortSpec> for String {
    fn from(spec: PortSpec) -> String {
        format!("{}/{}", spec.0.protocol, spec.0.port)
    }
}

fn parse_protocol_prefix(text: &str) -> std::result::Result<(Protocol, &str), String> {
    match text.split_once('/') {
        None => Ok((Protocol::Tcp, text)),
        Some(("tcp", rest)) => Ok((Protocol::Tcp, rest)),
        Some(("udp", rest)) => Ok((Protocol::Udp, rest)),
        Some((other, _)) => Err(format!("unknown protocol `{other}`: use tcp or udp")),
    }
}

fn parse_port(text: &str) -> std::result::Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("`{text}` is not a port (1 to 65535)")),
        Ok(port) => Ok(port),
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct PortVisitor;
        impl Visitor<'_> for PortVisitor {
            type Value = PortSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port such as 7000, \"tcp/7000\" or \"udp/53\"")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> std::result::Result<PortSpec, E> {
                let (protocol, port) = parse_protocol_prefix(value).map_err(E::custom)?;
                let port = parse_port(port).map_err(E::custom)?;
                Ok(PortSpec(HostPort { protocol, port }))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> std::result::Result<PortSpec, E> {
                self.visit_str(&value.to_string())
            }
        }
        deserializer.deserialize_any(PortVisitor)
    }
}

/// A published port (see [`Network::publish`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct PublishSpec(pub PublishedPort);

impl From<PublishSpec> for String {
    fn from(spec: PublishSpec) -> String {
        format!("{}/{}:{}", spec.0.protocol, spec.0.host_port, spec.0.guest_port)
    }
}

impl<'de> Deserialize<'de> for PublishSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let (protocol, ports) = parse_protocol_prefix(&text).map_err(de::Error::custom)?;
        let Some((host, guest)) = ports.split_once(':') else {
            return Err(de::Error::custom(format!("`{text}` is not HOST_PORT:GUEST_PORT, such as \"8080:80\"")));
        };
        let host_port = parse_port(host).map_err(de::Error::custom)?;
        let guest_port = parse_port(guest).map_err(de::Error::custom)?;
        Ok(PublishSpec(PublishedPort { protocol, host_port, guest_port }))
    }
}

/// The guest kernel, initramfs and command line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    /// A bzImage (QEMU) or an uncompressed `vmlinux` (cloud-hypervisor).
    pub kernel: Option<PathBuf>,
    /// The initramfs (default: kiln's, with `kiln-init`).
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended to kiln's. At most one
    /// `kiln.grace=SECONDS` (whole seconds, 0 to 86400): the service's grace
    /// period between SIGTERM and SIGKILL (see [`Guest::grace_seconds`]).
    #[serde(default, deserialize_with = "deserialize_cmdline")]
    pub cmdline: Option<String>,
}

/// The kernel command-line word that sets the service's grace period.
pub const GRACE_PARAMETER: &str = "kiln.grace=";

impl Guest {
    /// The spec's grace period in seconds: `kiln.grace=` in `cmdline`, if
    /// there (checked while parsing).
    pub fn grace_seconds(&self) -> Option<u64> {
        self.cmdline.as_deref().and_then(|cmdline| cmdline_grace(cmdline).ok().flatten())
    }
}

/// The `kiln.grace=` of a command line: none, or exactly one valid value.
fn cmdline_grace(cmdline: &str) -> std::result::Result<Option<u64>, String> {
    let mut values = cmdline.split_whitespace().filter_map(|word| word.strip_prefix(GRACE_PARAMETER));
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(format!("`{GRACE_PARAMETER}` appears more than once; give the grace period once"));
    }
    let valid = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) && value.len() <= 5;
    match value.parse::<u64>() {
        Ok(seconds) if valid && seconds <= kiln_guest::MAX_GRACE_SECONDS => Ok(Some(seconds)),
        _ => Err(format!(
            "`{GRACE_PARAMETER}{value}` is not a grace period: use whole seconds from 0 to {}",
            kiln_guest::MAX_GRACE_SECONDS
        )),
    }
}

fn deserialize_cmdline<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<String>, D::Error> {
    let cmdline = String::deserialize(deserializer)?;
    cmdline_grace(&cmdline).map_err(de::Error::custom)?;
    Ok(Some(cmdline))
}

/// How the VM runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmSettings {
    /// Which VMM: `auto` (cloud-hypervisor when it and KVM work, else
    /// QEMU), `cloud-hypervisor` or `qemu`.
    #[serde(default)]
    pub backend: Backend,
    /// PCI devices passed through with VFIO, as `0000:01:00.0`.
    #[serde(default)]
    pub vfio: Vec<PciAddress>,
    /// What the VM runs when the service has both a binary and an image
    /// (required then; with only one of them, that one).
    pub uses: Option<VmUses>,
}

/// The value of [`VmSettings::uses`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmUses {
    /// `service.binary`, with the generated launch script.
    Binary,
    /// `service.image`, as a container in the VM.
    Image,
}

/// What a VM of the spec runs (see [`Spec::vm_program`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmProgram<'a> {
    /// `service.binary`.
    Binary(&'a Path),
    /// `service.image`, as the spec writes it.
    Image(&'a str),
}

/// A VMM choice (`auto`, `cloud-hypervisor`, `qemu`): kiln-vmm's
/// [`kiln_vmm::BackendChoice`], under the name the spec has always used.
pub use kiln_vmm::BackendChoice as Backend;
/// A PCI address `dddd:bb:dd.f`, checked so it can name a sysfs path safely.
pub use kiln_vmm::PciAddress;

/// The Pod's placement and metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Kubernetes {
    /// The namespace (default: the kubeconfig context's).
    pub namespace: Option<String>,
    /// Node labels the Pod must land on.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the Pod tolerates.
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// Annotations on every object.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// An image pull secret's name.
    pub pull_secret: Option<String>,
    /// Extra labels on every object (kiln's own labels win).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The service account; none means no API token in the Pod.
    pub service_account: Option<String>,
    /// Where `service.files` trees come from in the Pod.
    #[serde(default)]
    pub files: FileSource,
    /// Loosening of the Pod's hardened security context.
    #[serde(default)]
    pub security: PodSecurity,
}

/// Where the Pod finds `service.files` trees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileSource {
    /// Carried in the manifests: a Secret for secret trees, else a
    /// ConfigMap (flat directories of at most 1 MiB).
    #[default]
    Inline,
    /// The same path on the node, mounted read-only (`hostPath`).
    HostPath,
}

impl Spec {
    /// Parses `text` (the contents of `path`, which only names it in errors
    /// and anchors relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Spec> {
        let mut spec: Spec = toml::from_str(text)
            .map_err(|e| Error::Spec { path: path.to_path_buf(), message: e.to_string().trim_end().to_owned() })?;
        let invalid = |message: String| Error::Spec { path: path.to_path_buf(), message };
        pod::check(&spec, text).map_err(invalid)?;
        spec.check().map_err(invalid)?;
        let base = path.parent().unwrap_or(Path::new("."));
        spec.resolve_paths(base);
        pod::resolve_paths(&mut spec.container, base);
        Ok(spec)
    }

    /// Reads and parses the spec file at `path`.
    pub fn load(path: &Path) -> Result<Spec> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::SpecRead { path: path.to_path_buf(), source })?;
        Spec::parse(&text, path)
    }

    /// Checks what spans several fields.
    fn check(&self) -> std::result::Result<(), String> {
        if self.resources.cpus == 0 {
            return Err("resources.cpus must be at least 1".to_owned());
        }
        if self.resources.memory.0 < 64 << 20 {
            return Err("resources.memory must be at least 64MiB".to_owned());
        }
        if self.resources.storage.is_some_and(|size| size.0 < 8 << 20) {
            return Err("resources.storage must be at least 8MiB: the data disk is journaled ext4".to_owned());
        }
        if self.resources.storage_seed.is_some() && self.resources.storage.is_none() {
            return Err(
                "resources.storage_seed fills the data disk, but resources.storage (its size) is not set".to_owned()
            );
        }
        let gpu = &self.resources.gpu;
        if gpu.policy == GpuPolicy::Required && gpu.count == 0 {
            return Err("resources.gpu.policy is \"required\" but resources.gpu.count is 0".to_owned());
        }
        if gpu.policy == GpuPolicy::None && gpu.count > 0 {
            return Err(format!(
                "resources.gpu.count is {} but resources.gpu.policy is \"none\"; set it to \"preferred\" or \"required\"",
                gpu.count
            ));
        }
        for name in self.service.env.keys() {
            crate::launch::validate_env_name(name).map_err(|e| format!("service.env: {e}"))?;
        }
        let allowed: Vec<u16> =
            self.network.host_ports.iter().filter(|p| p.0.protocol == Protocol::Tcp).map(|p| p.0.port).collect();
        for (name, value) in &self.service.env {
            for port in loopback_url_ports(value) {
                if !port.parse().is_ok_and(|port: u16| allowed.contains(&port)) {
                    return Err(format!(
                        "service.env.{name} points at host port {port}, which network.host_ports does not allow"
                    ));
                }
            }
        }
        for name in self.service.files.keys() {
            crate::service_disk::validate_tree_name(name).map_err(|e| format!("service.files: {e}"))?;
        }
        if let Some(image) = &self.service.image
            && !is_image_reference(image)
        {
            return Err(format!("service.image `{}` is empty or holds whitespace", image.escape_debug()));
        }
        self.check_vm_uses()?;
        if let Some(namespace) = &self.kubernetes.namespace
            && !is_dns_label(namespace)
        {
            return Err(format!(
                "kubernetes.namespace `{namespace}` is not a DNS label (lower-case letters, digits and `-`, at most 63 bytes)"
            ));
        }
        self.firewall().validate::<kiln_types::Error>().map_err(|e| format!("network: {e}"))
    }

    /// `vm.uses` must name a field that is set, and is needed when both are.
    fn check_vm_uses(&self) -> std::result::Result<(), String> {
        let (binary, image) = (self.service.binary.is_some(), self.service.image.is_some());
        match self.vm.uses {
            None if binary && image => Err(
                "service.binary and service.image are both set: set vm.uses = \"binary\" or \"image\" to say which one the VM runs (a Pod always runs the image)"
                    .to_owned(),
            ),
            Some(VmUses::Binary) if !binary => Err("vm.uses is \"binary\" but service.binary is not set".to_owned()),
            Some(VmUses::Image) if !image => Err("vm.uses is \"image\" but service.image is not set".to_owned()),
            _ => Ok(()),
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        if let Some(binary) = &mut self.service.binary {
            resolve(binary);
        }
        if let Some(image) = &mut self.service.image {
            *image = resolve_local_image(image, base);
        }
        for tree in self.service.files.values_mut() {
            resolve(&mut tree.path);
        }
        let paths = [&mut self.guest.kernel, &mut self.guest.initramfs, &mut self.resources.storage_seed];
        for path in paths.into_iter().flatten() {
            resolve(path);
        }
    }

    /// What a VM of this spec runs: the one of `service.binary` and
    /// `service.image` that is set, or the one `vm.uses` names when both
    /// are (checked while parsing); `None` when neither is.
    pub fn vm_program(&self) -> Option<VmProgram<'_>> {
        let service = &self.service;
        match (service.binary.as_deref(), service.image.as_deref(), self.vm.uses) {
            (Some(binary), None, _) | (Some(binary), Some(_), Some(VmUses::Binary)) => Some(VmProgram::Binary(binary)),
            (None, Some(image), _) | (Some(_), Some(image), Some(VmUses::Image)) => Some(VmProgram::Image(image)),
            // Refused while parsing; a spec built by hand runs the binary, as before images.
            (Some(binary), Some(_), None) => Some(VmProgram::Binary(binary)),
            (None, None, _) => None,
        }
    }

    /// The firewall of the service (kiln-types' model, which kiln-net and
    /// kiln-k8s both take).
    pub fn firewall(&self) -> Firewall {
        Firewall {
            egress: self.network.egress,
            host_ports: self.network.host_ports.iter().map(|p| p.0).collect(),
            published_ports: self.network.publish.iter().map(|p| p.0).collect(),
        }
    }

    /// The service's environment as the guest sees it: loopback URLs point
    /// at `host_addr`, the host's address on the VM's link.
    pub fn guest_env(&self, host_addr: Ipv4Addr) -> BTreeMap<String, String> {
        self.service.env.iter().map(|(k, v)| (k.clone(), rewrite_loopback_urls(v, &host_addr.to_string()))).collect()
    }
}

/// The transports of image sources on the host's file system; their path is
/// relative to the spec file, like `service.binary`.
pub(crate) const LOCAL_IMAGE_TRANSPORTS: [&str; 3] = ["oci:", "oci-archive:", "docker-archive:"];

/// `image` with the relative path of a local source (`oci:DIR[:TAG]` and
/// the archives) anchored at `base`; a registry reference as it is.
fn resolve_local_image(image: &str, base: &Path) -> String {
    for transport in LOCAL_IMAGE_TRANSPORTS {
        if let Some(rest) = image.strip_prefix(transport)
            && !rest.starts_with('/')
            && !rest.is_empty()
        {
            // Joined as text: the `:TAG` stays at the end, after the anchored
            // path, and a `:` in `base` stays the path's (kiln-oci's
            // ImageSource takes a tag only after the last `:`, never a `/`).
            return format!("{transport}{}", base.join(rest).display());
        }
    }
    image.to_owned()
}

/// Whether `image` names a local source rather than a registry reference
/// (which a Pod cannot pull).
#[cfg_attr(not(feature = "k8s"), allow(dead_code))]
pub(crate) fn is_local_image(image: &str) -> bool {
    LOCAL_IMAGE_TRANSPORTS.iter().any(|transport| image.starts_with(transport))
}

/// Replaces the host of every `scheme://host` URL in `value` whose host is
/// loopback (`localhost`, `127.x.y.z`, `[::1]`) with `host`, keeping any
/// user info, port and path.
pub fn rewrite_loopback_urls(value: &str, host: &str) -> String {
    map_url_hosts(value, |authority_host, _| is_loopback_host(authority_host).then_some(host))
}

/// The explicit ports of the loopback URLs in `value`.
fn loopback_url_ports(value: &str) -> Vec<String> {
    let mut ports = Vec::new();
    map_url_hosts(value, |authority_host, port| {
        if is_loopback_host(authority_host) && !port.is_empty() {
            ports.push(port.to_owned());
        }
        None
    });
    ports
}

/// Calls `replace(host, port)` for the authority of every `scheme://` URL
/// in `value` (port without its `:`), and puts its answer, if any, in place
/// of the host.
fn map_url_hosts<'a>(value: &str, mut replace: impl FnMut(&str, &str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The authority ends at the first `/`, `?`, `#`, or a separator.
        let end = after.find(['/', '?', '#', ',', ';', ' ', '"', '\'']).unwrap_or(after.len());
        let (authority, tail) = after.split_at(end);
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => authority.split_at(i + 1),
            None => ("", authority),
        };
        let (authority_host, port) = if hostport.starts_with('[') {
            match hostport.find(']') {
                Some(i) => hostport.split_at(i + 1),
                None => (hostport, ""),
            }
        } else {
            match hostport.rfind(':') {
                Some(i) => hostport.split_at(i),
                None => (hostport, ""),
            }
        };
        out.push_str(userinfo);
        out.push_str(replace(authority_host, port.trim_start_matches(':')).unwrap_or(authority_host));
        out.push_str(port);
        rest = tail;
    }
    out.push_str(rest);
    out
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host == "[::1]"
        || host.parse::<Ipv4Addr>().is_ok_and(|addr| addr.is_loopback())
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn check(text: &str, expected: Expect) {
        let actual = match Spec::parse(text, Path::new("/specs/app.toml")) {
            Ok(spec) => format!("{spec:#?}"),
            Err(e) => format!("error: {e}"),
        };
        expected.assert_eq(&actual);
    }

    #[test]
    fn rewrites_only_loopback_hosts() {
        let cases = [
            ("http://127.0.0.1:7000/rpc", "http://10.0.0.1:7000/rpc"),
            ("http://localhost", "http://10.0.0.1"),
            ("grpc://user:pw@LOCALHOST:50051", "grpc://user:pw@10.0.0.1:50051"),
            ("ws://[::1]:9/x?y=1", "ws://10.0.0.1:9/x?y=1"),
            ("http://127.1.2.3", "http://10.0.0.1"),
            ("a=http://localhost:1,b=https://example.com:2", "a=http://10.0.0.1:1,b=https://example.com:2"),
            ("http://localhost.example.com", "http://localhost.example.com"),
            ("http://10.1.1.1:80", "http://10.1.1.1:80"),
            ("no url here", "no url here"),
            ("://", "://"),
        ];
        for (input, expected) in cases {
            assert_eq!(rewrite_loopback_urls(input, "10.0.0.1"), expected, "{input}");
        }
    }

    #[test]
    fn parses_a_full_spec() {
        check(
            r#"
name = "hello"

[service]
binary = "bin/hello"
image = "ghcr.io/example/hello:1"
args = ["--port", "8080"]
env = { RPC_URL = "http://127.0.0.1:7000" }
files = { keystore = { path = "keystore", secret = true }, config = { path = "/etc/hello" } }

[resources]
cpus = 2
memory = "1GiB"
storage = "256MiB"
storage_seed = "seed"
gpu = { count = 1, policy = "preferred", min_vram_gb = 16 }
confidentiality = "tee-preferred"

[network]
host_ports = [7000, "udp/53"]
egress = true
publish = ["8080:80", "udp/5353:53"]

[guest]
cmdline = "quiet"

[vm]
backend = "qemu"
vfio = ["0000:01:00.0"]
uses = "binary"

[kubernetes]
namespace = "apps"
node_selector = { pool = "gpu" }
tolerations = [{ key = "gpu", operator = "Exists", effect = "NoSchedule" }]
pull_secret = "regcred"
labels = { tier = "backend" }
service_account = "runner"
files = "host-path"
security = { run_as_root = true, add_capabilities = ["NET_ADMIN"], run_as_user = 0 }
"#,
            expect![[r#"
                Spec {
                    name: Name(
                        "hello",
                    ),
                    restart: Never,
                    service: Service {
                        binary: Some(
                            "/specs/bin/hello",
                        ),
                        image: Some(
                            "ghcr.io/example/hello:1",
                        ),
                        args: [
                            "--port",
                            "8080",
                        ],
                        env: {
                            "RPC_URL": "http://127.0.0.1:7000",
                        },
                        files: {
                            "config": FileTree {
                                path: "/etc/hello",
                                secret: false,
                            },
                            "keystore": FileTree {
                                path: "/specs/keystore",
                                secret: true,
                            },
                        },
                        declared: true,
                    },
                    container: [],
                    volume: [],
                    resources: Resources {
                        cpus: 2,
                        memory: ByteSize(
                            1073741824,
                        ),
                        storage: Some(
                            ByteSize(
                                268435456,
                            ),
                        ),
                        storage_seed: Some(
                            "/specs/seed",
                        ),
                        gpu: Gpu {
                            count: 1,
                            policy: Preferred,
                            min_vram_gb: Some(
                                16,
                            ),
                        },
                        confidentiality: TeePreferred,
                    },
                    network: Network {
                        host_ports: [
                            PortSpec(
                                HostPort {
                                    protocol: Tcp,
                                    port: 7000,
                                },
                            ),
                            PortSpec(
                                HostPort {
                                    protocol: Udp,
                                    port: 53,
                                },
                            ),
                        ],
                        egress: true,
                        publish: [
                            PublishSpec(
                                PublishedPort {
                                    protocol: Tcp,
                                    host_port: 8080,
                                    guest_port: 80,
                                },
                            ),
                            PublishSpec(
                                PublishedPort {
                                    protocol: Udp,
                                    host_port: 5353,
                                    guest_port: 53,
                                },
                            ),
                        ],
                    },
                    guest: Guest {
                        kernel: None,
                        initramfs: None,
                        cmdline: Some(
                            "quiet",
                        ),
                    },
                    vm: VmSettings {
                        backend: Qemu,
                        vfio: [
                            PciAddress(
                                "0000:01:00.0",
                            ),
                        ],
                        uses: Some(
                            Binary,
                        ),
                    },
                    kubernetes: Kubernetes {
                        namespace: Some(
                            "apps",
                        ),
                        node_selector: {
                            "pool": "gpu",
                        },
                        tolerations: [
                            Toleration {
                                key: Some(
                                    "gpu",
                                ),
                                operator: Some(
                                    "Exists",
                                ),
                                value: None,
                                effect: Some(
                                    "NoSchedule",
                                ),
                            },
                        ],
                        annotations: {},
                        pull_secret: Some(
                            "regcred",
                        ),
                        labels: {
                            "tier": "backend",
                        },
                        service_account: Some(
                            "runner",
                        ),
                        files: HostPath,
                        security: PodSecurity {
                            run_as_root: true,
                            writable_root_filesystem: false,
                            allow_privilege_escalation: false,
                            add_capabilities: [
                                "NET_ADMIN",
                            ],
                            unconfined_seccomp: false,
                            run_as_user: Some(
                                0,
                            ),
                        },
                    },
                }"#]],
        );
    }

    #[test]
    fn minimal_spec_gets_defaults() {
        check(
            "name = \"a\"\n[service]\nbinary = \"/bin/true\"\n",
            expect![[r#"
                Spec {
                    name: Name(
                        "a",
                    ),
                    restart: Never,
                    service: Service {
                        binary: Some(
                            "/bin/true",
                        ),
                        image: None,
                        args: [],
                        env: {},
                        files: {},
                        declared: true,
                    },
                    container: [],
                    volume: [],
                    resources: Resources {
                        cpus: 1,
                        memory: ByteSize(
                            536870912,
                        ),
                        storage: None,
                        storage_seed: None,
                        gpu: Gpu {
                            count: 0,
                            policy: None,
                            min_vram_gb: None,
                        },
                        confidentiality: Any,
                    },
                    network: Network {
                        host_ports: [],
                        egress: false,
                        publish: [],
                    },
                    guest: Guest {
                        kernel: None,
                        initramfs: None,
                        cmdline: None,
                    },
                    vm: VmSettings {
                        backend: Auto,
                        vfio: [],
                        uses: None,
                    },
                    kubernetes: Kubernetes {
                        namespace: None,
                        node_selector: {},
                        tolerations: [],
                        annotations: {},
                        pull_secret: None,
                        labels: {},
                        service_account: None,
                        files: Inline,
                        security: PodSecurity {
                            run_as_root: false,
                            writable_root_filesystem: false,
                            allow_privilege_escalation: false,
                            add_capabilities: [],
                            unconfined_seccomp: false,
                            run_as_user: None,
                        },
                    },
                }"#]],
        );
    }

    #[test]
    fn errors_point_at_the_line() {
        let cases = [
            "name = \"a\"\n[service]\nbinary = \"x\"\nbinnary = \"y\"\n",
            "name = \"Hello\"\n[service]\n",
            "name = \"a\"\n[service]\n[resources]\nmemory = \"1.5GiB\"\n",
            "name = \"a\"\n[service]\n[network]\nhost_ports = [0]\n",
            "name = \"a\"\n[service]\n[network]\npublish = [\"8080\"]\n",
            "name = \"a\"\n[service]\n[network]\npublish = [\"sctp/1:2\"]\n",
            "name = \"a\"\n[service]\n[network]\npublish = [\"80:80\", \"udp/80:80\", \"80:81\"]\n",
            "name = \"a\"\n[service]\n[resources]\ngpu = { policy = \"required\" }\n",
            "name = \"a\"\n[service]\nenv = { \"1X\" = \"y\" }\n",
            "name = \"a\"\n[service]\nfiles = { \"../up\" = { path = \"x\" } }\n",
            "name = \"a\"\n[service]\n[vm]\nvfio = [\"01:00.0\"]\n",
            "name = \"a\"\n[service]\n[vm]\nbackend = \"firecracker\"\n",
            "name = \"a\"\n",
            "name = \"a\"\n[service]\nenv = { U = \"http://localhost:7001/x\" }\n[network]\nhost_ports = [7000]\n",
            "name = \"a\"\n[service]\n[guest]\ncmdline = \"quiet kiln.grace=soon\"\n",
            "name = \"a\"\n[service]\n[guest]\ncmdline = \"kiln.grace=1 kiln.grace=2\"\n",
            "name = \"a\"\n[service]\n[guest]\ncmdline = \"kiln.grace=86401\"\n",
            "name = \"a\"\n[service]\n[resources]\nstorage_seed = \"seed\"\n",
            "name = \"a\"\n[service]\n[resources]\nstorage = \"4MiB\"\n",
            "name = \"a\"\n[service]\nbinary = \"b\"\nimage = \"i\"\n",
            "name = \"a\"\n[service]\nimage = \"i\"\n[vm]\nuses = \"binary\"\n",
            "name = \"a\"\n[service]\nbinary = \"b\"\n[vm]\nuses = \"image\"\n",
            "name = \"a\"\n[service]\nbinary = \"b\"\n[vm]\nuses = \"both\"\n",
        ];
        let actual: String = cases
            .iter()
            .map(|text| match Spec::parse(text, Path::new("app.toml")) {
                Ok(_) => "ok\n".to_owned(),
                Err(e) => format!("{e}\n---\n"),
            })
            .collect();
        expect![[r#"
            Spec app.toml: TOML parse error at line 4, column 1
              |
            4 | binnary = "y"
              | ^^^^^^^
            unknown field `binnary`, expected one of `binary`, `image`, `args`, `env`, `files`
            ---
            Spec app.toml: TOML parse error at line 1, column 8
              |
            1 | name = "Hello"
              |        ^^^^^^^
            the name `Hello` may only hold lowercase ASCII letters, digits and `-`
            ---
            Spec app.toml: TOML parse error at line 4, column 10
              |
            4 | memory = "1.5GiB"
              |          ^^^^^^^^
            Invalid size "1.5GiB": fractions are not supported; use a smaller unit, such as 1536MiB for 1.5GiB
            ---
            Spec app.toml: TOML parse error at line 4, column 15
              |
            4 | host_ports = [0]
              |               ^
            `0` is not a port (1 to 65535)
            ---
            Spec app.toml: TOML parse error at line 4, column 11
              |
            4 | publish = ["8080"]
              |           ^^^^^^^^
            `8080` is not HOST_PORT:GUEST_PORT, such as "8080:80"
            ---
            Spec app.toml: TOML parse error at line 4, column 11
              |
            4 | publish = ["sctp/1:2"]
              |           ^^^^^^^^^^^^
            unknown protocol `sctp`: use tcp or udp
            ---
            Spec app.toml: network: Firewall spec is invalid: host port tcp/80 is published more than once
            ---
            Spec app.toml: resources.gpu.policy is "required" but resources.gpu.count is 0
            ---
            Spec app.toml: service.env: Invalid environment variable name "1X": it must start with a letter or `_`
            ---
            Spec app.toml: service.files: Invalid service disk tree name "../up": it must be a single name, without `/`
            ---
            Spec app.toml: TOML parse error at line 4, column 8
              |
            4 | vfio = ["01:00.0"]
              |        ^^^^^^^^^^^
            `01:00.0` is not a PCI address such as "0000:01:00.0"
            ---
            Spec app.toml: TOML parse error at line 4, column 11
              |
            4 | backend = "firecracker"
              |           ^^^^^^^^^^^^^
            unknown variant `firecracker`, expected one of `auto`, `cloud-hypervisor`, `qemu`
            ---
            Spec app.toml: error at line 1, column 1
              |
            1 | name = "a"
              | ^
            the spec has neither a [service] table nor [[container]] entries
            ---
            Spec app.toml: service.env.U points at host port 7001, which network.host_ports does not allow
            ---
            Spec app.toml: TOML parse error at line 4, column 11
              |
            4 | cmdline = "quiet kiln.grace=soon"
              |           ^^^^^^^^^^^^^^^^^^^^^^^
            `kiln.grace=soon` is not a grace period: use whole seconds from 0 to 86400
            ---
            Spec app.toml: TOML parse error at line 4, column 11
              |
            4 | cmdline = "kiln.grace=1 kiln.grace=2"
              |           ^^^^^^^^^^^^^^^^^^^^^^^^^^^
            `kiln.grace=` appears more than once; give the grace period once
            ---
            Spec app.toml: TOML parse error at line 4, column 11
              |
            4 | cmdline = "kiln.grace=86401"
              |           ^^^^^^^^^^^^^^^^^^
            `kiln.grace=86401` is not a grace period: use whole seconds from 0 to 86400
            ---
            Spec app.toml: resources.storage_seed fills the data disk, but resources.storage (its size) is not set
            ---
            Spec app.toml: resources.storage must be at least 8MiB: the data disk is journaled ext4
            ---
            Spec app.toml: service.binary and service.image are both set: set vm.uses = "binary" or "image" to say which one the VM runs (a Pod always runs the image)
            ---
            Spec app.toml: vm.uses is "binary" but service.binary is not set
            ---
            Spec app.toml: vm.uses is "image" but service.image is not set
            ---
            Spec app.toml: TOML parse error at line 5, column 8
              |
            5 | uses = "both"
              |        ^^^^^^
            unknown variant `both`, expected `binary` or `image`
            ---
        "#]]
        .assert_eq(&actual);
    }

    #[test]
    fn a_vm_runs_the_image_alone_the_binary_alone_or_the_one_vm_uses_names() {
        let program = |text: &str| {
            let spec = Spec::parse(&format!("name = \"a\"\n{text}"), Path::new("/s/a.toml")).unwrap();
            format!("{:?}", spec.vm_program())
        };
        let binary_and_image = "[service]\nbinary = \"b\"\nimage = \"oci:img:1\"\n";
        let actual = [
            program("[service]\nimage = \"oci:img:1\"\n"),
            program("[service]\nbinary = \"b\"\n"),
            program(&format!("{binary_and_image}[vm]\nuses = \"image\"\n")),
            program(&format!("{binary_and_image}[vm]\nuses = \"binary\"\n")),
            program("[service]\n"),
            program("[service]\nimage = \"oci:/abs/img\"\n"),
            program("[service]\nimage = \"docker-archive:save.tar\"\n"),
            program("[service]\nimage = \"registry.example/x:1\"\n"),
        ]
        .join("\n");
        expect![[r#"
            Some(Image("oci:/s/img:1"))
            Some(Binary("/s/b"))
            Some(Image("oci:/s/img:1"))
            Some(Binary("/s/b"))
            None
            Some(Image("oci:/abs/img"))
            Some(Image("docker-archive:/s/save.tar"))
            Some(Image("registry.example/x:1"))"#]]
        .assert_eq(&actual);
    }

    #[test]
    fn the_example_spec_and_the_docs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let example = Spec::load(&root.join("examples/hello/kiln.toml")).unwrap();
        assert_eq!(example.name.as_str(), "hello");
        assert!(example.service.files["keystore"].secret);
        assert_eq!(example.guest_env(Ipv4Addr::new(10, 1, 0, 1))["RPC_URL"], "http://10.1.0.1:7000/rpc");
        // The annotated example in docs/spec.md is a valid spec too.
        let docs = std::fs::read_to_string(root.join("docs/spec.md")).unwrap();
        let toml = docs.split("```toml\n").nth(1).and_then(|rest| rest.split("```").next()).unwrap();
        let spec = Spec::parse(toml, &root.join("docs/spec.toml")).unwrap();
        assert_eq!(spec.firewall().published_ports.len(), 2);
    }
}
