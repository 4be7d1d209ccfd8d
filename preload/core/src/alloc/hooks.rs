//! Bodies of the interposed malloc family (the symbols themselves are in
//! the cdylib's `exports`). Each forwards to the next allocator, then accounts for the result:
//! exact counters always, a heap sample when the thread's byte countdown runs out.

use core::ffi::c_void;

use anyprof_wire::shared::SMALL_LIMIT as SMALL_LIMIT_U64;
use anyprof_wire::{MemStat, FLAG_NO_STACK_BOUNDS, FLAG_TRUNCATED, MAX_FRAMES};

const SMALL_LIMIT: usize = SMALL_LIMIT_U64 as usize;

use super::{buckets, counters, live, real, sampler};
use crate::signal::thread_state::Internal;
use crate::signal::{sys, unwinder as unwind};
use crate::tls::{self, ThreadBlock};

/// Samples not recorded, by cause (read by the background thread).
pub static LOST: [core::sync::atomic::AtomicU64; 2] = [
    core::sync::atomic::AtomicU64::new(0),
    core::sync::atomic::AtomicU64::new(0),
];
const LOST_LIVE_TABLE: usize = 0;
const LOST_BUCKETS: usize = 1;

/// How many samples were lost because the live table (`MemStat::LiveTableFull`) or the
/// bucket table (`MemStat::BucketsFull`) was full.
pub fn lost(which: MemStat) -> u64 {
    let i = if which == MemStat::LiveTableFull {
        LOST_LIVE_TABLE
    } else {
        LOST_BUCKETS
    };
    LOST.get(i)
        .map_or(0, |c| c.load(core::sync::atomic::Ordering::Relaxed))
}

fn count_lost(i: usize) {
    if let Some(c) = LOST.get(i) {
        c.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    }
}

/// True while heap accounting is on; when off, the hooks only forward. On from the first
/// call, before our constructor ran (such calls count in the shared overflow slot): a block
/// allocated by another library's constructor and freed later must count as allocated, or
/// its free alone is counted (`Frees` above `Mallocs`, the live heap short by its size). The
/// constructor turns it off when the process is not profiled, a forked child that steps
/// aside too. A read-mostly global: reading it costs no cache-line transfer.
pub static ACCOUNTING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(true);

#[inline(always)]
fn accounting() -> bool {
    ACCOUNTING.load(core::sync::atomic::Ordering::Relaxed)
}

/// Accounts for a new block `p` (non-null) and returns it. Fast path: a thread with a
/// counter slot of its own (which implies accounting is on) reads the block size from what
/// the allocator left next to the block, bumps one counter of its own and its countdown.
/// Every slower path is a tail call that returns `p`, so the fast path saves no register.
#[inline(always)]
fn on_alloc(p: *mut c_void) -> *mut c_void {
    let b = tls::current();
    // Our own allocations (the background thread, our bookkeeping) are not the program's:
    // not counted, not sampled. They are freed by our own code too, so the counts balance.
    if b.internal.get() != 0 {
        return p;
    }
    let Some(slot) = counters::glibc_fast_slot(b) else {
        return on_alloc_not_fast(b, p);
    };
    let Some(chunk) = real::glibc_small_chunk(real::glibc_size_field(p), SMALL_LIMIT) else {
        return on_alloc_any_allocator(b, slot, p);
    };
    counters::count_glibc_small(slot, chunk, true);
    count_down(b, p, chunk.wrapping_sub(8) as u64)
}

/// [`on_alloc`] for a thread without a slot, or whose slot is not marked for glibc headers.
#[inline(never)]
fn on_alloc_not_fast(b: &ThreadBlock, p: *mut c_void) -> *mut c_void {
    match counters::own_slot(b) {
        Some(slot) => {
            counters::upgrade(b);
            on_alloc_any_allocator(b, slot, p)
        }
        None => on_alloc_without_slot(b, p),
    }
}

/// [`on_alloc`] for other sizes or when the block size must be asked from the allocator.
#[inline(never)]
fn on_alloc_any_allocator(
    b: &ThreadBlock,
    slot: &'static anyprof_wire::shared::AllocSlot,
    p: *mut c_void,
) -> *mut c_void {
    let usable = real::usable_size_of_live(p) as u64;
    counters::count_owned(slot, usable, true);
    count_down(b, p, usable)
}

