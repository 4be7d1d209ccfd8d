//! Process-wide counters of what the preload did and what it dropped.
//!
//! Plain relaxed atomics, safe to bump from the signal handler (they are written at most once
//! per sample, never on a malloc fast path). The background thread sends a snapshot to the
//! collector periodically and at exit.

use core::sync::atomic::{AtomicU64, Ordering};

use anyprof_wire::{Counter, COUNTER_COUNT};

static COUNTERS: [AtomicU64; COUNTER_COUNT] = [const { AtomicU64::new(0) }; COUNTER_COUNT];

/// Adds `n` to `counter`.
#[inline]
pub fn add(counter: Counter, n: u64) {
    if let Some(c) = COUNTERS.get(counter as usize) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Adds one to `counter`.
#[inline]
pub fn bump(counter: Counter) {
    add(counter, 1);
}

/// A snapshot of every counter, indexed by [`Counter`].
pub fn snapshot() -> [u64; COUNTER_COUNT] {
    let mut out = [0u64; COUNTER_COUNT];
    for (o, c) in out.iter_mut().zip(COUNTERS.iter()) {
        *o = c.load(Ordering::Relaxed);
    }
    out
}

/// Zeroes every counter (in a forked child, which must not re-report its parent's counts).
pub fn reset() {
    for c in COUNTERS.iter() {
        c.store(0, Ordering::Relaxed);
    }
}
