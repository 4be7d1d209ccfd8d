//! The heap profile's buckets: one per (allocation stack, usable size), with cumulative counts
//! of sampled allocations and frees — Go's `runtime.MemProfileRecord`, aggregated in the
//! process so that even `RATE=1` (every allocation) loses nothing to a full buffer.
//!
//! # Structure
//! A fixed open-addressing table of [`CAPACITY`] buckets plus a frame arena, in the shared
//! region ([`crate::region::SHARED`]; pages become resident only when used), where the
//! collector reads them after a sudden death (the heap at the moment of an OOM kill). Lookup hashes the stack and size and probes linearly.
//! Insertion claims an empty bucket with a compare-exchange to a "being written" marker,
//! writes size and frames, then publishes the hash (release). A reader that meets a bucket
//! being written treats it as a mismatch and probes on: at worst one stack gets two buckets,
//! which the collector merges. Nothing ever waits.
//!
//! Buckets are never removed. A full table or arena drops the sample and counts it
//! ([`anyprof_wire::MemStat::BucketsFull`]).

use core::sync::atomic::Ordering;

use anyprof_wire::shared::{
    Bucket, BucketTable, ARENA_FRAMES, BUCKETS as CAPACITY, BUCKET_EMPTY as EMPTY,
    BUCKET_WRITING as WRITING,
};
use anyprof_wire::{BucketCounts, MAX_FRAMES};

const MAX_PROBES: usize = 64;

/// The table, in the shared region. A bucket's plain fields and its arena range are written
/// only by the thread that moved its hash from EMPTY to WRITING, before it publishes the real
/// hash with release; readers read them only after an acquire load of a published hash.
#[inline(always)]
fn table() -> &'static BucketTable {
    &crate::region::SHARED.buckets
}

fn hash(frames: &[u64], size: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ size.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &f in frames {
        h = (h ^ f).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(23);
    }
    // 0 and 1 are markers.
    h | 2
}

fn frames_of(b: &Bucket) -> &'static [u64] {
    // SAFETY: called only for published buckets (see the Sync note), whose range was
    // written before publication and never changes.
    unsafe {
        let at = *b.frames_at.get() as usize;
        let len = *b.frames_len.get() as usize;
        let arena = &*table().arena.get();
        arena.get(at..at + len).unwrap_or(&[])
    }
}

/// Finds or creates the bucket of (`frames`, `size`); returns its index.
pub fn intern(frames: &[u64], size: u64) -> Option<u32> {
    let frames = frames.get(..frames.len().min(MAX_FRAMES)).unwrap_or(frames);
    let h = hash(frames, size);
    for probe in 0..MAX_PROBES {
        let idx = (h as usize).wrapping_add(probe) % CAPACITY;
        let b = table().buckets.get(idx)?;
        let current = b.hash.load(Ordering::Acquire);
        if current == h {
            // SAFETY: published bucket (acquire above).
            let same_size = unsafe { *b.size.get() } == size;
            if same_size && frames_of(b) == frames {
                return Some(idx as u32);
            }
            continue;
        }
        if current != EMPTY {
            continue;
        }
        if b.hash
            .compare_exchange(EMPTY, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        let at = table()
            .arena_used
            .fetch_add(frames.len() as u32, Ordering::Relaxed) as usize;
        if at + frames.len() > ARENA_FRAMES {
            // Leave the bucket claimed but unusable: it will never match.
            return None;
        }
        // SAFETY: this thread owns the bucket (WRITING) and the arena range [at, at+len)
        // handed out by the atomic bump above.
        unsafe {
            let arena = &mut *table().arena.get();
            if let Some(dst) = arena.get_mut(at..at + frames.len()) {
                dst.copy_from_slice(frames);
            }
            *b.size.get() = size;
            *b.frames_at.get() = at as u32;
            *b.frames_len.get() = frames.len() as u16;
        }
        b.hash.store(h, Ordering::Release);
        let pos = table().order_claimed.fetch_add(1, Ordering::Relaxed) as usize;
        if let Some(o) = table().order.get(pos) {
            o.store(idx as u32 + 1, Ordering::Release);
        }
        return Some(idx as u32);
    }
    None
}

/// Counts a sampled allocation of `bytes` in bucket `idx`.
pub fn add_alloc(idx: u32, bytes: u64) {
    if let Some(b) = table().buckets.get(idx as usize) {
        b.alloc_objects.fetch_add(1, Ordering::Relaxed);
        b.alloc_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Counts a free of a sampled allocation of `bytes` from bucket `idx`.
pub fn add_free(idx: u32, bytes: u64) {
    if let Some(b) = table().buckets.get(idx as usize) {
        b.free_objects.fetch_add(1, Ordering::Relaxed);
        b.free_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Number of bucket positions handed out so far (some may not be readable yet).
pub fn created() -> usize {
    (table().order_claimed.load(Ordering::Acquire) as usize).min(CAPACITY)
}

/// Reads bucket number `n` in creation order: its id, size, counts and frames; `None` if
/// that position is not written yet (try again later) or out of range.
pub fn get(n: usize) -> Option<(u32, u64, BucketCounts, &'static [u64])> {
    let idx = table()
        .order
        .get(n)?
        .load(Ordering::Acquire)
        .checked_sub(1)?;
    let b = table().buckets.get(idx as usize)?;
    if b.hash.load(Ordering::Acquire) <= WRITING {
        return None;
    }
    let counts = BucketCounts {
        alloc_objects: b.alloc_objects.load(Ordering::Relaxed),
        alloc_bytes: b.alloc_bytes.load(Ordering::Relaxed),
        free_objects: b.free_objects.load(Ordering::Relaxed),
        free_bytes: b.free_bytes.load(Ordering::Relaxed),
    };
    // SAFETY: published bucket (acquire above).
    let size = unsafe { *b.size.get() };
    Some((idx, size, counts, frames_of(b)))
}

/// Bytes of memory the table occupies when full (for the profiler's own overhead report).
pub const FOOTPRINT: usize = core::mem::size_of::<BucketTable>();

/// In a forked child whose region was copied only from address `copied_from` on (see
/// the cdylib's `region::into_memfd_for_child`): the table is empty but for what of it lies at
/// or after that address (the end of `order` and the positions); clears that, touching no
/// other page. Single-threaded callers only.
pub fn reset_in_child(copied_from: usize) {
    let t = table();
    t.arena_used.store(0, Ordering::Relaxed);
    t.order_claimed.store(0, Ordering::Relaxed);
    for o in t.order.iter().rev() {
        if (o as *const _ as usize) < copied_from {
            break;
        }
        o.store(0, Ordering::Relaxed);
    }
}
