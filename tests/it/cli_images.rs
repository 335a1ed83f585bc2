//! Happy paths: images the CLI builds are what was asked for, read back by
//! the `fatfs` crate, mtools and `fsck.fat`, and byte-identical when rebuilt.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln::LaunchScript;
use kiln_testkit::{Entry, Tree, fsck_fat_clean, inspect_fat_with_fatfs, read_fat_with_mtools, read_tree};

use crate::support::{assert_success, kiln, repo_root};

const JSON_KEYS: [&str; 14] = [
    "path",
    "format",
    "image_bytes",
    "file_bytes",
    "fat_type",
    "cluster_size",
    "clusters",
    "free_clusters",
    "files",
    "dirs",
    "data_bytes",
    "volume_id",
    "elapsed_ms",
    "mode",
];

fn keystore() -> PathBuf {
    repo_root().join("examples/hello/keystore")
}

fn cloud_init() -> PathBuf {
    repo_root().join("examples/hello/cloud-init")
}

/// Parses `--json` output: exactly one object with exactly the documented keys.
pub(crate) fn parse_report(stdout: &str, image: &Path) -> serde_json::Map<String, serde_json::Value> {
    assert_eq!(stdout.lines().count(), 1, "one line of JSON: {stdout}");
    let value: serde_json::Value = serde_json::from_str(stdout).unwrap();
    let object = value.as_object().unwrap().clone();
    let keys: BTreeSet<&str> = object.keys().map(String::as_str).collect();
    assert_eq!(keys, JSON_KEYS.into_iter().collect::<BTreeSet<_>>());
    assert_eq!(object["path"], image.to_str().unwrap());
    let file_bytes = fs::metadata(image).unwrap().len();
    assert_eq!(object["file_bytes"], file_bytes);
    if object["format"] == "raw" {
        assert_eq!(object["image_bytes"], file_bytes);
    } else {
        assert_eq!(object["format"], "qcow2");
    }
    let volume_id = object["volume_id"].as_str().unwrap();
    assert!(
        volume_id.len() == 9
            && volume_id.as_bytes()[4] == b'-'
            && volume_id.chars().filter(|&c| c != '-').all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase()),
        "volume_id like 1A2B-3C4D: {volume_id}"
    );
    object
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The host tree `dir` as it should appear in an image under `prefix`.
fn host_tree_under(dir: &Path, prefix: &str) -> Tree {
    let mut tree = Tree::new();
    tree.insert(prefix.to_owned(), Entry::Dir);
    for (path, entry) in read_tree(dir).unwrap() {
        tree.insert(format!("{prefix}/{path}"), entry);
    }
    tree
}

/// Checks an image with all three independent readers and returns its tree.
fn read_back_everywhere(image: &Path, label: &str) -> Tree {
    fsck_fat_clean(image).unwrap();
    let view = inspect_fat_with_fatfs(&fs::read(image).unwrap()).unwrap();
    assert_eq!(view.boot_label, label);
    if let Some(mtools_tree) = read_fat_with_mtools(image).unwrap() {
        assert_eq!(mtools_tree, view.tree, "mtools and fatfs disagree");
    }
    view.tree
}

fn service_disk_args(image: &Path, binary: &Path, secret: bool) -> Vec<OsString> {
    let tree_flag = if secret { "--secret-tree" } else { "--tree" };
    let mut args: Vec<OsString> = vec!["image".into(), "service-disk".into(), "-o".into(), image.into()];
    args.extend(["--binary".into(), binary.into()]);
    args.extend(["--arg".into(), "--greeting".into(), "--arg".into(), "it's $HOME".into()]);
    // Not UTF-8: must reach the script byte for byte.
    args.extend(["--arg".into(), OsString::from_vec(b"\xff\xfe".to_vec())]);
    args.extend(["--env".into(), "GREETING_STYLE=loud".into()]);
    args.extend(["--env".into(), OsString::from_vec(b"RAW=a=b\xc3\n".to_vec())]);
    args.extend([tree_flag.into(), format!("keystore={}", keystore().display()).into()]);
    args.extend(["--epoch".into(), "1700000000".into(), "--json".into()]);
    args
}

#[test]
fn service_disk_with_secret_keystore() {
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("hello-service");
    let binary_bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(&binary, &binary_bytes).unwrap();
    let image = dir.path().join("service.img");

    let stdout = assert_success(&kiln(service_disk_args(&image, &binary, true)));
    let report = parse_report(&stdout, &image);
    assert_eq!(report["mode"], "0600");
    assert_eq!(mode_of(&image), 0o600);
    let keystore_files = read_tree(&keystore()).unwrap().values().filter(|e| matches!(e, Entry::File(_))).count();
    assert!(keystore_files >= 2, "the example keystore has files");
    assert_eq!(report["files"], 2 + keystore_files as u64);
    assert_eq!(report["dirs"], 1);

    let mut expected = host_tree_under(&keystore(), "keystore");
    expected.insert("service".into(), Entry::File(binary_bytes));
    let launch = LaunchScript {
        args: vec![b"--greeting".to_vec(), b"it's $HOME".to_vec(), b"\xff\xfe".to_vec()],
        env: vec![("GREETING_STYLE".into(), b"loud".to_vec()), ("RAW".into(), b"a=b\xc3\n".to_vec())],
        ..LaunchScript::default()
    };
    expected.insert("launch".into(), Entry::File(launch.render().unwrap()));
    assert_eq!(read_back_everywhere(&image, "SERVICEDISK"), expected);
}

