//! Stack unwinding from the signal handler: framehop over the `.eh_frame` data already mapped
//! in memory, with caches made up front and a module list published by pointer swap.
//!
//! # Publication
//! [`crate::modules`] builds a complete [`Unwinder`] outside the handler whenever the set of
//! loaded objects changes and calls [`publish`]. The handler bumps [`IN_FLIGHT`] before it
//! loads the pointer and drops it when done, so an unwinder that was swapped out can be freed
//! as soon as `IN_FLIGHT` has been seen at zero after the swap ([`retire_when_quiet`]).
//!
//! # Caches
//! framehop needs a `&mut` cache per unwind and allocates when one is created, so a pool of
//! [`CACHE_COUNT`] caches is created at start and claimed with an atomic swap. If every cache
//! is in use (more handlers in flight than caches) the sample keeps only its leaf.
//!
//! # Stack reads
//! Every read goes through [`StackReader`], which only dereferences 8-byte-aligned addresses
//! inside the interrupted thread's stack, recorded at thread start. In the signal handler, a
//! thread with unknown bounds gets a leaf-only sample flagged `FLAG_NO_STACK_BOUNDS`. In a
//! malloc hook ([`unwind_here`]), such a thread (one made behind our `pthread_create`
//! interposer) is unwound with checked reads instead: the kernel is asked first whether each
//! address is readable ([`checked_read`]), which fails on an unmapped address where a load
//! would fault. No lock, no allocation, no file: nothing a hook may not do.

use core::sync::atomic::{AtomicPtr, Ordering};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{FrameAddress, MustNotAllocateDuringUnwind, Unwinder as _};

use anyprof_wire::{FLAG_NO_STACK_BOUNDS, FLAG_TRUNCATED, MAX_FRAMES};

/// The unwinder type: module data borrowed from memory mapped for the life of the module.
pub type Unwinder = UnwinderX86_64<&'static [u8], MustNotAllocateDuringUnwind>;
type Cache = CacheX86_64<MustNotAllocateDuringUnwind>;

/// Number of unwinder caches (each about 16 KiB).
pub const CACHE_COUNT: usize = 16;

static CURRENT: AtomicPtr<Unwinder> = AtomicPtr::new(core::ptr::null_mut());
static CACHES: [AtomicPtr<Cache>; CACHE_COUNT] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; CACHE_COUNT];
/// Handlers currently between loading [`CURRENT`] and finishing with it.
pub use anyprof_preload_core::signal::unwinder::IN_FLIGHT;

