//! Exact allocator counters — the native `runtime.MemStats` — without shared writes on the
//! fast path. Per allocation and free: the count per usable size for the common sizes (one
//! increment), bytes and the size-class histogram for the rest; the layout and how the sums
//! follow are in [`anyprof_wire::shared::AllocSlot`].
//!
//! Every thread owns one slot of a static array and is its only writer, so it updates its
//! counters with plain loads and stores (no `lock`-prefixed instruction, no cache line
//! shared with another thread). The background thread sums all slots. A thread claims a slot
//! on its first allocation and gives it back when it exits (a thread-specific-data
//! destructor); the counts stay in the slot, so the sums stay right when the slot is reused.
//! Threads beyond [`SLOTS`], calls made before the library is set up, and a thread's calls
//! after its exit began use the shared overflow slot with atomic adds.
//!
//! The slots live in the shared region ([`crate::region::SHARED`]): the collector sums them
//! itself after a sudden death. Nothing is batched, so nothing is lost there.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use anyprof_wire::shared::{AllocTotals, SMALL_MASK};
use anyprof_wire::size_class;

use crate::tls::ThreadBlock;

use anyprof_wire::shared::{AllocSlot as Slot, ALLOC_SLOTS as SLOTS};

/// The slots (slot 0 is the shared overflow slot), in the shared region.
#[inline(always)]
fn table() -> &'static [Slot; SLOTS] {
    &crate::region::SHARED.alloc
}

static HINT: AtomicUsize = AtomicUsize::new(1);
/// The TSD key whose destructor releases a thread's slot (stored + 1; 0 = none yet).
static KEY: AtomicUsize = AtomicUsize::new(0);

/// Adds `v` to a counter this thread owns: a plain load and store, no atomic RMW.
#[inline(always)]
fn owner_add(c: &AtomicU64, v: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

/// Bit 0 of `ThreadBlock::stats`: set when the thread's slot was claimed (or later found)
/// while block sizes could be read from glibc's chunk headers
/// ([`super::real::glibc_header_readable`]).
pub const GLIBC_FAST: usize = 1;

/// Bit 0 of `ThreadBlock::fast`: the malloc fast path may run (the thread has a slot, may
/// read glibc's chunk headers, and is not running our own code).
pub const FAST_ALLOC: usize = 1;
/// Bit 1 of `ThreadBlock::fast`, only with [`FAST_ALLOC`]: besides, no small glibc block is
/// in the live table ([`super::hooks::small_blocks_untracked`]), so the free fast path
/// needs no look-up.
pub const FAST_FREE: usize = 2;

#[inline(always)]
fn slot_at(addr: usize) -> &'static Slot {
    // SAFETY: `stats` and `fast` only ever hold 0 or the address of an element of the slot
    // table in the shared region (set by `claim`; 64-byte aligned, so bits 0 and 1 are free
    // for flags), which stays mapped at that address for the whole process.
    unsafe { &*(addr as *const Slot) }
}

/// The calling thread's own slot, if it has one.
#[inline(always)]
pub fn own_slot(b: &ThreadBlock) -> Option<&'static Slot> {
    let addr = b.stats.get() & !GLIBC_FAST;
    if addr == 0 {
        return None;
    }
    Some(slot_at(addr))
}

/// The calling thread's own slot if the malloc fast path may run: one thread-local load,
/// one bit test.
#[inline(always)]
pub fn alloc_fast_slot(b: &ThreadBlock) -> Option<&'static Slot> {
    let v = b.fast.get();
    if v & FAST_ALLOC == 0 {
        return None;
    }
    Some(slot_at(v & !(FAST_ALLOC | FAST_FREE)))
}

/// The calling thread's own slot if the free fast path may run: one thread-local load, one
/// bit test.
#[inline(always)]
pub fn free_fast_slot(b: &ThreadBlock) -> Option<&'static Slot> {
    let v = b.fast.get();
    if v & FAST_FREE == 0 {
        return None;
    }
    // Both bits are set: a subtraction, which folds into the counters' displacement.
    Some(slot_at(v.wrapping_sub(FAST_ALLOC | FAST_FREE)))
}

