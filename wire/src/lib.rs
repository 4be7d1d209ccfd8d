//! The wire protocol between the preload (`libanyprof.so`) and the collector (`anyprof`).
//!
//! The process hands over its shared region ([`shared`]) in two `SOCK_SEQPACKET` datagrams
//! ([`Kind::Region`] with the memfd, then [`Kind::Hello`]) and closes its socket; every later
//! message travels as one record of the region's message ring. Either way a message has
//! clear boundaries and never needs reassembly. Every message starts with an 8-byte [`Header`]
//! (magic, protocol version, kind); all integers are little-endian; byte strings are a `u32`
//! length followed by the bytes.
//!
//! The first message of a connection is always [`Kind::Hello`]: it names the process and the
//! settings in force, which lets the collector tell "the library was never loaded" (no
//! connection at all) from "it was loaded but sampled nothing" (a hello, then no samples).
//!
//! Encoding ([`Writer`], [`SampleBatch`]) writes into a caller-supplied buffer, never
//! allocates, never panics and reports overflow by returning `None`: the preload uses it from
//! its background thread and its exit path, where allocation is unwelcome. Decoding
//! ([`decode`], behind the `decode` feature) is for the collector; it treats every byte as
//! hostile and bounds every length by the message it came in.
#![no_std]

#[cfg(feature = "decode")]
extern crate alloc;

#[cfg(feature = "decode")]
mod decode;
pub mod shared;
#[cfg(feature = "decode")]
pub use decode::{decode, DecodeError, HeapBucket, Hello, MemStats, Message, Module, Sample};

/// `"APRF"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"APRF");
/// Bumped whenever a message layout changes; the collector rejects other versions by name.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest message either side sends. Well under the default `SO_SNDBUF` of a Unix socket.
pub const MAX_MESSAGE: usize = 32 * 1024;
/// Deepest stack recorded; deeper stacks are cut at the root end and flagged truncated.
pub const MAX_FRAMES: usize = 128;
/// Size of the fixed message header.
pub const HEADER_LEN: usize = 8;

/// What a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// First message: process identity and settings in force.
    Hello = 1,
    /// A loaded object (executable, shared library, vDSO) and where it sits in memory.
    ModuleLoaded = 2,
    /// An object that was unloaded (dlclose); its id is not reused.
    ModuleUnloaded = 3,
    /// A batch of CPU samples.
    CpuSamples = 4,
    /// Current value of the preload's counters (samples taken, dropped, ...).
    Counters = 5,
    /// A diagnostic for the user; the collector prints it on its own stderr.
    Log = 6,
    /// The process is exiting; the counters that follow are final.
    Goodbye = 7,
    /// A thread's name (`/proc/PID/task/TID/comm`). The preload no longer sends it (it opens
    /// no file periodically); the collector reads the names itself and applies them as this.
    ThreadName = 8,
    /// Heap-profile buckets (stack and size) whose counts changed; see [`HeapBatch`].
    HeapBuckets = 9,
    /// Exact allocator counters (the native `runtime.MemStats`); see [`MemStat`].
    MemStats = 10,
    /// Collector to process: a [`Command`] (start or stop CPU sampling, dump threads).
    Control = 11,
    /// Where threads were created: stacks (return addresses) with counts, cumulative.
    ThreadCreates = 12,
    /// The process's shared region (see [`shared`]): layout version, size and address. Sent
    /// first, in a datagram that carries the region's memfd (or none, on a re-attach).
    Region = 13,
}

impl Kind {
    /// Maps a raw kind back to [`Kind`]; `None` for kinds this version does not know.
    pub fn from_u16(raw: u16) -> Option<Kind> {
        Some(match raw {
            1 => Kind::Hello,
            2 => Kind::ModuleLoaded,
            3 => Kind::ModuleUnloaded,
            4 => Kind::CpuSamples,
            5 => Kind::Counters,
            6 => Kind::Log,
            7 => Kind::Goodbye,
            8 => Kind::ThreadName,
            9 => Kind::HeapBuckets,
            10 => Kind::MemStats,
            11 => Kind::Control,
            12 => Kind::ThreadCreates,
            13 => Kind::Region,
            _ => return None,
        })
    }
}

/// How CPU samples are triggered, as reported in the hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TimerKind {
    /// CPU sampling is off.
    Off = 0,
    /// One `timer_create(CLOCK_THREAD_CPUTIME_ID)` per thread.
    ThreadCpuTimer = 1,
}

