//! The symbols `libanyprof.so` exports to interpose on the program (constructor world for
//! their set-up; the symbols themselves run on the program's threads, in whatever world the
//! program calls them from, and keep to the core's rules where they may run in a signal
//! handler or inside an allocation).
//!
//! Hooks are `#[cfg_attr(not(test), no_mangle)]` so that unit tests of this crate do not
//! interpose on their own test harness. Every `extern "C"` function here is nounwind: a panic
//! inside one aborts the process instead of unwinding into the program's frames.
//!
//! # Every exported symbol
//! Checked against `nm -D --defined-only libanyprof.so` by `tests/tests/preload_core.rs`: a
//! symbol exported but not listed here, or listed but not exported, fails that test.
//! - defined in this file: `malloc` `free` `calloc` `realloc` `reallocarray` `memalign`
//!   `aligned_alloc` `posix_memalign` `valloc` `pvalloc` `malloc_usable_size` `free_sized`
//!   `free_aligned_sized` (bodies in the core's `alloc::hooks`); `pthread_create`; `_exit`
//!   `_Exit`; `_Fork`; `sigaction` `signal`; `unshare` `setns`; `dlsym` (a trampoline,
//!   defined at the end of this file);
//! - the C++ `operator new` and `operator delete` family, defined in [`crate::alloc::cxx`]:
//!   `_Znwm` `_Znam` `_ZnwmRKSt9nothrow_t` `_ZnamRKSt9nothrow_t` `_ZnwmSt11align_val_t`
//!   `_ZnamSt11align_val_t` `_ZnwmSt11align_val_tRKSt9nothrow_t`
//!   `_ZnamSt11align_val_tRKSt9nothrow_t` `_ZdlPv` `_ZdaPv` `_ZdlPvm` `_ZdaPvm`
//!   `_ZdlPvRKSt9nothrow_t` `_ZdaPvRKSt9nothrow_t` `_ZdlPvSt11align_val_t`
//!   `_ZdaPvSt11align_val_t` `_ZdlPvmSt11align_val_t` `_ZdaPvmSt11align_val_t`
//!   `_ZdlPvSt11align_val_tRKSt9nothrow_t` `_ZdaPvSt11align_val_tRKSt9nothrow_t`;
//! - not an interface, exported only because a cdylib exports every `#[no_mangle]` Rust
//!   function: the helpers that the C half of the C++ layer (`alloc/cxx_new.c`) calls,
//!   `anyprof_cxx_lookup` `anyprof_cxx_decide` `anyprof_cxx_is_decided` `anyprof_cxx_next`
//!   `anyprof_cxx_enter` `anyprof_cxx_leave` `anyprof_cxx_allocated` `anyprof_cxx_freeing`
//!   `anyprof_cxx_malloc` `anyprof_cxx_free` `anyprof_cxx_thrower`.

use core::ffi::c_void;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::signal::thread_state;
use crate::threads::{self, StartRoutine};

type PthreadCreate = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    extern "C" fn(*mut c_void) -> *mut c_void,
    *mut c_void,
) -> libc::c_int;

static REAL_PTHREAD_CREATE: AtomicUsize = AtomicUsize::new(0);

/// Resolves the next `pthread_create` in link order (glibc's, normally).
pub fn resolve() -> usize {
    let cached = REAL_PTHREAD_CREATE.load(Ordering::Acquire);
    if cached != 0 {
        return cached;
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) } as usize;
    REAL_PTHREAD_CREATE.store(f, Ordering::Release);
    f
}

type ExitFn = unsafe extern "C" fn(libc::c_int) -> !;

/// The next `_exit` in link order (glibc's), found at start: `_exit` may run in a signal
/// handler, where `dlsym` may not.
static REAL_EXIT: AtomicUsize = AtomicUsize::new(0);

/// The next `sigaction` and `signal` in link order, found once: both may be called from a
/// signal handler, where `dlsym` may not (it takes the loader's lock and may allocate).
static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGNAL: AtomicUsize = AtomicUsize::new(0);

