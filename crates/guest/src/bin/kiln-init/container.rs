//! Container mode: when the service disk holds `container.conf`, kiln-init
//! runs an OCI container instead of `/srv/launch`.
//!
//! kiln-init itself (PID 1, in the first mount namespace) mounts each
//! layer disk read-only under `/run/kiln/layers/N`, the upper layer (a
//! tmpfs under `/run/kiln/upper`, or a directory on the data disk) and the
//! overlay at `/run/kiln/root`, and writes the VM's `/etc` files under
//! `/run/kiln/etc`. It then starts itself again as `kiln-init
//! --container-exec FD`, a fresh single-threaded process that may do
//! anything before its `exec` (unlike a `pre_exec` hook): it takes a mount
//! namespace of its own, opens the bind sources, chroots into the overlay
//! (after which no path from the image, symlinks included, can reach
//! outside it), mounts `/proc`, `/sys`, `/dev`, binds the files trees and
//! the data disk, writes `/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`,
//! takes the image's user and `exec`s the program: same pid, same process
//! group, same output as a `/srv/launch` service, so supervision is
//! unchanged. A setup failure is written to pipe FD (close-on-exec, so a
//! successful exec leaves it empty) and becomes kiln-init's failure report.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_guest::{
    CONTAINER_CONFIG_FILE, ContainerConfig, DiskKind, GuestConfig, UpperKind, find_in_path, hostname_file, hosts_file,
    overlay_options, resolv_conf, resolve_user,
};

use crate::disks::{Disk, layer_disk};
use crate::service::{HostCommands, read_power_press, spawn_command};
use crate::{Context, Failure, Result, say, sys};

/// The flag that makes kiln-init the container's setup process.
pub(crate) const EXEC_FLAG: &str = "--container-exec";

const CONFIG_PATH: &str = "/srv/container.conf";
const LAYERS_DIR: &str = "/run/kiln/layers";
const UPPER_TMPFS: &str = "/run/kiln/upper";
pub(crate) const ROOT: &str = "/run/kiln/root";
const ETC_DIR: &str = "/run/kiln/etc";
const DATA_DIR: &str = "/mnt/data";
/// The `/etc` files kiln-init writes for the VM, as the container sees them.
const ETC_FILES: [&str; 3] = ["hostname", "hosts", "resolv.conf"];
/// The setup process's name (`comm`) until its `exec` replaces it: how
/// kiln-init tells a setup that died from a program that started.
const SETUP_NAME: &std::ffi::CStr = c"kiln-setup";

/// The container config, if the service disk has one (then kiln-init is in container mode).
pub(crate) fn read_config() -> Result<Option<ContainerConfig>> {
    let text = match fs::read_to_string(CONFIG_PATH) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(Failure(format!("cannot read {CONFIG_PATH}: {err}"))),
    };
    let config =
        ContainerConfig::parse(&text).context(|| format!("{CONFIG_PATH} (service disk {CONTAINER_CONFIG_FILE})"))?;
    Ok(Some(config))
}

