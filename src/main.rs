//! The `kiln` command line. Errors print as `error: ...` with one
//! `  caused by: ...` line per cause; exit status 1 for a failed command and
//! 2 for a usage error (clap's own).

mod image;
#[cfg(feature = "k8s")]
mod k8scmd;
#[cfg(not(feature = "k8s"))]
mod k8scmd {
    //! `kiln k8s` and `kiln render --target k8s` in a kiln built without
    //! the `k8s` feature: the same flags, and one clear error.

    use std::path::Path;
    use std::process::ExitCode;

    use anyhow::{Result, bail};
    use clap::Args;

    pub(crate) use crate::PlacementArgs;

    /// Whatever follows `kiln k8s`.
    #[derive(Debug, Args)]
    pub(crate) struct K8sArgs {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    }

    fn disabled() -> Result<ExitCode> {
        bail!("kiln was built without the k8s feature; rebuild with `--features k8s` (it is on by default)")
    }

    pub(crate) fn render(_spec: &Path, _placement: &PlacementArgs, _namespace: Option<&str>) -> Result<ExitCode> {
        disabled()
    }

    pub(crate) fn k8s(_args: &K8sArgs) -> Result<ExitCode> {
        disabled()
    }
}
mod runcmd;
mod vms;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Pack a service into disk images and run it in a microVM or as a Kubernetes Pod"
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build and inspect disk images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Run a spec in a microVM; the exit code is the service's.
    Run(runcmd::RunArgs),
    /// Print what a spec becomes, without running anything.
    Render(runcmd::RenderArgs),
    /// List the VMs kiln knows, running or not.
    Ps(vms::PsArgs),
    /// Release what VMs whose launcher died still hold: VMM processes,
    /// taps, firewall elements, leases, state.
    Gc(vms::GcArgs),
    /// Stop a running VM: SIGTERM to the service, then power-off.
    Stop(vms::StopArgs),
    /// Print a VM's console output.
    Logs(vms::LogsArgs),
    /// Run a spec as a Kubernetes Pod: apply, status, logs, delete, gc.
    K8s(k8scmd::K8sArgs),
}

/// Where the objects go and what the operator set for every Pod: shared by
/// `kiln render --target k8s` and `kiln k8s apply`. Defined here, outside
/// the `k8s` feature, so `kiln render --target vm` refuses them alike either way.
#[derive(Debug, Args)]
pub(crate) struct PlacementArgs {
    /// The operator's cluster-wide defaults, a TOML file (default:
    /// $KILN_K8S_DEFAULTS); see docs/kubernetes.md.
    #[arg(long, value_name = "FILE")]
    pub(crate) defaults: Option<std::path::PathBuf>,
    /// The host's address as Pods see it, for `network.host_ports` and
    /// loopback URLs in `env` (overrides the defaults file's `host_address`).
    #[arg(long, value_name = "IP")]
    pub(crate) host_address: Option<std::net::IpAddr>,
}

impl PlacementArgs {
    /// Whether any of these flags was given.
    pub(crate) fn any(&self) -> bool {
        self.defaults.is_some() || self.host_address.is_some()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    if cli.command.only_prints() {
        end_quietly_when_stdout_closes();
    }
    let result = match cli.command {
        Command::Run(args) => runcmd::run(&args),
        Command::Render(args) => runcmd::render(&args),
        Command::Image(command) => image::run(command).map(|()| ExitCode::SUCCESS),
        Command::Ps(args) => vms::ps(&args),
        Command::Gc(args) => vms::gc(&args),
        Command::Stop(args) => vms::stop(&args),
        Command::Logs(args) => vms::logs(&args),
        Command::K8s(args) => k8scmd::k8s(&args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

impl Command {
    /// Whether the command only prints (no VM, store or host state changes
    /// under way), so being ended by a closed stdout loses nothing.
    fn only_prints(&self) -> bool {
        matches!(self, Command::Render(_) | Command::Ps(_) | Command::Logs(_))
    }
}

/// `kiln render | head` ends as `cat` does, by SIGPIPE, instead of
/// panicking in `println!` (Rust ignores SIGPIPE, so a write to a closed
/// pipe fails with EPIPE). Only for commands that only print: a `kiln run`
/// must outlive its terminal and clean up after its VM.
fn end_quietly_when_stdout_closes() {
    // SAFETY: called on the main thread before any other thread exists;
    // restoring a signal's default disposition has no other effect.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Logs go to stderr: warnings by default, more with -v, or what RUST_LOG says.
fn init_tracing(verbose: u8) {
    let default = match verbose {
        // kube logs failed requests itself; kiln reports them as its one error.
        0 => "warn,kube_client=off",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
