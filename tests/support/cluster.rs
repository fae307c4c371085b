//! Disposable PostgreSQL clusters for integration tests.
//!
//! Each [`Cluster`] is a private server in its own temporary directory,
//! listening on 127.0.0.1 (with TLS) and on a unix socket in that directory.
//! Tests break clusters on purpose (restarts, crashes, frozen processes,
//! killed backends, failover), so every fault helper waits until its effect
//! is observable and otherwise panics with the tail of the server log.
//! Dropping a cluster kills the server and deletes its files, also while a
//! failing test unwinds.
//!
//! `initdb` is slow, so clusters are copies of a template data directory that
//! is built once and cached (see `template`).

pub mod certs;
mod config;
mod faults;
mod os;
mod pgbin;
mod ports;
mod procs;
mod reaper;
mod sql;
mod standby;
mod template;
pub mod users;

pub use pgbin::PgBin;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;

use super::{process, wait};

/// Deadline for every fault and readiness wait.
const FAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// `pg_ctl -t` value, matching [`FAULT_TIMEOUT`].
const PG_CTL_WAIT_SECS: &str = "30";

/// How many ports to try when another process grabs the chosen one first.
const PORT_ATTEMPTS: usize = 5;

/// Address every cluster listens on.
const HOST: &str = "127.0.0.1";

/// A private PostgreSQL server, stopped and deleted on drop.
///
/// All methods take `&self`, and the type is `Send + Sync`, so a test can
/// share it through an `Arc` and inject faults from a blocking task while
/// the client under test keeps running.
pub struct Cluster {
    bin: PgBin,
    port: u16,
    /// Keeps `port` away from other clusters, also while the server is down.
    port_reservation: Option<ports::Reservation>,
    root: TempDir,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    ca_cert: PathBuf,
    /// Processes frozen by `pause()`, to be thawed by `resume()` or on drop.
    paused: Mutex<Vec<procs::Pid>>,
}

impl Cluster {
    /// Creates and starts a new cluster on a free port, with the roles from
    /// [`users`] and a fresh TLS certificate; returns once it accepts connections.
    #[track_caller]
    pub fn start() -> Cluster {
        let bin = PgBin::locate();
        reaper::reap_abandoned_once();
        let template = template::ensure(&bin);
        let mut cluster = Cluster::empty(bin);
        cluster.copy_data_from(&template);
        cluster.install_tls();
        cluster.launch();
        cluster
    }

