//! The persistent lease ledger shared by launcher processes on one host.
//!
//! A ledger directory holds two files:
//!
//! - `leases.lock`: empty; every read-modify-write of the state holds an
//!   exclusive `flock` on it, and only for that one operation. The lock is
//!   tied to the open file, so a SIGKILLed holder releases it at once.
//! - `leases.json`: the state, mode 0600, for example
//!   ```json
//!   {"version":1,"cidr":"10.200.0.0/24","prefix":30,
//!    "leases":{"vm-a":{"index":0,"pid":4242,"created":1763930000}}}
//!   ```
//!   `leases` maps the owner (VM id) to its subnet index (see the pool's
//!   layout: subnet `index` of `cidr` cut into `/prefix`), the pid of the
//!   process whose life the lease follows, and the creation time in seconds
//!   since the Unix epoch. A missing or empty file is an empty ledger.
//!
//! Invariants, checked on every read (a violation is an error naming the
//! file, never silently repaired):
//! - `cidr` and `prefix` are those the ledger was opened with;
//! - every index is below the capacity and no two owners share one, so two
//!   processes never hand out the same subnet;
//! - the file on disk is always a complete state: a new state is written to
//!   a temporary file in the same directory and renamed over the old one, so
//!   a writer killed at any point leaves the previous or the next state.
//!
//! Durability: no fsync (0 per operation). The ledger coordinates running
//! processes; a rename is atomic for every other process whether or not the
//! data reached the disk. Only a host crash can lose unsynced data, and a
//! host crash also kills every lease holder, so the lost leases would have
//! been reclaimed anyway (and an empty file after such a crash reads as an
//! empty ledger). Put the ledger on `/run` (tmpfs) and it is even cleared on
//! reboot.
//!
//! Allocation takes the lowest free index. Liveness is by pid; a pid reused
//! by an unrelated process keeps a dead VM's lease until that process exits
//! too: a leak in the safe direction, never a double hand-out.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use rustix::fs::{FlockOperation, flock};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lease::SubnetLayout;

const STATE_FILE: &str = "leases.json";
const LOCK_FILE: &str = "leases.lock";
const FORMAT_VERSION: u32 = 1;

/// A lease pool persisted in a directory and shared by processes.
#[derive(Debug)]
pub struct Ledger {
    dir: PathBuf,
    state_path: PathBuf,
    lock_file: File,
    /// `flock` excludes other open files, not other threads sharing ours.
    threads: Mutex<()>,
    layout: SubnetLayout,
}

/// One lease as recorded in the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The VM id holding the lease.
    pub owner: String,
    /// The point-to-point subnet.
    pub subnet: Ipv4Net,
    /// The tap (host) side address.
    pub host_addr: Ipv4Addr,
    /// The guest's address.
    pub guest_addr: Ipv4Addr,
    /// The process whose life the lease follows.
    pub pid: u32,
    /// When the lease was taken, in seconds since the Unix epoch.
    pub created: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    version: u32,
    cidr: Ipv4Net,
    prefix: u8,
    leases: BTreeMap<String, Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    index: u32,
    pid: u32,
    created: u64,
}

