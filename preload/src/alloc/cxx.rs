//! C++ `operator new` and `operator delete`, interposed so that allocators which define them
//! (tcmalloc, jemalloc, mimalloc) are profiled too.
//!
//! With libstdc++ or libc++, `new` calls `malloc` and `delete` calls `free`, which the malloc
//! hooks already see. An allocator that brings its own `operator new` allocates without ever
//! calling `malloc`, so a profiler that hooks only the malloc family misses every C++ object.
//!
//! Which case a process is in is decided once, on the first call of any form: the next
//! definitions are looked up, and a form *accounts* if its next definition belongs to the
//! allocator itself (the object that also defines the next `malloc_usable_size`, which is how
//! its blocks are measured), else it *forwards*. Then:
//! - forwarding (libstdc++ and libc++, whose operators call `malloc`/`free`): the exported
//!   symbol is a three-instruction trampoline that jumps straight to the next definition,
//!   through [`FORWARD`]; the malloc hooks do the accounting, as before. So does an operator
//!   that is a library's private pool: its blocks cannot be measured safely, and stay unseen;
//! - accounting (tcmalloc, jemalloc): the trampoline jumps to a slow path in `cxx_new.c`,
//!   which calls the next definition with the thread's re-entrancy flag set (should it call
//!   `malloc` itself, the hooks do not count the block twice) and then accounts for the
//!   block here, like the malloc hooks do;
//! - undecided (another thread is deciding) or no next definition found: the block is taken
//!   from the malloc family through our own hooks, which every such allocator accepts in
//!   `delete`.
//!
//! Deciding allocates nothing when every form is found (no probe call, so the heap's layout
//! is the program's own). A next definition out of `dlsym(RTLD_NEXT)`'s sight (libstdc++
//! loaded `RTLD_LOCAL` by a plugin of a C program) is looked for in every loaded object.
//!
//! The slow paths are C because a `new` may throw (`std::bad_alloc`, or whatever a new-handler
//! throws), and a C++ exception must pass through our frame to the program's handler; this
//! crate is built with `panic = "abort"`, so a Rust frame on that path would abort the
//! program instead. The trampolines are naked functions: they have no frame at all.
//!
//! Contract: as for the rest of [`crate::alloc`] (no allocation through `std`, no locks, no
//! panics). `dlsym` (while deciding) may allocate; it re-enters the malloc hooks, which is
//! allowed.

use core::ffi::c_void;
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use super::{hooks, real};
use crate::tls;

/// Every interposed operator, in the order of [`NAMES`]: 8 forms of `new`, then 12 of
/// `delete`. `cxx_new.c` uses the same numbers.
const FORMS: usize = 20;

/// For each operator: the next definition's address when calls may jump straight to it
/// (forwarding mode), else 0. Read by the trampolines.
static FORWARD: [AtomicUsize; FORMS] = [const { AtomicUsize::new(0) }; FORMS];
/// For each operator: the next definition's address once the mode is decided (0: none
/// found, or not decided yet).
static NEXT: [AtomicUsize; FORMS] = [const { AtomicUsize::new(0) }; FORMS];

const UNDECIDED: u8 = 0;
const DECIDING: u8 = 1;
const DECIDED: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNDECIDED);

