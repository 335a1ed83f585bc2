//! The launch script under a real `/bin/sh` (dash on Debian): every
//! argument and environment value must reach the program byte for byte.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use kiln::LaunchScript;
use proptest::prelude::*;

/// Bytes sh would love to interpret, weighted well above the rest.
const AWKWARD_BYTES: &[u8] = b"'\"$`\\\n\r\t *?[]!;&|<>(){}~#=%^-\x01\x1b\x7f\x80\xc3\xa9\xff";

fn byte_string() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        3 => prop::sample::select(AWKWARD_BYTES),
        1 => 1u8..=255,
    ];
    prop_oneof![
        4 => prop::collection::vec(byte, 0..24),
        // Whole fragments that only stay inert if quoting is right.
        1 => prop::sample::select(vec!["'\\''", "$(id)", "${HOME}", "`id`", "'", "\\'", "\n'\n", "$'\\x41'", "-e"])
            .prop_map(|s| s.as_bytes().to_vec()),
    ]
}

fn env_name() -> impl Strategy<Value = String> {
    const FIRST: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_";
    const REST: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_0123456789";
    (prop::sample::select(FIRST), prop::collection::vec(prop::sample::select(REST), 0..10))
        .prop_map(|(first, rest)| std::iter::once(first).chain(rest).map(char::from).collect::<String>())
        // The shell's own variables are refused by LaunchScript; see its tests.
        .prop_filter("shell-owned name", |name| !["LINENO", "OPTIND", "PPID"].contains(&name.as_str()))
}

/// Writes `script` to a file in `dir` and runs it with `sh` in an empty
/// environment, returning its stdout.
fn run_script(sh: &Path, dir: &Path, script: &LaunchScript) -> Vec<u8> {
    let path = dir.join("launch");
    fs::write(&path, script.render().unwrap()).unwrap();
    let output = Command::new(sh).arg(&path).env_clear().output().unwrap();
    assert!(output.status.success(), "sh failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr));
    assert!(output.stderr.is_empty(), "sh complained: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

fn split_nul_terminated(bytes: &[u8]) -> Vec<Vec<u8>> {
    assert!(bytes.is_empty() || bytes.ends_with(&[0]), "output must end with NUL: {bytes:?}");
    let mut items: Vec<Vec<u8>> = bytes.split(|&b| b == 0).map(<[u8]>::to_vec).collect();
    items.pop();
    items
}

fn parse_env(dump: &[u8]) -> BTreeMap<String, Vec<u8>> {
    split_nul_terminated(dump)
        .into_iter()
        .map(|entry| {
            let at = entry.iter().position(|&b| b == b'=').unwrap();
            (String::from_utf8(entry[..at].to_vec()).unwrap(), entry[at + 1..].to_vec())
        })
        .collect()
}

struct Tools {
    sh: std::path::PathBuf,
    printf: std::path::PathBuf,
    env: std::path::PathBuf,
}

fn tools(test: &str) -> Option<Tools> {
    let found = kiln_testkit::require_tools(test, &["/bin/sh", "printf", "env"])?;
    let [sh, printf, env] = <[_; 3]>::try_from(found).unwrap();
    Some(Tools { sh, printf, env })
}

/// Checks one script: args through printf, env through `env -0`.
fn check_round_trip(tools: &Tools, args: Vec<Vec<u8>>, env: Vec<(String, Vec<u8>)>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();

    // printf prints its format once even with no arguments; a leading
    // marker argument keeps "no arguments" distinguishable from one empty one.
    let mut printf_args = vec![b"%s\\0".to_vec(), b"marker".to_vec()];
    printf_args.extend(args.iter().cloned());
    let printed =
        LaunchScript { program: tools.printf.to_str().unwrap().to_owned(), args: printf_args, env: env.clone() };
    let mut received_args = split_nul_terminated(&run_script(&tools.sh, dir.path(), &printed));
    prop_assert_eq!(received_args.first().map(Vec::as_slice), Some(&b"marker"[..]));
    received_args.remove(0);
    prop_assert_eq!(&received_args, &args);

    let dumped =
        LaunchScript { program: tools.env.to_str().unwrap().to_owned(), args: vec![b"-0".to_vec()], env: env.clone() };
    let mut received_env = parse_env(&run_script(&tools.sh, dir.path(), &dumped));
    let expected_env: BTreeMap<String, Vec<u8>> = env.into_iter().collect();
    // dash exports PWD when the environment has none; it is the one variable
    // the shell may add, and it must not add or change anything else.
    if !expected_env.contains_key("PWD") {
        received_env.remove("PWD");
    }
    prop_assert_eq!(received_env, expected_env);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_reach_the_service_unchanged(
        args in prop::collection::vec(byte_string(), 0..6),
        env in prop::collection::btree_map(env_name(), byte_string(), 0..6),
    ) {
        let Some(tools) = tools("launch_sh::any_bytes_reach_the_service_unchanged") else { return Ok(()) };
        check_round_trip(&tools, args, env.into_iter().collect())?;
    }
}

#[test]
fn every_awkward_byte_at_once() {
    let Some(tools) = tools("launch_sh::every_awkward_byte_at_once") else {
        return;
    };
    let all_bytes: Vec<u8> = (1..=255).collect();
    let args = vec![all_bytes.clone(), Vec::new(), b"'".to_vec(), b"''".to_vec(), AWKWARD_BYTES.to_vec()];
    let env = vec![("ALL".to_owned(), all_bytes), ("EMPTY".to_owned(), Vec::new()), ("IFS".to_owned(), b"x".to_vec())];
    check_round_trip(&tools, args, env).unwrap();
}

/// The guest runs `launch` directly, so its `#!/bin/sh` line must work.
#[test]
fn runs_through_its_shebang() {
    let Some(tools) = tools("launch_sh::runs_through_its_shebang") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("launch");
    let script = LaunchScript {
        program: tools.printf.to_str().unwrap().to_owned(),
        args: vec![b"%s|%s".to_vec(), b"hello world".to_vec(), b"$GREETING".to_vec()],
        env: vec![("GREETING".to_owned(), b"loud".to_vec())],
    };
    fs::write(&path, script.render().unwrap()).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    let output = Command::new(&path).env_clear().output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8(output.stdout).unwrap(), "hello world|$GREETING");
}