/// The next `_Fork` in link order (glibc's), found once: `_Fork` may be called from a
/// signal handler.
static REAL_FORK: AtomicUsize = AtomicUsize::new(0);

/// Resolves the next `_exit`, `_Fork`, `sigaction` and `signal` (constructor world).
pub fn resolve_exit() {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"_exit".as_ptr()) } as usize;
    REAL_EXIT.store(f, Ordering::Release);
    next_once(&REAL_SIGACTION, c"sigaction");
    next_once(&REAL_SIGNAL, c"signal");
    next_once(&REAL_FORK, c"_Fork");
}

/// `_Fork` (glibc 2.34): `fork` without fork handlers, so without ours: the child, which
/// would share our region with its parent, steps aside before it returns to the program
/// (see [`crate::lifecycle::step_aside_without_fork_handlers`]). glibc's own `fork` calls
/// its `_Fork` directly, not this.
#[cfg_attr(not(test), no_mangle)]
#[allow(non_snake_case)] // the C name
pub extern "C" fn _Fork() -> libc::pid_t {
    let real = next_once(&REAL_FORK, c"_Fork");
    if real == 0 {
        crate::signal::sys::set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: the address dlsym returned for "_Fork", which takes no argument.
    let pid =
        unsafe { core::mem::transmute::<usize, unsafe extern "C" fn() -> libc::pid_t>(real)() };
    if pid == 0 {
        let errno = crate::signal::sys::errno();
        crate::lifecycle::step_aside_without_fork_handlers();
        crate::signal::sys::set_errno(errno);
    }
    pid
}

/// The next definition of `name`, from `slot` once it was looked up: only a call made before
/// our constructor (by another library's) looks it up, once.
fn next_once(slot: &AtomicUsize, name: &core::ffi::CStr) -> usize {
    match slot.load(Ordering::Acquire) {
        0 => {
            let f = next_symbol(name);
            slot.store(f, Ordering::Release);
            f
        }
        f => f,
    }
}

/// `_exit(2)`: the process ends without destructors, so the library's own flush at unload
/// would not run and the last moments of the program (up to one 20 ms drain cycle of samples,
/// the final counters) would be lost. They are sent first.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn _exit(status: libc::c_int) -> ! {
    crate::lifecycle::before_exit();
    exit_now(status)
}

/// `_Exit` (C99): the same as `_exit`.
#[cfg_attr(not(test), no_mangle)]
#[allow(non_snake_case)] // the C name
pub extern "C" fn _Exit(status: libc::c_int) -> ! {
    crate::lifecycle::before_exit();
    exit_now(status)
}

fn exit_now(status: libc::c_int) -> ! {
    let real = REAL_EXIT.load(Ordering::Acquire);
    if real != 0 {
        // SAFETY: the address dlsym returned for "_exit".
        unsafe { core::mem::transmute::<usize, ExitFn>(real)(status) }
    }
    loop {
        // SAFETY: exit_group ends the process; it does not return.
        unsafe { libc::syscall(libc::SYS_exit_group, status) };
    }
}

