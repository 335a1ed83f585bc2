//! The schema check itself (`kiln_testkit::assert_k8s_valid`), guarded:
//! if it stopped being strict, every other schema check would pass vacuously.

use std::io::Write;
use std::process::{Command, Stdio};

use kiln_k8s::KUBERNETES_VERSION;
use kiln_testkit::kubernetes_validate as tool;

/// Validates `yaml` against Kubernetes [`KUBERNETES_VERSION`]; panics when it does not.
pub(crate) fn assert_valid(yaml: &str) {
    kiln_testkit::assert_k8s_valid(yaml, KUBERNETES_VERSION);
}

#[test]
fn the_validator_rejects_an_unknown_field() {
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
