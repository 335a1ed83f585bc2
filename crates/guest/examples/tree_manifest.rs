//! tree-manifest: one line per entry of a directory tree, sorted by path,
//! so that a tree on the host and the same tree read back by another
//! kernel (a guest mounting a kiln ext4 image) can be compared line by
//! line. `cargo xtask guest` builds it static (`target/guest/tree-manifest`);
//! the host runs that binary directly, the boot tests run it as the service.
//!
//! `tree-manifest DIR` prints DIR's manifest. Entries are read with
//! `lstat` (links never followed). A line is the path (`.` for DIR itself,
//! bytes outside printable ASCII, space, `\` and `=` written `\xNN`), the
//! type, then `mode` (octal, with setuid/setgid/sticky), `uid`, `gid`,
//! `nlink`, `size`, `mtime` (seconds.nanoseconds), and by type: `sha256`
//! of a file's data ranges with `data=START-END,...` when the file has
//! holes (holes read as zeros, so the ranges and their digest are the whole
//! content, and a 5 GiB sparse file needs no 5 GiB hash), `hardlink=` the
//! first path of a file with more than one link, `target=` of a symlink,
//! `rdev=MAJOR:MINOR` of a device; then `xattrs=name=HEX;...` sorted. The
//! last line is `# N entries`, so a cut-short manifest is never taken for
//! a whole one.
//!
//! Options, acted on in order (for the guest, where this is the service):
//! `--mount SERIAL DIR ro|rw` mounts the virtio disk with that serial
//! (ext4); `--manifest DIR TO` writes DIR's manifest to TO: `-` is stdout,
//! `disk:SERIAL` the raw virtio disk with that serial, followed by a NUL;
//! `--write-files DIR COUNT` writes COUNT files of made-up content and
//! sizes, then syncs; `--write-files-fsync DIR COUNT` fsyncs each file and
//! DIR and prints `tree-manifest: fsynced N` after each; `--umount DIR`;
//! `--skip PATH` leaves PATH (relative to the listed DIR) and everything
//! under it out of the manifests that follow (a container's `/proc`).
//! Each step says what it did on one line starting `tree-manifest: `.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process;

use sha2::{Digest, Sha256};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(err) = run(&args) {
        eprintln!("tree-manifest: error: {err}");
        println!("tree-manifest: FAILED: {err}");
        process::exit(70);
    }
}

fn run(args: &[String]) -> io::Result<()> {
    match args {
        [dir] if !dir.starts_with("--") => return write_manifest(Path::new(dir), "-", &[]),
        [] => return Err(other("usage: tree-manifest DIR, or steps (see the source)".into())),
        _ => {}
    }
    let mut rest = args.iter();
    let mut skip: Vec<Vec<u8>> = Vec::new();
    while let Some(option) = rest.next() {
        let mut value = || rest.next().cloned().ok_or_else(|| other(format!("{option} needs more values")));
        match option.as_str() {
            "--mount" => {
                let (serial, dir, access) = (value()?, value()?, value()?);
                mount(&serial, &dir, &access)?;
            }
            "--manifest" => {
                let (dir, to) = (value()?, value()?);
                write_manifest(Path::new(&dir), &to, &skip)?;
            }
            "--skip" => {
                let path = value()?;
                skip.push(path.trim_matches('/').as_bytes().to_vec());
            }
            "--write-files" => {
                let (dir, count) = (value()?, value()?);
                write_files(Path::new(&dir), count_of(&count)?, false)?;
            }
            "--write-files-fsync" => {
                let (dir, count) = (value()?, value()?);
                write_files(Path::new(&dir), count_of(&count)?, true)?;
            }
            "--umount" => {
                let dir = value()?;
                // SAFETY: the path is a valid NUL-terminated string.
                check(unsafe { libc::umount(cstring(OsStr::new(&dir))?.as_ptr()) }, || format!("umount {dir}"))?;
                println!("tree-manifest: unmounted {dir}");
            }
            _ => return Err(other(format!("unknown option {option:?}"))),
        }
    }
    Ok(())
}

fn count_of(text: &str) -> io::Result<u32> {
    text.parse().map_err(|_| other(format!("{text:?} is not a count")))
}

fn other(message: String) -> io::Error {
    io::Error::other(message)
}

fn cstring(text: &OsStr) -> io::Result<CString> {
    CString::new(text.as_bytes()).map_err(|_| other(format!("{text:?} holds a NUL byte")))
}

fn check(result: libc::c_int, what: impl FnOnce() -> String) -> io::Result<libc::c_int> {
    if result < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(err.kind(), format!("{}: {err}", what())));
    }
    Ok(result)
}

/// The `/dev/vd*` disk whose virtio serial is `serial`.
fn disk_with_serial(serial: &str) -> io::Result<PathBuf> {
    for entry in fs::read_dir("/sys/block")? {
        let name = entry?.file_name();
        let found = fs::read_to_string(Path::new("/sys/block").join(&name).join("serial")).unwrap_or_default();
        if found.trim() == serial {
            return Ok(Path::new("/dev").join(name));
        }
    }
    Err(other(format!("no disk has the serial {serial:?}")))
}

