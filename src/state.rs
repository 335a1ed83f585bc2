//! kiln's host state: one directory holding a record per VM, so that
//! `kiln ps`, `kiln stop` and `kiln gc` know every VM and every host
//! resource it holds, even after `kiln run` was SIGKILLed.
//!
//! Layout (every directory 0700, every file and socket 0600 or tighter:
//! `kiln run` also sets umask 077, so what a tool it spawns creates is
//! private too):
//!
//! ```text
//! <state>/gc.lock            flock: gc exclusive per pass, launchers shared per claim
//! <state>/leases/            the kiln-net lease ledger
//! <state>/data/<name>.img    data disks, kept across runs (and by gc)
//! <state>/vms/<name>/lock    flock held by the `kiln run` of that VM
//! <state>/vms/<name>/record.json
//! <state>/vms/<name>/...     images, console log, VMM sockets and log
//! ```
//!
//! The rule that makes crash recovery work: a resource's name is written
//! into the record *before* the resource is created (tap, rules, lease,
//! VMM), with temp file + rename, so at any SIGKILL the record names a
//! superset of what exists. Whether a VM's launcher still runs is decided
//! by its `lock`: `kiln run` holds an exclusive `flock` on it for the VM's
//! whole life, and the kernel drops it when the process dies, so there is
//! no pid reuse to get wrong.
//!
//! The lock protocol between launchers and gc. gc's orphan pass releases
//! every tap, firewall element and lease whose VM name no *alive* record
//! claims, so a launcher must never hold a resource that gc's listing did
//! not see as alive. Hence:
//!
//! - `kiln gc` holds `<state>/gc.lock` exclusively for its whole pass
//!   (listing, dead VMs, orphans): two gc runs serialize.
//! - [`StateDir::claim`] holds it shared while it takes the VM's lock and
//!   writes the first record. A claim thus lies wholly before a gc pass
//!   (the listing sees the VM alive) or wholly after it; a launcher creates
//!   nothing before its claim, and only under its VM's name afterwards.
//! - gc's orphan pass decides by *name* (the alive VMs' names and the taps
//!   [`kiln_net::tap_name`] derives from them), not by what the record
//!   already names, so a VM that gc listed while it was still starting
//!   keeps the lease, tap and elements it takes during the pass.
//! - A launcher releasing its own VM needs no lock: gc sees it alive until
//!   the launcher exits, and each release step is idempotent.
//!
//! Both sides wait (polling, at most `STATE_LOCK_WAIT`): a gc pass and a
//! claim are short, so `kiln run` is never refused because gc runs.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Overrides where the state lives (tests, several independent kilns).
pub const STATE_DIR_ENV: &str = "KILN_STATE_DIR";

const RECORD_FILE: &str = "record.json";
const LOCK_FILE: &str = "lock";
const GC_LOCK_FILE: &str = "gc.lock";

/// The longest a launcher waits for a gc pass to end, or gc for another
/// gc pass or a claim; more means a kiln process is stuck.
pub(crate) const STATE_LOCK_WAIT: Duration = Duration::from_secs(60);

/// What a VM holds on the host, as far as its launcher got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    pub name: String,
    /// The spec file it was started from.
    pub spec: PathBuf,
    /// The `kiln run` process.
    pub launcher_pid: u32,
    /// Seconds since the Unix epoch.
    pub started: u64,
    /// The last step the launcher began (for `kiln ps` and post-mortems).
    pub phase: Phase,
    /// The lease's host and guest addresses and prefix, once leased.
    pub lease: Option<LeaseInfo>,
    /// The tap, named before it is created.
    pub tap: Option<String>,
    /// Set before the firewall rules are applied.
    pub firewall: bool,
    /// The VMM, set right after it is spawned.
    pub vmm: Option<VmmInfo>,
    /// The guest's serial console log.
    pub console_log: Option<PathBuf>,
    /// How the service ended, once it did.
    pub exit: Option<ExitInfo>,
    /// The OCI image the VM runs, once it is pulled (none for a binary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<VmImage>,
}

/// The image of a VM as the record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmImage {
    /// `service.image` as the spec gives it (relative paths anchored).
    pub source: String,
    /// The manifest digest it resolved to, `sha256:...`.
    pub manifest: String,
}

impl VmImage {
    /// `SOURCE@sha256:<12 hex>`: what `kiln ps` shows.
    pub fn short(&self) -> String {
        let hex = self.manifest.strip_prefix("sha256:").unwrap_or(&self.manifest);
        format!("{}@sha256:{}", self.source, &hex[..hex.len().min(12)])
    }
}

