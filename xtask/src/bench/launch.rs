//! `cargo xtask bench launch`: kiln's host-side overhead from `kiln run` to
//! the boot request, for the example shape with a 100 MiB service binary,
//! cold (every image built) and warm (images reused, keyed by the inputs'
//! metadata).
//!
//! The figures come from the `launch_bench` example, which calls
//! `kiln::run` inside a network namespace created here (root only) and
//! boots the real guest each time. Two numbers per run: "kiln" is `kiln
//! run`'s own work (spec and input checks, lease, images, tap, firewall,
//! state records) up to starting the VMM; "to boot request" adds the VMM's
//! start-up (QEMU under TCG here: its own ~50 ms, not kiln's).

use std::fs;
use std::io::Write;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::chart::{Bar, BarChart};
use super::{Machine, Options, Target, XorShift, median, print_report, remove_path};
use crate::{announce, cargo, guest, run_command, target_dir};

const PADDING_BYTES: usize = 100 << 20;
const COLD_TARGET_MS: f64 = 100.0;
const WARM_TARGET_MS: f64 = 20.0;

pub(super) fn run(options: &Options) -> Result<()> {
    if !crate::debian::is_root() {
        println!("bench launch: needs root (a namespace, a tap, nftables); skipped");
        return Ok(());
    }
    let guest_dir = guest::guest_dir()?;
    let probe = guest_dir.join("service-probe");
    if !probe.is_file() {
        bail!("{} is missing: run `cargo xtask guest` first", probe.display());
    }
    announce("building the release launch_bench example");
    run_command(cargo().args(["build", "--release", "-p", "kiln", "--example", "launch_bench"]))?;
    let bench = target_dir().join("release").join("examples").join("launch_bench");

    let dir = std::path::absolute(target_dir().join("bench").join("launch"))?;
    remove_path(&dir)?;
    fs::create_dir_all(dir.join("keystore")).with_context(|| format!("cannot create {}", dir.display()))?;
    // A static binary padded to 100 MiB with incompressible bytes (ELF
    // ignores what follows its segments), so images really cost a copy.
    let service = dir.join("service");
    let mut bytes = fs::read(&probe).with_context(|| format!("cannot read {}", probe.display()))?;
    let mut padding = vec![0u8; PADDING_BYTES];
    XorShift::new(42).fill(&mut padding);
    bytes.extend_from_slice(&padding);
    fs::File::create(&service)?.write_all(&bytes)?;
    fs::set_permissions(&service, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    fs::write(dir.join("keystore/key"), b"bench key\n")?;
    let spec = dir.join("kiln.toml");
    fs::write(
        &spec,
        "name = \"bench\"\n[service]\nbinary = \"service\"\nenv = { RPC_URL = \"http://127.0.0.1:7000\" }\n\
         files = { keystore = { path = \"keystore\", secret = true } }\n[resources]\nmemory = \"256MiB\"\n\
         storage = \"64MiB\"\n[network]\nhost_ports = [7000]\npublish = [\"8080:80\"]\n",
    )?;

    let netns = format!("kiln-bench-launch-{}", std::process::id());
    run_command(Command::new("ip").args(["netns", "add", &netns]))?;
    announce(&format!("launch_bench: {} cold and {} warm runs, each booting the guest", options.runs, options.runs));
    let output = Command::new(&bench)
        .arg(&netns)
        .arg(dir.join("state"))
        .arg(&guest_dir)
        .arg(&spec)
        .arg(options.runs.to_string())
        .env("KILN_QEMU_ACCEL", "tcg")
        .output();
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    let output = output.with_context(|| format!("cannot run {}", bench.display()))?;
    if !output.status.success() {
        bail!("launch_bench failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr).trim_end());
    }
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [kind, "host_ms", host, "boot_request_ms", boot] = fields.as_slice() else {
            bail!("unexpected launch_bench line `{line}`");
        };
        let sample: (f64, f64) = (host.parse()?, boot.parse()?);
        match *kind {
            "cold" => cold.push(sample),
            "warm" => warm.push(sample),
            other => bail!("unexpected run kind `{other}`"),
        }
    }
    if cold.len() != options.runs || warm.len() != options.runs {
        bail!("launch_bench printed {} cold and {} warm runs, expected {}", cold.len(), warm.len(), options.runs);
    }
    let machine = Machine::detect(&dir);
    remove_path(&dir)?;

    let host = |runs: &[(f64, f64)]| median(runs.iter().map(|r| r.0).collect());
    let boot = |runs: &[(f64, f64)]| median(runs.iter().map(|r| r.1).collect());
    let header = ["run", "kiln's own work ms", "to boot request ms (with QEMU start-up)"];
    let rows = vec![
        vec!["cold (images built)".to_owned(), format!("{:.1}", host(&cold)), format!("{:.1}", boot(&cold))],
        vec!["warm (images reused)".to_owned(), format!("{:.1}", host(&warm)), format!("{:.1}", boot(&warm))],
    ];
    let targets = [
        Target {
            description: "cold: kiln's host-side work <= 100 ms".to_owned(),
            met: host(&cold) <= COLD_TARGET_MS,
            actual: format!("{:.1} ms", host(&cold)),
        },
        Target {
            description: "warm: kiln's host-side work <= 20 ms".to_owned(),
            met: host(&warm) <= WARM_TARGET_MS,
            actual: format!("{:.1} ms", host(&warm)),
        },
    ];
    let workload = "the example's shape with a 100 MiB static service binary, a secret keystore, a 64 MiB data disk, \
                    a host port and a published port; QEMU under TCG, inside a fresh network namespace";
    let method = format!(
        "median of {} cold and {} warm runs (interleaved, after one untimed pair), timed inside `kiln::run`; \
         cold empties the state directory first",
        options.runs, options.runs
    );
    print_report("Launch: `cargo xtask bench launch`", &machine, workload, &method, (&header, &rows), &targets);
    BarChart {
        title: "kiln run: host-side work, then QEMU's start, to the boot request".to_owned(),
        axis: format!("median ms of {} runs", options.runs),
        segments: vec!["kiln's own work".into(), "QEMU start-up".into()],
        bars: [("cold (images built)", &cold), ("warm (images reused)", &warm)]
            .into_iter()
            .map(|(label, runs)| Bar::new(label, vec![host(runs), boot(runs) - host(runs)]))
            .collect(),
    }
    .write("launch")?;
    Ok(())
}
