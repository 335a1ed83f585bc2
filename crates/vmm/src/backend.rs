//! Which VMM runs a VM: the caller's choice ([`BackendChoice`], what a spec
//! or `--vmm` says), resolved against this host into a [`Backend`], and the
//! one `PATH` lookup kiln uses for the programs it starts ([`find_on_path`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::{Accel, AccelChoice};

/// The VMM that runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    CloudHypervisor,
    Qemu,
}

impl Backend {
    /// The program this backend starts when no binary is given.
    pub fn program(self) -> &'static str {
        match self {
            Backend::CloudHypervisor => "cloud-hypervisor",
            Backend::Qemu => "qemu-system-x86_64",
        }
    }

    /// The short name kiln records and prints (`cloud-hypervisor`, `qemu`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::CloudHypervisor => "cloud-hypervisor",
            Backend::Qemu => "qemu",
        }
    }
}

/// A VMM choice before it is resolved against the host: `auto`,
/// `cloud-hypervisor` or `qemu` (the spec's `vm.backend`, kiln's `--vmm`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    /// cloud-hypervisor when it and KVM work, else QEMU.
    #[default]
    Auto,
    /// cloud-hypervisor only.
    CloudHypervisor,
    /// QEMU only.
    Qemu,
}

impl BackendChoice {
    /// Every choice, in the order help texts list them.
    pub const ALL: [BackendChoice; 3] = [BackendChoice::Auto, BackendChoice::CloudHypervisor, BackendChoice::Qemu];

    /// The spelling the spec and the command line use.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::CloudHypervisor => "cloud-hypervisor",
            BackendChoice::Qemu => "qemu",
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendChoice {
    type Err = String;

    /// The spellings of [`BackendChoice::as_str`]; the error lists them.
    fn from_str(text: &str) -> std::result::Result<BackendChoice, String> {
        BackendChoice::ALL.into_iter().find(|choice| choice.as_str() == text).ok_or_else(|| {
            let names: Vec<&str> = BackendChoice::ALL.iter().map(|choice| choice.as_str()).collect();
            format!("invalid value '{text}' [possible values: {}]", names.join(", "))
        })
    }
}

/// Resolves `choice`: `auto` is cloud-hypervisor when a `cloud-hypervisor`
/// binary is on `PATH` and KVM can be trusted ([`crate::probe_accel`] with
/// [`AccelChoice::Auto`] picks KVM), QEMU otherwise: QEMU's TCG runs a
/// stock kernel anywhere. An explicit choice is taken as it is; whether its
/// program is installed is [`find_on_path`]'s to say.
pub fn choose_backend(choice: BackendChoice) -> Result<Backend> {
    Ok(match choice {
        BackendChoice::Auto => {
            let accel = crate::probe_accel(AccelChoice::Auto)?;
            pick_backend(find_on_path(Backend::CloudHypervisor.program()).is_some(), accel)
        }
        BackendChoice::CloudHypervisor => Backend::CloudHypervisor,
        BackendChoice::Qemu => Backend::Qemu,
    })
}

fn pick_backend(cloud_hypervisor_on_path: bool, accel: Accel) -> Backend {
    match (cloud_hypervisor_on_path, accel) {
        (true, Accel::Kvm) => Backend::CloudHypervisor,
        _ => Backend::Qemu,
    }
}

/// The file `program` names: itself when it contains a `/`, else the first
/// regular file of that name in a `PATH` directory. `None` when there is none.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_hypervisor_only_with_trusted_kvm() {
        assert_eq!(pick_backend(true, Accel::Kvm), Backend::CloudHypervisor);
        assert_eq!(pick_backend(true, Accel::Tcg), Backend::Qemu);
        assert_eq!(pick_backend(false, Accel::Kvm), Backend::Qemu);
    }

    #[test]
    fn backend_choices_parse_and_print_as_the_spec_spells_them() {
        for choice in BackendChoice::ALL {
            assert_eq!(choice.to_string().parse::<BackendChoice>(), Ok(choice));
            let json = serde_json::to_string(&choice).expect("serializes");
            assert_eq!(json, format!("\"{choice}\""));
            assert_eq!(serde_json::from_str::<BackendChoice>(&json).expect("deserializes"), choice);
        }
        assert_eq!(
            "firecracker".parse::<BackendChoice>(),
            Err("invalid value 'firecracker' [possible values: auto, cloud-hypervisor, qemu]".to_owned())
        );
    }

    #[test]
    fn find_on_path_finds_files_and_takes_paths_as_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = dir.path().join("kiln-test-program");
        std::fs::write(&program, b"").expect("write");
        assert_eq!(find_on_path(program.to_str().expect("utf-8")), Some(program.clone()));
        assert_eq!(find_on_path(dir.path().join("missing").to_str().expect("utf-8")), None);
        assert_eq!(find_on_path("kiln-no-such-program-anywhere"), None);
        assert!(find_on_path("sh").is_some(), "sh is on PATH");
    }
}
