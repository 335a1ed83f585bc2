//! What every `kiln image ...` command that writes a file promises about
//! that file: it is private when anything that went into it is, and a
//! write that cannot complete (full filesystem, file size limit) is one
//! clear error with nothing left behind, never a truncated image.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_testkit::{current_test_name, is_root, report_skip, require_tool, tools_required};

use crate::support::{assert_error, assert_success};
use crate::tools::Noise;

/// Inputs for every command, in one directory; `private` makes one input
/// of each command unreadable by group and others.
struct Inputs {
    root: PathBuf,
}

impl Inputs {
    fn new(root: &Path, private: bool, data_bytes: usize) -> Inputs {
        let inputs = Inputs { root: root.to_path_buf() };
        let write = |name: &str, bytes: &[u8], mode: u32| {
            let path = root.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, bytes).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        };
        let secret_mode = if private { 0o600 } else { 0o644 };
        let data = Noise::new(1).bytes(data_bytes);
        write("tree/readme", b"public\n", 0o644);
        write("tree/data.bin", &data, 0o644);
        write("tree/etc/key", b"a key\n", secret_mode);
        write("user-data", &[b"#cloud-config\n".as_slice(), &data].concat(), secret_mode);
        write("meta-data", b"instance-id: i-1\n", 0o644);
        write("service", &data, if private { 0o700 } else { 0o755 });
        let mut raw = data.clone();
        raw.resize(data_bytes.next_multiple_of(512).max(512), 0);
        write("disk.raw", &raw, if private { 0o640 } else { 0o644 });
        inputs
    }

    fn path(&self, name: &str) -> OsString {
        self.root.join(name).into_os_string()
    }

    /// Every command that writes an image, as (name, arguments) with `OUT`
    /// standing for the output path.
    fn commands(&self) -> Vec<(&'static str, Vec<OsString>)> {
        let tree = self.path("tree");
        let mut tree_arg = OsString::from("t=");
        tree_arg.push(&tree);
        let o = |args: &[&OsStr]| args.iter().map(|a| a.to_os_string()).collect::<Vec<_>>();
        let (user_data, meta_data, service, raw) =
            (self.path("user-data"), self.path("meta-data"), self.path("service"), self.path("disk.raw"));
        vec![
            ("fat", o(&["image".as_ref(), "fat".as_ref(), "-o".as_ref(), "OUT".as_ref(), &tree])),
            (
                "fat --format qcow2",
                o(&[
                    "image".as_ref(),
                    "fat".as_ref(),
                    "--format".as_ref(),
                    "qcow2".as_ref(),
                    "-o".as_ref(),
                    "OUT".as_ref(),
                    &tree,
                ]),
            ),
            (
                "cidata",
                o(&[
                    "image".as_ref(),
                    "cidata".as_ref(),
                    "-o".as_ref(),
                    "OUT".as_ref(),
                    "--user-data".as_ref(),
                    &user_data,
                    "--meta-data".as_ref(),
                    &meta_data,
                ]),
            ),
            (
                "service-disk",
                o(&[
                    "image".as_ref(),
                    "service-disk".as_ref(),
                    "-o".as_ref(),
                    "OUT".as_ref(),
                    "--binary".as_ref(),
                    &service,
                    "--tree".as_ref(),
                    &tree_arg,
                ]),
            ),
            (
                "service-disk --format qcow2",
                o(&[
                    "image".as_ref(),
                    "service-disk".as_ref(),
                    "--format".as_ref(),
                    "qcow2".as_ref(),
                    "-o".as_ref(),
                    "OUT".as_ref(),
                    "--binary".as_ref(),
                    &service,
                ]),
            ),
            ("qcow2 convert", o(&["image".as_ref(), "qcow2".as_ref(), "convert".as_ref(), &raw, "OUT".as_ref()])),
            ("initramfs", o(&["image".as_ref(), "initramfs".as_ref(), &tree, "-o".as_ref(), "OUT".as_ref()])),
            (
                "initramfs --compress none",
                o(&[
                    "image".as_ref(),
                    "initramfs".as_ref(),
                    "--compress".as_ref(),
                    "none".as_ref(),
                    &tree,
                    "-o".as_ref(),
                    "OUT".as_ref(),
                ]),
            ),
        ]
    }
}

/// `qcow2 create` reads no content, so it is never private; with
/// `--cluster-size 2M` its metadata alone is 2 MiB of writes.
fn qcow2_create(extra: &[&OsStr]) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["image", "qcow2", "create", "OUT", "--size", "1GiB", "--cluster-size", "2M"]
        .iter()
        .map(OsString::from)
        .collect();
    args.extend(extra.iter().map(|a| a.to_os_string()));
    args
}

fn with_output(args: &[OsString], out: &Path) -> Vec<OsString> {
    args.iter().map(|a| if a == "OUT" { out.as_os_str().to_owned() } else { a.clone() }).collect()
}

