//! The firewall of one service: what it may reach and what the host
//! publishes. It sits at the spec edge (serde); kiln-net turns it into
//! nftables rules and kiln-k8s into a NetworkPolicy, so it says *what* is
//! allowed, never *how*. Everything not listed is denied, and traffic
//! between VMs is always denied.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The transport protocol of a port rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The nftables / Kubernetes spelling: `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port on the host (the VM's host-side address) the guest may connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPort {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The destination port on the host address (1..=65535).
    pub port: u16,
}

/// A host port forwarded (DNAT) to a port of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PublishedPort {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The port on the host's own addresses.
    pub host_port: u16,
    /// The port on the guest address it is forwarded to.
    pub guest_port: u16,
}

/// The firewall of one VM. The default denies everything: no egress, no
/// host ports, nothing published.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Firewall {
    /// Whether the guest may open connections to the outside through the
    /// uplink (masqueraded as the host).
    #[serde(default)]
    pub egress: bool,
    /// Ports on the host the guest may reach; every other host port is dropped.
    #[serde(default)]
    pub host_ports: Vec<HostPort>,
    /// Host ports forwarded to the guest.
    #[serde(default)]
    pub published_ports: Vec<PublishedPort>,
}

impl Firewall {
    /// Checks ports are non-zero and no host port is published twice. The
    /// error is kiln-types' [`Error`], converted into the caller's own (so
    /// kiln-net and kiln-k8s can return it as theirs).
    pub fn validate<E: From<Error>>(&self) -> Result<(), E> {
        for host in &self.host_ports {
            if host.port == 0 {
                return Err(E::from(Error::InvalidFirewall(format!(
                    "host port {}/0: port 0 is not a port",
                    host.protocol
                ))));
            }
        }
        let mut published = BTreeSet::new();
        for p in &self.published_ports {
            if p.host_port == 0 || p.guest_port == 0 {
                return Err(E::from(Error::InvalidFirewall(format!(
                    "published port {}/{} -> {}: port 0 is not a port",
                    p.protocol, p.host_port, p.guest_port
                ))));
            }
            if !published.insert((p.protocol, p.host_port)) {
                return Err(E::from(Error::InvalidFirewall(format!(
                    "host port {}/{} is published more than once",
                    p.protocol, p.host_port
                ))));
            }
        }
        Ok(())
    }
}
