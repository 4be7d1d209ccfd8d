//! `anyprof attach`: a CPU profile of processes that were started without the preload, from
//! perf events, in the shape of `record`'s `cpu.pb.gz` (the same [`Session`] goes through the
//! same profile builder). Collector side (std); the profiled process runs on untouched: the
//! kernel samples it, and everything else happens here.
//!
//! - [`procfs`]: its threads, executable mappings and names, from `/proc`;
//! - [`modules`]: each mapping as a profile module and a framehop module;
//! - [`events`]: one `cpu-clock` event per thread and CPU, following new threads;
//! - [`unwind`]: a sample's registers and stack copy to frames, with framehop.

pub mod events;
pub mod modules;
pub mod procfs;
pub mod unwind;

use std::collections::HashSet;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyprof_wire::{Counter, Hello, TimerKind, FLAG_TRUNCATED};
use perf_event::data::Record;

use crate::ingest::{Peer, Session, StackKey, StackTotals};
use events::{OpenError, ProcessEvents};
use modules::ModuleSet;
use unwind::StackUnwinder;

/// The profile of one process.
pub struct Attached {
    pub session: Session,
    /// The process ended before the profile did.
    pub exited: bool,
    /// Threads that ran when we attached but were not followed: past [`events::MAX_EVENTS`].
    pub unfollowed: usize,
}

/// How often the rings are read at least (more often when one fills).
const READ_EVERY: Duration = Duration::from_millis(10);
/// How often each process is checked for having exited.
const CHECK_EXIT_EVERY: Duration = Duration::from_millis(100);
/// The shortest time between two reads of a process's mappings for a sample that falls
/// outside every module known (a library loaded since).
const REREAD_MAPS_AFTER: Duration = Duration::from_millis(100);

/// One process being profiled.
struct Target {
    pid: u32,
    events: ProcessEvents,
    modules: ModuleSet,
    unwinder: StackUnwinder,
    session: Session,
    maps_read_at: Instant,
    exited: bool,
    unfollowed: usize,
}

/// Processes attached to, `hz` samples per second of each thread's CPU time: the kernel
/// samples them from [`start`] on, and [`Profiling::finish`] collects the samples.
pub struct Profiling {
    targets: Vec<Target>,
    started: Instant,
    /// Event descriptors that poll as hung up (their thread ended).
    hung: HashSet<RawFd>,
}

/// Attaches to `pids`: from here on the kernel samples them. An error says, in one line,
/// what to change (no such process, not permitted and why).
pub fn start(pids: &[u32], hz: u32) -> anyhow::Result<Profiling> {
    raise_descriptor_limit();
    let realtime = u64::try_from(crate::output::unix_nanos()).unwrap_or(0);
    let mut unique = pids.to_vec();
    unique.sort_unstable();
    unique.dedup();
    let started = Instant::now();
    let mut targets = Vec::new();
    for &pid in &unique {
        targets.push(attach(pid, hz, unique.len(), realtime)?);
    }
    Ok(Profiling {
        targets,
        started,
        hung: HashSet::new(),
    })
}

impl Profiling {
    /// Reads the samples until `duration` has passed since [`start`], or `stop` is set, or
    /// every process has exited; then the profile of each process.
    pub fn finish(mut self, duration: Duration, stop: &AtomicBool) -> Vec<Attached> {
        let mut exit_checked = Instant::now();
        loop {
            for t in &mut self.targets {
                t.read_rings();
            }
            let done = stop.load(Ordering::SeqCst)
                || self.started.elapsed() >= duration
                || self.targets.iter().all(|t| t.exited);
            if done {
                break;
            }
            if exit_checked.elapsed() >= CHECK_EXIT_EVERY {
                exit_checked = Instant::now();
                for t in self.targets.iter_mut().filter(|t| !t.exited) {
                    t.exited = !procfs::is_running(t.pid);
                }
            }
            self.wait_for_samples();
        }
        let ended = Instant::now();
        self.targets
            .into_iter()
            .map(|mut t| {
                t.events.disable();
                t.read_rings();
                t.session.connected_at = Some(self.started);
                t.session.closed_at = Some(ended);
                // What was counted here is final: nothing more will come.
                t.session.said_goodbye = true;
                Attached {
                    session: t.session,
                    exited: t.exited,
                    unfollowed: t.unfollowed,
                }
            })
            .collect()
    }
}

