//! The per-thread block: everything the signal handler and the malloc hooks keep per thread,
//! in one initial-exec TLS block.
//!
//! Why not `thread_local!`: in a shared library Rust compiles it to the general-dynamic TLS
//! model, a call to `__tls_get_addr`, which may allocate (and so re-enter our `malloc`) while
//! glibc grows a thread's DTV after a dlopen. The initial-exec model reads the block at a
//! fixed offset from the thread pointer: one `mov` and one `add`, no call, no allocation, safe
//! in a signal handler and in `malloc`. The cost is a small static-TLS reservation, which
//! glibc always has room for in a library loaded at start (`LD_PRELOAD`).
//!
//! The block is zero when a thread starts, and zero is a valid state for every field: code
//! that finds a zero countdown or a zero tid takes its slow path and initialises it.

use core::arch::{asm, global_asm};
use core::cell::Cell;

/// Per-thread state. Only `Cell`s of plain values: no destructor, no lazy initialisation.
#[repr(C, align(64))]
pub struct ThreadBlock {
    /// Lowest address of the thread's stack (0 = unknown).
    pub stack_lo: Cell<u64>,
    /// One past the highest address of the thread's stack.
    pub stack_hi: Cell<u64>,
    /// Thread CPU time at the previous CPU sample, ns.
    pub last_cpu_ns: Cell<u64>,
    /// Bytes still to allocate before the next heap sample; below 0 takes the slow path.
    pub bytes_until_sample: Cell<i64>,
    /// State of the thread's random number generator (0 = not seeded).
    pub rng: Cell<u64>,
    /// Address of the thread's exact-counter slot (0 = none: take the slow path), with bit 0
    /// set when glibc's chunk headers may be read (`alloc::counters::GLIBC_FAST`).
    pub stats: Cell<usize>,
    /// What the hooks' fast paths test, one word for every condition: `stats` with
    /// `alloc::counters::FAST_ALLOC` (and `FAST_FREE`) set while the thread may take them
    /// (it has a slot, glibc's chunk headers may be read, and it is not running our own
    /// code), else 0. Derived from `stats`, `internal` and a global by
    /// `alloc::counters::refresh_fast` whenever one of them changes.
    pub fast: Cell<usize>,
    /// Kernel thread id (0 = not yet known).
    pub tid: Cell<u32>,
    /// Non-zero while the thread runs anyprof's own code (re-entrancy guard).
    pub internal: Cell<u8>,
    /// Non-zero once the thread's exit has begun (its TSD destructors ran).
    pub exiting: Cell<u8>,
    /// `threads::CPU_EPOCH` at this thread's previous CPU sample.
    pub cpu_epoch: Cell<u32>,
    /// Non-zero while the thread is inside a section of the fork gate (`fork::section`).
    pub in_fork_section: Cell<u8>,
    /// The thread's perf-event slot plus one (0 = none), once its periodic event runs
    /// (`signal::perf_clock`).
    pub perf_slot: Cell<u16>,
}

/// Bytes reserved for the block in `.tbss`.
const BLOCK_SIZE: usize = 128;
const _: () = assert!(core::mem::size_of::<ThreadBlock>() <= BLOCK_SIZE);

global_asm!(
    ".pushsection .tbss,\"awT\",@nobits",
    ".p2align 6",
    ".globl anyprof_thread_block",
    ".hidden anyprof_thread_block",
    ".type anyprof_thread_block, @object",
    ".size anyprof_thread_block, 128",
    "anyprof_thread_block:",
    ".zero 128",
    ".popsection",
);

/// The calling thread's block.
#[inline(always)]
pub fn current() -> &'static ThreadBlock {
    let p: *const ThreadBlock;
    // SAFETY: `anyprof_thread_block` is a 128-byte, 64-aligned initial-exec TLS object:
    // its GOT slot holds its offset from the thread pointer, which `fs:[0]` holds on x86_64
    // Linux. The result is this thread's copy, valid for the thread's whole life, and only
    // ever accessed through `Cell`s by this thread.
    unsafe {
        asm!(
            "mov {p}, qword ptr [rip + anyprof_thread_block@GOTTPOFF]",
            "add {p}, qword ptr fs:[0]",
            p = out(reg) p,
            options(nostack, readonly, pure),
        );
        &*p
    }
}
