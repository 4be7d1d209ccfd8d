//! Per-thread facts the signal handler needs, recorded when the thread starts.
//!
//! They live in the initial-exec [`crate::tls`] block, so reading them never calls
//! `__tls_get_addr`, allocates or registers a destructor — safe from the handler.
//! (`pthread_getattr_np`, which finds a thread's stack, is not async-signal-safe; hence the
//! bounds are taken once, at thread start, by the cdylib's `threads` module.)

use crate::tls;

/// The current thread's stack as `[lo, hi)`, if known.
#[inline]
pub fn stack_bounds() -> Option<(u64, u64)> {
    let b = tls::current();
    let (lo, hi) = (b.stack_lo.get(), b.stack_hi.get());
    if lo != 0 && hi > lo {
        Some((lo, hi))
    } else {
        None
    }
}

/// Records the current thread's stack bounds.
pub fn set_stack_bounds(lo: u64, hi: u64) {
    let b = tls::current();
    b.stack_lo.set(lo);
    b.stack_hi.set(hi);
}

/// The current thread's tid, cached after the first call.
#[inline]
pub fn tid() -> u32 {
    let b = tls::current();
    let cached = b.tid.get();
    if cached != 0 {
        return cached;
    }
    let tid = super::sys::gettid();
    b.tid.set(tid);
    tid
}

/// Forgets the cached tid (after fork the child has a new one).
pub fn clear_tid() {
    tls::current().tid.set(0);
}

/// Returns the thread CPU time elapsed since this thread's previous sample in the current
/// sampling period (`epoch`), and remembers `now`. The first sample of a period — a thread
/// given its timer from outside, or sampling switched on again — stands for `nominal_ns`.
#[inline]
pub fn take_cpu_delta(now: u64, epoch: u32, nominal_ns: u64) -> u64 {
    let b = tls::current();
    let last = b.last_cpu_ns.get();
    b.last_cpu_ns.set(now);
    if b.cpu_epoch.replace(epoch) != epoch || last == 0 {
        return nominal_ns;
    }
    now.saturating_sub(last)
}

/// Starts the per-thread CPU accounting from the thread's current CPU time.
pub fn start_cpu_clock() {
    let b = tls::current();
    b.last_cpu_ns.set(super::sys::thread_cpu_ns());
    b.cpu_epoch
        .set(crate::settings::CPU_EPOCH.load(core::sync::atomic::Ordering::Acquire));
}

/// True while the current thread is inside anyprof's own code.
#[inline]
pub fn is_internal() -> bool {
    tls::current().internal.get() != 0
}

/// The re-entrancy flag (`ThreadBlock::internal`) held up for a scope: while an `Internal`
/// lives, the current thread counts as running anyprof's own code, so what it allocates is
/// not the program's (not counted, not sampled) and our hooks do not recurse into
/// themselves. Dropping it puts the flag back as it was, on every path out of the scope.
/// Nests: an inner guard restores "internal" when it ends.
///
/// Tied to the thread that made it (`!Send`): the flag is per thread.
#[must_use = "the flag is put back when the guard is dropped: bind it to a variable"]
pub struct Internal {
    was: u8,
    _this_thread: core::marker::PhantomData<*const ()>,
}

impl Internal {
    /// Marks the current thread as running anyprof code until the guard is dropped.
    #[inline(always)]
    pub fn enter() -> Self {
        Self {
            was: enter_internal(),
            _this_thread: core::marker::PhantomData,
        }
    }

    /// Marks the current thread as running anyprof code for the rest of its life (our own
    /// threads, and the process's last moments at exit).
    #[inline]
    pub fn for_good() {
        core::mem::forget(Self::enter());
    }
}

impl Drop for Internal {
    #[inline(always)]
    fn drop(&mut self) {
        leave_internal(self.was);
    }
}

/// Sets the re-entrancy flag and closes the hooks' fast paths (which do not test the flag
/// themselves); returns the flag's previous value for [`leave_internal`]. Prefer
/// [`Internal`]; this pair is for the C shims, which cannot hold a Rust guard.
#[inline(always)]
pub fn enter_internal() -> u8 {
    let b = tls::current();
    // The flag first: a signal handler that runs between the two stores finds it set, so its
    // own guard does not reopen the fast paths on its way out.
    let was = b.internal.replace(1);
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    b.fast.set(0);
    was
}

/// Puts the re-entrancy flag back to `was`, reopening the fast paths when it is clear.
#[inline(always)]
pub fn leave_internal(was: u8) {
    let b = tls::current();
    b.internal.set(was);
    // The flag first, as in `enter_internal`.
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    if was == 0 {
        crate::alloc::counters::refresh_fast(b);
    }
}
