//! `kubernetes-validate` (PyPI), the schema check every rendered manifest
//! must pass. `cargo xtask test` installs it into a venv at
//! `target/k8s-validate` and puts it on PATH; a bare `cargo test` finds it
//! there too, or on PATH, or skips.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_k8s::KUBERNETES_VERSION;

const TOOL: &str = "kubernetes-validate";

fn tool() -> Option<PathBuf> {
    if let Some(found) = kiln_testkit::find_tool(TOOL) {
        return Some(found);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"), PathBuf::from);
    let installed = target.join("k8s-validate/bin").join(TOOL);
    if installed.is_file() {
        return Some(installed);
    }
    kiln_testkit::require_tool(&kiln_testkit::current_test_name(), TOOL)
}

/// Validates a multi-document YAML stream strictly (unknown fields are
/// errors) against Kubernetes [`KUBERNETES_VERSION`]. Panics with the
/// tool's report when a document does not validate.
pub(crate) fn assert_valid(yaml: &str) {
    let Some(tool) = tool() else { return };
    let mut child = Command::new(&tool)
        .args(["--strict", "--quiet", "--kubernetes-version", &format!("{KUBERNETES_VERSION}.0"), "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", tool.display()));
    child.stdin.take().expect("stdin is piped").write_all(yaml.as_bytes()).expect("write manifests to the validator");
    let output = child.wait_with_output().expect("wait for the validator");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && !report.contains("ERROR"), "manifests do not validate:\n{report}\n---\n{yaml}");
}

#[test]
fn the_validator_rejects_an_unknown_field() {
    // Guards the guard: if the validator ever stopped being strict, every
    // other schema check would pass vacuously.
    let Some(tool) = tool() else { return };
    let mut child = Command::new(&tool)
        .args(["--strict", "--quiet", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubernetes-validate");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(
            b"apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec:\n  containers: [{name: a, image: b, bogus: 1}]\n",
        )
        .expect("write");
    let output = child.wait_with_output().expect("wait");
    assert!(!output.status.success(), "an unknown field passed strict validation");
    assert!(String::from_utf8_lossy(&output.stdout).contains("'bogus' was unexpected"));
}

#[test]
fn assert_valid_fails_on_an_invalid_manifest() {
    if tool().is_none() {
        return;
    }
    // A Service port must be an integer; the check must panic, not shrug.
    let invalid = "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  ports: [{port: eighty}]\n";
    let outcome = std::panic::catch_unwind(|| assert_valid(invalid));
    assert!(outcome.is_err(), "assert_valid accepted an invalid Service");
    assert_valid("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  ports: [{port: 80}]\n");
}