/// The sampling countdown: one subtraction and a branch; the slow path when it runs out.
#[inline(always)]
fn count_down(b: &ThreadBlock, p: *mut c_void, usable: u64) -> *mut c_void {
    let left = b.bytes_until_sample.get().wrapping_sub(usable as i64);
    b.bytes_until_sample.set(left);
    if left <= 0 {
        return maybe_sample(b, p, usable);
    }
    p
}

/// A thread without a slot of its own yet (its first allocation, or accounting off).
#[cold]
#[inline(never)]
fn on_alloc_without_slot(b: &ThreadBlock, p: *mut c_void) -> *mut c_void {
    if !accounting() {
        return p;
    }
    let usable = usable_size_guarded(p);
    counters::on_alloc(b, usable);
    if sampler::RATE.load(core::sync::atomic::Ordering::Relaxed) == 0 {
        // Before our constructor (or with heap sampling off): counted, but the countdown is
        // left alone, so that it is not parked for good on a thread that started earlier.
        return p;
    }
    count_down(b, p, usable)
}

/// Accounts for block `p` from an allocator entry point other than the malloc family (the
/// next `operator new`, in the cdylib's `alloc::cxx` accounting mode).
pub fn account_alloc(p: *mut c_void) {
    on_alloc(p);
}

/// Accounts for block `p` (non-null) about to be freed by an entry point other than `free`.
pub fn account_free(p: *mut c_void) {
    on_free(p);
}

#[cold]
#[inline(never)]
fn maybe_sample(b: &ThreadBlock, p: *mut c_void, usable: u64) -> *mut c_void {
    if !sampler::on_countdown_expired(b) {
        return p;
    }
    let errno = sys::errno();
    let internal = Internal::enter();
    // No loader, file system, lock or allocation from here on: a thread whose stack bounds
    // are unknown is unwound with checked reads, and a stack that runs into an object the
    // unwinder does not know yet (dlopen'ed since the background thread's last cycle) is kept
    // truncated; the background thread is woken to bring the unwinder up to date.
    let mut frames = [0u64; MAX_FRAMES];
    let (n, flags) = unwind::unwind_here(&mut frames);
    if flags & FLAG_TRUNCATED != 0 && flags & FLAG_NO_STACK_BOUNDS == 0 && n < MAX_FRAMES {
        unwind::request_catch_up();
    }
    match buckets::intern(frames.get(..n).unwrap_or(&[]), usable) {
        Some(bucket) => {
            buckets::add_alloc(bucket, usable);
            if !live::insert(p, bucket, usable) {
                count_lost(LOST_LIVE_TABLE);
            }
        }
        None => count_lost(LOST_BUCKETS),
    }
    drop(internal);
    sys::set_errno(errno);
    p
}

/// Accounts for block `p` (non-null) about to be freed; must run before the real free.
#[inline(always)]
fn on_free(p: *mut c_void) {
    let b = tls::current();
    if b.internal.get() != 0 {
        return;
    }
    match counters::own_slot(b) {
        Some(slot) => counters::count_owned(slot, real::usable_size_of_live(p) as u64, false),
        None => {
            if !on_free_without_slot(b, p) {
                return;
            }
        }
    }
    if live::may_contain(p) {
        forget_sampled(p);
    }
}

/// Counts a free by a thread without a slot of its own; false if accounting is off.
#[cold]
#[inline(never)]
fn on_free_without_slot(b: &ThreadBlock, p: *mut c_void) -> bool {
    if !accounting() {
        return false;
    }
    counters::on_free(b, usable_size_guarded(p));
    true
}

/// The usable size of live block `p`, asked with the re-entrancy flag set: before our
/// constructor the next allocator may not be set up yet, and its `malloc_usable_size` may
/// allocate (tcmalloc's builds its `MallocExtension` with `operator new`, which reaches
/// these hooks, which ask the size again: endless recursion). Such an allocation of its own
/// is then not counted.
#[cold]
#[inline(never)]
fn usable_size_guarded(p: *mut c_void) -> u64 {
    let _internal = Internal::enter();
    real::usable_size_of_live(p) as u64
}

#[cold]
#[inline(never)]
fn forget_sampled(p: *mut c_void) {
    if let Some((bucket, size)) = live::remove(p) {
        buckets::add_free(bucket, size);
    }
}

/// `free` of a block counted by a thread without a slot, or possibly sampled: the rest of
/// [`free`] out of line.
#[cold]
#[inline(never)]
fn free_slow(b: &ThreadBlock, p: *mut c_void, slot_counted: bool) {
    if (slot_counted || on_free_without_slot(b, p)) && live::may_contain(p) {
        forget_sampled(p);
    }
    real::free(p);
}

