//! Where and how a backend connection is made.
//!
//! The settings come from a libpq-style `postgresql://` URL, so operators can
//! reuse the `DATABASE_URL` they already have. Only the keys the daemon acts on
//! are accepted; an unknown query parameter is an error rather than a silent
//! no-op, because a mistyped `sslmode` must never downgrade security quietly.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use percent_encoding::percent_decode_str;

use super::error::BackendError;

/// Default TCP port of PostgreSQL.
pub const DEFAULT_PORT: u16 = 5432;
/// Default bound on establishing a connection (socket, TLS, startup and authentication).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// `application_name` reported to the server unless the URL sets another.
pub const DEFAULT_APPLICATION_NAME: &str = "pgwarden";

/// A password or other credential: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for the few places that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address reached over TCP.
    Tcp(String),
    /// A directory holding the server's Unix socket (`.s.PGSQL.<port>`).
    Unix(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(name) => f.write_str(name),
            Host::Unix(dir) => write!(f, "{}", dir.display()),
        }
    }
}

/// Whether and how TLS is used, with libpq's meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS when the server offers it, without verifying the certificate.
    #[default]
    Prefer,
    /// Insist on TLS, without verifying the certificate.
    Require,
    /// Insist on TLS, verify the chain against `sslrootcert` (or the public
    /// web roots when none is given) and that the certificate names the host.
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's spelling (`disable`, `prefer`, `require`, `verify-full`).
    pub fn parse(value: &str) -> Result<Self, BackendError> {
        match value {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(BackendError::Config(format!(
                "sslmode {other:?} is not supported (use disable, prefer, require or verify-full)"
            ))),
        }
    }
}

/// Everything needed to open a backend connection.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Where the server listens.
    pub host: Host,
    /// TCP port, also the suffix of the Unix socket's file name.
    pub port: u16,
    /// Role to log in as.
    pub user: String,
    /// Password, when the server asks for one.
    pub password: Option<Secret>,
    /// Database to connect to.
    pub database: String,
    /// Shown in `pg_stat_activity`, so operators can tell pgwarden's sessions apart.
    pub application_name: String,
    /// Command-line options for the backend (`-c name=value ...`), as libpq's `options`.
    pub options: Option<String>,
    /// TLS policy.
    pub ssl_mode: SslMode,
    /// PEM file of trusted roots for `verify-full`.
    pub ssl_root_cert: Option<PathBuf>,
    /// Bound on socket connect, TLS handshake, startup and authentication together.
    pub connect_timeout: Duration,
}

