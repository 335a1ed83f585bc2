//! kiln-oci's integration tests: images made by third-party tools
//! (umoci, skopeo, debootstrap), read back and checked.

mod images;
mod sources;
