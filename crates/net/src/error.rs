/// The result type of every fallible kiln-net call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error kiln-net returns. Messages name the thing at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A lease prefix other than /30 or /31.
    #[error("Lease prefix /{prefix} is not supported; use /30 or /31")]
    LeasePrefix { prefix: u8 },
    /// A lease pool CIDR with bits set below its prefix.
    #[error("CIDR {cidr} has host bits set; use {network}")]
    LeaseCidrHostBits { cidr: ipnet::Ipv4Net, network: ipnet::Ipv4Net },
    /// A lease pool CIDR smaller than one lease subnet.
    #[error("CIDR {cidr} is too small for one /{prefix} lease subnet")]
    LeaseCidrTooSmall { cidr: ipnet::Ipv4Net, prefix: u8 },
    /// Every subnet of the pool is leased.
    #[error("Lease pool {cidr} is exhausted: all {capacity} /{prefix} subnets are leased")]
    LeasePoolExhausted { cidr: ipnet::Ipv4Net, prefix: u8, capacity: u32 },
    /// The owner (VM id) already holds a lease.
    #[error("Owner `{owner}` already holds lease {subnet}")]
    LeaseOwnerExists { owner: String, subnet: ipnet::Ipv4Net },
    /// Reading, writing or locking the lease ledger failed.
    #[error("Lease ledger I/O failed on {}", path.display())]
    LedgerIo { path: std::path::PathBuf, source: std::io::Error },
    /// The lease ledger's state file is not valid JSON of the expected shape.
    #[error("Lease ledger {} cannot be parsed", path.display())]
    LedgerParse { path: std::path::PathBuf, source: serde_json::Error },
    /// The lease ledger's state file breaks an invariant.
    #[error("Lease ledger {} is invalid: {reason}", path.display())]
    LedgerInvalid { path: std::path::PathBuf, reason: String },
    /// A VM id that cannot name nftables chains and tags.
    #[error("VM id `{id}` is invalid: {reason}")]
    InvalidVmId { id: String, reason: String },
    /// An interface name (tap or uplink) nft cannot match literally.
    #[error("Interface name `{name}` is invalid: {reason}")]
    InvalidInterfaceName { name: String, reason: String },
    /// A firewall spec that contradicts itself (kiln-types' check).
    #[error(transparent)]
    Firewall(#[from] kiln_types::Error),
    /// Another VM holds a tap or host port this VM's rules need.
    #[error("VM `{vm_id}` cannot use {claim}: VM `{holder}` holds it")]
    NftConflict { vm_id: String, holder: String, claim: String },
    /// A VM with egress, but no uplink for it to leave through.
    #[error(
        "VM `{vm_id}` has egress on, but no uplink is known for its traffic to leave through \
         (the host has no default route)"
    )]
    EgressWithoutUplink { vm_id: String },
    /// An interface whose IPv4 forwarding a VM needs does not exist.
    #[error("Interface `{name}` ({role}) does not exist, so kiln cannot enable IPv4 forwarding on it")]
    InterfaceMissing { name: String, role: String },
    /// Reading or writing an IPv4 forwarding flag failed.
    #[error("Cannot access the sysctl {}", path.display())]
    Sysctl { path: std::path::PathBuf, source: std::io::Error },
    /// Taking kiln's per-namespace network lock failed.
    #[error("Cannot lock {}", path.display())]
    NetLock { path: std::path::PathBuf, source: std::io::Error },
    /// A network namespace kiln-net was pointed at cannot be entered.
    #[error("Cannot enter the network namespace {}", path.display())]
    Netns { path: std::path::PathBuf, source: std::io::Error },
    /// `nft` is not installed.
    #[error("`nft` was not found; install the Debian package `nftables`")]
    NftMissing,
    /// A tool kiln-net runs (other than `nft`) is not installed.
    #[error("`{tool}` was not found; install the Debian package `{package}`")]
    ToolMissing { tool: String, package: String },
    /// `nft` ran without the privilege to change the ruleset.
    #[error("`nft` is not permitted to change the ruleset; it needs CAP_NET_ADMIN (run as root): {stderr}")]
    NftNotPermitted { stderr: String },
    /// `nft` could not be started or waited for.
    #[error("Running `{command}` failed")]
    NftSpawn { command: String, source: std::io::Error },
    /// `nft` exited with an error.
    #[error("`{command}` failed ({status}): {stderr}")]
    NftFailed { command: String, status: String, stderr: String },
    /// `nft` printed something kiln cannot read, or a batch cannot be encoded.
    #[error("Unexpected nft data: {0}")]
    NftOutput(String),
    /// `/dev/net/tun` does not exist.
    #[error("`/dev/net/tun` does not exist; load the `tun` kernel module (`modprobe tun`)")]
    TunMissing,
    /// Creating or deleting a tap needs CAP_NET_ADMIN.
    #[error("Not permitted to create or delete tap `{name}`; it needs CAP_NET_ADMIN (run as root)")]
    TapNotPermitted { name: String },
    /// The tap exists already, or is held open by another process.
    #[error("Tap `{name}` already exists or is in use")]
    TapBusy { name: String },
    /// A device of that name exists and is not a tap kiln can manage.
    #[error("Interface `{name}` exists and is not a tap device")]
    TapNotTap { name: String },
    /// Another tap ioctl failed.
    #[error("Failed to {action} tap `{name}`")]
    TapIo { name: String, action: &'static str, source: std::io::Error },
    /// A tap configuration the kernel would refuse.
    #[error("Tap configuration is invalid: {0}")]
    InvalidTapConfig(String),
    /// The tap did not appear before the deadline.
    #[error("Tap `{name}` did not appear within {waited:?}")]
    TapWaitTimeout { name: String, waited: std::time::Duration },
}
