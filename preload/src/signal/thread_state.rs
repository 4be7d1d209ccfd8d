//! Per-thread facts the signal handler needs, recorded when the thread starts.
//!
//! Only `const`-initialised `Cell`s of plain integers: reading them never allocates or
//! registers a destructor, so they are safe from the handler. (`pthread_getattr_np`, which
//! finds a thread's stack, is not async-signal-safe; hence the bounds are taken once, at
//! thread start, by [`crate::threads`].)

use core::cell::Cell;

thread_local! {
    /// Lowest address of this thread's stack (0 = unknown).
    static STACK_LO: Cell<u64> = const { Cell::new(0) };
    /// One past the highest address of this thread's stack.
    static STACK_HI: Cell<u64> = const { Cell::new(0) };
    /// Kernel thread id (0 = not yet known).
    static TID: Cell<u32> = const { Cell::new(0) };
    /// Thread CPU time at the previous sample (or at timer start), ns.
    static LAST_CPU_NS: Cell<u64> = const { Cell::new(0) };
    /// Set while this thread runs anyprof's own code, so that a sample or hook taken
    /// meanwhile does not recurse into us.
    static INTERNAL: Cell<bool> = const { Cell::new(false) };
}

/// The current thread's stack as `[lo, hi)`, if known.
#[inline]
pub fn stack_bounds() -> Option<(u64, u64)> {
    let lo = STACK_LO.with(|c| c.get());
    let hi = STACK_HI.with(|c| c.get());
    if lo != 0 && hi > lo {
        Some((lo, hi))
    } else {
        None
    }
}

/// Records the current thread's stack bounds.
pub fn set_stack_bounds(lo: u64, hi: u64) {
    STACK_LO.with(|c| c.set(lo));
    STACK_HI.with(|c| c.set(hi));
}

/// The current thread's tid, cached after the first call.
#[inline]
pub fn tid() -> u32 {
    let cached = TID.with(|c| c.get());
    if cached != 0 {
        return cached;
    }
    let tid = super::sys::gettid();
    TID.with(|c| c.set(tid));
    tid
}

/// Forgets the cached tid (after fork the child has a new one).
pub fn clear_tid() {
    TID.with(|c| c.set(0));
}

/// Returns the thread CPU time elapsed since the previous call (or since
/// [`start_cpu_clock`]), and remembers `now`.
#[inline]
pub fn take_cpu_delta(now: u64) -> u64 {
    LAST_CPU_NS.with(|c| {
        let last = c.get();
        c.set(now);
        now.saturating_sub(last)
    })
}

/// Starts the per-thread CPU accounting from the thread's current CPU time.
pub fn start_cpu_clock() {
    let now = super::sys::thread_cpu_ns();
    LAST_CPU_NS.with(|c| c.set(now));
}

/// True while the current thread is inside anyprof's own code.
#[inline]
pub fn is_internal() -> bool {
    INTERNAL.with(|c| c.get())
}

/// Marks the current thread as running anyprof code (`true`) or host code (`false`);
/// returns the previous value.
#[inline]
pub fn set_internal(on: bool) -> bool {
    INTERNAL.with(|c| c.replace(on))
}
