//! The perf CPU source, the handler's side: which thread has which perf `cpu-clock` event, in
//! a table of [`Slot`]s the handler can read without a lock. The events themselves are
//! opened, armed and ended by the cdylib's `perf_events` module (std world); see there for
//! how an event is kept alive without a descriptor.
//!
//! # A fair first sample
//! A new event's first overflow comes one full period after it starts, so a thread that runs
//! for less than a period would never be sampled. Each thread therefore starts with a
//! *one-shot* event whose period is drawn uniformly over one period; its signal carries
//! `POLL_HUP`. That first sample stands for one period: a thread using `t` < one period of CPU
//! is sampled with probability `t / period`, so its expected weight is `t`. The handler marks
//! the slot [`State::Fired`] and wakes the background thread, which opens the thread's
//! *periodic* event (`POLL_IN`) and ends the one-shot one. Each later sample weighs the
//! thread CPU time since its previous one, so the moment between the two events is counted
//! too.
//!
//! # Slots
//! A slot is one word packing the event mapping's address, the tid and the [`State`]. The
//! cdylib claims, fills, promotes and releases slots under its own lock; the handler only
//! ever moves its own thread's slot from [`State::OneShot`] to [`State::Fired`], with a
//! compare-and-swap, and records its thread's CPU time at each sample (for the watchdog that
//! finds threads running with the signal blocked).
//!
//! World: signal world ([`on_first_sample`], [`note_sample`], [`in_use`]); the rest is called by
//! the cdylib from thread start and exit, the constructor and the background thread. None of
//! it makes a system call.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::thread_state;
use crate::tls;

/// `si_code` of a periodic event's signal.
pub const POLL_IN: libc::c_int = 1;
/// `si_code` of a one-shot event's signal (its last overflow).
pub const POLL_HUP: libc::c_int = 6;

/// True once threads have been given perf events: from then on the handler takes
/// `POLL_IN`/`POLL_HUP` signals for ours (and still does after sampling stops, so that a
/// signal already queued never reaches the program's handler).
static IN_USE: AtomicBool = AtomicBool::new(false);

/// Whether the perf source was ever used (see [`start_using`]).
#[inline]
pub fn in_use() -> bool {
    IN_USE.load(Ordering::Relaxed)
}

/// Marks the perf source as used.
pub fn start_using() {
    IN_USE.store(true, Ordering::Release);
}

/// The number of threads that can have an event at once. The queue of signals of a thread
/// that blocks ours is bounded by the watchdog; this bounds how many such queues there are
/// (and the locked memory the mappings take from the user's perf budget). Threads beyond it
/// get timers.
pub const SLOT_COUNT: usize = 256;

/// Where a thread's events are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The one-shot event is armed (or about to be: address 0 while it is being opened).
    OneShot,
    /// The one-shot event fired; the background thread is to open the periodic one.
    Fired,
    /// The periodic event runs.
    Periodic,
}

/// A slot's contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Address of the event's one-page mapping (0 while it is being opened).
    pub addr: usize,
    /// The thread it samples.
    pub tid: u32,
    /// Which event it is.
    pub state: State,
}

const TID_BITS: u32 = 22; // pid_max is at most 2^22
const STATE_SHIFT: u32 = 61;

impl Event {
    fn pack(self) -> u64 {
        let state = match self.state {
            State::OneShot => 1u64,
            State::Fired => 2,
            State::Periodic => 3,
        };
        (state << STATE_SHIFT)
            | ((self.addr as u64 >> 12) << TID_BITS)
            | u64::from(self.tid & ((1 << TID_BITS) - 1))
    }

    /// None for 0, a free slot.
    fn unpack(w: u64) -> Option<Event> {
        let state = match w >> STATE_SHIFT {
            1 => State::OneShot,
            2 => State::Fired,
            3 => State::Periodic,
            _ => return None,
        };
        Some(Event {
            addr: (((w & ((1 << STATE_SHIFT) - 1)) >> TID_BITS) << 12) as usize,
            tid: (w & ((1 << TID_BITS) - 1)) as u32,
            state,
        })
    }
}

/// One thread's event.
struct Slot {
    /// 0 when free; else an [`Event`] packed.
    word: AtomicU64,
    /// The thread's CPU time (ns) at its latest sample, for the watchdog.
    sampled_cpu_ns: AtomicU64,
}

static SLOTS: [Slot; SLOT_COUNT] = [const {
    Slot {
        word: AtomicU64::new(0),
        sampled_cpu_ns: AtomicU64::new(0),
    }
}; SLOT_COUNT];

