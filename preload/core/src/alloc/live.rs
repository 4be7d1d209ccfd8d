//! Which live pointers were sampled, so that their `free` (or `realloc`) is seen.
//!
//! `free` is called as often as `malloc`, and almost never on a sampled pointer. With glibc
//! at the usual rates, the free of a small block does not ask at all: a sampled small block
//! is promoted to a larger one ([`super::hooks`]). Every other free asks with one memory
//! read: a counting filter of one-byte counters indexed by bits of the pointer. A zero
//! counter proves the pointer was not sampled. Only a non-zero counter leads to the table, a
//! lock-free open-addressing map from pointer to (bucket, size).
//!
//! The filter counts rather than flags: glibc hands the same addresses out again and again,
//! and a plain bit that is never cleared would send every later free of a once-sampled
//! address down the slow path. A counter that reaches 255 stays there (a permanent false
//! positive costs a table probe, never a wrong answer).
//!
//! Order matters: a sampled pointer is inserted before `malloc` returns it, and removed
//! before the real `free` runs, so an address cannot be reused while it is in the table.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Table entries (16 bytes each, in `.bss`: resident only where touched).
const CAPACITY: usize = 1 << 20;
/// Filter counters.
/// 64 Ki one-byte counters: small enough to stay in the L2 cache, where the free fast path
/// finds them; with the few thousand pointers sampled at a time the false-positive rate
/// (a table probe) stays at a few percent.
///
/// A counter covers one 16-byte granule of every 1 MiB of address space, unhashed, so that
/// neighbouring blocks share a filter line: frees that walk the heap walk the filter at a
/// sixteenth of the pace instead of touching a random line each. Under cachegrind, CPython
/// with PYTHONMALLOC=malloc took 31 % fewer extra L1 read misses than with a hashed index.
/// Page-aligned (mmapped) blocks fall on 256 of the counters; the few small blocks that share
/// them cost a table probe, as any false positive does.
const FILTER: usize = 1 << 16;
const MAX_PROBES: usize = 128;

const EMPTY: u64 = 0;
const TOMBSTONE: u64 = 1;
/// An entry's value: the process generation it was sampled in (bits 56..), its bucket
/// (bits 40..56; buckets are fewer than 2^16) and its size (bits 0..40).
const SIZE_BITS: u32 = 40;
const BUCKET_BITS: u32 = 16;
const GENERATION_SHIFT: u32 = SIZE_BITS + BUCKET_BITS;
const _: () = assert!(anyprof_wire::shared::BUCKETS <= 1 << BUCKET_BITS);

/// The process generation: 0 in the process that loaded us, one more in each forked child
/// that profiles itself. A child starts with an empty heap profile (its bucket table is new)
/// but keeps its parent's entries: their frees no longer go to a bucket, but they are still
/// counted with the size they were counted with when allocated (a promoted block is larger
/// than that; see [`super::hooks`]).
static GENERATION: AtomicU8 = AtomicU8::new(0);

/// What the table holds for a sampled pointer.
#[derive(Clone, Copy)]
pub struct Sampled(u64);

impl Sampled {
    fn new(bucket: u32, size: u64) -> Sampled {
        let generation = u64::from(GENERATION.load(Ordering::Relaxed));
        Sampled(
            (generation << GENERATION_SHIFT)
                | (u64::from(bucket) & ((1 << BUCKET_BITS) - 1)) << SIZE_BITS
                | size.min((1 << SIZE_BITS) - 1),
        )
    }

    /// Its bucket, if it was sampled in this process (not inherited across a fork).
    pub fn bucket(self) -> Option<u32> {
        let generation = (self.0 >> GENERATION_SHIFT) as u8;
        (generation == GENERATION.load(Ordering::Relaxed))
            .then_some(((self.0 >> SIZE_BITS) & ((1 << BUCKET_BITS) - 1)) as u32)
    }

    /// Its size when it was sampled.
    pub fn size(self) -> u64 {
        self.0 & ((1 << SIZE_BITS) - 1)
    }
}

