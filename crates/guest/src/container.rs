//! Container mode: the runtime config of an OCI container as kiln-init
//! reads it from the service disk ([`CONTAINER_CONFIG_FILE`]), and the pure
//! parts of running it the way `docker run` does: the argv (entrypoint and
//! cmd), the environment merge, the user resolved against the image's
//! `/etc/passwd` and `/etc/group` (runc's rules), the PATH lookup of
//! argv\[0\], the image's stop signal, the overlayfs mount options, and the contents of
//! `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf`. The host writes
//! the config with [`ContainerConfig::to_text`]; kiln-init reads it with
//! [`ContainerConfig::parse`].
//!
//! The file is lines of `KEY FIELD...`, fields split on single spaces,
//! each field escaped (`\\` for a backslash, `\xNN` for a byte below 0x21
//! or 0x7f, so spaces and newlines never split anything). The first line
//! is `kiln-container 1`; an unknown key is refused, not skipped, so a
//! newer host's config is never half understood.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::error::{Error, Result};

/// The config's file name at the service disk's root (`/srv/container.conf`
/// in the guest). Its presence is what puts kiln-init in container mode.
pub const CONTAINER_CONFIG_FILE: &str = "container.conf";
/// Layer disk `N` (0 = the bottom layer) has virtio serial `kiln-layerN`.
pub const LAYER_SERIAL_PREFIX: &str = "kiln-layer";
/// The most layer disks a container may stack (the host merges the lowest
/// layers of deeper images into one filesystem).
pub const MAX_LAYERS: u32 = 32;
/// The PATH a container gets when its image sets none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const MAGIC: &str = "kiln-container";
const VERSION: &str = "1";

/// Where the overlay's writable upper layer lives.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpperKind {
    /// A tmpfs: the container's writes vanish at power-off (the default).
    Tmpfs,
    /// A directory on the data disk, relative to its root (`/mnt/data`),
    /// so the container's writes outlive the VM.
    DataDisk { dir: String },
}

/// A `files` tree of the service disk (`/srv/NAME`) mounted read-only in
/// the container at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesMount {
    /// The tree's name on the service disk: one path component.
    pub name: String,
    /// Where the container sees it: an absolute path.
    pub path: String,
}

/// What kiln-init needs to run an OCI container. Everything the image and
/// the spec say is already combined on the host (argv, env); only the user
/// is resolved in the guest, against the image's own `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ContainerConfig {
    /// How many layer disks (serials `kiln-layer0`.. bottom first).
    pub layers: u32,
    /// The program and its arguments (entrypoint + cmd, see [`combine_argv`]).
    pub argv: Vec<String>,
    /// `NAME=VALUE` entries (see [`merge_env`]).
    pub env: Vec<String>,
    /// The working directory in the container, absolute (`/` by default).
    pub workdir: String,
    /// The image's or spec's user: `uid`, `uid:gid`, `name`, `name:group`,
    /// or empty for root.
    pub user: String,
    pub upper: UpperKind,
    /// The VM's hostname, for `/etc/hostname` and `/etc/hosts`.
    pub hostname: Option<String>,
    /// `/etc/resolv.conf`'s name servers.
    pub nameservers: Vec<IpAddr>,
    pub files: Vec<FilesMount>,
    /// What a stop sends the program first (the image's `StopSignal`,
    /// SIGTERM by default); SIGKILL follows after the grace period.
    pub stop_signal: StopSignal,
}

impl ContainerConfig {
    /// A config running `argv` on `layers` layer disks as root in `/`,
    /// with no environment, a tmpfs upper and nothing else.
    pub fn new(layers: u32, argv: Vec<String>) -> ContainerConfig {
        ContainerConfig {
            layers,
            argv,
            env: Vec::new(),
            workdir: "/".to_owned(),
            user: String::new(),
            upper: UpperKind::Tmpfs,
            hostname: None,
            nameservers: Vec::new(),
            files: Vec::new(),
            stop_signal: StopSignal::TERM,
        }
    }

