//! The perf CPU source's events: a `cpu-clock` perf event per thread that sends the sampling
//! signal to that thread, as async-profiler and ddprof do. The kernel services a `cpu-clock`
//! event with a high-resolution timer that runs only while its thread is on a CPU, so
//! 1000 Hz is 1000 Hz and a thread that lives less than a scheduler tick is sampled in
//! proportion to its CPU time (per-thread POSIX CPU timers are serviced at the tick). Which
//! thread has which event, and why each starts with a one-shot event, is in
//! [`perf_clock`](crate::signal::perf_clock).
//!
//! # An event nobody can see
//! An event is opened, armed and then left without a descriptor: a one-page mapping of it is
//! all that keeps it alive (the descriptor is closed at once, so the program never finds one
//! of ours in its table). The kernel does not copy that mapping into a forked child
//! (`VM_DONTCOPY`), and `munmap` ends the event. Signals come through `O_ASYNC` with
//! `F_SETSIG` (our signal, `si_code` `POLL_IN`, or `POLL_HUP` for a one-shot event's last
//! overflow) and `F_SETOWN_EX` (the thread itself).
//!
//! # User time only
//! The events never count kernel time, even where that is allowed: an overflow while the
//! thread is inside `execve` would queue a signal that the new program, whose handlers exec
//! reset to the default, gets first — and the default action of a real-time signal ends the
//! process. An overflow in user mode is delivered before the thread can make a system call.
//! Time in system calls still counts: a sample's weight is the thread's CPU time since its
//! previous sample.
//!
//! World: thread start and exit, the constructor and the background thread (never a signal
//! handler, never inside an allocation).

use std::sync::atomic::{AtomicU8, Ordering};

use perf_event_open_sys as sys;

use crate::signal::handler::SIGNAL;

/// The mapping that keeps an event alive: its metadata page, no data pages.
const PAGE: usize = 4096;
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// Whether this process may open perf events for its own threads: 0 = not probed yet,
/// 1 = yes, 2 = no.
static ALLOWED: AtomicU8 = AtomicU8::new(0);

/// Whether `perf_event_open` gives this process events for its own threads (user time only,
/// which `perf_event_paranoid` up to 2 allows without privileges; not where it is 3 or more,
/// under a seccomp filter that returns an error for it, or without perf support). Probed the
/// first time by opening and closing at once a disabled event of the calling thread.
pub fn allowed() -> bool {
    match ALLOWED.load(Ordering::Acquire) {
        1 => true,
        2 => false,
        _ => {
            let ok = match open_disabled(crate::signal::sys::gettid(), 1_000_000) {
                Ok(fd) => {
                    close(fd);
                    true
                }
                Err(_) => false,
            };
            ALLOWED.store(if ok { 1 } else { 2 }, Ordering::Release);
            ok
        }
    }
}

/// Opens a disabled user-time `cpu-clock` event of thread `tid` that overflows every
/// `period_ns` of its CPU time.
fn open_disabled(tid: u32, period_ns: u64) -> Result<libc::c_int, i32> {
    let mut attr = sys::bindings::perf_event_attr::default();
    attr.type_ = sys::bindings::PERF_TYPE_SOFTWARE;
    attr.size = std::mem::size_of::<sys::bindings::perf_event_attr>() as u32;
    attr.config = u64::from(sys::bindings::PERF_COUNT_SW_CPU_CLOCK);
    // The kernel's cpu-clock timer never fires more often than every 10 µs.
    attr.__bindgen_anon_1.sample_period = period_ns.max(10_000);
    attr.set_disabled(1);
    attr.set_exclude_kernel(1);
    attr.set_exclude_hv(1);
    // SAFETY: `attr` is a valid perf_event_attr of the size it declares; the event counts the
    // CPU time of a thread of this process, on any CPU, in no group.
    let fd = unsafe {
        sys::perf_event_open(
            &mut attr,
            tid as libc::pid_t,
            -1,
            -1,
            sys::bindings::PERF_FLAG_FD_CLOEXEC as libc::c_ulong,
        )
    };
    if fd < 0 {
        Err(crate::signal::sys::errno())
    } else {
        Ok(fd)
    }
}

fn close(fd: libc::c_int) {
    // SAFETY: a descriptor this module opened and nobody else knows.
    unsafe { libc::close(fd) };
}

/// Ends the event mapped at `addr` (nothing for 0).
pub fn end(addr: usize) {
    if addr != 0 {
        // SAFETY: `addr` is an event mapping of one page made by `open` and no longer in any
        // slot (whoever took it out of its slot ends it, once).
        unsafe { libc::munmap(addr as *mut libc::c_void, PAGE) };
    }
}

/// Opens thread `tid`'s event — one-shot (one overflow, then it stops) or periodic, every
/// `period_ns` of the thread's CPU time (an expiry that finds the thread in the kernel is
/// skipped: the event counts user time only) — arms it to signal that thread, and lets go of
/// the descriptor. Returns the mapping's address, or the errno of the step that failed (then
/// nothing is left open).
pub fn open(tid: u32, period_ns: u64, one_shot: bool) -> Result<usize, i32> {
    let fd = open_disabled(tid, period_ns)?;
    // SAFETY: a new shared read-only mapping of the event's metadata page; the kernel checks
    // the size and the locked-memory budget.
    let addr = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            PAGE,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        let err = crate::signal::sys::errno();
        close(fd);
        return Err(err);
    }
    let owner = [F_OWNER_TID, tid as libc::c_int];
    // SAFETY: fcntl and ioctl on our own descriptor; `owner` is a valid `struct f_owner_ex`.
    let failed = unsafe {
        libc::fcntl(fd, F_SETOWN_EX, owner.as_ptr()) != 0
            || libc::fcntl(fd, F_SETSIG, SIGNAL) != 0
            || libc::fcntl(fd, libc::F_SETFL, libc::O_ASYNC) != 0
            || if one_shot {
                sys::ioctls::REFRESH(fd, 1) != 0
            } else {
                sys::ioctls::ENABLE(fd, 0) != 0
            }
    };
    let err = crate::signal::sys::errno();
    close(fd);
    if failed {
        end(addr as usize);
        return Err(err);
    }
    Ok(addr as usize)
}
