//! Whether a seccomp filter guards the calling thread. A filter may kill the process on a
//! system call it does not expect (systemd's `SystemCallFilter=`, browser and daemon
//! sandboxes), so the calls a program never makes itself — `process_vm_readv` for a thread
//! dump, `perf_event_open` for the perf CPU source — are made only where no filter is.
//!
//! World: the constructor and the background thread (reads `/proc`, allocates).

use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a filter was seen: a filter is never removed, and one installed with
/// `SECCOMP_FILTER_FLAG_TSYNC` covers every thread.
static FILTERED: AtomicBool = AtomicBool::new(false);

/// True if the calling thread or the process's main thread runs under a seccomp filter
/// (`Seccomp: 2` in its status), or if that cannot be read. (A program's sandbox on its main
/// thread covers the threads it starts later, which make their own calls at start.)
pub fn filtered() -> bool {
    if FILTERED.load(Ordering::Relaxed) {
        return true;
    }
    let filtered = ["/proc/thread-self/status", "/proc/self/status"]
        .iter()
        .any(|path| match std::fs::read_to_string(path) {
            Ok(status) => status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .is_some_and(|mode| mode.trim() != "0"),
            // Unreadable (no /proc): assume a filter, this time.
            Err(_) => true,
        });
    if filtered {
        FILTERED.store(true, Ordering::Relaxed);
    }
    filtered
}

/// True once a filter was seen (no system call).
pub fn seen() -> bool {
    FILTERED.load(Ordering::Relaxed)
}

/// True if the calling thread runs under a seccomp filter, asked with
/// `prctl(PR_GET_SECCOMP)` — no descriptor, a fraction of a microsecond: for a thread's
/// start. A program that sandboxes itself once it runs (without `SECCOMP_FILTER_FLAG_TSYNC`)
/// leaves [`filtered`]'s earlier answer stale, and its new threads inherit the filter.
pub fn calling_thread_filtered() -> bool {
    if seen() {
        return true;
    }
    // SAFETY: PR_GET_SECCOMP takes no pointer; it returns 0 (none), 2 (filter) or -1 (no
    // seccomp in this kernel: then no filter either).
    let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    if mode > 0 {
        FILTERED.store(true, Ordering::Relaxed);
    }
    mode > 0
}
