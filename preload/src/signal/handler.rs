//! The `SIGPROF` handler: take one CPU sample of the interrupted thread.
//!
//! Steps, all async-signal-safe (see the contract in [`crate::signal`]): save errno; ignore
//! the signal unless sampling is on and it came from one of our timers (any other `SIGPROF`
//! goes to the handler that was installed before ours, if any); measure the thread CPU time
//! since its previous sample (the sample's honest weight: per-thread CPU timers are serviced
//! from the scheduler tick, so the real interval differs from the requested one); claim a
//! ring slot; unwind into it; publish; restore errno.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyprof_wire::Counter;

use super::{ring, sys, thread_state, unwind};
use crate::counters;

/// True while samples should be taken. Cleared at exit and in forked children.
pub static SAMPLING: AtomicBool = AtomicBool::new(false);

/// The `sa_sigaction` that was installed for `SIGPROF` before ours (0 = none/default/ignore).
static PREVIOUS_ACTION: AtomicUsize = AtomicUsize::new(0);
/// Whether the previous handler wanted `SA_SIGINFO` arguments.
static PREVIOUS_SIGINFO: AtomicBool = AtomicBool::new(false);

/// The signal our timers send.
pub const SIGNAL: libc::c_int = libc::SIGPROF;

static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Request id of the thread dump in progress (0 = none).
pub static DUMP_REQUEST: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// Installs the handler (once; later calls do nothing). Returns the OS error on failure.
pub fn install() -> Result<(), i32> {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    // SAFETY: a zeroed sigaction is a valid "no handler, empty mask" value.
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    action.sa_sigaction = on_signal as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: sigemptyset on a valid sigset_t.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: as above.
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: both pointers are valid sigaction structs.
    if unsafe { libc::sigaction(SIGNAL, &action, &mut old) } != 0 {
        INSTALLED.store(false, Ordering::Release);
        return Err(sys::errno());
    }
    if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN {
        PREVIOUS_SIGINFO.store(old.sa_flags & libc::SA_SIGINFO != 0, Ordering::Relaxed);
        PREVIOUS_ACTION.store(old.sa_sigaction, Ordering::Release);
    }
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
    if code == libc::SI_TIMER {
        if SAMPLING.load(Ordering::Relaxed) && !context.is_null() {
            take_sample(context, 0, None);
        }
    } else if code == libc::SI_TKILL && is_dump_request(info) && !context.is_null() {
        let id = DUMP_REQUEST.load(Ordering::Acquire);
        take_sample(context, anyprof_wire::FLAG_THREAD_DUMP, Some(u64::from(id)));
    } else {
        chain(sig, info, context);
    }
    sys::set_errno(saved_errno);
}

/// Passes a signal that is not ours to the handler that was installed before us.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let previous = PREVIOUS_ACTION.load(Ordering::Acquire);
    if previous == 0 {
        return;
    }
    if PREVIOUS_SIGINFO.load(Ordering::Relaxed) {
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

/// Records the interrupted stack: a CPU sample (weight = measured thread CPU time), or with
/// `dump_id` a thread-dump entry (the id travels in the weight field).
fn take_sample(context: *mut libc::c_void, extra_flags: u8, dump_id: Option<u64>) {
    unwind::IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    let cpu_ns = match dump_id {
        Some(id) => id,
        None => {
            let hz = u64::from(crate::threads::CPU_HZ.load(Ordering::Relaxed).max(1));
            let epoch = crate::threads::CPU_EPOCH.load(Ordering::Relaxed);
            thread_state::take_cpu_delta(sys::thread_cpu_ns(), epoch, 1_000_000_000 / hz)
        }
    };
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
            record.cpu_ns = cpu_ns;
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
