//! Sessions: everything one connected process has told us, built from its message stream.
//!
//! A connection is read by its own thread ([`read_connection`]); each decoded message is
//! folded into the process's [`Session`]. A message that does not decode ends that
//! connection with an error recorded on the session; nothing else is affected.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyprof_wire::{self as wire, BucketCounts, Counter, Hello, Level, MemStats, Message, Module};

/// Aggregated samples of one stack on one thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackTotals {
    /// Samples.
    pub count: u64,
    /// Thread CPU time they stand for, ns.
    pub cpu_ns: u64,
}

/// Key of aggregated CPU samples: thread, raw frames (leaf first), `FLAG_*` bits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    /// Thread id.
    pub tid: u32,
    /// Raw frames as the preload sent them: the interrupted PC, then return addresses.
    pub frames: Vec<u64>,
    /// `anyprof_wire::FLAG_*`.
    pub flags: u8,
}

/// Most threads kept per thread dump.
const MAX_DUMPED_THREADS: usize = 100_000;
/// Most distinct stacks (CPU) or buckets (heap) one process may report. The preload's own
/// bucket table holds 65 536; a million CPU stacks is far beyond any real profile.
const MAX_DISTINCT_STACKS: usize = 1_000_000;
/// Most modules one process may report.
const MAX_MODULES: usize = 100_000;
/// Most thread names or pending dumps one process may report.
const MAX_THREADS: usize = 1_000_000;

/// One heap bucket as last reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeapBucketState {
    /// Usable size of its allocations.
    pub size: u64,
    /// Allocation stack: return addresses, leaf first.
    pub frames: Vec<u64>,
    /// Cumulative sampled counts.
    pub counts: BucketCounts,
}

/// What one process has sent.
#[derive(Clone, Debug, Default)]
pub struct Session {
    /// The handshake; `None` until it arrives.
    pub hello: Option<Hello>,
    /// Loaded modules by id (unloaded ones are kept: old samples may point into them).
    pub modules: BTreeMap<u32, Module>,
    /// CPU samples aggregated by stack.
    pub cpu: HashMap<StackKey, StackTotals>,
    /// Thread names by tid.
    pub thread_names: HashMap<u32, String>,
    /// Heap buckets by id: usable size, allocation stack (return addresses, leaf first)
    /// and cumulative sampled counts.
    pub heap: HashMap<u32, HeapBucketState>,
    /// The latest exact allocator counters.
    pub mem_stats: Option<MemStats>,
    /// Thread dumps by request id: each thread's stack (tid, frames leaf first, the first
    /// frame being the interrupted PC).
    pub thread_dumps: HashMap<u32, Vec<(u32, Vec<u64>)>>,
    /// Where threads were created: (count, stack of return addresses).
    pub thread_creates: Vec<(u64, Vec<u64>)>,
    /// Latest counters, indexed by [`Counter`].
    pub counters: Vec<u64>,
    /// True once the process said goodbye (its counters are final).
    pub said_goodbye: bool,
    /// First and last sample times (CLOCK_MONOTONIC ns of the process).
    pub sample_span: Option<(u64, u64)>,
    /// When the connection was accepted and when it ended.
    pub connected_at: Option<Instant>,
    /// When the connection ended.
    pub closed_at: Option<Instant>,
    /// Why the stream was cut, if it was.
    pub error: Option<String>,
}

