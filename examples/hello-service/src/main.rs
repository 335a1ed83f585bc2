//! kiln's example service: what a service sees inside the microVM.
//!
//! 1. prints its arguments and `GREETING_STYLE` (set by the service disk's
//!    `launch` script), and `RPC_URL` (kiln rewrote its loopback host to the
//!    host's address on the VM's link);
//! 2. reads the keystore: every file under `/srv/keystore` (or
//!    `$KEYSTORE_DIR`), printing each file's name and length;
//! 3. counts its runs in `/mnt/data/visits` on the data disk, which outlives
//!    the VM (skipped when there is no data disk);
//! 4. serves one TCP port (`$PORT`, default 8080): every connection gets a
//!    one-line greeting. It runs until SIGTERM, then exits 0. With
//!    `--once` it exits after the first connection.
//!
//! Std only apart from the signal wait, so it builds static for the guest.

use std::env;
use std::fs;
use std::io::{self, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const DEFAULT_KEYSTORE: &str = "/srv/keystore";
const DATA_DIR: &str = "/mnt/data";

fn main() -> ExitCode {
    let args: Vec<String> = env::args_os().skip(1).map(|arg| arg.to_string_lossy().into_owned()).collect();
    println!("hello from kiln: args {args:?}");
    for name in ["GREETING_STYLE", "RPC_URL"] {
        match env::var_os(name) {
            Some(value) => println!("{name}={}", value.to_string_lossy()),
            None => println!("{name} is not set"),
        }
    }
    let keystore = env::var_os("KEYSTORE_DIR").map_or_else(|| PathBuf::from(DEFAULT_KEYSTORE), PathBuf::from);
    match list_files(&keystore) {
        Ok(files) => {
            println!("keystore {}: {} files", keystore.display(), files.len());
            for (path, len) in files {
                println!("  {} {len} bytes", path.strip_prefix(&keystore).unwrap_or(&path).display());
            }
        }
        Err(err) => {
            eprintln!("cannot read keystore {}: {err}", keystore.display());
            return ExitCode::FAILURE;
        }
    }
    let visits = match count_visit(Path::new(DATA_DIR)) {
        Ok(Some(visits)) => {
            println!("data disk: run number {visits} (kept in {DATA_DIR}/visits)");
            visits
        }
        Ok(None) => {
            println!("no data disk at {DATA_DIR}");
            0
        }
        Err(err) => {
            eprintln!("cannot use the data disk: {err}");
            return ExitCode::FAILURE;
        }
    };
    if args.iter().any(|arg| arg == "--no-serve") {
        return ExitCode::SUCCESS;
    }
    let once = args.iter().any(|arg| arg == "--once");
    match serve(visits, once) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cannot serve: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Increments the run counter on the data disk; `None` without one.
fn count_visit(dir: &Path) -> io::Result<Option<u64>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let path = dir.join("visits");
    let visits = match fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().unwrap_or(0) + 1,
        Err(err) if err.kind() == io::ErrorKind::NotFound => 1,
        Err(err) => return Err(err),
    };
    // Temp file + rename: a power-off mid-write keeps the old count.
    let temp = dir.join("visits.tmp");
    fs::write(&temp, format!("{visits}\n"))?;
    fs::File::open(&temp)?.sync_all()?;
    fs::rename(&temp, &path)?;
    Ok(Some(visits))
}

fn serve(visits: u64, once: bool) -> io::Result<()> {
    let port = env::var("PORT").ok().and_then(|p| p.parse::<u16>().ok()).unwrap_or(8080);
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    exit_on_sigterm();
    println!("serving on port {port}");
    for stream in listener.incoming() {
        let mut stream = stream?;
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        writeln!(stream, "hello from kiln (run {visits}), {peer}")?;
        println!("greeted {peer}");
        if once {
            break;
        }
    }
    Ok(())
}

/// A thread that waits for SIGTERM and exits 0: the service's clean stop.
fn exit_on_sigterm() {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use;
    // blocking SIGTERM in every thread (threads inherit the mask) lets
    // sigwait receive it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut signal = 0;
            libc::sigwait(&set, &mut signal);
            println!("got SIGTERM: stopping cleanly");
            let _ = io::stdout().flush();
            std::process::exit(0);
        });
    }
}

/// Every file under `dir`, recursively, sorted, with its length. Each file
/// is read in full, so an unreadable key fails here rather than later.
fn list_files(dir: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current)? {
            let path = entry?.path();
            let meta = fs::metadata(&path)?;
            if meta.is_dir() {
                pending.push(path);
            } else {
                let len = fs::read(&path)?.len() as u64;
                files.push((path, len));
            }
        }
    }
    files.sort();
    Ok(files)
}