// The slow paths, in cxx_new.c. Only the trampolines' `jmp` uses them, which the dead-code
// lint does not see.
#[allow(dead_code)]
extern "C" {
    fn anyprof_slow_new(size: usize) -> *mut c_void;
    fn anyprof_slow_new_array(size: usize) -> *mut c_void;
    fn anyprof_slow_new_nothrow(size: usize, tag: *const c_void) -> *mut c_void;
    fn anyprof_slow_new_array_nothrow(size: usize, tag: *const c_void) -> *mut c_void;
    fn anyprof_slow_new_aligned(size: usize, align: usize) -> *mut c_void;
    fn anyprof_slow_new_array_aligned(size: usize, align: usize) -> *mut c_void;
    fn anyprof_slow_new_aligned_nothrow(
        size: usize,
        align: usize,
        tag: *const c_void,
    ) -> *mut c_void;
    fn anyprof_slow_new_array_aligned_nothrow(
        size: usize,
        align: usize,
        tag: *const c_void,
    ) -> *mut c_void;
    fn anyprof_slow_delete(p: *mut c_void);
    fn anyprof_slow_delete_array(p: *mut c_void);
    fn anyprof_slow_delete_sized(p: *mut c_void, size: usize);
    fn anyprof_slow_delete_array_sized(p: *mut c_void, size: usize);
    fn anyprof_slow_delete_nothrow(p: *mut c_void, tag: *const c_void);
    fn anyprof_slow_delete_array_nothrow(p: *mut c_void, tag: *const c_void);
    fn anyprof_slow_delete_aligned(p: *mut c_void, align: usize);
    fn anyprof_slow_delete_array_aligned(p: *mut c_void, align: usize);
    fn anyprof_slow_delete_sized_aligned(p: *mut c_void, size: usize, align: usize);
    fn anyprof_slow_delete_array_sized_aligned(p: *mut c_void, size: usize, align: usize);
    fn anyprof_slow_delete_aligned_nothrow(p: *mut c_void, align: usize, tag: *const c_void);
    fn anyprof_slow_delete_array_aligned_nothrow(p: *mut c_void, align: usize, tag: *const c_void);
}

/// Defines an exported operator as a trampoline: a jump to `FORWARD[index]` when it is set,
/// else to the slow path. No frame, no register touched but `rax` (a scratch register that
/// carries no argument in these signatures), so arguments, return value and exceptions pass
/// as if the caller had called the target itself.
macro_rules! trampoline {
    ($name:ident, $export:literal, $index:expr, $slow:ident) => {
        #[cfg_attr(not(test), export_name = $export)]
        #[cfg_attr(test, allow(dead_code))] // not exported from unit tests
        #[unsafe(naked)]
        #[doc = concat!("`", $export, "`: see the module documentation.")]
        pub unsafe extern "C" fn $name() {
            core::arch::naked_asm!(
                // Unwind info (the entry state holds throughout: the stack is untouched),
                // so that a CPU sample taken here unwinds to the caller.
                ".cfi_startproc",
                "mov rax, qword ptr [rip + {table} + {offset}]",
                "test rax, rax",
                "jz 2f",
                "jmp rax",
                "2:",
                "jmp {slow}",
                ".cfi_endproc",
                table = sym FORWARD,
                offset = const $index * 8,
                slow = sym $slow,
            )
        }
    };
}

/// Defines every operator from one list: a [`trampoline!`] each, and [`NAMES`] in the same
/// order (the index is checked against the position at compile time).
macro_rules! operators {
    ($($index:literal: $name:ident, $export:literal, $slow:ident;)*) => {
        $(trampoline!($name, $export, $index, $slow);)*

        /// Itanium ABI names of the operators (x86_64: `size_t` is `m`).
        const NAMES: [&core::ffi::CStr; FORMS] = [$(
            match core::ffi::CStr::from_bytes_with_nul(concat!($export, "\0").as_bytes()) {
                Ok(name) => name,
                Err(_) => panic!("an operator name with a NUL in it"),
            }
        ),*];

        const _: () = {
            let mut position = 0;
            $(
                assert!($index == position, "operators! indices must count up from 0");
                position += 1;
            )*
            assert!(position == FORMS);
        };
    };
}