/// The launcher's steps, in order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Claimed, nothing taken yet.
    #[default]
    Starting,
    Lease,
    Images,
    Tap,
    Firewall,
    Vmm,
    Booting,
    Running,
    Stopping,
    Stopped,
}

/// A lease as the record keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseInfo {
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
    pub prefix_len: u8,
}

/// The VMM as the record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmInfo {
    /// `cloud-hypervisor` or `qemu`.
    pub backend: String,
    /// Its pid, which is also its process group.
    pub pid: u32,
    /// Its run directory (sockets, log).
    pub run_dir: PathBuf,
    /// Its exact command line, read from `/proc/<pid>/cmdline` right after
    /// it started: gc kills `pid` only if that still matches byte for byte
    /// and `pid` still leads its own process group. Empty if unreadable
    /// (then gc never kills it; the VMM dies with its launcher anyway).
    #[serde(default)]
    pub argv: Vec<String>,
}

/// How the service ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitInfo {
    /// The service's exit code as the guest reported it, if it did.
    pub code: Option<i32>,
    /// What happened, in words ("service exited", "VMM crashed: ...").
    pub how: String,
    /// Who said so; `None` in records written before kiln kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ExitSource>,
}

/// Where an [`ExitInfo`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitSource {
    /// kiln-init's report on the control channel (never the console).
    KilnInit,
    /// The VMM: a crash, panic or reset it saw (which wins over any report),
    /// or a VM that stopped without a report.
    Vmm,
    /// kiln run failed before the VM ended.
    Launcher,
}

impl std::fmt::Display for ExitSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExitSource::KilnInit => "reported by kiln-init",
            ExitSource::Vmm => "seen by the VMM",
            ExitSource::Launcher => "kiln run failed",
        })
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// A VM's state directory, claimed by this process: it holds the VM's lock
/// until dropped.
#[derive(Debug)]
pub struct VmClaim {
    dir: PathBuf,
    _lock: File,
    /// The record; [`VmClaim::save`] writes it.
    pub record: VmRecord,
}

/// `<state>/gc.lock`, held (shared or exclusive) until dropped.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// One VM found in the state directory.
#[derive(Debug, Clone)]
pub struct VmEntry {
    pub record: VmRecord,
    /// Whether its launcher still holds the lock.
    pub alive: bool,
    pub dir: PathBuf,
}