/// Creates the cache pool. Call once, outside any handler, before sampling starts.
pub fn init_caches() {
    for slot in CACHES.iter() {
        if slot.load(Ordering::Acquire).is_null() {
            let cache = Box::into_raw(Box::new(Cache::new_in()));
            if slot
                .compare_exchange(
                    core::ptr::null_mut(),
                    cache,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
            {
                // SAFETY: we just created `cache` and nobody else saw it.
                drop(unsafe { Box::from_raw(cache) });
            }
        }
    }
}

/// Installs `unwinder` as the current one and returns the previous one (null if none), which
/// the caller must keep alive until [`retire_when_quiet`] says it may go.
pub fn publish(unwinder: Box<Unwinder>) -> *mut Unwinder {
    CURRENT.swap(Box::into_raw(unwinder), Ordering::SeqCst)
}

/// Frees the retired unwinders in `retired` if no handler is in flight right now; returns
/// true if it did (or there was nothing to free). Called by whoever holds the module map
/// (the background thread, or the program's thread catching up at `dlsym`).
pub fn retire_when_quiet(retired: &mut Vec<*mut Unwinder>) -> bool {
    if retired.is_empty() {
        return true;
    }
    if IN_FLIGHT.load(Ordering::SeqCst) != 0 {
        return false;
    }
    for p in retired.drain(..) {
        if !p.is_null() {
            // SAFETY: `p` came from `publish` (Box::into_raw), was swapped out of CURRENT
            // before IN_FLIGHT was seen at zero, so no handler can still hold it.
            drop(unsafe { Box::from_raw(p) });
        }
    }
    true
}

/// Stack the unwinder may need on the thread that runs it (framehop evaluates CFI with
/// fixed-size tables on the stack; measured use is around 12 KiB).
const UNWIND_STACK_NEED: u64 = 32 * 1024;

/// True unless the calling thread is known to have less than [`UNWIND_STACK_NEED`] bytes
/// of stack left below this point: a thread made with a tiny stack, or deep in recursion,
/// then gets a leaf-only sample instead of a stack overflow.
#[inline]
fn enough_stack_here() -> bool {
    let marker = 0u8;
    let here = core::ptr::addr_of!(marker) as u64;
    match super::thread_state::stack_bounds() {
        Some((lo, hi)) if here >= lo && here < hi => here - lo >= UNWIND_STACK_NEED,
        _ => true,
    }
}

/// Reads the interrupted thread's stack, refusing anything outside its bounds.
struct StackReader {
    lo: u64,
    hi: u64,
    /// Read through the kernel ([`checked_read`]): the bounds are not known, `hi` is
    /// `u64::MAX`. The number of reads left before the walk gives up.
    checked: Option<core::cell::Cell<u32>>,
}

/// Most reads of one checked walk (each a system call): a deep stack is cut rather than
/// costing a hook milliseconds.
const CHECKED_READS: u32 = 256;

impl StackReader {
    #[inline]
    fn read(&self, addr: u64) -> Result<u64, ()> {
        if !addr.is_multiple_of(8) || addr < self.lo || addr >= self.hi.saturating_sub(7) {
            return Err(());
        }
        if let Some(left) = &self.checked {
            let n = left.get().checked_sub(1).ok_or(())?;
            left.set(n);
            return checked_read(addr);
        }
        // SAFETY: `addr` is aligned and inside [lo, hi - 8], the mapped stack of the thread
        // this handler runs on (recorded at thread start), which cannot be unmapped while
        // the thread is interrupted in it.
        Ok(unsafe { core::ptr::read_volatile(addr as *const u64) })
    }
}

/// Reads 8 bytes at `addr` of our own memory, first asking the kernel whether they are
/// readable: an error, not a fault, if they are not. Async-signal-safe (one system call; it
/// may set errno, which the hooks and the handler restore).
///
/// The kernel is asked with `rt_sigprocmask` and an invalid `how`: it copies the 8-byte set
/// from `addr` before it looks at `how`, so it answers EFAULT for an unreadable address and
/// EINVAL for a readable one, and changes nothing. Not `process_vm_readv`: sandboxes refuse
/// it (systemd's `SystemCallFilter=`, browser sandboxes, older container profiles), some by
/// killing the process, and a malloc hook must not make a system call the program's own
/// seccomp filter does not expect; every program with threads may call `rt_sigprocmask`.
/// The load after the answer reads our own thread's stack (or what its frames point to);
/// only a concurrent `munmap` by another thread of the program could remove it in between.
fn checked_read(addr: u64) -> Result<u64, ()> {
    if !readable(addr) {
        return Err(()); // EFAULT: not readable (or a kernel that behaves otherwise)
    }
    // SAFETY: the kernel just read these 8 bytes (aligned, checked by the caller) without a
    // fault.
    Ok(unsafe { core::ptr::read_volatile(addr as *const u64) })
}

/// True if the kernel can read the 8 bytes at `addr` (see [`checked_read`]).
fn readable(addr: u64) -> bool {
    const INVALID_HOW: libc::c_long = 0x7fff;
    // SAFETY: with an invalid `how`, rt_sigprocmask only copies 8 bytes from `addr` (the
    // kernel checks the address) and returns; no old set is written (null), nothing changes.
    let got = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            INVALID_HOW,
            addr as *const libc::c_void,
            core::ptr::null_mut::<libc::c_void>(),
            8usize,
        )
    };
    got == -1 && crate::signal::sys::errno() == libc::EINVAL
}

/// [`enough_stack_here`] for a thread whose stack bounds are unknown: true if every page of
/// the [`UNWIND_STACK_NEED`] bytes below this point is readable. A stack made by glibc has
/// an unreadable guard page below it, so a thread near the end of a small stack gets a
/// leaf-only sample instead of a stack overflow (one system call per page).
fn enough_unknown_stack_here() -> bool {
    const PAGE: u64 = 4096;
    let marker = 0u8;
    let here = core::ptr::addr_of!(marker) as u64 & !(PAGE - 1);
    (1..=UNWIND_STACK_NEED / PAGE).all(|i| here.checked_sub(i * PAGE).is_some_and(readable))
}