/// Runs `sh -c SCRIPT sh ARGS...` with kiln's clean environment: the
/// script ends by running `"$@"`, the kiln command line.
fn kiln_under(script: &str, prefix: &[&OsStr], args: &[OsString]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(prefix)
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .unwrap()
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn image_outputs_are_private_when_any_input_is() {
    let dir = tempfile::tempdir().unwrap();
    for private in [false, true] {
        let inputs = Inputs::new(&dir.path().join(format!("in-{private}")), private, 5000);
        let out_dir = dir.path().join(format!("out-{private}"));
        fs::create_dir(&out_dir).unwrap();
        for (index, (name, args)) in inputs.commands().into_iter().enumerate() {
            let out = out_dir.join(format!("image-{index}"));
            assert_success(&crate::support::kiln(with_output(&args, &out)));
            let expected = if private { 0o600 } else { 0o644 };
            assert_eq!(mode_of(&out), expected, "kiln {name} with private={private}: mode {:o}", mode_of(&out));
        }
        // A secret tree on the service disk, whatever the files' modes.
        let out = out_dir.join("secret-tree.img");
        let mut secret_tree = OsString::from("keys=");
        secret_tree.push(inputs.path("tree"));
        let args: Vec<OsString> = vec![
            "image".into(),
            "service-disk".into(),
            "-o".into(),
            out.clone().into(),
            "--binary".into(),
            inputs.path("service"),
            "--secret-tree".into(),
            secret_tree,
        ];
        assert_success(&crate::support::kiln(&args));
        assert_eq!(mode_of(&out), 0o600, "service-disk --secret-tree");
        // An empty overlay holds nothing of its base, private or not.
        let out = out_dir.join("thin.qcow2");
        let args = with_output(&qcow2_create(&["--backing".as_ref(), inputs.root.join("disk.raw").as_os_str()]), &out);
        assert_success(&crate::support::kiln(&args));
        assert_eq!(mode_of(&out), 0o644, "qcow2 create --backing");
        let leftovers: Vec<String> = entries(&out_dir).into_iter().filter(|n| n.starts_with('.')).collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
}

#[test]
fn image_outputs_honour_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = Inputs::new(&dir.path().join("in"), false, 5000);
    let mut commands = inputs.commands();
    commands.push(("qcow2 create", qcow2_create(&[])));
    for (umask, expected) in [("077", 0o600), ("027", 0o640), ("002", 0o644), ("000", 0o644)] {
        for (index, (name, args)) in commands.iter().enumerate() {
            let out = dir.path().join(format!("image-{umask}-{index}"));
            let output = kiln_under(r#"umask "$1"; shift; exec "$@""#, &[OsStr::new(umask)], &with_output(args, &out));
            assert_success(&output);
            assert_eq!(mode_of(&out), expected, "kiln {name} under umask {umask}: mode {:o}", mode_of(&out));
        }
    }
}

/// Asserts the failure the issue asks for: exit status 1, one `error:`
/// line naming the output, and `left` (what the output directory holds
/// afterwards) empty: no image, no temporary file.
fn assert_failed_cleanly(name: &str, output: &Output, out: &Path, left: &[String]) {
    eprintln!("kiln {name}:");
    assert_error(output, 1, &out.display().to_string());
    assert!(left.is_empty(), "kiln {name} left {left:?} behind");
}

#[test]
fn writes_cut_short_by_a_full_filesystem_fail_and_leave_nothing() {
    if !is_root() {
        assert!(!tools_required(), "{}: needs root to mount a tmpfs", current_test_name());
        report_skip(&format!("{}: needs root to mount a tmpfs", current_test_name()));
        return;
    }
    let Some(_) = require_tool(&current_test_name(), "unshare") else { return };
    let dir = tempfile::tempdir().unwrap();
    let inputs = Inputs::new(&dir.path().join("in"), false, 1 << 20);
    let full = dir.path().join("full");
    fs::create_dir(&full).unwrap();
    let listing = dir.path().join("listing");
    let mut commands = inputs.commands();
    commands.push(("qcow2 create", qcow2_create(&[])));
    // A private mount namespace: the 256 KiB tmpfs exists only for this
    // one kiln run, and what it holds afterwards is listed from inside.
    let script = r#"dir=$1; listing=$2; shift 2
        mount -t tmpfs -o size=256k kiln-full "$dir" || exit 99
        "$@"; status=$?
        ls -A "$dir" > "$listing" || exit 98
        exit $status"#;
    for (name, args) in commands {
        let out = full.join("image.out");
        let mut command = vec![OsString::from("-m"), "sh".into(), "-c".into(), script.into(), "sh".into()];
        command.extend([full.clone().into_os_string(), listing.clone().into_os_string()]);
        command.push(env!("CARGO_BIN_EXE_kiln").into());
        command.extend(with_output(&args, &out));
        let output = Command::new("unshare").args(&command).env_remove("SOURCE_DATE_EPOCH").output().unwrap();
        let left: Vec<String> = fs::read_to_string(&listing).unwrap().lines().map(str::to_owned).collect();
        assert_failed_cleanly(name, &output, &out, &left);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("No space left on device"), "kiln {name}: the cause is named:\n{stderr}");
    }
}

#[test]
fn writes_cut_short_at_the_last_byte_fail_and_leave_nothing() {
    // RLIMIT_FSIZE (prlimit, with SIGXFSZ ignored so the write returns
    // EFBIG) stops a file exactly one byte short of its full length: the
    // very last bytes a writer emits must fail as loudly as the first.
    let Some(_) = require_tool(&current_test_name(), "prlimit") else { return };
    let dir = tempfile::tempdir().unwrap();
    let inputs = Inputs::new(&dir.path().join("in"), false, 300_000);
    let mut commands = inputs.commands();
    commands.push(("qcow2 create", qcow2_create(&[])));
    for (index, (name, args)) in commands.into_iter().enumerate() {
        let whole = dir.path().join(format!("whole-{index}"));
        assert_success(&crate::support::kiln(with_output(&args, &whole)));
        let length = fs::metadata(&whole).unwrap().len();
        let out_dir = dir.path().join(format!("short-{index}"));
        fs::create_dir(&out_dir).unwrap();
        let out = out_dir.join("image.out");
        let limit = OsString::from(format!("--fsize={}", length - 1));
        let output = kiln_under(
            r#"trap '' XFSZ; limit=$1; shift; exec prlimit "$limit" -- "$@""#,
            &[limit.as_os_str()],
            &with_output(&args, &out),
        );
        assert_failed_cleanly(name, &output, &out, &entries(&out_dir));
    }
}
