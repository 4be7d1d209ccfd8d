//! The shared region: the one static that holds everything the collector must be able to
//! read, and its move into a sealed memfd that the collector maps too.
//!
//! [`SHARED`] (see [`anyprof_wire::shared`] for the layout) is an all-zero, page-aligned
//! static in `.bss`: it exists before our constructor runs, costs nothing in the `.so` file,
//! and its pages become resident only when used. The sample ring, the heap bucket table, the
//! event counters and the allocator counters keep their logic in their own modules and only
//! their storage here.
//!
//! [`into_memfd`] creates a memfd of the region's size, copies the resident pages of the
//! region into it (`mincore` + `pwrite`: untouched pages stay holes, so a fresh process
//! costs a page or two), seals its size (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) and
//! maps it with `MAP_SHARED | MAP_FIXED` exactly over the static. Every address into the
//! state stays valid, so no hot path changes; the caller hands the descriptor to the
//! collector and closes it, and the mapping alone keeps the memory alive — in the collector
//! too, after this process died.
//!
//! A forked child first shares its parent's region (the mapping is `MAP_SHARED`); its atfork
//! handler moves it into a memfd of its own with [`into_memfd_for_child`], which copies only
//! the allocator counters' pages: the child starts with no samples, counters or heap buckets
//! of its parent's, and a fork costs two or three system calls and a page or two, however
//! big the parent's heap profile grew. (Allocations the child makes before our handler runs
//! — in atfork handlers registered before ours — are counted in its parent's region.)
//!
//! For whoever reads a dead process's region: a hole of the memfd reads as zero, but reading
//! it through a shared mapping allocates a page; `lseek(SEEK_DATA)` or `mincore` tells the
//! pages that were ever written.
//!
//! Sizing and filling the memfd count against the file size limit (`ulimit -f`): a soft
//! limit below the region's size is raised for those two calls and put back; a hard one
//! makes the process unprofiled (one warning), and no write is attempted, so the program
//! never gets a SIGXFSZ of ours.
//!
//! The copy and the remap are not atomic: a store another thread makes to a page after it
//! was copied and before the remap is lost. The constructor and the fork child run this
//! while the process has one thread; a re-attach to a non-root daemon (which cannot open
//! `/proc/PID/map_files`) runs it with the program's threads live, and may lose the few
//! counts and samples written during the copy.
//!
//! World: constructor, re-attach (background thread) and fork child. The static itself is the
//! core crate's (`anyprof_preload_core::region`), written from the signal/hook world.

use core::sync::atomic::{AtomicBool, Ordering};

use anyprof_wire::shared::{
    self as shm, MESSAGE_RING_BYTES, SHARED_MAGIC, SHARED_SIZE, SHARED_VERSION,
};

/// The region (its storage is the core's, which the hooks and the handler write). Mapped
/// over by a memfd once [`into_memfd`] succeeded.
pub use anyprof_preload_core::region::{address, SHARED};

/// True once the region is a memfd mapping (inherited by a forked child, where it is its
/// parent's until the child makes its own).
static IN_MEMFD: AtomicBool = AtomicBool::new(false);

/// True once the region lives in a memfd (so `/proc/PID/map_files` can reach it).
pub fn in_memfd() -> bool {
    IN_MEMFD.load(Ordering::Acquire)
}

const PAGE: usize = 4096;

/// Writes the identity words (magic, version, size, this process's pid).
pub fn stamp_header() {
    let h = &SHARED.header;
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() } as u32;
    h.version.store(SHARED_VERSION, Ordering::Relaxed);
    h.size.store(SHARED_SIZE as u64, Ordering::Relaxed);
    h.pid.store(pid, Ordering::Relaxed);
    h.magic.store(SHARED_MAGIC, Ordering::Release);
}

/// Why the region could not be moved into a memfd: the call that failed and its errno.
#[derive(Clone, Copy, Debug)]
pub struct RegionError {
    /// The step that failed.
    pub what: &'static str,
    /// Its errno; 0 when `what` says it all.
    pub errno: i32,
}

impl std::fmt::Display for RegionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.errno == 0 {
            return f.write_str(self.what);
        }
        write!(
            f,
            "{} failed ({})",
            self.what,
            std::io::Error::from_raw_os_error(self.errno)
        )
    }
}

fn fail(what: &'static str) -> RegionError {
    RegionError {
        what,
        errno: crate::signal::sys::errno(),
    }
}

/// Lowest descriptor number the memfd is moved to while we hold it.
const HIGH_FD: libc::c_int = 800;

/// Moves a descriptor we just opened above the numbers a program uses (as our socket is):
/// a re-attach runs while the program's threads run, and one of them may close or reuse the
/// lowest free numbers (a close-all loop) while we copy the region. Keeps `fd` if no higher
/// number is free.
fn above_the_programs(fd: libc::c_int) -> libc::c_int {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own.
    let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, HIGH_FD) };
    if high < 0 {
        return fd;
    }
    // SAFETY: closing the low number we own; the memfd lives on as `high`.
    unsafe { libc::close(fd) };
    high
}