impl Session {
    /// A counter's latest value (0 if never reported).
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters.get(c as usize).copied().unwrap_or(0)
    }

    /// Samples lost in the process, for whatever reason.
    pub fn lost_samples(&self) -> u64 {
        self.counter(Counter::DroppedRingFull)
            .saturating_add(self.counter(Counter::DroppedSend))
            .saturating_add(self.counter(Counter::DroppedBusy))
    }

    /// Identifies one process image: pid and the time the library started in it.
    pub fn image_key(&self) -> Option<(u32, u64)> {
        self.hello.as_ref().map(|h| (h.pid, h.start_monotonic_ns))
    }

    /// The pid from the handshake.
    pub fn pid(&self) -> Option<u32> {
        self.hello.as_ref().map(|h| h.pid)
    }

    /// The program name: the executable's file name, else argv[0]'s.
    pub fn command_name(&self) -> String {
        let Some(h) = &self.hello else {
            return "unknown".into();
        };
        let exe = String::from_utf8_lossy(&h.exe);
        let from_exe = exe.rsplit('/').next().unwrap_or("").to_string();
        if !from_exe.is_empty() {
            return from_exe;
        }
        let argv0 = h.cmdline.split(|&b| b == 0).next().unwrap_or(b"");
        String::from_utf8_lossy(argv0)
            .rsplit('/')
            .next()
            .unwrap_or("unknown")
            .to_string()
    }

    /// Adds what a later connection of the same process sent (after it reconnected).
    pub fn merge(&mut self, later: Session) {
        if self.hello.is_none() {
            self.hello = later.hello;
        }
        self.modules.extend(later.modules);
        for (k, t) in later.cpu {
            let e = self.cpu.entry(k).or_default();
            e.count = e.count.saturating_add(t.count);
            e.cpu_ns = e.cpu_ns.saturating_add(t.cpu_ns);
        }
        self.thread_names.extend(later.thread_names);
        for (id, b) in later.heap {
            let e = self.heap.entry(id).or_default();
            e.size = b.size;
            e.counts = b.counts;
            if !b.frames.is_empty() {
                e.frames = b.frames;
            }
        }
        if later.mem_stats.is_some() {
            self.mem_stats = later.mem_stats;
        }
        self.thread_dumps.extend(later.thread_dumps);
        if !later.thread_creates.is_empty() {
            self.thread_creates = later.thread_creates;
        }
        // Counters are cumulative for the life of the process: the later report wins.
        if !later.counters.is_empty() {
            self.counters = later.counters;
        }
        self.said_goodbye |= later.said_goodbye;
        self.sample_span = match (self.sample_span, later.sample_span) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (x, y) => x.or(y),
        };
        self.connected_at = self
            .connected_at
            .min(later.connected_at)
            .or(self.connected_at.or(later.connected_at));
        self.closed_at = self.closed_at.max(later.closed_at);
        self.error = self.error.take().or(later.error);
    }

    /// Why this session holds more than any real process sends (a hostile or broken stream),
    /// if it does: the connection is then cut, so that one peer cannot take the collector's
    /// memory.
    pub fn over_limits(&self) -> Option<String> {
        let checks = [
            ("distinct CPU stacks", self.cpu.len(), MAX_DISTINCT_STACKS),
            ("heap buckets", self.heap.len(), MAX_DISTINCT_STACKS),
            ("modules", self.modules.len(), MAX_MODULES),
            ("thread names", self.thread_names.len(), MAX_THREADS),
            ("thread dumps", self.thread_dumps.len(), MAX_THREADS),
        ];
        checks
            .iter()
            .find(|(_, n, max)| n > max)
            .map(|(what, n, max)| format!("{n} {what}, over the limit of {max}: connection closed"))
    }

    /// Folds one message into the session. `log` receives the process's own diagnostics.
    pub fn apply(&mut self, msg: Message, log: &mut dyn FnMut(Level, &str)) {
        match msg {
            Message::Hello(h) => self.hello = Some(h),
            Message::ModuleLoaded(m) => {
                self.modules.insert(m.id, m);
            }
            Message::ModuleUnloaded(_) => {}
            Message::CpuSamples(samples) => {
                for s in samples {
                    if s.flags & wire::FLAG_THREAD_DUMP != 0 {
                        let dump = self.thread_dumps.entry(s.cpu_ns as u32).or_default();
                        if dump.len() < MAX_DUMPED_THREADS {
                            dump.push((s.tid, s.frames));
                        }
                        continue;
                    }
                    self.sample_span = Some(match self.sample_span {
                        Some((a, b)) => (a.min(s.time_ns), b.max(s.time_ns)),
                        None => (s.time_ns, s.time_ns),
                    });
                    let t = self
                        .cpu
                        .entry(StackKey {
                            tid: s.tid,
                            frames: s.frames,
                            flags: s.flags,
                        })
                        .or_default();
                    t.count = t.count.saturating_add(1);
                    t.cpu_ns = t.cpu_ns.saturating_add(s.cpu_ns);
                }
            }
            Message::Counters(c) => self.counters = c,
            Message::Goodbye(c) => {
                self.counters = c;
                self.said_goodbye = true;
            }
            Message::Log(level, text) => log(level, &String::from_utf8_lossy(&text)),
            Message::HeapBuckets(buckets) => {
                for b in buckets {
                    let e = self.heap.entry(b.id).or_default();
                    e.size = b.size;
                    e.counts = b.counts;
                    if !b.frames.is_empty() {
                        e.frames = b.frames;
                    }
                }
            }
            Message::MemStats(m) => self.mem_stats = Some(m),
            Message::ThreadCreates(stacks) => self.thread_creates = stacks,
            Message::Control(_) => {} // only the collector sends commands
            Message::ThreadName(tid, name) => {
                self.thread_names
                    .insert(tid, String::from_utf8_lossy(&name).into_owned());
            }
        }
    }
}

/// A session shared between its reader thread and the code that builds profiles.
pub type SharedSession = Arc<Mutex<Session>>;

/// Reads messages from `fd` (a connected `SOCK_SEQPACKET` socket) until it closes, folding
/// them into `session`. `log` receives the process's diagnostics.
pub fn read_connection(
    fd: OwnedFd,
    session: SharedSession,
    trace_mem: bool,
    mut log: impl FnMut(Option<u32>, Level, &str),
) {
    let mut buf = vec![0u8; wire::MAX_MESSAGE + 1];
    if let Ok(mut s) = session.lock() {
        s.connected_at = Some(Instant::now());
    }
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes; MSG_TRUNC makes recv report the
        // datagram's real length so oversized messages are detected.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        let n = n as usize;
        if n == 0 {
            break;
        }
        let Ok(mut s) = session.lock() else { break };
        if n > wire::MAX_MESSAGE {
            s.error = Some(format!(
                "message of {n} bytes exceeds the {} byte limit",
                wire::MAX_MESSAGE
            ));
            break;
        }
        match wire::decode(buf.get(..n).unwrap_or(&[])) {
            Ok(msg) => {
                let pid = s.pid();
                if let (true, Message::MemStats(new)) = (trace_mem, &msg) {
                    let since = s.connected_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
                    let line = crate::summary::mem_trace_line(s.mem_stats.as_ref(), new, since);
                    eprintln!("anyprof[{}]: {line}", pid.unwrap_or(0));
                }
                s.apply(msg, &mut |level, text| log(pid, level, text));
                if let Some(why) = s.over_limits() {
                    s.error = Some(why);
                    break;
                }
            }
            Err(e) => {
                s.error = Some(e.to_string());
                break;
            }
        }
    }
    if let Ok(mut s) = session.lock() {
        s.closed_at = Some(Instant::now());
    }
}
