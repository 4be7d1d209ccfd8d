//! When to sample an allocation: Go's and tcmalloc's rate-based scheme.
//!
//! Each thread counts bytes down to its next sample point; the distance between sample points
//! is drawn from an exponential distribution with mean [`RATE`] bytes, so every byte has the
//! same chance `1/RATE` to be the one that triggers a sample, whatever the allocation sizes.
//! An allocation of `s` bytes is therefore sampled with probability `1 - exp(-s/RATE)`, which
//! the collector divides out. The unsampled path is one thread-local subtraction and a
//! branch ([`crate::alloc::hooks`]); this module is only the slow path.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::tls::ThreadBlock;

/// Mean bytes between samples; 0 = heap profiling off, 1 = every allocation.
pub static RATE: AtomicU64 = AtomicU64::new(0);

/// Countdown while sampling is off: 4 GiB, so that a thread checks again now and then and
/// notices when sampling is switched on.
const NEVER: i64 = 1 << 32;

/// Called when the countdown went below zero after an allocation.
/// Re-arms the countdown and says whether this allocation is a sample.
#[cold]
pub fn on_countdown_expired(b: &ThreadBlock) -> bool {
    // Acquire: what `hooks::start_sampling` stored before the rate (whether small blocks are
    // promoted) is seen by the sample this rate starts.
    let rate = RATE.load(Ordering::Acquire);
    if rate == 0 {
        b.bytes_until_sample.set(NEVER);
        return false;
    }
    if rate == 1 {
        b.bytes_until_sample.set(0);
        return true;
    }
    // A zero generator means this thread never drew a distance: the countdown started at 0
    // only because TLS starts zeroed. Draw the first distance now and count this allocation
    // against it, so the first sample point is as random as every later one.
    let first = b.rng.get() == 0;
    if first {
        b.rng.set(seed());
    }
    let mut left = b.bytes_until_sample.get();
    let mut sampled = !first;
    if first {
        // `left` is -size here; the allocation is sampled if it crosses the first point.
        let distance = draw(b, rate);
        left = left.saturating_add(distance);
        sampled = left < 0;
    }
    // One sample per allocation, however many sample points it crosses (Go does the same;
    // the unbiasing by allocation size accounts for it).
    while left < 0 {
        left = left.saturating_add(draw(b, rate));
    }
    b.bytes_until_sample.set(left);
    sampled
}

/// Draws an exponentially distributed distance with mean `rate`.
fn draw(b: &ThreadBlock, rate: u64) -> i64 {
    let r = next_random(b);
    // Uniform in (0, 1]: 53 random bits, never zero.
    let u = ((r >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let d = -libm::log(u) * rate as f64;
    (d as i64).clamp(1, i64::MAX / 4)
}

/// xorshift64*: fast, no state beyond the thread block, good enough for sampling.
fn next_random(b: &ThreadBlock) -> u64 {
    let mut x = b.rng.get();
    if x == 0 {
        x = seed();
    }
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    b.rng.set(x);
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn seed() -> u64 {
    let t = crate::signal::sys::monotonic_ns();
    let tid = u64::from(crate::signal::sys::gettid());
    let s = (t ^ tid.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    if s == 0 {
        1
    } else {
        s
    }
}

/// Forgets a thread's sampling state (the countdown restarts from a fresh draw).
pub fn reset(b: &ThreadBlock) {
    b.bytes_until_sample.set(0);
    b.rng.set(0);
}
