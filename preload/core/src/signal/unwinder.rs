//! The unwinder's entry point, as the handler and the hooks see it (signal/hook world).
//!
//! The unwinder itself (framehop over the mapped `.eh_frame`, which needs an allocator to be
//! built) lives in the std part (`signal/unwind.rs` of the cdylib); it publishes its two
//! entry points here at start with [`publish`]. Until then an unwind records no frame but the
//! interrupted address and says the stack was truncated.

use core::sync::atomic::{AtomicUsize, Ordering};

use anyprof_wire::{FLAG_TRUNCATED, MAX_FRAMES};

/// Number of handlers (and hook unwinds) currently inside the unwinder: the std part frees a
/// replaced unwinder only after seeing this at zero.
pub static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Unwinds from interrupted registers `(ip, sp, bp)` within the thread's stack bounds into
/// `out`, leaf first; returns the number of frames and the `FLAG_*` bits.
pub type UnwindFn = fn(u64, u64, u64, Option<(u64, u64)>, &mut [u64; MAX_FRAMES]) -> (usize, u8);
/// Unwinds the calling thread's own stack into `out`, without our own frames.
pub type UnwindHereFn = fn(&mut [u64; MAX_FRAMES]) -> (usize, u8);

static UNWIND: AtomicUsize = AtomicUsize::new(0);
static UNWIND_HERE: AtomicUsize = AtomicUsize::new(0);

/// Set when a hook's stack ran into an object the unwinder does not know yet (a library
/// dlopen'ed since the background thread's last cycle); taken by the background thread.
static CATCH_UP: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
/// Wakes the background thread (published by the std part; 0 = nobody to wake).
static WAKE: AtomicUsize = AtomicUsize::new(0);

/// Publishes how to wake the background thread early: a function that must be
/// async-signal-safe in practice (no lock, no allocation; the std part unparks its thread).
pub fn publish_waker(wake: fn()) {
    WAKE.store(wake as usize, Ordering::Release);
}

/// Asks the background thread to bring the unwinder up to date now rather than at its next
/// tick; wakes it once per request. Called from a hook, which must not do it itself.
pub fn request_catch_up() {
    if CATCH_UP.swap(true, Ordering::AcqRel) {
        return;
    }
    wake_background_thread();
}

/// Wakes the background thread for an early cycle (nothing before the std part published
/// its waker). Signal and hook world.
pub fn wake_background_thread() {
    match WAKE.load(Ordering::Acquire) {
        0 => {}
        f => {
            // SAFETY: only `publish_waker` stores a non-zero value, and it stores a `fn()`.
            let f = unsafe { core::mem::transmute::<usize, fn()>(f) };
            f();
        }
    }
}

/// Takes a pending [`request_catch_up`] (the background thread, at the start of a cycle).
pub fn take_catch_up_request() -> bool {
    CATCH_UP.swap(false, Ordering::AcqRel)
}

/// Publishes the unwinder's entry points (from the constructor).
pub fn publish(unwind: UnwindFn, unwind_here: UnwindHereFn) {
    UNWIND.store(unwind as usize, Ordering::Release);
    UNWIND_HERE.store(unwind_here as usize, Ordering::Release);
}

/// See [`UnwindFn`].
#[inline]
pub fn unwind(
    ip: u64,
    sp: u64,
    bp: u64,
    bounds: Option<(u64, u64)>,
    out: &mut [u64; MAX_FRAMES],
) -> (usize, u8) {
    match UNWIND.load(Ordering::Acquire) {
        0 => {
            out[0] = ip;
            (1, FLAG_TRUNCATED)
        }
        f => {
            // SAFETY: only `publish` stores a non-zero value, and it stores an `UnwindFn`.
            let f = unsafe { core::mem::transmute::<usize, UnwindFn>(f) };
            f(ip, sp, bp, bounds, out)
        }
    }
}

/// See [`UnwindHereFn`].
#[inline]
pub fn unwind_here(out: &mut [u64; MAX_FRAMES]) -> (usize, u8) {
    match UNWIND_HERE.load(Ordering::Acquire) {
        0 => (0, FLAG_TRUNCATED),
        f => {
            // SAFETY: only `publish` stores a non-zero value, and it stores an `UnwindHereFn`.
            let f = unsafe { core::mem::transmute::<usize, UnwindHereFn>(f) };
            f(out)
        }
    }
}