/// Mounts the layers, the upper layer and the overlay, writes the `/etc`
/// files, and starts the container's setup process; returns its pid.
pub(crate) fn start(
    config: &ContainerConfig,
    disks: &[Disk],
    seed: Option<&GuestConfig>,
    signals: &OwnedFd,
    buttons: &[File],
    commands: &mut HostCommands,
) -> Result<i32> {
    let mut lowers = Vec::new();
    for index in 0..config.layers {
        let disk = layer_disk(disks, index)?;
        if !matches!(disk.kind, DiskKind::Ext { .. }) {
            return Err(Failure(format!(
                "layer disk {} (serial {}) holds {:?}, not an ext4 layer",
                disk.device, disk.serial, disk.kind
            )));
        }
        let target = format!("{LAYERS_DIR}/{index}");
        fs::create_dir_all(&target).context(|| format!("cannot create {target}"))?;
        // Read-only, and `noload`: the image is shared by every VM of that
        // image, so nothing, not even a journal replay, may write it.
        sys::mount(&disk.device, &target, "ext4", libc::MS_RDONLY, "noload")
            .context(|| format!("cannot mount layer disk {} (ext4, ro,noload) on {target}", disk.device))?;
        lowers.push(target);
    }
    let upper_base = match &config.upper {
        UpperKind::Tmpfs => {
            fs::create_dir_all(UPPER_TMPFS).context(|| format!("cannot create {UPPER_TMPFS}"))?;
            sys::mount("tmpfs", UPPER_TMPFS, "tmpfs", 0, "mode=0755")
                .context(|| format!("cannot mount a tmpfs on {UPPER_TMPFS}"))?;
            UPPER_TMPFS.to_owned()
        }
        UpperKind::DataDisk { dir } => {
            if !sys::is_mount_point(DATA_DIR) {
                return Err(Failure(format!(
                    "the container's upper layer is on the data disk ({dir}), but the VM has no data disk"
                )));
            }
            data_dir(dir)?
        }
        other => return Err(Failure(format!("unsupported upper layer {other:?}"))),
    };
    let (upper, work) = (format!("{upper_base}/upper"), format!("{upper_base}/work"));
    let fresh_upper = !sys::exists(&upper);
    for dir in [&upper, &work] {
        make_real_dir(dir)?;
    }
    if fresh_upper && let Some(top) = lowers.last() {
        take_root_attributes(top, &upper)?;
    }
    fs::create_dir_all(ROOT).context(|| format!("cannot create {ROOT}"))?;
    let options = overlay_options(&lowers, &upper, &work);
    // nodev: the image's device nodes show (stat gives their numbers) but
    // open none, so a `b 254:0` node gives no raw access to a VM disk.
    sys::mount("overlay", ROOT, "overlay", libc::MS_NODEV, &options)
        .context(|| format!("cannot mount the container's overlay on {ROOT} ({options})"))?;
    say(&format!("container: {} layer(s) and the upper layer on {upper_base} mounted on {ROOT}", lowers.len()));
    write_etc_files(config, seed)?;

    let (mut reader, writer) = sys::pipe().context(|| "cannot create the container's error pipe".to_owned())?;
    let writer_fd = writer.as_raw_fd();
    let mut command = Command::new("/proc/self/exe");
    command.arg0("kiln-init").arg(EXEC_FLAG).arg(writer_fd.to_string());
    // SAFETY: fcntl is async-signal-safe and allocates nothing; the pipe
    // must survive the exec of kiln-init itself (and only that one).
    unsafe {
        command.pre_exec(move || sys::set_cloexec(writer_fd, false));
    }
    let pid = spawn_command(command, "the container's setup process")?;
    drop(writer);
    match wait_for_setup(&mut reader, pid, signals, buttons, commands) {
        Ok(()) => Ok(pid),
        Err(err) => {
            // Dead already, or stuck: either way it never runs the program.
            let _ = sys::kill(pid, libc::SIGKILL);
            Err(err)
        }
    }
}

/// How long the setup may take before it counts as stuck. It reads no
/// file that could block and mounts nothing remote; TCG on a loaded host
/// is the slow case.
const SETUP_DEADLINE: Duration = Duration::from_secs(60);

/// Waits until the setup process has exec'd the program (the error pipe,
/// close-on-exec, reads empty) or said why it could not. A setup that
/// died without a word (killed) is a failure too, not the program's exit:
/// its `comm` is still [`SETUP_NAME`], which an exec would have replaced.
fn wait_for_setup(
    reader: &mut File,
    pid: i32,
    signals: &OwnedFd,
    buttons: &[File],
    commands: &mut HostCommands,
) -> Result<()> {
    let error = read_setup_errors(reader, signals, buttons, commands, SETUP_DEADLINE)?;
    if !error.is_empty() {
        return Err(Failure(format!("container: {}", String::from_utf8_lossy(&error))));
    }
    let setup_name = SETUP_NAME.to_str().unwrap_or_default();
    if sys::process_name(pid).is_some_and(|name| name == setup_name) {
        return Err(Failure("container: the setup process ended before it ran the program (killed?)".to_owned()));
    }
    Ok(())
}

