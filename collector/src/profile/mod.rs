//! Profile builders: from a [`crate::ingest::Session`] to pprof, one module per profile kind.

pub mod cpu;
