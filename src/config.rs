//! Configuration: one documented TOML file, `PGWARDEN_*` environment
//! overrides, `DATABASE_URL`, and CLI flags for the common keys.
//!
//! Every key is flat and carries its unit (`guard_timeout_ms`), so the file,
//! the environment variable (`PGWARDEN_GUARD_TIMEOUT_MS`) and the docs all
//! use the same name. Unknown keys are errors, and [`Config::validate`]
//! reports every problem at once, naming each key. This module sits at the
//! base of the crate: it knows nothing of the modules that use it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default PostgreSQL to connect to.
pub const DEFAULT_DATABASE_URL: &str = "postgresql://postgres@127.0.0.1:5432/postgres";
/// Default address of the data API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4444";
/// Default address of the ops listener (metrics, health, admin).
pub const DEFAULT_OPS_LISTEN: &str = "127.0.0.1:9464";
/// Default guard budget.
pub const DEFAULT_GUARD_TIMEOUT_MS: u64 = 3000;
/// Default strict timeout of a transaction batch.
pub const DEFAULT_TRANSACTION_TIMEOUT_MS: u64 = 8000;
/// Default pool size per generation.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10;
/// Default number of connections warmed up per generation.
pub const DEFAULT_MIN_CONNECTIONS: usize = 2;
/// Default bound on waiting for a free pooled connection.
pub const DEFAULT_POOL_WAIT_TIMEOUT_MS: u64 = 5000;
/// Default bound on opening a connection.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5000;
/// Default interval between health checks.
pub const DEFAULT_HEALTH_CHECK_INTERVAL_MS: u64 = 5000;
/// Default bound on one health check.
pub const DEFAULT_HEALTH_CHECK_TIMEOUT_MS: u64 = 1000;
/// Default first pause between failed attempts.
pub const DEFAULT_BACKOFF_INITIAL_MS: u64 = 100;
/// Default cap of the pause between failed attempts.
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 5000;
/// Default cap of that pause while requests wait for the reconnect.
pub const DEFAULT_BACKOFF_MAX_WITH_WAITERS_MS: u64 = 500;
/// Default bound on the warm-up's ping phase.
pub const DEFAULT_WARMUP_PING_TIMEOUT_MS: u64 = 5000;
/// Default bound on the warm-up's queries phase.
pub const DEFAULT_WARMUP_QUERIES_TIMEOUT_MS: u64 = 10000;
/// Default limit of a request body.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;
/// Default limit of a response.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 10 * 1024 * 1024;
/// Default limit of a request's head (request line and headers).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// Smallest accepted `max_header_bytes`: the Neon headers must fit.
pub const MIN_MAX_HEADER_BYTES: usize = 1024;
/// Largest accepted `max_header_bytes`: hyper buffers a multiple of it.
pub const MAX_MAX_HEADER_BYTES: usize = 1024 * 1024;
/// Default bound on receiving a request's head.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 5000;
/// Default bound on receiving a request's body once its head is in.
pub const DEFAULT_BODY_READ_TIMEOUT_MS: u64 = 30000;
/// Default address of the PostgreSQL wire front end.
pub const DEFAULT_PG_LISTEN: &str = "127.0.0.1:6432";
/// Default cap on connected wire clients.
pub const DEFAULT_PG_MAX_CLIENTS: usize = 10_000;
/// Default bound on a wire client's startup (connect to first ReadyForQuery).
pub const DEFAULT_PG_STARTUP_TIMEOUT_MS: u64 = 10_000;
/// Default cap on one wire protocol message, from a client or a server.
pub const DEFAULT_PG_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Default for [`Config::pg_max_prepared_statements`].
pub const DEFAULT_PG_MAX_PREPARED_STATEMENTS: usize = 256;
/// Default grace period for in-flight requests at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10000;

