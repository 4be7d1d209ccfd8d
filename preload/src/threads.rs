//! Thread bookkeeping: every thread of the program gets a CPU source — a perf event
//! ([`crate::perf_events`]) or a POSIX CPU timer ([`crate::timer`]) — and has its stack
//! bounds recorded for the unwinder.
//!
//! Threads created after load are caught by the `pthread_create` interposer in
//! [`crate::exports`], which starts them through [`start_routine_trampoline`]. Threads that
//! already exist when the library starts (only the main thread under `LD_PRELOAD`) are set up
//! by [`adopt_current_thread`] and [`adopt_other_threads`]. A thread-specific-data destructor
//! ends each thread's source when it exits, including through `pthread_exit`.
//!
//! World: the program's threads at start and exit, through our `pthread_create` trampoline
//! and TSD destructor (may allocate: not in a signal handler, not inside an allocation), and
//! the background thread.

use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyprof_wire::Counter;

use crate::signal::{handler, perf_clock, thread_state};
use crate::{counters, log, perf_events, timer};

pub use anyprof_preload_core::settings::{CPU_EPOCH, CPU_HZ};

/// The TSD key whose destructor stops a thread's timer (0 = not created; stored +1).
static TIMER_KEY: AtomicUsize = AtomicUsize::new(0);

/// Creates the TSD key. Call once before any timer is started.
pub fn init() {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is valid; the destructor has the required signature.
    if unsafe { libc::pthread_key_create(&mut key, Some(stop_cpu_source_at_exit)) } == 0 {
        TIMER_KEY.store(key as usize + 1, Ordering::Release);
    }
}

unsafe extern "C" fn stop_cpu_source_at_exit(_: *mut c_void) {
    let _section = crate::fork::section();
    let tid = thread_state::tid();
    stop_cpu_source(tid);
    if let Ok(mut all) = STACKS.lock() {
        all.retain(|(t, _, _)| *t != tid);
    }
}

/// Records the calling thread's stack bounds, via `pthread_getattr_np` (not
/// async-signal-safe: only ever called at thread start).
pub fn record_stack_bounds() {
    // pthread_getattr_np allocates while holding the thread's lock: what it allocates is ours,
    // and must not lead back here through a heap sample.
    let _internal = thread_state::Internal::enter();
    record_stack_bounds_inner();
}

fn record_stack_bounds_inner() {
    if let Some((lo, hi)) = initial_thread_stack() {
        note_stack_bounds(lo, hi);
        return;
    }
    // SAFETY: a zeroed pthread_attr_t is filled by pthread_getattr_np before use.
    let mut attr: libc::pthread_attr_t = unsafe { core::mem::zeroed() };
    // SAFETY: `attr` is valid; pthread_self() is the calling thread.
    if unsafe { libc::pthread_getattr_np(libc::pthread_self(), &mut attr) } != 0 {
        return;
    }
    let mut addr: *mut c_void = core::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: `attr` was initialised by pthread_getattr_np; out-pointers are valid.
    let ok = unsafe { libc::pthread_attr_getstack(&attr, &mut addr, &mut size) } == 0;
    // SAFETY: `attr` was initialised above and is destroyed exactly once.
    unsafe { libc::pthread_attr_destroy(&mut attr) };
    if ok && !addr.is_null() {
        let lo = addr as u64;
        note_stack_bounds(lo, lo.saturating_add(size as u64));
    }
}

fn note_stack_bounds(lo: u64, hi: u64) {
    thread_state::set_stack_bounds(lo, hi);
    let tid = thread_state::tid();
    // try_lock: never wait here (this runs at thread start, possibly in a forked child).
    if let Ok(mut all) = STACKS.try_lock() {
        all.retain(|(t, _, _)| *t != tid);
        all.push((tid, lo, hi));
    }
}

