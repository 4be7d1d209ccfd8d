//! The background thread (background-thread world: may allocate, lock and do I/O; never runs
//! in a signal handler or a malloc hook): every 20 ms it notices module-map changes, empties
//! the sample ring, sends what changed ([`super::reports`]) and carries out the collector's
//! commands ([`super::commands`]); once a second it sends the counters; in serve mode it
//! re-attaches to a daemon that went away. Started by the constructor, or under `record` in a
//! single-threaded program only when the program starts its second thread
//! ([`defer_thread`]); stopped at exit (and around calls that need a single-threaded
//! process).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyprof_wire::shared as shm;
use anyprof_wire::{self as wire, Counter, Kind, MAX_MESSAGE};

use super::transport::{attached, collector_present, detach, send};
use super::{commands, reports};
use crate::modules::ModuleMap;
use crate::region::SHARED;
use crate::signal::{ring, thread_state};
use crate::{counters, log};

/// Held by whoever is draining the ring (the ring has a single reader).
static DRAINING: AtomicBool = AtomicBool::new(false);
/// Tells the background thread to stop.
static STOP: AtomicBool = AtomicBool::new(false);
/// The module map, owned by whoever drains.
pub static MODULES: Mutex<ModuleMap> = Mutex::new(ModuleMap::new());

const TICK: Duration = Duration::from_millis(20);
const COUNTERS_EVERY: Duration = Duration::from_secs(1);

/// The background thread, while it runs.
static THREAD: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);

/// A last flush asked of the background thread by a thread about to end the process without
/// destructors (`_exit`).
static LAST_FLUSH: AtomicU8 = AtomicU8::new(LAST_FLUSH_NONE);
const LAST_FLUSH_NONE: u8 = 0;
const LAST_FLUSH_ASKED: u8 = 1;
const LAST_FLUSH_DONE: u8 = 2;
/// Longest that `_exit` waits for it: a patient flush gives up on a busy drain after 200 ms.
const LAST_FLUSH_WAIT_NS: u64 = 500_000_000;

/// Has the background thread send everything left, with the final counters, and waits until
/// it has (at most [`LAST_FLUSH_WAIT_NS`]); false if there is no background thread or it did
/// not finish in time.
///
/// For `_exit`, which a program may call from a signal handler or while it holds locks
/// (malloc's among them): the calling thread only sets a flag, wakes the background thread
/// and sleeps, so it allocates nothing and waits on no lock (`try_lock` only). The background
/// thread flushes in ordinary context; if it gets stuck, the wait runs out and the process
/// ends as it would have.
pub fn last_flush_by_background() -> bool {
    {
        let Ok(thread) = THREAD.try_lock() else {
            return false;
        };
        let Some(handle) = thread.as_ref() else {
            return false;
        };
        if LAST_FLUSH
            .compare_exchange(
                LAST_FLUSH_NONE,
                LAST_FLUSH_ASKED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return false;
        }
        handle.thread().unpark();
    }
    let deadline = crate::signal::sys::monotonic_ns().saturating_add(LAST_FLUSH_WAIT_NS);
    while LAST_FLUSH.load(Ordering::Acquire) != LAST_FLUSH_DONE {
        if crate::signal::sys::monotonic_ns() >= deadline {
            return false;
        }
        let nap = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // SAFETY: a valid timespec; nanosleep is async-signal-safe.
        unsafe { libc::nanosleep(&nap, core::ptr::null_mut()) };
    }
    true
}

/// The background thread's handle for [`wake`] (null before the first spawn).
static WAKER: std::sync::atomic::AtomicPtr<std::thread::Thread> =
    std::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// Wakes the background thread for an early cycle. Called from malloc hooks: `unpark` is an
/// atomic swap and at most one futex wake, no lock, no allocation.
fn wake() {
    let t = WAKER.load(Ordering::Acquire);
    if !t.is_null() {
        // SAFETY: WAKER only holds null or a leaked, never freed `Thread` (see `spawn`).
        unsafe { (*t).unpark() };
    }
}

/// Set while the process runs without a thread of ours (see [`defer_thread`]).
static DEFERRED: AtomicBool = AtomicBool::new(false);
/// CLOCK_MONOTONIC of the last catch-up without our thread (0: none yet).
static LAST_CATCH_UP_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// The loader's `(adds, subs)` when the module map was last brought up to date without a
/// thread (see [`catch_up_without_thread`]).
static CAUGHT_UP: Mutex<(u64, u64)> = Mutex::new((0, 0));

