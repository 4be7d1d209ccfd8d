//! anyprof's collector: it receives raw stacks and module maps from processes running with
//! `libanyprof.so` preloaded, symbolizes them and writes pprof profiles.
//!
//! Layers, each in its own module: [`collect`] accepts connections and runs a reader per
//! process, [`region`] takes over the shared memory a process hands over (its message ring
//! is read there, and its end seen through a pidfd), [`death_read`] turns what a process left
//! in it when it died into messages, [`ingest`] folds the wire messages into a
//! [`ingest::Session`], [`symbolize`]
//! turns addresses into frames through `anyprof-symbolizer`, [`profile`] builds pprof
//! profiles from sessions, [`pprof`] encodes them, [`output`] writes files and [`summary`]
//! prints the top list; [`offline`] adds names later to a profile written without them
//! (`anyprof symbolize`); [`attach`] profiles a process that runs without the library, from
//! perf events, into the same sessions (`anyprof attach`). The binary (`anyprof`, `src/main.rs`) is a thin CLI over this
//! library; the library is public so that the end-to-end tests decode what the binary wrote
//! with the same types.
pub mod attach;
pub mod collect;
pub mod death_read;
pub mod ingest;
pub mod offline;
pub mod output;
pub mod pprof;
pub mod preflight;
pub mod priority;
pub mod profile;
pub mod region;
pub mod serve;
pub mod summary;
pub mod symbolize;
pub mod unnamed;