/// The bounds of the process's initial stack if the calling thread runs on it, found as
/// glibc's `pthread_getattr_np` finds them — the page above `__libc_stack_end`, and what
/// `RLIMIT_STACK` leaves below it, no lower than the mapping before — but read with our own
/// allocator: glibc's reads `/proc/self/maps` through a `FILE`, whose buffers it took from
/// the program's heap before `main`. None on any other stack.
fn initial_thread_stack() -> Option<(u64, u64)> {
    // Only the initial thread (its tid is the pid) may run there. Any other thread starts
    // while the program's threads run, and must not open a descriptor they could see.
    // SAFETY: getpid cannot fail.
    if thread_state::tid() != unsafe { libc::getpid() } as u32 {
        return None;
    }
    unsafe extern "C" {
        /// The initial stack's top as the kernel left it (exported by the dynamic loader).
        static __libc_stack_end: *mut c_void;
    }
    // SAFETY: a pointer-sized variable the loader sets before any constructor runs.
    let stack_end = unsafe { __libc_stack_end } as u64;
    let page = 4096u64;
    let hi = (stack_end & !(page - 1)) + page;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let mut previous_end = 0u64;
    let mut lo = None;
    for line in maps.lines() {
        let (start, end) = line.split_whitespace().next()?.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        if (start..end).contains(&stack_end) {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: a valid out-pointer.
            if unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut limit) } != 0 {
                return None;
            }
            // What the limit leaves below `hi` (the mapping holds the environment above it),
            // in whole pages, and no lower than the mapping before.
            let size = (limit.rlim_cur.saturating_sub(end.saturating_sub(hi)) & !(page - 1))
                .min(hi.saturating_sub(previous_end));
            lo = Some(hi - size);
            break;
        }
        previous_end = end;
    }
    let lo = lo?;
    let marker = 0u8;
    let here = core::ptr::addr_of!(marker) as u64;
    (lo..hi).contains(&here).then_some((lo, hi))
}

/// Every thread's stack bounds, by tid, for unwinding a thread from outside it.
static STACKS: Mutex<Vec<(u32, u64, u64)>> = Mutex::new(Vec::new());

/// In a forked child only the forking thread lives on, under a new tid: forget the
/// parent's CPU sources (the kernel copies neither timers nor event mappings) and threads,
/// and record this one again.
pub fn forget_other_threads_in_child() {
    if let Ok(mut t) = SOURCES.lock() {
        t.clear();
    }
    perf_clock::forget_all_in_child();
    if let Ok(mut s) = STACKS.lock() {
        s.clear();
    }
    DRAIN_TID.store(0, Ordering::Release);
    record_stack_bounds();
}

/// True when every thread of the program has exited and only ours is left: the program's
/// last thread ended through `pthread_exit` (or by returning from its start routine), and
/// glibc, counting our thread as one of its own, did not end the process as it does when
/// its last thread exits. Only reads `/proc/self/task` once no thread we know of is left, so
/// no descriptor of ours is visible while the program runs.
pub fn only_ours_left() -> bool {
    if !STACKS.lock().map(|s| s.is_empty()).unwrap_or(false) {
        return false;
    }
    // A main thread that ended through pthread_exit stays listed, as a zombie, until the
    // whole process ends.
    let own = thread_state::tid();
    task_ids().into_iter().filter(|&t| t != own).all(|t| {
        std::fs::read(format!("/proc/self/task/{t}/stat"))
            .ok()
            .and_then(|stat| {
                let end = stat.iter().rposition(|&b| b == b')')?;
                stat.get(end + 2).copied()
            })
            .is_none_or(|state| state == b'Z')
    })
}

/// The stack bounds of thread `tid`, if recorded.
pub fn stack_of(tid: u32) -> Option<(u64, u64)> {
    STACKS
        .lock()
        .ok()?
        .iter()
        .find(|(t, _, _)| *t == tid)
        .map(|&(_, lo, hi)| (lo, hi))
}

/// What samples a thread's CPU time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// A POSIX CPU timer.
    Timer(timer::TimerId),
    /// A perf `cpu-clock` event, in this slot of [`perf_clock`].
    Perf(usize),
}

