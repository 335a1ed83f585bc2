//! Each VM's nftables rules, inside kiln's own table `inet kiln` only.
//!
//! Decision: the JSON is built with the `nftables` crate's schema types
//! (`Batch`, `Rule`, `Statement`). Its default configuration is synchronous
//! and pulls no async runtime (tokio and async-process are opt-in features,
//! which kiln leaves off). The crate's `helper` module is not used: kiln runs
//! `nft -j -f -` itself through [`Nft`], so tests can prefix
//! `ip netns exec <ns>` and errors name what is missing. Listings are read as
//! plain `serde_json::Value`, because kiln only needs chain names, rule
//! handles and comments, and a full typed parse would fail on any statement
//! (of another tool) the crate does not model.
//!
//! Layout: base chains `input`, `forward` (filter, priority 0, policy accept
//! so kiln only decides about its own taps) and `prerouting`/`postrouting`
//! (nat, -100/100). Per VM three regular chains: `vm-<id>-host` (input from
//! the tap: allow-listed host ports, else drop), `vm-<id>-egress` (forwarded
//! from the tap: established, the uplink when egress is on, else drop) and
//! `vm-<id>-ingress` (forwarded to the tap: established, DNATed published
//! ports, else drop). Jumps to `-ingress` are *inserted* at the head of
//! `forward`, so traffic from VM A to VM B meets B's drop before A's egress
//! accept: VM-to-VM is denied whatever the order VMs were added in. Every
//! rule kiln puts into a base chain carries the comment `kiln-vm:<id>`; the
//! VM chains are recognised by name.
//!
//! Adding a VM removes whatever exists for it and adds the new rules in one
//! `nft -f` transaction; removal deletes the tagged base-chain rules by
//! handle and flushes and deletes the VM chains, also in one transaction.
//! The listing that finds the handles is read just before; if a concurrent
//! writer changed the table in between, the transaction fails as a whole.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use nftables::batch::Batch;
use nftables::expr::{CT, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload, PayloadField};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, Rule};
use nftables::stmt::{JumpTarget, Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde_json::Value;

use crate::firewall::{Firewall, Protocol};
use crate::{Error, Result};

/// The nftables table kiln owns (family `inet`). kiln touches no other.
pub const TABLE: &str = "kiln";
/// Rules kiln adds to base chains carry the comment `kiln-vm:<id>`.
pub const TAG_PREFIX: &str = "kiln-vm:";
const FAMILY: NfFamily = NfFamily::INet;
const MAX_VM_ID_LEN: usize = 64;
const IFNAMSIZ_MAX: usize = 15;
const VM_CHAIN_SUFFIXES: [&str; 3] = ["-host", "-egress", "-ingress"];

/// Everything kiln needs to write one VM's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRules {
    /// The VM's id: lowercase letters, digits, `-` and `_`, starting with a
    /// letter or digit, at most 64 bytes. It names the VM's chains and tags.
    pub vm_id: String,
    /// The host side of the VM's link (a tap).
    pub tap: String,
    /// The interface egress leaves through; `None` allows any interface
    /// (other VMs' taps stay denied either way).
    pub uplink: Option<String>,
    /// The host's address on the tap: host ports are allowed on it only.
    pub host_addr: Ipv4Addr,
    /// The guest's address: published ports are forwarded to it.
    pub guest_addr: Ipv4Addr,
    /// What the guest may reach and what is published.
    pub firewall: Firewall,
}

/// Checks `id` can name nftables chains and comments.
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
    // `*` and `\` mean wildcard/escape to nft; kiln never needs them.
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        return invalid("only ASCII letters, digits, `-`, `_` and `.` are allowed");
    }
    Ok(())
}

fn tag(vm_id: &str) -> String {
    format!("{TAG_PREFIX}{vm_id}")
}

fn vm_chain(vm_id: &str, suffix: &str) -> String {
    format!("vm-{vm_id}{suffix}")
}

/// The VM id a kiln VM chain name belongs to.
fn vm_id_of_chain(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("vm-")?;
    VM_CHAIN_SUFFIXES.iter().find_map(|suffix| rest.strip_suffix(suffix)).filter(|id| validate_vm_id(id).is_ok())
}

fn chain(name: &str) -> Chain<'static> {
    Chain { family: FAMILY, table: TABLE.into(), name: name.to_owned().into(), ..Chain::default() }
}

fn base_chain(name: &'static str, kind: NfChainType, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain { _type: Some(kind), hook: Some(hook), prio: Some(prio), policy: Some(NfChainPolicy::Accept), ..chain(name) }
}