/// Derives `ThreadBlock::fast` from the thread's slot, its re-entrancy flag and whether small
/// blocks are tracked; run whenever one of them changes. Async-signal-safe (thread-local
/// cells and one atomic load).
#[inline]
pub fn refresh_fast(b: &ThreadBlock) {
    let s = b.stats.get();
    let fast = if s & GLIBC_FAST != 0 && b.internal.get() == 0 {
        if super::hooks::small_blocks_untracked() {
            s | FAST_ALLOC | FAST_FREE
        } else {
            s | FAST_ALLOC
        }
    } else {
        0
    };
    b.fast.set(fast);
}

/// Marks the calling thread's slot [`GLIBC_FAST`] if it has a slot and headers are readable
/// now (a slot claimed before the start-up check, on the main thread), and brings its fast
/// paths up to date (small blocks became untracked at start).
#[cold]
pub fn upgrade(b: &ThreadBlock) {
    let v = b.stats.get();
    if v != 0 && super::real::glibc_header_readable() {
        b.stats.set(v | GLIBC_FAST);
    }
    refresh_fast(b);
}

/// Counts, in the caller's own slot `s`, an allocation (`alloc`) or a free of a glibc block
/// whose chunk is `chunk` bytes (a multiple of 8, below
/// [`anyprof_wire::shared::SMALL_LIMIT`]): usable size `chunk - 8`.
#[inline(always)]
pub fn count_glibc_small(s: &Slot, chunk: usize, alloc: bool) {
    let small = if alloc {
        &s.small_mallocs
    } else {
        &s.small_frees
    };
    // `chunk / 8` is below SMALL_LIMIT / 8 < SMALL_SIZES: the bounds check folds away.
    if let Some(c) = small.get(chunk / 8) {
        owner_add(c, 1);
    }
}

/// Counts, in the caller's own slot `s`, an allocation (`alloc`) or a free of a block of
/// `usable` bytes. Common sizes: one increment.
#[inline(always)]
pub fn count_owned(s: &Slot, usable: u64, alloc: bool) {
    let small = if alloc {
        &s.small_mallocs
    } else {
        &s.small_frees
    };
    if usable & SMALL_MASK == 0 {
        if let Some(c) = small.get((usable / 8 + 1) as usize) {
            owner_add(c, 1);
        }
    } else {
        // Inline, not a call: the hooks' fast paths then save no register.
        let (bytes, classes) = if alloc {
            (&s.alloc_bytes, &s.class_mallocs)
        } else {
            (&s.free_bytes, &s.class_frees)
        };
        if let Some(c) = classes.get(size_class(usable)) {
            owner_add(bytes, usable);
            owner_add(c, 1);
        }
    }
}

