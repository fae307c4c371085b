//! Results come back exactly as PostgreSQL prints them: every value of a
//! broad type list is compared byte for byte with what `psql` prints.

mod support;

use pgwarden::backend::{Connection, Statement};
use support::Cluster;
use support::pg::{connect, superuser};
use support::types::{EXPRESSIONS, SCHEMA};

#[tokio::test]
async fn every_type_prints_byte_for_byte_as_psql_prints_it() {
    let cluster = Cluster::start();
    cluster.psql(SCHEMA);
    let mut conn = connect(superuser(&cluster)).await;

    let select = format!("SELECT {}", EXPRESSIONS.join(",\n       "));
    let expected = cluster.psql_rows(&select);
    let result = conn.query(&Statement::new(select.clone())).await.unwrap();
    assert_eq!(result.fields.len(), EXPRESSIONS.len());
    let actual = result.rows_as_strings();
    assert_eq!(actual.len(), 1);
    for (index, expression) in EXPRESSIONS.iter().enumerate() {
        assert_eq!(
            actual[0][index], expected[0][index],
            "{expression} differs from psql"
        );
    }

    // The simple query protocol prints the same text.
    let simple = conn.simple_query(&select).await.unwrap().remove(0);
    assert_eq!(simple.rows_as_strings(), expected);
}

#[tokio::test]
async fn field_descriptions_carry_all_six_attributes() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE item (id int8 PRIMARY KEY, name varchar(40), price numeric(10,2))");
    let mut conn = connect(superuser(&cluster)).await;
    let table_oid = cluster
        .psql("SELECT 'item'::regclass::oid")
        .trim()
        .parse::<u32>()
        .unwrap();

    let result = conn
        .query(&Statement::new(
            "SELECT id, name, price, 1 + 1 AS two FROM item",
        ))
        .await
        .unwrap();
    let described: Vec<_> = result
        .fields
        .iter()
        .map(|f| {
            (
                f.name.as_str(),
                f.type_oid,
                f.table_oid,
                f.column_id,
                f.type_size,
                f.type_modifier,
            )
        })
        .collect();
    assert_eq!(
        described,
        [
            ("id", 20, table_oid, 1, 8, -1),
            ("name", 1043, table_oid, 2, -1, 44),
            ("price", 1700, table_oid, 3, -1, (10 << 16 | 2) + 4),
            ("two", 23, 0, 0, 4, -1),
        ]
    );
    assert_eq!(result.command_tag, "SELECT 0");
    assert_eq!(result.row_count(), Some(0));
}

#[tokio::test]
async fn text_parameters_get_their_types_inferred_by_the_server() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE reading (id serial PRIMARY KEY, at timestamptz, value float8, tags text[], ok bool)");
    let mut conn = connect(superuser(&cluster)).await;

    let param = |s: &str| Some(s.to_owned());
    let insert = Statement::with_params(
        "INSERT INTO reading (at, value, tags, ok) VALUES ($1, $2, $3, $4) RETURNING id, value * 2, tags[2], ok",
        vec![
            param("2024-05-01 10:00:00+00"),
            param("1.25"),
            param("{a,\"b c\"}"),
            None,
        ],
    );
    let inserted = conn.query(&insert).await.unwrap();
    assert_eq!(inserted.command_tag, "INSERT 0 1");
    assert_eq!(
        inserted.rows_as_strings(),
        [[param("1"), param("2.5"), param("b c"), None]]
    );

    let arithmetic = Statement::with_params("SELECT $1::int + $2", vec![param("40"), param("2")]);
    assert_eq!(
        conn.query(&arithmetic).await.unwrap().rows_as_strings(),
        [[param("42")]]
    );

    let unicode = Statement::with_params("SELECT $1 || '!'", vec![param("grüße ✓")]);
    assert_eq!(
        conn.query(&unicode).await.unwrap().rows_as_strings(),
        [[param("grüße ✓!")]]
    );

    let injected =
        Statement::with_params("SELECT $1::text", vec![param("'); DROP TABLE reading; --")]);
    assert_eq!(
        conn.query(&injected).await.unwrap().rows_as_strings(),
        [[param("'); DROP TABLE reading; --")]]
    );
    assert_eq!(cluster.psql("SELECT count(*) FROM reading").trim(), "1");
}

#[tokio::test]
async fn statements_without_rows_and_empty_queries_have_the_right_shape() {
    let cluster = Cluster::start();
    let mut conn = connect(superuser(&cluster)).await;
    let results = conn
        .pipeline(&[
            Statement::new("CREATE TABLE t (x int)"),
            Statement::new("INSERT INTO t SELECT generate_series(1, 3)"),
            Statement::new("UPDATE t SET x = x + 1 WHERE x > 1"),
            Statement::new(""),
            Statement::new("DELETE FROM t"),
        ])
        .await
        .unwrap();
    let tags: Vec<_> = results
        .iter()
        .map(|r| (r.command(), r.row_count()))
        .collect();
    assert_eq!(
        tags,
        [
            ("CREATE", None),
            ("INSERT", Some(3)),
            ("UPDATE", Some(2)),
            ("", None),
            ("DELETE", Some(3)),
        ]
    );
    assert!(
        results
            .iter()
            .all(|r| r.fields.is_empty() && r.rows.is_empty())
    );
}

#[tokio::test]
async fn a_result_over_the_limit_fails_cleanly_and_the_connection_stays_usable() {
    let cluster = Cluster::start();
    let mut conn: Connection = connect(superuser(&cluster)).await;
    conn.set_result_limit(Some(64 * 1024));
    let big = Statement::new("SELECT repeat('x', 1000) FROM generate_series(1, 1000)");
    let error = conn.query(&big).await.unwrap_err();
    assert_eq!(error.kind(), pgwarden::backend::ErrorKind::ResultTooLarge);
    assert!(!conn.is_broken());
    let small = conn.query(&Statement::new("SELECT 1")).await.unwrap();
    assert_eq!(small.rows_as_strings(), [[Some("1".to_owned())]]);
}
