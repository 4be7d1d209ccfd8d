//! The fixed ring of sample slots between the signal handler (many writers, one per thread
//! being sampled) and the background thread (the only reader).
//!
//! # Who writes, who reads, what happens when full
//! - A writer claims a slot by moving its state `FREE → WRITING` with a compare-exchange,
//!   starting at a rotating index and probing a few neighbours. It fills the slot and
//!   publishes it with `WRITING → READY` (release).
//! - The reader scans every slot; for each `READY` slot (acquire) it copies the record out
//!   and frees it with `READY → FREE` (release). Samples carry their own timestamp, so the
//!   order in which the reader finds them does not matter.
//! - If no free slot is found the sample is dropped and counted
//!   ([`anyprof_wire::Counter::DroppedRingFull`]); the profile shows the loss.
//!
//! Storage is a `static` array (about 0.5 MiB of `.bss`, paged in only when used), so the ring
//! needs no allocation and exists before the constructor runs.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use anyprof_wire::MAX_FRAMES;

/// Number of slots: 5 s of samples for 100 threads at 100 Hz before the reader must run.
pub const SLOTS: usize = 512;
/// How many neighbouring slots a writer tries before dropping.
const PROBES: usize = 8;

const FREE: u32 = 0;
const WRITING: u32 = 1;
const READY: u32 = 2;

/// One sample as recorded by the handler.
#[derive(Clone, Copy)]
pub struct Record {
    /// Thread id.
    pub tid: u32,
    /// `anyprof_wire::FLAG_*` bits.
    pub flags: u8,
    /// Number of valid entries in `frames`.
    pub len: u16,
    /// CLOCK_MONOTONIC, ns.
    pub time_ns: u64,
    /// Thread CPU time this sample stands for, ns.
    pub cpu_ns: u64,
    /// Leaf first: interrupted PC, then return addresses.
    pub frames: [u64; MAX_FRAMES],
}

impl Record {
    const EMPTY: Record = Record {
        tid: 0,
        flags: 0,
        len: 0,
        time_ns: 0,
        cpu_ns: 0,
        frames: [0; MAX_FRAMES],
    };

    /// The valid frames.
    pub fn frames(&self) -> &[u64] {
        let n = (self.len as usize).min(MAX_FRAMES);
        self.frames.get(..n).unwrap_or(&[])
    }
}

struct Slot {
    state: AtomicU32,
    record: UnsafeCell<Record>,
}

struct Ring {
    slots: [Slot; SLOTS],
    next: AtomicUsize,
}

// SAFETY: access to each slot's record is serialised by its `state` (see the module doc):
// only the thread that moved it to WRITING writes it, only the reader that saw READY reads it.
unsafe impl Sync for Ring {}

static RING: Ring = Ring {
    slots: [const {
        Slot {
            state: AtomicU32::new(FREE),
            record: UnsafeCell::new(Record::EMPTY),
        }
    }; SLOTS],
    next: AtomicUsize::new(0),
};

/// A claimed slot; publish it with [`Claim::publish`] or give it back by dropping.
pub struct Claim {
    slot: &'static Slot,
    published: bool,
}

impl Claim {
    /// The record to fill in.
    pub fn record(&mut self) -> &mut Record {
        // SAFETY: this claim moved the slot to WRITING, so no one else touches the record
        // until `publish` or `drop` changes the state again.
        unsafe { &mut *self.slot.record.get() }
    }

    /// Makes the record visible to the reader.
    pub fn publish(mut self) {
        self.published = true;
        self.slot.state.store(READY, Ordering::Release);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.published {
            self.slot.state.store(FREE, Ordering::Release);
        }
    }
}

/// Claims a free slot, or `None` when the ring is full around the rotating index.
#[inline]
pub fn claim() -> Option<Claim> {
    let start = RING.next.fetch_add(1, Ordering::Relaxed);
    for i in 0..PROBES {
        let slot = RING.slots.get(start.wrapping_add(i) % SLOTS)?;
        if slot
            .state
            .compare_exchange(FREE, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Some(Claim {
                slot,
                published: false,
            });
        }
    }
    None
}

/// Calls `f` with every ready record and frees the slots. Must only be called by one thread
/// at a time (the reader); see [`crate::drain`] for how that is ensured.
pub fn drain(mut f: impl FnMut(&Record)) -> usize {
    let mut n = 0;
    for slot in RING.slots.iter() {
        if slot.state.load(Ordering::Acquire) == READY {
            // SAFETY: READY means the writer is done and no other writer can claim the slot
            // until we store FREE below; the caller guarantees a single reader.
            let record = unsafe { &*slot.record.get() };
            f(record);
            slot.state.store(FREE, Ordering::Release);
            n += 1;
        }
    }
    n
}

/// Frees every slot without reading it (in a forked child: the parent's samples are not ours).
pub fn clear() {
    for slot in RING.slots.iter() {
        slot.state.store(FREE, Ordering::Release);
    }
}
