//! [`PciAddress`]: a host PCI device, checked so it can name a sysfs path safely.

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

/// A PCI address `dddd:bb:dd.f` (domain, bus, device, function 0-7), kept
/// in lowercase. The only way to get one is [`PciAddress::parse`] (or
/// deserializing, which checks the same), so it is always safe to put into
/// `/sys/bus/pci/devices/<it>/` or a VMM argument.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct PciAddress(String);

impl PciAddress {
    /// Checks `text`; the error names it and shows the expected form.
    pub fn parse(text: &str) -> Result<PciAddress> {
        if is_pci_address(text) {
            Ok(PciAddress(text.to_ascii_lowercase()))
        } else {
            Err(Error::invalid("vfio", format!("`{text}` is not a PCI address like 0000:01:00.0")))
        }
    }

    /// The address, lowercase.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if !is_pci_address(&text) {
            return Err(serde::de::Error::custom(format!("`{text}` is not a PCI address such as \"0000:01:00.0\"")));
        }
        Ok(PciAddress(text.to_ascii_lowercase()))
    }
}

fn is_pci_address(address: &str) -> bool {
    let hex = |part: &str, len: usize| part.len() == len && part.bytes().all(|b| b.is_ascii_hexdigit());
    let Some((domain, rest)) = address.split_once(':') else { return false };
    let Some((bus, rest)) = rest.split_once(':') else { return false };
    let Some((device, function)) = rest.split_once('.') else { return false };
    hex(domain, 4)
        && hex(bus, 2)
        && hex(device, 2)
        && function.len() == 1
        && matches!(function.as_bytes()[0], b'0'..=b'7')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_checked_and_lowercased() {
        assert_eq!(PciAddress::parse("0000:0A:1f.7").expect("valid").as_str(), "0000:0a:1f.7");
        for bad in ["", "01:00.0", "0000:01:00.8", "0000:01:00", "0000:01.00.0", "0000:01:00.0.1", "000g:01:00.0"] {
            let err = PciAddress::parse(bad).expect_err(bad).to_string();
            assert_eq!(err, format!("Invalid VM plan: `vfio` `{bad}` is not a PCI address like 0000:01:00.0"));
        }
        let err = serde_json::from_str::<PciAddress>("\"01:00.0\"").expect_err("invalid").to_string();
        assert!(err.starts_with("`01:00.0` is not a PCI address such as \"0000:01:00.0\""), "{err}");
        assert_eq!(serde_json::from_str::<PciAddress>("\"0000:01:00.0\"").expect("valid").as_str(), "0000:01:00.0");
    }
}