impl StateDir {
    /// The state directory: `$KILN_STATE_DIR`, else `/var/lib/kiln` as root,
    /// else `$XDG_STATE_HOME/kiln` or `~/.local/state/kiln`.
    pub fn default_root() -> Result<PathBuf> {
        if let Some(dir) = std::env::var_os(STATE_DIR_ENV).filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(dir));
        }
        if rustix::process::geteuid().is_root() {
            return Ok(PathBuf::from("/var/lib/kiln"));
        }
        if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(dir).join("kiln"));
        }
        match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            Some(home) => Ok(PathBuf::from(home).join(".local/state/kiln")),
            None => Err(Error::StateDirUnknown),
        }
    }

    /// Opens (creating) the state directory at `root`; it and its `vms`
    /// and `data` directories are made 0700 even if they existed.
    pub fn open(root: impl Into<PathBuf>) -> Result<StateDir> {
        use std::os::unix::fs::PermissionsExt;
        let root = root.into();
        for dir in [root.clone(), root.join("vms"), root.join("data")] {
            make_private_dir(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::state_io(&dir, e))?;
        }
        Ok(StateDir { root })
    }

    /// Takes `<state>/gc.lock` exclusively, for one whole gc pass: no
    /// launcher claims a VM and no other gc runs until it drops. Waits (at
    /// most `STATE_LOCK_WAIT`) for claims and gc passes under way.
    pub fn lock_for_gc(&self) -> Result<StateLock> {
        self.lock_state(FlockOperation::NonBlockingLockExclusive)
    }

    /// Takes `<state>/gc.lock` shared: no gc pass starts until it drops
    /// (claims go on). `kiln run --detach` holds it from creating the VM's
    /// directory until its background run has claimed the VM.
    pub fn hold_off_gc(&self) -> Result<StateLock> {
        self.lock_state(FlockOperation::NonBlockingLockShared)
    }

    fn lock_state(&self, operation: FlockOperation) -> Result<StateLock> {
        let path = self.root.join(GC_LOCK_FILE);
        let file = open_private(&path)?;
        let deadline = Instant::now() + STATE_LOCK_WAIT;
        loop {
            match flock(&file, operation) {
                Ok(()) => return Ok(StateLock { _file: file }),
                Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(Error::StateLockTimeout { path, seconds: STATE_LOCK_WAIT.as_secs() });
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(errno) => return Err(Error::state_io(&path, errno.into())),
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The lease ledger's directory.
    pub fn ledger_dir(&self) -> PathBuf {
        self.root.join("leases")
    }

    /// The data disk of VM `name`, which outlives its runs.
    pub fn data_disk(&self, name: &str) -> PathBuf {
        self.root.join("data").join(format!("{name}.img"))
    }

    /// The directory of VM `name`.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.root.join("vms").join(name)
    }

    /// Claims VM `name` for this process. Fails with [`Error::VmBusy`] if
    /// another launcher holds it. A record left by a dead launcher is
    /// returned in the error [`Error::VmNeedsGc`] so nothing it held leaks.
    ///
    /// It holds `<state>/gc.lock` shared meanwhile (see the module doc), so
    /// it waits for a gc pass under way.
    pub fn claim(&self, name: &str, record: VmRecord) -> Result<VmClaim> {
        let _no_gc_meanwhile = self.hold_off_gc()?;
        let dir = self.vm_dir(name);
        make_private_dir(&dir)?;
        let lock = open_lock(&dir)?;
        if !try_lock(&lock, &dir)? {
            let pid = read_record(&dir).ok().flatten().map(|r| r.launcher_pid);
            return Err(Error::VmBusy { name: name.to_owned(), pid });
        }
        if read_record(&dir)?.is_some_and(|old| old.phase != Phase::Stopped) {
            return Err(Error::VmNeedsGc { name: name.to_owned() });
        }
        let mut claim = VmClaim { dir, _lock: lock, record };
        claim.save()?;
        Ok(claim)
    }

    /// Every VM with a record, sorted by name.
    pub fn list(&self) -> Result<Vec<VmEntry>> {
        let vms = self.root.join("vms");
        let mut entries = Vec::new();
        for entry in fs::read_dir(&vms).map_err(|e| Error::state_io(&vms, e))? {
            let dir = entry.map_err(|e| Error::state_io(&vms, e))?.path();
            let Some(record) = read_record(&dir)? else { continue };
            let alive = is_locked(&dir)?;
            entries.push(VmEntry { record, alive, dir });
        }
        entries.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(entries)
    }

    /// Takes the lock of a VM whose launcher is gone, for gc (which holds
    /// [`StateDir::lock_for_gc`]); `None` if a launcher holds it.
    pub fn claim_dead(&self, _gc: &StateLock, name: &str) -> Result<Option<VmClaim>> {
        let dir = self.vm_dir(name);
        let lock = open_lock(&dir)?;
        if !try_lock(&lock, &dir)? {
            return Ok(None);
        }
        let Some(record) = read_record(&dir)? else { return Ok(None) };
        Ok(Some(VmClaim { dir, _lock: lock, record }))
    }
}

impl VmClaim {
    /// The VM's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the record (temp file + rename, 0600).
    pub fn save(&mut self) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.record).map_err(|e| Error::StateCorrupt {
            path: self.dir.join(RECORD_FILE),
            reason: format!("cannot encode the record: {e}"),
        })?;
        write_private_atomically(&self.dir.join(RECORD_FILE), &bytes)
    }

    /// Removes the VM's directory (record, images, sockets, logs): the last
    /// step of a clean stop or a gc. The lock goes with it.
    pub fn remove(self) -> Result<()> {
        fs::remove_dir_all(&self.dir).map_err(|e| Error::state_io(&self.dir, e))
    }
}

fn make_private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| Error::state_io(dir, e))
}

fn open_lock(dir: &Path) -> Result<File> {
    open_private(&dir.join(LOCK_FILE))
}

fn open_private(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::state_io(path, e))
}

/// Takes the VM's lock, or says a launcher holds it. `kiln ps` and gc probe
/// the lock with a shared try-lock that lasts microseconds, while a launcher
/// holds it for its whole life; so a refusal is only believed after
/// [`PROBE_WAIT`], never on one attempt that met a probe.
fn try_lock(lock: &File, dir: &Path) -> Result<bool> {
    let deadline = Instant::now() + PROBE_WAIT;
    loop {
        match flock(lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(false),
            Err(rustix::io::Errno::INTR) => {}
            Err(errno) => return Err(Error::state_io(&dir.join(LOCK_FILE), errno.into())),
        }
    }
}

/// How long [`try_lock`] keeps trying past a lock probe.
const PROBE_WAIT: Duration = Duration::from_millis(200);

