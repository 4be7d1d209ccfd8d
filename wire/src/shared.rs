//! The shared region: the memory the preload and the collector both map.
//!
//! The preload keeps everything that matters at the process's death — the sample ring, the
//! heap bucket table, the event counters and the allocator counters — in one page-aligned
//! [`Shared`] value, plus two rings that replace the socket: a byte ring of wire messages
//! (process → collector, [`MessageRing`]) and a small ring of commands (collector → process,
//! [`CommandRing`]). At start-up the preload moves that value into a sealed memfd mapped over
//! the same address, hands the memfd to the collector once and closes every descriptor: from
//! then on the program sees no descriptor of ours, and a process killed by SIGKILL or the OOM
//! killer leaves its state readable by the collector, which still has it mapped.
//!
//! # Layout rules
//! - Every type is `#[repr(C)]` and **all-zero is the valid initial state**: the preload's
//!   static is `core::mem::zeroed()` (so it lives in `.bss`, no cost in the `.so` file), and a
//!   fresh memfd reads as zeros.
//! - Fields that another thread or process reads while they change are atomics; plain fields
//!   are `UnsafeCell`s whose access is ordered by an atomic state next to them (documented per
//!   type). The collector reads them with volatile reads and trusts nothing: the process can
//!   write anything anywhere in the region.
//! - [`SHARED_VERSION`] changes whenever this layout changes; the collector checks it (and
//!   [`SHARED_MAGIC`], and the size) before it reads anything else.
//!
//! # The rings
//! [`message_write`] (process side, no allocation, no syscall) and [`message_read_into`] /
//! `message_read_one` (collector side, `decode` feature; both validate every value they
//! read) implement the message ring; [`push_command`] / [`pop_command`] the command ring.
//! Both are single-producer, single-consumer; see their docs for who is which.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::{Command, MAX_FRAMES, MAX_MESSAGE, SIZE_CLASSES};

/// `"APRFSHM1"` read as a little-endian u64; first field of the region.
pub const SHARED_MAGIC: u64 = u64::from_le_bytes(*b"APRFSHM1");
/// Version of this layout; bumped whenever any type in this file changes.
pub const SHARED_VERSION: u32 = 3;
/// Sample slots: 5 s of samples for 100 threads at 100 Hz before the reader must run.
pub const SAMPLE_SLOTS: usize = 512;
/// Heap buckets (one per allocation stack and size).
pub const BUCKETS: usize = 1 << 16;
/// Frames stored over all heap buckets.
pub const ARENA_FRAMES: usize = 1 << 21;
/// Per-thread allocator counter slots (slot 0 is the shared overflow slot).
pub const ALLOC_SLOTS: usize = 1024;
/// Bytes of the message ring's data area (a multiple of 8).
pub const MESSAGE_RING_BYTES: usize = 4 << 20;
/// Commands the collector can queue before the process takes them.
pub const COMMAND_SLOTS: usize = 16;
/// Room for event counters: [`crate::COUNTER_COUNT`] may grow up to this without a layout
/// change.
pub const COUNTER_SLOTS: usize = 32;

/// Sample slot state: free for a writer to claim.
pub const SAMPLE_FREE: u32 = 0;
/// Sample slot state: a signal handler is filling it.
pub const SAMPLE_WRITING: u32 = 1;
/// Sample slot state: complete, waiting for the reader.
pub const SAMPLE_READY: u32 = 2;

/// Bucket hash value: the bucket is unused.
pub const BUCKET_EMPTY: u64 = 0;
/// Bucket hash value: a thread is writing the bucket (size and frames not valid yet).
pub const BUCKET_WRITING: u64 = 1;

/// Value of [`SharedHeader::finished`] once the process sent its last flush.
pub const FINISHED: u32 = 1;

/// [`SharedHeader::drainer`]: the process's background thread empties the sample ring.
pub const DRAINER_PROCESS: u32 = 0;
/// [`SharedHeader::drainer`]: the collector empties the sample ring and reads the counters
/// while the process runs (the process has no thread of ours).
pub const DRAINER_COLLECTOR: u32 = 1;

/// [`SharedHeader::sample_reader`]: nobody is reading the sample ring.
pub const SAMPLE_READER_NONE: u32 = 0;
/// [`SharedHeader::sample_reader`]: the process is reading it.
pub const SAMPLE_READER_PROCESS: u32 = 1;
/// [`SharedHeader::sample_reader`]: the collector is reading it.
pub const SAMPLE_READER_COLLECTOR: u32 = 2;

/// Takes the sample ring for reader `who` if nobody reads it; never waits. The process's
/// background thread and the collector may both want to read it around the moment the
/// process starts its first thread (and at exit); the lock keeps the ring single-reader.
pub fn lock_samples(header: &SharedHeader, who: u32) -> bool {
    header
        .sample_reader
        .compare_exchange(
            SAMPLE_READER_NONE,
            who,
            Ordering::Acquire,
            Ordering::Relaxed,
        )
        .is_ok()
}

/// Gives the sample ring back (only if `who` holds it).
pub fn unlock_samples(header: &SharedHeader, who: u32) {
    let _ = header.sample_reader.compare_exchange(
        who,
        SAMPLE_READER_NONE,
        Ordering::Release,
        Ordering::Relaxed,
    );
}

/// Length word of a message-ring record that means "the rest of the data area is unused,
/// continue at offset 0".
pub const WRAP_MARKER: u32 = u32::MAX;
/// Bytes of a message-ring record header (u32 length, u32 zero).
pub const RECORD_HEADER: usize = 8;

/// The whole region. Page-aligned and a whole number of pages, so it can be mapped over.
#[repr(C, align(4096))]
pub struct Shared {
    /// Identity, size and liveness words.
    pub header: SharedHeader,
    /// Collector → process.
    pub commands: CommandRing,
    /// Process → collector: wire messages, exactly as they were sent over the socket.
    pub messages: MessageRing,
    /// CPU samples written by the signal handler.
    pub samples: SampleRing,
    /// The heap profile.
    pub buckets: BucketTable,
    /// Event counters, indexed by [`crate::Counter`].
    pub counters: [AtomicU64; COUNTER_SLOTS],
    /// Exact allocator counters, one slot per thread.
    pub alloc: [AllocSlot; ALLOC_SLOTS],
}

