//! The core of `libanyprof.so`: every piece of code that runs inside the program's signal
//! handlers and allocation calls. `#![no_std]` without `alloc`, so an allocation, a
//! `format!`, a lock from std or a lazily-initialised thread-local here does not compile.
//!
//! The cdylib (`anyprof-preload`, the std part: background thread, module map, configuration,
//! transport, lifecycle, region setup, the exported symbols) depends on this crate, never the
//! reverse. What the core needs from it reaches it through atomics and function pointers
//! published at start: the unwinder ([`signal::unwinder`]), the settings ([`settings`],
//! [`alloc::sampler::RATE`], [`alloc::hooks::ACCOUNTING`]); nothing else (a sampled
//! allocation needs no service of the std part). The shared region's storage ([`region::SHARED`]) is a static of this crate.
//!
//! Which world each file lives in:
//! - signal world (runs in the sampling signal's handler, at any instruction of the program):
//!   [`signal::handler`] (but `install`, constructor world), [`signal::ring`] (writer side),
//!   [`signal::sys`], [`signal::thread_state`], [`signal::unwinder`], [`counters`];
//! - hook world (runs inside the program's `malloc`/`free`, on any thread, possibly before
//!   our constructor): [`alloc::hooks`], [`alloc::sampler`], [`alloc::counters`],
//!   [`alloc::live`], [`alloc::buckets`], [`alloc::real`];
//! - both: [`tls`] (the per-thread block), [`region`], [`settings`];
//! - a few functions here are called from the constructor or the background thread only
//!   (setup, snapshots, resets); their docs say so. They obey the same rules all the same.
//!
//! The contracts themselves are in the docs of [`signal`] and [`alloc`].
#![no_std]
// The hook bodies take the pointers the program passed to its `free`, `realloc`,
// `posix_memalign`...: their contract is the C function's, documented where the symbol is
// exported (the cdylib's `exports`), and they are only ever called from there.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod alloc;
pub mod counters;
pub mod region;
pub mod settings;
pub mod signal;
pub mod tls;
