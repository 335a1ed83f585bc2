//! `cargo xtask bench vmm`: launcher-side time from a `VmPlan` to the boot
//! request acknowledged, per backend, against a bare client doing the same
//! VMM work in the same run (see `crates/vmm/examples/vmm_bench.rs`).
//!
//! The kernel comes from `cargo xtask guest` (`$KILN_GUEST_DIR`, else
//! `target/guest`). QEMU runs under TCG; cloud-hypervisor is measured only
//! when it is on PATH and the guest directory holds `vmlinux`.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::chart::BarChart;
use super::{Machine, Options, Target, median, number, parse_lines, print_report, remove_path};
use crate::{announce, cargo, run_command, target_dir};

/// The target: kiln within 1.2x of the bare client.
const TARGET_RATIO: f64 = 1.2;

pub(super) fn run(options: &Options) -> Result<()> {
    // kiln-vmm takes absolute paths only (a VMM's working directory is not ours).
    let guest_dir = match std::env::var_os("KILN_GUEST_DIR") {
        Some(dir) => std::path::absolute(PathBuf::from(dir)).context("cannot make KILN_GUEST_DIR absolute")?,
        None => crate::guest::guest_dir()?,
    };
    let bzimage = guest_dir.join("vmlinuz");
    if !bzimage.is_file() {
        bail!("{} does not exist: run `cargo xtask guest` or set KILN_GUEST_DIR", bzimage.display());
    }
    let vmlinux = guest_dir.join("vmlinux");
    let with_ch = on_path("cloud-hypervisor") && vmlinux.is_file();
    if !with_ch {
        println!("cloud-hypervisor not measured: needs `cloud-hypervisor` on PATH and {}", vmlinux.display());
    }
    announce("building the release vmm_bench example");
    run_command(cargo().args(["build", "--release", "-p", "kiln-vmm", "--example", "vmm_bench"]))?;
    let vmm_bench = target_dir().join("release").join("examples").join("vmm_bench");
    // Sockets must fit 107 bytes: a short directory under /tmp, not target/.
    let bench_dir = PathBuf::from(format!("/tmp/kiln-bench-vmm-{}", std::process::id()));
    remove_path(&bench_dir)?;
    fs::create_dir_all(&bench_dir).with_context(|| format!("cannot create {}", bench_dir.display()))?;

    let mut command = Command::new(&vmm_bench);
    command.arg(&bench_dir).arg(options.runs.to_string()).arg(&bzimage);
    if with_ch {
        command.arg(&vmlinux);
    }
    let output = command.output().with_context(|| format!("cannot run {}", vmm_bench.display()))?;
    let machine = Machine::detect(&bench_dir);
    remove_path(&bench_dir)?;
    if !output.status.success() {
        bail!("vmm_bench failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr).trim_end());
    }
    let rounds = parse_rounds(&String::from_utf8_lossy(&output.stdout))?;

    let header = ["backend", "bare client median ms", "kiln median ms", "kiln / bare"];
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    let mut targets = Vec::new();
    for backend in ["qemu", "cloud-hypervisor"] {
        let mine: Vec<&Round> = rounds.iter().filter(|round| round.backend == backend).collect();
        if mine.is_empty() {
            continue;
        }
        let floor = median(mine.iter().map(|round| round.floor_ms).collect());
        let kiln = median(mine.iter().map(|round| round.kiln_ms).collect());
        let ratio = kiln / floor;
        rows.push(vec![backend.to_owned(), format!("{floor:.1}"), format!("{kiln:.1}"), format!("{ratio:.2}x")]);
        bars.extend([(format!("{backend} bare client"), floor), (format!("{backend} through kiln-vmm"), kiln)]);
        targets.push(Target {
            description: format!("{backend}: kiln within {TARGET_RATIO}x of the bare client"),
            met: ratio <= TARGET_RATIO,
            actual: format!("{ratio:.2}x"),
        });
    }
    let workload = format!(
        "1 vCPU, 256 MiB, no disks, the Debian cloud kernel from {}: `vmlinuz` for QEMU (TCG, started paused){}",
        guest_dir.display(),
        if with_ch { ", `vmlinux` for cloud-hypervisor (KVM)" } else { "" }
    );
    let method = format!(
        "median of {} interleaved rounds after one warm-up each, timed inside `vmm_bench` from spawn to the boot \
         request acknowledged (QEMU: QMP greeting, qmp_capabilities, cont; cloud-hypervisor: vmm.ping, vm.create, \
         vm.boot); the bare client is the same VMM command line driven by a minimal client without kiln's \
         process-group, PDEATHSIG, log files, validation and deadlines",
        options.runs
    );
    print_report("VMM launch: `cargo xtask bench vmm`", &machine, &workload, &method, (&header, &rows), &targets);
    BarChart::peers(
        "VMM start: spawn to the boot request acknowledged",
        format!("median ms of {} rounds", options.runs),
        bars,
    )
    .write("vmm")?;
    Ok(())
}

fn on_path(tool: &str) -> bool {
    kiln_vmm::find_on_path(tool).is_some()
}

#[derive(Debug, PartialEq)]
struct Round {
    backend: String,
    floor_ms: f64,
    kiln_ms: f64,
}

/// Parses `BACKEND floor_ms F kiln_ms K` lines.
fn parse_rounds(stdout: &str) -> Result<Vec<Round>> {
    parse_lines(stdout, "vmm_bench", |fields| {
        Ok(match fields {
            [backend, "floor_ms", floor, "kiln_ms", kiln] => {
                Some(Round { backend: (*backend).to_owned(), floor_ms: number(floor)?, kiln_ms: number(kiln)? })
            }
            _ => None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_parsed() {
        let rounds = parse_rounds("qemu floor_ms 60.5 kiln_ms 61.0\n").expect("a valid line");
        assert_eq!(rounds, [Round { backend: "qemu".into(), floor_ms: 60.5, kiln_ms: 61.0 }]);
        assert!(parse_rounds("qemu floor_ms fast kiln_ms 1").is_err());
        assert!(parse_rounds("hello").is_err());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
