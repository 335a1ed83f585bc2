//! The in-memory lease pool: point-to-point subnets carved out of one CIDR.
//!
//! A pool of `10.200.0.0/24` with the default /30 holds 64 subnets. Subnet
//! `i` is `10.200.0.(4*i)/30`; its tap (host) side gets the first usable
//! address and the guest the second. With /31 (RFC 3021) both addresses of
//! the pair are usable: host gets the even one, guest the odd one.
//!
//! Invariants:
//! - an index is either handed out to exactly one owner, or free;
//! - an owner holds at most one lease;
//! - allocation takes a recently released index first (last released, first
//!   reused), else the lowest never-used one, so a sequence of calls always
//!   gives the same subnets; the free list never materialises the untouched
//!   tail, so a /8 pool costs nothing until used.
//!
//! The pure part ([`SubnetLayout`]) is shared with the persistent ledger.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ipnet::Ipv4Net;

use crate::error::{Error, Result};

/// The lease prefix used when the caller does not choose one.
pub const DEFAULT_LEASE_PREFIX: u8 = 30;

/// How a CIDR is cut into equal point-to-point subnets: pure arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SubnetLayout {
    cidr: Ipv4Net,
    prefix: u8,
    capacity: u32,
}

impl SubnetLayout {
    /// Checks `cidr` and `prefix` (30 or 31) and counts the subnets.
    pub(crate) fn new(cidr: Ipv4Net, prefix: u8) -> Result<Self> {
        if prefix != 30 && prefix != 31 {
            return Err(Error::LeasePrefix { prefix });
        }
        if cidr.trunc() != cidr {
            return Err(Error::LeaseCidrHostBits { cidr, network: cidr.trunc() });
        }
        if cidr.prefix_len() > prefix {
            return Err(Error::LeaseCidrTooSmall { cidr, prefix });
        }
        // At most 2^31 subnets (a /0 cut into /31s): fits a u32.
        let capacity = 1u32 << (prefix - cidr.prefix_len());
        Ok(Self { cidr, prefix, capacity })
    }

    pub(crate) fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    pub(crate) fn prefix(&self) -> u8 {
        self.prefix
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The subnet at `index` (< capacity) with its host and guest addresses.
    pub(crate) fn subnet(&self, index: u32) -> Subnet {
        debug_assert!(index < self.capacity);
        let size = 1u32 << (32 - self.prefix);
        let base = u32::from(self.cidr.network()).wrapping_add(index.wrapping_mul(size));
        let (host, guest) = if self.prefix == 31 { (base, base + 1) } else { (base + 1, base + 2) };
        let network = Ipv4Addr::from(base);
        Subnet {
            index,
            // The prefix was checked in `new`, so this cannot fail; fall back to /32 rather than panic.
            subnet: Ipv4Net::new(network, self.prefix).unwrap_or_else(|_| Ipv4Net::from(network)),
            host_addr: Ipv4Addr::from(host),
            guest_addr: Ipv4Addr::from(guest),
        }
    }
}

/// One point-to-point subnet and the two addresses on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Subnet {
    pub(crate) index: u32,
    pub(crate) subnet: Ipv4Net,
    pub(crate) host_addr: Ipv4Addr,
    pub(crate) guest_addr: Ipv4Addr,
}

/// Hands out point-to-point subnets of one CIDR to VMs, in memory.
///
/// Cloning gives another handle to the same pool.
///
/// ```
/// let pool = kiln_net::LeasePool::new("10.200.0.0/29".parse().unwrap(), 30).unwrap();
/// let lease = pool.allocate("vm-a").unwrap();
/// assert_eq!(lease.host_addr().to_string(), "10.200.0.1");
/// assert_eq!(lease.guest_addr().to_string(), "10.200.0.2");
/// drop(lease); // the subnet is free again
/// assert_eq!(pool.leased(), 0);
/// ```
#[derive(Clone, Debug)]
pub struct LeasePool {
    shared: Arc<Mutex<PoolState>>,
}

