//! The seed applied: hostname, and eth0's address and default route over
//! rtnetlink.

use std::fs::{self, File};
use std::io::{self, Read, Write};

use kiln_guest::{GuestConfig, netlink};

use crate::disks::mount_fat;
use crate::{Context, Failure, Result, say, sys};

const SEED_MOUNT: &str = "/run/kiln/seed";

/// Applies the seed and returns it (container mode writes `/etc/hosts` from it).
pub(crate) fn apply_seed(device: &str) -> Result<GuestConfig> {
    mount_fat(device, SEED_MOUNT)?;
    let meta_data = fs::read_to_string(format!("{SEED_MOUNT}/meta-data")).unwrap_or_default();
    let network_config = fs::read_to_string(format!("{SEED_MOUNT}/network-config")).ok();
    let _ = sys::umount(SEED_MOUNT);
    let config =
        GuestConfig::parse(&meta_data, network_config.as_deref()).context(|| "cannot use the seed".to_owned())?;
    if let Some(hostname) = &config.hostname {
        sys::sethostname(hostname).context(|| format!("cannot set the hostname to {hostname:?}"))?;
    }
    let mut netlink = Netlink::open()?;
    netlink.link_up("lo")?;
    if let Some(ipv4) = &config.ipv4 {
        netlink.link_up(&ipv4.interface)?;
        let index = interface_index(&ipv4.interface)?;
        netlink.request(&format!("add {}/{} to {}", ipv4.address, ipv4.prefix_len, ipv4.interface), |seq| {
            netlink::add_address(seq, index, ipv4.address, ipv4.prefix_len)
        })?;
        if let Some(gateway) = ipv4.gateway {
            netlink.request(&format!("add the default route via {gateway}"), |seq| {
                netlink::add_default_route(seq, index, gateway)
            })?;
        }
        say(&format!(
            "network {} {}/{} gateway {}",
            ipv4.interface,
            ipv4.address,
            ipv4.prefix_len,
            ipv4.gateway.map_or_else(|| "none".to_owned(), |g| g.to_string())
        ));
    }
    Ok(config)
}

fn interface_index(name: &str) -> Result<u32> {
    let path = format!("/sys/class/net/{name}/ifindex");
    let text = fs::read_to_string(&path).context(|| format!("network interface {name} not found ({path})"))?;
    text.trim().parse().context(|| format!("unreadable {path}"))
}

/// A rtnetlink socket and the next request's sequence number.
struct Netlink {
    socket: File,
    seq: u32,
}

impl Netlink {
    fn open() -> Result<Netlink> {
        Ok(Netlink { socket: sys::netlink_route().context(|| "cannot open a netlink socket".to_owned())?, seq: 0 })
    }

    fn link_up(&mut self, name: &str) -> Result<()> {
        let index = interface_index(name)?;
        self.request(&format!("bring {name} up"), |seq| netlink::link_up(seq, index))
    }

    fn request(&mut self, what: &str, build: impl FnOnce(u32) -> Vec<u8>) -> Result<()> {
        self.seq += 1;
        let message = build(self.seq);
        self.socket.write_all(&message).context(|| format!("cannot {what}"))?;
        let mut reply = vec![0; 8192];
        let len = self.socket.read(&mut reply).context(|| format!("cannot {what}"))?;
        match netlink::parse_ack(&reply[..len], self.seq) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(errno)) => Err(Failure(format!("cannot {what}: {}", io::Error::from_raw_os_error(errno)))),
            Err(err) => Err(Failure(format!("cannot {what}: {err}"))),
        }
    }
}