    /// Refuses what kiln-init could not run, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::ContainerConfig { line: 0, reason });
        if self.layers == 0 || self.layers > MAX_LAYERS {
            return bad(format!("{} layers: a container has 1 to {MAX_LAYERS}", self.layers));
        }
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return bad("no program to run: the image has no entrypoint or cmd and the spec no args".to_owned());
        }
        // Every string field: the text format cannot carry a NUL, so a
        // config holding one would not read back as itself.
        let upper_dir = match &self.upper {
            UpperKind::DataDisk { dir } => Some(dir),
            _ => None,
        };
        let files = self.files.iter().flat_map(|files| [&files.name, &files.path]);
        for text in self.argv.iter().chain(&self.env).chain([&self.workdir, &self.user]).chain(upper_dir).chain(files) {
            if text.contains('\0') {
                return bad(format!("{text:?} holds a NUL byte"));
            }
        }
        for entry in &self.env {
            if entry.split_once('=').is_none_or(|(name, _)| name.is_empty()) {
                return bad(format!("env entry {entry:?} is not NAME=VALUE"));
            }
        }
        check_container_path("workdir", &self.workdir)?;
        if let UpperKind::DataDisk { dir } = &self.upper {
            let parts: Vec<&str> = dir.split('/').collect();
            if dir.is_empty() || parts.iter().any(|part| part.is_empty() || *part == "." || *part == "..") {
                return bad(format!("upper directory {dir:?} must be a relative path inside the data disk"));
            }
        }
        if let Some(hostname) = &self.hostname {
            let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
            if hostname.is_empty() || hostname.len() > 64 || !hostname.chars().all(valid) {
                return bad(format!("hostname {hostname:?} is not a host name (letters, digits, `-`, `.`)"));
            }
        }
        for files in &self.files {
            if files.name.is_empty() || files.name.contains('/') || files.name == "." || files.name == ".." {
                return bad(format!("files tree name {:?} must be one path component", files.name));
            }
            check_container_path("files path", &files.path)?;
            if files.path == "/" {
                return bad(format!("files tree {:?} cannot be mounted over the container's /", files.name));
            }
        }
        Ok(())
    }

    /// The config file's text (after [`ContainerConfig::validate`]).
    pub fn to_text(&self) -> Result<String> {
        self.validate()?;
        let mut text = format!("{MAGIC} {VERSION}\nlayers {}\n", self.layers);
        let mut line = |key: &str, fields: &[&str]| {
            text.push_str(key);
            for field in fields {
                text.push(' ');
                text.push_str(&escape(field));
            }
            text.push('\n');
        };
        for arg in &self.argv {
            line("arg", &[arg]);
        }
        for entry in &self.env {
            line("env", &[entry]);
        }
        line("workdir", &[&self.workdir]);
        if !self.user.is_empty() {
            line("user", &[&self.user]);
        }
        match &self.upper {
            UpperKind::Tmpfs => line("upper", &["tmpfs"]),
            UpperKind::DataDisk { dir } => line("upper", &["data", dir]),
        }
        if let Some(hostname) = &self.hostname {
            line("hostname", &[hostname]);
        }
        for server in &self.nameservers {
            line("nameserver", &[&server.to_string()]);
        }
        for files in &self.files {
            line("files", &[&files.name, &files.path]);
        }
        // Only when not the default: a config without the line (an older
        // kiln's) means SIGTERM.
        if self.stop_signal != StopSignal::TERM {
            line("stopsignal", &[&self.stop_signal.number().to_string()]);
        }
        Ok(text)
    }

    /// Reads a config file's text; every error names its line.
    pub fn parse(text: &str) -> Result<ContainerConfig> {
        let mut lines = text.lines().enumerate().map(|(index, line)| (index + 1, line));
        match lines.next() {
            Some((_, first)) if first == format!("{MAGIC} {VERSION}") => {}
            Some((_, first)) if first.starts_with(MAGIC) => {
                return Err(Error::ContainerConfig {
                    line: 1,
                    reason: format!("{first:?}: only version {VERSION} is understood (a newer kiln wrote it?)"),
                });
            }
            _ => {
                return Err(Error::ContainerConfig {
                    line: 1,
                    reason: format!("does not start with `{MAGIC} {VERSION}`"),
                });
            }
        }
        let mut config = ContainerConfig::new(0, Vec::new());
        let (mut layers, mut workdir, mut user, mut upper, mut hostname) = (false, false, false, false, false);
        let mut stop_signal = false;
        for (number, line) in lines {
            let bad = |reason: String| Error::ContainerConfig { line: number, reason };
            if line.is_empty() {
                continue;
            }
            let mut words = line.split(' ');
            let key = words.next().unwrap_or_default();
            let fields: Vec<String> = words.map(unescape).collect::<std::result::Result<_, _>>().map_err(bad)?;
            let once = |seen: &mut bool| {
                if std::mem::replace(seen, true) { Err(bad(format!("a second `{key}` line"))) } else { Ok(()) }
            };
            let one = |fields: &[String]| match fields {
                [field] => Ok(field.clone()),
                _ => Err(bad(format!("`{key}` takes one field, not {}", fields.len()))),
            };
            match key {
                "layers" => {
                    once(&mut layers)?;
                    let field = one(&fields)?;
                    config.layers = field.parse().map_err(|_| bad(format!("{field:?} is not a layer count")))?;
                }
                "arg" => config.argv.push(one(&fields)?),
                "env" => config.env.push(one(&fields)?),
                "workdir" => {
                    once(&mut workdir)?;
                    config.workdir = one(&fields)?;
                }
                "user" => {
                    once(&mut user)?;
                    config.user = one(&fields)?;
                }
                "upper" => {
                    once(&mut upper)?;
                    config.upper = match fields.as_slice() {
                        [kind] if kind == "tmpfs" => UpperKind::Tmpfs,
                        [kind, dir] if kind == "data" => UpperKind::DataDisk { dir: dir.clone() },
                        _ => return Err(bad("`upper` is `tmpfs` or `data DIR`".to_owned())),
                    };
                }
                "hostname" => {
                    once(&mut hostname)?;
                    config.hostname = Some(one(&fields)?);
                }
                "nameserver" => {
                    let field = one(&fields)?;
                    config.nameservers.push(field.parse().map_err(|_| bad(format!("{field:?} is not an IP address")))?);
                }
                "stopsignal" => {
                    once(&mut stop_signal)?;
                    let field = one(&fields)?;
                    config.stop_signal = match field.parse::<u8>() {
                        Ok(number) if field == number.to_string() => {
                            StopSignal::from_number(number).map_err(|err| bad(err.to_string()))?
                        }
                        _ => return Err(bad(format!("{field:?} is not a signal number"))),
                    };
                }
                "files" => match fields.as_slice() {
                    [name, path] => config.files.push(FilesMount { name: name.clone(), path: path.clone() }),
                    _ => return Err(bad("`files` takes a tree name and a container path".to_owned())),
                },
                _ => return Err(bad(format!("unknown key {key:?}"))),
            }
        }
        if !layers {
            return Err(Error::ContainerConfig { line: 0, reason: "no `layers` line".to_owned() });
        }
        config.validate()?;
        Ok(config)
    }

    /// The environment the program gets: the config's, plus `HOME` from
    /// the user's passwd entry when the config has none (as runc does),
    /// and `HOSTNAME` (the VM's, `hostname`) when it has none (as Docker does).
    pub fn program_env(&self, user: &ResolvedUser, hostname: Option<&str>) -> Vec<String> {
        let mut env = self.env.clone();
        if !env.iter().any(|entry| entry.starts_with("HOME=")) {
            env.push(format!("HOME={}", user.home));
        }
        if let Some(hostname) = hostname
            && !env.iter().any(|entry| entry.starts_with("HOSTNAME="))
        {
            env.push(format!("HOSTNAME={hostname}"));
        }
        env
    }

    /// The container's PATH (the one argv\[0\] is looked up in).
    pub fn path(&self) -> &str {
        self.env.iter().rev().find_map(|entry| entry.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH)
    }
}

