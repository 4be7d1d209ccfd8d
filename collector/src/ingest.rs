//! Sessions: everything one connected process has told us, built from its message stream.
//!
//! A connection is read by its own thread ([`read_connection`]); each decoded message is
//! folded into the process's [`Session`]. A message that does not decode ends that
//! connection with an error recorded on the session; nothing else is affected.
//!
//! A peer is not trusted: who it is comes from the kernel ([`Peer`], `SO_PEERCRED`), not from
//! its handshake, and what it may make the collector keep is capped in bytes
//! ([`Session::max_bytes`]): past the cap, whatever would need more memory is dropped and
//! counted, with one warning.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyprof_wire::{
    self as wire, BucketCounts, Counter, Hello, Level, MemStat, MemStats, Message, Module,
};

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
/// Most thread dumps kept per process: a dump is fetched by the request that asked for it
/// right after it arrives, so older ones are only a peer filling memory.
const MAX_KEPT_DUMPS: usize = 8;
/// Most lines of a process's own diagnostics printed; a flood is cut with one notice.
const MAX_LOG_LINES: u32 = 1000;
/// Default per-process memory cap of `anyprof serve` (`--max-process-memory`), in MiB.
pub const DEFAULT_MAX_PROCESS_MIB: usize = 256;
/// Default of `serve --max-user-memory`, in MiB: what all the processes of one user may make
/// the daemon keep together.
pub const DEFAULT_MAX_USER_MIB: usize = 2048;
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

/// Who is at the other end of a connection, as the kernel saw it when the process connected
/// (`SO_PEERCRED`), with its supplementary groups (`/proc/PID/status`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Process id in the collector's pid namespace.
    pub pid: u32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups (empty if they could not be read).
    pub groups: Vec<u32>,
    /// When that process started (clock ticks after boot, `/proc/PID/stat`), to tell it from
    /// a later process that got the same pid; `None` if it could not be read.
    pub start_time: Option<u64>,
}

impl Peer {
    /// The credentials of the process connected on `fd`, or `None` if the kernel will not
    /// say.
    pub fn of_socket(fd: &impl std::os::fd::AsFd) -> Option<Peer> {
        let cred =
            nix::sys::socket::getsockopt(fd, nix::sys::socket::sockopt::PeerCredentials).ok()?;
        // 0 for a process of an ancestor pid namespace, which has no pid in ours.
        let pid = u32::try_from(cred.pid()).ok()?;
        Some(Peer {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            groups: supplementary_groups(pid, cred.uid(), cred.gid()),
            start_time: start_time(pid),
        })
    }

    /// The credentials of process `pid` as `/proc/PID/status` gives them (effective uid
    /// and gid, supplementary groups), for a process that did not connect (`anyprof attach`);
    /// `None` if it cannot be read.
    pub fn of_process(pid: u32) -> Option<Peer> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let effective = |key: &str| -> Option<u32> {
            let line = status.lines().find_map(|l| l.strip_prefix(key))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        let (uid, gid) = (effective("Uid:")?, effective("Gid:")?);
        Some(Peer {
            pid,
            uid,
            gid,
            groups: supplementary_groups(pid, uid, gid),
            start_time: start_time(pid),
        })
    }

    /// Whether the process that connected still runs under its pid. A connection can
    /// outlive its process (a child made with `clone` and no `CLONE_VM` keeps the socket);
    /// once the pid is reused, the session must not be shown as that new process's.
    pub fn still_running(&self) -> bool {
        self.start_time.is_some() && start_time(self.pid) == self.start_time
    }

