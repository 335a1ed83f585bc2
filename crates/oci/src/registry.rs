//! Pulling from a registry over the OCI distribution API: image references
//! (`host[:port]/path[:tag][@digest]`, with Docker Hub's defaults), and a
//! blocking client that fetches manifests and streams blobs over HTTPS,
//! answering Bearer and Basic challenges with credentials from a Docker
//! `config.json`.
//!
//! The client checks no digest: it hands bytes on, and the store verifies
//! them. Plain HTTP is used only for a registry named insecure.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use ureq::Agent;
use ureq::http::Response;
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

use crate::auth::{Challenge, Credentials, DockerConfig, parse_challenge, parse_token_answer};
use crate::{Error, RegistryErrorKind, Result};

/// Docker Hub's name in references, and the host its API answers on.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// The largest manifest or index read into memory (the distribution spec
/// asks registries to accept 4 MiB).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// The manifest kinds asked for, in order of preference.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// A parsed image reference: registry, repository, and a tag or a digest
/// (or both). Its display form parses back to itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryReference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl RegistryReference {
    /// Parses `host[:port]/path[:tag][@sha256:…]`. Without a host (the
    /// first component has no `.` or `:` and is not `localhost`), the
    /// registry is Docker Hub and a one-component path gets `library/`.
    /// Without a tag or digest, the tag is `latest`.
    pub fn parse(text: &str) -> Result<RegistryReference> {
        parse_reference(text).map_err(|reason| Error::BadReference { reference: text.to_owned(), reason })
    }

    /// The registry as written (`docker.io` for Docker Hub), `host[:port]`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path (`library/busybox`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if the reference has one.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The manifest digest, if the reference has one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// The same repository, pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: &str) -> Result<RegistryReference> {
        check_digest(digest).map_err(|reason| Error::BadReference { reference: digest.to_owned(), reason })?;
        Ok(RegistryReference { digest: Some(digest.to_owned()), ..self.clone() })
    }

    /// The host the API answers on (Docker Hub's differs from its name).
    fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB { DOCKER_HUB_API } else { &self.registry }
    }

    /// What goes after `/manifests/`: the digest if pinned, else the tag.
    fn manifest_reference(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }
}

impl fmt::Display for RegistryReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn parse_reference(text: &str) -> Result<RegistryReference, String> {
    let (name, digest) = match text.split_once('@') {
        Some((name, digest)) => {
            check_digest(digest)?;
            (name, Some(digest.to_owned()))
        }
        None => (text, None),
    };
    // A tag's colon comes after the last slash; a port's before it.
    let last_slash = name.rfind('/').map_or(0, |at| at + 1);
    let (name, tag) = match name[last_slash..].rfind(':') {
        Some(at) => {
            let tag = &name[last_slash + at + 1..];
            check_tag(tag)?;
            (&name[..last_slash + at], Some(tag.to_owned()))
        }
        None => (name, None),
    };
    let (registry, repository) = split_registry(name)?;
    for component in repository.split('/') {
        check_path_component(component)?;
    }
    let tag = if tag.is_none() && digest.is_none() { Some("latest".to_owned()) } else { tag };
    Ok(RegistryReference { registry, repository, tag, digest })
}

/// `host[:port]/path` → (registry, repository), applying Docker Hub's defaults.
fn split_registry(name: &str) -> Result<(String, String), String> {
    if name.is_empty() {
        return Err("no repository name".to_owned());
    }
    let (registry, path) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            check_host(first)?;
            (first.to_owned(), rest.to_owned())
        }
        _ => (DOCKER_HUB.to_owned(), name.to_owned()),
    };
    let registry = if registry == "index.docker.io" { DOCKER_HUB.to_owned() } else { registry };
    let path = if registry == DOCKER_HUB && !path.contains('/') { format!("library/{path}") } else { path };
    if path.len() > 255 {
        return Err("the repository name is longer than 255 characters".to_owned());
    }
    Ok((registry, path))
}

