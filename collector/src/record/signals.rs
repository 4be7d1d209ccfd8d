//! Signals while `anyprof record` runs: which are forwarded to the program, which ask for a
//! heap snapshot, and which, once the program has exited, ask `anyprof` to stop.
//!
//! The handler only touches the atomics below (and calls `kill`, `signal`, `raise`), so it
//! is async-signal-safe; the rest of `record` reads them.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// The program's pid while it runs (0 before and after): where signals are forwarded.
pub(super) static CHILD_PID: AtomicI32 = AtomicI32::new(0);

/// The signal that asks for a heap snapshot (0 = none) and whether one arrived.
pub(super) static SNAPSHOT_SIGNAL: AtomicI32 = AtomicI32::new(0);

pub(super) static SNAPSHOT_WANTED: AtomicBool = AtomicBool::new(false);

/// Set once the program has exited: SIGINT, SIGTERM, SIGHUP and SIGQUIT then ask `anyprof`
/// to stop ([`STOP_REQUESTED`]) instead of being forwarded.
pub(super) static PROGRAM_ENDED: AtomicBool = AtomicBool::new(false);

/// The user asked to stop after the program ended: write what we have, unsymbolized.
pub(super) static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to us by another
/// process to the program; the same signals from the terminal are not forwarded (the program
/// got them already) but no longer kill us. Once the program has exited, the first SIGINT,
/// SIGTERM, SIGHUP or SIGQUIT makes `anyprof` write its profiles at once without symbolizing
/// the rest, and a second one ends it as that signal would.
///
/// A signal that was ignored when `anyprof` started (`nohup`, a background job of a
/// non-interactive shell, a service manager) stays ignored, by us and by the program, which
/// inherits the disposition as it would without us: a handler would be reset to the default
/// action by `exec`.
pub(super) fn forward_signals(snapshot_signal: Option<i32>) {
    extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
        if sig == SNAPSHOT_SIGNAL.load(Ordering::SeqCst) {
            SNAPSHOT_WANTED.store(true, Ordering::SeqCst);
            return;
        }
        let code = if info.is_null() {
            0
        } else {
            // SAFETY: the kernel passes a valid siginfo to SA_SIGINFO handlers.
            unsafe { (*info).si_code }
        };
        if PROGRAM_ENDED.load(Ordering::SeqCst)
            && [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT].contains(&sig)
        {
            if STOP_REQUESTED.swap(true, Ordering::SeqCst) {
                // The second request: end now, as the signal would without us.
                // SAFETY: signal and raise are async-signal-safe.
                unsafe {
                    libc::signal(sig, libc::SIG_DFL);
                    libc::raise(sig);
                }
            }
            return;
        }
        let child = CHILD_PID.load(Ordering::SeqCst);
        // si_code <= 0: sent by a process (kill, sigqueue, tkill); SI_KERNEL: the terminal.
        if child > 0 && code <= 0 {
            // SAFETY: kill is async-signal-safe.
            unsafe { libc::kill(child, sig) };
        }
    }
    for sig in snapshot_signal.into_iter().chain([
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ]) {
        // SAFETY: a zeroed sigaction is a valid out-buffer; a null new action only reads.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
        if old.sa_sigaction == libc::SIG_IGN && Some(sig) != snapshot_signal {
            continue;
        }
        // SAFETY: a zeroed sigaction is valid; we set handler and flags.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: installing a handler that only calls async-signal-safe functions.
        unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) };
    }
}
