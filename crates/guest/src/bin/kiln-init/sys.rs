//! Thin, safe wrappers over the Linux calls PID 1 needs. Each returns an
//! `io::Error` carrying errno; callers add what they were doing.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

fn cstring(text: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(text.as_ref().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(result) }
}

/// `mount(2)`.
pub(crate) fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    let (source, target, fstype, data) = (cstring(source)?, cstring(target)?, cstring(fstype)?, cstring(data)?);
    // SAFETY: all four pointers are valid NUL-terminated strings that outlive the call.
    check(unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) })?;
    Ok(())
}

/// `umount2(2)`.
pub(crate) fn umount(target: &str) -> io::Result<()> {
    let target = cstring(target)?;
    // SAFETY: `target` is a valid NUL-terminated string.
    check(unsafe { libc::umount2(target.as_ptr(), 0) })?;
    Ok(())
}

/// `finit_module(2)` with no parameters.
pub(crate) fn finit_module(module: &File) -> io::Result<()> {
    // SAFETY: the fd is open for the duration of the call and the parameter string is a valid empty C string.
    let result = unsafe { libc::syscall(libc::SYS_finit_module, module.as_raw_fd(), c"".as_ptr(), 0) };
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `sethostname(2)`.
pub(crate) fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// `sync(2)` then `reboot(RB_POWER_OFF)`; returns only if the kernel refused.
pub(crate) fn power_off() -> io::Error {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot with a valid command; PID 1 holds CAP_SYS_BOOT.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    io::Error::last_os_error()
}

/// Makes Ctrl-Alt-Del send SIGINT to PID 1 instead of rebooting at once,
/// so it stops the service like the power button does.
pub(crate) fn disable_ctrl_alt_del() -> io::Result<()> {
    // SAFETY: reboot with RB_DISABLE_CAD only changes a kernel flag.
    check(unsafe { libc::reboot(libc::RB_DISABLE_CAD) })?;
    Ok(())
}

/// `kill(2)`; `pid` may be negative for a process group, or -1 for all.
pub(crate) fn kill(pid: i32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    check(unsafe { libc::kill(pid, signal) })?;
    Ok(())
}

/// How a child ended, as `waitpid` reports it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// One `waitpid(-1, WNOHANG)`: `Some((pid, status))` for a reaped child,
/// `None` when no child has ended (or none is left).
pub(crate) fn reap_one() -> Option<(i32, ExitStatus)> {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid <= 0 {
        return None;
    }
    let exit = if libc::WIFEXITED(status) {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    } else {
        ExitStatus::Signal(libc::WTERMSIG(status))
    };
    Some((pid, exit))
}

/// Whether PID 1 has no children left (running or unreaped). Every orphan
/// is re-parented to PID 1, so this means every process but kiln-init has
/// ended. (`kill(-1, 0)` cannot tell: kernel threads count as targets.)
pub(crate) fn no_children_left() -> bool {
    // SAFETY: a null status pointer is allowed; WNOHANG never blocks.
    let result = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
    result < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD)
}

/// Seconds on `CLOCK_MONOTONIC`, which in the guest starts at kernel boot.
pub(crate) fn monotonic_seconds() -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// Signals kiln-init handles through a signalfd instead of handlers.
pub(crate) const HANDLED_SIGNALS: [libc::c_int; 4] = [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGPWR];

/// Blocks [`HANDLED_SIGNALS`] and returns a signalfd that reports them.
/// Children inherit the mask (measured: `std::process::Command` does not
/// clear it), so the service is started through [`unblock_signals`].
pub(crate) fn signal_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for all the calls below.
    unsafe {
        libc::sigemptyset(&mut set);
        for signal in HANDLED_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
    }
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let result = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if result != 0 {
        return Err(io::Error::from_raw_os_error(result));
    }
    // SAFETY: -1 asks for a new fd; `set` is initialised.
    let fd = check(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
    // SAFETY: signalfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Clears the calling thread's signal mask. For a `pre_exec` hook: between
/// fork and exec only async-signal-safe calls are allowed, and
/// `pthread_sigmask` is one; nothing here allocates.
pub(crate) fn unblock_signals() -> io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let result = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) };
    if result != 0 { Err(io::Error::from_raw_os_error(result)) } else { Ok(()) }
}

/// Drains a signalfd, returning the signal numbers read.
pub(crate) fn read_signals(fd: &OwnedFd) -> Vec<u32> {
    let mut signals = Vec::new();
    loop {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { mem::zeroed() };
        let size = mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is a writable buffer of `size` bytes.
        let read = unsafe { libc::read(fd.as_raw_fd(), (&raw mut info).cast(), size) };
        if read != size as isize {
            return signals;
        }
        signals.push(info.ssi_signo);
    }
}

