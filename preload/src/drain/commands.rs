//! The collector's commands (background-thread world): start and stop CPU sampling, and
//! thread dumps.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyprof_wire::shared as shm;
use anyprof_wire::{self as wire, Counter};

use crate::counters;
use crate::region::SHARED;
use crate::signal::ring;

/// Carries out the collector's commands from the command ring, without waiting for any.
pub fn poll_commands() {
    while let Some(cmd) = shm::pop_command(&SHARED.commands) {
        match cmd {
            wire::Command::CpuStart(hz) => {
                crate::threads::start_cpu_sampling(hz.clamp(1, crate::config::MAX_CPU_HZ))
            }
            wire::Command::CpuStop => crate::threads::stop_cpu_sampling(),
            wire::Command::ThreadDump(id) => dump_threads(id),
        }
    }
}

/// Records every thread's current stack, tagged with `id`.
///
/// A thread blocked in a system call (most threads, most of the time) is not disturbed: the
/// kernel reports its stack pointer and instruction pointer in `/proc/self/task/TID/syscall`,
/// and it is unwound from here while it stays blocked. Only a thread that is running gets our
/// sampling signal through `tgkill`, whose handler records its stack — a signal to a sleeping
/// thread would cut its sleep short with EINTR. Threads that block the signal are left out.
fn dump_threads(id: u32) {
    let id = id.max(1);
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() };
    let me = crate::threads::DRAIN_TID.load(Ordering::Acquire);
    let mut signalled = false;
    for tid in crate::threads::task_ids() {
        if tid == me {
            continue;
        }
        let state =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap_or_default();
        if let Some((sp, pc)) = blocked_registers(&state) {
            record_blocked_thread(tid, sp, pc, id);
            continue;
        }
        if !signalled {
            if crate::signal::handler::install(crate::exports::real_sigaction).is_err() {
                continue;
            }
            crate::signal::handler::DUMP_REQUEST.store(id, Ordering::Release);
            signalled = true;
        }
        // SAFETY: tgkill to a thread of our own process; one that exited meanwhile just makes
        // it fail with ESRCH.
        unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                pid,
                tid as libc::c_int,
                crate::signal::handler::SIGNAL,
            )
        };
    }
    if signalled {
        // Give the running threads a moment to take the signal; late ones are left out.
        std::thread::sleep(Duration::from_millis(20));
        crate::signal::handler::DUMP_REQUEST.store(0, Ordering::Release);
    }
}

/// The stack and instruction pointers of a thread blocked in a system call, from its
/// `/proc/.../syscall` line (`NR ARG1..ARG6 SP PC`); `None` for "running" or unreadable.
fn blocked_registers(line: &str) -> Option<(u64, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 9 {
        return None;
    }
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    Some((hex(fields.get(fields.len() - 2)?)?, hex(fields.last()?)?))
}

fn record_blocked_thread(tid: u32, sp: u64, pc: u64, id: u32) {
    let Some(mut claim) = ring::claim() else {
        counters::bump(Counter::DroppedRingFull);
        return;
    };
    let record = claim.record();
    crate::signal::unwind::IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    let (len, flags) =
        crate::signal::unwind::unwind(pc, sp, 0, crate::threads::stack_of(tid), &mut record.frames);
    crate::signal::unwind::IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    record.len = len as u16;
    record.flags = flags | wire::FLAG_THREAD_DUMP;
    record.tid = tid;
    record.time_ns = crate::signal::sys::monotonic_ns();
    record.cpu_ns = u64::from(id);
    claim.publish();
}
