//! The shared region's storage (signal/hook world): the one static that holds everything the
//! collector must be able to read. Its layout is [`anyprof_wire::shared`]; moving it into a
//! memfd the collector maps too is constructor / background-thread work, done by the
//! cdylib's `region` module, which maps the memfd exactly over this static.

use anyprof_wire::shared::Shared;

/// The region. An all-zero, page-aligned static in `.bss`: it exists before any constructor
/// runs and its pages become resident only when used. Mapped over by a memfd later.
pub static SHARED: Shared = Shared::zeroed();

/// Address of the region in this process.
pub fn address() -> u64 {
    core::ptr::addr_of!(SHARED) as u64
}
