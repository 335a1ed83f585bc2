//! The in-process side of the nftables part of `cargo xtask bench net`.
//!
//! ```text
//! nft_bench NETNS VMS
//! ```
//!
//! Enters the network namespace NETNS (which the caller created, so the
//! host's ruleset is never touched), creates the VMs' taps and the uplink
//! `eth0` there (untimed: kiln sets IPv4 forwarding on them) and, one VM at
//! a time:
//! - `kiln add`: [`Nft::apply`] for VMS VMs, each with a host port, egress
//!   through an uplink and a published port;
//! - `kiln remove`: [`Nft::remove`] for each of them, in the same order;
//! - `rules add`: the same VMs written the way per-tap firewalls usually are
//!   (the reference design, and kiln before its set layout): a chain per VM
//!   with its rules and a jump from the base chain, one `nft -f` each, into
//!   a separate table that is deleted at the end.
//!
//! Prints one line per series: `NAME ms1 ms2 ...` in operation order.

use std::error::Error;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use kiln_net::{Firewall, HostPort, Nft, Protocol, PublishedPort, VmRules};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nft_bench: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(netns), Some(vms), None) = (args.next(), args.next(), args.next()) else {
        return Err("usage: nft_bench NETNS VMS".into());
    };
    let vms: u32 = vms.parse().map_err(|_| format!("VMS must be a count, got `{vms}`"))?;
    if !(1..=16_000).contains(&vms) {
        return Err("VMS must be within 1..=16000 (one host port per VM)".into());
    }
    // Every nft this process starts inherits the namespace.
    let file = std::fs::File::open(format!("/run/netns/{netns}"))?;
    rustix::thread::move_into_link_name_space(file.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))?;

    let nft = Nft::new();
    let all: Vec<VmRules> = (0..vms).map(vm).collect();
    let links: String = all.iter().map(|rules| format!("tuntap add dev {} mode tap\n", rules.tap)).collect();
    ip_batch(&format!("tuntap add dev eth0 mode tap\n{links}"))?;
    let mut add = Vec::new();
    for rules in &all {
        let started = Instant::now();
        nft.apply(rules)?;
        add.push(started.elapsed().as_secs_f64() * 1e3);
    }
    if nft.list_vms()?.len() != all.len() {
        return Err("not every VM was added".into());
    }
    let mut remove = Vec::new();
    for rules in &all {
        let started = Instant::now();
        nft.remove(rules)?;
        remove.push(started.elapsed().as_secs_f64() * 1e3);
    }
    if !nft.list_vms()?.is_empty() {
        return Err("VMs left after removal".into());
    }

    nft_script(
        "add table inet kiln_bench_rules\nadd chain inet kiln_bench_rules forward { type filter hook forward priority 0; }\n",
    )?;
    let mut rules_add = Vec::new();
    for rules in &all {
        let script = per_vm_rules(rules);
        let started = Instant::now();
        nft_script(&script)?;
        rules_add.push(started.elapsed().as_secs_f64() * 1e3);
    }
    nft_script("delete table inet kiln_bench_rules\n")?;

    for (name, series) in [("kiln_add", &add), ("kiln_remove", &remove), ("rules_add", &rules_add)] {
        let mut line = name.to_owned();
        for ms in series {
            write!(line, " {ms:.3}")?;
        }
        println!("{line}");
    }
    Ok(())
}

fn vm(n: u32) -> VmRules {
    let base = u32::from(Ipv4Addr::new(10, 200, 0, 0)) + n * 4;
    VmRules::new(format!("bench-{n}"), format!("kt-bench-{n}"), Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
        .with_uplink(Some("eth0".to_owned()))
        .with_firewall(Firewall {
            egress: true,
            host_ports: vec![HostPort { protocol: Protocol::Tcp, port: 7000 }],
            published_ports: vec![PublishedPort {
                protocol: Protocol::Tcp,
                host_port: u16::try_from(40_000 + n).unwrap_or(u16::MAX),
                guest_port: 80,
            }],
        })
}

/// The same VM as a chain of its own plus a jump, in nft's text syntax.
fn per_vm_rules(rules: &VmRules) -> String {
    let (id, tap) = (&rules.vm_id, &rules.tap);
    format!(
        "add chain inet kiln_bench_rules vm-{id}\n\
         add rule inet kiln_bench_rules vm-{id} ct state established,related accept\n\
         add rule inet kiln_bench_rules vm-{id} oifname eth0 accept\n\
         add rule inet kiln_bench_rules vm-{id} ip daddr {host} tcp dport 7000 accept\n\
         add rule inet kiln_bench_rules vm-{id} drop\n\
         add rule inet kiln_bench_rules forward iifname {tap} jump vm-{id}\n",
        host = rules.host_addr,
    )
}

fn ip_batch(script: &str) -> Result<(), Box<dyn Error>> {
    feed("ip", &["-batch", "-"], script)
}

fn nft_script(script: &str) -> Result<(), Box<dyn Error>> {
    feed("nft", &["-f", "-"], script)
}

/// Runs `program args` with `script` on its stdin; fails with its stderr.
fn feed(program: &str, args: &[&str], script: &str) -> Result<(), Box<dyn Error>> {
    let mut child = Command::new(program).args(args).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    child.stdin.take().ok_or("no stdin")?.write_all(script.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("{program} {} failed: {}", args[0], stderr.trim()).into());
    }
    Ok(())
}
