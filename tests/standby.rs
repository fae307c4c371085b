//! Backend connections see a server's role, which the lifecycle's warm-up
//! checks: a standby is in recovery until it is promoted.

mod support;

use support::Cluster;
use support::pg::{connect, scalar, superuser};

#[tokio::test]
async fn a_standby_reports_recovery_until_promoted() {
    let primary = Cluster::start();
    primary.psql("CREATE TABLE replicated (x int); INSERT INTO replicated VALUES (7)");
    let standby = primary.start_standby();

    let mut conn = connect(superuser(&standby)).await;
    assert_eq!(
        scalar(&mut conn, "SELECT pg_is_in_recovery()")
            .await
            .as_deref(),
        Some("t")
    );
    let write = conn
        .simple_query("INSERT INTO replicated VALUES (8)")
        .await
        .unwrap_err();
    assert_eq!(write.db_error().unwrap().code, "25006");

    standby.promote();
    let mut conn = connect(superuser(&standby)).await;
    assert_eq!(
        scalar(&mut conn, "SELECT pg_is_in_recovery()")
            .await
            .as_deref(),
        Some("f")
    );
    conn.simple_query("INSERT INTO replicated VALUES (8)")
        .await
        .unwrap();
    assert_eq!(
        scalar(&mut conn, "SELECT sum(x) FROM replicated")
            .await
            .as_deref(),
        Some("15")
    );
}
