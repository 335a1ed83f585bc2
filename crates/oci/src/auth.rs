//! Registry credentials and challenges: a Docker `config.json`'s `auths`
//! entries, the `WWW-Authenticate` challenges of the distribution API
//! (`Bearer realm=…,service=…,scope=…` and `Basic`), and the token
//! endpoint's answer. Pure parsing only; registry.rs does the requests.
//!
//! Credential helpers (`credsStore`, `credHelpers`) are not run: kiln
//! spawns no program to read a secret. An entry with neither `auth` nor
//! `identitytoken` counts as no credentials.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use crate::{Error, Result};

/// What a registry or its token endpoint is told about who pulls.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Credentials {
    /// `auths.<host>.auth`: base64 of `user:password`, sent as Basic.
    Basic { username: String, password: String },
    /// `auths.<host>.identitytoken`: an OAuth2 refresh token for the token endpoint.
    IdentityToken { token: String },
}

impl Credentials {
    /// The value of an `Authorization: Basic …` header, for Basic credentials.
    pub(crate) fn basic_header(&self) -> Option<String> {
        match self {
            Credentials::Basic { username, password } => {
                Some(format!("Basic {}", STANDARD.encode(format!("{username}:{password}"))))
            }
            Credentials::IdentityToken { .. } => None,
        }
    }

    /// Who is asking, for error messages (never the secret).
    pub(crate) fn describe(&self) -> String {
        match self {
            Credentials::Basic { username, .. } => format!("user `{username}`"),
            Credentials::IdentityToken { .. } => "an identity token".to_owned(),
        }
    }
}

/// Secrets stay out of logs and error chains.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({})", self.describe())
    }
}

/// The `auths` of one Docker `config.json`, keyed by normalised host.
#[derive(Debug, Clone, Default)]
pub(crate) struct DockerConfig {
    auths: BTreeMap<String, Credentials>,
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl DockerConfig {
    /// The file Docker itself reads: `$DOCKER_CONFIG/config.json`, else
    /// `$HOME/.docker/config.json`.
    pub(crate) fn default_path() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|dir| !dir.is_empty()) {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        std::env::var_os("HOME")
            .filter(|home| !home.is_empty())
            .map(|home| PathBuf::from(home).join(".docker/config.json"))
    }

    /// Reads `path`; a missing file means no credentials, a malformed one
    /// is an error naming it.
    pub(crate) fn load(path: &Path) -> Result<DockerConfig> {
        match std::fs::read(path) {
            Ok(bytes) => {
                DockerConfig::parse(&bytes).map_err(|reason| Error::DockerConfig { path: path.to_owned(), reason })
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(DockerConfig::default()),
            Err(error) => Err(Error::DockerConfig { path: path.to_owned(), reason: error.to_string() }),
        }
    }

    /// Parses a `config.json`'s text; the error says what is wrong in it.
    pub(crate) fn parse(bytes: &[u8]) -> Result<DockerConfig, String> {
        let file: ConfigFile =
            serde_json::from_slice(bytes).map_err(|error| format!("not a Docker config.json: {error}"))?;
        let mut auths = BTreeMap::new();
        for (key, entry) in file.auths {
            let credentials = if let Some(token) = entry.identitytoken.filter(|token| !token.is_empty()) {
                Credentials::IdentityToken { token }
            } else if let Some(auth) = entry.auth.filter(|auth| !auth.is_empty()) {
                decode_auth(&auth).map_err(|reason| format!("auths.{key}.auth: {reason}"))?
            } else {
                continue;
            };
            auths.insert(normalise_config_key(&key), credentials);
        }
        Ok(DockerConfig { auths })
    }

    /// The credentials for registry `host` (`host[:port]` as in a reference).
    pub(crate) fn credentials_for(&self, host: &str) -> Option<&Credentials> {
        self.auths.get(&normalise_config_key(host))
    }
}

/// `base64(user:password)` → Basic credentials.
fn decode_auth(auth: &str) -> Result<Credentials, String> {
    let bytes = STANDARD.decode(auth.trim()).map_err(|error| format!("not base64: {error}"))?;
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 once decoded".to_owned())?;
    let (username, password) = text.split_once(':').ok_or("decodes to no `user:password`")?;
    Ok(Credentials::Basic { username: username.to_owned(), password: password.to_owned() })
}

/// `https://index.docker.io/v1/`, `http://host:5000`, `host:5000/` → the
/// bare authority; Docker Hub's several names → `docker.io`.
fn normalise_config_key(key: &str) -> String {
    let rest = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let authority = rest.split('/').next().unwrap_or(rest).to_ascii_lowercase();
    match authority.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".to_owned(),
        _ => authority,
    }
}

/// One `WWW-Authenticate` challenge a registry answered 401 with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// Get a token from `realm` for `service` and `scope`, then retry with it.
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
    /// Retry with Basic credentials.
    Basic,
}

/// Parses a `WWW-Authenticate` value (RFC 7235 auth-params, quoted or
/// token values); the first Bearer or Basic challenge wins.
pub(crate) fn parse_challenge(header: &str) -> Result<Challenge, String> {
    let header = header.trim();
    let (scheme, params) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Ok(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(format!("unsupported authentication scheme `{scheme}`"));
    }
    let params = parse_auth_params(params)?;
    let realm = params.get("realm").cloned().ok_or("a Bearer challenge without a realm")?;
    Ok(Challenge::Bearer { realm, service: params.get("service").cloned(), scope: params.get("scope").cloned() })
}