/// Sample flag: the unwinder stopped before reaching the root frame.
pub const FLAG_TRUNCATED: u8 = 1;
/// Sample flag: the thread's stack bounds were unknown, so only the leaf was recorded.
pub const FLAG_NO_STACK_BOUNDS: u8 = 2;
/// Sample flag: not a CPU sample but a thread's stack taken for a thread dump (its `cpu_ns`
/// field carries the dump's request id).
pub const FLAG_THREAD_DUMP: u8 = 4;

/// The preload's counters, by index into the array carried by [`Kind::Counters`] messages.
/// New counters are appended; a decoder ignores indices it does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Counter {
    /// Signals handled that produced a sample record.
    SamplesTaken = 0,
    /// Samples lost because the in-process ring was full.
    DroppedRingFull = 1,
    /// Samples lost because the message ring was full or no collector was attached.
    DroppedSend = 2,
    /// Samples whose unwind stopped early (also flagged per sample).
    Truncated = 3,
    /// Threads that got a CPU timer.
    ThreadsTimed = 4,
    /// Threads for which a CPU timer could not be created.
    TimerFailures = 5,
    // 6 was `DroppedBusy`, never incremented (a signal that finds no unwinder cache free
    // records a leaf-only, truncated sample instead); left unused so that old regions read
    // the same.
    /// Module-map messages that could not be sent.
    DroppedModules = 7,
    /// Threads sampled by a perf `cpu-clock` event (the perf CPU source).
    ThreadsPerf = 8,
    /// Threads that were to get a perf event but got a CPU timer instead: the kernel refused
    /// the event (locked-memory budget, permission) or every event slot was taken.
    PerfRefused = 9,
    /// Threads moved from a perf event to a CPU timer because they kept the sampling signal
    /// blocked while they ran.
    PerfBlocked = 10,
    /// Threads given a CPU timer while the perf source was on because anyprof's background
    /// thread was not running (a single-threaded program under `record` runs without it).
    PerfWithoutThread = 11,
}

/// Number of counters this version knows.
pub const COUNTER_COUNT: usize = 12;

/// The fixed header that starts every message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Protocol version of the sender.
    pub version: u16,
    /// Raw kind; see [`Kind::from_u16`].
    pub kind: u16,
}

/// Appends little-endian values to a fixed buffer. Once anything does not fit, the writer is
/// "overflowed": later writes do nothing and [`Writer::finish`] returns `None`.
pub struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
    overflow: bool,
}