#[derive(Debug)]
struct PoolState {
    layout: SubnetLayout,
    /// Released indices; the last pushed is reused first.
    free: Vec<u32>,
    /// Indices below this have been handed out at least once.
    high_water: u32,
    /// Owner -> index; the key is shared with the owner's `Lease` (one allocation per lease).
    owners: HashMap<Arc<str>, u32>,
}

impl LeasePool {
    /// A pool of `cidr` cut into subnets of `prefix` (30 or 31) bits.
    pub fn new(cidr: Ipv4Net, prefix: u8) -> Result<Self> {
        let layout = SubnetLayout::new(cidr, prefix)?;
        let state = PoolState { layout, free: Vec::new(), high_water: 0, owners: HashMap::new() };
        Ok(Self { shared: Arc::new(Mutex::new(state)) })
    }

    /// Leases a subnet to `owner` (a VM id). O(1).
    pub fn allocate(&self, owner: &str) -> Result<Lease> {
        let mut state = self.lock();
        if let Some(&index) = state.owners.get(owner) {
            let subnet = state.layout.subnet(index).subnet;
            return Err(Error::LeaseOwnerExists { owner: owner.to_owned(), subnet });
        }
        let index = match state.free.pop() {
            Some(index) => index,
            None if state.high_water < state.layout.capacity => {
                state.high_water += 1;
                state.high_water - 1
            }
            None => {
                let layout = state.layout;
                return Err(Error::LeasePoolExhausted {
                    cidr: layout.cidr,
                    prefix: layout.prefix,
                    capacity: layout.capacity,
                });
            }
        };
        let owner: Arc<str> = Arc::from(owner);
        state.owners.insert(Arc::clone(&owner), index);
        let subnet = state.layout.subnet(index);
        drop(state);
        Ok(Lease { pool: Arc::clone(&self.shared), owner, subnet })
    }

    /// How many subnets the pool holds in all.
    pub fn capacity(&self) -> u32 {
        self.lock().layout.capacity
    }

    /// How many subnets are leased now.
    pub fn leased(&self) -> usize {
        self.lock().owners.len()
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        lock_state(&self.shared)
    }
}

/// The pool's bookkeeping stays consistent across a panic (every update is a
/// single push/pop/insert/remove), so a poisoned lock is safe to take over.
fn lock_state(shared: &Mutex<PoolState>) -> MutexGuard<'_, PoolState> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One VM's subnet. Dropping it (or calling [`Lease::release`]) gives the
/// subnet back to the pool.
pub struct Lease {
    pool: Arc<Mutex<PoolState>>,
    owner: Arc<str>,
    subnet: Subnet,
}

