//! The fixed ring of sample slots between the signal handler (many writers, one per thread
//! being sampled) and one reader at a time: the background thread, whoever flushes at exit,
//! or the collector (which reads a process without our thread, and what a process left at
//! its death), kept apart by the `sample_reader` lock in the shared header.
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
//! Storage is part of the shared region ([`crate::region::SHARED`]: `.bss` at first, then a
//! memfd the collector maps too, paged in only when used), so the ring needs no allocation,
//! exists before the constructor runs, and can be read by the collector after the process
//! died (it takes the `READY` slots then).

use core::sync::atomic::Ordering;

use anyprof_wire::shared::{
    lock_samples, unlock_samples, SampleRing, SampleSlot, SAMPLE_FREE as FREE,
    SAMPLE_READER_PROCESS, SAMPLE_READY as READY, SAMPLE_SLOTS as SLOTS, SAMPLE_WRITING as WRITING,
};

/// One sample as recorded by the handler (the layout is shared with the collector).
pub use anyprof_wire::shared::SampleRecord as Record;

/// How many neighbouring slots a writer tries before dropping.
const PROBES: usize = 8;

/// The ring's storage, in the shared region.
#[inline(always)]
fn ring() -> &'static SampleRing {
    &crate::region::SHARED.samples
}

/// A claimed slot; publish it with [`Claim::publish`] or give it back by dropping.
pub struct Claim {
    slot: &'static SampleSlot,
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
    let start = ring().next.fetch_add(1, Ordering::Relaxed) as usize;
    for i in 0..PROBES {
        let slot = ring().slots.get(start.wrapping_add(i) % SLOTS)?;
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

/// Calls `f` with every ready record and frees the slots; returns how many. Reads nothing
/// (returns 0) while the collector is reading the ring: the ring has one reader at a time
/// (`SharedHeader::sample_reader`), and a process without a thread of ours leaves the
/// reading to the collector (see the cdylib's `drain` module). Within the process, one
/// thread at a time calls this (the cdylib's background thread, or whoever flushes).
pub fn drain(f: impl FnMut(&Record)) -> usize {
    let header = &crate::region::SHARED.header;
    if !lock_samples(header, SAMPLE_READER_PROCESS) {
        return 0;
    }
    let n = drain_locked(f);
    unlock_samples(header, SAMPLE_READER_PROCESS);
    n
}

fn drain_locked(mut f: impl FnMut(&Record)) -> usize {
    let mut n = 0;
    for slot in ring().slots.iter() {
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
    for slot in ring().slots.iter() {
        // Only slots in use: a store to a never-touched page would make it resident.
        if slot.state.load(Ordering::Relaxed) != FREE {
            slot.state.store(FREE, Ordering::Release);
        }
    }
}