/// The whole configuration. See `pgwarden.example.toml` for every key.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The PostgreSQL pgwarden connects to (libpq URL; may hold the password).
    pub database_url: String,
    /// File holding the database password, instead of putting it in the URL.
    pub database_password_file: Option<PathBuf>,
    /// Address of the data API (`POST /sql`).
    pub listen: String,
    /// Address of the ops listener.
    pub ops_listen: String,
    /// Address of the PostgreSQL wire front end; empty turns it off.
    pub pg_listen: String,
    /// Connected wire clients at most; one more is refused with 53300.
    pub pg_max_clients: usize,
    /// A wire client that has not finished startup by then is dropped, in ms.
    pub pg_startup_timeout_ms: u64,
    /// Largest wire protocol message accepted from a client or a server.
    pub pg_max_message_bytes: usize,
    /// How wire clients prove the password: `scram-sha-256`, or `password`
    /// (the password itself, only over TLS or loopback; elsewhere SCRAM).
    pub pg_auth: String,
    /// How wire clients hold server sessions: `transaction` (one
    /// transaction at a time, shared) or `session` (one for the client's
    /// whole connection, for applications that keep session state).
    pub pool_mode: String,
    /// Named statements of wire clients that one server session keeps
    /// prepared; the least recently used is closed to make room.
    pub pg_max_prepared_statements: usize,
    /// PEM certificate chain for TLS to wire clients (with `pg_tls_key`).
    pub pg_tls_cert: Option<PathBuf>,
    /// PEM private key of `pg_tls_cert`.
    pub pg_tls_key: Option<PathBuf>,
    /// How long a request may wait for a usable connection, in ms.
    pub guard_timeout_ms: u64,
    /// Strict bound on a transaction batch once it runs, in ms.
    pub transaction_timeout_ms: u64,
    /// `resolve` (never doubt a write) or `fast` (one round trip; 08007 on a break).
    pub write_safety: String,
    /// Connections per generation at most (the health check holds one
    /// more session of its own).
    pub max_connections: usize,
    /// Connections opened and warmed up per generation.
    pub min_connections: usize,
    /// Bound on waiting for a free pooled connection, in ms.
    pub pool_wait_timeout_ms: u64,
    /// Bound on opening one connection, in ms.
    pub connect_timeout_ms: u64,
    /// `DISCARD ALL` before a connection serves another request.
    pub reset_sessions: bool,
    /// Interval between health checks, in ms.
    pub health_check_interval_ms: u64,
    /// Bound on one health check, in ms.
    pub health_check_timeout_ms: u64,
    /// First pause after a failed connection attempt, in ms.
    pub backoff_initial_ms: u64,
    /// Cap of the pause between failed attempts, in ms.
    pub backoff_max_ms: u64,
    /// Cap of that pause while requests are waiting for the reconnect, in ms,
    /// so they are served soon after the database returns.
    pub backoff_max_with_waiters_ms: u64,
    /// Bound on the warm-up's ping phase, in ms.
    pub warmup_ping_timeout_ms: u64,
    /// Bound on the warm-up's queries phase, in ms.
    pub warmup_queries_timeout_ms: u64,
    /// Statements run on every new connection before a generation serves.
    pub warmup_queries: Vec<String>,
    /// `primary` (refuse a standby) or `any`.
    pub role: String,
    /// Largest accepted request body, in bytes (413 beyond).
    pub max_request_bytes: usize,
    /// Largest response, in bytes (507 beyond).
    pub max_response_bytes: usize,
    /// Largest request head (request line and headers), in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Time a client has to send a complete request head, in ms; the
    /// connection is closed beyond it. Also how long an idle keep-alive
    /// connection is kept open.
    pub header_read_timeout_ms: u64,
    /// Time a client has to send the whole body once the head is in, in ms
    /// (408 and the connection closed beyond it).
    pub body_read_timeout_ms: u64,
    /// User clients must name in their connection string (default: the database user).
    pub client_user: Option<String>,
    /// Password clients must present (default: the database password).
    pub client_password: Option<String>,
    /// File holding `client_password`.
    pub client_password_file: Option<PathBuf>,
    /// Bearer token for `/admin/*` (without one, only loopback peers may use them).
    pub admin_token: Option<String>,
    /// File holding `admin_token`.
    pub admin_token_file: Option<PathBuf>,
    /// Grace period for in-flight requests at shutdown, in ms.
    pub shutdown_grace_ms: u64,
    /// `text` or `json`.
    pub log_format: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: DEFAULT_DATABASE_URL.into(),
            database_password_file: None,
            listen: DEFAULT_LISTEN.into(),
            ops_listen: DEFAULT_OPS_LISTEN.into(),
            pg_listen: DEFAULT_PG_LISTEN.into(),
            pg_max_clients: DEFAULT_PG_MAX_CLIENTS,
            pg_startup_timeout_ms: DEFAULT_PG_STARTUP_TIMEOUT_MS,
            pg_max_message_bytes: DEFAULT_PG_MAX_MESSAGE_BYTES,
            pg_max_prepared_statements: DEFAULT_PG_MAX_PREPARED_STATEMENTS,
            pool_mode: "transaction".into(),
            pg_auth: "scram-sha-256".into(),
            pg_tls_cert: None,
            pg_tls_key: None,
            guard_timeout_ms: DEFAULT_GUARD_TIMEOUT_MS,
            transaction_timeout_ms: DEFAULT_TRANSACTION_TIMEOUT_MS,
            write_safety: "resolve".into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            min_connections: DEFAULT_MIN_CONNECTIONS,
            pool_wait_timeout_ms: DEFAULT_POOL_WAIT_TIMEOUT_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            reset_sessions: true,
            health_check_interval_ms: DEFAULT_HEALTH_CHECK_INTERVAL_MS,
            health_check_timeout_ms: DEFAULT_HEALTH_CHECK_TIMEOUT_MS,
            backoff_initial_ms: DEFAULT_BACKOFF_INITIAL_MS,
            backoff_max_ms: DEFAULT_BACKOFF_MAX_MS,
            backoff_max_with_waiters_ms: DEFAULT_BACKOFF_MAX_WITH_WAITERS_MS,
            warmup_ping_timeout_ms: DEFAULT_WARMUP_PING_TIMEOUT_MS,
            warmup_queries_timeout_ms: DEFAULT_WARMUP_QUERIES_TIMEOUT_MS,
            warmup_queries: Vec::new(),
            role: "primary".into(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            header_read_timeout_ms: DEFAULT_HEADER_READ_TIMEOUT_MS,
            body_read_timeout_ms: DEFAULT_BODY_READ_TIMEOUT_MS,
            client_user: None,
            client_password: None,
            client_password_file: None,
            admin_token: None,
            admin_token_file: None,
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
            log_format: "text".into(),
        }
    }
}

