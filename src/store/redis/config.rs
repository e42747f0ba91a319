//! Redis connection settings, from a URL or the environment.

use std::fmt;
use std::time::Duration;

use fred::types::config::{Config, ServerConfig};

/// The default number of connections in the pool. fred pipelines the commands of many tasks
/// onto each connection, so a handful serves thousands of requests per second.
pub const DEFAULT_POOL_SIZE: usize = 8;
/// The default deadline of a cache lookup on the request path.
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_millis(50);
/// The default deadline of other commands (writes, deletes, health checks).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_millis(500);
/// The default deadline to open a connection (TCP, TLS and handshake).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How to reach Redis, and the deadlines of the cache's commands.
///
/// The password never appears in `Debug` output, logs or errors.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cache::RedisConfig;
///
/// let config = RedisConfig::from_url("redis://:secret@127.0.0.1:6379/2")?
///     .pool_size(16)
///     .lookup_timeout(Duration::from_millis(20));
/// assert!(!format!("{config:?}").contains("secret"));
/// # Ok::<(), tower_redis_cache::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct RedisConfig {
    pub(crate) fred: Config,
    pub(crate) pool_size: usize,
    pub(crate) lookup_timeout: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) batch_lookups: bool,
}

/// An invalid setting. The message names what is wrong and never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// An environment variable has a value that cannot be used.
    InvalidVar {
        /// The variable.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A Redis URL that cannot be used.
    InvalidUrl(String),
    /// TLS was asked for (`rediss://`, `REDIS_SSL=true`) but the crate was built without
    /// its `tls` feature.
    TlsUnavailable,
    /// TLS could not be set up (no trusted root certificates on the machine, a CA file that
    /// cannot be read), or the server's certificate is not trusted.
    Tls(String),
    /// Redis refused the credentials (wrong password or user name).
    Auth(String),
    /// A namespace that is empty, longer than 64 characters or has characters other than
    /// `A-Z a-z 0-9 _ - .`.
    InvalidNamespace(String),
    /// The Redis user may not run a command the cache needs (an ACL rule), or the server
    /// refused it otherwise. Found by [`CacheHandle::check`](crate::CacheHandle::check).
    Permission(String),
    /// A route template that cannot be added to the layer's table.
    InvalidRoute {
        /// The template.
        route: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::InvalidVar { var, reason } => write!(f, "invalid {var}: {reason}"),
            ConfigError::InvalidUrl(reason) => write!(f, "invalid Redis URL: {reason}"),
            ConfigError::TlsUnavailable => f.write_str(
                "TLS requested but tower-redis-cache was built without its `tls` feature",
            ),
            ConfigError::Tls(reason) => write!(f, "TLS setup failed: {reason}"),
            ConfigError::Auth(reason) => write!(f, "redis refused the credentials: {reason}"),
            ConfigError::InvalidNamespace(ns) => write!(
                f,
                "invalid cache namespace {ns:?}: use 1 to 64 characters of A-Z a-z 0-9 _ - ."
            ),
            ConfigError::Permission(reason) => write!(
                f,
                "redis refused a command the cache needs (check the user's ACL): {reason}"
            ),
            ConfigError::InvalidRoute { route, reason } => {
                write!(f, "invalid route template {route:?}: {reason}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

const SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "redis-cluster",
    "rediss-cluster",
    "redis-sentinel",
    "rediss-sentinel",
];

impl RedisConfig {
    fn with(fred: Config) -> Self {
        RedisConfig {
            fred,
            pool_size: DEFAULT_POOL_SIZE,
            lookup_timeout: DEFAULT_LOOKUP_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            batch_lookups: true,
        }
    }

    /// Parses a URL: `redis://[user][:password@]host[:port][/db]`, `rediss://` for TLS
    /// (Azure Cache for Redis: `rediss://:<access key>@<name>.redis.cache.windows.net:6380`),
    /// `redis-cluster://` and `redis-sentinel://` as fred understands them. Percent-encode
    /// `/ + = @ :` in passwords.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        if !SCHEMES.contains(&scheme) {
            return Err(ConfigError::InvalidUrl(format!(
                "unsupported scheme {scheme:?}; expected one of {}",
                SCHEMES.join(", ")
            )));
        }
        let tls = scheme.starts_with("rediss");
        if tls {
            install_crypto_provider()?;
        }
        let fred =
            Config::from_url(url).map_err(|e| ConfigError::InvalidUrl(e.details().to_owned()))?;
        if tls && !fred.uses_tls() {
            return Err(ConfigError::TlsUnavailable);
        }
        Ok(Self::with(fred))
    }

    /// Reads the environment, as the Python utility did:
    ///
    /// | variable | meaning | default |
    /// |---|---|---|
    /// | `REDIS_URL` | a URL as for [`from_url`](Self::from_url); when set, the next five are ignored | |
    /// | `REDIS_HOST` | host name or address | `127.0.0.1` |
    /// | `REDIS_PORT` | port (Azure Cache for Redis with TLS: `6380`) | `6379` |
    /// | `REDIS_PASSWORD` | password | none |
    /// | `REDIS_USERNAME` | ACL user name | none |
    /// | `REDIS_DB` | database number, 0 to 255 | `0` |
    /// | `REDIS_SSL` | `true`/`false` (also `1`/`0`, `yes`/`no`): TLS with the system's roots | `false` |
    /// | `REDIS_CA_CERT` | path to a PEM bundle of extra trusted roots (TLS only) | none |
    /// | `REDIS_POOL_SIZE` | connections, 1 to 1024 | `8` |
    /// | `REDIS_LOOKUP_TIMEOUT_MS` | deadline of a lookup on the request path | `50` |
    /// | `REDIS_TIMEOUT_MS` | deadline of other commands | `500` |
    ///
    /// An empty variable counts as unset. An invalid value is an error that names the
    /// variable.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// [`from_env`](Self::from_env) with the variables taken from `get` instead of the
    /// process environment (for tests, or settings from another source).
    pub fn from_env_with(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::from_vars(|name| get(name).map(Into::into))
    }

    pub(crate) fn from_vars(
        get: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, ConfigError> {
        let var = |name: &'static str| -> Result<Option<String>, ConfigError> {
            match get(name) {
                None => Ok(None),
                Some(v) => match v.into_string() {
                    Ok(s) if s.trim().is_empty() => Ok(None),
                    Ok(s) => Ok(Some(s)),
                    Err(_) => Err(ConfigError::InvalidVar {
                        var: name,
                        reason: "not valid UTF-8".into(),
                    }),
                },
            }
        };
        fn number<T: std::str::FromStr>(
            name: &'static str,
            value: Option<String>,
            range: std::ops::RangeInclusive<u64>,
        ) -> Result<Option<T>, ConfigError> {
            let Some(v) = value else { return Ok(None) };
            let n: u64 = v.trim().parse().map_err(|_| ConfigError::InvalidVar {
                var: name,
                reason: format!("expected a whole number, got {v:?}"),
            })?;
            if !range.contains(&n) {
                return Err(ConfigError::InvalidVar {
                    var: name,
                    reason: format!("{n} is out of range {}..={}", range.start(), range.end()),
                });
            }
            n.to_string()
                .parse()
                .map(Some)
                .map_err(|_| ConfigError::InvalidVar {
                    var: name,
                    reason: format!("{n} is out of range"),
                })
        }

        let mut config = if let Some(url) = var("REDIS_URL")? {
            Self::from_url(&url).map_err(|e| match e {
                ConfigError::InvalidUrl(reason) => ConfigError::InvalidVar {
                    var: "REDIS_URL",
                    reason,
                },
                other => other,
            })?
        } else {
            let host = var("REDIS_HOST")?.unwrap_or_else(|| "127.0.0.1".to_owned());
            let port = number::<u16>("REDIS_PORT", var("REDIS_PORT")?, 1..=65535)?.unwrap_or(6379);
            let db = number::<u8>("REDIS_DB", var("REDIS_DB")?, 0..=255)?;
            let ssl = match var("REDIS_SSL")?.map(|s| s.trim().to_ascii_lowercase()) {
                None => false,
                Some(s) if matches!(s.as_str(), "true" | "1" | "yes" | "on") => true,
                Some(s) if matches!(s.as_str(), "false" | "0" | "no" | "off") => false,
                Some(s) => {
                    return Err(ConfigError::InvalidVar {
                        var: "REDIS_SSL",
                        reason: format!("expected true or false, got {s:?}"),
                    })
                }
            };
            let mut fred = Config {
                server: ServerConfig::new_centralized(host, port),
                ..Config::default()
            };
            fred.username = var("REDIS_USERNAME")?;
            fred.password = var("REDIS_PASSWORD")?;
            fred.database = db;
            if ssl {
                enable_tls(&mut fred)?;
            }
            Self::with(fred)
        };
        if let Some(path) = var("REDIS_CA_CERT")? {
            config = config.ca_cert(&path).map_err(|e| ConfigError::InvalidVar {
                var: "REDIS_CA_CERT",
                reason: e.to_string(),
            })?;
        }
        if let Some(n) = number::<usize>("REDIS_POOL_SIZE", var("REDIS_POOL_SIZE")?, 1..=1024)? {
            config.pool_size = n;
        }
        if let Some(ms) = number::<u64>(
            "REDIS_LOOKUP_TIMEOUT_MS",
            var("REDIS_LOOKUP_TIMEOUT_MS")?,
            1..=60_000,
        )? {
            config.lookup_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = number::<u64>("REDIS_TIMEOUT_MS", var("REDIS_TIMEOUT_MS")?, 1..=600_000)?
        {
            config.command_timeout = Duration::from_millis(ms);
        }
        Ok(config)
    }

    /// Trusts the certificates of a PEM file in addition to the system's roots (a private
    /// CA, or a test server's). The connection must use TLS (`rediss://`, `REDIS_SSL=true`).
    pub fn ca_cert(mut self, path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        if !self.fred.uses_tls() {
            return Err(ConfigError::Tls(
                "a CA certificate was given but the connection does not use TLS".into(),
            ));
        }
        let pem = std::fs::read(path.as_ref()).map_err(|e| {
            ConfigError::Tls(format!("cannot read {}: {e}", path.as_ref().display()))
        })?;
        tls_with_extra_roots(&mut self.fred, &pem)?;
        Ok(self)
    }

    /// The number of connections (at least 1; default 8).
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n.max(1);
        self
    }

    /// The deadline of a cache lookup on the request path (default 50 ms). Past it the
    /// request is answered by the inner service; a timed-out read is never replayed.
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Whether concurrent lookups go to Redis together, as one `MGET` (default on; never on
    /// a cluster). Under load this spares Redis and fred a command per request; a lookup
    /// alone is sent at once.
    pub fn batch_lookups(mut self, on: bool) -> Self {
        self.batch_lookups = on;
        self
    }

    /// The deadline of writes, deletes and health checks (default 500 ms).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The deadline to open a connection, TLS and handshake included (default 500 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.max(Duration::from_millis(1));
        self
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let server = match &self.fred.server {
            ServerConfig::Centralized { server } => format!("{}:{}", server.host, server.port),
            ServerConfig::Clustered { hosts, .. } => format!(
                "cluster[{}]",
                hosts
                    .iter()
                    .map(|s| format!("{}:{}", s.host, s.port))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            // Fields listed, never the whole value: with fred's `sentinel-auth` it holds the
            // sentinels' password.
            ServerConfig::Sentinel {
                hosts,
                service_name,
                ..
            } => format!(
                "sentinel[{}]/{service_name}",
                hosts
                    .iter()
                    .map(|s| format!("{}:{}", s.host, s.port))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        f.debug_struct("RedisConfig")
            .field("server", &server)
            .field("username", &self.fred.username)
            .field(
                "password",
                &self.fred.password.as_ref().map(|_| "<redacted>"),
            )
            .field("database", &self.fred.database)
            .field("tls", &self.fred.uses_tls())
            .field("pool_size", &self.pool_size)
            .field("lookup_timeout", &self.lookup_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("batch_lookups", &self.batch_lookups)
            .finish()
    }
}

/// Installs rustls's ring provider as the process default if none is installed yet, so that
/// fred's TLS setup never panics when another crate also compiled in aws-lc-rs.
#[cfg(feature = "tls")]
fn install_crypto_provider() -> Result<(), ConfigError> {
    let _ = fred::rustls::crypto::ring::default_provider().install_default();
    Ok(())
}

#[cfg(not(feature = "tls"))]
fn install_crypto_provider() -> Result<(), ConfigError> {
    Err(ConfigError::TlsUnavailable)
}

#[cfg(feature = "tls")]
fn enable_tls(config: &mut Config) -> Result<(), ConfigError> {
    install_crypto_provider()?;
    let connector = fred::types::config::TlsConnector::default_rustls()
        .map_err(|e| ConfigError::Tls(e.details().to_owned()))?;
    config.tls = Some(connector.into());
    Ok(())
}

#[cfg(not(feature = "tls"))]
fn enable_tls(_: &mut Config) -> Result<(), ConfigError> {
    Err(ConfigError::TlsUnavailable)
}

/// A rustls client (ring provider) trusting the system's roots and the PEM's certificates.
#[cfg(feature = "tls")]
fn tls_with_extra_roots(config: &mut Config, pem: &[u8]) -> Result<(), ConfigError> {
    use fred::rustls;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore::empty();
    for cert in fred::rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| ConfigError::Tls(format!("invalid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ConfigError::Tls(format!("invalid certificate: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(ConfigError::Tls("no certificate in the CA file".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.tls = Some(fred::types::config::TlsConnector::from(client).into());
    Ok(())
}

#[cfg(not(feature = "tls"))]
fn tls_with_extra_roots(_: &mut Config, _: &[u8]) -> Result<(), ConfigError> {
    Err(ConfigError::TlsUnavailable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<RedisConfig, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RedisConfig::from_vars(|k| map.get(k).map(Into::into))
    }

    #[test]
    fn defaults() {
        let c = env(&[]).unwrap();
        assert_eq!(
            format!("{:?}", c.fred.server),
            format!("{:?}", ServerConfig::new_centralized("127.0.0.1", 6379))
        );
        assert_eq!(c.pool_size, DEFAULT_POOL_SIZE);
        assert_eq!(c.fred.database, None);
        assert!(!c.fred.uses_tls());
    }

    #[test]
    fn python_variables() {
        let c = env(&[
            ("REDIS_HOST", "cache.internal"),
            ("REDIS_PORT", "6390"),
            ("REDIS_PASSWORD", "p@ss/w+rd="),
            ("REDIS_USERNAME", "app"),
            ("REDIS_DB", "3"),
            ("REDIS_SSL", "False"),
            ("REDIS_POOL_SIZE", "50"),
            ("REDIS_LOOKUP_TIMEOUT_MS", "20"),
        ])
        .unwrap();
        assert_eq!(c.fred.password.as_deref(), Some("p@ss/w+rd="));
        assert_eq!(c.fred.username.as_deref(), Some("app"));
        assert_eq!(c.fred.database, Some(3));
        assert_eq!(c.pool_size, 50);
        assert_eq!(c.lookup_timeout, Duration::from_millis(20));
        let dbg = format!("{c:?}");
        assert!(dbg.contains("cache.internal:6390"), "{dbg}");
        assert!(!dbg.contains("p@ss"), "{dbg}");
    }

    #[test]
    fn url_wins_and_hides_password() {
        let c = env(&[
            ("REDIS_URL", "redis://:hunter2@10.1.2.3:7000/1"),
            ("REDIS_HOST", "ignored"),
        ])
        .unwrap();
        assert_eq!(c.fred.database, Some(1));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn invalid_values_name_the_variable() {
        for (var, value) in [
            ("REDIS_PORT", "http"),
            ("REDIS_PORT", "70000"),
            ("REDIS_PORT", "0"),
            ("REDIS_DB", "-1"),
            ("REDIS_DB", "256"),
            ("REDIS_SSL", "maybe"),
            ("REDIS_POOL_SIZE", "0"),
            ("REDIS_LOOKUP_TIMEOUT_MS", "fast"),
            ("REDIS_URL", "http://127.0.0.1:6379"),
            ("REDIS_URL", "redis://h:6379/1/2"),
        ] {
            let err = env(&[(var, value)]).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(var), "{var}={value}: {msg}");
        }
    }

    #[test]
    fn url_errors_never_echo_the_password() {
        let err = RedisConfig::from_url("redis://:topsecret@h:6379/x").unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
        let err = RedisConfig::from_url("ftp://:topsecret@h").unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_urls_use_tls() {
        // Needs the system's root store (Debian's ca-certificates, installed by .ci/run).
        let c =
            RedisConfig::from_url("rediss://:key@example.redis.cache.windows.net:6380").unwrap();
        assert!(c.fred.uses_tls());
        let c = env(&[("REDIS_SSL", "true"), ("REDIS_PORT", "6380")]).unwrap();
        assert!(c.fred.uses_tls());
    }
}
