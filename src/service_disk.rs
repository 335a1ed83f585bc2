//! The service disk (label `SERVICEDISK`): what a microVM needs to run one
//! service. Its root holds
//!
//! - `service`: the service binary, copied from the host;
//! - `launch`: the generated POSIX sh script (see [`LaunchScript`]) that
//!   exports the environment and execs `/srv/service` with its arguments;
//! - one directory per extra tree (a `keystore/`, say), each named by a
//!   single path component.
//!
//! FAT keeps no mode bits, and the disk carries no sidecar for them: the
//! guest mounts it read-only at `/srv` with vfat's default masks, under
//! which every file is executable, so `service` and `launch` run as they
//! are. A tree marked secret makes the whole image file mode 0600 on the host.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;

use kiln_imagefmt::FatTree;

use crate::{Error, LaunchScript, Result};

/// File names the service disk keeps for itself at its root.
const SERVICE_FILE: &str = "service";
const LAUNCH_FILE: &str = "launch";

/// A service disk to build: the binary, how to launch it, and extra trees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDisk {
    /// Host path of the service binary (symlinks followed).
    pub binary: PathBuf,
    pub launch: LaunchScript,
    pub trees: Vec<DiskTree>,
}

/// A host directory placed under one name at the service disk's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskTree {
    /// The directory's name on the disk: one path component.
    pub name: String,
    /// The host directory whose contents go under `name`.
    pub source: PathBuf,
    /// Whether the tree holds secrets; if any does, the image is mode 0600.
    pub secret: bool,
}

impl ServiceDisk {
    /// The volume label the guest looks for (kiln-guest owns it).
    pub const LABEL: &'static str = kiln_guest::SERVICE_DISK_LABEL;

    /// The disk's file tree, ready for [`FatTree::layout`] with label
    /// [`ServiceDisk::LABEL`]. Checks names, the launch script and every
    /// source path; reads no file contents.
    pub fn tree(&self) -> Result<FatTree> {
        let script = self.launch.render()?;
        let mut image = FatTree::new();
        image.add_file_from_path(SERVICE_FILE, &self.binary)?;
        image.add_file_from_bytes(LAUNCH_FILE, script)?;
        add_trees(&mut image, &self.trees)?;
        Ok(image)
    }
}

/// The service disk of a VM that runs an OCI image: kiln-init's container
/// config (`config_name`, holding `config`) instead of `service` and
/// `launch`, and the same extra trees.
pub(crate) fn container_disk_tree(config_name: &str, config: &[u8], trees: &[DiskTree]) -> Result<FatTree> {
    let mut image = FatTree::new();
    image.add_file_from_bytes(config_name, config.to_vec())?;
    add_trees(&mut image, trees)?;
    Ok(image)
}

/// Checks the trees' names and adds each under its name.
fn add_trees(image: &mut FatTree, trees: &[DiskTree]) -> Result<()> {
    let mut seen = HashSet::new();
    for tree in trees {
        validate_tree_name(&tree.name)?;
        if !seen.insert(tree.name.to_lowercase()) {
            return Err(Error::DuplicateTree { name: tree.name.clone() });
        }
    }
    for tree in trees {
        // A file here would land as a file named like the tree; only a
        // directory means what the caller asked for. Other stat errors are
        // left to add_host_path, which names the path and the cause.
        if fs::metadata(&tree.source).is_ok_and(|meta| !meta.is_dir()) {
            return Err(Error::TreeNotADirectory { name: tree.name.clone(), source_path: tree.source.clone() });
        }
        // Created first so an empty source still gives an empty directory.
        image.add_dir(&tree.name)?;
        image.add_host_path(&tree.name, &tree.source)?;
        if tree.secret {
            image.mark_secret();
        }
    }
    Ok(())
}

/// A tree name is one path component that does not shadow `service` or
/// `launch`; FAT's own rules (characters, length) are checked when it is added.
pub(crate) fn validate_tree_name(name: &str) -> Result<()> {
    let invalid = |reason| Err(Error::InvalidTreeName { name: name.to_owned(), reason });
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name == "." || name == ".." {
        return invalid("it must name a directory inside the disk");
    }
    if name.contains('/') || name.contains('\\') {
        return invalid("it must be a single name, without `/`");
    }
    if name.eq_ignore_ascii_case(SERVICE_FILE) || name.eq_ignore_ascii_case(LAUNCH_FILE) {
        return invalid("`service` and `launch` are the disk's own files");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use expect_test::{Expect, expect};

    use super::{DiskTree, ServiceDisk};
    use crate::LaunchScript;

    fn check_tree_names(names: &[&str], expect: Expect) {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("bin");
        std::fs::write(&binary, b"\x7fELF").unwrap();
        let disk = ServiceDisk {
            binary,
            launch: LaunchScript::default(),
            trees: names
                .iter()
                .map(|name| DiskTree { name: name.to_string(), source: dir.path().to_path_buf(), secret: false })
                .collect(),
        };
        let actual = match disk.tree() {
            Ok(tree) => format!("ok: {} files, {} dirs", tree.file_count(), tree.dir_count()),
            Err(err) => format!("error: {err}"),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn tree_names() {
        check_tree_names(&[], expect!["ok: 2 files, 0 dirs"]);
        check_tree_names(&["keystore"], expect!["ok: 3 files, 1 dirs"]);
        check_tree_names(&["", "x"], expect![[r#"error: Invalid service disk tree name "": it is empty"#]]);
        check_tree_names(
            &[".."],
            expect![[r#"error: Invalid service disk tree name "..": it must name a directory inside the disk"#]],
        );
        check_tree_names(
            &["a/b"],
            expect![[r#"error: Invalid service disk tree name "a/b": it must be a single name, without `/`"#]],
        );
        check_tree_names(
            &["../etc"],
            expect![[r#"error: Invalid service disk tree name "../etc": it must be a single name, without `/`"#]],
        );
        check_tree_names(
            &["Launch"],
            expect![[
                r#"error: Invalid service disk tree name "Launch": `service` and `launch` are the disk's own files"#
            ]],
        );
        check_tree_names(
            &["keys", "KEYS"],
            expect![[r#"error: Service disk tree "KEYS" is given twice (FAT ignores case)"#]],
        );
        check_tree_names(
            &["a:b"],
            expect![[r#"error: Invalid name "a:b" for a FAT image: FAT names cannot contain ':'"#]],
        );
    }
}
