//! The Neon-compatible data API over real HTTP against a real PostgreSQL:
//! result shapes, parameters, batches, every error answer, and limits.

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use support::types::{EXPRESSIONS, SCHEMA};

const ERROR_KEYS: [&str; 17] = [
    "message",
    "code",
    "detail",
    "hint",
    "position",
    "internalPosition",
    "internalQuery",
    "where",
    "schema",
    "table",
    "column",
    "dataType",
    "constraint",
    "file",
    "line",
    "routine",
    "severity",
];

fn assert_error_shape(body: &Value) {
    let object = body.as_object().expect("a JSON object");
    for key in ERROR_KEYS {
        assert!(object.contains_key(key), "missing {key} in {body}");
    }
    assert_eq!(object.len(), 17, "{body}");
}

#[tokio::test]
async fn a_single_query_answers_in_neon_shape_with_all_field_attributes() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE item (id int8 PRIMARY KEY, name varchar(40)); INSERT INTO item VALUES (1, 'pen'), (2, NULL)");
    let table = cluster
        .psql("SELECT 'item'::regclass::oid")
        .trim()
        .parse::<u64>()
        .unwrap();
    let daemon = TestDaemon::start(config_for(&cluster)).await;

    let reply = daemon
        .sql(
            r#"{"query":"SELECT id, name FROM item ORDER BY id","params":[]}"#,
            &[("Neon-Array-Mode", "true")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers.contains_key("x-request-id"));
    assert_eq!(
        reply.body,
        json!({
            "command": "SELECT",
            "rowCount": 2,
            "rows": [["1", "pen"], ["2", null]],
            "fields": [
                {"name": "id", "dataTypeID": 20, "tableID": table, "columnID": 1, "dataTypeSize": 8, "dataTypeModifier": -1, "format": "text"},
                {"name": "name", "dataTypeID": 1043, "tableID": table, "columnID": 2, "dataTypeSize": -1, "dataTypeModifier": 44, "format": "text"},
            ],
            "rowAsArray": true,
        })
    );

    let objects = daemon
        .sql(r#"{"query":"SELECT id, name FROM item WHERE id = 1"}"#, &[])
        .await;
    assert_eq!(objects.body["rows"], json!([{"id": "1", "name": "pen"}]));
    assert_eq!(objects.body["rowAsArray"], json!(false));

    let insert = daemon
        .query("INSERT INTO item VALUES (3, 'ink'), (4, 'pad')", json!([]))
        .await;
    assert_eq!(
        (insert["command"].clone(), insert["rowCount"].clone()),
        (json!("INSERT"), json!(2))
    );
    let ddl = daemon.query("CREATE INDEX ON item (name)", json!([])).await;
    assert_eq!(
        (ddl["command"].clone(), ddl["rowCount"].clone()),
        (json!("CREATE"), Value::Null)
    );
}

#[tokio::test]
async fn every_type_comes_back_exactly_as_psql_prints_it() {
    let cluster = Cluster::start();
    cluster.psql(SCHEMA);
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let select = format!("SELECT {}", EXPRESSIONS.join(",\n       "));
    let expected = cluster.psql_rows(&select);
    let body = daemon.query(&select, json!([])).await;
    let row = body["rows"][0].as_array().unwrap();
    for (index, expression) in EXPRESSIONS.iter().enumerate() {
        let want = expected[0][index]
            .as_deref()
            .map_or(Value::Null, |v| Value::String(v.to_owned()));
        assert_eq!(row[index], want, "{expression}");
    }
}

#[tokio::test]
async fn parameters_are_text_with_inferred_types_and_plain_json_values_work_too() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let body = daemon
        .query(
            "SELECT $1::int + 1, $2::text, $3::bool, $4::numeric * 2, $5::int[], $6::jsonb ->> 'k', $7::text IS NULL",
            json!(["41", "héllo", true, 1.25, [1, null, 3], {"k": "v"}, null]),
        )
        .await;
    assert_eq!(
        body["rows"][0],
        json!(["42", "héllo", "t", "2.50", "{1,NULL,3}", "v", "t"])
    );
}

#[tokio::test]
async fn a_batch_runs_as_one_transaction_with_the_requested_isolation() {
    let cluster = Cluster::start();
    cluster.psql("CREATE TABLE ledger (n int PRIMARY KEY)");
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let probe = "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only'), current_setting('transaction_deferrable')";
    let body = json!({"queries": [{"query": probe}, {"query": "SELECT $1::int", "params": ["5"]}]})
        .to_string();
    let headers = [
        ("Neon-Array-Mode", "true"),
        ("Neon-Batch-Isolation-Level", "Serializable"),
        ("Neon-Batch-Read-Only", "true"),
        ("Neon-Batch-Deferrable", "true"),
    ];
    let reply = daemon.sql(body, &headers).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.body["results"][0]["rows"],
        json!([["serializable", "on", "on"]])
    );
    assert_eq!(reply.body["results"][1]["rows"], json!([["5"]]));

    let failing = json!({"queries": [
        {"query": "INSERT INTO ledger VALUES (1)"},
        {"query": "INSERT INTO ledger VALUES (1)"},
    ]})
    .to_string();
    let reply = daemon.sql(failing, &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_error_shape(&reply.body);
    assert_eq!(reply.body["code"], "23505");
    assert_eq!(reply.body["constraint"], "ledger_pkey");
    assert_eq!(
        cluster.psql("SELECT count(*) FROM ledger").trim(),
        "0",
        "rolled back"
    );

    let bad_level = daemon
        .sql(
            r#"{"queries":[]}"#,
            &[("Neon-Batch-Isolation-Level", "Whatever")],
        )
        .await;
    assert_eq!(bad_level.status, StatusCode::BAD_REQUEST);
    assert_error_shape(&bad_level.body);
}

