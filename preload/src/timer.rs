//! Per-thread CPU-time timers: `timer_create(CLOCK_THREAD_CPUTIME_ID)` with
//! `SIGEV_THREAD_ID`, so each thread is sampled for the CPU it uses, as Go does since 1.18.
//! (A process-wide `setitimer` starves threads and loses samples when many run.) They send
//! our own real-time signal ([`SIGNAL`]), not `SIGPROF`, which stays the program's.
//!
//! Raw system calls rather than glibc's wrappers: the kernel timer id is all we need, and
//! the raw calls never allocate.

use crate::signal::handler::SIGNAL;

/// A kernel POSIX timer id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerId(i32);

/// The CPU clock of thread `tid` (the kernel's `MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)`).
fn thread_cpu_clock(tid: u32) -> libc::clockid_t {
    ((!(tid as libc::clockid_t)) << 3) | 6
}

/// Starts a timer that sends [`SIGNAL`] to thread `tid` every `1/hz` s of that thread's CPU
/// time. Returns the errno on failure.
pub fn start(tid: u32, hz: u32) -> Result<TimerId, i32> {
    let period_ns = anyprof_preload_core::settings::period_ns(hz);
    // SAFETY: a zeroed sigevent is valid; we fill the fields the kernel reads.
    let mut sev: libc::sigevent = unsafe { core::mem::zeroed() };
    sev.sigev_notify = libc::SIGEV_THREAD_ID;
    sev.sigev_signo = SIGNAL;
    sev.sigev_notify_thread_id = tid as libc::c_int;
    sev.sigev_value = libc::sigval {
        sival_ptr: crate::signal::handler::TIMER_COOKIE as *mut libc::c_void,
    };
    let mut id: libc::c_int = 0;
    // SAFETY: `sev` and `id` are valid for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_timer_create,
            thread_cpu_clock(tid),
            &mut sev as *mut libc::sigevent,
            &mut id as *mut libc::c_int,
        )
    };
    if rc != 0 {
        return Err(crate::signal::sys::errno());
    }
    let as_timespec = |ns: u64| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // The first expiry at a random point of the first period, as Go does: a thread that
    // runs for less than a period is then sampled with the right probability instead of
    // never.
    let first_ns = 1 + random_below(tid, period_ns);
    let spec = libc::itimerspec {
        it_interval: as_timespec(period_ns),
        it_value: as_timespec(first_ns),
    };
    // SAFETY: `spec` is valid; a null old-value pointer is allowed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_timer_settime,
            id,
            0,
            &spec as *const libc::itimerspec,
            core::ptr::null_mut::<libc::itimerspec>(),
        )
    };
    if rc != 0 {
        let err = crate::signal::sys::errno();
        stop(TimerId(id));
        return Err(err);
    }
    Ok(TimerId(id))
}

/// Deletes a timer (at thread exit).
pub fn stop(id: TimerId) {
    // SAFETY: timer_delete on an id we created; an already-deleted id just fails with EINVAL.
    unsafe { libc::syscall(libc::SYS_timer_delete, id.0) };
}

/// The CPU time thread `tid` of this process has used, ns; None once it has exited.
pub fn thread_cpu_ns(tid: u32) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; the clock id names a thread of this process.
    let rc = unsafe { libc::clock_gettime(thread_cpu_clock(tid), &mut ts) };
    (rc == 0).then(|| (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64)
}

/// A number in `[0, n)` (0 for n = 0), good enough to spread timer phases.
pub fn random_below(tid: u32, n: u64) -> u64 {
    let mut x = crate::signal::sys::monotonic_ns() ^ (u64::from(tid) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x.checked_rem(n).unwrap_or(0)
}