/// Whether the program has had only one thread so far, as glibc sees it
/// (`__libc_single_threaded`, which glibc clears for good at the first `pthread_create`).
pub fn program_is_single_threaded() -> bool {
    unsafe extern "C" {
        static __libc_single_threaded: libc::c_char;
    }
    // SAFETY: a byte glibc defines (since 2.32) and only ever changes from 1 to 0; a racy
    // read at worst says "multi-threaded".
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(__libc_single_threaded)) != 0 }
}

/// Runs the process without a thread of ours, for as long as the program has one thread
/// (record mode): a second thread would make glibc's allocator lock its arena on every call
/// its per-thread cache misses, and make `__libc_single_threaded` false, which the program
/// (and libstdc++'s `shared_ptr`) can see. The collector empties the sample ring and reads
/// the counters from the shared region meanwhile (`SharedHeader::drainer`); module changes
/// and log messages are sent by the program's own thread at the points where it calls us in
/// ordinary context: `dlsym` ([`catch_up_without_thread`]), `pthread_create` (which starts
/// our thread first: [`start_deferred_thread`]), and exit.
pub fn defer_thread() {
    // What the collector needs before the first sample (the modules; in a forked child, all
    // of them again), since no thread of ours will send it.
    flush(None, false);
    if let Ok(mut at) = CAUGHT_UP.lock() {
        *at = crate::modules::loader_generation();
    }
    SHARED
        .header
        .drainer
        .store(shm::DRAINER_COLLECTOR, Ordering::Release);
    DEFERRED.store(true, Ordering::Release);
}

/// Starts our thread if it was deferred (the program is about to start a thread of its
/// own, so its allocator is about to pay for threads anyway); hands the sample ring back
/// from the collector to it.
pub fn start_deferred_thread() {
    if !DEFERRED.load(Ordering::Acquire) || !crate::lifecycle::is_own_process() {
        return;
    }
    if !DEFERRED.swap(false, Ordering::AcqRel) {
        return;
    }
    if let Err(e) = spawn() {
        // The collector goes on reading the region; modules keep being caught up at dlsym.
        DEFERRED.store(true, Ordering::Release);
        log::message(
            wire::Level::Warn,
            format!(
                "cannot start the anyprof thread ({e}); the collector keeps reading this \
                 process's samples itself"
            ),
        );
    }
}