/// A host name or IP (IPv6 in brackets), with an optional port.
fn check_host(host: &str) -> Result<(), String> {
    let (name, port) = if let Some(bracketed) = host.strip_prefix('[') {
        let (address, after) = bracketed.split_once(']').ok_or_else(|| format!("unclosed `[` in host `{host}`"))?;
        address.parse::<std::net::Ipv6Addr>().map_err(|_| format!("`{address}` is not an IPv6 address"))?;
        (None, after.strip_prefix(':'))
    } else {
        match host.split_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    if let Some(port) = port {
        port.parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| format!("bad port `{port}` in host `{host}`"))?;
    }
    let labels_ok = name.is_none_or(|name| {
        !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    });
    if labels_ok { Ok(()) } else { Err(format!("`{host}` is not a valid registry host")) }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, the distribution spec's path component.
fn check_path_component(component: &str) -> Result<(), String> {
    let bad =
        || format!("`{component}` is not a valid repository path component (lowercase letters, digits, `.`, `_`, `-`)");
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.first().is_none_or(|b| !alnum(*b)) || bytes.last().is_none_or(|b| !alnum(*b)) {
        return Err(bad());
    }
    let mut at = 0;
    while at < bytes.len() {
        if alnum(bytes[at]) {
            at += 1;
            continue;
        }
        let start = at;
        while at < bytes.len() && !alnum(bytes[at]) {
            at += 1;
        }
        let separator = &component[start..at];
        if !(separator == "." || separator == "_" || separator == "__" || separator.bytes().all(|b| b == b'-')) {
            return Err(bad());
        }
    }
    Ok(())
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let ok = tag.len() <= 128
        && tag.chars().next().is_some_and(word)
        && tag.chars().all(|c| word(c) || c == '.' || c == '-');
    if ok { Ok(()) } else { Err(format!("`{tag}` is not a valid tag")) }
}

/// `sha256:` and 64 lowercase hex digits: the only digest kiln takes.
fn check_digest(digest: &str) -> Result<(), String> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| format!("digest `{digest}` is not sha256"))?;
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(format!("digest `{digest}` is not `sha256:` and 64 lowercase hex digits"))
    }
}

/// A manifest (or index) as the registry sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryManifest {
    /// The `Content-Type` the registry gave (`application/vnd.oci.image.manifest.v1+json`, …).
    pub media_type: String,
    /// The manifest's exact bytes: their sha256 is its digest.
    pub bytes: Vec<u8>,
    /// The registry's `Docker-Content-Digest`, if it sent one (unverified).
    pub claimed_digest: Option<String>,
}

/// A blob being streamed from the registry.
pub struct RegistryBlob {
    /// The blob's bytes, as they arrive (unverified).
    pub reader: Box<dyn Read + Send>,
    /// The `Content-Length`, if the registry sent one.
    pub size: Option<u64>,
}

impl fmt::Debug for RegistryBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryBlob").field("size", &self.size).finish_non_exhaustive()
    }
}

/// Builds a [`RegistryClient`]: which registries speak plain HTTP, extra
/// CA certificates, and where credentials come from.
#[derive(Debug, Clone, Default)]
pub struct RegistryClientBuilder {
    insecure: Vec<String>,
    ca_files: Vec<PathBuf>,
    docker_config: Option<PathBuf>,
    no_system_roots: bool,
}

impl RegistryClientBuilder {
    /// Speak plain HTTP to `host[:port]` (a registry, or a token
    /// endpoint's authority). Nothing else ever gets HTTP.
    pub fn insecure_registry(mut self, host: &str) -> Self {
        self.insecure.push(host.to_ascii_lowercase());
        self
    }

    /// Trust the CA certificates (PEM) in `path` as well as the system's.
    pub fn extra_ca_file(mut self, path: &Path) -> Self {
        self.ca_files.push(path.to_owned());
        self
    }

    /// Read credentials from this `config.json` instead of Docker's default
    /// (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`).
    pub fn docker_config(mut self, path: &Path) -> Self {
        self.docker_config = Some(path.to_owned());
        self
    }

    /// Trust only the extra CA files, not the system's roots.
    pub fn without_system_roots(mut self) -> Self {
        self.no_system_roots = true;
        self
    }

