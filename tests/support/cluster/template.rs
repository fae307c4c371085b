//! The cached template data directory every cluster starts from.
//!
//! `initdb` plus role setup takes seconds; copying a finished data directory
//! takes a fraction of that. The template is built once per PostgreSQL major
//! version and kit configuration, and cached under Cargo's target tmp dir as
//! `pg-template-<major>-<fingerprint>`. The fingerprint covers the kit's
//! settings, pg_hba.conf and setup SQL, so editing them yields a new template
//! instead of a stale one.
//!
//! Several test processes may build at once: each builds privately and then
//! `rename`s its copy into place, which is atomic. A loser of that race
//! throws its copy away and uses the winner's.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::{Cluster, PgBin, config, os, process};

/// Marker written last into a finished template; holds the fingerprint.
const MARKER: &str = "kit-template.ok";

/// Files a usable template must contain besides the marker.
const REQUIRED_FILES: [&str; 4] = [
    "PG_VERSION",
    "global/pg_control",
    "postgresql.conf",
    "pg_hba.conf",
];

/// Path of a valid template for `bin`, building it if needed (once per process).
pub fn ensure(bin: &PgBin) -> PathBuf {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| locate_or_build(bin)).clone()
}

/// Returns the cached template, replacing a missing or invalid one.
fn locate_or_build(bin: &PgBin) -> PathBuf {
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("cannot create {}: {e}", cache.display()));
    let fingerprint = fingerprint(bin);
    let target = cache.join(format!("pg-template-{}-{fingerprint}", bin.major_version()));
    if is_valid(&target, &fingerprint) {
        return target;
    }
    if target.exists() {
        discard(&cache, &target);
    }
    let builder = build(bin, &fingerprint);
    publish(&builder.data_dir, &cache, &target, &fingerprint);
    target
}

/// Whether `dir` is a complete template with the expected fingerprint.
fn is_valid(dir: &Path, fingerprint: &str) -> bool {
    let marker = fs::read_to_string(dir.join(MARKER)).unwrap_or_default();
    marker.trim() == fingerprint && REQUIRED_FILES.iter().all(|file| dir.join(file).is_file())
}

/// Moves a broken template out of the way (atomically), then deletes it.
fn discard(cache: &Path, broken: &Path) {
    let trash = tempfile::Builder::new()
        .prefix(".pg-template-trash-")
        .tempdir_in(cache)
        .unwrap_or_else(|e| panic!("cannot create a temp dir in {}: {e}", cache.display()));
    // Losing this race means someone else already moved it: fine either way.
    let _ = fs::rename(broken, trash.path().join("data"));
}

/// Builds a template in a private cluster: initdb, kit settings, roles.
///
/// The returned cluster is stopped; dropping it deletes the build directory.
fn build(bin: &PgBin, fingerprint: &str) -> Cluster {
    let mut builder = Cluster::empty(bin.clone());
    builder.port = config::TEMPLATE_PORT;
    builder.initdb();
    builder.append_to("postgresql.conf", config::SHARED_SETTINGS);
    os::write_file(&builder.data_dir.join("pg_hba.conf"), &config::hba(), 0o600);
    let socket_only = config::template_settings(&builder.socket_dir);
    let cluster_conf = builder.data_dir.join(config::CLUSTER_CONF);
    os::write_file(&cluster_conf, &socket_only, 0o600);
    if let Err(e) = builder.pg_ctl_start() {
        builder.fail(&format!("template server did not start: {e}"));
    }
    builder.psql(&config::setup_sql());
    builder.stop();
    fs::remove_file(&cluster_conf).unwrap_or_else(|e| builder.fail(&format!("cleanup: {e}")));
    os::write_file(&builder.data_dir.join(MARKER), fingerprint, 0o600);
    builder
}

/// Copies `data` next to `target` and renames it into place.
fn publish(data: &Path, cache: &Path, target: &Path, fingerprint: &str) {
    let staging = tempfile::Builder::new()
        .prefix(".pg-template-staging-")
        .tempdir_in(cache)
        .unwrap_or_else(|e| panic!("cannot create a temp dir in {}: {e}", cache.display()));
    let staged = staging.path().join("data");
    copy_dir(data, &staged);
    if let Err(e) = fs::rename(&staged, target) {
        // Another process published first; its template is as good as ours.
        assert!(
            is_valid(target, fingerprint),
            "cannot publish the template to {}: {e}",
            target.display()
        );
    }
}

/// `cp -a from to`, preserving owners and modes.
fn copy_dir(from: &Path, to: &Path) {
    let mut cp = Command::new("cp");
    cp.arg("-a").arg(from).arg(to);
    match process::run(&mut cp, None, Duration::from_secs(120)) {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "`{}` failed: {}",
            process::describe(&cp),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(e) => panic!("{e}"),
    }
}

/// Identifies the server version and the kit configuration the template was built with.
fn fingerprint(bin: &PgBin) -> String {
    let version = Command::new(bin.path("postgres"))
        .arg("--version")
        .output()
        .map(|o| o.stdout);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let inputs = [
        version.unwrap_or_default(),
        config::SHARED_SETTINGS.as_bytes().to_vec(),
        config::hba().into_bytes(),
        config::setup_sql().into_bytes(),
    ];
    // FNV-1a: stable across builds and Rust versions, unlike std's hashers.
    for byte in inputs.iter().flat_map(|input| input.iter().chain(&[0xff])) {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

impl Cluster {
    /// Runs initdb into the (not yet existing) data directory.
    fn initdb(&self) {
        let mut cmd = os::server_command(&self.bin, "initdb");
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            super::users::SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        self.run_or_fail(&mut cmd, Duration::from_secs(120));
    }

    /// Appends `text` to a file in the data directory.
    fn append_to(&self, file: &str, text: &str) {
        let path = self.data_dir.join(file);
        let mut contents =
            fs::read_to_string(&path).unwrap_or_else(|e| self.fail(&format!("read {file}: {e}")));
        contents.push_str(text);
        os::write_file(&path, &contents, 0o600);
    }
}
