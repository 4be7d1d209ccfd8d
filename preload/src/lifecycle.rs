//! Start, fork and exit of the library inside the host process.
//!
//! - **Load** ([`on_load`], from `.init_array`): read settings; without `ANYPROF_SOCKET`
//!   stay idle. Otherwise move the state into the shared region ([`crate::region`]), connect,
//!   hand the region over and say hello (pid, command line, settings) — then close every
//!   descriptor ([`drain::handshake`]) — publish the module map, install the signal handler,
//!   give the existing threads timers and start the background thread (in record mode, only
//!   once the program starts a second thread: [`drain::defer_thread`]). A secure-execution
//!   process (setuid, setgid, file capabilities) reads no setting from its environment and
//!   only ever talks to a root daemon at
//!   `/run/anyprof.sock` (see [`crate::config`]); every connection, first or renewed, is
//!   checked by [`drain::connect`] (socket owner, directory, peer credentials).
//! - **fork**: the child gets no timers from the kernel, and shares its parent's region until
//!   it makes its own: a new memfd mapped over it, empty but for the allocator counters (no
//!   rings, samples, counters or heap buckets of the parent's: the child's heap profile is
//!   what it allocates itself); it then hands that to the collector as a process of its own. (A program that then calls exec is
//!   profiled afresh: the library loads again in the new image.)
//! - **Exit** ([`on_unload`], from `.fini_array`): stop sampling, send what is left and the
//!   final counters. A process that ends with `_exit` runs no `.fini_array`: [`before_exit`]
//!   has the background thread do the same first (without our thread, the collector reads
//!   what is left from the region once the process is gone).
//!
//! World: constructor, atfork child handler and exit path (may allocate, lock and do I/O).

use std::ffi::CStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

use anyprof_wire::{self as wire, Kind, Level, TimerKind, MAX_MESSAGE};

use crate::config::{Config, Mode};
use crate::drain::Trust;
use crate::signal::{handler, sys, thread_state, unwind};
use crate::{alloc, drain, exports, log, threads};

static STARTED: AtomicBool = AtomicBool::new(false);
/// The encoded hello and the socket paths, kept to reconnect.
static HELLO: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static SOCKETS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Whom the sockets may belong to, fixed at start: root, and the effective uid the process
/// started with (unless secure execution). A process that later drops to another uid keeps
/// trusting only these.
static TRUST: Mutex<Trust> = Mutex::new(Trust { own_uid: None });
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The pid ACTIVE belongs to: a `vfork` child shares our memory but not our pid.
static OWN_PID: AtomicU32 = AtomicU32::new(0);

#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn(libc::c_int, *const *const libc::c_char, *const *const libc::c_char) =
    on_load;

#[used]
#[link_section = ".fini_array"]
static ON_UNLOAD: extern "C" fn() = on_unload;

/// Tells the unwinder where our own code is, so hook stacks start at the program's frame.
fn find_own_code() {
    let me = unwind::unwind_here as *const () as u64;
    if let Ok(map) = drain::MODULES.lock() {
        if let Some(m) = map.modules.iter().find(|m| {
            let (s, e) = m.exec_range();
            s <= me && me < e
        }) {
            let (s, e) = m.exec_range();
            unwind::set_self_range(s, e);
        }
    }
}

extern "C" fn on_load(
    argc: libc::c_int,
    argv: *const *const libc::c_char,
    _envp: *const *const libc::c_char,
) {
    if STARTED.swap(true, Ordering::AcqRel) {
        return;
    }
    // The program finds errno as the loader left it at `main`, whatever our start-up set.
    let errno = sys::errno();
    let internal = thread_state::Internal::enter();
    start(argc, argv);
    if !ACTIVE.load(Ordering::Acquire) {
        // Not profiled: the hooks counted since the first call (see `ACCOUNTING`); stop.
        alloc::hooks::ACCOUNTING.store(false, Ordering::Release);
    }
    drop(internal);
    sys::set_errno(errno);
}