/// Whether a launcher holds `dir`'s lock (probed with a shared try-lock on
/// a fresh open file, released at once).
fn is_locked(dir: &Path) -> Result<bool> {
    let path = dir.join(LOCK_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::state_io(&path, e)),
    };
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => Ok(false),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(true),
        Err(errno) => Err(Error::state_io(&path, errno.into())),
    }
}

fn read_record(dir: &Path) -> Result<Option<VmRecord>> {
    let path = dir.join(RECORD_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::state_io(&path, e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::StateCorrupt { path, reason: e.to_string() })
}

/// Writes `bytes` to `path` through a 0600 temp file in the same directory
/// and a rename, so readers see the old or the new file, never a part.
pub(crate) fn write_private_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(|e| Error::state_io(dir, e))?;
    temp.write_all(bytes).map_err(|e| Error::state_io(path, e))?;
    temp.persist(path).map_err(|e| Error::state_io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> VmRecord {
        VmRecord { name: name.to_owned(), launcher_pid: std::process::id(), ..VmRecord::default() }
    }

    #[test]
    fn claim_is_exclusive_and_listed_as_alive() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::open(root.path()).unwrap();
        let mut claim = state.claim("web", record("web")).unwrap();
        let err = state.claim("web", record("web")).unwrap_err();
        assert!(matches!(&err, Error::VmBusy { name, pid: Some(_) } if name == "web"), "{err}");
        claim.record.phase = Phase::Running;
        claim.save().unwrap();
        let listed = state.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].alive);
        assert_eq!(listed[0].record.phase, Phase::Running);
        let gc = state.lock_for_gc().unwrap();
        assert!(state.claim_dead(&gc, "web").unwrap().is_none(), "a live VM is not gc's");
        drop(gc);

        drop(claim);
        let listed = state.list().unwrap();
        assert!(!listed[0].alive, "the lock goes with the claim");
        // Not stopped cleanly: a new run must wait for gc.
        let err = state.claim("web", record("web")).unwrap_err();
        assert!(matches!(err, Error::VmNeedsGc { .. }), "{err}");
        let gc = state.lock_for_gc().unwrap();
        let dead = state.claim_dead(&gc, "web").unwrap().unwrap();
        assert_eq!(dead.record.phase, Phase::Running);
        dead.remove().unwrap();
        drop(gc);
        assert!(state.list().unwrap().is_empty());
        state.claim("web", record("web")).unwrap();
    }

    #[test]
    fn state_claim_waits_for_a_gc_pass_and_gc_passes_serialize() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::open(root.path()).unwrap();
        let hold = Duration::from_millis(400);
        let gc = state.lock_for_gc().unwrap();
        let (state2, released) = (state.clone(), std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let released2 = std::sync::Arc::clone(&released);
        let claimer = std::thread::spawn(move || {
            let claim = state2.claim("web", record("web")).unwrap();
            // The claim went through only once the gc pass was over.
            assert!(released2.load(std::sync::atomic::Ordering::SeqCst), "claimed during a gc pass");
            drop(claim);
        });
        let other_gc = {
            let state3 = state.clone();
            let released3 = std::sync::Arc::clone(&released);
            std::thread::spawn(move || {
                let _second = state3.lock_for_gc().unwrap();
                assert!(released3.load(std::sync::atomic::Ordering::SeqCst), "two gc passes at once");
            })
        };
        std::thread::sleep(hold);
        assert!(state.list().unwrap().is_empty(), "nothing claimed while gc holds its lock");
        released.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(gc);
        claimer.join().unwrap();
        other_gc.join().unwrap();
        assert_eq!(state.list().unwrap().len(), 1);
    }

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::open(root.path().join("state")).unwrap();
        let claim = state.claim("a", record("a")).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(state.root()), 0o700);
        assert_eq!(mode(claim.dir()), 0o700);
        assert_eq!(mode(&claim.dir().join(RECORD_FILE)), 0o600);
        assert_eq!(mode(&claim.dir().join(LOCK_FILE)), 0o600);
        assert_eq!(mode(&state.root().join(GC_LOCK_FILE)), 0o600);
        // A state directory made loose by hand is tightened on open.
        fs::set_permissions(state.root().join("data"), fs::Permissions::from_mode(0o755)).unwrap();
        let state = StateDir::open(state.root()).unwrap();
        assert_eq!(mode(&state.root().join("data")), 0o700);
    }

    #[test]
    fn a_corrupt_record_is_named() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::open(root.path()).unwrap();
        let dir = state.vm_dir("x");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(RECORD_FILE), b"{\"name\": 1}").unwrap();
        let err = state.list().unwrap_err().to_string();
        assert!(err.contains("record.json") && err.contains("invalid type"), "{err}");
    }
}
