//! Exact allocator counters — the native `runtime.MemStats` — without shared writes on the
//! fast path. Per allocation and free: bytes and the size-class histogram; the numbers of
//! allocations and frees are the histogram's sums.
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
//! itself after a sudden death.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use anyprof_wire::{size_class, SIZE_CLASSES};

use crate::tls::ThreadBlock;

use anyprof_wire::shared::{AllocSlot as Slot, ALLOC_SLOTS as SLOTS};

/// The slots (slot 0 is the shared overflow slot), in the shared region.
#[inline(always)]
fn table() -> &'static [Slot; SLOTS] {
    &crate::region::SHARED.alloc
}

static HINT: AtomicUsize = AtomicUsize::new(1);
/// Highest slot index ever claimed: the reader sums only up to it.
static HIGH: AtomicUsize = AtomicUsize::new(0);
/// The TSD key whose destructor releases a thread's slot (stored + 1; 0 = none yet).
static KEY: AtomicUsize = AtomicUsize::new(0);

/// Adds `v` to a counter this thread owns: a plain load and store, no atomic RMW.
#[inline(always)]
fn owner_add(c: &AtomicU64, v: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

#[inline(always)]
fn slot_of(b: &ThreadBlock) -> Option<&'static Slot> {
    let addr = b.stats.get();
    if addr == 0 {
        return None;
    }
    // SAFETY: `stats` only ever holds 0 or the address of an element of the slot table in
    // the shared region (set by `claim`), which stays mapped at that address for the whole
    // process.
    Some(unsafe { &*(addr as *const Slot) })
}

/// True if the calling thread counts in a slot of its own: the hooks' fast path.
#[inline(always)]
pub fn has_slot(b: &ThreadBlock) -> bool {
    b.stats.get() != 0
}

/// Counts an allocation of `usable` bytes.
#[inline(always)]
pub fn on_alloc(b: &ThreadBlock, usable: u64) {
    match slot_of(b) {
        Some(s) => {
            owner_add(&s.alloc_bytes, usable);
            if let Some(c) = s.class_mallocs.get(size_class(usable)) {
                owner_add(c, 1);
            }
        }
        None => slow_add(b, usable, true),
    }
}

/// Counts a free of a block of `usable` bytes.
#[inline(always)]
pub fn on_free(b: &ThreadBlock, usable: u64) {
    match slot_of(b) {
        Some(s) => {
            owner_add(&s.free_bytes, usable);
            if let Some(c) = s.class_frees.get(size_class(usable)) {
                owner_add(c, 1);
            }
        }
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
    let Some(s) = slot.or_else(|| table().first()) else {
        return;
    };
    let (bytes, classes) = if alloc {
        (&s.alloc_bytes, &s.class_mallocs)
    } else {
        (&s.free_bytes, &s.class_frees)
    };
    if slot.is_some() {
        owner_add(bytes, usable);
        if let Some(c) = classes.get(size_class(usable)) {
            owner_add(c, 1);
        }
    } else {
        bytes.fetch_add(usable, Ordering::Relaxed);
        if let Some(c) = classes.get(size_class(usable)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
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
            HIGH.fetch_max(idx, Ordering::Relaxed);
            b.stats.set(s as *const Slot as usize);
            let was = b.internal.replace(1);
            // SAFETY: the key was created by `init`; the value is a non-null marker that the
            // destructor does not dereference.
            unsafe {
                libc::pthread_setspecific(
                    (key - 1) as libc::pthread_key_t,
                    core::ptr::dangling::<libc::c_void>(),
                )
            };
            b.internal.set(was);
            return Some(s);
        }
    }
    None
}

unsafe extern "C" fn release_at_thread_exit(_: *mut libc::c_void) {
    let b = crate::tls::current();
    b.exiting.set(1);
    if let Some(s) = slot_of(b) {
        b.stats.set(0);
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
    pub class_mallocs: [u64; SIZE_CLASSES],
    /// Frees per size class.
    pub class_frees: [u64; SIZE_CLASSES],
}

impl Totals {
    /// Bytes in live blocks.
    pub fn live_bytes(&self) -> u64 {
        self.alloc_bytes.saturating_sub(self.free_bytes)
    }
}

/// Sums every slot (relaxed reads: each counter is exact, the set is not an atomic snapshot).
pub fn totals() -> Totals {
    let mut t = Totals {
        mallocs: 0,
        frees: 0,
        alloc_bytes: 0,
        free_bytes: 0,
        class_mallocs: [0; SIZE_CLASSES],
        class_frees: [0; SIZE_CLASSES],
    };
    for s in used_slots() {
        t.alloc_bytes += s.alloc_bytes.load(Ordering::Relaxed);
        t.free_bytes += s.free_bytes.load(Ordering::Relaxed);
        for (o, c) in t.class_mallocs.iter_mut().zip(s.class_mallocs.iter()) {
            *o += c.load(Ordering::Relaxed);
        }
        for (o, c) in t.class_frees.iter_mut().zip(s.class_frees.iter()) {
            *o += c.load(Ordering::Relaxed);
        }
    }
    // Counts are the histograms' sums, so a snapshot's Mallocs and BySize always agree.
    t.mallocs = t.class_mallocs.iter().sum();
    t.frees = t.class_frees.iter().sum();
    t
}

fn used_slots() -> impl Iterator<Item = &'static Slot> {
    table().iter().take(HIGH.load(Ordering::Relaxed) + 1)
}

/// Bytes in live blocks now (cheaper than [`totals`]: no histogram).
pub fn live_bytes() -> u64 {
    let (mut a, mut f) = (0u64, 0u64);
    for s in used_slots() {
        a = a.wrapping_add(s.alloc_bytes.load(Ordering::Relaxed));
        f = f.wrapping_add(s.free_bytes.load(Ordering::Relaxed));
    }
    a.saturating_sub(f)
}

/// Makes the calling thread take the slow path again (in a forked child, where accounting
/// is off).
pub fn detach_current_thread() {
    crate::tls::current().stats.set(0);
}
