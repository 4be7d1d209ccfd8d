//! CPU sampling, the cdylib's side. The signal/hook world — the handler, the ring, the
//! per-thread state, the raw system calls and the contract they obey — is the core crate's
//! ([`anyprof_preload_core::signal`], re-exported here). Only the unwinder is here, because
//! framehop needs an allocator to build one: [`unwind`] builds and swaps unwinders on the
//! background thread, and its unwind functions (which run in the handler and the hooks and
//! obey the core's contract) are published to the core at start.

pub use anyprof_preload_core::signal::{handler, perf_clock, ring, sys, thread_state};

pub mod unwind;
