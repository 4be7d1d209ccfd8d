//! The next allocator in link order (glibc's malloc, or jemalloc/tcmalloc/mimalloc when the
//! program brings one), found with `dlsym(RTLD_NEXT)`, and a bootstrap arena for the calls
//! that arrive before it is found.
//!
//! Calling glibc's `__libc_malloc` directly would be simpler but wrong: a program linked with
//! jemalloc would then get glibc's blocks and pass them to jemalloc's `free`.
//!
//! The arena: `dlsym` itself may allocate (its error path calls `calloc`), and other libraries'
//! constructors may allocate before ours ran. Those calls are served from a static bump arena
//! that is never freed; `free` ignores its blocks, `realloc` copies out of them.

use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type CallocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type MemalignFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type PosixMemalignFn = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> libc::c_int;
type UsableSizeFn = unsafe extern "C" fn(*mut c_void) -> usize;

/// Function addresses of the next allocator (0 = not resolved).
struct Table {
    malloc: AtomicUsize,
    free: AtomicUsize,
    calloc: AtomicUsize,
    realloc: AtomicUsize,
    memalign: AtomicUsize,
    aligned_alloc: AtomicUsize,
    posix_memalign: AtomicUsize,
    valloc: AtomicUsize,
    pvalloc: AtomicUsize,
    usable_size: AtomicUsize,
}

static NEXT: Table = Table {
    malloc: AtomicUsize::new(0),
    free: AtomicUsize::new(0),
    calloc: AtomicUsize::new(0),
    realloc: AtomicUsize::new(0),
    memalign: AtomicUsize::new(0),
    aligned_alloc: AtomicUsize::new(0),
    posix_memalign: AtomicUsize::new(0),
    valloc: AtomicUsize::new(0),
    pvalloc: AtomicUsize::new(0),
    usable_size: AtomicUsize::new(0),
};

/// What [`malloc`] calls: the next allocator's `malloc` once resolved, [`malloc_unresolved`]
/// until then, so that the hot path calls through it without testing it.
static MALLOC_CALL: AtomicPtr<()> = AtomicPtr::new(malloc_unresolved as *mut ());
/// What [`free_glibc`] calls: the next allocator's `free` once resolved, [`free_unusual`]
/// until then.
static FREE_CALL: AtomicPtr<()> = AtomicPtr::new(free_unusual as *mut ());

static RESOLVED: AtomicBool = AtomicBool::new(false);
static RESOLVING: AtomicBool = AtomicBool::new(false);

/// Resolves every function of the next allocator. Idempotent; allocations made meanwhile
/// (by `dlsym`, on any thread) are served from the arena.
#[cold]
pub fn resolve() -> bool {
    if RESOLVED.load(Ordering::Acquire) {
        return true;
    }
    if RESOLVING.swap(true, Ordering::AcqRel) {
        return false;
    }
    let find = |name: &core::ffi::CStr| {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
        unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
    };
    NEXT.malloc.store(find(c"malloc"), Ordering::Release);
    NEXT.free.store(find(c"free"), Ordering::Release);
    NEXT.calloc.store(find(c"calloc"), Ordering::Release);
    NEXT.realloc.store(find(c"realloc"), Ordering::Release);
    NEXT.memalign.store(find(c"memalign"), Ordering::Release);
    NEXT.aligned_alloc
        .store(find(c"aligned_alloc"), Ordering::Release);
    NEXT.posix_memalign
        .store(find(c"posix_memalign"), Ordering::Release);
    NEXT.valloc.store(find(c"valloc"), Ordering::Release);
    NEXT.pvalloc.store(find(c"pvalloc"), Ordering::Release);
    NEXT.usable_size
        .store(find(c"malloc_usable_size"), Ordering::Release);
    let ok = NEXT.malloc.load(Ordering::Acquire) != 0
        && NEXT.free.load(Ordering::Acquire) != 0
        && NEXT.calloc.load(Ordering::Acquire) != 0
        && NEXT.realloc.load(Ordering::Acquire) != 0;
    if ok {
        MALLOC_CALL.store(
            NEXT.malloc.load(Ordering::Acquire) as *mut (),
            Ordering::Release,
        );
        FREE_CALL.store(
            NEXT.free.load(Ordering::Acquire) as *mut (),
            Ordering::Release,
        );
    }
    RESOLVED.store(ok, Ordering::Release);
    RESOLVING.store(false, Ordering::Release);
    ok
}

#[inline(always)]
fn get(slot: &AtomicUsize) -> usize {
    let f = slot.load(Ordering::Relaxed);
    if f != 0 {
        return f;
    }
    resolve();
    slot.load(Ordering::Acquire)
}

