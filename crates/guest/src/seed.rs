//! The NoCloud seed as kiln-init reads it: `meta-data` gives the hostname,
//! `network-config` (version 2, netplan style, or version 1) gives eth0's
//! IPv4 address and default route. kiln-init has no DHCP client and the
//! kernel no `CONFIG_IP_PNP`, so a static address is the only kind there is.

use std::net::Ipv4Addr;

use yaml_rust2::{Yaml, YamlLoader};

use crate::{Error, Result};

/// What kiln-init configures from the seed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestConfig {
    /// `local-hostname` from `meta-data`.
    pub hostname: Option<String>,
    /// The first interface's static IPv4 configuration.
    pub ipv4: Option<Ipv4Config>,
}

/// One interface's static IPv4 address and default route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Config {
    pub interface: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
}

impl GuestConfig {
    /// Reads `meta-data` and, when the seed has one, `network-config`.
    pub fn parse(meta_data: &str, network_config: Option<&str>) -> Result<GuestConfig> {
        let meta = load("meta-data", meta_data)?;
        let hostname = match &meta["local-hostname"] {
            Yaml::BadValue | Yaml::Null => None,
            value => Some(validate_hostname(&scalar("meta-data", "local-hostname", value)?)?),
        };
        let ipv4 = match network_config {
            Some(text) => network(&load("network-config", text)?)?,
            None => None,
        };
        Ok(GuestConfig { hostname, ipv4 })
    }
}

const NET: &str = "network-config";

