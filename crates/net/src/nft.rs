//! Each VM's nftables rules, inside kiln's own table `inet kiln` only.
//!
//! Decision: the table, chains, sets and rules are built with the
//! `nftables` crate's schema types; its default configuration is synchronous
//! and pulls no async runtime. Set elements are written as plain JSON,
//! because the crate's `Elem` serialises absent fields as `null`, which nft
//! rejects. kiln runs `nft -j -f -` itself through [`Nft`], so tests can
//! prefix `ip netns exec <ns>` and errors name what is missing. Listings are
//! read as plain `serde_json::Value`.
//!
//! Layout: the *rules* are fixed and written once, when the table is
//! created; every VM is only a handful of *set elements*, each carrying the
//! comment `kiln-vm:<id>`:
//!
//! - `vm_taps` (ifname): every VM tap. `input` jumps to `from_vm_to_host`
//!   for packets from a tap, `forward` jumps to `to_vm` for packets to a tap
//!   and then to `from_vm` for packets from one. Each of those regular chains
//!   accepts established/related traffic, accepts what one of the sets below
//!   allows, and drops the rest.
//! - `host_ports` (tap . host address . protocol . port): what a guest may
//!   reach on the host, on its own tap address only.
//! - `egress_via` (tap . uplink): whose traffic may leave, through which
//!   uplink; the same set selects what `postrouting` masquerades. Egress
//!   needs a known uplink (see IPv4 forwarding below).
//! - `published` (tap . guest address . protocol . guest port) lets DNATed
//!   connections into a guest; `dnat_addr` and `dnat_port` (protocol . host
//!   port -> guest address / guest port) do the DNAT in `prerouting` (from
//!   outside and from other VMs) and `output` (from the host itself). nft
//!   1.0.6 cannot create a map with concatenated *data* from JSON (it
//!   silently makes a set), hence two maps.
//!
//! Why sets and not per-VM chains and rules: the kernel validates the whole
//! table (every chain reachable from a base chain) on each commit that adds
//! a rule, so per-VM rules make each addition cost O(VMs): 4 ms at 10 VMs,
//! 21 ms at 1,000, 49 ms at 3,000 on the reference machine. Adding set
//! elements triggers no validation, and the cost stays flat (see
//! BENCHMARKS.md). Traffic to any VM meets that VM's `to_vm` guard before any
//! VM's egress accept, whatever order VMs were added in, so VM-to-VM traffic
//! is denied.
//!
//! - `uplink_users` (uplink . tap): the VMs that need forwarding on an
//!   uplink; `vm_fingerprints`: one digest per applied VM (see
//!   [`VmRules::remove_batch`]). No rule reads them.
//! - `forwarding_by_kiln` (ifname, untagged): the uplinks whose IPv4
//!   forwarding kiln turned on. `forward` drops what arrives on them and
//!   is neither to nor from a VM tap: the host did not route for its
//!   neighbours before kiln came, and does not now.
//!
//! Adding a VM is one transaction that *creates* its elements: the fast path
//! needs no listing. If an element exists (the VM is being replaced, or
//! another VM holds the tap or host port), kiln lists the table, and either
//! names the conflicting VM or deletes the old elements and creates the new
//! ones in one transaction. Removal deletes the elements a [`VmRules`] names,
//! again without a listing, guarded by the VM's fingerprint so that it never
//! deletes another VM's element; removal by id and [`Nft::reconcile`] find
//! the elements by their comment in a listing.
//!
//! IPv4 forwarding: Linux forwards a packet only if the interface it arrived
//! on has `net.ipv4.conf.<if>.forwarding` on, and a stock host has it off
//! everywhere. A VM with egress or published ports needs it on its tap
//! (guest to outside) and, with egress or published ports reached from
//! another host, on the uplink (replies and incoming connections). `apply`
//! turns both on if they are off; a tap's flag dies with the tap. The
//! uplink's is restored to 0 by whichever release (`remove`, `remove_vm`,
//! `reconcile`) removes its last user, if kiln turned it on (recorded in
//! `forwarding_by_kiln`, which lives exactly as long as the namespace and
//! its flags do); a flag that was on already is never touched. kiln never
//! writes `net.ipv4.ip_forward` (that rewrites every interface's flag).
//! Every apply and release holds kiln's lock of the network namespace (see
//! `forwarding.rs`), so concurrent launchers and `kiln gc` cannot interleave
//! their read-decide-write of the flags.
//!
//! The layout version is in the set names: a future layout uses new names,
//! finds them missing and writes its own rules.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use nftables::batch::Batch;
use nftables::expr::{
    CT, Expression, Fib, FibFlag, FibResult, Map as MapLookup, Meta, MetaKey, NamedExpression, Payload, PayloadField,
};
use nftables::schema::{Chain, FlushObject, Map, NfListObject, Rule, Set, SetType, SetTypeValue, Table};
use nftables::stmt::{JumpTarget, Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde_json::{Value, json};

use crate::forwarding::{self, Netns};
use crate::{Error, Firewall, Result};

/// The nftables table kiln owns (family `inet`). kiln touches no other.
pub const TABLE: &str = "kiln";
/// Every set element kiln adds carries the comment `kiln-vm:<id>`.
pub const TAG_PREFIX: &str = "kiln-vm:";
const FAMILY: NfFamily = NfFamily::INet;
const MAX_VM_ID_LEN: usize = 64;
const IFNAMSIZ_MAX: usize = 15;

const VM_TAPS: &str = "vm_taps";
const HOST_PORTS: &str = "host_ports";
const EGRESS_VIA: &str = "egress_via";
const PUBLISHED: &str = "published";
const DNAT_ADDR: &str = "dnat_addr";
const DNAT_PORT: &str = "dnat_port";
/// (uplink . tap): the VMs that need IPv4 forwarding on an uplink.
const UPLINK_USERS: &str = "uplink_users";
/// One element per applied VM: a digest of its id and elements (see
/// [`VmRules::remove_batch`]).
const FINGERPRINTS: &str = "vm_fingerprints";
/// The sets and maps a VM's elements live in, in the order they are added.
const VM_SETS: [&str; 8] =
    [VM_TAPS, HOST_PORTS, EGRESS_VIA, PUBLISHED, DNAT_ADDR, DNAT_PORT, UPLINK_USERS, FINGERPRINTS];
/// Sets of earlier layouts that may still hold a running VM's elements
/// after an upgrade: removal by tag still finds and deletes them.
const RETIRED_VM_SETS: [&str; 1] = ["egress_any"];
/// The uplinks whose forwarding kiln turned on (untagged: no VM owns them).
const FORWARDING_BY_KILN: &str = "forwarding_by_kiln";
const FORWARDING_COMMENT: &str = "kiln turned IPv4 forwarding on; it restores 0 when no VM needs it";

const FROM_VM_TO_HOST: &str = "from_vm_to_host";
const FROM_VM: &str = "from_vm";
const TO_VM: &str = "to_vm";

/// Everything kiln needs to write one VM's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Checks `name` is a Linux interface name nft matches literally.
fn validate_ifname(name: &str) -> Result<()> {
    let invalid = |reason: &str| Err(Error::InvalidInterfaceName { name: name.to_owned(), reason: reason.to_owned() });
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > IFNAMSIZ_MAX {
        return invalid("it is longer than 15 bytes (IFNAMSIZ)");
    }
    if name == "." || name == ".." {
        return invalid("`.` and `..` are not interface names");
    }
    // Their /proc/sys/net/ipv4/conf entries would set every interface's
    // forwarding at once, which kiln promises never to do.
    if name == "all" || name == "default" {
        return invalid("`all` and `default` name sysctl groups, not interfaces");
    }
    // `*` and `\` mean wildcard/escape to nft; kiln never needs them.
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        return invalid("only ASCII letters, digits, `-`, `_` and `.` are allowed");
    }
    Ok(())
}

