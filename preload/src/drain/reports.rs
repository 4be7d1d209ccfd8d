//! What the background thread sends, kind by kind (background-thread world): module
//! changes, CPU and thread-dump samples, thread-creation stacks, heap buckets and allocator
//! counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyprof_wire::{
    self as wire, BucketCounts, Counter, HeapBatch, MemStat, SampleBatch, MEM_STAT_COUNT,
};

use super::thread::MODULES;
use super::transport::send;
use crate::alloc::{buckets, counters as alloc_counters, hooks, live};
use crate::counters;
use crate::signal::ring;

/// Brings the module map (and the unwinder) up to date and sends what changed; false if the
/// map was busy (nothing done).
pub fn send_module_changes(buf: &mut [u8], patient: bool) -> bool {
    let Ok(mut map) = MODULES.try_lock() else {
        return false;
    };
    let changes = map.refresh();
    if !changes.added.is_empty() || !changes.removed.is_empty() {
        // The unwinder knows the new set of objects: a hook's next truncated stack may wake
        // us again. (Kept set otherwise, so that a stack that is always truncated, through
        // JIT code, does not wake us on every sample.)
        let _ = anyprof_preload_core::signal::unwinder::take_catch_up_request();
    }
    for id in changes.removed {
        if let Some(n) = wire::encode_module_unloaded(buf, id) {
            if !send(buf.get(..n).unwrap_or(&[]), patient) {
                counters::bump(Counter::DroppedModules);
            }
        }
    }
    for i in changes.added {
        let Some(m) = map.modules.get(i) else {
            continue;
        };
        if let Some(n) = wire::encode_module_loaded(buf, &m.info()) {
            if !send(buf.get(..n).unwrap_or(&[]), patient) {
                counters::bump(Counter::DroppedModules);
            }
        }
    }
    true
}

/// Sends the thread-creation stacks if they changed since last sent.
pub fn send_thread_creates(buf: &mut [u8], patient: bool) {
    static SENT_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let generation = crate::threads::creations_generation();
    if generation == SENT_GENERATION.load(Ordering::Relaxed) {
        return;
    }
    let stacks = crate::threads::creations();
    if let Some(n) =
        wire::encode_thread_creates(buf, stacks.iter().map(|(f, c)| (*c, f.as_slice())))
    {
        if send(buf.get(..n).unwrap_or(&[]), patient) {
            SENT_GENERATION.store(generation, Ordering::Relaxed);
        }
    }
}

pub fn send_samples(buf: &mut [u8], patient: bool) {
    let mut pending: Vec<ring::Record> = Vec::new();
    ring::drain(|r| pending.push(*r));
    let mut rest = pending.as_slice();
    while !rest.is_empty() {
        let mut batch = SampleBatch::new(buf);
        let mut taken = 0;
        for r in rest {
            if !batch.push(r.tid, r.flags, r.time_ns, r.cpu_ns, r.frames()) {
                break;
            }
            taken += 1;
        }
        if taken == 0 {
            break;
        }
        let (count, len) = (batch.count(), batch.len());
        if !send(buf.get(..len).unwrap_or(&[]), patient) {
            counters::add(Counter::DroppedSend, u64::from(count));
        }
        rest = rest.get(taken..).unwrap_or(&[]);
    }
}

/// Counts last sent, by bucket position; `None` = frames not sent yet.
static SENT: Mutex<Vec<Option<BucketCounts>>> = Mutex::new(Vec::new());
static PEAK_LIVE: AtomicU64 = AtomicU64::new(0);

/// Sends every bucket whose counts changed since it was last sent (with its frames the
/// first time).
pub fn send_changed_buckets(buf: &mut [u8], patient: bool) {
    let Ok(mut sent) = SENT.try_lock() else {
        return;
    };
    let mut pending = Vec::new();
    for n in 0..buckets::created() {
        let Some((id, size, counts, frames)) = buckets::get(n) else {
            break;
        };
        let previous = sent.get(n).copied().flatten();
        if previous != Some(counts) {
            let frames = if previous.is_none() { frames } else { &[][..] };
            pending.push((n, id, size, counts, frames));
        }
    }
    let mut rest = pending.as_slice();
    while !rest.is_empty() {
        let mut batch = HeapBatch::new(buf);
        let taken = rest
            .iter()
            .take_while(|(_, id, size, c, f)| batch.push(*id, *size, c, f))
            .count();
        let len = batch.len();
        if taken == 0 || !send(buf.get(..len).unwrap_or(&[]), patient) {
            return; // unsent buckets stay "changed" and go out on a later cycle
        }
        for &(n, _, _, counts, _) in rest.iter().take(taken) {
            if sent.len() <= n {
                sent.resize(n + 1, None);
            }
            if let Some(slot) = sent.get_mut(n) {
                *slot = Some(counts);
            }
        }
        rest = rest.get(taken..).unwrap_or(&[]);
    }
}

/// Forgets what was sent (a new connection knows nothing).
pub fn forget_sent() {
    if let Ok(mut sent) = SENT.lock() {
        sent.clear();
    }
}

/// Records the highest live-bytes figure seen (checked every drain cycle).
pub fn track_peak() {
    PEAK_LIVE.fetch_max(alloc_counters::live_bytes(), Ordering::Relaxed);
}

/// Sends the exact counters, the size histogram, RSS and the profiler's own footprint.
pub fn send_mem_stats(buf: &mut [u8], patient: bool) {
    let t = alloc_counters::totals();
    let mut fields = [0u64; MEM_STAT_COUNT];
    let mut set = |f: MemStat, v: u64| {
        if let Some(x) = fields.get_mut(f as usize) {
            *x = v;
        }
    };
    set(MemStat::Mallocs, t.mallocs);
    set(MemStat::Frees, t.frees);
    set(MemStat::AllocBytes, t.alloc_bytes);
    set(MemStat::FreeBytes, t.free_bytes);
    set(
        MemStat::PeakLiveBytes,
        PEAK_LIVE.load(Ordering::Relaxed).max(t.live_bytes()),
    );
    // RSS is read by the collector from /proc/PID/statm: no file is opened here.
    set(MemStat::RssBytes, 0);
    set(MemStat::MaxRssBytes, max_rss_bytes());
    set(MemStat::LiveTableFull, hooks::lost(MemStat::LiveTableFull));
    set(MemStat::BucketsFull, hooks::lost(MemStat::BucketsFull));
    set(
        MemStat::ProfilerBytes,
        (buckets::FOOTPRINT + live::FOOTPRINT) as u64,
    );
    if let Some(n) = wire::encode_mem_stats(buf, &fields, &t.class_mallocs, &t.class_frees) {
        send(buf.get(..n).unwrap_or(&[]), patient);
    }
}

fn max_rss_bytes() -> u64 {
    // SAFETY: a zeroed rusage is a valid out-buffer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    ru.ru_maxrss.max(0) as u64 * 1024
}
