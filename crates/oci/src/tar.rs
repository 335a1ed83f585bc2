//! A streaming reader of layer tars: ustar, GNU (`L`/`K` long names,
//! base-256 numbers) and PAX (`x` and `g` headers), over any `Read + Seek`.
//!
//! It is our own, small and fuzzed, rather than a tar crate: tar parsers
//! are a steady source of CVEs (tar-rs CVE-2026-33055, erofs-utils #29),
//! and a layer only needs entries' metadata and where their data sits.
//! File data is never read: the reader seeks over it and reports its byte
//! offset in the stream, which, for a cached uncompressed layer, is where
//! the file's bytes are on the host. Every header is checked (checksum,
//! octal and base-256 fields, PAX records), and a size that runs past the
//! end of the stream is an error, not a short file.

use std::io::{self, BufReader, Read, Seek, SeekFrom};

/// Bytes in a tar block: headers and data are padded to it.
const BLOCK: u64 = 512;
/// The longest path (and link target) accepted: Linux's `PATH_MAX`.
pub(crate) const MAX_PATH_BYTES: usize = 4095;
/// The most bytes of PAX records or GNU long names one entry may carry,
/// so that a hostile header cannot make the reader hold much memory
/// (xattrs, such as file capabilities or SELinux labels, are small).
const MAX_EXTENSION_BYTES: u64 = 1 << 20;
/// xattrs one entry may carry: parsing stays linear enough, and an ext4
/// inode holds far fewer.
const MAX_XATTRS: usize = 1024;

