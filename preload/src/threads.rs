//! Thread bookkeeping: every thread of the program gets a CPU timer and has its stack bounds
//! recorded for the unwinder.
//!
//! Threads created after load are caught by the `pthread_create` interposer in
//! [`crate::exports`], which starts them through [`start_routine_trampoline`]. Threads that
//! already exist when the library starts (only the main thread under `LD_PRELOAD`) are set up
//! by [`adopt_current_thread`] and [`adopt_other_threads`]. A thread-specific-data destructor
//! deletes each timer when its thread exits, including through `pthread_exit`.

use core::ffi::c_void;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use anyprof_wire::Counter;

use crate::signal::{handler, thread_state};
use crate::{counters, log, timer};

/// Requested sampling rate; 0 = CPU sampling off.
pub static CPU_HZ: AtomicU32 = AtomicU32::new(0);

/// The TSD key whose destructor stops a thread's timer (0 = not created; stored +1).
static TIMER_KEY: AtomicUsize = AtomicUsize::new(0);

/// Creates the TSD key. Call once before any timer is started.
pub fn init() {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is valid; the destructor has the required signature.
    if unsafe { libc::pthread_key_create(&mut key, Some(stop_timer_at_exit)) } == 0 {
        TIMER_KEY.store(key as usize + 1, Ordering::Release);
    }
}

unsafe extern "C" fn stop_timer_at_exit(value: *mut c_void) {
    if let Some(id) = timer::TimerId::from_tsd(value as usize) {
        timer::stop(id);
    }
}

/// Records the calling thread's stack bounds, via `pthread_getattr_np` (not
/// async-signal-safe: only ever called at thread start).
pub fn record_stack_bounds() {
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
        thread_state::set_stack_bounds(lo, lo.saturating_add(size as u64));
    }
}

/// Sets up sampling for the calling thread: stack bounds, CPU clock, timer.
pub fn adopt_current_thread() {
    record_stack_bounds();
    let hz = CPU_HZ.load(Ordering::Relaxed);
    if hz == 0 || !handler::SAMPLING.load(Ordering::Relaxed) {
        return;
    }
    thread_state::start_cpu_clock();
    let tid = thread_state::tid();
    match timer::start(tid, hz) {
        Ok(id) => {
            counters::bump(Counter::ThreadsTimed);
            let key = TIMER_KEY.load(Ordering::Acquire);
            if key != 0 {
                // SAFETY: the key was created by `init`; the value is an integer, not a pointer
                // anyone dereferences.
                unsafe {
                    libc::pthread_setspecific(
                        (key - 1) as libc::pthread_key_t,
                        id.to_tsd() as *const c_void,
                    )
                };
            }
        }
        Err(errno) => {
            counters::bump(Counter::TimerFailures);
            log::warn_errno(
                "could not start a CPU timer for a thread; it will not be sampled",
                errno,
            );
        }
    }
}

/// Starts timers for threads that existed before the library started (other than the caller).
/// Their stack bounds are unknown, so their samples keep only the leaf frame.
pub fn adopt_other_threads() {
    let hz = CPU_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return;
    }
    let me = thread_state::tid();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if tid == me {
            continue;
        }
        match timer::start(tid, hz) {
            Ok(_) => counters::bump(Counter::ThreadsTimed),
            Err(_) => counters::bump(Counter::TimerFailures),
        }
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
    drop(routine);
    adopt_current_thread();
    start(arg)
}