fn tag(vm_id: &str) -> String {
    format!("{TAG_PREFIX}{vm_id}")
}

/// One element of one of kiln's sets or maps, in nft's JSON.
#[derive(Debug, Clone, PartialEq)]
struct Element {
    set: &'static str,
    key: Value,
    /// The mapped value, for the maps.
    data: Option<Value>,
}

impl Element {
    fn set(set: &'static str, key: Value) -> Element {
        Element { set, key, data: None }
    }

    fn command(&self, verb: &str, comment: &str) -> Value {
        let elem = json!({"elem": {"val": self.key, "comment": comment}});
        let elem = match &self.data {
            Some(data) => json!([elem, data]),
            None => elem,
        };
        json!({verb: {"element": {"family": "inet", "table": TABLE, "name": self.set, "elem": [elem]}}})
    }

    fn delete_command(&self) -> Value {
        json!({"delete": {"element": {"family": "inet", "table": TABLE, "name": self.set, "elem": [self.key]}}})
    }

    /// The uplink of an `uplink_users` element.
    fn uplink_of_user(&self) -> Option<String> {
        let parts = self.key.get("concat").and_then(Value::as_array).filter(|_| self.set == UPLINK_USERS)?;
        parts.first().and_then(Value::as_str).map(str::to_owned)
    }

