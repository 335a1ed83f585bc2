//! The Pod's volumes: file mounts as Secrets, ConfigMaps or hostPaths, the
//! data volume, and the scratch `/tmp` a read-only root needs.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, EmptyDirVolumeSource, HostPathVolumeSource, Secret, SecretVolumeSource, Volume,
    VolumeMount,
};

use super::checks::{check_file_key, check_mount_path};
use super::{Context, MAX_INLINE_BYTES, memory_quantity};
use crate::Result;
use crate::input::{DataVolume, Mount};
use crate::names::{derived, instance_label};

/// The volumes, their mounts in the container, and the objects behind them.
#[derive(Default)]
pub(super) struct Volumes {
    /// Secrets backing secret file mounts.
    pub(super) secrets: Vec<Secret>,
    /// ConfigMaps backing other file mounts.
    pub(super) config_maps: Vec<ConfigMap>,
    /// The Pod's volumes.
    pub(super) volumes: Vec<Volume>,
    /// The container's mounts of them (in the pod form, only the scratch
    /// `/tmp`, which every container without a mount there gets).
    pub(super) mounts: Vec<VolumeMount>,
    /// Volume names taken so far.
    names: BTreeSet<String>,
    /// Mount paths taken so far (without trailing `/`).
    paths: BTreeSet<String>,
}

/// Every volume of the workload, checked: names and paths unique, paths
/// absolute and normalised, inline trees within [`MAX_INLINE_BYTES`].
pub(super) fn volumes(cx: &Context<'_>, warnings: &mut Vec<String>) -> Result<Volumes> {
    let mut out = Volumes::default();
    if cx.workload.containers.is_empty() {
        for mount in &cx.workload.mounts {
            out.add_mount(cx, mount, warnings)?;
        }
        if let Some(data) = &cx.workload.data_volume {
            out.add_data(cx, data)?;
        }
    }
    for shared in &cx.workload.volumes {
        // Mounted per container (see `pod::pod_form_containers`).
        out.names.insert(shared.name.clone());
        out.volumes.push(Volume {
            name: shared.name.clone(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: shared.memory.then(|| "Memory".to_owned()),
                size_limit: shared.size_limit.map(memory_quantity),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    if !cx.options.security.writable_root_filesystem && !out.paths.contains("/tmp") && !out.names.contains("tmp") {
        // A read-only root still needs somewhere to write scratch files.
        out.volumes.push(Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
        out.mounts.push(VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        });
    }
    Ok(out)
}

impl Volumes {
    fn add_mount(&mut self, cx: &Context<'_>, mount: &Mount, warnings: &mut Vec<String>) -> Result<()> {
        let volume_name =
            instance_label(&mount.name, 0).map_err(|err| cx.invalid(format!("mount `{}`: {err}", mount.name)))?;
        if !self.names.insert(volume_name.clone()) {
            return Err(cx.invalid(format!("mount `{}` is given twice", mount.name)));
        }
        check_mount_path(&mount.mount_path).map_err(|why| cx.invalid(format!("mount `{}`: {why}", mount.name)))?;
        if !self.paths.insert(mount.mount_path.trim_end_matches('/').to_owned()) {
            return Err(cx.invalid(format!("two mounts at `{}`", mount.mount_path)));
        }
        let object_name = derived(&cx.instance, &volume_name);
        let mut volume = Volume { name: volume_name.clone(), ..Volume::default() };
        match &mount.source {
            crate::MountSource::Files { files, secret } => {
                self.add_files(cx, mount, files, *secret, object_name, &mut volume)?;
            }
            crate::MountSource::HostPath(path) => {
                check_mount_path(path).map_err(|why| cx.invalid(format!("mount `{}`: host path {why}", mount.name)))?;
                volume.host_path =
                    Some(HostPathVolumeSource { path: path.clone(), type_: Some("Directory".to_owned()) });
                warnings.push(format!(
                    "mount `{}` is the node's directory `{path}`: the Pod only works on nodes that have it",
                    mount.name
                ));
            }
        }
        self.volumes.push(volume);
        self.mounts.push(VolumeMount {
            name: volume_name,
            mount_path: mount.mount_path.clone(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        Ok(())
    }

    /// Files carried in the manifests: a Secret (mode 0400) or a ConfigMap
    /// (mode 0444, text as `data`, the rest as `binaryData`).
    fn add_files(
        &mut self,
        cx: &Context<'_>,
        mount: &Mount,
        files: &BTreeMap<String, Vec<u8>>,
        secret: bool,
        object_name: String,
        volume: &mut Volume,
    ) -> Result<()> {
        for file in files.keys() {
            check_file_key(file).map_err(|why| cx.invalid(format!("mount `{}`: file `{file}` {why}", mount.name)))?;
        }
        let total: usize = files.values().map(Vec::len).sum();
        if total > MAX_INLINE_BYTES {
            return Err(cx.invalid(format!(
                "mount `{}` holds {total} bytes, more than the {MAX_INLINE_BYTES} a {} can; mount it from the node instead",
                mount.name,
                if secret { "Secret" } else { "ConfigMap" }
            )));
        }
        if secret {
            self.secrets.push(Secret {
                metadata: cx.meta(object_name.clone()),
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
            let (text, binary): (BTreeMap<_, _>, BTreeMap<_, _>) =
                files.iter().map(|(k, v)| (k.clone(), v.clone())).partition(|(_, v)| std::str::from_utf8(v).is_ok());
            let text: BTreeMap<String, String> =
                text.into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned())).collect();
            let binary: BTreeMap<String, ByteString> = binary.into_iter().map(|(k, v)| (k, ByteString(v))).collect();
            self.config_maps.push(ConfigMap {
                metadata: cx.meta(object_name.clone()),
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
        Ok(())
    }

    /// The writable data volume: an `emptyDir` with a size limit.
    fn add_data(&mut self, cx: &Context<'_>, data: &DataVolume) -> Result<()> {
        check_mount_path(&data.mount_path).map_err(|why| cx.invalid(format!("data volume: {why}")))?;
        if data.size_bytes == 0 {
            return Err(cx.invalid("data volume of 0 bytes".to_owned()));
        }
        if !self.names.insert("data".to_owned()) || !self.paths.insert(data.mount_path.trim_end_matches('/').to_owned())
        {
            return Err(
                cx.invalid(format!("the data volume clashes with a mount named `data` or at `{}`", data.mount_path))
            );
        }
        self.volumes.push(Volume {
            name: "data".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(memory_quantity(data.size_bytes)),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        });
        self.mounts.push(VolumeMount {
            name: "data".to_owned(),
            mount_path: data.mount_path.clone(),
            ..VolumeMount::default()
        });
        Ok(())
    }
}
