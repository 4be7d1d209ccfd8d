//! The perf events of one attached process: for each of its threads and each CPU, a
//! software `cpu-clock` event that samples the thread's user registers and the top of its
//! user stack, and follows the threads it creates (`inherit`). The events of one CPU write
//! into one ring buffer (the kernel refuses to map an inherited event that is not bound to
//! a CPU), read here after the fact. Collector side (std).
//!
//! This is what `perf record -p PID --call-graph dwarf` opens, and what samply does.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use perf_event::events::Software;
use perf_event::{Builder, Counter, SampleFlag, Sampler};

/// x86_64 `perf_regs` bits of the registers an unwind starts from: bp, sp, ip (their order
/// in a sample's register list).
pub const REGS: u64 = (1 << 6) | (1 << 7) | (1 << 8);

/// Bytes of user stack copied with each sample. Deeper frames than this reaches are cut
/// (the stack is shown truncated); ddprof takes 32 KiB too, perf 8 KiB by default.
pub const STACK_BYTES: u32 = 32 * 1024;

/// Data bytes of each CPU's ring buffer (a power of two) when the memory it locks is not
/// limited (root, CAP_IPC_LOCK): a CPU runs one thread at a time, so at 1000 Hz about ten
/// samples of up to 32 KiB arrive on it between two reads, 10 ms apart.
const RING_BYTES: usize = 4 << 20;

/// The smallest ring: a few samples with a full stack copy (32 KiB and a little each).
const MIN_RING_BYTES: usize = 128 << 10;

/// All the rings of a privileged run together: 4 MiB for each of 256 CPUs would pin 1 GiB.
const MAX_TOTAL_RING_BYTES: usize = 256 << 20;

/// The size of each ring when `processes` are attached to at once on `cpus` CPUs. The
/// kernel lets an unprivileged user lock `kernel.perf_event_mlock_kb` per online CPU for all
/// its perf rings (516 KiB by default: 512 KiB of data and a page of header), and refuses a
/// mapping beyond it; samples that do not fit a smaller ring are counted as lost.
fn ring_bytes(cpus: usize, processes: usize) -> usize {
    let rings = cpus.max(1) * processes.max(1);
    // SAFETY: geteuid has no preconditions.
    let each = if unsafe { libc::geteuid() } == 0 {
        MAX_TOTAL_RING_BYTES / rings
    } else {
        let limit_kib: usize = std::fs::read_to_string("/proc/sys/kernel/perf_event_mlock_kb")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(516);
        // Each ring also maps one page of its own.
        (limit_kib * 1024 / processes.max(1)).saturating_sub(4096)
    };
    let mut size = MIN_RING_BYTES;
    while size * 2 <= each && size * 2 <= RING_BYTES {
        size *= 2;
    }
    size
}

/// Why a thread could not be followed.
#[derive(Debug)]
pub enum OpenError {
    /// The thread has exited meanwhile.
    Gone,
    /// perf_event_open refused, with the system's reason.
    Refused(io::Error),
    /// Mapping the ring buffer refused (the memory it locks is over the user's limit).
    RingRefused(io::Error),
    /// [`MAX_EVENTS`] are open for this process already.
    Full,
}

/// The most events (descriptors) opened for one process: one per thread and CPU adds up, and
/// a daemon that attaches for its users must not let one process with many threads take all
/// its descriptors. Threads started later cost none (the kernel copies inherited events).
pub const MAX_EVENTS: usize = 16_384;

/// The events and rings of one process.
pub struct ProcessEvents {
    period_ns: u64,
    ring_bytes: usize,
    /// Whether time in the kernel goes uncounted: only where the kernel requires it, since
    /// `record`'s CPU timers count a thread's system time too (a sample in a system call
    /// still carries the user registers and stack it was entered from).
    exclude_kernel: bool,
    cpus: Vec<usize>,
    /// One ring per CPU (owning that CPU's first event), in the order of `cpus`.
    rings: Vec<Option<Sampler>>,
    /// Every other event, with the index of its CPU (of its ring), kept open: closing one
    /// stops its thread's samples.
    others: Vec<(usize, Counter)>,
    followed: HashSet<u32>,
    /// The thread each event was opened for, by event id: a sample's id is that of the
    /// event it came from, or of its parent for a thread that inherited it.
    opened_for: HashMap<u64, u32>,
}

impl ProcessEvents {
    /// No events yet; each [`ProcessEvents::follow`] adds a thread's. `processes`: how many
    /// processes are attached to at once (they share the memory rings may lock).
    pub fn new(hz: u32, processes: usize) -> io::Result<ProcessEvents> {
        let cpus = online_cpus()?;
        Ok(ProcessEvents {
            period_ns: 1_000_000_000 / u64::from(hz.max(1)),
            ring_bytes: ring_bytes(cpus.len(), processes),
            exclude_kernel: !may_count_kernel(),
            rings: cpus.iter().map(|_| None).collect(),
            cpus,
            others: Vec::new(),
            followed: HashSet::new(),
            opened_for: HashMap::new(),
        })
    }

