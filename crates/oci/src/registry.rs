//! Pulling from a registry over the OCI distribution API: a blocking
//! client that fetches manifests and streams blobs over HTTPS for the
//! references source.rs parses (Docker Hub asked on its API host),
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
use crate::source::{BlobSource, Fetched, MANIFEST_LIMIT, RegistryReference};
use crate::{Digest, Error, RegistryErrorKind, Result};

/// Docker Hub's name in references, and the host its API answers on.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// The manifest kinds asked for, in order of preference.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// The host a registry's API answers on: Docker Hub's differs from its name.
fn api_host(reference: &RegistryReference) -> &str {
    match reference.registry() {
        DOCKER_HUB | "index.docker.io" => DOCKER_HUB_API,
        registry => registry,
    }
}

/// What goes after `/manifests/`: the digest if pinned, else the tag.
fn manifest_reference(reference: &RegistryReference) -> String {
    match (reference.digest(), reference.tag()) {
        (Some(digest), _) => digest.to_string(),
        (None, Some(tag)) => tag.to_owned(),
        (None, None) => "latest".to_owned(),
    }
}

/// A manifest (or index) as the registry sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RegistryManifest {
    /// The `Content-Type` the registry gave, if any.
    pub(crate) media_type: Option<String>,
    /// The manifest's exact bytes: their sha256 is its digest.
    pub(crate) bytes: Vec<u8>,
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
            registry: self.reference.registry().to_owned(),
            repository: self.reference.repository().to_owned(),
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

    /// The image `reference` names on its registry, as a [`BlobSource`]
    /// for [`crate::Store::pull`]. Nothing is fetched yet.
    pub fn source<'a>(&'a self, reference: &RegistryReference) -> RegistrySource<'a> {
        RegistrySource { client: self, reference: reference.clone(), name: format!("docker://{reference}") }
    }

    /// `GET /v2/<name>/manifests/<digest or tag>`, accepting OCI and
    /// Docker manifests and indexes.
    fn manifest(&self, reference: &RegistryReference, digest_or_tag: &str) -> Result<RegistryManifest> {
        let target = Target { reference, what: digest_or_tag.to_owned() };
        let response = self.get(&target, &format!("manifests/{digest_or_tag}"), MANIFEST_ACCEPT)?;
        let media_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .map(|value| value.split(';').next().unwrap_or_default().trim().to_owned())
            .filter(|value| !value.is_empty());
        let bytes = response.into_body().with_config().limit(MANIFEST_LIMIT).read_to_vec().map_err(|error| {
            let message = format!("reading the manifest failed (at most {MANIFEST_LIMIT} bytes are read)");
            target.error_from(RegistryErrorKind::Transport, message, Some(Box::new(error)))
        })?;
        Ok(RegistryManifest { media_type, bytes })
    }

    /// `GET /v2/<name>/blobs/<digest>`, following redirects (without the
    /// registry's credentials), streamed.
    fn blob(&self, reference: &RegistryReference, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        let target = Target { reference, what: digest.to_string() };
        let response = self.get(&target, &format!("blobs/{digest}"), "*/*")?;
        Ok(Box::new(response.into_body().into_reader()))
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
        let host = api_host(target.reference);
        let scheme = if self.is_insecure(host) { "http" } else { "https" };
        let url = format!("{scheme}://{host}/v2/{}/{path}", target.reference.repository());
        let scope = format!("repository:{}:pull", target.reference.repository());
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
        let mut request = self.agent_for(api_host(target.reference)).get(url).header("Accept", accept);
        if let Some(authorization) = authorization {
            request = request.header("Authorization", authorization);
        }
        request.call().map_err(|error| transport_error(target, url, error))
    }

    fn credentials(&self, target: &Target<'_>) -> Option<&Credentials> {
        self.docker_config.credentials_for(target.reference.registry())
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

/// One image on a registry, read through a [`RegistryClient`]: the
/// [`BlobSource`] of `docker://REF` sources.
#[derive(Debug)]
pub struct RegistrySource<'a> {
    client: &'a RegistryClient,
    reference: RegistryReference,
    name: String,
}

impl BlobSource for RegistrySource<'_> {
    fn name(&self) -> &str {
        &self.name
    }

    fn root(&self) -> Result<Fetched> {
        let fetched = self.client.manifest(&self.reference, &manifest_reference(&self.reference))?;
        let fetched = Fetched::new(fetched.bytes, fetched.media_type);
        // A reference by digest pins the bytes; the caller checks them.
        Ok(match self.reference.digest() {
            Some(digest) => fetched.expecting(*digest, None),
            None => fetched,
        })
    }

    fn manifest(&self, digest: &Digest) -> Result<Fetched> {
        let fetched = self.client.manifest(&self.reference, &digest.to_string())?;
        Ok(Fetched::new(fetched.bytes, fetched.media_type).expecting(*digest, None))
    }

    fn blob(&self, digest: &Digest) -> Result<Box<dyn Read + '_>> {
        Ok(self.client.blob(&self.reference, digest)?)
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
    match response.into_body().with_config().limit(64 << 10).read_to_vec() {
        Ok(body) => error_detail(&body),
        Err(_) => String::new(),
    }
}