impl ConnectOptions {
    /// Options for `user` on `database` at a TCP host, with every other setting at its default.
    pub fn tcp(host: &str, port: u16, user: &str, database: &str) -> Self {
        Self {
            host: Host::Tcp(host.to_owned()),
            port,
            user: user.to_owned(),
            password: None,
            database: database.to_owned(),
            application_name: DEFAULT_APPLICATION_NAME.to_owned(),
            options: None,
            ssl_mode: SslMode::default(),
            ssl_root_cert: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Parses a `postgres://` or `postgresql://` URL.
    ///
    /// Accepted query parameters: `host` (a directory selects a Unix socket),
    /// `port`, `sslmode`, `sslrootcert`, `application_name`, `options`,
    /// `connect_timeout` (seconds), `user`, `password`, `dbname`.
    pub fn from_url(input: &str) -> Result<Self, BackendError> {
        // libpq allows `user@/db?host=/socket/dir`; the URL parser wants a host.
        let input = input.replacen("@/", "@localhost/", 1);
        let url = url::Url::parse(&input).map_err(|e| invalid_url(&e.to_string()))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(invalid_url(
                "the scheme must be postgres:// or postgresql://",
            ));
        }
        let user = decode(url.username())?;
        let user = if user.is_empty() {
            "postgres".to_owned()
        } else {
            user
        };
        let mut options = Self::tcp(
            url.host_str()
                .filter(|h| !h.is_empty())
                .unwrap_or("localhost"),
            url.port().unwrap_or(DEFAULT_PORT),
            &user,
            &user,
        );
        if let Some(password) = url.password() {
            options.password = Some(Secret::new(decode(password)?));
        }
        let path = decode(url.path().trim_start_matches('/'))?;
        if !path.is_empty() {
            options.database = path;
        }
        for (key, value) in url.query_pairs() {
            options.apply_param(&key, &value)?;
        }
        Ok(options)
    }

    fn apply_param(&mut self, key: &str, value: &str) -> Result<(), BackendError> {
        match key {
            "host" if value.starts_with('/') => self.host = Host::Unix(PathBuf::from(value)),
            "host" => self.host = Host::Tcp(value.to_owned()),
            "port" => {
                self.port = value
                    .parse()
                    .map_err(|_| invalid_url("port must be a number"))?
            }
            "sslmode" => self.ssl_mode = SslMode::parse(value)?,
            "sslrootcert" => self.ssl_root_cert = Some(PathBuf::from(value)),
            "application_name" => self.application_name = value.to_owned(),
            "options" => self.options = Some(value.to_owned()),
            "user" => self.user = value.to_owned(),
            "password" => self.password = Some(Secret::new(value)),
            "dbname" => self.database = value.to_owned(),
            "connect_timeout" => {
                let seconds: u64 = value
                    .parse()
                    .map_err(|_| invalid_url("connect_timeout must be whole seconds"))?;
                self.connect_timeout = Duration::from_secs(seconds.max(1));
            }
            other => return Err(invalid_url(&format!("unknown parameter {other:?}"))),
        }
        Ok(())
    }

    /// `host:port` (or the socket path) for messages; never contains credentials.
    pub fn describe_target(&self) -> String {
        match &self.host {
            Host::Tcp(name) => format!("{name}:{}", self.port),
            Host::Unix(dir) => format!("{}/.s.PGSQL.{}", dir.display(), self.port),
        }
    }
}

fn decode(part: &str) -> Result<String, BackendError> {
    percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| invalid_url("percent-encoded part is not UTF-8"))
}

fn invalid_url(reason: &str) -> BackendError {
    BackendError::Config(format!("invalid database URL: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_url_sets_every_field() {
        let o = ConnectOptions::from_url(
            "postgresql://al%40ice:p%2Fss@db.example:6543/shop?sslmode=require&application_name=api&options=-c%20search_path%3Dx&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(o.host, Host::Tcp("db.example".into()));
        assert_eq!(o.port, 6543);
        assert_eq!(o.user, "al@ice");
        assert_eq!(o.password.as_ref().unwrap().expose(), "p/ss");
        assert_eq!(o.database, "shop");
        assert_eq!(o.ssl_mode, SslMode::Require);
        assert_eq!(o.application_name, "api");
        assert_eq!(o.options.as_deref(), Some("-c search_path=x"));
        assert_eq!(o.connect_timeout, Duration::from_secs(3));
    }

    #[test]
    fn a_socket_directory_in_host_selects_a_unix_socket() {
        let o = ConnectOptions::from_url("postgresql://bob@/app?host=/var/run/postgresql").unwrap();
        assert_eq!(o.host, Host::Unix("/var/run/postgresql".into()));
        assert_eq!(o.describe_target(), "/var/run/postgresql/.s.PGSQL.5432");
        assert_eq!(o.database, "app");
    }

    #[test]
    fn defaults_follow_libpq() {
        let o = ConnectOptions::from_url("postgres://carol@localhost").unwrap();
        assert_eq!(o.port, DEFAULT_PORT);
        assert_eq!(o.database, "carol");
        assert_eq!(o.ssl_mode, SslMode::Prefer);
        assert_eq!(o.application_name, DEFAULT_APPLICATION_NAME);
    }

    #[test]
    fn bad_urls_are_rejected_with_the_reason() {
        for (url, needle) in [
            ("mysql://x@y/z", "scheme"),
            ("postgresql://x@y/z?sslmode=verify-maybe", "sslmode"),
            ("postgresql://x@y/z?colour=blue", "unknown parameter"),
            ("postgresql://x@y/z?connect_timeout=soon", "connect_timeout"),
        ] {
            let err = ConnectOptions::from_url(url).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let o = ConnectOptions::from_url("postgresql://u:hunter2@h/d").unwrap();
        assert!(!format!("{o:?}").contains("hunter2"));
    }
}
