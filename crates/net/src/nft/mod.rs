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
//!
//! Code map: `model` is what one VM is (its [`VmRules`], set elements and
//! fingerprint, the add and remove batches); `rules` the fixed part (table,
//! chains, sets, rules: [`setup_batch`]); `listing` reads what
//! `nft -j list` returns back into elements; `runner` is [`Nft`] and the
//! one place `nft` is spawned; `transactions` is what [`Nft`] does with
//! them: apply, remove, reconcile, and the forwarding flags.

mod listing;
mod model;
mod rules;
mod runner;
mod transactions;

use nftables::types::NfFamily;

pub use listing::removal_batch;
pub use model::{VmRules, validate_vm_id};
pub use rules::setup_batch;
pub use runner::Nft;

/// The nftables table kiln owns (family `inet`). kiln touches no other.
pub const TABLE: &str = "kiln";
/// Every set element kiln adds carries the comment `kiln-vm:<id>`.
pub const TAG_PREFIX: &str = "kiln-vm:";
const FAMILY: NfFamily = NfFamily::INet;

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
