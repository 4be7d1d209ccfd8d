//! Bodies of the interposed malloc family (the symbols themselves are in
//! the cdylib's `exports`). Each forwards to the next allocator, then accounts for the result:
//! exact counters always, a heap sample when the thread's byte countdown runs out.
//!
//! The fast paths test one thread-local word (`ThreadBlock::fast`), read the size from glibc's
//! chunk header and bump a counter of the thread's own. Every slower path is an
//! `extern "C"` function: it cannot unwind, so the fast path needs no landing pad and
//! reaches it by a tail jump, with no frame of its own. A sampled small block is promoted
//! to a 4 KiB block (jemalloc promotes its sampled small allocations likewise), so that
//! `free` of a small block never looks it up ([`track`]).

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

/// The lowest sampling rate at which a sampled small block is moved ("promoted", as jemalloc
/// does with its sampled small allocations) to a block of [`PROMOTED_BYTES`]. The program
/// then holds at most `4 KiB / rate` more memory in sampled blocks than without us: 1.6 % at
/// this rate, 0.8 % at the default 512 KiB. Below it, blocks stay where they are and every
/// free looks them up.
pub const PROMOTE_MIN_RATE: u64 = 256 * 1024;

/// What a sampled small block is moved to: the smallest request whose glibc chunk is
/// [`SMALL_LIMIT`] bytes, so that its free leaves the fast path.
const PROMOTED_BYTES: usize = SMALL_LIMIT - 16;

/// Set (for good) once no small glibc block can be in the live table: sampling is off, or
/// sampled small blocks are promoted. The free fast path then skips the live-table filter,
/// the one memory access it made beside the block's header and the thread's counters.
static SMALL_BLOCKS_UNTRACKED: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);

/// See [`SMALL_BLOCKS_UNTRACKED`].
#[inline(always)]
pub fn small_blocks_untracked() -> bool {
    SMALL_BLOCKS_UNTRACKED.load(core::sync::atomic::Ordering::Acquire)
}

/// Starts heap sampling at `rate` bytes (0: counters only), once, at start-up, before the
/// program's own code runs. Whether small blocks are promoted is decided here, before the
/// first sample, and never changes: a free on the fast path trusts it.
pub fn start_sampling(rate: u64) {
    if rate == 0 || rate >= PROMOTE_MIN_RATE {
        SMALL_BLOCKS_UNTRACKED.store(true, core::sync::atomic::Ordering::Release);
    }
    sampler::RATE.store(rate, core::sync::atomic::Ordering::Release);
    // The calling thread's fast paths follow at once; others follow on their next slow path.
    counters::refresh_fast(tls::current());
}

/// How a block was allocated, so that a sampled one can be promoted like it: the alignment
/// it was given by the malloc family, with bit 0 set if its bytes are the program's already
/// (calloc's zeros, realloc's contents) and must be copied; 0 for a block from another entry
/// point (the next `operator new`), which cannot move. One word, so that it costs the fast
/// paths nothing: it is passed only to the slow ones, in a register.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Origin(usize);

impl Origin {
    const FOREIGN: Origin = Origin(0);
    const KEEP_BIT: usize = 1;

    /// A block of the malloc family allocated with alignment `align`: glibc rounds it up to
    /// a power of two, at least 16, and so does the promotion (an alignment too large for
    /// that cannot move).
    const fn aligned(align: usize) -> Origin {
        match align.checked_next_power_of_two() {
            Some(a) if a < 16 => Origin(16),
            Some(a) => Origin(a),
            None => Origin::FOREIGN,
        }
    }

    /// The alignment to move it with; None if it cannot move.
    fn alignment(self) -> Option<usize> {
        (self.0 != 0).then_some(self.0 & !Self::KEEP_BIT)
    }

    /// Whether its contents are the program's already and must move with it.
    fn keeps_contents(self) -> bool {
        self.0 & Self::KEEP_BIT != 0
    }
}

const MALLOC: Origin = Origin::aligned(16);
const KEEP: Origin = Origin(16 | Origin::KEEP_BIT);

/// Accounts for a new block `p` (non-null) and returns it, or the block it was promoted to
/// when sampled. Fast path: a thread whose fast word is open reads the block size from what
/// the allocator left next to the block, bumps one counter of its own and its countdown.
/// Every slower path is a tail call that returns the block, so the fast path saves no
/// register.
#[inline(always)]
fn on_alloc(p: *mut c_void, origin: Origin) -> *mut c_void {
    let b = tls::current();
    let Some(slot) = counters::alloc_fast_slot(b) else {
        return on_alloc_not_fast(b, p, origin);
    };
    let Some(chunk) = real::glibc_small_chunk(real::glibc_size_field(p), SMALL_LIMIT) else {
        return on_alloc_any_allocator(b, slot, p, origin);
    };
    counters::count_glibc_small(slot, chunk, true);
    count_down(b, p, chunk.wrapping_sub(8) as u64, origin)
}