/// `malloc` of the next allocator. The path before resolution is out of line, so that the
/// hooks' fast paths need no saved register.
#[inline(always)]
pub fn malloc(size: usize) -> *mut c_void {
    let f = MALLOC_CALL.load(Ordering::Relaxed);
    // SAFETY: MALLOC_CALL holds either `malloc_unresolved` or the address dlsym returned for
    // "malloc", both of this type.
    unsafe { core::mem::transmute::<*mut (), MallocFn>(f)(size) }
}

#[cold]
#[inline(never)]
extern "C" fn malloc_unresolved(size: usize) -> *mut c_void {
    match get(&NEXT.malloc) {
        0 => arena::alloc(size, 16),
        // SAFETY: the address dlsym returned for "malloc".
        f => unsafe { core::mem::transmute::<usize, MallocFn>(f)(size) },
    }
}

/// `free` of the next allocator; arena blocks are ignored.
#[inline(always)]
pub fn free(p: *mut c_void) {
    let f = NEXT.free.load(Ordering::Relaxed);
    if f == 0 || arena::contains(p) {
        return free_unusual(p);
    }
    // SAFETY: the address dlsym returned for "free"; `p` came from the same allocator.
    unsafe { core::mem::transmute::<usize, FreeFn>(f)(p) }
}

#[cold]
#[inline(never)]
extern "C" fn free_unusual(p: *mut c_void) {
    if arena::contains(p) {
        return;
    }
    match get(&NEXT.free) {
        0 => {}
        // SAFETY: the address dlsym returned for "free"; `p` came from the same allocator.
        f => unsafe { core::mem::transmute::<usize, FreeFn>(f)(p) },
    }
}

/// `calloc` of the next allocator.
#[inline(always)]
pub fn calloc(n: usize, size: usize) -> *mut c_void {
    match get(&NEXT.calloc) {
        // The arena is zeroed memory that is never reused.
        0 => n
            .checked_mul(size)
            .map_or(core::ptr::null_mut(), |total| arena::alloc(total, 16)),
        // SAFETY: the address dlsym returned for "calloc".
        f => unsafe { core::mem::transmute::<usize, CallocFn>(f)(n, size) },
    }
}

/// `realloc` of the next allocator; an arena block is copied into a new block.
#[inline(always)]
pub fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if arena::in_use() && arena::contains(p) {
        let new = malloc(size);
        if !new.is_null() {
            let old = arena::size_of(p).min(size);
            // SAFETY: `p` is an arena block of at least `old` bytes, `new` a fresh block of at
            // least `size` >= `old` bytes; they cannot overlap.
            unsafe { core::ptr::copy_nonoverlapping(p as *const u8, new as *mut u8, old) };
        }
        return new;
    }
    match get(&NEXT.realloc) {
        0 => core::ptr::null_mut(),
        // SAFETY: the address dlsym returned for "realloc"; `p` came from that allocator.
        f => unsafe { core::mem::transmute::<usize, ReallocFn>(f)(p, size) },
    }
}

/// `memalign` of the next allocator.
#[inline(always)]
pub fn memalign(align: usize, size: usize) -> *mut c_void {
    match get(&NEXT.memalign) {
        0 => arena::alloc(size, align),
        // SAFETY: the address dlsym returned for "memalign".
        f => unsafe { core::mem::transmute::<usize, MemalignFn>(f)(align, size) },
    }
}

/// `aligned_alloc` of the next allocator.
#[inline(always)]
pub fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    match get(&NEXT.aligned_alloc) {
        0 => arena::alloc(size, align),
        // SAFETY: the address dlsym returned for "aligned_alloc".
        f => unsafe { core::mem::transmute::<usize, MemalignFn>(f)(align, size) },
    }
}

/// `posix_memalign` of the next allocator.
#[inline(always)]
pub fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> libc::c_int {
    match get(&NEXT.posix_memalign) {
        0 => {
            let p = arena::alloc(size, align);
            if p.is_null() {
                return libc::ENOMEM;
            }
            // SAFETY: the caller passes a valid out-pointer, as posix_memalign requires.
            unsafe { *out = p };
            0
        }
        // SAFETY: the address dlsym returned for "posix_memalign".
        f => unsafe { core::mem::transmute::<usize, PosixMemalignFn>(f)(out, align, size) },
    }
}

/// `valloc` of the next allocator.
#[inline(always)]
pub fn valloc(size: usize) -> *mut c_void {
    match get(&NEXT.valloc) {
        0 => arena::alloc(size, 4096),
        // SAFETY: the address dlsym returned for "valloc".
        f => unsafe { core::mem::transmute::<usize, MallocFn>(f)(size) },
    }
}

