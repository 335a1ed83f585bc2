//! kiln-k8s's integration tests: the builders (expect-tests, every rendered
//! manifest checked by `kubernetes-validate` against the Kubernetes 1.37
//! OpenAPI schema), status interpretation, and the client against a fake
//! API server (kube-rs's `tower_test` mock; no real cluster runs here).

mod fake_apiserver;
mod render;
mod status;
mod validate;

/// An error and its causes, one per line, as the `kiln` binary prints them.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n   caused by: {cause}"));
        source = cause.source();
    }
    text
}

/// `base` with some public fields set: kiln-k8s's input structs are
/// `#[non_exhaustive]`, so tests cannot build them with a struct literal.
pub(crate) fn with<T>(mut base: T, set: impl FnOnce(&mut T)) -> T {
    set(&mut base);
    base
}