    /// Reads the CA files and the credentials; errors name the file at fault.
    pub fn build(self) -> Result<RegistryClient> {
        let mut roots = Vec::new();
        if !self.no_system_roots {
            // Unreadable entries of the system store are skipped, as every client does.
            roots.extend(
                rustls_native_certs::load_native_certs()
                    .certs
                    .into_iter()
                    .map(|der| Certificate::from_der(&der).to_owned()),
            );
        }
        for path in &self.ca_files {
            roots.extend(read_ca_file(path)?);
        }
        let docker_config = match self.docker_config.or_else(DockerConfig::default_path) {
            Some(path) => DockerConfig::load(&path)?,
            None => DockerConfig::default(),
        };
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::Specific(Arc::new(roots)))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let agent = |https_only: bool| -> Agent {
            Agent::config_builder()
                .tls_config(tls.clone())
                .http_status_as_error(false)
                .https_only(https_only)
                .timeout_connect(Some(Duration::from_secs(30)))
                .timeout_recv_response(Some(Duration::from_secs(60)))
                .timeout_per_read(Some(Duration::from_secs(60)))
                .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        };
        Ok(RegistryClient {
            agent: agent(true),
            insecure_agent: agent(false),
            insecure: self.insecure,
            docker_config,
            tokens: Mutex::default(),
        })
    }
}

fn read_ca_file(path: &Path) -> Result<Vec<Certificate<'static>>> {
    let bad = |reason: String| Error::CaFile { path: path.to_owned(), reason };
    let pem = std::fs::read(path).map_err(|error| bad(error.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(cert) = item.map_err(|error| bad(error.to_string()))? {
            certs.push(cert);
        }
    }
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".to_owned()));
    }
    Ok(certs)
}

/// A blocking client for the distribution API. Tokens are kept per
/// authority and scope for the client's life, so a pull asks once.
pub struct RegistryClient {
    /// HTTPS only, redirects included.
    agent: Agent,
    /// For the hosts named insecure: HTTP allowed.
    insecure_agent: Agent,
    insecure: Vec<String>,
    docker_config: DockerConfig,
    /// `Authorization` values by (API host, scope).
    tokens: Mutex<HashMap<(String, String), String>>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient").field("insecure", &self.insecure).finish_non_exhaustive()
    }
}

/// The distribution API's error body: `{"errors":[{"code","message"}]}`.
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Which request failed, for the error: registry, repository, reference.
struct Target<'a> {
    reference: &'a RegistryReference,
    what: String,
}

impl Target<'_> {
    fn error(&self, kind: RegistryErrorKind, message: String) -> Error {
        self.error_from(kind, message, None)
    }

    fn error_from(
        &self,
        kind: RegistryErrorKind,
        message: String,
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::Registry {
            registry: self.reference.registry.clone(),
            repository: self.reference.repository.clone(),
            reference: self.what.clone(),
            kind,
            message,
            source,
        }
    }
}

impl RegistryClient {
    /// A client with the system roots and Docker's default `config.json`.
    pub fn new() -> Result<RegistryClient> {
        RegistryClient::builder().build()
    }

    /// See [`RegistryClientBuilder`].
    pub fn builder() -> RegistryClientBuilder {
        RegistryClientBuilder::default()
    }

    /// `GET /v2/<name>/manifests/<digest or tag>`, accepting OCI and
    /// Docker manifests and indexes.
    pub fn manifest(&self, reference: &RegistryReference) -> Result<RegistryManifest> {
        let target = Target { reference, what: reference.manifest_reference().to_owned() };
        let path = format!("manifests/{}", reference.manifest_reference());
        let response = self.get(&target, &path, MANIFEST_ACCEPT)?;
        let header = |name: &str| response.headers().get(name).and_then(|value| value.to_str().ok()).map(str::to_owned);
        let media_type = header("content-type")
            .map(|value| value.split(';').next().unwrap_or_default().trim().to_owned())
            .unwrap_or_default();
        let claimed_digest = header("docker-content-digest");
        let bytes = response.into_body().with_config().limit(MAX_MANIFEST_BYTES).read_to_vec().map_err(|error| {
            target.error_from(
                RegistryErrorKind::Transport,
                "reading the manifest failed".to_owned(),
                Some(Box::new(error)),
            )
        })?;
        Ok(RegistryManifest { media_type, bytes, claimed_digest })
    }

