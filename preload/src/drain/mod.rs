//! The background side of the preload (background-thread and constructor world: may
//! allocate, lock and do I/O): the transport to the collector ([`transport`]), the
//! background thread ([`thread`]), the collector's commands and thread dumps ([`commands`])
//! and the reports it sends, kind by kind ([`reports`]).
//!
//! It is not the only code that does I/O: the constructor and the exit path
//! ([`crate::lifecycle`]) read the environment, connect and hand the region over, the region
//! set-up ([`crate::region`]) writes a memfd, and [`crate::log`] may append to
//! `ANYPROF_LOG_FILE`. None of it runs in a signal handler or a malloc hook (that is the
//! core crate, `anyprof_preload_core`, which does no I/O but its few raw system calls).
//!
//! The background thread opens no file periodically: thread names and RSS are read by the
//! collector from `/proc/PID`. Thread dumps (on request) read `/proc/self/task`.

pub mod commands;
pub mod reports;
pub mod thread;
pub mod transport;

pub use thread::{
    catch_up_without_thread, defer_thread, flush, forget_thread_in_child, last_flush_by_background,
    pause, program_is_single_threaded, report_everything_again, running, spawn,
    start_deferred_thread, MODULES, RECONNECT, SERVE_MODE,
};
pub use transport::{collector_uid, connect, forget_connection, handshake, Trust};