/// Size in bytes of [`Shared`] (and of the memfd that holds it).
pub const SHARED_SIZE: usize = core::mem::size_of::<Shared>();

const _: () = assert!(SHARED_SIZE.is_multiple_of(4096));
const _: () = assert!(crate::COUNTER_COUNT <= COUNTER_SLOTS);
const _: () = assert!(MESSAGE_RING_BYTES.is_multiple_of(8));
const _: () = assert!(MAX_MESSAGE + RECORD_HEADER <= MESSAGE_RING_BYTES);
const _: () = assert!(COMMAND_SLOTS.is_power_of_two());

// SAFETY: every field is either an atomic or an `UnsafeCell` whose access is serialised by an
// atomic state documented on its type (sample slots by `state`, buckets by `hash`, the
// message ring's data by `head`/`tail`, allocator slots by having one writing thread).
unsafe impl Sync for Shared {}

impl Shared {
    /// The all-zero region: the valid initial state of every part.
    pub const fn zeroed() -> Shared {
        // SAFETY: every field is an integer, an atomic integer, an `UnsafeCell` of integers,
        // or an array of those (see the layout rules in the module doc): all-zero bytes are a
        // valid value of each, and the initial state of each.
        unsafe { core::mem::zeroed() }
    }
}

/// Identity and liveness words at the start of the region.
#[repr(C, align(64))]
pub struct SharedHeader {
    /// [`SHARED_MAGIC`] once the region is set up.
    pub magic: AtomicU64,
    /// [`SHARED_VERSION`].
    pub version: AtomicU32,
    /// Pid of the process that owns the region (a forked child writes its own).
    pub pid: AtomicU32,
    /// [`SHARED_SIZE`].
    pub size: AtomicU64,
    /// [`FINISHED`] once the process sent its last flush (exit, `_exit`): the collector may
    /// end the session as soon as the message ring is empty.
    pub finished: AtomicU32,
    /// Reserved, zero.
    pub reserved: AtomicU32,
    /// CLOCK_MONOTONIC in ms, written by the collector each time it polls the region (0 = no
    /// collector attached yet). The process takes an old value to mean "collector gone".
    pub collector_seen_ms: AtomicU64,
    /// Who empties the sample ring and reports the counters while the process runs:
    /// [`DRAINER_PROCESS`] (its background thread) or [`DRAINER_COLLECTOR`] (a process that
    /// has no thread of ours: a single-threaded program, whose allocator would otherwise pay
    /// for a second thread on every call). Written by the process only.
    pub drainer: AtomicU32,
    /// Whoever reads the sample ring holds this ([`SAMPLE_READER_NONE`] when nobody does):
    /// the ring has one reader at a time. See [`lock_samples`].
    pub sample_reader: AtomicU32,
}

/// A 64-byte cache line holding one value, so producer and consumer words do not share one.
#[repr(C, align(64))]
pub struct CacheLine<T>(pub T);

impl<T> core::ops::Deref for CacheLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

// ---------------------------------------------------------------------------------------
// Sample ring
// ---------------------------------------------------------------------------------------

/// The fixed ring of sample slots between the signal handler (many writers) and one reader at
/// a time ([`SharedHeader::sample_reader`]: the process's background thread or exit flush; the
/// collector for a process without that thread, and after the process died). A slot moves
/// `FREE → WRITING` (writer, compare-exchange), `WRITING → READY` (writer, release),
/// `READY → FREE` (reader, after copying the record).
#[repr(C)]
pub struct SampleRing {
    /// The slots.
    pub slots: [SampleSlot; SAMPLE_SLOTS],
    /// Rotating start index for writers (taken modulo [`SAMPLE_SLOTS`]).
    pub next: AtomicU32,
}

/// One slot of the [`SampleRing`].
#[repr(C)]
pub struct SampleSlot {
    /// [`SAMPLE_FREE`], [`SAMPLE_WRITING`] or [`SAMPLE_READY`].
    pub state: AtomicU32,
    /// Written only by the thread that moved `state` to WRITING; read only after READY.
    pub record: UnsafeCell<SampleRecord>,
}

/// One sample as recorded by the handler.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct SampleRecord {
    /// Thread id.
    pub tid: u32,
    /// `FLAG_*` bits.
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

impl SampleRecord {
    /// A record with no frames.
    pub const EMPTY: SampleRecord = SampleRecord {
        tid: 0,
        flags: 0,
        len: 0,
        time_ns: 0,
        cpu_ns: 0,
        frames: [0; MAX_FRAMES],
    };

    /// The valid frames (`len` is clamped to [`MAX_FRAMES`]).
    pub fn frames(&self) -> &[u64] {
        let n = (self.len as usize).min(MAX_FRAMES);
        self.frames.get(..n).unwrap_or(&[])
    }
}

// ---------------------------------------------------------------------------------------
// Heap bucket table
// ---------------------------------------------------------------------------------------

/// The heap profile's buckets: an open-addressing table plus a frame arena and the order of
/// creation. A bucket is claimed by moving `hash` from [`BUCKET_EMPTY`] to
/// [`BUCKET_WRITING`]; its size and frames are written, then the real hash (≥ 2) is published
/// with release. Its position is then recorded in `order` (index + 1) at the slot handed out
/// by `order_claimed`. Buckets are never removed.
#[repr(C)]
pub struct BucketTable {
    /// The buckets.
    pub buckets: [Bucket; BUCKETS],
    /// Frames of all buckets; a bucket owns `[frames_at, frames_at + frames_len)`.
    pub arena: UnsafeCell<[u64; ARENA_FRAMES]>,
    /// Arena entries handed out (may exceed [`ARENA_FRAMES`] once full).
    pub arena_used: AtomicU32,
    /// Index + 1 of each used bucket in creation order (0 = claimed, not yet written).
    pub order: [AtomicU32; BUCKETS],
    /// Positions of `order` handed out (may exceed [`BUCKETS`] when the table is full).
    pub order_claimed: AtomicU32,
}