/// [`on_alloc`] for a thread whose fast path is closed: it runs our own code, has no slot,
/// or its slot is not marked for glibc headers.
#[inline(never)]
extern "C" fn on_alloc_not_fast(b: &ThreadBlock, p: *mut c_void, origin: Origin) -> *mut c_void {
    // Our own allocations (the background thread, our bookkeeping) are not the program's:
    // not counted, not sampled. They are freed by our own code too, so the counts balance.
    if b.internal.get() != 0 {
        return p;
    }
    match counters::own_slot(b) {
        Some(slot) => {
            counters::upgrade(b);
            on_alloc_any_allocator(b, slot, p, origin)
        }
        None => on_alloc_without_slot(b, p, origin),
    }
}

/// [`on_alloc`] for other sizes or when the block size must be asked from the allocator.
#[inline(never)]
extern "C" fn on_alloc_any_allocator(
    b: &ThreadBlock,
    slot: &'static anyprof_wire::shared::AllocSlot,
    p: *mut c_void,
    origin: Origin,
) -> *mut c_void {
    let usable = real::usable_size_of_live(p) as u64;
    counters::count_owned(slot, usable, true);
    count_down(b, p, usable, origin)
}

/// The sampling countdown: one subtraction and a branch; the slow path when it runs out.
#[inline(always)]
fn count_down(b: &ThreadBlock, p: *mut c_void, usable: u64, origin: Origin) -> *mut c_void {
    let left = b.bytes_until_sample.get().wrapping_sub(usable as i64);
    b.bytes_until_sample.set(left);
    // Below zero, not at zero: a sign test, which the subtraction's flags answer.
    if left < 0 {
        return maybe_sample(b, p, usable, origin);
    }
    p
}

/// A thread without a slot of its own yet (its first allocation, or accounting off).
#[cold]
#[inline(never)]
extern "C" fn on_alloc_without_slot(
    b: &ThreadBlock,
    p: *mut c_void,
    origin: Origin,
) -> *mut c_void {
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
    count_down(b, p, usable, origin)
}

/// Accounts for block `p` from an allocator entry point other than the malloc family (the
/// next `operator new`, in the cdylib's `alloc::cxx` accounting mode).
pub fn account_alloc(p: *mut c_void) {
    on_alloc(p, Origin::FOREIGN);
}

/// Accounts for block `p` (non-null) about to be freed by an entry point other than `free`.
pub fn account_free(p: *mut c_void) {
    on_free(p);
}

#[cold]
#[inline(never)]
extern "C" fn maybe_sample(
    b: &ThreadBlock,
    p: *mut c_void,
    usable: u64,
    origin: Origin,
) -> *mut c_void {
    if !sampler::on_countdown_expired(b) {
        return p;
    }
    let errno = sys::errno();
    let internal = Internal::enter();
    // No loader, file system, lock or allocation from here on (but the next allocator's,
    // to promote the block): a thread whose stack bounds are unknown is unwound with
    // checked reads, and a stack that runs into an object the unwinder does not know yet
    // (dlopen'ed since the background thread's last cycle) is kept truncated; the background
    // thread is woken to bring the unwinder up to date.
    let mut frames = [0u64; MAX_FRAMES];
    let (n, flags) = unwind::unwind_here(&mut frames);
    if flags & FLAG_TRUNCATED != 0 && flags & FLAG_NO_STACK_BOUNDS == 0 && n < MAX_FRAMES {
        unwind::request_catch_up();
    }
    let block = track(p, origin, frames.get(..n).unwrap_or(&[]), usable);
    drop(internal);
    sys::set_errno(errno);
    block
}

