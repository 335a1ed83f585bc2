//! `cargo xtask demo`: kiln's main job, end to end, on the example in
//! `examples/hello/`: build the guest (`cargo xtask guest`) and the example
//! service (static), then `kiln run --detach examples/hello/kiln.toml`,
//! talk to the service through its published port, stop it, and show its
//! console.
//!
//! The VM runs in a network namespace the demo creates and deletes, so its
//! tap and nftables rules never touch the host's own network; its state
//! lives in `target/demo/state`, so a second demo run finds the data disk
//! of the first (the service counts its runs there).

use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{announce, cargo, debian, guest, run_command, target_dir};

const SPEC: &str = "examples/hello/kiln.toml";
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// The host port the example publishes (see the spec).
const PUBLISHED_PORT: u16 = 8080;
/// What the demo needs beyond the build tools.
const DEMO_PACKAGES: &[&[&str]] =
    &[&["qemu-system-x86", "qemu-utils"], &["busybox-static"], &["nftables"], &["iproute2"]];

pub(crate) fn run(args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        bail!("`cargo xtask demo` takes no arguments, got `{arg}`");
    }
    announce("Debian packages");
    debian::ensure_installed(DEMO_PACKAGES)?;
    if !debian::is_root() {
        bail!(
            "kiln run creates a tap device and nftables rules, which needs root (CAP_NET_ADMIN);\n\
             run the demo as root: sudo -E cargo xtask demo"
        );
    }
    guest::run(&[])?;

    announce("building the example service (static) and release kiln");
    let demo_dir = absolute(&target_dir().join("demo"))?;
    fs::create_dir_all(&demo_dir).with_context(|| format!("cannot create {}", demo_dir.display()))?;
    let build_dir = guest::guest_dir()?.join("build");
    run_command(
        cargo()
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args(["build", "--release", "--locked", "-p", "hello-service", "--target", TARGET, "--target-dir"])
            .arg(&build_dir),
    )?;
    let service = demo_dir.join("hello-service");
    fs::copy(build_dir.join(TARGET).join("release").join("hello-service"), &service)
        .with_context(|| format!("cannot copy the service to {}", service.display()))?;
    run_command(cargo().args(["build", "--release", "--locked", "-p", "kiln"]))?;
    let kiln = absolute(&target_dir().join("release").join("kiln"))?;

    let netns = Netns::create(&format!("kiln-demo-{}", std::process::id()))?;
    let state_dir = demo_dir.join("state");
    let kiln_in_netns = |args: &[&str]| {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &netns.0])
            .arg(&kiln)
            .args(args)
            .env("KILN_STATE_DIR", &state_dir)
            .env("KILN_GUEST_DIR", guest::guest_dir().unwrap_or_default());
        command
    };

    announce(&format!("kiln run --detach {SPEC}  (in network namespace {})", netns.0));
    run_command(&mut kiln_in_netns(&["run", "--detach", SPEC]))?;

    announce(&format!("connecting to the service through its published port 127.0.0.1:{PUBLISHED_PORT}"));
    let greeting = netns.fetch(PUBLISHED_PORT, Duration::from_secs(120))?;
    println!("the service answered: {}", greeting.trim_end());

    announce("kiln ps");
    run_command(&mut kiln_in_netns(&["ps"]))?;
    announce("kiln stop hello  (the service gets SIGTERM, then the VM powers off)");
    run_command(&mut kiln_in_netns(&["stop", "hello"]))?;
    announce("kiln logs hello  (the guest's console)");
    run_command(&mut kiln_in_netns(&["logs", "hello"]))?;
    announce("checking that nothing is left: taps, nftables elements, leases, processes");
    netns.wait_until_clean(&state_dir, Duration::from_secs(10))?;
    println!();
    println!("demo done: the VM ran, answered on port {PUBLISHED_PORT}, stopped cleanly, and left no tap,");
    println!("rule, lease or process behind. Run it again: the data disk remembers the runs.");
    Ok(())
}

/// What of a stopped VM is still on the host, as one line per thing: `kt-`
/// links in `netns`, `kiln-vm:` elements in its `table inet kiln`, leases
/// in the ledger under `state_dir`, processes whose command line names
/// `state_dir`.
fn leftovers(netns: &str, state_dir: &Path) -> Result<Vec<String>> {
    let mut left = Vec::new();
    let output = |command: &mut Command| -> Result<(bool, String)> {
        let out = command.output().with_context(|| format!("cannot run {command:?}"))?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let (ok, links) = output(Command::new("ip").args(["-n", netns, "-o", "link"]))?;
    if !ok {
        bail!("`ip -n {netns} -o link` failed");
    }
    for line in links.lines() {
        if let Some(name) = line.split(": ").nth(1).filter(|name| name.starts_with("kt-")) {
            left.push(format!("tap {}", name.split('@').next().unwrap_or(name)));
        }
    }
    // No table at all (nft fails) holds no elements either.
    let (_, table) =
        output(Command::new("ip").args(["netns", "exec", netns, "nft", "-j", "list", "table", "inet", "kiln"]))?;
    let mut tags: Vec<&str> = table.match_indices("kiln-vm:").map(|(at, _)| &table[at..]).collect();
    tags.iter_mut().for_each(|tag| *tag = tag.split('"').next().unwrap_or(tag));
    tags.sort_unstable();
    tags.dedup();
    left.extend(tags.into_iter().map(|tag| format!("nftables elements tagged {tag}")));
    let ledger_path = state_dir.join("leases/leases.json");
    let ledger = fs::read_to_string(&ledger_path).unwrap_or_default();
    // Every lease in the ledger carries the pid it follows.
    if ledger.contains("\"pid\"") {
        left.push(format!("a lease in {}: {}", ledger_path.display(), ledger.trim()));
    }
    let needle = state_dir.as_os_str().as_encoded_bytes();
    for entry in fs::read_dir("/proc").context("cannot read /proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        if pid != std::process::id() && cmdline.windows(needle.len()).any(|w| w == needle) {
            let shown: Vec<String> =
                cmdline.split(|&b| b == 0).map(|arg| String::from_utf8_lossy(arg).into_owned()).collect();
            left.push(format!("process {pid}: {}", shown.join(" ").trim_end()));
        }
    }
    Ok(left)
}