/// Makes every panic in this library end the process at once, silently (see
/// [`crate::drain::thread::abort_on_panic`]): the default hook would print to the program's
/// stderr. The hook is this library's own (a cdylib carries its own copy of std): a Rust
/// program's panics are untouched.
fn abort_silently_on_panic() {
    std::panic::set_hook(Box::new(|_| {
        // SAFETY: abort is always safe to call; it does not return.
        unsafe { libc::abort() }
    }));
}

/// Hands the core what it needs from the std part (it never imports it).
fn publish_to_core() {
    anyprof_preload_core::signal::unwinder::publish(unwind::unwind, unwind::unwind_here);
}

fn start(argc: libc::c_int, argv: *const *const libc::c_char) {
    let _section = crate::fork::section();
    exports::resolve();
    abort_silently_on_panic();
    exports::resolve_exit();
    publish_to_core();
    alloc::real::resolve();
    let config = Config::from_env();
    // In a secure-execution process both are None/true: no path from the environment is
    // ever opened, and LD_PRELOAD is left alone.
    log::set_file(config.log_file.clone());
    if !config.exec_children && !config.secure {
        leave_ld_preload();
    }
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let trust = Trust {
        own_uid: (!config.secure).then_some(euid),
    };
    if let Ok(mut t) = TRUST.lock() {
        *t = trust;
    }
    let sockets = config.sockets(euid);
    if sockets.is_empty() {
        return; // record mode without a socket: nowhere to send anything
    }
    for problem in &config.problems {
        log::message(Level::Warn, problem.clone());
    }
    if config.mem_rate > 0 {
        if let Some(owner) = alloc::malloc_answered_by() {
            log::message(
                Level::Warn,
                format!(
                    "malloc is answered by {owner} before libanyprof.so (an allocator linked into \
                     the program, or preloaded ahead of anyprof): what is allocated through it \
                     is not in the heap profile"
                ),
            );
        }
    }
    encode_hello(&config, argc, argv);
    // The state moves into a memfd before anything is sent: the collector maps it.
    crate::region::stamp_header();
    let memfd = match crate::region::into_memfd() {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::message(
                Level::Warn,
                format!(
                    "cannot set up the memory shared with the anyprof collector ({e}); \
                     this process is not profiled"
                ),
            );
            None
        }
    };
    let have_region = memfd.is_some();
    let handed = have_region && connect_any(&sockets) && {
        let hello = HELLO.lock().map(|h| h.clone()).unwrap_or_default();
        drain::handshake(memfd.as_ref().map(|fd| fd.0), &hello)
    };
    // The collector has its own descriptor now (or none was given): ours is closed here.
    drop(memfd);
    if !handed && config.mode == Mode::Record {
        if !have_region {
            return; // said why above
        }
        log::message(
            Level::Warn,
            format!(
                "cannot reach the anyprof collector at {}; not profiling",
                sockets[0].display()
            ),
        );
        return;
    }
    if let Ok(mut p) = SOCKETS.lock() {
        *p = sockets;
    }
    if let Ok(mut r) = drain::RECONNECT.lock() {
        *r = Some(reconnect);
    }
    drain::SERVE_MODE.store(config.mode == Mode::Serve, Ordering::Release);
    note_own_pid();
    ACTIVE.store(true, Ordering::Release);

    threads::init();
    threads::set_cpu_source(config.cpu_source);
    threads::record_stack_bounds();
    // The main thread may end through pthread_exit while others run on.
    threads::run_destructor_at_exit();
    unwind::init_caches();
    drain::flush(None, false); // publishes the module map before the first sample
    find_own_code();
    alloc::counters::init();
    alloc::real::check_glibc_layout();
    alloc::hooks::ACCOUNTING.store(true, Ordering::Release);
    alloc::hooks::start_sampling(config.mem_rate);
    if config.mem_rate > 0 {
        // This thread's countdown may have been parked while sampling was off.
        alloc::sampler::reset(crate::tls::current());
    }
    // In serve mode CPU sampling waits for the daemon to ask (`Command::CpuStart`).
    if config.mode == Mode::Record && config.cpu_hz > 0 {
        threads::start_cpu_sampling(config.cpu_hz);
    }
    FORK_CHILDREN.store(config.fork_children, Ordering::Release);
    crate::fork::install();
    start_or_defer_thread(config.mode);
}

