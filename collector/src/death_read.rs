//! The death read: what a process left in its shared region when it ended (SIGKILL, the OOM
//! killer, a crash, an exec), turned into ordinary wire messages.
//!
//! After the last read of the message ring, the collector copies out of the region:
//! - every READY sample slot (samples the signal handler finished but the process never
//!   sent) → `CpuSamples`;
//! - every published heap bucket, with its frames and absolute counts → `HeapBuckets` (the
//!   session takes bucket counts as absolute, so a bucket the process had sent already is
//!   simply brought up to date; this is what shows the live heap at death);
//! - the event counters → `Counters`;
//! - the allocator counter slots, summed → `MemStats` (fields the region does not hold, such
//!   as the peak RSS, keep the process's last report).
//!
//! They are built with the wire encoders and go through `decode` and `Session::apply` like
//! anything the process sent, with the same limits.
//!
//! # Trust
//! The region was written by the process, possibly a hostile one, and may still be written
//! while we read it (a process that `exec`ed is gone, but a hostile peer could share the
//! memfd). Every value is copied with an atomic or volatile read before it is used, every
//! index and range is checked against the layout's bounds, and a value out of range skips
//! that item (counted in [`Report::corrupt`]); nothing here can panic or read outside the
//! region.
//!
//! What is lost at death: samples a handler was writing (WRITING) at the kill, and
//! allocations inside a hook at that moment.

use std::cell::UnsafeCell;
use std::sync::atomic::Ordering;

use anyprof_wire::shared::{
    Shared, ALLOC_SLOTS, ARENA_FRAMES, BUCKETS, BUCKET_WRITING, SAMPLE_FREE, SAMPLE_READY,
};
use anyprof_wire::{
    self as wire, BucketCounts, HeapBatch, Kind, Level, MemStat, MemStats, SampleBatch,
    COUNTER_COUNT, MAX_FRAMES, MAX_MESSAGE, MEM_STAT_COUNT, SIZE_CLASSES,
};

use crate::ingest::Session;

/// What a death read found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Samples read from READY slots.
    pub samples: u64,
    /// Heap buckets read (those with any count).
    pub buckets: u64,
    /// Items skipped because they held values the process never writes.
    pub corrupt: u64,
}

/// Reads the region and hands each message that carries what it holds to `emit`, as it is
/// built (so that a full table costs one message of memory, not the table's size); stops
/// when `emit` returns false. `last_mem_stats` is the process's last allocator report, whose
/// fields the region does not hold (peak RSS, lost-sample counts) are kept; `rss` is the
/// collector's last reading of the process's RSS (0 if none), which stands for its RSS at
/// death.
pub fn read(
    shared: &Shared,
    last_mem_stats: Option<&MemStats>,
    rss: u64,
    emit: &mut dyn FnMut(&[u8]) -> bool,
) -> Report {
    let mut report = Report::default();
    if !read_samples(shared, emit, &mut report) || !read_buckets(shared, emit, &mut report) {
        return report;
    }
    let counters: Vec<u64> = (shared.counters.iter().take(COUNTER_COUNT))
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let mut buf = vec![0u8; MAX_MESSAGE];
    if let Some(n) = wire::encode_counters(&mut buf, Kind::Counters, &counters) {
        if !emit(buf.get(..n).unwrap_or(&[])) {
            return report;
        }
    }
    emit(&mem_stats(shared, last_mem_stats, rss));
    report
}

/// Reads the region into `session`: every message goes through `decode` and
/// `Session::apply`; the read stops at the first message that does not decode or that puts
/// the session over its limits (recorded as its error).
pub fn read_into(
    shared: &Shared,
    session: &mut Session,
    rss: u64,
    log: &mut dyn FnMut(Level, &str),
) -> Report {
    let last = session.mem_stats.clone();
    read(shared, last.as_ref(), rss, &mut |m| match wire::decode(m) {
        Ok(msg) => {
            session.apply(msg, log);
            match session.over_limits() {
                Some(why) => {
                    session.error = Some(why);
                    false
                }
                None => true,
            }
        }
        Err(e) => {
            session.error = Some(format!("death read: {e}"));
            false
        }
    })
}

