//! Transaction batches: atomic commit, rollback on error, the requested
//! isolation level really applied, and an honest record of whether COMMIT
//! was sent.

mod support;

use pgwarden::backend::{
    BackendError, ErrorKind, IsolationLevel, Statement, TransactionOptions, TransactionStatus,
};
use support::Cluster;
use support::pg::{connect, superuser};

fn statements(sqls: &[&str]) -> Vec<Statement> {
    sqls.iter().map(|s| Statement::new(*s)).collect()
}

#[tokio::test]
async fn a_batch_commits_all_its_statements_together() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (n int)");
    let mut conn = connect(superuser(&cluster)).await;
    let results = conn
        .transaction(
            &TransactionOptions::default(),
            &statements(&[
                "INSERT INTO ledger VALUES (1)",
                "INSERT INTO ledger VALUES (2)",
                "SELECT sum(n) FROM ledger",
            ]),
        )
        .await
        .unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[2].rows_as_strings(), [[Some("3".to_owned())]]);
    assert_eq!(cluster.psql("SELECT count(*) FROM ledger").trim(), "2");
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
}

#[tokio::test]
async fn a_failing_statement_rolls_the_whole_batch_back_before_commit_is_sent() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (n int PRIMARY KEY)");
    let mut conn = connect(superuser(&cluster)).await;
    let failure = conn
        .transaction(
            &TransactionOptions::default(),
            &statements(&[
                "INSERT INTO ledger VALUES (1)",
                "INSERT INTO ledger VALUES (1)",
                "INSERT INTO ledger VALUES (2)",
            ]),
        )
        .await
        .unwrap_err();
    assert!(!failure.commit_sent);
    let BackendError::Sql { error, statement } = &failure.error else {
        panic!("expected an SQL error, got {}", failure.error);
    };
    assert_eq!((error.code.as_str(), *statement), ("23505", 1));
    assert_eq!(cluster.psql("SELECT count(*) FROM ledger").trim(), "0");
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);

    let again = conn
        .transaction(
            &TransactionOptions::default(),
            &statements(&["INSERT INTO ledger VALUES (5)"]),
        )
        .await;
    assert!(again.is_ok(), "the connection is usable after a rollback");
}

#[tokio::test]
async fn an_error_at_commit_is_reported_with_commit_sent() {
    let cluster = Cluster::start();
    cluster.psql(
        "CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE child (parent_id int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)",
    );
    let mut conn = connect(superuser(&cluster)).await;
    let failure = conn
        .transaction(
            &TransactionOptions::default(),
            &statements(&["INSERT INTO child VALUES (42)"]),
        )
        .await
        .unwrap_err();
    assert!(failure.commit_sent);
    assert_eq!(failure.error.kind(), ErrorKind::Sql);
    assert_eq!(failure.error.db_error().unwrap().code, "23503");
    assert_eq!(cluster.psql("SELECT count(*) FROM child").trim(), "0");
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
}

#[tokio::test]
async fn isolation_level_read_only_and_deferrable_are_applied() {
    let cluster = Cluster::start();
    let mut conn = connect(superuser(&cluster)).await;
    let probe = "SELECT current_setting('transaction_isolation'), \
                 current_setting('transaction_read_only'), current_setting('transaction_deferrable')";
    let cases = [
        (
            IsolationLevel::ReadCommitted,
            false,
            false,
            "read committed",
            "off",
            "off",
        ),
        (
            IsolationLevel::RepeatableRead,
            false,
            false,
            "repeatable read",
            "off",
            "off",
        ),
        (
            IsolationLevel::Serializable,
            true,
            true,
            "serializable",
            "on",
            "on",
        ),
        (
            IsolationLevel::ReadUncommitted,
            true,
            false,
            "read uncommitted",
            "on",
            "off",
        ),
    ];
    for (level, read_only, deferrable, isolation, ro, def) in cases {
        let options = TransactionOptions {
            isolation: Some(level),
            read_only,
            deferrable,
            ..TransactionOptions::default()
        };
        let results = conn
            .transaction(&options, &statements(&[probe]))
            .await
            .unwrap();
        let seen = results[0].rows_as_strings().remove(0);
        let expected = [isolation, ro, def].map(|s| Some(s.to_owned()));
        assert_eq!(seen, expected, "{level:?}");
    }

    let read_only = TransactionOptions {
        read_only: true,
        ..TransactionOptions::default()
    };
    let write = conn
        .transaction(&read_only, &statements(&["CREATE TABLE nope (x int)"]))
        .await
        .unwrap_err();
    assert_eq!(write.error.db_error().unwrap().code, "25006");
}

#[tokio::test]
async fn an_identified_batch_reports_its_xid_and_the_server_incarnation() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (n int PRIMARY KEY)");
    let mut conn = connect(superuser(&cluster)).await;
    let identify = TransactionOptions {
        identify: true,
        ..TransactionOptions::default()
    };
    let results = conn
        .transaction(&identify, &statements(&["INSERT INTO ledger VALUES (1)"]))
        .await
        .unwrap();
    assert_eq!(
        results.len(),
        1,
        "the identity query is not a caller result"
    );
    assert_eq!(results[0].command_tag, "INSERT 0 1");

    let failure = conn
        .transaction(
            &identify,
            &statements(&[
                "INSERT INTO ledger VALUES (2)",
                "INSERT INTO ledger VALUES (1)",
            ]),
        )
        .await
        .unwrap_err();
    let BackendError::Sql { statement, .. } = failure.error else {
        panic!("expected an SQL error");
    };
    assert_eq!(statement, 1, "indexes count only the caller's statements");

    let deferred = TransactionOptions {
        identify: true,
        ..TransactionOptions::default()
    };
    cluster.psql(
        "CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE child (parent_id int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)",
    );
    let at_commit = conn
        .transaction(&deferred, &statements(&["INSERT INTO child VALUES (9)"]))
        .await
        .unwrap_err();
    let identity = at_commit.identity.expect("identity received before COMMIT");
    assert!(identity.xid > 0);
    let started = cluster.psql("SELECT pg_postmaster_start_time()::text");
    assert_eq!(identity.server_started, started.trim());
    let status = cluster.psql(&format!("SELECT txid_status({})", identity.xid));
    assert_eq!(status.trim(), "aborted");
}

#[tokio::test]
async fn a_read_only_statement_runs_in_one_read_only_transaction() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (n int); CREATE SEQUENCE ticket");
    let mut conn = connect(superuser(&cluster)).await;
    let probe = Statement::new("SELECT current_setting('transaction_read_only')");
    let result = conn.read_only(&probe).await.unwrap();
    assert_eq!(result.rows_as_strings(), [[Some("on".to_owned())]]);
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);

    let hidden_write = conn
        .read_only(&Statement::new("SELECT nextval('ticket')"))
        .await
        .unwrap_err();
    let BackendError::Sql { error, statement } = &hidden_write else {
        panic!("expected an SQL error, got {hidden_write}");
    };
    assert_eq!((error.code.as_str(), *statement), ("25006", 0));
    assert_eq!(
        conn.transaction_status(),
        TransactionStatus::Idle,
        "rolled back"
    );
    assert_eq!(cluster.psql("SELECT last_value FROM ticket").trim(), "1");
    assert_eq!(
        cluster.psql("SELECT is_called FROM ticket").trim(),
        "f",
        "nothing was applied"
    );
}