/// `malloc`.
#[inline(always)]
pub fn malloc(size: usize) -> *mut c_void {
    let p = real::malloc(size);
    if p.is_null() {
        return p;
    }
    on_alloc(p)
}

/// `free`: the fast path has no call but the tail call to the next allocator's.
#[inline(always)]
pub fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    let b = tls::current();
    if b.internal.get() != 0 {
        return real::free(p);
    }
    let Some(slot) = counters::glibc_fast_slot(b) else {
        return free_not_fast(b, p);
    };
    let Some(chunk) = real::glibc_small_chunk(real::glibc_size_field(p), SMALL_LIMIT) else {
        return free_any_allocator(b, slot, p);
    };
    counters::count_glibc_small(slot, chunk, false);
    if live::may_contain(p) {
        return free_slow(b, p, true);
    }
    real::free_glibc(p);
}

/// [`free`] for a thread without a slot, or whose slot is not marked for glibc headers.
#[inline(never)]
fn free_not_fast(b: &ThreadBlock, p: *mut c_void) {
    match counters::own_slot(b) {
        Some(slot) => {
            counters::upgrade(b);
            free_any_allocator(b, slot, p)
        }
        None => free_slow(b, p, false),
    }
}

/// [`free`] for other sizes or when the block size must be asked from the allocator.
#[inline(never)]
fn free_any_allocator(
    b: &ThreadBlock,
    slot: &'static anyprof_wire::shared::AllocSlot,
    p: *mut c_void,
) {
    counters::count_owned(slot, real::usable_size_of_live(p) as u64, false);
    if live::may_contain(p) {
        return free_slow(b, p, true);
    }
    real::free(p);
}

/// `calloc`.
#[inline(always)]
pub fn calloc(n: usize, size: usize) -> *mut c_void {
    let p = real::calloc(n, size);
    if p.is_null() {
        return p;
    }
    on_alloc(p)
}

/// `realloc`: the old block counts as freed and the new one as allocated, as in Go's
/// MemStats; a failed realloc changes nothing.
pub fn realloc(old: *mut c_void, size: usize) -> *mut c_void {
    if old.is_null() {
        return malloc(size);
    }
    let b = tls::current();
    if b.internal.get() != 0 || !accounting() {
        return real::realloc(old, size);
    }
    let old_usable = usable_size_guarded(old);
    let sampled = if live::may_contain(old) {
        live::remove(old)
    } else {
        None
    };
    let p = real::realloc(old, size);
    if p.is_null() && size != 0 {
        // Failed: the old block is still live, and still sampled.
        if let Some((bucket, sz)) = sampled {
            let errno = sys::errno();
            if !live::insert(old, bucket, sz) {
                count_lost(LOST_LIVE_TABLE);
            }
            sys::set_errno(errno);
        }
        return p;
    }
    counters::on_free(b, old_usable);
    if let Some((bucket, sz)) = sampled {
        buckets::add_free(bucket, sz);
    }
    if !p.is_null() {
        on_alloc(p);
    }
    p
}

/// `reallocarray`: `realloc` with an overflow check (glibc's own would call its internal
/// realloc, out of our sight).
pub fn reallocarray(old: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        Some(total) => realloc(old, total),
        None => {
            sys::set_errno(libc::ENOMEM);
            core::ptr::null_mut()
        }
    }
}

/// `memalign`.
pub fn memalign(align: usize, size: usize) -> *mut c_void {
    let p = real::memalign(align, size);
    if !p.is_null() {
        on_alloc(p);
    }
    p
}

/// `aligned_alloc`.
pub fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    let p = real::aligned_alloc(align, size);
    if !p.is_null() {
        on_alloc(p);
    }
    p
}

/// `posix_memalign`.
pub fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> libc::c_int {
    let rc = real::posix_memalign(out, align, size);
    if rc == 0 && !out.is_null() {
        // SAFETY: on success posix_memalign stored the block through the caller's pointer.
        let p = unsafe { *out };
        if !p.is_null() {
            on_alloc(p);
        }
    }
    rc
}

/// `valloc`.
pub fn valloc(size: usize) -> *mut c_void {
    let p = real::valloc(size);
    if !p.is_null() {
        on_alloc(p);
    }
    p
}

/// `pvalloc`.
pub fn pvalloc(size: usize) -> *mut c_void {
    let p = real::pvalloc(size);
    if !p.is_null() {
        on_alloc(p);
    }
    p
}

/// `malloc_usable_size`.
pub fn malloc_usable_size(p: *mut c_void) -> usize {
    real::usable_size(p)
}
