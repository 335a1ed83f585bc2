//! `kubernetes-validate` (PyPI), the schema check every rendered manifest
//! must pass. `cargo xtask test` installs it into a venv at
//! `target/k8s-validate` and puts it on PATH; a bare `cargo test` finds it
//! there too, or on PATH, or skips.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const TOOL: &str = "kubernetes-validate";

/// The validator, or `None` (after reporting the skip) when it is missing
/// and tools are not required.
pub fn kubernetes_validate() -> Option<PathBuf> {
    if let Some(found) = crate::find_tool(TOOL) {
        return Some(found);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"), PathBuf::from);
    let installed = target.join("k8s-validate/bin").join(TOOL);
    if installed.is_file() {
        return Some(installed);
    }
    crate::require_tool(&crate::current_test_name(), TOOL)
}

/// Validates a multi-document YAML stream strictly (unknown fields are
/// errors) against Kubernetes `version` (`1.37`). Panics with the tool's
/// report when a document does not validate; returns quietly (having
/// reported the skip) when the tool is missing and not required.
pub fn assert_k8s_valid(yaml: &str, version: &str) {
    let Some(tool) = kubernetes_validate() else { return };
    let mut child = Command::new(&tool)
        .args(["--strict", "--quiet", "--kubernetes-version", &format!("{version}.0"), "-"])
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

/// Scripted answers of a FAKE Kubernetes API server (kiln-k8s's
/// `tower_test` mock and the CLI tests' HTTP server share them): no real
/// API server runs in kiln's tests.
pub mod fake_apiserver {
    use serde_json::{Value, json};

    /// One scripted reply: a status code and a JSON body, plain text, or
    /// `Echo` to send the request's body back (what server-side apply answers).
    #[derive(Debug, Clone)]
    pub enum Reply {
        /// A JSON body with this status.
        Json(u16, Value),
        /// A plain-text body (logs) with this status.
        Text(u16, &'static str),
        /// 200 with the request's own body.
        Echo,
    }

    impl Reply {
        /// The status, content type and body to answer `request_body` with.
        pub fn answer(&self, request_body: &[u8]) -> (u16, &'static str, Vec<u8>) {
            match self {
                Reply::Json(code, value) => (*code, "application/json", value.to_string().into_bytes()),
                Reply::Text(code, text) => (*code, "text/plain", text.as_bytes().to_vec()),
                Reply::Echo => (200, "application/json", request_body.to_vec()),
            }
        }
    }

    /// A `Status` failure, as the API server sends it.
    pub fn failure(code: u16, reason: &str, message: &str) -> Reply {
        Reply::Json(
            code,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": message, "reason": reason, "code": code}),
        )
    }

    /// A `<kind>List` of `items`.
    pub fn list(kind: &str, items: Vec<Value>) -> Reply {
        Reply::Json(200, json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {}, "items": items}))
    }

    /// An object of kiln's (`managed-by=kiln`, `kiln.dev/instance=instance`),
    /// with the UID [`uid`] gives it.
    pub fn labelled(kind: &str, api_version: &str, name: &str, namespace: &str, instance: &str) -> Value {
        let mut object = unlabelled(kind, api_version, name, namespace);
        object["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": "kiln", "kiln.dev/instance": instance});
        object
    }

    /// An object that is not kiln's: no labels at all (add some to
    /// `["metadata"]["labels"]`), with the UID [`uid`] gives it.
    pub fn unlabelled(kind: &str, api_version: &str, name: &str, namespace: &str) -> Value {
        json!({"apiVersion": api_version, "kind": kind,
               "metadata": {"name": name, "namespace": namespace, "uid": uid(kind, name)}})
    }

    /// The fake's UID of object `kind/name`: fixed, so transcripts can show
    /// delete preconditions.
    pub fn uid(kind: &str, name: &str) -> String {
        format!("uid-{}-{name}", kind.to_ascii_lowercase())
    }

    /// kiln's Pod `name` in `namespace`, with `status`.
    pub fn pod(name: &str, namespace: &str, status: Value) -> Value {
        let mut pod = labelled("Pod", "v1", name, namespace, name);
        pod["spec"] = json!({"containers": [{"name": "service", "image": "x"}]});
        pod["status"] = status;
        pod
    }

    /// One transcript line for a request: `VERB /path?query [content type]`
    /// and the JSON body, inline when short, else as `<Kind/name body #N>`
    /// (N indexes `bodies`, to which the body is appended).
    pub fn transcript_line(
        method: &str,
        uri: &str,
        content_type: Option<&str>,
        body: &[u8],
        bodies: &mut Vec<Value>,
    ) -> String {
        let mut line = format!("{method} {uri}");
        if let Some(content_type) = content_type {
            line.push_str(&format!(" [{content_type}]"));
        }
        if !body.is_empty() {
            let value: Value = serde_json::from_slice(body).expect("request body is JSON");
            let text = value.to_string();
            if text.len() <= 160 {
                line.push_str(&format!(" {text}"));
            } else {
                line.push_str(&format!(
                    " <{}/{} body #{}>",
                    value["kind"].as_str().unwrap_or("?"),
                    value["metadata"]["name"].as_str().unwrap_or("?"),
                    bodies.len()
                ));
            }
            bodies.push(value);
        }
        line
    }
}