    /// What this element claims, for a conflict message.
    fn claim(&self) -> String {
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
        validate_ifname(&self.tap)?;
        if let Some(uplink) = &self.uplink {
            validate_ifname(uplink)?;
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
    fn needs_forwarding(&self) -> bool {
        self.firewall.egress || !self.firewall.published_ports.is_empty()
    }

    /// The uplink whose forwarding this VM needs.
    fn forwarded_uplink(&self) -> Option<&str> {
        self.uplink.as_deref().filter(|_| self.needs_forwarding())
    }

    /// The VM's set elements: everything kiln writes for it.
    fn elements(&self) -> Vec<Element> {
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

fn batch(commands: Vec<Value>) -> Value {
    json!({"nftables": commands})
}

/// 15 hex digits (60 bits; an `ifname` key holds 15 bytes) of a digest of
/// the VM id and its elements. Only compared within one build: the
/// launcher's own apply and remove. Removal by tag never needs it.
fn fingerprint(vm_id: &str, elements: &[Element]) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    vm_id.hash(&mut hasher);
    for element in elements {
        (element.set, element.key.to_string(), element.data.as_ref().map(Value::to_string)).hash(&mut hasher);
    }
    format!("{:015x}", hasher.finish() >> 4)
}

// ---- the fixed part: table, chains, sets, rules ----

fn chain(name: &str) -> Chain<'static> {
    Chain { family: FAMILY, table: TABLE.into(), name: name.to_owned().into(), ..Chain::default() }
}

fn base_chain(name: &'static str, kind: NfChainType, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain { _type: Some(kind), hook: Some(hook), prio: Some(prio), policy: Some(NfChainPolicy::Accept), ..chain(name) }
}

fn set(name: &'static str, types: &[SetType]) -> Set<'static> {
    let set_type = match types {
        [one] => SetTypeValue::Single(*one),
        many => SetTypeValue::Concatenated(many.to_vec().into()),
    };
    Set { family: FAMILY, table: TABLE.into(), name: name.into(), set_type, ..Set::default() }
}

fn map(name: &'static str, key: &[SetType], data: SetType) -> Map<'static> {
    Map {
        family: FAMILY,
        table: TABLE.into(),
        name: name.into(),
        set_type: SetTypeValue::Concatenated(key.to_vec().into()),
        map: SetTypeValue::Single(data),
        ..Map::default()
    }
}

fn rule(chain: &str, expr: Vec<Statement<'static>>) -> Rule<'static> {
    Rule { family: FAMILY, table: TABLE.into(), chain: chain.to_owned().into(), expr: expr.into(), ..Rule::default() }
}

fn matches(left: Expression<'static>, right: Expression<'static>, op: Operator) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn string(value: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(value.into()))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &str, field: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.to_owned().into(),
        field: field.to_owned().into(),
    })))
}

fn concat_expr(parts: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(parts))
}