impl<'a> Writer<'a> {
    /// Starts a message of `kind` at the beginning of `buf`.
    pub fn message(buf: &'a mut [u8], kind: Kind) -> Writer<'a> {
        let mut w = Writer {
            buf,
            len: 0,
            overflow: false,
        };
        w.u32(MAGIC);
        w.u16(PROTOCOL_VERSION);
        w.u16(kind as u16);
        w
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing has been written (never true after [`Writer::message`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes still free.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.len)
    }

    /// Appends raw bytes.
    pub fn raw(&mut self, bytes: &[u8]) {
        if self.overflow {
            return;
        }
        let end = match self.len.checked_add(bytes.len()) {
            Some(end) if end <= self.buf.len() => end,
            _ => {
                self.overflow = true;
                return;
            }
        };
        if let Some(dst) = self.buf.get_mut(self.len..end) {
            dst.copy_from_slice(bytes);
            self.len = end;
        } else {
            self.overflow = true;
        }
    }

    /// Appends a byte.
    pub fn u8(&mut self, v: u8) {
        self.raw(&[v]);
    }
    /// Appends a little-endian u16.
    pub fn u16(&mut self, v: u16) {
        self.raw(&v.to_le_bytes());
    }
    /// Appends a little-endian u32.
    pub fn u32(&mut self, v: u32) {
        self.raw(&v.to_le_bytes());
    }
    /// Appends a little-endian u64.
    pub fn u64(&mut self, v: u64) {
        self.raw(&v.to_le_bytes());
    }
    /// Appends a length-prefixed byte string, cut to `max` bytes.
    pub fn bytes(&mut self, v: &[u8], max: usize) {
        let v = v.get(..max.min(v.len())).unwrap_or(v);
        self.u32(v.len() as u32);
        self.raw(v);
    }

    /// The finished message, or `None` if something did not fit.
    pub fn finish(self) -> Option<usize> {
        if self.overflow {
            None
        } else {
            Some(self.len)
        }
    }
}

/// Longest executable path or module path sent.
pub const MAX_PATH: usize = 4096;
/// Longest command line sent (NUL-separated arguments).
pub const MAX_CMDLINE: usize = 16 * 1024;
/// Longest build id sent.
pub const MAX_BUILD_ID: usize = 64;
/// Longest log line sent.
pub const MAX_LOG: usize = 1024;

/// What the hello says about the process and the settings in force.
#[derive(Clone, Copy, Debug)]
pub struct HelloInfo<'a> {
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// CPU samples per second of thread CPU time requested (0 = off).
    pub cpu_hz: u32,
    /// How CPU samples are triggered.
    pub timer: TimerKind,
    /// Mean bytes between heap samples (0 = heap profiling off, 1 = every allocation).
    pub mem_rate: u64,
    /// Wall-clock time at load, ns since the Unix epoch.
    pub start_realtime_ns: u64,
    /// CLOCK_MONOTONIC at load, ns.
    pub start_monotonic_ns: u64,
    /// Path of the executable.
    pub exe: &'a [u8],
    /// The arguments separated by NUL bytes, as in `/proc/self/cmdline`.
    pub cmdline: &'a [u8],
}

/// Byte offset of the pid in an encoded hello (a forked child patches its copy).
pub const HELLO_PID_AT: usize = HEADER_LEN;
/// Byte offset of the parent pid in an encoded hello.
pub const HELLO_PPID_AT: usize = HEADER_LEN + 4;
/// Byte offset of the wall-clock start time in an encoded hello.
pub const HELLO_REALTIME_AT: usize = HEADER_LEN + 4 + 4 + 4 + 1 + 8;
/// Byte offset of the CLOCK_MONOTONIC start time in an encoded hello.
pub const HELLO_MONOTONIC_AT: usize = HELLO_REALTIME_AT + 8;

/// Encodes a hello.
pub fn encode_hello(buf: &mut [u8], h: &HelloInfo<'_>) -> Option<usize> {
    let mut w = Writer::message(buf, Kind::Hello);
    w.u32(h.pid);
    w.u32(h.ppid);
    w.u32(h.cpu_hz);
    w.u8(h.timer as u8);
    w.u64(h.mem_rate);
    w.u64(h.start_realtime_ns);
    w.u64(h.start_monotonic_ns);
    w.bytes(h.exe, MAX_PATH);
    w.bytes(h.cmdline, MAX_CMDLINE);
    w.finish()
}

/// One loaded object as the preload sees it. Addresses are runtime addresses (AVMA).
#[derive(Clone, Copy, Debug)]
pub struct ModuleInfo<'a> {
    /// Id chosen by the preload, unique for the life of the connection.
    pub id: u32,
    /// Start of the executable range.
    pub start: u64,
    /// End (exclusive) of the executable range.
    pub end: u64,
    /// File offset of the first byte of the executable range (as in `/proc/self/maps`).
    pub file_offset: u64,
    /// Load bias: runtime address minus the address stated in the ELF file.
    pub load_bias: u64,
    /// Path of the object as the dynamic loader names it.
    pub path: &'a [u8],
    /// Contents of the GNU build-id note, empty if there is none.
    pub build_id: &'a [u8],
}

/// Encodes a loaded module.
pub fn encode_module_loaded(buf: &mut [u8], m: &ModuleInfo<'_>) -> Option<usize> {
    let mut w = Writer::message(buf, Kind::ModuleLoaded);
    w.u32(m.id);
    w.u64(m.start);
    w.u64(m.end);
    w.u64(m.file_offset);
    w.u64(m.load_bias);
    w.bytes(m.path, MAX_PATH);
    w.bytes(m.build_id, MAX_BUILD_ID);
    w.finish()
}

/// Encodes an unloaded module.
pub fn encode_module_unloaded(buf: &mut [u8], id: u32) -> Option<usize> {
    let mut w = Writer::message(buf, Kind::ModuleUnloaded);
    w.u32(id);
    w.finish()
}

/// Encodes the counters (kind [`Kind::Counters`], or [`Kind::Goodbye`] for the final ones).
pub fn encode_counters(buf: &mut [u8], kind: Kind, counters: &[u64]) -> Option<usize> {
    let mut w = Writer::message(buf, kind);
    let n = counters.len().min(u16::MAX as usize);
    w.u16(n as u16);
    for &c in counters.iter().take(n) {
        w.u64(c);
    }
    w.finish()
}

