//! kiln-oci's integration tests: images made by third-party tools
//! (umoci, skopeo, debootstrap), read back and checked.
// A failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod images;
mod layers;
mod registry;
mod sources;
mod store_index;