/// Every thread's CPU source: (tid, source). Touched by thread start and exit, by whoever
/// starts or stops sampling and by the background thread's rounds; never from a signal
/// handler (which only marks a perf slot whose one-shot event fired, see [`perf_clock`]).
static SOURCES: Mutex<Vec<(u32, Source)>> = Mutex::new(Vec::new());
/// The background thread's tid: our own thread is never sampled.
pub static DRAIN_TID: AtomicU32 = AtomicU32::new(0);

/// Which CPU source sampling uses (`ANYPROF_CPU_SOURCE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CpuSource {
    /// POSIX CPU timers (the default: no descriptor of ours ever, see `perf_events`).
    Timer = 0,
    /// A perf event per thread where the kernel allows it ([`perf_events::allowed`]), else
    /// timers.
    Perf = 1,
}

static CPU_SOURCE: AtomicU8 = AtomicU8::new(CpuSource::Timer as u8);

/// Sets the CPU source for sampling started from now on (from the configuration).
pub fn set_cpu_source(source: CpuSource) {
    CPU_SOURCE.store(source as u8, Ordering::Release);
}

/// Decides whether threads get perf events (probing the kernel the first time). Never under
/// a seccomp filter, which may kill the process on a system call it does not expect, nor
/// with little room for queued signals (see [`room_for_queued_signals`]).
fn decide_perf_source() -> bool {
    let on = CPU_SOURCE.load(Ordering::Acquire) == CpuSource::Perf as u8
        && room_for_queued_signals()
        && !crate::seccomp::filtered()
        && perf_events::allowed();
    if on {
        perf_clock::start_using();
    }
    on
}

/// Whether the user's `RLIMIT_SIGPENDING` leaves room for the perf source's queued signals.
/// Each overflow queues a real-time signal (a timer's is preallocated, so never refused);
/// past the limit the kernel sends `SIGIO` instead, whose default action ends the program.
/// The watchdog keeps each thread's queue to a few dozen, for at most
/// [`perf_clock::SLOT_COUNT`] threads; below that much room, timers.
fn room_for_queued_signals() -> bool {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_SIGPENDING, &mut limit) } != 0 {
        return false;
    }
    limit.rlim_cur == libc::RLIM_INFINITY || limit.rlim_cur >= (perf_clock::SLOT_COUNT as u64) * 128
}

/// True while sampling gives threads perf events.
static PERF_NOW: AtomicBool = AtomicBool::new(false);

/// Starts a CPU source for thread `tid` unless it has one: a perf event when the perf source
/// is on and the kernel grants one, else a timer. Returns whether the thread has one.
fn start_cpu_source(tid: u32, hz: u32) -> bool {
    let Ok(mut sources) = SOURCES.lock() else {
        return false;
    };
    if sources.iter().any(|(t, _)| *t == tid) {
        return true;
    }
    if perf_events_now() {
        match start_perf_event(tid, hz) {
            Some(slot) => {
                sources.push((tid, Source::Perf(slot)));
                counters::bump(Counter::ThreadsPerf);
                return true;
            }
            None => counters::bump(Counter::PerfRefused),
        }
    } else if PERF_NOW.load(Ordering::Acquire) {
        counters::bump(Counter::PerfWithoutThread);
    }
    start_posix_timer(&mut sources, tid, hz)
}

/// Whether a thread starting now gets a perf event: the perf source is on and the background
/// thread runs, which opens each thread's periodic event and watches for threads that block
/// the signal. (A single-threaded program under `record` runs without it: its thread keeps a
/// timer until the program starts a second one, see [`give_timed_threads_perf_events`].)
fn perf_events_now() -> bool {
    PERF_NOW.load(Ordering::Acquire) && crate::drain::running()
}

/// Called by the background thread as it starts: the threads that got a timer while it was
/// not running get a perf event instead.
pub fn give_timed_threads_perf_events() {
    let hz = CPU_HZ.load(Ordering::Acquire);
    if hz == 0 || !perf_events_now() {
        return;
    }
    let Ok(mut sources) = SOURCES.lock() else {
        return;
    };
    for (tid, source) in sources.iter_mut() {
        if let Source::Timer(id) = *source {
            if let Some(slot) = start_perf_event(*tid, hz) {
                timer::stop(id);
                *source = Source::Perf(slot);
                counters::bump(Counter::ThreadsPerf);
            }
        }
    }
}