/// Gives thread `tid` a slot, before its one-shot event exists: the event may fire (and its
/// handler look for the slot) as soon as it is armed. None when every slot is taken.
pub fn claim(tid: u32) -> Option<usize> {
    let word = Event {
        addr: 0,
        tid,
        state: State::OneShot,
    }
    .pack();
    let index = SLOTS.iter().position(|s| {
        s.word
            .compare_exchange(0, word, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })?;
    if let Some(slot) = SLOTS.get(index) {
        slot.sampled_cpu_ns.store(0, Ordering::Relaxed);
    }
    Some(index)
}

/// Puts the address of thread `tid`'s one-shot event in the slot [`claim`] gave it, whether
/// or not the event fired meanwhile. False if the slot is no longer the thread's (the caller
/// then ends the event).
pub fn fill(index: usize, tid: u32, addr: usize) -> bool {
    let Some(slot) = SLOTS.get(index) else {
        return false;
    };
    let mut current = slot.word.load(Ordering::Acquire);
    loop {
        let Some(event) = Event::unpack(current) else {
            return false;
        };
        if event.tid != tid || event.addr != 0 || event.state == State::Periodic {
            return false;
        }
        let filled = Event { addr, ..event }.pack();
        match slot
            .word
            .compare_exchange(current, filled, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return true,
            Err(now) => current = now,
        }
    }
}

/// Frees slot `index` and returns what it held; the caller ends that event.
pub fn take(index: usize) -> Option<Event> {
    Event::unpack(SLOTS.get(index)?.word.swap(0, Ordering::AcqRel))
}

/// Replaces the fired one-shot event `fired` in slot `index` by the periodic event at
/// `periodic`. False if the slot changed meanwhile (the caller then ends the periodic event;
/// otherwise it ends the one-shot one).
pub fn promote(index: usize, fired: Event, periodic: usize) -> bool {
    let next = Event {
        addr: periodic,
        state: State::Periodic,
        ..fired
    };
    SLOTS.get(index).is_some_and(|s| {
        s.word
            .compare_exchange(
                fired.pack(),
                next.pack(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
    })
}

/// Every slot in use, as (slot, event), into `out`; returns how many.
pub fn events(out: &mut [(usize, Event)]) -> usize {
    let mut n = 0;
    for (i, slot) in SLOTS.iter().enumerate() {
        if let (Some(event), Some(o)) = (
            Event::unpack(slot.word.load(Ordering::Acquire)),
            out.get_mut(n),
        ) {
            *o = (i, event);
            n += 1;
        }
    }
    n
}

/// The thread CPU time (ns) at slot `index`'s latest sample (0 before any).
pub fn sampled_cpu_ns(index: usize) -> u64 {
    SLOTS
        .get(index)
        .map_or(0, |s| s.sampled_cpu_ns.load(Ordering::Relaxed))
}

/// In a forked child: the parent's events were not copied, so every slot is simply free.
pub fn forget_all_in_child() {
    for slot in &SLOTS {
        slot.word.store(0, Ordering::Relaxed);
    }
    tls::current().perf_slot.set(0);
}

/// Signal world: the calling thread's one-shot event fired and its sample was taken at
/// thread CPU time `cpu_ns`. Marks the slot fired and wakes the background thread, which
/// opens the periodic event. A signal that matches no one-shot slot of this thread (its event
/// was released meanwhile) changes nothing.
pub fn on_first_sample(cpu_ns: u64) {
    let me = thread_state::tid();
    for (index, slot) in SLOTS.iter().enumerate() {
        let mut w = slot.word.load(Ordering::Acquire);
        // Retried while the word changes under us: `fill` may put the one-shot event's
        // address in between (the event can fire before its opener filled the slot).
        while let Some(event) = Event::unpack(w) {
            if event.tid != me || event.state != State::OneShot {
                break;
            }
            slot.sampled_cpu_ns.store(cpu_ns, Ordering::Relaxed);
            let fired = Event {
                state: State::Fired,
                ..event
            }
            .pack();
            match slot
                .word
                .compare_exchange(w, fired, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    tls::current().perf_slot.set(index as u16 + 1);
                    super::unwinder::wake_background_thread();
                    return;
                }
                Err(now) => w = now,
            }
        }
    }
}

/// Signal world: a periodic event's sample was taken at thread CPU time `cpu_ns`. (A slot
/// that has passed to another thread since is left alone.)
pub fn note_sample(cpu_ns: u64) {
    let index = tls::current().perf_slot.get();
    let Some(slot) = usize::from(index).checked_sub(1).and_then(|i| SLOTS.get(i)) else {
        return;
    };
    let mine = Event::unpack(slot.word.load(Ordering::Acquire))
        .is_some_and(|e| e.tid == thread_state::tid());
    if mine {
        slot.sampled_cpu_ns.store(cpu_ns, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_keeps_address_tid_and_state() {
        for (addr, tid, state) in [
            (0x7fff_ffff_f000usize, (1u32 << 22) - 1, State::Periodic),
            (0x7f12_3456_7000, 1, State::OneShot),
            (0, 4_194_303, State::Fired),
        ] {
            let e = Event { addr, tid, state };
            assert_eq!(Event::unpack(e.pack()), Some(e));
            assert_ne!(e.pack(), 0);
        }
        assert_eq!(Event::unpack(0), None);
    }
}