/// `poll(2)` for readability on `fds`; returns which ones are readable
/// (or hung up). `None` waits forever.
pub(crate) fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut polls: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let timeout = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    loop {
        // SAFETY: `polls` is a valid array of `polls.len()` pollfd structs.
        let result = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout) };
        if result >= 0 {
            return Ok(polls.iter().map(|p| p.revents != 0).collect());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A connected stream socket to the host (CID 2) on vsock `port`, or the
/// reason there is none.
pub(crate) fn vsock_connect(port: u32) -> io::Result<File> {
    // SAFETY: socket has no memory-safety preconditions.
    let fd = check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket returned a new fd that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data.
    let mut address: libc::sockaddr_vm = unsafe { mem::zeroed() };
    address.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    address.svm_cid = libc::VMADDR_CID_HOST;
    address.svm_port = port;
    let len = mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `address` is a valid sockaddr_vm of `len` bytes.
    check(unsafe { libc::connect(socket.as_raw_fd(), (&raw const address).cast(), len) })?;
    Ok(File::from(socket))
}

/// A `NETLINK_ROUTE` socket.
pub(crate) fn netlink_route() -> io::Result<File> {
    // SAFETY: socket has no memory-safety preconditions.
    let fd =
        check(unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) })?;
    // SAFETY: socket returned a new fd that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Whether `path` exists (any kind of file).
pub(crate) fn exists(path: &str) -> bool {
    Path::new(path).symlink_metadata().is_ok()
}

/// `pipe2(O_CLOEXEC)`: (read end, write end).
pub(crate) fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two new fds that nothing else owns.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Writes all of `bytes` to `file` (blocking or not), giving up after
/// `limit`: a host that never reads must not keep PID 1 from powering off.
pub(crate) fn write_all_within(file: &mut File, mut bytes: &[u8], limit: Duration) -> io::Result<()> {
    use std::io::Write;
    let deadline = std::time::Instant::now() + limit;
    while !bytes.is_empty() {
        match file.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes = &bytes[written..],
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "the host did not take the report in time"));
                }
                let mut poll = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                let timeout = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
                // SAFETY: `poll` is one valid pollfd struct.
                if unsafe { libc::poll(&mut poll, 1, timeout) } < 0 {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                } else if poll.revents & libc::POLLOUT == 0 && poll.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                    // A virtio port whose host end is not connected.
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the host end is not connected"));
                }
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// `unshare(CLONE_NEWNS)`, then every mount made private, so the
/// container's mounts never show in kiln-init's namespace (nor its in theirs).
pub(crate) fn new_mount_namespace() -> io::Result<()> {
    // SAFETY: unshare has no memory-safety preconditions.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
    // SAFETY: the target is a valid C string; source, type and data may be null for MS_PRIVATE.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    Ok(())
}

/// `mount(2)` of an existing mount or directory (`MS_BIND`), or a remount
/// of one: no filesystem type, no data.
pub(crate) fn bind_mount(source: &str, target: &str, flags: libc::c_ulong) -> io::Result<()> {
    let (source, target) = (cstring(source)?, cstring(target)?);
    // SAFETY: both pointers are valid NUL-terminated strings; type and data may be null for a bind.
    check(unsafe { libc::mount(source.as_ptr(), target.as_ptr(), std::ptr::null(), flags, std::ptr::null()) })?;
    Ok(())
}

/// `chroot(".")` after `chdir(dir)`, then `chdir("/")`: from here on every
/// path, and every symlink in one, resolves inside `dir`.
pub(crate) fn chroot_into(dir: &str) -> io::Result<()> {
    std::env::set_current_dir(dir)?;
    // SAFETY: "." is a valid C string.
    check(unsafe { libc::chroot(c".".as_ptr()) })?;
    std::env::set_current_dir("/")
}

/// `mknod(2)` of a character device (its mode goes through the umask).
pub(crate) fn mknod_char(path: &str, mode: libc::mode_t, major: u32, minor: u32) -> io::Result<()> {
    let path = cstring(path)?;
    // SAFETY: mknod takes a valid C string and plain values.
    check(unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | mode, libc::makedev(major, minor)) })?;
    Ok(())
}

/// `umask(2)`.
pub(crate) fn set_umask(mask: libc::mode_t) {
    // SAFETY: umask takes a plain value and cannot fail.
    unsafe { libc::umask(mask) };
}

/// `setgroups`, `setgid`, then `setuid`: the order in which each call is
/// still allowed (after setuid to non-root, the others would fail).
pub(crate) fn become_user(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    // SAFETY: the pointer and length describe `groups`, a slice of gid_t (u32).
    check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
    // SAFETY: setgid and setuid take plain values.
    check(unsafe { libc::setgid(gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::setuid(uid) })?;
    Ok(())
}

/// Sets or clears `FD_CLOEXEC` on `fd` (async-signal-safe: for `pre_exec`).
pub(crate) fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor number with plain values.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) })?;
    Ok(())
}

/// Whether `path` is a mount point: its device differs from its parent's.
pub(crate) fn is_mount_point(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let parent = Path::new(path).parent().unwrap_or(Path::new("/"));
    match (std::fs::metadata(path), std::fs::metadata(parent)) {
        (Ok(this), Ok(parent)) => this.dev() != parent.dev(),
        _ => false,
    }
}