/// One entry of a layer tar, with its path normalized (relative, no `.`
/// or empty components, no trailing `/`; the root directory is `""`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TarEntry {
    pub(crate) path: String,
    pub(crate) kind: EntryKind,
    /// Permission bits with setuid, setgid and sticky (07777).
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: i64,
    pub(crate) mtime_nsec: u32,
    /// `SCHILY.xattr.*` records, in the order they came.
    pub(crate) xattrs: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EntryKind {
    /// A regular file of `size` bytes whose data starts at byte `offset`
    /// of the stream.
    File {
        size: u64,
        offset: u64,
    },
    Dir,
    Symlink {
        target: String,
    },
    /// Another name for the entry at `target` (a normalized path).
    Hardlink {
        target: String,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// Why a tar cannot be read: the stream failed, or an entry (named as far
/// as it could be read) is malformed or refused.
#[derive(Debug)]
pub(crate) enum TarError {
    Io(io::Error),
    Bad { entry: String, reason: String },
}

impl From<io::Error> for TarError {
    fn from(error: io::Error) -> TarError {
        TarError::Io(error)
    }
}

fn bad(entry: impl Into<String>, reason: impl Into<String>) -> TarError {
    TarError::Bad { entry: entry.into(), reason: reason.into() }
}

/// PAX records that apply to an entry: from its own `x` header. Global
/// `g` headers are checked and then ignored, as Go's `archive/tar` users
/// (containerd, umoci) ignore them, so a layer gives the files they give.
/// An empty value deletes the key (POSIX): "the header's own field".
#[derive(Debug, Clone, Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u32>,
    gid: Option<u32>,
    mtime: Option<(i64, u32)>,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Reads entries one after another; see the module doc.
pub(crate) struct TarReader<R> {
    input: BufReader<R>,
    /// Where `input` stands in the stream.
    position: u64,
    /// The stream's length, to check sizes before seeking over data.
    len: u64,
    finished: bool,
}

impl<R: Read + Seek> TarReader<R> {
    /// A reader of the tar that `input` holds from its current position to its end.
    pub(crate) fn new(mut input: R) -> io::Result<TarReader<R>> {
        let start = input.stream_position()?;
        let end = input.seek(SeekFrom::End(0))?;
        input.seek(SeekFrom::Start(start))?;
        Ok(TarReader {
            input: BufReader::with_capacity(64 << 10, input),
            position: 0,
            len: end.saturating_sub(start),
            finished: false,
        })
    }

    /// The next entry, or `None` at the end of the archive (two zero
    /// blocks, one zero block then the end of the stream, or the end of
    /// the stream where a header would start, as Go's reader allows).
    pub(crate) fn next_entry(&mut self) -> Result<Option<TarEntry>, TarError> {
        if self.finished {
            return Ok(None);
        }
        let mut local = Pax::default();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut extensions = 0u64;
        loop {
            let at = self.position;
            let Some(header) = self.read_header()? else {
                self.finished = true;
                if extensions > 0 {
                    return Err(bad(format!("(the header at byte {at})"), "the archive ends after an extended header"));
                }
                return Ok(None);
            };
            let raw_name = header_name(&header);
            let shown_so_far = display_name(long_name.as_deref().or(local.path.as_deref()).unwrap_or(&raw_name));
            let named = || shown_so_far.clone();
            check_checksum(&header).map_err(|reason| bad(named(), reason))?;
            let typeflag = header[156];
            let size = number(&header[124..136]).map_err(|reason| bad(named(), format!("size: {reason}")))?;
            let size = u64::try_from(size).map_err(|_| bad(named(), "a negative size"))?;
            let data_offset = self.position;
            match typeflag {
                b'x' | b'g' | b'L' | b'K' => {
                    extensions += size;
                    if extensions > MAX_EXTENSION_BYTES {
                        return Err(bad(named(), format!("more than {MAX_EXTENSION_BYTES} bytes of extended headers")));
                    }
                    let body = self.read_body(size).map_err(|e| self.short(e, named(), size))?;
                    match typeflag {
                        b'x' => parse_pax(&body, &mut local).map_err(|reason| bad(named(), reason))?,
                        b'g' => parse_pax(&body, &mut Pax::default()).map_err(|reason| bad(named(), reason))?,
                        b'L' => long_name = Some(until_nul(&body).to_vec()),
                        _ => long_link = Some(until_nul(&body).to_vec()),
                    }
                    continue;
                }
                _ => {}
            }
            // The entry itself: PAX over GNU over the header's own fields.
            let pax = local;
            let name = pax.path.clone().or(long_name.take()).unwrap_or(raw_name);
            let link =
                pax.linkpath.clone().or(long_link.take()).unwrap_or_else(|| until_nul(&header[157..257]).to_vec());
            let shown = display_name(&name);
            let size = pax.size.unwrap_or(size);
            let field = |range: std::ops::Range<usize>, what: &str| -> Result<i64, TarError> {
                number(&header[range]).map_err(|reason| bad(shown.clone(), format!("{what}: {reason}")))
            };
            let id = |value: i64, what: &str| {
                u32::try_from(value).map_err(|_| bad(shown.clone(), format!("{what} {value} is not a 32-bit id")))
            };
            let mode = field(100..108, "mode")?;
            let uid = match pax.uid {
                Some(uid) => uid,
                None => id(field(108..116, "uid")?, "uid")?,
            };
            let gid = match pax.gid {
                Some(gid) => gid,
                None => id(field(116..124, "gid")?, "gid")?,
            };
            let (mtime, mtime_nsec) = match pax.mtime {
                Some(mtime) => mtime,
                None => (field(136..148, "mtime")?, 0),
            };
            let path = normalize(&name).map_err(|reason| bad(shown.clone(), reason))?;
            let device = |kind: &str| -> Result<(u32, u32), TarError> {
                let major = id(field(329..337, &format!("{kind} major"))?, "device major")?;
                let minor = id(field(337..345, &format!("{kind} minor"))?, "device minor")?;
                Ok((major, minor))
            };
            let kind = match typeflag {
                // Old archives mark directories by a trailing slash; Go reads that for '\0' only.
                b'\0' if name.ends_with(b"/") => EntryKind::Dir,
                b'0' | b'\0' | b'7' => EntryKind::File { size, offset: data_offset },
                b'1' => {
                    let target =
                        normalize(&link).map_err(|reason| bad(shown.clone(), format!("hard link target: {reason}")))?;
                    EntryKind::Hardlink { target }
                }
                b'2' => {
                    let target = String::from_utf8(link)
                        .map_err(|_| bad(shown.clone(), "a symlink target that is not UTF-8"))?;
                    if target.is_empty() || target.len() > MAX_PATH_BYTES || target.contains('\0') {
                        return Err(bad(shown, format!("a symlink target is 1 to {MAX_PATH_BYTES} bytes with no NUL")));
                    }
                    EntryKind::Symlink { target }
                }
                b'3' => {
                    let (major, minor) = device("char device")?;
                    EntryKind::CharDevice { major, minor }
                }
                b'4' => {
                    let (major, minor) = device("block device")?;
                    EntryKind::BlockDevice { major, minor }
                }
                b'5' => EntryKind::Dir,
                b'6' => EntryKind::Fifo,
                b'S' => return Err(bad(shown, "GNU sparse files are not supported")),
                other => return Err(bad(shown, format!("unsupported entry type {:?}", char::from(other)))),
            };
            // Only regular files carry data: links, devices, directories
            // and fifos are header-only whatever their size field says, as
            // Go's reader (and so containerd and umoci) takes them.
            if let EntryKind::File { .. } = kind {
                self.skip(size).map_err(|e| self.short(e, shown.clone(), size))?;
            }
            let mode = u32::try_from(mode).map_err(|_| bad(shown.clone(), "a negative mode"))? & 0o7777;
            return Ok(Some(TarEntry { path, kind, mode, uid, gid, mtime, mtime_nsec, xattrs: pax.xattrs }));
        }
    }

    /// A failure reading an entry's data: past the end is a size that lies.
    fn short(&self, error: TarError, entry: String, size: u64) -> TarError {
        match error {
            TarError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                bad(entry, format!("its size says {size} bytes but the archive ends first (at byte {})", self.len))
            }
            other => other,
        }
    }

    /// The next header block, or `None` at the end of the archive.
    fn read_header(&mut self) -> Result<Option<[u8; 512]>, TarError> {
        let mut header = [0u8; 512];
        if !self.read_block(&mut header)? {
            return Ok(None);
        }
        if header.iter().all(|&b| b == 0) {
            // The end marker: two zero blocks, or one and the end of the
            // stream. A header after one zero block is an error, as in Go's
            // reader, rather than entries silently left out.
            let at = self.position;
            if self.read_block(&mut header)? && header.iter().any(|&b| b != 0) {
                return Err(bad(format!("(the header at byte {at})"), "a header follows a zero block"));
            }
            return Ok(None);
        }
        Ok(Some(header))
    }

    /// Fills `block`: `false` at the end of the stream before its first
    /// byte, an error if it ends within.
    fn read_block(&mut self, block: &mut [u8; 512]) -> Result<bool, TarError> {
        let mut got = 0;
        while got < block.len() {
            match self.input.read(&mut block[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(bad(
                        format!("(the header at byte {})", self.position),
                        "the archive ends inside a header",
                    ));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.position += BLOCK;
        Ok(true)
    }

    /// Reads an extended header's `size` bytes (and its padding).
    fn read_body(&mut self, size: u64) -> Result<Vec<u8>, TarError> {
        self.check_room(size)?;
        let mut body = vec![0u8; size as usize];
        self.input.read_exact(&mut body)?;
        self.position += size;
        self.skip_padding(size)?;
        Ok(body)
    }

    /// Seeks over `size` bytes of data and the padding after them.
    fn skip(&mut self, size: u64) -> Result<(), TarError> {
        self.check_room(size)?;
        self.seek_forward(size)?;
        self.skip_padding(size)
    }

    fn skip_padding(&mut self, size: u64) -> Result<(), TarError> {
        let padding = size.next_multiple_of(BLOCK) - size;
        self.check_room(padding)?;
        self.seek_forward(padding)
    }

    /// `UnexpectedEof` if fewer than `bytes` are left in the stream.
    fn check_room(&self, bytes: u64) -> Result<(), TarError> {
        if self.position.checked_add(bytes).is_none_or(|end| end > self.len) {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        Ok(())
    }

    fn seek_forward(&mut self, bytes: u64) -> Result<(), TarError> {
        let step = i64::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        self.input.seek_relative(step)?;
        self.position += bytes;
        Ok(())
    }
}

/// Parses PAX records (`LEN KEY=VALUE\n`, LEN counting the whole record)
/// into `pax`.
fn parse_pax(mut body: &[u8], pax: &mut Pax) -> Result<(), String> {
    while !body.is_empty() {
        if body.iter().all(|&b| b == 0) {
            // Some writers pad the records with NULs.
            break;
        }
        let space = body.iter().position(|&b| b == b' ').ok_or("a PAX record without a length")?;
        let len: usize = std::str::from_utf8(&body[..space])
            .ok()
            .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse().ok())
            .ok_or("a PAX record length that is not a number")?;
        if len <= space + 1 || len > body.len() || body[len - 1] != b'\n' {
            return Err(format!("a PAX record of {len} bytes does not fit the header"));
        }
        let record = &body[space + 1..len - 1];
        body = &body[len..];
        let equals = record.iter().position(|&b| b == b'=').ok_or("a PAX record without '='")?;
        let (key, value) = (&record[..equals], &record[equals + 1..]);
        let key = std::str::from_utf8(key).map_err(|_| "a PAX key that is not UTF-8")?;
        let text = || std::str::from_utf8(value).map_err(|_| format!("PAX {key} is not UTF-8"));
        let empty = value.is_empty();
        match key {
            "path" => pax.path = (!empty).then(|| value.to_vec()),
            "linkpath" => pax.linkpath = (!empty).then(|| value.to_vec()),
            "size" => pax.size = if empty { None } else { Some(decimal(text()?, key)?) },
            "uid" => pax.uid = if empty { None } else { Some(id(text()?, key)?) },
            "gid" => pax.gid = if empty { None } else { Some(id(text()?, key)?) },
            "mtime" => pax.mtime = if empty { None } else { Some(pax_time(text()?)?) },
            _ if key.starts_with("SCHILY.xattr.") => {
                let name = &key["SCHILY.xattr.".len()..];
                if name.is_empty() {
                    return Err("an xattr record with no name".into());
                }
                pax.xattrs.retain(|(existing, _)| existing != name);
                // ext4 holds a few hundred at most (in the inode and one block).
                if pax.xattrs.len() >= MAX_XATTRS {
                    return Err(format!("more than {MAX_XATTRS} xattrs"));
                }
                pax.xattrs.push((name.to_owned(), value.to_vec()));
            }
            _ if key.starts_with("GNU.sparse.") => return Err("GNU sparse files are not supported".into()),
            // uname, gname, atime, ctime, comment, charset, LIBARCHIVE.*,
            // vendor keys: nothing a filesystem image keeps.
            _ => {}
        }
    }
    Ok(())
}

fn decimal(text: &str, key: &str) -> Result<u64, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("PAX {key} {text:?} is not a number"));
    }
    text.parse().map_err(|_| format!("PAX {key} {text:?} is too large"))
}

fn id(text: &str, key: &str) -> Result<u32, String> {
    u32::try_from(decimal(text, key)?).map_err(|_| format!("PAX {key} {text} is not a 32-bit id"))
}

/// A PAX time: `[-]SECONDS[.FRACTION]`, the fraction cut to nanoseconds.
fn pax_time(text: &str) -> Result<(i64, u32), String> {
    let invalid = || format!("PAX mtime {text:?} is not a time");
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let seconds: i64 = whole.parse().map_err(|_| invalid())?;
    let mut nanos: u32 = 0;
    for (index, digit) in fraction.bytes().take(9).enumerate() {
        nanos += u32::from(digit - b'0') * 10u32.pow(8 - index as u32);
    }
    if !negative {
        return Ok((seconds, nanos));
    }
    // -1.25 is 1.25 s before the epoch: second -2, 750,000,000 ns.
    if nanos == 0 { Ok((-seconds, 0)) } else { Ok((-seconds - 1, 1_000_000_000 - nanos)) }
}

/// A numeric header field: octal (NUL- or space-terminated, maybe
/// space-padded in front) or GNU base-256 (the high bit of the first byte
/// set; 0xff first means negative).
fn number(field: &[u8]) -> Result<i64, String> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            let negative = first == 0xff;
            let mut value: i128 = if negative { -1 } else { i128::from(first & 0x7f) };
            for &byte in &field[1..] {
                value = value.checked_mul(256).ok_or("a base-256 number too large")? + i128::from(byte);
                if value.abs() > i128::from(i64::MAX) {
                    return Err("a base-256 number too large".into());
                }
            }
            return i64::try_from(value).map_err(|_| "a base-256 number too large".into());
        }
    }
    let text = until_nul(field);
    let text = trim_spaces(text);
    if text.is_empty() {
        return Ok(0);
    }
    let mut value: i64 = 0;
    for &byte in text {
        if !(b'0'..=b'7').contains(&byte) {
            return Err(format!("{:?} is not an octal number", String::from_utf8_lossy(field)));
        }
        value = value.checked_mul(8).ok_or("an octal number too large")? + i64::from(byte - b'0');
    }
    Ok(value)
}

