//! Remote URLs and settings, resolved and checked before anything runs.
//!
//! Every problem here (a malformed URL, an unknown scheme, a missing bucket,
//! missing credentials, an unreadable key) is a [`ConfigError`] naming what
//! is wrong and the flag or variable to set; the binary exits 2 on it before
//! writing anything.

use std::path::PathBuf;
use std::time::Duration;

use ed25519_dalek::SigningKey;

use super::keys::{self, TrustedKeys};

/// Remote URLs, whitespace-separated (`--remote`, repeatable).
pub const REMOTE_ENV: &str = "PYCSTORE_REMOTE";
/// Make every remote read-only (`--remote-read-only`).
pub const READ_ONLY_ENV: &str = "PYCSTORE_REMOTE_READ_ONLY";
/// Seconds before a remote request is given up (`--remote-timeout`).
pub const TIMEOUT_ENV: &str = "PYCSTORE_REMOTE_TIMEOUT";
/// The namespace inside the remotes (`--remote-namespace`).
pub const NAMESPACE_ENV: &str = "PYCSTORE_REMOTE_NAMESPACE";
/// A file holding the ed25519 key uploads are signed with.
pub const SIGNING_KEY_ENV: &str = "PYCSTORE_REMOTE_SIGNING_KEY";
/// Public keys (or files of them) whose signatures readers accept.
pub const TRUSTED_KEYS_ENV: &str = "PYCSTORE_REMOTE_TRUSTED_KEYS";
/// A bearer token for `http://` and `https://` remotes.
pub const HTTP_TOKEN_ENV: &str = "PYCSTORE_REMOTE_HTTP_TOKEN";
/// The user of basic auth for `http://` and `https://` remotes.
pub const HTTP_USER_ENV: &str = "PYCSTORE_REMOTE_HTTP_USER";
/// The password of basic auth for `http://` and `https://` remotes.
pub const HTTP_PASSWORD_ENV: &str = "PYCSTORE_REMOTE_HTTP_PASSWORD";

/// A remote's configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Which storage a remote is, with what it needs to connect.
#[derive(Clone)]
pub(crate) enum Kind {
    S3 {
        bucket: String,
        root: String,
        endpoint: Option<String>,
        region: String,
        access_key: String,
        secret_key: String,
        session_token: Option<String>,
    },
    Redis {
        endpoint: String,
        username: Option<String>,
        password: Option<String>,
        db: i64,
    },
    Http {
        endpoint: String,
        root: String,
        token: Option<String>,
        user: Option<String>,
        password: Option<String>,
    },
    File {
        root: PathBuf,
    },
}

/// One remote: its URL without credentials (shown in messages and stats),
/// and how to reach it.
#[derive(Clone)]
pub struct RemoteSpec {
    /// The URL with any user and password removed.
    pub label: String,
    pub(crate) kind: Kind,
}

impl RemoteSpec {
    /// The host and port a network remote is reached at.
    pub(crate) fn address(&self) -> Option<(String, u16)> {
        let endpoint = match &self.kind {
            Kind::S3 { endpoint, .. } => endpoint.clone()?,
            Kind::Redis { endpoint, .. } | Kind::Http { endpoint, .. } => endpoint.clone(),
            Kind::File { .. } => return None,
        };
        let url = url::Url::parse(&endpoint).ok()?;
        let port = url.port_or_known_default().or(match url.scheme() {
            "redis" | "rediss" => Some(6379),
            _ => None,
        })?;
        Some((url.host_str()?.to_string(), port))
    }

    /// The credentials of this remote, to be kept out of every message.
    pub(crate) fn secrets(&self) -> Vec<String> {
        let found = match &self.kind {
            Kind::S3 {
                secret_key,
                session_token,
                access_key,
                ..
            } => vec![
                Some(secret_key.clone()),
                session_token.clone(),
                Some(access_key.clone()),
            ],
            Kind::Redis { password, .. } => vec![password.clone()],
            Kind::Http {
                token, password, ..
            } => vec![token.clone(), password.clone()],
            Kind::File { .. } => vec![],
        };
        found
            .into_iter()
            .flatten()
            .filter(|s| s.len() >= 4)
            .collect()
    }
}

impl std::fmt::Debug for RemoteSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