/// Gives thread `tid` its first, one-shot perf event, whose period is drawn over one
/// sampling period (see [`perf_clock`]). None if no slot is free, the kernel refuses, or a
/// seccomp filter guards the calling thread (it would make the call itself, and a filter may
/// kill the process on it).
fn start_perf_event(tid: u32, hz: u32) -> Option<usize> {
    if crate::seccomp::calling_thread_filtered() {
        return None;
    }
    let period_ns = anyprof_preload_core::settings::period_ns(hz);
    let slot = perf_clock::claim(tid)?;
    match perf_events::open(tid, 1 + timer::random_below(tid, period_ns), true) {
        Ok(addr) if perf_clock::fill(slot, tid, addr) => Some(slot),
        Ok(addr) => {
            perf_events::end(addr);
            None
        }
        Err(_) => {
            end_perf_event(slot);
            None
        }
    }
}

/// Frees slot `slot` and ends the event it held.
fn end_perf_event(slot: usize) {
    if let Some(event) = perf_clock::take(slot) {
        perf_events::end(event.addr);
    }
}

fn start_posix_timer(sources: &mut Vec<(u32, Source)>, tid: u32, hz: u32) -> bool {
    match timer::start(tid, hz) {
        Ok(id) => {
            sources.push((tid, Source::Timer(id)));
            counters::bump(Counter::ThreadsTimed);
            true
        }
        Err(errno) => {
            counters::bump(Counter::TimerFailures);
            log::warn_errno(
                "could not start a CPU timer for a thread; it will not be sampled",
                errno,
            );
            false
        }
    }
}

fn stop_source(source: Source) {
    match source {
        Source::Timer(id) => timer::stop(id),
        Source::Perf(slot) => end_perf_event(slot),
    }
}

/// Stops thread `tid`'s CPU source, if it has one.
fn stop_cpu_source(tid: u32) {
    let Ok(mut sources) = SOURCES.lock() else {
        return;
    };
    if let Some(i) = sources.iter().position(|(t, _)| *t == tid) {
        let (_, source) = sources.swap_remove(i);
        stop_source(source);
    }
}

/// The background thread's round over perf events, every tick (and when a handler wakes it
/// after a thread's first sample):
/// - a thread whose one-shot event fired gets its periodic event;
/// - a thread that runs with the sampling signal blocked would queue one real-time signal per
///   period without end (and past the user's `RLIMIT_SIGPENDING` the kernel sends `SIGIO`,
///   which ends the program): it gets a timer instead, which keeps one pending signal at most;
/// - a thread that ended unseen has its event ended.
pub fn tend_perf_events() {
    if !PERF_NOW.load(Ordering::Relaxed) {
        return;
    }
    let hz = CPU_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return;
    }
    let period_ns = anyprof_preload_core::settings::period_ns(hz);
    // 32 periods, and at least 50 ms: a few dozen queued signals at most, and no false alarm
    // for a thread that is merely slow to be scheduled.
    let blocked_after_ns = (32 * period_ns).max(50_000_000);
    let Ok(mut sources) = SOURCES.lock() else {
        return;
    };
    let mut events = [(
        0usize,
        perf_clock::Event {
            addr: 0,
            tid: 0,
            state: perf_clock::State::OneShot,
        },
    ); perf_clock::SLOT_COUNT];
    let n = perf_clock::events(&mut events);
    for &(slot, event) in events.iter().take(n) {
        let cpu_now = timer::thread_cpu_ns(event.tid);
        let outcome = match (event.state, cpu_now) {
            (_, None) if event.addr != 0 => Outcome::Gone,
            (perf_clock::State::Fired, Some(_)) if event.addr != 0 => {
                // This thread makes the call: a filter on it (one the program put on every
                // thread with SECCOMP_FILTER_FLAG_TSYNC) may kill the process on it.
                if crate::seccomp::calling_thread_filtered() {
                    Outcome::Timer(Counter::PerfRefused)
                } else {
                    match perf_events::open(event.tid, period_ns, false) {
                        Ok(periodic) => {
                            if perf_clock::promote(slot, event, periodic) {
                                perf_events::end(event.addr);
                            } else {
                                perf_events::end(periodic);
                            }
                            Outcome::Keep
                        }
                        Err(_) => Outcome::Timer(Counter::PerfRefused),
                    }
                }
            }
            (perf_clock::State::Periodic, Some(now))
                if now.saturating_sub(perf_clock::sampled_cpu_ns(slot)) > blocked_after_ns =>
            {
                Outcome::Timer(Counter::PerfBlocked)
            }
            _ => Outcome::Keep,
        };
        if outcome == Outcome::Keep {
            continue;
        }
        end_perf_event(slot);
        if let Some(i) = sources
            .iter()
            .position(|&(t, s)| t == event.tid && s == Source::Perf(slot))
        {
            sources.swap_remove(i);
        }
        // (A tid still listed belongs to a newer thread that reused it.)
        if let Outcome::Timer(counter) = outcome {
            counters::bump(counter);
            if !sources.iter().any(|&(t, _)| t == event.tid) {
                start_posix_timer(&mut sources, event.tid, hz);
            }
        }
    }
}

