//! Pulls from a real registry on 127.0.0.1: Debian's `docker-registry`
//! (the distribution reference server), started per test on a free port
//! with its own config and storage, over TLS with a throwaway CA (made by
//! `openssl`), and with token auth from a token server written here (std
//! TCP, JWTs signed ES256 with ring) whose certificate the registry
//! trusts. Images are made by umoci (busybox-static as the only file) and
//! pushed by skopeo; python3 writes the multi-platform index. Nothing here
//! is made by kiln.
#![allow(clippy::unwrap_used)] // Test code: a failed step is a failed test.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use kiln_oci::{Digest, Error, ImageSource, RegistryClient, RegistryErrorKind, RegistryReference, Store};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use tempfile::TempDir;

const TOOLS: &[&str] = &["docker-registry", "skopeo", "umoci", "openssl", "python3", "busybox", "htpasswd"];
/// The cached test layout's name: bump it when the recipe changes.
const LAYOUT_VERSION: &str = "registry-busybox-v2";
const REPOSITORY: &str = "test/busybox";
const SERVICE: &str = "kiln-test-registry";
const ISSUER: &str = "kiln-test-token-issuer";
const USER: &str = "alice";
const PASSWORD: &str = "wonderland";

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap_or_else(|error| panic!("{command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An OCI layout built once per machine under target/test-images/: tag
/// `amd64` (the shared busybox image of images.rs, copied by skopeo), tag
/// `arm64` (one marker file, by umoci, its config saying arm64), and tag
/// `multi`, an index listing arm64 first and amd64 second (by python3).
/// `None` (after `SKIPPED:`) when a tool is missing and tools are optional.
fn test_layout() -> Option<PathBuf> {
    let test = kiln_testkit::current_test_name();
    kiln_testkit::require_tools(&test, TOOLS)?;
    let busybox = crate::images::busybox(&test)?;
    let images = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target dir").join("test-images");
    let layout = images.join(LAYOUT_VERSION);
    if layout.join("index.json").is_file() {
        return Some(layout);
    }
    std::fs::create_dir_all(&images).unwrap();
    let building = TempDir::new_in(&images).unwrap();
    let staged = building.path().join("layout");
    let image = |tag: &str| format!("{}:{tag}", staged.display());
    let from = format!("oci:{}:{}", busybox.layout.display(), crate::images::TAG);
    run(Command::new("skopeo").args(["--insecure-policy", "copy", "-q", &from, &format!("oci:{}", image("amd64"))]));
    run(Command::new("umoci").args(["new", "--image", &image("arm64")]));
    // unpack + repack, not `umoci insert` (whose layer tars are cut short, see images.rs).
    let bundle = building.path().join("bundle");
    run(Command::new("umoci").args(["unpack", "--image", &image("arm64")]).arg(&bundle));
    std::fs::write(bundle.join("rootfs/marker"), "arm64\n").unwrap();
    run(Command::new("umoci").args(["repack", "--image", &image("arm64")]).arg(&bundle));
    run(Command::new("umoci").args(["config", "--image", &image("arm64"), "--os", "linux", "--architecture", "arm64"]));
    run(Command::new("python3").arg("-c").arg(WRITE_INDEX).arg(&staged));
    // Another test process may have finished first; its layout is as good.
    if std::fs::rename(&staged, &layout).is_err() && !layout.join("index.json").is_file() {
        panic!("could not move the test layout to {}", layout.display());
    }
    Some(layout)
}

/// Adds tag `multi` to a layout: an OCI index of its `arm64` and `amd64` manifests.
const WRITE_INDEX: &str = r#"
import hashlib, json, os, sys
layout = sys.argv[1]
index_path = os.path.join(layout, "index.json")
index = json.load(open(index_path))
by_tag = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
def entry(tag):
    m = dict(by_tag[tag]); m.pop("annotations", None)
    m["platform"] = {"architecture": tag, "os": "linux"}
    return m
multi = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": [entry("arm64"), entry("amd64")]}
blob = json.dumps(multi, separators=(",", ":")).encode()
digest = hashlib.sha256(blob).hexdigest()
open(os.path.join(layout, "blobs", "sha256", digest), "wb").write(blob)
index["manifests"].append({"mediaType": multi["mediaType"], "digest": "sha256:" + digest, "size": len(blob),
                           "annotations": {"org.opencontainers.image.ref.name": "multi"}})
json.dump(index, open(index_path + ".tmp", "w"))
os.rename(index_path + ".tmp", index_path)
"#;

/// The manifest digest the layout's index.json gives `tag`.
fn layout_digest(layout: &Path, tag: &str) -> Digest {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in the test layout"));
    entry["digest"].as_str().unwrap().parse().unwrap()
}

/// A throwaway CA and a server certificate for IP 127.0.0.1 it signed,
/// and the token server's self-signed certificate for a key ring made.
struct Pki {
    ca: PathBuf,
    /// A directory holding only `ca.crt`: skopeo's `--dest-cert-dir`.
    ca_dir: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    token_cert: PathBuf,
    token_cert_der: Vec<u8>,
    token_key_pkcs8: Vec<u8>,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let path = |name: &str| dir.join(name);
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        run(Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .args(["-days", "2", "-subj", "/CN=kiln test CA"])
            .args([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
            ])
            .arg(path("ca.key"))
            .arg("-out")
            .arg(path("ca.crt")));
        run(Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .args(["-days", "2", "-subj", "/CN=127.0.0.1"])
            .args([
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
                "-addext",
                "extendedKeyUsage=serverAuth",
                "-CA",
            ])
            .arg(path("ca.crt"))
            .arg("-CAkey")
            .arg(path("ca.key"))
            .arg("-keyout")
            .arg(path("server.key"))
            .arg("-out")
            .arg(path("server.crt")));
        let ca_dir = path("ca-dir");
        std::fs::create_dir(&ca_dir).unwrap();
        std::fs::copy(path("ca.crt"), ca_dir.join("ca.crt")).unwrap();
        // The token key comes from ring (so ring surely reads it back); openssl certifies it.
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new()).unwrap();
        std::fs::write(path("token.pk8"), pkcs8.as_ref()).unwrap();
        run(Command::new("openssl")
            .args(["req", "-x509", "-keyform", "DER", "-key"])
            .arg(path("token.pk8"))
            .args(["-days", "2", "-subj", "/CN=kiln test token issuer", "-outform", "DER", "-out"])
            .arg(path("token.der")));
        run(Command::new("openssl")
            .args(["x509", "-inform", "DER", "-in"])
            .arg(path("token.der"))
            .arg("-out")
            .arg(path("token.crt")));
        Pki {
            ca: path("ca.crt"),
            ca_dir,
            server_cert: path("server.crt"),
            server_key: path("server.key"),
            token_cert: path("token.crt"),
            token_cert_der: std::fs::read(path("token.der")).unwrap(),
            token_key_pkcs8: pkcs8.as_ref().to_vec(),
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `docker-registry serve` process, killed on drop.
struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
}

/// How a test registry authenticates pulls and pushes.
enum Auth<'a> {
    /// Anyone may pull and push.
    Open,
    /// Bearer tokens from this token server, signed by the PKI's token key.
    Token(&'a TokenServer, &'a Pki),
    /// Basic credentials checked against this htpasswd file (bcrypt).
    Htpasswd(&'a Path),
}

impl Registry {
    fn start(dir: &Path, tls: Option<&Pki>, auth: Auth<'_>) -> Registry {
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: kiln-test\n",
            dir.join("storage").display()
        );
        if let Some(pki) = tls {
            config += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                pki.server_cert.display(),
                pki.server_key.display()
            );
        }
        match auth {
            Auth::Open => {}
            Auth::Token(server, pki) => {
                config += &format!(
                    "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                    server.port,
                    pki.token_cert.display()
                );
            }
            Auth::Htpasswd(file) => {
                config += &format!("auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n", file.display());
            }
        }
        let config_path = dir.join("registry.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join("registry.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let mut registry = Registry { child, port, log };
        registry.wait_until_listening();
        registry
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "docker-registry exited with {status}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "docker-registry did not listen on {} within 20 s", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn reference(&self, tag_or_digest: &str) -> RegistryReference {
        format!("{}/{REPOSITORY}{tag_or_digest}", self.authority()).parse().unwrap()
    }

    /// `skopeo copy` of the layout's `tag` to the registry, under the same tag.
    fn push(&self, layout: &Path, tag: &str, tls: Option<&Pki>, credentials: Option<&str>) {
        let mut skopeo = Command::new("skopeo");
        skopeo.args(["--command-timeout", "120s", "--insecure-policy", "copy", "--all"]);
        match tls {
            Some(pki) => skopeo.arg("--dest-cert-dir").arg(&pki.ca_dir),
            None => skopeo.arg("--dest-tls-verify=false"),
        };
        if let Some(credentials) = credentials {
            skopeo.args(["--dest-creds", credentials]);
        }
        skopeo.arg(format!("oci:{}:{tag}", layout.display()));
        skopeo.arg(format!("docker://{}/{REPOSITORY}:{tag}", self.authority()));
        run(&mut skopeo);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token server in the manner of Docker's: `GET /token?service=…&scope=…`
/// with Basic credentials answers `{"token": JWT}` granting the scopes'
/// actions to the right user, and nothing to anonymous callers; wrong
/// credentials get a 401.
struct TokenServer {
    port: u16,
    /// Token requests by kiln (its User-Agent), as opposed to skopeo's.
    kiln_requests: Arc<AtomicUsize>,
}

impl TokenServer {
    fn start(pki: &Pki) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let key = Arc::new(
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pki.token_key_pkcs8, &SystemRandom::new())
                .unwrap(),
        );
        assert!(!key.public_key().as_ref().is_empty());
        let cert = STANDARD.encode(&pki.token_cert_der);
        let kiln_requests = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&kiln_requests);
        // The thread ends with the test process; each connection gets its own.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (key, cert, counter) = (Arc::clone(&key), cert.clone(), Arc::clone(&counter));
                std::thread::spawn(move || serve_token(stream, &key, &cert, &counter));
            }
        });
        TokenServer { port, kiln_requests }
    }
}

