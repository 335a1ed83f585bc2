//! kiln-init: PID 1 of kiln's minimal guest.
//!
//! It mounts `/proc`, `/sys` and `/dev`, loads the modules listed in
//! `/lib/modules/kiln/load-order`, finds the service disk (`SERVICEDISK`),
//! the seed (`CIDATA`) and the data disk by what they hold, never by order,
//! sets the hostname, eth0's address and default route from the seed, runs
//! `/srv/launch`, reaps orphans, turns the ACPI power button (or `stop` on
//! the control channel) into SIGTERM for the service, and powers off when
//! the service ends. Every outcome is one console line starting
//! `kiln-init: ` for people, and one report on the control channel for the
//! launcher (the console is the service's too, so it proves nothing). A
//! failure never panics the kernel without saying why. See ARCHITECTURE.md
//! (`crates/guest`).

mod sys;

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_guest::{
    CONTROL_PORT_NAME, DATA_DISK_LABEL, DATA_DISK_SERIAL, DiskKind, GuestConfig, GuestReport, HostCommand, LineBuffer,
    MARKER_PREFIX, SEED_LABEL, SERVICE_DISK_LABEL, VSOCK_LOG_PORT, VSOCK_STATUS_PORT, classify_disk, netlink,
};

use sys::ExitStatus;

/// Where `cargo xtask guest` puts the module load order (one file per line).
const LOAD_ORDER: &str = "/lib/modules/kiln/load-order";
const MODULE_DIR: &str = "/lib/modules/kiln";
const SERVICE: &str = "/srv/launch";
const SEED_MOUNT: &str = "/run/kiln/seed";
/// How long to wait for virtio block devices to get their disks: virtio
/// probing is synchronous, so this only matters on a slow host.
const DISK_WAIT: Duration = Duration::from_secs(5);
/// Default time between SIGTERM and SIGKILL; `kiln.grace=SECONDS` on the
/// kernel command line overrides it, and `stop SECONDS` on the control
/// channel overrides both.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for the virtio-serial control port to appear once a
/// virtio console device exists (ports are announced after the driver probes).
const CONTROL_WAIT: Duration = Duration::from_secs(5);
/// How long the exit report may wait for the host to take it.
const REPORT_WAIT: Duration = Duration::from_secs(2);
/// The virtio device id of a console (virtio-serial) device.
const VIRTIO_ID_CONSOLE: &str = "0x0003";
/// Linux input: `struct input_event` is 24 bytes on x86_64; EV_KEY, KEY_POWER.
const INPUT_EVENT_LEN: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

/// kiln-init's end of the control channel, when there is one: opened before
/// the service starts and held until power-off (close-on-exec, so the
/// service never inherits it). The failure path reports there too.
static CONTROL: Mutex<Option<File>> = Mutex::new(None);
/// The thread copying the service's output to the console and vsock, if any.
static TEE: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);

fn main() {
    let init_start = sys::monotonic_seconds();
    std::panic::set_hook(Box::new(|info| fail(&format!("kiln-init panicked: {info}"))));
    if std::process::id() != 1 {
        eprintln!("{MARKER_PREFIX}FAILED: kiln-init must run as PID 1 (it powers the machine off)");
        std::process::exit(2);
    }
    match run(init_start) {
        Ok(status) => {
            drain_service_output(Duration::from_secs(1));
            let report = match status {
                ExitStatus::Code(code) => GuestReport::Exited(u8::try_from(code).unwrap_or(u8::MAX)),
                ExitStatus::Signal(signal) => GuestReport::Killed(u8::try_from(signal).unwrap_or(u8::MAX)),
            };
            say(&report.to_string());
            report_to_host(&report);
            shut_down();
        }
        Err(err) => fail(&err.to_string()),
    }
}

/// A failure with the step it happened in.
#[derive(Debug)]
struct Failure(String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, Failure>;

/// Turns an I/O error into a failure naming what was being done.
trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|err| Failure(format!("{}: {err}", what())))
    }
}

