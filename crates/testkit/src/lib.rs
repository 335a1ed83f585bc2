//! Test support for kiln crates.