/// `pthread_create`: starts the thread through a trampoline that gives it a CPU timer.
///
/// # Safety
/// Same contract as `pthread_create(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: extern "C" fn(*mut c_void) -> *mut c_void,
    arg: *mut c_void,
) -> libc::c_int {
    let real = resolve();
    if real == 0 {
        return libc::EAGAIN;
    }
    // SAFETY: `real` is the address dlsym returned for pthread_create.
    let real: PthreadCreate = unsafe { core::mem::transmute(real) };
    // Our own threads start marked as ours from their first instruction, so that what the
    // thread library allocates for them is not counted as the program's, and with every
    // signal blocked, so that none meant for the program lands in them.
    if thread_state::is_internal() {
        let boxed = Box::into_raw(Box::new(StartRoutine { start, arg }));
        let _blocked = threads::AllSignalsBlocked::new();
        // SAFETY: forwarding the caller's arguments, with our trampoline owning `boxed`.
        let rc = unsafe {
            real(
                thread,
                attr,
                threads::internal_trampoline,
                boxed as *mut c_void,
            )
        };
        if rc != 0 {
            // SAFETY: the thread was not created, so the trampoline never took ownership.
            drop(unsafe { Box::from_raw(boxed) });
        }
        return rc;
    }
    // The program is about to have two threads: ours may start now (see
    // `drain::defer_thread`), before the program's, so that it never sees one of ours appear
    // later. One atomic load once it has.
    crate::drain::start_deferred_thread();
    // Every thread while sampling is off starts untouched, and every thread of a child made
    // without fork handlers (a raw `clone`), whose samples would land in its parent's ring.
    let profiling = (threads::CPU_HZ.load(Ordering::Relaxed) != 0
        || crate::alloc::sampler::RATE.load(Ordering::Relaxed) != 0)
        && crate::lifecycle::is_own_process();
    if !profiling {
        // SAFETY: forwarding the caller's arguments unchanged.
        return unsafe { real(thread, attr, start, arg) };
    }
    let internal = thread_state::Internal::enter();
    threads::note_creation();
    let boxed = Box::into_raw(Box::new(StartRoutine { start, arg }));
    drop(internal);
    // SAFETY: forwarding the caller's arguments, with our trampoline owning `boxed`.
    let rc = unsafe {
        real(
            thread,
            attr,
            threads::start_routine_trampoline,
            boxed as *mut c_void,
        )
    };
    if rc != 0 {
        // SAFETY: the thread was not created, so the trampoline never took ownership.
        drop(unsafe { Box::from_raw(boxed) });
    }
    rc
}

type SetnsFn = unsafe extern "C" fn(libc::c_int, libc::c_int) -> libc::c_int;

/// Runs a namespace call that the kernel refuses in a multithreaded process
/// (`unshare(CLONE_NEWUSER)`, `setns` into a user namespace) with our background thread
/// stopped, so the program behaves as it would without us; restarts the thread after.
fn single_threaded(call: impl FnOnce() -> libc::c_int) -> libc::c_int {
    let paused = crate::drain::pause();
    let rc = call();
    let errno = crate::signal::sys::errno();
    if paused {
        let _ = crate::drain::spawn();
    }
    crate::signal::sys::set_errno(errno);
    rc
}

fn next_symbol(name: &core::ffi::CStr) -> usize {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
}

/// `unshare(2)`.
///
/// # Safety
/// Same contract as `unshare(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn unshare(flags: libc::c_int) -> libc::c_int {
    let real = next_symbol(c"unshare");
    if real == 0 {
        crate::signal::sys::set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: `real` is libc's unshare, which has this signature.
    let real: unsafe extern "C" fn(libc::c_int) -> libc::c_int =
        unsafe { core::mem::transmute(real) };
    // SAFETY: forwarding the caller's argument.
    single_threaded(|| unsafe { real(flags) })
}

/// `setns(2)`.
///
/// # Safety
/// Same contract as `setns(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn setns(fd: libc::c_int, nstype: libc::c_int) -> libc::c_int {
    let real = next_symbol(c"setns");
    if real == 0 {
        crate::signal::sys::set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: `real` is libc's setns, which has this signature.
    let real: SetnsFn = unsafe { core::mem::transmute(real) };
    // SAFETY: forwarding the caller's arguments.
    single_threaded(|| unsafe { real(fd, nstype) })
}

// The malloc family. Each symbol forwards to `crate::alloc::hooks`; see `crate::alloc` for
// the rules that code follows.

/// `malloc(3)`.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    crate::alloc::hooks::malloc(size)
}

/// `free(3)`.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn free(p: *mut c_void) {
    crate::alloc::hooks::free(p)
}

