//! A service for kiln's boot tests, built static by `cargo xtask guest`
//! (`target/guest/service-probe`). Everything it reports is one line
//! starting `probe: `, with values in Rust's `{:?}` escaping so quotes and
//! newlines stay visible on the console.
//!
//! Options (acted on in order, after every argument is printed):
//! `--env NAME` prints a variable; `--sha256 PATH` a file's digest;
//! `--write PATH=TEXT` writes a file; `--read PATH` prints one; `--net`
//! prints the hostname and the IPv4 routing table; `--http ADDR:PORT`
//! sends `GET /` and prints whether it got an answer (`reached`, with the
//! answer's last line) or not (`blocked`) within 3 s; `--wait-for-sigterm`
//! blocks until SIGTERM arrives and says so; `--ignore-sigterm` blocks
//! SIGTERM and sleeps forever (only SIGKILL ends it); `--exit N` sets the
//! exit status.

use std::fmt::Write as _;
use std::{env, fs, mem, process};

use sha2::{Digest, Sha256};

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    for (index, arg) in args.iter().enumerate() {
        println!("probe: arg[{index}]={arg:?}");
    }
    let mut exit = 0;
    let mut rest = args.iter();
    while let Some(option) = rest.next() {
        let mut value = || rest.next().cloned().unwrap_or_else(|| die(&format!("{option} needs a value")));
        match option.as_str() {
            "--env" => {
                let name = value();
                println!("probe: env {name}={:?}", env::var_os(&name));
            }
            "--sha256" => {
                let path = value();
                let bytes = fs::read(&path).unwrap_or_else(|e| die(&format!("cannot read {path}: {e}")));
                let hex = Sha256::digest(&bytes).iter().fold(String::new(), |mut hex, byte| {
                    let _ = write!(hex, "{byte:02x}");
                    hex
                });
                println!("probe: sha256 {path} {hex}");
            }
            "--write" => {
                let spec = value();
                let (path, text) = spec.split_once('=').unwrap_or_else(|| die("--write needs PATH=TEXT"));
                fs::write(path, text).unwrap_or_else(|e| die(&format!("cannot write {path}: {e}")));
                println!("probe: wrote {path}");
            }
            "--read" => {
                let path = value();
                match fs::read_to_string(&path) {
                    Ok(text) => println!("probe: read {path} {text:?}"),
                    Err(err) => println!("probe: read {path} failed: {err}"),
                }
            }
            "--net" => {
                let hostname = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                println!("probe: hostname {:?}", hostname.trim());
                for line in fs::read_to_string("/proc/net/route").unwrap_or_default().lines().skip(1) {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    if let [interface, destination, gateway, _, _, _, _, mask, ..] = fields[..] {
                        println!("probe: route {interface} dst={destination} gw={gateway} mask={mask}");
                    }
                }
            }
            "--http" => {
                let target = value();
                match http_get(&target) {
                    Ok(answer) => println!("probe: http {target} reached {:?}", answer.lines().last().unwrap_or("")),
                    Err(err) => println!("probe: http {target} blocked ({err})"),
                }
            }
            "--wait-for-sigterm" => wait_for_sigterm(),
            "--ignore-sigterm" => ignore_sigterm(),
            "--exit" => exit = value().parse().unwrap_or_else(|_| die("--exit needs a number")),
            _ => {}
        }
    }
    process::exit(exit);
}

fn http_get(target: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr =
        target.parse().map_err(|_| std::io::Error::other(format!("{target} is not ADDR:PORT")))?;
    let timeout = std::time::Duration::from_secs(3);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Blocks SIGTERM for this thread and returns the set holding it: a
/// blocked SIGTERM stays pending, for `sigwait` to take or forever.
fn block_sigterm() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

fn wait_for_sigterm() {
    let set = block_sigterm();
    println!("probe: waiting for SIGTERM");
    let mut signal = 0;
    // SAFETY: `set` is initialised and `signal` is a valid out-pointer.
    unsafe { libc::sigwait(&set, &mut signal) };
    println!("probe: got signal {signal} (SIGTERM is {})", libc::SIGTERM);
}

fn ignore_sigterm() -> ! {
    block_sigterm();
    println!("probe: ignoring SIGTERM");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

fn die(message: &str) -> ! {
    eprintln!("probe: error: {message}");
    process::exit(70);
}