impl Profiling {
    /// Waits until a ring is a quarter full, or [`READ_EVERY`] has passed.
    fn wait_for_samples(&mut self) {
        let mut fds: Vec<libc::pollfd> = self
            .targets
            .iter()
            .flat_map(|t| t.events.poll_fds(&self.hung))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if fds.is_empty() {
            std::thread::sleep(READ_EVERY);
            return;
        }
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let ready = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                READ_EVERY.as_millis() as libc::c_int,
            )
        };
        if ready < 0 {
            std::thread::sleep(READ_EVERY);
        }
        // Polled no more: another event of the same ring stands in for it.
        self.hung.extend(
            fds.iter()
                .filter(|p| p.revents & (libc::POLLHUP | libc::POLLERR) != 0)
                .map(|p| p.fd),
        );
    }
}

fn attach(pid: u32, hz: u32, processes: usize, realtime: u64) -> anyhow::Result<Target> {
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() || !procfs::is_running(pid) {
        anyhow::bail!(
            "no process with pid {pid} (it may have exited): check it with `ps -p {pid}`"
        );
    }
    let events = ProcessEvents::new(hz, processes)
        .map_err(|e| anyhow::anyhow!("cannot read this machine's online CPUs: {e}"))?;
    let (exe, cmdline) = procfs::exe_and_cmdline(pid);
    let mut session = Session {
        // Its files are read, and its names looked up, with its own rights (see
        // symbolize::resolve_all): a profile of it names nothing its user could not read.
        peer: Peer::of_process(pid),
        hello: Some(Hello {
            pid,
            ppid: 0,
            cpu_hz: hz,
            timer: TimerKind::ThreadCpuTimer,
            mem_rate: 0,
            start_realtime_ns: realtime,
            start_monotonic_ns: monotonic_ns(),
            exe,
            cmdline,
        }),
        ..Session::default()
    };
    session.counters = vec![0; anyprof_wire::COUNTER_COUNT];
    let mut target = Target {
        pid,
        events,
        modules: ModuleSet::default(),
        unwinder: StackUnwinder::default(),
        session,
        maps_read_at: Instant::now(),
        exited: false,
        unfollowed: 0,
    };
    target.read_maps();
    // Threads started between listing and opening are caught by listing again, as perf
    // does; those their creators' events already follow are sampled once (see read_rings).
    let mut refused = None;
    let mut unfollowed = HashSet::new();
    for _ in 0..3 {
        let mut tids = procfs::threads(pid).unwrap_or_default();
        tids.retain(|&t| !target.events.follows(t) && !unfollowed.contains(&t));
        let mut new = 0;
        for tid in tids {
            new += 1;
            match target.events.follow(tid) {
                Ok(()) => {
                    if let Some(name) = procfs::thread_name(pid, tid) {
                        target.session.thread_names.insert(tid, name);
                    }
                }
                Err(OpenError::Gone) => {}
                Err(OpenError::Full) => {
                    unfollowed.insert(tid);
                }
                Err(OpenError::Refused(err)) => {
                    refused = Some(explain_refusal(pid, &err));
                    break;
                }
                Err(OpenError::RingRefused(err)) => {
                    refused = Some(format!(
                        "the kernel refused to map a perf ring buffer ({err}): raise \
                         kernel.perf_event_mlock_kb (`sudo sysctl kernel.perf_event_mlock_kb=2048`) \
                         or `ulimit -l`, or attach to fewer processes at once"
                    ));
                    break;
                }
            }
        }
        if new == 0 || refused.is_some() {
            break;
        }
    }
    if let Some(why) = refused {
        anyhow::bail!("{why}");
    }
    target.unfollowed = unfollowed.len();
    if !procfs::is_running(pid) {
        target.exited = true;
    }
    Ok(target)
}

impl Target {
    /// Reads the mappings not seen yet into the profile's modules and the unwinder.
    fn read_maps(&mut self) {
        self.maps_read_at = Instant::now();
        let access = self.session.peer.as_ref().map(Peer::access);
        let changes = self.modules.changes(self.pid, access.as_ref());
        for start in changes.removed {
            self.unwinder.remove_module(start);
        }
        for mapped in changes.added {
            if let Some(unwind) = mapped.unwind {
                self.unwinder.add_module(unwind);
            }
            self.session.modules.insert(mapped.module.id, mapped.module);
        }
    }

    fn in_known_module(&self, address: u64) -> bool {
        self.session
            .modules
            .values()
            .any(|m| m.start <= address && address < m.end)
    }