fn load(file: &'static str, text: &str) -> Result<Yaml> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| Error::Seed { file, reason: e.to_string() })?;
    match docs.into_iter().next() {
        None => Ok(Yaml::Null),
        Some(doc @ (Yaml::Hash(_) | Yaml::Null)) => Ok(doc),
        Some(_) => Err(Error::Seed { file, reason: "the document is not a mapping".to_owned() }),
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::Seed { file: NET, reason: reason.into() }
}

/// A scalar as text (YAML reads `2` as an integer and `true` as a bool).
fn scalar(file: &'static str, key: &str, value: &Yaml) -> Result<String> {
    match value {
        Yaml::String(text) | Yaml::Real(text) => Ok(text.clone()),
        Yaml::Integer(number) => Ok(number.to_string()),
        Yaml::Boolean(flag) => Ok(flag.to_string()),
        _ => Err(Error::Seed { file, reason: format!("`{key}` is not a scalar") }),
    }
}

/// RFC 1123 host names: labels of letters, digits and `-`, at most 64 bytes
/// in all (the kernel's limit).
fn validate_hostname(name: &str) -> Result<String> {
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() > 64 || !name.split('.').all(valid_label) {
        return Err(Error::Seed { file: "meta-data", reason: format!("{name:?} is not a valid host name") });
    }
    Ok(name.to_owned())
}

fn network(doc: &Yaml) -> Result<Option<Ipv4Config>> {
    // cloud-init accepts both a bare config and one under `network:`.
    let doc = if let Yaml::Hash(_) = doc["network"] { &doc["network"] } else { doc };
    match &doc["version"] {
        Yaml::Integer(2) => version2(doc),
        Yaml::Integer(1) => version1(doc),
        Yaml::BadValue | Yaml::Null if matches!(doc, Yaml::Null) => Ok(None),
        Yaml::BadValue => Err(invalid("`version` is missing")),
        other => Err(invalid(format!("version {} is not supported (1 or 2)", scalar(NET, "version", other)?))),
    }
}

/// `ethernets: {eth0: {addresses: [A/N], gateway4: G | routes: [{to: default, via: G}]}}`
fn version2(doc: &Yaml) -> Result<Option<Ipv4Config>> {
    let Some(ethernets) = doc["ethernets"].as_hash() else {
        return match doc["ethernets"] {
            Yaml::BadValue | Yaml::Null => Ok(None),
            _ => Err(invalid("`ethernets` is not a mapping")),
        };
    };
    let Some((name, interface)) = pick_interface(ethernets.iter()) else {
        return Ok(None);
    };
    let interface_name = scalar(NET, "ethernets", name)?;
    if matches!(interface["dhcp4"], Yaml::Boolean(true)) {
        return Err(invalid(format!("{interface_name}: dhcp4 is not supported; give a static address")));
    }
    let mut address = None;
    for entry in list(&interface["addresses"], "addresses")? {
        let text = scalar(NET, "addresses", entry)?;
        if text.contains(':') {
            continue; // IPv6: not configured by kiln-init.
        }
        address = Some(parse_cidr(&text)?);
        break;
    }
    let Some((address, prefix_len)) = address else {
        return Err(invalid(format!("{interface_name}: no IPv4 address in `addresses`")));
    };
    let mut gateway = match &interface["gateway4"] {
        Yaml::BadValue | Yaml::Null => None,
        value => Some(parse_ip(&scalar(NET, "gateway4", value)?)?),
    };
    for route in list(&interface["routes"], "routes")? {
        let to = scalar(NET, "routes.to", &route["to"])?;
        if to == "default" || to == "0.0.0.0/0" {
            gateway = Some(parse_ip(&scalar(NET, "routes.via", &route["via"])?)?);
        }
    }
    Ok(Some(Ipv4Config { interface: interface_name, address, prefix_len, gateway }))
}

/// `config: [{type: physical, name: eth0, subnets: [{type: static, address: A/N, gateway: G}]}]`
fn version1(doc: &Yaml) -> Result<Option<Ipv4Config>> {
    let physical = list(&doc["config"], "config")?
        .iter()
        .filter(|entry| entry["type"].as_str() == Some("physical"))
        .map(|entry| (&entry["name"], entry));
    let Some((name, interface)) = pick_interface(physical) else {
        return Ok(None);
    };
    let interface_name = scalar(NET, "name", name)?;
    for subnet in list(&interface["subnets"], "subnets")? {
        match subnet["type"].as_str() {
            Some("static") => {}
            Some("dhcp" | "dhcp4") => {
                return Err(invalid(format!("{interface_name}: dhcp is not supported; give a static address")));
            }
            _ => continue,
        }
        let text = scalar(NET, "address", &subnet["address"])?;
        let (address, prefix_len) = match &subnet["netmask"] {
            Yaml::BadValue | Yaml::Null => parse_cidr(&text)?,
            mask => (parse_ip(&text)?, netmask_prefix(&scalar(NET, "netmask", mask)?)?),
        };
        let gateway = match &subnet["gateway"] {
            Yaml::BadValue | Yaml::Null => None,
            value => Some(parse_ip(&scalar(NET, "gateway", value)?)?),
        };
        return Ok(Some(Ipv4Config { interface: interface_name, address, prefix_len, gateway }));
    }
    Err(invalid(format!("{interface_name}: no static IPv4 subnet")))
}

/// `eth0` if present, else the first interface listed.
fn pick_interface<'a>(interfaces: impl Iterator<Item = (&'a Yaml, &'a Yaml)>) -> Option<(&'a Yaml, &'a Yaml)> {
    let all: Vec<_> = interfaces.collect();
    all.iter().find(|(name, _)| name.as_str() == Some("eth0")).or(all.first()).copied()
}

fn list<'a>(value: &'a Yaml, key: &str) -> Result<&'a [Yaml]> {
    match value {
        Yaml::Array(items) => Ok(items),
        Yaml::BadValue | Yaml::Null => Ok(&[]),
        _ => Err(invalid(format!("`{key}` is not a list"))),
    }
}

fn parse_ip(text: &str) -> Result<Ipv4Addr> {
    text.parse().map_err(|_| invalid(format!("{text:?} is not an IPv4 address")))
}

fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8)> {
    let Some((address, prefix)) = text.split_once('/') else {
        return Err(invalid(format!("{text:?} has no /prefix length")));
    };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| invalid(format!("{text:?} has an invalid prefix length")))?;
    Ok((parse_ip(address)?, prefix))
}

