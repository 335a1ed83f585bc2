//! `kiln render --target vm`, run as the real binary: what `kiln run` would
//! hand the VMM, with nothing on the host touched.

use std::process::Command;

use crate::support::assert_success;

#[test]
fn render_vm_prints_each_qemu_flag_with_its_value_on_one_line() {
    let test = "render_vm_prints_each_qemu_flag_with_its_value_on_one_line";
    // kiln checks that the backend it renders for is installed.
    if kiln_testkit::require_tool(test, "qemu-system-x86_64").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("guest");
    std::fs::create_dir(&guest).unwrap();
    // render only names the guest files; they need not be a real kernel.
    for file in ["vmlinuz", "initramfs.cpio.gz"] {
        std::fs::write(guest.join(file), b"").unwrap();
    }
    let spec = dir.path().join("web.toml");
    std::fs::write(&spec, "name = \"web\"\n[service]\nbinary = \"/bin/true\"\n[resources]\nmemory = \"256MiB\"\n")
        .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["render", "--target", "vm", "--vmm", "qemu", "--guest-dir"])
        .arg(&guest)
        .arg(&spec)
        .env("KILN_STATE_DIR", dir.path().join("state"))
        .env("KILN_QEMU_ACCEL", "tcg")
        .env_remove("KILN_NET_CIDR")
        .output()
        .unwrap();
    let stdout = assert_success(&output);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("qemu-system-x86_64 \\"), "{stdout}");
    let args: Vec<&str> = lines.map(|line| line.trim_start().trim_end_matches(" \\")).collect();
    for line in &args {
        let words: Vec<&str> = line.splitn(2, ' ').collect();
        assert!(words[0].starts_with('-'), "each line starts with its flag: {line:?}\n{stdout}");
        assert!(words.get(1).is_none_or(|value| !value.starts_with('-')), "one flag per line: {line:?}\n{stdout}");
    }
    for expected in [
        "-m 256M".to_owned(),
        "-accel tcg".to_owned(),
        "-nodefaults".to_owned(),
        format!("-kernel {}", guest.join("vmlinuz").display()),
        format!("-initrd {}", guest.join("initramfs.cpio.gz").display()),
    ] {
        assert!(args.contains(&expected.as_str()), "{expected:?} on a line of its own:\n{stdout}");
    }
    assert!(
        args.iter().any(|line| line.starts_with("-append 'console=ttyS0 ") && line.ends_with("kiln.grace=10'")),
        "the kernel command line, quoted, after -append:\n{stdout}"
    );
    assert!(args.iter().any(|line| line.starts_with("-drive file=")), "{stdout}");
}

/// `kiln render | head`: a reader that goes away ends kiln as it ends
/// `cat` (SIGPIPE), never with a Rust panic and its exit status 101.
#[cfg(feature = "k8s")]
#[test]
fn render_into_a_closed_pipe_ends_by_sigpipe_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("web.toml");
    std::fs::write(&spec, "name = \"web\"\n[service]\nimage = \"registry.example/web:1\"\n").unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["render", "--target", "k8s"])
        .arg(&spec)
        .stdout(writer)
        .env_remove("KILN_K8S_DEFAULTS")
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.signal(), Some(rustix::process::Signal::PIPE.as_raw()), "{:?}\n{stderr}", output.status);
}

#[test]
fn a_spec_in_a_directory_holding_a_colon_names_its_relative_oci_layout_and_tag() {
    let test = kiln_testkit::current_test_name();
    let Some(tools) = kiln_testkit::require_tools(&test, &["umoci", "qemu-system-x86_64"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    // umoci builds where no ':' is, then the directory is renamed.
    let built = crate::cli_oci::UmociImage::build(&dir.path().join("plain"), &tools[0]);
    let specs = dir.path().join("specs:v2");
    std::fs::rename(dir.path().join("plain"), &specs).unwrap();
    let layout = specs.join("layout");
    let (manifest_digest, _, _) = crate::cli_oci::UmociImage { layout: layout.clone(), tag: built.tag }.documents();
    let guest = dir.path().join("guest");
    std::fs::create_dir(&guest).unwrap();
    for file in ["vmlinuz", "initramfs.cpio.gz"] {
        std::fs::write(guest.join(file), b"").unwrap();
    }
    let spec = specs.join("bb.toml");
    std::fs::write(&spec, "name = \"bb\"\n[service]\nimage = \"oci:layout:t\"\n").unwrap();
    let state = dir.path().join("state");
    // The source as the spec anchors it: the directory's ':' is the path's.
    let source = format!("oci:{}:t", layout.display());
    let pulled = assert_success(&crate::cli_oci::kiln_in(&state, &["image", "oci", "pull", &source]));
    assert!(pulled.starts_with(&format!("Pulled {source}: manifest {manifest_digest}")), "{pulled}");
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["render", "--target", "vm", "--vmm", "qemu", "--guest-dir"])
        .arg(&guest)
        .arg(&spec)
        .env("KILN_STATE_DIR", &state)
        .env("KILN_QEMU_ACCEL", "tcg")
        .env_remove("KILN_NET_CIDR")
        .output()
        .unwrap();
    let rendered = assert_success(&output);
    assert_eq!(
        rendered.lines().next().unwrap(),
        format!("# service.image: {source} (manifest {manifest_digest})"),
        "{rendered}"
    );
    assert!(rendered.contains("serial=kiln-layer1"), "{rendered}");
}