fn rule(chain: &str, expr: Vec<Statement<'static>>, comment: Option<&str>) -> Rule<'static> {
    Rule {
        family: FAMILY,
        table: TABLE.into(),
        chain: chain.to_owned().into(),
        expr: expr.into(),
        comment: comment.map(|c| Cow::Owned(c.to_owned())),
        ..Rule::default()
    }
}

fn matches(left: Expression<'static>, right: Expression<'static>, op: Operator) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn string(value: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(value.into()))
}

fn meta_is(key: MetaKey, value: &str) -> Statement<'static> {
    matches(Expression::Named(NamedExpression::Meta(Meta { key })), string(value), Operator::EQ)
}

fn payload_is(protocol: &str, field: &str, right: Expression<'static>) -> Statement<'static> {
    let left = Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.to_owned().into(),
        field: field.to_owned().into(),
    })));
    matches(left, right, Operator::EQ)
}

fn dport_is(protocol: Protocol, port: u16) -> Statement<'static> {
    payload_is(protocol.as_str(), "dport", Expression::Number(u32::from(port)))
}

fn ct_is(key: &str, values: &[&str]) -> Statement<'static> {
    let left = Expression::Named(NamedExpression::CT(CT { key: key.to_owned().into(), ..CT::default() }));
    let right = match values {
        [one] => string(*one),
        many => Expression::List(many.iter().map(|v| string(*v)).collect()),
    };
    matches(left, right, Operator::IN)
}

fn established() -> Statement<'static> {
    ct_is("state", &["established", "related"])
}

fn jump(target: &str) -> Statement<'static> {
    Statement::Jump(JumpTarget { target: target.to_owned().into() })
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
        }
        self.firewall.validate()
    }

    /// The nftables JSON batch (`{"nftables": [...]}`) that creates kiln's
    /// table and base chains if missing and adds this VM's chains and rules.
    /// It assumes nothing of this VM exists yet; [`Nft::apply`] removes an
    /// old version in the same transaction.
    pub fn add_batch(&self) -> Result<Value> {
        self.validate()?;
        let mut batch = Batch::new();
        self.add_to(&mut batch);
        to_json(batch)
    }

    fn add_to(&self, batch: &mut Batch<'static>) {
        add_table_and_base_chains(batch);
        let id = &self.vm_id;
        let tag = tag(id);
        let tag = Some(tag.as_str());
        let (host, egress, ingress) = (vm_chain(id, "-host"), vm_chain(id, "-egress"), vm_chain(id, "-ingress"));
        for name in [&host, &egress, &ingress] {
            batch.add(NfListObject::Chain(chain(name)));
        }
        let fw = &self.firewall;
        let tap = self.tap.as_str();

        // Input from the tap: only allow-listed ports on the host address.
        batch.add(NfListObject::Rule(rule(&host, vec![established(), Statement::Accept(None)], None)));
        for port in &fw.host_ports {
            batch.add(NfListObject::Rule(rule(
                &host,
                vec![
                    payload_is("ip", "daddr", string(self.host_addr.to_string())),
                    dport_is(port.protocol, port.port),
                    Statement::Accept(None),
                ],
                None,
            )));
        }
        batch.add(NfListObject::Rule(rule(&host, vec![Statement::Drop(None)], None)));

        // Forwarded from the tap: replies, and the uplink when egress is on.
        batch.add(NfListObject::Rule(rule(&egress, vec![established(), Statement::Accept(None)], None)));
        if fw.egress {
            let mut accept = Vec::new();
            if let Some(uplink) = &self.uplink {
                accept.push(meta_is(MetaKey::Oifname, uplink));
            }
            accept.push(Statement::Accept(None));
            batch.add(NfListObject::Rule(rule(&egress, accept, None)));
        }
        batch.add(NfListObject::Rule(rule(&egress, vec![Statement::Drop(None)], None)));

        // Forwarded to the tap: replies and DNATed published ports only.
        batch.add(NfListObject::Rule(rule(&ingress, vec![established(), Statement::Accept(None)], None)));
        for published in &fw.published_ports {
            batch.add(NfListObject::Rule(rule(
                &ingress,
                vec![
                    payload_is("ip", "daddr", string(self.guest_addr.to_string())),
                    dport_is(published.protocol, published.guest_port),
                    ct_is("status", &["dnat"]),
                    Statement::Accept(None),
                ],
                None,
            )));
        }
        batch.add(NfListObject::Rule(rule(&ingress, vec![Statement::Drop(None)], None)));

        // Jumps from the base chains, tagged.
        batch.add(NfListObject::Rule(rule("input", vec![meta_is(MetaKey::Iifname, tap), jump(&host)], tag)));
        batch.add(NfListObject::Rule(rule("forward", vec![meta_is(MetaKey::Iifname, tap), jump(&egress)], tag)));
        // Inserted at the head: every VM's ingress guard runs before any
        // VM's egress accept (see the module doc).
        batch.add_cmd(NfCmd::Insert(NfListObject::Rule(rule(
            "forward",
            vec![meta_is(MetaKey::Oifname, tap), jump(&ingress)],
            tag,
        ))));

        for published in &fw.published_ports {
            let local = matches(
                Expression::Named(NamedExpression::Fib(Fib {
                    result: FibResult::Type,
                    flags: HashSet::from([FibFlag::Daddr]),
                })),
                string("local"),
                Operator::EQ,
            );
            batch.add(NfListObject::Rule(rule(
                "prerouting",
                vec![
                    meta_is(MetaKey::Nfproto, "ipv4"),
                    local,
                    dport_is(published.protocol, published.host_port),
                    Statement::DNAT(Some(NAT {
                        addr: Some(string(self.guest_addr.to_string())),
                        family: Some(NATFamily::IP),
                        port: Some(Expression::Number(u32::from(published.guest_port))),
                        flags: None,
                    })),
                ],
                tag,
            )));
        }
        if fw.egress {
            let mut masquerade = vec![meta_is(MetaKey::Iifname, tap)];
            if let Some(uplink) = &self.uplink {
                masquerade.push(meta_is(MetaKey::Oifname, uplink));
            }
            masquerade.push(Statement::Masquerade(None));
            batch.add(NfListObject::Rule(rule("postrouting", masquerade, tag)));
        }
    }
}

