//! What the database says of a write whose connection broke after COMMIT,
//! when the server crashed and recovered in place: one backend killed (the
//! OOM killer's SIGKILL) makes the postmaster end every session and replay
//! the WAL without restarting, so its start time does not change, and a
//! transaction id that never reached the WAL is handed out again. The
//! outcome question must never take that new transaction's commit for the
//! broken write's.

mod support;

use pgwarden::backend::{Connection, Statement, TxIdentity};
use pgwarden::guard::replay::TxOutcome;
use support::Cluster;
use support::pg::{connect, scalar, superuser};

/// What a write records of itself in its first round trip, asked here by
/// hand inside a transaction that stays open and writes nothing, so its
/// xid never reaches the WAL.
async fn identify_open_transaction(conn: &mut Connection) -> TxIdentity {
    conn.simple_query("BEGIN").await.unwrap();
    let row = conn
        .simple_query(
            "SELECT txid_current(), pg_postmaster_start_time()::text, \
             substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8), \
             pg_stat_get_bgwriter_stat_reset_time()::text",
        )
        .await
        .unwrap()
        .remove(0)
        .rows_as_strings()
        .remove(0);
    let text = |i: usize| row[i].clone().unwrap();
    TxIdentity {
        xid: text(0).parse().unwrap(),
        server_started: text(1),
        timeline: text(2),
        stats_reset: row[3].clone(),
    }
}

/// Hands out xids until `xid` comes round again, and commits a write under
/// it. Returns false if the server never handed it out again.
async fn commit_under(conn: &mut Connection, xid: u64) -> bool {
    for _ in 0..1000 {
        conn.simple_query("BEGIN").await.unwrap();
        let current: u64 = scalar(conn, "SELECT txid_current()")
            .await
            .unwrap()
            .parse()
            .unwrap();
        if current == xid {
            conn.simple_query("INSERT INTO reused VALUES (1); COMMIT")
                .await
                .unwrap();
            return true;
        }
        conn.simple_query("ROLLBACK").await.unwrap();
        if current > xid {
            return false;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xid_handed_out_again_after_an_in_place_crash_is_not_taken_for_the_write() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE reused (n int)");
    let mut writer = connect(superuser(&cluster)).await;
    let identity = identify_open_transaction(&mut writer).await;

    cluster.kill_one_backend();
    let mut asker = connect(superuser(&cluster)).await;
    let started = scalar(&mut asker, "SELECT pg_postmaster_start_time()::text").await;
    assert_eq!(
        started.as_deref(),
        Some(identity.server_started.as_str()),
        "the server recovered in place"
    );
    assert!(
        commit_under(&mut asker, identity.xid).await,
        "xid {} was handed out again after the crash",
        identity.xid
    );
    let status = scalar(&mut asker, &format!("SELECT txid_status({})", identity.xid)).await;
    assert_eq!(
        status.as_deref(),
        Some("committed"),
        "someone else's commit"
    );

    let outcome = pgwarden::guard::outcome::ask(&mut asker, &identity)
        .await
        .expect("the asking session works");
    assert_eq!(
        outcome,
        TxOutcome::NeverLogged,
        "the broken write never reached the WAL, so it never committed"
    );
    let still = asker
        .query(&Statement::new("SELECT count(*) FROM reused"))
        .await
        .unwrap();
    assert_eq!(still.rows_as_strings(), [[Some("1".to_owned())]]);
}