impl Ledger {
    /// Opens (creating if needed) the ledger in `dir` for `cidr` cut into
    /// `/prefix` subnets. Fails if the ledger there was made for another
    /// CIDR or prefix.
    pub fn open(dir: impl AsRef<Path>, cidr: Ipv4Net, prefix: u8) -> Result<Self> {
        let layout = SubnetLayout::new(cidr, prefix)?;
        let dir = dir.as_ref().to_path_buf();
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|source| io_error(&dir, source))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| io_error(&lock_path, source))?;
        let ledger = Self { state_path: dir.join(STATE_FILE), dir, lock_file, threads: Mutex::new(()), layout };
        // Validate what is there now, so a mismatch shows up at open.
        ledger.locked(|_| Ok(((), false)))?;
        Ok(ledger)
    }

    /// Leases the lowest free subnet to `owner`, following process `pid`.
    pub fn allocate(&self, owner: &str, pid: u32) -> Result<LeaseRecord> {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
        self.locked(|state| {
            if let Some(entry) = state.leases.get(owner) {
                let subnet = self.layout.subnet(entry.index).subnet;
                return Err(Error::LeaseOwnerExists { owner: owner.to_owned(), subnet });
            }
            let used: BTreeSet<u32> = state.leases.values().map(|entry| entry.index).collect();
            // The first gap in the sorted used indices; `used` has no duplicates (checked on read).
            let index = used
                .iter()
                .zip(0u32..)
                .find(|(used, expected)| *used != expected)
                .map_or(u32::try_from(used.len()).unwrap_or(u32::MAX), |(_, expected)| expected);
            if index >= self.layout.capacity() {
                return Err(Error::LeasePoolExhausted {
                    cidr: self.layout.cidr(),
                    prefix: self.layout.prefix(),
                    capacity: self.layout.capacity(),
                });
            }
            let entry = Entry { index, pid, created };
            let record = self.record(owner, &entry);
            state.leases.insert(owner.to_owned(), entry);
            Ok((record, true))
        })
    }

    /// Gives `owner`'s lease back. Returns whether it held one.
    pub fn release(&self, owner: &str) -> Result<bool> {
        self.locked(|state| {
            let held = state.leases.remove(owner).is_some();
            Ok((held, held))
        })
    }

    /// Frees every lease whose process `is_alive` says is gone, and returns
    /// their owners, sorted. [`pid_is_alive`] is the usual check.
    pub fn reclaim(&self, is_alive: impl Fn(u32) -> bool) -> Result<Vec<String>> {
        self.locked(|state| {
            let dead: Vec<String> =
                state.leases.iter().filter(|(_, entry)| !is_alive(entry.pid)).map(|(owner, _)| owner.clone()).collect();
            for owner in &dead {
                state.leases.remove(owner);
            }
            let changed = !dead.is_empty();
            Ok((dead, changed))
        })
    }

    /// Every lease held now, in subnet order.
    pub fn leases(&self) -> Result<Vec<LeaseRecord>> {
        self.locked(|state| {
            let mut records: Vec<LeaseRecord> =
                state.leases.iter().map(|(owner, entry)| self.record(owner, entry)).collect();
            records.sort_by_key(|record| u32::from(record.subnet.network()));
            Ok((records, false))
        })
    }

    /// How many subnets the ledger's pool holds in all.
    pub fn capacity(&self) -> u32 {
        self.layout.capacity()
    }

    fn record(&self, owner: &str, entry: &Entry) -> LeaseRecord {
        let subnet = self.layout.subnet(entry.index);
        LeaseRecord {
            owner: owner.to_owned(),
            subnet: subnet.subnet,
            host_addr: subnet.host_addr,
            guest_addr: subnet.guest_addr,
            pid: entry.pid,
            created: entry.created,
        }
    }

    /// Runs one read-modify-write under the lock. `change` returns its
    /// result and whether it modified the state (only then is it written).
    fn locked<T>(&self, change: impl FnOnce(&mut State) -> Result<(T, bool)>) -> Result<T> {
        let lock_path = || self.dir.join(LOCK_FILE);
        // The guard protects no data, so a poisoned one is fine to take.
        let _thread_guard = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        flock(&self.lock_file, FlockOperation::LockExclusive).map_err(|errno| io_error(&lock_path(), errno.into()))?;
        let outcome = self.read_state().and_then(|mut state| {
            let (value, modified) = change(&mut state)?;
            if modified {
                self.write_state(&state)?;
            }
            Ok(value)
        });
        let unlocked = flock(&self.lock_file, FlockOperation::Unlock);
        let value = outcome?;
        unlocked.map_err(|errno| io_error(&lock_path(), errno.into()))?;
        Ok(value)
    }

    fn read_state(&self) -> Result<State> {
        let empty = || State {
            version: FORMAT_VERSION,
            cidr: self.layout.cidr(),
            prefix: self.layout.prefix(),
            leases: BTreeMap::new(),
        };
        let bytes = match fs::read(&self.state_path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(empty()),
            Err(source) => return Err(io_error(&self.state_path, source)),
        };
        if bytes.is_empty() {
            return Ok(empty());
        }
        let state: State = serde_json::from_slice(&bytes)
            .map_err(|source| Error::LedgerParse { path: self.state_path.clone(), source })?;
        self.validate(&state)?;
        Ok(state)
    }

    fn validate(&self, state: &State) -> Result<()> {
        let invalid = |reason: String| Err(Error::LedgerInvalid { path: self.state_path.clone(), reason });
        if state.version != FORMAT_VERSION {
            return invalid(format!("format version {} is not the supported {FORMAT_VERSION}", state.version));
        }
        if state.cidr != self.layout.cidr() || state.prefix != self.layout.prefix() {
            return invalid(format!(
                "it was made for {} cut into /{}, not {} cut into /{}",
                state.cidr,
                state.prefix,
                self.layout.cidr(),
                self.layout.prefix()
            ));
        }
        let mut seen = BTreeMap::new();
        for (owner, entry) in &state.leases {
            if entry.index >= self.layout.capacity() {
                return invalid(format!(
                    "owner `{owner}` has subnet index {} but the pool holds {}",
                    entry.index,
                    self.layout.capacity()
                ));
            }
            if let Some(other) = seen.insert(entry.index, owner) {
                return invalid(format!("owners `{other}` and `{owner}` share subnet index {}", entry.index));
            }
        }
        Ok(())
    }

    /// Writes `state` to a temporary file next to the state file and renames
    /// it into place (no fsync: see the module doc).
    fn write_state(&self, state: &State) -> Result<()> {
        let temp_path = self.dir.join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
        let mut bytes =
            serde_json::to_vec(state).map_err(|source| Error::LedgerParse { path: self.state_path.clone(), source })?;
        bytes.push(b'\n');
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp_path)
            .and_then(|mut file| file.write_all(&bytes))
            .and_then(|()| fs::rename(&temp_path, &self.state_path));
        if let Err(source) = written {
            // Best effort: the temp file is ours alone (our pid, under the lock).
            let _ = fs::remove_file(&temp_path);
            return Err(io_error(&self.state_path, source));
        }
        Ok(())
    }
}

/// Whether process `pid` exists (signal 0). A process owned by another user
/// counts as alive. Pid 0 and pids beyond the kernel's range are not alive.
pub fn pid_is_alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(errno) => errno == rustix::io::Errno::PERM,
    }
}

fn io_error(path: &Path, source: io::Error) -> Error {
    Error::LedgerIo { path: path.to_path_buf(), source }
}
