//! Linux interface names, checked in one place for taps and for the
//! interfaces nftables matches.

use crate::{Error, Result};

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub(crate) const IFNAME_MAX: usize = 15;

/// Checks `name` is a Linux interface name nft matches literally: 1..=15
/// bytes of ASCII letters, digits, `-`, `_` and `.`.
pub(crate) fn validate_for_nft(name: &str) -> Result<()> {
    // `*` and `\` mean wildcard/escape to nft; kiln never needs them.
    validate(name, |b| b == b'.', "only ASCII letters, digits, `-`, `_` and `.` are allowed")
}

/// Checks `name` can name a tap kiln makes: 1..=15 bytes of ASCII letters,
/// digits, `-` and `_`.
pub(crate) fn validate_for_tap(name: &str) -> Result<()> {
    validate(name, |_| false, "only ASCII letters, digits, `-` and `_` are allowed")
}

/// The checks every interface name gets; `also_allowed` says which bytes a
/// name may hold beyond letters, digits, `-` and `_` (`charset` says it in words).
fn validate(name: &str, also_allowed: fn(u8) -> bool, charset: &str) -> Result<()> {
    let invalid = |reason: &str| Err(Error::InvalidInterfaceName { name: name.to_owned(), reason: reason.to_owned() });
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > IFNAME_MAX {
        return invalid("it is longer than 15 bytes (IFNAMSIZ)");
    }
    if name == "." || name == ".." {
        return invalid("`.` and `..` are not interface names");
    }
    // Their /proc/sys/net/ipv4/conf entries would set every interface's
    // forwarding (or `route_localnet`) at once, which kiln promises never to do.
    if name == "all" || name == "default" {
        return invalid("`all` and `default` name sysctl groups, not interfaces");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || also_allowed(b)) {
        return invalid(charset);
    }
    Ok(())
}