/// Starts our background thread, or, in record mode while the program has a single thread,
/// leaves the sending to the collector until the program starts a thread of its own (see
/// [`drain::defer_thread`]). In serve mode the thread carries out the daemon's commands
/// (start and stop sampling, thread dumps), so it always runs.
fn start_or_defer_thread(mode: Mode) {
    if mode == Mode::Record && drain::program_is_single_threaded() {
        drain::defer_thread();
        return;
    }
    if let Err(e) = drain::spawn() {
        log::message(
            Level::Warn,
            format!("cannot start the anyprof thread ({e}); samples are sent at exit only"),
        );
    }
    drain::flush(None, false);
}

/// Takes this library out of `LD_PRELOAD` (other entries stay), so that programs this one
/// execs run without it (`ANYPROF_EXEC=off`). Runs in the constructor, before `main`.
fn leave_ld_preload() {
    let Some(current) = std::env::var_os("LD_PRELOAD") else {
        return;
    };
    let Some((_, name)) = crate::modules::object_at(leave_ld_preload as *const () as usize) else {
        return;
    };
    if name.is_null() {
        return;
    }
    // SAFETY: dli_fname is a NUL-terminated path owned by the loader.
    let ours = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    let ours = std::fs::canonicalize(&ours).unwrap_or_else(|_| PathBuf::from(ours));
    let text = current.to_string_lossy().into_owned();
    let kept: Vec<&str> = text
        .split([':', ' '])
        .filter(|entry| !entry.is_empty())
        .filter(|entry| std::fs::canonicalize(entry).map_or(true, |p| p != ours))
        .collect();
    // The constructor runs before main, while the program has no other thread to race
    // with on the environment.
    if kept.is_empty() {
        std::env::remove_var("LD_PRELOAD");
    } else {
        std::env::set_var("LD_PRELOAD", kept.join(":"));
    }
}

/// Tries each socket in turn; true once one connects (and passes the checks).
fn connect_any(sockets: &[PathBuf]) -> bool {
    let trust = TRUST.lock().map_or(Trust { own_uid: None }, |t| *t);
    sockets.iter().any(|s| drain::connect(s, trust).is_ok())
}

fn encode_hello(config: &Config, argc: libc::c_int, argv: *const *const libc::c_char) {
    let mut cmdline = Vec::new();
    if !argv.is_null() {
        for i in 0..argc.max(0) as usize {
            // SAFETY: the loader passes argv with argc valid entries to .init_array functions.
            let arg = unsafe { *argv.add(i) };
            if arg.is_null() {
                break;
            }
            if i > 0 {
                cmdline.push(0);
            }
            // SAFETY: each argv entry is a NUL-terminated string.
            cmdline.extend_from_slice(unsafe { CStr::from_ptr(arg) }.to_bytes());
        }
    }
    let exe = std::fs::read_link("/proc/self/exe")
        .map(|p| p.into_os_string().into_encoded_bytes())
        .unwrap_or_default();
    let realtime = sys::clock_ns(libc::CLOCK_REALTIME);
    let sampling_now = config.mode == Mode::Record && config.cpu_hz > 0;
    let timer = if sampling_now {
        TimerKind::ThreadCpuTimer
    } else {
        TimerKind::Off
    };
    let mut buf = vec![0u8; MAX_MESSAGE];
    // SAFETY: getpid/getppid cannot fail.
    let (pid, ppid) = unsafe { (libc::getpid() as u32, libc::getppid() as u32) };
    let info = wire::HelloInfo {
        pid,
        ppid,
        cpu_hz: if sampling_now { config.cpu_hz } else { 0 },
        timer,
        mem_rate: config.mem_rate,
        start_realtime_ns: realtime,
        start_monotonic_ns: sys::monotonic_ns(),
        exe: &exe,
        cmdline: &cmdline,
    };
    if let Some(n) = wire::encode_hello(&mut buf, &info) {
        buf.truncate(n);
        if let Ok(mut h) = HELLO.lock() {
            *h = buf;
        }
    }
}

