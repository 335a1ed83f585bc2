//! Name syntax that both the spec parser and kiln-k8s check: what a
//! container image reference and a DNS label may look like. Pure
//! predicates, so each side words its own error.

/// The longest RFC 1123 label (a Kubernetes object name, a namespace).
pub const MAX_DNS_LABEL_LEN: usize = 63;

/// Whether `name` is an RFC 1123 label: 1 to 63 bytes of `[a-z0-9-]`,
/// starting and ending with a letter or digit.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_DNS_LABEL_LEN
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Whether `text` is an RFC 1123 subdomain: dot-separated labels, at most
/// 253 bytes.
pub fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_dns_label)
}

/// Whether `image` can be a container image reference as written: not
/// empty, and no whitespace or control characters (which would smuggle
/// extra words into a runtime's command line). The registry resolves the rest.
pub fn is_image_reference(image: &str) -> bool {
    !image.is_empty() && !image.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_are_lower_case_alphanumerics_and_inner_dashes() {
        for good in ["a", "web-1", "0", &"a".repeat(63)] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", "wéb", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_dns_subdomain("registry.example-1.com"));
        assert!(!is_dns_subdomain("registry..com"));
        assert!(!is_dns_subdomain(&format!("{}.b", "a".repeat(253))));
    }

    #[test]
    fn image_references_hold_no_whitespace_or_control_characters() {
        assert!(is_image_reference("ghcr.io/example/hello:1.0"));
        assert!(is_image_reference("registry/x@sha256:abc"));
        for bad in ["", "a b", "a\tb", "a\nb", "a\u{7}b"] {
            assert!(!is_image_reference(bad), "{bad:?}");
        }
    }
}