struct Entry {
    key: AtomicU64,
    value: AtomicU64,
}

/// The table and the filter.
struct Live {
    table: [Entry; CAPACITY],
    counters: [AtomicU8; FILTER],
}

static LIVE: Live = Live {
    table: [const {
        Entry {
            key: AtomicU64::new(EMPTY),
            value: AtomicU64::new(0),
        }
    }; CAPACITY],
    counters: [const { AtomicU8::new(0) }; FILTER],
};

/// In a forked child (one thread) that profiles itself: its parent's entries stay (see
/// [`GENERATION`]), but no longer belong to a bucket of its own.
pub fn start_child_generation() {
    GENERATION.store(
        GENERATION.load(Ordering::Relaxed).wrapping_add(1),
        Ordering::Relaxed,
    );
}

#[inline(always)]
fn mix(p: u64) -> u64 {
    (p >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[inline(always)]
fn counter(p: u64) -> &'static AtomicU8 {
    let i = (p >> 4) as usize % FILTER;
    // `i < FILTER` by construction; the fallback is never taken.
    LIVE.counters.get(i).unwrap_or(&LIVE.counters[0])
}

/// True if `p` may have been sampled (false means certainly not): the free fast path.
#[inline(always)]
pub fn may_contain(p: *mut core::ffi::c_void) -> bool {
    counter(p as u64).load(Ordering::Relaxed) != 0
}

/// Remembers sampled pointer `p` of `size` bytes in bucket `bucket`. False if the table
/// has no room near its slot (the caller counts the loss).
pub fn insert(p: *mut core::ffi::c_void, bucket: u32, size: u64) -> bool {
    reinsert(p, Sampled::new(bucket, size))
}

/// Puts back what [`remove`] took for `p` (a `realloc` that failed). False if there is no
/// room.
pub fn reinsert(p: *mut core::ffi::c_void, sampled: Sampled) -> bool {
    let key = p as u64;
    if key <= TOMBSTONE {
        return false;
    }
    let start = (mix(key) as usize) % CAPACITY;
    for probe in 0..MAX_PROBES {
        let Some(e) = LIVE.table.get((start + probe) % CAPACITY) else {
            return false;
        };
        let cur = e.key.load(Ordering::Relaxed);
        if (cur == EMPTY || cur == TOMBSTONE)
            && e.key
                .compare_exchange(cur, key, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            e.value.store(sampled.0, Ordering::Release);
            let c = counter(key);
            let _ = c.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| v.checked_add(1));
            return true;
        }
    }
    false
}

/// The table entry of sampled pointer `p`, if it is there.
fn entry_of(key: u64) -> Option<&'static Entry> {
    let start = (mix(key) as usize) % CAPACITY;
    for probe in 0..MAX_PROBES {
        let e = LIVE.table.get((start + probe) % CAPACITY)?;
        match e.key.load(Ordering::Acquire) {
            EMPTY => return None,
            cur if cur == key => return Some(e),
            _ => {}
        }
    }
    None
}

/// Forgets `p` if it was sampled; returns what the table held for it.
pub fn remove(p: *mut core::ffi::c_void) -> Option<Sampled> {
    let key = p as u64;
    let e = entry_of(key)?;
    let value = e.value.load(Ordering::Acquire);
    e.key
        .compare_exchange(key, TOMBSTONE, Ordering::AcqRel, Ordering::Relaxed)
        .ok()?;
    let c = counter(key);
    let _ = c.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| {
        if v == u8::MAX {
            None
        } else {
            v.checked_sub(1)
        }
    });
    Some(Sampled(value))
}

/// The recorded size of sampled pointer `p`, if it is in the table.
pub fn size_of(p: *mut core::ffi::c_void) -> Option<u64> {
    let e = entry_of(p as u64)?;
    Some(Sampled(e.value.load(Ordering::Acquire)).size())
}

/// Bytes the table and filter occupy at most.
pub const FOOTPRINT: usize = CAPACITY * 16 + FILTER;