/// Hands the region to a (new) daemon after none was polling it: discards what no one
/// read, then a Region datagram — without a descriptor for a root daemon, which opens
/// `/proc/PID/map_files/…` itself and so loses nothing; with a fresh memfd (a copy of the
/// region, mapped over it) for any other — and the hello; then (on the next drain cycle)
/// every module, bucket and thread-creation stack again.
fn reconnect() -> bool {
    let sockets = SOCKETS.lock().map(|p| p.clone()).unwrap_or_default();
    if !connect_any(&sockets) {
        return false;
    }
    crate::region::reset_for_reattach();
    let memfd = if drain::collector_uid() == Some(0) && crate::region::in_memfd() {
        None
    } else {
        match crate::region::into_memfd() {
            Ok(fd) => Some(fd),
            Err(_) => {
                drain::forget_connection();
                return false;
            }
        }
    };
    let hello = HELLO.lock().map(|h| h.clone()).unwrap_or_default();
    let handed_over = drain::handshake(memfd.as_ref().map(|fd| fd.0), &hello);
    if handed_over {
        drain::report_everything_again();
    }
    handed_over
}

/// Profile forked children (`ANYPROF_FORK`, default on).
static FORK_CHILDREN: AtomicBool = AtomicBool::new(true);

/// Called in a forked child, once every one of our locks is known to be free (see
/// [`crate::fork`]): start over as a process of our own, or step aside.
pub fn after_fork_in_child() {
    let _internal = thread_state::Internal::enter();
    let sampling_hz = if handler::SAMPLING.load(Ordering::Acquire) {
        threads::CPU_HZ.load(Ordering::Acquire)
    } else {
        0
    };
    handler::SAMPLING.store(false, Ordering::Release);
    threads::CPU_HZ.store(0, Ordering::Release);
    drain::forget_connection();
    drain::forget_thread_in_child();
    thread_state::clear_tid();
    threads::forget_other_threads_in_child();
    // Until it has a region of its own, the child shares its parent's: nothing of the
    // parent's may be cleared before this.
    let memfd = if ACTIVE.load(Ordering::Acquire) && FORK_CHILDREN.load(Ordering::Acquire) {
        match crate::region::into_memfd_for_child() {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::message(
                    Level::Warn,
                    format!(
                        "cannot set up the memory shared with the anyprof collector in a \
                         forked child ({e}); the child is not profiled"
                    ),
                );
                None
            }
        }
    } else {
        None
    };
    let Some(memfd) = memfd else {
        // Step aside: no accounting, no sampling, no connection, and no write to the
        // region, which may still be the parent's.
        alloc::sampler::RATE.store(0, Ordering::Release);
        alloc::hooks::ACCOUNTING.store(false, Ordering::Release);
        alloc::counters::detach_current_thread();
        ACTIVE.store(false, Ordering::Release);
        return;
    };
    crate::region::reset_for_child();
    alloc::live::start_child_generation();
    note_own_pid();
    renew_hello();
    drain::report_everything_again();
    let sockets = SOCKETS.lock().map(|p| p.clone()).unwrap_or_default();
    if connect_any(&sockets) {
        let hello = HELLO.lock().map(|h| h.clone()).unwrap_or_default();
        drain::handshake(Some(memfd.0), &hello);
    }
    drop(memfd);
    let mode = if drain::SERVE_MODE.load(Ordering::Acquire) {
        Mode::Serve
    } else {
        Mode::Record
    };
    start_or_defer_thread(mode);
    if sampling_hz > 0 {
        threads::start_cpu_sampling(sampling_hz);
    }
}