fn add_table_and_base_chains(batch: &mut Batch<'static>) {
    batch.add(NfListObject::Table(nftables::schema::Table { family: FAMILY, name: TABLE.into(), handle: None }));
    batch.add(NfListObject::Chain(base_chain("input", NfChainType::Filter, NfHook::Input, 0)));
    batch.add(NfListObject::Chain(base_chain("forward", NfChainType::Filter, NfHook::Forward, 0)));
    batch.add(NfListObject::Chain(base_chain("prerouting", NfChainType::NAT, NfHook::Prerouting, -100)));
    batch.add(NfListObject::Chain(base_chain("postrouting", NfChainType::NAT, NfHook::Postrouting, 100)));
}

fn to_json(batch: Batch<'static>) -> Result<Value> {
    serde_json::to_value(batch.to_nftables()).map_err(|e| Error::NftOutput(format!("cannot encode batch: {e}")))
}

/// What kiln owns in a listing of `inet kiln`, per VM id.
#[derive(Debug, Default)]
struct Owned {
    /// (chain, handle) of tagged rules in base chains.
    rules: Vec<(String, u32)>,
    chains: Vec<String>,
}

/// Finds kiln's tagged rules and VM chains in `nft -j list table inet kiln` output.
fn owned_by_vm(listing: &Value) -> Result<BTreeMap<String, Owned>> {
    let objects = listing
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::NftOutput("the listing has no `nftables` array".to_owned()))?;
    let mut owned: BTreeMap<String, Owned> = BTreeMap::new();
    for object in objects {
        let in_table = |o: &Value| o.get("table").and_then(Value::as_str) == Some(TABLE);
        if let Some(rule) = object.get("rule").filter(|r| in_table(r)) {
            let Some(id) = rule.get("comment").and_then(Value::as_str).and_then(|c| c.strip_prefix(TAG_PREFIX)) else {
                continue;
            };
            let chain = rule.get("chain").and_then(Value::as_str);
            let handle = rule.get("handle").and_then(Value::as_u64).and_then(|h| u32::try_from(h).ok());
            let (Some(chain), Some(handle)) = (chain, handle) else {
                return Err(Error::NftOutput(format!("rule tagged `{TAG_PREFIX}{id}` has no chain or handle")));
            };
            owned.entry(id.to_owned()).or_default().rules.push((chain.to_owned(), handle));
        } else if let Some(chain) = object.get("chain").filter(|c| in_table(c)) {
            if let Some(name) = chain.get("name").and_then(Value::as_str) {
                if let Some(id) = vm_id_of_chain(name) {
                    owned.entry(id.to_owned()).or_default().chains.push(name.to_owned());
                }
            }
        }
    }
    Ok(owned)
}

