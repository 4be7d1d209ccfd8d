//! The sampling signal's handler: take one CPU sample of the interrupted thread.
//!
//! Our timers send a real-time signal of their own ([`SIGNAL`]), not `SIGPROF`, so that
//! `SIGPROF` stays the program's: its own `setitimer(ITIMER_PROF)`, `timer_create` and
//! `pthread_kill` profilers run with the handler, flags, mask and alternate stack it asked
//! for, and no pending `SIGPROF` of ours can swallow one of its own (a standard signal pending
//! on a thread is not queued twice). A program that happens to use [`SIGNAL`] itself keeps
//! its handler too: `sigaction`/`signal` for it are interposed, ours stays installed, and
//! every such signal that is not one of ours goes to the program's handler.
//!
//! Our samples come from one of two sources: a POSIX CPU timer per thread (`SI_TIMER`, its
//! value carrying [`TIMER_COOKIE`]) or a perf `cpu-clock` event per thread
//! ([`super::perf_clock`]: `POLL_IN`, or `POLL_HUP` for a thread's first, one-shot event).
//! A program's own `O_ASYNC` descriptor signalling [`SIGNAL`] would be taken for ours while
//! the perf source is in use; no known program does that.
//!
//! Steps, all async-signal-safe (see the contract in [`crate::signal`]): save errno; ignore
//! the signal unless sampling is on and it came from one of our sources (any other goes to the
//! handler the program installed for that signal, if any); weigh the sample — a timer's by
//! the thread CPU time since its previous sample (per-thread CPU timers are serviced from the
//! scheduler tick, so the real interval differs from the requested one), a perf event's the
//! same way but for a thread's first sample, which stands for one period; claim a ring slot;
//! unwind into it; publish; after a thread's first perf sample, mark its slot so that the
//! background thread starts its periodic event; restore errno.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyprof_wire::Counter;

use super::{perf_clock, ring, sys, thread_state, unwinder as unwind};
use crate::counters;

/// True while samples should be taken. Cleared at exit and in forked children.
pub static SAMPLING: AtomicBool = AtomicBool::new(false);

/// The program's own handler for [`SIGNAL`] (installed before ours, or later through our
/// `sigaction`/`signal` interposers, which record it here instead of replacing ours).
/// `SIG_DFL` (0) or `SIG_IGN` (1) means no handler to call.
static PREVIOUS_ACTION: AtomicUsize = AtomicUsize::new(0);
/// The program handler's `sa_flags` (`SA_SIGINFO` decides how it is called).
static PREVIOUS_FLAGS: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(0);
/// The program handler's `sa_mask`, word by word (blocked while its handler runs).
const MASK_WORDS: usize = core::mem::size_of::<libc::sigset_t>() / 8;
static PREVIOUS_MASK: [core::sync::atomic::AtomicU64; MASK_WORDS] =
    [const { core::sync::atomic::AtomicU64::new(0) }; MASK_WORDS];

fn mask_to_words(mask: &libc::sigset_t) -> [u64; MASK_WORDS] {
    // SAFETY: sigset_t is plain data of MASK_WORDS * 8 bytes.
    unsafe { core::mem::transmute_copy(mask) }
}

fn words_to_mask(words: &[u64; MASK_WORDS]) -> libc::sigset_t {
    // SAFETY: as above, in the other direction.
    unsafe { core::mem::transmute_copy(words) }
}

/// Marks our timers' signals (`sigev_value`), so that a program's own `timer_create` with
/// [`SIGNAL`] is told apart from ours and goes to the program's handler.
pub const TIMER_COOKIE: usize = 0x616e_7970_726f_6600; // "anyprof\0"

/// True once our handler is installed: from then on the program's handler for [`SIGNAL`] is
/// recorded for chaining instead of installed.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Acquire)
}

/// The program's action for [`SIGNAL`] as the program believes it is installed.
pub fn program_action() -> libc::sigaction {
    // SAFETY: a zeroed sigaction is a valid "default action, empty mask" value.
    let mut a: libc::sigaction = unsafe { core::mem::zeroed() };
    a.sa_sigaction = PREVIOUS_ACTION.load(Ordering::Acquire);
    a.sa_flags = PREVIOUS_FLAGS.load(Ordering::Acquire);
    a.sa_mask = words_to_mask(&program_mask_words());
    a
}

