//! cloud-init's NoCloud seed: a FAT volume labelled `CIDATA` holding
//! `user-data`, `meta-data` and, optionally, `network-config` and `vendor-data`.

use crate::{FatTree, Result};

/// The files of a NoCloud seed, as bytes. [`NoCloudSeed::tree`] turns them
/// into a [`FatTree`] to lay out with the label [`NoCloudSeed::LABEL`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoCloudSeed {
    pub user_data: Vec<u8>,
    pub meta_data: Vec<u8>,
    /// Network configuration, version 1 or 2.
    pub network_config: Option<Vec<u8>>,
    pub vendor_data: Option<Vec<u8>>,
}

impl NoCloudSeed {
    /// The volume label cloud-init looks for.
    pub const LABEL: &'static str = "CIDATA";

    /// Renders `meta-data` with the two keys cloud-init needs. Values are
    /// emitted as YAML double-quoted scalars, so any string stays a string.
    pub fn meta_data(instance_id: &str, local_hostname: &str) -> Vec<u8> {
        format!("instance-id: {}\nlocal-hostname: {}\n", yaml_quote(instance_id), yaml_quote(local_hostname))
            .into_bytes()
    }

    /// The seed's files as a tree.
    pub fn tree(&self) -> Result<FatTree> {
        let mut tree = FatTree::new();
        tree.add_file_from_bytes("user-data", self.user_data.clone())?;
        tree.add_file_from_bytes("meta-data", self.meta_data.clone())?;
        if let Some(network_config) = &self.network_config {
            tree.add_file_from_bytes("network-config", network_config.clone())?;
        }
        if let Some(vendor_data) = &self.vendor_data {
            tree.add_file_from_bytes("vendor-data", vendor_data.clone())?;
        }
        Ok(tree)
    }
}

/// A YAML double-quoted scalar: escapes `"`, `\` and every control character.
fn yaml_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    #[test]
    fn meta_data_quotes_anything() {
        let rendered = NoCloudSeed::meta_data("vm-1", "we\"ird\\host\nname: injected\u{7}");
        expect![[r#"
            instance-id: "vm-1"
            local-hostname: "we\"ird\\host\nname: injected\u0007"
        "#]]
        .assert_eq(&String::from_utf8_lossy(&rendered));
    }

    #[test]
    fn seed_tree_holds_the_optional_files_only_when_given() {
        let mut seed = NoCloudSeed { user_data: b"#cloud-config\n".to_vec(), ..NoCloudSeed::default() };
        assert_eq!(seed.tree().unwrap().file_count(), 2);
        seed.network_config = Some(b"version: 2\n".to_vec());
        seed.vendor_data = Some(Vec::new());
        assert_eq!(seed.tree().unwrap().file_count(), 4);
    }
}
