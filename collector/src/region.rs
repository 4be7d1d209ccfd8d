//! The collector's side of the shared region (issue 13): how a process's state is taken
//! over, checked and mapped, and how we keep hold of the process itself.
//!
//! A preloaded process sends one `Region` datagram carrying a memfd (`SCM_RIGHTS`), then its
//! hello, and closes the socket: from then on it writes its messages into a ring inside that
//! memfd and we read them there (see [`crate::pump`]). When it dies, the memfd is still ours
//! and its last samples, heap buckets and counters are read from it
//! ([`crate::death_read`]).
//!
//! # What is trusted
//! Nothing the process wrote. The memfd is checked before it is mapped
//! ([`Mapping::of_memfd`]): a regular file on tmpfs (not hugetlbfs, whose pages can be
//! missing at fault time), open read-write by the peer, of exactly the layout's size, sealed
//! against shrinking and growing. Without the seals the peer could truncate the file under
//! our mapping and every read past the new end would kill the daemon with SIGBUS. Once
//! mapped, the memory is written by the process while we read it: every read is an atomic
//! or volatile copy, bounds-checked before use (see `anyprof_wire::shared` and
//! [`crate::death_read`]).
//!
//! Who the process is comes from the kernel: a pidfd of the socket's peer (`SO_PEERPIDFD`,
//! Linux 6.5; else `pidfd_open` with a start-time check), and a `/proc/PID` directory
//! descriptor opened while that pidfd says the process runs, so that files read later
//! (thread names, RSS, `map_files`) are that process's even if its pid is reused.

use std::ffi::CString;
use std::io::{Error, ErrorKind};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use anyhow::{bail, Context, Result};

/// `SO_PEERPIDFD` (Linux 6.5): a pidfd of the process at the other end of a Unix socket.
const SO_PEERPIDFD: libc::c_int = 77;
/// Most descriptors taken from one datagram: the preload sends one; more are closed.
const MAX_FDS: usize = 4;

/// One received datagram: its real length (it may exceed the buffer: MSG_TRUNC) and the
/// descriptor it carried, if any.
#[derive(Debug)]
pub struct Datagram {
    /// Length of the datagram as sent (more than the buffer if it was cut).
    pub len: usize,
    /// The first descriptor passed with it (`SCM_RIGHTS`); any others were closed.
    pub fd: Option<OwnedFd>,
    /// Descriptors that came with it, in all.
    pub fds: usize,
}