/// The OAuth2 refresh token a config.json's `identitytoken` carries.
const REFRESH_TOKEN: &str = "kiln-test-refresh-token";

fn serve_token(stream: TcpStream, key: &EcdsaKeyPair, cert: &str, kiln_requests: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let (mut authorization, mut user_agent, mut length) = (None, String::new(), 0);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "authorization" => authorization = Some(value.trim().to_owned()),
                "user-agent" => user_agent = value.trim().to_owned(),
                "content-length" => length = value.trim().parse().unwrap(),
                _ => {}
            }
        }
    }
    if user_agent.starts_with("kiln/") {
        kiln_requests.fetch_add(1, Ordering::SeqCst);
    }
    // GET: the parameters are the query; POST (OAuth2): the form body.
    let mut body = vec![0; length];
    std::io::Read::read_exact(&mut reader, &mut body).unwrap();
    let target = request_line.split_whitespace().nth(1).unwrap_or_default();
    let query = target.split_once('?').map_or("", |(_, query)| query);
    let body = String::from_utf8(body).unwrap();
    let params = if request_line.starts_with("POST ") { body.as_str() } else { query };
    let param = |name: &str| -> Vec<String> {
        params.split('&').filter_map(|pair| pair.strip_prefix(name)?.strip_prefix('=')).map(percent_decode).collect()
    };
    let scopes = param("scope");
    let user = if request_line.starts_with("POST ") {
        if param("grant_type") != ["refresh_token"] || param("refresh_token") != [REFRESH_TOKEN] {
            return respond(stream, "401 Unauthorized", r#"{"details":"bad refresh token"}"#);
        }
        Some(USER)
    } else {
        match authorization.as_deref().and_then(|value| value.strip_prefix("Basic ")) {
            None => None,
            Some(encoded) if STANDARD.decode(encoded).ok() == Some(format!("{USER}:{PASSWORD}").into_bytes()) => {
                Some(USER)
            }
            Some(_) => return respond(stream, "401 Unauthorized", r#"{"details":"wrong credentials"}"#),
        }
    };
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|scope| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            let granted: Vec<&str> = if user.is_some() { actions.split(',').collect() } else { Vec::new() };
            Some(serde_json::json!({"type": kind, "name": name, "actions": granted}))
        })
        .collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [cert]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": user.unwrap_or(""), "aud": SERVICE, "exp": now + 600, "nbf": now - 60, "iat": now,
        "jti": format!("{now}-{}", kiln_requests.load(Ordering::SeqCst)), "access": access,
    });
    let signing_input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let signature = key.sign(&SystemRandom::new(), signing_input.as_bytes()).unwrap();
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()));
    respond(stream, "200 OK", &serde_json::json!({"token": token, "expires_in": 600}).to_string());
}

