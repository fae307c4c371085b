//! Text of the configuration files and setup SQL that make a kit cluster.
//!
//! Settings shared by all clusters live in the template's `postgresql.conf`;
//! per-cluster settings (port, socket directory, TLS) go into
//! `kit-cluster.conf`, which `postgresql.conf` includes last so it wins.

use std::path::Path;

use super::users::*;

/// File holding the per-cluster settings, inside the data directory.
pub const CLUSTER_CONF: &str = "kit-cluster.conf";

/// Settings appended to every template's `postgresql.conf`.
pub const SHARED_SETTINGS: &str = "
# --- pgwarden test kit ---
# Durability against OS crashes is pointless for throwaway clusters.
fsync = off
full_page_writes = off
# synchronous_commit stays on: a crash (immediate shutdown) must not lose
# acknowledged commits, or crash tests could not tell a client bug from
# data the server legitimately dropped.
synchronous_commit = on
max_connections = 100
shared_buffers = 16MB
wal_level = replica
max_wal_senders = 5
wal_keep_size = 64MB
hot_standby = on
password_encryption = 'scram-sha-256'
logging_collector = off
log_min_messages = info
log_connections = on
log_line_prefix = '%m [%p] %b %u@%d '
include_if_exists = 'kit-cluster.conf'
";

/// Per-cluster settings: TCP on 127.0.0.1 with TLS, plus a private socket directory.
pub fn cluster_settings(port: u16, socket_dir: &Path) -> String {
    format!(
        "listen_addresses = '127.0.0.1'\n\
         port = {port}\n\
         unix_socket_directories = '{}'\n\
         cluster_name = '{}'\n\
         ssl = on\n\
         ssl_cert_file = 'server.crt'\n\
         ssl_key_file = 'server.key'\n",
        socket_dir.display(),
        cluster_name(port),
    )
}

/// Port number of the template build server. It only names the socket file
/// in a private directory: that server listens on no TCP port at all.
pub const TEMPLATE_PORT: u16 = 55432;

/// Settings while building the template: unix socket only, no TLS material yet.
pub fn template_settings(socket_dir: &Path) -> String {
    format!(
        "listen_addresses = ''\nport = {TEMPLATE_PORT}\nunix_socket_directories = '{}'\nssl = off\n",
        socket_dir.display()
    )
}

/// `cluster_name` of the server on `port`; a standby also reports it as its
/// `application_name` in the primary's `pg_stat_replication`.
pub fn cluster_name(port: u16) -> String {
    format!("pgwarden-kit-{port}")
}

/// `pg_hba.conf`: one block per role, first match wins.
pub fn hba() -> String {
    let mut lines = vec![
        format!("local all {SUPERUSER} trust"),
        format!("host all {SUPERUSER} 127.0.0.1/32 trust"),
        format!("local replication {SUPERUSER} trust"),
        format!("host replication {SUPERUSER} 127.0.0.1/32 trust"),
    ];
    for (user, method) in [
        (TRUST_USER, "trust"),
        (MD5_USER, "md5"),
        (SCRAM_USER, "scram-sha-256"),
        (CLEARTEXT_USER, "password"),
    ] {
        lines.push(format!("local all {user} {method}"));
        lines.push(format!("host all {user} 127.0.0.1/32 {method}"));
    }
    lines.push(format!(
        "hostssl all {SSL_ONLY_USER} 127.0.0.1/32 scram-sha-256"
    ));
    lines.push(format!("hostnossl all {SSL_ONLY_USER} 127.0.0.1/32 reject"));
    lines.push(format!("local all {SSL_ONLY_USER} reject"));
    lines.join("\n") + "\n"
}

/// SQL creating the roles; each password is hashed with the scheme its auth method needs.
pub fn setup_sql() -> String {
    let mut sql = String::from("SET password_encryption = 'md5';\n");
    sql += &create_role(MD5_USER, Some(MD5_PASSWORD));
    sql += "SET password_encryption = 'scram-sha-256';\n";
    sql += &create_role(SCRAM_USER, Some(SCRAM_PASSWORD));
    sql += &create_role(CLEARTEXT_USER, Some(CLEARTEXT_PASSWORD));
    sql += &create_role(SSL_ONLY_USER, Some(SSL_ONLY_PASSWORD));
    sql += &create_role(TRUST_USER, None);
    let everyone = NON_SUPERUSERS.join(", ");
    sql += &format!("GRANT ALL ON DATABASE postgres TO {everyone};\n");
    sql += &format!("GRANT ALL ON SCHEMA public TO {everyone};\n");
    sql
}

/// `CREATE ROLE ... LOGIN [PASSWORD '...']`.
fn create_role(name: &str, password: Option<&str>) -> String {
    match password {
        Some(password) => format!(
            "CREATE ROLE {name} LOGIN PASSWORD {};\n",
            quote_literal(password)
        ),
        None => format!("CREATE ROLE {name} LOGIN;\n"),
    }
}

/// A SQL string literal.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
