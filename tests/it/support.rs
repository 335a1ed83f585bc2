//! Running the `kiln` binary and checking what it left behind.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root, for the checked-in examples.
pub(crate) fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `kiln` with `args` in a clean, reproducible environment.
pub(crate) fn kiln<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("KILN_K8S_DEFAULTS")
        .env_remove("KUBECONFIG")
        .output()
        .unwrap()
}

/// Asserts that `kiln` failed the way bad input should: the given exit
/// status, nothing on stdout, exactly one `error:` line that mentions
/// `needle` (the thing at fault), and nothing at all left in `out_dir`.
pub(crate) fn assert_clean_failure(output: &Output, code: i32, needle: &str, out_dir: &Path) {
    assert_error(output, code, needle);
    let leftovers: Vec<PathBuf> = fs::read_dir(out_dir).unwrap().map(|entry| entry.unwrap().path()).collect();
    assert!(leftovers.is_empty(), "nothing may be left in the output directory: {leftovers:?}");
}

/// Asserts the exit status, an empty stdout, and a stderr that starts with
/// the one `error:` line, which mentions `needle`.
pub(crate) fn assert_error(output: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "exit status; stderr:\n{stderr}");
    assert!(output.stdout.is_empty(), "stdout should be empty: {}", String::from_utf8_lossy(&output.stdout));
    let error_lines: Vec<&str> = stderr.lines().filter(|line| line.starts_with("error:")).collect();
    assert_eq!(error_lines.len(), 1, "exactly one error line expected:\n{stderr}");
    assert!(stderr.starts_with("error:"), "stderr should start with the error:\n{stderr}");
    assert!(stderr.contains(needle), "the error should name {needle:?}:\n{stderr}");
}

/// Asserts success and returns stdout.
pub(crate) fn assert_success(output: &Output) -> String {
    assert!(output.status.success(), "kiln failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// Runs `kiln` with `args` (which include `--json`), asserts success and
/// returns the one JSON object it printed.
pub(crate) fn kiln_json<I, S>(args: I) -> serde_json::Map<String, serde_json::Value>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let stdout = assert_success(&kiln(args));
    assert_eq!(stdout.lines().count(), 1, "one line of JSON: {stdout}");
    match serde_json::from_str(&stdout).unwrap() {
        serde_json::Value::Object(object) => object,
        other => panic!("expected a JSON object, got {other}"),
    }
}

/// The keys of a JSON object, sorted.
pub(crate) fn keys(object: &serde_json::Map<String, serde_json::Value>) -> Vec<&str> {
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}