/// Log levels of [`Kind::Log`] messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    /// Something the user should act on.
    Warn = 1,
    /// Informational.
    Info = 2,
}

/// Encodes a log message.
pub fn encode_log(buf: &mut [u8], level: Level, text: &[u8]) -> Option<usize> {
    let mut w = Writer::message(buf, Kind::Log);
    w.u8(level as u8);
    w.bytes(text, MAX_LOG);
    w.finish()
}

/// Longest thread name sent (Linux allows 15 bytes).
pub const MAX_THREAD_NAME: usize = 64;

/// Encodes a thread's name.
pub fn encode_thread_name(buf: &mut [u8], tid: u32, name: &[u8]) -> Option<usize> {
    let mut w = Writer::message(buf, Kind::ThreadName);
    w.u32(tid);
    w.bytes(name, MAX_THREAD_NAME);
    w.finish()
}

/// Size of a sample record without its frames.
pub const SAMPLE_HEADER_LEN: usize = 4 + 1 + 1 + 2 + 8 + 8;

/// Packs CPU samples into one [`Kind::CpuSamples`] message.
///
/// Record layout: tid u32, flags u8, reserved u8, frame count u16, time (CLOCK_MONOTONIC ns)
/// u64, thread CPU time since the thread's previous sample (ns) u64, then the frames as u64,
/// leaf first. Frame 0 is the interrupted instruction pointer; later frames are return
/// addresses exactly as found on the stack (the collector applies the "minus one").
pub struct SampleBatch<'a>(Batch<'a>);

impl<'a> core::ops::Deref for SampleBatch<'a> {
    type Target = Batch<'a>;
    fn deref(&self) -> &Batch<'a> {
        &self.0
    }
}

impl<'a> SampleBatch<'a> {
    /// Starts an empty batch in `buf`.
    pub fn new(buf: &'a mut [u8]) -> SampleBatch<'a> {
        SampleBatch(Batch::new(buf, Kind::CpuSamples))
    }

    /// Appends a sample; returns false (and leaves the batch unchanged) if it does not fit.
    pub fn push(&mut self, tid: u32, flags: u8, time_ns: u64, cpu_ns: u64, frames: &[u64]) -> bool {
        let frames = frames.get(..frames.len().min(MAX_FRAMES)).unwrap_or(frames);
        self.0.push(SAMPLE_HEADER_LEN + frames.len() * 8, |w| {
            w.u32(tid);
            w.u8(flags);
            w.u8(0);
            w.u16(frames.len() as u16);
            w.u64(time_ns);
            w.u64(cpu_ns);
            for &f in frames {
                w.u64(f);
            }
        })
    }
}

/// A message of variable-length records: the part [`SampleBatch`] and [`HeapBatch`] share
/// (they dereference to it for [`Batch::count`], [`Batch::len`] and [`Batch::is_empty`]).
pub struct Batch<'a> {
    w: Writer<'a>,
    count: u32,
}

impl<'a> Batch<'a> {
    fn new(buf: &'a mut [u8], kind: Kind) -> Batch<'a> {
        Batch {
            w: Writer::message(buf, kind),
            count: 0,
        }
    }

    /// Records in the batch.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Length of the encoded message (header plus records).
    pub fn len(&self) -> usize {
        self.w.len()
    }

    /// True when no record has been pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Writes one record of `need` bytes with `write`, if it fits whole.
    fn push(&mut self, need: usize, write: impl FnOnce(&mut Writer<'a>)) -> bool {
        if self.w.remaining() < need {
            return false;
        }
        write(&mut self.w);
        self.count += 1;
        true
    }
}

/// Size of a heap bucket record without its frames.
pub const BUCKET_HEADER_LEN: usize = 4 + 2 + 2 + 8 + 4 * 8;

/// Packs heap buckets into one [`Kind::HeapBuckets`] message.
///
/// A bucket is one (allocation stack, usable size) pair with the counts of its *sampled*
/// allocations, cumulative for the life of the process, as Go's `runtime.MemProfileRecord`:
/// allocated objects and bytes, freed objects and bytes. The collector unbiases them.
/// Record layout: id u32, frame count u16, reserved u16, size u64, alloc objects u64, alloc
/// bytes u64, free objects u64, free bytes u64, then the frames (return addresses, leaf
/// first). Frames are sent with a bucket's first report only; later reports have none.
pub struct HeapBatch<'a>(Batch<'a>);

impl<'a> core::ops::Deref for HeapBatch<'a> {
    type Target = Batch<'a>;
    fn deref(&self) -> &Batch<'a> {
        &self.0
    }
}