fn mount(serial: &str, dir: &str, access: &str) -> io::Result<()> {
    let flags = match access {
        "ro" => libc::MS_RDONLY,
        "rw" => 0,
        _ => return Err(other(format!("mount access is ro or rw, not {access:?}"))),
    };
    let device = disk_with_serial(serial)?;
    fs::create_dir_all(dir)?;
    let (source, target) = (cstring(device.as_os_str())?, cstring(OsStr::new(dir))?);
    // SAFETY: every pointer is a valid NUL-terminated string or null.
    let result = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), c"ext4".as_ptr(), flags, std::ptr::null()) };
    check(result, || format!("mount {} (ext4, {access}) on {dir}", device.display()))?;
    println!("tree-manifest: mounted {} on {dir} {access}", device.display());
    Ok(())
}

/// What one `lstat` and a read give about an entry.
struct Entry {
    path: Vec<u8>,
    meta: fs::Metadata,
    /// Type-specific fields, already formatted.
    detail: String,
}

fn write_manifest(root: &Path, to: &str, skip: &[Vec<u8>]) -> io::Result<()> {
    let mut entries = Vec::new();
    walk(root, Vec::new(), skip, &mut entries)?;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    // The first path of each multiply-linked inode: what its other names link to.
    let mut first_name: BTreeMap<(u64, u64), Vec<u8>> = BTreeMap::new();
    let mut text = String::new();
    for entry in &entries {
        let meta = &entry.meta;
        let _ = write!(
            text,
            "{} {} mode={:04o} uid={} gid={} nlink={} size={} mtime={}.{:09}",
            escape(&entry.path),
            kind(meta.file_type()),
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            meta.nlink(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec()
        );
        text.push_str(&entry.detail);
        if meta.is_file() && meta.nlink() > 1 {
            let first = first_name.entry((meta.dev(), meta.ino())).or_insert_with(|| entry.path.clone());
            let _ = write!(text, " hardlink={}", escape(first));
        }
        let full = if entry.path == b"." { root.to_path_buf() } else { root.join(OsStr::from_bytes(&entry.path)) };
        text.push_str(&xattrs(&full)?);
        text.push('\n');
    }
    let _ = writeln!(text, "# {} entries", entries.len());
    if to == "-" {
        return io::stdout().lock().write_all(text.as_bytes());
    }
    let Some(serial) = to.strip_prefix("disk:") else {
        return Err(other(format!("a manifest goes to - or disk:SERIAL, not {to:?}")));
    };
    let device = disk_with_serial(serial)?;
    let mut disk = OpenOptions::new().write(true).open(&device)?;
    disk.write_all(text.as_bytes())?;
    disk.write_all(&[0])?;
    disk.sync_all()?;
    println!(
        "tree-manifest: manifest of {} ({} entries) written to {}",
        root.display(),
        entries.len(),
        device.display()
    );
    Ok(())
}

fn walk(root: &Path, relative: Vec<u8>, skip: &[Vec<u8>], entries: &mut Vec<Entry>) -> io::Result<()> {
    if skip.contains(&relative) {
        return Ok(());
    }
    let full = if relative.is_empty() { root.to_path_buf() } else { root.join(OsStr::from_bytes(&relative)) };
    let meta = fs::symlink_metadata(&full).map_err(|err| io::Error::new(err.kind(), format!("{full:?}: {err}")))?;
    let file_type = meta.file_type();
    let detail = if file_type.is_file() {
        file_detail(&full, meta.size())?
    } else if file_type.is_symlink() {
        format!(" target={}", escape(fs::read_link(&full)?.as_os_str().as_bytes()))
    } else if file_type.is_block_device() || file_type.is_char_device() {
        let rdev = meta.rdev();
        format!(" rdev={}:{}", libc::major(rdev), libc::minor(rdev))
    } else {
        String::new()
    };
    let path = if relative.is_empty() { b".".to_vec() } else { relative.clone() };
    entries.push(Entry { path, meta, detail });
    if file_type.is_dir() {
        for child in fs::read_dir(&full)? {
            let name = child?.file_name();
            let mut path = relative.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name.as_bytes());
            walk(root, path, skip, entries)?;
        }
    }
    Ok(())
}

/// ` sha256=...` over the file's data ranges, and ` data=...` when they are not the whole file.
fn file_detail(path: &Path, size: u64) -> io::Result<String> {
    let mut file = File::open(path)?;
    let ranges = data_ranges(&file, size)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    for &(start, end) in &ranges {
        file.seek(SeekFrom::Start(start))?;
        let mut left = end - start;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let got = file.read(&mut buf[..want])?;
            if got == 0 {
                return Err(other(format!("{}: shorter than its data ranges", path.display())));
            }
            hasher.update(&buf[..got]);
            left -= got as u64;
        }
    }
    let mut detail = String::from(" sha256=");
    for byte in hasher.finalize() {
        let _ = write!(detail, "{byte:02x}");
    }
    if ranges != [(0, size)] && size > 0 {
        let listed: Vec<String> = ranges.iter().map(|(start, end)| format!("{start}-{end}")).collect();
        let _ = write!(detail, " data={}", listed.join(","));
    }
    Ok(detail)
}