/// Reads the setup's error pipe to its end (the exec, or the setup's
/// exit) and returns what the setup wrote there. A power button, a stop
/// signal to PID 1 or a `stop` on the control channel meanwhile ends the
/// wait as a failure: a stop must not wait for the setup, and the
/// program never started. The pipe is read first, so a stop that comes
/// as the program starts is left to supervise, which stops the program;
/// `commands` keeps a line cut short for it.
fn read_setup_errors(
    reader: &mut File,
    signals: &OwnedFd,
    buttons: &[File],
    commands: &mut HostCommands,
    limit: Duration,
) -> Result<Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut error = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure(format!("container: the setup did not finish within {limit:?}")));
        }
        let mut fds = vec![reader.as_raw_fd(), signals.as_raw_fd()];
        fds.extend(buttons.iter().map(|button| button.as_raw_fd()));
        // Polled while the host's end is open (`commands` drops it on a hang-up).
        fds.extend(commands.fd());
        let ready =
            sys::poll_readable(&fds, Some(left)).context(|| "cannot wait for the container's setup".to_owned())?;
        if ready[0] {
            let mut chunk = [0u8; 4096];
            match reader.read(&mut chunk) {
                Ok(0) => return Ok(error),
                Ok(read) => error.extend_from_slice(&chunk[..read]),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(Failure(format!("cannot read the container's error pipe: {err}"))),
            }
            continue;
        }
        // SIGCHLD (the setup's own end, or another child's) is no stop;
        // supervise reaps whatever ended.
        let signalled =
            ready[1] && sys::read_signals(signals).iter().any(|&signal| signal as libc::c_int != libc::SIGCHLD);
        // Read as supervise reads it: the key-up of a press, or another
        // key on the same device, is no stop.
        let pressed = buttons.iter().zip(&ready[2..]).any(|(button, &readable)| readable && read_power_press(button));
        let asked = ready.get(2 + buttons.len()) == Some(&true) && commands.read().is_some();
        let why = match (signalled, pressed, asked) {
            (true, _, _) => "a stop signal to PID 1",
            (_, true, _) => "power button",
            (_, _, true) => "stop asked on the control channel",
            _ => continue,
        };
        return Err(Failure(format!("container: stopped during its setup ({why})")));
    }
}

/// `/mnt/data/DIR`, made as real directories: a component that is a
/// symlink (the container may have left one there last time) is refused.
fn data_dir(dir: &str) -> Result<String> {
    let mut path = DATA_DIR.to_owned();
    for part in dir.split('/') {
        path = format!("{path}/{part}");
        make_real_dir(&path)?;
    }
    Ok(path)
}

/// overlayfs shows the upper directory's mode, owner, xattrs and times as
/// the container's `/`: a fresh one takes the image's (the top layer's
/// root, as a copy-up would), not those kiln-init made it with.
fn take_root_attributes(top: &str, upper: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(top).context(|| format!("cannot look at {top}"))?;
    // overlayfs's own (trusted.overlay.*) are the layer disk's, not the image's.
    for (name, value) in sys::xattrs(top).context(|| format!("cannot list the xattrs of {top}"))? {
        if name.to_bytes().starts_with(b"trusted.overlay.") {
            continue;
        }
        match sys::set_xattr(upper, &name, &value) {
            // As overlayfs's copy-up does: an upper that holds no such
            // xattr (tmpfs before Linux 6.6 has no user.*) goes without.
            Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                say(&format!(
                    "container: the upper layer keeps no {} xattr; / shows without it",
                    name.to_string_lossy()
                ));
            }
            result => {
                result.context(|| format!("cannot give {upper} the image's / xattr {}", name.to_string_lossy()))?
            }
        }
    }
    std::os::unix::fs::chown(upper, Some(meta.uid()), Some(meta.gid()))
        .context(|| format!("cannot give {upper} the owner of the image's /"))?;
    fs::set_permissions(upper, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .context(|| format!("cannot give {upper} the mode of the image's /"))?;
    let times = fs::FileTimes::new().set_accessed(meta.accessed().context(|| format!("no atime of {top}"))?);
    let times = times.set_modified(meta.modified().context(|| format!("no mtime of {top}"))?);
    File::open(upper)
        .and_then(|dir| dir.set_times(times))
        .context(|| format!("cannot give {upper} the times of the image's /"))
}

fn make_real_dir(path: &str) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(Failure(format!("{path} exists and is not a directory (a symlink is never followed here)"))),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            fs::create_dir(path).context(|| format!("cannot create {path}"))
        }
        Err(err) => Err(Failure(format!("cannot look at {path}: {err}"))),
    }
}