operators! {
    0: operator_new, "_Znwm", anyprof_slow_new;
    1: operator_new_array, "_Znam", anyprof_slow_new_array;
    2: operator_new_nothrow, "_ZnwmRKSt9nothrow_t", anyprof_slow_new_nothrow;
    3: operator_new_array_nothrow, "_ZnamRKSt9nothrow_t", anyprof_slow_new_array_nothrow;
    4: operator_new_aligned, "_ZnwmSt11align_val_t", anyprof_slow_new_aligned;
    5: operator_new_array_aligned, "_ZnamSt11align_val_t", anyprof_slow_new_array_aligned;
    6: operator_new_aligned_nothrow, "_ZnwmSt11align_val_tRKSt9nothrow_t", anyprof_slow_new_aligned_nothrow;
    7: operator_new_array_aligned_nothrow, "_ZnamSt11align_val_tRKSt9nothrow_t", anyprof_slow_new_array_aligned_nothrow;
    8: operator_delete, "_ZdlPv", anyprof_slow_delete;
    9: operator_delete_array, "_ZdaPv", anyprof_slow_delete_array;
    10: operator_delete_sized, "_ZdlPvm", anyprof_slow_delete_sized;
    11: operator_delete_array_sized, "_ZdaPvm", anyprof_slow_delete_array_sized;
    12: operator_delete_nothrow, "_ZdlPvRKSt9nothrow_t", anyprof_slow_delete_nothrow;
    13: operator_delete_array_nothrow, "_ZdaPvRKSt9nothrow_t", anyprof_slow_delete_array_nothrow;
    14: operator_delete_aligned, "_ZdlPvSt11align_val_t", anyprof_slow_delete_aligned;
    15: operator_delete_array_aligned, "_ZdaPvSt11align_val_t", anyprof_slow_delete_array_aligned;
    16: operator_delete_sized_aligned, "_ZdlPvmSt11align_val_t", anyprof_slow_delete_sized_aligned;
    17: operator_delete_array_sized_aligned, "_ZdaPvmSt11align_val_t", anyprof_slow_delete_array_sized_aligned;
    18: operator_delete_aligned_nothrow, "_ZdlPvSt11align_val_tRKSt9nothrow_t", anyprof_slow_delete_aligned_nothrow;
    19: operator_delete_array_aligned_nothrow, "_ZdaPvSt11align_val_tRKSt9nothrow_t", anyprof_slow_delete_array_aligned_nothrow;
}

// ---- Called by cxx_new.c. -------------------------------------------------------------

/// The next definition of operator `form`, looked up now (while deciding, and on the rare
/// out-of-memory path): the next one in the global scope, or else the first one in any
/// loaded object (libstdc++ loaded `RTLD_LOCAL` by a plugin is out of `RTLD_NEXT`'s sight,
/// but the plugin's own `new` calls reach us all the same). Our own allocations while
/// looking (the loader's error strings) are not the program's.
#[no_mangle]
pub extern "C" fn anyprof_cxx_lookup(form: u32) -> usize {
    let Some(name) = NAMES.get(form as usize) else {
        return 0;
    };
    let _internal = crate::signal::thread_state::Internal::enter();
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize };
    if f == 0 {
        return in_any_object(name);
    }
    f
}

/// The base address of the loaded object that contains code address `f` (0 if none).
fn object_of(f: usize) -> usize {
    crate::modules::object_at(f).map_or(0, |(base, _)| base)
}