/// Where the file holds data (`SEEK_DATA`/`SEEK_HOLE`); the rest reads as zeros.
fn data_ranges(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let seek = |offset: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let offset = i64::try_from(offset).map_err(|_| other(format!("offset {offset} is past i64")))?;
        // SAFETY: lseek on an open descriptor; no memory is touched.
        let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        if found >= 0 {
            return Ok(Some(found as u64));
        }
        let err = io::Error::last_os_error();
        // ENXIO from SEEK_DATA: only a hole is left.
        if err.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(err) }
    };
    let mut ranges = Vec::new();
    let mut offset = 0;
    while offset < size {
        let Some(start) = seek(offset, libc::SEEK_DATA)? else { break };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if end <= start {
            break;
        }
        ranges.push((start, end));
        offset = end;
    }
    Ok(ranges)
}

/// ` xattrs=name=HEX;...` sorted by name, or nothing.
fn xattrs(path: &Path) -> io::Result<String> {
    let name = cstring(path.as_os_str())?;
    let mut list = vec![0_u8; 64 * 1024];
    // SAFETY: `list` is a writable buffer of the length given.
    let len = unsafe { libc::llistxattr(name.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    let len = usize::try_from(len).map_err(|_| io::Error::last_os_error())?;
    let mut names: Vec<&[u8]> = list[..len].split(|b| *b == 0).filter(|n| !n.is_empty()).collect();
    if names.is_empty() {
        return Ok(String::new());
    }
    names.sort();
    let mut fields = Vec::new();
    for attr in names {
        let attr_c = CString::new(attr).map_err(|_| other("xattr name with NUL".into()))?;
        let mut value = vec![0_u8; 64 * 1024];
        // SAFETY: both names are NUL-terminated; `value` is writable for its length.
        let got = unsafe { libc::lgetxattr(name.as_ptr(), attr_c.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        let got = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
        let hex: String = value[..got].iter().fold(String::new(), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        });
        fields.push(format!("{}={hex}", escape(attr)));
    }
    Ok(format!(" xattrs={}", fields.join(";")))
}

/// A test of a file type and the name the manifest gives it.
type Kind = (fn(&fs::FileType) -> bool, &'static str);

fn kind(file_type: fs::FileType) -> &'static str {
    let kinds: [Kind; 7] = [
        (fs::FileType::is_dir, "dir"),
        (fs::FileType::is_file, "file"),
        (fs::FileType::is_symlink, "symlink"),
        (FileTypeExt::is_char_device, "char"),
        (FileTypeExt::is_block_device, "block"),
        (FileTypeExt::is_fifo, "fifo"),
        (FileTypeExt::is_socket, "socket"),
    ];
    kinds.iter().find(|(is, _)| is(&file_type)).map_or("unknown", |(_, name)| name)
}

/// Printable ASCII as is; space, `\`, `=`, `;` and everything else as `\xNN`.
fn escape(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    for &byte in bytes {
        if byte.is_ascii_graphic() && !matches!(byte, b'\\' | b'=' | b';') {
            text.push(byte as char);
        } else {
            let _ = write!(text, "\\x{byte:02x}");
        }
    }
    text
}

/// The size of file `index` of `--write-files`: around block boundaries,
/// small and large, 0 among them.
fn made_up_size(index: u32) -> usize {
    const EDGES: [usize; 8] = [0, 1, 4095, 4096, 4097, 8191, 8192, 65_537];
    match index % 10 {
        0..=7 => EDGES[(index % 8) as usize] + (index as usize / 200) * 4096,
        8 => (index as usize * 7919) % 20_000,
        _ => 100_000 + (index as usize * 104_729) % 300_000,
    }
}

/// The bytes of file `index`: a xorshift stream seeded by the index, so no
/// two files share content.
fn made_up_content(index: u32) -> Vec<u8> {
    let mut state = u64::from(index) * 0x9E37_79B9_7F4A_7C15 + 1;
    let mut bytes = Vec::with_capacity(made_up_size(index) + 8);
    while bytes.len() < made_up_size(index) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(made_up_size(index));
    bytes
}

fn write_files(dir: &Path, count: u32, fsync_each: bool) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let dir_handle = File::open(dir)?;
    for index in 0..count {
        let path = dir.join(format!("f{index:05}"));
        let named = |err: io::Error| io::Error::new(err.kind(), format!("{}: {err}", path.display()));
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o644).open(&path).map_err(named)?;
        file.set_permissions(fs::Permissions::from_mode(0o644)).map_err(named)?;
        file.write_all(&made_up_content(index)).map_err(named)?;
        if fsync_each {
            file.sync_all().map_err(named)?;
            dir_handle.sync_all()?;
            println!("tree-manifest: fsynced {}", index + 1);
        }
    }
    // SAFETY: syncfs on an open descriptor.
    check(unsafe { libc::syncfs(dir_handle.as_raw_fd()) }, || format!("syncfs {}", dir.display()))?;
    println!("tree-manifest: wrote {count} files in {}", dir.display());
    Ok(())
}
