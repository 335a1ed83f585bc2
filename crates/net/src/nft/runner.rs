//! [`Nft`], and the one place kiln spawns `nft`: in the C locale (kiln
//! reads its error text), optionally inside a network namespace, with
//! errors that name what is missing.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use super::TABLE;
use crate::forwarding::Netns;
use crate::{Error, Result};

/// Runs `nft`, optionally inside a network namespace, and sets the IPv4
/// forwarding flags VMs need in the same namespace. The only place kiln
/// spawns `nft`.
#[derive(Debug, Clone)]
pub struct Nft {
    argv: Vec<String>,
    /// Where the forwarding flags and kiln's lock are.
    pub(super) netns: Netns,
}

impl Default for Nft {
    fn default() -> Self {
        Nft::new()
    }
}

/// Why a batch failed, where kiln takes another path.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// An element to create exists (`EEXIST`).
    Exists,
    /// The table, a set, or an element to delete is missing (`ENOENT`).
    Missing,
}

pub(super) fn refusal(error: &Error) -> Option<Refusal> {
    let Error::NftFailed { stderr, .. } = error else { return None };
    if stderr.contains("Could not process rule: File exists") {
        Some(Refusal::Exists)
    } else if stderr.contains("Error: No such file or directory")
        || stderr.contains("Could not process rule: No such file or directory")
    {
        Some(Refusal::Missing)
    } else {
        None
    }
}

impl Nft {
    /// `nft` from `PATH`, in the caller's network namespace.
    pub fn new() -> Self {
        Nft { argv: vec!["nft".to_owned()], netns: Netns::Current }
    }

    /// `ip netns exec <namespace> nft`: rules and forwarding flags go into
    /// that namespace only.
    pub fn in_namespace(namespace: &str) -> Self {
        Nft {
            argv: ["ip", "netns", "exec", namespace, "nft"].map(str::to_owned).to_vec(),
            netns: Netns::At(Path::new("/run/netns").join(namespace)),
        }
    }

    /// Any command line that ends in running nft (`sudo nft`, `setpriv ... nft`).
    /// Forwarding flags and kiln's lock are those of the caller's namespace.
    pub fn with_command<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        Nft { argv: argv.into_iter().map(Into::into).collect(), netns: Netns::Current }
    }

    /// `nft -j list table inet kiln`, or `None` if the table does not exist.
    pub fn list_table(&self) -> Result<Option<Value>> {
        self.list(&["table", "inet", TABLE])
    }

    /// `nft -j list <object...>`, or `None` if it does not exist.
    pub(super) fn list(&self, object: &[&str]) -> Result<Option<Value>> {
        let mut args = vec!["-j", "list"];
        args.extend(object);
        let output = self.run(&args, None)?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            // nft's own ENOENT for the table; `ip netns exec` failing to
            // open the namespace also says ENOENT, but not in this form.
            if stderr.starts_with("Error: No such file or directory") {
                return Ok(None);
            }
            return Err(self.failure(&args, &output));
        }
        serde_json::from_slice(&output.stdout)
            .map(Some)
            .map_err(|e| Error::NftOutput(format!("`nft -j list {}` printed invalid JSON: {e}", object.join(" "))))
    }

    pub(super) fn run_batch(&self, batch: &Value) -> Result<()> {
        let payload = serde_json::to_vec(batch).map_err(|e| Error::NftOutput(format!("cannot encode batch: {e}")))?;
        let args = ["-j", "-f", "-"];
        let output = self.run(&args, Some(&payload))?;
        if output.status.success() { Ok(()) } else { Err(self.failure(&args, &output)) }
    }

    /// The command that runs nft with `args`. kiln reads nft's error text,
    /// so nft runs in the C locale whatever the caller's.
    fn command(&self, args: &[&str]) -> Result<Command> {
        let (program, prefix) = self.argv.split_first().ok_or(Error::NftMissing)?;
        let mut command = Command::new(program);
        command.args(prefix).args(args).env("LC_ALL", "C").env_remove("LANG").env_remove("LANGUAGE");
        Ok(command)
    }

    fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<std::process::Output> {
        let mut command = self.command(args)?;
        let program = &self.argv[0];
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        command.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = command.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                match program.rsplit('/').next() {
                    Some("ip") => Error::ToolMissing { tool: program.clone(), package: "iproute2".to_owned() },
                    Some(tool @ ("setpriv" | "unshare" | "nsenter")) => {
                        Error::ToolMissing { tool: tool.to_owned(), package: "util-linux".to_owned() }
                    }
                    _ => Error::NftMissing,
                }
            } else {
                Error::NftSpawn { command: self.argv.join(" "), source }
            }
        })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A write error means nft exited early; its status and stderr say why.
            let _ = pipe.write_all(input);
        }
        child.wait_with_output().map_err(|source| Error::NftSpawn { command: self.argv.join(" "), source })
    }

    fn failure(&self, args: &[&str], output: &std::process::Output) -> Error {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if stderr.contains("exec of \"nft\" failed") {
            return Error::NftMissing;
        }
        if stderr.contains("Operation not permitted") {
            return Error::NftNotPermitted { stderr };
        }
        Error::NftFailed {
            command: format!("{} {}", self.argv.join(" "), args.join(" ")),
            status: output.status.to_string(),
            stderr,
        }
    }
}