/// What [`tend_perf_events`] does with a thread's event.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Keep,
    Timer(Counter),
    Gone,
}

/// Starts CPU sampling at `hz` on every thread of the program: installs the handler, then a
/// timer per thread (threads created later get theirs as they start).
pub fn start_cpu_sampling(hz: u32) {
    let _section = crate::fork::section();
    if let Err(errno) = handler::install(crate::exports::real_sigaction) {
        log::warn_errno(
            "cannot install the CPU sampling signal handler; CPU profiling is off",
            errno,
        );
        return;
    }
    CPU_EPOCH.fetch_add(1, Ordering::AcqRel);
    CPU_HZ.store(hz, Ordering::Release);
    PERF_NOW.store(decide_perf_source(), Ordering::Release);
    handler::SAMPLING.store(true, Ordering::Release);
    let drain = DRAIN_TID.load(Ordering::Acquire);
    for tid in task_ids() {
        if tid != drain {
            start_cpu_source(tid, hz);
        }
    }
}

/// Stops CPU sampling: every timer is deleted, so an idle process pays nothing.
pub fn stop_cpu_sampling() {
    let _section = crate::fork::section();
    CPU_HZ.store(0, Ordering::Release);
    handler::SAMPLING.store(false, Ordering::Release);
    let Ok(mut sources) = SOURCES.lock() else {
        return;
    };
    for (_, source) in sources.drain(..) {
        stop_source(source);
    }
}

/// The ids of the process's threads, from `/proc/self/task`.
pub fn task_ids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// Sets up sampling for the calling (new) thread: stack bounds always, and a timer while CPU
/// sampling is on.
pub fn adopt_current_thread() {
    let _section = crate::fork::section();
    record_stack_bounds();
    run_destructor_at_exit();
    let hz = CPU_HZ.load(Ordering::Relaxed);
    if hz == 0 || !handler::SAMPLING.load(Ordering::Relaxed) {
        return;
    }
    thread_state::start_cpu_clock();
    start_cpu_source(thread_state::tid(), hz);
}

/// Makes the calling thread's exit (`pthread_exit`, or returning from its start routine) run
/// [`stop_cpu_source_at_exit`], which forgets it.
pub fn run_destructor_at_exit() {
    let key = TIMER_KEY.load(Ordering::Acquire);
    if key != 0 {
        // Any non-null value makes the exit destructor run; it finds the timer by tid.
        // SAFETY: the key was created by `init`; the value is never dereferenced.
        unsafe {
            libc::pthread_setspecific(
                (key - 1) as libc::pthread_key_t,
                core::ptr::dangling::<c_void>(),
            )
        };
    }
}

/// What the `pthread_create` interposer hands to the new thread.
pub struct StartRoutine {
    /// The program's start routine.
    pub start: extern "C" fn(*mut c_void) -> *mut c_void,
    /// Its argument.
    pub arg: *mut c_void,
}

