//! `kubernetes-validate` (PyPI), the schema checker kiln-k8s's tests run
//! every rendered manifest through. Installed with pip into a venv under
//! the target directory: no system Python packages touched, nothing
//! outside the checkout written, and a pinned version whose bundled
//! schemas work offline once installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{run_command, target_dir};

/// The pinned release; its default and bundled schemas include Kubernetes
/// 1.37, the version kiln-k8s targets (`kiln_k8s::KUBERNETES_VERSION`).
const VERSION: &str = "1.37.0";

/// `target/k8s-validate`, absolute (tests run from other directories).
fn venv() -> Result<PathBuf> {
    let dir = target_dir().join("k8s-validate");
    if dir.is_absolute() {
        Ok(dir)
    } else {
        Ok(std::env::current_dir().context("cannot read the current directory")?.join(dir))
    }
}

/// The venv's `bin` directory, to put first on the tests' PATH.
pub(crate) fn bin_dir() -> Result<PathBuf> {
    Ok(venv()?.join("bin"))
}

/// Installs `kubernetes-validate==VERSION` into the venv unless the stamp
/// file says that exact version is already there. Needs Debian's
/// `python3-venv` (in `TEST_PACKAGES`) and PyPI the first time.
pub(crate) fn ensure_installed() -> Result<()> {
    let venv = venv()?;
    let stamp = venv.join("kiln-installed");
    let tool = venv.join("bin/kubernetes-validate");
    if tool.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|v| v.trim() == VERSION) {
        println!("kubernetes-validate {VERSION} is installed in {}", venv.display());
        return Ok(());
    }
    // Debian's interpreter, whose venv module python3-venv provides; a
    // python3 earlier on PATH (pyenv, conda) may lack it.
    let python = if Path::new("/usr/bin/python3").is_file() { "/usr/bin/python3" } else { "python3" };
    println!("installing kubernetes-validate {VERSION} into {}", venv.display());
    run_command(Command::new(python).args(["-m", "venv", "--clear"]).arg(&venv))
        .with_context(|| format!("cannot create a Python venv with {python} (Debian: apt-get install python3-venv)"))?;
    run_command(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--disable-pip-version-check", "--quiet"])
            .arg(format!("kubernetes-validate=={VERSION}")),
    )
    .context("pip could not install kubernetes-validate from PyPI")?;
    if !tool.is_file() {
        bail!("pip succeeded but {} does not exist", tool.display());
    }
    run_command(Command::new(&tool).arg("--version"))?;
    std::fs::write(&stamp, format!("{VERSION}\n")).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(())
}

/// `PATH` with the venv's `bin` first.
pub(crate) fn path_with_bin() -> Result<std::ffi::OsString> {
    let mut dirs = vec![bin_dir()?];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).context("cannot build PATH")
}
