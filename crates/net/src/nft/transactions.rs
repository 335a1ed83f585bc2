//! What [`Nft`] does with a VM: apply (the fast path that only creates
//! elements, and the slow path that lists and replaces), remove by key or
//! by tag, reconcile, and the IPv4 forwarding flags that go with them. Every
//! such transaction holds kiln's lock of the network namespace.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::listing::{elements_by_vm, removal_batch, unused_forwarding};
use super::model::{Element, batch, tag};
use super::rules::setup_batch;
use super::runner::{Refusal, refusal};
use super::{FORWARDING_BY_KILN, FORWARDING_COMMENT, TABLE, UPLINK_USERS};
use crate::forwarding;
use crate::{Error, Nft, Result, VmRules, validate_vm_id};

/// The forwarding flags one apply turns on (those that were off), each
/// with what it is to the VM, for an error.
#[derive(Debug, Default)]
struct FlagsToSet {
    tap: Option<(String, String)>,
    uplink: Option<(String, String)>,
}

impl Nft {
    /// Adds `rules`' VM, replacing whatever exists for its id, in one
    /// transaction, and turns IPv4 forwarding on where the VM needs it (its
    /// tap and uplink; see the module doc). Fails, changing nothing, if
    /// another VM holds its tap or one of its published host ports, or if
    /// an interface it needs forwarding on does not exist.
    pub fn apply(&self, rules: &VmRules) -> Result<()> {
        let add = rules.add_batch()?;
        let _lock = self.netns.lock()?;
        let flags = self.flags_to_set(rules)?;
        // Recorded in the same transaction as the VM, before the flag is
        // written: a crash in between leaves a record of a flag that is
        // still 0, which restoring to 0 later cannot harm.
        let record = flags.uplink.as_ref().map(|(uplink, _)| {
            json!({"add": {"element": {"family": "inet", "table": TABLE, "name": FORWARDING_BY_KILN,
                "elem": [{"elem": {"val": uplink, "comment": FORWARDING_COMMENT}}]}}})
        });
        let with_record = |mut batch: Value| {
            if let (Some(record), Some(commands)) = (&record, batch["nftables"].as_array_mut()) {
                commands.push(record.clone());
            }
            batch
        };
        let mut replaced_uplinks = Vec::new();
        match self.run_batch(&with_record(add)) {
            Ok(()) => {}
            Err(e) => {
                match refusal(&e) {
                    Some(Refusal::Missing) => self.run_batch(&setup_batch()?)?,
                    Some(Refusal::Exists) => {}
                    None => return Err(e),
                }
                replaced_uplinks = self.replace(rules, &with_record)?;
            }
        }
        if let Err(e) = self.set_flags(&flags) {
            // Undo the VM rather than leave it without the forwarding it needs.
            let _ = self.remove_where_locked(|id| id == rules.vm_id);
            return Err(e);
        }
        if replaced_uplinks.iter().any(|old| Some(old.as_str()) != rules.forwarded_uplink()) {
            self.restore_unused_forwarding()?;
        }
        Ok(())
    }

    /// The slow path of [`Nft::apply`]: the table was new, or something of
    /// the VM (or of another VM) is in the way. Returns the uplinks the
    /// VM's old elements used.
    fn replace(&self, rules: &VmRules, with_record: &dyn Fn(Value) -> Value) -> Result<Vec<String>> {
        let listing = self.list_table()?.unwrap_or_else(|| batch(Vec::new()));
        let owned = elements_by_vm(&listing)?;
        let elements = rules.elements();
        for element in &elements {
            let holder = owned.iter().find(|(id, theirs)| {
                **id != rules.vm_id && theirs.iter().any(|t| t.set == element.set && t.key == element.key)
            });
            if let Some((holder, _)) = holder {
                return Err(Error::NftConflict {
                    vm_id: rules.vm_id.clone(),
                    holder: holder.clone(),
                    claim: element.claim(),
                });
            }
        }
        let tag = tag(&rules.vm_id);
        let old_elements = owned.get(&rules.vm_id).map(Vec::as_slice).unwrap_or_default();
        let old = old_elements.iter().map(Element::delete_command);
        let new = elements.iter().map(|e| e.command("create", &tag));
        self.run_batch(&with_record(batch(old.chain(new).collect())))?;
        Ok(old_elements.iter().filter_map(Element::uplink_of_user).collect())
    }

    /// Reads the flags `rules` needs; fails if an interface is missing.
    fn flags_to_set(&self, rules: &VmRules) -> Result<FlagsToSet> {
        if !rules.needs_forwarding() {
            return Ok(FlagsToSet::default());
        }
        let role = |what: &str| format!("the {what} of VM `{}`", rules.vm_id);
        self.netns.run(|| {
            let missing = |name: &str, what: &str| Error::InterfaceMissing { name: name.to_owned(), role: role(what) };
            let tap_on = forwarding::read_flag(&rules.tap)?.ok_or_else(|| missing(&rules.tap, "tap"))?;
            let mut flags = FlagsToSet { tap: (!tap_on).then(|| (rules.tap.clone(), role("tap"))), uplink: None };
            if let Some(uplink) = rules.forwarded_uplink() {
                let uplink_on = forwarding::read_flag(uplink)?.ok_or_else(|| missing(uplink, "uplink"))?;
                flags.uplink = (!uplink_on).then(|| (uplink.to_owned(), role("uplink")));
            }
            Ok(flags)
        })
    }