/// A descriptor we own, closed on drop.
pub struct Fd(pub libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: closing a descriptor this value owns.
        unsafe { libc::close(self.0) };
    }
}

/// Moves the region into a new sealed memfd mapped over [`SHARED`]; returns the memfd (the
/// caller gives it to the collector and drops it). On failure the region stays where it was
/// (the `.bss` copy, or the previous memfd) and nothing is left open.
///
/// Allocates one byte per page of the region (the residency vector): not for signal
/// handlers, fine for the constructor, the background thread and an atfork child handler.
pub fn into_memfd() -> Result<Fd, RegionError> {
    let data = SHARED.messages.data.get() as usize - address() as usize;
    // Not the message ring's data: whenever the region moves, the ring is empty (the
    // constructor has written nothing yet; a re-attach discards what is in it), and a ring
    // that has wrapped once would otherwise cost a 4 MiB copy.
    let skip = data.div_ceil(PAGE)..(data + MESSAGE_RING_BYTES) / PAGE;
    move_into_memfd(&|page| !skip.contains(&page))
}

/// [`into_memfd`] for a forked child, whose region starts empty but for its allocator
/// counters (each thread's slot is owned through a pointer in its thread block, so the
/// slots must stay as they are): no samples, counters, rings or heap buckets of its parent
/// (the child's heap profile holds what it allocates itself; see
/// [`crate::alloc::live::start_child_generation`]). Only the resident pages of the allocator slots
/// are copied, so a fork costs little however big the parent's heap profile grew.
pub fn into_memfd_for_child() -> Result<Fd, RegionError> {
    let base = address() as usize;
    let alloc = core::ptr::addr_of!(SHARED.alloc) as usize - base;
    let keep = alloc / PAGE..(alloc + core::mem::size_of_val(&SHARED.alloc)).div_ceil(PAGE);
    // The header page too: the header is stamped afresh, and the page also holds the
    // command ring and the message ring's positions, which are reset after the move.
    move_into_memfd(&|page| page == 0 || keep.contains(&page))
}

fn move_into_memfd(copy: &dyn Fn(usize) -> bool) -> Result<Fd, RegionError> {
    let base = address() as usize;
    // SAFETY: plain memfd_create call with a NUL-terminated name.
    let raw = unsafe {
        libc::memfd_create(
            c"anyprof".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(fail("memfd_create"));
    }
    let fd = Fd(above_the_programs(raw));
    {
        // Sizing and filling the memfd count against RLIMIT_FSIZE, and going over it sends
        // SIGXFSZ (which kills by default): never try beyond the limit.
        let _limit = FileSizeLimit::allow(SHARED_SIZE)?;
        // SAFETY: ftruncate on our memfd.
        if unsafe { libc::ftruncate(fd.0, SHARED_SIZE as libc::off_t) } != 0 {
            return Err(fail("ftruncate of the memfd"));
        }
        copy_resident_pages(fd.0, base, copy)?;
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our memfd.
    if unsafe { libc::fcntl(fd.0, libc::F_ADD_SEALS, seals) } != 0 {
        return Err(fail("sealing the memfd"));
    }
    // SAFETY: the range [base, base + SHARED_SIZE) is exactly SHARED, page-aligned and a
    // whole number of pages (layout asserts), so no other object shares its pages; the new
    // mapping holds a copy of every resident page (the rest is zero in both), so every
    // reference into SHARED stays valid and sees the same values.
    let got = unsafe {
        libc::mmap(
            base as *mut libc::c_void,
            SHARED_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd.0,
            0,
        )
    };
    if got != base as *mut libc::c_void {
        return Err(fail("mmap of the memfd over the region"));
    }
    IN_MEMFD.store(true, Ordering::Release);
    Ok(fd)
}

/// Lets this process write files of `size` bytes until dropped: a soft `RLIMIT_FSIZE`
/// (`ulimit -f`) below it is raised to it, and put back on drop. A hard limit below it is an
/// error, found without writing anything, so no SIGXFSZ is raised.
/// The file size limit as it was, and as we raised it to (if we did).
struct FileSizeLimit(Option<(libc::rlimit, libc::rlimit)>);

impl FileSizeLimit {
    fn allow(size: usize) -> Result<FileSizeLimit, RegionError> {
        let size = size as libc::rlim_t;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-pointer.
        if unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim) } != 0 {
            return Err(fail("getrlimit(RLIMIT_FSIZE)"));
        }
        let fits = |l: libc::rlim_t| l == libc::RLIM_INFINITY || l >= size;
        if fits(lim.rlim_cur) {
            return Ok(FileSizeLimit(None));
        }
        if !fits(lim.rlim_max) {
            return Err(RegionError {
                what: "the hard file size limit (ulimit -Hf) is below the size of the memory \
                       shared with the collector; allow larger files (or none) to profile it",
                errno: 0,
            });
        }
        let raised = libc::rlimit {
            rlim_cur: size,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: valid rlimit; raising a soft limit up to the hard one is always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &raised) } != 0 {
            return Err(fail("setrlimit(RLIMIT_FSIZE)"));
        }
        Ok(FileSizeLimit(Some((lim, raised))))
    }
}

