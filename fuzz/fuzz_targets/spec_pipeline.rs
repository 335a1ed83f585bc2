//! Hostile text through everything kiln reads from a user before a VM or
//! a Pod exists: the spec (`Spec::parse`), the operator's Kubernetes
//! defaults (`ClusterDefaults::parse`), the spec → Workload conversion and
//! kiln-k8s's `render`. Each step must answer `Ok` or `Err`, never panic;
//! whatever renders must serialize as YAML, and every object name it
//! emits must be a DNS label.
//!
//! The pod form (`Spec::pod`) is read too; `fuzz/seeds/spec_pipeline/pod`
//! is the three-container example.
//!
//! The input is `SPEC \0 DEFAULTS`. `service.files` is cleared before the
//! conversion so the fuzzer never reads the host's files.
#![no_main]

use std::path::Path;

use kiln::{ClusterDefaults, Spec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (spec_text, defaults_text) = text.split_once('\0').unwrap_or((text, ""));
    let Ok(mut spec) = Spec::parse(spec_text, Path::new("/fuzz/kiln.toml")) else { return };
    let _ = spec.guest_env(std::net::Ipv4Addr::new(10, 0, 0, 1));
    let _ = spec.pod();
    spec.service.files.clear();
    let Ok(converted) = kiln::workload(&spec) else { return };
    let Ok(defaults) = ClusterDefaults::parse(defaults_text, Path::new("/fuzz/defaults.toml")) else { return };
    let mut target = defaults.target();
    target.runtime_classes = vec!["kata".to_owned()];
    let Ok(manifests) = kiln_k8s::render(&converted.workload, &target) else { return };
    manifests.to_yaml().expect("rendered manifests serialize as YAML");
    for object in manifests.objects() {
        let described = object.describe();
        let name = described.split_once('/').map_or("", |(_, name)| name);
        assert!(kiln_k8s::is_dns_label(name), "{described} is not a DNS label");
    }
});
