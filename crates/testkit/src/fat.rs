//! Reading FAT images back three independent ways: `fsck.fat`, mtools and
//! the `fatfs` crate. Each one knows nothing of kiln's writer, so a tree
//! that survives all three is a tree other systems will read.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{self, Cursor, Read};
use std::path::Path;
use std::process::{Command, Output};

use crate::{current_test_name, require_tool};

/// One entry of a tree read back from an image or a host directory.
#[derive(Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File(Vec<u8>),
}

impl fmt::Debug for Entry {
    // Trees hold megabytes of data; a failed comparison should show sizes
    // and a fingerprint, not every byte.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Dir => f.write_str("Dir"),
            Entry::File(bytes) if bytes.len() <= 32 => write!(f, "File({:?})", String::from_utf8_lossy(bytes)),
            Entry::File(bytes) => {
                write!(f, "File({} bytes, fnv1a {:016x})", bytes.len(), kiln_types::hash::fnv1a_64(bytes))
            }
        }
    }
}

/// A tree keyed by `/`-separated path relative to its root (no leading `/`).
/// Every directory has its own entry, so empty directories are compared too.
pub type Tree = BTreeMap<String, Entry>;

/// A short account of how `actual` differs from `expected`, or `None` when
/// they are equal: missing paths, unexpected paths, and differing entries
/// (with the first differing byte offset for files).
pub fn tree_diff(actual: &Tree, expected: &Tree) -> Option<String> {
    let mut lines = Vec::new();
    for (path, want) in expected {
        match actual.get(path) {
            None => lines.push(format!("missing: {path:?} ({want:?})")),
            Some(got) if got == want => {}
            Some(Entry::File(got)) if matches!(want, Entry::File(_)) => {
                let Entry::File(want) = want else { continue };
                let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
                lines.push(format!(
                    "differs: {path:?}: {} bytes, expected {}; first difference at byte {at}",
                    got.len(),
                    want.len()
                ));
            }
            Some(got) => lines.push(format!("differs: {path:?}: {got:?}, expected {want:?}")),
        }
    }
    for (path, got) in actual {
        if !expected.contains_key(path) {
            lines.push(format!("unexpected: {path:?} ({got:?})"));
        }
    }
    if lines.is_empty() {
        return None;
    }
    let total = lines.len();
    lines.truncate(40);
    if total > lines.len() {
        lines.push(format!("... and {} more", total - lines.len()));
    }
    Some(lines.join("\n"))
}

/// Reads host directory `dir` recursively (not following symlinks).
pub fn read_tree(dir: &Path) -> io::Result<Tree> {
    let mut tree = Tree::new();
    read_tree_into(dir, "", &mut tree)?;
    Ok(tree)
}

fn read_tree_into(dir: &Path, prefix: &str, tree: &mut Tree) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().into_string().map_err(|name| {
            io::Error::new(io::ErrorKind::InvalidData, format!("non-UTF-8 name {name:?} in {}", dir.display()))
        })?;
        let path = format!("{prefix}{name}");
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            tree.insert(path.clone(), Entry::Dir);
            read_tree_into(&entry.path(), &format!("{path}/"), tree)?;
        } else if file_type.is_file() {
            tree.insert(path, Entry::File(fs::read(entry.path())?));
        } else {
            return Err(io::Error::other(format!("{} is neither a file nor a directory", entry.path().display())));
        }
    }
    Ok(())
}

/// A date and time as FAT stores it (2-second resolution for modification).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FatDateTime {
    pub year: u16,
    pub month: u16,
    pub day: u16,
    pub hour: u16,
    pub min: u16,
    pub sec: u16,
}

