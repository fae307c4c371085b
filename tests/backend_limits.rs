//! The result limit bounds what a session holds in memory, not only what it
//! returns: a row or message too large for it is refused while it arrives,
//! and the session stays in step and usable.

mod support;

use pgwarden::backend::{Connection, ErrorKind, Statement};
use support::Cluster;
use support::memory::{peak_growth, reset_peak};
use support::pg::{connect, scalar, superuser};

const MIB: usize = 1024 * 1024;

async fn limited(cluster: &Cluster, limit: usize) -> Connection {
    let mut conn = connect(superuser(cluster)).await;
    conn.set_result_limit(Some(limit));
    conn
}

async fn assert_still_usable(conn: &mut Connection) {
    assert!(!conn.is_broken());
    let answer = conn.query(&Statement::new("SELECT 'next'")).await.unwrap();
    assert_eq!(answer.rows_as_strings(), [[Some("next".to_owned())]]);
    assert_eq!(scalar(conn, "SELECT 42").await.as_deref(), Some("42"));
}

#[tokio::test]
async fn a_single_row_over_the_limit_is_refused_and_the_session_stays_usable() {
    let cluster = Cluster::start();
    let mut conn = limited(&cluster, MIB).await;
    let huge = Statement::new("SELECT repeat('x', 50000000)");
    let before = reset_peak();
    let error = conn.query(&huge).await.unwrap_err();
    let growth = peak_growth(before);
    assert_eq!(error.kind(), ErrorKind::ResultTooLarge);
    // Generous, as other tests of this file run at the same time; holding
    // the row would take 50 MB.
    assert!(growth < 20 * MIB as u64, "peak grew by {growth} bytes");
    assert_still_usable(&mut conn).await;

    let simple = conn.simple_query("SELECT 1; SELECT repeat('y', 50000000); SELECT 2");
    assert_eq!(simple.await.unwrap_err().kind(), ErrorKind::ResultTooLarge);
    assert_still_usable(&mut conn).await;
}

#[tokio::test]
async fn a_row_that_fits_alone_but_not_after_earlier_rows_is_refused() {
    let cluster = Cluster::start();
    let mut conn = limited(&cluster, MIB).await;
    let rows = Statement::new("SELECT repeat('x', 600000) FROM generate_series(1, 3)");
    let error = conn.query(&rows).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::ResultTooLarge);
    assert_still_usable(&mut conn).await;

    let fits = Statement::new("SELECT repeat('x', 600000)");
    let answer = conn.query(&fits).await.unwrap();
    assert_eq!(answer.rows[0].bytes(0).map(<[u8]>::len), Some(600000));
}

#[tokio::test]
async fn many_small_rows_over_the_limit_are_refused() {
    let cluster = Cluster::start();
    let mut conn = limited(&cluster, MIB).await;
    let many = Statement::new("SELECT repeat('x', 1000) FROM generate_series(1, 100000)");
    let error = conn.query(&many).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::ResultTooLarge);
    assert_still_usable(&mut conn).await;
}

#[tokio::test]
async fn an_error_message_over_the_limit_is_refused_and_the_session_stays_usable() {
    let cluster = Cluster::start();
    let mut conn = limited(&cluster, MIB).await;
    let raise = Statement::new("DO $$ BEGIN RAISE EXCEPTION '%', repeat('e', 5000000); END $$");
    let error = conn.query(&raise).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::ResultTooLarge);
    assert_still_usable(&mut conn).await;
}

#[tokio::test]
async fn a_notice_over_the_limit_is_skipped_without_failing_the_statement() {
    let cluster = Cluster::start();
    let mut conn = limited(&cluster, MIB).await;
    let notice = "DO $$ BEGIN RAISE NOTICE '%', repeat('n', 5000000); END $$";
    let results = conn.simple_query(notice).await.unwrap();
    assert_eq!(results[0].command_tag, "DO");
    assert_still_usable(&mut conn).await;
}

#[tokio::test]
async fn copy_out_data_over_the_limit_is_refused_and_the_session_stays_usable() {
    let cluster = Cluster::start();
    let mut conn = limited(&cluster, MIB).await;
    let copy = "COPY (SELECT repeat('c', 5000000)) TO STDOUT";
    let error = conn.simple_query(copy).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Sql, "{error}");
    assert_still_usable(&mut conn).await;
}

#[tokio::test]
async fn a_transaction_over_the_limit_is_rolled_back_and_the_session_stays_reusable() {
    use pgwarden::backend::{TransactionOptions, TransactionStatus};

    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE kept (n int)");
    let mut conn = limited(&cluster, MIB).await;
    let batch = [
        Statement::new("INSERT INTO kept VALUES (1)"),
        Statement::new("SELECT repeat('x', 5000000)"),
    ];
    let failed = conn
        .transaction(&TransactionOptions::default(), &batch)
        .await
        .unwrap_err();
    assert_eq!(failed.error.kind(), ErrorKind::ResultTooLarge);
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
    assert_still_usable(&mut conn).await;
    assert_eq!(cluster.psql("SELECT count(*) FROM kept").trim(), "0");
}
