//! Settings the std part publishes for the signal handler (written by the background thread
//! or the constructor, read in the signal/hook world): plain atomics, no locks.

use core::sync::atomic::AtomicU32;

/// CPU samples per second of thread CPU time while CPU sampling runs; 0 = off.
pub static CPU_HZ: AtomicU32 = AtomicU32::new(0);

/// The sampling period at `hz` samples per second of CPU time, ns (0 Hz counts as 1).
#[inline]
pub fn period_ns(hz: u32) -> u64 {
    1_000_000_000 / u64::from(hz.max(1))
}

/// Incremented each time CPU sampling starts: a thread whose last sample belongs to an
/// earlier period counts its first sample of this one at the nominal interval.
pub static CPU_EPOCH: AtomicU32 = AtomicU32::new(1);
