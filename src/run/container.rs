//! The container a VM of an OCI image runs: the image's runtime config and
//! the spec combined into kiln-guest's [`ContainerConfig`], as `docker run
//! IMAGE ARGS... -e NAME=VALUE` combines them. Pure; the image store's side
//! is in [`super::oci`].

use kiln_guest::{ContainerConfig, FilesMount, StopSignal, UpperKind, combine_argv, merge_env};

use crate::state::LeaseInfo;
use crate::{Error, Result, Spec};

/// What of an image's config a container runs with (OCI image-spec
/// `config.config`: `Entrypoint`, `Cmd`, `Env`, `WorkingDir`, `User`,
/// `StopSignal`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ImageRuntime {
    pub(crate) entrypoint: Vec<String>,
    pub(crate) cmd: Vec<String>,
    /// `NAME=VALUE` entries.
    pub(crate) env: Vec<String>,
    /// Empty: `/`.
    pub(crate) working_dir: String,
    /// Empty: root.
    pub(crate) user: String,
    /// As the image wrote it; empty: SIGTERM.
    pub(crate) stop_signal: String,
}

/// Where the container's writes go when the spec has a data disk: a
/// directory of its own per image (by manifest digest), so an image of
/// another version starts from its own clean upper layer.
pub(crate) fn data_disk_upper(manifest_hex: &str) -> String {
    format!(".kiln-upper/{}", &manifest_hex[..manifest_hex.len().min(16)])
}

/// The container config of `spec` running `image` (manifest digest
/// `manifest_hex`) on `layers` layer disks: the spec's `args` replace the
/// image's cmd (its entrypoint stays), the spec's `env` (loopback URLs
/// rewritten for the guest) is merged on top of the image's, the image's
/// working directory, user and stop signal are kept (a stop signal Docker
/// would refuse is refused, naming the image), the upper layer is a tmpfs or, with
/// `resources.storage`, a directory on the data disk, and each `files`
/// tree is mounted read-only at `/srv/NAME`, the path it has in a Pod.
pub(crate) fn container_config(
    spec: &Spec,
    image: &ImageRuntime,
    manifest_hex: &str,
    layers: u32,
    lease: &LeaseInfo,
) -> Result<ContainerConfig> {
    let args = (!spec.service.args.is_empty()).then_some(spec.service.args.as_slice());
    let argv = combine_argv(&image.entrypoint, &image.cmd, args);
    let mut config = ContainerConfig::new(layers, argv);
    let spec_env: Vec<(String, String)> = spec.guest_env(lease.host).into_iter().collect();
    config.env = merge_env(&image.env, &spec_env);
    if !image.working_dir.is_empty() {
        config.workdir = image.working_dir.clone();
    }
    config.user = image.user.clone();
    if !image.stop_signal.is_empty() {
        config.stop_signal = StopSignal::parse(&image.stop_signal)
            .map_err(|source| Error::ContainerConfig { image: image_name(spec), source })?;
    }
    if spec.resources.storage.is_some() {
        config.upper = UpperKind::DataDisk { dir: data_disk_upper(manifest_hex) };
    }
    config.hostname = Some(spec.name.as_str().to_owned());
    config.files =
        spec.service.files.keys().map(|name| FilesMount { name: name.clone(), path: format!("/srv/{name}") }).collect();
    config.validate().map_err(|source| Error::ContainerConfig { image: image_name(spec), source })?;
    Ok(config)
}

fn image_name(spec: &Spec) -> String {
    spec.service.image.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use expect_test::{Expect, expect};

    use super::*;

    fn check(spec_tail: &str, image: &ImageRuntime, expected: Expect) {
        let text = format!("name = \"web\"\n[service]\nimage = \"oci:img\"\n{spec_tail}");
        let spec = Spec::parse(&text, Path::new("/s/web.toml")).unwrap();
        let lease = LeaseInfo { host: [10, 9, 0, 1].into(), guest: [10, 9, 0, 2].into(), prefix_len: 30 };
        let actual = match container_config(&spec, image, "0123456789abcdef0123", 2, &lease) {
            Ok(config) => config.to_text().unwrap(),
            Err(err) => {
                let cause = std::error::Error::source(&err).map(|cause| format!(": {cause}")).unwrap_or_default();
                format!("error: {err}{cause}")
            }
        };
        expected.assert_eq(&actual);
    }

    fn busybox() -> ImageRuntime {
        ImageRuntime {
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo hi".into()],
            env: vec!["PATH=/bin".into(), "MODE=image".into()],
            working_dir: "/work".into(),
            user: "app:app".into(),
            stop_signal: String::new(),
        }
    }

    #[test]
    fn the_containers_config_is_the_images_with_the_specs_args_replacing_cmd_and_env_merged_on_top() {
        check(
            "args = [\"echo from spec\"]\nenv = { MODE = \"spec\", RPC = \"http://127.0.0.1:7000/x\" }\n[network]\nhost_ports = [7000]\n",
            &busybox(),
            expect![[r#"
                kiln-container 1
                layers 2
                arg /bin/sh
                arg -c
                arg echo\x20from\x20spec
                env PATH=/bin
                env MODE=spec
                env RPC=http://10.9.0.1:7000/x
                workdir /work
                user app:app
                upper tmpfs
                hostname web
            "#]],
        );
        // No args: the image's cmd; no working dir: `/`; a data disk holds
        // the upper layer; the image's stop signal, by number.
        check(
            "files = { conf = { path = \"conf\" } }\n[resources]\nstorage = \"64MiB\"\n",
            &ImageRuntime {
                working_dir: String::new(),
                user: String::new(),
                stop_signal: "sigquit".into(),
                ..busybox()
            },
            expect![[r#"
                kiln-container 1
                layers 2
                arg /bin/sh
                arg -c
                arg echo\x20hi
                env PATH=/bin
                env MODE=image
                workdir /
                upper data .kiln-upper/0123456789abcdef
                hostname web
                files conf /srv/conf
                stopsignal 3
            "#]],
        );
    }

    #[test]
    fn an_image_stop_signal_docker_would_refuse_is_refused_naming_the_image_and_the_value() {
        check(
            "",
            &ImageRuntime { stop_signal: "SIGNOPE".into(), ..busybox() },
            expect![[
                r#"error: Image oci:/s/img cannot run in a VM: Stop signal "SIGNOPE" is not a signal: a name (SIGQUIT, QUIT, quit, SIGRTMIN+3) or a number from 1 to 64"#
            ]],
        );
    }

    #[test]
    fn an_image_with_nothing_to_run_is_refused_naming_the_image() {
        check(
            "",
            &ImageRuntime::default(),
            expect![
                "error: Image oci:/s/img cannot run in a VM: Invalid container config: no program to run: the image has no entrypoint or cmd and the spec no args"
            ],
        );
    }
}
