//! The test process's resident memory, from `/proc/self/status`: the daemon
//! and backend connections run in the test process, so this is theirs.

/// A `kB` line of `/proc/self/status` (`"VmRSS:"`, `"VmHWM:"`), in bytes.
pub fn status_bytes(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|line| line.starts_with(key))
        .unwrap_or_else(|| panic!("{key} in /proc/self/status"));
    let kb: u64 = line
        .trim_start_matches(key)
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("a number in {line:?}"));
    kb * 1024
}

/// Starts a fresh peak measurement and returns the resident set now: the
/// kernel resets `VmHWM` to the current resident set when "5" is written to
/// `clear_refs`. Where that is refused the old peak stays and growth is
/// measured from it, which can only make a bound pass too easily, never
/// fail wrongly; the test log says so.
pub fn reset_peak() -> u64 {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("VmHWM cannot be reset ({e}); measuring from the earlier peak");
    }
    status_bytes("VmRSS:")
}

/// How far the peak resident set rose above `before` (from [`reset_peak`]).
pub fn peak_growth(before: u64) -> u64 {
    status_bytes("VmHWM:").saturating_sub(before)
}
