//! `cargo xtask demo`: kiln's main job, end to end, on the example in
//! `examples/hello/`: a service disk and a cloud-init seed, built with the
//! release `kiln` CLI into `target/demo/`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::json::Json;
use crate::{announce, cargo, format_bytes, run_command, show_command, target_dir};

const EXAMPLE_DIR: &str = "examples/hello";

pub(crate) fn run(args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        bail!("`cargo xtask demo` takes no arguments, got `{arg}`");
    }
    announce("building release kiln and hello-service");
    run_command(cargo().args(["build", "--release", "-p", "kiln", "-p", "hello-service"]))?;
    let release = target_dir().join("release");
    let kiln = release.join("kiln");
    let service = release.join("hello-service");
    let out_dir = target_dir().join("demo");
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let example = Path::new(EXAMPLE_DIR);
    let service_disk = out_dir.join("service.img");
    let seed = out_dir.join("seed.img");

    announce("building the service disk");
    let mut command = Command::new(&kiln);
    command
        .args(["image", "service-disk", "-o"])
        .arg(&service_disk)
        .arg("--binary")
        .arg(&service)
        // `--arg=...` so a value that starts with `--` is never taken for a flag.
        .args(["--arg=--greeting", "--arg=hello from kiln", "--env", "GREETING_STYLE=warm"])
        .arg("--secret-tree")
        .arg(join_dest("keystore", &example.join("keystore")))
        .arg("--json");
    let service_summary = build_image(&mut command, &service_disk)?;

    announce("building the cloud-init seed");
    let cloud_init = example.join("cloud-init");
    let mut command = Command::new(&kiln);
    command
        .args(["image", "cidata", "-o"])
        .arg(&seed)
        .arg("--user-data")
        .arg(cloud_init.join("user-data"))
        .arg("--meta-data")
        .arg(cloud_init.join("meta-data"))
        .arg("--network-config")
        .arg(cloud_init.join("network-config"))
        .arg("--json");
    let seed_summary = build_image(&mut command, &seed)?;

    announce("what it made");
    for (role, image, summary) in
        [("service disk", &service_disk, &service_summary), ("cloud-init seed", &seed, &seed_summary)]
    {
        describe(role, image, summary)?;
    }
    Ok(())
}

/// `NAME=DIR` for `--tree`/`--secret-tree`.
fn join_dest(name: &str, dir: &Path) -> String {
    format!("{name}={}", dir.display())
}

/// Runs a `kiln image ... --json` command and returns its summary. Any old
/// image is removed first so what is shown below is what this run made.
fn build_image(command: &mut Command, image: &Path) -> Result<Json> {
    match fs::remove_file(image) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err).with_context(|| format!("cannot remove old {}", image.display()));
        }
    }
    let shown = show_command(command);
    println!("$ {shown}");
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run `{shown}`"))?;
    if !output.status.success() {
        bail!("`{shown}` failed ({})", output.status);
    }
    let stdout = String::from_utf8(output.stdout).context("kiln printed non-UTF-8 JSON")?;
    Json::parse(stdout.trim()).with_context(|| format!("cannot read kiln's --json summary: {stdout}"))
}

fn describe(role: &str, image: &Path, summary: &Json) -> Result<()> {
    let metadata =
        fs::metadata(image).with_context(|| format!("kiln reported success but {} is missing", image.display()))?;
    let mode = metadata.permissions().mode() & 0o7777;
    println!("{role}: {}", image.display());
    println!(
        "  {} {:04o}  {} bytes ({}), {} with {}-byte clusters",
        mode_string(mode),
        mode,
        metadata.len(),
        format_bytes(metadata.len()),
        summary.text_field("fat_type")?,
        summary.u64_field("cluster_size")?,
    );
    println!(
        "  {} files, {} dirs, {} of file data, built in {} ms",
        summary.u64_field("files")?,
        summary.u64_field("dirs")?,
        format_bytes(summary.u64_field("data_bytes")?),
        summary.u64_field("elapsed_ms")?,
    );
    let reported_mode = summary.text_field("mode")?;
    if u32::from_str_radix(&reported_mode, 8).ok() != Some(mode) {
        bail!("kiln reported mode {reported_mode} for {} but the file has {mode:04o}", image.display());
    }
    if summary.u64_field("image_bytes")? != metadata.len() {
        bail!(
            "kiln reported {} image bytes for {} but the file has {}",
            summary.u64_field("image_bytes")?,
            image.display(),
            metadata.len()
        );
    }
    list_contents(image);
    Ok(())
}

/// Lists the image's files, and shows the service disk's launch script, with
/// mtools when it is installed; the demo does not require it (`cargo xtask
/// test` installs it for the interop tests).
fn list_contents(image: &Path) {
    let Some(listing) = mtools("mdir", image, &["-/", "-b", "::/"]) else {
        println!("    (install mtools to list the files: apt-get install mtools)");
        return;
    };
    for line in listing.lines() {
        println!("    {line}");
    }
    if listing.lines().any(|line| line == "::/launch") {
        if let Some(script) = mtools("mtype", image, &["::/launch"]) {
            println!("  launch script:");
            for line in script.lines() {
                println!("    | {line}");
            }
        }
    }
}

/// Runs an mtools command on `image`; its stdout, or `None` if it failed.
fn mtools(tool: &str, image: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new(tool)
        .arg("-i")
        .arg(image)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("LC_ALL", "C.UTF-8")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `-rw-------` for 0o600: the `ls -l` view, so the secret mode is obvious.
fn mode_string(mode: u32) -> String {
    let mut text = String::from("-");
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 0o7;
        text.push(if bits & 4 != 0 { 'r' } else { '-' });
        text.push(if bits & 2 != 0 { 'w' } else { '-' });
        text.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    text
}
