//! The syntax checks the API server would otherwise make halfway through
//! an apply: label and annotation keys, tolerations, object references,
//! mount paths and Secret or ConfigMap keys.

use kiln_types::syntax::is_dns_subdomain;

use crate::input::KubernetesOptions;

/// Label and annotation keys and values, selector values and object
/// references, checked here so a bad one is refused before anything is
/// sent rather than by the API server halfway through an apply.
pub(super) fn check_options(options: &KubernetesOptions) -> Result<(), String> {
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

/// An absolute, normalised path: no `..`, `.` or empty components.
pub(super) fn check_mount_path(path: &str) -> Result<(), String> {
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
pub(super) fn check_file_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key == "." || key == ".." || key.len() > 253 {
        return Err("is not a file name".to_owned());
    }
    match key.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        Some(bad) => Err(format!("has {bad:?}; file names may hold letters, digits, `-`, `_` and `.`")),
        None => Ok(()),
    }
}

/// The pod form's own rules: container and volume names DNS labels and
/// unique, images given, mounts of declared volumes at distinct, valid
/// paths, working directories absolute.
pub(super) fn check_pod_form(workload: &crate::Workload) -> Result<(), String> {
    use std::collections::BTreeSet;

    use kiln_types::syntax::{is_dns_label, is_image_reference};
    let mut volumes = BTreeSet::new();
    for volume in &workload.volumes {
        if !is_dns_label(&volume.name) {
            return Err(format!("volume name `{}` is not a DNS label", volume.name.escape_debug()));
        }
        if !volumes.insert(volume.name.as_str()) {
            return Err(format!("volume `{}` is declared twice", volume.name));
        }
    }
    let mut names = BTreeSet::new();
    for container in &workload.containers {
        let name = &container.name;
        if !is_dns_label(name) {
            return Err(format!("container name `{}` is not a DNS label", name.escape_debug()));
        }
        if !names.insert(name.as_str()) {
            return Err(format!("container `{name}` is declared twice"));
        }
        if !is_image_reference(&container.image) {
            return Err(format!(
                "container `{name}`: image `{}` is empty or holds whitespace",
                container.image.escape_debug()
            ));
        }
        if let Some(dir) = &container.working_dir
            && !dir.starts_with('/')
        {
            return Err(format!("container `{name}`: working directory `{}` is not absolute", dir.escape_debug()));
        }
        let mut paths = BTreeSet::new();
        for mount in &container.mounts {
            if !volumes.contains(mount.volume.as_str()) {
                return Err(format!("container `{name}` mounts volume `{}`, which is not declared", mount.volume));
            }
            check_mount_path(&mount.path).map_err(|why| format!("container `{name}`: mount {why}"))?;
            if !paths.insert(mount.path.trim_end_matches('/')) {
                return Err(format!("container `{name}` has two mounts at `{}`", mount.path));
            }
        }
    }
    if workload.containers.iter().all(|container| container.init) {
        return Err("the pod has no app container, only init containers".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use expect_test::expect;

    use crate::{PodContainer, SharedVolume, Target, VolumeMountSpec, Workload, render};

    fn pod_workload(edit: impl FnOnce(&mut Workload)) -> String {
        let mut workload = Workload::new("pod", "busybox:1");
        let mut app = PodContainer::new("app", "busybox:1");
        app.mounts = vec![VolumeMountSpec { volume: "feed".to_owned(), path: "/feed".to_owned(), read_only: false }];
        app.user = Some("1000".to_owned());
        workload.containers = vec![app];
        workload.volumes = vec![SharedVolume { name: "feed".to_owned(), memory: true, size_limit: None }];
        edit(&mut workload);
        match render(&workload, &Target::default()) {
            Ok(manifests) => format!("ok, warnings: {:?}\n", manifests.warnings),
            Err(err) => format!("{err}\n"),
        }
    }

    #[test]
    fn a_pod_form_workload_is_checked_before_it_renders() {
        let actual = [
            pod_workload(|_| {}),
            pod_workload(|w| w.containers[0].user = Some("nobody".to_owned())),
            pod_workload(|w| w.containers.push(PodContainer::new("app", "busybox:1"))),
            pod_workload(|w| w.containers[0].name = "App".to_owned()),
            pod_workload(|w| w.containers[0].mounts[0].volume = "food".to_owned()),
            pod_workload(|w| w.containers[0].mounts[0].path = "/feed/../etc".to_owned()),
            pod_workload(|w| w.containers[0].init = true),
            pod_workload(|w| w.containers[0].image = " ".to_owned()),
            pod_workload(|w| w.volumes.push(w.volumes[0].clone())),
        ]
        .concat();
        expect![[r#"
            ok, warnings: []
            ok, warnings: ["container `app`: user `nobody` is a name, which a Pod cannot express (runAsUser takes a number): the image's user runs"]
            workload `pod`: container `app` is declared twice
            workload `pod`: container name `App` is not a DNS label
            workload `pod`: container `app` mounts volume `food`, which is not declared
            workload `pod`: container `app`: mount `/feed/../etc` has an empty, `.` or `..` component
            workload `pod`: the pod has no app container, only init containers
            workload `pod`: container `app`: image ` ` is empty or holds whitespace
            workload `pod`: volume `feed` is declared twice
        "#]].assert_eq(&actual);
    }
}