#[tokio::test]
async fn sql_errors_carry_every_key_with_position_and_line_as_strings() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let reply = daemon.sql(r#"{"query":"SELECT 1 FROM WHERE"}"#, &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_error_shape(&reply.body);
    assert_eq!(reply.body["code"], "42601");
    assert_eq!(reply.body["position"], "15");
    assert!(reply.body["line"].is_string());
    assert_eq!(reply.body["severity"], "ERROR");
    assert_eq!(
        daemon.metric("pgwarden_errors_total{kind=\"sql\"}").await,
        1.0
    );
    let outcome = "pgwarden_requests_duration_seconds_count{api=\"http\",kind=\"query\",outcome=\"sql_error\"}";
    assert_eq!(daemon.metric(outcome).await, 1.0);
}

#[tokio::test]
async fn bad_requests_and_bad_credentials_get_json_400s() {
    let cluster = Cluster::start();
    let mut config = config_for(&cluster);
    config.client_password = Some("right-password".into());
    let mut daemon = TestDaemon::start(config).await;
    let query = r#"{"query":"SELECT 1"}"#;

    daemon.connection_string = "postgresql://postgres:wrong@somewhere/postgres".into();
    let wrong_password = daemon.sql(query, &[]).await;
    assert_eq!(wrong_password.status, StatusCode::BAD_REQUEST);
    assert_error_shape(&wrong_password.body);
    assert_eq!(
        wrong_password.body["message"],
        "password authentication failed for user \"postgres\""
    );
    assert_eq!(wrong_password.body["code"], "28P01");

    daemon.connection_string = "postgresql://postgres:right-password@somewhere/other".into();
    let wrong_database = daemon.sql(query, &[]).await;
    assert_eq!(wrong_database.body["code"], "3D000");

    daemon.connection_string =
        "postgresql://postgres:right-password@anyhost:1234/postgres?sslmode=require".into();
    assert_eq!(
        daemon.sql(query, &[]).await.status,
        StatusCode::OK,
        "host, port and parameters are ignored"
    );

    for (body, needle) in [
        (&b"{\"query\": "[..], "not valid JSON"),
        (&b"\xff\xfe\xfd"[..], "UTF-8"),
        (&b"{\"nothing\": 1}"[..], "exactly one"),
    ] {
        let reply = daemon.sql(body.to_vec(), &[]).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_error_shape(&reply.body);
        assert!(
            reply.body["message"].as_str().unwrap().contains(needle),
            "{}",
            reply.body
        );
    }

    let missing = daemon
        .client
        .post(format!("{}/sql", daemon.data))
        .body(query)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    let body: Value = missing.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("Neon-Connection-String")
    );
    assert_eq!(
        daemon.metric("pgwarden_errors_total{kind=\"auth\"}").await,
        2.0
    );
    assert_eq!(
        daemon
            .metric("pgwarden_errors_total{kind=\"bad_request\"}")
            .await,
        4.0
    );
}

#[tokio::test]
async fn oversized_requests_get_413_and_oversized_responses_507() {
    let cluster = Cluster::start();
    let mut config = config_for(&cluster);
    config.max_request_bytes = 1024;
    config.max_response_bytes = 64 * 1024;
    let mut daemon = TestDaemon::start(config).await;

    let big = json!({"query": "SELECT $1", "params": ["x".repeat(4096)]}).to_string();
    let reply = daemon.sql(big, &[]).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error_shape(&reply.body);

    let wide = daemon
        .sql(
            r#"{"query":"SELECT repeat('x', 1000) FROM generate_series(1, 1000)"}"#,
            &[],
        )
        .await;
    assert_eq!(wide.status, StatusCode::INSUFFICIENT_STORAGE);
    assert_error_shape(&wide.body);
    assert_eq!(
        daemon
            .metric("pgwarden_errors_total{kind=\"too_large\"}")
            .await,
        2.0
    );
    let fine = daemon
        .query(
            "SELECT repeat('x', 1000) FROM generate_series(1, 10)",
            json!([]),
        )
        .await;
    assert_eq!(fine["rowCount"], 10, "the connection is still usable");

    // Credentials are checked before the body is read.
    daemon.connection_string = "postgresql://intruder@somewhere/postgres".into();
    let big = json!({"query": "SELECT $1", "params": ["x".repeat(4096)]}).to_string();
    let refused = daemon.sql(big, &[]).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.body["code"], "28P01");
}

#[tokio::test]
async fn cors_preflight_is_answered() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(config_for(&cluster)).await;
    let reply = daemon
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/sql", daemon.data))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "neon-connection-string, neon-array-mode",
        )
        .send()
        .await
        .unwrap();
    assert!(reply.status().is_success());
    assert_eq!(reply.headers()["access-control-allow-origin"], "*");
    assert!(reply.headers().contains_key("access-control-allow-headers"));
}