    /// `GET /v2/<name>/blobs/<digest>`, following redirects (without the
    /// registry's credentials), streamed.
    pub fn blob(&self, reference: &RegistryReference, digest: &str) -> Result<RegistryBlob> {
        let target = Target { reference, what: digest.to_owned() };
        check_digest(digest).map_err(|reason| target.error(RegistryErrorKind::Protocol, reason))?;
        let response = self.get(&target, &format!("blobs/{digest}"), "*/*")?;
        let size = response
            .headers()
            .get("content-length")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse().ok());
        Ok(RegistryBlob { reader: Box::new(response.into_body().into_reader()), size })
    }

    fn is_insecure(&self, authority: &str) -> bool {
        self.insecure.iter().any(|host| host.eq_ignore_ascii_case(authority))
    }

    fn agent_for(&self, authority: &str) -> &Agent {
        if self.is_insecure(authority) { &self.insecure_agent } else { &self.agent }
    }

    /// One GET with the cached authorization; on 401, answers the challenge
    /// once and retries. Any status but 200 becomes an error naming it.
    fn get(&self, target: &Target<'_>, path: &str, accept: &str) -> Result<Response<ureq::Body>> {
        let host = target.reference.api_host();
        let scheme = if self.is_insecure(host) { "http" } else { "https" };
        let url = format!("{scheme}://{host}/v2/{}/{path}", target.reference.repository);
        let scope = format!("repository:{}:pull", target.reference.repository);
        let key = (host.to_owned(), scope.clone());
        let cached = self.tokens.lock().unwrap_or_else(PoisonError::into_inner).get(&key).cloned();
        let mut response = self.send(target, &url, accept, cached.as_deref())?;
        if response.status() == 401 {
            let authorization = self.answer_challenge(target, &response, &scope)?;
            response = self.send(target, &url, accept, Some(&authorization))?;
            if response.status() == 401 {
                let who = self.credentials(target).map_or("anonymous pulls".to_owned(), Credentials::describe);
                let detail = registry_error_detail(response);
                return Err(
                    target.error(RegistryErrorKind::Unauthorized, format!("unauthorized for {who} (HTTP 401{detail})"))
                );
            }
            self.tokens.lock().unwrap_or_else(PoisonError::into_inner).insert(key, authorization);
        }
        match response.status().as_u16() {
            200 => Ok(response),
            status => Err(status_error(target, status, response)),
        }
    }

    fn send(
        &self,
        target: &Target<'_>,
        url: &str,
        accept: &str,
        authorization: Option<&str>,
    ) -> Result<Response<ureq::Body>> {
        let mut request = self.agent_for(target.reference.api_host()).get(url).header("Accept", accept);
        if let Some(authorization) = authorization {
            request = request.header("Authorization", authorization);
        }
        request.call().map_err(|error| transport_error(target, url, error))
    }

    fn credentials(&self, target: &Target<'_>) -> Option<&Credentials> {
        self.docker_config.credentials_for(&target.reference.registry)
    }

    /// The `Authorization` value that answers a 401's challenge: a bearer
    /// token from the realm, or Basic credentials.
    fn answer_challenge(&self, target: &Target<'_>, response: &Response<ureq::Body>, scope: &str) -> Result<String> {
        let header =
            response.headers().get("www-authenticate").and_then(|value| value.to_str().ok()).ok_or_else(|| {
                target
                    .error(RegistryErrorKind::Unauthorized, "HTTP 401 without a WWW-Authenticate challenge".to_owned())
            })?;
        let challenge = parse_challenge(header).map_err(|reason| {
            target.error(RegistryErrorKind::Protocol, format!("bad WWW-Authenticate `{header}`: {reason}"))
        })?;
        let credentials = self.credentials(target);
        match challenge {
            Challenge::Basic => credentials.and_then(Credentials::basic_header).ok_or_else(|| {
                target.error(
                    RegistryErrorKind::Unauthorized,
                    "the registry asks for Basic credentials and config.json has none for it".to_owned(),
                )
            }),
            Challenge::Bearer { realm, service, scope: challenge_scope } => {
                let scope = challenge_scope.as_deref().unwrap_or(scope);
                self.fetch_token(target, &realm, service.as_deref(), scope, credentials)
                    .map(|token| format!("Bearer {token}"))
            }
        }
    }

    /// The token dance: GET the realm with Basic credentials (or none), or
    /// POST an identity token as an OAuth2 refresh token.
    fn fetch_token(
        &self,
        target: &Target<'_>,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        credentials: Option<&Credentials>,
    ) -> Result<String> {
        let authority = realm_authority(realm).ok_or_else(|| {
            target.error(RegistryErrorKind::Protocol, format!("token realm `{realm}` is not an http(s) URL"))
        })?;
        if realm.starts_with("http://") && !self.is_insecure(authority) {
            return Err(target.error(
                RegistryErrorKind::Protocol,
                format!("token realm `{realm}` is plain HTTP and `{authority}` is not an insecure registry"),
            ));
        }
        let response = match credentials {
            Some(Credentials::IdentityToken { token }) => {
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token.as_str()),
                    ("client_id", "kiln"),
                    ("scope", scope),
                ];
                form.extend(service.map(|service| ("service", service)));
                self.agent_for(authority).post(realm).send_form(form)
            }
            _ => {
                let mut request = self.agent_for(authority).get(realm).query("scope", scope);
                if let Some(service) = service {
                    request = request.query("service", service);
                }
                if let Some(header) = credentials.and_then(Credentials::basic_header) {
                    request = request.header("Authorization", header);
                }
                request.call()
            }
        }
        .map_err(|error| transport_error(target, realm, error))?;
        let status = response.status().as_u16();
        if status != 200 {
            let who = credentials.map_or("anonymous pulls".to_owned(), Credentials::describe);
            let kind = if status == 401 || status == 403 {
                RegistryErrorKind::Unauthorized
            } else {
                RegistryErrorKind::Status
            };
            return Err(target.error(kind, format!("the token endpoint {realm} refused {who} (HTTP {status})")));
        }
        let body = response.into_body().with_config().limit(1 << 20).read_to_vec().map_err(|error| {
            target.error_from(
                RegistryErrorKind::Transport,
                format!("reading the token from {realm} failed"),
                Some(Box::new(error)),
            )
        })?;
        parse_token_answer(&body)
            .map_err(|reason| target.error(RegistryErrorKind::Protocol, format!("{realm}: {reason}")))
    }
}

