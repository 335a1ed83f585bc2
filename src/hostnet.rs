//! The host's side of kiln networking: which address range VMs lease from,
//! which interface egress leaves through, and the check that the range
//! does not collide with a network the host already routes.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use kiln_net::TAP_PREFIX;

use crate::{Error, Result};

/// The pool VMs lease /30s from unless `KILN_NET_CIDR` says otherwise:
/// inside 10/8, away from the ranges Docker, libvirt, Kubernetes and
/// Tailscale pick by default.
pub const DEFAULT_CIDR: &str = "10.213.0.0/16";
/// Overrides [`DEFAULT_CIDR`].
pub const CIDR_ENV: &str = "KILN_NET_CIDR";
/// Overrides the uplink (default: the interface of the default route).
pub const UPLINK_ENV: &str = "KILN_UPLINK";

/// Where VM addresses come from and where egress goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNet {
    pub cidr: Ipv4Net,
    /// Lease subnets' prefix length (30).
    pub prefix: u8,
    /// The egress interface; `None` (no default route) refuses egress.
    pub uplink: Option<String>,
}

impl HostNet {
    /// From the environment and `/proc/net/route`.
    pub fn from_env() -> Result<HostNet> {
        let text = std::env::var(CIDR_ENV).unwrap_or_else(|_| DEFAULT_CIDR.to_owned());
        let cidr: Ipv4Net = text.parse().map_err(|e| {
            Error::HostNet(format!("{CIDR_ENV}={text:?} is not an IPv4 CIDR such as 10.213.0.0/16: {e}"))
        })?;
        let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
        let uplink = match std::env::var(UPLINK_ENV) {
            Ok(uplink) if !uplink.is_empty() => Some(uplink),
            _ => default_route_interface(&routes),
        };
        Ok(HostNet { cidr, prefix: kiln_net::DEFAULT_LEASE_PREFIX, uplink })
    }

    /// Fails if the host already routes part of the pool through an
    /// interface that is not a kiln tap: guests would shadow real hosts.
    pub fn check_no_collision(&self) -> Result<()> {
        let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
        match colliding_route(self.cidr, &routes) {
            Some((net, iface)) => Err(Error::HostNet(format!(
                "the VM address pool {} overlaps {net}, which this host routes through {iface}; \
                 set {CIDR_ENV} to a free range",
                self.cidr
            ))),
            None => Ok(()),
        }
    }
}

/// Parses `/proc/net/route`: (interface, destination network) of each route.
fn routes(text: &str) -> impl Iterator<Item = (&str, Ipv4Net)> {
    text.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (iface, dest, mask) = (fields.first()?, fields.get(1)?, fields.get(7)?);
        // The kernel prints the addresses as host-order hex of network-order bytes.
        let dest = Ipv4Addr::from(u32::from_str_radix(dest, 16).ok()?.swap_bytes());
        let mask = u32::from_str_radix(mask, 16).ok()?.swap_bytes();
        let prefix = u8::try_from(mask.leading_ones()).ok()?;
        Some((*iface, Ipv4Net::new(dest, prefix).ok()?))
    })
}

fn default_route_interface(text: &str) -> Option<String> {
    routes(text).find(|(_, net)| net.prefix_len() == 0).map(|(iface, _)| iface.to_owned())
}

fn colliding_route(cidr: Ipv4Net, text: &str) -> Option<(Ipv4Net, String)> {
    routes(text)
        .filter(|(iface, net)| !iface.starts_with(TAP_PREFIX) && net.prefix_len() > 0)
        .find(|(_, net)| net.contains(&cidr.network()) || cidr.contains(&net.network()))
        .map(|(iface, net)| (net, iface.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
kt-web\t0000D50A\t00000000\t0001\t0\t0\t0\tFCFFFFFF\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
";

    #[test]
    fn reads_routes_and_finds_collisions() {
        let parsed: Vec<String> = routes(ROUTES).map(|(i, n)| format!("{i} {n}")).collect();
        assert_eq!(parsed, ["eth0 0.0.0.0/0", "eth0 192.0.2.0/24", "kt-web 10.213.0.0/30", "docker0 172.17.0.0/16"]);
        assert_eq!(default_route_interface(ROUTES).as_deref(), Some("eth0"));
        // kiln's own taps and the default route never collide.
        assert_eq!(colliding_route("10.213.0.0/16".parse().unwrap(), ROUTES), None);
        assert_eq!(
            colliding_route("172.16.0.0/12".parse().unwrap(), ROUTES),
            Some(("172.17.0.0/16".parse().unwrap(), "docker0".to_owned()))
        );
        assert_eq!(
            colliding_route("192.0.2.128/25".parse().unwrap(), ROUTES),
            Some(("192.0.2.0/24".parse().unwrap(), "eth0".to_owned()))
        );
        assert_eq!(routes("garbage\nx y").count(), 0);
    }
}
