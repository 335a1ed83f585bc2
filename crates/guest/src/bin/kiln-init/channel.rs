//! The control channel to the launcher: the virtio-serial port (QEMU) or
//! vsock (cloud-hypervisor), opened before the service starts, and the
//! exit report sent on it.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_guest::{CONTROL_PORT_NAME, GuestReport, VSOCK_STATUS_PORT};

use crate::{say, sys};

/// How long to wait for the virtio-serial control port to appear once a
/// virtio console device exists (ports are announced after the driver probes).
const CONTROL_WAIT: Duration = Duration::from_secs(5);

/// How long the exit report may wait for the host to take it.
const REPORT_WAIT: Duration = Duration::from_secs(2);

/// The virtio device id of a console (virtio-serial) device.
const VIRTIO_ID_CONSOLE: &str = "0x0003";

/// kiln-init's end of the control channel, when there is one: opened before
/// the service starts and held until power-off (close-on-exec, so the
/// service never inherits it). The failure path reports there too.
static CONTROL: Mutex<Option<File>> = Mutex::new(None);

/// Sends the exit report on the control channel, waiting at most
/// [`REPORT_WAIT`] for the host to take it (power-off must not hang on it).
pub(crate) fn report_to_host(report: &GuestReport) {
    let Ok(mut control) = CONTROL.lock() else { return };
    let Some(channel) = control.as_mut() else { return };
    if let Err(err) = sys::write_all_within(channel, report.to_line().as_bytes(), REPORT_WAIT) {
        say(&format!("cannot send the exit report on the control channel: {err}"));
    }
}

/// Opens the control channel: the virtio-serial port [`CONTROL_PORT_NAME`]
/// (QEMU), else vsock port [`VSOCK_STATUS_PORT`] on the host
/// (cloud-hypervisor). Keeps the writing end in [`CONTROL`] and returns a
/// duplicate to read the host's commands from.
pub(crate) fn open_control_channel() -> Option<File> {
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
