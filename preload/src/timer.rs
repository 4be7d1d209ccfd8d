//! Per-thread CPU-time timers: `timer_create(CLOCK_THREAD_CPUTIME_ID)` with
//! `SIGEV_THREAD_ID`, so each thread is sampled for the CPU it uses, as Go does since 1.18.
//! (A process-wide `setitimer` starves threads and loses samples when many run.)
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
    let period_ns = 1_000_000_000u64 / u64::from(hz.max(1));
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
    let ts = libc::timespec {
        tv_sec: (period_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (period_ns % 1_000_000_000) as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: ts,
        it_value: ts,
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
