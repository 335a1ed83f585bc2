//! kiln-net's integration tests, one module per part of the crate.
#![allow(clippy::unwrap_used)]

mod lease;
mod netns;
mod nft;
mod tap;