/// The counts of one heap bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketCounts {
    /// Sampled allocations.
    pub alloc_objects: u64,
    /// Their bytes.
    pub alloc_bytes: u64,
    /// Sampled allocations freed since.
    pub free_objects: u64,
    /// Their bytes.
    pub free_bytes: u64,
}

impl<'a> HeapBatch<'a> {
    /// Starts an empty batch in `buf`.
    pub fn new(buf: &'a mut [u8]) -> HeapBatch<'a> {
        HeapBatch(Batch::new(buf, Kind::HeapBuckets))
    }

    /// Appends a bucket; returns false (and leaves the batch unchanged) if it does not fit.
    pub fn push(&mut self, id: u32, size: u64, counts: &BucketCounts, frames: &[u64]) -> bool {
        let frames = frames.get(..frames.len().min(MAX_FRAMES)).unwrap_or(frames);
        self.0.push(BUCKET_HEADER_LEN + frames.len() * 8, |w| {
            w.u32(id);
            w.u16(frames.len() as u16);
            w.u16(0);
            w.u64(size);
            w.u64(counts.alloc_objects);
            w.u64(counts.alloc_bytes);
            w.u64(counts.free_objects);
            w.u64(counts.free_bytes);
            for &f in frames {
                w.u64(f);
            }
        })
    }
}

/// Fields of a [`Kind::MemStats`] message, by index. Appended to, never reordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum MemStat {
    /// Allocations (malloc, calloc, realloc's new block, memalign family).
    Mallocs = 0,
    /// Frees (free, realloc's old block).
    Frees = 1,
    /// Usable bytes of all allocations, ever.
    AllocBytes = 2,
    /// Usable bytes of all frees, ever.
    FreeBytes = 3,
    /// Highest live bytes seen by the background thread (checked every 20 ms).
    PeakLiveBytes = 4,
    /// Resident set size now. The preload sends 0 (it opens no file periodically); the
    /// collector fills it from `/proc/PID/statm`.
    RssBytes = 5,
    /// Peak resident set size, from `getrusage` (`ru_maxrss`).
    MaxRssBytes = 6,
    /// Sampled allocations whose pointer could not be remembered (table full): their frees
    /// go unseen, so in-use figures are overstated by them.
    LiveTableFull = 7,
    /// Sampled allocations not recorded because the bucket table was full.
    BucketsFull = 8,
    /// Bytes the profiler itself holds for heap profiling (tables, stacks).
    ProfilerBytes = 9,
}

/// Number of [`MemStat`] fields this version sends.
pub const MEM_STAT_COUNT: usize = 10;

/// Size classes of the histogram: class `c` holds usable sizes in `(2^(c-1), 2^c]`; class 0
/// holds sizes 0 and 1, class 64 everything above 2^63.
pub const SIZE_CLASSES: usize = 65;

/// The size class of a usable size (see [`SIZE_CLASSES`]).
#[inline]
pub fn size_class(size: u64) -> usize {
    if size <= 1 {
        0
    } else {
        (64 - (size - 1).leading_zeros()) as usize
    }
}

/// Upper bound of size class `c`.
pub fn size_class_limit(c: usize) -> u64 {
    1u64.checked_shl(c as u32).unwrap_or(u64::MAX)
}

/// Encodes exact allocator counters and the size-class histogram.
pub fn encode_mem_stats(
    buf: &mut [u8],
    fields: &[u64],
    mallocs: &[u64],
    frees: &[u64],
) -> Option<usize> {
    let mut w = Writer::message(buf, Kind::MemStats);
    w.u16(fields.len().min(256) as u16);
    for &f in fields.iter().take(256) {
        w.u64(f);
    }
    let classes = mallocs.len().min(frees.len()).min(256);
    w.u16(classes as u16);
    for (m, f) in mallocs.iter().zip(frees).take(classes) {
        w.u64(*m);
        w.u64(*f);
    }
    w.finish()
}

/// Default mean bytes between heap samples, as Go's `runtime.MemProfileRate`.
pub const DEFAULT_MEM_RATE: u64 = 512 * 1024;

