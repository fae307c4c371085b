//! Choosing TCP ports for kit servers, and keeping them.
//!
//! A cluster keeps its port for life: tests crash a server and start it again
//! on the same port, and clients and proxies point at that port. So a port
//! must stay unavailable to other clusters while its server is down, in this
//! process and in any other test process running beside it. Each port in use
//! is therefore recorded as a marker file in a directory shared by all test
//! processes, and only unrecorded ports are handed out.
//!
//! Ports also come from below the kernel's ephemeral range. An ephemeral port
//! (what binding to port 0 gives) may be assigned to any outgoing connection
//! on the machine while the server is down, and the restart would then fail.
//! A test bind checks that the chosen port is free right now; another program
//! can still take it before the server binds it, and the caller then retries.

use std::collections::hash_map::RandomState;
use std::fs::{self, OpenOptions};
use std::hash::BuildHasher;
use std::io::{ErrorKind, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::procs;

/// Lowest port the kit hands out.
const LOWEST: u16 = 20_000;

/// First ephemeral port when the kernel does not say (Linux default).
const DEFAULT_EPHEMERAL_START: u16 = 32_768;

/// Candidates tried before giving up.
const ATTEMPTS: usize = 500;

/// A port held for one cluster until dropped.
#[derive(Debug)]
pub struct Reservation {
    port: u16,
    marker: PathBuf,
}

impl Reservation {
    /// The reserved port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.marker);
    }
}

/// Reserves a port on 127.0.0.1 that no other kit cluster holds and nothing is bound to.
pub fn reserve() -> Reservation {
    let registry = registry_dir();
    let end = ephemeral_start().max(LOWEST + 1_000);
    for _ in 0..ATTEMPTS {
        let port = LOWEST + (random() % u64::from(end - LOWEST)) as u16;
        let Some(reservation) = try_reserve(&registry, port) else {
            continue;
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return reservation;
        }
    }
    panic!(
        "no free TCP port on 127.0.0.1 in {LOWEST}..{end} (registry {})",
        registry.display()
    )
}

/// Records `port` as taken by this process, unless someone else holds it.
/// A marker left by a process that no longer exists is cleared for later calls.
fn try_reserve(registry: &Path, port: u16) -> Option<Reservation> {
    let marker = registry.join(port.to_string());
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&marker)
    {
        Ok(mut file) => {
            let reservation = Reservation { port, marker };
            file.write_all(std::process::id().to_string().as_bytes())
                .ok()?;
            Some(reservation)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            remove_if_abandoned(&marker);
            None
        }
        Err(e) => panic!("cannot write {}: {e}", marker.display()),
    }
}

/// Removes the markers of processes that no longer exist.
pub fn clear_abandoned() {
    let Ok(entries) = fs::read_dir(registry_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        remove_if_abandoned(&entry.path());
    }
}

/// Removes `marker` if the process it names has exited. A marker without a
/// pid is being written right now and is left alone.
fn remove_if_abandoned(marker: &Path) {
    let holder = fs::read_to_string(marker)
        .ok()
        .and_then(|text| text.trim().parse().ok());
    if holder.is_some_and(|pid| !procs::is_alive(pid)) {
        let _ = fs::remove_file(marker);
    }
}

/// Directory of port markers shared by every test process on the machine;
/// world-writable and sticky like /tmp, so root and non-root runs can share it.
fn registry_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("pgwarden-kit-ports");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777));
    dir
}

/// Start of the kernel's ephemeral port range.
fn ephemeral_start() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_START)
}

/// A random number; every `RandomState` is freshly keyed, which is all the
/// randomness port picking needs.
fn random() -> u64 {
    RandomState::new().hash_one(std::process::id())
}
