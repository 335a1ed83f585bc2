//! kiln-net: host networking for kiln's microVMs. It hands out
//! point-to-point subnets from a configured CIDR (in memory, and through a
//! crash-safe ledger shared by launcher processes), and writes each VM's
//! nftables rules into kiln's own table, atomically, tagged per VM.
//!
//! It is the only kiln crate that touches nftables, netlink or the host's
//! IPv4 forwarding sysctls. It never touches tables other than kiln's own,
//! never writes `net.ipv4.ip_forward`, and never spawns a VMM.

mod error;
mod forwarding;
mod ifname;
mod lease;
mod ledger;
mod netlink;
mod nft;
mod tap;

pub use error::{Error, Result};
pub use kiln_types::firewall::{Firewall, HostPort, Protocol, PublishedPort};
pub use lease::{DEFAULT_LEASE_PREFIX, Lease, LeasePool};
pub use ledger::{LeaseRecord, Ledger, pid_is_alive};
pub use nft::{
    Nft, TABLE as NFT_TABLE, TAG_PREFIX as NFT_TAG_PREFIX, VmRules, removal_batch, setup_batch, validate_vm_id,
};
pub use tap::{TAP_PREFIX, Tap, TapConfig, tap_name};

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
