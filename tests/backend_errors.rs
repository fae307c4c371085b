//! SQL errors arrive with every field the server sent, and never look like
//! connection failures; the connection stays usable after them.

mod support;

use pgwarden::backend::{BackendError, ErrorKind, Statement, TransactionStatus};
use support::Cluster;
use support::pg::{connect, scalar, superuser};

fn sql_error(error: &BackendError) -> &pgwarden::backend::DbError {
    assert_eq!(error.kind(), ErrorKind::Sql, "{error}");
    assert!(!error.is_connection_level());
    error.db_error().expect("the server's report")
}

#[tokio::test]
async fn a_raised_error_carries_every_field_it_was_given() {
    let cluster = Cluster::start();
    let mut conn = connect(superuser(&cluster)).await;
    let raise = "DO $$ BEGIN RAISE EXCEPTION USING MESSAGE = 'stock too low', DETAIL = 'only 2 left', \
                 HINT = 'order more', ERRCODE = 'P0001', COLUMN = 'qty', CONSTRAINT = 'qty_positive', \
                 DATATYPE = 'int4', TABLE = 'stock', SCHEMA = 'shop'; END $$";
    let error = conn.query(&Statement::new(raise)).await.unwrap_err();
    let e = sql_error(&error);
    assert_eq!(e.severity, "ERROR");
    assert_eq!(e.severity_nonlocalized.as_deref(), Some("ERROR"));
    assert_eq!(e.code, "P0001");
    assert_eq!(e.message, "stock too low");
    assert_eq!(e.detail.as_deref(), Some("only 2 left"));
    assert_eq!(e.hint.as_deref(), Some("order more"));
    assert_eq!(e.column.as_deref(), Some("qty"));
    assert_eq!(e.constraint.as_deref(), Some("qty_positive"));
    assert_eq!(e.data_type.as_deref(), Some("int4"));
    assert_eq!(e.table.as_deref(), Some("stock"));
    assert_eq!(e.schema.as_deref(), Some("shop"));
    assert!(e.where_.as_deref().unwrap().contains("PL/pgSQL"), "{e:?}");
    assert_eq!(e.file.as_deref(), Some("pl_exec.c"));
    assert!(e.line.as_deref().unwrap().parse::<u32>().is_ok());
    assert_eq!(e.routine.as_deref(), Some("exec_stmt_raise"));

    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
    assert_eq!(
        scalar(&mut conn, "SELECT 'still usable'").await.as_deref(),
        Some("still usable")
    );
}

#[tokio::test]
async fn a_syntax_error_carries_its_position() {
    let cluster = Cluster::start();
    let mut conn = connect(superuser(&cluster)).await;
    let error = conn
        .query(&Statement::new("SELECT 1 FROM WHERE"))
        .await
        .unwrap_err();
    let e = sql_error(&error);
    assert_eq!(e.code, "42601");
    assert_eq!(e.position.as_deref(), Some("15"));
    assert_eq!(e.routine.as_deref(), Some("scanner_yyerror"));
}

#[tokio::test]
async fn an_error_inside_a_function_carries_the_internal_query_and_position() {
    let cluster = Cluster::start();
    cluster.psql(
        "CREATE FUNCTION broken() RETURNS int LANGUAGE plpgsql AS \
         $$ BEGIN RETURN (SELECT no_such_column FROM pg_class LIMIT 1); END $$",
    );
    let mut conn = connect(superuser(&cluster)).await;
    let error = conn
        .query(&Statement::new("SELECT broken()"))
        .await
        .unwrap_err();
    let e = sql_error(&error);
    assert_eq!(e.code, "42703");
    assert_eq!(
        e.internal_query.as_deref(),
        Some("(SELECT no_such_column FROM pg_class LIMIT 1)")
    );
    assert_eq!(e.internal_position.as_deref(), Some("9"));
    assert!(e.where_.as_deref().unwrap().contains("broken()"), "{e:?}");
}

#[tokio::test]
async fn constraint_violations_name_the_schema_table_column_and_constraint() {
    let cluster = Cluster::start();
    cluster.psql(
        "CREATE TABLE account (id int PRIMARY KEY, owner text NOT NULL);
         CREATE DOMAIN positive AS int CHECK (VALUE > 0);
         INSERT INTO account VALUES (1, 'ada')",
    );
    let mut conn = connect(superuser(&cluster)).await;

    let duplicate = conn
        .query(&Statement::new("INSERT INTO account VALUES (1, 'bob')"))
        .await
        .unwrap_err();
    let e = sql_error(&duplicate);
    assert_eq!(e.code, "23505");
    assert_eq!(e.schema.as_deref(), Some("public"));
    assert_eq!(e.table.as_deref(), Some("account"));
    assert_eq!(e.constraint.as_deref(), Some("account_pkey"));
    assert_eq!(e.detail.as_deref(), Some("Key (id)=(1) already exists."));

    let null = conn
        .query(&Statement::with_params(
            "INSERT INTO account VALUES ($1, $2)",
            vec![Some("2".into()), None],
        ))
        .await
        .unwrap_err();
    let e = sql_error(&null);
    assert_eq!(e.code, "23502");
    assert_eq!(e.column.as_deref(), Some("owner"));

    let domain = conn
        .query(&Statement::new("SELECT (-1)::positive"))
        .await
        .unwrap_err();
    let e = sql_error(&domain);
    assert_eq!(e.code, "23514");
    assert_eq!(e.data_type.as_deref(), Some("positive"));
    assert_eq!(e.constraint.as_deref(), Some("positive_check"));
}