/// One heap bucket: an (allocation stack, usable size) pair and the cumulative counts of its
/// sampled allocations and frees.
#[repr(C)]
pub struct Bucket {
    /// [`BUCKET_EMPTY`], [`BUCKET_WRITING`], or the published hash (≥ 2).
    pub hash: AtomicU64,
    /// Usable size; valid once `hash` is published.
    pub size: UnsafeCell<u64>,
    /// Start of the frames in the arena; valid once `hash` is published.
    pub frames_at: UnsafeCell<u32>,
    /// Number of frames; valid once `hash` is published.
    pub frames_len: UnsafeCell<u16>,
    /// Sampled allocations.
    pub alloc_objects: AtomicU64,
    /// Their bytes.
    pub alloc_bytes: AtomicU64,
    /// Sampled allocations freed since.
    pub free_objects: AtomicU64,
    /// Their bytes.
    pub free_bytes: AtomicU64,
}

// ---------------------------------------------------------------------------------------
// Allocator counters
// ---------------------------------------------------------------------------------------

/// Usable sizes below this that are a multiple of 8 (every size glibc, jemalloc and tcmalloc
/// hand out there) are counted per exact size: one increment per call, and the bytes and the
/// size-class histogram follow exactly from the counts when the slots are summed
/// ([`AllocTotals::add_slot`]).
pub const SMALL_LIMIT: u64 = 4096;
/// Counters per direction for the small sizes: index `usable / 8 + 1` (entry 0 is never
/// used), which is glibc's chunk size / 8, so that glibc's hook path indexes with the chunk
/// size as it finds it, without a bounds check.
pub const SMALL_SIZES: usize = (SMALL_LIMIT / 8) as usize + 1;
/// A usable size `u` is counted in the small counters iff `u & SMALL_MASK == 0`.
pub const SMALL_MASK: u64 = !(SMALL_LIMIT - 1) | 7;

/// One thread's exact allocator counters. The owning thread is the only writer (plain loads
/// and stores of atomics); slot 0 is shared and updated with atomic adds. Readers sum the
/// slots `0..=alloc[0].owned` ([`AllocTotals::add_slot`]); counts stay in a slot when its
/// thread exits.
///
/// A block of usable size `u` with `u & SMALL_MASK == 0` counts as one in
/// `small_mallocs[u / 8 + 1]` (`small_frees` when freed); any other block adds `u` to
/// `alloc_bytes` (`free_bytes`) and one to `class_mallocs[size_class(u)]` (`class_frees`).
/// Nothing is ever lost to buffering: a reader after a sudden death sees every call that
/// returned.
#[repr(C, align(64))]
pub struct AllocSlot {
    /// 1 while a thread owns the slot. In slot 0 (never owned): the highest slot index ever
    /// claimed, so that readers need not touch the pages of slots never used.
    pub owned: AtomicU32,
    /// Usable bytes allocated in blocks not counted in `small_mallocs`.
    pub alloc_bytes: AtomicU64,
    /// Usable bytes freed in blocks not counted in `small_frees`.
    pub free_bytes: AtomicU64,
    /// Allocations not counted in `small_mallocs`, per size class (see [`crate::size_class`]).
    pub class_mallocs: [AtomicU64; SIZE_CLASSES],
    /// Frees not counted in `small_frees`, per size class.
    pub class_frees: [AtomicU64; SIZE_CLASSES],
    /// Allocations of usable size `8 * (i - 1)`, for sizes below [`SMALL_LIMIT`].
    pub small_mallocs: [AtomicU64; SMALL_SIZES],
    /// Frees of blocks of usable size `8 * (i - 1)`, for sizes below [`SMALL_LIMIT`].
    pub small_frees: [AtomicU64; SMALL_SIZES],
}

/// The sums over allocator slots: bytes and the size-class histograms (counts are the
/// histograms' sums, so a snapshot's `Mallocs` and `BySize` always agree).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocTotals {
    /// Usable bytes allocated.
    pub alloc_bytes: u64,
    /// Usable bytes freed.
    pub free_bytes: u64,
    /// Allocations per size class.
    pub class_mallocs: [u64; SIZE_CLASSES],
    /// Frees per size class.
    pub class_frees: [u64; SIZE_CLASSES],
}

impl AllocTotals {
    /// Nothing counted.
    pub const ZERO: AllocTotals = AllocTotals {
        alloc_bytes: 0,
        free_bytes: 0,
        class_mallocs: [0; SIZE_CLASSES],
        class_frees: [0; SIZE_CLASSES],
    };

    /// Adds slot `s`, reading each counter with `load` (the collector passes a reader that
    /// checks the address; all arithmetic wraps, as the region may hold anything).
    pub fn add_slot(&mut self, s: &AllocSlot, load: impl Fn(&AtomicU64) -> u64) {
        self.alloc_bytes = self.alloc_bytes.wrapping_add(load(&s.alloc_bytes));
        self.free_bytes = self.free_bytes.wrapping_add(load(&s.free_bytes));
        for (o, c) in self.class_mallocs.iter_mut().zip(s.class_mallocs.iter()) {
            *o = o.wrapping_add(load(c));
        }
        for (o, c) in self.class_frees.iter_mut().zip(s.class_frees.iter()) {
            *o = o.wrapping_add(load(c));
        }
        let small = s.small_mallocs.iter().zip(s.small_frees.iter());
        for (i, (m, f)) in small.enumerate().skip(1) {
            let size = 8 * (i as u64 - 1);
            let class = crate::size_class(size);
            let (m, f) = (load(m), load(f));
            self.alloc_bytes = self.alloc_bytes.wrapping_add(m.wrapping_mul(size));
            self.free_bytes = self.free_bytes.wrapping_add(f.wrapping_mul(size));
            if let Some(o) = self.class_mallocs.get_mut(class) {
                *o = o.wrapping_add(m);
            }
            if let Some(o) = self.class_frees.get_mut(class) {
                *o = o.wrapping_add(f);
            }
        }
    }