fn trim_spaces(mut text: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = text {
        text = rest;
    }
    while let [rest @ .., b' '] = text {
        text = rest;
    }
    text
}

fn until_nul(bytes: &[u8]) -> &[u8] {
    bytes.iter().position(|&b| b == 0).map_or(bytes, |end| &bytes[..end])
}

/// The header's name: ustar's prefix, `/`, name (GNU headers keep other
/// fields where ustar has the prefix).
fn header_name(header: &[u8; 512]) -> Vec<u8> {
    let name = until_nul(&header[..100]);
    let ustar = header[257..263] == *b"ustar\0";
    let prefix = if ustar { until_nul(&header[345..500]) } else { &[][..] };
    if prefix.is_empty() {
        return name.to_vec();
    }
    let mut full = prefix.to_vec();
    full.push(b'/');
    full.extend_from_slice(name);
    full
}

/// The stored checksum must be the sum of the header's bytes with the
/// checksum field as spaces (as unsigned bytes; some old writers summed
/// signed ones, also accepted).
fn check_checksum(header: &[u8; 512]) -> Result<(), String> {
    let stored = number(&header[148..156]).map_err(|reason| format!("checksum: {reason}"))?;
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (index, &byte) in header.iter().enumerate() {
        let byte = if (148..156).contains(&index) { b' ' } else { byte };
        unsigned += i64::from(byte);
        signed += i64::from(byte as i8);
    }
    if stored != unsigned && stored != signed {
        return Err(format!("header checksum {stored} does not match its bytes ({unsigned})"));
    }
    Ok(())
}

