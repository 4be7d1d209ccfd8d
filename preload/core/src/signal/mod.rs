//! The async-signal-safe world: everything the sampling signal's handler can reach (our
//! timers send a real-time signal of their own, see [`handler::SIGNAL`]; `SIGPROF` is left to
//! the program).
//!
//! # Contract (reviewers check every change here against it)
//! Code in this module may run at any instruction of the host program, including inside
//! `malloc`, inside the dynamic loader and inside our own background thread. It therefore
//! must not:
//! - allocate or free (no `Box`, `Vec`, `String`, `format!`, no framehop call that may
//!   allocate — unwinding uses `MustNotAllocateDuringUnwind` and pre-made caches);
//! - take a lock that interrupted code may hold (no `Mutex`, `RwLock`, `OnceLock`, stdio);
//! - panic (no `unwrap`, `expect`, unchecked indexing, arithmetic that can overflow in debug);
//! - touch lazily-initialised thread-locals (only `const`-initialised, non-`Drop` ones);
//! - make system calls other than `gettid` and `clock_gettime` ([`sys`]), and the one futex
//!   wake that wakes the background thread ([`unwinder::wake_background_thread`], after a
//!   thread's first perf-event sample, see [`perf_clock`]);
//! - clobber `errno` (the handler saves and restores it).
//!
//! What it may use: atomics, raw pointers into memory owned for the life of the process, and
//! plain stack variables. Data leaves this module only through the [`ring`].
//!
//! The crate being `no_std` without `alloc` enforces the first rule and half of the second;
//! the others are still the reviewer's. The unwinder is reached through [`unwinder`], whose
//! entry points the cdylib publishes at start (its framehop unwinder is built with an
//! allocator, on the background thread, and obeys this contract when it runs).

pub mod handler;
pub mod perf_clock;
pub mod ring;
pub mod sys;
pub mod thread_state;
pub mod unwinder;