/// `pvalloc` of the next allocator.
#[inline(always)]
pub fn pvalloc(size: usize) -> *mut c_void {
    match get(&NEXT.pvalloc) {
        0 => arena::alloc(size.div_ceil(4096).max(1) * 4096, 4096),
        // SAFETY: the address dlsym returned for "pvalloc".
        f => unsafe { core::mem::transmute::<usize, MallocFn>(f)(size) },
    }
}

/// True once [`check_glibc_layout`] proved that the next allocator is glibc's malloc and
/// that its chunk header gives the same usable size as `malloc_usable_size`.
static GLIBC_HEADER: AtomicBool = AtomicBool::new(false);

/// The usable size of a glibc block from its chunk header, as glibc's own
/// `malloc_usable_size` computes it (without memory tagging): the chunk size from the
/// 8 bytes before the block, minus the header — 8 bytes for a heap chunk, 16 for an
/// mmapped one (flag bit 1).
#[inline(always)]
fn glibc_usable(p: *mut c_void) -> usize {
    // SAFETY: only called when GLIBC_HEADER is set, i.e. `p` is a live glibc block, which is
    // always preceded by its chunk's size field.
    let field = unsafe { *((p as *const usize).offset(-1)) };
    // Branch-free: IS_MMAPPED (bit 1) adds 8 to the header, so 2 << 2 = 8. A glibc chunk
    // is at least 32 bytes, so this cannot wrap.
    (field & !0x7).wrapping_sub(8 + ((field & 0x2) << 2))
}

/// Checks once, at start, whether block sizes can be read from glibc's chunk headers
/// instead of calling `malloc_usable_size` (two calls saved per malloc/free pair). Only if
/// the next allocator is glibc's own and the header agrees with `malloc_usable_size` on a
/// range of block sizes, including an mmapped one.
pub fn check_glibc_layout() {
    let next_malloc = get(&NEXT.malloc);
    // libc's own malloc, looked up in libc itself. Not `__libc_malloc` in the global scope:
    // tcmalloc exports that name too, as an alias of its malloc, and reading a header before
    // one of its blocks (a page-aligned span at the start of a mapping) faults.
    // SAFETY: dlopen of an already loaded object (RTLD_NOLOAD loads nothing) and dlsym, with
    // NUL-terminated names; the reference dlopen took is given back.
    let glibc_malloc = unsafe {
        let libc_handle = libc::dlopen(c"libc.so.6".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if libc_handle.is_null() {
            0
        } else {
            let f = libc::dlsym(libc_handle, c"malloc".as_ptr()) as usize;
            libc::dlclose(libc_handle);
            f
        }
    };
    if next_malloc == 0 || next_malloc != glibc_malloc || get(&NEXT.usable_size) == 0 {
        return;
    }
    if arena::in_use() {
        return; // arena blocks may be live: their headers are not glibc's
    }
    // Every entry point resolved, so that the arena never hands out a block again: the hooks'
    // fast path then skips the arena check on free (`free_glibc`).
    let all = [
        &NEXT.free,
        &NEXT.calloc,
        &NEXT.realloc,
        &NEXT.memalign,
        &NEXT.aligned_alloc,
        &NEXT.posix_memalign,
        &NEXT.valloc,
        &NEXT.pvalloc,
    ];
    if all.iter().any(|f| f.load(Ordering::Acquire) == 0) {
        return;
    }
    let mut agree = true;
    for size in [0usize, 1, 8, 24, 25, 100, 1000, 5000, 70_000, 300_000] {
        let p = malloc(size);
        if p.is_null() {
            return;
        }
        agree &= glibc_usable(p) == call_usable_size(p);
        free(p);
    }
    GLIBC_HEADER.store(agree, Ordering::Release);
}

fn call_usable_size(p: *mut c_void) -> usize {
    match get(&NEXT.usable_size) {
        0 => 0,
        // SAFETY: the address dlsym returned for "malloc_usable_size"; `p` is a live block.
        f => unsafe { core::mem::transmute::<usize, UsableSizeFn>(f)(p) },
    }
}

/// True while [`glibc_usable_size`] may be used: every live block is a glibc block.
#[inline(always)]
pub fn glibc_header_readable() -> bool {
    // The flag is cleared for good as soon as the arena hands out a block after the check,
    // so while it is set no live block can be an arena block.
    GLIBC_HEADER.load(Ordering::Relaxed)
}

/// glibc's size field of live block `p` (the chunk size in bits 3.., flags in bits 0..2);
/// only while [`glibc_header_readable`].
#[inline(always)]
pub fn glibc_size_field(p: *mut c_void) -> usize {
    // SAFETY: only called while GLIBC_HEADER is set, i.e. `p` is a live glibc block, which
    // is always preceded by its chunk's size field.
    unsafe { *((p as *const usize).offset(-1)) }
}

/// If glibc's size field `field` is that of a heap (not mmapped) chunk of fewer than
/// `limit` bytes (a power of two), the chunk size; the block's usable size is 8 less (the
/// chunk's size field; a heap chunk is at least 32 bytes).
#[inline(always)]
pub fn glibc_small_chunk(field: usize, limit: usize) -> Option<usize> {
    if field & (!(limit - 1) | 0x2) != 0 {
        return None;
    }
    // The bits above `limit` are clear: one mask takes the flags off.
    Some(field & !0x7)
}

/// `free` of a glibc block while [`glibc_header_readable`]: no block can then be an arena
/// block (the arena handed none out before the check, and none is handed out after
/// resolution).
#[inline(always)]
pub fn free_glibc(p: *mut c_void) {
    let f = FREE_CALL.load(Ordering::Relaxed);
    // SAFETY: FREE_CALL holds either `free_unusual` or the address dlsym returned for
    // "free", both of this type; `p` came from that allocator.
    unsafe { core::mem::transmute::<*mut (), FreeFn>(f)(p) }
}

/// The usable size of a live, non-null block, by the cheapest correct means: glibc's chunk
/// header when [`check_glibc_layout`] allowed it, else `malloc_usable_size`.
#[inline(always)]
pub fn usable_size_of_live(p: *mut c_void) -> usize {
    if glibc_header_readable() {
        return glibc_usable(p);
    }
    usable_size(p)
}

/// The address of the next allocator's `malloc_usable_size` (0 if it has none).
pub fn usable_size_fn() -> usize {
    get(&NEXT.usable_size)
}

/// `malloc_usable_size` of the next allocator (0 for null).
#[inline(always)]
pub fn usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    if arena::contains(p) {
        return arena::size_of(p);
    }
    if GLIBC_HEADER.load(Ordering::Relaxed) {
        return glibc_usable(p);
    }
    match get(&NEXT.usable_size) {
        0 => 0,
        // SAFETY: the address dlsym returned for "malloc_usable_size"; `p` is a live block.
        f => unsafe { core::mem::transmute::<usize, UsableSizeFn>(f)(p) },
    }
}