    /// The rights the symbolizer opens this process's files with.
    pub fn access(&self) -> anyprof_symbolizer::Access {
        anyprof_symbolizer::Access::new(self.uid, self.gid, self.groups.clone())
    }
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks after boot.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces and parentheses.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The `Groups:` line of `/proc/PID/status`, if that process still has effective uid `uid`
/// and gid `gid` (else the pid may have been reused already); empty otherwise (fewer
/// rights, never more).
fn supplementary_groups(pid: u32, uid: u32, gid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|rest| {
                rest.split_whitespace()
                    .filter_map(|v| v.parse::<u32>().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    // Real, effective, saved, file-system ids: the effective ones are SO_PEERCRED's.
    if field("Uid:").get(1) != Some(&uid) || field("Gid:").get(1) != Some(&gid) {
        return Vec::new();
    }
    field("Groups:")
}

/// The bytes all the sessions of one user may keep together (`serve --max-user-memory`).
#[derive(Debug)]
pub struct UserBudget {
    used: AtomicUsize,
    max: usize,
}

impl UserBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> UserBudget {
        UserBudget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    /// Counts `bytes` if they fit.
    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.max)
            })
            .is_ok()
    }

    /// Stops counting `bytes`.
    fn give_back(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    /// Bytes counted now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// What one process has sent.
#[derive(Clone, Debug, Default)]
pub struct Session {
    /// Who connected, as the kernel says; `None` for sessions not read from a socket.
    pub peer: Option<Peer>,
    /// Most bytes this session may keep (stacks, modules, names, dumps, buckets); `None` for
    /// no cap. Set when the connection is accepted.
    pub max_bytes: Option<usize>,
    /// Bytes this session keeps, as counted against `max_bytes` (an estimate of its heap use).
    pub kept_bytes: usize,
    /// The budget shared by every connection of the same user, so that many connections
    /// cannot multiply `max_bytes`; `None` for no such cap.
    pub user_budget: Option<Arc<UserBudget>>,
    /// Whether something was dropped because the user's budget, not this session's cap, was
    /// spent (for the warning).
    pub over_user_budget: bool,
    /// Items (new stacks, modules, names, dump entries, buckets) dropped at the memory cap.
    pub dropped_over_cap: u64,
    /// CPU samples among them, also counted as lost samples.
    pub cpu_dropped_over_cap: u64,
    /// Thread-dump ids in arrival order with the bytes counted for each, oldest first.
    pub dump_order: VecDeque<(u32, usize)>,
    /// Diagnostic lines of the process printed so far.
    pub log_lines: u32,
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
    /// The most live bytes the collector saw in the process's region (a process without a
    /// thread of ours reports its peak only when it flushes); folded into every
    /// `PeakLiveBytes` ([`keep_peaks`]).
    pub live_peak_seen: u64,
    /// Thread dumps by request id: each thread's stack (tid, frames leaf first, the first
    /// frame being the interrupted PC).
    pub thread_dumps: HashMap<u32, Vec<(u32, Vec<u64>)>>,
    /// Where threads were created: (count, stack of return addresses).
    pub thread_creates: Vec<(u64, Vec<u64>)>,
    /// Latest counters, indexed by [`Counter`].
    pub counters: Vec<u64>,
    /// True once the process said goodbye (its counters are final).
    pub said_goodbye: bool,
    /// True when the process ended without its last flush (killed, crashed, `_exit`, exec)
    /// and what it left in its shared region was read (its counters are final too).
    pub read_at_death: bool,
    /// First and last sample times (CLOCK_MONOTONIC ns of the process).
    pub sample_span: Option<(u64, u64)>,
    /// When the connection was accepted and when it ended.
    pub connected_at: Option<Instant>,
    /// When the connection ended.
    pub closed_at: Option<Instant>,
    /// When the last `--memstats` line was printed (seconds since `connected_at`).
    pub mem_trace_at: Option<f64>,
    /// Why the stream was cut, if it was.
    pub error: Option<String>,
}

impl Session {
    /// A counter's latest value (0 if never reported).
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters.get(c as usize).copied().unwrap_or(0)
    }

    /// How long the connection lasted (for an attached process: the profile), if it ended.
    pub fn connected_for(&self) -> Option<std::time::Duration> {
        Some(self.closed_at?.duration_since(self.connected_at?))
    }

    /// Samples lost in the process, for whatever reason, or here at the memory cap.
    pub fn lost_samples(&self) -> u64 {
        self.counter(Counter::DroppedRingFull)
            .saturating_add(self.counter(Counter::DroppedSend))
            .saturating_add(self.cpu_dropped_over_cap)
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
        if self.peer.is_none() {
            self.peer = later.peer;
        }
        self.kept_bytes = self.kept_bytes.saturating_add(later.kept_bytes);
        self.dropped_over_cap = self.dropped_over_cap.saturating_add(later.dropped_over_cap);
        self.cpu_dropped_over_cap = self
            .cpu_dropped_over_cap
            .saturating_add(later.cpu_dropped_over_cap);
        self.dump_order.extend(later.dump_order);
        self.log_lines = self.log_lines.saturating_add(later.log_lines);
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
        self.live_peak_seen = self.live_peak_seen.max(later.live_peak_seen);
        if let Some(mut m) = later.mem_stats {
            keep_peaks(self.mem_stats.as_ref(), self.live_peak_seen, &mut m);
            self.mem_stats = Some(m);
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
        self.read_at_death |= later.read_at_death;
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

    /// Decodes one encoded message (`what` names where it came from, for the error) and
    /// applies it; false, with the session's error set, if it does not decode or puts the
    /// session over its limits.
    pub fn apply_encoded(
        &mut self,
        bytes: &[u8],
        what: &str,
        log: &mut dyn FnMut(Level, &str),
    ) -> bool {
        match wire::decode(bytes) {
            Ok(msg) => {
                self.apply(msg, log);
                match self.over_limits() {
                    Some(why) => {
                        self.error = Some(why);
                        false
                    }
                    None => true,
                }
            }
            Err(e) => {
                self.error = Some(format!("{what}: {e}"));
                false
            }
        }
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

    /// Folds one message into the session. `log` receives the process's own diagnostics, and
    /// the one warning given when the session reaches its memory cap.
    pub fn apply(&mut self, msg: Message, log: &mut dyn FnMut(Level, &str)) {
        let dropped_before = self.dropped_over_cap;
        match msg {
            Message::Hello(mut h) => {
                // (A peer of an ancestor pid namespace, the host seen from a container, has no
                // pid here: it keeps the one it states.)
                if let Some(peer) = self.peer.as_ref().filter(|p| p.pid != 0) {
                    if h.pid != peer.pid {
                        // Another pid namespace (a container) numbers it differently; a peer
                        // could also lie. The kernel's number is the one the host's tools and
                        // `?pid=` use, and it cannot be claimed by another process.
                        log(
                            Level::Info,
                            &format!(
                                "the process says it is pid {}; the kernel says {} (another pid \
                                 namespace?): it is listed as {}",
                                h.pid, peer.pid, peer.pid
                            ),
                        );
                        h.pid = peer.pid;
                    }
                }
                let bytes = hello_bytes(&h);
                let old = self.hello.as_ref().map_or(0, hello_bytes);
                self.release(old);
                if self.admit(bytes) {
                    self.hello = Some(h);
                } else {
                    self.hello = None;
                }
            }
            Message::ModuleLoaded(m) => {
                let old = self.modules.get(&m.id).map_or(0, module_bytes);
                self.release(old);
                if self.admit(module_bytes(&m)) {
                    self.modules.insert(m.id, m);
                } else {
                    self.modules.remove(&m.id);
                }
            }
            Message::ModuleUnloaded(_) => {}
            Message::CpuSamples(samples) => {
                for s in samples {
                    if s.flags & wire::FLAG_THREAD_DUMP != 0 {
                        self.add_dump_entry(s.cpu_ns as u32, s.tid, s.frames);
                        continue;
                    }
                    self.sample_span = Some(match self.sample_span {
                        Some((a, b)) => (a.min(s.time_ns), b.max(s.time_ns)),
                        None => (s.time_ns, s.time_ns),
                    });
                    let key = StackKey {
                        tid: s.tid,
                        frames: s.frames,
                        flags: s.flags,
                    };
                    if !self.cpu.contains_key(&key) && !self.admit(stack_bytes(key.frames.len())) {
                        self.cpu_dropped_over_cap += 1;
                        continue;
                    }
                    let t = self.cpu.entry(key).or_default();
                    t.count = t.count.saturating_add(1);
                    t.cpu_ns = t.cpu_ns.saturating_add(s.cpu_ns);
                }
            }
            Message::Counters(c) => self.counters = c,
            Message::Goodbye(c) => {
                self.counters = c;
                self.said_goodbye = true;
            }
            Message::Log(level, text) => {
                self.log_lines = self.log_lines.saturating_add(1);
                if self.log_lines <= MAX_LOG_LINES {
                    log(level, &String::from_utf8_lossy(&text));
                } else if self.log_lines == MAX_LOG_LINES + 1 {
                    log(
                        Level::Warn,
                        &format!(
                            "this process sent more than {MAX_LOG_LINES} messages; \
                             the rest are not shown"
                        ),
                    );
                }
            }
            Message::HeapBuckets(buckets) => {
                for b in buckets {
                    let (old_frames, exists) = self
                        .heap
                        .get(&b.id)
                        .map_or((0, false), |e| (e.frames.len(), true));
                    let new_frames = if b.frames.is_empty() {
                        old_frames
                    } else {
                        b.frames.len()
                    };
                    let old = if exists { bucket_bytes(old_frames) } else { 0 };
                    self.release(old);
                    if !self.admit(bucket_bytes(new_frames)) {
                        self.heap.remove(&b.id);
                        continue;
                    }
                    let e = self.heap.entry(b.id).or_default();
                    e.size = b.size;
                    e.counts = b.counts;
                    if !b.frames.is_empty() {
                        e.frames = b.frames;
                    }
                }
            }
            Message::MemStats(mut m) => {
                keep_peaks(self.mem_stats.as_ref(), self.live_peak_seen, &mut m);
                self.mem_stats = Some(m)
            }
            Message::ThreadCreates(stacks) => {
                let old = creates_bytes(&self.thread_creates);
                self.release(old);
                if self.admit(creates_bytes(&stacks)) {
                    self.thread_creates = stacks;
                } else {
                    self.thread_creates = Vec::new();
                }
            }
            Message::Control(_) => {} // only the collector sends commands
            Message::Region(_) => {}  // taken by the connection before the session starts
            Message::ThreadName(tid, name) => {
                let old = self
                    .thread_names
                    .get(&tid)
                    .map_or(0, |n| name_bytes(n.len()));
                self.release(old);
                if self.admit(name_bytes(name.len())) {
                    self.thread_names
                        .insert(tid, String::from_utf8_lossy(&name).into_owned());
                } else {
                    self.thread_names.remove(&tid);
                }
            }
        }
        if dropped_before == 0 && self.dropped_over_cap > 0 {
            let text = match (&self.user_budget, self.max_bytes) {
                (Some(budget), _) if self.over_user_budget => {
                    format!(
                        "the processes of this user sent more profile data than anyprof keeps \
                         per user ({} MiB); from now on what would need more memory (new \
                         stacks, modules, names, thread dumps, heap buckets) is dropped and \
                         counted; raise --max-user-memory to keep more",
                        budget.max >> 20
                    )
                }
                (_, max) => format!(
                    "this process sent more profile data than anyprof keeps per process \
                     ({} MiB); from now on what would need more memory (new stacks, modules, \
                     names, thread dumps, heap buckets) is dropped and counted; raise \
                     --max-process-memory to keep more",
                    max.unwrap_or(0) >> 20
                ),
            };
            log(Level::Warn, &text);
        }
    }

    /// Takes the CPU samples out of the session (a `profile` request starts and ends with
    /// this); their bytes no longer count against the caps.
    pub fn take_cpu(&mut self) -> HashMap<StackKey, StackTotals> {
        let bytes = self.cpu.keys().fold(0usize, |sum, k| {
            sum.saturating_add(stack_bytes(k.frames.len()))
        });
        self.release(bytes);
        std::mem::take(&mut self.cpu)
    }

    /// Takes thread dump `id` out of the session; its bytes no longer count against the cap.
    pub fn take_thread_dump(&mut self, id: u32) -> Option<Vec<(u32, Vec<u64>)>> {
        if let Some(at) = self.dump_order.iter().position(|(d, _)| *d == id) {
            if let Some((_, counted)) = self.dump_order.remove(at) {
                self.release(counted);
            }
        }
        self.thread_dumps.remove(&id)
    }

    /// Adds one thread's stack to thread dump `id`; a new dump pushes the oldest out when
    /// [`MAX_KEPT_DUMPS`] are kept.
    fn add_dump_entry(&mut self, id: u32, tid: u32, frames: Vec<u64>) {
        let bytes = stack_bytes(frames.len());
        if !self.thread_dumps.contains_key(&id) {
            while self.dump_order.len() >= MAX_KEPT_DUMPS {
                if let Some((old, counted)) = self.dump_order.pop_front() {
                    self.thread_dumps.remove(&old);
                    self.release(counted);
                }
            }
        }
        let full = self
            .thread_dumps
            .get(&id)
            .is_some_and(|d| d.len() >= MAX_DUMPED_THREADS);
        if full || !self.admit(bytes) {
            self.dropped_over_cap += u64::from(!full);
            return;
        }
        match self.dump_order.iter_mut().find(|(d, _)| *d == id) {
            Some((_, counted)) => *counted += bytes,
            None => self.dump_order.push_back((id, bytes)),
        }
        self.thread_dumps.entry(id).or_default().push((tid, frames));
    }

    /// Counts `bytes` more against the cap, if they fit; otherwise counts one dropped item.
    fn admit(&mut self, bytes: usize) -> bool {
        let total = self.kept_bytes.saturating_add(bytes);
        let fits = self.max_bytes.is_none_or(|max| total <= max)
            && (self.user_budget.as_ref().is_none_or(|b| b.take(bytes)) || {
                self.over_user_budget = true;
                false
            });
        if !fits {
            self.dropped_over_cap += 1;
            return false;
        }
        self.kept_bytes = total;
        true
    }

    /// Stops counting `bytes` that are no longer kept.
    fn release(&mut self, bytes: usize) {
        let bytes = bytes.min(self.kept_bytes);
        self.kept_bytes -= bytes;
        if let Some(budget) = &self.user_budget {
            budget.give_back(bytes);
        }
    }

    /// Gives back everything this session counted against its user's budget (its
    /// connection ended and is being forgotten).
    pub fn release_all(&mut self) {
        self.release(self.kept_bytes);
    }
}

// What one kept item costs, roughly: its heap data plus the map entry and allocation
// overheads. Estimates, but proportional to what a peer sends, which is what the cap is for.

fn stack_bytes(frames: usize) -> usize {
    frames.saturating_mul(8).saturating_add(96)
}

fn bucket_bytes(frames: usize) -> usize {
    frames.saturating_mul(8).saturating_add(160)
}

fn name_bytes(len: usize) -> usize {
    len.saturating_add(64)
}

fn module_bytes(m: &Module) -> usize {
    m.path.len() + m.build_id.len() + 160
}

fn hello_bytes(h: &Hello) -> usize {
    h.exe.len() + h.cmdline.len() + 128
}

fn creates_bytes(stacks: &[(u64, Vec<u64>)]) -> usize {
    stacks
        .iter()
        .map(|(_, frames)| stack_bytes(frames.len()))
        .sum()
}

/// A session shared between its reader thread and the code that builds profiles.
pub type SharedSession = Arc<Mutex<Session>>;

/// Reads messages from `fd` (a connected `SOCK_SEQPACKET` socket) until it closes, folding
/// them into `session`. `log` receives the process's diagnostics.
///
/// With a `hello_timeout`, a connection whose hello has not arrived that long after it
/// started is closed (a silent connection would hold this thread and its descriptors for
/// ever). After the hello there is no timeout: a stopped process stays connected.
///
/// A process that shares a region ([`crate::region`]) sends a `Region` datagram first, with
/// its memfd, then its hello: the region is mapped, the socket closed after the hello, and
/// the session is read from the region until the process ends ([`crate::region::pump`]).
pub fn read_connection(
    fd: OwnedFd,
    session: SharedSession,
    link: crate::region::Link,
    trace_mem: bool,
    hello_timeout: Option<std::time::Duration>,
    mut log: impl FnMut(Option<u32>, Level, &str),
) {
    let mut buf = vec![0u8; wire::MAX_MESSAGE + 1];
    if let Ok(mut s) = session.lock() {
        s.connected_at = Some(Instant::now());
    }
    // Until the hello arrives: the time it must arrive by.
    let mut hello_due = hello_timeout.map(|t| Instant::now() + t);
    let mut first = true;
    // The region announced by the first datagram, until the hello comes.
    let mut region: Option<crate::region::Attached> = None;
    loop {
        if let Some(due) = hello_due {
            // Each receive may wait only for what is left, so messages other than the
            // hello do not put the deadline off. (A zero SO_RCVTIMEO would mean no
            // timeout, so less than a millisecond left counts as none.)
            let left = due.saturating_duration_since(Instant::now());
            if left < std::time::Duration::from_millis(1)
                || set_receive_timeout(&fd, Some(left)).is_err()
            {
                no_hello(&session, hello_timeout);
                break;
            }
        }
        // MSG_TRUNC reports the datagram's real length so oversized messages are
        // detected; a descriptor passed along is kept only with a first Region datagram.
        let datagram = match crate::region::recv_datagram(fd.as_fd(), &mut buf) {
            Ok(d) => d,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::WouldBlock && hello_due.is_some() {
                    no_hello(&session, hello_timeout);
                }
                break;
            }
        };
        let n = datagram.len;
        if n == 0 {
            break;
        }
        let was_first = std::mem::replace(&mut first, false);
        let Ok(mut s) = session.lock() else { break };
        if n > wire::MAX_MESSAGE {
            s.error = Some(format!(
                "message of {n} bytes exceeds the {} byte limit",
                wire::MAX_MESSAGE
            ));
            break;
        }
        match wire::decode(buf.get(..n).unwrap_or(&[])) {
            Ok(Message::Region(info)) if was_first => {
                let peer = s.peer.as_ref().map(|p| (p.pid, p.start_time));
                let uid = s.peer.as_ref().map(|p| p.uid);
                // Taking the region may open /proc/PID/maps and map_files, which wait for
                // the process's mmap_lock (which it can keep busy): not under the session's
                // lock, which the HTTP listing takes.
                drop(s);
                match crate::region::Attached::new(fd.as_fd(), &info, datagram, peer, uid) {
                    Ok(a) => region = Some(a),
                    Err(e) => {
                        let why = format!("not profiled: {e:#}");
                        // A process retries every second: one warning a minute is enough.
                        if link.registry.may_warn(peer.map_or(0, |p| p.0)) {
                            log(peer.map(|p| p.0), Level::Warn, &why);
                        }
                        if let Ok(mut s) = session.lock() {
                            s.error = Some(why);
                        }
                        break;
                    }
                }
            }
            Ok(msg) => {
                let pid = s.pid();
                if let (true, Message::MemStats(new)) = (trace_mem, &msg) {
                    let since = s.connected_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
                    let line = crate::summary::mem_trace_line(s.mem_stats.as_ref(), new, since);
                    eprintln!("anyprof[{}]: {line}", pid.unwrap_or(0));
                }
                let is_hello = matches!(msg, Message::Hello(_));
                if hello_due.is_some() && is_hello {
                    hello_due = None;
                    if set_receive_timeout(&fd, None).is_err() {
                        break;
                    }
                }
                s.apply(msg, &mut |level, text| log(pid, level, text));
                if let Some(why) = s.over_limits() {
                    s.error = Some(why);
                    break;
                }
                if is_hello {
                    if let Some(attached) = region.take() {
                        // Everything else comes through the region: close the socket.
                        drop(s);
                        drop(fd);
                        crate::region::pump(attached, &session, &link, trace_mem, &mut log);
                        if let Ok(mut s) = session.lock() {
                            s.closed_at = Some(Instant::now());
                        }
                        return;
                    }
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

/// Sets (`Some`) or clears (`None`) the socket's receive timeout.
fn set_receive_timeout(fd: &OwnedFd, timeout: Option<std::time::Duration>) -> nix::Result<()> {
    use nix::sys::time::TimeValLike;
    let micros = timeout.map_or(0, |t| i64::try_from(t.as_micros()).unwrap_or(i64::MAX));
    nix::sys::socket::setsockopt(
        fd,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::microseconds(micros),
    )
}

fn no_hello(session: &SharedSession, timeout: Option<std::time::Duration>) {
    if let Ok(mut s) = session.lock() {
        s.error = Some(format!(
            "sent no hello within {:?} of connecting; closed",
            timeout.unwrap_or_default()
        ));
    }
}

/// A peak never comes down: a report made at a quieter moment (the process's own at exit,
/// when the collector saw a higher live set in its region meanwhile) keeps the highest of
/// the last report's, the one seen (`live_peak_seen`) and its own.
pub fn keep_peaks(last: Option<&MemStats>, live_peak_seen: u64, new: &mut MemStats) {
    let at = MemStat::PeakLiveBytes as usize;
    if new.fields.len() <= at {
        new.fields.resize(at + 1, 0);
    }
    for (f, seen) in [
        (MemStat::PeakLiveBytes, live_peak_seen),
        (MemStat::MaxRssBytes, 0),
    ] {
        let before = last
            .and_then(|l| l.fields.get(f as usize).copied())
            .unwrap_or(0);
        if let Some(now) = new.fields.get_mut(f as usize) {
            *now = (*now).max(before).max(seen);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyprof_wire::{Sample, TimerKind};

    fn samples(first: u64, n: u64, flags: u8, dump_id: u32) -> Message {
        Message::CpuSamples(
            (first..first + n)
                .map(|i| Sample {
                    tid: 1,
                    flags,
                    time_ns: i,
                    cpu_ns: if flags & wire::FLAG_THREAD_DUMP != 0 {
                        u64::from(dump_id)
                    } else {
                        1
                    },
                    frames: vec![i; 64],
                })
                .collect(),
        )
    }

    fn warnings(session: &mut Session, msg: Message) -> Vec<String> {
        let mut out = Vec::new();
        session.apply(msg, &mut |level, text| {
            if level == Level::Warn {
                out.push(text.to_owned());
            }
        });
        out
    }

    /// New stacks past the cap are dropped and counted as lost samples, with one warning;
    /// stacks already kept still count.
    #[test]
    fn memory_cap_counts_bytes_and_warns_once() {
        let cap = 100_000;
        let mut s = Session {
            max_bytes: Some(cap),
            ..Session::default()
        };
        let mut warned = Vec::new();
        for batch in 0..100 {
            warned.extend(warnings(&mut s, samples(batch * 100, 100, 0, 0)));
        }
        assert!(s.kept_bytes <= cap, "{} > {cap}", s.kept_bytes);
        assert!(s.cpu.len() < 10_000 && !s.cpu.is_empty());
        assert_eq!(s.cpu_dropped_over_cap as usize, 10_000 - s.cpu.len());
        assert_eq!(s.lost_samples(), s.cpu_dropped_over_cap);
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].contains("--max-process-memory"), "{}", warned[0]);
        // A stack that is kept still aggregates.
        let before = s.cpu.values().map(|t| t.count).sum::<u64>();
        assert!(warnings(&mut s, samples(0, 1, 0, 0)).is_empty());
        assert_eq!(s.cpu.values().map(|t| t.count).sum::<u64>(), before + 1);
    }

    /// Only the newest thread dumps are kept, and their bytes are given back when dropped.
    /// Many connections of one user share one budget: they cannot multiply the per-process
    /// cap. What a CPU profile request takes out, and what an ended connection kept, is
    /// given back.
    #[test]
    fn one_users_connections_share_a_budget() {
        let budget = Arc::new(UserBudget::new(150_000));
        let mut sessions: Vec<Session> = (0..10)
            .map(|_| Session {
                max_bytes: Some(100_000),
                user_budget: Some(budget.clone()),
                ..Session::default()
            })
            .collect();
        let mut warned = Vec::new();
        for (i, s) in sessions.iter_mut().enumerate() {
            for batch in 0..20 {
                warned.extend(warnings(
                    s,
                    samples((i as u64 * 20 + batch) * 100, 100, 0, 0),
                ));
            }
        }
        let kept: usize = sessions.iter().map(|s| s.kept_bytes).sum();
        assert!(kept <= 150_000, "{kept} bytes kept for one user");
        assert_eq!(budget.used(), kept);
        assert!(
            warned.iter().any(|w| w.contains("--max-user-memory")),
            "{warned:?}"
        );
        let first = sessions[0].kept_bytes;
        assert!(first > 0);
        sessions[0].take_cpu();
        assert_eq!(sessions[0].kept_bytes, 0);
        assert_eq!(budget.used(), kept - first);
        for s in &mut sessions {
            s.release_all();
        }
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn old_thread_dumps_are_dropped() {
        let mut s = Session {
            max_bytes: Some(1 << 20),
            ..Session::default()
        };
        for id in 0..1000 {
            s.apply(samples(0, 10, wire::FLAG_THREAD_DUMP, id), &mut |_, _| {});
        }
        assert_eq!(s.thread_dumps.len(), MAX_KEPT_DUMPS);
        assert!(s.thread_dumps.contains_key(&999));
        assert_eq!(s.dropped_over_cap, 0);
        assert_eq!(s.kept_bytes, MAX_KEPT_DUMPS * 10 * stack_bytes(64));
        assert_eq!(s.take_thread_dump(999).map(|d| d.len()), Some(10));
        assert_eq!(s.kept_bytes, (MAX_KEPT_DUMPS - 1) * 10 * stack_bytes(64));
    }

    /// Groups are only taken from a process that still has the connection's uid and gid.
    #[test]
    fn groups_come_from_the_connected_process_only() {
        let me = std::process::id();
        // SAFETY: geteuid and getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let mut own: Vec<u32> = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .unwrap()
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        own.sort_unstable();
        let mut got = supplementary_groups(me, uid, gid);
        got.sort_unstable();
        assert_eq!(got, own);
        assert!(supplementary_groups(me, uid.wrapping_add(1), gid).is_empty());
    }

    /// A peer stands for the process that connected only while that process holds its pid.
    #[test]
    fn a_peer_is_running_until_its_process_ends() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let peer = Peer {
            pid,
            start_time: start_time(pid),
            ..Peer::default()
        };
        assert!(peer.start_time.is_some());
        assert!(peer.still_running());
        let reused = Peer {
            start_time: peer.start_time.map(|t| t + 1),
            ..peer.clone()
        };
        assert!(
            !reused.still_running(),
            "another process under the same pid"
        );
        let _ = child.kill();
        let _ = child.wait();
        assert!(!peer.still_running());
    }

    /// The pid a process claims is replaced by the kernel's.
    #[test]
    fn the_kernels_pid_wins() {
        let mut s = Session {
            peer: Some(Peer {
                pid: 4242,
                ..Peer::default()
            }),
            ..Session::default()
        };
        s.apply(
            Message::Hello(Hello {
                pid: 1,
                ppid: 0,
                cpu_hz: 0,
                timer: TimerKind::Off,
                mem_rate: 0,
                start_realtime_ns: 0,
                start_monotonic_ns: 0,
                exe: b"/sbin/init".to_vec(),
                cmdline: b"init".to_vec(),
            }),
            &mut |_, _| {},
        );
        assert_eq!(s.pid(), Some(4242));
    }
}