    /// Number of allocations.
    pub fn mallocs(&self) -> u64 {
        self.class_mallocs.iter().fold(0, |a, &b| a.wrapping_add(b))
    }

    /// Number of frees.
    pub fn frees(&self) -> u64 {
        self.class_frees.iter().fold(0, |a, &b| a.wrapping_add(b))
    }

    /// Bytes in live blocks.
    pub fn live_bytes(&self) -> u64 {
        self.alloc_bytes.saturating_sub(self.free_bytes)
    }
}

/// The slots a reader must sum: `0..=` the highest index ever claimed (kept in slot 0's
/// `owned`, clamped to the table).
pub fn used_alloc_slots(slots: &[AllocSlot; ALLOC_SLOTS], high: u32) -> &[AllocSlot] {
    let n = (high as usize).min(ALLOC_SLOTS - 1) + 1;
    slots.get(..n).unwrap_or(slots)
}

// ---------------------------------------------------------------------------------------
// Message ring
// ---------------------------------------------------------------------------------------

/// Wire messages from the process to the collector (single producer: the process's thread
/// that holds the drain; single consumer: the collector).
///
/// `head` and `tail` count bytes since the start, never wrap in practice (u64), and are
/// always multiples of 8; the data offset of a position is `pos % MESSAGE_RING_BYTES`. A
/// record is a u32 LE length, a u32 zero, the message, padding to a multiple of 8. A record
/// never wraps: if it does not fit before the end of the data area, the writer puts
/// [`WRAP_MARKER`] as length there and writes the record at offset 0. The writer publishes
/// `head` with release after the bytes; the reader publishes `tail` with release after it
/// copied a record out. A full ring makes the writer return false (the caller drops and
/// counts).
#[repr(C, align(64))]
pub struct MessageRing {
    /// Bytes written (process).
    pub head: CacheLine<AtomicU64>,
    /// Bytes consumed (collector).
    pub tail: CacheLine<AtomicU64>,
    /// The records.
    pub data: UnsafeCell<[u8; MESSAGE_RING_BYTES]>,
}

/// Why the message ring could not be read: the region holds values the writer never writes
/// (the process is broken or hostile). The collector ends the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// `head` is behind `tail`, ahead of it by more than the ring, or not 8-aligned.
    BadPositions {
        /// `head` as read.
        head: u64,
        /// `tail` as read.
        tail: u64,
    },
    /// A record's length is larger than [`MAX_MESSAGE`] or than what was written.
    BadLength(u32),
    /// A record's reserved word is not zero.
    BadRecord,
    /// The caller's buffer is smaller than the record (only [`message_read_into`]).
    BufferTooSmall(usize),
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RingError::BadPositions { head, tail } => write!(
                f,
                "message ring corrupt: head {head}, tail {tail} (the process wrote over \
                 the profiler's shared memory)"
            ),
            RingError::BadLength(n) => write!(
                f,
                "message ring corrupt: record length {n} (the process wrote over the \
                 profiler's shared memory)"
            ),
            RingError::BadRecord => write!(
                f,
                "message ring corrupt: bad record header (the process wrote over the \
                 profiler's shared memory)"
            ),
            RingError::BufferTooSmall(n) => write!(f, "message of {n} bytes: buffer too small"),
        }
    }
}

#[inline]
fn padded(len: usize) -> usize {
    (len + 7) & !7
}

/// Appends `msg` to the ring; false (nothing written) if it does not fit or is longer than
/// [`MAX_MESSAGE`]. No allocation, no syscall, never blocks.
///
/// Only one thread may write at a time (the process's drain holder).
pub fn message_write(ring: &MessageRing, msg: &[u8]) -> bool {
    if msg.len() > MAX_MESSAGE {
        return false;
    }
    let need = RECORD_HEADER + padded(msg.len());
    let head = ring.head.load(Ordering::Relaxed);
    let tail = ring.tail.load(Ordering::Acquire);
    let used = head.wrapping_sub(tail);
    if used > MESSAGE_RING_BYTES as u64 || !head.is_multiple_of(8) {
        // The collector (or the program) wrote nonsense; write nothing rather than overwrite
        // unread data.
        return false;
    }
    let off = (head % MESSAGE_RING_BYTES as u64) as usize;
    let to_end = MESSAGE_RING_BYTES - off;
    let (start, total) = if need <= to_end {
        (off, need)
    } else {
        (0, to_end + need)
    };
    if used + total as u64 > MESSAGE_RING_BYTES as u64 {
        return false;
    }
    let base = ring.data.get().cast::<u8>();
    // SAFETY: `[off, off + to_end)` and `[start, start + need)` lie inside the data area
    // (off < size and off % 8 == 0, so to_end ≥ 8; need ≤ to_end or start = 0 and
    // need ≤ size); they are free space between `head` and `tail + size`, which the reader
    // does not touch until `head` is published below, and we are the only writer.
    unsafe {
        if start != off {
            base.add(off)
                .cast::<[u8; 4]>()
                .write_unaligned(WRAP_MARKER.to_le_bytes());
        }
        let rec = base.add(start);
        rec.cast::<[u8; 4]>()
            .write_unaligned((msg.len() as u32).to_le_bytes());
        rec.add(4).cast::<[u8; 4]>().write_unaligned([0; 4]);
        core::ptr::copy_nonoverlapping(msg.as_ptr(), rec.add(RECORD_HEADER), msg.len());
        let pad = padded(msg.len()) - msg.len();
        core::ptr::write_bytes(rec.add(RECORD_HEADER + msg.len()), 0, pad);
    }
    ring.head
        .store(head.wrapping_add(total as u64), Ordering::Release);
    true
}