/// Records a sample of block `p` (`usable` bytes, allocated at `frames`) and returns the block
/// it is tracked at: `p` itself, or, while small blocks are untracked
/// ([`small_blocks_untracked`]) and `p` is a small glibc block, a new block of
/// [`PROMOTED_BYTES`] with `p`'s alignment (and contents, when they are the program's), `p`
/// being freed. The program may use no more of the new block than it asked for;
/// `malloc_usable_size` reports `p`'s size ([`malloc_usable_size`]), and its free is counted
/// with `p`'s size. When the sample cannot be recorded whole (no bucket, no room in the live
/// table, no memory for the new block, a block that cannot move), nothing of it is, and `p`
/// is returned untracked: a small block then stays small, as the free fast path expects.
fn track(p: *mut c_void, origin: Origin, frames: &[u64], usable: u64) -> *mut c_void {
    let Some(bucket) = buckets::intern(frames, usable) else {
        count_lost(LOST_BUCKETS);
        return p;
    };
    let small = small_blocks_untracked()
        && real::glibc_header_readable()
        && real::glibc_small_chunk(real::glibc_size_field(p), SMALL_LIMIT).is_some();
    let block = if small {
        match promoted_block(origin) {
            Some(q) => q,
            None => {
                count_lost(LOST_LIVE_TABLE);
                return p;
            }
        }
    } else {
        p
    };
    if !live::insert(block, bucket, usable) {
        count_lost(LOST_LIVE_TABLE);
        if block != p {
            real::free_glibc(block);
        }
        return p;
    }
    if block != p {
        if origin.keeps_contents() {
            // SAFETY: `p` and `block` are distinct live blocks; `p` has `usable` bytes (a
            // small block's, below PROMOTED_BYTES), which `block` has room for.
            unsafe {
                core::ptr::copy_nonoverlapping(p as *const u8, block as *mut u8, usable as usize)
            };
        }
        real::free_glibc(p);
    }
    buckets::add_alloc(bucket, usable);
    block
}

/// A new block of [`PROMOTED_BYTES`] for a sampled small block allocated as `origin` says,
/// whose glibc chunk is not small; None if there is no memory or the block cannot move.
fn promoted_block(origin: Origin) -> Option<*mut c_void> {
    let align = origin.alignment()?;
    let q = real::memalign(align, PROMOTED_BYTES);
    if q.is_null() {
        return None;
    }
    if real::glibc_small_chunk(real::glibc_size_field(q), SMALL_LIMIT).is_some() {
        // Cannot happen with glibc's chunk sizes; never keep a small block tracked.
        real::free_glibc(q);
        return None;
    }
    Some(q)
}

/// Accounts for block `p` (non-null) about to be freed by an entry point other than `free`;
/// must run before the real free.
#[inline(never)]
fn on_free(p: *mut c_void) {
    let b = tls::current();
    if b.internal.get() != 0 {
        return;
    }
    match counters::own_slot(b) {
        Some(slot) => counters::count_owned(slot, size_at_free(p), false),
        None => count_free_without_slot(b, p),
    }
}

/// Counts the free of block `p` by a thread without a slot of its own, if accounting is on.
fn count_free_without_slot(b: &ThreadBlock, p: *mut c_void) {
    if accounting() {
        counters::on_free(b, size_at_free_guarded(p));
    }
}

/// The size to count the free of live block `p` with: the size it was counted with when
/// allocated. For a sampled block, its recorded size (a promoted block is larger than what
/// the program asked for); it is forgotten here, so this runs once, before the real free.
#[inline(always)]
fn size_at_free(p: *mut c_void) -> u64 {
    forget_if_sampled(p).unwrap_or_else(|| real::usable_size_of_live(p) as u64)
}

/// [`size_at_free`] for a thread without a slot, whose allocator may not be set up yet
/// (see [`usable_size_guarded`]).
#[cold]
#[inline(never)]
fn size_at_free_guarded(p: *mut c_void) -> u64 {
    forget_if_sampled(p).unwrap_or_else(|| usable_size_guarded(p))
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

/// Forgets block `p` if it was sampled; its recorded size then.
#[inline(always)]
fn forget_if_sampled(p: *mut c_void) -> Option<u64> {
    if !live::may_contain(p) {
        return None;
    }
    forget_sampled(p)
}

#[cold]
#[inline(never)]
fn forget_sampled(p: *mut c_void) -> Option<u64> {
    live::remove(p).map(freed)
}

/// A sampled block, just taken out of the live table, is freed: its free goes to its bucket
/// (if it was sampled in this process). Its recorded size.
fn freed(sampled: live::Sampled) -> u64 {
    if let Some(bucket) = sampled.bucket() {
        buckets::add_free(bucket, sampled.size());
    }
    sampled.size()
}

/// `malloc`.
#[inline(always)]
pub fn malloc(size: usize) -> *mut c_void {
    let p = real::malloc(size);
    if p.is_null() {
        return p;
    }
    on_alloc(p, MALLOC)
}

/// `free`: the fast path has no call but the tail call to the next allocator's, and reads
/// nothing but the thread's fast word, the block's header and the thread's counter.
#[inline(always)]
pub fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    let b = tls::current();
    let Some(slot) = counters::free_fast_slot(b) else {
        return free_not_fast(b, p);
    };
    let Some(chunk) = real::glibc_small_chunk(real::glibc_size_field(p), SMALL_LIMIT) else {
        return free_any_allocator(slot, p);
    };
    // Not sampled: small blocks are never in the live table while the free path is open.
    counters::count_glibc_small(slot, chunk, false);
    real::free_glibc(p);
}

