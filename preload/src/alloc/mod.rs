//! Heap profiling, the parts that live in the cdylib: the hook bodies and their contract are
//! in the core crate ([`anyprof_preload_core::alloc`], re-exported here); this module adds
//! the C++ `operator new`/`delete` layer ([`cxx`], hook world, with its C half compiled by
//! `build.rs`) and [`malloc_answered_by`] (constructor world).

pub use anyprof_preload_core::alloc::{buckets, counters, hooks, live, real, sampler};

pub mod cxx;

/// Whose `malloc` the program's calls reach: `None` if ours (the normal case), else the path
/// of the object whose definition comes first in the global scope — the executable itself
/// when an allocator is linked into it, or a library preloaded ahead of us. Our hooks then see
/// none of those allocations, which the user must be told.
pub fn malloc_answered_by() -> Option<String> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
    let first = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr()) } as usize;
    // Compared by object, not by address: taking the address of our exported `malloc` here
    // would itself go through the interposition and yield the winner's.
    // A non-PIE program that takes malloc's address (CPython does) owns a canonical PLT
    // entry for it, which `dlsym` returns; its calls still go to ours.
    if crate::modules::is_plt_stub(first) {
        return None;
    }
    let (first_base, first_name) = crate::modules::object_at(first)?;
    let (our_base, _) = crate::modules::object_at(malloc_answered_by as *const () as usize)?;
    if first_base == our_base {
        return None;
    }
    let path = if first_name.is_null() {
        String::new()
    } else {
        // SAFETY: dladdr's dli_fname is a NUL-terminated path owned by the loader.
        unsafe { core::ffi::CStr::from_ptr(first_name) }
            .to_string_lossy()
            .into_owned()
    };
    Some(if path.is_empty() {
        "the program itself".to_string()
    } else {
        path
    })
}
