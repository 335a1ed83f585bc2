//! kiln-types: the vocabulary that more than one kiln crate speaks, kept in
//! one leaf crate so that each definition exists once and a crate that
//! needs only the vocabulary (kiln-k8s needs the firewall model, not
//! nftables) does not compile the machinery behind it.
//!
//! What it is not: it does no I/O, spawns nothing, touches no host state
//! and has no async runtime. Anything that reads files, opens sockets or
//! runs processes belongs in the crate that owns that concern.

pub mod hash;

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
