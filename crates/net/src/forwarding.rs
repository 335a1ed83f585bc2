//! IPv4 forwarding flags of the host's interfaces, and the lock that keeps
//! kiln's processes from racing on them.
//!
//! Linux decides whether to forward a packet by the flag of the interface it
//! *arrived on* (`net.ipv4.conf.<if>.forwarding`; `net.ipv4.ip_forward` is
//! `conf.all` and, when written, overwrites every interface's flag). kiln
//! never writes `ip_forward`: it sets the flag of a VM's tap (guest to
//! outside) and of the uplink (replies, and published ports reached from
//! another host). [`crate::Nft`] decides when; this module only reads and
//! writes the flags, in the right network namespace.
//!
//! The lock is per network namespace, because the flags are: an exclusive
//! `flock` on `/run/kiln-net/netns-<inode>.lock`, named after the
//! namespace's nsfs inode. The directory is root's (0700), so no other user
//! can hold kiln's lock; the lock goes with the open file, so a SIGKILLed
//! holder releases it at once; every acquisition opens the file anew, so
//! threads of one process exclude each other too.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

use crate::{Error, Result};

/// Where the per-namespace lock files live (tmpfs: gone at reboot, like
/// every namespace and flag they guard).
const LOCK_DIR: &str = "/run/kiln-net";

/// The network namespace a flag or lock is in: the caller's, or the one a
/// path such as `/run/netns/<name>` holds open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Netns {
    /// The calling thread's network namespace.
    Current,
    /// The namespace of this nsfs file.
    At(PathBuf),
}

impl Netns {
    /// Runs `f` on a thread inside this namespace (or on the caller's
    /// thread for [`Netns::Current`]); `/proc/sys/net` then shows the
    /// namespace's flags.
    pub(crate) fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let Netns::At(path) = self else { return f() };
        std::thread::scope(|scope| {
            let thread = scope.spawn(|| {
                let file = File::open(path).map_err(|source| Error::Netns { path: path.clone(), source })?;
                rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|errno| Error::Netns { path: path.clone(), source: errno.into() })?;
                f()
            });
            thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Takes kiln's lock of this namespace, blocking until it is free.
    pub(crate) fn lock(&self) -> Result<NetLock> {
        let ns_path = match self {
            Netns::Current => Path::new("/proc/thread-self/ns/net"),
            Netns::At(path) => path.as_path(),
        };
        let inode = rustix::fs::stat(ns_path)
            .map_err(|errno| Error::Netns { path: ns_path.to_owned(), source: errno.into() })?
            .st_ino;
        let path = Path::new(LOCK_DIR).join(format!("netns-{inode}.lock"));
        let io = |source| Error::NetLock { path: path.clone(), source };
        match DirBuilder::new().mode(0o700).create(LOCK_DIR) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(io(e)),
            _ => {}
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        flock(&file, FlockOperation::LockExclusive).map_err(|errno| io(errno.into()))?;
        Ok(NetLock { _file: file })
    }
}

/// kiln's lock of one network namespace, held until dropped.
#[derive(Debug)]
pub(crate) struct NetLock {
    _file: File,
}

fn flag_path(ifname: &str) -> PathBuf {
    // Interface names are validated (no `/`, not `.` or `..`) before they
    // get here; a `.` inside a name stays literal in /proc/sys.
    Path::new("/proc/sys/net/ipv4/conf").join(ifname).join("forwarding")
}

/// The forwarding flag of `ifname` in the calling thread's namespace, or
/// `None` if there is no such interface.
pub(crate) fn read_flag(ifname: &str) -> Result<Option<bool>> {
    let path = flag_path(ifname);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text.trim() != "0")),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Sysctl { path, source }),
    }
}

/// Sets the forwarding flag of `ifname`; returns `false` (doing nothing)
/// if the interface does not exist.
pub(crate) fn write_flag(ifname: &str, on: bool) -> Result<bool> {
    let path = flag_path(ifname);
    match std::fs::write(&path, if on { "1" } else { "0" }) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Sysctl { path, source }),
    }
}