/// `free_sized` (C23): `free` that is told the size. Interposed so that a program built
/// against a C library that has it does not free out of our sight; the size is not needed.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn free_sized(p: *mut c_void, _size: usize) {
    crate::alloc::hooks::free(p)
}

/// `free_aligned_sized` (C23): `free` of an aligned block that is told its alignment and size.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn free_aligned_sized(p: *mut c_void, _align: usize, _size: usize) {
    crate::alloc::hooks::free(p)
}

/// `calloc(3)`.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    crate::alloc::hooks::calloc(n, size)
}

/// `realloc(3)`.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    crate::alloc::hooks::realloc(p, size)
}

/// `reallocarray(3)`.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    crate::alloc::hooks::reallocarray(p, n, size)
}

/// `posix_memalign(3)`.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> libc::c_int {
    crate::alloc::hooks::posix_memalign(out, align, size)
}

/// `aligned_alloc(3)`.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    crate::alloc::hooks::aligned_alloc(align, size)
}

/// `memalign(3)`.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    crate::alloc::hooks::memalign(align, size)
}

/// `valloc(3)`.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    crate::alloc::hooks::valloc(size)
}

/// `pvalloc(3)`.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    crate::alloc::hooks::pvalloc(size)
}

/// `malloc_usable_size(3)`.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    crate::alloc::hooks::malloc_usable_size(p)
}

// Signal dispositions for our sampling signal (`crate::signal::handler::SIGNAL`, a real-time
// signal; SIGPROF is the program's and passes straight through). Once our handler is
// installed, a program that installs its own handler for that signal (or resets every
// signal's disposition) would silently replace ours and receive our timer ticks; instead the
// program's handler is recorded and ours chains every such signal that is not one of our
// timers to it. Every other signal passes straight through.

type SigactionFn =
    unsafe extern "C" fn(libc::c_int, *const libc::sigaction, *mut libc::sigaction) -> libc::c_int;
type SignalFn = unsafe extern "C" fn(libc::c_int, libc::sighandler_t) -> libc::sighandler_t;

/// The real `sigaction`.
///
/// # Safety
/// Same contract as `sigaction(2)`.
pub unsafe extern "C" fn real_sigaction(
    sig: libc::c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> libc::c_int {
    let real = next_once(&REAL_SIGACTION, c"sigaction");
    if real == 0 {
        crate::signal::sys::set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: `real` is libc's sigaction, which has this signature.
    let real: SigactionFn = unsafe { core::mem::transmute(real) };
    // SAFETY: forwarding the caller's arguments.
    unsafe { real(sig, act, old) }
}

/// `sigaction(2)`.
///
/// # Safety
/// Same contract as `sigaction(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sigaction(
    sig: libc::c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> libc::c_int {
    if sig == crate::signal::handler::SIGNAL && crate::signal::handler::installed() {
        if !old.is_null() {
            // SAFETY: the caller passes a writable sigaction.
            unsafe { *old = crate::signal::handler::program_action() };
        }
        if !act.is_null() {
            // SAFETY: the caller passes a readable sigaction.
            let act = unsafe { &*act };
            crate::signal::handler::set_program_action(
                act.sa_sigaction,
                act.sa_flags,
                &act.sa_mask,
            );
        }
        return 0;
    }
    // SAFETY: forwarding the caller's arguments.
    unsafe { real_sigaction(sig, act, old) }
}

/// `signal(3)` (glibc's calls its internal sigaction, out of our sight, so it is
/// interposed too).
///
/// # Safety
/// Same contract as `signal(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn signal(
    sig: libc::c_int,
    handler: libc::sighandler_t,
) -> libc::sighandler_t {
    if sig == crate::signal::handler::SIGNAL && crate::signal::handler::installed() {
        let previous = crate::signal::handler::program_action().sa_sigaction;
        // SAFETY: a zeroed sigset_t is the empty set, as signal(3) installs.
        let empty: libc::sigset_t = unsafe { core::mem::zeroed() };
        crate::signal::handler::set_program_action(handler, libc::SA_RESTART, &empty);
        return previous;
    }
    let real = next_once(&REAL_SIGNAL, c"signal");
    if real == 0 {
        return libc::SIG_ERR;
    }
    // SAFETY: `real` is libc's signal, which has this signature.
    let real: SignalFn = unsafe { core::mem::transmute(real) };
    // SAFETY: forwarding the caller's arguments.
    unsafe { real(sig, handler) }
}

/// The next `dlsym` in link order (glibc's), found with `dlvsym` (a lookup through `dlsym`
/// would come back into our trampoline); 0 until the first call.
static REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);

