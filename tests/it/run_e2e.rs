//! `kiln run` end to end: the real `kiln` binary, as root, inside a network
//! namespace each test creates (`ip netns exec`, so its taps, nftables
//! table and `/sys` are the namespace's), with its own state directory,
//! booting `cargo xtask guest`'s guest under QEMU TCG. After every run the
//! test checks that nothing is left: no `kt-` link, no tagged nftables
//! element, no lease, no QEMU.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::{GuestAssets, guest_assets, require_tools};
use tempfile::TempDir;

/// A run under TCG takes ~5 s; a loaded CI machine may need far more.
pub(crate) const RUN_DEADLINE: Duration = Duration::from_secs(240);

/// One test's world: a namespace, a state directory, the guest.
pub(crate) struct World {
    pub(crate) netns: String,
    pub(crate) dir: TempDir,
    pub(crate) guest: GuestAssets,
}

impl World {
    /// `None` (after printing SKIPPED, or panicking under KILN_REQUIRE_TOOLS)
    /// when the test cannot run here.
    pub(crate) fn new(tag: &str) -> Option<World> {
        let test = kiln_testkit::current_test_name();
        if !kiln_testkit::require_root(&test, "network namespaces and taps") {
            return None;
        }
        require_tools(&test, &["ip", "nft", "qemu-system-x86_64"])?;
        let guest = guest_assets(&test, &["bzimage", "initramfs"])?;
        assert!(guest.dir.join("service-probe").is_file(), "{test}: `cargo xtask guest` wrote no service-probe");
        let netns = format!("kiln-e2e-{}-{tag}", std::process::id());
        let status = Command::new("ip").args(["netns", "add", &netns]).status().unwrap();
        assert!(status.success(), "ip netns add {netns}");
        let world = World { netns, dir: tempfile::tempdir().unwrap(), guest };
        world.exec(&["ip", "link", "set", "lo", "up"]);
        Some(world)
    }

    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub(crate) fn probe(&self) -> PathBuf {
        self.guest.dir.join("service-probe")
    }

    /// `kiln ARGS` inside the namespace, with this world's state and guest.
    pub(crate) fn kiln(&self, args: &[&str]) -> Command {
        // By absolute path: a test runs kiln with an empty PATH.
        let mut command = Command::new(kiln_testkit::find_tool("ip").unwrap_or_else(|| PathBuf::from("/usr/sbin/ip")));
        command
            .args(["netns", "exec", &self.netns, env!("CARGO_BIN_EXE_kiln")])
            .args(args)
            .env("KILN_STATE_DIR", self.state_dir())
            .env("KILN_GUEST_DIR", &self.guest.dir)
            .env("KILN_QEMU_ACCEL", "tcg")
            .env_remove("KILN_CRASH_TEST_HOLD_AFTER");
        command
    }