/// `openat2(root, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`
/// (close-on-exec): `path` and every symlink in it resolve as if `root`
/// were `/`, and a `/proc/PID/root`-like link fails (ELOOP) instead of
/// leaving it. How kiln-init touches every path of a container's image.
pub(crate) fn open_in_root(root: &File, path: &str, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
    let path = cstring(path)?;
    // SAFETY: open_how is plain data; zeroed is its "no options" value.
    let mut how: libc::open_how = unsafe { mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = u64::from(mode);
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: the path is a valid C string and `how` a valid open_how of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &raw const how,
            mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as RawFd) })
}

/// `mkdirat(dir, name, mode)`: `name` is one component.
pub(crate) fn mkdir_at(dir: &File, name: &str, mode: libc::mode_t) -> io::Result<()> {
    let name = cstring(name)?;
    // SAFETY: a valid fd and C string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })?;
    Ok(())
}

/// `unlinkat(dir, name, 0)`: removes a non-directory, never following it.
pub(crate) fn unlink_at(dir: &File, name: &str) -> io::Result<()> {
    let name = cstring(name)?;
    // SAFETY: a valid fd and C string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) })?;
    Ok(())
}

/// `openat(dir, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW)`: a new
/// regular file, never anything that was there.
pub(crate) fn create_new_at(dir: &File, name: &str, mode: libc::mode_t) -> io::Result<File> {
    let name = cstring(name)?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a valid fd and C string; the mode is passed as the variadic argument.
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, libc::c_uint::from(mode)) })?;
    // SAFETY: openat returned a new fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `fchdir(2)`.
pub(crate) fn change_dir_to(dir: &File) -> io::Result<()> {
    // SAFETY: a valid fd.
    check(unsafe { libc::fchdir(dir.as_raw_fd()) })?;
    Ok(())
}

/// `access(path, X_OK)` with the real (here: the final) ids.
pub(crate) fn may_execute(path: &str) -> bool {
    // SAFETY: a valid C string.
    cstring(path).is_ok_and(|path| unsafe { libc::access(path.as_ptr(), libc::X_OK) } == 0)
}

/// `prctl(PR_SET_NAME)`: the thread's `comm` (15 bytes), which an `exec` replaces.
pub(crate) fn set_process_name(name: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: a valid C string; PR_SET_NAME reads at most 16 bytes of it.
    check(unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) })?;
    Ok(())
}

/// `PID`'s `comm` (from `/proc/PID/stat`; a zombie keeps it).
pub(crate) fn process_name(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (start, end) = (stat.find('(')?, stat.rfind(')')?);
    Some(stat.get(start + 1..end)?.to_owned())
}

/// The VM's hostname (`uname -n`), if it has one.
pub(crate) fn hostname() -> Option<String> {
    // SAFETY: utsname is plain data, filled by uname.
    let mut name: libc::utsname = unsafe { mem::zeroed() };
    // SAFETY: `name` is a valid utsname to fill.
    check(unsafe { libc::uname(&raw mut name) }).ok()?;
    // SAFETY: uname NUL-terminates nodename within its array.
    let node = unsafe { std::ffi::CStr::from_ptr(name.nodename.as_ptr()) };
    let node = node.to_str().ok()?;
    (!node.is_empty() && node != "(none)").then(|| node.to_owned())
}

/// Every extended attribute of `path` (not following a symlink), name and
/// value, as `llistxattr(2)` and `lgetxattr(2)` give them.
pub(crate) fn xattrs(path: &str) -> io::Result<Vec<(CString, Vec<u8>)>> {
    let path = cstring(path)?;
    // SAFETY: a NULL buffer of size 0 asks only for the list's length.
    let len = unsafe { libc::llistxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    let mut names = vec![0u8; usize::try_from(len).map_err(|_| io::Error::last_os_error())?];
    // SAFETY: `names` is writable for its length; `path` is NUL-terminated.
    let len = unsafe { libc::llistxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    names.truncate(usize::try_from(len).map_err(|_| io::Error::last_os_error())?);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|name| !name.is_empty()) {
        let name = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "NUL in a name"))?;
        // SAFETY: as above, a length query, then a read into a buffer of that length.
        let size = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        let mut value = vec![0u8; usize::try_from(size).map_err(|_| io::Error::last_os_error())?];
        // SAFETY: `value` is writable for its length; both strings are NUL-terminated.
        let size = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        value.truncate(usize::try_from(size).map_err(|_| io::Error::last_os_error())?);
        out.push((name, value));
    }
    Ok(out)
}

/// `lsetxattr(2)`: sets (or replaces) one extended attribute of `path`.
pub(crate) fn set_xattr(path: &str, name: &std::ffi::CStr, value: &[u8]) -> io::Result<()> {
    let path = cstring(path)?;
    // SAFETY: both strings are NUL-terminated and `value` is readable for its length.
    check(unsafe { libc::lsetxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) })?;
    Ok(())
}
