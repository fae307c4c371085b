//! A write-ledger load through the executor or the wire front end: each
//! client owns one row of
//! `purchase_order`, alternates a point read with an UPDATE that adds 1 to
//! its row, and counts what it was told. Afterwards the stored totals are
//! compared with the acknowledged writes, so a lost or doubled write is
//! counted, not guessed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pgwarden::backend::Statement;
use pgwarden::guard::Executor;
use pgwarden::telemetry::labels::ClientErrorKind;

use super::Cluster;

/// The table the load works on, with one row per client.
pub fn purchase_order_sql(clients: usize) -> String {
    format!(
        "CREATE TABLE purchase_order (id int PRIMARY KEY, n int NOT NULL);
         INSERT INTO purchase_order SELECT g, 0 FROM generate_series(1, {clients}) g"
    )
}

/// What one client saw.
#[derive(Debug, Default)]
pub struct ClientReport {
    pub reads: u64,
    /// UPDATEs acknowledged to the client: each added 1 to its row.
    pub acknowledged: u64,
    /// UPDATEs answered 08007: applied or not, the database could not tell.
    pub unknown: u64,
    /// Every other failure.
    pub failures: Vec<String>,
}

async fn client(executor: Executor, row: usize, stop: Arc<AtomicBool>) -> ClientReport {
    let read = Statement::new(format!("SELECT n FROM purchase_order WHERE id = {row}"));
    let write = Statement::new(format!(
        "UPDATE purchase_order SET n = n + 1 WHERE id = {row}"
    ));
    let mut report = ClientReport::default();
    let mut turn = 0u64;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let reading = turn.is_multiple_of(2);
        let statement = if reading { &read } else { &write };
        match executor.query(statement).await {
            Ok(result) if reading => {
                assert_eq!(result.rows.len(), 1);
                report.reads += 1;
            }
            Ok(result) => {
                assert_eq!(result.command_tag, "UPDATE 1");
                report.acknowledged += 1;
            }
            Err(error) if !reading && error.kind() == ClientErrorKind::ResolutionUnknown => {
                report.unknown += 1;
            }
            Err(error) => {
                report.failures.push(format!("{error} ({})", error.kind()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    report
}

/// The same client through the wire front end, on a connection of its
/// own: odd rows in the simple protocol, even rows in the extended one
/// with a parameter, as drivers send them. A closed connection is a
/// failure and ends the client.
async fn wire_client(address: SocketAddr, row: usize, stop: Arc<AtomicBool>) -> ClientReport {
    let mut report = ClientReport::default();
    let dsn = format!(
        "host={} port={} user=postgres dbname=postgres sslmode=disable application_name=ledger",
        address.ip(),
        address.port()
    );
    let (db, connection) = match tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await {
        Ok(connected) => connected,
        Err(error) => {
            report.failures.push(format!("connect: {error}"));
            return report;
        }
    };
    tokio::spawn(connection);
    let simple = row % 2 == 1;
    let id = row as i32;
    let mut turn = 0u64;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let reading = turn.is_multiple_of(2);
        let done = match (reading, simple) {
            (true, true) => db
                .simple_query(&format!("SELECT n FROM purchase_order WHERE id = {row}"))
                .await
                .map(|_| ()),
            (true, false) => db
                .query_one("SELECT n FROM purchase_order WHERE id = $1", &[&id])
                .await
                .map(|_| ()),
            (false, true) => db
                .simple_query(&format!(
                    "UPDATE purchase_order SET n = n + 1 WHERE id = {row}"
                ))
                .await
                .map(|_| ()),
            (false, false) => db
                .execute("UPDATE purchase_order SET n = n + 1 WHERE id = $1", &[&id])
                .await
                .map(|updated| assert_eq!(updated, 1)),
        };
        match done {
            Ok(()) if reading => report.reads += 1,
            Ok(()) => report.acknowledged += 1,
            Err(error) if db.is_closed() => {
                report.failures.push(format!("disconnected: {error}"));
                return report;
            }
            Err(error) if !reading && error.code().map(|c| c.code()) == Some("08007") => {
                report.unknown += 1;
            }
            Err(error) => {
                report
                    .failures
                    .push(format!("{error} (read: {reading}, simple: {simple})"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    report
}

/// The clients of a load run.
pub struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<ClientReport>>,
}

impl Load {
    /// Starts `clients` clients, on rows 1 to `clients`.
    pub fn start(executor: &Executor, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (1..=clients)
            .map(|row| tokio::spawn(client(executor.clone(), row, stop.clone())))
            .collect();
        Load { stop, clients }
    }

    /// Starts `clients` wire clients of pgwarden at `address`, on rows 1
    /// to `clients` (see `wire_client`).
    pub fn start_wire(address: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (1..=clients)
            .map(|row| tokio::spawn(wire_client(address, row, stop.clone())))
            .collect();
        Load { stop, clients }
    }

    /// Stops the clients and returns their reports, in row order.
    pub async fn stop(self) -> Vec<ClientReport> {
        self.stop.store(true, Ordering::Relaxed);
        let mut reports = Vec::new();
        for handle in self.clients {
            reports.push(handle.await.unwrap());
        }
        reports
    }
}

/// Asserts that no request failed, apart from writes answered 08007.
pub fn assert_no_failures(reports: &[ClientReport]) {
    let failures: Vec<_> = reports.iter().flat_map(|r| r.failures.iter()).collect();
    assert!(
        failures.is_empty(),
        "{} requests failed: {failures:?}",
        failures.len()
    );
}

/// Checks the ledger on `cluster`: every row holds at least the writes
/// acknowledged for it (none lost) and at most those plus the ones answered
/// 08007 (none doubled), and every client made progress.
pub fn check_ledger(cluster: &Cluster, reports: &[ClientReport]) {
    let stored = cluster.psql_rows("SELECT n FROM purchase_order ORDER BY id");
    for (index, report) in reports.iter().enumerate() {
        let row = index + 1;
        let value: u64 = stored[index][0].as_deref().unwrap().parse().unwrap();
        assert!(
            value >= report.acknowledged,
            "row {row}: {} acknowledged writes, {value} stored: a write was lost",
            report.acknowledged
        );
        assert!(
            value <= report.acknowledged + report.unknown,
            "row {row}: {} acknowledged and {} unknown writes, {value} stored: a write was doubled",
            report.acknowledged,
            report.unknown
        );
        assert!(
            report.reads > 0 && report.acknowledged > 0,
            "client {row} made progress"
        );
    }
}