#[test]
fn service_disk_without_secrets_is_0644_and_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("bin");
    fs::write(&binary, b"\x7fELF not really").unwrap();
    let first = dir.path().join("first.img");
    let second = dir.path().join("second.img");

    let report = parse_report(&assert_success(&kiln(service_disk_args(&first, &binary, false))), &first);
    assert_eq!(report["mode"], "0644");
    assert_eq!(mode_of(&first), 0o644);
    assert_success(&kiln(service_disk_args(&second, &binary, false)));
    assert!(fs::read(&first).unwrap() == fs::read(&second).unwrap(), "same inputs, same bytes");
    read_back_everywhere(&first, "SERVICEDISK");
}

#[test]
fn cidata_seed() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("seed.img");
    let src = cloud_init();
    let arg = |name: &str| src.join(name).into_os_string();
    let args: Vec<OsString> = vec![
        "image".into(),
        "cidata".into(),
        "-o".into(),
        image.clone().into(),
        "--user-data".into(),
        arg("user-data"),
        "--meta-data".into(),
        arg("meta-data"),
        "--network-config".into(),
        arg("network-config"),
        "--json".into(),
    ];
    let report = parse_report(&assert_success(&kiln(&args)), &image);
    assert_eq!(report["mode"], "0644");
    assert_eq!(report["files"], 3);

    let expected: Tree = ["user-data", "meta-data", "network-config"]
        .into_iter()
        .map(|name| (name.to_owned(), Entry::File(fs::read(src.join(name)).unwrap())))
        .collect();
    assert_eq!(read_back_everywhere(&image, "CIDATA"), expected);

    // --epoch and SOURCE_DATE_EPOCH mean the same thing, and the epoch matters.
    let build = |name: &str, epoch_flag: Option<&str>, epoch_env: Option<&str>| {
        let out = dir.path().join(name);
        let mut args = args.clone();
        args[3] = out.clone().into();
        args.pop();
        if let Some(epoch) = epoch_flag {
            args.extend(["--epoch".into(), epoch.into()]);
        }
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args(&args).env_remove("SOURCE_DATE_EPOCH");
        if let Some(epoch) = epoch_env {
            command.env("SOURCE_DATE_EPOCH", epoch);
        }
        assert_success(&command.output().unwrap());
        fs::read(out).unwrap()
    };
    let from_flag = build("flag.img", Some("1700000000"), None);
    let from_env = build("env.img", None, Some("1700000000"));
    let flag_wins = build("both.img", Some("1700000000"), Some("5"));
    assert!(from_flag == from_env, "--epoch and SOURCE_DATE_EPOCH agree");
    assert!(from_flag == flag_wins, "--epoch overrides SOURCE_DATE_EPOCH");
    assert!(from_flag != fs::read(&image).unwrap(), "the epoch is stamped into the image");
}

#[test]
fn fat_sources_dir_file_and_dest() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("root");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/motd"), b"hello\n").unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    let single = dir.path().join("single.txt");
    fs::write(&single, b"one file\n").unwrap();
    // A host path that contains `=` is a path, not DEST=PATH.
    let with_equals = dir.path().join("a=b.txt");
    fs::write(&with_equals, b"equals\n").unwrap();
    let image = dir.path().join("out.img");

    let args: Vec<OsString> = vec![
        "image".into(),
        "fat".into(),
        "-o".into(),
        image.clone().into(),
        "--label".into(),
        "KILNTEST".into(),
        "--fat-type".into(),
        "16".into(),
        "--size".into(),
        "16MiB".into(),
        src.clone().into(),
        single.clone().into(),
        with_equals.clone().into(),
        format!("keystore={}", keystore().display()).into(),
        format!("nested/deeper/renamed.txt={}", single.display()).into(),
        "--json".into(),
    ];
    let report = parse_report(&assert_success(&kiln(&args)), &image);
    assert_eq!(report["fat_type"], "FAT16");
    assert_eq!(report["image_bytes"], 16 << 20);

    let mut expected = host_tree_under(&keystore(), "keystore");
    expected.insert("etc".into(), Entry::Dir);
    expected.insert("etc/motd".into(), Entry::File(b"hello\n".to_vec()));
    expected.insert("empty".into(), Entry::File(Vec::new()));
    expected.insert("single.txt".into(), Entry::File(b"one file\n".to_vec()));
    expected.insert("a=b.txt".into(), Entry::File(b"equals\n".to_vec()));
    expected.insert("nested".into(), Entry::Dir);
    expected.insert("nested/deeper".into(), Entry::Dir);
    expected.insert("nested/deeper/renamed.txt".into(), Entry::File(b"one file\n".to_vec()));
    assert_eq!(read_back_everywhere(&image, "KILNTEST"), expected);
}

#[test]
fn human_summary_without_json() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("plain.img");
    let stdout = assert_success(&kiln([
        "image".as_ref(),
        "fat".as_ref(),
        "-o".as_ref(),
        image.as_os_str(),
        keystore().as_os_str(),
    ]));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with(&format!("Wrote {}: FAT", image.display())), "{stdout}");
    assert!(stdout.contains("mode 0644"), "{stdout}");
}