/// Deletes the tagged rules by handle first (they reference the chains),
/// then flushes and deletes the chains: nft refuses to delete a chain that
/// still has rules or is jumped to.
fn remove_owned(batch: &mut Batch<'static>, owned: &Owned) {
    for (chain_name, handle) in &owned.rules {
        batch.delete(NfListObject::Rule(Rule { handle: Some(*handle), ..rule(chain_name, Vec::new(), None) }));
    }
    for name in &owned.chains {
        batch.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(name))));
    }
    for name in &owned.chains {
        batch.delete(NfListObject::Chain(chain(name)));
    }
}

/// The batch removing everything of the VMs `doomed` selects from `listing`
/// (the output of `nft -j list table inet kiln`), and the ids it removes.
pub fn removal_batch(listing: &Value, doomed: impl Fn(&str) -> bool) -> Result<(Value, Vec<String>)> {
    let owned = owned_by_vm(listing)?;
    let mut batch = Batch::new();
    let mut removed = Vec::new();
    for (id, things) in owned.iter().filter(|(id, _)| doomed(id)) {
        remove_owned(&mut batch, things);
        removed.push(id.clone());
    }
    Ok((to_json(batch)?, removed))
}

/// Runs `nft`, optionally inside a network namespace. The only place kiln
/// spawns `nft`.
#[derive(Debug, Clone)]
pub struct Nft {
    argv: Vec<String>,
}

impl Default for Nft {
    fn default() -> Self {
        Nft::new()
    }
}

impl Nft {
    /// `nft` from `PATH`, in the caller's network namespace.
    pub fn new() -> Self {
        Nft { argv: vec!["nft".to_owned()] }
    }

    /// `ip netns exec <namespace> nft`: rules go into that namespace only.
    pub fn in_namespace(namespace: &str) -> Self {
        Nft { argv: ["ip", "netns", "exec", namespace, "nft"].map(str::to_owned).to_vec() }
    }

    /// Adds `rules`' VM, replacing whatever exists for its id, in one transaction.
    pub fn apply(&self, rules: &VmRules) -> Result<()> {
        rules.validate()?;
        let mut batch = Batch::new();
        if let Some(listing) = self.list_table()? {
            if let Some(old) = owned_by_vm(&listing)?.get(&rules.vm_id) {
                remove_owned(&mut batch, old);
            }
        }
        rules.add_to(&mut batch);
        self.run_batch(&to_json(batch)?)
    }

    /// Removes everything of VM `vm_id` in one transaction. Absent: no-op.
    pub fn remove(&self, vm_id: &str) -> Result<()> {
        validate_vm_id(vm_id)?;
        self.remove_where(|id| id == vm_id).map(drop)
    }

    /// Removes everything of every VM not in `alive`, in one transaction;
    /// returns the removed ids, sorted.
    pub fn reconcile<S: AsRef<str>>(&self, alive: impl IntoIterator<Item = S>) -> Result<Vec<String>> {
        let alive: BTreeSet<String> = alive.into_iter().map(|s| s.as_ref().to_owned()).collect();
        self.remove_where(|id| !alive.contains(id))
    }

    /// The ids of the VMs that have chains or tagged rules in kiln's table.
    pub fn list_vms(&self) -> Result<BTreeSet<String>> {
        match self.list_table()? {
            Some(listing) => Ok(owned_by_vm(&listing)?.into_keys().collect()),
            None => Ok(BTreeSet::new()),
        }
    }

    /// `nft -j list table inet kiln`, or `None` if the table does not exist.
    pub fn list_table(&self) -> Result<Option<Value>> {
        let args = ["-j", "list", "table", "inet", TABLE];
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
            .map_err(|e| Error::NftOutput(format!("`nft -j list table` printed invalid JSON: {e}")))
    }

    fn remove_where(&self, doomed: impl Fn(&str) -> bool) -> Result<Vec<String>> {
        let Some(listing) = self.list_table()? else {
            return Ok(Vec::new());
        };
        let (batch, removed) = removal_batch(&listing, doomed)?;
        if !removed.is_empty() {
            self.run_batch(&batch)?;
        }
        Ok(removed)
    }

    fn run_batch(&self, batch: &Value) -> Result<()> {
        let payload = serde_json::to_vec(batch).map_err(|e| Error::NftOutput(format!("cannot encode batch: {e}")))?;
        let args = ["-j", "-f", "-"];
        let output = self.run(&args, Some(&payload))?;
        if output.status.success() { Ok(()) } else { Err(self.failure(&args, &output)) }
    }

    fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<std::process::Output> {
        let (program, prefix) = self.argv.split_first().ok_or(Error::NftMissing)?;
        let mut command = Command::new(program);
        command.args(prefix).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        command.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = command.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                if program == "nft" {
                    Error::NftMissing
                } else {
                    Error::ToolMissing { tool: program.clone(), package: "iproute2".to_owned() }
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
