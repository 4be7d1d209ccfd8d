//! The death read: what a process left in its shared region when it ended (SIGKILL, the OOM
//! killer, a crash, an exec), turned into ordinary wire messages. The same reads serve the
//! live read of a running process that has no thread of ours to send them ([`live`]).
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
//! # Holes
//! A page of the memfd that nobody wrote is a hole; on tmpfs, reading a hole through a
//! shared mapping allocates the page, charged to the reader. A hostile process could name
//! every bucket and every arena frame in its order list and make the daemon allocate the
//! whole region. So the read is given the memfd's [`Pages`] (from `SEEK_DATA`/`SEEK_HOLE`,
//! not `mincore`, which calls swapped-out pages absent) and reads nothing on a hole: a
//! value there is zero, which is what reading it would have given.
//!
//! What is lost at death: samples a handler was writing (WRITING) at the kill, and
//! allocations inside a hook at that moment.

use std::cell::UnsafeCell;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use anyprof_wire::shared::{
    used_alloc_slots, AllocTotals, Shared, ARENA_FRAMES, BUCKETS, BUCKET_WRITING, SAMPLE_FREE,
    SAMPLE_READY,
};
use anyprof_wire::{
    self as wire, BucketCounts, HeapBatch, Kind, Level, MemStat, MemStats, SampleBatch,
    COUNTER_COUNT, MAX_FRAMES, MAX_MESSAGE, MEM_STAT_COUNT,
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

/// Page size of the bitmap (tmpfs pages; a huge page is reported as many data pages).
const PAGE: usize = 4096;

/// Which pages of a region's memfd hold data (written, possibly swapped out); the others
/// are holes, which read as zeros and must not be touched (see the module doc).
#[derive(Clone, Debug)]
pub struct Pages {
    /// One bit a page; `None`: every page holds data (a region whose memfd we do not
    /// have, in tests).
    bits: Option<Vec<u64>>,
}

impl Pages {
    /// Every page counts as data.
    pub fn all() -> Pages {
        Pages { bits: None }
    }

    /// The data pages of the first `len` bytes of `fd`, found with `lseek(SEEK_DATA)` and
    /// `lseek(SEEK_HOLE)` (which read nothing and allocate nothing).
    pub fn of_file(fd: BorrowedFd<'_>, len: usize) -> std::io::Result<Pages> {
        let pages = len.div_ceil(PAGE);
        let mut bits = vec![0u64; pages.div_ceil(64)];
        let end = i64::try_from(len).unwrap_or(i64::MAX);
        let mut pos: i64 = 0;
        // Each turn moves past one extent of data: at most one turn per two pages.
        while pos < end {
            // SAFETY: lseek on a valid descriptor; it only moves the file offset.
            let data = unsafe { libc::lseek(fd.as_raw_fd(), pos, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data after pos
                }
                return Err(e);
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd.as_raw_fd(), data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if data >= end || hole <= data {
                break;
            }
            let first = data as usize / PAGE;
            let last = (hole.min(end) as usize).div_ceil(PAGE);
            for p in first..last.min(pages) {
                if let Some(w) = bits.get_mut(p / 64) {
                    *w |= 1 << (p % 64);
                }
            }
            pos = hole;
        }
        Ok(Pages { bits: Some(bits) })
    }

    /// Whether every page of `[off, off + len)` holds data.
    fn has(&self, off: usize, len: usize) -> bool {
        let Some(bits) = &self.bits else {
            return true;
        };
        if len == 0 {
            return true;
        }
        let Some(last) = off.checked_add(len - 1) else {
            return false;
        };
        (off / PAGE..=last / PAGE)
            .all(|p| bits.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0))
    }

    /// Data pages in the bitmap (tests).
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.bits
            .as_ref()
            .map_or(0, |b| b.iter().map(|w| w.count_ones() as usize).sum())
    }
}

/// The region with its data pages: every read goes through here and reads zero from a hole.
struct View<'a> {
    base: usize,
    pages: &'a Pages,
}