/// Shows the settings but never the database URL (it may hold a password),
/// passwords or tokens.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |value: bool| if value { "***" } else { "none" };
        f.debug_struct("Config")
            .field("database_url", &"***")
            .field("listen", &self.listen)
            .field("ops_listen", &self.ops_listen)
            .field("pg_listen", &self.pg_listen)
            .field("guard_timeout_ms", &self.guard_timeout_ms)
            .field("transaction_timeout_ms", &self.transaction_timeout_ms)
            .field("write_safety", &self.write_safety)
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .field("warmup_queries", &self.warmup_queries.len())
            .field("role", &self.role)
            .field("client_user", &self.client_user)
            .field("client_password", &hidden(self.client_password.is_some()))
            .field("admin_token", &hidden(self.admin_token.is_some()))
            .finish_non_exhaustive()
    }
}

/// Every problem found, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// One line per problem.
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: impl Into<String>) -> Self {
        Self {
            problems: vec![problem.into()],
        }
    }
}

/// Where settings come from, lowest precedence first.
#[derive(Debug, Default)]
pub struct Sources {
    /// The TOML file (`--config`), if any.
    pub file: Option<PathBuf>,
    /// Environment variables (only `PGWARDEN_*` and `DATABASE_URL` are read).
    pub env: BTreeMap<String, String>,
    /// Keys set by CLI flags, highest precedence.
    pub flags: BTreeMap<String, String>,
}