    /// Takes every record the kernel has written so far.
    fn read_rings(&mut self) {
        let mut samples = Vec::new();
        let mut lost = 0u64;
        for ring in self.events.rings() {
            while let Some(record) = ring.next_record() {
                match record.parse_record() {
                    Ok(Record::Sample(s)) => {
                        let (Some(tid), Some(regs), Some(id)) = (s.tid(), s.regs_user(), s.id())
                        else {
                            continue;
                        };
                        // A child it forked inherited the events: not this process.
                        if s.pid() != Some(self.pid) {
                            continue;
                        }
                        // bp, sp, ip: the order of their bits in events::REGS.
                        let [bp, sp, ip] = regs.regs[..] else {
                            continue;
                        };
                        let stack = s.stack_user().unwrap_or(&[]).to_vec();
                        samples.push((tid, id, ip, sp, bp, stack, s.period().unwrap_or(0)));
                    }
                    Ok(Record::Lost(l)) => lost = lost.saturating_add(l.lost),
                    _ => {}
                }
            }
        }
        let ring_full = &mut self.session.counters[Counter::DroppedRingFull as usize];
        *ring_full = ring_full.saturating_add(lost);
        for (tid, id, ip, sp, bp, stack, period) in samples {
            let Some(opened_for) = self.events.opened_for(id) else {
                continue;
            };
            // A thread born while the events were being opened may be followed twice (by
            // events it inherited, perhaps on some CPUs only, and by its own): its own win.
            if opened_for != tid && self.events.follows(tid) {
                continue;
            }
            if !self.in_known_module(ip) && self.maps_read_at.elapsed() >= REREAD_MAPS_AFTER {
                self.read_maps();
            }
            let (frames, truncated) = self.unwinder.unwind(ip, sp, bp, &stack);
            if !self.session.thread_names.contains_key(&tid) {
                let name =
                    procfs::thread_name(self.pid, tid).unwrap_or_else(|| format!("tid {tid}"));
                self.session.thread_names.insert(tid, name);
            }
            let key = StackKey {
                tid,
                frames,
                flags: if truncated { FLAG_TRUNCATED } else { 0 },
            };
            let totals: &mut StackTotals = self.session.cpu.entry(key).or_default();
            totals.count += 1;
            totals.cpu_ns = totals.cpu_ns.saturating_add(period);
            if truncated {
                let t = &mut self.session.counters[Counter::Truncated as usize];
                *t = t.saturating_add(1);
            }
        }
    }
}

/// One line saying why the kernel refused to let us sample `pid`, and what to change.
fn explain_refusal(pid: u32, err: &std::io::Error) -> String {
    let read_number =
        |path: &str| -> Option<i64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    match err.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            let paranoid = read_number("/proc/sys/kernel/perf_event_paranoid");
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            if !root && paranoid.is_some_and(|p| p > 2) {
                return format!(
                    "the kernel does not let unprivileged users sample processes \
                     (kernel.perf_event_paranoid is {}): run `sudo sysctl kernel.perf_event_paranoid=2`, \
                     or run anyprof with CAP_PERFMON or as root",
                    paranoid.unwrap_or(0)
                );
            }
            let owner = std::fs::metadata(format!("/proc/{pid}")).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.uid()
            });
            // SAFETY: as above.
            let me = unsafe { libc::geteuid() };
            match owner {
                Some(uid) if uid != me && !root => format!(
                    "pid {pid} belongs to user {uid}, and you may only profile your own processes: \
                     run anyprof attach as that user, or as root (or with CAP_PERFMON and CAP_SYS_PTRACE)"
                ),
                _ => format!(
                    "the kernel refused to sample pid {pid} ({err}): a setuid or otherwise \
                     non-dumpable program needs root or CAP_SYS_PTRACE; in a container, perf \
                     events may be blocked by seccomp (allow perf_event_open)"
                ),
            }
        }
        Some(libc::EMFILE) | Some(libc::ENFILE) => format!(
            "out of file descriptors ({err}): anyprof attach opens one per thread of pid {pid} \
             and CPU; raise the limit with `ulimit -n` or profile fewer processes at once"
        ),
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
            format!(
                "this kernel offers no cpu-clock perf event ({err}); profile the program with \
             `anyprof record` instead"
            )
        }
        _ => format!("the kernel refused a perf event for pid {pid}: {err}"),
    }
}

/// CLOCK_MONOTONIC now, ns (a process's image key in the profile).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Raises the soft limit of open descriptors to the hard one: one event per thread and CPU
/// adds up on a large machine.
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit to read into and from.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
