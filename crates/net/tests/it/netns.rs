//! Throwaway network namespaces for the root-only tests: created per test,
//! deleted on drop (even when the test panics), never the host's.

use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

static NAMESPACE_SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace `kiln-test-<pid>-<n>` with `lo` up, deleted on drop.
#[derive(Debug)]
pub(crate) struct Netns {
    pub(crate) name: String,
}

impl Netns {
    pub(crate) fn new() -> Netns {
        let name = format!("kiln-test-{}-{}", std::process::id(), NAMESPACE_SEQ.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub(crate) fn exec(&self, argv: &[&str]) {
        run(Command::new("ip").args(["netns", "exec", &self.name]).args(argv));
    }

    /// Runs `f` on a thread that has entered this namespace; sockets and
    /// devices it creates stay in the namespace.
    pub(crate) fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
                    rustix::thread::move_into_link_name_space(
                        file.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .unwrap();
                    f()
                })
                .join()
                .unwrap()
        })
    }

    /// `ip -d -j link show <name>` in this namespace: the link's JSON, or
    /// None when it does not exist.
    pub(crate) fn link(&self, name: &str) -> Option<Value> {
        let output = Command::new("ip").args(["-n", &self.name, "-d", "-j", "link", "show", name]).output().unwrap();
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(stderr.contains("does not exist"), "ip link show {name}: {stderr}");
            return None;
        }
        let links: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(links.len(), 1, "{links:?}");
        links.into_iter().next()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

pub(crate) fn run(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
}

pub(crate) fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Whether a root-only test can run: root, and `tools` on PATH. Prints
/// `SKIPPED` (or fails under `KILN_REQUIRE_TOOLS`) otherwise.
pub(crate) fn root_tools_ready(tools: &[&str]) -> bool {
    let test = kiln_testkit::current_test_name();
    if !kiln_testkit::require_root(&test, "network namespaces") {
        return false;
    }
    kiln_testkit::require_tools(&test, tools).is_some()
}
