//! A Debian 12 root filesystem made by `debootstrap`: the third-party base
//! of the Debian-based test images (a real distribution's files, modes,
//! setuid binaries, device nodes and hard links, made by Debian's tools,
//! never by kiln). Built once per machine and cached.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bumped when what is built changes, so a stale cache is not reused.
const VERSION: &str = "bookworm-minbase-slim-v1";
const MIRROR: &str = "http://deb.debian.org/debian";

/// The rootfs directory under `cache` (e.g. `target/test-images`), built
/// with `debootstrap --variant=minbase bookworm` the first time and then
/// slimmed as Debian's `-slim` images are (no .deb cache, apt lists, docs,
/// man pages or locales), to about 80 MiB. Needs root and the Debian
/// mirror; the error says which step failed.
pub fn debian_rootfs(cache: &Path) -> Result<PathBuf, String> {
    debian_rootfs_with(cache, &[])
}

/// [`debian_rootfs`] with Debian's packages `include` installed too (and
/// what they depend on), by debootstrap's `--include`: a Debian-based
/// application image's base, e.g. with `python3`. Cached apart per list.
pub fn debian_rootfs_with(cache: &Path, include: &[&str]) -> Result<PathBuf, String> {
    let name = match include {
        [] => format!("debian-{VERSION}"),
        packages => format!("debian-{VERSION}-with-{}", packages.join("-")),
    };
    let root = cache.join(&name);
    if root.join("etc/debian_version").is_file() {
        return Ok(root);
    }
    fs::create_dir_all(cache).map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let staging = cache.join(format!(".{name}.{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let mut args = vec!["--variant=minbase".to_owned()];
    if !include.is_empty() {
        args.push(format!("--include={}", include.join(",")));
    }
    args.push("bookworm".to_owned());
    let output = Command::new("debootstrap")
        .args(&args)
        .arg(&staging)
        .arg(MIRROR)
        .output()
        .map_err(|e| format!("cannot run debootstrap: {e}"))?;
    if !output.status.success() {
        let _ = fs::remove_dir_all(&staging);
        return Err(format!(
            "debootstrap {} failed ({}):\n{}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"] {
        empty_dir(&staging.join(dir))?;
    }
    // debootstrap's log holds timings: it would make two builds differ.
    let _ = fs::remove_dir_all(staging.join("debootstrap"));
    match fs::rename(&staging, &root) {
        Ok(()) => Ok(root),
        // Another test built it meanwhile.
        Err(_) if root.join("etc/debian_version").is_file() => {
            let _ = fs::remove_dir_all(&staging);
            Ok(root)
        }
        Err(e) => Err(format!("cannot rename {} to {}: {e}", staging.display(), root.display())),
    }
}

/// Removes what `dir` holds but keeps `dir`, as the slim images do.
fn empty_dir(dir: &Path) -> Result<(), String> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(()) };
    for entry in entries {
        let path = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?.path();
        let removed =
            if path.is_dir() && !path.is_symlink() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        removed.map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
    }
    Ok(())
}