/// `<left> @<set>`: a lookup in one of kiln's sets.
fn in_set(left: Expression<'static>, set: &str) -> Statement<'static> {
    matches(left, string(format!("@{set}")), Operator::EQ)
}

fn ct_is(key: &str, values: &[&str]) -> Statement<'static> {
    let left = Expression::Named(NamedExpression::CT(CT { key: key.to_owned().into(), ..CT::default() }));
    let right = match values {
        [one] => string(*one),
        many => Expression::List(many.iter().map(|v| string(*v)).collect()),
    };
    matches(left, right, Operator::IN)
}

fn jump(target: &str) -> Statement<'static> {
    Statement::Jump(JumpTarget { target: target.to_owned().into() })
}

/// `meta l4proto . th dport`: the key of the DNAT maps.
fn l4_dport() -> Vec<Expression<'static>> {
    vec![meta(MetaKey::L4proto), payload("th", "dport")]
}

/// `meta nfproto ipv4 fib daddr type local dnat ip to <map lookups>`.
fn dnat_published() -> Vec<Statement<'static>> {
    let lookup = |map: &str| {
        Expression::Named(NamedExpression::Map(Box::new(MapLookup {
            key: concat_expr(l4_dport()),
            data: string(format!("@{map}")),
        })))
    };
    let local = matches(
        Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags: HashSet::from([FibFlag::Daddr]),
        })),
        string("local"),
        Operator::EQ,
    );
    vec![
        matches(meta(MetaKey::Nfproto), string("ipv4"), Operator::EQ),
        local,
        Statement::DNAT(Some(NAT {
            addr: Some(lookup(DNAT_ADDR)),
            family: Some(NATFamily::IP),
            port: Some(lookup(DNAT_PORT)),
            flags: None,
        })),
    ]
}

/// The batch that creates kiln's table, chains and sets if missing and
/// (re)writes its fixed rules, atomically. It is idempotent.
pub fn setup_batch() -> Result<Value> {
    use SetType::{Ifname, InetProto, InetService, Ipv4Addr as Addr};
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(Table { family: FAMILY, name: TABLE.into(), handle: None }));
    let base = [
        base_chain("input", NfChainType::Filter, NfHook::Input, 0),
        base_chain("forward", NfChainType::Filter, NfHook::Forward, 0),
        base_chain("prerouting", NfChainType::NAT, NfHook::Prerouting, -100),
        base_chain("output", NfChainType::NAT, NfHook::Output, -100),
        base_chain("postrouting", NfChainType::NAT, NfHook::Postrouting, 100),
    ];
    let regular = [chain(FROM_VM_TO_HOST), chain(FROM_VM), chain(TO_VM)];
    for chain in base.iter().chain(&regular) {
        batch.add(NfListObject::Chain(chain.clone()));
    }
    let port_key = [Ifname, Addr, InetProto, InetService];
    for set in [
        set(VM_TAPS, &[Ifname]),
        set(HOST_PORTS, &port_key),
        set(EGRESS_VIA, &[Ifname, Ifname]),
        set(PUBLISHED, &port_key),
        set(UPLINK_USERS, &[Ifname, Ifname]),
        set(FINGERPRINTS, &[Ifname]),
        set(FORWARDING_BY_KILN, &[Ifname]),
    ] {
        batch.add(NfListObject::Set(Box::new(set)));
    }
    batch.add(NfListObject::Map(Box::new(map(DNAT_ADDR, &[InetProto, InetService], Addr))));
    batch.add(NfListObject::Map(Box::new(map(DNAT_PORT, &[InetProto, InetService], InetService))));
    for chain in base.iter().chain(&regular) {
        batch.add_cmd(nftables::schema::NfCmd::Flush(FlushObject::Chain(chain.clone())));
    }

    let established = || ct_is("state", &["established", "related"]);
    let accept = || Statement::Accept(None);
    let iif = || meta(MetaKey::Iifname);
    let oif = || meta(MetaKey::Oifname);
    let port_of = |ifname: Expression<'static>, addr: &str| {
        let mut parts = vec![ifname, payload("ip", addr)];
        parts.extend(l4_dport());
        concat_expr(parts)
    };
    let rules = [
        rule("input", vec![in_set(iif(), VM_TAPS), jump(FROM_VM_TO_HOST)]),
        rule(FROM_VM_TO_HOST, vec![established(), accept()]),
        rule(FROM_VM_TO_HOST, vec![in_set(port_of(iif(), "daddr"), HOST_PORTS), accept()]),
        rule(FROM_VM_TO_HOST, vec![Statement::Drop(None)]),
        // To a VM first: its guard runs before any VM's egress accept.
        rule("forward", vec![in_set(oif(), VM_TAPS), jump(TO_VM)]),
        rule("forward", vec![in_set(iif(), VM_TAPS), jump(FROM_VM)]),
        // Where kiln turned forwarding on, the host forwards for its VMs
        // only: it did not route between its other networks before.
        rule("forward", vec![in_set(iif(), FORWARDING_BY_KILN), Statement::Drop(None)]),
        rule(TO_VM, vec![established(), accept()]),
        rule(TO_VM, vec![ct_is("status", &["dnat"]), in_set(port_of(oif(), "daddr"), PUBLISHED), accept()]),
        rule(TO_VM, vec![Statement::Drop(None)]),
        rule(FROM_VM, vec![established(), accept()]),
        rule(FROM_VM, vec![in_set(concat_expr(vec![iif(), oif()]), EGRESS_VIA), accept()]),
        rule(FROM_VM, vec![Statement::Drop(None)]),
        rule("prerouting", dnat_published()),
        // The host's own connections to a published port.
        rule("output", dnat_published()),
        rule("postrouting", vec![in_set(concat_expr(vec![iif(), oif()]), EGRESS_VIA), Statement::Masquerade(None)]),
        // A host connection to 127.0.0.1:<published> leaves through the tap
        // (with `route_localnet` on it) from the tap address instead.
        rule(
            "postrouting",
            vec![
                in_set(oif(), VM_TAPS),
                matches(
                    payload("ip", "saddr"),
                    Expression::Named(NamedExpression::Prefix(nftables::expr::Prefix {
                        addr: Box::new(string("127.0.0.0")),
                        len: 8,
                    })),
                    Operator::EQ,
                ),
                Statement::Masquerade(None),
            ],
        ),
    ];
    for rule in rules {
        batch.add(NfListObject::Rule(rule));
    }
    serde_json::to_value(batch.to_nftables()).map_err(|e| Error::NftOutput(format!("cannot encode batch: {e}")))
}