/// True when the collector has taken every message written so far.
pub fn message_ring_empty(ring: &MessageRing) -> bool {
    ring.head.load(Ordering::Acquire) == ring.tail.load(Ordering::Acquire)
}

/// Reads a little-endian u32 at `off` of the data area with a volatile read.
///
/// # Safety
/// `ring` points to a mapped [`MessageRing`]; `off + 4 <= MESSAGE_RING_BYTES`.
unsafe fn read_u32(ring: *const MessageRing, off: usize) -> u32 {
    // SAFETY: the caller guarantees the mapping and the bound; `UnsafeCell::raw_get` makes
    // no reference to memory another process may be writing.
    unsafe {
        let base = UnsafeCell::raw_get(core::ptr::addr_of!((*ring).data)).cast::<u8>();
        u32::from_le_bytes(core::ptr::read_volatile(base.add(off).cast::<[u8; 4]>()))
    }
}

/// Copies the next message into `out`: `Ok(Some(len))`, `Ok(None)` when the ring is empty,
/// or an error if the ring holds values the writer never writes (nothing is consumed then).
/// Reads only inside the ring, with volatile reads, and trusts only values it copied.
///
/// Only one thread may read at a time (the collector's session pump).
///
/// # Safety
/// `ring` points to a [`MessageRing`] that stays mapped (readable and writable) for the
/// duration of the call; the memory may be changed by another process at any time.
pub unsafe fn message_read_into(
    ring: *const MessageRing,
    out: &mut [u8],
) -> Result<Option<usize>, RingError> {
    // SAFETY: the caller guarantees the mapping; atomics tolerate concurrent writers.
    let (head_word, tail_word) = unsafe { (&(*ring).head.0, &(*ring).tail.0) };
    let head = head_word.load(Ordering::Acquire);
    let tail = tail_word.load(Ordering::Relaxed);
    if head == tail {
        return Ok(None);
    }
    let mut used = head.wrapping_sub(tail);
    if used > MESSAGE_RING_BYTES as u64 || !head.is_multiple_of(8) || !tail.is_multiple_of(8) {
        return Err(RingError::BadPositions { head, tail });
    }
    let mut pos = tail;
    let mut off = (pos % MESSAGE_RING_BYTES as u64) as usize;
    // SAFETY: off is 8-aligned and < size, so off + 4 ≤ size.
    let mut len = unsafe { read_u32(ring, off) };
    if len == WRAP_MARKER {
        let skip = (MESSAGE_RING_BYTES - off) as u64;
        if skip >= used {
            return Err(RingError::BadPositions { head, tail });
        }
        pos = pos.wrapping_add(skip);
        used -= skip;
        off = 0;
        // SAFETY: offset 0.
        len = unsafe { read_u32(ring, 0) };
    }
    if len as usize > MAX_MESSAGE {
        return Err(RingError::BadLength(len));
    }
    let n = len as usize;
    let need = RECORD_HEADER + padded(n);
    if need as u64 > used || off + need > MESSAGE_RING_BYTES {
        return Err(RingError::BadLength(len));
    }
    // SAFETY: off + 8 ≤ off + need ≤ size.
    if unsafe { read_u32(ring, off + 4) } != 0 {
        return Err(RingError::BadRecord);
    }
    let dst = out.get_mut(..n).ok_or(RingError::BufferTooSmall(n))?;
    // SAFETY: `[off + 8, off + 8 + n)` is inside the data area (checked above); volatile
    // reads of bytes another process may be writing yield some value, never UB on our side.
    unsafe {
        let base = UnsafeCell::raw_get(core::ptr::addr_of!((*ring).data)).cast::<u8>();
        let src = base.add(off + RECORD_HEADER);
        for (i, d) in dst.iter_mut().enumerate() {
            *d = core::ptr::read_volatile(src.add(i));
        }
    }
    tail_word.store(pos.wrapping_add(need as u64), Ordering::Release);
    Ok(Some(n))
}

