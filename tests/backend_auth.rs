//! Opening backend connections: every authentication method, every sslmode,
//! Unix sockets, and what the session reports back.

mod support;

use pgwarden::backend::{Connector, ErrorKind, Host, SslMode};
use support::pg::{connect, options, scalar, superuser};
use support::{Cluster, users};

async fn uses_tls(conn: &mut pgwarden::backend::Connection) -> bool {
    let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    scalar(conn, sql).await.as_deref() == Some("t")
}

#[tokio::test]
async fn every_password_method_accepts_the_right_password_and_rejects_a_wrong_one() {
    let cluster = Cluster::start();
    let methods = [
        (users::MD5_USER, users::MD5_PASSWORD),
        (users::SCRAM_USER, users::SCRAM_PASSWORD),
        (users::CLEARTEXT_USER, users::CLEARTEXT_PASSWORD),
    ];
    for (user, password) in methods {
        let mut conn = connect(options(&cluster, user, Some(password))).await;
        assert_eq!(
            scalar(&mut conn, "SELECT current_user").await.as_deref(),
            Some(user)
        );

        let wrong = Connector::new(options(&cluster, user, Some("not-the-password"))).unwrap();
        let error = wrong
            .connect()
            .await
            .expect_err("a wrong password must fail");
        assert_eq!(error.kind(), ErrorKind::Auth, "{user}: {error}");
        assert_eq!(
            error.db_error().map(|e| e.code.as_str()),
            Some("28P01"),
            "{user}"
        );
        assert!(!error.to_string().contains("not-the-password"), "{error}");
    }
}

#[tokio::test]
async fn trust_needs_no_password_and_a_missing_password_is_a_clear_error() {
    let cluster = Cluster::start();
    let mut conn = connect(options(&cluster, users::TRUST_USER, None)).await;
    assert_eq!(
        scalar(&mut conn, "SELECT current_user").await.as_deref(),
        Some(users::TRUST_USER)
    );

    let no_password = Connector::new(options(&cluster, users::SCRAM_USER, None)).unwrap();
    let error = no_password.connect().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Auth);
    assert!(error.to_string().contains("none is configured"), "{error}");
}

#[tokio::test]
async fn sslmode_decides_whether_the_session_is_encrypted() {
    let cluster = Cluster::start();
    for (mode, encrypted) in [
        (SslMode::Disable, false),
        (SslMode::Prefer, true),
        (SslMode::Require, true),
    ] {
        let mut opts = options(&cluster, users::SCRAM_USER, Some(users::SCRAM_PASSWORD));
        opts.ssl_mode = mode;
        let mut conn = connect(opts).await;
        assert_eq!(uses_tls(&mut conn).await, encrypted, "{mode:?}");
    }
}

#[tokio::test]
async fn verify_full_trusts_the_configured_root_and_checks_the_host_name() {
    let cluster = Cluster::start();
    for host in ["localhost", "127.0.0.1"] {
        let mut opts = options(&cluster, users::SCRAM_USER, Some(users::SCRAM_PASSWORD));
        opts.host = Host::Tcp(host.into());
        opts.ssl_mode = SslMode::VerifyFull;
        opts.ssl_root_cert = Some(cluster.ca_cert_path().to_path_buf());
        let mut conn = connect(opts).await;
        assert!(uses_tls(&mut conn).await, "{host}");
    }

    let mut untrusted = options(&cluster, users::SCRAM_USER, Some(users::SCRAM_PASSWORD));
    untrusted.ssl_mode = SslMode::VerifyFull;
    let error = Connector::new(untrusted)
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Tls, "{error}");
}

#[tokio::test]
async fn a_missing_root_certificate_file_is_reported_when_the_connector_is_built() {
    let cluster = Cluster::start();
    let mut opts = superuser(&cluster);
    opts.ssl_mode = SslMode::VerifyFull;
    opts.ssl_root_cert = Some("/nonexistent/root.pem".into());
    let error = Connector::new(opts).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Tls);
    assert!(
        error.to_string().contains("/nonexistent/root.pem"),
        "{error}"
    );
}

#[tokio::test]
async fn a_user_allowed_only_over_tls_is_refused_in_clear_and_admitted_with_tls() {
    let cluster = Cluster::start();
    let clear = options(
        &cluster,
        users::SSL_ONLY_USER,
        Some(users::SSL_ONLY_PASSWORD),
    );
    let error = Connector::new(clear.clone())
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Auth, "{error}");

    let mut secure = clear;
    secure.ssl_mode = SslMode::Require;
    let mut conn = connect(secure).await;
    assert!(uses_tls(&mut conn).await);
}

#[tokio::test]
async fn a_unix_socket_connection_works() {
    let cluster = Cluster::start();
    let mut opts = superuser(&cluster);
    opts.host = Host::Unix(cluster.socket_dir().to_path_buf());
    opts.ssl_mode = SslMode::Require; // ignored on a socket, as libpq does
    let mut conn = connect(opts).await;
    let address = scalar(
        &mut conn,
        "SELECT coalesce(inet_client_addr()::text, 'local')",
    )
    .await;
    assert_eq!(address.as_deref(), Some("local"));
}

#[tokio::test]
async fn the_session_reports_its_parameters_key_and_startup_settings() {
    let cluster = Cluster::start();
    let mut opts = superuser(&cluster);
    opts.application_name = "pgwarden-test".into();
    opts.options = Some("-c search_path=audit,public".into());
    let mut conn = connect(opts).await;

    assert!(
        conn.parameter("server_version")
            .unwrap()
            .starts_with(char::is_numeric)
    );
    assert_eq!(conn.parameter("client_encoding"), Some("UTF8"));
    assert_eq!(conn.parameter("application_name"), Some("pgwarden-test"));
    let pid = scalar(&mut conn, "SELECT pg_backend_pid()").await.unwrap();
    assert_eq!(conn.process_id().map(|p| p.to_string()), Some(pid));
    assert_eq!(
        scalar(&mut conn, "SHOW search_path").await.as_deref(),
        Some("audit,public")
    );

    conn.simple_query("SET application_name = 'renamed'")
        .await
        .unwrap();
    assert_eq!(conn.parameter("application_name"), Some("renamed"));
}

#[tokio::test]
async fn a_server_that_is_down_gives_a_connect_error() {
    let cluster = Cluster::start();
    let connector = Connector::new(superuser(&cluster)).unwrap();
    cluster.stop();
    let error = connector.connect().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connect, "{error}");
    assert!(error.is_connection_level());
    cluster.start_again();
    assert!(connector.connect().await.is_ok());
}