fn check_container_path(what: &str, path: &str) -> Result<()> {
    if !path.starts_with('/') || path.split('/').any(|part| part == "..") {
        return Err(Error::ContainerConfig {
            line: 0,
            reason: format!("{what} {path:?} must be an absolute path without `..`"),
        });
    }
    Ok(())
}

fn escape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    for c in field.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x21 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

fn unescape(field: &str) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                match u8::from_str_radix(&hex, 16) {
                    Ok(0) => return Err(format!("{field:?} holds a NUL byte")),
                    Ok(byte) if hex.len() == 2 && byte < 0x80 => out.push(char::from(byte)),
                    _ => return Err(format!("bad escape `\\x{hex}` in {field:?}")),
                }
            }
            _ => return Err(format!("bad escape in {field:?} (only `\\\\` and `\\xNN`)")),
        }
    }
    Ok(out)
}

/// A signal that stops a container's program (OCI `StopSignal`): Linux
/// signals 1 to 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSignal(u8);

/// The highest Linux signal number (SIGRTMAX).
const SIGRTMAX: u8 = 64;
/// The lowest real-time signal a program may use: glibc keeps 32 and 33,
/// so SIGRTMIN is 34 (as Docker counts it).
const SIGRTMIN: u8 = 34;

/// The names of signals 1 to 31 (x86_64), and the aliases Docker also takes.
const SIGNAL_NAMES: [(&str, u8); 34] = [
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("PWR", 30),
    ("SYS", 31),
    // Aliases: their numbers' names are the ones above.
    ("IOT", 6),
    ("CLD", 17),
    ("POLL", 29),
];

impl StopSignal {
    /// SIGTERM, what a stop sends when the image names no signal.
    pub const TERM: StopSignal = StopSignal(15);

    /// Signal `number`, if Linux has it (1 to 64).
    pub fn from_number(number: u8) -> Result<StopSignal> {
        if (1..=SIGRTMAX).contains(&number) {
            Ok(StopSignal(number))
        } else {
            Err(Error::StopSignal { value: number.to_string() })
        }
    }

    /// An image's `StopSignal` as Docker reads it: a number (1 to 64), or
    /// a name in any case with or without `SIG` (`SIGQUIT`, `quit`),
    /// `RTMIN+N` and `RTMAX-N` included. Anything else is refused: kiln is
    /// stricter than Docker here, which takes any non-zero integer and
    /// ignores an image's stop signal it cannot parse.
    pub fn parse(text: &str) -> Result<StopSignal> {
        let bad = || Error::StopSignal { value: text.to_owned() };
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return text.parse::<u8>().map_err(|_| bad()).and_then(StopSignal::from_number).map_err(|_| bad());
        }
        let upper = text.to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        if let Some(&(_, number)) = SIGNAL_NAMES.iter().find(|(known, _)| *known == name) {
            return Ok(StopSignal(number));
        }
        // Plain decimal offsets only, as in Docker's table (RTMIN+1..+15, RTMAX-14..-1).
        let offset = |digits: &str| {
            (!digits.is_empty() && !digits.starts_with('0') && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| digits.parse::<u8>().ok())
                .flatten()
        };
        let number = match name {
            "RTMIN" => Some(SIGRTMIN),
            "RTMAX" => Some(SIGRTMAX),
            _ => match (name.strip_prefix("RTMIN+"), name.strip_prefix("RTMAX-")) {
                (Some(digits), _) => offset(digits).filter(|n| *n <= 15).map(|n| SIGRTMIN + n),
                (_, Some(digits)) => offset(digits).filter(|n| *n <= 14).map(|n| SIGRTMAX - n),
                _ => None,
            },
        };
        number.map(StopSignal).ok_or_else(bad)
    }

    /// The signal's number, for kill(2).
    pub fn number(self) -> i32 {
        i32::from(self.0)
    }
}