fn respond(mut stream: TcpStream, status: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'%' if at + 3 <= bytes.len() => {
                let hex = std::str::from_utf8(&bytes[at + 1..at + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                at += 3;
            }
            b'+' => {
                out.push(b' ');
                at += 1;
            }
            byte => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// One test's world: a temp dir, its PKI, the cached layout.
struct World {
    dir: TempDir,
    pki: Pki,
    layout: PathBuf,
}

impl World {
    /// `None` when a tool is missing (and tools are optional).
    fn new() -> Option<World> {
        let layout = test_layout()?;
        let dir = TempDir::new().unwrap();
        let pki = Pki::new(dir.path());
        Some(World { pki, layout, dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A TLS registry without auth, holding the layout's `amd64` and `multi`.
    fn tls_registry(&self) -> Registry {
        let registry = Registry::start(self.dir.path(), Some(&self.pki), Auth::Open);
        registry.push(&self.layout, "amd64", Some(&self.pki), None);
        registry.push(&self.layout, "multi", Some(&self.pki), None);
        registry
    }

    /// A client trusting the test CA, with credentials from `config` (a
    /// file that may not exist: then none), never the host's config.json.
    fn client(&self, config: &Path) -> RegistryClient {
        RegistryClient::builder().extra_ca_file(&self.pki.ca).docker_config(config).build().unwrap()
    }

    fn store(&self, name: &str) -> Store {
        Store::open(self.path(name)).unwrap()
    }

    /// Writes a config.json with `auths.<host>.auth` = base64(user:password).
    fn docker_config(&self, host: &str, user: &str, password: &str) -> PathBuf {
        let path = self.path(&format!("config-{user}-{password}.json"));
        let auth = STANDARD.encode(format!("{user}:{password}"));
        std::fs::write(&path, serde_json::json!({"auths": {host: {"auth": auth}}}).to_string()).unwrap();
        path
    }
}

fn pull(client: &RegistryClient, store: &Store, reference: &RegistryReference) -> kiln_oci::Result<kiln_oci::Image> {
    store.pull(&client.source(reference), &mut |_| {})
}

/// The kind and message of a registry error, its causes on lines after it (panics on any other).
fn registry_error(result: kiln_oci::Result<kiln_oci::Image>) -> (RegistryErrorKind, String) {
    match result {
        Err(error @ Error::Registry { .. }) => {
            let Error::Registry { kind, .. } = &error else { unreachable!() };
            let mut chain = String::new();
            let mut cause = std::error::Error::source(&error);
            while let Some(inner) = cause {
                chain += &format!("\n  caused by: {inner}");
                cause = inner.source();
            }
            (*kind, format!("{error}{chain}"))
        }
        Err(other) => panic!("not a registry error: {other}"),
        Ok(image) => panic!("pulled {} where an error was due", image.manifest_digest()),
    }
}

#[test]
fn tls_pull_trusts_the_given_ca_and_yields_the_layouts_image() {
    let Some(world) = World::new() else { return };
    let registry = world.tls_registry();
    let client = world.client(&world.path("no-config.json"));
    let store = world.store("store");
    let pulled = pull(&client, &store, &registry.reference(":amd64")).unwrap();

    // The same image through the layout (the sources' reader), byte for byte.
    let local_store = world.store("local");
    let source: ImageSource = format!("oci:{}:amd64", world.layout.display()).parse().unwrap();
    let local = local_store.pull(source.open().unwrap().as_ref(), &mut |_| {}).unwrap();
    assert_eq!(pulled.manifest_digest(), &layout_digest(&world.layout, "amd64"));
    assert_eq!(pulled.manifest_digest(), local.manifest_digest());
    assert_eq!(pulled.config_digest(), local.config_digest());
    assert_eq!(pulled.layers(), local.layers());
    assert_eq!(pulled.runtime().entrypoint(), ["/bin/busybox"]);
    for layer in pulled.layers() {
        let tar = std::fs::read(store.layer_path(layer.diff_id())).unwrap();
        assert_eq!(tar, std::fs::read(local_store.layer_path(layer.diff_id())).unwrap());
    }

    // Trusting nothing (no system roots, no CA), the same registry is refused as TLS.
    let untrusting =
        RegistryClient::builder().without_system_roots().docker_config(&world.path("no-config.json")).build().unwrap();
    let (kind, message) = registry_error(pull(&untrusting, &world.store("refused"), &registry.reference(":amd64")));
    assert_eq!(kind, RegistryErrorKind::Tls, "{message}");
    assert!(
        message.starts_with(&format!("Registry {}, repository {REPOSITORY}, amd64: ", registry.authority())),
        "{message}"
    );
}

#[test]
fn an_index_pulls_its_linux_amd64_manifest() {
    let Some(world) = World::new() else { return };
    let registry = world.tls_registry();
    let client = world.client(&world.path("no-config.json"));
    let pulled = pull(&client, &world.store("store"), &registry.reference(":multi")).unwrap();
    // arm64 is listed first in the index; amd64 is the one taken.
    assert_eq!(pulled.manifest_digest(), &layout_digest(&world.layout, "amd64"));
    assert_ne!(pulled.manifest_digest(), &layout_digest(&world.layout, "arm64"));
}

#[test]
fn a_manifest_by_digest_is_that_manifest() {
    let Some(world) = World::new() else { return };
    let registry = world.tls_registry();
    let client = world.client(&world.path("no-config.json"));
    let store = world.store("store");
    let digest = layout_digest(&world.layout, "amd64");
    let pulled = pull(&client, &store, &registry.reference(&format!("@{digest}"))).unwrap();
    assert_eq!(pulled.manifest_digest(), &digest);
    // The arm64 manifest has no tag there (only the index names it); by
    // digest it is fetched, config and all, and refused for its platform.
    let arm64 = layout_digest(&world.layout, "arm64");
    match pull(&client, &store, &registry.reference(&format!("@{arm64}"))) {
        Err(Error::NoMatchingPlatform { image, offered }) => {
            assert_eq!(image, format!("docker://{}/{REPOSITORY}@{arm64}", registry.authority()));
            assert_eq!(offered, "linux/arm64");
        }
        other => panic!("the arm64 manifest by digest: {other:?}"),
    }
    let absent = Digest::of(b"no such manifest");
    let (kind, message) = registry_error(pull(&client, &store, &registry.reference(&format!("@{absent}"))));
    assert_eq!(kind, RegistryErrorKind::NotFound);
    assert!(
        message.starts_with(&format!(
            "Registry {}, repository {REPOSITORY}, {absent}: not found (HTTP 404",
            registry.authority()
        )),
        "{message}"
    );
}

#[test]
fn an_unknown_tag_fails_naming_registry_repository_and_tag() {
    let Some(world) = World::new() else { return };
    let registry = world.tls_registry();
    let client = world.client(&world.path("no-config.json"));
    let store = world.store("store");
    let (kind, message) = registry_error(pull(&client, &store, &registry.reference(":nope")));
    assert_eq!(kind, RegistryErrorKind::NotFound);
    assert_eq!(
        message,
        format!(
            "Registry {}, repository {REPOSITORY}, nope: not found (HTTP 404, MANIFEST_UNKNOWN: manifest unknown)",
            registry.authority()
        )
    );
    let elsewhere: RegistryReference = format!("{}/test/absent:v1", registry.authority()).parse().unwrap();
    let (kind, message) = registry_error(pull(&client, &store, &elsewhere));
    assert_eq!(kind, RegistryErrorKind::NotFound);
    assert!(message.contains("repository test/absent, v1: not found (HTTP 404, "), "{message}");
}

/// A TLS registry with token auth, holding the layout's `amd64` (pushed by
/// skopeo through the same token server).
fn token_registry(world: &World) -> (Registry, TokenServer) {
    let server = TokenServer::start(&world.pki);
    let registry = Registry::start(world.dir.path(), Some(&world.pki), Auth::Token(&server, &world.pki));
    registry.push(&world.layout, "amd64", Some(&world.pki), Some(&format!("{USER}:{PASSWORD}")));
    (registry, server)
}

#[test]
fn token_auth_pulls_with_config_json_credentials_or_identity_token_asking_once() {
    let Some(world) = World::new() else { return };
    let (registry, server) = token_registry(&world);
    let config = world.docker_config(&registry.authority(), USER, PASSWORD);
    let client = RegistryClient::builder()
        .extra_ca_file(&world.pki.ca)
        .docker_config(&config)
        .insecure_registry(&format!("127.0.0.1:{}", server.port))
        .build()
        .unwrap();
    let pulled = pull(&client, &world.store("store"), &registry.reference(":amd64")).unwrap();
    assert_eq!(pulled.manifest_digest(), &layout_digest(&world.layout, "amd64"));
    // The manifest, the config and the layer: one token, reused.
    assert_eq!(server.kiln_requests.load(Ordering::SeqCst), 1);

    // An `identitytoken` is posted as an OAuth2 refresh token instead.
    let identity = world.path("identity.json");
    let entry = serde_json::json!({"auths": {registry.authority(): {"identitytoken": REFRESH_TOKEN}}});
    std::fs::write(&identity, entry.to_string()).unwrap();
    let client = RegistryClient::builder()
        .extra_ca_file(&world.pki.ca)
        .docker_config(&identity)
        .insecure_registry(&format!("127.0.0.1:{}", server.port))
        .build()
        .unwrap();
    let again = pull(&client, &world.store("identity"), &registry.reference(":amd64")).unwrap();
    assert_eq!(again.manifest_digest(), pulled.manifest_digest());
    assert_eq!(server.kiln_requests.load(Ordering::SeqCst), 2);
}

#[test]
fn wrong_credentials_are_refused_with_a_401_naming_the_registry() {
    let Some(world) = World::new() else { return };
    let (registry, server) = token_registry(&world);
    let token_host = format!("127.0.0.1:{}", server.port);
    let store = world.store("store");
    let client_with = |config: &Path| {
        RegistryClient::builder()
            .extra_ca_file(&world.pki.ca)
            .docker_config(config)
            .insecure_registry(&token_host)
            .build()
            .unwrap()
    };
    let wrong = world.docker_config(&registry.authority(), USER, "not-the-password");
    let (kind, message) = registry_error(pull(&client_with(&wrong), &store, &registry.reference(":amd64")));
    assert_eq!(kind, RegistryErrorKind::Unauthorized);
    assert_eq!(
        message,
        format!(
            "Registry {}, repository {REPOSITORY}, amd64: the token endpoint http://{token_host}/token refused user `{USER}` (HTTP 401)",
            registry.authority()
        )
    );
    // Anonymous: the token grants nothing and the registry says 401.
    let (kind, message) =
        registry_error(pull(&client_with(&world.path("no-config.json")), &store, &registry.reference(":amd64")));
    assert_eq!(kind, RegistryErrorKind::Unauthorized);
    assert!(
        message.starts_with(&format!(
            "Registry {}, repository {REPOSITORY}, amd64: unauthorized for anonymous pulls (HTTP 401, UNAUTHORIZED",
            registry.authority()
        )),
        "{message}"
    );
    // A plain-HTTP realm not named insecure: the credentials are not sent.
    let right = world.docker_config(&registry.authority(), USER, PASSWORD);
    let strict = RegistryClient::builder().extra_ca_file(&world.pki.ca).docker_config(&right).build().unwrap();
    let (kind, message) = registry_error(pull(&strict, &store, &registry.reference(":amd64")));
    assert_eq!(kind, RegistryErrorKind::Protocol);
    assert!(message.ends_with(&format!("is plain HTTP and `{token_host}` is not an insecure registry")), "{message}");
    assert_eq!(server.kiln_requests.load(Ordering::SeqCst), 2, "the strict client asked the token server");
    assert!(store.image(&layout_digest(&world.layout, "amd64")).unwrap().is_none());
}

#[test]
fn basic_auth_pulls_with_config_json_credentials_and_refuses_wrong_ones() {
    let Some(world) = World::new() else { return };
    let htpasswd = world.path("htpasswd");
    let entry = run(Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]));
    std::fs::write(&htpasswd, entry).unwrap();
    let registry = Registry::start(world.dir.path(), Some(&world.pki), Auth::Htpasswd(&htpasswd));
    registry.push(&world.layout, "amd64", Some(&world.pki), Some(&format!("{USER}:{PASSWORD}")));
    let store = world.store("store");
    let right = world.docker_config(&registry.authority(), USER, PASSWORD);
    let pulled = pull(&world.client(&right), &store, &registry.reference(":amd64")).unwrap();
    assert_eq!(pulled.manifest_digest(), &layout_digest(&world.layout, "amd64"));

    let wrong = world.docker_config(&registry.authority(), USER, "not-the-password");
    let (kind, message) =
        registry_error(pull(&world.client(&wrong), &world.store("wrong"), &registry.reference(":amd64")));
    assert_eq!(kind, RegistryErrorKind::Unauthorized);
    assert!(
        message.starts_with(&format!(
            "Registry {}, repository {REPOSITORY}, amd64: unauthorized for user `{USER}` (HTTP 401, UNAUTHORIZED",
            registry.authority()
        )),
        "{message}"
    );
    let (kind, message) = registry_error(pull(
        &world.client(&world.path("no-config.json")),
        &world.store("none"),
        &registry.reference(":amd64"),
    ));
    assert_eq!(kind, RegistryErrorKind::Unauthorized);
    assert!(message.ends_with("the registry asks for Basic credentials and config.json has none for it"), "{message}");
}

/// Answers every request with a 307 to the same path on `target`: a fake
/// front standing in for a registry that keeps its blobs elsewhere
/// (docker-registry's filesystem storage never redirects). Counts its answers.
fn redirecting_front(target: String) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let authority = listener.local_addr().unwrap().to_string();
    let redirects = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&redirects);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut request_line = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            reader.read_line(&mut request_line).unwrap();
            while reader.read_line(&mut String::new()).unwrap() > 2 {}
            let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
            counter.fetch_add(1, Ordering::SeqCst);
            let mut stream = stream;
            let _ = write!(
                stream,
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{target}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (authority, redirects)
}

#[test]
fn manifests_and_blobs_behind_a_redirect_are_followed_fake_redirecting_front() {
    let Some(world) = World::new() else { return };
    let registry = Registry::start(world.dir.path(), None, Auth::Open);
    registry.push(&world.layout, "amd64", None, None);
    let (front, redirects) = redirecting_front(registry.authority());
    let client = RegistryClient::builder()
        .insecure_registry(&front)
        .insecure_registry(&registry.authority())
        .docker_config(&world.path("no-config.json"))
        .build()
        .unwrap();
    let reference: RegistryReference = format!("{front}/{REPOSITORY}:amd64").parse().unwrap();
    let pulled = pull(&client, &world.store("store"), &reference).unwrap();
    assert_eq!(pulled.manifest_digest(), &layout_digest(&world.layout, "amd64"));
    // The manifest, the config and the one layer, each redirected once.
    assert_eq!(redirects.load(Ordering::SeqCst), 3);
}

#[test]
fn plain_http_is_spoken_only_to_a_registry_named_insecure() {
    let Some(world) = World::new() else { return };
    let registry = Registry::start(world.dir.path(), None, Auth::Open);
    registry.push(&world.layout, "amd64", None, None);
    let store = world.store("store");
    let (kind, message) =
        registry_error(pull(&world.client(&world.path("no-config.json")), &store, &registry.reference(":amd64")));
    assert_eq!(kind, RegistryErrorKind::Tls, "{message}");
    let insecure = RegistryClient::builder()
        .insecure_registry(&registry.authority())
        .docker_config(&world.path("no-config.json"))
        .build()
        .unwrap();
    let pulled = pull(&insecure, &store, &registry.reference(":amd64")).unwrap();
    assert_eq!(pulled.manifest_digest(), &layout_digest(&world.layout, "amd64"));
}

#[test]
fn a_ca_file_without_certificates_is_refused_naming_it() {
    let dir = TempDir::new().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let error = RegistryClient::builder().extra_ca_file(&not_pem).build().unwrap_err();
    assert_eq!(error.to_string(), format!("CA certificate file {}: holds no PEM certificate", not_pem.display()));
    let missing = dir.path().join("absent.pem");
    let error = RegistryClient::builder().extra_ca_file(&missing).build().unwrap_err();
    assert!(error.to_string().starts_with(&format!("CA certificate file {}: ", missing.display())), "{error}");
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"auths": {"r.example": {"auth": "%%%"}}}"#).unwrap();
    let error = RegistryClient::builder().docker_config(&config).build().unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with(&format!("Registry credentials in {}: auths.r.example.auth: not base64", config.display())),
        "{error}"
    );
}