fn program_mask_words() -> [u64; MASK_WORDS] {
    let mut words = [0u64; MASK_WORDS];
    for (w, a) in words.iter_mut().zip(PREVIOUS_MASK.iter()) {
        *w = a.load(Ordering::Acquire);
    }
    words
}

/// Records the program's new action for [`SIGNAL`] (ours stays installed and chains to it).
pub fn set_program_action(handler: usize, flags: libc::c_int, mask: &libc::sigset_t) {
    for (a, w) in PREVIOUS_MASK.iter().zip(mask_to_words(mask)) {
        a.store(w, Ordering::Release);
    }
    PREVIOUS_FLAGS.store(flags, Ordering::Release);
    PREVIOUS_ACTION.store(handler, Ordering::Release);
}

/// The signal our timers (and thread dumps) send: `SIGRTMAX - 2` (62; glibc's `SIGRTMIN` is
/// 34 and `SIGRTMAX` 64), a real-time signal that glibc does not reserve and that stays clear
/// of the ones known programs take for themselves (systemd reads `SIGRTMIN+0..26` as
/// commands; runtimes that pick a free real-time signal look from `SIGRTMIN` up). Real-time
/// signals are queued, never merged, so ours and the program's never swallow each other.
pub const SIGNAL: libc::c_int = 62;

static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Request id of the thread dump in progress (0 = none).
pub static DUMP_REQUEST: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// libc's `sigaction` (the real one, not the cdylib's interposer, which would only record
/// the action).
pub type SigactionFn =
    unsafe extern "C" fn(libc::c_int, *const libc::sigaction, *mut libc::sigaction) -> libc::c_int;

/// Installs the handler with `real_sigaction` (once; later calls do nothing). Returns the OS
/// error on failure. Constructor world.
pub fn install(real_sigaction: SigactionFn) -> Result<(), i32> {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    if SIGNAL < libc::SIGRTMIN() || SIGNAL > libc::SIGRTMAX() {
        INSTALLED.store(false, Ordering::Release);
        return Err(libc::EINVAL);
    }
    // SAFETY: a zeroed sigaction is a valid "no handler, empty mask" value.
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    action.sa_sigaction = on_signal as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: sigemptyset on a valid sigset_t.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: as above.
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: both pointers are valid sigaction structs; the real sigaction, not our
    // interposer, which would only record the action.
    if unsafe { real_sigaction(SIGNAL, &action, &mut old) } != 0 {
        INSTALLED.store(false, Ordering::Release);
        return Err(sys::errno());
    }
    set_program_action(old.sa_sigaction, old.sa_flags, &old.sa_mask);
    Ok(())
}

extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let saved_errno = sys::errno();
    let code = if info.is_null() {
        0
    } else {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
        unsafe { (*info).si_code }
    };
    if code == libc::SI_TIMER && is_our_timer(info) {
        if SAMPLING.load(Ordering::Relaxed) && !context.is_null() {
            let epoch = crate::settings::CPU_EPOCH.load(Ordering::Relaxed);
            let weight = thread_state::take_cpu_delta(sys::thread_cpu_ns(), epoch, period_ns());
            take_sample(context, 0, weight);
        }
    } else if (code == perf_clock::POLL_IN || code == perf_clock::POLL_HUP) && perf_clock::in_use()
    {
        if SAMPLING.load(Ordering::Relaxed) && !context.is_null() {
            // A thread's first sample (the one-shot event's) stands for one period: it came
            // at a point drawn over one period, so it is a fair estimate for a thread of any
            // length — unless the thread used more than two periods before it: then the
            // signal waited (blocked) and the measured time is the better weight. Each later
            // sample weighs the thread CPU time since the previous one: one period of user
            // time, and the system-call time in between, which the events do not sample
            // (see `perf_clock`).
            let now = sys::thread_cpu_ns();
            let epoch = crate::settings::CPU_EPOCH.load(Ordering::Relaxed);
            let period = period_ns();
            let measured = thread_state::take_cpu_delta(now, epoch, period);
            let weight = if code == perf_clock::POLL_HUP && measured <= 2 * period {
                period
            } else {
                measured
            };
            // A periodic sample follows at least one period of the thread's CPU time; one
            // that follows much less is the tail of a burst that queued while the thread
            // blocked the signal (the first of the burst carried the time): not a sample.
            let burst_tail = code == perf_clock::POLL_IN && measured < period / 2;
            if !burst_tail {
                take_sample(context, 0, weight);
            }
            if code == perf_clock::POLL_HUP {
                perf_clock::on_first_sample(now);
            } else {
                perf_clock::note_sample(now);
            }
        }
    } else if code == libc::SI_TKILL && is_dump_request(info) && !context.is_null() {
        let id = DUMP_REQUEST.load(Ordering::Acquire);
        take_sample(context, anyprof_wire::FLAG_THREAD_DUMP, u64::from(id));
    } else {
        chain(sig, info, context);
    }
    sys::set_errno(saved_errno);
}

