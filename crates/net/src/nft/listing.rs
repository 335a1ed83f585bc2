//! Reading `nft -j list` back: kiln's elements per VM (found by their
//! `kiln-vm:<id>` comment), the batch that removes some VMs, and the
//! uplinks whose forwarding no remaining VM needs.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::model::{Element, batch};
use super::{FORWARDING_BY_KILN, RETIRED_VM_SETS, TABLE, TAG_PREFIX, VM_SETS};
use crate::{Error, Result};

/// kiln's elements in a listing of `inet kiln`, per VM id.
pub(super) fn elements_by_vm(listing: &Value) -> Result<BTreeMap<String, Vec<Element>>> {
    let objects = listing
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::NftOutput("the listing has no `nftables` array".to_owned()))?;
    let mut owned: BTreeMap<String, Vec<Element>> = BTreeMap::new();
    for object in objects {
        let Some(set) = object.get("set").or_else(|| object.get("map")) else { continue };
        if set.get("table").and_then(Value::as_str) != Some(TABLE) {
            continue;
        }
        let name = set.get("name").and_then(Value::as_str);
        let Some(name) = name.and_then(|n| VM_SETS.into_iter().chain(RETIRED_VM_SETS).find(|s| *s == n)) else {
            continue;
        };
        for entry in set.get("elem").and_then(Value::as_array).into_iter().flatten() {
            // A map element is `[key, data]`; a set element is the key.
            let (key, data) = match entry.as_array() {
                Some(pair) if pair.len() == 2 => (&pair[0], Some(pair[1].clone())),
                _ => (entry, None),
            };
            let Some(elem) = key.get("elem") else { continue };
            let Some(id) = elem.get("comment").and_then(Value::as_str).and_then(|c| c.strip_prefix(TAG_PREFIX)) else {
                continue;
            };
            let Some(val) = elem.get("val") else {
                return Err(Error::NftOutput(format!("an element of `{name}` tagged `{TAG_PREFIX}{id}` has no value")));
            };
            owned.entry(id.to_owned()).or_default().push(Element { set: name, key: val.clone(), data });
        }
    }
    Ok(owned)
}

/// The batch removing every element of the VMs `doomed` selects from
/// `listing` (the output of `nft -j list table inet kiln`), and the ids it
/// removes.
pub fn removal_batch(listing: &Value, doomed: impl Fn(&str) -> bool) -> Result<(Value, Vec<String>)> {
    let owned = elements_by_vm(listing)?;
    let mut commands = Vec::new();
    let mut removed = Vec::new();
    for (id, elements) in owned.iter().filter(|(id, _)| doomed(id)) {
        commands.extend(elements.iter().map(Element::delete_command));
        removed.push(id.clone());
    }
    Ok((batch(commands), removed))
}

/// The uplinks `listing` records kiln turned forwarding on for that no VM
/// except those `doomed` selects needs: the ones to restore to 0.
pub(super) fn unused_forwarding(listing: &Value, doomed: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let needed: BTreeSet<String> = elements_by_vm(listing)?
        .iter()
        .filter(|(id, _)| !doomed(id))
        .flat_map(|(_, elements)| elements.iter().filter_map(Element::uplink_of_user))
        .collect();
    let objects = listing["nftables"].as_array().into_iter().flatten();
    let recorded = objects
        .filter_map(|object| object.get("set"))
        .filter(|set| set["table"] == TABLE && set["name"] == FORWARDING_BY_KILN)
        .flat_map(|set| set["elem"].as_array().into_iter().flatten())
        // An element with a comment is `{"elem": {"val": ..}}`, one without the value.
        .filter_map(|entry| entry.pointer("/elem/val").unwrap_or(entry).as_str());
    Ok(recorded.filter(|uplink| !needed.contains(*uplink)).map(str::to_owned).collect())
}