/// One console line, prefixed so the launcher can find it among kernel messages.
fn say(message: &str) {
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "{MARKER_PREFIX}{message}");
    let _ = stdout.flush();
}

/// Sends the exit report on the control channel, waiting at most
/// [`REPORT_WAIT`] for the host to take it (power-off must not hang on it).
fn report_to_host(report: &GuestReport) {
    let Ok(mut control) = CONTROL.lock() else { return };
    let Some(channel) = control.as_mut() else { return };
    if let Err(err) = sys::write_all_within(channel, report.to_line().as_bytes(), REPORT_WAIT) {
        say(&format!("cannot send the exit report on the control channel: {err}"));
    }
}

/// Reports a failure the same way as an exit, then powers off.
fn fail(reason: &str) -> ! {
    say(&format!("FAILED: {reason}"));
    report_to_host(&GuestReport::Failed(reason.to_owned()));
    shut_down()
}

/// Stops what is left, unmounts the disks and powers off; never returns.
fn shut_down() -> ! {
    let _ = sys::kill(-1, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        while sys::reap_one().is_some() {}
        if sys::no_children_left() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = sys::kill(-1, libc::SIGKILL);
    while sys::reap_one().is_some() {}
    for target in ["/mnt/data", "/srv"] {
        let _ = sys::umount(target);
    }
    say("powering off");
    let err = sys::power_off();
    // Only reached if the kernel refused; PID 1 must not exit (that panics the kernel).
    say(&format!("FAILED: power off refused: {err}"));
    loop {
        std::thread::park();
    }
}

fn run(init_start: f64) -> Result<ExitStatus> {
    mount_basics()?;
    say(&format!("timing init_start={init_start:.6}"));
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let grace = grace_period(&cmdline);
    let _ = sys::disable_ctrl_alt_del();
    load_modules()?;
    let modules_loaded = sys::monotonic_seconds();
    // As soon as its driver is loaded: long before the service exists (it
    // must never get hold of the channel), and early enough that a failure
    // finding the disks is reported on it too.
    let commands = open_control_channel();
    let disks = find_disks()?;
    let Some(service_disk) = disks.iter().find(|d| d.is_fat(SERVICE_DISK_LABEL)) else {
        return Err(Failure(format!(
            "service disk not found: no disk labelled {SERVICE_DISK_LABEL} (disks: {})",
            describe(&disks)
        )));
    };
    mount_fat(&service_disk.device, "/srv")?;
    if let Some(seed) = disks.iter().find(|d| d.is_fat(SEED_LABEL)) {
        apply_seed(&seed.device)?;
    }
    mount_data_disk(&disks)?;
    let disks_ready = sys::monotonic_seconds();
    let power_buttons = power_buttons();
    let signals = sys::signal_fd().context(|| "cannot block signals".to_owned())?;
    let service = spawn_service()?;
    let service_start = sys::monotonic_seconds();
    say(&format!(
        "timing kernel_start=0.000000 init_start={init_start:.6} modules_loaded={modules_loaded:.6} \
         disks_ready={disks_ready:.6} service_start={service_start:.6}"
    ));
    supervise(service, &signals, &power_buttons, commands, grace)
}

/// Opens the control channel: the virtio-serial port [`CONTROL_PORT_NAME`]
/// (QEMU), else vsock port [`VSOCK_STATUS_PORT`] on the host
/// (cloud-hypervisor). Keeps the writing end in [`CONTROL`] and returns a
/// duplicate to read the host's commands from.
fn open_control_channel() -> Option<File> {
    let (channel, what) = match open_control_port() {
        Some(found) => found,
        None => match sys::vsock_connect(VSOCK_STATUS_PORT) {
            Ok(socket) => (socket, format!("vsock port {VSOCK_STATUS_PORT}")),
            Err(err) => {
                say(&format!(
                    "no control channel (no {CONTROL_PORT_NAME} port; vsock: {err}): the exit is only on the console"
                ));
                return None;
            }
        },
    };
    say(&format!("control channel: {what}"));
    let reader = channel.try_clone().ok();
    if let Ok(mut control) = CONTROL.lock() {
        *control = Some(channel);
    }
    reader
}

/// Opens `/dev/vportNpM` whose name is [`CONTROL_PORT_NAME`], waiting up to
/// [`CONTROL_WAIT`] for it when a virtio console device exists. A
/// virtio-serial port admits one opener at a time, which is checked: a
/// second open must fail with EBUSY.
fn open_control_port() -> Option<(File, String)> {
    let started = Instant::now();
    loop {
        if let Some(device) = named_virtio_port(CONTROL_PORT_NAME) {
            let open = || fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(&device);
            match open() {
                Ok(port) => {
                    let second = match open() {
                        Err(err) if err.raw_os_error() == Some(libc::EBUSY) => "a second open gets EBUSY".to_owned(),
                        Err(err) => format!("WARNING: a second open failed otherwise: {err}"),
                        Ok(_) => "WARNING: a second open succeeded; the service could write here".to_owned(),
                    };
                    return Some((port, format!("{device} ({CONTROL_PORT_NAME}), held; {second}")));
                }
                // devtmpfs may not have made the node yet.
                Err(err) if err.kind() == io::ErrorKind::NotFound && started.elapsed() < CONTROL_WAIT => {}
                Err(err) => {
                    say(&format!("cannot open the control port {device}: {err}"));
                    return None;
                }
            }
        }
        if started.elapsed() >= CONTROL_WAIT || !virtio_device_present(VIRTIO_ID_CONSOLE) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `/dev/vportNpM` for the virtio-serial port called `name`, once the host
/// has announced its name (there is no udev to make `/dev/virtio-ports/`).
fn named_virtio_port(name: &str) -> Option<String> {
    let ports = fs::read_dir("/sys/class/virtio-ports").ok()?;
    ports.flatten().find_map(|port| {
        let found = fs::read_to_string(port.path().join("name")).ok()?;
        (found.trim_end() == name).then(|| format!("/dev/{}", port.file_name().to_string_lossy()))
    })
}

fn virtio_device_present(id: &str) -> bool {
    let Ok(devices) = fs::read_dir("/sys/bus/virtio/devices") else { return false };
    devices.flatten().any(|device| fs::read_to_string(device.path().join("device")).is_ok_and(|d| d.trim() == id))
}

fn mount_basics() -> Result<()> {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (fstype, target, flags, data) in [
        ("proc", "/proc", nosuid_nodev_noexec, ""),
        ("sysfs", "/sys", nosuid_nodev_noexec, ""),
        ("devtmpfs", "/dev", libc::MS_NOSUID, "mode=0755"),
        ("tmpfs", "/run", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755"),
        ("tmpfs", "/tmp", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777"),
    ] {
        fs::create_dir_all(target).context(|| format!("cannot create {target}"))?;
        match sys::mount(fstype, target, fstype, flags, data) {
            Ok(()) => {}
            // Already there (a kernel with CONFIG_DEVTMPFS_MOUNT mounts /dev itself).
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {}
            Err(err) => return Err(Failure(format!("cannot mount {fstype} on {target}: {err}"))),
        }
    }
    Ok(())
}

/// `kiln.grace=SECONDS` from the kernel command line (the last one, should
/// there be several: kiln writes exactly one, the spec's).
fn grace_period(cmdline: &str) -> Duration {
    cmdline
        .split_whitespace()
        .rev()
        .find_map(|word| word.strip_prefix("kiln.grace="))
        .and_then(|value| value.parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
        .map_or(DEFAULT_GRACE, Duration::from_secs_f64)
}

fn load_modules() -> Result<()> {
    let order = match fs::read_to_string(LOAD_ORDER) {
        Ok(order) => order,
        // A kernel with everything built in needs no modules.
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(Failure(format!("cannot read {LOAD_ORDER}: {err}"))),
    };
    for file in order.lines().map(str::trim).filter(|line| !line.is_empty()) {
        let path = format!("{MODULE_DIR}/{file}");
        let module = File::open(&path).context(|| format!("cannot open module {path}"))?;
        match sys::finit_module(&module) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
            // ENODEV: hardware the module drives is absent; the module is not needed.
            Err(err) if err.raw_os_error() == Some(libc::ENODEV) => {}
            Err(err) => return Err(Failure(format!("cannot load module {path}: {err}"))),
        }
    }
    Ok(())
}

/// A virtio disk and what it holds.
#[derive(Debug)]
struct Disk {
    name: String,
    device: String,
    serial: String,
    kind: DiskKind,
}

impl Disk {
    fn is_fat(&self, label: &str) -> bool {
        matches!(&self.kind, DiskKind::Fat { label: Some(found) } if found == label)
    }
}

fn describe(disks: &[Disk]) -> String {
    if disks.is_empty() {
        return "none".to_owned();
    }
    disks.iter().map(|d| format!("{} {:?}", d.name, d.kind)).collect::<Vec<_>>().join(", ")
}

/// Every `/sys/block/vd*` disk, classified by its first sectors, once every
/// virtio block device has its disk (at most [`DISK_WAIT`]).
fn find_disks() -> Result<Vec<Disk>> {
    let started = Instant::now();
    while pending_virtio_disks() > 0 && started.elapsed() < DISK_WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    scan_disks()
}

/// Virtio block devices (virtio device id 2) whose disk has not appeared
/// yet. The driver usually probes while its module loads, so this is 0 and
/// a missing service disk is reported at once, not after a timeout.
fn pending_virtio_disks() -> usize {
    let Ok(devices) = fs::read_dir("/sys/bus/virtio/devices") else { return 0 };
    devices
        .flatten()
        .filter(|device| {
            let id = fs::read_to_string(device.path().join("device")).unwrap_or_default();
            id.trim() == "0x0002" && !device.path().join("block").is_dir()
        })
        .count()
}

fn scan_disks() -> Result<Vec<Disk>> {
    let mut names: Vec<String> = fs::read_dir("/sys/block")
        .context(|| "cannot list /sys/block".to_owned())?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("vd"))
        .collect();
    names.sort();
    let mut disks = Vec::new();
    for name in names {
        let device = format!("/dev/{name}");
        let mut head = vec![0; 2048];
        let read = File::open(&device).and_then(|mut file| read_up_to(&mut file, &mut head));
        let kind = match read {
            Ok(len) => classify_disk(&head[..len]),
            Err(err) => return Err(Failure(format!("cannot read {device}: {err}"))),
        };
        let serial = fs::read_to_string(format!("/sys/block/{name}/serial")).unwrap_or_default().trim().to_owned();
        disks.push(Disk { name, device, serial, kind });
    }
    Ok(disks)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Mounts a FAT disk read-only: UTF-8 long names, and vfat's default masks
/// (every file executable), which the service disk relies on.
fn mount_fat(device: &str, target: &str) -> Result<()> {
    fs::create_dir_all(target).context(|| format!("cannot create {target}"))?;
    sys::mount(device, target, "vfat", libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID, "utf8")
        .context(|| format!("cannot mount {device} (vfat, read-only) on {target}"))
}

fn apply_seed(device: &str) -> Result<()> {
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
    Ok(())
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

/// What to do with the data disk.
#[derive(Debug)]
enum DataDisk<'a> {
    /// No disk is the data disk: `/mnt/data` stays absent.
    None,
    Mount(&'a Disk),
    FormatThenMount(&'a Disk),
}

/// The data disk is an ext filesystem labelled `KILNDATA`, or else the
/// disk with virtio serial `kiln-data`, which is formatted only when blank
/// (its first 2 KiB all zero). Anything else on that disk is refused, never
/// overwritten.
fn choose_data_disk(disks: &[Disk]) -> Result<DataDisk<'_>> {
    let labelled = disks.iter().find(|d| matches!(&d.kind, DiskKind::Ext { label: Some(l) } if l == DATA_DISK_LABEL));
    if let Some(disk) = labelled {
        return Ok(DataDisk::Mount(disk));
    }
    let Some(disk) = disks.iter().find(|d| d.serial == DATA_DISK_SERIAL) else {
        return Ok(DataDisk::None);
    };
    match &disk.kind {
        DiskKind::Blank => Ok(DataDisk::FormatThenMount(disk)),
        DiskKind::Ext { .. } => Ok(DataDisk::Mount(disk)),
        other => Err(Failure(format!(
            "data disk {} (serial {DATA_DISK_SERIAL}) holds {other:?}, not ext and not blank; refusing to format it",
            disk.device
        ))),
    }
}

/// Mounts the data disk at `/mnt/data` (see [`choose_data_disk`]), making
/// the filesystem first when the disk is blank: busybox `mke2fs`, ext2
/// served by the built-in ext4 driver.
fn mount_data_disk(disks: &[Disk]) -> Result<()> {
    let disk = match choose_data_disk(disks)? {
        DataDisk::None => return Ok(()),
        DataDisk::Mount(disk) => disk,
        DataDisk::FormatThenMount(disk) => {
            format_data_disk(disk)?;
            disk
        }
    };
    fs::create_dir_all("/mnt/data").context(|| "cannot create /mnt/data".to_owned())?;
    sys::mount(&disk.device, "/mnt/data", "ext4", libc::MS_NODEV | libc::MS_NOSUID, "")
        .context(|| format!("cannot mount the data disk {} (ext4) on /mnt/data", disk.device))?;
    say(&format!("data disk {} mounted on /mnt/data", disk.device));
    Ok(())
}

fn format_data_disk(disk: &Disk) -> Result<()> {
    say(&format!("data disk {} is blank: making a filesystem", disk.device));
    let output = Command::new("/bin/busybox")
        .args(["mke2fs", "-q", "-L", DATA_DISK_LABEL, &disk.device])
        .stdin(Stdio::null())
        .output()
        .context(|| "cannot run /bin/busybox mke2fs".to_owned())?;
    if !output.status.success() {
        return Err(Failure(format!(
            "mke2fs {} failed ({}): {}",
            disk.device,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// `/dev/input/event*` devices that report the ACPI power button.
fn power_buttons() -> Vec<File> {
    let Ok(entries) = fs::read_dir("/sys/class/input") else { return Vec::new() };
    let mut buttons = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("event") {
            continue;
        }
        let device_name = fs::read_to_string(entry.path().join("device/name")).unwrap_or_default();
        if device_name.trim() == "Power Button" {
            if let Ok(file) = File::open(format!("/dev/input/{name}")) {
                buttons.push(file);
            }
        }
    }
    buttons
}

/// Whether the bytes read from an evdev device hold a power-button press.
fn power_pressed(events: &[u8]) -> bool {
    events.chunks_exact(INPUT_EVENT_LEN).any(|event| {
        let kind = u16::from_le_bytes([event[16], event[17]]);
        let code = u16::from_le_bytes([event[18], event[19]]);
        let value = i32::from_le_bytes([event[20], event[21], event[22], event[23]]);
        kind == EV_KEY && code == KEY_POWER && value == 1
    })
}

fn spawn_service() -> Result<i32> {
    if !sys::exists(SERVICE) {
        return Err(Failure(format!("{SERVICE} does not exist on the service disk")));
    }
    let mut command = Command::new(SERVICE);
    command
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", "/")
        .current_dir("/")
        .stdin(Stdio::null())
        .process_group(0);
    // SAFETY: the hook only calls `pthread_sigmask`, which is async-signal-safe
    // and does not allocate. Without it the service would start with
    // SIGTERM blocked (kiln-init's signalfd mask), deaf to its stop.
    unsafe {
        command.pre_exec(sys::unblock_signals);
    }
    // With a vsock log port on the host, output goes to the console and there.
    let log = sys::vsock_connect(VSOCK_LOG_PORT).ok();
    let pipe = if log.is_some() {
        let (reader, writer) = sys::pipe().context(|| "cannot create the log pipe".to_owned())?;
        command.stdout(writer.try_clone().context(|| "cannot duplicate the log pipe".to_owned())?).stderr(writer);
        Some(reader)
    } else {
        None
    };
    let child = command.spawn().context(|| format!("cannot start {SERVICE}"))?;
    drop(command); // Closes our copies of the pipe's write end.
    if let (Some(reader), Some(log)) = (pipe, log) {
        let handle = std::thread::spawn(move || tee(reader, log));
        if let Ok(mut tee) = TEE.lock() {
            *tee = Some(handle);
        }
    }
    // The pid is kept, not the Child: kiln-init reaps every process itself.
    Ok(child.id() as i32)
}

/// Lets the output copier finish, so the exit line comes after the
/// service's last words; gives up after `limit` (an orphan may hold the pipe).
fn drain_service_output(limit: Duration) {
    let Some(handle) = TEE.lock().ok().and_then(|mut tee| tee.take()) else { return };
    let deadline = Instant::now() + limit;
    while !handle.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Copies the service's output to the console and the vsock log until EOF;
/// a vsock error drops the log, never the console.
fn tee(mut reader: File, log: File) {
    let mut log = Some(log);
    let mut buf = vec![0; 16 * 1024];
    loop {
        let len = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(len) => len,
        };
        let _ = io::stdout().lock().write_all(&buf[..len]);
        if let Some(socket) = log.as_mut() {
            if socket.write_all(&buf[..len]).is_err() {
                log = None;
            }
        }
    }
}

/// Waits for the service to end, reaping every child, turning the power
/// button (or SIGTERM/SIGINT/SIGPWR to PID 1) into SIGTERM for the service
/// and SIGKILL for its process group after `grace`; `stop SECONDS` from the
/// control channel does the same with its own grace.
fn supervise(
    service: i32,
    signals: &OwnedFd,
    buttons: &[File],
    mut commands: Option<File>,
    grace: Duration,
) -> Result<ExitStatus> {
    let mut kill_at: Option<Instant> = None;
    let mut lines = LineBuffer::new();
    loop {
        let mut fds = vec![signals.as_raw_fd()];
        fds.extend(buttons.iter().map(|b| b.as_raw_fd()));
        fds.extend(commands.as_ref().map(|c| c.as_raw_fd()));
        // A child may have ended before the signalfd existed; reap first.
        while let Some((pid, status)) = sys::reap_one() {
            if pid == service {
                return Ok(status);
            }
        }
        let timeout = kill_at.map(|at| at.saturating_duration_since(Instant::now()));
        let ready = sys::poll_readable(&fds, timeout).context(|| "cannot wait for events".to_owned())?;
        let mut stop = false;
        if ready[0] {
            for signal in sys::read_signals(signals) {
                stop |= signal as libc::c_int != libc::SIGCHLD;
            }
        }
        for (button, is_ready) in buttons.iter().zip(&ready[1..]) {
            if *is_ready {
                let mut events = [0; INPUT_EVENT_LEN * 16];
                let len = (&*button).read(&mut events).unwrap_or(0);
                stop |= power_pressed(&events[..len]);
            }
        }
        let mut asked: Option<Duration> = None;
        if let (Some(channel), Some(true)) = (&commands, ready.get(1 + buttons.len())) {
            let mut bytes = [0; 512];
            match (&*channel).read(&mut bytes) {
                Ok(0) => {
                    // The host hung up: stop listening (a virtio port would
                    // poll as readable forever), but keep the port held.
                    say("control channel: the host closed its end");
                    commands = None;
                }
                Ok(len) => {
                    for line in lines.push(&bytes[..len]) {
                        match HostCommand::parse(&line) {
                            Ok(HostCommand::Stop { grace_seconds }) => asked = Some(Duration::from_secs(grace_seconds)),
                            Err(err) => say(&format!("control channel: ignored: {err}")),
                        }
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock || err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    say(&format!("control channel: cannot read: {err}"));
                    commands = None;
                }
            }
        }
        if kill_at.is_none() {
            let start = match asked {
                Some(asked) => Some(("stop asked on the control channel", asked)),
                None => stop.then_some(("power button", grace)),
            };
            if let Some((why, grace)) = start {
                say(&format!("{why}: sending SIGTERM to the service, grace {:.1}s", grace.as_secs_f64()));
                let _ = sys::kill(service, libc::SIGTERM);
                kill_at = Some(Instant::now() + grace);
            }
        }
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            say("grace period over: sending SIGKILL to the service's process group");
            let _ = sys::kill(-service, libc::SIGKILL);
            kill_at = Some(Instant::now() + Duration::from_secs(3600));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_from_the_command_line() {
        assert_eq!(grace_period("console=ttyS0 kiln.grace=2.5 panic=-1"), Duration::from_millis(2500));
        assert_eq!(grace_period("kiln.grace=10 kiln.grace=60"), Duration::from_secs(60), "the last one counts");
        assert_eq!(grace_period("console=ttyS0"), DEFAULT_GRACE);
        assert_eq!(grace_period("kiln.grace=-1"), DEFAULT_GRACE);
        assert_eq!(grace_period("kiln.grace=soon"), DEFAULT_GRACE);
    }

    fn disk(name: &str, serial: &str, kind: DiskKind) -> Disk {
        Disk { name: name.to_owned(), device: format!("/dev/{name}"), serial: serial.to_owned(), kind }
    }

    fn choice(disks: &[Disk]) -> String {
        match choose_data_disk(disks) {
            Ok(DataDisk::None) => "none".to_owned(),
            Ok(DataDisk::Mount(disk)) => format!("mount {}", disk.name),
            Ok(DataDisk::FormatThenMount(disk)) => format!("format {}", disk.name),
            Err(err) => format!("error: {err}"),
        }
    }

    #[test]
    fn data_disk_choice() {
        let ext = |label: &str| DiskKind::Ext { label: Some(label.to_owned()) };
        let fat = |label: &str| DiskKind::Fat { label: Some(label.to_owned()) };
        let service = disk("vda", "", fat("SERVICEDISK"));
        assert_eq!(choice(&[]), "none");
        assert_eq!(
            choice(&[disk("vda", "", DiskKind::Blank)]),
            "none",
            "a blank disk without the serial is left alone"
        );
        assert_eq!(choice(&[disk("vdb", "kiln-data", DiskKind::Blank)]), "format vdb");
        assert_eq!(choice(&[disk("vdb", "kiln-data", ext("KILNDATA"))]), "mount vdb");
        assert_eq!(choice(&[disk("vdb", "kiln-data", ext("other"))]), "mount vdb");
        assert_eq!(choice(&[disk("vdc", "", ext("KILNDATA")), disk("vdb", "kiln-data", DiskKind::Blank)]), "mount vdc");
        assert_eq!(
            choice(&[disk("vdb", "kiln-data", fat("SERVICEDISK"))]),
            "error: data disk /dev/vdb (serial kiln-data) holds Fat { label: Some(\"SERVICEDISK\") }, not ext and not blank; refusing to format it"
        );
        assert_eq!(
            choice(&[service, disk("vdb", "kiln-data", DiskKind::Unknown)]),
            "error: data disk /dev/vdb (serial kiln-data) holds Unknown, not ext and not blank; refusing to format it"
        );
    }

    #[test]
    fn power_button_events() {
        let event = |kind: u16, code: u16, value: i32| {
            let mut bytes = vec![0; 16];
            bytes.extend_from_slice(&kind.to_le_bytes());
            bytes.extend_from_slice(&code.to_le_bytes());
            bytes.extend_from_slice(&value.to_le_bytes());
            bytes
        };
        let press = [event(EV_KEY, KEY_POWER, 1), event(0, 0, 0)].concat();
        assert!(power_pressed(&press));
        assert!(!power_pressed(&event(EV_KEY, KEY_POWER, 0)));
        assert!(!power_pressed(&event(EV_KEY, 115, 1)));
        assert!(!power_pressed(&press[..20]));
    }
}
