//! Locating the PostgreSQL server binaries.
//!
//! The kit needs a full server installation, not just a client. A missing
//! installation is a setup error, so it panics with instructions instead of
//! quietly skipping tests (a skipped test suite looks green).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Tools that must all be present for a directory to count as a server installation.
const SERVER_TOOLS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// Where Debian installs the per-version server binaries (`<root>/<version>/bin`).
const DEBIAN_LIB_ROOT: &str = "/usr/lib/postgresql";

/// What to do about a missing installation.
const INSTALL_HINT: &str = "install the Debian package `postgresql` (apt-get install postgresql) \
                            or set PG_BIN to their directory";

/// A directory holding the PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgBin {
    dir: PathBuf,
}

impl PgBin {
    /// Finds the server binaries on this machine, panicking with installation
    /// instructions if there are none.
    ///
    /// Order: the `PG_BIN` environment variable, then `pg_config --bindir`,
    /// then the newest `/usr/lib/postgresql/<version>/bin`.
    pub fn locate() -> PgBin {
        let pg_bin_env = std::env::var_os("PG_BIN")
            .filter(|value| !value.is_empty())
            .map(PathBuf::from);
        let lib_root = Path::new(DEBIAN_LIB_ROOT);
        Self::locate_from(pg_bin_env, pg_config_bindir(), lib_root)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The decision behind [`PgBin::locate`], without touching the process
    /// environment: `pg_bin_env` is the value of `PG_BIN`, `pg_config_bindir`
    /// what `pg_config --bindir` printed, and `lib_root` the directory holding
    /// one `<version>/bin` directory per installed major version.
    ///
    /// An explicit `PG_BIN` that lacks the binaries is an error rather than a
    /// reason to look elsewhere: the caller asked for that directory.
    pub fn locate_from(
        pg_bin_env: Option<PathBuf>,
        pg_config_bindir: Option<PathBuf>,
        lib_root: &Path,
    ) -> Result<PgBin, String> {
        if let Some(dir) = pg_bin_env {
            return Self::from_dir(&dir).ok_or_else(|| {
                format!(
                    "PG_BIN={} does not contain the PostgreSQL server binaries \
                     (initdb, pg_ctl, postgres): {INSTALL_HINT}",
                    dir.display()
                )
            });
        }
        if let Some(found) = pg_config_bindir.and_then(|dir| Self::from_dir(&dir)) {
            return Ok(found);
        }
        newest_versioned_bin(lib_root).ok_or_else(|| {
            format!(
                "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: {INSTALL_HINT}"
            )
        })
    }

    /// `dir` as a [`PgBin`] if it holds every server tool as an executable file.
    pub fn from_dir(dir: &Path) -> Option<PgBin> {
        SERVER_TOOLS
            .iter()
            .all(|tool| is_executable(&dir.join(tool)))
            .then(|| PgBin {
                dir: dir.to_path_buf(),
            })
    }

    /// The directory holding the binaries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Full path of one tool in this installation, e.g. `path("psql")`.
    pub fn path(&self, tool: &str) -> PathBuf {
        self.dir.join(tool)
    }

    /// A command for `tool` with every inherited `PG*` environment variable
    /// removed, so only settings the test makes explicitly apply.
    pub fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.path(tool));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PG") {
                cmd.env_remove(name);
            }
        }
        cmd
    }

    /// Major version of this installation (15 for PostgreSQL 15.x), from `postgres --version`.
    pub fn major_version(&self) -> u32 {
        let output = Command::new(self.path("postgres"))
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.path("postgres").display()));
        let text = String::from_utf8_lossy(&output.stdout);
        parse_major_version(&text)
            .unwrap_or_else(|| panic!("cannot read a version from `postgres --version`: {text:?}"))
    }
}

/// Leading number of the first version-looking word: "postgres (PostgreSQL) 15.8 (Debian)" → 15.
fn parse_major_version(text: &str) -> Option<u32> {
    let word = text
        .split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))?;
    let digits: String = word.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What `pg_config --bindir` prints, if `pg_config` is on the PATH and succeeds.
fn pg_config_bindir() -> Option<PathBuf> {
    let output = Command::new("pg_config").arg("--bindir").output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let dir = text.trim();
    (output.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

/// The complete `<lib_root>/<version>/bin` with the highest version, compared
/// numerically (so 15 beats 9.6).
fn newest_versioned_bin(lib_root: &Path) -> Option<PgBin> {
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(lib_root)
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version = parse_version(entry.file_name().to_str()?)?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions
        .iter()
        .rev()
        .find_map(|(_, bin)| PgBin::from_dir(bin))
}

/// "9.6" → [9, 6], "15" → [15]; anything else is not a version directory.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// Whether `path` is a regular file with an execute bit set.
fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}