/// `key="value", key=token, …` → a map with lower-case keys.
fn parse_auth_params(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut params = BTreeMap::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=').ok_or_else(|| format!("malformed auth parameter `{rest}`"))?;
        let after = after.trim_start();
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            take_quoted(quoted)?
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.insert(key.trim().to_ascii_lowercase(), value);
        rest = after.trim_start().trim_start_matches(',').trim_start();
    }
    Ok(params)
}

/// The rest of a quoted string (after its opening quote): its value with
/// `\` escapes undone, and the text after the closing quote.
fn take_quoted(text: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[at + 1..])),
            '\\' => value.push(chars.next().map(|(_, escaped)| escaped).ok_or("a dangling `\\` in a quoted string")?),
            _ => value.push(c),
        }
    }
    Err("an unterminated quoted string".to_owned())
}

/// The token endpoint's JSON answer: `token` (Docker) or `access_token` (OAuth2).
#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// The bearer token in a token endpoint's answer.
pub(crate) fn parse_token_answer(body: &[u8]) -> Result<String, String> {
    let answer: TokenAnswer =
        serde_json::from_slice(body).map_err(|error| format!("the token answer is not JSON: {error}"))?;
    answer
        .token
        .filter(|token| !token.is_empty())
        .or(answer.access_token.filter(|token| !token.is_empty()))
        .ok_or_else(|| "the token answer holds no `token` or `access_token`".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_give_realm_service_and_scope() {
        let header = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#;
        assert_eq!(
            parse_challenge(header),
            Ok(Challenge::Bearer {
                realm: "https://auth.docker.io/token".to_owned(),
                service: Some("registry.docker.io".to_owned()),
                scope: Some("repository:library/busybox:pull".to_owned()),
            })
        );
        let unquoted = parse_challenge("bearer realm=http://127.0.0.1:1/t , Service=\"a\\\"b\"");
        assert_eq!(
            unquoted,
            Ok(Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".to_owned(),
                service: Some("a\"b".to_owned()),
                scope: None
            })
        );
        assert_eq!(parse_challenge("Basic realm=\"Registry Realm\""), Ok(Challenge::Basic));
        assert_eq!(parse_challenge("Bearer service=\"x\""), Err("a Bearer challenge without a realm".to_owned()));
        assert_eq!(parse_challenge("Bearer realm=\"x"), Err("an unterminated quoted string".to_owned()));
        assert_eq!(parse_challenge("Negotiate abc"), Err("unsupported authentication scheme `Negotiate`".to_owned()));
    }

    #[test]
    fn config_json_auths_are_found_by_any_spelling_of_the_host() {
        let config = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
            "127.0.0.1:5000": {"auth": "YWxpY2U6cGE6c3M="},
            "http://ghcr.example/": {"identitytoken": "refresh-me"},
            "helper.example": {}
        }, "credsStore": "desktop"}"#;
        let config = DockerConfig::parse(config).unwrap();
        let hub = Credentials::Basic { username: "hub".to_owned(), password: "secret".to_owned() };
        assert_eq!(config.credentials_for("docker.io"), Some(&hub));
        // A password may itself hold a colon: only the first one splits.
        let local = Credentials::Basic { username: "alice".to_owned(), password: "pa:ss".to_owned() };
        assert_eq!(config.credentials_for("127.0.0.1:5000"), Some(&local));
        assert_eq!(config.credentials_for("127.0.0.1:5001"), None);
        let token = Credentials::IdentityToken { token: "refresh-me".to_owned() };
        assert_eq!(config.credentials_for("ghcr.example"), Some(&token));
        assert_eq!(config.credentials_for("helper.example"), None);
        assert_eq!(local.basic_header().as_deref(), Some("Basic YWxpY2U6cGE6c3M="));
        assert_eq!(format!("{local:?}"), "Credentials(user `alice`)");
    }

    #[test]
    fn malformed_config_json_auths_name_the_entry() {
        let bad = DockerConfig::parse(br#"{"auths": {"r.example": {"auth": "!!"}}}"#).unwrap_err();
        assert!(bad.starts_with("auths.r.example.auth: not base64"), "{bad}");
        let no_colon = DockerConfig::parse(br#"{"auths": {"r.example": {"auth": "bm9jb2xvbg=="}}}"#).unwrap_err();
        assert_eq!(no_colon, "auths.r.example.auth: decodes to no `user:password`");
        assert!(DockerConfig::parse(b"{\"auths\": 7}").unwrap_err().starts_with("not a Docker config.json"));
    }

    #[test]
    fn token_answers_carry_token_or_access_token() {
        assert_eq!(parse_token_answer(br#"{"token":"a","access_token":"b"}"#), Ok("a".to_owned()));
        assert_eq!(parse_token_answer(br#"{"access_token":"b","expires_in":60}"#), Ok("b".to_owned()));
        assert_eq!(
            parse_token_answer(br#"{"token":""}"#),
            Err("the token answer holds no `token` or `access_token`".to_owned())
        );
    }
}
