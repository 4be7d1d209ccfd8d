//! The allocator of this library's own Rust code (constructor, background-thread and fork
//! world, and the program's thread in our `pthread_create` and `dlsym` interposers; never a
//! malloc hook's fast path or a signal handler, which allocate nothing): memory mapped for
//! us alone (`rlsf`'s TLSF over anonymous `mmap`), never glibc's heap.
//!
//! Why: what we allocate at start-up (the module map, the unwinder's tables, about half a
//! MiB) and the holes our temporaries leave used to sit in the program's main heap. glibc
//! then served the program's allocations from those holes instead of splitting its top
//! chunk, and consolidated them on free: about 8 ns more per `malloc`+`free` pair at
//! 16..4096 B (`make bench`), and a heap the program could see was not its own
//! (`mallinfo2`, `malloc_stats`, the addresses it gets). Now the program's heap is laid out
//! as without anyprof.
//!
//! Memory from one allocator is never freed by the other: our Rust code frees only what it
//! allocated, and what glibc hands out (a `realpath` result, say) std frees with `free`.
//!
//! fork: a thread of ours could hold the allocator's lock at the moment another thread
//! forks, and the child, which allocates in our fork handler, would wait for ever. So the
//! fork gate's prepare handler takes [`LOCK`] too ([`lock_for_fork`]), and the parent and
//! child handlers give it back. In between, the forking thread allocates without taking it
//! (other libraries' fork handlers run there and may call our interposers): every other
//! thread is kept out by the lock it holds.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Our allocator: rlsf's, behind [`LOCK`].
pub struct OwnHeap(rlsf::GlobalTlsf);

/// Taken around every call into rlsf, and by the fork handlers (see the module doc). A
/// plain pthread mutex: it allocates nothing.
struct Lock(UnsafeCell<libc::pthread_mutex_t>);
// SAFETY: a pthread mutex is made to be shared between threads; it is only used through
// pthread_mutex_lock/unlock on its fixed address.
unsafe impl Sync for Lock {}
static LOCK: Lock = Lock(UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER));

/// The forking thread (`pthread_self`) while it holds [`LOCK`] for a fork; 0 otherwise.
static FORK_HOLDER: AtomicUsize = AtomicUsize::new(0);

fn held_for_fork_by_me() -> bool {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as usize;
    FORK_HOLDER.load(Ordering::Relaxed) == me
}

fn lock() {
    if held_for_fork_by_me() {
        return;
    }
    // SAFETY: a statically initialised mutex at a fixed address.
    unsafe { libc::pthread_mutex_lock(LOCK.0.get()) };
}

fn unlock() {
    if held_for_fork_by_me() {
        return;
    }
    // SAFETY: as for `lock`; called by the thread that locked it.
    unsafe { libc::pthread_mutex_unlock(LOCK.0.get()) };
}

/// In the fork gate's prepare handler, after the gate is closed: no allocation of ours is
/// in progress in any other thread once this returns, and none starts until the parent or
/// child handler.
pub fn lock_for_fork() {
    lock();
    // SAFETY: pthread_self has no preconditions.
    FORK_HOLDER.store(unsafe { libc::pthread_self() } as usize, Ordering::Relaxed);
}

/// In the parent after fork.
pub fn unlock_in_parent() {
    FORK_HOLDER.store(0, Ordering::Relaxed);
    unlock();
}

/// In the child after fork: the only thread, which took the lock before forking.
pub fn unlock_in_child() {
    FORK_HOLDER.store(0, Ordering::Relaxed);
    // SAFETY: the child has one thread; re-initialising a mutex nobody else can hold gives
    // it back in a known state (the owner recorded in it is the parent's forking thread).
    unsafe { *LOCK.0.get() = libc::PTHREAD_MUTEX_INITIALIZER };
}

// SAFETY: every method forwards to rlsf's `GlobalTlsf` (a correct `GlobalAlloc`) with the
// caller's arguments, under our lock; nothing is added to or taken from its contract.
unsafe impl GlobalAlloc for OwnHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        lock();
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        let p = unsafe { self.0.alloc(layout) };
        unlock();
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        lock();
        // SAFETY: as above.
        unsafe { self.0.dealloc(ptr, layout) };
        unlock();
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        lock();
        // SAFETY: as above.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        unlock();
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        lock();
        // SAFETY: as above.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        unlock();
        p
    }
}

// Also in this crate's unit tests, which then exercise it.
#[global_allocator]
static OWN_HEAP: OwnHeap = OwnHeap(rlsf::GlobalTlsf::new());