/// Rewrites the stored hello for this (forked) process: its own pid, parent and start time.
fn renew_hello() {
    let Ok(mut hello) = HELLO.lock() else { return };
    // SAFETY: getpid/getppid cannot fail.
    let (pid, ppid) = unsafe { (libc::getpid() as u32, libc::getppid() as u32) };
    let fields = [
        (wire::HELLO_PID_AT, u64::from(pid), 4),
        (wire::HELLO_PPID_AT, u64::from(ppid), 4),
        (
            wire::HELLO_REALTIME_AT,
            sys::clock_ns(libc::CLOCK_REALTIME),
            8,
        ),
        (wire::HELLO_MONOTONIC_AT, sys::monotonic_ns(), 8),
    ];
    for (at, value, width) in fields {
        if let Some(dst) = hello.get_mut(at..at + width) {
            dst.copy_from_slice(&value.to_le_bytes()[..width]);
        }
    }
}

/// In a child made with `_Fork`, which runs no fork handler (ours neither): it copied its
/// parent's memory but shares its parent's region, so it steps aside before it runs on, as
/// a child does when it cannot have a region of its own: no sampling, no counting, no thread
/// of ours. Async-signal-safe, as `_Fork` is: atomic and thread-local stores only.
pub fn step_aside_without_fork_handlers() {
    handler::SAMPLING.store(false, Ordering::Release);
    threads::CPU_HZ.store(0, Ordering::Release);
    alloc::sampler::RATE.store(0, Ordering::Release);
    alloc::hooks::ACCOUNTING.store(false, Ordering::Release);
    alloc::counters::detach_current_thread();
    ACTIVE.store(false, Ordering::Release);
}

/// Whether this process is the one our state was set up for: false in a child made without
/// our fork handlers (`vfork`, `_Fork`, a raw `clone`), which shares or copied its parent's
/// region and must not write into it.
pub fn is_own_process() -> bool {
    // SAFETY: getpid cannot fail.
    OWN_PID.load(Ordering::Acquire) == unsafe { libc::getpid() } as u32
}

fn note_own_pid() {
    // SAFETY: getpid cannot fail.
    OWN_PID.store(unsafe { libc::getpid() } as u32, Ordering::Release);
}

/// Called by `_exit` and `_Exit` before the process ends without running destructors (so
/// without [`on_unload`]): sends what is left, as `on_unload` would, through the background
/// thread. Async-signal-safe: `_exit` is the one way out a signal handler may take.
///
/// May not allocate or lock (see [`drain::last_flush_by_background`]), and must do nothing
/// at all in a `vfork` child, which runs on its suspended parent's memory: a flush or a
/// cleared ACTIVE there would end the parent's profile.
pub fn before_exit() {
    // SAFETY: getpid cannot fail.
    if OWN_PID.load(Ordering::Acquire) != unsafe { libc::getpid() } as u32 {
        return;
    }
    if !ACTIVE.swap(false, Ordering::AcqRel) {
        return;
    }
    let _internal = thread_state::Internal::enter();
    handler::SAMPLING.store(false, Ordering::Release);
    drain::last_flush_by_background();
}

extern "C" fn on_unload() {
    // A child forked without our atfork handlers (a raw `fork`/`clone` system call,
    // `_Fork`) still shares its parent's region: its exit must not end the parent's
    // profile by flushing into it and marking it finished.
    // SAFETY: getpid cannot fail.
    if OWN_PID.load(Ordering::Acquire) != unsafe { libc::getpid() } as u32 {
        return;
    }
    if !ACTIVE.swap(false, Ordering::AcqRel) {
        return;
    }
    thread_state::Internal::for_good();
    handler::SAMPLING.store(false, Ordering::Release);
    drain::flush(Some(Kind::Goodbye), true);
}
