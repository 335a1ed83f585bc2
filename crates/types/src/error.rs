/// The result type of kiln-types' checks.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kiln-types' checks refuse. Messages name the thing at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A firewall description that contradicts itself.
    #[error("Firewall spec is invalid: {0}")]
    InvalidFirewall(String),
}
