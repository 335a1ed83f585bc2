//! DNS-safe, deterministic object names.
//!
//! Kubernetes names of Pods, Services, Secrets and the like must be RFC 1123
//! labels: at most 63 bytes of `[a-z0-9-]`, starting and ending with an
//! alphanumeric. kiln derives every name from the workload's name, so the
//! same workload always maps onto the same objects, and two different
//! workloads never share one: whenever the mapping loses information
//! (case folding, `_`/`.` replaced, truncation) a hash of the original name
//! is appended.

use kiln_types::hash::fnv1a_64;
use kiln_types::syntax::MAX_DNS_LABEL_LEN as MAX_NAME_LEN;

use crate::{Error, Result};

/// Length of the hash suffix, without its dash.
const HASH_LEN: usize = 8;

/// The DNS label for a workload name, with room left for `reserve` more
/// bytes (a `-suffix` added later). Letters are lower-cased and `_` or `.`
/// become `-`; any other character, or a name with no letter or digit, is
/// an error. A name that had to change, or be cut, gets `-<hash>` of the
/// original name appended, so distinct inputs give distinct labels.
pub(crate) fn instance_label(name: &str, reserve: usize) -> Result<String> {
    let invalid = |why: &str| Error::InvalidName { name: name.to_owned(), why: why.to_owned() };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(invalid(&format!("{bad:?} is not allowed (use letters, digits, `-`, `_` and `.`)")));
    }
    let mapped: String =
        name.chars().map(|c| if c == '_' || c == '.' { '-' } else { c.to_ascii_lowercase() }).collect();
    let trimmed = mapped.trim_matches('-');
    if trimmed.is_empty() {
        return Err(invalid("it has no letter or digit"));
    }
    let budget = MAX_NAME_LEN - reserve;
    if trimmed == name && name.len() <= budget {
        return Ok(name.to_owned());
    }
    Ok(with_hash(trimmed, name, budget))
}

/// `<base>-<suffix>` within 63 bytes. `base` is a valid label; when the
/// whole does not fit, `base` is cut and a hash of `<base>-<suffix>` keeps
/// the result unique.
pub(crate) fn derived(base: &str, suffix: &str) -> String {
    let full = format!("{base}-{suffix}");
    if full.len() <= MAX_NAME_LEN {
        return full;
    }
    let keep = MAX_NAME_LEN.saturating_sub(suffix.len() + 2 + HASH_LEN);
    let cut = base[..keep.min(base.len())].trim_end_matches('-');
    format!("{cut}-{suffix}-{}", hash_hex(&full))
}

/// `text` cut to leave room for `-<hash of original>` within `budget` bytes.
fn with_hash(text: &str, original: &str, budget: usize) -> String {
    let keep = budget.saturating_sub(HASH_LEN + 1).min(text.len());
    let cut = text[..keep].trim_end_matches('-');
    if cut.is_empty() { hash_hex(original) } else { format!("{cut}-{}", hash_hex(original)) }
}

/// 32 bits of FNV-1a 64 as 8 hex digits: stable across platforms and
/// releases (unlike `std`'s hasher), and only used to keep names apart.
fn hash_hex(text: &str) -> String {
    let hash = fnv1a_64(text.as_bytes());
    format!("{:08x}", (hash >> 32) ^ (hash & 0xffff_ffff))
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};
    use proptest::prelude::*;

    use kiln_types::syntax::is_dns_label;

    use super::*;

    fn check(name: &str, expect: Expect) {
        let actual = match instance_label(name, 0) {
            Ok(label) => {
                assert!(is_dns_label(&label), "{label}");
                format!("{label} ({})", label.len())
            }
            Err(err) => format!("error: {err}"),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn instance_labels() {
        check("web", expect!["web (3)"]);
        check("web-1", expect!["web-1 (5)"]);
        check("Web", expect!["web-92812a48 (12)"]);
        check("web_1", expect!["web-1-6d04544f (14)"]);
        check("my.service", expect!["my-service-18d08d4e (19)"]);
        check("-web-", expect!["web-1acbe2d6 (12)"]);
        check(&"a".repeat(63), expect!["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa (63)"]);
        check(&"a".repeat(64), expect!["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-285ec3ac (63)"]);
        check("", expect!["error: `` cannot become a Kubernetes name: it is empty"]);
        check(
            "web app",
            expect![
                "error: `web app` cannot become a Kubernetes name: ' ' is not allowed (use letters, digits, `-`, `_` and `.`)"
            ],
        );
        check(
            "wéb",
            expect![
                "error: `wéb` cannot become a Kubernetes name: 'é' is not allowed (use letters, digits, `-`, `_` and `.`)"
            ],
        );
        check(
            "a/b",
            expect![
                "error: `a/b` cannot become a Kubernetes name: '/' is not allowed (use letters, digits, `-`, `_` and `.`)"
            ],
        );
        check("_._", expect!["error: `_._` cannot become a Kubernetes name: it has no letter or digit"]);
    }

    #[test]
    fn derived_names_stay_within_63_bytes() {
        expect!["web-host"].assert_eq(&derived("web", "host"));
        let long = "b".repeat(63);
        let name = derived(&long, "keystore");
        expect!["bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-keystore-a2cb9d25"].assert_eq(&name);
        assert!(is_dns_label(&name));
    }

    proptest! {
        #[test]
        fn labels_are_dns_labels_and_injective(a in "[A-Za-z0-9._-]{1,80}", b in "[A-Za-z0-9._-]{1,80}", reserve in 0usize..20) {
            let (Ok(la), Ok(lb)) = (instance_label(&a, reserve), instance_label(&b, reserve)) else { return Ok(()) };
            prop_assert!(is_dns_label(&la) && la.len() + reserve <= MAX_NAME_LEN, "{la}");
            prop_assert_eq!(instance_label(&a, reserve).ok(), Some(la.clone()));
            if a != b {
                prop_assert_ne!(la, lb);
            }
            let d = derived(&instance_label(&a, 0).unwrap_or_default(), "host");
            prop_assert!(is_dns_label(&d), "{d}");
        }
    }
}