    pub(crate) fn exec(&self, argv: &[&str]) -> Output {
        let output = Command::new("ip").args(["netns", "exec", &self.netns]).args(argv).output().unwrap();
        assert!(output.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&output.stderr));
        output
    }

    pub(crate) fn spec(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A `#!/bin/sh` service (run by the guest's busybox) in the world's directory.
    pub(crate) fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        path
    }

    /// Runs `kiln run SPEC` to the end, with a deadline.
    pub(crate) fn run(&self, spec: &Path) -> Output {
        self.run_with(&["run"], spec)
    }

    /// Runs `kiln run --detach SPEC` until it returns (the VM runs), with a deadline.
    pub(crate) fn run_detached(&self, spec: &Path) -> Output {
        self.run_with(&["run", "--detach"], spec)
    }

    fn run_with(&self, args: &[&str], spec: &Path) -> Output {
        let mut args = args.to_vec();
        args.push(spec.to_str().unwrap());
        let child = self.kiln(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
        wait_with_deadline(child.unwrap(), RUN_DEADLINE)
    }

    /// Asserts nothing of VM `name` is left on the host side (others may run).
    pub(crate) fn assert_vm_left_nothing(&self, name: &str) {
        let links = String::from_utf8(self.exec(&["ip", "-o", "link"]).stdout).unwrap();
        assert!(!links.contains(&format!("kt-{name}:")), "the tap of {name} is left:\n{links}");
        let table = Command::new("ip")
            .args(["netns", "exec", &self.netns, "nft", "-j", "list", "table", "inet", "kiln"])
            .output()
            .unwrap();
        let table = String::from_utf8(table.stdout).unwrap();
        assert!(!table.contains(&format!("kiln-vm:{name}\"")), "elements of {name} are left: {table}");
    }

    /// Asserts nothing of any VM is left on the host side.
    pub(crate) fn assert_nothing_left(&self) {
        let links = String::from_utf8(self.exec(&["ip", "-o", "link"]).stdout).unwrap();
        assert!(!links.contains("kt-"), "a tap is left:\n{links}");
        let table = Command::new("ip")
            .args(["netns", "exec", &self.netns, "nft", "-j", "list", "table", "inet", "kiln"])
            .output()
            .unwrap();
        let table = String::from_utf8(table.stdout).unwrap();
        assert!(!table.contains("kiln-vm:"), "nftables elements are left: {table}");
        let ledger = std::fs::read_to_string(self.state_dir().join("leases/leases.json")).unwrap_or_default();
        assert!(!ledger.contains("\"pid\""), "a lease is left: {ledger}");
        let ps = Command::new("pgrep").args(["-f", &self.state_dir().to_string_lossy()]).output().unwrap();
        assert!(ps.stdout.is_empty(), "a process is left: {}", String::from_utf8_lossy(&ps.stdout));
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Kill anything of ours still running, then drop the namespace.
        let _ = Command::new("pkill").args(["-KILL", "-f", &self.state_dir().to_string_lossy()]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
    }
}

pub(crate) fn wait_with_deadline(mut child: Child, deadline: Duration) -> Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "kiln did not finish within {deadline:?}:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\r', "")
}

#[test]
fn run_reports_output_and_exit_code_and_keeps_the_data_disk() {
    let Some(world) = World::new("data") else { return };
    std::fs::create_dir(world.dir.path().join("keystore")).unwrap();
    std::fs::write(world.dir.path().join("keystore/key"), b"the key\n").unwrap();
    // The data disk kiln makes is filled from the seed once, on creation.
    std::fs::create_dir(world.dir.path().join("seed")).unwrap();
    std::fs::write(world.dir.path().join("seed/seeded"), b"from the seed\n").unwrap();
    let spec = |args: &str| {
        format!(
            r#"name = "probe"
[service]
binary = "{probe}"
args = [{args}]
env = {{ RPC_URL = "http://127.0.0.1:7000/rpc", QUOTED = "it's \"x\"\n$(not run)" }}
files = {{ keystore = {{ path = "keystore", secret = true }} }}
[resources]
memory = "256MiB"
storage = "16MiB"
storage_seed = "seed"
[network]
host_ports = [7000]
"#,
            probe = world.probe().display()
        )
    };
    let first = world.spec(
        "first",
        &spec(r#""--env", "RPC_URL", "--env", "QUOTED", "--sha256", "/srv/keystore/key", "--read", "/mnt/data/seeded", "--write", "/mnt/data/kept=from run 1", "--exit", "7""#),
    );
    let output = world.run(&first);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(7), "the service's exit code:\n{stdout}\n{}", text(&output.stderr));
    assert!(stdout.contains(r#"probe: env RPC_URL=Some("http://10.213.0.1:7000/rpc")"#), "{stdout}");
    assert!(stdout.contains(r#"probe: env QUOTED=Some("it's \"x\"\n$(not run)")"#), "{stdout}");
    let digest: String = {
        use sha2::Digest;
        sha2::Sha256::digest(b"the key\n").iter().map(|b| format!("{b:02x}")).collect()
    };
    assert!(stdout.contains(&format!("probe: sha256 /srv/keystore/key {digest}")), "{stdout}");
    assert!(text(&output.stderr).contains("service exited with status 7"), "{}", text(&output.stderr));
    assert!(
        stdout.contains(r#"probe: read /mnt/data/seeded "from the seed\n""#),
        "the seed is not on the disk:\n{stdout}"
    );
    assert!(stdout.contains("probe: wrote /mnt/data/kept"), "the service cannot write the data disk:\n{stdout}");
    world.assert_nothing_left();

    // A later run leaves the disk alone, whatever the seed holds now.
    std::fs::write(world.dir.path().join("seed/seeded"), b"changed\n").unwrap();
    let second = world.spec("second", &spec(r#""--read", "/mnt/data/kept", "--read", "/mnt/data/seeded""#));
    let output = world.run(&second);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{}", text(&output.stderr));
    assert!(stdout.contains("from run 1"), "the data disk lost the first run's file:\n{stdout}");
    assert!(stdout.contains(r#"probe: read /mnt/data/seeded "from the seed\n""#), "the disk was refilled:\n{stdout}");
    world.assert_nothing_left();

    let ps = world.kiln(&["ps", "--json"]).output().unwrap();
    let records: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    assert_eq!(records[0]["name"], "probe");
    assert_eq!(records[0]["phase"], "stopped");
    assert_eq!(records[0]["exit"]["code"], 0);
    assert_eq!(records[0]["alive"], false);
}

/// Moves the calling thread into network namespace `netns`.
pub(crate) fn enter_netns(netns: &str) {
    use std::os::fd::AsFd;
    let file = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
    rustix::thread::move_into_link_name_space(file.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network)).unwrap();
}

/// A tiny HTTP server in the namespace answering `ok <port>` on each port.
pub(crate) fn serve_http(world: &World, ports: &[u16]) {
    for &port in ports {
        let netns = world.netns.clone();
        std::thread::spawn(move || {
            enter_netns(&netns);
            let listener = TcpListener::bind(("0.0.0.0", port)).unwrap();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let body = format!("ok {port}\n");
                let _ = write!(stream, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            }
        });
    }
}

/// GET http://addr/path from inside the world's namespace, with a short timeout.
pub(crate) fn http_get(world: &World, addr: &str, path: &str) -> Option<String> {
    http_get_in(&world.netns, addr, path)
}

/// GET http://addr/path from inside network namespace `netns`, with a short timeout.
pub(crate) fn http_get_in(netns: &str, addr: &str, path: &str) -> Option<String> {
    let (netns, addr, path) = (netns.to_owned(), addr.to_owned(), path.to_owned());
    std::thread::spawn(move || {
        enter_netns(&netns);
        let mut stream = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    })
    .join()
    .unwrap()
}

#[test]
fn run_network_host_ports_isolation_detach_and_stop() {
    let Some(world) = World::new("net") else { return };
    // The services are shell scripts run by the guest's busybox `sh`.
    let script = |name: &str, body: &str| world.script(name, body);
    let server_sh = script("server.sh", "exec httpd -f -p 8080 -h /srv/www");
    serve_http(&world, &[7000, 7001]);
    std::fs::create_dir(world.dir.path().join("www")).unwrap();
    std::fs::write(world.dir.path().join("www/index.html"), b"served by vm a\n").unwrap();

    // VM a: a web server on 8080, detached.
    let server = world.spec(
        "server",
        &format!(
            r#"name = "a"
[service]
binary = "{server}"
files = {{ www = {{ path = "www" }} }}
[resources]
memory = "256MiB"
"#,
            server = server_sh.display()
        ),
    );
    let output = world.run_detached(&server);
    assert!(output.status.success(), "kiln run --detach: {}", text(&output.stderr));
    let ps = world.kiln(&["ps", "--json"]).output().unwrap();
    let records: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    let a_addr = records[0]["lease"]["guest"].as_str().unwrap().to_owned();
    // The host reaches the guest's service at the guest address (httpd needs a moment after boot).
    let deadline = Instant::now() + Duration::from_secs(60);
    let page = loop {
        if let Some(page) = http_get(&world, &format!("{a_addr}:8080"), "/index.html").filter(|p| p.contains("200")) {
            break page;
        }
        assert!(Instant::now() < deadline, "the host could not reach VM a's web server at {a_addr}:8080");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(page.contains("served by vm a"), "{page}");

    // VM b: may reach host port 7000 only, not 7001, and never VM a. The
    // host address comes from the spec's loopback URL, rewritten by kiln.
    let client_sh = script(
        "client.sh",
        r#"h=${OK_URL#http://}; h=${h%%:*}
exec /srv/tools/probe --http "$h:7000" --http "$h:7001" --http "$1:8080""#,
    );
    std::fs::create_dir(world.dir.path().join("tools")).unwrap();
    std::fs::copy(world.probe(), world.dir.path().join("tools/probe")).unwrap();
    let client = world.spec(
        "client",
        &format!(
            r#"name = "b"
[service]
binary = "{client}"
args = ["{a_addr}"]
env = {{ OK_URL = "http://127.0.0.1:7000" }}
files = {{ tools = {{ path = "tools" }} }}
[resources]
memory = "256MiB"
[network]
host_ports = [7000]
"#,
            client = client_sh.display()
        ),
    );
    let output = world.run(&client);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{}", text(&output.stderr));
    let line = |port: u16, verdict: &str| {
        stdout.lines().any(|l| l.starts_with("probe: http ") && l.contains(&format!(":{port} {verdict}")))
    };
    assert!(line(7000, "reached \"ok 7000\""), "the allowed host port was not reached:\n{stdout}");
    assert!(line(7001, "blocked"), "a host port not on the allow-list was reached:\n{stdout}");
    assert!(line(8080, "blocked"), "VM b reached VM a:\n{stdout}");
    world.assert_vm_left_nothing("b");

    // Stop a: the service gets SIGTERM, the VM powers off, nothing is left.
    let stop = world.kiln(&["stop", "a", "--timeout", "5"]).output().unwrap();
    assert!(stop.status.success(), "kiln stop: {}", text(&stop.stderr));
    let logs = world.kiln(&["logs", "a"]).output().unwrap();
    let console = text(&logs.stdout);
    assert!(console.contains("kiln-init: stop asked on the control channel"), "no stop on a's console:\n{console}");
    assert!(console.contains("kiln-init: powering off"), "{console}");
    world.assert_nothing_left();
}

#[test]
fn sigkill_at_any_step_then_gc_leaves_nothing() {
    let Some(world) = World::new("crash") else { return };
    // Egress needs an uplink: a default route through a link of its own.
    world.exec(&["ip", "tuntap", "add", "dev", "up0", "mode", "tap"]);
    world.exec(&["ip", "link", "set", "up0", "up"]);
    world.exec(&["ip", "route", "add", "default", "dev", "up0"]);
    let spec = world.spec(
        "crash",
        &format!(
            r#"name = "crash"
[service]
binary = "{probe}"
args = ["--wait-for-sigterm"]
[resources]
memory = "256MiB"
storage = "16MiB"
[network]
host_ports = [7000]
publish = ["8080:80"]
egress = true
"#,
            probe = world.probe().display()
        ),
    );
    for hold in ["lease", "tap", "firewall", "vmm", "running"] {
        let mut child = world
            .kiln(&["run", spec.to_str().unwrap()])
            .env("KILN_CRASH_TEST_HOLD_AFTER", hold)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the hold message, then SIGKILL kiln run.
        let mut stderr = child.stderr.take().unwrap();
        let deadline = Instant::now() + RUN_DEADLINE;
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("holding after") {
            assert!(Instant::now() < deadline, "kiln run never reached {hold}: {}", String::from_utf8_lossy(&seen));
            let n = stderr.read(&mut buffer).unwrap();
            assert!(n > 0, "kiln run exited before {hold}: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buffer[..n]);
        }
        child.kill().unwrap();
        child.wait().unwrap();

        let ps = text(&world.kiln(&["ps"]).output().unwrap().stdout);
        assert!(ps.contains("dead"), "after SIGKILL at {hold}, kiln ps should say dead:\n{ps}");
        let gc = world.kiln(&["gc"]).output().unwrap();
        assert!(gc.status.success(), "kiln gc after {hold}: {}", text(&gc.stderr));
        world.assert_nothing_left();
        let ps = text(&world.kiln(&["ps"]).output().unwrap().stdout);
        assert!(!ps.contains("crash"), "gc left the record after {hold}:\n{ps}");
        let gc_again = text(&world.kiln(&["gc"]).output().unwrap().stdout);
        assert!(gc_again.contains("nothing to release"), "a second gc found more after {hold}:\n{gc_again}");
    }
}

#[test]
fn bad_specs_fail_clearly_and_create_nothing() {
    let Some(world) = World::new("bad") else { return };
    let cases: &[(&str, String, &str)] = &[
        (
            "unknown-field",
            "name = \"x\"\n[service]\nbinary = \"/bin/true\"\nbinnary = 1\n".into(),
            "unknown field `binnary`",
        ),
        (
            "bad-size",
            "name = \"x\"\n[service]\nbinary = \"/bin/true\"\n[resources]\nmemory = \"12 parsecs\"\n".into(),
            "unknown unit",
        ),
        (
            "missing-binary",
            "name = \"x\"\n[service]\nbinary = \"/nonexistent/svc\"\n".into(),
            "/nonexistent/svc does not exist",
        ),
        (
            "gpu-required",
            "name = \"x\"\n[service]\nbinary = \"/bin/true\"\n[resources]\ngpu = { count = 1, policy = \"required\" }\n"
                .into(),
            "vm.vfio names no PCI device",
        ),
        (
            "tee-required",
            "name = \"x\"\n[service]\nbinary = \"/bin/true\"\n[resources]\nconfidentiality = \"tee-required\"\n".into(),
            "starts no confidential VMs",
        ),
        (
            "kernel-missing",
            "name = \"x\"\n[service]\nbinary = \"/bin/true\"\n[guest]\nkernel = \"/nonexistent/vmlinuz\"\n".into(),
            "/nonexistent/vmlinuz does not exist",
        ),
    ];
    for (name, spec, needle) in cases {
        let path = world.spec(name, spec);
        let output = world.run(&path);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(needle), "{name}: {stderr}");
    }
    // No VMM: an empty PATH (the tools kiln itself runs are not needed before it fails).
    let path = world.spec("novmm", "name = \"x\"\n[service]\nbinary = \"/bin/true\"\n");
    let output = world.kiln(&["run", path.to_str().unwrap()]).env("PATH", "/nonexistent").output().unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No VMM: `qemu-system-x86_64` is not on PATH"), "{stderr}");

    let ps = text(&world.kiln(&["ps"]).output().unwrap().stdout);
    assert_eq!(ps.lines().count(), 1, "a bad spec left a VM record:\n{ps}");
    world.assert_nothing_left();
}
