//! What one VM is to nftables: its [`VmRules`], the set elements they
//! become (each tagged `kiln-vm:<id>`), the fingerprint that guards removal
//! by key, and the batches that add and remove them.

use std::net::Ipv4Addr;

use kiln_types::hash::Fnv1a64;
use serde_json::{Value, json};

use super::{
    DNAT_ADDR, DNAT_PORT, EGRESS_VIA, FINGERPRINTS, HOST_PORTS, PUBLISHED, TABLE, TAG_PREFIX, UPLINK_USERS, VM_TAPS,
};
use crate::{Error, Firewall, Result, ifname};

const MAX_VM_ID_LEN: usize = 64;

/// Everything kiln needs to write one VM's rules. Built with
/// [`VmRules::new`] and the `with_*` methods (fields may be added).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmRules {
    /// The VM's id: lowercase letters, digits, `-` and `_`, starting with a
    /// letter or digit, at most 64 bytes. It tags the VM's set elements.
    pub vm_id: String,
    /// The host side of the VM's link (a tap).
    pub tap: String,
    /// The interface egress leaves through and published ports are reached
    /// on from other hosts; kiln turns IPv4 forwarding on for it while a VM
    /// needs it. `None` (the host has no default route) refuses egress, and
    /// published ports are then reachable from the host itself only.
    pub uplink: Option<String>,
    /// The host's address on the tap: host ports are allowed on it only.
    pub host_addr: Ipv4Addr,
    /// The guest's address: published ports are forwarded to it.
    pub guest_addr: Ipv4Addr,
    /// What the guest may reach and what is published.
    pub firewall: Firewall,
}

/// Checks `id` can tag nftables elements.
pub fn validate_vm_id(id: &str) -> Result<()> {
    let invalid = |reason: &str| Err(Error::InvalidVmId { id: id.to_owned(), reason: reason.to_owned() });
    if id.is_empty() {
        return invalid("it is empty");
    }
    if id.len() > MAX_VM_ID_LEN {
        return invalid("it is longer than 64 bytes");
    }
    if !id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
        return invalid("only lowercase ASCII letters, digits, `-` and `_` are allowed");
    }
    if !id.as_bytes()[0].is_ascii_alphanumeric() {
        return invalid("it must start with a letter or digit");
    }
    Ok(())
}

impl VmRules {
    /// The rules of VM `vm_id` on `tap`, whose host side has `host_addr` and
    /// guest `guest_addr`: no uplink, and a firewall that denies everything.
    pub fn new(vm_id: impl Into<String>, tap: impl Into<String>, host_addr: Ipv4Addr, guest_addr: Ipv4Addr) -> Self {
        VmRules {
            vm_id: vm_id.into(),
            tap: tap.into(),
            uplink: None,
            host_addr,
            guest_addr,
            firewall: Firewall::default(),
        }
    }

    /// With `uplink` as the interface egress leaves through.
    pub fn with_uplink(self, uplink: Option<String>) -> Self {
        VmRules { uplink, ..self }
    }

    /// With `firewall` saying what the guest may reach and what is published.
    pub fn with_firewall(self, firewall: Firewall) -> Self {
        VmRules { firewall, ..self }
    }
}

pub(super) fn tag(vm_id: &str) -> String {
    format!("{TAG_PREFIX}{vm_id}")
}

/// One element of one of kiln's sets or maps, in nft's JSON.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Element {
    pub(super) set: &'static str,
    pub(super) key: Value,
    /// The mapped value, for the maps.
    pub(super) data: Option<Value>,
}

impl Element {
    fn set(set: &'static str, key: Value) -> Element {
        Element { set, key, data: None }
    }

    pub(super) fn command(&self, verb: &str, comment: &str) -> Value {
        let elem = json!({"elem": {"val": self.key, "comment": comment}});
        let elem = match &self.data {
            Some(data) => json!([elem, data]),
            None => elem,
        };
        json!({verb: {"element": {"family": "inet", "table": TABLE, "name": self.set, "elem": [elem]}}})
    }

    pub(super) fn delete_command(&self) -> Value {
        json!({"delete": {"element": {"family": "inet", "table": TABLE, "name": self.set, "elem": [self.key]}}})
    }

    /// The uplink of an `uplink_users` element.
    pub(super) fn uplink_of_user(&self) -> Option<String> {
        let parts = self.key.get("concat").and_then(Value::as_array).filter(|_| self.set == UPLINK_USERS)?;
        parts.first().and_then(Value::as_str).map(str::to_owned)
    }

    /// What this element claims, for a conflict message.
    pub(super) fn claim(&self) -> String {
        let parts = self.key.get("concat").and_then(Value::as_array);
        match (self.set, parts) {
            (DNAT_ADDR | DNAT_PORT, Some(parts)) => {
                format!("host port {}/{}", parts[0].as_str().unwrap_or("?"), parts[1])
            }
            (_, Some(parts)) => format!("tap `{}`", parts[0].as_str().unwrap_or("?")),
            (_, None) => format!("tap `{}`", self.key.as_str().unwrap_or("?")),
        }
    }
}

