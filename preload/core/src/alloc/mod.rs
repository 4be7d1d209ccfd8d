//! Heap profiling: the malloc family, interposed.
//!
//! # Contract (reviewers check every change here against it)
//! These hooks run inside every allocation of the program, from any thread, possibly before
//! our constructor, during `dlsym`, while glibc sets up a thread, and after our destructor.
//! Code in this module therefore must not:
//! - allocate through `std` (no `Box`, `Vec`, `String`, `format!`): memory comes from the
//!   next allocator ([`real`]) or from static/mmapped tables;
//! - take locks (the program may be inside malloc's own lock, or forking);
//! - panic (no `unwrap`, `expect`, unchecked indexing);
//! - use lazily-initialised thread-locals (only the initial-exec [`crate::tls`] block);
//! - write shared memory on the fast path: an unsampled `malloc` of a glibc block under
//!   4 KiB reads the chunk header, increments one per-size counter the thread owns and counts
//!   its sampling countdown down; an unsampled `free` reads the header, increments one
//!   counter and loads one byte of the [`live`] filter; neither saves a register (every
//!   slower path is a tail call);
//! - reach the dynamic loader, the file system or a lock, even on the sampled path: a stack
//!   through a library the unwinder does not know yet stays truncated (the background thread
//!   catches up on its next cycle), a thread whose stack bounds are unknown is unwound with
//!   checked reads (the kernel is asked first whether each word is readable) when 32 KiB of
//!   its stack below are readable, else with its leaf only;
//! - lose `errno` set by the real allocator.
//!
//! The slow path (a sampled allocation, or a free of a sampled pointer) runs behind the
//! per-thread re-entrancy flag (`tls::ThreadBlock::internal`): whatever allocates beneath it
//! goes straight to the next allocator.

pub mod buckets;
pub mod counters;
pub mod hooks;
pub mod live;
pub mod real;
pub mod sampler;