/// The bootstrap arena.
pub mod arena {
    use core::cell::UnsafeCell;
    use core::ffi::c_void;
    use core::sync::atomic::{AtomicUsize, Ordering};

    const SIZE: usize = 1 << 20;
    const HEADER: usize = 16;

    #[repr(C, align(4096))]
    struct Arena(UnsafeCell<[u8; SIZE]>);
    // SAFETY: blocks are handed out by an atomic bump pointer, so no byte is given to two
    // callers; each block belongs to its caller alone.
    unsafe impl Sync for Arena {}

    static ARENA: Arena = Arena(UnsafeCell::new([0; SIZE]));
    static USED: AtomicUsize = AtomicUsize::new(0);

    fn base() -> usize {
        ARENA.0.get() as usize
    }

    /// True once any block was handed out (until then no pointer can be an arena block).
    #[inline(always)]
    pub fn in_use() -> bool {
        USED.load(Ordering::Relaxed) != 0
    }

    /// True if `p` points into the arena (one subtraction and one compare).
    #[inline(always)]
    pub fn contains(p: *mut c_void) -> bool {
        (p as usize).wrapping_sub(base()) < SIZE
    }

    /// Allocates `size` zeroed bytes aligned to `align` (a power of two), or null when the
    /// arena is exhausted.
    pub fn alloc(size: usize, align: usize) -> *mut c_void {
        let align = align.max(16).next_power_of_two();
        let Some(need) = size.checked_add(HEADER + align) else {
            return core::ptr::null_mut();
        };
        super::GLIBC_HEADER.store(false, Ordering::Release);
        let start = USED.fetch_add(need, Ordering::Relaxed);
        if start.saturating_add(need) > SIZE {
            return core::ptr::null_mut();
        }
        let user = (base() + start + HEADER).next_multiple_of(align);
        // SAFETY: [start, start + need) is ours alone; the header (8 bytes before `user`)
        // and the block lie inside it.
        unsafe { *((user - 8) as *mut usize) = size };
        user as *mut c_void
    }

    /// The requested size of an arena block.
    pub fn size_of(p: *mut c_void) -> usize {
        if !contains(p) || (p as usize) < base() + 8 {
            return 0;
        }
        // SAFETY: every arena block is preceded by its size, written by `alloc`.
        unsafe { *((p as usize - 8) as *const usize) }
    }
}