impl Config {
    /// Loads from the file, then the environment, then the flags, and validates.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = &sources.file {
            builder = builder
                .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
        }
        let env = env_overrides(&sources.env)?;
        for (key, value) in env.iter().chain(&sources.flags) {
            builder = set(builder, key, value)?;
        }
        let built = builder
            .build()
            .map_err(|e| ConfigError::one(e.to_string()))?;
        let mut config: Config = built
            .try_deserialize()
            .map_err(|e| ConfigError::one(e.to_string()))?;
        config.read_secret_files()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting, reporting all problems together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, problem: String| {
            if !ok {
                problems.push(problem);
            }
        };
        if let Some(problem) = database_url_problem(&self.database_url) {
            check(false, format!("database_url: {problem}"));
        }
        for (key, value) in [("listen", &self.listen), ("ops_listen", &self.ops_listen)] {
            check(
                value.parse::<SocketAddr>().is_ok(),
                format!("{key}: {value:?} is not an address like 127.0.0.1:4444"),
            );
        }
        check(
            self.pg_listen.is_empty() || self.pg_listen.parse::<SocketAddr>().is_ok(),
            format!(
                "pg_listen: {:?} is not an address like 127.0.0.1:6432 (or \"\" to turn it off)",
                self.pg_listen
            ),
        );
        check(
            self.pg_max_clients >= 1,
            "pg_max_clients: must be at least 1".into(),
        );
        check(
            self.pg_startup_timeout_ms >= 1,
            "pg_startup_timeout_ms: must be at least 1".into(),
        );
        check(
            self.pg_max_message_bytes >= 64 * 1024,
            "pg_max_message_bytes: must be at least 65536".into(),
        );
        check(
            self.pg_max_prepared_statements >= 1,
            "pg_max_prepared_statements: must be at least 1".into(),
        );
        check(
            self.pg_tls_cert.is_some() == self.pg_tls_key.is_some(),
            "pg_tls_cert, pg_tls_key: set both or neither".into(),
        );
        check(
            ["scram-sha-256", "password"].contains(&self.pg_auth.as_str()),
            format!(
                "pg_auth: {:?} must be \"scram-sha-256\" or \"password\"",
                self.pg_auth
            ),
        );
        check(
            ["transaction", "session"].contains(&self.pool_mode.as_str()),
            format!(
                "pool_mode: {:?} must be \"transaction\" or \"session\"",
                self.pool_mode
            ),
        );
        check(
            ["resolve", "fast"].contains(&self.write_safety.as_str()),
            format!(
                "write_safety: {:?} must be \"resolve\" or \"fast\"",
                self.write_safety
            ),
        );
        check(
            ["primary", "any"].contains(&self.role.as_str()),
            format!("role: {:?} must be \"primary\" or \"any\"", self.role),
        );
        check(
            ["text", "json"].contains(&self.log_format.as_str()),
            format!(
                "log_format: {:?} must be \"text\" or \"json\"",
                self.log_format
            ),
        );
        check(
            self.max_connections >= 1,
            "max_connections: must be at least 1".into(),
        );
        check(
            self.min_connections >= 1 && self.min_connections <= self.max_connections,
            format!(
                "min_connections: must be between 1 and max_connections ({})",
                self.max_connections
            ),
        );
        for (key, value) in self.durations() {
            check(value > 0, format!("{key}: must be greater than 0"));
        }
        check(
            self.backoff_initial_ms <= self.backoff_max_ms,
            "backoff_initial_ms: must not exceed backoff_max_ms".into(),
        );
        check(
            self.max_request_bytes > 0,
            "max_request_bytes: must be greater than 0".into(),
        );
        check(
            self.max_response_bytes > 0,
            "max_response_bytes: must be greater than 0".into(),
        );
        check(
            (MIN_MAX_HEADER_BYTES..=MAX_MAX_HEADER_BYTES).contains(&self.max_header_bytes),
            format!(
                "max_header_bytes: must be between {MIN_MAX_HEADER_BYTES} and {MAX_MAX_HEADER_BYTES}"
            ),
        );
        check(
            self.admin_token
                .as_deref()
                .is_none_or(|token| !token.trim().is_empty()),
            "admin_token: must not be empty (remove the key to allow loopback callers without a token)"
                .into(),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    fn durations(&self) -> [(&'static str, u64); 14] {
        [
            ("guard_timeout_ms", self.guard_timeout_ms),
            ("transaction_timeout_ms", self.transaction_timeout_ms),
            ("pool_wait_timeout_ms", self.pool_wait_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("health_check_interval_ms", self.health_check_interval_ms),
            ("health_check_timeout_ms", self.health_check_timeout_ms),
            ("backoff_initial_ms", self.backoff_initial_ms),
            ("backoff_max_ms", self.backoff_max_ms),
            (
                "backoff_max_with_waiters_ms",
                self.backoff_max_with_waiters_ms,
            ),
            ("warmup_ping_timeout_ms", self.warmup_ping_timeout_ms),
            ("warmup_queries_timeout_ms", self.warmup_queries_timeout_ms),
            ("shutdown_grace_ms", self.shutdown_grace_ms),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
        ]
    }

    /// Replaces `*_file` settings by the files' contents (trailing newline removed).
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut read = |key: &str, path: &Option<PathBuf>| -> Option<String> {
            let path = path.as_ref()?;
            match read_secret(path) {
                Ok(secret) => Some(secret),
                Err(e) => {
                    problems.push(format!("{key}: cannot read {}: {e}", path.display()));
                    None
                }
            }
        };
        let client = read("client_password_file", &self.client_password_file);
        let admin = read("admin_token_file", &self.admin_token_file);
        let database = read("database_password_file", &self.database_password_file);
        self.client_password = client.or(self.client_password.take());
        self.admin_token = admin.or(self.admin_token.take());
        if let Some(password) = database {
            self.database_url = with_password(&self.database_url, &password)
                .unwrap_or_else(|| self.database_url.clone());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

fn read_secret(path: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?
        .trim_end_matches(['\n', '\r'])
        .to_owned())
}

/// What is wrong with a database URL, in words that never quote it: the
/// URL may hold a password, and the message goes to the log.
fn database_url_problem(database_url: &str) -> Option<String> {
    // libpq allows `user@/db?host=/socket/dir`; the URL parser wants a host.
    let url = match url::Url::parse(&database_url.replacen("@/", "@localhost/", 1)) {
        Ok(url) => url,
        Err(reason) => return Some(format!("not a valid URL ({reason})")),
    };
    let scheme = url.scheme();
    let has_authority = database_url
        .get(scheme.len()..)
        .is_some_and(|rest| rest.starts_with("://"));
    if matches!(scheme, "postgres" | "postgresql") && has_authority {
        None
    } else {
        Some("must start with postgres:// or postgresql://".into())
    }
}

fn with_password(database_url: &str, password: &str) -> Option<String> {
    let mut url = url::Url::parse(&database_url.replacen("@/", "@localhost/", 1)).ok()?;
    url.set_password(Some(password)).ok()?;
    Some(url.to_string())
}

/// Maps `PGWARDEN_GUARD_TIMEOUT_MS` to `guard_timeout_ms` and
/// `DATABASE_URL` to `database_url`; an unknown `PGWARDEN_*` is an error.
fn env_overrides(env: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, ConfigError> {
    let known = known_keys();
    let mut overrides = BTreeMap::new();
    let mut problems = Vec::new();
    if let Some(url) = env.get("DATABASE_URL") {
        overrides.insert("database_url".to_owned(), url.clone());
    }
    for (name, value) in env {
        let Some(key) = name.strip_prefix("PGWARDEN_") else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if known.contains(&key.as_str()) {
            overrides.insert(key, value.clone());
        } else {
            problems.push(format!(
                "{name}: no such setting (see pgwarden.example.toml)"
            ));
        }
    }
    if problems.is_empty() {
        Ok(overrides)
    } else {
        Err(ConfigError { problems })
    }
}

fn set(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
    key: &str,
    value: &str,
) -> Result<config::ConfigBuilder<config::builder::DefaultState>, ConfigError> {
    let result = if key == "warmup_queries" {
        let list: Vec<String> = value
            .split(';')
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .map(String::from)
            .collect();
        builder.set_override(key, list)
    } else {
        builder.set_override(key, value)
    };
    result.map_err(|e| ConfigError::one(format!("{key}: {e}")))
}

fn known_keys() -> Vec<&'static str> {
    vec![
        "database_url",
        "database_password_file",
        "listen",
        "ops_listen",
        "pg_listen",
        "pg_max_clients",
        "pg_startup_timeout_ms",
        "pg_max_message_bytes",
        "pg_max_prepared_statements",
        "pool_mode",
        "pg_auth",
        "pg_tls_cert",
        "pg_tls_key",
        "guard_timeout_ms",
        "transaction_timeout_ms",
        "write_safety",
        "max_connections",
        "min_connections",
        "pool_wait_timeout_ms",
        "connect_timeout_ms",
        "reset_sessions",
        "health_check_interval_ms",
        "health_check_timeout_ms",
        "backoff_initial_ms",
        "backoff_max_ms",
        "backoff_max_with_waiters_ms",
        "warmup_ping_timeout_ms",
        "warmup_queries_timeout_ms",
        "warmup_queries",
        "role",
        "max_request_bytes",
        "max_response_bytes",
        "max_header_bytes",
        "header_read_timeout_ms",
        "body_read_timeout_ms",
        "client_user",
        "client_password",
        "client_password_file",
        "admin_token",
        "admin_token_file",
        "shutdown_grace_ms",
        "log_format",
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_example_file_is_valid_and_spells_every_default() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("pgwarden.example.toml");
        let config = Config::load(&Sources {
            file: Some(example.clone()),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(config, Config::default());
        let text = std::fs::read_to_string(example).unwrap();
        for key in known_keys() {
            assert!(
                text.contains(&format!("{key} =")),
                "pgwarden.example.toml does not document {key}"
            );
        }
    }

    #[test]
    fn debug_output_hides_every_secret() {
        let config = Config {
            database_url: "postgresql://u:db-secret@h/d".into(),
            client_password: Some("client-secret".into()),
            admin_token: Some("token-secret".into()),
            ..Config::default()
        };
        let text = format!("{config:?}");
        for secret in ["db-secret", "client-secret", "token-secret"] {
            assert!(!text.contains(secret), "{text}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::load(&Sources::default()).unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn file_then_environment_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgwarden.toml");
        std::fs::write(
            &file,
            "guard_timeout_ms = 1500\nmax_connections = 4\nwarmup_queries = [\"SELECT 1\"]\n",
        )
        .unwrap();
        let sources = Sources {
            file: Some(file),
            env: env(&[
                ("PGWARDEN_MAX_CONNECTIONS", "6"),
                ("DATABASE_URL", "postgresql://app@db/app"),
                ("HOME", "/root"),
            ]),
            flags: env(&[("listen", "0.0.0.0:8080")]),
        };
        let config = Config::load(&sources).unwrap();
        assert_eq!(config.guard_timeout_ms, 1500);
        assert_eq!(config.max_connections, 6);
        assert_eq!(config.database_url, "postgresql://app@db/app");
        assert_eq!(config.listen, "0.0.0.0:8080");
        assert_eq!(config.warmup_queries, ["SELECT 1"]);
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgwarden.toml");
        std::fs::write(&file, "guard_timeout = 3\n").unwrap();
        let error = Config::load(&Sources {
            file: Some(file),
            ..Sources::default()
        })
        .unwrap_err();
        assert!(error.to_string().contains("guard_timeout"), "{error}");

        let sources = Sources {
            env: env(&[("PGWARDEN_GAURD_TIMEOUT_MS", "1")]),
            ..Sources::default()
        };
        let error = Config::load(&sources).unwrap_err();
        assert!(
            error.to_string().contains("PGWARDEN_GAURD_TIMEOUT_MS"),
            "{error}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let sources = Sources {
            flags: env(&[
                ("listen", "nowhere"),
                ("write_safety", "yolo"),
                ("min_connections", "50"),
                ("guard_timeout_ms", "0"),
            ]),
            ..Sources::default()
        };
        let error = Config::load(&sources).unwrap_err();
        let keys: Vec<_> = error
            .problems
            .iter()
            .map(|p| p.split(':').next().unwrap().to_owned())
            .collect();
        assert_eq!(
            keys,
            [
                "listen",
                "write_safety",
                "min_connections",
                "guard_timeout_ms"
            ],
            "{error}"
        );
    }

    /// The problems `config` has, each reduced to the key it names.
    fn problem_keys(config: &Config) -> Vec<String> {
        config.validate().err().map_or_else(Vec::new, |error| {
            error
                .problems
                .iter()
                .map(|p| p.split(':').next().unwrap().to_owned())
                .collect()
        })
    }

    #[test]
    fn an_empty_admin_token_is_an_error_not_an_open_door() {
        for token in ["", "   ", "\t\n"] {
            let config = Config {
                admin_token: Some(token.into()),
                ..Config::default()
            };
            assert_eq!(problem_keys(&config), ["admin_token"], "{token:?}");
        }
        let config = Config {
            admin_token: Some("s3cret".into()),
            ..Config::default()
        };
        assert!(config.validate().is_ok());
    }

    #[test]
    fn an_empty_admin_token_file_is_an_error_too() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("token");
        std::fs::write(&secret, "\n").unwrap();
        let sources = Sources {
            flags: env(&[("admin_token_file", secret.to_str().unwrap())]),
            ..Sources::default()
        };
        let error = Config::load(&sources).unwrap_err();
        assert!(error.to_string().contains("admin_token"), "{error}");
    }

    #[test]
    fn a_database_url_of_another_scheme_is_an_error_that_hides_the_password() {
        for url in [
            "mysql://app:hunter2@db:3306/app",
            "postgres:/app:hunter2@db/app",
            "http://app:hunter2@db/app",
            "app:hunter2@db/app",
            "postgres://app:hunter2@[db/app",
            "",
        ] {
            let sources = Sources {
                env: env(&[("DATABASE_URL", url)]),
                ..Sources::default()
            };
            let error = Config::load(&sources).unwrap_err();
            let text = error.to_string();
            assert!(text.contains("database_url"), "{url}: {text}");
            assert!(!text.contains("hunter2"), "{url}: {text}");
        }
        for url in [
            "postgres://app@db/app",
            "postgresql://app:pw@db:5432/app?sslmode=require",
            "postgresql://app@/app?host=/var/run/postgresql",
            "postgresql:///app",
        ] {
            let config = Config {
                database_url: url.into(),
                ..Config::default()
            };
            assert!(config.validate().is_ok(), "{url}");
        }
    }

    #[test]
    fn connection_limits_are_validated_by_name() {
        let config = Config {
            max_header_bytes: 100,
            header_read_timeout_ms: 0,
            body_read_timeout_ms: 0,
            ..Config::default()
        };
        assert_eq!(
            problem_keys(&config),
            [
                "header_read_timeout_ms",
                "body_read_timeout_ms",
                "max_header_bytes"
            ]
        );
        let sources = Sources {
            env: env(&[
                ("PGWARDEN_MAX_HEADER_BYTES", "16384"),
                ("PGWARDEN_HEADER_READ_TIMEOUT_MS", "1000"),
                ("PGWARDEN_BODY_READ_TIMEOUT_MS", "2000"),
            ]),
            ..Sources::default()
        };
        let config = Config::load(&sources).unwrap();
        assert_eq!(
            (
                config.max_header_bytes,
                config.header_read_timeout_ms,
                config.body_read_timeout_ms
            ),
            (16384, 1000, 2000)
        );
    }

    #[test]
    fn secrets_can_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("token");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let password = dir.path().join("db");
        std::fs::write(&password, "p@ss\n").unwrap();
        let sources = Sources {
            flags: env(&[
                ("admin_token_file", secret.to_str().unwrap()),
                ("database_password_file", password.to_str().unwrap()),
            ]),
            ..Sources::default()
        };
        let config = Config::load(&sources).unwrap();
        assert_eq!(config.admin_token.as_deref(), Some("s3cret"));
        assert!(
            config.database_url.contains(":p%40ss@"),
            "{}",
            config.database_url
        );

        let missing = Sources {
            flags: env(&[("admin_token_file", "/nonexistent/token")]),
            ..Sources::default()
        };
        let error = Config::load(&missing).unwrap_err();
        assert!(error.to_string().contains("admin_token_file"), "{error}");
    }
}