// ---- listings ----

/// kiln's elements in a listing of `inet kiln`, per VM id.
fn elements_by_vm(listing: &Value) -> Result<BTreeMap<String, Vec<Element>>> {
    let objects = listing
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::NftOutput("the listing has no `nftables` array".to_owned()))?;
    let mut owned: BTreeMap<String, Vec<Element>> = BTreeMap::new();
    for object in objects {
        let Some(set) = object.get("set").or_else(|| object.get("map")) else { continue };
        if set.get("table").and_then(Value::as_str) != Some(TABLE) {
            continue;
        }
        let name = set.get("name").and_then(Value::as_str);
        let Some(name) = name.and_then(|n| VM_SETS.into_iter().chain(RETIRED_VM_SETS).find(|s| *s == n)) else {
            continue;
        };
        for entry in set.get("elem").and_then(Value::as_array).into_iter().flatten() {
            // A map element is `[key, data]`; a set element is the key.
            let (key, data) = match entry.as_array() {
                Some(pair) if pair.len() == 2 => (&pair[0], Some(pair[1].clone())),
                _ => (entry, None),
            };
            let Some(elem) = key.get("elem") else { continue };
            let Some(id) = elem.get("comment").and_then(Value::as_str).and_then(|c| c.strip_prefix(TAG_PREFIX)) else {
                continue;
            };
            let Some(val) = elem.get("val") else {
                return Err(Error::NftOutput(format!("an element of `{name}` tagged `{TAG_PREFIX}{id}` has no value")));
            };
            owned.entry(id.to_owned()).or_default().push(Element { set: name, key: val.clone(), data });
        }
    }
    Ok(owned)
}