/// Unwinds from the interrupted registers into `out`, leaf first; returns the number of
/// frames and the `FLAG_*` bits.
pub fn unwind(
    ip: u64,
    sp: u64,
    bp: u64,
    bounds: Option<(u64, u64)>,
    out: &mut [u64; MAX_FRAMES],
) -> (usize, u8) {
    out[0] = ip;
    let Some((lo, hi)) = bounds else {
        return (1, FLAG_NO_STACK_BOUNDS | FLAG_TRUNCATED);
    };
    // A stack pointer outside the recorded stack means sigaltstack, a coroutine stack or a
    // corrupted register: reading "the stack" there would be a guess, so keep the leaf only.
    if sp < lo || sp >= hi {
        return (1, FLAG_TRUNCATED);
    }
    if !enough_stack_here() {
        return (1, FLAG_TRUNCATED);
    }
    let reader = StackReader {
        lo,
        hi,
        checked: None,
    };
    unwind_with(ip, sp, bp, &reader, out)
}

/// [`unwind`] of the calling thread when its stack bounds are unknown: every read above the
/// stack pointer goes through the kernel ([`checked_read`]).
fn unwind_checked(ip: u64, sp: u64, bp: u64, out: &mut [u64; MAX_FRAMES]) -> (usize, u8) {
    out[0] = ip;
    if !enough_unknown_stack_here() {
        return (1, FLAG_TRUNCATED | FLAG_NO_STACK_BOUNDS);
    }
    let reader = StackReader {
        lo: sp,
        hi: u64::MAX,
        checked: Some(core::cell::Cell::new(CHECKED_READS)),
    };
    unwind_with(ip, sp, bp, &reader, out)
}

fn unwind_with(
    ip: u64,
    sp: u64,
    bp: u64,
    reader: &StackReader,
    out: &mut [u64; MAX_FRAMES],
) -> (usize, u8) {
    let unwinder = CURRENT.load(Ordering::SeqCst);
    if unwinder.is_null() {
        return (1, FLAG_TRUNCATED);
    }
    let Some((slot, cache)) = claim_cache() else {
        return (1, FLAG_TRUNCATED);
    };
    // SAFETY: `unwinder` was published by `publish` and is not freed while IN_FLIGHT (which
    // the caller incremented before calling us) is non-zero; `cache` is exclusively ours
    // until `release_cache`.
    let (n, flags) = unsafe { walk(&*unwinder, &mut *cache, ip, sp, bp, reader, out) };
    release_cache(slot, cache);
    (n, flags)
}

fn walk(
    unwinder: &Unwinder,
    cache: &mut Cache,
    ip: u64,
    sp: u64,
    bp: u64,
    reader: &StackReader,
    out: &mut [u64; MAX_FRAMES],
) -> (usize, u8) {
    let mut read_stack = |addr: u64| reader.read(addr);
    let regs = UnwindRegsX86_64::new(ip, sp, bp);
    let mut frames = unwinder.iter_frames(ip, regs, cache, &mut read_stack);
    let mut n = 0;
    loop {
        match frames.next() {
            Ok(Some(frame)) => {
                let addr = match frame {
                    FrameAddress::InstructionPointer(a) => a,
                    FrameAddress::ReturnAddress(a) => a.get(),
                };
                match out.get_mut(n) {
                    Some(slot) => *slot = addr,
                    None => return (n, FLAG_TRUNCATED),
                }
                n += 1;
            }
            Ok(None) => return (n.max(1), 0),
            Err(_) => return (n.max(1), FLAG_TRUNCATED),
        }
    }
}

fn claim_cache() -> Option<(&'static AtomicPtr<Cache>, *mut Cache)> {
    for slot in CACHES.iter() {
        let p = slot.swap(core::ptr::null_mut(), Ordering::Acquire);
        if !p.is_null() {
            return Some((slot, p));
        }
    }
    None
}

fn release_cache(slot: &'static AtomicPtr<Cache>, cache: *mut Cache) {
    slot.store(cache, Ordering::Release);
}

/// Our own library's executable range, whose frames are cut from stacks captured in hooks.
static SELF_RANGE: [core::sync::atomic::AtomicU64; 2] = [
    core::sync::atomic::AtomicU64::new(0),
    core::sync::atomic::AtomicU64::new(0),
];

/// Records the executable range of libanyprof.so itself.
pub fn set_self_range(start: u64, end: u64) {
    SELF_RANGE[0].store(start, Ordering::Relaxed);
    SELF_RANGE[1].store(end, Ordering::Release);
}