/// [`free`] for a thread whose free fast path is closed: it runs our own code, has no slot,
/// its slot is not marked for glibc headers, or small blocks may be sampled.
#[inline(never)]
extern "C" fn free_not_fast(b: &ThreadBlock, p: *mut c_void) {
    if b.internal.get() != 0 {
        return real::free(p);
    }
    match counters::own_slot(b) {
        Some(slot) => {
            // Nothing to gain when only the free path is closed because small blocks are
            // tracked (a rate below PROMOTE_MIN_RATE): that does not change.
            if b.fast.get() & counters::FAST_ALLOC == 0 || small_blocks_untracked() {
                counters::upgrade(b);
            }
            free_any_allocator(slot, p)
        }
        None => free_without_slot(b, p),
    }
}

/// [`free`] for other sizes, or when the block size must be asked from the allocator, or
/// when the block may have been sampled.
#[inline(never)]
extern "C" fn free_any_allocator(slot: &'static anyprof_wire::shared::AllocSlot, p: *mut c_void) {
    counters::count_owned(slot, size_at_free(p), false);
    real::free(p);
}

/// `free` by a thread without a slot of its own.
#[cold]
#[inline(never)]
extern "C" fn free_without_slot(b: &ThreadBlock, p: *mut c_void) {
    count_free_without_slot(b, p);
    real::free(p);
}

/// `calloc`.
#[inline(always)]
pub fn calloc(n: usize, size: usize) -> *mut c_void {
    let p = real::calloc(n, size);
    if p.is_null() {
        return p;
    }
    on_alloc(p, KEEP)
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
    // Asked before the real realloc, which may free the old block.
    let old_usable = usable_size_guarded(old);
    let sampled = if live::may_contain(old) {
        live::remove(old)
    } else {
        None
    };
    let p = real::realloc(old, size);
    if p.is_null() && size != 0 {
        // Failed: the old block is still live, and still sampled.
        if let Some(sampled) = sampled {
            let errno = sys::errno();
            if !live::reinsert(old, sampled) {
                // Cannot happen short of another thread filling the slot just freed. It
                // leaves the table: count it as freed at its recorded size and allocated
                // again at its real one, so that the counters stay balanced.
                count_lost(LOST_LIVE_TABLE);
                counters::on_free(b, sampled.size());
                counters::on_alloc(b, real::usable_size_of_live(old) as u64);
            }
            sys::set_errno(errno);
        }
        return p;
    }
    // Counted with the size it was counted with when allocated (a promoted block's is its
    // recorded size); a realloc to 0 has freed it.
    counters::on_free(b, sampled.map_or(old_usable, freed));
    if p.is_null() {
        return p;
    }
    on_alloc(p, KEEP)
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
    if p.is_null() {
        return p;
    }
    on_alloc(p, Origin::aligned(align))
}

/// `aligned_alloc`.
pub fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    let p = real::aligned_alloc(align, size);
    if p.is_null() {
        return p;
    }
    on_alloc(p, Origin::aligned(align))
}

/// `posix_memalign`.
pub fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> libc::c_int {
    let rc = real::posix_memalign(out, align, size);
    if rc == 0 && !out.is_null() {
        // SAFETY: on success posix_memalign stored the block through the caller's pointer.
        let p = unsafe { *out };
        if !p.is_null() {
            let block = on_alloc(p, Origin::aligned(align));
            // SAFETY: the same caller's pointer, just written through by posix_memalign.
            unsafe { *out = block };
        }
    }
    rc
}

/// The alignment of `valloc` and `pvalloc` blocks (x86_64 pages).
const PAGE: usize = 4096;

/// `valloc`.
pub fn valloc(size: usize) -> *mut c_void {
    let p = real::valloc(size);
    if p.is_null() {
        return p;
    }
    on_alloc(p, Origin::aligned(PAGE))
}

/// `pvalloc`.
pub fn pvalloc(size: usize) -> *mut c_void {
    let p = real::pvalloc(size);
    if p.is_null() {
        return p;
    }
    on_alloc(p, Origin::aligned(PAGE))
}

/// `malloc_usable_size`: for a sampled block, its size when it was sampled (a promoted
/// block is larger, but the program may use only what it was given).
pub fn malloc_usable_size(p: *mut c_void) -> usize {
    if !p.is_null() && live::may_contain(p) {
        if let Some(size) = live::size_of(p) {
            return size as usize;
        }
    }
    real::usable_size(p)
}