/// Finds glibc's `dlsym` (under either of its symbol versions on x86_64).
fn real_dlsym() -> usize {
    let cached = REAL_DLSYM.load(Ordering::Acquire);
    if cached != 0 {
        return cached;
    }
    let mut f = 0;
    for version in [c"GLIBC_2.34", c"GLIBC_2.2.5"] {
        // SAFETY: dlvsym with RTLD_NEXT and NUL-terminated strings. Its caller (this
        // function, in our object) makes RTLD_NEXT mean "after libanyprof.so".
        f = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr()) } as usize;
        if f != 0 {
            break;
        }
    }
    REAL_DLSYM.store(f, Ordering::Release);
    f
}

/// What runs before the program's `dlsym` (`caller`: its return address): in a process
/// running without a thread of ours, the module map catches up with objects `dlopen`ed since
/// (see [`crate::drain::catch_up_without_thread`]). Not for our own lookups, which may come
/// from a hook (the C++ operators' first call). Returns glibc's `dlsym` for the trampoline to
/// jump to. Keeps errno.
extern "C" fn before_dlsym(caller: usize) -> usize {
    let real = match real_dlsym() {
        0 => no_dlsym as *const () as usize,
        f => f,
    };
    if !thread_state::is_internal() && !crate::signal::unwind::is_own_code(caller as u64) {
        let errno = crate::signal::sys::errno();
        crate::drain::catch_up_without_thread();
        crate::signal::sys::set_errno(errno);
    }
    real
}

/// Stands for glibc's `dlsym` if it could not be found (not glibc): finds nothing.
extern "C" fn no_dlsym(_handle: *mut c_void, _name: *const libc::c_char) -> *mut c_void {
    core::ptr::null_mut()
}

/// `dlsym`, as a trampoline: calls [`before_dlsym`] with the arguments saved, then jumps to
/// glibc's `dlsym` with the stack exactly as the program's call left it. glibc takes the
/// return address as the caller (`RTLD_NEXT` and the namespace depend on it): a wrapper
/// that called it would make every `dlsym(RTLD_NEXT, …)` search after our object instead of
/// the caller's. `dlopen` is not interposed at all, for the same reason (`$ORIGIN`,
/// `RUNPATH`); its object is caught up at the `dlsym` that follows it.
#[cfg_attr(not(test), export_name = "dlsym")]
#[cfg_attr(test, allow(dead_code))] // not exported from unit tests
#[unsafe(naked)]
pub unsafe extern "C" fn dlsym_trampoline() {
    core::arch::naked_asm!(
        ".cfi_startproc",
        // rsp is 8 mod 16 at entry: two pushes and 8 bytes align it for the call.
        "push rdi",
        ".cfi_adjust_cfa_offset 8",
        "push rsi",
        ".cfi_adjust_cfa_offset 8",
        "sub rsp, 8",
        ".cfi_adjust_cfa_offset 8",
        // The return address, above what was pushed: the caller, for `before`.
        "mov rdi, qword ptr [rsp + 24]",
        "call {before}",
        "add rsp, 8",
        ".cfi_adjust_cfa_offset -8",
        "pop rsi",
        ".cfi_adjust_cfa_offset -8",
        "pop rdi",
        ".cfi_adjust_cfa_offset -8",
        "jmp rax",
        ".cfi_endproc",
        before = sym before_dlsym,
    )
}