/// Passes a signal that is not ours to the handler that was installed before us.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let previous = PREVIOUS_ACTION.load(Ordering::Acquire);
    if previous == libc::SIG_DFL || previous == libc::SIG_IGN {
        return;
    }
    // The program's handler runs with the mask it asked for, as if the kernel had called it.
    let mask = words_to_mask(&program_mask_words());
    // SAFETY: a zeroed sigset_t is a valid out-buffer.
    let mut saved: libc::sigset_t = unsafe { core::mem::zeroed() };
    // SAFETY: pthread_sigmask is async-signal-safe; both sets are valid.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &mask, &mut saved) };
    call_program_handler(previous, sig, info, context);
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &saved, core::ptr::null_mut()) };
}

fn call_program_handler(
    previous: usize,
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    if PREVIOUS_FLAGS.load(Ordering::Relaxed) & libc::SA_SIGINFO != 0 {
        // SAFETY: `previous` was read from a sigaction with SA_SIGINFO, so it has this type.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { core::mem::transmute(previous) };
        f(sig, info, context);
    } else {
        // SAFETY: `previous` was read from a sigaction without SA_SIGINFO: a plain handler.
        let f: extern "C" fn(libc::c_int) = unsafe { core::mem::transmute(previous) };
        f(sig);
    }
}

/// True for a signal of one of our timers (its value carries [`TIMER_COOKIE`]).
fn is_our_timer(info: *mut libc::siginfo_t) -> bool {
    // SAFETY: for SI_TIMER the kernel fills si_value; `info` is non-null here (code came from it).
    let value = unsafe { (*info).si_value() };
    value.sival_ptr as usize == TIMER_COOKIE
}

/// True for a `tgkill` from our own process while a thread dump is in progress.
fn is_dump_request(info: *mut libc::siginfo_t) -> bool {
    if DUMP_REQUEST.load(Ordering::Acquire) == 0 {
        return false;
    }
    // SAFETY: for SI_TKILL the kernel fills si_pid; `info` was checked for null by the caller.
    let sender = unsafe { (*info).si_pid() };
    // SAFETY: getpid cannot fail and is async-signal-safe.
    sender == unsafe { libc::getpid() }
}

/// The sampling period at the requested rate, ns.
fn period_ns() -> u64 {
    crate::settings::period_ns(crate::settings::CPU_HZ.load(Ordering::Relaxed))
}

/// Records the interrupted stack: a CPU sample of `weight` ns of CPU time, or with
/// [`anyprof_wire::FLAG_THREAD_DUMP`] a thread-dump entry (`weight` carries the dump's id).
fn take_sample(context: *mut libc::c_void, extra_flags: u8, weight: u64) {
    unwind::IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    match ring::claim() {
        Some(mut claim) => {
            // SAFETY: for SA_SIGINFO handlers the third argument is the interrupted ucontext.
            let uc = unsafe { &*(context as *const libc::ucontext_t) };
            let gregs = &uc.uc_mcontext.gregs;
            let ip = gregs.get(libc::REG_RIP as usize).copied().unwrap_or(0) as u64;
            let sp = gregs.get(libc::REG_RSP as usize).copied().unwrap_or(0) as u64;
            let bp = gregs.get(libc::REG_RBP as usize).copied().unwrap_or(0) as u64;
            let record = claim.record();
            let (len, flags) =
                unwind::unwind(ip, sp, bp, thread_state::stack_bounds(), &mut record.frames);
            record.len = len as u16;
            record.flags = flags | extra_flags;
            record.tid = thread_state::tid();
            record.time_ns = sys::monotonic_ns();
            record.cpu_ns = weight;
            claim.publish();
            counters::bump(Counter::SamplesTaken);
            if flags & anyprof_wire::FLAG_TRUNCATED != 0 {
                counters::bump(Counter::Truncated);
            }
        }
        None => counters::bump(Counter::DroppedRingFull),
    }
    unwind::IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
}