/// Receives one datagram into `buf` from a `SOCK_SEQPACKET` socket, with the descriptors
/// passed along (close-on-exec). A descriptor beyond the first is closed at once, and so is
/// every descriptor when the control data was cut: nothing a peer passes outlives this call
/// unless we keep it.
pub fn recv_datagram(sock: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<Datagram> {
    // u64 elements: the control buffer must be aligned for `cmsghdr`.
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no iov, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    let n = loop {
        // SAFETY: `msg` points at a live iovec over `buf` and at `control`, both valid for
        // the lengths given; the kernel writes at most that much.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_TRUNC | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let e = Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // Take every descriptor the kernel installed, so that each is owned (and closed) here.
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR stay within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null headers from CMSG_FIRSTHDR/NXTHDR lie within the control buffer.
        let (level, kind, len) =
            unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: as above; CMSG_DATA of a header within the buffer.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            // SAFETY: CMSG_LEN is a pure computation.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(header) / std::mem::size_of::<RawFd>();
            for i in 0..count.min(MAX_FDS) {
                // SAFETY: the kernel wrote `count` descriptors at `data` (unaligned ints).
                let fd = unsafe { (data as *const RawFd).add(i).read_unaligned() };
                if fd >= 0 {
                    // SAFETY: SCM_RIGHTS installed this descriptor for us; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    let count = fds.len();
    let cut = msg.msg_flags & libc::MSG_CTRUNC != 0;
    let fd = if cut || count != 1 {
        None // closes them all: a well-formed region datagram carries exactly one
    } else {
        fds.pop()
    };
    Ok(Datagram {
        len: n,
        fd,
        fds: count + usize::from(cut),
    })
}

/// A running (or just ended) process, held by a pidfd, with its `/proc/PID` directory.
#[derive(Debug)]
pub struct Process {
    /// Its pid in our pid namespace.
    pub pid: u32,
    pidfd: OwnedFd,
    proc_dir: OwnedFd,
}

impl Process {
    /// The process at the other end of `sock`. `fallback` is what `SO_PEERCRED` said when
    /// the connection was accepted (pid and start time), used when the kernel has no
    /// `SO_PEERPIDFD`: the pid is then opened with `pidfd_open` and accepted only if it
    /// still has the start time it had then.
    pub fn of_socket(
        sock: BorrowedFd<'_>,
        fallback: Option<(u32, Option<u64>)>,
    ) -> Result<Process> {
        let pidfd = match peer_pidfd(sock) {
            Ok(fd) => fd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOPROTOOPT | libc::EINVAL)) => {
                let Some((pid, Some(started))) = fallback else {
                    bail!(
                        "the kernel cannot say which process connected (no SO_PEERPIDFD, no pid)"
                    );
                };
                let fd = pidfd_open(pid).with_context(|| format!("pidfd_open({pid})"))?;
                if crate::ingest::start_time(pid) != Some(started) {
                    bail!("process {pid} ended before it could be attached");
                }
                fd
            }
            Err(e) => return Err(e).context("getsockopt(SO_PEERPIDFD)"),
        };
        let pid = pid_of_pidfd(pidfd.as_fd())
            .or(fallback.map(|f| f.0))
            .filter(|&p| p != 0)
            .context("the process that connected has no pid in our pid namespace")?;
        Process::open(pid, pidfd)
    }

    /// Binds `pidfd` (of `pid`) to `/proc/PID`: the directory is opened, then the pidfd is
    /// asked whether the process still runs. If it does, the pid was never released in
    /// between, so the directory is that process's, for good (a `/proc/PID` descriptor of a
    /// process that ended fails with ESRCH; it never moves to a new owner of the pid).
    fn open(pid: u32, pidfd: OwnedFd) -> Result<Process> {
        let path = CString::new(format!("/proc/{pid}")).unwrap_or_default();
        // SAFETY: a valid NUL-terminated path; a non-negative result is a new descriptor.
        let dir = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if dir < 0 {
            return Err(Error::last_os_error()).with_context(|| format!("open /proc/{pid}"));
        }
        // SAFETY: see above.
        let proc_dir = unsafe { OwnedFd::from_raw_fd(dir) };
        let p = Process {
            pid,
            pidfd,
            proc_dir,
        };
        if p.exited() {
            bail!("process {pid} ended before it could be attached");
        }
        Ok(p)
    }

    /// A process for `pid` with its own pidfd (tests, and the fallback path).
    pub fn of_pid(pid: u32) -> Result<Process> {
        let fd = pidfd_open(pid).with_context(|| format!("pidfd_open({pid})"))?;
        Process::open(pid, fd)
    }

    /// True once the process has exited (its pidfd is readable).
    pub fn exited(&self) -> bool {
        self.wait(0)
    }

    /// Waits up to `timeout_ms` for the process to exit; true if it has.
    pub fn wait(&self, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        n > 0 && pfd.revents != 0
    }

    /// The pidfd, for polling.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Reads up to `max` bytes of `/proc/PID/{rel}`, only while the process runs (after it
    /// has exited its files are gone or a zombie's). `None` if it cannot be read.
    pub fn read(&self, rel: &str, max: usize) -> Option<Vec<u8>> {
        let fd = self.open_at(rel, libc::O_RDONLY).ok()?;
        let mut out = vec![0u8; max];
        let mut len = 0;
        while len < max {
            let rest = out.get_mut(len..)?;
            // SAFETY: `rest` is valid for its length.
            let n = unsafe { libc::read(fd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
            if n < 0 && Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                break;
            }
            len += n as usize;
        }
        out.truncate(len);
        Some(out)
    }

    /// Opens `/proc/PID/{rel}` (no symlink followed at the last component).
    fn open_at(&self, rel: &str, flags: libc::c_int) -> std::io::Result<OwnedFd> {
        let path = CString::new(rel).map_err(|_| Error::from(ErrorKind::InvalidInput))?;
        // SAFETY: a valid directory descriptor and NUL-terminated relative path.
        let fd = unsafe {
            libc::openat(
                self.proc_dir.as_raw_fd(),
                path.as_ptr(),
                flags | libc::O_CLOEXEC | libc::O_NOCTTY,
            )
        };
        if fd < 0 {
            return Err(Error::last_os_error());
        }
        // SAFETY: openat returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The name of thread `tid` (`/proc/PID/task/TID/comm`), without its newline.
    pub fn thread_name(&self, tid: u32) -> Option<Vec<u8>> {
        let mut name = self.read(&format!("task/{tid}/comm"), 64)?;
        if name.last() == Some(&b'\n') {
            name.pop();
        }
        Some(name)
    }

    /// Resident set size in bytes (`/proc/PID/statm`), `None` once the process is gone.
    pub fn rss_bytes(&self) -> Option<u64> {
        let statm = self.read("statm", 256)?;
        let pages: u64 = std::str::from_utf8(&statm)
            .ok()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
        Some(pages.saturating_mul(page))
    }

    /// Opens the file mapped at `[start, start+len)` in this process, read-write, through
    /// `/proc/PID/map_files` (a process that re-attaches sends no descriptor). Only a
    /// mapping that the process itself has shared and writable (`rw-s` in its maps) is
    /// opened, so that we never write to a file the process could not write itself. Needs
    /// CAP_SYS_ADMIN (root).
    pub fn open_map_file(&self, start: u64, len: u64) -> Result<OwnedFd> {
        let pid = self.pid;
        let end = start
            .checked_add(len)
            .filter(|_| len > 0 && start.is_multiple_of(4096))
            .with_context(|| format!("process {pid} named an impossible region at {start:#x}"))?;
        let range = format!("{start:x}-{end:x}");
        let maps = self
            .read("maps", 64 << 20)
            .with_context(|| format!("cannot read /proc/{pid}/maps"))?;
        let line = maps
            .split(|&b| b == b'\n')
            .find(|l| l.starts_with(range.as_bytes()) && l.get(range.len()) == Some(&b' '))
            .with_context(|| format!("process {pid} has no mapping at {range}"))?;
        if line.get(range.len() + 1..range.len() + 5) != Some(b"rw-s") {
            bail!("process {pid}'s mapping at {range} is not shared and writable");
        }
        let fd = self
            .open_at(&format!("map_files/{range}"), libc::O_RDWR)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => anyhow::anyhow!(
                    "process {pid} reconnected without its memory descriptor, and opening \
                     /proc/{pid}/map_files needs root (CAP_SYS_ADMIN): run `anyprof serve` as \
                     root, or restart the process to profile it again"
                ),
                _ => anyhow::Error::new(e).context(format!("open /proc/{pid}/map_files/{range}")),
            })?;
        if self.exited() {
            bail!("process {pid} ended while it was being re-attached");
        }
        Ok(fd)
    }
}

fn peer_pidfd(sock: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(Error::last_os_error());
    }
    if fd < 0 {
        return Err(Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: the kernel installed a new pidfd (close-on-exec) for us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; a non-negative result is a new descriptor
    // (pidfds are always close-on-exec).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The pid (in our namespace) a pidfd stands for, from its fdinfo; `None` if it has none
/// here (0) or the process is gone (-1).
fn pid_of_pidfd(fd: BorrowedFd<'_>) -> Option<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    let pid: i64 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()?;
    u32::try_from(pid).ok().filter(|&p| p > 0)
}

/// A shared, read-write mapping of a checked memfd; unmapped when dropped.
#[derive(Debug)]
pub struct Mapping {
    base: NonNull<u8>,
    len: usize,
    /// Device and inode of the file: the same region seen again (a re-attach) has the same.
    pub file: (u64, u64),
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics or
// volatile copies (see the module doc), which any thread may do.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

/// Seals a region must carry: without them the peer could shrink the file under our
/// mapping (SIGBUS on our next read) or grow it.
const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
/// `F_SEAL_FUTURE_WRITE` (Linux 5.1).
const F_SEAL_FUTURE_WRITE: libc::c_int = 0x0010;

impl Mapping {
    /// Checks that `fd` is a sealed memfd of exactly `len` bytes that its sender could
    /// write, and maps it shared and read-write. Every refusal says what was wrong.
    pub fn of_memfd(fd: BorrowedFd<'_>, len: usize) -> Result<Mapping> {
        let raw = fd.as_raw_fd();
        // SAFETY: an all-zero stat is a valid out-buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and out-pointer.
        if unsafe { libc::fstat(raw, &mut st) } != 0 {
            return Err(Error::last_os_error()).context("fstat of the region");
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            bail!("the region is not a regular file (a memfd was expected)");
        }
        // SAFETY: an all-zero statfs is a valid out-buffer.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and out-pointer.
        if unsafe { libc::fstatfs(raw, &mut fs) } != 0 {
            return Err(Error::last_os_error()).context("fstatfs of the region");
        }
        if fs.f_type != libc::TMPFS_MAGIC {
            // hugetlbfs memfds among others: their pages can be missing at fault time.
            bail!(
                "the region is not a memfd on tmpfs (file system magic {:#x})",
                fs.f_type
            );
        }
        // SAFETY: F_GET_SEALS takes no argument.
        let seals = unsafe { libc::fcntl(raw, libc::F_GET_SEALS) };
        if seals < 0 || seals & REQUIRED_SEALS != REQUIRED_SEALS {
            bail!(
                "the region is not sealed against shrinking and growing (seals {seals:#x}): a \
                 process could then cut it under the collector; use the libanyprof.so built \
                 with this anyprof"
            );
        }
        if seals & (libc::F_SEAL_WRITE | F_SEAL_FUTURE_WRITE) != 0 {
            bail!("the region is sealed against writing (seals {seals:#x})");
        }
        // SAFETY: F_GETFL takes no argument.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDWR {
            bail!("the region was not passed open for reading and writing");
        }
        if u64::try_from(st.st_size).ok() != Some(len as u64) {
            bail!(
                "the region is {} bytes, the layout of this anyprof {len}: use the \
                 libanyprof.so built with this anyprof",
                st.st_size
            );
        }
        // SAFETY: mapping a checked descriptor at an address of the kernel's choice; the
        // seals keep its size for as long as the mapping exists.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os_error()).context("cannot map the region");
        }
        let base = NonNull::new(p.cast::<u8>()).context("mmap returned null")?;
        Ok(Mapping {
            base,
            len,
            file: (st.st_dev, st.st_ino),
        })
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (a mapping of nothing is refused); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `of_memfd` mapped; no reference into it outlives
        // the mapping (readers borrow from `self`).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// `CLOCK_MONOTONIC` in milliseconds (what `collector_seen_ms` holds).
pub fn monotonic_ms() -> u64 {
    // SAFETY: an all-zero timespec is a valid out-buffer.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec.max(0) as u64)
        .saturating_mul(1000)
        .saturating_add(ts.tv_nsec.max(0) as u64 / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: usize, seals: libc::c_int) -> OwnedFd {
        let name = CString::new("anyprof-test").unwrap();
        // SAFETY: valid name and flags.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(fd >= 0);
        // SAFETY: a new descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: valid descriptor.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
        assert_eq!(rc, 0);
        if seals != 0 {
            // SAFETY: valid descriptor and seals.
            let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
            assert_eq!(rc, 0);
        }
        fd
    }

    const SEALED: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

    #[test]
    fn a_sealed_memfd_of_the_right_size_is_mapped() {
        let fd = memfd(8192, SEALED);
        let m = Mapping::of_memfd(fd.as_fd(), 8192).unwrap();
        assert_eq!(m.len(), 8192);
        // SAFETY: within the mapping.
        unsafe { m.as_ptr().add(8191).write_volatile(7) };
    }

    #[test]
    fn a_memfd_without_seals_is_refused() {
        for seals in [0, libc::F_SEAL_SHRINK, libc::F_SEAL_GROW] {
            let fd = memfd(8192, seals);
            let e = Mapping::of_memfd(fd.as_fd(), 8192).unwrap_err();
            assert!(format!("{e:#}").contains("not sealed"), "{e:#}");
        }
    }

    #[test]
    fn a_memfd_of_the_wrong_size_is_refused() {
        let fd = memfd(4096, SEALED);
        let e = Mapping::of_memfd(fd.as_fd(), 8192).unwrap_err();
        assert!(format!("{e:#}").contains("4096 bytes"), "{e:#}");
    }

    #[test]
    fn a_write_sealed_memfd_is_refused() {
        let fd = memfd(8192, SEALED & !libc::F_SEAL_SEAL | libc::F_SEAL_WRITE);
        let e = Mapping::of_memfd(fd.as_fd(), 8192).unwrap_err();
        assert!(format!("{e:#}").contains("against writing"), "{e:#}");
    }

    #[test]
    fn a_read_only_descriptor_is_refused() {
        let fd = memfd(8192, SEALED);
        let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        // SAFETY: valid path.
        let ro = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        assert!(ro >= 0);
        // SAFETY: a new descriptor.
        let ro = unsafe { OwnedFd::from_raw_fd(ro) };
        let e = Mapping::of_memfd(ro.as_fd(), 8192).unwrap_err();
        assert!(format!("{e:#}").contains("reading and writing"), "{e:#}");
    }

    #[test]
    fn files_that_are_not_memfds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let e = Mapping::of_memfd(file.as_fd(), 8192).unwrap_err();
        let text = format!("{e:#}");
        // On tmpfs (a tmp dir may be one) the seals check refuses it instead.
        assert!(
            text.contains("not a memfd on tmpfs") || text.contains("not sealed"),
            "{text}"
        );
        let dev_null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        let e = Mapping::of_memfd(dev_null.as_fd(), 8192).unwrap_err();
        assert!(format!("{e:#}").contains("not a regular file"), "{e:#}");
        // A shared-memory file that is not a memfd cannot carry the seals.
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            let f = tempfile::tempfile_in(shm).unwrap();
            f.set_len(8192).unwrap();
            let e = Mapping::of_memfd(f.as_fd(), 8192).unwrap_err();
            assert!(format!("{e:#}").contains("not sealed"), "{e:#}");
        }
    }

    /// A descriptor passed with a datagram arrives; extra ones are closed, not kept.
    #[test]
    fn descriptors_come_with_the_datagram() {
        use nix::sys::socket::{
            sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
        };
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let m1 = memfd(4096, SEALED);
        let m2 = memfd(4096, SEALED);
        let payload = [std::io::IoSlice::new(b"hello")];
        let one = [m1.as_raw_fd()];
        sendmsg::<()>(
            a.as_raw_fd(),
            &payload,
            &[ControlMessage::ScmRights(&one)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let two = [m1.as_raw_fd(), m2.as_raw_fd()];
        sendmsg::<()>(
            a.as_raw_fd(),
            &payload,
            &[ControlMessage::ScmRights(&two)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        sendmsg::<()>(
            a.as_raw_fd(),
            &[std::io::IoSlice::new(&[1u8; 100])],
            &[],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut buf = [0u8; 16];
        let d = recv_datagram(b.as_fd(), &mut buf).unwrap();
        assert_eq!((d.len, d.fds), (5, 1));
        assert_eq!(&buf[..5], b"hello");
        let fd = d.fd.unwrap();
        Mapping::of_memfd(fd.as_fd(), 4096).unwrap();
        let d = recv_datagram(b.as_fd(), &mut buf).unwrap();
        assert_eq!(d.fds, 2);
        assert!(d.fd.is_none());
        let d = recv_datagram(b.as_fd(), &mut buf).unwrap();
        assert_eq!(
            (d.len, d.fds),
            (100, 0),
            "the real length of a datagram cut short"
        );
    }

    /// A process is held by its pidfd: its files are readable while it runs, and its end
    /// is seen.
    #[test]
    fn a_process_is_followed_by_its_pidfd() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let p = Process::of_pid(child.id()).unwrap();
        assert!(!p.exited());
        assert!(p.rss_bytes().is_some_and(|r| r > 0));
        assert_eq!(p.thread_name(child.id()).as_deref(), Some(&b"sleep"[..]));
        child.kill().unwrap();
        assert!(p.wait(5000));
        let _ = child.wait();
        assert!(p.rss_bytes().is_none(), "a reaped process's files are gone");
    }

    /// The pidfd of a socket's peer names the process that connected.
    #[test]
    fn the_peer_of_a_socket_is_its_process() {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (_a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let p = Process::of_socket(b.as_fd(), None).unwrap();
        assert_eq!(p.pid, std::process::id());
        assert!(!p.exited());
    }

    /// A mapping is re-opened through map_files only if the process has it shared and
    /// writable.
    #[test]
    fn map_files_opens_only_shared_writable_mappings() {
        let fd = memfd(8192, SEALED);
        let shared = Mapping::of_memfd(fd.as_fd(), 8192).unwrap();
        let me = Process::of_pid(std::process::id()).unwrap();
        let again = me.open_map_file(shared.as_ptr() as u64, 8192).unwrap();
        let m2 = Mapping::of_memfd(again.as_fd(), 8192).unwrap();
        assert_eq!(m2.file, shared.file);
        // A private, read-only mapping of the same file is not opened.
        // SAFETY: mapping a valid descriptor read-only at an address of the kernel's choice.
        let ro = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ro, libc::MAP_FAILED);
        let e = me.open_map_file(ro as u64, 8192).unwrap_err();
        assert!(
            format!("{e:#}").contains("not shared and writable"),
            "{e:#}"
        );
        assert!(
            me.open_map_file(ro as u64, 4096).is_err(),
            "only the exact range"
        );
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(ro, 8192) };
    }
}