/// The batch removing every element of the VMs `doomed` selects from
/// `listing` (the output of `nft -j list table inet kiln`), and the ids it
/// removes.
pub fn removal_batch(listing: &Value, doomed: impl Fn(&str) -> bool) -> Result<(Value, Vec<String>)> {
    let owned = elements_by_vm(listing)?;
    let mut commands = Vec::new();
    let mut removed = Vec::new();
    for (id, elements) in owned.iter().filter(|(id, _)| doomed(id)) {
        commands.extend(elements.iter().map(Element::delete_command));
        removed.push(id.clone());
    }
    Ok((batch(commands), removed))
}

/// The uplinks `listing` records kiln turned forwarding on for that no VM
/// except those `doomed` selects needs: the ones to restore to 0.
fn unused_forwarding(listing: &Value, doomed: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let needed: BTreeSet<String> = elements_by_vm(listing)?
        .iter()
        .filter(|(id, _)| !doomed(id))
        .flat_map(|(_, elements)| elements.iter().filter_map(Element::uplink_of_user))
        .collect();
    let objects = listing["nftables"].as_array().into_iter().flatten();
    let recorded = objects
        .filter_map(|object| object.get("set"))
        .filter(|set| set["table"] == TABLE && set["name"] == FORWARDING_BY_KILN)
        .flat_map(|set| set["elem"].as_array().into_iter().flatten())
        // An element with a comment is `{"elem": {"val": ..}}`, one without the value.
        .filter_map(|entry| entry.pointer("/elem/val").unwrap_or(entry).as_str());
    Ok(recorded.filter(|uplink| !needed.contains(*uplink)).map(str::to_owned).collect())
}

/// Runs `nft`, optionally inside a network namespace, and sets the IPv4
/// forwarding flags VMs need in the same namespace. The only place kiln
/// spawns `nft`.
#[derive(Debug, Clone)]
pub struct Nft {
    argv: Vec<String>,
    /// Where the forwarding flags and kiln's lock are.
    netns: Netns,
}

impl Default for Nft {
    fn default() -> Self {
        Nft::new()
    }
}

/// Why a batch failed, where kiln takes another path.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// An element to create exists (`EEXIST`).
    Exists,
    /// The table, a set, or an element to delete is missing (`ENOENT`).
    Missing,
}

