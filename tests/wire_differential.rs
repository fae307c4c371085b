//! The same message sequences, sent to PostgreSQL directly and through
//! pgwarden's wire front end (one server session, shared with another
//! client between the steps), get the same replies once normalized: the
//! same message types in the same order, the same rows, command tags,
//! descriptions and SQLSTATEs. Only what is a session's own may differ: the
//! ParameterStatus values, the text of an error that names a statement
//! (pgwarden's names are not the client's), and process ids.

mod support;

use support::Cluster;
use support::daemon::{TestDaemon, config_for};
use support::wire::{Raw, Reply};

use pgwarden::config::Config;

/// One step of a script: messages built on a client, ended by a Sync or
/// a Query, whose replies up to ReadyForQuery are compared.
type Step = fn(&mut Raw) -> &mut Raw;

const STEPS: &[(&str, Step)] = &[
    ("a row", |c| {
        c.query("SELECT 1 AS a, 'x'::text AS b, NULL::int AS c")
    }),
    ("an error between statements", |c| {
        c.query("SELECT 1; SELECT 1/0; SELECT 2")
    }),
    ("an empty query", |c| c.query("")),
    ("a transaction", |c| c.query("BEGIN; SELECT 1; COMMIT")),
    ("an unnamed statement", |c| {
        c.parse("", "SELECT $1::int + 1").describe(b'S', "").sync()
    }),
    ("a named statement prepared", |c| {
        c.parse("s1", "SELECT generate_series(1, 3) AS n")
            .describe(b'S', "s1")
            .sync()
    }),
    ("the named statement run", |c| c.run("s1").sync()),
    ("and described as a portal", |c| {
        c.run("s1").describe(b'P', "").sync()
    }),
    ("run twice in one pipeline", |c| {
        c.run("s1").run("s1").sync()
    }),
    ("an error inside a pipeline skips to the Sync", |c| {
        c.parse("", "SELECT 1/0")
            .run("")
            .parse("s2", "SELECT 2")
            .run("s2")
            .sync()
    }),
    ("what the error skipped was never prepared", |c| {
        c.run("s2").sync()
    }),
    ("a name in use", |c| c.parse("s1", "SELECT 9").sync()),
    ("closed", |c| c.close(b'S', "s1").sync()),
    ("closed, then gone", |c| c.run("s1").sync()),
    ("closing what does not exist is fine", |c| {
        c.close(b'S', "never").close(b'P', "never").sync()
    }),
    ("a failed transaction", |c| c.query("BEGIN; SELECT 1/0")),
    ("in a failed transaction", |c| c.query("SELECT 1")),
    ("rolled back", |c| c.query("ROLLBACK")),
    ("DEALLOCATE ALL", |c| c.query("DEALLOCATE ALL")),
    ("DISCARD ALL", |c| c.query("DISCARD ALL")),
    ("a statement after DISCARD ALL", |c| {
        c.parse("s3", "SELECT 'again'").run("s3").sync()
    }),
    ("COPY out", |c| {
        c.query("COPY (SELECT n FROM generate_series(1, 3) n) TO STDOUT")
    }),
    ("a syntax error", |c| c.query("SELEC 1")),
    ("a Flush, then the Sync", |c| {
        c.parse("", "SELECT 5").flush().run("").sync()
    }),
];

/// A reply reduced to what must be the same through pgwarden.
fn normalize(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .filter(|(tag, _)| *tag != b'S')
        .map(|(tag, body)| match tag {
            b'E' | b'N' => format!("{} {}", *tag as char, field(body, b'C')),
            _ => format!("{} {body:?}", *tag as char),
        })
        .collect()
}

/// One field of an ErrorResponse or NoticeResponse.
fn field(body: &[u8], wanted: u8) -> String {
    let mut fields = body;
    while let Some((&kind, rest)) = fields.split_first() {
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if kind == wanted {
            return String::from_utf8_lossy(&rest[..end]).into_owned();
        }
        fields = rest.get(end + 1..).unwrap_or_default();
    }
    String::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_sequences_get_the_same_replies_directly_and_through_pgwarden() {
    let cluster = Cluster::start();
    let daemon = TestDaemon::start(Config {
        max_connections: 1,
        min_connections: 1,
        ..config_for(&cluster)
    })
    .await;
    let wire = daemon.pg_addr();
    let direct = format!("127.0.0.1:{}", cluster.port()).parse().unwrap();
    let mut to_postgres = Raw::connect(direct).await;
    let mut to_pgwarden = Raw::connect(wire).await;
    let mut neighbour = Raw::connect(wire).await;
    for (what, step) in STEPS {
        let expected = normalize(&step(&mut to_postgres).exchange().await);
        let replies = step(&mut to_pgwarden).exchange().await;
        assert_eq!(normalize(&replies), expected, "{what}");
        // Another client uses the one server session between the steps,
        // unless the client holds it inside a transaction.
        if replies.last().map(|(_, status)| status.as_slice()) == Some(b"I") {
            let between = neighbour.query("SELECT 'neighbour'").exchange().await;
            assert!(between.iter().any(|r| r.0 == b'D'), "{what}: {between:?}");
        }
    }
}