/// The VM is the container's only tenant, so the config's hostname
/// becomes the VM's own (`uname -n`), as `docker run --hostname` gives the
/// container's UTS namespace.
fn write_etc_files(config: &ContainerConfig, seed: Option<&GuestConfig>) -> Result<()> {
    if let Some(hostname) = &config.hostname {
        sys::sethostname(hostname).context(|| format!("cannot set the hostname to {hostname:?}"))?;
    }
    let hostname = config.hostname.as_deref().or(seed.and_then(|s| s.hostname.as_deref()));
    let address = seed.and_then(|s| s.ipv4.as_ref()).map(|ip| IpAddr::V4(ip.address));
    fs::create_dir_all(ETC_DIR).context(|| format!("cannot create {ETC_DIR}"))?;
    let contents = [hostname_file(hostname), hosts_file(hostname, address), resolv_conf(&config.nameservers)];
    for (name, text) in ETC_FILES.iter().zip(contents) {
        let path = format!("{ETC_DIR}/{name}");
        fs::write(&path, text).context(|| format!("cannot write {path}"))?;
    }
    Ok(())
}

/// `kiln-init --container-exec FD`: sets the container up and execs its
/// program; on failure writes why to FD and exits 127. Never returns.
pub(crate) fn exec_main(args: &[String]) -> ! {
    let Some(fd) = args.first().and_then(|fd| fd.parse::<i32>().ok()) else {
        eprintln!("kiln-init: {EXEC_FLAG} needs the error pipe's descriptor");
        std::process::exit(2);
    };
    // SAFETY: kiln-init passed this descriptor, the pipe's write end, to us alone.
    let mut errors = unsafe { File::from_raw_fd(fd) };
    let _ = sys::set_cloexec(fd, true);
    let err = match setup_and_exec() {
        Ok(never) => match never {},
        Err(err) => err,
    };
    let _ = errors.write_all(err.as_bytes());
    std::process::exit(127);
}

enum Never {}

