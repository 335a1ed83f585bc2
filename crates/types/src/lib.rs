//! kiln-types: the vocabulary that more than one kiln crate speaks, kept in
//! one leaf crate so that each definition exists once and a crate that
//! needs only the vocabulary (kiln-k8s needs the firewall model, not
//! nftables) does not compile the machinery behind it: the firewall model
//! ([`firewall`]), what a service needs of its machine ([`resources`]),
//! Pod settings the spec and kiln-k8s share ([`pod`]), name syntax
//! ([`syntax`]) and kiln's one stable hash ([`hash`]).
//!
//! What it is not: it does no I/O, spawns nothing, touches no host state
//! and has no async runtime. Anything that reads files, opens sockets or
//! runs processes belongs in the crate that owns that concern. Its serde
//! types are the spec file's syntax, so they change only with it.

mod error;
pub mod firewall;
pub mod hash;
pub mod pod;
pub mod resources;
pub mod syntax;

pub use error::{Error, Result};

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