/// `http(s)://authority/…` → `authority`.
fn realm_authority(realm: &str) -> Option<&str> {
    let rest = realm.strip_prefix("https://").or_else(|| realm.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    (!authority.is_empty()).then_some(authority)
}

/// `, CODE: message` from a distribution error body, or nothing.
fn registry_error_detail(response: Response<ureq::Body>) -> String {
    let Ok(body) = response.into_body().with_config().limit(64 << 10).read_to_vec() else { return String::new() };
    let Ok(parsed) = serde_json::from_slice::<ErrorBody>(&body) else { return String::new() };
    parsed.errors.iter().map(|entry| format!(", {}: {}", entry.code, entry.message)).collect()
}

fn status_error(target: &Target<'_>, status: u16, response: Response<ureq::Body>) -> Error {
    let detail = registry_error_detail(response);
    let (kind, what) = match status {
        404 => (RegistryErrorKind::NotFound, "not found"),
        401 => (RegistryErrorKind::Unauthorized, "unauthorized"),
        403 => (RegistryErrorKind::Unauthorized, "access denied"),
        429 => (RegistryErrorKind::Status, "too many requests"),
        _ => (RegistryErrorKind::Status, "unexpected answer"),
    };
    target.error(kind, format!("{what} (HTTP {status}{detail})"))
}

fn transport_error(target: &Target<'_>, url: &str, error: ureq::Error) -> Error {
    let kind = match &error {
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => RegistryErrorKind::Tls,
        ureq::Error::RequireHttpsOnly(_) | ureq::Error::TooManyRedirects | ureq::Error::RedirectFailed => {
            RegistryErrorKind::Protocol
        }
        _ => RegistryErrorKind::Transport,
    };
    target.error_from(kind, format!("request to {url} failed"), Some(Box::new(error)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parts(text: &str) -> (String, String, Option<String>, Option<String>) {
        let parsed = RegistryReference::parse(text).unwrap();
        (parsed.registry, parsed.repository, parsed.tag, parsed.digest)
    }

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_get_docker_hubs_defaults_and_keep_hosts_ports_tags_digests() {
        let own = |s: &str| Some(s.to_owned());
        assert_eq!(parts("busybox"), ("docker.io".into(), "library/busybox".into(), own("latest"), None));
        assert_eq!(parts("docker.io/busybox:1.36"), ("docker.io".into(), "library/busybox".into(), own("1.36"), None));
        assert_eq!(parts("index.docker.io/me/app"), ("docker.io".into(), "me/app".into(), own("latest"), None));
        assert_eq!(parts("me/app:v1"), ("docker.io".into(), "me/app".into(), own("v1"), None));
        assert_eq!(parts("localhost/app"), ("localhost".into(), "app".into(), own("latest"), None));
        assert_eq!(parts("127.0.0.1:5000/a/b:t"), ("127.0.0.1:5000".into(), "a/b".into(), own("t"), None));
        assert_eq!(parts(&format!("[::1]:5000/a@{DIGEST}")), ("[::1]:5000".into(), "a".into(), None, own(DIGEST)));
        assert_eq!(parts(&format!("r.example/a:t@{DIGEST}")), ("r.example".into(), "a".into(), own("t"), own(DIGEST)));
        assert_eq!(RegistryReference::parse("busybox").unwrap().api_host(), "registry-1.docker.io");
        assert_eq!(RegistryReference::parse("r.example:443/x").unwrap().api_host(), "r.example:443");
    }

    #[test]
    fn bad_references_are_refused_naming_the_fault() {
        let reason = |text: &str| match RegistryReference::parse(text) {
            Err(Error::BadReference { reference, reason }) => {
                assert_eq!(reference, text);
                reason
            }
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(reason(""), "no repository name");
        assert_eq!(
            reason("Busybox"),
            "`Busybox` is not a valid repository path component (lowercase letters, digits, `.`, `_`, `-`)"
        );
        assert_eq!(
            reason("a//b"),
            "`` is not a valid repository path component (lowercase letters, digits, `.`, `_`, `-`)"
        );
        assert_eq!(reason("a:-x"), "`-x` is not a valid tag");
        assert_eq!(reason("a@md5:00"), "digest `md5:00` is not sha256");
        assert_eq!(reason("a@sha256:AB"), "digest `sha256:AB` is not `sha256:` and 64 lowercase hex digits");
        assert_eq!(reason("r.example:99999/a"), "bad port `99999` in host `r.example:99999`");
        assert_eq!(reason("-bad.example/a"), "`-bad.example` is not a valid registry host");
        assert_eq!(reason("[::1/a"), "unclosed `[` in host `[::1`");
        assert_eq!(
            reason("a..b"),
            "`a..b` is not a valid repository path component (lowercase letters, digits, `.`, `_`, `-`)"
        );
    }

    #[test]
    fn realm_authorities_are_the_host_and_port() {
        assert_eq!(realm_authority("https://auth.docker.io/token"), Some("auth.docker.io"));
        assert_eq!(realm_authority("http://127.0.0.1:8080?x=1"), Some("127.0.0.1:8080"));
        assert_eq!(realm_authority("http://u@h:1/t"), Some("h:1"));
        assert_eq!(realm_authority("ftp://h/"), None);
    }

    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,4}((\\.|_|__|-{1,2})[a-z0-9]{1,4}){0,2}"
    }

    fn reference() -> impl Strategy<Value = RegistryReference> {
        let registry = prop_oneof![
            Just("docker.io".to_owned()),
            Just("localhost".to_owned()),
            "[a-z][a-z0-9-]{0,5}[a-z0-9]\\.[a-z]{2,4}(:[1-9][0-9]{0,3})?",
            "127\\.0\\.0\\.1:[1-9][0-9]{0,3}",
        ];
        let digest = proptest::option::of("[0-9a-f]{64}".prop_map(|hex| format!("sha256:{hex}")));
        let tag = proptest::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}");
        (registry, proptest::collection::vec(component(), 1..4), tag, digest).prop_map(
            |(registry, path, tag, digest)| {
                let mut repository = path.join("/");
                if registry == DOCKER_HUB && path.len() == 1 {
                    repository = format!("library/{repository}");
                }
                let tag = if tag.is_none() && digest.is_none() { Some("latest".to_owned()) } else { tag };
                RegistryReference { registry, repository, tag, digest }
            },
        )
    }

    proptest! {
        #[test]
        fn a_reference_displayed_parses_back_to_itself(reference in reference()) {
            let shown = reference.to_string();
            prop_assert_eq!(RegistryReference::parse(&shown).unwrap(), reference);
        }
    }
}