/// Entry point of every thread the program creates: set up sampling, then run the program's
/// own start routine.
pub extern "C" fn start_routine_trampoline(boxed: *mut c_void) -> *mut c_void {
    // SAFETY: `boxed` is the Box<StartRoutine> leaked by the interposer for this thread only.
    let routine = unsafe { Box::from_raw(boxed as *mut StartRoutine) };
    let (start, arg) = (routine.start, routine.arg);
    // Our allocation, freed as ours (it was allocated inside the interposer's internal section).
    let internal = thread_state::Internal::enter();
    drop(routine);
    drop(internal);
    adopt_current_thread();
    start(arg)
}

/// Where threads were created: (creating stack, count). Go's `threadcreate` profile.
static CREATIONS: Mutex<Vec<(Vec<u64>, u64)>> = Mutex::new(Vec::new());
static CREATIONS_GENERATION: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Records the calling stack as a thread-creation site (called by the `pthread_create`
/// interposer, in the creating thread).
pub fn note_creation() {
    let _section = crate::fork::section();
    let mut frames = [0u64; anyprof_wire::MAX_FRAMES];
    let (n, _) = crate::signal::unwind::unwind_here(&mut frames);
    let stack = frames.get(..n).unwrap_or(&[]);
    // try_lock: in a forked child the lock may belong to a thread that no longer exists.
    let Ok(mut all) = CREATIONS.try_lock() else {
        return;
    };
    match all.iter_mut().find(|(f, _)| f.as_slice() == stack) {
        Some((_, count)) => *count += 1,
        None => all.push((stack.to_vec(), 1)),
    }
    CREATIONS_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// A copy of the creation stacks.
pub fn creations() -> Vec<(Vec<u64>, u64)> {
    CREATIONS.lock().map(|c| c.clone()).unwrap_or_default()
}

/// Changes whenever a creation is recorded.
pub fn creations_generation() -> u64 {
    CREATIONS_GENERATION.load(Ordering::Relaxed)
}

/// Makes the creation stacks count as changed (to resend them on a new connection).
pub fn touch_creations() {
    CREATIONS_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// While alive, every signal that may be blocked is blocked in the calling thread; dropping it
/// restores the thread's mask.
///
/// Every thread of ours is created inside one: a new thread starts with its creator's mask, so
/// it blocks every signal from its first instruction (blocking them inside the thread would
/// leave a window in which a signal meant for the program could land there), and the kernel
/// never picks it for a signal sent to the process. Those go to the program's threads, as
/// they would without us: a program that blocks a signal everywhere and reads it with
/// `signalfd` or `sigwait` gets every one, and a handler runs on a thread of the program, when
/// the program unblocks it. glibc's `pthread_sigmask` leaves out the two signals it uses
/// itself (thread cancellation and `setuid` across threads), which must stay deliverable.
pub struct AllSignalsBlocked {
    saved: libc::sigset_t,
}

impl AllSignalsBlocked {
    /// Blocks every signal in the calling thread.
    pub fn new() -> Self {
        // SAFETY: zeroed sigset_t values are valid buffers; sigfillset fills one.
        let mut all: libc::sigset_t = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        let mut saved: libc::sigset_t = unsafe { core::mem::zeroed() };
        // SAFETY: both sets are valid for the calls.
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut saved);
        }
        AllSignalsBlocked { saved }
    }
}

impl Default for AllSignalsBlocked {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AllSignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new` in this same thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.saved, core::ptr::null_mut()) };
    }
}

/// Entry point of anyprof's own threads: marked internal before anything runs in them.
pub extern "C" fn internal_trampoline(boxed: *mut c_void) -> *mut c_void {
    thread_state::Internal::for_good();
    // SAFETY: `boxed` is the Box<StartRoutine> leaked by the interposer for this thread only.
    let routine = unsafe { Box::from_raw(boxed as *mut StartRoutine) };
    let (start, arg) = (routine.start, routine.arg);
    drop(routine);
    start(arg)
}
