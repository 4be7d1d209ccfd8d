//! Process-wide counters of what the preload did and what it dropped.
//!
//! Plain relaxed atomics, safe to bump from the signal handler (they are written at most once
//! per sample, never on a malloc fast path). The background thread sends a snapshot to the
//! collector periodically and at exit. They live in the shared region
//! ([`crate::region::SHARED`]), so the collector still finds them after a sudden death.

use core::sync::atomic::{AtomicU64, Ordering};

use anyprof_wire::{Counter, COUNTER_COUNT};

/// The counters, in the shared region (only the first [`COUNTER_COUNT`] are used).
#[inline(always)]
fn counters() -> &'static [AtomicU64] {
    let all = &crate::region::SHARED.counters;
    all.get(..COUNTER_COUNT).unwrap_or(all)
}

/// Adds `n` to `counter`.
#[inline]
pub fn add(counter: Counter, n: u64) {
    if let Some(c) = counters().get(counter as usize) {
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
    for (o, c) in out.iter_mut().zip(counters().iter()) {
        *o = c.load(Ordering::Relaxed);
    }
    out
}

/// Zeroes every counter (in a forked child, which must not re-report its parent's counts).
pub fn reset() {
    for c in counters().iter() {
        c.store(0, Ordering::Relaxed);
    }
}