/// Copies a plain value out of an `UnsafeCell` in the region.
///
/// # Safety
/// `cell` lies inside a live mapping of the region. (The value may be changing under us:
/// `T` must be plain data valid for any bit pattern.)
unsafe fn copy<T: Copy>(cell: &UnsafeCell<T>) -> T {
    // SAFETY: the caller guarantees the mapping; a volatile read of plain integers yields
    // some value even if another process writes it at the same time.
    unsafe { std::ptr::read_volatile(cell.get()) }
}

fn read_samples(shared: &Shared, emit: &mut dyn FnMut(&[u8]) -> bool, report: &mut Report) -> bool {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut records = Vec::new();
    for slot in shared.samples.slots.iter() {
        if slot.state.load(Ordering::Acquire) != SAMPLE_READY {
            continue;
        }
        // SAFETY: the slot lies in the mapped region; SampleRecord is integers only.
        let r = unsafe { copy(&slot.record) };
        // Freed, so that a second read (a session ended twice) does not count it again.
        let _ = slot.state.compare_exchange(
            SAMPLE_READY,
            SAMPLE_FREE,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        if usize::from(r.len) > MAX_FRAMES {
            report.corrupt += 1;
            continue;
        }
        records.push(r);
    }
    let mut rest = records.as_slice();
    while !rest.is_empty() {
        let mut batch = SampleBatch::new(&mut buf);
        let taken = rest
            .iter()
            .take_while(|r| batch.push(r.tid, r.flags, r.time_ns, r.cpu_ns, r.frames()))
            .count();
        let len = batch.len();
        if taken == 0 {
            break; // cannot happen: one record of MAX_FRAMES frames fits a message
        }
        report.samples += taken as u64;
        if !emit(buf.get(..len).unwrap_or(&[])) {
            return false;
        }
        rest = rest.get(taken..).unwrap_or(&[]);
    }
    true
}

fn read_buckets(shared: &Shared, emit: &mut dyn FnMut(&[u8]) -> bool, report: &mut Report) -> bool {
    let table = &shared.buckets;
    let created = (table.order_claimed.load(Ordering::Acquire) as usize).min(BUCKETS);
    let arena = table.arena.get().cast::<u64>();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut found: Vec<(u32, u64, BucketCounts, Vec<u64>)> = Vec::new();
    for order in table.order.iter().take(created) {
        let Some(idx) = order.load(Ordering::Acquire).checked_sub(1) else {
            continue; // claimed, never written (the process died in between)
        };
        let Some(b) = table.buckets.get(idx as usize) else {
            report.corrupt += 1;
            continue;
        };
        if b.hash.load(Ordering::Acquire) <= BUCKET_WRITING {
            continue;
        }
        let counts = BucketCounts {
            alloc_objects: b.alloc_objects.load(Ordering::Relaxed),
            alloc_bytes: b.alloc_bytes.load(Ordering::Relaxed),
            free_objects: b.free_objects.load(Ordering::Relaxed),
            free_bytes: b.free_bytes.load(Ordering::Relaxed),
        };
        if counts == BucketCounts::default() {
            continue; // nothing to show (a forked child's copy of its parent's buckets)
        }
        // SAFETY: fields of a bucket inside the mapped region; plain integers.
        let (size, at, len) = unsafe { (copy(&b.size), copy(&b.frames_at), copy(&b.frames_len)) };
        let (at, len) = (at as usize, usize::from(len));
        if len > MAX_FRAMES || at.checked_add(len).is_none_or(|end| end > ARENA_FRAMES) {
            report.corrupt += 1;
            continue;
        }
        let frames = (at..at + len)
            // SAFETY: i < at + len ≤ ARENA_FRAMES: inside the arena, in the mapping.
            .map(|i| unsafe { std::ptr::read_volatile(arena.add(i)) })
            .collect();
        found.push((idx, size, counts, frames));
        if found.len() >= PENDING_BUCKETS && !emit_buckets(&mut found, &mut buf, emit, report) {
            return false;
        }
    }
    emit_buckets(&mut found, &mut buf, emit, report)
}

/// Buckets gathered before they are encoded and emitted (at most 128 frames each: a few
/// hundred KiB, whatever the table holds).
const PENDING_BUCKETS: usize = 256;

/// Encodes `pending` into as many messages as needed, emits them, and empties it.
fn emit_buckets(
    pending: &mut Vec<(u32, u64, BucketCounts, Vec<u64>)>,
    buf: &mut [u8],
    emit: &mut dyn FnMut(&[u8]) -> bool,
    report: &mut Report,
) -> bool {
    let mut rest = pending.as_slice();
    while !rest.is_empty() {
        let mut batch = HeapBatch::new(buf);
        let taken = rest
            .iter()
            .take_while(|(id, size, counts, frames)| batch.push(*id, *size, counts, frames))
            .count();
        let len = batch.len();
        if taken == 0 {
            break; // cannot happen: one bucket of MAX_FRAMES frames fits a message
        }
        report.buckets += taken as u64;
        if !emit(buf.get(..len).unwrap_or(&[])) {
            return false;
        }
        rest = rest.get(taken..).unwrap_or(&[]);
    }
    pending.clear();
    true
}

fn mem_stats(shared: &Shared, last: Option<&MemStats>, rss: u64) -> Vec<u8> {
    let mut class_mallocs = [0u64; SIZE_CLASSES];
    let mut class_frees = [0u64; SIZE_CLASSES];
    let (mut alloc_bytes, mut free_bytes) = (0u64, 0u64);
    for s in shared.alloc.iter().take(ALLOC_SLOTS) {
        alloc_bytes = alloc_bytes.wrapping_add(s.alloc_bytes.load(Ordering::Relaxed));
        free_bytes = free_bytes.wrapping_add(s.free_bytes.load(Ordering::Relaxed));
        for (o, c) in class_mallocs.iter_mut().zip(s.class_mallocs.iter()) {
            *o = o.wrapping_add(c.load(Ordering::Relaxed));
        }
        for (o, c) in class_frees.iter_mut().zip(s.class_frees.iter()) {
            *o = o.wrapping_add(c.load(Ordering::Relaxed));
        }
    }
    let mut fields = last.map(|m| m.fields.clone()).unwrap_or_default();
    fields.resize(fields.len().max(MEM_STAT_COUNT), 0);
    let mut set = |f: MemStat, v: u64| {
        if let Some(x) = fields.get_mut(f as usize) {
            *x = v;
        }
    };
    set(
        MemStat::Mallocs,
        class_mallocs.iter().fold(0, |a, &b| a.wrapping_add(b)),
    );
    set(
        MemStat::Frees,
        class_frees.iter().fold(0, |a, &b| a.wrapping_add(b)),
    );
    set(MemStat::AllocBytes, alloc_bytes);
    set(MemStat::FreeBytes, free_bytes);
    let live = alloc_bytes.saturating_sub(free_bytes);
    let peak = last.map_or(0, |m| m.get(MemStat::PeakLiveBytes)).max(live);
    set(MemStat::PeakLiveBytes, peak);
    if rss > 0 {
        let max = last.map_or(0, |m| m.get(MemStat::MaxRssBytes)).max(rss);
        set(MemStat::RssBytes, rss);
        set(MemStat::MaxRssBytes, max);
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = wire::encode_mem_stats(&mut buf, &fields, &class_mallocs, &class_frees).unwrap_or(0);
    buf.truncate(n);
    buf
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::region::Mapping;
    use anyprof_wire::shared::{SampleRecord, SHARED_MAGIC, SHARED_SIZE, SHARED_VERSION};
    use anyprof_wire::Counter;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    /// A zeroed region in a sealed memfd, mapped as the collector maps one, with its header
    /// set as the preload sets it.
    pub(crate) fn region() -> Mapping {
        region_and_memfd().1
    }

    /// [`region`] and its memfd.
    pub(crate) fn region_and_memfd() -> (OwnedFd, Mapping) {
        let name = c"anyprof-test-region";
        // SAFETY: valid name and flags.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(fd >= 0);
        // SAFETY: a new descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: valid descriptor.
        let rc =
            unsafe { libc::ftruncate(std::os::fd::AsRawFd::as_raw_fd(&fd), SHARED_SIZE as i64) };
        assert_eq!(rc, 0);
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: valid descriptor and seals.
        let rc = unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::F_ADD_SEALS,
                seals,
            )
        };
        assert_eq!(rc, 0);
        let m = Mapping::of_memfd(fd.as_fd(), SHARED_SIZE).unwrap();
        let h = &shared(&m).header;
        h.magic.store(SHARED_MAGIC, Ordering::Relaxed);
        h.version.store(SHARED_VERSION, Ordering::Relaxed);
        h.size.store(SHARED_SIZE as u64, Ordering::Relaxed);
        (fd, m)
    }

    pub(crate) fn shared(m: &Mapping) -> &Shared {
        // SAFETY: a mapping of SHARED_SIZE bytes, page-aligned, all-bytes-valid for Shared.
        unsafe { &*m.as_ptr().cast::<Shared>() }
    }

    /// Publishes a sample in slot `i` as the signal handler does.
    pub(crate) fn put_sample(s: &Shared, i: usize, state: u32, tid: u32, frames: &[u64], len: u16) {
        let slot = &s.samples.slots[i];
        let mut r = SampleRecord::EMPTY;
        r.tid = tid;
        r.len = len;
        r.time_ns = 1000 + i as u64;
        r.cpu_ns = 4_000_000;
        r.frames[..frames.len()].copy_from_slice(frames);
        // SAFETY: test-owned region; nothing else writes this slot.
        unsafe { *slot.record.get() = r };
        slot.state.store(state, Ordering::Release);
    }

    /// Creates bucket `idx` at creation position `pos` as the allocation hook does.
    pub(crate) fn put_bucket(
        s: &Shared,
        pos: usize,
        idx: usize,
        size: u64,
        frames: &[u64],
        live: u64,
    ) {
        let t = &s.buckets;
        let at = t
            .arena_used
            .fetch_add(frames.len() as u32, Ordering::Relaxed) as usize;
        let b = &t.buckets[idx];
        // SAFETY: test-owned region; inside the arena.
        unsafe {
            let arena = t.arena.get().cast::<u64>();
            for (i, f) in frames.iter().enumerate() {
                *arena.add(at + i) = *f;
            }
            *b.size.get() = size;
            *b.frames_at.get() = at as u32;
            *b.frames_len.get() = frames.len() as u16;
        }
        b.alloc_objects.store(live + 1, Ordering::Relaxed);
        b.alloc_bytes.store((live + 1) * size, Ordering::Relaxed);
        b.free_objects.store(1, Ordering::Relaxed);
        b.free_bytes.store(size, Ordering::Relaxed);
        b.hash.store(0xabc0 + idx as u64, Ordering::Release);
        t.order[pos].store(idx as u32 + 1, Ordering::Release);
        t.order_claimed.fetch_max(pos as u32 + 1, Ordering::Release);
    }

    fn session_after(m: &Mapping, last: Option<&MemStats>) -> (Session, Report) {
        let mut s = Session {
            mem_stats: last.cloned(),
            ..Session::default()
        };
        let report = read_into(shared(m), &mut s, 0, &mut |_, _| {});
        (s, report)
    }

    /// What a process killed at once left in its region reaches the session: ready samples,
    /// live heap buckets with their stacks, counters, allocator totals.
    #[test]
    fn the_death_read_turns_the_region_into_a_session() {
        let m = region();
        let s = shared(&m);
        put_sample(s, 0, SAMPLE_READY, 11, &[0x1000, 0x2000], 2);
        put_sample(
            s,
            7,
            SAMPLE_READY,
            12,
            &[0x3000; MAX_FRAMES],
            MAX_FRAMES as u16,
        );
        put_sample(s, 9, anyprof_wire::shared::SAMPLE_WRITING, 13, &[0x4000], 1);
        put_bucket(s, 0, 77, 64 << 20, &[0x5000, 0x6000], 1);
        put_bucket(s, 1, 5, 32, &[0x7000], 1000);
        s.counters[Counter::SamplesTaken as usize].store(42, Ordering::Relaxed);
        s.alloc[0].alloc_bytes.store(100, Ordering::Relaxed);
        s.alloc[3].alloc_bytes.store(64 << 20, Ordering::Relaxed);
        s.alloc[3].free_bytes.store(50, Ordering::Relaxed);
        s.alloc[3].class_mallocs[wire::size_class(64 << 20)].store(1, Ordering::Relaxed);
        s.alloc[0].class_mallocs[3].store(2, Ordering::Relaxed);
        s.alloc[3].class_frees[3].store(1, Ordering::Relaxed);
        let mut last_fields = vec![0u64; MEM_STAT_COUNT];
        last_fields[MemStat::MaxRssBytes as usize] = 999;
        last_fields[MemStat::PeakLiveBytes as usize] = 1;
        let last = MemStats {
            fields: last_fields,
            class_mallocs: vec![],
            class_frees: vec![],
        };
        let (session, report) = session_after(&m, Some(&last));
        assert_eq!(
            report,
            Report {
                samples: 2,
                buckets: 2,
                corrupt: 0
            }
        );
        assert_eq!(session.error, None);
        assert_eq!(session.cpu.len(), 2);
        assert!(session
            .cpu
            .keys()
            .any(|k| k.tid == 11 && k.frames == [0x1000, 0x2000]));
        assert!(session
            .cpu
            .keys()
            .any(|k| k.tid == 12 && k.frames.len() == MAX_FRAMES));
        let big = &session.heap[&77];
        assert_eq!(big.frames, [0x5000, 0x6000]);
        assert_eq!(big.size, 64 << 20);
        let in_use = big.counts.alloc_bytes - big.counts.free_bytes;
        assert_eq!(in_use, 64 << 20, "the live set at death");
        assert_eq!(session.heap[&5].counts.alloc_objects, 1001);
        assert_eq!(session.counter(Counter::SamplesTaken), 42);
        let ms = session.mem_stats.as_ref().unwrap();
        assert_eq!(ms.get(MemStat::AllocBytes), 100 + (64 << 20));
        assert_eq!(ms.get(MemStat::FreeBytes), 50);
        assert_eq!(ms.get(MemStat::Mallocs), 3);
        assert_eq!(ms.get(MemStat::Frees), 1);
        assert_eq!(
            ms.get(MemStat::MaxRssBytes),
            999,
            "kept from the last report"
        );
        assert_eq!(ms.get(MemStat::PeakLiveBytes), 100 + (64 << 20) - 50);
        // Read slots are freed: a second read adds no sample.
        let (again, report) = session_after(&m, None);
        assert_eq!(report.samples, 0);
        assert!(again.cpu.is_empty());
        assert_eq!(
            again.heap.len(),
            2,
            "buckets are absolute, read again the same"
        );
    }

    /// Values the process never writes are skipped and counted, never followed.
    #[test]
    fn a_corrupt_region_is_read_within_bounds() {
        let m = region();
        let s = shared(&m);
        put_sample(s, 0, SAMPLE_READY, 1, &[1], u16::MAX);
        put_sample(s, SAMPLE_SLOTS_LAST, SAMPLE_READY, 2, &[2], 1);
        put_bucket(s, 0, 1, 8, &[1, 2, 3], 1);
        put_bucket(s, 1, 2, 8, &[4], 1);
        let t = &s.buckets;
        // Bucket 1's frames run past the arena; bucket 2's frame count is over MAX_FRAMES.
        // SAFETY: test-owned region.
        unsafe {
            *t.buckets[1].frames_at.get() = (ARENA_FRAMES - 1) as u32;
            *t.buckets[2].frames_len.get() = MAX_FRAMES as u16 + 1;
        }
        // A position pointing outside the table, one never written, and a claimed count
        // far beyond the table.
        t.order[2].store(u32::MAX, Ordering::Relaxed);
        t.order[3].store(0, Ordering::Relaxed);
        put_bucket(s, BUCKETS - 1, 9, 16, &[9], 1);
        t.order_claimed.store(u32::MAX, Ordering::Relaxed);
        let (session, report) = session_after(&m, None);
        assert_eq!(
            report,
            Report {
                samples: 1,
                buckets: 1,
                corrupt: 4
            }
        );
        assert_eq!(session.error, None);
        assert!(session.heap.contains_key(&9));
        assert_eq!(session.heap.len(), 1);
    }

    /// A table full of the deepest stacks is read one message at a time, and the session's
    /// memory cap stops it.
    #[test]
    fn a_full_table_is_read_in_messages_under_the_cap() {
        let m = region();
        let s = shared(&m);
        let deep = [0x1234u64; MAX_FRAMES];
        put_bucket(s, 0, 0, 8, &deep, 1);
        let t = &s.buckets;
        for i in 1..BUCKETS {
            let b = &t.buckets[i];
            // Every bucket points at the same frames (a hostile process can do that).
            // SAFETY: test-owned region.
            unsafe {
                *b.size.get() = i as u64;
                *b.frames_at.get() = 0;
                *b.frames_len.get() = MAX_FRAMES as u16;
            }
            b.alloc_objects.store(1, Ordering::Relaxed);
            b.hash.store(2, Ordering::Relaxed);
            t.order[i].store(i as u32 + 1, Ordering::Relaxed);
        }
        t.order_claimed.store(BUCKETS as u32, Ordering::Relaxed);
        let mut sizes = Vec::new();
        let report = read(s, None, 0, &mut |msg| {
            sizes.push(msg.len());
            true
        });
        assert_eq!(report.buckets, BUCKETS as u64);
        assert!(sizes.iter().all(|&n| n <= MAX_MESSAGE));
        let mut capped = Session {
            max_bytes: Some(1 << 20),
            ..Session::default()
        };
        let mut warned = 0;
        read_into(s, &mut capped, 0, &mut |_, _| warned += 1);
        assert!(capped.kept_bytes <= 1 << 20);
        assert!(capped.heap.len() < BUCKETS);
        assert_eq!(warned, 1, "one warning at the cap");
    }

    /// A region full of random bytes (a process that scribbled over all of it): the death
    /// read stays inside the region, never panics, and the session stays under its cap.
    #[test]
    fn a_region_of_random_bytes_is_read_safely() {
        let m = region();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for seed in 0..3u64 {
            x ^= seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let words = m.len() / 8;
            let base = m.as_ptr().cast::<u64>();
            for i in 0..words {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Small values here and there, so that some states, indices and lengths are
                // in range and get followed.
                let v = match x % 4 {
                    0 => (x >> 8) % 4,
                    1 => (x >> 8) % 1024,
                    _ => x,
                };
                // SAFETY: i < len / 8: inside the mapping.
                unsafe { base.add(i).write_volatile(v) };
            }
            let mut session = Session {
                max_bytes: Some(8 << 20),
                ..Session::default()
            };
            let report = read_into(shared(&m), &mut session, 0, &mut |_, _| {});
            assert!(session.kept_bytes <= 8 << 20);
            assert!(report.samples <= anyprof_wire::shared::SAMPLE_SLOTS as u64);
        }
    }

    const SAMPLE_SLOTS_LAST: usize = anyprof_wire::shared::SAMPLE_SLOTS - 1;

    /// A region that is all zeros (a process that died before it did anything) gives an
    /// empty but valid report.
    #[test]
    fn an_empty_region_reads_as_nothing() {
        let m = region();
        let (session, report) = session_after(&m, None);
        assert_eq!(report, Report::default());
        assert!(session.cpu.is_empty() && session.heap.is_empty());
        assert_eq!(session.error, None);
        // The collector's last RSS reading stands for the RSS at death.
        let mut s = Session::default();
        read_into(shared(&m), &mut s, 5 << 20, &mut |_, _| {});
        let ms = s.mem_stats.unwrap();
        assert_eq!(ms.get(MemStat::RssBytes), 5 << 20);
        assert_eq!(ms.get(MemStat::MaxRssBytes), 5 << 20);
    }
}