fn error_detail(body: &[u8]) -> String {
    let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) else { return String::new() };
    parsed.errors.iter().map(|entry| format!(", {}: {}", entry.code, entry.message)).collect()
}

/// The registry client's readers of untrusted bytes, for the fuzz targets only.
pub(crate) mod fuzzing {
    /// A Bearer challenge's `realm`, `service` and `scope`.
    pub type Bearer = (String, Option<String>, Option<String>);

    /// A `WWW-Authenticate` value → (`realm`, `service`, `scope`) of a
    /// Bearer challenge, `None` for Basic, or the parse error.
    pub fn parse_challenge(header: &str) -> Result<Option<Bearer>, String> {
        Ok(match crate::auth::parse_challenge(header)? {
            crate::auth::Challenge::Bearer { realm, service, scope } => Some((realm, service, scope)),
            crate::auth::Challenge::Basic => None,
        })
    }

    /// A Docker `config.json`: whether it parses.
    pub fn parse_docker_config(bytes: &[u8]) -> Result<(), String> {
        crate::auth::DockerConfig::parse(bytes).map(drop)
    }

    /// A token endpoint's answer → the token.
    pub fn parse_token_answer(bytes: &[u8]) -> Result<String, String> {
        crate::auth::parse_token_answer(bytes)
    }

    /// A distribution error body → the detail put in messages.
    pub fn error_detail(bytes: &[u8]) -> String {
        super::error_detail(bytes)
    }
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
    // rustls' handshake errors reach ureq wrapped in an io::Error.
    let wrapped_tls =
        |io: &std::io::Error| io.get_ref().is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
    let kind = match &error {
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => RegistryErrorKind::Tls,
        ureq::Error::Io(io) if wrapped_tls(io) => RegistryErrorKind::Tls,
        ureq::Error::RequireHttpsOnly(_) | ureq::Error::TooManyRedirects | ureq::Error::RedirectFailed => {
            RegistryErrorKind::Protocol
        }
        _ => RegistryErrorKind::Transport,
    };
    let message = match kind {
        RegistryErrorKind::Tls => format!("the TLS handshake for {url} failed (is the registry's CA trusted?)"),
        _ => format!("request to {url} failed"),
    };
    target.error_from(kind, message, Some(Box::new(error)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn docker_hub_is_asked_on_its_api_host_and_others_on_their_own() {
        let host = |text: &str| api_host(&text.parse().unwrap()).to_owned();
        assert_eq!(host("busybox"), "registry-1.docker.io");
        assert_eq!(host("docker.io/me/app:1"), "registry-1.docker.io");
        assert_eq!(host("127.0.0.1:5000/a/b"), "127.0.0.1:5000");
        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(manifest_reference(&format!("r.example/a:t@{digest}").parse().unwrap()), digest);
        assert_eq!(manifest_reference(&"r.example/a".parse().unwrap()), "latest");
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

    /// Reference texts in the grammar: host[:port]/path[:tag][@digest].
    fn reference_text() -> impl Strategy<Value = String> {
        let registry = prop_oneof![
            Just(String::new()),
            Just("docker.io/".to_owned()),
            Just("localhost/".to_owned()),
            "[a-z][a-z0-9-]{0,5}[a-z0-9]\\.[a-z]{2,4}(:[1-9][0-9]{0,3})?/",
            "127\\.0\\.0\\.1:[1-9][0-9]{0,3}/",
        ];
        let tag = proptest::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}");
        let digest = proptest::option::of("[0-9a-f]{64}");
        (registry, proptest::collection::vec(component(), 1..4), tag, digest).prop_map(
            |(registry, path, tag, digest)| {
                let tag = tag.map(|tag| format!(":{tag}")).unwrap_or_default();
                let digest = digest.map(|hex| format!("@sha256:{hex}")).unwrap_or_default();
                format!("{registry}{}{tag}{digest}", path.join("/"))
            },
        )
    }

    proptest! {
        /// What the client puts in URLs comes from a reference that
        /// displays and parses back to itself.
        #[test]
        fn a_reference_displayed_parses_back_to_itself(text in reference_text()) {
            let reference: RegistryReference = text.parse().unwrap();
            let again: RegistryReference = reference.to_string().parse().unwrap();
            prop_assert_eq!(&again, &reference);
            prop_assert!(!reference.repository().is_empty());
            prop_assert!(reference.tag().is_some() || reference.digest().is_some());
        }
    }
}