impl Drop for FileSizeLimit {
    fn drop(&mut self) {
        let Some((was, raised)) = self.0 else { return };
        let mut now = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-pointer.
        let read = unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut now) } == 0;
        // A limit the program set meanwhile (a re-attach runs beside its threads) is its own.
        if read && now.rlim_cur == raised.rlim_cur && now.rlim_max == raised.rlim_max {
            // SAFETY: restores the limit read before; lowering a soft limit cannot fail.
            unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &was) };
        }
    }
}

/// Writes every resident page of the region for which `copy(page index)` is true to `fd`
/// at its offset, in runs.
fn copy_resident_pages(
    fd: libc::c_int,
    base: usize,
    copy: &dyn Fn(usize) -> bool,
) -> Result<(), RegionError> {
    let pages = SHARED_SIZE / PAGE;
    let mut resident = vec![0u8; pages];
    // SAFETY: base is page-aligned, the range is mapped (it is our static), and `resident`
    // has one byte per page.
    if unsafe {
        libc::mincore(
            base as *mut libc::c_void,
            SHARED_SIZE,
            resident.as_mut_ptr(),
        )
    } != 0
    {
        return Err(fail("mincore"));
    }
    for (page, r) in resident.iter_mut().enumerate() {
        if !copy(page) {
            *r = 0;
        }
    }
    let mut page = 0;
    while page < pages {
        if resident.get(page).is_none_or(|r| r & 1 == 0) {
            page += 1;
            continue;
        }
        let start = page;
        while resident.get(page).is_some_and(|r| r & 1 != 0) {
            page += 1;
        }
        let mut off = start * PAGE;
        let end = page * PAGE;
        while off < end {
            // SAFETY: [base + off, base + end) lies inside the mapped region.
            let n = unsafe {
                libc::pwrite(
                    fd,
                    (base + off) as *const libc::c_void,
                    end - off,
                    off as libc::off_t,
                )
            };
            if n < 0 {
                if crate::signal::sys::errno() == libc::EINTR {
                    continue;
                }
                return Err(fail("copying the region into the memfd"));
            }
            if n == 0 {
                return Err(RegionError {
                    what: "copying the region into the memfd",
                    errno: libc::EIO,
                });
            }
            off += n as usize;
        }
    }
    Ok(())
}

/// In a forked child, after [`into_memfd_for_child`] gave it a region of its own: clears
/// what the copied pages hold of the parent's (the first page: rings' positions, commands,
/// liveness words; the page the allocator slots start on: the event counters and the tail of
/// the heap bucket table) and stamps the child's pid. Every other part is a hole of the new
/// memfd, which reads as zero: it is not read here, because reading a hole of shared memory
/// allocates a page.
pub fn reset_for_child() {
    let s = &SHARED;
    s.messages.head.store(0, Ordering::Relaxed);
    s.messages.tail.store(0, Ordering::Relaxed);
    s.commands.head.store(0, Ordering::Relaxed);
    s.commands.tail.store(0, Ordering::Relaxed);
    for c in s.commands.slots.iter() {
        c.store(0, Ordering::Relaxed);
    }
    crate::counters::reset();
    let copied_from = (core::ptr::addr_of!(s.alloc) as usize) & !(PAGE - 1);
    crate::alloc::buckets::reset_in_child(copied_from);
    s.header.finished.store(0, Ordering::Relaxed);
    s.header.collector_seen_ms.store(0, Ordering::Relaxed);
    // Copied in the middle of a read by the parent's collector, perhaps: nobody reads ours.
    s.header
        .sample_reader
        .store(shm::SAMPLE_READER_NONE, Ordering::Relaxed);
    s.header
        .drainer
        .store(shm::DRAINER_PROCESS, Ordering::Relaxed);
    stamp_header();
}

/// Throws away what no collector has read yet (before a re-attach: a new collector must
/// start at the new hello) and forgets the old collector's heartbeat and commands.
pub fn reset_for_reattach() {
    let s = &SHARED;
    let head = s.messages.head.load(Ordering::Acquire);
    s.messages.tail.store(head, Ordering::Release);
    let head = s.commands.head.load(Ordering::Acquire);
    s.commands.tail.store(head, Ordering::Release);
    s.header.collector_seen_ms.store(0, Ordering::Release);
    s.header.finished.store(0, Ordering::Release);
    // The old collector may have died in the middle of a read of the sample ring.
    s.header
        .sample_reader
        .store(shm::SAMPLE_READER_NONE, Ordering::Release);
}
