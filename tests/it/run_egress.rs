//! `kiln run` egress and published ports on a stock host: the test
//! namespace's default route leads through a veth (`up0`, 10.96.0.1) to a
//! second namespace (10.96.0.2) with a server and no route back to the
//! guests, and IPv4 forwarding is left at its default (0) everywhere. kiln
//! itself must turn forwarding on where its VMs need it, and back off.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::run_e2e::{RUN_DEADLINE, World, enter_netns, http_get_in, text};

const SERVER: &str = "10.96.0.2:9000";

/// The second namespace, deleted on drop.
struct Wan(String);

impl Drop for Wan {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().unwrap();
    assert!(output.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Links `world`'s namespace to a new one through `up0` and routes by
/// default through it; returns the new namespace and the peers that
/// connected to its HTTP server on 10.96.0.2:9000.
fn wan_behind_the_default_route(world: &World) -> (Wan, mpsc::Receiver<String>) {
    let wan = Wan(format!("{}-wan", world.netns));
    ip(&["netns", "add", &wan.0]);
    ip(&["-n", &world.netns, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &wan.0]);
    ip(&["-n", &world.netns, "addr", "add", "10.96.0.1/24", "dev", "up0"]);
    ip(&["-n", &world.netns, "link", "set", "up0", "up"]);
    ip(&["-n", &world.netns, "route", "add", "default", "via", "10.96.0.2"]);
    ip(&["-n", &wan.0, "addr", "add", "10.96.0.2/24", "dev", "eth0"]);
    ip(&["-n", &wan.0, "link", "set", "eth0", "up"]);
    ip(&["-n", &wan.0, "link", "set", "lo", "up"]);
    let (peers, seen) = mpsc::channel();
    let netns = wan.0.clone();
    let (bound, ready) = mpsc::channel();
    std::thread::spawn(move || {
        enter_netns(&netns);
        let listener = TcpListener::bind(SERVER).unwrap();
        bound.send(()).unwrap();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = peers.send(stream.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default());
            let _ = stream.read(&mut [0u8; 1024]);
            let _ = write!(stream, "HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\nok wan\n");
        }
    });
    ready.recv_timeout(Duration::from_secs(10)).unwrap();
    (wan, seen)
}

/// `net.ipv4.conf.<ifname>.forwarding` in the world's namespace.
fn forwarding(world: &World, ifname: &str) -> String {
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding");
    text(&world.exec(&["cat", &path]).stdout).trim().to_owned()
}

#[test]
fn run_egress_and_published_ports_work_on_a_stock_host_and_forwarding_is_restored() {
    let Some(world) = World::new("egress") else { return };
    let (wan, peers) = wan_behind_the_default_route(&world);
    assert_eq!([forwarding(&world, "all"), forwarding(&world, "up0")], ["0", "0"], "a stock host forwards nothing");
    std::fs::create_dir(world.dir.path().join("tools")).unwrap();
    std::fs::copy(world.probe(), world.dir.path().join("tools/probe")).unwrap();
    std::fs::create_dir(world.dir.path().join("www")).unwrap();
    std::fs::write(world.dir.path().join("www/index.html"), b"served by vm out\n").unwrap();

    // VM `out`: egress on, port 80 published as 8080. It probes the server
    // once, then serves HTTP; detached.
    let out_sh = world
        .script("out.sh", &format!("/srv/tools/probe --http {SERVER}\nexec httpd -f -p 80 -h /srv/www"))
        .display()
        .to_string();
    let out = world.spec(
        "out",
        &format!(
            r#"name = "out"
[service]
binary = "{out_sh}"
files = {{ tools = {{ path = "tools" }}, www = {{ path = "www" }} }}
[resources]
memory = "256MiB"
[network]
egress = true
publish = ["8080:80"]
"#
        ),
    );
    let started = world.run_detached(&out);
    assert!(started.status.success(), "kiln run --detach: {}", text(&started.stderr));
    let deadline = Instant::now() + RUN_DEADLINE;
    let probe_line = loop {
        let logs = text(&world.kiln(&["logs", "out"]).output().unwrap().stdout);
        if let Some(line) = logs.lines().find(|l| l.starts_with(&format!("probe: http {SERVER}"))) {
            break line.to_owned();
        }
        assert!(Instant::now() < deadline, "VM out never probed the server:\n{logs}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(probe_line, format!("probe: http {SERVER} reached \"ok wan\""), "egress of VM out");
    let peer = peers.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(peer, "10.96.0.1", "VM out's egress is not masqueraded as the uplink's address");
    assert_eq!(
        [forwarding(&world, "all"), forwarding(&world, "up0")],
        ["0", "1"],
        "kiln sets up0's flag, not ip_forward"
    );

    // The published port, from the other host (httpd needs a moment).
    let deadline = Instant::now() + Duration::from_secs(60);
    let page = loop {
        if let Some(page) = http_get_in(&wan.0, "10.96.0.1:8080", "/index.html").filter(|p| p.contains("200")) {
            break page;
        }
        assert!(Instant::now() < deadline, "the second namespace cannot reach VM out's published port 8080");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(page.contains("served by vm out"), "{page}");

    // VM `closed`: no egress, the same probe is blocked.
    let closed_sh = world.script("closed.sh", &format!("exec /srv/tools/probe --http {SERVER}")).display().to_string();
    let closed = world.spec(
        "closed",
        &format!(
            r#"name = "closed"
[service]
binary = "{closed_sh}"
files = {{ tools = {{ path = "tools" }} }}
[resources]
memory = "256MiB"
"#
        ),
    );
    let output = world.run(&closed);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{}", text(&output.stderr));
    assert!(stdout.contains(&format!("probe: http {SERVER} blocked")), "VM closed reached the server:\n{stdout}");
    world.assert_vm_left_nothing("closed");
    assert_eq!(forwarding(&world, "up0"), "1", "VM closed's release turned off the forwarding VM out needs");

    let stop = world.kiln(&["stop", "out", "--timeout", "5"]).output().unwrap();
    assert!(stop.status.success(), "kiln stop: {}", text(&stop.stderr));
    world.assert_nothing_left();
    assert_eq!(forwarding(&world, "up0"), "0", "up0 still forwards after its last VM stopped");

    // A launcher SIGKILLed after the firewall step: kiln gc restores the flag.
    let mut child = world
        .kiln(&["run", out.to_str().unwrap()])
        .env("KILN_CRASH_TEST_HOLD_AFTER", "firewall")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("holding after") {
        let n = stderr.read(&mut buffer).unwrap();
        assert!(n > 0, "kiln run exited before the firewall step: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buffer[..n]);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(forwarding(&world, "up0"), "1", "the firewall step did not turn up0's forwarding on");
    let gc = world.kiln(&["gc"]).output().unwrap();
    assert!(gc.status.success(), "kiln gc: {}", text(&gc.stderr));
    world.assert_nothing_left();
    assert_eq!(forwarding(&world, "up0"), "0", "kiln gc left up0 forwarding after a SIGKILLed launcher");
    assert_eq!(forwarding(&world, "all"), "0");
}
