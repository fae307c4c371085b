//! Running server binaries as the right OS user, and preparing files for them.
//!
//! PostgreSQL refuses to run as root. When the tests run as root (as in
//! containers and CI) the server tools run as the `postgres` OS user instead,
//! and every directory and file the server touches is handed over to it.
//! Otherwise everything runs as the current user.
//!
//! Cluster directories live in memory (`/dev/shm`) when it has room: copying
//! a template data directory there is an order of magnitude faster than onto
//! a journaling disk, and nothing in a throwaway cluster needs to survive a
//! reboot.

use std::ffi::{CStr, CString};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tempfile::TempDir;

use super::PgBin;

/// OS user the server processes run as when the tests run as root.
const SERVER_OS_USER: &CStr = c"postgres";

/// Preferred parent of cluster directories: memory-backed on Linux.
const MEMORY_DIR: &str = "/dev/shm";

/// Free space `MEMORY_DIR` needs to be used (a default container's 64 MiB is not enough).
const MEMORY_DIR_MIN_FREE: u64 = 2 << 30;

/// Name of the file recording which process owns a kit temp dir (see `reaper`).
pub const OWNER_FILE: &str = "owner.pid";

/// Numeric identity of the OS user running the server.
#[derive(Clone, Copy, Debug)]
struct ServerUser {
    uid: libc::uid_t,
    gid: libc::gid_t,
}

/// The user to switch to for server binaries, or `None` when not running as root.
fn server_user() -> Option<ServerUser> {
    static USER: OnceLock<Option<ServerUser>> = OnceLock::new();
    *USER.get_or_init(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        Some(lookup_user(SERVER_OS_USER).unwrap_or_else(|| {
            panic!(
                "tests run as root but the OS user `postgres` does not exist: install the Debian \
                 package `postgresql` (apt-get install postgresql), or run the tests as a non-root user"
            )
        }))
    })
}

/// Looks up an OS user's uid and gid.
fn lookup_user(name: &CStr) -> Option<ServerUser> {
    // SAFETY: `name` is NUL-terminated. getpwnam returns null or a pointer to
    // static storage that stays valid until the next getpwnam call; the ids are
    // copied out at once, and the OnceLock above serialises the kit's calls.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return None;
    }
    // SAFETY: checked non-null above; see the previous comment for validity.
    let entry = unsafe { &*entry };
    Some(ServerUser {
        uid: entry.pw_uid,
        gid: entry.pw_gid,
    })
}

/// A command for a server-side tool (`initdb`, `pg_ctl`, `pg_basebackup`, ...)
/// that runs as the server user, from `/` (the server user may not be able to
/// enter the current directory), without inherited libpq variables.
pub fn server_command(bin: &PgBin, tool: &str) -> Command {
    let mut cmd = client_command(bin, tool);
    cmd.current_dir("/");
    if let Some(user) = server_user() {
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd
}

/// A command for a client tool (`psql`, `pg_isready`) run as the current user,
/// with every inherited `PG*` variable removed so only explicit settings apply.
pub fn client_command(bin: &PgBin, tool: &str) -> Command {
    bin.command(tool)
}

/// Gives `path` to the server user (no-op unless running as root).
pub fn hand_over(path: &Path) {
    if let Some(user) = server_user() {
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
            .unwrap_or_else(|e| panic!("cannot chown {} to postgres: {e}", path.display()));
    }
}

/// A fresh, uniquely named directory under [`scratch_root`], owned by the
/// server user and tagged with this process' pid so leftovers of a killed
/// test run can be recognised and cleaned up later.
pub fn owned_temp_dir(prefix: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch_root())
        .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
    hand_over(dir.path());
    write_file(
        &dir.path().join(OWNER_FILE),
        &std::process::id().to_string(),
        0o644,
    );
    dir
}

/// Where cluster directories are created: `/dev/shm` if it has room, else
/// the system temp dir.
pub fn scratch_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let memory = Path::new(MEMORY_DIR);
        if memory.is_dir() && free_bytes(memory) >= MEMORY_DIR_MIN_FREE {
            memory.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    })
    .clone()
}

/// Bytes available to unprivileged users on the file system holding `dir` (0 if unknown).
#[allow(clippy::unnecessary_cast)] // the field types differ between platforms
fn free_bytes(dir: &Path) -> u64 {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs is plain data, so all-zero bytes are a valid value.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stats` is a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return 0;
    }
    (stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64)
}

/// Creates directory `path` (mode 0755) owned by the server user.
pub fn create_server_dir(path: &Path) {
    fs::create_dir(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
    hand_over(path);
}

/// Writes `contents` to `path` with exactly `mode`, owned by the server user.
pub fn write_file(path: &Path, contents: &str, mode: u32) {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    file.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
    hand_over(path);
}