/// `SIGQUIT`, `SIGRTMIN+3`; `signal 32` for the two glibc keeps.
impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let number = self.0;
        if let Some((name, _)) = SIGNAL_NAMES[..31].iter().find(|(_, n)| *n == number) {
            return write!(f, "SIG{name}");
        }
        match number {
            SIGRTMIN => f.write_str("SIGRTMIN"),
            SIGRTMAX => f.write_str("SIGRTMAX"),
            n if n > SIGRTMIN && n - SIGRTMIN <= 15 => write!(f, "SIGRTMIN+{}", n - SIGRTMIN),
            n if n > SIGRTMIN => write!(f, "SIGRTMAX-{}", SIGRTMAX - n),
            n => write!(f, "signal {n}"),
        }
    }
}

/// The argv `docker run` gives: the entrypoint, then the spec's `args` if
/// it has any, else the image's cmd.
pub fn combine_argv(entrypoint: &[String], cmd: &[String], args: Option<&[String]>) -> Vec<String> {
    entrypoint.iter().chain(args.unwrap_or(cmd)).cloned().collect()
}

/// The image's env with the spec's merged on top (a spec value replaces
/// the image's of the same name, in the image's place; new names follow
/// in the spec's order), and `PATH` set to [`DEFAULT_PATH`] when neither
/// has one.
pub fn merge_env(image: &[String], spec: &[(String, String)]) -> Vec<String> {
    let name = |entry: &str| entry.split_once('=').map_or(entry.to_owned(), |(name, _)| name.to_owned());
    let mut merged: Vec<String> = Vec::new();
    for entry in image {
        let key = name(entry);
        match merged.iter_mut().find(|e| name(e) == key) {
            Some(existing) => *existing = entry.clone(),
            None => merged.push(entry.clone()),
        }
    }
    for (key, value) in spec {
        let entry = format!("{key}={value}");
        match merged.iter_mut().find(|e| name(e) == *key) {
            Some(existing) => *existing = entry,
            None => merged.push(entry),
        }
    }
    if !merged.iter().any(|entry| name(entry) == "PATH") {
        merged.push(format!("PATH={DEFAULT_PATH}"));
    }
    merged
}

/// The ids a container's program runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (setgroups).
    pub groups: Vec<u32>,
    /// The passwd entry's home directory, or `/`.
    pub home: String,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if line.starts_with('#') || fields.len() < 4 {
            return None;
        }
        Some(PasswdEntry {
            name: fields[0],
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields.get(5).copied().unwrap_or(""),
        })
    })
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    group.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if line.starts_with('#') || fields.len() < 3 {
            return None;
        }
        let members = fields.get(3).map_or_else(Vec::new, |list| list.split(',').filter(|m| !m.is_empty()).collect());
        Some(GroupEntry { name: fields[0], gid: fields[2].parse().ok()?, members })
    })
}

/// Resolves `user` (`uid`, `uid:gid`, `name`, `name:group`, or empty for
/// root) against the container's `/etc/passwd` and `/etc/group` (either
/// may be missing), as runc does: a name must have a passwd entry; a
/// numeric uid needs none (its gid is then 0 unless given); a group given
/// by name must be in `/etc/group`; supplementary groups are the groups
/// listing the user's name, and only when no group is given. The primary
/// gid is always the first supplementary group too (Docker's fix for
/// CVE-2022-36109, containerd's for CVE-2023-25173): a file readable by
/// that group but not by its other members stays readable after a
/// `newgrp`-like change, and a group the image denies stays denied.
pub fn resolve_user(user: &str, passwd: Option<&str>, group: Option<&str>) -> Result<ResolvedUser> {
    let bad = |reason: String| Error::User { user: user.to_owned(), reason };
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let passwd = passwd.unwrap_or("");
    let group = group.unwrap_or("");
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|e| e.name == user_part)
                .ok_or_else(|| bad(format!("no user {user_part:?} in the image's /etc/passwd")))?,
        ),
    };
    let uid = match &entry {
        Some(entry) => entry.uid,
        None => user_part.parse::<u32>().map_err(|_| bad(format!("{user_part:?} is not a uid")))?,
    };
    let home = entry.as_ref().map_or("/", |e| if e.home.is_empty() { "/" } else { e.home }).to_owned();
    let (gid, groups) = match group_part {
        Some(group_part) if !group_part.is_empty() => {
            let gid = match group_part.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => group_entries(group)
                    .find(|g| g.name == group_part)
                    .map(|g| g.gid)
                    .ok_or_else(|| bad(format!("no group {group_part:?} in the image's /etc/group")))?,
            };
            (gid, vec![gid])
        }
        _ => {
            let gid = entry.as_ref().map_or(0, |e| e.gid);
            let mut groups = vec![gid];
            if let Some(entry) = &entry {
                for member_of in group_entries(group).filter(|g| g.members.contains(&entry.name)) {
                    if !groups.contains(&member_of.gid) {
                        groups.push(member_of.gid);
                    }
                }
            }
            (gid, groups)
        }
    };
    Ok(ResolvedUser { uid, gid, groups, home })
}

