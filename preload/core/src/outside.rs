//! What the core calls in the std part, published at start as function pointers (signal/hook
//! world reads them; the constructor writes them once, before any hook can need them).
//!
//! The core never imports the std part: these slots are the whole of its view of it. An
//! unpublished slot makes its caller do nothing (the answer "not done").

use core::sync::atomic::{AtomicUsize, Ordering};

/// A function of no arguments (stored as an address; 0 = not published).
struct Slot(AtomicUsize);

impl Slot {
    const fn new() -> Self {
        Self(AtomicUsize::new(0))
    }

    fn set(&self, f: fn()) {
        self.0.store(f as usize, Ordering::Release);
    }

    fn get(&self) -> Option<fn()> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            // SAFETY: only `set` stores a non-zero value, and it stores a `fn()`.
            f => Some(unsafe { core::mem::transmute::<usize, fn()>(f) }),
        }
    }
}

/// Same, for a function returning `bool`.
struct BoolSlot(AtomicUsize);

impl BoolSlot {
    const fn new() -> Self {
        Self(AtomicUsize::new(0))
    }

    fn set(&self, f: fn() -> bool) {
        self.0.store(f as usize, Ordering::Release);
    }

    fn get(&self) -> Option<fn() -> bool> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            // SAFETY: only `set` stores a non-zero value, and it stores a `fn() -> bool`.
            f => Some(unsafe { core::mem::transmute::<usize, fn() -> bool>(f) }),
        }
    }
}

static RECORD_STACK_BOUNDS: Slot = Slot::new();
static CATCH_UP_WITH_LOADER: BoolSlot = BoolSlot::new();

/// The std part's functions the core's hooks call.
pub struct Outside {
    /// Records the current thread's stack bounds (`pthread_getattr_np`).
    pub record_stack_bounds: fn(),
    /// Rebuilds the unwinder if the loaded objects changed; true if it changed.
    pub catch_up_with_loader: fn() -> bool,
}

/// Publishes the std part's functions (from the constructor).
pub fn publish(outside: Outside) {
    RECORD_STACK_BOUNDS.set(outside.record_stack_bounds);
    CATCH_UP_WITH_LOADER.set(outside.catch_up_with_loader);
}

/// Records the current thread's stack bounds, if the std part published how.
pub fn record_stack_bounds() {
    if let Some(f) = RECORD_STACK_BOUNDS.get() {
        f();
    }
}

/// Brings the unwinder up to date with the loader; false if nothing changed or nothing is
/// published.
pub fn catch_up_with_loader() -> bool {
    CATCH_UP_WITH_LOADER.get().is_some_and(|f| f())
}