fn netmask_prefix(text: &str) -> Result<u8> {
    let mask = u32::from(parse_ip(text)?);
    if mask.leading_ones() + mask.trailing_zeros() != 32 {
        return Err(invalid(format!("netmask {text:?} is not contiguous")));
    }
    Ok(mask.leading_ones() as u8)
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn check(meta_data: &str, network_config: Option<&str>, expect: Expect) {
        let actual = match GuestConfig::parse(meta_data, network_config) {
            Ok(config) => format!("{config:?}"),
            Err(err) => format!("error: {err}"),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn meta_data() {
        // What kiln-imagefmt's NoCloudSeed::meta_data writes.
        check(
            "instance-id: \"vm-1\"\nlocal-hostname: \"web-1\"\n",
            None,
            expect![[r#"GuestConfig { hostname: Some("web-1"), ipv4: None }"#]],
        );
        check("instance-id: x\n", None, expect!["GuestConfig { hostname: None, ipv4: None }"]);
        check("", None, expect!["GuestConfig { hostname: None, ipv4: None }"]);
        check(
            "local-hostname: \"a\\nb\"\n",
            None,
            expect![[r#"error: Invalid meta-data: "a\nb" is not a valid host name"#]],
        );
        check("local-hostname: [a]\n", None, expect!["error: Invalid meta-data: `local-hostname` is not a scalar"]);
        check("- a\n", None, expect!["error: Invalid meta-data: the document is not a mapping"]);
        check(
            "a: [\n",
            None,
            expect![
                "error: Invalid meta-data: while parsing a node, did not find expected node content at byte 5 line 2 column 1"
            ],
        );
    }

    #[test]
    fn network_config_v2() {
        check(
            "",
            Some("version: 2\nethernets:\n  eth0:\n    addresses: [10.0.2.15/24]\n    gateway4: 10.0.2.2\n"),
            expect![[
                r#"GuestConfig { hostname: None, ipv4: Some(Ipv4Config { interface: "eth0", address: 10.0.2.15, prefix_len: 24, gateway: Some(10.0.2.2) }) }"#
            ]],
        );
        check(
            "",
            Some(
                "network:\n  version: 2\n  ethernets:\n    lan:\n      addresses:\n        - fd00::2/64\n        - 192.168.7.2/30\n      routes:\n        - to: default\n          via: 192.168.7.1\n",
            ),
            expect![[
                r#"GuestConfig { hostname: None, ipv4: Some(Ipv4Config { interface: "lan", address: 192.168.7.2, prefix_len: 30, gateway: Some(192.168.7.1) }) }"#
            ]],
        );
        check(
            "",
            Some("version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"),
            expect!["error: Invalid network-config: eth0: dhcp4 is not supported; give a static address"],
        );
        check(
            "",
            Some("version: 2\nethernets:\n  eth0:\n    addresses: [10.0.2.15]\n"),
            expect![[r#"error: Invalid network-config: "10.0.2.15" has no /prefix length"#]],
        );
        check(
            "",
            Some("version: 2\nethernets:\n  eth0:\n    addresses: [10.0.2.15/33]\n"),
            expect![[r#"error: Invalid network-config: "10.0.2.15/33" has an invalid prefix length"#]],
        );
        check(
            "",
            Some("version: 2\nethernets:\n  eth0:\n    addresses: [10.0.2.15/24]\n    gateway4: 10.0.2\n"),
            expect![[r#"error: Invalid network-config: "10.0.2" is not an IPv4 address"#]],
        );
        check("", Some("version: 3\n"), expect!["error: Invalid network-config: version 3 is not supported (1 or 2)"]);
        check("", Some("ethernets: {}\n"), expect!["error: Invalid network-config: `version` is missing"]);
        check("", Some("version: 2\n"), expect!["GuestConfig { hostname: None, ipv4: None }"]);
    }

    #[test]
    fn network_config_v1() {
        check(
            "",
            Some(
                "version: 1\nconfig:\n  - type: physical\n    name: eth0\n    subnets:\n      - type: static\n        address: 10.1.0.2\n        netmask: 255.255.255.252\n        gateway: 10.1.0.1\n",
            ),
            expect![[
                r#"GuestConfig { hostname: None, ipv4: Some(Ipv4Config { interface: "eth0", address: 10.1.0.2, prefix_len: 30, gateway: Some(10.1.0.1) }) }"#
            ]],
        );
        check(
            "",
            Some("version: 1\nconfig:\n  - type: physical\n    name: eth0\n    subnets:\n      - type: dhcp\n"),
            expect!["error: Invalid network-config: eth0: dhcp is not supported; give a static address"],
        );
        check(
            "",
            Some(
                "version: 1\nconfig:\n  - type: physical\n    name: eth0\n    subnets:\n      - type: static\n        address: 10.1.0.2\n        netmask: 255.0.255.0\n",
            ),
            expect![[r#"error: Invalid network-config: netmask "255.0.255.0" is not contiguous"#]],
        );
    }
}