    /// Whether `tid` is followed already.
    pub fn follows(&self, tid: u32) -> bool {
        self.followed.contains(&tid)
    }

    /// Opens the events of thread `tid`, one per CPU, enabled.
    pub fn follow(&mut self, tid: u32) -> Result<(), OpenError> {
        if self.others.len() + self.rings.len() + self.cpus.len() > MAX_EVENTS {
            return Err(OpenError::Full);
        }
        let mut opened = Vec::new();
        for (i, &cpu) in self.cpus.iter().enumerate() {
            let mut counter = self
                .open(tid, cpu)
                .map_err(|err| match err.raw_os_error() {
                    Some(libc::ESRCH) => OpenError::Gone,
                    _ => OpenError::Refused(err),
                })?;
            self.opened_for.insert(counter.id(), tid);
            match &self.rings[i] {
                Some(ring) => {
                    // SAFETY: both descriptors are perf events we own, on the same CPU.
                    let rc = unsafe {
                        libc::ioctl(
                            counter.as_raw_fd(),
                            PERF_EVENT_IOC_SET_OUTPUT,
                            ring.as_raw_fd(),
                        )
                    };
                    if rc != 0 {
                        return Err(OpenError::Refused(io::Error::last_os_error()));
                    }
                    counter.enable().map_err(OpenError::Refused)?;
                    opened.push((i, counter));
                }
                None => {
                    let mut ring = counter
                        .sampled(self.ring_bytes)
                        .map_err(OpenError::Refused)?;
                    ring.enable().map_err(OpenError::Refused)?;
                    self.rings[i] = Some(ring);
                }
            }
        }
        self.others.extend(opened);
        self.followed.insert(tid);
        Ok(())
    }

    fn open(&self, tid: u32, cpu: usize) -> io::Result<Counter> {
        let mut builder = Builder::new(Software::CPU_CLOCK);
        builder
            .observe_pid(tid as libc::pid_t)
            .one_cpu(cpu)
            .sample_period(self.period_ns)
            .sample(
                SampleFlag::IP
                    | SampleFlag::ID
                    | SampleFlag::TID
                    | SampleFlag::TIME
                    | SampleFlag::PERIOD
                    | SampleFlag::REGS_USER
                    | SampleFlag::STACK_USER,
            )
            .sample_regs_user(REGS)
            .sample_stack_user(STACK_BYTES)
            .exclude_kernel(self.exclude_kernel)
            .exclude_hv(true)
            .inherit(true)
            // Wake a reader polling the ring once a quarter of it is full: a small ring
            // (see `ring_bytes`) holds only a few samples.
            .wakeup_watermark(self.ring_bytes / 4)
            .enabled(false);
        builder.build()
    }

    /// The thread the event with id `event` was opened for.
    pub fn opened_for(&self, event: u64) -> Option<u32> {
        self.opened_for.get(&event).copied()
    }

    /// One descriptor per ring to poll, none of them in `hung`: any event writing into a
    /// ring becomes readable when the ring is a quarter full, but one whose thread has ended
    /// polls as hung up at once, ever after.
    pub fn poll_fds(&self, hung: &HashSet<RawFd>) -> Vec<RawFd> {
        (0..self.rings.len())
            .filter_map(|i| {
                let owner = self.rings[i].as_ref().map(AsRawFd::as_raw_fd);
                let others = self.others.iter().filter(|(cpu, _)| *cpu == i);
                owner
                    .into_iter()
                    .chain(others.map(|(_, c)| c.as_raw_fd()))
                    .find(|fd| !hung.contains(fd))
            })
            .collect()
    }

    /// Every ring, to be read.
    pub fn rings(&mut self) -> impl Iterator<Item = &mut Sampler> {
        self.rings.iter_mut().flatten()
    }

    /// Stops every event (what is in the rings stays to be read).
    pub fn disable(&mut self) {
        for ring in self.rings.iter_mut().flatten() {
            let _ = ring.disable();
        }
        for (_, c) in &mut self.others {
            let _ = c.disable();
        }
    }
}

/// Whether our events may count time in the kernel: as root, or with
/// `kernel.perf_event_paranoid` at 1 or below.
fn may_count_kernel() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root || std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .is_some_and(|p| p <= 1)
}

/// `_IO('$', 5)`: make an event write into another event's ring buffer.
const PERF_EVENT_IOC_SET_OUTPUT: libc::c_ulong = 0x2405;

/// The online CPUs, from `/sys/devices/system/cpu/online` (`0-3,6`).
fn online_cpus() -> io::Result<Vec<usize>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || io::Error::other(format!("cannot read the online CPUs from {text:?}"));
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        cpus.extend(a..=b);
    }
    Ok(cpus)
}