/// The first definition of `name` found in the scope of a loaded object other than ours.
fn in_any_object(name: &core::ffi::CStr) -> usize {
    struct Search<'a> {
        name: &'a core::ffi::CStr,
        ours: usize,
        found: usize,
    }
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the `Search` passed to dl_iterate_phdr below, and `info` the
        // loader's valid entry for one object, for the duration of this call.
        let (search, info) = unsafe { (&mut *(data as *mut Search<'_>), &*info) };
        if info.dlpi_name.is_null() {
            return 0;
        }
        // SAFETY: dlpi_name is a NUL-terminated path (the main program's is "", which
        // dlopen would read as the global scope: skipped, it is where we are first).
        if unsafe { *info.dlpi_name } == 0 {
            return 0;
        }
        // SAFETY: RTLD_NOLOAD only takes a reference on an object that is already loaded
        // (this one: the loader is iterating over it), and it is dropped at once.
        let handle = unsafe { libc::dlopen(info.dlpi_name, libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
        if handle.is_null() {
            return 0;
        }
        // SAFETY: a handle from dlopen and a NUL-terminated name.
        let f = unsafe { libc::dlsym(handle, search.name.as_ptr()) } as usize;
        // SAFETY: the reference taken by dlopen above.
        unsafe { libc::dlclose(handle) };
        if f != 0 && object_of(f) != search.ours {
            search.found = f;
            return 1;
        }
        0
    }
    let mut search = Search {
        name,
        ours: object_of(anyprof_cxx_lookup as *const () as usize),
        found: 0,
    };
    // SAFETY: the callback matches dl_iterate_phdr's contract and `search` outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(each), &mut search as *mut Search<'_> as *mut c_void) };
    search.found
}

/// Decides the mode of every form (see the module documentation), once; a thread that finds
/// another deciding goes on undecided (the malloc route). Not from inside our own code,
/// whose allocations are not the program's.
#[no_mangle]
pub extern "C" fn anyprof_cxx_decide() {
    if tls::current().internal.get() != 0
        || STATE
            .compare_exchange(UNDECIDED, DECIDING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return;
    }
    let allocator = object_of(real::usable_size_fn());
    for (form, (next, forward)) in NEXT.iter().zip(FORWARD.iter()).enumerate() {
        let f = anyprof_cxx_lookup(form as u32);
        next.store(f, Ordering::Release);
        if f != 0 && (allocator == 0 || object_of(f) != allocator) {
            forward.store(f, Ordering::Release);
        }
    }
    STATE.store(DECIDED, Ordering::Release);
}

/// True once the mode is decided.
#[no_mangle]
pub extern "C" fn anyprof_cxx_is_decided() -> bool {
    STATE.load(Ordering::Acquire) == DECIDED
}

/// The next definition of `form` to call and account for, or 0 to take the malloc route
/// (undecided, or none found). In forwarding mode the trampolines jump before this is asked,
/// except in the moment of the decision: then the answer is 0 too, which is always safe.
#[no_mangle]
pub extern "C" fn anyprof_cxx_next(form: u32) -> usize {
    let i = form as usize;
    if STATE.load(Ordering::Acquire) != DECIDED
        || FORWARD
            .get(i)
            .is_some_and(|f| f.load(Ordering::Relaxed) != 0)
    {
        return 0;
    }
    NEXT.get(i).map_or(0, |f| f.load(Ordering::Relaxed))
}

/// Sets the calling thread's re-entrancy flag around a call of the next operator (accounting
/// mode): whatever it allocates through the malloc family is not counted again. Returns the
/// previous value, for [`anyprof_cxx_leave`] (also run if the call throws).
#[no_mangle]
pub extern "C" fn anyprof_cxx_enter() -> u8 {
    crate::signal::thread_state::enter_internal()
}

/// Ends what [`anyprof_cxx_enter`] began.
#[no_mangle]
pub extern "C" fn anyprof_cxx_leave(was: u8) {
    crate::signal::thread_state::leave_internal(was);
}

/// Accounts for block `p` just returned by the next `operator new` (accounting mode).
#[no_mangle]
pub extern "C" fn anyprof_cxx_allocated(p: *mut c_void) {
    if !p.is_null() {
        hooks::account_alloc(p);
    }
}

/// Accounts for block `p` about to go to the next `operator delete` (accounting mode).
/// False if `p` must not reach it: a block of our bootstrap arena (handed out by the malloc
/// route before the real allocator was found).
#[no_mangle]
pub extern "C" fn anyprof_cxx_freeing(p: *mut c_void) -> bool {
    if real::arena::contains(p) {
        return false;
    }
    hooks::account_free(p);
    true
}

/// The malloc route of `new`: a block from the malloc family, through the hooks (which
/// account for it). `align` 0 means the default alignment. Null when out of memory.
#[no_mangle]
pub extern "C" fn anyprof_cxx_malloc(size: usize, align: usize) -> *mut c_void {
    // `new` of 0 bytes must return a unique pointer.
    let size = size.max(1);
    if align <= 16 {
        return hooks::malloc(size);
    }
    let mut p = core::ptr::null_mut();
    if hooks::posix_memalign(&mut p, align, size) == 0 {
        p
    } else {
        core::ptr::null_mut()
    }
}

/// The malloc route of `delete`.
#[no_mangle]
pub extern "C" fn anyprof_cxx_free(p: *mut c_void) {
    hooks::free(p);
}

/// The next definition of `form` whatever the mode (0 if none), for the malloc route when
/// it runs out of memory: that definition runs the new-handler and throws `std::bad_alloc`
/// (or returns null, for the nothrow forms) the standard way.
#[no_mangle]
pub extern "C" fn anyprof_cxx_thrower(form: u32) -> usize {
    let i = form as usize;
    match NEXT.get(i).map_or(0, |f| f.load(Ordering::Relaxed)) {
        0 => anyprof_cxx_lookup(form),
        f => f,
    }
}
