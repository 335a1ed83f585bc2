//! The pod form of the spec through the real binary: `kiln render --target
//! k8s` of the three-container example (validated with
//! `kubernetes-validate --strict`), and `kiln run` refusing a pod, which it
//! does not run in a VM yet.

use std::process::Command;

use crate::support::{assert_error, repo_root};

#[cfg(feature = "k8s")]
#[test]
fn the_three_container_pod_example_renders_as_one_valid_pod() {
    use crate::support::{assert_success, kiln};

    let example = repo_root().join("examples/pod/kiln.toml");
    let output = kiln(["render", "--target", "k8s", example.to_str().unwrap()]);
    let yaml = assert_success(&output);
    kiln_testkit::assert_k8s_valid(&yaml, kiln_k8s::KUBERNETES_VERSION);
    assert!(yaml.contains("initContainers:"), "the YAML the CLI printed has the init container:\n{yaml}");
    // The structure, from the same render in-process.
    let spec = kiln::Spec::load(&example).unwrap();
    let manifests = kiln_k8s::render(&kiln::workload(&spec).unwrap().workload, &kiln_k8s::Target::default()).unwrap();
    let items: Vec<serde_json::Value> = manifests.objects().into_iter().map(|object| object.to_json()).collect();
    let pods: Vec<&serde_json::Value> = items.iter().filter(|o| o["kind"] == "Pod").collect();
    assert_eq!(pods.len(), 1, "one Pod for the whole pod");
    let spec = &pods[0]["spec"];
    let names = |key: &str| -> Vec<String> {
        spec[key].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names("initContainers"), ["prepare"]);
    assert_eq!(names("containers"), ["producer", "consumer"]);
    assert_eq!(spec["restartPolicy"], "Never");
    let volumes = spec["volumes"].as_array().unwrap();
    assert_eq!(volumes[0]["emptyDir"], serde_json::json!({ "sizeLimit": "16Mi" }));
    assert_eq!(volumes[1]["emptyDir"], serde_json::json!({ "medium": "Memory", "sizeLimit": "8Mi" }));
    let consumer = &spec["containers"][1];
    assert_eq!(consumer["securityContext"]["runAsUser"], 1000);
    assert_eq!(consumer["workingDir"], "/seed");
    assert_eq!(
        consumer["volumeMounts"][0],
        serde_json::json!({ "name": "seed", "mountPath": "/seed", "readOnly": true })
    );
    assert_eq!(consumer["ports"][0]["containerPort"], 8080);
    assert!(items.iter().any(|o| o["kind"] == "NetworkPolicy"), "the pod keeps its NetworkPolicy");
}

#[test]
fn kiln_run_of_a_pod_fails_naming_the_spec_and_writes_no_state() {
    let state = tempfile::tempdir().unwrap();
    let example = repo_root().join("examples/pod/kiln.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("run")
        .arg(&example)
        .env("KILN_STATE_DIR", state.path().join("state"))
        .output()
        .unwrap();
    assert_error(&output, 1, "is not yet run in a VM");
    assert!(String::from_utf8_lossy(&output.stderr).contains(example.to_str().unwrap()), "names the spec");
    assert!(!state.path().join("state").join("vms").exists(), "no VM state is written");
}

#[test]
fn kiln_render_for_a_vm_of_a_pod_fails_naming_the_spec() {
    let example = repo_root().join("examples/pod/kiln.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["render", "--target", "vm", "--vmm", "qemu"])
        .arg(&example)
        .env("KILN_STATE_DIR", tempfile::tempdir().unwrap().path().join("state"))
        .output()
        .unwrap();
    assert_error(&output, 1, "is not yet run in a VM");
    assert!(String::from_utf8_lossy(&output.stderr).contains(example.to_str().unwrap()), "names the spec");
}