impl<'a> View<'a> {
    fn new(shared: &'a Shared, pages: &'a Pages) -> View<'a> {
        View {
            base: shared as *const Shared as usize,
            pages,
        }
    }

    /// Whether the `len` bytes at `p` (inside the region) hold data.
    fn has(&self, p: *const u8, len: usize) -> bool {
        (p as usize)
            .checked_sub(self.base)
            .is_some_and(|off| self.pages.has(off, len))
    }

    fn of<T>(&self, item: &T) -> bool {
        self.has((item as *const T).cast(), std::mem::size_of::<T>())
    }

    fn load32(&self, a: &AtomicU32, order: Ordering) -> u32 {
        if self.of(a) {
            a.load(order)
        } else {
            0
        }
    }

    fn load64(&self, a: &AtomicU64) -> u64 {
        if self.of(a) {
            a.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    /// Copies a plain value out of an `UnsafeCell` in the region; bytes on holes are zero.
    ///
    /// # Safety
    /// `cell` lies inside the region's live mapping, and `T` is plain data valid for any
    /// bit pattern (it may be changing under us).
    unsafe fn copy<T: Copy>(&self, cell: &UnsafeCell<T>) -> T {
        let p = cell.get();
        if self.has(p.cast(), std::mem::size_of::<T>()) {
            // SAFETY: see `copy`.
            return unsafe { copy(cell) };
        }
        let mut out = std::mem::MaybeUninit::<T>::zeroed();
        let (src, dst) = (p.cast::<u8>().cast_const(), out.as_mut_ptr().cast::<u8>());
        for i in 0..std::mem::size_of::<T>() {
            // SAFETY: i < size_of::<T>(): inside the cell (in the mapping) and inside `out`.
            unsafe {
                let b = src.add(i);
                if self.has(b, 1) {
                    dst.add(i).write(std::ptr::read_volatile(b));
                }
            }
        }
        // SAFETY: the caller guarantees that any bytes (here: zeros and copied bytes) are a
        // valid T.
        unsafe { out.assume_init() }
    }

    /// Arena frame `i` (< ARENA_FRAMES), zero on a hole.
    fn frame(&self, arena: *const u64, i: usize) -> u64 {
        // SAFETY: the caller keeps i inside the arena, which lies in the mapping.
        let p = unsafe { arena.add(i) };
        if self.has(p.cast(), 8) {
            // SAFETY: as above.
            unsafe { std::ptr::read_volatile(p) }
        } else {
            0
        }
    }
}

/// Reads the region and hands each message that carries what it holds to `emit`, as it is
/// built (so that a full table costs one message of memory, not the table's size); stops
/// when `emit` returns false. `last_mem_stats` is the process's last allocator report, whose
/// fields the region does not hold (peak RSS, lost-sample counts) are kept; `rss` is the
/// collector's last reading of the process's RSS (0 if none), which stands for its RSS at
/// death.
pub fn read(
    shared: &Shared,
    pages: &Pages,
    last_mem_stats: Option<&MemStats>,
    rss: u64,
    emit: &mut dyn FnMut(&[u8]) -> bool,
) -> Report {
    let mut report = Report::default();
    let view = View::new(shared, pages);
    if !read_samples(shared, &view, emit, &mut report)
        || !read_buckets(shared, &view, emit, &mut report)
    {
        return report;
    }
    read_counters(shared, &view, last_mem_stats, rss, emit);
    report
}

/// The event counters and the allocator's totals → `Counters` and `MemStats`; false if
/// `emit` said stop.
fn read_counters(
    shared: &Shared,
    view: &View<'_>,
    last_mem_stats: Option<&MemStats>,
    rss: u64,
    emit: &mut dyn FnMut(&[u8]) -> bool,
) -> bool {
    let counters: Vec<u64> = (shared.counters.iter().take(COUNTER_COUNT))
        .map(|c| view.load64(c))
        .collect();
    let mut buf = vec![0u8; MAX_MESSAGE];
    if let Some(n) = wire::encode_counters(&mut buf, Kind::Counters, &counters) {
        if !emit(buf.get(..n).unwrap_or(&[])) {
            return false;
        }
    }
    emit(&mem_stats(shared, view, last_mem_stats, rss))
}

/// What the collector reads from a region while its process runs, when the process has no
/// thread of ours to send it (`SharedHeader::drainer` is `DRAINER_COLLECTOR`: a
/// single-threaded program in record mode). The same messages as the death read, from the
/// same checked reads; the process keeps writing meanwhile, so only complete (READY) samples
/// are taken, under the ring's reader lock.
pub mod live {
    use super::*;
    use anyprof_wire::shared::{lock_samples, unlock_samples, SAMPLE_READER_COLLECTOR};

    /// Takes every complete sample out of the ring (nothing if the process is reading it
    /// itself); returns how many.
    pub fn samples(shared: &Shared, emit: &mut dyn FnMut(&[u8]) -> bool) -> u64 {
        if !lock_samples(&shared.header, SAMPLE_READER_COLLECTOR) {
            return 0;
        }
        // The sample slots are written by the process as it samples: reading one it never
        // wrote faults in at most the ring's pages (about half a MiB), once.
        let all = Pages::all();
        let mut report = Report::default();
        read_samples(shared, &View::new(shared, &all), emit, &mut report);
        unlock_samples(&shared.header, SAMPLE_READER_COLLECTOR);
        report.samples
    }

    /// Every heap bucket with its absolute counts (`HeapBuckets`), as the death read takes
    /// them; false if `emit` said stop. Buckets being written are skipped.
    pub fn buckets(shared: &Shared, pages: &Pages, emit: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        let mut report = Report::default();
        read_buckets(shared, &View::new(shared, pages), emit, &mut report)
    }

    /// Bytes allocated and not freed now, from the allocator counter slots.
    pub fn live_bytes(shared: &Shared, pages: &Pages) -> u64 {
        alloc_totals(shared, &View::new(shared, pages)).live_bytes()
    }

    /// The counters and allocator totals (`Counters`, `MemStats`), as the process's thread
    /// sends them once a second. `last` is the session's last allocator report (its fields
    /// the region does not hold are kept), `rss` the last reading of the process's RSS.
    pub fn counters(
        shared: &Shared,
        pages: &Pages,
        last: Option<&MemStats>,
        rss: u64,
        emit: &mut dyn FnMut(&[u8]) -> bool,
    ) -> bool {
        read_counters(shared, &View::new(shared, pages), last, rss, emit)
    }
}

/// Reads the region into `session`: every message goes through `decode` and
/// `Session::apply`; the read stops at the first message that does not decode or that puts
/// the session over its limits (recorded as its error).
pub fn read_into(
    shared: &Shared,
    pages: &Pages,
    session: &mut Session,
    rss: u64,
    log: &mut dyn FnMut(Level, &str),
) -> Report {
    let last = session.mem_stats.clone();
    read(shared, pages, last.as_ref(), rss, &mut |m| {
        session.apply_encoded(m, "death read", log)
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

fn read_samples(
    shared: &Shared,
    view: &View<'_>,
    emit: &mut dyn FnMut(&[u8]) -> bool,
    report: &mut Report,
) -> bool {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut records = Vec::new();
    for slot in shared.samples.slots.iter() {
        if view.load32(&slot.state, Ordering::Acquire) != SAMPLE_READY {
            continue;
        }
        // SAFETY: the slot lies in the mapped region; SampleRecord is integers only.
        let r = unsafe { view.copy(&slot.record) };
        // Freed, so that a second read (a session ended twice) does not count it again; a
        // record another reader freed first is theirs.
        if slot
            .state
            .compare_exchange(
                SAMPLE_READY,
                SAMPLE_FREE,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            continue;
        }
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

fn read_buckets(
    shared: &Shared,
    view: &View<'_>,
    emit: &mut dyn FnMut(&[u8]) -> bool,
    report: &mut Report,
) -> bool {
    let table = &shared.buckets;
    let created = (view.load32(&table.order_claimed, Ordering::Acquire) as usize).min(BUCKETS);
    let arena = table.arena.get().cast::<u64>();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut found: Vec<(u32, u64, BucketCounts, Vec<u64>)> = Vec::new();
    for order in table.order.iter().take(created) {
        let Some(idx) = view.load32(order, Ordering::Acquire).checked_sub(1) else {
            continue; // claimed, never written (the process died in between)
        };
        let Some(b) = table.buckets.get(idx as usize) else {
            report.corrupt += 1;
            continue;
        };
        if !view.of(&b.hash) || b.hash.load(Ordering::Acquire) <= BUCKET_WRITING {
            continue;
        }
        let counts = BucketCounts {
            alloc_objects: view.load64(&b.alloc_objects),
            alloc_bytes: view.load64(&b.alloc_bytes),
            free_objects: view.load64(&b.free_objects),
            free_bytes: view.load64(&b.free_bytes),
        };
        if counts == BucketCounts::default() {
            continue; // nothing to show (a forked child's copy of its parent's buckets)
        }
        // SAFETY: fields of a bucket inside the mapped region; plain integers.
        let (size, at, len) = unsafe {
            (
                view.copy(&b.size),
                view.copy(&b.frames_at),
                view.copy(&b.frames_len),
            )
        };
        let (at, len) = (at as usize, usize::from(len));
        if len > MAX_FRAMES || at.checked_add(len).is_none_or(|end| end > ARENA_FRAMES) {
            report.corrupt += 1;
            continue;
        }
        // i < at + len ≤ ARENA_FRAMES: inside the arena, in the mapping.
        let frames = (at..at + len).map(|i| view.frame(arena, i)).collect();
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

/// The allocator counter slots summed: every slot up to the highest one claimed.
fn alloc_totals(shared: &Shared, view: &View<'_>) -> AllocTotals {
    let mut t = AllocTotals::ZERO;
    let high = shared
        .alloc
        .first()
        .map_or(0, |s0| view.load32(&s0.owned, Ordering::Relaxed));
    for s in used_alloc_slots(&shared.alloc, high) {
        t.add_slot(s, |c| view.load64(c));
    }
    t
}

fn mem_stats(shared: &Shared, view: &View<'_>, last: Option<&MemStats>, rss: u64) -> Vec<u8> {
    let t = alloc_totals(shared, view);
    let (alloc_bytes, free_bytes) = (t.alloc_bytes, t.free_bytes);
    let mut fields = last.map(|m| m.fields.clone()).unwrap_or_default();
    fields.resize(fields.len().max(MEM_STAT_COUNT), 0);
    let mut set = |f: MemStat, v: u64| {
        if let Some(x) = fields.get_mut(f as usize) {
            *x = v;
        }
    };
    set(MemStat::Mallocs, t.mallocs());
    set(MemStat::Frees, t.frees());
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
    let n =
        wire::encode_mem_stats(&mut buf, &fields, &t.class_mallocs, &t.class_frees).unwrap_or(0);
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
        let report = read_into(shared(m), &m.pages().unwrap(), &mut s, 0, &mut |_, _| {});
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
        // Four blocks of 24 usable bytes counted per size, one of them freed.
        s.alloc[3].small_mallocs[24 / 8 + 1].store(4, Ordering::Relaxed);
        s.alloc[3].small_frees[24 / 8 + 1].store(1, Ordering::Relaxed);
        // Slot 3 is the highest ever claimed: slot 4 (garbage here) is not read.
        s.alloc[0].owned.store(3, Ordering::Relaxed);
        s.alloc[4].alloc_bytes.store(1 << 40, Ordering::Relaxed);
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
        assert_eq!(ms.get(MemStat::AllocBytes), 100 + (64 << 20) + 4 * 24);
        assert_eq!(ms.get(MemStat::FreeBytes), 50 + 24);
        assert_eq!(ms.get(MemStat::Mallocs), 3 + 4);
        assert_eq!(ms.get(MemStat::Frees), 1 + 1);
        assert_eq!(ms.class_mallocs[wire::size_class(24)], 4);
        assert_eq!(
            ms.get(MemStat::MaxRssBytes),
            999,
            "kept from the last report"
        );
        assert_eq!(
            ms.get(MemStat::PeakLiveBytes),
            100 + (64 << 20) + 3 * 24 - 50
        );
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
        let report = read(s, &m.pages().unwrap(), None, 0, &mut |msg| {
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
        read_into(s, &m.pages().unwrap(), &mut capped, 0, &mut |_, _| {
            warned += 1
        });
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
            let report = read_into(
                shared(&m),
                &m.pages().unwrap(),
                &mut session,
                0,
                &mut |_, _| {},
            );
            assert!(session.kept_bytes <= 8 << 20);
            assert!(report.samples <= anyprof_wire::shared::SAMPLE_SLOTS as u64);
        }
    }

    /// Blocks (512 bytes) the memfd holds.
    fn blocks(fd: &OwnedFd) -> i64 {
        // SAFETY: an all-zero stat is a valid out-buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and out-pointer.
        let rc = unsafe { libc::fstat(std::os::fd::AsRawFd::as_raw_fd(fd), &mut st) };
        assert_eq!(rc, 0);
        st.st_blocks
    }

    /// A hostile process claims every bucket and points its order list at all of them
    /// (and at the whole arena), having written almost nothing else: reading holes of a
    /// tmpfs file through the mapping would make the daemon allocate them (about 21 MiB).
    /// The death read reads no hole: the memfd does not grow.
    #[test]
    fn the_death_read_allocates_no_page_of_a_hole() {
        let (fd, m) = region_and_memfd();
        let s = shared(&m);
        let t = &s.buckets;
        for (i, o) in t.order.iter().enumerate() {
            o.store(i as u32 + 1, Ordering::Relaxed);
        }
        t.order_claimed.store(BUCKETS as u32, Ordering::Relaxed);
        // One real bucket and one real sample, so that what was written is still read.
        put_bucket(s, 0, 3, 16, &[0x42], 1);
        put_sample(s, 5, SAMPLE_READY, 7, &[0x99], 1);
        // A bucket with real data whose frames lie on a hole of the arena.
        put_bucket(s, 1, 4, 16, &[0x43], 1);
        // SAFETY: test-owned region; the field's page is written already.
        unsafe { *t.buckets[4].frames_at.get() = (ARENA_FRAMES - MAX_FRAMES) as u32 };
        // SAFETY: test-owned region.
        unsafe { *t.buckets[4].frames_len.get() = MAX_FRAMES as u16 };
        let before = blocks(&fd);
        let pages = m.pages().unwrap();
        assert!(pages.count() > 0 && pages.count() < m.len() / 4096 / 2);
        let mut session = Session::default();
        let report = read_into(s, &pages, &mut session, 0, &mut |_, _| {});
        let grown = blocks(&fd) - before;
        assert!(
            grown <= 4 * 8,
            "the death read allocated {} KiB of holes",
            grown / 2
        );
        assert_eq!(report.samples, 1);
        assert_eq!(
            report.buckets, 4,
            "buckets 3 and 4, each named twice in the order"
        );
        assert_eq!(session.heap[&3].frames, [0x42]);
        assert_eq!(
            session.heap[&4].frames, [0; MAX_FRAMES],
            "holes read as zeros"
        );
        // Without the page map every hole is read, and allocated.
        let mut again = Session::default();
        read_into(s, &Pages::all(), &mut again, 0, &mut |_, _| {});
        assert!(
            blocks(&fd) - before > 1024 * 8,
            "reading holes allocates them (the test measures what it should)"
        );
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
        read_into(
            shared(&m),
            &m.pages().unwrap(),
            &mut s,
            5 << 20,
            &mut |_, _| {},
        );
        let ms = s.mem_stats.unwrap();
        assert_eq!(ms.get(MemStat::RssBytes), 5 << 20);
        assert_eq!(ms.get(MemStat::MaxRssBytes), 5 << 20);
    }
}
