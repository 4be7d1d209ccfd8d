//! fork: the child of a profiled process is profiled as a process of its own (default), or
//! left alone (`ANYPROF_FORK=off`).
//!
//! The difficulty is our own locks: if another thread of the parent held one at the moment
//! of `fork`, the child's copy stays locked forever. So every piece of our code that takes
//! one of our mutexes runs inside a [`section`] of the fork gate, and the `pthread_atfork`
//! prepare handler closes the gate (waits until no section is open, and lets none start)
//! until the parent and child handlers open it again. The child then finds every one of our
//! locks free and every structure consistent.
//!
//! In the child: the parent's connection is closed, the parent's timers (which the kernel
//! does not copy anyway) are forgotten, and — unless disabled — the child connects anew with
//! its own hello, gets its own background thread (under `record`, once it starts a thread of
//! its own) and, if the parent was being CPU-sampled, its own timer. Its heap profile counts only what it allocates itself (the buckets'
//! counts at fork are its baseline).
//!
//! World: the atfork handlers run on the forking thread (constructor-like: may allocate and
//! lock, as the gate guarantees our locks are free); sections are opened by background and
//! constructor code, and on the program's thread by our `pthread_create` and `dlsym`
//! interposers, never on a malloc-hook or signal-handler path.

use std::cell::{Cell, UnsafeCell};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::tls;

static GATE: RwLock<()> = RwLock::new(());

/// The write guard held between prepare and parent/child (fork runs them on one thread).
struct Held(UnsafeCell<Option<RwLockWriteGuard<'static, ()>>>);
// SAFETY: only touched by the forking thread, between its own prepare and parent/child
// handlers; concurrent forks serialise on the gate itself before touching it.
unsafe impl Sync for Held {}
static HELD: Held = Held(UnsafeCell::new(None));

/// An open section of the fork gate (or nothing, if this thread already holds one).
pub struct Section {
    _guard: Option<RwLockReadGuard<'static, ()>>,
    outermost: bool,
}

impl Drop for Section {
    fn drop(&mut self) {
        if self.outermost {
            tls::current().in_fork_section.set(0);
        }
    }
}

/// Opens a section: while it lives, no fork copies this process in the middle of it.
/// Re-entrant on one thread (a nested call costs nothing and holds nothing).
pub fn section() -> Section {
    // Waiting never fails: the lock is taken in the end.
    open_section(true).unwrap_or(Section {
        _guard: None,
        outermost: false,
    })
}

fn open_section(wait: bool) -> Option<Section> {
    let flag: &Cell<u8> = &tls::current().in_fork_section;
    if flag.get() != 0 {
        return Some(Section {
            _guard: None,
            outermost: false,
        });
    }
    flag.set(1);
    let guard = if wait {
        GATE.read().unwrap_or_else(|p| p.into_inner())
    } else {
        match GATE.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                flag.set(0);
                return None;
            }
        }
    };
    Some(Section {
        _guard: Some(guard),
        outermost: true,
    })
}

extern "C" fn prepare() {
    // A thread inside a section never forks (our code does not fork), so this cannot wait
    // for itself.
    let guard = GATE.write().unwrap_or_else(|p| p.into_inner());
    // SAFETY: see `Held`.
    unsafe { *HELD.0.get() = Some(guard) };
    crate::own_heap::lock_for_fork();
    // Until the parent or child handler, this thread holds the gate: the fork handlers of
    // other libraries run in between and may call our interposers (`pthread_create`,
    // `dlsym`), whose sections must not wait for the gate this thread holds.
    tls::current().in_fork_section.set(1);
}

fn open_gate() {
    // SAFETY: see `Held`.
    drop(unsafe { (*HELD.0.get()).take() });
}

extern "C" fn in_parent() {
    tls::current().in_fork_section.set(0);
    crate::own_heap::unlock_in_parent();
    open_gate();
}

extern "C" fn in_child() {
    // fork() returns to the child with errno as it was before the call, whatever we do here.
    let errno = crate::signal::sys::errno();
    crate::own_heap::unlock_in_child();
    open_gate();
    // Sections held by other threads of the parent do not exist in the child; this thread
    // was not in one (it is forking).
    tls::current().in_fork_section.set(0);
    crate::lifecycle::after_fork_in_child();
    crate::signal::sys::set_errno(errno);
}

/// Registers the handlers. Call once, from the constructor.
pub fn install() {
    // SAFETY: registering plain functions.
    unsafe { libc::pthread_atfork(Some(prepare), Some(in_parent), Some(in_child)) };
}
