//! kiln-net's integration tests, one module per part of the crate.
#![allow(clippy::unwrap_used)]

/// `base` with some fields changed: kiln-net's option structs (`VmRules`,
/// `TapConfig`) are `#[non_exhaustive]`, so there is no `T { field, ..base }`
/// outside kiln-net.
macro_rules! with_fields {
    ($base:expr, $($field:ident: $value:expr),+ $(,)?) => {{
        let mut changed = $base;
        $(changed.$field = $value;)+
        changed
    }};
}

mod lease;
mod netns;
mod nft;
mod tap;