pub(crate) fn display_name(name: &[u8]) -> String {
    String::from_utf8_lossy(&name[..name.len().min(MAX_PATH_BYTES)]).into_owned()
}

/// A member name made relative and clean: `./` prefixes, `.` and empty
/// components dropped, a trailing `/` dropped. Refused: an absolute path,
/// a `..` component, a name that is not UTF-8 (ext4 names here are
/// strings), holds a NUL, is longer than `PATH_MAX` or has a component
/// longer than ext4's 255 bytes.
pub(crate) fn normalize(name: &[u8]) -> Result<String, String> {
    if name.len() > MAX_PATH_BYTES {
        return Err(format!("a path of {} bytes; at most {MAX_PATH_BYTES}", name.len()));
    }
    let name = std::str::from_utf8(name).map_err(|_| "a path that is not UTF-8".to_owned())?;
    if name.starts_with('/') {
        return Err("an absolute path".into());
    }
    if name.contains('\0') {
        return Err("a path with a NUL byte".into());
    }
    let mut clean = String::with_capacity(name.len());
    for component in name.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err("a \"..\" component".into()),
            _ if component.len() > 255 => {
                return Err(format!("a name of {} bytes; ext4 holds at most 255", component.len()));
            }
            _ => {
                if !clean.is_empty() {
                    clean.push('/');
                }
                clean.push_str(component);
            }
        }
    }
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_and_base256_numbers_are_read_and_junk_is_refused() {
        assert_eq!(number(b"0000644\0"), Ok(0o644));
        assert_eq!(number(b"   644 \0"), Ok(0o644));
        assert_eq!(number(b"\0\0\0\0"), Ok(0));
        assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]), Ok(1 << 32));
        assert_eq!(number(&[0xff; 8]), Ok(-1));
        assert!(number(b"0000648\0").is_err());
        assert!(number(b"77777777777777777777777").is_err());
    }

    #[test]
    fn pax_times_keep_nanoseconds_and_negative_fractions_count_back() {
        assert_eq!(pax_time("1700000000.123456789"), Ok((1_700_000_000, 123_456_789)));
        assert_eq!(pax_time("1.5"), Ok((1, 500_000_000)));
        assert_eq!(pax_time("7.1234567891"), Ok((7, 123_456_789)));
        assert_eq!(pax_time("-1.25"), Ok((-2, 750_000_000)));
        assert_eq!(pax_time("-3"), Ok((-3, 0)));
        assert!(pax_time("1e9").is_err() && pax_time("").is_err() && pax_time(".5").is_err());
    }

    #[test]
    fn names_are_normalized_and_escapes_refused() {
        assert_eq!(normalize(b"./a//b/./c/"), Ok("a/b/c".into()));
        assert_eq!(normalize(b"./"), Ok(String::new()));
        assert!(normalize(b"/etc/passwd").is_err());
        assert!(normalize(b"a/../../b").is_err());
        assert!(normalize(b"..").is_err());
        assert!(normalize(&[b'a', 0xff]).is_err());
        assert!(normalize("x".repeat(256).as_bytes()).is_err());
    }

    /// A ustar header with a valid checksum.
    fn header(name: &str, typeflag: u8, size: u64, link: &str) -> [u8; 512] {
        let mut block = [0u8; 512];
        block[..name.len()].copy_from_slice(name.as_bytes());
        block[100..108].copy_from_slice(b"0000644\0");
        block[108..116].copy_from_slice(b"0000000\0");
        block[116..124].copy_from_slice(b"0000000\0");
        block[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        block[136..148].copy_from_slice(b"00000000000\0");
        block[156] = typeflag;
        block[157..157 + link.len()].copy_from_slice(link.as_bytes());
        block[257..263].copy_from_slice(b"ustar\0");
        block[263..265].copy_from_slice(b"00");
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        block
    }

    fn names(tar: Vec<u8>) -> Result<Vec<String>, TarError> {
        let mut reader = TarReader::new(io::Cursor::new(tar)).unwrap();
        let mut names = Vec::new();
        while let Some(entry) = reader.next_entry()? {
            names.push(entry.path);
        }
        Ok(names)
    }

    #[test]
    fn links_and_other_header_only_entries_carry_no_data_whatever_their_size_says() {
        // A symlink whose size field says 512, then a header Go's reader
        // (containerd, umoci) reads as the next entry: so must kiln.
        let mut tar = Vec::new();
        tar.extend_from_slice(&header("s", b'2', 512, "target"));
        tar.extend_from_slice(&header("hidden", b'0', 0, ""));
        tar.extend_from_slice(&header("shown", b'0', 0, ""));
        tar.extend_from_slice(&[0u8; 1024]);
        assert_eq!(names(tar).unwrap(), ["s", "hidden", "shown"]);
    }

    #[test]
    fn a_header_after_a_single_zero_block_is_an_error_not_the_end() {
        let mut tar = Vec::new();
        tar.extend_from_slice(&header("a", b'0', 0, ""));
        tar.extend_from_slice(&[0u8; 512]);
        tar.extend_from_slice(&header("b", b'0', 0, ""));
        tar.extend_from_slice(&[0u8; 1024]);
        let error = names(tar).unwrap_err();
        assert!(matches!(&error, TarError::Bad { reason, .. } if reason.contains("follows a zero block")), "{error:?}");
        // One zero block and then the end of the stream is a proper end.
        let mut short = header("a", b'0', 0, "").to_vec();
        short.extend_from_slice(&[0u8; 512]);
        assert_eq!(names(short).unwrap(), ["a"]);
    }

    #[test]
    fn an_entry_with_more_xattrs_than_an_inode_could_hold_is_refused() {
        let record = |index: usize| {
            let body = format!(" SCHILY.xattr.user.x{index}=v\n");
            // LEN counts its own digits too.
            let mut len = body.len() + 1;
            while len.to_string().len() + body.len() != len {
                len += 1;
            }
            format!("{len}{body}")
        };
        let body: String = (0..MAX_XATTRS).map(record).collect();
        assert!(parse_pax(body.as_bytes(), &mut Pax::default()).is_ok());
        let body: String = (0..=MAX_XATTRS).map(record).collect();
        assert_eq!(
            parse_pax(body.as_bytes(), &mut Pax::default()).unwrap_err(),
            format!("more than {MAX_XATTRS} xattrs")
        );
    }
}
