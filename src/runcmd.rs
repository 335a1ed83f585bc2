//! `kiln run` and `kiln render`: the command-line faces of [`kiln::run`].

use std::io::{IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::{HostNet, Phase, RunObserver, RunOptions, Spec};
use kiln_vmm::BackendChoice;

use crate::vms::state;

/// Set in the environment of the background `kiln run` that `--detach` starts.
const DETACHED_ENV: &str = "KILN_DETACHED";

/// `--vmm`: kiln-vmm's choices, offered (and refused) by clap as possible values.
fn vmm_parser() -> impl TypedValueParser<Value = BackendChoice> {
    PossibleValuesParser::new(BackendChoice::ALL.map(BackendChoice::as_str))
        .try_map(|name: String| name.parse::<BackendChoice>())
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The spec file (see docs/spec.md).
    spec: PathBuf,
    /// Which VMM runs the VM (default: the spec's `vm.backend`).
    #[arg(long, value_parser = vmm_parser())]
    vmm: Option<BackendChoice>,
    /// Start the VM in the background and return once it runs.
    #[arg(long)]
    detach: bool,
    /// The guest directory (default: $KILN_GUEST_DIR, then ./target/guest).
    #[arg(long)]
    guest_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Target {
    /// The VMM configuration: cloud-hypervisor's VmConfig JSON or QEMU's argv.
    Vm,
    /// The Kubernetes objects, as YAML (warnings on stderr).
    K8s,
}

#[derive(Debug, Args)]
pub(crate) struct RenderArgs {
    /// The spec file.
    spec: PathBuf,
    /// What to render.
    #[arg(long, value_enum)]
    target: Target,
    /// Which VMM to render for (default: the spec's `vm.backend`, resolved on this host).
    #[arg(long, value_parser = vmm_parser())]
    vmm: Option<BackendChoice>,
    /// The guest directory (default: $KILN_GUEST_DIR, then ./target/guest).
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// The namespace (k8s; overrides the spec's and the defaults').
    #[arg(short, long)]
    namespace: Option<String>,
    #[command(flatten)]
    placement: crate::k8scmd::PlacementArgs,
}

pub(crate) fn run(args: &RunArgs) -> Result<ExitCode> {
    // Everything kiln run (and the VMM it starts) creates is the owner's only.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let spec = Spec::load(&args.spec)?;
    kiln::refuse_pod(&spec, &args.spec)?;
    if args.detach && std::env::var_os(DETACHED_ENV).is_none() {
        return detach(args, &spec);
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("cannot handle SIGINT/SIGTERM")?;
    }
    let mut options = RunOptions::new(HostNet::from_env()?);
    options.backend = args.vmm;
    options.stop = stop;
    options.guest_dir = args.guest_dir.clone();
    let mut observer = TerminalObserver::new(std::env::var_os(DETACHED_ENV).is_some());
    let outcome = kiln::run(&spec, &args.spec, &state()?, &options, &mut observer);
    observer.finish();
    let outcome = outcome?;
    tracing::info!(
        launch_ms = outcome.launch_ms,
        reused = outcome.images_reused,
        image_ms = outcome.image_ms,
        layers_built = outcome.layers_built,
        "run finished"
    );
    // One line saying what ended the run and who says so; details (the VMM's log) after it.
    let (summary, details) = outcome.exit.how.split_once('\n').unwrap_or((&outcome.exit.how, ""));
    let source = outcome.exit.source.map(|source| format!(" ({source})")).unwrap_or_default();
    eprintln!("kiln: {}: {summary}{source}", spec.name);
    if !details.is_empty() {
        eprintln!("{details}");
    }
    Ok(ExitCode::from(u8::try_from(outcome.exit_code).unwrap_or(u8::MAX)))
}

/// Starts `kiln run` again in its own process group, output to the VM's
/// `launcher.log`, and waits until its VM runs (or it fails).
fn detach(args: &RunArgs, spec: &Spec) -> Result<ExitCode> {
    let state = state()?;
    // No gc pass may remove the VM's directory (and this log with it, if an
    // old stopped record is there) until the background run has claimed it.
    let mut gc_held_off = Some(state.hold_off_gc()?);
    let dir = state.vm_dir(spec.name.as_str());
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // It may hold what the service prints: the owner's only, like the console log.
    let log_path = dir.join("launcher.log");
    let log = std::os::unix::fs::OpenOptionsExt::mode(
        std::fs::OpenOptions::new().write(true).create(true).truncate(true),
        0o600,
    )
    .open(&log_path)
    .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut command = Command::new(std::env::current_exe().context("cannot find the kiln binary")?);
    command.arg("run").arg(&args.spec);
    if let Some(vmm) = args.vmm {
        command.arg("--vmm").arg(vmm.as_str());
    }
    if let Some(dir) = &args.guest_dir {
        command.arg("--guest-dir").arg(dir);
    }
    command.env(DETACHED_ENV, "1").stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
    let mut child = command.spawn().context("cannot start the background kiln run")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("the background kiln run exited ({status}) before its VM ran:\n{}", log.trim_end());
        }
        let ours: Vec<_> = state
            .list()?
            .into_iter()
            .filter(|e| e.record.name == spec.name.as_str() && e.alive && e.record.launcher_pid == child.id())
            .collect();
        if !ours.is_empty() {
            drop(gc_held_off.take());
        }
        let running = ours.iter().any(|e| e.record.phase >= Phase::Running);
        if running {
            println!("kiln: {} runs in the background (kiln run pid {})", spec.name, child.id());
            println!("      console: kiln logs -f {0}; stop: kiln stop {0}", spec.name);
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() > deadline {
            bail!("the VM did not start within 120 s; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Phases on stderr (a spinner on a terminal, plain lines otherwise, none
/// when detached), console bytes on stdout (not when detached: the console
/// is in the VM's console.log, and launcher.log keeps only kiln's own words).
struct TerminalObserver {
    spinner: Option<ProgressBar>,
    quiet: bool,
    stdout: std::io::Stdout,
}

impl TerminalObserver {
    fn new(quiet: bool) -> TerminalObserver {
        let spinner = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        TerminalObserver { spinner, quiet, stdout: std::io::stdout() }
    }

    fn finish(&mut self) {
        if let Some(spinner) = self.spinner.take() {
            spinner.finish_and_clear();
        }
    }
}

impl RunObserver for TerminalObserver {
    fn phase(&mut self, phase: Phase, detail: &str) {
        tracing::info!(?phase, "{detail}");
        if phase >= Phase::Running {
            // The console takes over the terminal.
            self.finish();
            return;
        }
        match &self.spinner {
            Some(spinner) => spinner.set_message(detail.to_owned()),
            None if !self.quiet => eprintln!("kiln: {detail}"),
            None => {}
        }
    }

    fn image_event(&mut self, event: kiln::ImageEvent<'_>) {
        let Some(spinner) = &self.spinner else { return };
        match event {
            kiln::ImageEvent::Blob { digest, done, total } if total > 0 => {
                let short: String = digest.to_string().chars().take(19).collect();
                spinner.set_message(format!("pulling {short} {}%", done.saturating_mul(100) / total));
            }
            kiln::ImageEvent::Converting { index, count } => {
                spinner.set_message(format!("building layer filesystem {}/{count}", index + 1));
            }
            _ => {}
        }
    }

    fn console(&mut self, bytes: &[u8]) {
        if self.quiet {
            return;
        }
        let mut out = self.stdout.lock();
        let _ = out.write_all(bytes);
        let _ = out.flush();
    }
}

pub(crate) fn render(args: &RenderArgs) -> Result<ExitCode> {
    match args.target {
        Target::Vm if args.namespace.is_some() || args.placement.any() => {
            bail!("--namespace, --defaults and --host-address are for --target k8s")
        }
        Target::Vm => {
            let spec = Spec::load(&args.spec)?;
            // What a VM of a pod would be is not decided yet: no command line for one.
            kiln::refuse_pod(&spec, &args.spec)?;
            render_vm(&spec, args)
        }
        Target::K8s => crate::k8scmd::render(&args.spec, &args.placement, args.namespace.as_deref()),
    }
}

/// What `kiln run` would hand the VMM, for the pool's first lease and the
/// state directory's paths; nothing on the host is touched.
fn render_vm(spec: &Spec, args: &RenderArgs) -> Result<ExitCode> {
    let mut options = RunOptions::new(HostNet::from_env()?);
    options.backend = args.vmm;
    options.guest_dir = args.guest_dir.clone();
    let state = kiln::StateDir::open(&kiln::StateDir::default_root()?)?;
    let planned = kiln::plan_vm(spec, &state, &options)?;
    // A shell comment before QEMU's command line; on stderr beside the JSON.
    let image_line = planned.image.as_ref().map(|(source, manifest)| match manifest {
        Some(manifest) => format!("# service.image: {source} (manifest {manifest})"),
        None => format!(
            "# service.image: {source} (not in the image store yet: kiln run or `kiln image oci pull` pulls it; its layer disks are not shown)"
        ),
    });
    match planned.backend {
        kiln_vmm::Backend::CloudHypervisor => {
            if let Some(line) = &image_line {
                eprintln!("{line}");
            }
            println!("{}", serde_json::to_string_pretty(&kiln_vmm::ch_vm_config(&planned.plan))?);
        }
        kiln_vmm::Backend::Qemu => {
            let accel = kiln_vmm::probe_accel(kiln_vmm::AccelChoice::Auto)?;
            let qmp = planned.run_dir.join("qmp.sock");
            let argv: Vec<String> = kiln_vmm::qemu_args(&planned.plan, accel, &qmp)
                .iter()
                .map(|arg| shell_quote(&arg.to_string_lossy()))
                .collect();
            if let Some(line) = &image_line {
                println!("{line}");
            }
            println!("qemu-system-x86_64 \\");
            println!("  {}", flag_lines(&argv).join(" \\\n  "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per flag with its value (`-m 512`), a flag without one alone.
fn flag_lines(argv: &[String]) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut open_flag = false;
    for arg in argv {
        match lines.last_mut() {
            Some(line) if open_flag && !arg.starts_with('-') => {
                line.push(' ');
                line.push_str(arg);
                open_flag = false;
            }
            _ => {
                open_flag = arg.starts_with('-');
                lines.push(arg.clone());
            }
        }
    }
    lines
}

fn shell_quote(word: &str) -> String {
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=,:@+".contains(&b)) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}