fn absolute(path: &Path) -> Result<PathBuf> {
    Ok(if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) })
}

/// A network namespace with `lo` up, deleted on drop.
struct Netns(String);

impl Netns {
    fn create(name: &str) -> Result<Netns> {
        run_command(Command::new("ip").args(["netns", "add", name]))?;
        let netns = Netns(name.to_owned());
        run_command(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        Ok(netns)
    }

    /// Connects to 127.0.0.1:`port` inside the namespace (retrying while
    /// the guest boots) and returns what the service says.
    fn fetch(&self, port: u16, patience: Duration) -> Result<String> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<String> {
                    let file = fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
                    // SAFETY: `file` is an open network-namespace file; setns
                    // moves only this thread, which ends with the scope.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("cannot enter {path}: {}", std::io::Error::last_os_error());
                    }
                    let deadline = Instant::now() + patience;
                    loop {
                        let attempt = TcpStream::connect(("127.0.0.1", port)).and_then(|mut stream| {
                            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                            let mut text = String::new();
                            stream.read_to_string(&mut text)?;
                            Ok(text)
                        });
                        match attempt {
                            Ok(text) if !text.is_empty() => return Ok(text),
                            _ if Instant::now() > deadline => bail!("the service did not answer within {patience:?}"),
                            _ => std::thread::sleep(Duration::from_millis(250)),
                        }
                    }
                })
                .join()
                .unwrap_or_else(|_| bail!("the connecting thread panicked"))
        })
    }
}

impl Netns {
    /// Waits (the launcher exits just after its VM stopped) until nothing
    /// is left, or fails naming what is.
    fn wait_until_clean(&self, state_dir: &Path, patience: Duration) -> Result<()> {
        let deadline = Instant::now() + patience;
        loop {
            let left = leftovers(&self.0, state_dir)?;
            if left.is_empty() {
                println!("nothing left: no kt- link, no kiln-vm: element, no lease, no process of the VM");
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the stopped VM left behind:\n  {}", left.join("\n  "));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::process::Stdio;

    use super::*;

    /// The demo's closing claim can fail: each kind of leftover is named.
    #[test]
    fn demo_leftovers_names_a_tap_elements_a_lease_and_a_process() {
        if !debian::is_root() {
            let required = std::env::var_os("KILN_REQUIRE_TOOLS").is_some_and(|v| !v.is_empty() && v != "0");
            assert!(!required, "needs root for a network namespace (KILN_REQUIRE_TOOLS is set)");
            eprintln!("SKIPPED: demo_leftovers_names_a_tap_elements_a_lease_and_a_process: needs root");
            return;
        }
        let netns = Netns::create(&format!("kiln-demo-test-{}", std::process::id())).unwrap();
        let state = std::env::temp_dir().join(format!("kiln-demo-test-{}", std::process::id()));
        fs::create_dir_all(state.join("leases")).unwrap();
        assert_eq!(leftovers(&netns.0, &state).unwrap(), Vec::<String>::new(), "a clean namespace");

        run_command(Command::new("ip").args(["-n", &netns.0, "tuntap", "add", "kt-demo", "mode", "tap"])).unwrap();
        let nft = |rule: &str| run_command(Command::new("ip").args(["netns", "exec", &netns.0, "nft", rule])).unwrap();
        nft("add table inet kiln");
        nft("add set inet kiln vm_taps { type ifname; }");
        nft(r#"add element inet kiln vm_taps { "kt-demo" comment "kiln-vm:demo" }"#);
        fs::write(state.join("leases/leases.json"), r#"{"leases":{"demo":{"index":0,"pid":1,"created":0}}}"#).unwrap();
        let mut process =
            Command::new("sh").args(["-c", "read -r line", "sh"]).arg(&state).stdin(Stdio::piped()).spawn().unwrap();
        let left = leftovers(&netns.0, &state).unwrap();
        process.kill().unwrap();
        process.wait().unwrap();
        fs::remove_dir_all(&state).unwrap();
        assert_eq!(left.len(), 4, "{left:#?}");
        assert_eq!(left[0], "tap kt-demo");
        assert_eq!(left[1], "nftables elements tagged kiln-vm:demo");
        assert!(left[2].starts_with("a lease in "), "{}", left[2]);
        assert!(left[3].starts_with(&format!("process {}: sh -c read -r line sh ", process.id())), "{}", left[3]);
    }
}