impl FatDateTime {
    /// The FAT timestamp for Unix time `epoch` (UTC), clamped to the range
    /// FAT can hold (1980-01-01 to 2107-12-31) and rounded down to an even
    /// second.
    pub fn from_unix(epoch: i64) -> FatDateTime {
        const FIRST: i64 = 315_532_800; // 1980-01-01T00:00:00Z
        const LAST: i64 = 4_354_819_199; // 2107-12-31T23:59:59Z
        let epoch = epoch.clamp(FIRST, LAST);
        let (days, secs) = (epoch.div_euclid(86_400), epoch.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        // FAT years run to 2107; callers never pass more, so the casts hold.
        FatDateTime {
            year: year as u16,
            month: month as u16,
            day: day as u16,
            hour: (secs / 3600) as u16,
            min: (secs / 60 % 60) as u16,
            sec: (secs % 60 / 2 * 2) as u16,
        }
    }

    fn from_fatfs(datetime: fatfs::DateTime) -> FatDateTime {
        let (date, time) = (datetime.date, datetime.time);
        FatDateTime { year: date.year, month: date.month, day: date.day, hour: time.hour, min: time.min, sec: time.sec }
    }
}

/// Howard Hinnant's days-to-civil: proleptic Gregorian (year, month, day).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Everything the `fatfs` crate reports about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatfsView {
    pub tree: Tree,
    /// 12, 16 or 32, as fatfs decides it from the cluster count.
    pub fat_bits: u32,
    /// Label in the boot sector, padding stripped (`NO NAME` when unset).
    pub boot_label: String,
    /// Label in the root directory's volume-id entry, if there is one.
    pub root_label: Option<String>,
    pub volume_id: u32,
    pub cluster_size: u32,
    pub total_clusters: u32,
    /// Free clusters: FSInfo's count on FAT32, counted from the FAT otherwise.
    pub free_clusters: u32,
    /// Every distinct modification time on any entry.
    pub modified_times: BTreeSet<FatDateTime>,
    /// Every distinct creation time on any entry.
    pub created_times: BTreeSet<FatDateTime>,
}

/// Reads the whole tree of a FAT image with the `fatfs` crate.
pub fn read_fat_with_fatfs(image: &[u8]) -> io::Result<Tree> {
    inspect_fat_with_fatfs(image).map(|view| view.tree)
}

/// Reads the image file at `path` with the `fatfs` crate.
pub fn read_fat_file_with_fatfs(path: &Path) -> io::Result<Tree> {
    read_fat_with_fatfs(&fs::read(path)?)
}

/// Reads a FAT image with the `fatfs` crate: tree, geometry, labels, times.
pub fn inspect_fat_with_fatfs(image: &[u8]) -> io::Result<FatfsView> {
    // fatfs wants Read + Write + Seek even to read; a private copy keeps any
    // write it might attempt (it should attempt none) away from the caller.
    let filesystem = fatfs::FileSystem::new(Cursor::new(image.to_vec()), fatfs::FsOptions::new())?;
    let stats = filesystem.stats()?;
    let mut view = FatfsView {
        tree: Tree::new(),
        fat_bits: match filesystem.fat_type() {
            fatfs::FatType::Fat12 => 12,
            fatfs::FatType::Fat16 => 16,
            fatfs::FatType::Fat32 => 32,
        },
        boot_label: filesystem.volume_label(),
        root_label: filesystem.read_volume_label_from_root_dir()?,
        volume_id: filesystem.volume_id(),
        cluster_size: stats.cluster_size(),
        total_clusters: stats.total_clusters(),
        free_clusters: stats.free_clusters(),
        modified_times: BTreeSet::new(),
        created_times: BTreeSet::new(),
    };
    walk_fatfs_dir(&filesystem.root_dir(), "", &mut view)?;
    Ok(view)
}

fn walk_fatfs_dir<T: fatfs::ReadWriteSeek>(
    dir: &fatfs::Dir<'_, T>,
    prefix: &str,
    view: &mut FatfsView,
) -> io::Result<()> {
    for entry in dir.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name == "." || name == ".." {
            continue;
        }
        let path = format!("{prefix}{name}");
        view.modified_times.insert(FatDateTime::from_fatfs(entry.modified()));
        view.created_times.insert(FatDateTime::from_fatfs(entry.created()));
        if entry.is_dir() {
            let previous = view.tree.insert(path.clone(), Entry::Dir);
            if previous.is_some() {
                return Err(duplicate(&path));
            }
            walk_fatfs_dir(&entry.to_dir(), &format!("{path}/"), view)?;
        } else {
            let mut bytes = Vec::new();
            entry.to_file().read_to_end(&mut bytes)?;
            if bytes.len() as u64 != entry.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{path}: directory entry says {} bytes, cluster chain gave {}", entry.len(), bytes.len()),
                ));
            }
            if view.tree.insert(path.clone(), Entry::File(bytes)).is_some() {
                return Err(duplicate(&path));
            }
        }
    }
    Ok(())
}

fn duplicate(path: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{path} appears twice in its directory"))
}

fn run(command: &mut Command) -> Result<Output, String> {
    command.output().map_err(|err| format!("cannot run {command:?}: {err}"))
}