fn concat(parts: Vec<Value>) -> Value {
    json!({"concat": parts})
}

impl VmRules {
    /// Checks the VM id, interface names and firewall.
    pub fn validate(&self) -> Result<()> {
        validate_vm_id(&self.vm_id)?;
        ifname::validate_for_nft(&self.tap)?;
        if let Some(uplink) = &self.uplink {
            ifname::validate_for_nft(uplink)?;
            if uplink == &self.tap {
                return Err(Error::InvalidInterfaceName {
                    name: uplink.clone(),
                    reason: format!("it is both the tap and the uplink of VM `{}`", self.vm_id),
                });
            }
        } else if self.firewall.egress {
            return Err(Error::EgressWithoutUplink { vm_id: self.vm_id.clone() });
        }
        self.firewall.validate()
    }

    /// Whether the VM's traffic is forwarded at all: egress, or replies
    /// from a published port to another host. Then its tap needs IPv4
    /// forwarding on, and so does the uplink, if known.
    pub(super) fn needs_forwarding(&self) -> bool {
        self.firewall.egress || !self.firewall.published_ports.is_empty()
    }

    /// The uplink whose forwarding this VM needs.
    pub(super) fn forwarded_uplink(&self) -> Option<&str> {
        self.uplink.as_deref().filter(|_| self.needs_forwarding())
    }

    /// The VM's set elements: everything kiln writes for it.
    pub(super) fn elements(&self) -> Vec<Element> {
        let tap = json!(self.tap);
        let (host, guest) = (json!(self.host_addr.to_string()), json!(self.guest_addr.to_string()));
        let fw = &self.firewall;
        let mut elements = vec![Element::set(VM_TAPS, tap.clone())];
        for port in &fw.host_ports {
            let key = concat(vec![tap.clone(), host.clone(), json!(port.protocol.as_str()), json!(port.port)]);
            elements.push(Element::set(HOST_PORTS, key));
        }
        if fw.egress
            && let Some(uplink) = &self.uplink
        {
            elements.push(Element::set(EGRESS_VIA, concat(vec![tap.clone(), json!(uplink)])));
        }
        for published in &fw.published_ports {
            let proto = json!(published.protocol.as_str());
            let guest_port = json!(published.guest_port);
            let key = concat(vec![tap.clone(), guest.clone(), proto.clone(), guest_port.clone()]);
            elements.push(Element::set(PUBLISHED, key));
            let host_port = concat(vec![proto, json!(published.host_port)]);
            elements.push(Element { set: DNAT_ADDR, key: host_port.clone(), data: Some(guest.clone()) });
            elements.push(Element { set: DNAT_PORT, key: host_port, data: Some(guest_port) });
        }
        if let Some(uplink) = self.forwarded_uplink() {
            elements.push(Element::set(UPLINK_USERS, concat(vec![json!(uplink), tap.clone()])));
        }
        let fingerprint = fingerprint(&self.vm_id, &elements);
        elements.push(Element::set(FINGERPRINTS, json!(fingerprint)));
        elements
    }

    /// The nftables JSON batch (`{"nftables": [...]}`) that adds this VM to
    /// kiln's table: it *creates* the VM's elements, so it fails if any of
    /// them exists. [`setup_batch`] must have run; [`Nft::apply`] handles
    /// both, and replacement.
    pub fn add_batch(&self) -> Result<Value> {
        self.validate()?;
        let tag = tag(&self.vm_id);
        Ok(batch(self.elements().iter().map(|e| e.command("create", &tag)).collect()))
    }

    /// The batch that deletes this VM's elements (without a listing).
    ///
    /// It deletes by key, and a key (a host port, say) may belong to another
    /// VM by now, if this VM's elements were removed behind its back (by
    /// `kiln gc`) or replaced. The batch therefore also deletes the VM's
    /// fingerprint, a digest of its id and of exactly these elements, which
    /// was created in the same transaction as they were and is only ever
    /// deleted with them: if it is there, every key here is this VM's; if
    /// not, the whole transaction fails with ENOENT and nothing is deleted.
    pub fn remove_batch(&self) -> Result<Value> {
        self.validate()?;
        Ok(batch(self.elements().iter().map(Element::delete_command).collect()))
    }
}

pub(super) fn batch(commands: Vec<Value>) -> Value {
    json!({"nftables": commands})
}

/// 15 hex digits (60 bits; an `ifname` key holds 15 bytes) of a digest of
/// the VM id and its elements: FNV-1a over length-delimited fields, stable
/// across builds and toolchains, so a launcher upgraded while its VM runs
/// still removes the VM by key. Removal by tag never needs it.
fn fingerprint(vm_id: &str, elements: &[Element]) -> String {
    let mut hasher = Fnv1a64::new();
    hasher.field(vm_id.as_bytes());
    for element in elements {
        hasher.field(element.set.as_bytes()).field(element.key.to_string().as_bytes());
        // A set element and a map element with an empty value differ.
        match &element.data {
            Some(data) => hasher.field(b"data").field(data.to_string().as_bytes()),
            None => hasher.field(b"set"),
        };
    }
    format!("{:015x}", hasher.finish() >> 4)
}