/// Everything the remote tier was told.
#[derive(Clone)]
pub struct Settings {
    /// The remotes, in lookup order.
    pub remotes: Vec<RemoteSpec>,
    /// Never write to any remote.
    pub read_only: bool,
    /// The limit of one request.
    pub timeout: Duration,
    /// The namespace inside every remote.
    pub namespace: String,
    /// The key entries are signed with: (name, key).
    pub signing_key: Option<(String, SigningKey)>,
    /// The keys whose signatures readers accept; empty: entries need none.
    pub trusted: TrustedKeys,
    /// Requests in flight at once, per run.
    pub concurrency: usize,
    /// How long a remote that failed is left alone before it is tried
    /// again; `None`: for the rest of the process (a `link`, which is
    /// short-lived). A mount sets it.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("remotes", &self.remotes)
            .field("read_only", &self.read_only)
            .field("timeout", &self.timeout)
            .field("namespace", &self.namespace)
            .field(
                "signing_key",
                &self.signing_key.as_ref().map(|(name, _)| name),
            )
            .field("trusted", &self.trusted.names())
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

/// What the flags and variables said, before checking.
#[derive(Clone, Debug, Default)]
pub struct Requested {
    /// `--remote` URLs, else the words of `PYCSTORE_REMOTE`.
    pub urls: Vec<String>,
    /// `--remote-read-only`.
    pub read_only: bool,
    /// `--remote-timeout` in seconds.
    pub timeout_secs: f64,
    /// `--remote-namespace`.
    pub namespace: String,
    /// `--remote-signing-key`.
    pub signing_key: Option<PathBuf>,
    /// `--remote-trusted-keys`.
    pub trusted_keys: Option<String>,
    /// `--remote-jobs`.
    pub concurrency: usize,
    /// `mount --remote-retry` (see [`Settings::retry_after`]).
    pub retry_after: Option<Duration>,
}

/// Reads a variable of the environment (a function, so tests can pass one).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, empty values counting as unset.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Settings {
    /// Checks everything requested; `Ok(None)` when no remote is named.
    pub fn resolve(req: &Requested, env: Env<'_>) -> Result<Option<Settings>, ConfigError> {
        if req.urls.is_empty() {
            return Ok(None);
        }
        let remotes = req
            .urls
            .iter()
            .map(|u| parse_url(u, env))
            .collect::<Result<Vec<_>, _>>()?;
        let namespace = req.namespace.trim().to_string();
        if namespace.is_empty()
            || !namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || namespace.starts_with('.')
        {
            return Err(ConfigError(format!(
                "bad remote namespace `{namespace}`: use letters, digits, `-`, `_` and `.` \
                 (--remote-namespace, {NAMESPACE_ENV})"
            )));
        }
        if !(req.timeout_secs > 0.0 && req.timeout_secs.is_finite()) {
            return Err(ConfigError(format!(
                "bad remote timeout {}: give a number of seconds above 0 (--remote-timeout, \
                 {TIMEOUT_ENV})",
                req.timeout_secs
            )));
        }
        let signing_key = match &req.signing_key {
            None => None,
            Some(path) => Some(keys::read_secret(path).map_err(|e| {
                ConfigError(format!("{e} (--remote-signing-key, {SIGNING_KEY_ENV})"))
            })?),
        };
        let trusted = match &req.trusted_keys {
            None => TrustedKeys::default(),
            Some(list) => TrustedKeys::parse(list).map_err(|e| {
                ConfigError(format!(
                    "bad trusted keys: {e} (--remote-trusted-keys, {TRUSTED_KEYS_ENV})"
                ))
            })?,
        };
        Ok(Some(Settings {
            remotes,
            read_only: req.read_only,
            timeout: Duration::from_secs_f64(req.timeout_secs),
            namespace,
            signing_key,
            trusted,
            concurrency: req.concurrency.clamp(1, 1024),
            retry_after: req.retry_after.filter(|d| !d.is_zero()),
        }))
    }
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The URL without user and password, for messages.
fn label_of(url: &url::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

fn parse_url(text: &str, env: Env<'_>) -> Result<RemoteSpec, ConfigError> {
    let bad = |why: &str| {
        ConfigError(format!(
            "bad remote URL `{}`: {why} (--remote, {REMOTE_ENV})",
            // Never echo a password given in the URL.
            url::Url::parse(text)
                .map(|u| label_of(&u))
                .unwrap_or_else(|_| text.split('@').next_back().unwrap_or("").to_string())
        ))
    };
    let url = url::Url::parse(text).map_err(|e| bad(&e.to_string()))?;
    let label = label_of(&url);
    let path = url.path().trim_matches('/').to_string();
    let kind = match url.scheme() {
        "s3" => {
            let bucket = url.host_str().unwrap_or("").to_string();
            if bucket.is_empty() {
                return Err(bad("no bucket: write s3://BUCKET[/PREFIX]"));
            }
            let need = |name: &str| {
                env(name).ok_or_else(|| {
                    ConfigError(format!(
                        "remote `{label}` needs credentials: set AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY ({name} is not set)"
                    ))
                })
            };
            let access_key = need("AWS_ACCESS_KEY_ID")?;
            let secret_key = need("AWS_SECRET_ACCESS_KEY")?;
            let endpoint = env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL"));
            if let Some(e) = &endpoint {
                let ok = url::Url::parse(e)
                    .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
                if !ok {
                    return Err(ConfigError(format!(
                        "AWS_ENDPOINT_URL `{e}` is not an http:// or https:// URL (for remote \
                         `{label}`)"
                    )));
                }
            }
            Kind::S3 {
                bucket,
                root: path,
                endpoint,
                region: env("AWS_REGION")
                    .or_else(|| env("AWS_DEFAULT_REGION"))
                    .unwrap_or_else(|| "us-east-1".into()),
                access_key,
                secret_key,
                session_token: env("AWS_SESSION_TOKEN"),
            }
        }
        "redis" | "rediss" => {
            let host = url.host_str().unwrap_or("");
            if host.is_empty() {
                return Err(bad("no host: write redis://[USER:PASS@]HOST[:PORT][/DB]"));
            }
            let db = if path.is_empty() {
                0
            } else {
                path.parse::<i64>()
                    .ok()
                    .filter(|d| *d >= 0)
                    .ok_or_else(|| bad("the path must be a database number: redis://HOST/DB"))?
            };
            let port = url.port().unwrap_or(6379);
            Kind::Redis {
                endpoint: format!("{}://{host}:{port}", url.scheme()),
                username: Some(decode(url.username())).filter(|u| !u.is_empty()),
                password: url.password().map(decode),
                db,
            }
        }
        "http" | "https" => {
            let host = url.host_str().unwrap_or("");
            if host.is_empty() {
                return Err(bad("no host"));
            }
            let mut endpoint = format!("{}://{host}", url.scheme());
            if let Some(port) = url.port() {
                endpoint.push_str(&format!(":{port}"));
            }
            let (user, password) = if url.username().is_empty() {
                (env(HTTP_USER_ENV), env(HTTP_PASSWORD_ENV))
            } else {
                (Some(decode(url.username())), url.password().map(decode))
            };
            Kind::Http {
                endpoint,
                root: path,
                token: env(HTTP_TOKEN_ENV),
                user,
                password,
            }
        }
        "file" => {
            if url.host_str().is_some_and(|h| !h.is_empty()) {
                return Err(bad("a file URL names an absolute path: file:///PATH"));
            }
            let root = PathBuf::from(decode(url.path()));
            if !root.is_dir() {
                return Err(bad(&format!(
                    "`{}` is not a directory (create it first)",
                    root.display()
                )));
            }
            Kind::File { root }
        }
        other => {
            return Err(bad(&format!(
                "unknown scheme `{other}`: use s3://, redis://, rediss://, http://, https:// \
                 or file://"
            )))
        }
    };
    Ok(RemoteSpec { label, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(urls: &[&str]) -> Requested {
        Requested {
            urls: urls.iter().map(|s| s.to_string()).collect(),
            timeout_secs: 5.0,
            namespace: "default".into(),
            concurrency: 64,
            ..Requested::default()
        }
    }

    fn error(urls: &[&str], env: Env<'_>) -> String {
        match Settings::resolve(&req(urls), env) {
            Err(e) => e.0,
            Ok(_) => panic!("{urls:?} was accepted"),
        }
    }

    #[test]
    fn bad_urls_name_what_is_wrong() {
        let none = |_: &str| None;
        assert!(error(&["ftp://x/y"], &none).contains("unknown scheme `ftp`"));
        assert!(error(&["s3://"], &none).contains("no bucket"));
        assert!(error(&["s3://bucket/p"], &none).contains("AWS_ACCESS_KEY_ID"));
        assert!(error(&["not a url"], &none).contains("--remote"));
        assert!(error(&["redis://h/x"], &none).contains("database number"));
        assert!(error(&["file:///does/not/exist"], &none).contains("not a directory"));
        let message = error(&["redis://u:hunter22@h/x"], &none);
        assert!(!message.contains("hunter22"), "{message}");
    }

    #[test]
    fn good_urls_keep_credentials_out_of_labels() {
        let env = |name: &str| match name {
            "AWS_ACCESS_KEY_ID" => Some("GKaccess".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("s3cretvalue".to_string()),
            _ => None,
        };
        let s = Settings::resolve(
            &req(&["redis://u:hunter22@localhost:6380/2", "s3://b/pre/fix"]),
            &env,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.remotes[0].label, "redis://localhost:6380/2");
        assert!(matches!(s.remotes[0].kind, Kind::Redis { db: 2, .. }));
        assert!(s.remotes[0].secrets().contains(&"hunter22".to_string()));
        assert!(matches!(&s.remotes[1].kind, Kind::S3 { root, .. } if root == "pre/fix"));
        assert!(format!("{s:?}").find("s3cret").is_none());
    }
}
