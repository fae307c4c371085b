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