/// Brings the module map and the unwinder up to date, and sends what changed, when the
/// program runs without a thread of ours and the loader's set of objects moved since the
/// last time. Called before the program's `dlsym` (a program that `dlopen`s an object
/// looks up a symbol in it next); costs one look at the loader's counters otherwise.
pub fn catch_up_without_thread() {
    if !DEFERRED.load(Ordering::Acquire) || !crate::lifecycle::is_own_process() {
        return;
    }
    // Ours from here: a program that interposes `dl_iterate_phdr` and looks up the real one
    // with `dlsym` in it comes back here, and must find us busy.
    let _internal = thread_state::Internal::enter();
    let now = crate::modules::loader_generation();
    let Ok(mut at) = CAUGHT_UP.try_lock() else {
        return;
    };
    if *at == now {
        return;
    }
    // At most one catch-up per tick, as our thread would: a program that loads and unloads
    // a library in a loop would otherwise rebuild the unwinder on every `dlsym`. A change
    // seen within the tick is caught up at a later `dlsym` (or exit).
    let now_ns = crate::signal::sys::monotonic_ns();
    let last = LAST_CATCH_UP_NS.load(Ordering::Relaxed);
    if last != 0 && now_ns.saturating_sub(last) < TICK.as_nanos() as u64 {
        return;
    }
    LAST_CATCH_UP_NS.store(now_ns, Ordering::Relaxed);
    // Only the modules (and log lines): the collector reads samples and counters itself.
    let _section = crate::fork::section();
    if !acquire_drain(false) {
        return;
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    let sent = reports::send_module_changes(&mut buf, false);
    send_log(&mut buf, false);
    DRAINING.store(false, Ordering::Release);
    if sent {
        *at = now;
    }
}

/// Starts the background thread, with every signal blocked from its first instruction (see
/// [`crate::threads::AllSignalsBlocked`]): signals are the program's.
pub fn spawn() -> std::io::Result<()> {
    let internal = thread_state::Internal::enter();
    STOP.store(false, Ordering::Release);
    let blocked = crate::threads::AllSignalsBlocked::new();
    let result = std::thread::Builder::new()
        .name("anyprof".into())
        .spawn(|| abort_on_panic(run));
    drop(blocked);
    drop(internal);
    let handle = result?;
    // What a hook calls to wake this thread (signal::unwinder::request_catch_up): a handle
    // that stays valid for good (leaked; one per spawn), read without a lock.
    let thread = Box::into_raw(Box::new(handle.thread().clone()));
    WAKER.store(thread, Ordering::Release);
    anyprof_preload_core::signal::unwinder::publish_waker(wake);
    if let Ok(mut t) = THREAD.lock() {
        *t = Some(handle);
    }
    // The sample ring and the counters are ours to send from now on.
    SHARED
        .header
        .drainer
        .store(shm::DRAINER_PROCESS, Ordering::Release);
    Ok(())
}

/// In a forked child: the parent's background thread does not exist here; forget its
/// handle without touching it.
pub fn forget_thread_in_child() {
    if let Ok(mut t) = THREAD.lock() {
        std::mem::forget(t.take());
    }
    DRAINING.store(false, Ordering::Release);
    STOP.store(false, Ordering::Release);
    LAST_FLUSH.store(LAST_FLUSH_NONE, Ordering::Release);
    DEFERRED.store(false, Ordering::Release);
    RUNNING.store(false, Ordering::Release); // the parent's thread is not the child's
    detach(); // the parent's collector was given the parent's region, not ours
}

/// Stops the background thread and waits for it; returns whether one was running. Used
/// around calls that require a single-threaded process (`unshare(CLONE_NEWUSER)`).
pub fn pause() -> bool {
    let handle = THREAD.lock().ok().and_then(|mut t| t.take());
    let Some(handle) = handle else { return false };
    STOP.store(true, Ordering::Release);
    handle.thread().unpark();
    let _ = handle.join();
    true
}

/// Runs `f`; if it panics, ends the process with `abort` (SIGABRT), printing nothing: a
/// panic of ours must never unwind into the program's frames, nor write to its stderr. For
/// the bodies of threads we start (the program's frames are not below them, but the
/// workspace is built with `panic = "unwind"` for the collector's sake, and a panic ending
/// our thread quietly would leave the process unprofiled without a word). The exported
/// `extern "C"` functions need no wrapper: a panic cannot unwind out of them (Rust aborts).
pub fn abort_on_panic(f: fn()) {
    if std::panic::catch_unwind(f).is_err() {
        // SAFETY: abort is always safe to call; it does not return.
        unsafe { libc::abort() }
    }
}

/// True in serve mode: a lost connection also stops CPU sampling (nobody is asking).
pub static SERVE_MODE: AtomicBool = AtomicBool::new(false);

/// True while the background thread's loop runs (the perf CPU source needs it: see
/// [`crate::threads::tend_perf_events`]).
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Whether the background thread is running its loop now.
pub fn running() -> bool {
    RUNNING.load(Ordering::Acquire)
}

fn run() {
    thread_state::Internal::for_good();
    crate::threads::DRAIN_TID.store(thread_state::tid(), Ordering::Release);
    RUNNING.store(true, Ordering::Release);
    let section = crate::fork::section();
    crate::threads::give_timed_threads_perf_events();
    drop(section);
    run_loop();
    RUNNING.store(false, Ordering::Release);
}

fn run_loop() {
    let mut last_counters = Instant::now();
    let mut last_reconnect = Instant::now()
        .checked_sub(RECONNECT_EVERY)
        .unwrap_or_else(Instant::now);
    let mut reconnect_wait = RECONNECT_EVERY;
    while !STOP.load(Ordering::Acquire) {
        std::thread::park_timeout(TICK);
        if LAST_FLUSH.load(Ordering::Acquire) == LAST_FLUSH_ASKED {
            flush(Some(Kind::Goodbye), true);
            LAST_FLUSH.store(LAST_FLUSH_DONE, Ordering::Release);
            break;
        }
        if STOP.load(Ordering::Acquire) {
            break;
        }
        if crate::threads::only_ours_left() {
            // What glibc does when a process's last thread exits: exit(0), which runs the
            // program's atexit handlers and our destructor (the final flush). Without this,
            // a program whose threads all end through pthread_exit would never end.
            // SAFETY: exit ends the process; no lock of ours is held here.
            unsafe { libc::exit(0) };
        }
        if SERVE_MODE.load(Ordering::Relaxed) && !collector_present() {
            detach();
            if crate::threads::CPU_HZ.load(Ordering::Relaxed) != 0 {
                crate::threads::stop_cpu_sampling();
            }
            // No daemon polls the region (none yet, or it stopped or restarted): try again
            // now and then, never in a tight loop.
            if last_reconnect.elapsed() >= reconnect_wait {
                last_reconnect = Instant::now();
                let _section = crate::fork::section();
                if let Some(reconnect) = RECONNECT.lock().ok().and_then(|r| *r) {
                    // A hand-over a daemon took but does not follow up (it refused the
                    // process) is repeated ever more rarely: each one may copy the region.
                    reconnect_wait = if reconnect() {
                        (reconnect_wait * 2).min(RECONNECT_AT_MOST)
                    } else {
                        RECONNECT_EVERY
                    };
                }
            }
            if !attached() {
                ring::drain(|_| counters::bump(Counter::DroppedSend));
                continue;
            }
        }
        if collector_present() && SHARED.header.collector_seen_ms.load(Ordering::Relaxed) != 0 {
            reconnect_wait = RECONNECT_EVERY; // a daemon follows this process
        }
        let section = crate::fork::section();
        commands::poll_commands();
        crate::threads::tend_perf_events();
        drop(section);
        let counters_due = last_counters.elapsed() >= COUNTERS_EVERY;
        if counters_due {
            last_counters = Instant::now();
        }
        flush(counters_due.then_some(Kind::Counters), false);
    }
}

/// How often a lost connection is retried.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// Longest wait between two hand-overs that no daemon followed up.
const RECONNECT_AT_MOST: Duration = Duration::from_secs(60);
/// Hands the region over again (set by [`crate::lifecycle`]); true if a daemon took it.
pub static RECONNECT: Mutex<Option<fn() -> bool>> = Mutex::new(None);

/// Makes the next drain cycle report every module, bucket and thread-creation stack again
/// (a new collector knows nothing).
pub fn report_everything_again() {
    if let Ok(mut map) = MODULES.lock() {
        map.forget_reported();
    }
    reports::forget_sent();
    crate::threads::touch_creations();
}

/// One drain cycle: module changes, samples, log messages, then counters of kind
/// `counters` if given. At exit (`last`), waits briefly for the background thread's cycle
/// to end and for socket room, and stops the thread.
pub fn flush(counters_kind: Option<Kind>, last: bool) {
    if last {
        STOP.store(true, Ordering::Release);
    }
    let _section = crate::fork::section();
    if !acquire_drain(last) {
        return;
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    let _ = reports::send_module_changes(&mut buf, last);
    reports::send_samples(&mut buf, last);
    if last {
        // Small and what tests and CI budgets read first: send it before the bulky buckets.
        reports::send_mem_stats(&mut buf, last);
    }
    reports::send_changed_buckets(&mut buf, last);
    reports::send_thread_creates(&mut buf, last);
    send_log(&mut buf, last);
    reports::track_peak();
    if let Some(kind) = counters_kind {
        reports::send_mem_stats(&mut buf, last);
        if let Some(n) = wire::encode_counters(&mut buf, kind, &counters::snapshot()) {
            send(buf.get(..n).unwrap_or(&[]), last);
        }
    }
    if last {
        // The collector may end the session as soon as it has read the ring.
        SHARED
            .header
            .finished
            .store(shm::FINISHED, Ordering::Release);
    }
    DRAINING.store(false, Ordering::Release);
}

/// Sends the log lines waiting to be sent.
fn send_log(buf: &mut [u8], patient: bool) {
    for (level, text) in log::take() {
        if let Some(n) = wire::encode_log(buf, level, text.as_bytes()) {
            send(buf.get(..n).unwrap_or(&[]), patient);
        }
    }
}

fn acquire_drain(patient: bool) -> bool {
    let deadline = Instant::now() + Duration::from_millis(200);
    loop {
        if DRAINING
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return true;
        }
        if !patient || Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