    fn set_flags(&self, flags: &FlagsToSet) -> Result<()> {
        if flags.tap.is_none() && flags.uplink.is_none() {
            return Ok(());
        }
        self.netns.run(|| {
            for (ifname, role) in flags.tap.iter().chain(&flags.uplink) {
                if !forwarding::write_flag(ifname, true)? {
                    return Err(Error::InterfaceMissing { name: ifname.clone(), role: role.clone() });
                }
            }
            Ok(())
        })
    }

    /// Removes what [`Nft::apply`] added for `rules`, in one transaction and
    /// without a listing, then restores the uplink's forwarding flag if kiln
    /// turned it on and no VM needs it any more. `rules` should be the ones
    /// the VM was applied with; if the VM's elements are not exactly those
    /// (it was removed or replaced meanwhile: its fingerprint is missing),
    /// nothing is deleted by key and [`Nft::remove_vm`]'s removal by tag
    /// runs instead, so another VM's element is never deleted.
    pub fn remove(&self, rules: &VmRules) -> Result<()> {
        let remove = rules.remove_batch()?;
        let _lock = self.netns.lock()?;
        match self.run_batch(&remove) {
            Err(e) if refusal(&e) == Some(Refusal::Missing) => {
                self.remove_where_locked(|id| id == rules.vm_id).map(drop)
            }
            Err(e) => Err(e),
            Ok(()) if rules.forwarded_uplink().is_some() => self.restore_unused_forwarding(),
            Ok(()) => Ok(()),
        }
    }

    /// Removes everything tagged with VM `vm_id`, found in a listing, in one
    /// transaction; returns whether there was anything. Absent: no-op.
    /// Restores forwarding flags as [`Nft::remove`] does.
    pub fn remove_vm(&self, vm_id: &str) -> Result<bool> {
        validate_vm_id(vm_id)?;
        let _lock = self.netns.lock()?;
        self.remove_where_locked(|id| id == vm_id).map(|removed| !removed.is_empty())
    }

    /// Removes everything of every VM not in `alive`, in one transaction;
    /// returns the removed ids, sorted. Restores every forwarding flag kiln
    /// turned on that no VM in `alive` needs.
    pub fn reconcile<S: AsRef<str>>(&self, alive: impl IntoIterator<Item = S>) -> Result<Vec<String>> {
        let alive: BTreeSet<String> = alive.into_iter().map(|s| s.as_ref().to_owned()).collect();
        let _lock = self.netns.lock()?;
        self.remove_where_locked(|id| !alive.contains(id))
    }

    /// The ids of the VMs that have elements in kiln's table.
    pub fn list_vms(&self) -> Result<BTreeSet<String>> {
        match self.list_table()? {
            Some(listing) => Ok(elements_by_vm(&listing)?.into_keys().collect()),
            None => Ok(BTreeSet::new()),
        }
    }

    /// With kiln's lock held: removes the VMs `doomed` selects, then
    /// restores the forwarding no remaining VM needs.
    fn remove_where_locked(&self, doomed: impl Fn(&str) -> bool) -> Result<Vec<String>> {
        let Some(listing) = self.list_table()? else {
            return Ok(Vec::new());
        };
        let (batch, removed) = removal_batch(&listing, &doomed)?;
        if !removed.is_empty() {
            self.run_batch(&batch)?;
        }
        self.restore_forwarding(&unused_forwarding(&listing, &doomed)?)?;
        Ok(removed)
    }

    /// After a removal by key: lists the (small) sets that say where kiln
    /// turned forwarding on and who needs it, and restores the unused.
    fn restore_unused_forwarding(&self) -> Result<()> {
        let set = |name| self.list(&["set", "inet", TABLE, name]);
        let objects = |listing: Value| listing["nftables"].as_array().cloned().unwrap_or_default();
        let Some(recorded) = set(FORWARDING_BY_KILN)? else { return Ok(()) };
        // nft lists an empty set without `elem`.
        if !objects(recorded.clone()).iter().any(|object| object["set"]["elem"].is_array()) {
            return Ok(());
        }
        let mut listing = objects(recorded);
        listing.extend(set(UPLINK_USERS)?.map(objects).unwrap_or_default());
        self.restore_forwarding(&unused_forwarding(&batch(listing), |_| false)?)
    }

    /// Writes 0 to each uplink's flag, then drops the records, in one
    /// transaction (a crash in between leaves a record of a flag already
    /// 0, which the next release drops).
    fn restore_forwarding(&self, uplinks: &[String]) -> Result<()> {
        if uplinks.is_empty() {
            return Ok(());
        }
        self.netns.run(|| {
            // An uplink that is gone took its flag with it.
            uplinks.iter().try_for_each(|uplink| forwarding::write_flag(uplink, false).map(drop))
        })?;
        let delete = uplinks.iter().map(|uplink| {
            json!({"delete": {"element": {"family": "inet", "table": TABLE, "name": FORWARDING_BY_KILN, "elem": [uplink]}}})
        });
        self.run_batch(&batch(delete.collect()))
    }
}
