//! `libanyprof.so`: the library that `LD_PRELOAD` puts into an unmodified program.
//!
//! On load it reads its settings from `ANYPROF_*` environment variables and connects to the
//! collector: `anyprof record` (named by `ANYPROF_SOCKET`, `ANYPROF_MODE=record`), or the
//! `anyprof serve` daemon at its default sockets, retried every second.
//!
//! - CPU ([`signal`], [`threads`], [`timer`]): every thread gets its own
//!   `CLOCK_THREAD_CPUTIME_ID` timer that sends it a real-time signal of ours, not `SIGPROF`,
//!   which stays the program's (threads created later are caught by interposing
//!   `pthread_create`) — from the start under `record`, only while the daemon asks under
//!   `serve`. The handler unwinds the interrupted stack with framehop over the
//!   `.eh_frame` already mapped in memory and writes raw return addresses into a fixed ring.
//! - Heap ([`alloc`]): the malloc family is interposed; exact counters per thread, and
//!   rate-based samples aggregated into (stack, size) buckets.
//! - A background thread ([`drain`]) drains the ring, watches the module map for
//!   dlopen/dlclose, carries out the collector's commands and streams everything to it.
//!   Nothing is symbolized here.
//! - The state the collector must still read when the process dies suddenly (samples, heap
//!   buckets, counters) and the message and command rings live in one shared region
//!   ([`region`]): a memfd handed to the collector at start, after which the process holds no
//!   descriptor of ours.
//!
//! # Two crates, three worlds
//! The code that runs in the signal handler and inside the program's allocation calls (the
//! handler, the sample ring, the per-thread block, raw system calls, the malloc hook bodies,
//! sampler, exact counters, live-pointer table and heap buckets) is the `no_std` crate
//! [`anyprof_preload_core`] (preload/core/), without an allocator, so the compiler enforces
//! its rules; its docs say which of its files runs where. This crate, the std part, depends
//! on it and never the reverse: at start it publishes to the core what the core needs (the
//! unwinder's entry points, two slow-path services, the settings; see
//! [`lifecycle`]'s `publish_to_core`). Its files live in these worlds:
//! - constructor and exit path (may allocate, lock, do I/O): [`lifecycle`], [`config`],
//!   [`region`] (the move into a memfd), [`fork`] (atfork handlers), [`log`];
//! - background thread (may allocate, lock, do I/O): [`drain`] (transport, the thread,
//!   commands and thread dumps, reports), [`modules`] (the module map and unwinder builds);
//! - the program's threads, through exported symbols ([`exports`]): thread start and exit
//!   ([`threads`], [`timer`]), the C++ `operator new` layer ([`alloc`]`::cxx`, hook world,
//!   kept here for its C half), and the unwinder ([`signal::unwind`]: built on the
//!   background thread, run in the handler and the hooks under the core's contract; it stays
//!   here because framehop needs an allocator to build one).
//!
//! The library lives in programs we did not write, so the rules are strict:
//! - Code reachable from a signal handler or a malloc hook is in the core crate and obeys
//!   the contract in its module docs (no allocation, no locks, no formatting, no panics);
//!   the few pieces of it that stay here (the unwinder, `alloc::cxx`) obey it too.
//! - Signals are the program's: our threads block every signal from their first instruction
//!   (so the kernel never hands them one sent to the process), and our timers use a signal
//!   of their own.
//! - Nothing is written to the program's stdout or stderr; diagnostics go to the collector
//!   (or `ANYPROF_LOG_FILE`). A panic of ours aborts the process silently
//!   ([`drain::thread::abort_on_panic`]), never unwinds into the program.
//! - When anything is full or gone, data is dropped and counted, never waited for.
//! - Until a collector asks, no CPU timer runs; without one, nothing leaves the process.
//!
//! The exported C ABI — every symbol this library exports — is listed in [`exports`].

#![allow(clippy::missing_safety_doc)]

mod alloc;
mod config;
mod drain;
pub mod exports;
mod fork;
mod lifecycle;
mod log;
mod modules;
mod own_heap;
mod perf_events;
mod region;
mod seccomp;
pub mod signal;
mod threads;
mod timer;

use anyprof_preload_core::{counters, tls};
