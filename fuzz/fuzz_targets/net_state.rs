//! Hostile bytes in the two things kiln-net reads back from the host:
//!
//! - the lease ledger's `leases.json`: `Ledger::open` and `leases` must
//!   answer `Ok` or `Err`, never panic; when they accept it, no subnet is
//!   leased twice and every lease is inside the pool, and an allocation
//!   still gets a subnet no one else holds;
//! - an `nft -j list table inet kiln` listing: `removal_batch` must not
//!   panic, and it removes exactly the ids it reports.
//!
//! The first byte picks the reader; a prefix of a valid ledger steers the
//! fuzzer into the validation code instead of the JSON parser's errors.
#![no_main]

use std::collections::BTreeSet;

use kiln_net::{Ledger, removal_batch};
use libfuzzer_sys::fuzz_target;

const VALID_PREFIX: &[u8] = br#"{"version":1,"cidr":"10.9.0.0/24","prefix":30,"leases":{"#;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    match selector % 3 {
        0 => ledger(rest),
        1 => ledger(&[VALID_PREFIX, rest].concat()),
        _ => listing(rest),
    }
});

fn ledger(bytes: &[u8]) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("leases.json"), bytes).expect("write state");
    let cidr = "10.9.0.0/24".parse().expect("cidr");
    let Ok(ledger) = Ledger::open(dir.path(), cidr, 30) else { return };
    let Ok(leases) = ledger.leases() else { return };
    let subnets: BTreeSet<_> = leases.iter().map(|lease| lease.subnet).collect();
    assert_eq!(subnets.len(), leases.len(), "a subnet leased twice: {leases:?}");
    assert!(leases.iter().all(|lease| cidr.contains(&lease.subnet)), "{leases:?}");
    if let Ok(new) = ledger.allocate("fuzz-new-owner", std::process::id()) {
        assert!(!subnets.contains(&new.subnet), "allocated a held subnet {new:?}");
    }
}

fn listing(bytes: &[u8]) {
    let Ok(listing) = serde_json::from_slice::<serde_json::Value>(bytes) else { return };
    let Ok((batch, removed)) = removal_batch(&listing, |id| id.len() % 2 == 0) else { return };
    assert!(removed.iter().all(|id| id.len() % 2 == 0), "{removed:?}");
    let commands = batch["nftables"].as_array().map_or(0, Vec::len);
    assert_eq!(commands == 0, removed.is_empty(), "{batch}");
}