/// Whether `address` lies in libanyprof.so's own code (false until the range is known).
pub fn is_own_code(address: u64) -> bool {
    let end = SELF_RANGE[1].load(Ordering::Acquire);
    SELF_RANGE[0].load(Ordering::Relaxed) <= address && address < end
}

/// Unwinds the calling thread's own stack (from inside a hook, not a signal) into `out`:
/// return addresses only, leaf first, with anyprof's own frames removed. Returns the number
/// of frames and the `FLAG_*` bits.
#[inline(never)]
pub fn unwind_here(out: &mut [u64; MAX_FRAMES]) -> (usize, u8) {
    let (ip, sp, bp): (u64, u64, u64);
    // SAFETY: reads three registers; no memory is touched. All three are read in one asm
    // block so that rsp and rbp belong to the instruction address read with them.
    unsafe {
        core::arch::asm!(
            "lea {ip}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            ip = out(reg) ip,
            sp = out(reg) sp,
            bp = out(reg) bp,
            options(nostack, nomem, preserves_flags),
        );
    }
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    let (n, flags) = match super::thread_state::stack_bounds() {
        Some(bounds) => unwind(ip, sp, bp, Some(bounds), out),
        // A thread made behind our pthread_create interposer: learning its bounds would take
        // pthread_getattr_np (a lock, an allocation, a file for the main thread).
        None => unwind_checked(ip, sp, bp, out),
    };
    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    let (lo, hi) = (
        SELF_RANGE[0].load(Ordering::Acquire),
        SELF_RANGE[1].load(Ordering::Acquire),
    );
    let ours = out
        .iter()
        .take(n)
        .take_while(|&&a| a >= lo && a < hi)
        .count();
    // Only our frames (a stack we could not unwind past ourselves): keep them all, as Go
    // keeps a whole stack rather than an empty one.
    if ours == 0 || ours >= n {
        return (n, flags);
    }
    out.copy_within(ours..n, 0);
    (n - ours, flags)
}

/// Unwinds another thread's stack from a copy of it, for a thread dump of a thread blocked
/// in a system call (background-thread world). That thread may wake up and exit at any
/// moment, and its stack be unmapped, so its stack is never read in place: `copy` holds what
/// was at `[at, at + copy.len())` when it was copied (fault-safely, by the caller), and a
/// read outside the copy ends the stack there, flagged as truncated.
pub fn unwind_copy(
    ip: u64,
    sp: u64,
    bp: u64,
    copy: &[u8],
    at: u64,
    out: &mut [u64; MAX_FRAMES],
) -> (usize, u8) {
    out[0] = ip;
    let unwinder = CURRENT.load(Ordering::SeqCst);
    if unwinder.is_null() || copy.is_empty() {
        return (1, FLAG_TRUNCATED);
    }
    let Some((slot, cache)) = claim_cache() else {
        return (1, FLAG_TRUNCATED);
    };
    let mut read_copy = |addr: u64| -> Result<u64, ()> {
        let offset = usize::try_from(addr.checked_sub(at).ok_or(())?).map_err(|_| ())?;
        let bytes = copy
            .get(offset..offset.checked_add(8).ok_or(())?)
            .ok_or(())?;
        Ok(u64::from_ne_bytes(bytes.try_into().map_err(|_| ())?))
    };
    let regs = UnwindRegsX86_64::new(ip, sp, bp);
    // SAFETY: `unwinder` was published by `publish` and is not freed while IN_FLIGHT (which
    // the caller incremented) is non-zero; `cache` is exclusively ours until `release_cache`.
    let (unwinder, cache) = unsafe { (&*unwinder, &mut *cache) };
    let mut frames = unwinder.iter_frames(ip, regs, cache, &mut read_copy);
    let mut n = 0;
    let flags = loop {
        match frames.next() {
            Ok(Some(frame)) => {
                let addr = match frame {
                    FrameAddress::InstructionPointer(a) => a,
                    FrameAddress::ReturnAddress(a) => a.get(),
                };
                match out.get_mut(n) {
                    Some(slot) => *slot = addr,
                    None => break FLAG_TRUNCATED,
                }
                n += 1;
            }
            Ok(None) => break 0,
            Err(_) => break FLAG_TRUNCATED,
        }
    };
    release_cache(slot, cache);
    (n.max(1), flags)
}