fn combined(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// Runs `fsck.fat -n IMG` and requires a clean bill: exit status 0 and
/// exactly two lines of output (version and summary); anything more is a
/// complaint, returned in full.
///
/// When `fsck.fat` is missing this follows [`require_tool`]: a panic under
/// `KILN_REQUIRE_TOOLS=1`, else a `SKIPPED` line and `Ok(())`.
pub fn fsck_fat_clean(image: &Path) -> Result<(), String> {
    let Some(fsck) = require_tool(&current_test_name(), "fsck.fat") else {
        return Ok(());
    };
    let output = run(Command::new(fsck).arg("-n").arg(image))?;
    let text = combined(&output);
    if !output.status.success() || text.lines().count() != 2 {
        return Err(format!("fsck.fat -n {} ({}):\n{text}", image.display(), output.status));
    }
    Ok(())
}

fn mtools_command(tool: &Path) -> Command {
    let mut command = Command::new(tool);
    // Long names come out as UTF-8 only under a UTF-8 locale; the skip
    // check stops mtools refusing images whose geometry it finds unusual.
    command.env("LC_ALL", "C.UTF-8").env("MTOOLS_SKIP_CHECK", "1");
    command
}

/// Copies everything in the image to `dest` with `mcopy -s -n -i IMG "::/*" DEST`.
/// Returns `Ok(false)` when mtools is missing and tools are not required
/// (after a `SKIPPED` line), `Ok(true)` once the copy succeeded.
///
/// An image with an empty root makes mcopy fail (nothing matches `*`), so an
/// empty root is checked with `mdir` first and copies nothing.
pub fn mtools_extract(image: &Path, dest: &Path) -> Result<bool, String> {
    let test = current_test_name();
    let Some(mcopy) = require_tool(&test, "mcopy") else {
        return Ok(false);
    };
    let Some(listing) = mdir_listing(image)? else {
        return Ok(false);
    };
    if listing_is_empty_root(&listing) {
        return Ok(true);
    }
    let output = run(mtools_command(&mcopy).args(["-s", "-n", "-i"]).arg(image).arg("::/*").arg(dest))?;
    if !output.status.success() || !output.stderr.is_empty() {
        return Err(format!(
            "mcopy -s -n -i {} ::/* {} ({}):\n{}",
            image.display(),
            dest.display(),
            output.status,
            combined(&output)
        ));
    }
    Ok(true)
}

/// The tree mtools sees in the image: [`mtools_extract`] into a temporary
/// directory, then [`read_tree`]. `Ok(None)` when mtools was skipped.
pub fn read_fat_with_mtools(image: &Path) -> Result<Option<Tree>, String> {
    let dest = tempfile::tempdir().map_err(|err| format!("cannot create a temporary directory: {err}"))?;
    if !mtools_extract(image, dest.path())? {
        return Ok(None);
    }
    read_tree(dest.path()).map(Some).map_err(|err| format!("cannot read back what mcopy extracted: {err}"))
}

/// The names mtools (4.0.32, Debian 12's) gives `tree`'s entries: it turns
/// each UTF-16 unit of a long name into a character on its own, so a
/// character outside the Basic Multilingual Plane (a surrogate pair, such as
/// an emoji) comes out as `__`. `None` when that makes two names in one
/// directory the same, where no comparison with mtools can be fair.
pub fn as_mtools_names(tree: &Tree) -> Option<Tree> {
    let mangle = |path: &str| -> String {
        path.chars().map(|c| if c.len_utf16() == 2 { "__".to_owned() } else { c.to_string() }).collect()
    };
    let mut out = Tree::new();
    for (path, entry) in tree {
        if out.insert(mangle(path), entry.clone()).is_some() {
            return None;
        }
    }
    Some(out)
}

/// What `mdir` lists: `mdir -/ -a -i IMG ::/` (recursive, hidden files
/// too), with the `Volume in drive : is LABEL` line. An empty root makes the
/// recursive form fail with "not found", so the root is listed plainly first
/// and that listing (saying "No files") is returned when it is empty.
/// `Ok(None)` when mtools was skipped.
pub fn mdir_listing(image: &Path) -> Result<Option<String>, String> {
    let Some(mdir) = require_tool(&current_test_name(), "mdir") else {
        return Ok(None);
    };
    let root = run_mdir(&mdir, image, &["-a"])?;
    if listing_is_empty_root(&root) {
        return Ok(Some(root));
    }
    run_mdir(&mdir, image, &["-/", "-a"]).map(Some)
}

fn listing_is_empty_root(listing: &str) -> bool {
    listing.lines().any(|line| line.trim() == "No files")
}

fn run_mdir(mdir: &Path, image: &Path, flags: &[&str]) -> Result<String, String> {
    let output = run(mtools_command(mdir).args(flags).arg("-i").arg(image).arg("::/"))?;
    if !output.status.success() || !output.stderr.is_empty() {
        return Err(format!(
            "mdir {} -i {} ::/ ({}):\n{}",
            flags.join(" "),
            image.display(),
            output.status,
            combined(&output)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The volume label mtools reports, or `None` for "has no label".
/// `Ok(None)` is also what a skipped run gives; use [`mdir_listing`] to tell.
pub fn mtools_label(listing: &str) -> Option<String> {
    listing
        .lines()
        .find_map(|line| line.trim().strip_prefix("Volume in drive : is ").map(|label| label.trim_end().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_timestamps_from_unix_time() {
        let at = |epoch| {
            let t = FatDateTime::from_unix(epoch);
            format!("{:04}-{:02}-{:02} {:02}:{:02}:{:02}", t.year, t.month, t.day, t.hour, t.min, t.sec)
        };
        assert_eq!(at(0), "1980-01-01 00:00:00");
        assert_eq!(at(i64::MIN), "1980-01-01 00:00:00");
        assert_eq!(at(315_532_800), "1980-01-01 00:00:00");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(at(1_717_243_201), "2024-06-01 12:00:00");
        assert_eq!(at(1_735_689_599), "2024-12-31 23:59:58");
        assert_eq!(at(4_354_819_199), "2107-12-31 23:59:58");
        assert_eq!(at(i64::MAX), "2107-12-31 23:59:58");
    }

    #[test]
    fn tree_diff_names_every_difference() {
        let tree = |entries: &[(&str, Option<&[u8]>)]| -> Tree {
            entries
                .iter()
                .map(|(path, bytes)| (path.to_string(), bytes.map_or(Entry::Dir, |b| Entry::File(b.to_vec()))))
                .collect()
        };
        let expected = tree(&[("a", None), ("a/f", Some(b"hello")), ("g", Some(b"x"))]);
        assert_eq!(tree_diff(&expected, &expected), None);
        let actual = tree(&[("a", None), ("a/f", Some(b"help!")), ("h", None)]);
        let diff = tree_diff(&actual, &expected).unwrap_or_default();
        assert_eq!(
            diff,
            "differs: \"a/f\": 5 bytes, expected 5; first difference at byte 3\n\
             missing: \"g\" (File(\"x\"))\n\
             unexpected: \"h\" (Dir)"
        );
    }

    #[test]
    fn read_tree_sees_files_and_empty_dirs() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        fs::create_dir_all(dir.path().join("a/empty"))?;
        fs::write(dir.path().join("a/f"), b"1")?;
        let tree = read_tree(dir.path())?;
        let paths: Vec<_> = tree.keys().map(String::as_str).collect();
        assert_eq!(paths, ["a", "a/empty", "a/f"]);
        assert_eq!(tree.get("a/f"), Some(&Entry::File(b"1".to_vec())));
        Ok(())
    }

    #[test]
    fn mtools_spelling_of_names_outside_the_bmp() {
        let tree: Tree = [("d😀/x🎉y".to_owned(), Entry::Dir), ("é日".to_owned(), Entry::Dir)].into_iter().collect();
        let mangled = as_mtools_names(&tree).unwrap_or_default();
        assert_eq!(mangled.keys().collect::<Vec<_>>(), ["d__/x__y", "é日"]);
        let clash: Tree = [("😀".to_owned(), Entry::Dir), ("__".to_owned(), Entry::Dir)].into_iter().collect();
        assert_eq!(as_mtools_names(&clash), None);
    }

    #[test]
    fn labels_from_mdir_listings() {
        assert_eq!(mtools_label(" Volume in drive : is SERVICEDISK\n Volume Serial"), Some("SERVICEDISK".into()));
        assert_eq!(mtools_label(" Volume in drive : is MY DISK    \n"), Some("MY DISK".into()));
        assert_eq!(mtools_label(" Volume in drive : has no label\n"), None);
    }
}