fn setup_and_exec() -> std::result::Result<Never, String> {
    let _ = sys::set_process_name(SETUP_NAME);
    let text = fs::read_to_string(CONFIG_PATH).map_err(|err| format!("cannot read {CONFIG_PATH}: {err}"))?;
    let config = ContainerConfig::parse(&text).map_err(|err| err.to_string())?;
    sys::new_mount_namespace().map_err(|err| format!("cannot make a mount namespace: {err}"))?;
    // Everything from outside the root is opened before the chroot, and
    // bound through /proc/self/fd after it.
    let mut binds = Vec::new();
    for files in &config.files {
        let source = format!("/srv/{}", files.name);
        let dir = open_dir(&source)?;
        binds.push((dir, files.path.clone(), libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV));
    }
    if sys::is_mount_point(DATA_DIR) {
        binds.push((open_dir(DATA_DIR)?, DATA_DIR.to_owned(), libc::MS_NOSUID | libc::MS_NODEV));
    }
    let mut etc = Vec::new();
    for name in ETC_FILES {
        let path = format!("{ETC_DIR}/{name}");
        etc.push((name, fs::read(&path).map_err(|err| format!("cannot read {path}: {err}"))?));
    }
    sys::chroot_into(ROOT).map_err(|err| format!("cannot chroot into {ROOT}: {err}"))?;
    // From here every image path goes through `root` with openat2's
    // RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS: once /proc is mounted,
    // /proc/1/root would lead out of a plain chroot, and the image's
    // symlinks may point there.
    let root = open_dir("/")?;

    mount_runtime_filesystems()?;
    for (dir, target, flags) in &binds {
        let target_dir = make_dirs(&root, target)?;
        let source = format!("/proc/self/fd/{}", dir.as_raw_fd());
        let target_fd = format!("/proc/self/fd/{}", target_dir.as_raw_fd());
        sys::bind_mount(&source, &target_fd, libc::MS_BIND | libc::MS_REC)
            .map_err(|err| format!("cannot bind a mount on {target}: {err}"))?;
        // Opened again: now the bind mount's root, which the remount must name.
        let mounted = open_in_root(&root, target, libc::O_PATH | libc::O_DIRECTORY)?;
        let mounted = format!("/proc/self/fd/{}", mounted.as_raw_fd());
        sys::bind_mount("none", &mounted, libc::MS_BIND | libc::MS_REMOUNT | flags)
            .map_err(|err| format!("cannot remount {target} with its flags: {err}"))?;
    }
    drop(binds);
    if let UpperKind::DataDisk { dir } = &config.upper
        && sys::is_mount_point(DATA_DIR)
    {
        // The container must not reach its own upper layer through the
        // data disk (overlayfs forbids changing a layer under a mount):
        // an empty read-only tmpfs hides the directory holding it.
        let top = dir.split('/').next().unwrap_or(dir);
        let hidden = format!("{DATA_DIR}/{top}");
        let hidden_dir = open_in_root(&root, &hidden, libc::O_PATH | libc::O_DIRECTORY)?;
        let target = format!("/proc/self/fd/{}", hidden_dir.as_raw_fd());
        sys::mount("tmpfs", &target, "tmpfs", libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV, "mode=0555")
            .map_err(|err| format!("cannot hide the upper layer's {hidden}: {err}"))?;
    }
    let etc_dir = make_dirs(&root, "/etc")?;
    for (name, bytes) in &etc {
        write_etc_file(&etc_dir, name, bytes)?;
    }

    let passwd = read_account_file(&root, "/etc/passwd")?;
    let group = read_account_file(&root, "/etc/group")?;
    let user = resolve_user(&config.user, passwd.as_deref(), group.as_deref()).map_err(|err| err.to_string())?;
    let hostname = sys::hostname();
    let env = config.program_env(&user, hostname.as_deref());
    // Docker creates a missing working directory (as root) before it
    // starts, and runc enters it as root, again as the user only if root
    // may not (a root-squashing network filesystem).
    let workdir = make_dirs(&root, &config.workdir)?;
    let entered_as_root = sys::change_dir_to(&workdir);
    sys::become_user(user.uid, user.gid, &user.groups)
        .map_err(|err| format!("cannot become uid {} gid {} groups {:?}: {err}", user.uid, user.gid, user.groups))?;
    if let Err(err) = entered_as_root {
        if err.raw_os_error() != Some(libc::EPERM) && err.raw_os_error() != Some(libc::EACCES) {
            return Err(format!("cannot enter the working directory {}: {err}", config.workdir));
        }
        sys::change_dir_to(&workdir)
            .map_err(|err| format!("cannot enter the working directory {}: {err}", config.workdir))?;
    }
    drop((workdir, etc_dir, root));
    // As execvp after runc's chdir and setuid: relative PATH entries from
    // the working directory, executable for the user.
    let program = find_in_path(&config.argv[0], config.path(), is_executable)
        .ok_or_else(|| format!("{:?}: executable file not found in $PATH ({})", config.argv[0], config.path()))?;
    // runc's default, whatever kiln-init's own was.
    sys::set_umask(0o022);
    let mut command = Command::new(&program);
    command.arg0(&config.argv[0]).args(&config.argv[1..]).env_clear();
    for entry in &env {
        if let Some((name, value)) = entry.split_once('=') {
            command.env(name, value);
        }
    }
    let err = command.exec();
    Err(format!("cannot run {program}: {err}"))
}

fn open_dir(path: &str) -> std::result::Result<File, String> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|err| format!("cannot open {path}: {err}"))
}

fn open_in_root(root: &File, path: &str, flags: libc::c_int) -> std::result::Result<File, String> {
    sys::open_in_root(root, path, flags, 0).map_err(|err| cannot_open(path, &err))
}

fn cannot_open(path: &str, err: &io::Error) -> String {
    let why = if err.raw_os_error() == Some(libc::ELOOP) {
        " (a symlink on the way leads out of the container, or loops)"
    } else {
        ""
    };
    format!("cannot open {path} in the container: {err}{why}")
}

