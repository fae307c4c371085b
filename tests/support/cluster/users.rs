//! Roles present in every kit cluster, one per authentication method, so
//! tests can exercise each login path of the client under test.
//!
//! All non-superusers can log in and create objects in database `postgres`.

/// Superuser; trusted from the unix socket and 127.0.0.1, and allowed to replicate.
pub const SUPERUSER: &str = "postgres";

/// Trusted role: logs in without a password.
pub const TRUST_USER: &str = "trust_user";

/// Role whose password is stored as an MD5 hash and checked with `md5` auth.
pub const MD5_USER: &str = "md5_user";
/// Password of [`MD5_USER`].
pub const MD5_PASSWORD: &str = "md5-secret";

/// Role checked with `scram-sha-256` auth.
pub const SCRAM_USER: &str = "scram_user";
/// Password of [`SCRAM_USER`].
pub const SCRAM_PASSWORD: &str = "scram-secret";

/// Role checked with `password` auth (the password travels in clear text).
pub const CLEARTEXT_USER: &str = "cleartext_user";
/// Password of [`CLEARTEXT_USER`].
pub const CLEARTEXT_PASSWORD: &str = "clear-secret";

/// Role that may only log in over TLS (`hostssl`, scram); plain TCP is rejected.
pub const SSL_ONLY_USER: &str = "ssl_only_user";
/// Password of [`SSL_ONLY_USER`].
pub const SSL_ONLY_PASSWORD: &str = "ssl-secret";

/// Every role the kit creates besides the superuser.
pub const NON_SUPERUSERS: [&str; 5] = [
    TRUST_USER,
    MD5_USER,
    SCRAM_USER,
    CLEARTEXT_USER,
    SSL_ONLY_USER,
];