/// Parses a byte count as users write it: `524288`, `512KiB`, `512k`, `1MiB`, `2M`, `1GiB`.
/// Suffixes are binary (K = KiB = 1024) and case-insensitive; `B` alone is allowed.
/// `None` for anything else, including overflow.
pub fn parse_byte_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, suffix) = t.split_at(digits);
    let n: u64 = num.parse().ok()?;
    let suffix = suffix.trim();
    let is = |names: &[&str]| names.iter().any(|n| n.eq_ignore_ascii_case(suffix));
    let unit: u64 = if is(&["", "b"]) {
        1
    } else if is(&["k", "kb", "kib"]) {
        1 << 10
    } else if is(&["m", "mb", "mib"]) {
        1 << 20
    } else if is(&["g", "gb", "gib"]) {
        1 << 30
    } else {
        return None;
    };
    n.checked_mul(unit)
}

#[cfg(test)]
mod byte_size_tests {
    use super::parse_byte_size;

    #[test]
    fn parses_plain_and_suffixed_sizes() {
        assert_eq!(parse_byte_size("524288"), Some(524288));
        assert_eq!(parse_byte_size("512KiB"), Some(524288));
        assert_eq!(parse_byte_size("512k"), Some(524288));
        assert_eq!(parse_byte_size("1 MiB"), Some(1 << 20));
        assert_eq!(parse_byte_size("1"), Some(1));
        assert_eq!(parse_byte_size("0"), Some(0));
        assert_eq!(parse_byte_size("2G"), Some(2 << 30));
        for bad in ["", "k", "12 parsecs", "-1", "1.5M", "99999999999999999999"] {
            assert_eq!(parse_byte_size(bad), None, "{bad}");
        }
    }
}

/// What the collector asks a process to do ([`Kind::Control`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Start CPU sampling at this many samples per second of thread CPU time.
    CpuStart(u32),
    /// Stop CPU sampling (delete every timer).
    CpuStop,
    /// Record every thread's current stack, tagged with this request id.
    ThreadDump(u32),
}

/// Encodes a command.
pub fn encode_command(buf: &mut [u8], cmd: Command) -> Option<usize> {
    let mut w = Writer::message(buf, Kind::Control);
    let (op, arg) = match cmd {
        Command::CpuStart(hz) => (1u8, hz),
        Command::CpuStop => (2, 0),
        Command::ThreadDump(id) => (3, id),
    };
    w.u8(op);
    w.u32(arg);
    w.finish()
}

/// Decodes a command; the preload uses this, so it needs no allocation.
pub fn decode_command(buf: &[u8]) -> Option<Command> {
    let header = buf.get(..HEADER_LEN)?;
    if header.get(..4)? != MAGIC.to_le_bytes()
        || header.get(4..6)? != PROTOCOL_VERSION.to_le_bytes()
        || header.get(6..8)? != (Kind::Control as u16).to_le_bytes()
    {
        return None;
    }
    let op = *buf.get(HEADER_LEN)?;
    let arg = u32::from_le_bytes(buf.get(HEADER_LEN + 1..HEADER_LEN + 5)?.try_into().ok()?);
    match op {
        1 => Some(Command::CpuStart(arg)),
        2 => Some(Command::CpuStop),
        3 => Some(Command::ThreadDump(arg)),
        _ => None,
    }
}

/// Encodes thread-creation stacks: a u32 count, then per stack: count u64, frame count u16,
/// frames (return addresses, leaf first).
pub fn encode_thread_creates<'s>(
    buf: &mut [u8],
    stacks: impl Iterator<Item = (u64, &'s [u64])>,
) -> Option<usize> {
    let mut w = Writer::message(buf, Kind::ThreadCreates);
    let mut n = 0u32;
    // Count first so the decoder can bound its work; stacks that do not fit are left out.
    let count_at = w.len();
    w.u32(0);
    for (count, frames) in stacks {
        let frames = frames.get(..frames.len().min(MAX_FRAMES)).unwrap_or(frames);
        if w.remaining() < 10 + frames.len() * 8 {
            break;
        }
        w.u64(count);
        w.u16(frames.len() as u16);
        for &f in frames {
            w.u64(f);
        }
        n += 1;
    }
    let len = w.finish()?;
    if let Some(slot) = buf.get_mut(count_at..count_at + 4) {
        slot.copy_from_slice(&n.to_le_bytes());
    }
    Some(len)
}