fn refusal(error: &Error) -> Option<Refusal> {
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

/// The forwarding flags one apply turns on (those that were off), each
/// with what it is to the VM, for an error.
#[derive(Debug, Default)]
struct FlagsToSet {
    tap: Option<(String, String)>,
    uplink: Option<(String, String)>,
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

    /// Adds `rules`' VM, replacing whatever exists for its id, in one
    /// transaction, and turns IPv4 forwarding on where the VM needs it (its
    /// tap and uplink; see the module doc). Fails, changing nothing, if
    /// another VM holds its tap or one of its published host ports, or if
    /// an interface it needs forwarding on does not exist.
    pub fn apply(&self, rules: &VmRules) -> Result<()> {
        let add = rules.add_batch()?;
        let _lock = self.netns.lock()?;
        let flags = self.flags_to_set(rules)?;
        // Recorded in the same transaction as the VM, before the flag is
        // written: a crash in between leaves a record of a flag that is
        // still 0, which restoring to 0 later cannot harm.
        let record = flags.uplink.as_ref().map(|(uplink, _)| {
            json!({"add": {"element": {"family": "inet", "table": TABLE, "name": FORWARDING_BY_KILN,
                "elem": [{"elem": {"val": uplink, "comment": FORWARDING_COMMENT}}]}}})
        });
        let with_record = |mut batch: Value| {
            if let (Some(record), Some(commands)) = (&record, batch["nftables"].as_array_mut()) {
                commands.push(record.clone());
            }
            batch
        };
        let mut replaced_uplinks = Vec::new();
        match self.run_batch(&with_record(add)) {
            Ok(()) => {}
            Err(e) => {
                match refusal(&e) {
                    Some(Refusal::Missing) => self.run_batch(&setup_batch()?)?,
                    Some(Refusal::Exists) => {}
                    None => return Err(e),
                }
                replaced_uplinks = self.replace(rules, &with_record)?;
            }
        }
        if let Err(e) = self.set_flags(&flags) {
            // Undo the VM rather than leave it without the forwarding it needs.
            let _ = self.remove_where_locked(|id| id == rules.vm_id);
            return Err(e);
        }
        if replaced_uplinks.iter().any(|old| Some(old.as_str()) != rules.forwarded_uplink()) {
            self.restore_unused_forwarding()?;
        }
        Ok(())
    }

    /// The slow path of [`Nft::apply`]: the table was new, or something of
    /// the VM (or of another VM) is in the way. Returns the uplinks the
    /// VM's old elements used.
    fn replace(&self, rules: &VmRules, with_record: &dyn Fn(Value) -> Value) -> Result<Vec<String>> {
        let listing = self.list_table()?.unwrap_or_else(|| batch(Vec::new()));
        let owned = elements_by_vm(&listing)?;
        let elements = rules.elements();
        for element in &elements {
            let holder = owned.iter().find(|(id, theirs)| {
                **id != rules.vm_id && theirs.iter().any(|t| t.set == element.set && t.key == element.key)
            });
            if let Some((holder, _)) = holder {
                return Err(Error::NftConflict {
                    vm_id: rules.vm_id.clone(),
                    holder: holder.clone(),
                    claim: element.claim(),
                });
            }
        }
        let tag = tag(&rules.vm_id);
        let old_elements = owned.get(&rules.vm_id).map(Vec::as_slice).unwrap_or_default();
        let old = old_elements.iter().map(Element::delete_command);
        let new = elements.iter().map(|e| e.command("create", &tag));
        self.run_batch(&with_record(batch(old.chain(new).collect())))?;
        Ok(old_elements.iter().filter_map(Element::uplink_of_user).collect())
    }

    /// Reads the flags `rules` needs; fails if an interface is missing.
    fn flags_to_set(&self, rules: &VmRules) -> Result<FlagsToSet> {
        if !rules.needs_forwarding() {
            return Ok(FlagsToSet::default());
        }
        let role = |what: &str| format!("the {what} of VM `{}`", rules.vm_id);
        self.netns.run(|| {
            let missing = |name: &str, what: &str| Error::InterfaceMissing { name: name.to_owned(), role: role(what) };
            let tap_on = forwarding::read_flag(&rules.tap)?.ok_or_else(|| missing(&rules.tap, "tap"))?;
            let mut flags = FlagsToSet { tap: (!tap_on).then(|| (rules.tap.clone(), role("tap"))), uplink: None };
            if let Some(uplink) = rules.forwarded_uplink() {
                let uplink_on = forwarding::read_flag(uplink)?.ok_or_else(|| missing(uplink, "uplink"))?;
                flags.uplink = (!uplink_on).then(|| (uplink.to_owned(), role("uplink")));
            }
            Ok(flags)
        })
    }

    fn set_flags(&self, flags: &FlagsToSet) -> Result<()> {
        if flags.tap.is_none() && flags.uplink.is_none() {
            return Ok(());
        }
        self.netns.run(|| {
            for (ifname, role) in flags.tap.iter().chain(&flags.uplink) {
                if !forwarding::write_flag(ifname, true)? {
                    return Err(Error::InterfaceMissing { name: ifname.clone(), role: role.clone() });
                }
            }
            Ok(())
        })
    }

    /// Removes what [`Nft::apply`] added for `rules`, in one transaction and
    /// without a listing, then restores the uplink's forwarding flag if kiln
    /// turned it on and no VM needs it any more. `rules` should be the ones
    /// the VM was applied with; if the VM's elements are not exactly those
    /// (it was removed or replaced meanwhile: its fingerprint is missing),
    /// nothing is deleted by key and [`Nft::remove_vm`]'s removal by tag
    /// runs instead, so another VM's element is never deleted.
    pub fn remove(&self, rules: &VmRules) -> Result<()> {
        let remove = rules.remove_batch()?;
        let _lock = self.netns.lock()?;
        match self.run_batch(&remove) {
            Err(e) if refusal(&e) == Some(Refusal::Missing) => {
                self.remove_where_locked(|id| id == rules.vm_id).map(drop)
            }
            Err(e) => Err(e),
            Ok(()) if rules.forwarded_uplink().is_some() => self.restore_unused_forwarding(),
            Ok(()) => Ok(()),
        }
    }

    /// Removes everything tagged with VM `vm_id`, found in a listing, in one
    /// transaction; returns whether there was anything. Absent: no-op.
    /// Restores forwarding flags as [`Nft::remove`] does.
    pub fn remove_vm(&self, vm_id: &str) -> Result<bool> {
        validate_vm_id(vm_id)?;
        let _lock = self.netns.lock()?;
        self.remove_where_locked(|id| id == vm_id).map(|removed| !removed.is_empty())
    }

    /// Removes everything of every VM not in `alive`, in one transaction;
    /// returns the removed ids, sorted. Restores every forwarding flag kiln
    /// turned on that no VM in `alive` needs.
    pub fn reconcile<S: AsRef<str>>(&self, alive: impl IntoIterator<Item = S>) -> Result<Vec<String>> {
        let alive: BTreeSet<String> = alive.into_iter().map(|s| s.as_ref().to_owned()).collect();
        let _lock = self.netns.lock()?;
        self.remove_where_locked(|id| !alive.contains(id))
    }

    /// The ids of the VMs that have elements in kiln's table.
    pub fn list_vms(&self) -> Result<BTreeSet<String>> {
        match self.list_table()? {
            Some(listing) => Ok(elements_by_vm(&listing)?.into_keys().collect()),
            None => Ok(BTreeSet::new()),
        }
    }

    /// `nft -j list table inet kiln`, or `None` if the table does not exist.
    pub fn list_table(&self) -> Result<Option<Value>> {
        self.list(&["table", "inet", TABLE])
    }

    /// `nft -j list <object...>`, or `None` if it does not exist.
    fn list(&self, object: &[&str]) -> Result<Option<Value>> {
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

    /// With kiln's lock held: removes the VMs `doomed` selects, then
    /// restores the forwarding no remaining VM needs.
    fn remove_where_locked(&self, doomed: impl Fn(&str) -> bool) -> Result<Vec<String>> {
        let Some(listing) = self.list_table()? else {
            return Ok(Vec::new());
        };
        let (batch, removed) = removal_batch(&listing, &doomed)?;
        if !removed.is_empty() {
            self.run_batch(&batch)?;
        }
        self.restore_forwarding(&unused_forwarding(&listing, &doomed)?)?;
        Ok(removed)
    }

    /// After a removal by key: lists the (small) sets that say where kiln
    /// turned forwarding on and who needs it, and restores the unused.
    fn restore_unused_forwarding(&self) -> Result<()> {
        let set = |name| self.list(&["set", "inet", TABLE, name]);
        let objects = |listing: Value| listing["nftables"].as_array().cloned().unwrap_or_default();
        let Some(recorded) = set(FORWARDING_BY_KILN)? else { return Ok(()) };
        // nft lists an empty set without `elem`.
        if !objects(recorded.clone()).iter().any(|object| object["set"]["elem"].is_array()) {
            return Ok(());
        }
        let mut listing = objects(recorded);
        listing.extend(set(UPLINK_USERS)?.map(objects).unwrap_or_default());
        self.restore_forwarding(&unused_forwarding(&batch(listing), |_| false)?)
    }

    /// Writes 0 to each uplink's flag, then drops the records, in one
    /// transaction (a crash in between leaves a record of a flag already
    /// 0, which the next release drops).
    fn restore_forwarding(&self, uplinks: &[String]) -> Result<()> {
        if uplinks.is_empty() {
            return Ok(());
        }
        self.netns.run(|| {
            // An uplink that is gone took its flag with it.
            uplinks.iter().try_for_each(|uplink| forwarding::write_flag(uplink, false).map(drop))
        })?;
        let delete = uplinks.iter().map(|uplink| {
            json!({"delete": {"element": {"family": "inet", "table": TABLE, "name": FORWARDING_BY_KILN, "elem": [uplink]}}})
        });
        self.run_batch(&batch(delete.collect()))
    }

    fn run_batch(&self, batch: &Value) -> Result<()> {
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
