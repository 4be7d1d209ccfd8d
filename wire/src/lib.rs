//! The wire protocol between the preload (`libanyprof.so`) and the collector (`anyprof`).
//!
//! One message per `SOCK_SEQPACKET` datagram, so message boundaries come from the socket and
//! a message never needs reassembly. Every message starts with an 8-byte [`Header`]
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
#[cfg(feature = "decode")]
pub use decode::{decode, DecodeError, Hello, Message, Module, Sample};

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
    /// A thread's name (from `/proc/self/task/TID/comm`), sent when first seen or changed.
    ThreadName = 8,
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

/// The preload's counters, by index into the array carried by [`Kind::Counters`] messages.
/// New counters are appended; a decoder ignores indices it does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Counter {
    /// Signals handled that produced a sample record.
    SamplesTaken = 0,
    /// Samples lost because the in-process ring was full.
    DroppedRingFull = 1,
    /// Samples lost because the socket was full or gone.
    DroppedSend = 2,
    /// Samples whose unwind stopped early (also flagged per sample).
    Truncated = 3,
    /// Threads that got a CPU timer.
    ThreadsTimed = 4,
    /// Threads for which a CPU timer could not be created.
    TimerFailures = 5,
    /// Signals that arrived while sampling was not possible (e.g. no unwinder cache free).
    DroppedBusy = 6,
    /// Module-map messages that could not be sent.
    DroppedModules = 7,
}

/// Number of counters this version knows.
pub const COUNTER_COUNT: usize = 8;

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

/// Encodes a hello. `cmdline` is the arguments separated by NUL bytes, as in
/// `/proc/self/cmdline`.
#[allow(clippy::too_many_arguments)]
pub fn encode_hello(
    buf: &mut [u8],
    pid: u32,
    ppid: u32,
    cpu_hz: u32,
    timer: TimerKind,
    start_realtime_ns: u64,
    start_monotonic_ns: u64,
    exe: &[u8],
    cmdline: &[u8],
) -> Option<usize> {
    let mut w = Writer::message(buf, Kind::Hello);
    w.u32(pid);
    w.u32(ppid);
    w.u32(cpu_hz);
    w.u8(timer as u8);
    w.u64(start_realtime_ns);
    w.u64(start_monotonic_ns);
    w.bytes(exe, MAX_PATH);
    w.bytes(cmdline, MAX_CMDLINE);
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
pub struct SampleBatch<'a> {
    w: Writer<'a>,
    count: u32,
}

impl<'a> SampleBatch<'a> {
    /// Starts an empty batch in `buf`.
    pub fn new(buf: &'a mut [u8]) -> SampleBatch<'a> {
        SampleBatch {
            w: Writer::message(buf, Kind::CpuSamples),
            count: 0,
        }
    }

    /// Appends a sample; returns false (and leaves the batch unchanged) if it does not fit.
    pub fn push(&mut self, tid: u32, flags: u8, time_ns: u64, cpu_ns: u64, frames: &[u64]) -> bool {
        let frames = frames.get(..frames.len().min(MAX_FRAMES)).unwrap_or(frames);
        let need = SAMPLE_HEADER_LEN + frames.len() * 8;
        if self.w.remaining() < need {
            return false;
        }
        self.w.u32(tid);
        self.w.u8(flags);
        self.w.u8(0);
        self.w.u16(frames.len() as u16);
        self.w.u64(time_ns);
        self.w.u64(cpu_ns);
        for &f in frames {
            self.w.u64(f);
        }
        self.count += 1;
        true
    }

    /// Samples in the batch.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Length of the encoded message (header plus records).
    pub fn len(&self) -> usize {
        self.w.len()
    }

    /// True when no sample has been pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}