/// Counts a block outside the small sizes in the shared overflow slot `s`.
#[cold]
fn count_large_shared(s: &Slot, usable: u64, alloc: bool) {
    let (bytes, classes) = if alloc {
        (&s.alloc_bytes, &s.class_mallocs)
    } else {
        (&s.free_bytes, &s.class_frees)
    };
    if let Some(c) = classes.get(size_class(usable)) {
        bytes.fetch_add(usable, Ordering::Relaxed);
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts an allocation of `usable` bytes by a thread that may have no slot yet.
pub fn on_alloc(b: &ThreadBlock, usable: u64) {
    match own_slot(b) {
        Some(s) => count_owned(s, usable, true),
        None => slow_add(b, usable, true),
    }
}

/// Counts a free of a block of `usable` bytes by a thread that may have no slot yet.
pub fn on_free(b: &ThreadBlock, usable: u64) {
    match own_slot(b) {
        Some(s) => count_owned(s, usable, false),
        None => slow_add(b, usable, false),
    }
}

#[cold]
fn slow_add(b: &ThreadBlock, usable: u64, alloc: bool) {
    let slot = if b.internal.get() == 0 && b.exiting.get() == 0 {
        claim(b)
    } else {
        None
    };
    if let Some(s) = slot {
        count_owned(s, usable, alloc);
        return;
    }
    let Some(s) = table().first() else {
        return;
    };
    if usable & SMALL_MASK == 0 {
        let small = if alloc {
            &s.small_mallocs
        } else {
            &s.small_frees
        };
        if let Some(c) = small.get((usable / 8 + 1) as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    } else {
        count_large_shared(s, usable, alloc);
    }
}

/// Claims a free slot for the calling thread and arranges its release at thread exit.
fn claim(b: &ThreadBlock) -> Option<&'static Slot> {
    let key = KEY.load(Ordering::Acquire);
    if key == 0 {
        return None; // not set up yet: without a release at exit, a slot would leak
    }
    let start = HINT.load(Ordering::Relaxed);
    for i in 0..SLOTS - 1 {
        let idx = 1 + (start + i - 1) % (SLOTS - 1);
        let Some(s) = table().get(idx) else { continue };
        if s.owned
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            HINT.store(idx + 1, Ordering::Relaxed);
            if let Some(s0) = table().first() {
                s0.owned.fetch_max(idx as u32, Ordering::Release);
            }
            let fast = if super::real::glibc_header_readable() {
                GLIBC_FAST
            } else {
                0
            };
            b.stats.set(s as *const Slot as usize | fast);
            refresh_fast(b);
            let internal = crate::signal::thread_state::Internal::enter();
            // SAFETY: the key was created by `init`; the value is a non-null marker that the
            // destructor does not dereference.
            unsafe {
                libc::pthread_setspecific(
                    (key - 1) as libc::pthread_key_t,
                    core::ptr::dangling::<libc::c_void>(),
                )
            };
            drop(internal);
            return Some(s);
        }
    }
    None
}

unsafe extern "C" fn release_at_thread_exit(_: *mut libc::c_void) {
    let b = crate::tls::current();
    b.exiting.set(1);
    if let Some(s) = own_slot(b) {
        b.stats.set(0);
        refresh_fast(b);
        s.owned.store(0, Ordering::Release);
    }
}

/// Creates the TSD key. Until it exists, every thread counts in the overflow slot.
pub fn init() {
    if KEY.load(Ordering::Acquire) != 0 {
        return;
    }
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: valid out-pointer and destructor.
    if unsafe { libc::pthread_key_create(&mut key, Some(release_at_thread_exit)) } == 0 {
        KEY.store(key as usize + 1, Ordering::Release);
    }
}

/// Totals over every slot.
#[derive(Clone, Copy, Debug)]
pub struct Totals {
    /// Allocations.
    pub mallocs: u64,
    /// Frees.
    pub frees: u64,
    /// Usable bytes allocated.
    pub alloc_bytes: u64,
    /// Usable bytes freed.
    pub free_bytes: u64,
    /// Allocations per size class.
    pub class_mallocs: [u64; anyprof_wire::SIZE_CLASSES],
    /// Frees per size class.
    pub class_frees: [u64; anyprof_wire::SIZE_CLASSES],
}

impl Totals {
    /// Bytes in live blocks.
    pub fn live_bytes(&self) -> u64 {
        self.alloc_bytes.saturating_sub(self.free_bytes)
    }
}

/// Sums every slot (relaxed reads: each counter is exact, the set is not an atomic snapshot).
pub fn totals() -> Totals {
    let t = sum();
    Totals {
        mallocs: t.mallocs(),
        frees: t.frees(),
        alloc_bytes: t.alloc_bytes,
        free_bytes: t.free_bytes,
        class_mallocs: t.class_mallocs,
        class_frees: t.class_frees,
    }
}

fn sum() -> AllocTotals {
    let mut t = AllocTotals::ZERO;
    for s in used_slots() {
        t.add_slot(s, |c| c.load(Ordering::Relaxed));
    }
    t
}

fn used_slots() -> &'static [Slot] {
    let high = table()
        .first()
        .map_or(0, |s| s.owned.load(Ordering::Acquire));
    anyprof_wire::shared::used_alloc_slots(table(), high)
}

/// Bytes in live blocks now.
pub fn live_bytes() -> u64 {
    sum().live_bytes()
}

/// Makes the calling thread take the slow path again (in a forked child, where accounting
/// is off).
pub fn detach_current_thread() {
    let b = crate::tls::current();
    b.stats.set(0);
    refresh_fast(b);
}
