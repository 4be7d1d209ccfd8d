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
    let mut copy = Vec::new();
    for tid in crate::threads::task_ids() {
        if tid == me {
            continue;
        }
        let state =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap_or_default();
        if let Some((sp, pc)) = blocked_registers(&state) {
            record_blocked_thread(tid, sp, pc, id, &mut copy);
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

/// How much of a blocked thread's stack is copied for a dump, from its stack pointer up
/// (a deeper stack is cut, flagged as truncated).
const STACK_COPY: usize = 256 * 1024;
const PAGE: u64 = 4096;

/// Copies this process's memory at `addr` into `buf` without ever faulting: as much of it as
/// is mapped and readable, page by page from `addr` up to the first page that is not
/// (`process_vm_readv` on ourselves reports an unmapped page as an error, where a plain
/// read would raise SIGSEGV). Returns the number of bytes copied.
fn copy_without_faulting(addr: u64, buf: &mut [u8]) -> usize {
    const MAX_PIECES: usize = STACK_COPY / PAGE as usize + 1;
    let mut remote = [libc::iovec {
        iov_base: core::ptr::null_mut(),
        iov_len: 0,
    }; MAX_PIECES];
    let mut pieces = 0;
    let mut at = addr;
    let end = addr.saturating_add(buf.len() as u64);
    while at < end && pieces < MAX_PIECES {
        let piece_end = ((at / PAGE) + 1).saturating_mul(PAGE).min(end);
        remote[pieces] = libc::iovec {
            iov_base: at as *mut libc::c_void,
            iov_len: (piece_end - at) as usize,
        };
        pieces += 1;
        at = piece_end;
    }
    let copied = (at - addr) as usize;
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: copied.min(buf.len()),
    };
    // SAFETY: `local` is our own writable buffer of that length; the remote pieces are only
    // read by the kernel, which fails cleanly on an unmapped page; getpid cannot fail.
    let n = unsafe {
        libc::process_vm_readv(
            libc::getpid(),
            &local,
            1,
            remote.as_ptr(),
            pieces as libc::c_ulong,
            0,
        )
    };
    usize::try_from(n).unwrap_or(0)
}

fn record_blocked_thread(tid: u32, sp: u64, pc: u64, id: u32, copy: &mut Vec<u8>) {
    let Some(mut claim) = ring::claim() else {
        counters::bump(Counter::DroppedRingFull);
        return;
    };
    let record = claim.record();
    // The thread may wake up, exit and have its stack unmapped while we look: its stack is
    // copied without faulting first, and unwound from the copy.
    let (len, flags) = match crate::threads::stack_of(tid) {
        Some((lo, hi)) if sp >= lo && sp < hi && !crate::seccomp::filtered() => {
            let at = sp & !7;
            copy.resize(((hi - at) as usize).min(STACK_COPY), 0);
            let n = copy_without_faulting(at, copy);
            crate::signal::unwind::IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
            let unwound = crate::signal::unwind::unwind_copy(
                pc,
                sp,
                0,
                copy.get(..n).unwrap_or(&[]),
                at,
                &mut record.frames,
            );
            crate::signal::unwind::IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            unwound
        }
        bounds => {
            // Unknown bounds, or a stack pointer outside them: the leaf only, read nowhere.
            record.frames[0] = pc;
            let flags = if bounds.is_none() {
                wire::FLAG_NO_STACK_BOUNDS
            } else {
                0
            };
            (1, flags | wire::FLAG_TRUNCATED)
        }
    };
    record.len = len as u16;
    record.flags = flags | wire::FLAG_THREAD_DUMP;
    record.tid = tid;
    record.time_ns = crate::signal::sys::monotonic_ns();
    record.cpu_ns = u64::from(id);
    claim.publish();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three pages with the middle one unmapped (as a stack is when its thread exited).
    fn pages_with_a_hole() -> *mut u8 {
        let size = 3 * PAGE as usize;
        // SAFETY: an anonymous private mapping of our own.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p.cast::<u8>();
        // SAFETY: the mapping is ours and 3 pages long.
        unsafe {
            core::ptr::write_bytes(p, 0xab, size);
            assert_eq!(libc::munmap(p.add(PAGE as usize).cast(), PAGE as usize), 0);
        }
        p
    }

    #[test]
    fn copying_a_stack_stops_at_an_unmapped_page_instead_of_faulting() {
        let p = pages_with_a_hole();
        let mut buf = vec![0u8; 3 * PAGE as usize];
        // From 100 bytes into the first page: the rest of that page, then the hole.
        let n = copy_without_faulting(p as u64 + 100, &mut buf);
        assert_eq!(n, PAGE as usize - 100);
        assert!(buf.iter().take(n).all(|&b| b == 0xab));
        // Starting in the hole: nothing, and no SIGSEGV.
        let n = copy_without_faulting(p as u64 + PAGE, &mut buf);
        assert_eq!(n, 0);
        // The third page is still there.
        let n = copy_without_faulting(p as u64 + 2 * PAGE, &mut buf[..PAGE as usize]);
        assert_eq!(n, PAGE as usize);
        // SAFETY: unmapping what is left of our own mapping.
        unsafe {
            libc::munmap(p.cast(), PAGE as usize);
            libc::munmap(p.add(2 * PAGE as usize).cast(), PAGE as usize);
        }
    }
}