/// argv\[0\] looked up in `path` (a PATH value) as execvp does, `exists`
/// telling whether a candidate is an executable file; a name with a `/` is
/// taken as it is. `None`: not found.
pub fn find_in_path(program: &str, path: &str, exists: impl Fn(&str) -> bool) -> Option<String> {
    if program.contains('/') {
        return Some(program.to_owned());
    }
    path.split(':').map(|dir| if dir.is_empty() { "." } else { dir }).find_map(|dir| {
        let candidate = format!("{}/{program}", dir.trim_end_matches('/'));
        exists(&candidate).then_some(candidate)
    })
}

/// overlayfs's mount options: `lowerdir` lists the layers top first
/// (`lowers` comes bottom first, like the layer disks), then `upperdir`
/// and `workdir`; `:`, `,` and `\` in a path are escaped as overlayfs reads them.
pub fn overlay_options(lowers: &[String], upper: &str, work: &str) -> String {
    let escape = |path: &str| {
        let mut out = String::with_capacity(path.len());
        for c in path.chars() {
            if matches!(c, ':' | ',' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out
    };
    let lowerdir: Vec<String> = lowers.iter().rev().map(|l| escape(l)).collect();
    format!("lowerdir={},upperdir={},workdir={}", lowerdir.join(":"), escape(upper), escape(work))
}

/// `/etc/hostname`: the name and a newline (empty without one).
pub fn hostname_file(hostname: Option<&str>) -> String {
    hostname.map_or_else(String::new, |name| format!("{name}\n"))
}

/// `/etc/hosts` as Docker writes it: localhost for both families, the
/// IPv6 names, and the VM's own address under its hostname.
pub fn hosts_file(hostname: Option<&str>, address: Option<IpAddr>) -> String {
    let mut text = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n\
         ff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
    match (hostname, address) {
        (Some(name), Some(address)) => {
            let _ = writeln!(text, "{address}\t{name}");
        }
        // No address of its own: the name must still resolve (sudo, Java).
        (Some(name), None) => {
            let _ = writeln!(text, "127.0.1.1\t{name}");
        }
        _ => {}
    }
    text
}

/// `/etc/resolv.conf`: one `nameserver` line each. With none, a comment
/// only: kiln does not fall back to a public resolver as Docker does (a
/// VM's egress is the spec's to decide).
pub fn resolv_conf(nameservers: &[IpAddr]) -> String {
    if nameservers.is_empty() {
        return "# kiln: no name server configured for this VM\n".to_owned();
    }
    nameservers.iter().map(|server| format!("nameserver {server}\n")).collect()
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};
    use proptest::prelude::*;

    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n# a comment\napp:x:1000:1001:App:/home/app:/bin/sh\n\
                          nohome:x:1002:1002::\nbroken line\nbad:x:notanumber:0::/:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1001:\nextra:x:2000:app,other\nwheel:x:10:other,app\nnohome:x:1002:\n";

    fn check_user(user: &str, passwd: Option<&str>, group: Option<&str>, expected: Expect) {
        let actual = match resolve_user(user, passwd, group) {
            Ok(u) => format!("uid={} gid={} groups={:?} home={}", u.uid, u.gid, u.groups, u.home),
            Err(err) => format!("error: {err}"),
        };
        expected.assert_eq(&actual);
    }

    #[test]
    fn user_resolution_follows_runc() {
        let (p, g) = (Some(PASSWD), Some(GROUP));
        check_user("", p, g, expect!["uid=0 gid=0 groups=[0] home=/root"]);
        check_user("", None, None, expect!["uid=0 gid=0 groups=[0] home=/"]);
        check_user("app", p, g, expect!["uid=1000 gid=1001 groups=[1001, 2000, 10] home=/home/app"]);
        check_user("1000", p, g, expect!["uid=1000 gid=1001 groups=[1001, 2000, 10] home=/home/app"]);
        check_user("app:extra", p, g, expect!["uid=1000 gid=2000 groups=[2000] home=/home/app"]);
        check_user("app:55", p, g, expect!["uid=1000 gid=55 groups=[55] home=/home/app"]);
        check_user("4242", p, g, expect!["uid=4242 gid=0 groups=[0] home=/"]);
        check_user("4242:77", None, None, expect!["uid=4242 gid=77 groups=[77] home=/"]);
        check_user("4242:", p, g, expect!["uid=4242 gid=0 groups=[0] home=/"]);
        check_user("nohome", p, g, expect!["uid=1002 gid=1002 groups=[1002] home=/"]);
        // The primary group listing the user too: once.
        check_user(
            "app",
            p,
            Some("app:x:1001:app\nextra:x:2000:app\n"),
            expect!["uid=1000 gid=1001 groups=[1001, 2000] home=/home/app"],
        );
        check_user(
            "ghost",
            p,
            g,
            expect![[r#"error: Cannot run the container as user "ghost": no user "ghost" in the image's /etc/passwd"#]],
        );
        check_user(
            "ghost",
            None,
            None,
            expect![[r#"error: Cannot run the container as user "ghost": no user "ghost" in the image's /etc/passwd"#]],
        );
        check_user(
            "app:ghosts",
            p,
            g,
            expect![[
                r#"error: Cannot run the container as user "app:ghosts": no group "ghosts" in the image's /etc/group"#
            ]],
        );
        check_user(
            "bad",
            p,
            g,
            expect![[r#"error: Cannot run the container as user "bad": no user "bad" in the image's /etc/passwd"#]],
        );
    }

    #[test]
    fn env_merge_puts_the_spec_on_top_and_defaults_path() {
        let merged = merge_env(
            &strings(&["PATH=/image/bin", "LANG=C", "EMPTY=", "LANG=C.UTF-8"]),
            &[("LANG".to_owned(), "de_DE".to_owned()), ("NEW".to_owned(), "a=b c".to_owned())],
        );
        expect![[r#"["PATH=/image/bin", "LANG=de_DE", "EMPTY=", "NEW=a=b c"]"#]].assert_eq(&format!("{merged:?}"));
        let defaulted = merge_env(&strings(&["A=1"]), &[]);
        expect![[r#"["A=1", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]"#]]
            .assert_eq(&format!("{defaulted:?}"));
        let spec_path = merge_env(&[], &[("PATH".to_owned(), "/opt".to_owned())]);
        assert_eq!(spec_path, strings(&["PATH=/opt"]));
    }

    #[test]
    fn argv_is_entrypoint_then_args_or_cmd() {
        let (entrypoint, cmd) = (strings(&["/bin/app", "--flag"]), strings(&["serve", "8080"]));
        assert_eq!(combine_argv(&entrypoint, &cmd, None), strings(&["/bin/app", "--flag", "serve", "8080"]));
        assert_eq!(
            combine_argv(&entrypoint, &cmd, Some(&strings(&["check"]))),
            strings(&["/bin/app", "--flag", "check"])
        );
        assert_eq!(combine_argv(&[], &cmd, None), cmd);
        assert_eq!(combine_argv(&entrypoint, &cmd, Some(&[])), entrypoint, "empty args replace cmd too");
    }

    #[test]
    fn program_env_adds_home_and_path_comes_from_env() {
        let mut config = ContainerConfig::new(1, strings(&["sh"]));
        let user = resolve_user("app", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!(config.program_env(&user, None), strings(&["HOME=/home/app"]));
        assert_eq!(config.program_env(&user, Some("web")), strings(&["HOME=/home/app", "HOSTNAME=web"]));
        assert_eq!(config.path(), DEFAULT_PATH);
        config.env = strings(&["HOME=/x", "PATH=/a:/b", "HOSTNAME=mine"]);
        assert_eq!(config.program_env(&user, Some("web")), strings(&["HOME=/x", "PATH=/a:/b", "HOSTNAME=mine"]));
        assert_eq!(config.path(), "/a:/b");
    }

    #[test]
    fn path_lookup_of_argv0() {
        let exists = |path: &str| ["/usr/bin/sh", "/bin/sh", "/opt/tool"].contains(&path);
        assert_eq!(find_in_path("sh", "/usr/local/bin:/usr/bin:/bin", exists).as_deref(), Some("/usr/bin/sh"));
        assert_eq!(find_in_path("sh", "/bin/:/usr/bin", exists).as_deref(), Some("/bin/sh"));
        assert_eq!(find_in_path("tool", "/usr/bin", exists), None);
        assert_eq!(find_in_path("./run", "/usr/bin", exists).as_deref(), Some("./run"));
        assert_eq!(find_in_path("/nowhere/x", "", exists).as_deref(), Some("/nowhere/x"));
    }

    #[test]
    fn overlay_options_list_the_top_layer_first() {
        expect!["lowerdir=/run/kiln/layers/2:/run/kiln/layers/1:/run/kiln/layers/0,upperdir=/run/kiln/upper/upper,workdir=/run/kiln/upper/work"]
            .assert_eq(&overlay_options(
                &strings(&["/run/kiln/layers/0", "/run/kiln/layers/1", "/run/kiln/layers/2"]),
                "/run/kiln/upper/upper",
                "/run/kiln/upper/work",
            ));
        expect![r"lowerdir=/a\:b\,c\\d,upperdir=/u,workdir=/w"].assert_eq(&overlay_options(
            &strings(&[r"/a:b,c\d"]),
            "/u",
            "/w",
        ));
    }

    #[test]
    fn etc_files_for_the_vm() {
        let address: IpAddr = "10.0.2.15".parse().unwrap();
        expect![[r#"
            127.0.0.1	localhost
            ::1	localhost ip6-localhost ip6-loopback
            fe00::0	ip6-localnet
            ff00::0	ip6-mcastprefix
            ff02::1	ip6-allnodes
            ff02::2	ip6-allrouters
            10.0.2.15	web-1
        "#]]
        .assert_eq(&hosts_file(Some("web-1"), Some(address)));
        assert!(hosts_file(Some("web-1"), None).ends_with("127.0.1.1\tweb-1\n"));
        assert!(hosts_file(None, Some(address)).ends_with("ff02::2\tip6-allrouters\n"));
        assert_eq!(hostname_file(Some("web-1")), "web-1\n");
        assert_eq!(hostname_file(None), "");
        let servers: Vec<IpAddr> = vec!["10.0.2.3".parse().unwrap(), "fd00::1".parse().unwrap()];
        assert_eq!(resolv_conf(&servers), "nameserver 10.0.2.3\nnameserver fd00::1\n");
        assert_eq!(resolv_conf(&[]), "# kiln: no name server configured for this VM\n");
    }

    fn check_parse(text: &str, expected: Expect) {
        let actual = match ContainerConfig::parse(text) {
            Ok(config) => format!("{config:?}"),
            Err(err) => format!("error: {err}"),
        };
        expected.assert_eq(&actual);
    }

    #[test]
    fn config_text_and_its_errors() {
        let mut config = ContainerConfig::new(2, strings(&["/bin/sh", "-c", "echo \"hi there\"\n\\done"]));
        config.env = strings(&["PATH=/bin", "MSG=a b\tc"]);
        config.workdir = "/work dir".to_owned();
        config.user = "app:extra".to_owned();
        config.upper = UpperKind::DataDisk { dir: ".kiln-upper/web".to_owned() };
        config.hostname = Some("web-1".to_owned());
        config.nameservers = vec!["10.0.2.3".parse().unwrap()];
        config.files = vec![FilesMount { name: "config".to_owned(), path: "/etc/app".to_owned() }];
        config.stop_signal = StopSignal::parse("SIGQUIT").unwrap();
        let text = config.to_text().unwrap();
        expect![[r#"
            kiln-container 1
            layers 2
            arg /bin/sh
            arg -c
            arg echo\x20"hi\x20there"\x0a\\done
            env PATH=/bin
            env MSG=a\x20b\x09c
            workdir /work\x20dir
            user app:extra
            upper data .kiln-upper/web
            hostname web-1
            nameserver 10.0.2.3
            files config /etc/app
            stopsignal 3
        "#]]
        .assert_eq(&text);
        assert_eq!(ContainerConfig::parse(&text).unwrap(), config);
        // An older kiln's config, without the line: SIGTERM.
        let old = ContainerConfig::parse("kiln-container 1\nlayers 1\narg x\n").unwrap();
        assert_eq!(old.stop_signal, StopSignal::TERM);
        assert!(!old.to_text().unwrap().contains("stopsignal"), "the default is not written");

        check_parse("", expect!["error: Invalid container config, line 1: does not start with `kiln-container 1`"]);
        check_parse(
            "kiln-container 2\n",
            expect![[
                r#"error: Invalid container config, line 1: "kiln-container 2": only version 1 is understood (a newer kiln wrote it?)"#
            ]],
        );
        check_parse("kiln-container 1\narg x\n", expect!["error: Invalid container config: no `layers` line"]);
        check_parse(
            "kiln-container 1\nlayers 1\n",
            expect![
                "error: Invalid container config: no program to run: the image has no entrypoint or cmd and the spec no args"
            ],
        );
        check_parse(
            "kiln-container 1\nlayers 0\narg x\n",
            expect!["error: Invalid container config: 0 layers: a container has 1 to 32"],
        );
        check_parse(
            "kiln-container 1\nlayers 1\nlayers 1\n",
            expect!["error: Invalid container config, line 3: a second `layers` line"],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nsecret y\n",
            expect![[r#"error: Invalid container config, line 4: unknown key "secret""#]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg a b\n",
            expect!["error: Invalid container config, line 3: `arg` takes one field, not 2"],
        );
        // A raw NUL (the fuzz target feeds from_utf8_lossy text) in any field.
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nupper data a\0b\n",
            expect![[r#"error: Invalid container config: "a\0b" holds a NUL byte"#]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nfiles c\0 /etc/c\n",
            expect![[r#"error: Invalid container config: "c\0" holds a NUL byte"#]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nfiles c /etc/\0\n",
            expect![[r#"error: Invalid container config: "/etc/\0" holds a NUL byte"#]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg a\\x00\n",
            expect![[r#"error: Invalid container config, line 3: "a\\x00" holds a NUL byte"#]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg a\\q\n",
            expect![[r#"error: Invalid container config, line 3: bad escape in "a\\q" (only `\\` and `\xNN`)"#]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nworkdir rel\n",
            expect![[r#"error: Invalid container config: workdir "rel" must be an absolute path without `..`"#]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nupper data ../escape\n",
            expect![[
                r#"error: Invalid container config: upper directory "../escape" must be a relative path inside the data disk"#
            ]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nfiles a/b /x\n",
            expect![[r#"error: Invalid container config: files tree name "a/b" must be one path component"#]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nfiles a /\n",
            expect![[r#"error: Invalid container config: files tree "a" cannot be mounted over the container's /"#]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nenv NOVALUE\n",
            expect![[r#"error: Invalid container config: env entry "NOVALUE" is not NAME=VALUE"#]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nhostname bad_name\n",
            expect![[
                r#"error: Invalid container config: hostname "bad_name" is not a host name (letters, digits, `-`, `.`)"#
            ]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nstopsignal QUIT\n",
            expect![[r#"error: Invalid container config, line 4: "QUIT" is not a signal number"#]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nstopsignal 03\n",
            expect![[r#"error: Invalid container config, line 4: "03" is not a signal number"#]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nstopsignal 65\n",
            expect![[
                r#"error: Invalid container config, line 4: Stop signal "65" is not a signal: a name (SIGQUIT, QUIT, quit, SIGRTMIN+3) or a number from 1 to 64"#
            ]],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nstopsignal 3\nstopsignal 3\n",
            expect!["error: Invalid container config, line 5: a second `stopsignal` line"],
        );
        check_parse(
            "kiln-container 1\nlayers 1\narg x\nnameserver dns\n",
            expect![[r#"error: Invalid container config, line 4: "dns" is not an IP address"#]],
        );
    }

    fn check_signal(text: &str, expected: Expect) {
        let actual = match StopSignal::parse(text) {
            Ok(signal) => format!("{} {signal}", signal.number()),
            Err(err) => format!("error: {err}"),
        };
        expected.assert_eq(&actual);
    }

    #[test]
    fn stop_signals_are_read_as_docker_reads_them_and_bad_ones_refused() {
        check_signal("SIGQUIT", expect!["3 SIGQUIT"]);
        check_signal("QUIT", expect!["3 SIGQUIT"]);
        check_signal("sigint", expect!["2 SIGINT"]);
        check_signal("Term", expect!["15 SIGTERM"]);
        check_signal("SIGWINCH", expect!["28 SIGWINCH"]);
        check_signal("IOT", expect!["6 SIGABRT"]);
        check_signal("SIGCLD", expect!["17 SIGCHLD"]);
        check_signal("9", expect!["9 SIGKILL"]);
        check_signal("10", expect!["10 SIGUSR1"]);
        check_signal("32", expect!["32 signal 32"]);
        check_signal("SIGRTMIN", expect!["34 SIGRTMIN"]);
        check_signal("RTMIN+3", expect!["37 SIGRTMIN+3"]);
        check_signal("SIGRTMAX-1", expect!["63 SIGRTMAX-1"]);
        check_signal("64", expect!["64 SIGRTMAX"]);
        check_signal("50", expect!["50 SIGRTMAX-14"]);
        let refused = [
            "",
            "0",
            "65",
            "300",
            "-3",
            "+3",
            "SIG",
            "SIGFOO",
            "SIG QUIT",
            " QUIT",
            "RTMIN+16",
            "RTMAX-15",
            "RTMIN+03",
            "RTMIN-1",
            "SIGSIGQUIT",
        ];
        for text in refused {
            let err = StopSignal::parse(text).expect_err(text).to_string();
            assert!(err.contains(&format!("{text:?}")), "the error names the value {text:?}: {err}");
        }
        check_signal(
            "SIGFOO",
            expect![[
                r#"error: Stop signal "SIGFOO" is not a signal: a name (SIGQUIT, QUIT, quit, SIGRTMIN+3) or a number from 1 to 64"#
            ]],
        );
        // Every number's name reads back as that number.
        for number in 1..=64u8 {
            let signal = StopSignal::from_number(number).unwrap();
            let name = signal.to_string();
            if !name.starts_with("signal ") {
                assert_eq!(StopSignal::parse(&name).unwrap(), signal, "{name}");
            }
        }
    }

    /// Any char, NUL included: validate must refuse what cannot round-trip.
    fn any_text() -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..12).prop_map(|chars| chars.into_iter().collect())
    }

    fn any_config() -> impl Strategy<Value = ContainerConfig> {
        (
            1..=MAX_LAYERS,
            proptest::collection::vec(any_text(), 0..4),
            proptest::collection::vec(("[A-Za-z_][A-Za-z0-9_]{0,6}", any_text()), 0..4),
            "(/[^/]{1,5}){0,3}",
            "[a-z0-9:]{0,10}",
            proptest::option::of("[^/]{1,8}(/[^/]{1,4}){0,2}"),
            proptest::option::of("[a-z0-9][a-z0-9.-]{0,10}"),
            proptest::collection::vec(any::<std::net::Ipv4Addr>(), 0..3),
            proptest::collection::vec(("[^/]{1,6}", "(/[^/]{1,5}){1,3}"), 0..3),
            1..=64u8,
        )
            .prop_map(|(layers, rest, env, workdir, user, upper, hostname, servers, files, signal)| {
                let mut config = ContainerConfig::new(layers, [vec!["p".to_owned()], rest].concat());
                config.env = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
                config.workdir = if workdir.is_empty() { "/".to_owned() } else { workdir };
                config.user = user;
                config.upper = upper.map_or(UpperKind::Tmpfs, |dir| UpperKind::DataDisk { dir });
                config.hostname = hostname;
                config.nameservers = servers.into_iter().map(IpAddr::V4).collect();
                config.files = files.into_iter().map(|(name, path)| FilesMount { name, path }).collect();
                config.stop_signal = StopSignal::from_number(signal).unwrap();
                config
            })
            .prop_filter("valid", |config| config.validate().is_ok())
    }

    proptest! {
        #[test]
        fn any_config_round_trips_through_its_text(config in any_config()) {
            let text = config.to_text()?;
            prop_assert_eq!(text.lines().count(), text.matches('\n').count(), "one entry per line");
            prop_assert_eq!(ContainerConfig::parse(&text)?, config);
        }

        /// The fuzz target's property (`guest_readers`): what parses writes
        /// back to text that parses to the same config; nothing panics.
        #[test]
        fn what_parses_round_trips(
            text in "kiln-container 1\nlayers [0-9]\n((layers|arg|env|user|upper|files|hostname|nameserver|workdir|stopsignal) [^\n]{0,20}\n){0,5}",
            user in "[a-z0-9:]{0,8}",
        ) {
            if let Ok(config) = ContainerConfig::parse(&text) {
                prop_assert_eq!(ContainerConfig::parse(&config.to_text()?)?, config);
            }
            let _ = resolve_user(&user, Some(&text), Some(&text));
        }
    }
}