#[tokio::test]
async fn in_a_pipeline_the_first_failing_statement_is_named_and_the_rest_is_rolled_back() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE log (n int)");
    let mut conn = connect(superuser(&cluster)).await;
    let error = conn
        .pipeline(&[
            Statement::new("INSERT INTO log VALUES (1)"),
            Statement::new("SELECT 1 / 0"),
            Statement::new("INSERT INTO log VALUES (3)"),
        ])
        .await
        .unwrap_err();
    let BackendError::Sql { error, statement } = &error else {
        panic!("expected an SQL error, got {error}");
    };
    assert_eq!((error.code.as_str(), *statement), ("22012", 1));
    assert_eq!(cluster.psql("SELECT count(*) FROM log").trim(), "0");
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
}

#[tokio::test]
async fn the_transaction_status_follows_every_ready_for_query() {
    let cluster = Cluster::start();
    let mut conn = connect(superuser(&cluster)).await;
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
    conn.simple_query("BEGIN").await.unwrap();
    assert_eq!(conn.transaction_status(), TransactionStatus::InTransaction);
    conn.simple_query("SELECT missing_column")
        .await
        .unwrap_err();
    assert_eq!(conn.transaction_status(), TransactionStatus::Failed);
    let refused = conn.query(&Statement::new("SELECT 1")).await.unwrap_err();
    assert_eq!(sql_error(&refused).code, "25P02");
    conn.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
}

#[tokio::test]
async fn copy_is_refused_without_desynchronising_the_session() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE c (x int)");
    let mut conn = connect(superuser(&cluster)).await;
    for sql in ["COPY c FROM STDIN", "COPY c TO STDOUT"] {
        let error = conn.simple_query(sql).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Sql, "{sql}: {error}");
        assert_eq!(
            scalar(&mut conn, "SELECT 7").await.as_deref(),
            Some("7"),
            "{sql}"
        );
        let extended = conn.query(&Statement::new(sql)).await.unwrap_err();
        assert_eq!(extended.kind(), ErrorKind::Sql, "{sql}: {extended}");
        let after = conn.query(&Statement::new("SELECT 8")).await.unwrap();
        assert_eq!(after.rows_as_strings(), [[Some("8".to_owned())]], "{sql}");
    }
}

/// The refusal of a COPY FROM STDIN at `index` of a request.
fn assert_copy_in_refused(error: &BackendError, index: usize, what: &str) {
    let BackendError::Sql {
        error: db,
        statement,
    } = error
    else {
        panic!("{what}: not an SQL error: {error}");
    };
    assert_eq!(db.code, "0A000", "{what}: {db:?}");
    assert_eq!(db.message, "COPY FROM STDIN is not supported", "{what}");
    assert_eq!(*statement, index, "{what}");
}

/// Two different answers in a row, so a reply left over from an earlier
/// request would show up as the wrong answer.
async fn assert_in_step(conn: &mut pgwarden::backend::Connection, what: &str) {
    let first = conn.query(&Statement::new("SELECT 'first'")).await;
    let first = first.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        first.rows_as_strings(),
        [[Some("first".to_owned())]],
        "{what}"
    );
    assert_eq!(
        scalar(conn, "SELECT 'second'").await.as_deref(),
        Some("second"),
        "{what}"
    );
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle, "{what}");
}

#[tokio::test]
async fn copy_from_stdin_anywhere_in_a_request_is_refused_and_the_session_stays_in_step() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE c (x int)");
    let mut conn = connect(superuser(&cluster)).await;
    let copy = "COPY c FROM STDIN";
    let requests: [&[&str]; 4] = [
        &[copy],
        &[copy, "SELECT 1"],
        &["SELECT 1", copy, "SELECT 2"],
        &["SELECT 1", copy],
    ];
    for statements in requests {
        let index = statements.iter().position(|s| *s == copy).unwrap();
        let what = format!("pipeline {statements:?}");
        let pipeline: Vec<Statement> = statements.iter().map(|s| Statement::new(*s)).collect();
        let error = conn.pipeline(&pipeline).await.unwrap_err();
        assert_copy_in_refused(&error, index, &what);
        assert_in_step(&mut conn, &what).await;

        let what = format!("simple query {statements:?}");
        let error = conn.simple_query(&statements.join("; ")).await.unwrap_err();
        assert_copy_in_refused(&error, index, &what);
        assert_in_step(&mut conn, &what).await;
    }
    assert_eq!(
        scalar(&mut conn, "SELECT count(*) FROM c").await.as_deref(),
        Some("0")
    );
}

#[tokio::test]
async fn copy_from_stdin_inside_a_transaction_batch_is_refused_and_the_session_stays_in_step() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE c (x int)");
    let mut conn = connect(superuser(&cluster)).await;
    let options = pgwarden::backend::TransactionOptions::default();
    let batches: [&[&str]; 2] = [
        &["INSERT INTO c VALUES (1)", "COPY c FROM STDIN", "SELECT 1"],
        &["INSERT INTO c VALUES (1)", "COPY c FROM STDIN"],
    ];
    for statements in batches {
        let what = format!("batch {statements:?}");
        let batch: Vec<Statement> = statements.iter().map(|s| Statement::new(*s)).collect();
        let failed = conn.transaction(&options, &batch).await.unwrap_err();
        assert!(!failed.commit_sent, "{what}");
        assert_copy_in_refused(&failed.error, 1, &what);
        assert_in_step(&mut conn, &what).await;
    }
    assert_eq!(
        scalar(&mut conn, "SELECT count(*) FROM c").await.as_deref(),
        Some("0")
    );
}