/// Copies the next message into `out` (cleared first): `Ok(true)` if one was read,
/// `Ok(false)` if the ring is empty. See [`message_read_into`].
///
/// # Safety
/// As [`message_read_into`].
#[cfg(feature = "decode")]
pub unsafe fn message_read_one(
    ring: *const MessageRing,
    out: &mut alloc::vec::Vec<u8>,
) -> Result<bool, RingError> {
    out.clear();
    out.resize(MAX_MESSAGE, 0);
    // SAFETY: forwarded from the caller.
    match unsafe { message_read_into(ring, out) } {
        Ok(Some(n)) => {
            out.truncate(n);
            Ok(true)
        }
        Ok(None) => {
            out.clear();
            Ok(false)
        }
        Err(e) => {
            out.clear();
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Command ring
// ---------------------------------------------------------------------------------------

/// Commands from the collector to the process: `head` counts commands pushed (collector),
/// `tail` commands taken (process); command `i` sits in `slots[i % COMMAND_SLOTS]` as a
/// [`Command::to_word`].
#[repr(C, align(64))]
pub struct CommandRing {
    /// Commands pushed (collector).
    pub head: CacheLine<AtomicU32>,
    /// Commands taken (process).
    pub tail: CacheLine<AtomicU32>,
    /// The commands.
    pub slots: [AtomicU64; COMMAND_SLOTS],
}

const OP_CPU_START: u64 = 1;
const OP_CPU_STOP: u64 = 2;
const OP_THREAD_DUMP: u64 = 3;

impl Command {
    /// The command as one word: operation in the high 32 bits, argument in the low 32.
    pub fn to_word(self) -> u64 {
        let (op, arg) = match self {
            Command::CpuStart(hz) => (OP_CPU_START, hz),
            Command::CpuStop => (OP_CPU_STOP, 0),
            Command::ThreadDump(id) => (OP_THREAD_DUMP, id),
        };
        op << 32 | u64::from(arg)
    }

    /// The command a word stands for; `None` for an unknown operation.
    pub fn from_word(word: u64) -> Option<Command> {
        let arg = word as u32;
        match word >> 32 {
            OP_CPU_START => Some(Command::CpuStart(arg)),
            OP_CPU_STOP => Some(Command::CpuStop),
            OP_THREAD_DUMP => Some(Command::ThreadDump(arg)),
            _ => None,
        }
    }
}

/// Queues a command (collector side); false if the ring is full (the process has not taken
/// the earlier ones) or its positions are corrupt.
pub fn push_command(ring: &CommandRing, cmd: Command) -> bool {
    let head = ring.head.load(Ordering::Relaxed);
    let tail = ring.tail.load(Ordering::Acquire);
    if head.wrapping_sub(tail) >= COMMAND_SLOTS as u32 {
        return false;
    }
    let Some(slot) = ring.slots.get(head as usize % COMMAND_SLOTS) else {
        return false;
    };
    slot.store(cmd.to_word(), Ordering::Relaxed);
    ring.head.store(head.wrapping_add(1), Ordering::Release);
    true
}

/// Takes the next command (process side); `None` when there is none. Unknown words are
/// skipped; corrupt positions discard everything queued.
pub fn pop_command(ring: &CommandRing) -> Option<Command> {
    loop {
        let tail = ring.tail.load(Ordering::Relaxed);
        let head = ring.head.load(Ordering::Acquire);
        if head == tail {
            return None;
        }
        if head.wrapping_sub(tail) > COMMAND_SLOTS as u32 {
            ring.tail.store(head, Ordering::Release);
            return None;
        }
        let word = ring
            .slots
            .get(tail as usize % COMMAND_SLOTS)
            .map_or(0, |s| s.load(Ordering::Relaxed));
        ring.tail.store(tail.wrapping_add(1), Ordering::Release);
        if let Some(cmd) = Command::from_word(word) {
            return Some(cmd);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The Region message
// ---------------------------------------------------------------------------------------

/// What a [`crate::Kind::Region`] message says: the layout and where the region is mapped in
/// the process (the collector, without a descriptor, opens
/// `/proc/PID/map_files/{address:x}-{address+size:x}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// [`SHARED_VERSION`] of the sender.
    pub version: u32,
    /// [`SHARED_SIZE`] of the sender.
    pub size: u64,
    /// Address of the region in the process.
    pub address: u64,
}

/// Encodes a [`crate::Kind::Region`] message.
pub fn encode_region(buf: &mut [u8], r: &RegionInfo) -> Option<usize> {
    let mut w = crate::Writer::message(buf, crate::Kind::Region);
    w.u32(r.version);
    w.u64(r.size);
    w.u64(r.address);
    w.finish()
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::boxed::Box;
    use std::vec::Vec;

    use super::*;

    /// Per-size counts sum to the same bytes and size-class histogram as counting each
    /// block by its size; other sizes add as they are.
    #[test]
    fn alloc_totals_expand_the_per_size_counts() {
        let layout = std::alloc::Layout::new::<AllocSlot>();
        // SAFETY: all-zero is a valid AllocSlot (module doc); non-zero-sized layout, pointer
        // from `alloc_zeroed` with that layout, as Box requires.
        let slot: Box<AllocSlot> =
            unsafe { Box::from_raw(std::alloc::alloc_zeroed(layout).cast::<AllocSlot>()) };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let count = |u: u64, n: u64, alloc: bool| {
            let (small, bytes, classes) = if alloc {
                (&slot.small_mallocs, &slot.alloc_bytes, &slot.class_mallocs)
            } else {
                (&slot.small_frees, &slot.free_bytes, &slot.class_frees)
            };
            if u & SMALL_MASK == 0 {
                small[(u / 8 + 1) as usize].fetch_add(n, Ordering::Relaxed);
            } else {
                bytes.fetch_add(u * n, Ordering::Relaxed);
                classes[crate::size_class(u)].fetch_add(n, Ordering::Relaxed);
            }
        };
        let blocks = [
            (24u64, 5u64),
            (40, 2),
            (4088, 1),
            (4096, 3),
            (100_000, 1),
            (13, 2),
            (0, 1),
        ];
        let mut expect = AllocTotals::ZERO;
        for &(u, n) in &blocks {
            count(u, n, true);
            count(u, 1, false);
            expect.alloc_bytes += u * n;
            expect.free_bytes += u;
            expect.class_mallocs[crate::size_class(u)] += n;
            expect.class_frees[crate::size_class(u)] += 1;
        }
        let mut t = AllocTotals::ZERO;
        t.add_slot(&slot, load);
        assert_eq!(t, expect);
        assert_eq!(t.mallocs(), 15);
        assert_eq!(t.frees(), 7);
    }

    /// A zeroed ring on the heap (4 MiB is too large for a test thread's stack).
    fn ring() -> Box<MessageRing> {
        let layout = std::alloc::Layout::new::<MessageRing>();
        // SAFETY: all-zero is a valid MessageRing (module doc); the layout is non-zero-sized
        // and the pointer comes from `alloc_zeroed` with that layout, as Box requires.
        unsafe {
            let p = std::alloc::alloc_zeroed(layout).cast::<MessageRing>();
            assert!(!p.is_null());
            Box::from_raw(p)
        }
    }

    fn read(r: &MessageRing) -> Result<Option<Vec<u8>>, RingError> {
        let mut buf = std::vec![0u8; MAX_MESSAGE];
        // SAFETY: `r` is a live reference.
        let n = unsafe { message_read_into(r, &mut buf) }?;
        Ok(n.map(|n| buf[..n].to_vec()))
    }

    fn msg(i: u32, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i as usize * 31 + j) as u8).collect()
    }

    #[test]
    fn layout_offsets_are_stable() {
        use core::mem::offset_of;
        // Changing any of these is a layout change: bump SHARED_VERSION.
        assert_eq!(offset_of!(Shared, header), 0);
        assert_eq!(offset_of!(SharedHeader, finished), 24);
        assert_eq!(offset_of!(SharedHeader, collector_seen_ms), 32);
        assert_eq!(offset_of!(SharedHeader, drainer), 40);
        assert_eq!(offset_of!(SharedHeader, sample_reader), 44);
        assert_eq!(offset_of!(Shared, commands), 64);
        assert_eq!(offset_of!(Shared, messages), 320);
        assert_eq!(offset_of!(MessageRing, data), 128);
        std::println!(
            "samples {} buckets {} counters {} alloc {} size {}",
            offset_of!(Shared, samples),
            offset_of!(Shared, buckets),
            offset_of!(Shared, counters),
            offset_of!(Shared, alloc),
            SHARED_SIZE
        );
    }

    #[test]
    fn zeroed_region_is_empty_and_sized_in_pages() {
        assert_eq!(SHARED_SIZE % 4096, 0);
        assert_eq!(core::mem::align_of::<Shared>(), 4096);
        let r = ring();
        assert!(message_ring_empty(&r));
        assert_eq!(read(&r), Ok(None));
    }

    #[test]
    fn messages_round_trip_in_order_across_many_wraps() {
        let r = ring();
        let mut next_read = 0u32;
        let mut written = 0u32;
        // Odd sizes so records pad and the wrap point moves around.
        for round in 0..2000u32 {
            let len = (round as usize * 7919) % 20_000 + 1;
            while !message_write(&r, &msg(written, len)) {
                let got = read(&r).unwrap().expect("full ring must have data");
                assert_eq!(got.len(), (next_read as usize * 7919) % 20_000 + 1);
                assert_eq!(got, msg(next_read, got.len()));
                next_read += 1;
            }
            written += 1;
        }
        while let Some(got) = read(&r).unwrap() {
            assert_eq!(got, msg(next_read, got.len()));
            next_read += 1;
        }
        assert_eq!(next_read, written);
        assert!(r.head.load(Ordering::Relaxed) > 4 * MESSAGE_RING_BYTES as u64);
        assert!(message_ring_empty(&r));
    }

    #[test]
    fn full_ring_refuses_and_keeps_what_it_has() {
        let r = ring();
        let m = msg(1, MAX_MESSAGE);
        let mut n = 0;
        while message_write(&r, &m) {
            n += 1;
        }
        assert_eq!(n, MESSAGE_RING_BYTES / (MAX_MESSAGE + RECORD_HEADER));
        let head = r.head.load(Ordering::Relaxed);
        assert!(!message_write(&r, &m));
        assert_eq!(r.head.load(Ordering::Relaxed), head);
        // A small one may still fit in the remainder.
        for _ in 0..n {
            assert_eq!(read(&r).unwrap().unwrap(), m);
        }
        assert_eq!(read(&r), Ok(None));
        assert!(!message_write(&r, &msg(0, MAX_MESSAGE + 1)));
        assert!(message_write(&r, &[]));
        assert_eq!(read(&r).unwrap().unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn wrap_marker_is_written_and_followed() {
        let r = ring();
        // Fill up to 16 bytes before the end: a 100-byte message must wrap.
        let target = MESSAGE_RING_BYTES - 16;
        let mut filled = 0;
        while filled < target {
            let len = (target - filled - RECORD_HEADER).min(MAX_MESSAGE);
            assert!(message_write(&r, &msg(0, len)));
            assert!(read(&r).unwrap().is_some());
            filled += RECORD_HEADER + padded(len);
        }
        assert_eq!(r.head.load(Ordering::Relaxed) as usize, target);
        assert!(message_write(&r, &msg(9, 100)));
        // SAFETY: test-owned ring, no concurrent writer; the offset is in bounds.
        let marker = unsafe { read_u32(&*r, MESSAGE_RING_BYTES - 16) };
        assert_eq!(marker, WRAP_MARKER);
        assert_eq!(read(&r).unwrap().unwrap(), msg(9, 100));
        assert!(message_ring_empty(&r));
    }

    #[test]
    fn garbage_positions_and_lengths_are_errors_never_reads_outside() {
        let r = ring();
        assert!(message_write(&r, b"hello"));
        let data = r.data.get().cast::<u8>();

        // Head far ahead of tail.
        r.head
            .store(MESSAGE_RING_BYTES as u64 + 8, Ordering::Relaxed);
        assert!(matches!(read(&r), Err(RingError::BadPositions { .. })));
        // Head behind tail.
        r.tail.store(64, Ordering::Relaxed);
        r.head.store(8, Ordering::Relaxed);
        assert!(matches!(read(&r), Err(RingError::BadPositions { .. })));
        // Unaligned.
        r.tail.store(0, Ordering::Relaxed);
        r.head.store(13, Ordering::Relaxed);
        assert!(matches!(read(&r), Err(RingError::BadPositions { .. })));
        // Length larger than what was written.
        r.head.store(16, Ordering::Relaxed);
        // SAFETY: writes inside the test ring's data area.
        unsafe { data.cast::<[u8; 4]>().write((9u32).to_le_bytes()) };
        assert_eq!(read(&r), Err(RingError::BadLength(9)));
        // Length larger than MAX_MESSAGE.
        // SAFETY: as above.
        unsafe { data.cast::<[u8; 4]>().write((u32::MAX - 1).to_le_bytes()) };
        assert_eq!(read(&r), Err(RingError::BadLength(u32::MAX - 1)));
        // Reserved word set.
        // SAFETY: as above.
        unsafe {
            data.cast::<[u8; 4]>().write(5u32.to_le_bytes());
            data.add(4).cast::<[u8; 4]>().write(1u32.to_le_bytes());
        }
        assert_eq!(read(&r), Err(RingError::BadRecord));
        // A wrap marker where nothing follows.
        // SAFETY: as above.
        unsafe { data.cast::<[u8; 4]>().write(WRAP_MARKER.to_le_bytes()) };
        r.head.store(8, Ordering::Relaxed);
        assert!(matches!(read(&r), Err(RingError::BadPositions { .. })));
        // A wrap marker near the end pointing to a record that is too long.
        let off = MESSAGE_RING_BYTES - 8;
        r.tail.store(off as u64, Ordering::Relaxed);
        r.head.store(off as u64 + 8 + 16, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe {
            data.add(off)
                .cast::<[u8; 4]>()
                .write(WRAP_MARKER.to_le_bytes());
            data.cast::<[u8; 4]>().write(100u32.to_le_bytes());
            data.add(4).cast::<[u8; 4]>().write([0; 4]);
        }
        assert_eq!(read(&r), Err(RingError::BadLength(100)));
        // Nothing was consumed by a failed read.
        assert_eq!(r.tail.load(Ordering::Relaxed), off as u64);
        // Random garbage everywhere: errors or messages, never a panic.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            r.head.store(
                (x % (3 * MESSAGE_RING_BYTES as u64)) & !7,
                Ordering::Relaxed,
            );
            r.tail.store(
                x.rotate_left(17) % (3 * MESSAGE_RING_BYTES as u64),
                Ordering::Relaxed,
            );
            let at = (x >> 40) as usize % (MESSAGE_RING_BYTES - 8);
            // SAFETY: as above.
            unsafe {
                data.add(at)
                    .cast::<[u8; 8]>()
                    .write_unaligned(x.to_le_bytes())
            };
            let _ = read(&r);
        }
        // The writer also refuses nonsense positions.
        r.tail.store(0, Ordering::Relaxed);
        r.head
            .store(MESSAGE_RING_BYTES as u64 * 2, Ordering::Relaxed);
        assert!(!message_write(&r, b"x"));
    }

    #[test]
    fn small_buffer_is_an_error() {
        let r = ring();
        assert!(message_write(&r, &[1; 64]));
        let mut small = [0u8; 10];
        // SAFETY: live reference.
        let got = unsafe { message_read_into(&*r, &mut small) };
        assert_eq!(got, Err(RingError::BufferTooSmall(64)));
        assert_eq!(read(&r).unwrap().unwrap(), std::vec![1; 64]);
    }

    #[test]
    fn commands_round_trip_fill_and_skip_garbage() {
        let r = CommandRing {
            head: CacheLine(AtomicU32::new(0)),
            tail: CacheLine(AtomicU32::new(0)),
            slots: [const { AtomicU64::new(0) }; COMMAND_SLOTS],
        };
        for cmd in [
            Command::CpuStart(1000),
            Command::CpuStop,
            Command::ThreadDump(u32::MAX),
        ] {
            assert_eq!(Command::from_word(cmd.to_word()), Some(cmd));
        }
        assert_eq!(Command::from_word(0), None);
        assert_eq!(Command::from_word(99 << 32), None);
        assert_eq!(pop_command(&r), None);
        for i in 0..COMMAND_SLOTS as u32 {
            assert!(push_command(&r, Command::ThreadDump(i)));
        }
        assert!(!push_command(&r, Command::CpuStop));
        for i in 0..COMMAND_SLOTS as u32 {
            assert_eq!(pop_command(&r), Some(Command::ThreadDump(i)));
        }
        assert_eq!(pop_command(&r), None);
        // Positions wrap around u32.
        r.head.store(u32::MAX - 1, Ordering::Relaxed);
        r.tail.store(u32::MAX - 1, Ordering::Relaxed);
        for i in 0..5 {
            assert!(push_command(&r, Command::CpuStart(i)));
        }
        for i in 0..5 {
            assert_eq!(pop_command(&r), Some(Command::CpuStart(i)));
        }
        // An unknown word is skipped.
        assert!(push_command(&r, Command::CpuStop));
        let at = r.tail.load(Ordering::Relaxed) as usize % COMMAND_SLOTS;
        r.slots[at].store(77 << 32, Ordering::Relaxed);
        assert!(push_command(&r, Command::CpuStart(5)));
        assert_eq!(pop_command(&r), Some(Command::CpuStart(5)));
        assert_eq!(pop_command(&r), None);
        // Corrupt positions: everything queued is dropped, nothing panics.
        r.head.store(1000, Ordering::Relaxed);
        r.tail.store(0, Ordering::Relaxed);
        assert_eq!(pop_command(&r), None);
        assert_eq!(r.tail.load(Ordering::Relaxed), 1000);
        r.tail.store(2000, Ordering::Relaxed);
        assert!(!push_command(&r, Command::CpuStop));
    }

    #[test]
    fn region_message_encodes() {
        let mut buf = [0u8; 64];
        let info = RegionInfo {
            version: SHARED_VERSION,
            size: SHARED_SIZE as u64,
            address: 0x7f00_0000_0000,
        };
        let n = encode_region(&mut buf, &info).unwrap();
        assert_eq!(n, crate::HEADER_LEN + 4 + 8 + 8);
        assert_eq!(&buf[6..8], &(crate::Kind::Region as u16).to_le_bytes());
        #[cfg(feature = "decode")]
        assert_eq!(crate::decode(&buf[..n]), Ok(crate::Message::Region(info)));
        #[cfg(feature = "decode")]
        for cut in 0..n {
            assert!(crate::decode(&buf[..cut]).is_err());
        }
    }

    #[cfg(feature = "decode")]
    #[test]
    fn read_one_into_a_vec() {
        let r = ring();
        let mut out = std::vec![7u8; 3];
        // SAFETY: live reference.
        assert_eq!(unsafe { message_read_one(&*r, &mut out) }, Ok(false));
        assert!(out.is_empty());
        assert!(message_write(&r, b"abc"));
        assert!(message_write(&r, b"defgh"));
        // SAFETY: live reference.
        assert_eq!(unsafe { message_read_one(&*r, &mut out) }, Ok(true));
        assert_eq!(out, b"abc");
        // SAFETY: live reference.
        assert_eq!(unsafe { message_read_one(&*r, &mut out) }, Ok(true));
        assert_eq!(out, b"defgh");
    }
}