    /// Port the server listens on at [`Cluster::host`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Address the server listens on: always `127.0.0.1`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// Directory holding the server's unix socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// PEM file of the CA that signed the server certificate (for `sslrootcert`).
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_cert
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log file.
    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("server.log")
    }

    /// The server binaries this cluster runs on.
    pub fn bin(&self) -> &PgBin {
        &self.bin
    }

    /// `postgresql://user[:password]@127.0.0.1:PORT/postgres`, credentials percent-encoded.
    pub fn url(&self, user: &str, password: Option<&str>) -> String {
        let credentials = match password {
            Some(password) => format!("{}:{}", percent_encode(user), percent_encode(password)),
            None => percent_encode(user),
        };
        format!("postgresql://{credentials}@{HOST}:{}/postgres", self.port)
    }

    /// The last `lines` lines of the server log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A cluster with its directories but no data yet.
    fn empty(bin: PgBin) -> Cluster {
        let root = os::owned_temp_dir("pgw-kit-");
        let socket_dir = root.path().join("sock");
        os::create_server_dir(&socket_dir);
        Cluster {
            bin,
            port: 0,
            port_reservation: None,
            data_dir: root.path().join("data"),
            ca_cert: root.path().join("ca.crt"),
            socket_dir,
            root,
            paused: Mutex::default(),
        }
    }

    /// Fills the data directory with a copy of `template` (owner and modes preserved).
    #[track_caller]
    fn copy_data_from(&self, template: &Path) {
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(template).arg(&self.data_dir);
        self.run_or_fail(&mut cp, Duration::from_secs(60));
    }

    /// Writes a fresh CA and server certificate: key and certificate into the
    /// data directory for the server, the CA next to it for clients.
    fn install_tls(&self) {
        let tls = certs::generate();
        os::write_file(&self.data_dir.join("server.crt"), &tls.cert_pem, 0o600);
        os::write_file(&self.data_dir.join("server.key"), &tls.key_pem, 0o600);
        os::write_file(&self.ca_cert, &tls.ca_pem, 0o644);
    }

    /// Starts the server on a free port, retrying with another port when the
    /// chosen one was taken in between.
    #[track_caller]
    fn launch(&mut self) {
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let reservation = ports::reserve();
            self.port = reservation.port();
            self.port_reservation = Some(reservation);
            let settings = config::cluster_settings(self.port, &self.socket_dir);
            os::write_file(&self.data_dir.join(config::CLUSTER_CONF), &settings, 0o600);
            let log_start = fs::metadata(self.log_path()).map_or(0, |meta| meta.len());
            match self.pg_ctl_start() {
                Ok(()) => return self.wait_ready("start"),
                Err(e) if self.log_since(log_start).contains("Address already in use") => {
                    last_error = e
                }
                Err(e) => self.fail(&format!("the server did not start: {e}")),
            }
        }
        self.fail(&format!(
            "no free port after {PORT_ATTEMPTS} attempts: {last_error}"
        ))
    }

    /// Log text written after byte `offset`.
    fn log_since(&self, offset: u64) -> String {
        let log = fs::read(self.log_path()).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(log.len());
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    /// `pg_ctl start`, waiting until the server accepts connections.
    fn pg_ctl_start(&self) -> Result<(), String> {
        let log = self.log_path();
        let log = log.to_str().expect("temp dir paths are UTF-8");
        self.pg_ctl(&["start", "-w", "-t", PG_CTL_WAIT_SECS, "-l", log])
    }

    /// Runs `pg_ctl -D <data dir> <args>` as the server user.
    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let mut cmd = os::server_command(&self.bin, "pg_ctl");
        cmd.arg("-D").arg(&self.data_dir).args(args);
        let output = process::run(&mut cmd, None, FAULT_TIMEOUT + Duration::from_secs(10))?;
        if output.status.success() {
            return Ok(());
        }
        Err(format!(
            "`{}` failed ({}): {}{}",
            process::describe(&cmd),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }

    /// Runs pg_ctl or panics with the server log.
    #[track_caller]
    fn pg_ctl_or_fail(&self, what: &str, args: &[&str]) {
        if let Err(e) = self.pg_ctl(args) {
            self.fail(&format!("{what}: {e}"));
        }
    }

    /// Runs `cmd` and panics, with the server log, unless it succeeds in time.
    #[track_caller]
    fn run_or_fail(&self, cmd: &mut Command, timeout: Duration) -> Vec<u8> {
        match process::run(cmd, None, timeout) {
            Ok(output) if output.status.success() => output.stdout,
            Ok(output) => self.fail(&format!(
                "`{}` failed ({}): {}",
                process::describe(cmd),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )),
            Err(e) => self.fail(&e),
        }
    }

    /// Polls until the server accepts TCP connections, or fails.
    #[track_caller]
    fn wait_ready(&self, what: &str) {
        if !wait::eventually(FAULT_TIMEOUT, || self.accepts_connections()) {
            self.fail(&format!(
                "{what}: the server did not accept connections within {FAULT_TIMEOUT:?}"
            ));
        }
    }

    /// Whether `pg_isready` reports the server as accepting connections over TCP.
    fn accepts_connections(&self) -> bool {
        let mut cmd = os::client_command(&self.bin, "pg_isready");
        cmd.args([
            "-q",
            "-h",
            HOST,
            "-d",
            "postgres",
            "-U",
            users::SUPERUSER,
            "-t",
            "2",
            "-p",
        ])
        .arg(self.port.to_string())
        .env("PGSSLMODE", "disable");
        process::run(&mut cmd, None, Duration::from_secs(10)).is_ok_and(|out| out.status.success())
    }

    /// Panics with `message` followed by the tail of the server log.
    #[track_caller]
    fn fail(&self, message: &str) -> ! {
        panic!(
            "cluster on port {}: {message}\n--- last lines of {} ---\n{}",
            self.port,
            self.log_path().display(),
            self.log_tail(40)
        )
    }
}

impl Drop for Cluster {
    /// Thaws, kills and deletes the server. Runs during panics too, so a
    /// failing test leaves neither processes nor files behind.
    fn drop(&mut self) {
        self.resume_quietly();
        let Some(postmaster) = procs::postmaster_pid(&self.data_dir) else {
            return;
        };
        // SIGQUIT is what `pg_ctl stop -m immediate` sends; waiting here
        // polls faster than pg_ctl does. The postmaster exits only after
        // its children, so nothing is left once it is gone.
        procs::send(postmaster, libc::SIGQUIT);
        if !wait::eventually(Duration::from_secs(10), || !procs::is_alive(postmaster)) {
            procs::send(postmaster, libc::SIGKILL);
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}