/// `mkdir -p path` in the container: each component made in the directory
/// its prefix resolves to (symlinks followed, never out of `root`); the
/// directory, opened `O_PATH`.
fn make_dirs(root: &File, path: &str) -> std::result::Result<File, String> {
    let mut prefix = String::from("/");
    let mut dir = open_in_root(root, &prefix, libc::O_PATH | libc::O_DIRECTORY)?;
    for part in path.split('/').filter(|part| !part.is_empty() && *part != ".") {
        match sys::mkdir_at(&dir, part, 0o755) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
            Err(err) => return Err(format!("cannot create {prefix}{part} in the container: {err}")),
        }
        prefix = format!("{prefix}{part}/");
        dir = open_in_root(root, &prefix, libc::O_PATH | libc::O_DIRECTORY)?;
    }
    Ok(dir)
}

/// One of kiln-init's `/etc` files, in place of whatever the image has
/// there: a symlink, FIFO or device node is removed (never followed,
/// written through or opened), then a new file is made.
fn write_etc_file(etc: &File, name: &str, bytes: &[u8]) -> std::result::Result<(), String> {
    match sys::unlink_at(etc, name) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
        Err(err) => return Err(format!("cannot replace the image's /etc/{name}: {err}")),
    }
    let mut file = sys::create_new_at(etc, name, 0o644).map_err(|err| format!("cannot create /etc/{name}: {err}"))?;
    file.write_all(bytes).map_err(|err| format!("cannot write /etc/{name}: {err}"))?;
    file.set_permissions(fs::Permissions::from_mode(0o644)).map_err(|err| format!("cannot chmod /etc/{name}: {err}"))
}

/// The most of `/etc/passwd` or `/etc/group` kiln-init reads.
const ACCOUNT_FILE_LIMIT: u64 = 1 << 20;

