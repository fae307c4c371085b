//! Writes whose answer was lost after COMMIT was sent: the guard asks the
//! database what became of them instead of guessing. A proxy delays the
//! server's answers so the network can be cut at exactly that moment.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden::backend::Statement;
use pgwarden::guard::{ExecError, ExecSettings, Executor, Guard, Rule, WriteSafety};
use support::pg::options;
use support::stack::{Stack, quick_settings};
use support::{Cluster, FaultProxy, users};

/// Cuts every connection once the server has run `finished` for `user`
/// (its answer is then still held back by the proxy's latency).
fn cut_after(cluster: &Cluster, proxy: &FaultProxy, user: &str, finished: &str) {
    let probe = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' AND state = 'idle' AND query = '{finished}'"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.psql(&probe).trim() == "0" {
        assert!(Instant::now() < deadline, "{finished} never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    proxy.cut_all();
    proxy.set_latency(Duration::ZERO);
}

async fn setup(write_safety: WriteSafety) -> (Arc<Cluster>, Arc<FaultProxy>, Stack, Executor) {
    let cluster = Arc::new(Cluster::start());
    cluster.psql(&format!(
        "CREATE TABLE ledger (n int); GRANT ALL ON ledger TO {};",
        users::SCRAM_USER
    ));
    let proxy =
        Arc::new(FaultProxy::start(format!("127.0.0.1:{}", cluster.port()).parse().unwrap()).await);
    // A role without EXECUTE on pg_control_checkpoint(): the same-run answer must suffice.
    let mut opts = options(&cluster, users::SCRAM_USER, Some(users::SCRAM_PASSWORD));
    opts.port = proxy.port();
    let mut settings = quick_settings();
    settings.health_check_timeout = Duration::from_secs(5);
    let stack = Stack::start(opts, settings, Duration::from_secs(8));
    stack.ready(1).await;
    let registry = prometheus::Registry::new();
    let metrics = pgwarden::telemetry::Metrics::new(&registry).unwrap();
    let guard = Guard::new(
        stack.lifecycle.clone(),
        Duration::from_secs(8),
        metrics.clone(),
    );
    let exec_settings = ExecSettings {
        write_safety,
        ..ExecSettings::default()
    };
    let executor = Executor::new(guard, exec_settings, metrics);
    (cluster, proxy, stack, executor)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_committed_is_answered_from_the_result_in_hand() {
    let (cluster, proxy, _stack, executor) = setup(WriteSafety::Resolve).await;
    proxy.set_latency(Duration::from_millis(300));
    let (kit, cut) = (cluster.clone(), proxy.clone());
    let cutter =
        tokio::task::spawn_blocking(move || cut_after(&kit, &cut, users::SCRAM_USER, "COMMIT"));

    let insert = Statement::new("INSERT INTO ledger VALUES (7) RETURNING n");
    let result = executor.query(&insert).await.unwrap();
    cutter.await.unwrap();
    assert_eq!(result.rows_as_strings(), [[Some("7".to_owned())]]);
    assert_eq!(
        cluster.psql("SELECT count(*) FROM ledger").trim(),
        "1",
        "applied exactly once"
    );
    let rules = executor.rule_counts();
    assert!(rules.contains(&(Rule::Committed, 1)), "{rules:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_fast_mode_a_write_broken_after_sending_is_answered_honestly_with_08007() {
    let (cluster, proxy, _stack, executor) = setup(WriteSafety::Fast).await;
    proxy.set_latency(Duration::from_millis(300));
    let insert = "INSERT INTO ledger VALUES (8)";
    let (kit, cut) = (cluster.clone(), proxy.clone());
    let cutter =
        tokio::task::spawn_blocking(move || cut_after(&kit, &cut, users::SCRAM_USER, insert));

    let error = executor.query(&Statement::new(insert)).await.unwrap_err();
    cutter.await.unwrap();
    assert!(matches!(error, ExecError::ResolutionUnknown), "{error}");
    assert_eq!(error.sqlstate(), Some("08007"));
    assert!(
        error
            .to_string()
            .contains("may or may not have been applied"),
        "{error}"
    );
}
