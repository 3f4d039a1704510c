//! What the benches read of a process in /proc. `pid` is a process id, or `self`.

use std::fmt::Display;

/// A `Name:   123 kB` field of a /proc text, in KiB; 0 when it is not there.
pub(crate) fn kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A field of `/proc/<pid>/status` (such as `VmRSS:`), in KiB.
pub(crate) fn status_kib(pid: impl Display, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("it runs");
    kib_field(&status, name)
}

/// How many files the process has open; 0 once it has ended.
pub(crate) fn open_files(pid: impl Display) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}
