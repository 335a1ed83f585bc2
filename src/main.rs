//! The `kiln` command line. Errors print as `error: ...` with one
//! `  caused by: ...` line per cause; exit status 1 for a failed command and
//! 2 for a usage error (clap's own).

mod image;
mod vms;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Pack a service into disk images and run it in a microVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build and inspect disk images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// List the VMs kiln knows, running or not.
    Ps(vms::PsArgs),
    /// Release what VMs whose launcher died still hold: VMM processes,
    /// taps, firewall elements, leases, state.
    Gc(vms::GcArgs),
    /// Stop a running VM: SIGTERM to the service, then power-off.
    Stop(vms::StopArgs),
    /// Print a VM's console output.
    Logs(vms::LogsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Image(command) => image::run(command).map(|()| ExitCode::SUCCESS),
        Command::Ps(args) => vms::ps(&args),
        Command::Gc(args) => vms::gc(&args),
        Command::Stop(args) => vms::stop(&args),
        Command::Logs(args) => vms::logs(&args),
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