/// The image's `/etc/passwd` or `/etc/group`, if it has one: opened
/// without blocking (a FIFO must not stall the boot), and only a regular
/// file of at most [`ACCOUNT_FILE_LIMIT`] is read.
fn read_account_file(root: &File, path: &str) -> std::result::Result<Option<String>, String> {
    let file = match sys::open_in_root(root, path, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0) {
        Ok(file) => file,
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(err) => return Err(cannot_open(path, &err)),
    };
    let meta = file.metadata().map_err(|err| format!("cannot look at {path}: {err}"))?;
    if !meta.is_file() {
        return Err(format!("the image's {path} is not a regular file ({:?})", meta.file_type()));
    }
    if meta.len() > ACCOUNT_FILE_LIMIT {
        return Err(format!(
            "the image's {path} is {} bytes, more than kiln-init reads ({ACCOUNT_FILE_LIMIT})",
            meta.len()
        ));
    }
    let mut bytes = Vec::new();
    file.take(ACCOUNT_FILE_LIMIT + 1).read_to_end(&mut bytes).map_err(|err| format!("cannot read {path}: {err}"))?;
    if bytes.len() as u64 > ACCOUNT_FILE_LIMIT {
        return Err(format!("the image's {path} grew past {ACCOUNT_FILE_LIMIT} bytes while read"));
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

fn is_executable(path: &str) -> bool {
    fs::metadata(OsStr::new(path)).is_ok_and(|meta| meta.is_file()) && sys::may_execute(path)
}

/// `/proc`, a read-only `/sys`, and a `/dev` tmpfs with the usual nodes,
/// `/dev/pts` and `/dev/shm`, as runc's default spec has them. `/tmp` is
/// the image's own directory, on the overlay, as with `docker run`.
/// `target` as a real directory (made if missing), for a mount: the
/// image's `/proc`, `/sys` or `/dev` as a symlink is refused, not followed.
/// Only for `/proc`, `/sys`, `/dev` and what kiln-init mounted under `/dev`.
fn real_dir(target: &str) -> std::result::Result<(), String> {
    match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(meta) => Err(format!("the image's {target} is not a directory ({:?}): refused", meta.file_type())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            fs::create_dir(target).map_err(|err| format!("cannot create {target} in the container: {err}"))
        }
        Err(err) => Err(format!("cannot look at {target} in the container: {err}")),
    }
}

fn mount_runtime_filesystems() -> std::result::Result<(), String> {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mount = |fstype: &str, target: &str, flags: libc::c_ulong, data: &str| {
        real_dir(target)?;
        sys::mount(fstype, target, fstype, flags, data)
            .map_err(|err| format!("cannot mount {fstype} on {target}: {err}"))
    };
    mount("proc", "/proc", nosuid_nodev_noexec, "")?;
    mount("sysfs", "/sys", nosuid_nodev_noexec | libc::MS_RDONLY, "")?;
    mount("tmpfs", "/dev", libc::MS_NOSUID, "mode=755,size=65536k")?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
        ("console", 5, 1),
    ] {
        let path = format!("/dev/{name}");
        sys::mknod_char(&path, 0o666, major, minor).map_err(|err| format!("cannot make {path}: {err}"))?;
        let mode = if name == "console" { 0o620 } else { 0o666 };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|err| format!("cannot chmod {path}: {err}"))?;
    }
    mount("devpts", "/dev/pts", libc::MS_NOSUID | libc::MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5")?;
    mount("tmpfs", "/dev/shm", nosuid_nodev_noexec, "mode=1777,size=65536k")?;
    for (link, target) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, link).map_err(|err| format!("cannot make {link}: {err}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wait's descriptors over pipes: the setup's error pipe (and its
    /// write end, the setup's), PID 1's signals (never readable here) and
    /// the control channel (and the host's end).
    struct Setup {
        errors: File,
        setup_end: Option<File>,
        signals: OwnedFd,
        _signal_sender: File,
        commands: HostCommands,
        host_end: Option<File>,
    }

    fn setup() -> Setup {
        let (errors, setup_end) = sys::pipe().unwrap();
        let (signals, signal_sender) = sys::pipe().unwrap();
        let (control, host_end) = sys::pipe().unwrap();
        Setup {
            errors,
            setup_end: Some(setup_end),
            signals: OwnedFd::from(signals),
            _signal_sender: signal_sender,
            commands: HostCommands::new(Some(control)),
            host_end: Some(host_end),
        }
    }

    impl Setup {
        fn wait(&mut self, limit: Duration) -> std::result::Result<String, String> {
            read_setup_errors(&mut self.errors, &self.signals, &[], &mut self.commands, limit)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .map_err(|failure| failure.0)
        }

        fn host_says(&mut self, text: &str) {
            self.host_end.as_mut().unwrap().write_all(text.as_bytes()).unwrap();
        }
    }

    #[test]
    fn a_stop_on_the_control_channel_ends_the_wait_for_a_setup_that_has_not_finished() {
        let mut setup = setup();
        setup.host_says("stop 5\n");
        // Long enough that a wait deaf to the channel fails on the deadline instead.
        let outcome = setup.wait(Duration::from_secs(20));
        assert_eq!(outcome, Err("container: stopped during its setup (stop asked on the control channel)".to_owned()));
    }

    #[test]
    fn other_lines_stop_nothing_and_a_line_cut_short_during_the_setup_is_read_whole_after_it() {
        let mut setup = setup();
        setup.host_says("hello\nsto");
        let outcome = setup.wait(Duration::from_millis(300));
        assert_eq!(outcome, Err("container: the setup did not finish within 300ms".to_owned()));
        setup.host_says("p 2\n");
        assert_eq!(setup.commands.read(), Some(Duration::from_secs(2)), "the stop is lost");
    }

    #[test]
    fn the_setup_exec_ends_the_wait_before_a_stop_that_came_with_it_which_is_left_to_supervise() {
        let mut setup = setup();
        setup.host_says("stop 7\n");
        drop(setup.setup_end.take());
        assert_eq!(setup.wait(Duration::from_secs(20)), Ok(String::new()));
        assert_eq!(setup.commands.read(), Some(Duration::from_secs(7)), "the stop is lost");
    }

    #[test]
    fn a_setup_error_is_returned_and_a_host_hang_up_stops_nothing() {
        let mut setup = setup();
        drop(setup.host_end.take());
        let outcome = setup.wait(Duration::from_millis(300));
        assert_eq!(outcome, Err("container: the setup did not finish within 300ms".to_owned()));
        assert_eq!(setup.commands.fd(), None, "the hung-up channel is still polled");
        setup.setup_end.as_mut().unwrap().write_all(b"cannot chroot").unwrap();
        drop(setup.setup_end.take());
        assert_eq!(setup.wait(Duration::from_secs(20)), Ok("cannot chroot".to_owned()));
    }
}