impl Lease {
    /// The VM id this lease belongs to.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The point-to-point subnet, e.g. `10.200.0.4/30`.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet.subnet
    }

    /// The tap (host) side address.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.subnet.host_addr
    }

    /// The guest's address.
    pub fn guest_addr(&self) -> Ipv4Addr {
        self.subnet.guest_addr
    }

    /// Gives the subnet back now; the same as dropping the lease.
    pub fn release(self) {}
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = lock_state(&self.pool);
        if state.owners.remove(&*self.owner).is_some() {
            state.free.push(self.subnet.index);
        }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("owner", &self.owner)
            .field("subnet", &self.subnet.subnet)
            .field("host_addr", &self.subnet.host_addr)
            .field("guest_addr", &self.subnet.guest_addr)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fmt::Write;

    use expect_test::{Expect, expect};

    use super::*;

    /// Lists every subnet of `cidr` cut into `/prefix` (at most 4 shown), or the error.
    fn check(cidr: &str, prefix: u8, expect: Expect) {
        let cidr: Ipv4Net = cidr.parse().unwrap();
        let actual = match SubnetLayout::new(cidr, prefix) {
            Err(error) => format!("error: {error}"),
            Ok(layout) => {
                let mut out = format!("capacity {}:", layout.capacity());
                let shown = layout.capacity().min(3);
                for index in (0..shown).chain(std::iter::once(layout.capacity() - 1).filter(|&last| last >= shown)) {
                    let s = layout.subnet(index);
                    write!(out, " [{index}] {} host {} guest {};", s.subnet, s.host_addr, s.guest_addr).unwrap();
                }
                out
            }
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn carving() {
        check(
            "10.200.0.0/24",
            30,
            expect![[
                r#"capacity 64: [0] 10.200.0.0/30 host 10.200.0.1 guest 10.200.0.2; [1] 10.200.0.4/30 host 10.200.0.5 guest 10.200.0.6; [2] 10.200.0.8/30 host 10.200.0.9 guest 10.200.0.10; [63] 10.200.0.252/30 host 10.200.0.253 guest 10.200.0.254;"#
            ]],
        );
        check(
            "10.200.0.0/29",
            31,
            expect![[
                r#"capacity 4: [0] 10.200.0.0/31 host 10.200.0.0 guest 10.200.0.1; [1] 10.200.0.2/31 host 10.200.0.2 guest 10.200.0.3; [2] 10.200.0.4/31 host 10.200.0.4 guest 10.200.0.5; [3] 10.200.0.6/31 host 10.200.0.6 guest 10.200.0.7;"#
            ]],
        );
        check("192.168.7.4/30", 30, expect![[r#"capacity 1: [0] 192.168.7.4/30 host 192.168.7.5 guest 192.168.7.6;"#]]);
        check(
            "0.0.0.0/0",
            31,
            expect![[
                r#"capacity 2147483648: [0] 0.0.0.0/31 host 0.0.0.0 guest 0.0.0.1; [1] 0.0.0.2/31 host 0.0.0.2 guest 0.0.0.3; [2] 0.0.0.4/31 host 0.0.0.4 guest 0.0.0.5; [2147483647] 255.255.255.254/31 host 255.255.255.254 guest 255.255.255.255;"#
            ]],
        );
        check("10.0.0.0/31", 30, expect![[r#"error: CIDR 10.0.0.0/31 is too small for one /30 lease subnet"#]]);
        check("10.0.0.0/24", 29, expect![[r#"error: Lease prefix /29 is not supported; use /30 or /31"#]]);
        check("10.0.0.0/24", 32, expect![[r#"error: Lease prefix /32 is not supported; use /30 or /31"#]]);
        check("10.0.0.5/24", 30, expect![[r#"error: CIDR 10.0.0.5/24 has host bits set; use 10.0.0.0/24"#]]);
    }

    #[test]
    fn errors_name_the_pool_and_owner() {
        let pool = LeasePool::new("10.1.0.0/29".parse().unwrap(), 30).unwrap();
        let a = pool.allocate("vm-a").unwrap();
        expect![[r#"Owner `vm-a` already holds lease 10.1.0.0/30"#]]
            .assert_eq(&pool.allocate("vm-a").unwrap_err().to_string());
        let _b = pool.allocate("vm-b").unwrap();
        expect![[r#"Lease pool 10.1.0.0/29 is exhausted: all 2 /30 subnets are leased"#]]
            .assert_eq(&pool.allocate("vm-c").unwrap_err().to_string());
        a.release();
        assert_eq!(pool.allocate("vm-c").unwrap().subnet().to_string(), "10.1.0.0/30");
    }

    #[test]
    fn reuse_order_is_last_released_first() {
        let pool = LeasePool::new("10.1.0.0/28".parse().unwrap(), 30).unwrap();
        let mut leases: Vec<Lease> = ["a", "b", "c", "d"].iter().map(|o| pool.allocate(o).unwrap()).collect();
        let d = leases.pop().unwrap();
        let b = leases.remove(1);
        drop(d);
        drop(b);
        let got: Vec<String> = ["e", "f"].iter().map(|o| pool.allocate(o).unwrap().subnet().to_string()).collect();
        // Each temporary lease is dropped at the end of its closure call, so "f" reuses what "e" freed.
        expect![[r#"["10.1.0.4/30", "10.1.0.4/30"]"#]].assert_eq(&format!("{got:?}"));
        let e = pool.allocate("e").unwrap();
        let f = pool.allocate("f").unwrap();
        expect![[r#"10.1.0.4/30 10.1.0.12/30"#]].assert_eq(&format!("{} {}", e.subnet(), f.subnet()));
    }
}
