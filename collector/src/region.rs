//! The collector's side of the shared region (issue 13): how a process's state is taken
//! over, checked and mapped, and how we keep hold of the process itself.
//!
//! A preloaded process sends one `Region` datagram carrying a memfd (`SCM_RIGHTS`), then its
//! hello, and closes the socket: from then on it writes its messages into a ring inside that
//! memfd and we read them there (see [`pump`]). When it dies, the memfd is still ours
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
//!
//! # What a process costs the collector
//! One thread (as a socket did), three descriptors (the pidfd, `/proc/PID`, and the memfd,
//! kept to find its holes), a mapping of the region's 25 MiB of address space, and a wake-up
//! every 5 ms while it sends, backing off to every 100 ms when it is quiet (100 idle
//! processes: under 0.3 % of one core). Pages of the region the process never wrote (holes)
//! cost nothing until read, and reading one through the mapping makes the kernel allocate
//! it, charged to us: the death read finds the holes first (`SEEK_DATA`/`SEEK_HOLE`) and
//! reads none ([`crate::death_read`]). The message ring is read only between its tail and
//! head, which the reader checks to be at most the ring's size: a process can make us fault
//! in at most the ring's 4 MiB of holes, once (a page read stays until the process punches
//! it out again). A death read copies up to the whole table, so they run one at a time, and
//! only once the process has exited.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{Error, ErrorKind};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use anyprof_wire::shared::{
    message_read_into, message_ring_empty, push_command, RegionInfo, Shared, COMMAND_SLOTS,
    DRAINER_COLLECTOR, FINISHED, MESSAGE_RING_BYTES, RECORD_HEADER, SHARED_MAGIC, SHARED_SIZE,
    SHARED_VERSION,
};
use anyprof_wire::{self as wire, Command, Level, MemStat, Message, MAX_MESSAGE};

use crate::death_read::Pages;
use crate::ingest::SharedSession;

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
///
/// A process may well have exited before we attach (a short program sends its region, its
/// hello and everything else, then exits): it is then held without either, counts as
/// exited, and all we read is its region.
#[derive(Debug)]
pub struct Process {
    /// Its pid in our pid namespace.
    pub pid: u32,
    /// `None` once the process is gone (it exited before we could take one).
    pidfd: Option<OwnedFd>,
    /// `None` when the process had exited by the time it was opened.
    proc_dir: Option<OwnedFd>,
}

impl Process {
    /// The process at the other end of `sock`. `fallback` is what `SO_PEERCRED` said when
    /// the connection was accepted (pid and start time), used when the kernel has no
    /// `SO_PEERPIDFD`: the pid is then opened with `pidfd_open` and accepted only if it
    /// still has the start time it had then (else the process is taken as gone).
    pub fn of_socket(
        sock: BorrowedFd<'_>,
        fallback: Option<(u32, Option<u64>)>,
    ) -> Result<Process> {
        Process::from_peer_pidfd(peer_pidfd(sock), fallback)
    }

    /// [`Process::of_socket`] once `SO_PEERPIDFD` has answered `peer`.
    fn from_peer_pidfd(
        peer: std::io::Result<OwnedFd>,
        fallback: Option<(u32, Option<u64>)>,
    ) -> Result<Process> {
        let fallback_pid = fallback.map(|f| f.0).filter(|&p| p != 0);
        let pidfd = match peer {
            Ok(fd) => Some(fd),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOPROTOOPT | libc::EINVAL)) => {
                match fallback {
                    Some((pid, Some(started))) => pidfd_open(pid)
                        .ok()
                        .filter(|_| crate::ingest::start_time(pid) == Some(started)),
                    _ => None,
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => None,
            Err(e) => return Err(e).context("getsockopt(SO_PEERPIDFD)"),
        };
        // A process of an ancestor pid namespace (the host, seen from a container) has no
        // pid here: it is followed by its pidfd alone, without /proc.
        let pid = pidfd
            .as_ref()
            .and_then(|fd| pid_of_pidfd(fd.as_fd()))
            .or(fallback_pid)
            .unwrap_or(0);
        if pid == 0 && pidfd.is_none() {
            bail!("the kernel cannot say which process connected (no pidfd, no pid)");
        }
        Ok(Process::open(pid, pidfd))
    }

    /// Binds `pidfd` (of `pid`) to `/proc/PID`: the directory is opened, then the pidfd is
    /// asked whether the process still runs. If it does, the pid was never released in
    /// between, so the directory is that process's, for good (a `/proc/PID` descriptor of a
    /// process that ended fails with ESRCH; it never moves to a new owner of the pid). If
    /// it does not, the directory is not kept: it may be another process's already.
    fn open(pid: u32, pidfd: Option<OwnedFd>) -> Process {
        if pid == 0 {
            return Process {
                pid,
                pidfd,
                proc_dir: None,
            };
        }
        let path = CString::new(format!("/proc/{pid}")).unwrap_or_default();
        // SAFETY: a valid NUL-terminated path; a non-negative result is a new descriptor.
        let dir = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        // SAFETY: see above.
        let dir = (dir >= 0).then(|| unsafe { OwnedFd::from_raw_fd(dir) });
        let mut p = Process {
            pid,
            pidfd,
            proc_dir: None,
        };
        if !p.exited() {
            p.proc_dir = dir;
        }
        p
    }

    /// A process for `pid` with its own pidfd (tests).
    pub fn of_pid(pid: u32) -> Result<Process> {
        let fd = pidfd_open(pid).with_context(|| format!("pidfd_open({pid})"))?;
        Ok(Process::open(pid, Some(fd)))
    }

    /// True once the process has exited (its pidfd is readable, or it had none).
    pub fn exited(&self) -> bool {
        self.wait(0)
    }

    /// Waits up to `timeout_ms` for the process to exit; true if it has.
    pub fn wait(&self, timeout_ms: i32) -> bool {
        let Some(pidfd) = &self.pidfd else {
            return true;
        };
        let mut pfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        n > 0 && pfd.revents != 0
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
        let dir = self
            .proc_dir
            .as_ref()
            .ok_or_else(|| Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: a valid directory descriptor and NUL-terminated relative path.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
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

    /// The process's pid in its own pid namespace (the last of `NSpid` in
    /// `/proc/PID/status`), which is what it calls itself; `None` if it cannot be read.
    pub fn own_pid(&self) -> Option<u32> {
        let status = self.read("status", 16 << 10)?;
        let status = String::from_utf8_lossy(&status);
        let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
        line.split_ascii_whitespace().last()?.parse().ok()
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
    /// opened, so that we never write to a file the process could not write itself, and
    /// only if what is opened is the file that line names (device and inode) and belongs
    /// to `uid`, the process's user (`SO_PEERCRED`): a memfd someone else created and the
    /// process merely mapped is not taken for its region. Needs CAP_SYS_ADMIN (root).
    pub fn open_map_file(&self, start: u64, len: u64, uid: u32) -> Result<OwnedFd> {
        let pid = self.pid;
        let end = start
            .checked_add(len)
            .filter(|_| len > 0 && start.is_multiple_of(4096))
            .with_context(|| format!("process {pid} named an impossible region at {start:#x}"))?;
        let range = format!("{start:x}-{end:x}");
        let maps = self
            .open_at("maps", libc::O_RDONLY)
            .with_context(|| format!("cannot read /proc/{pid}/maps"))?;
        // Line by line: a process can have a very long maps file.
        let line =
            std::io::BufRead::split(std::io::BufReader::new(std::fs::File::from(maps)), b'\n')
                .map_while(|l| l.ok())
                .find(|l| l.starts_with(range.as_bytes()) && l.get(range.len()) == Some(&b' '))
                .with_context(|| format!("process {pid} has no mapping at {range}"))?;
        if line.get(range.len() + 1..range.len() + 5) != Some(b"rw-s") {
            bail!("process {pid}'s mapping at {range} is not shared and writable");
        }
        // "start-end perms offset major:minor inode [path]"
        let named = parse_maps_file(&line)
            .with_context(|| format!("process {pid}'s maps line for {range} cannot be read"))?;
        // The process may have replaced the mapping since: open it without effect first
        // (O_PATH), and open it for real only once it is known to be a file on tmpfs. (As
        // root, a read-write open of a device node mapped there could do something.)
        let path_fd = self
            .open_at(&format!("map_files/{range}"), libc::O_PATH)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => anyhow::anyhow!(
                    "process {pid} reconnected without its memory descriptor, and opening \
                     /proc/{pid}/map_files needs root (CAP_SYS_ADMIN): run `anyprof serve` as \
                     root, or restart the process to profile it again"
                ),
                _ => anyhow::Error::new(e).context(format!("open /proc/{pid}/map_files/{range}")),
            })?;
        let what = file_identity(path_fd.as_fd())?;
        if !what.regular_on_tmpfs {
            bail!("process {pid}'s mapping at {range} is not a memfd");
        }
        let (dev, ino) = what.file;
        if (libc::major(dev), libc::minor(dev), ino) != named {
            bail!("process {pid}'s mapping at {range} changed while it was opened");
        }
        if what.uid != uid {
            bail!(
                "process {pid}'s mapping at {range} belongs to user {}, not to the process's \
                 user {uid}: not taken for its region",
                what.uid
            );
        }
        let again =
            CString::new(format!("/proc/self/fd/{}", path_fd.as_raw_fd())).unwrap_or_default();
        // SAFETY: a valid NUL-terminated path; a non-negative result is a new descriptor.
        let fd = unsafe { libc::open(again.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(Error::last_os_error())
                .with_context(|| format!("open /proc/{pid}/map_files/{range}"));
        }
        // SAFETY: open returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if file_identity(fd.as_fd())?.file != what.file {
            bail!("process {pid}'s mapping at {range} changed while it was opened");
        }
        if self.exited() {
            bail!("process {pid} ended while it was being re-attached");
        }
        Ok(fd)
    }
}

/// Device (major, minor) and inode of the file a `/proc/PID/maps` line names.
fn parse_maps_file(line: &[u8]) -> Option<(u32, u32, u64)> {
    let line = std::str::from_utf8(line.get(..line.len().min(256))?).ok()?;
    let mut fields = line.split_ascii_whitespace().skip(3);
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode = fields.next()?.parse().ok()?;
    Some((
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
        inode,
    ))
}

/// What kind of file a descriptor (possibly `O_PATH`) is.
struct FileIdentity {
    /// Device and inode.
    file: FileId,
    /// Owner.
    uid: u32,
    /// A regular file on tmpfs (where memfds live).
    regular_on_tmpfs: bool,
}

fn file_identity(fd: BorrowedFd<'_>) -> Result<FileIdentity> {
    // SAFETY: an all-zero stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor (O_PATH descriptors allow fstat) and out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(Error::last_os_error()).context("fstat");
    }
    // SAFETY: an all-zero statfs is a valid out-buffer.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor (O_PATH descriptors allow fstatfs) and out-pointer.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) } != 0 {
        return Err(Error::last_os_error()).context("fstatfs");
    }
    Ok(FileIdentity {
        file: (st.st_dev, st.st_ino),
        uid: st.st_uid,
        regular_on_tmpfs: st.st_mode & libc::S_IFMT == libc::S_IFREG
            && fs.f_type == libc::TMPFS_MAGIC,
    })
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
    /// The memfd, kept (in the daemon only) to find its holes before a death read
    /// ([`Mapping::pages`]).
    memfd: OwnedFd,
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
        let memfd = match fd.try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: unmapping what was just mapped; nothing refers to it yet.
                unsafe { libc::munmap(p, len) };
                return Err(e).context("cannot keep the region's descriptor");
            }
        };
        Ok(Mapping {
            base,
            len,
            memfd,
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

    /// Which pages of the memfd hold data (the others are holes, which the death read must
    /// not touch: reading one allocates it).
    pub fn pages(&self) -> std::io::Result<crate::death_read::Pages> {
        crate::death_read::Pages::of_file(self.memfd.as_fd(), self.len)
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
    monotonic_ns() / 1_000_000
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the processes' hellos and sample times (and
/// of `Instant`).
pub fn monotonic_ns() -> u64 {
    // SAFETY: an all-zero timespec is a valid out-buffer.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec.max(0) as u64)
}

/// A process's region, mapped and checked, with the process it belongs to.
#[derive(Debug)]
pub struct Attached {
    mapping: Mapping,
    /// The process (pidfd and `/proc/PID`).
    pub process: Process,
}

impl Attached {
    /// Takes over the region a process announced in its first datagram: with the memfd it
    /// passed, or (a process re-attaching after the collector restarted) through
    /// `/proc/PID/map_files`. `peer` is what `SO_PEERCRED` said at accept (pid, start
    /// time), `peer_uid` its user.
    ///
    /// Opening `/proc/PID/maps` and `map_files` takes the process's `mmap_lock`, which it
    /// can keep busy: call this without holding the session's lock.
    pub fn new(
        sock: BorrowedFd<'_>,
        info: &RegionInfo,
        datagram: Datagram,
        peer: Option<(u32, Option<u64>)>,
        peer_uid: Option<u32>,
    ) -> Result<Attached> {
        if info.version != SHARED_VERSION || info.size != SHARED_SIZE as u64 {
            bail!(
                "the process's shared region has layout version {} and {} bytes; this anyprof \
                 expects version {SHARED_VERSION} and {SHARED_SIZE} bytes: use the \
                 libanyprof.so built with this anyprof",
                info.version,
                info.size
            );
        }
        if datagram.fds > 1 {
            bail!(
                "the region message carried {} descriptors instead of one",
                datagram.fds
            );
        }
        let process = Process::of_socket(sock, peer)?;
        let from_map_files = datagram.fd.is_none();
        let fd = match datagram.fd {
            Some(fd) => fd,
            None => {
                let uid = peer_uid.context("the user of the process that connected is unknown")?;
                process.open_map_file(info.address, info.size, uid)?
            }
        };
        let mapping = Mapping::of_memfd(fd.as_fd(), SHARED_SIZE)?;
        drop(fd); // the mapping keeps its own copy (to find holes at the death read)
        let a = Attached { mapping, process };
        let h = &a.shared().header;
        let (magic, version) = (
            h.magic.load(Ordering::Acquire),
            h.version.load(Ordering::Acquire),
        );
        if magic != SHARED_MAGIC || version != SHARED_VERSION {
            bail!(
                "the process's shared region does not start with the anyprof header (magic \
                 {magic:#x}, version {version}): use the libanyprof.so built with this anyprof"
            );
        }
        if from_map_files {
            // The region the process found in its own memory must be its own: the header
            // names it (by its pid in its own pid namespace).
            let said = h.pid.load(Ordering::Acquire);
            let own = a.process.own_pid().unwrap_or(a.process.pid);
            if said != own {
                bail!(
                    "the shared region mapped in process {} belongs to process {said}: not taken",
                    a.process.pid
                );
            }
        }
        Ok(a)
    }

    /// The region. Every field is an atomic or an `UnsafeCell`, so a shared reference to
    /// memory that the process keeps writing is sound; plain fields are copied out with
    /// volatile reads ([`crate::death_read`]).
    pub fn shared(&self) -> &Shared {
        // SAFETY: the mapping is SHARED_SIZE bytes (checked), page-aligned (mmap), lives as
        // long as `self`, and all-bytes-valid for Shared (integers, atomics, UnsafeCells).
        unsafe { &*self.mapping.as_ptr().cast::<Shared>() }
    }

    /// Device and inode of the memfd: a re-attach of the same image maps the same file.
    pub fn file(&self) -> (u64, u64) {
        self.mapping.file
    }

    /// Queues `cmd` for the process.
    pub fn command(&self, cmd: Command) -> Result<()> {
        let pid = self.process.pid;
        if self.process.exited() {
            bail!("process {pid} has exited");
        }
        if !push_command(&self.shared().commands, cmd) {
            bail!(
                "process {pid} has not taken the last {COMMAND_SLOTS} commands (stopped, or \
                 its profiler thread is stuck); try again later"
            );
        }
        Ok(())
    }
}

/// How a connection's thread and the rest of the collector talk about one process: the
/// socket's control descriptor (processes that stream over the socket) or the region
/// (processes that use one), and whether the session must end (a newer image of the pid).
#[derive(Debug, Default)]
pub struct Channel {
    /// A second descriptor of the socket, for commands (socket sessions only).
    pub control: Mutex<Option<OwnedFd>>,
    /// The region, while the session reads it.
    region: Mutex<Option<Arc<Attached>>>,
    /// Set when the process exec'd (a newer region from its pid): end after a death read.
    superseded: AtomicBool,
    /// Set when the same image re-attached on another connection: end without one.
    replaced: AtomicBool,
    /// When the heap buckets of a process without our thread were last read live.
    heap_read_at: Mutex<Option<Instant>>,
    /// Whether a process without our thread is read live from its region
    /// ([`crate::collect::Options::read_regions_live`]).
    pub read_live: AtomicBool,
}

impl Channel {
    /// The region, if the session reads one now.
    pub fn region(&self) -> Option<Arc<Attached>> {
        self.region.lock().ok().and_then(|r| r.clone())
    }

    /// Brings `session`'s heap buckets up to date from the region of a running process that
    /// has no thread of ours to send them (`SharedHeader::drainer`), unless they were read
    /// less than `max_age` ago; nothing for any other process (its thread sends changes every
    /// 20 ms). For heap snapshots and the symbols warmed while the program runs.
    pub fn refresh_heap(&self, session: &SharedSession, max_age: Duration) {
        if !self.read_live.load(Ordering::Relaxed) {
            return;
        }
        let Some(attached) = self.region() else {
            return;
        };
        let shared = attached.shared();
        if shared.header.drainer.load(Ordering::Acquire) != DRAINER_COLLECTOR
            || attached.process.exited()
        {
            return;
        }
        {
            let Ok(mut at) = self.heap_read_at.lock() else {
                return;
            };
            if at.is_some_and(|t| t.elapsed() < max_age) {
                return;
            }
            *at = Some(Instant::now());
        }
        let Ok(pages) = attached.mapping.pages() else {
            return;
        };
        crate::death_read::live::buckets(shared, &pages, &mut |m| {
            session
                .lock()
                .is_ok_and(|mut s| s.apply_encoded(m, "live read", &mut |_, _| {}))
        });
    }
}

/// The live region sessions by pid, so that an exec'd image's region ends its predecessor.
#[derive(Debug, Default)]
pub struct Registry {
    live: Mutex<HashMap<u32, (Image, Arc<Channel>)>>,
    /// When each pid was last warned about a region that could not be taken.
    warned: Mutex<HashMap<u32, Instant>>,
}

/// Least time between two warnings about one pid's refused region (a process re-attaches
/// every second).
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(60);
/// Pids remembered for that.
const MAX_WARNED: usize = 4096;

/// Device and inode of a region's memfd.
type FileId = (u64, u64);

/// What tells two images of one pid apart: the memfd (device, inode), and the load time
/// the hello states (a re-attach to a non-root collector brings a fresh memfd of the same
/// image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Image {
    file: FileId,
    started: Option<u64>,
}

impl Image {
    fn same(&self, other: &Image) -> bool {
        self.file == other.file || (self.started.is_some() && self.started == other.started)
    }
}

impl Registry {
    /// Records that `channel` now reads `attached`'s region; ends the session of an earlier
    /// image of the same pid (after its death read: the process exec'd), or of the same
    /// image read by an earlier connection (without one: the process lives on).
    fn register(&self, attached: &Attached, started: Option<u64>, channel: &Arc<Channel>) {
        let Ok(mut map) = self.live.lock() else {
            return;
        };
        let image = Image {
            file: attached.file(),
            started,
        };
        if let Some((old_image, old)) = map.insert(attached.process.pid, (image, channel.clone())) {
            if old_image.same(&image) {
                old.replaced.store(true, Ordering::Release);
            } else {
                old.superseded.store(true, Ordering::Release);
            }
        }
    }

    /// Whether a refusal of `pid`'s region may be told now (at most once a minute per pid).
    pub fn may_warn(&self, pid: u32) -> bool {
        let Ok(mut warned) = self.warned.lock() else {
            return true;
        };
        if warned
            .get(&pid)
            .is_some_and(|at| at.elapsed() < REFUSAL_WARNING_EVERY)
        {
            return false;
        }
        if warned.len() >= MAX_WARNED {
            warned.retain(|_, at| at.elapsed() < REFUSAL_WARNING_EVERY);
        }
        if warned.len() < MAX_WARNED {
            warned.insert(pid, Instant::now());
        }
        true
    }

    fn unregister(&self, pid: u32, channel: &Arc<Channel>) {
        let Ok(mut map) = self.live.lock() else {
            return;
        };
        if map.get(&pid).is_some_and(|(_, c)| Arc::ptr_eq(c, channel)) {
            map.remove(&pid);
        }
    }
}

/// What a connection's thread needs besides its socket and session.
#[derive(Clone, Debug, Default)]
pub struct Link {
    /// This connection's channel (also held by the collector, for commands).
    pub channel: Arc<Channel>,
    /// Every region session of the collector.
    pub registry: Arc<Registry>,
}

/// Shortest and longest wait between two reads of the message ring: 5 ms while messages
/// flow, doubling up to 100 ms while the process is quiet.
const MIN_INTERVAL_MS: i32 = 5;
const MAX_INTERVAL_MS: i32 = 100;
/// Most messages read in one go, so that a process writing without pause cannot keep the
/// pump from noticing its end or from telling it we are here.
const BATCH: usize = 4096;
/// How often a thread's name is read again (programs rename threads after start).
const RENAME_CHECK: Duration = Duration::from_secs(1);
/// Threads whose names are followed at most; the least recently read are forgotten.
const MAX_NAMED_THREADS: usize = 4096;
/// Most thread names read for one message of samples (the others wait for the next).
const NAMES_PER_MESSAGE: usize = 64;

/// Why a pump ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum End {
    /// The process exited (or exec'd): read what it left.
    Gone,
    /// The process finished its last flush: read what is left, too (cheap, idempotent).
    Finished,
    /// The same image is read by a newer connection.
    Replaced,
    /// The stream is corrupt or over limits (the session's error says why).
    Broken,
}

/// Reads a region until its process ends: the message ring every few milliseconds (each
/// message decoded and applied as if it came over the socket, with the same limits), the
/// process's thread names and RSS from `/proc`, and at the end what the process left in
/// the region (the death read). `log` receives the process's diagnostics.
pub fn pump(
    attached: Attached,
    session: &SharedSession,
    link: &Link,
    trace_mem: bool,
    log: &mut dyn FnMut(Option<u32>, Level, &str),
) {
    let attached = Arc::new(attached);
    let pid = attached.process.pid;
    if let Ok(mut r) = link.channel.region.lock() {
        *r = Some(attached.clone());
    }
    if let Ok(mut c) = link.channel.control.lock() {
        *c = None; // the socket is closed: commands go through the region
    }
    let started = session
        .lock()
        .ok()
        .and_then(|s| s.hello.as_ref().map(|h| h.start_monotonic_ns));
    // A process already gone ends nothing: an earlier image of its pid sees the same exit
    // (and its pid may be another process's by now).
    if !attached.process.exited() && pid != 0 {
        link.registry.register(&attached, started, &link.channel);
    }
    let (end, rss) = run(&attached, session, link, trace_mem, log);
    if end == End::Broken {
        let (spid, error) = session
            .lock()
            .map(|s| (s.pid(), s.error.clone()))
            .unwrap_or_default();
        let why = error.unwrap_or_else(|| "its stream was cut".into());
        log(
            spid.or(Some(pid)),
            Level::Warn,
            &format!("no longer profiled: {why}"),
        );
    }
    // A process that says it finished is read only once it has exited: one that still runs
    // (a hostile process setting the flag and reconnecting with the same memfd to have its
    // region read again and again, or a raw-forked child that ran our destructor) ends
    // its session without a death read.
    let read_remains = match end {
        End::Gone => true,
        End::Finished => attached.process.wait(FINISHED_EXIT_WAIT_MS),
        End::Replaced | End::Broken => false,
    };
    // One death read at a time, daemon-wide (each costs up to a region's worth of copying).
    let one_at_a_time = read_remains.then(|| DEATH_READS.lock());
    if read_remains {
        death_read(&attached, session, end == End::Gone, rss, log);
    }
    link.registry.unregister(pid, &link.channel);
    if let Ok(mut r) = link.channel.region.lock() {
        *r = None; // unmapped once the last command in flight lets go
    }
    drop(attached); // unmapped, and its memfd closed
    drop(one_at_a_time);
}

/// Serialises death reads (see [`pump`]).
static DEATH_READS: Mutex<()> = Mutex::new(());

/// How long a process that finished its last flush has to exit before its session ends
/// without a death read.
const FINISHED_EXIT_WAIT_MS: i32 = 1000;

/// Reads what the process left in its region into the session. The messages are built and
/// decoded without the session's lock, which is taken for each one only to apply it (the
/// HTTP listing waits on that lock). Pages of the memfd that hold no data are not read (see
/// [`crate::death_read`]).
fn death_read(
    attached: &Attached,
    session: &SharedSession,
    gone: bool,
    rss: u64,
    log: &mut dyn FnMut(Option<u32>, Level, &str),
) {
    let (spid, last) = match session.lock() {
        Ok(mut s) => {
            s.read_at_death |= gone;
            (s.pid(), s.mem_stats.clone())
        }
        Err(_) => return,
    };
    let pages = match attached.mapping.pages() {
        Ok(p) => p,
        Err(e) => {
            log(
                spid,
                Level::Warn,
                &format!(
                    "what the ended process left in its shared memory was not read: its \
                     memory descriptor cannot be searched for data ({e})"
                ),
            );
            return;
        }
    };
    let report = crate::death_read::read(attached.shared(), &pages, last.as_ref(), rss, &mut |m| {
        session.lock().is_ok_and(|mut s| {
            s.apply_encoded(m, "death read", &mut |level, text| log(spid, level, text))
        })
    });
    if gone && (report.samples > 0 || report.buckets > 0) {
        log(
            spid,
            Level::Info,
            &format!(
                "read from the memory of the ended process: {} samples, {} heap buckets",
                report.samples, report.buckets
            ),
        );
    }
    if report.corrupt > 0 {
        log(
            spid,
            Level::Warn,
            &format!(
                "{} items in the process's shared memory held impossible values and were \
                 skipped (the program wrote over the profiler's memory)",
                report.corrupt
            ),
        );
    }
}

fn run(
    attached: &Attached,
    session: &SharedSession,
    link: &Link,
    trace_mem: bool,
    log: &mut dyn FnMut(Option<u32>, Level, &str),
) -> (End, u64) {
    let shared = attached.shared();
    let mut interval = MIN_INTERVAL_MS;
    let mut applier = Applier {
        attached,
        session,
        names: ThreadNames::default(),
        rss: Rss::default(),
        trace_mem,
        log,
    };
    let mut live = LiveRead::default();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let gone = attached.process.wait(interval);
        if !gone {
            // Kept fresh while the process runs: what it had when it was killed is what an
            // OOM investigation wants, and a dead process has none to read.
            let every = if interval == MIN_INTERVAL_MS {
                RSS_ACTIVE
            } else {
                RSS_IDLE
            };
            applier.rss.refresh(&attached.process, every);
        }
        if link.channel.replaced.load(Ordering::Acquire) {
            return (End::Replaced, applier.rss.last);
        }
        // An image that exec'd (superseded) writes no more: read it to the end as if gone.
        let gone = gone || link.channel.superseded.load(Ordering::Acquire);
        let mut read = 0;
        // Bytes of ring consumed since the end was seen: an honest writer has left at most
        // one ring's worth; more means the memfd is written by some other process still.
        let mut after_end = 0usize;
        loop {
            // SAFETY: the ring lies in our mapping, which `attached` keeps alive.
            let len = match unsafe { message_read_into(&shared.messages, &mut buf) } {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(e) => {
                    if let Ok(mut s) = session.lock() {
                        s.error = Some(e.to_string());
                    }
                    return (End::Broken, applier.rss.last);
                }
            };
            read += 1;
            let msg = buf.get(..len).unwrap_or(&[]);
            if !applier.apply(msg) {
                return (End::Broken, applier.rss.last);
            }
            // After the end, read everything (the process writes no more); before it, let
            // the loop come round to tell the process we are here.
            if read >= BATCH && !gone {
                break;
            }
            if gone {
                after_end = after_end.saturating_add(RECORD_HEADER + len);
                if after_end > MESSAGE_RING_BYTES {
                    if let Ok(mut s) = session.lock() {
                        s.error = Some(
                            "the process ended but its shared memory is still being written \
                             (by another process?)"
                                .into(),
                        );
                    }
                    return (End::Broken, applier.rss.last);
                }
            }
        }
        let live_read = link.channel.read_live.load(Ordering::Relaxed)
            && shared.header.drainer.load(Ordering::Acquire) == DRAINER_COLLECTOR;
        if !gone && live_read {
            match live.read(&mut applier) {
                Some(n) => read += n,
                None => return (End::Broken, applier.rss.last),
            }
        }
        shared
            .header
            .collector_seen_ms
            .store(monotonic_ms(), Ordering::Release);
        if gone {
            return (End::Gone, applier.rss.last);
        }
        if shared.header.finished.load(Ordering::Acquire) == FINISHED
            && message_ring_empty(&shared.messages)
        {
            return (End::Finished, applier.rss.last);
        }
        interval = if read > 0 {
            MIN_INTERVAL_MS
        } else {
            (interval * 2).min(MAX_INTERVAL_MS)
        };
        if live_read {
            // We watch its peak heap for it, as its thread would every 20 ms.
            interval = interval.min(LIVE_PEAK_EVERY.as_millis() as i32);
        }
    }
}

/// What folding a message into a session needs: the process, its session, and what the pump
/// keeps for it between messages.
struct Applier<'a> {
    attached: &'a Attached,
    session: &'a SharedSession,
    names: ThreadNames,
    rss: Rss,
    trace_mem: bool,
    log: &'a mut dyn FnMut(Option<u32>, Level, &str),
}

impl Applier<'_> {
    /// Decodes one message and folds it into the session; false if the session must end (its
    /// error says why).
    fn apply(&mut self, bytes: &[u8]) -> bool {
        let Applier {
            attached,
            session,
            names,
            rss,
            trace_mem,
            log,
        } = self;
        let (attached, session, trace_mem) = (*attached, *session, *trace_mem);
        let mut msg = match wire::decode(bytes) {
            Ok(msg) => msg,
            Err(e) => {
                if let Ok(mut s) = session.lock() {
                    s.error = Some(e.to_string());
                }
                return false;
            }
        };
        let mut tids = Vec::new();
        match &mut msg {
            Message::MemStats(m) => {
                // The process no longer reads /proc/self/statm (it would open a descriptor). One
                // that has just exited has no RSS left: its last reading stands then.
                rss.refresh(&attached.process, Duration::ZERO);
                if rss.last > 0 {
                    let rss = rss.last;
                    let at = MemStat::RssBytes as usize;
                    if m.fields.len() <= at {
                        m.fields.resize(at + 1, 0);
                    }
                    if let Some(f) = m.fields.get_mut(at) {
                        *f = rss;
                    }
                }
            }
            Message::CpuSamples(samples) => {
                tids = samples.iter().map(|s| s.tid).collect();
                tids.sort_unstable();
                tids.dedup();
            }
            _ => {}
        }
        let Ok(mut s) = session.lock() else {
            return false;
        };
        let pid = s.pid();
        if let (true, Message::MemStats(new)) = (trace_mem, &mut msg) {
            // As the session will keep it (so that a repeated report reads as one).
            crate::ingest::keep_peaks(s.mem_stats.as_ref(), s.live_peak_seen, new);
            let since = s.connected_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
            // The final flush may repeat the report just sent: an identical report within half a
            // second of the last line says nothing new (an idle program still gets its line every
            // second).
            let repeat = s.mem_stats.as_ref() == Some(new)
                && s.mem_trace_at.is_some_and(|at| since - at < 0.5);
            if !repeat {
                let line = crate::summary::mem_trace_line(s.mem_stats.as_ref(), new, since);
                eprintln!("anyprof[{}]: {line}", pid.unwrap_or(0));
                s.mem_trace_at = Some(since);
            }
        }
        s.apply(msg, &mut |level, text| log(pid, level, text));
        if let Some(why) = s.over_limits() {
            s.error = Some(why);
            return false;
        }
        drop(s);
        // Thread names are read by us from /proc (the process would need a descriptor).
        for (tid, name) in names.due(&attached.process, &tids) {
            let Ok(mut s) = session.lock() else {
                return false;
            };
            if s.thread_names.get(&tid).map(String::as_bytes) != Some(name.as_slice()) {
                s.apply(Message::ThreadName(tid, name), &mut |level, text| {
                    log(pid, level, text)
                });
            }
        }
        true
    }
}

/// How often the live read takes the allocator's totals (for the peak), and sends counters.
const LIVE_PEAK_EVERY: Duration = Duration::from_millis(20);
const LIVE_COUNTERS_EVERY: Duration = Duration::from_secs(1);

/// What the pump reads from the region of a process that has no thread of ours to send it
/// (`SharedHeader::drainer`; see [`crate::death_read::live`]): its samples on every turn,
/// its live bytes every 20 ms (the peak), its counters and allocator totals every second.
struct LiveRead {
    peak: u64,
    peak_at: Option<Instant>,
    /// The first report is due a second in, as the process's thread would send it.
    counters_at: Option<Instant>,
}

impl Default for LiveRead {
    fn default() -> LiveRead {
        LiveRead {
            peak: 0,
            peak_at: None,
            counters_at: Some(Instant::now()),
        }
    }
}

impl LiveRead {
    /// One turn; the number of messages applied, or `None` if the session must end.
    fn read(&mut self, applier: &mut Applier<'_>) -> Option<usize> {
        let (attached, session) = (applier.attached, applier.session);
        let shared = attached.shared();
        let mut messages: Vec<Vec<u8>> = Vec::new();
        crate::death_read::live::samples(shared, &mut |m| {
            messages.push(m.to_vec());
            true
        });
        let due = |at: Option<Instant>, every: Duration| at.is_none_or(|t| t.elapsed() >= every);
        let counters_due = due(self.counters_at, LIVE_COUNTERS_EVERY);
        if counters_due || due(self.peak_at, LIVE_PEAK_EVERY) {
            self.peak_at = Some(Instant::now());
            // Only the slots the process claimed are read (it wrote them: no hole; a
            // process that lies about how many costs us at most the table, once).
            let live = crate::death_read::live::live_bytes(shared, &Pages::all());
            if live > self.peak {
                self.peak = live;
                session.lock().ok()?.live_peak_seen = live;
            }
            if counters_due {
                self.counters_at = Some(Instant::now());
                let pages = attached.mapping.pages().ok()?;
                let last = session.lock().ok()?.mem_stats.clone();
                crate::death_read::live::counters(
                    shared,
                    &pages,
                    last.as_ref(),
                    applier.rss.last,
                    &mut |m| {
                        messages.push(m.to_vec());
                        true
                    },
                );
            }
        }
        for m in &messages {
            if !applier.apply(m) {
                return None;
            }
        }
        Some(messages.len())
    }
}

/// How often the pump reads the process's RSS while it runs and sends messages (a process
/// growing towards the OOM killer does), and while it is quiet.
const RSS_ACTIVE: Duration = Duration::from_millis(20);
const RSS_IDLE: Duration = Duration::from_secs(1);

/// The process's resident set size as last read from `/proc/PID/statm`.
#[derive(Default)]
struct Rss {
    /// Bytes; 0 until read.
    last: u64,
    at: Option<Instant>,
}

impl Rss {
    /// Reads it again if the last reading is older than `every` (and the process still has
    /// an RSS to read).
    fn refresh(&mut self, process: &Process, every: Duration) {
        if self.at.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.at = Some(Instant::now());
        if let Some(r) = process.rss_bytes().filter(|&r| r > 0) {
            self.last = r;
        }
    }
}

/// When each thread's name was last read.
#[derive(Default)]
struct ThreadNames(HashMap<u32, Instant>);

impl ThreadNames {
    /// The names of the threads in `tids` not read in the last second, read now (while the
    /// process runs); at most [`NAMES_PER_MESSAGE`] reads, so that a stream of made-up tids
    /// costs little.
    fn due(&mut self, process: &Process, tids: &[u32]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut reads = 0;
        for &tid in tids {
            if reads >= NAMES_PER_MESSAGE {
                break;
            }
            if self
                .0
                .get(&tid)
                .is_some_and(|at| at.elapsed() < RENAME_CHECK)
            {
                continue;
            }
            if self.0.len() >= MAX_NAMED_THREADS && !self.0.contains_key(&tid) {
                if let Some(oldest) = self.0.iter().min_by_key(|(_, at)| **at).map(|(t, _)| *t) {
                    self.0.remove(&oldest);
                }
            }
            self.0.insert(tid, Instant::now());
            reads += 1;
            if let Some(name) = process.thread_name(tid) {
                out.push((tid, name));
            }
        }
        out
    }
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

    /// A `sleep 30` that has exec'd (its name is "sleep").
    fn sleeper() -> std::process::Child {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let comm = format!("/proc/{}/comm", child.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&comm).unwrap_or_default() != "sleep\n" {
            assert!(std::time::Instant::now() < deadline, "sleep did not start");
            std::thread::sleep(Duration::from_millis(1));
        }
        child
    }

    /// A process is held by its pidfd: its files are readable while it runs, and its end
    /// is seen.
    #[test]
    fn a_process_is_followed_by_its_pidfd() {
        let mut child = sleeper();
        let p = Process::of_pid(child.id()).unwrap();
        assert!(!p.exited());
        assert!(p.rss_bytes().is_some_and(|r| r > 0));
        assert_eq!(p.thread_name(child.id()).as_deref(), Some(&b"sleep"[..]));
        child.kill().unwrap();
        assert!(p.wait(5000));
        let _ = child.wait();
        assert!(p.rss_bytes().is_none(), "a reaped process's files are gone");
    }

    /// Without SO_PEERPIDFD the pid SO_PEERCRED gave is opened, and taken only if it
    /// still has the start time it had when the process connected.
    #[test]
    fn without_so_peerpidfd_the_pid_is_checked_by_its_start_time() {
        let mut child = sleeper();
        let pid = child.id();
        let started = crate::ingest::start_time(pid);
        assert!(started.is_some());
        let no_option = || Err(Error::from_raw_os_error(libc::ENOPROTOOPT));
        let p = Process::from_peer_pidfd(no_option(), Some((pid, started))).unwrap();
        assert_eq!(p.pid, pid);
        assert!(!p.exited());
        assert_eq!(p.thread_name(pid).as_deref(), Some(&b"sleep"[..]));
        // Another process under the same pid (a later start time) is not taken.
        let other =
            Process::from_peer_pidfd(no_option(), Some((pid, started.map(|t| t + 1)))).unwrap();
        assert!(other.exited(), "a reused pid counts as the process gone");
        assert!(
            other.thread_name(pid).is_none(),
            "and nothing is read from /proc"
        );
        // Nothing to go by at all is an error.
        assert!(Process::from_peer_pidfd(no_option(), None).is_err());
        child.kill().unwrap();
        let _ = child.wait();
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

    /// A region found in the process's memory (a re-attach without a descriptor) is taken
    /// only if it is the file its maps line names, belongs to the process's user, and its
    /// header names the process.
    #[test]
    fn a_region_found_in_memory_must_be_the_processs_own() {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (a, _b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (_memfd, m) = crate::death_read::tests::region_and_memfd();
        let me = std::process::id();
        let info = RegionInfo {
            version: SHARED_VERSION,
            size: SHARED_SIZE as u64,
            address: m.as_ptr() as u64,
        };
        let no_fd = || Datagram {
            len: 0,
            fd: None,
            fds: 0,
        };
        let take = |uid| Attached::new(a.as_fd(), &info, no_fd(), Some((me, None)), Some(uid));
        // The header names pid 0, not us.
        let e = take(0).unwrap_err();
        assert!(format!("{e:#}").contains("belongs to process 0"), "{e:#}");
        crate::death_read::tests::shared(&m)
            .header
            .pid
            .store(me, Ordering::Release);
        let taken = take(0).unwrap();
        assert_eq!(taken.file(), m.file);
        // The memfd is root's (the tests run as root); a process of another user that
        // mapped it does not get it taken for its region.
        let e = take(65534).unwrap_err();
        assert!(
            format!("{e:#}").contains("belongs to user 0, not to the process's user 65534"),
            "{e:#}"
        );
        assert_eq!(
            parse_maps_file(b"7f00-7f01 rw-s 00000000 00:01 12345 /memfd:x (deleted)"),
            Some((0, 1, 12345))
        );
        assert_eq!(parse_maps_file(b"7f00-7f01 rw-s 00000000"), None);
    }

    /// A mapping is re-opened through map_files only if the process has it shared and
    /// writable.
    #[test]
    fn map_files_opens_only_shared_writable_mappings() {
        let fd = memfd(8192, SEALED);
        let shared = Mapping::of_memfd(fd.as_fd(), 8192).unwrap();
        let me = Process::of_pid(std::process::id()).unwrap();
        let again = me.open_map_file(shared.as_ptr() as u64, 8192, 0).unwrap();
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
        let e = me.open_map_file(ro as u64, 8192, 0).unwrap_err();
        assert!(
            format!("{e:#}").contains("not shared and writable"),
            "{e:#}"
        );
        assert!(
            me.open_map_file(ro as u64, 4096, 0).is_err(),
            "only the exact range"
        );
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(ro, 8192) };
        // A shared writable mapping of a file that is not a memfd is never opened read-write.
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        file.set_len(8192).unwrap();
        // SAFETY: mapping a valid descriptor at an address of the kernel's choice.
        let rw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(rw, libc::MAP_FAILED);
        let e = me.open_map_file(rw as u64, 8192, 0).unwrap_err();
        assert!(format!("{e:#}").contains("not a memfd"), "{e:#}");
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(rw, 8192) };
    }
    use crate::death_read::tests::{put_bucket, put_sample, region, shared};
    use crate::ingest::Session;
    use anyprof_wire::shared::{message_write, pop_command, SAMPLE_READY};

    fn hello(pid: u32) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        let n = wire::encode_hello(
            &mut buf,
            &wire::HelloInfo {
                pid,
                ppid: 1,
                cpu_hz: 100,
                timer: wire::TimerKind::ThreadCpuTimer,
                mem_rate: 1,
                start_realtime_ns: 1,
                start_monotonic_ns: 2,
                exe: b"/bin/test",
                cmdline: b"test",
            },
        )
        .unwrap();
        buf.truncate(n);
        buf
    }

    fn samples(tid: u32, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut batch = wire::SampleBatch::new(&mut buf);
        for i in 0..n {
            assert!(batch.push(tid, 0, i as u64, 1, &[0x1000 + i as u64]));
        }
        let len = batch.len();
        buf.truncate(len);
        buf
    }

    /// Runs the pump of `attached` on a thread; returns the session and the pump's thread.
    fn start(
        attached: Attached,
        link: &Link,
    ) -> (SharedSession, std::thread::JoinHandle<Vec<String>>) {
        let session: SharedSession = Arc::new(Mutex::new(Session::default()));
        let (s, l) = (session.clone(), link.clone());
        let t = std::thread::spawn(move || {
            let mut logged = Vec::new();
            pump(attached, &s, &l, false, &mut |_, _, text| {
                logged.push(text.to_owned())
            });
            logged
        });
        (session, t)
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The pump applies what the process writes into its ring, tells it we are here, reads
    /// its threads' names itself, and when the process is killed reads what it left.
    #[test]
    fn the_pump_reads_the_ring_then_the_remains_of_a_killed_process() {
        let mut child = sleeper();
        let pid = child.id();
        let attached = Attached {
            mapping: region(),
            process: Process::of_pid(pid).unwrap(),
        };
        let ptr = attached.shared() as *const Shared as usize;
        // SAFETY: the mapping lives while the pump holds `attached` (until the test ends
        // the pump below; the pointer is not used after that).
        let s: &Shared = unsafe { &*(ptr as *const Shared) };
        assert!(message_write(&s.messages, &hello(pid)));
        assert!(message_write(&s.messages, &samples(pid, 3)));
        let link = Link::default();
        let (session, pump) = start(attached, &link);
        wait_for("the ring to be read", || {
            session.lock().unwrap().cpu.len() == 3 && message_ring_empty(&s.messages)
        });
        wait_for("the collector to say it is here", || {
            s.header.collector_seen_ms.load(Ordering::Acquire) != 0
        });
        assert_eq!(
            session
                .lock()
                .unwrap()
                .thread_names
                .get(&pid)
                .map(String::as_str),
            Some("sleep"),
            "names are read from /proc/PID/task/TID/comm"
        );
        // Commands reach the command ring.
        let region = link.channel.region().unwrap();
        region.command(Command::CpuStart(99)).unwrap();
        assert_eq!(pop_command(&s.commands), Some(Command::CpuStart(99)));
        // The process is killed with a sample and a live bucket that it never sent.
        put_sample(s, 5, SAMPLE_READY, pid, &[0xdead], 1);
        put_bucket(s, 0, 3, 1 << 20, &[0xbeef], 64);
        drop(region);
        child.kill().unwrap();
        let logged = pump.join().unwrap();
        let _ = child.wait();
        let session = session.lock().unwrap();
        assert_eq!(session.cpu.len(), 4);
        assert!(session.cpu.keys().any(|k| k.frames == [0xdead]));
        assert!(session.read_at_death);
        let b = &session.heap[&3];
        assert_eq!(b.counts.alloc_bytes - b.counts.free_bytes, 64 << 20);
        assert!(
            logged
                .iter()
                .any(|l| l.contains("1 samples, 1 heap buckets")),
            "{logged:?}"
        );
        assert!(link.channel.region().is_none(), "unmapped at the end");
    }

    /// A ring holding values the writer never writes ends the session with one message.
    #[test]
    fn a_corrupt_ring_ends_the_session_with_a_message() {
        let attached = Attached {
            mapping: region(),
            process: Process::of_pid(std::process::id()).unwrap(),
        };
        let s = attached.shared();
        assert!(message_write(&s.messages, &hello(1)));
        s.messages.head.store(u64::MAX - 7, Ordering::Release);
        let (session, pump) = start(attached, &Link::default());
        let logged = pump.join().unwrap();
        let error = session.lock().unwrap().error.clone().unwrap_or_default();
        assert!(error.contains("message ring corrupt"), "{error}");
        assert_eq!(logged.len(), 1, "{logged:?}");
        assert!(logged[0].contains("no longer profiled: message ring corrupt"));
    }

    /// A process that has ended but whose memfd some other process keeps writing cannot
    /// keep the pump reading for ever.
    #[test]
    fn a_ring_written_after_the_end_is_read_a_bounded_amount() {
        let (memfd, mapping) = crate::death_read::tests::region_and_memfd();
        // The "other process": a second mapping of the memfd, which outlives the pump's.
        let other = Mapping::of_memfd(memfd.as_fd(), SHARED_SIZE).unwrap();
        let attached = Attached {
            mapping,
            process: Process {
                pid: 1,
                pidfd: None,
                proc_dir: None,
            },
        };
        assert!(attached.process.exited());
        // Log messages of exactly 1 KiB of ring each: every one read makes room for one.
        let line = {
            let mut buf = vec![0u8; 2048];
            let n = wire::encode_log(&mut buf, Level::Info, &[b'x'; 1003]).unwrap();
            buf.truncate(n);
            buf
        };
        assert_eq!(RECORD_HEADER + line.len(), 1024);
        while message_write(&shared(&other).messages, &line) {}
        // Each line the pump passes on is answered by one more written behind it (the
        // process prints its first 1000 lines): the ring never runs dry by itself.
        let session: SharedSession = Arc::new(Mutex::new(Session::default()));
        let mut refills = 0;
        pump(
            attached,
            &session,
            &Link::default(),
            false,
            &mut |_, _, _| {
                refills += 1;
                assert!(message_write(&shared(&other).messages, &line));
            },
        );
        assert!(refills >= 1000);
        let error = session.lock().unwrap().error.clone().unwrap_or_default();
        assert!(error.contains("still being written"), "{error}");
    }

    /// A process whose region is refused retries every second; it is told once a minute.
    #[test]
    fn refusals_are_told_once_a_minute_per_pid() {
        let r = Registry::default();
        assert!(r.may_warn(5));
        assert!(!r.may_warn(5));
        assert!(r.may_warn(6));
    }

    /// A message that does not decode ends the session as over the socket.
    #[test]
    fn a_bad_message_in_the_ring_ends_the_session() {
        let attached = Attached {
            mapping: region(),
            process: Process::of_pid(std::process::id()).unwrap(),
        };
        assert!(message_write(&attached.shared().messages, b"not a message"));
        let (session, pump) = start(attached, &Link::default());
        pump.join().unwrap();
        assert!(session.lock().unwrap().error.is_some());
    }

    /// A process that finished its last flush ends its session once the ring is empty;
    /// one that exec'd (a newer region from its pid) ends its predecessor's after a death
    /// read; the same image attached again ends the old pump without one.
    #[test]
    fn sessions_end_on_finish_exec_and_reattach() {
        let me = std::process::id();
        let link = Link::default();
        let old = Attached {
            mapping: region(),
            process: Process::of_pid(me).unwrap(),
        };
        put_sample(old.shared(), 0, SAMPLE_READY, 1, &[0x42], 1);
        let (old_session, old_pump) = start(old, &link);
        wait_for("the first pump to register", || {
            link.channel.region().is_some()
        });
        // exec: a new image of the same pid maps another memfd.
        let link2 = Link {
            registry: link.registry.clone(),
            ..Link::default()
        };
        let new = Attached {
            mapping: region(),
            process: Process::of_pid(me).unwrap(),
        };
        let new_ptr = new.shared() as *const Shared as usize;
        let (_, new_pump) = start(new, &link2);
        old_pump.join().unwrap();
        assert!(
            old_session
                .lock()
                .unwrap()
                .cpu
                .keys()
                .any(|k| k.frames == [0x42]),
            "the old image's remains were read"
        );
        // The same image re-attached on a third connection replaces the second pump.
        let again_file = {
            let r = link2.channel.region().unwrap();
            r.process
                .open_map_file(new_ptr as u64, SHARED_SIZE as u64, 0)
                .unwrap()
        };
        let link3 = Link {
            registry: link.registry.clone(),
            ..Link::default()
        };
        let again = Attached {
            mapping: Mapping::of_memfd(again_file.as_fd(), SHARED_SIZE).unwrap(),
            process: Process::of_pid(me).unwrap(),
        };
        let s3 = again.shared() as *const Shared as usize;
        // SAFETY: a sample in the third mapping, which the third pump keeps alive.
        put_sample(
            unsafe { &*(s3 as *const Shared) },
            1,
            SAMPLE_READY,
            1,
            &[0x43],
            1,
        );
        let (third_session, third_pump) = start(again, &link3);
        new_pump.join().unwrap();
        // A replaced pump does no death read: the slot is still there for the live one.
        // The process says it finished but lives on (this test process): the third pump
        // ends after a second, without a death read (a hostile process could otherwise have
        // its region read again and again).
        // SAFETY: as above.
        let s3 = unsafe { &*(s3 as *const Shared) };
        let finished_at = Instant::now();
        s3.header.finished.store(FINISHED, Ordering::Release);
        third_pump.join().unwrap();
        assert!(finished_at.elapsed() >= Duration::from_millis(FINISHED_EXIT_WAIT_MS as u64));
        assert!(
            !third_session
                .lock()
                .unwrap()
                .cpu
                .keys()
                .any(|k| k.frames == [0x43]),
            "a live process is not read at death"
        );
    }

    /// A process that finished its last flush and then exits (within the second it is
    /// given) is read at death.
    #[test]
    fn a_finished_process_that_exits_is_read() {
        let mut child = sleeper();
        let attached = Attached {
            mapping: region(),
            process: Process::of_pid(child.id()).unwrap(),
        };
        let s = attached.shared();
        put_sample(s, 2, SAMPLE_READY, 1, &[0x44], 1);
        s.header.finished.store(FINISHED, Ordering::Release);
        let (session, pump) = start(attached, &Link::default());
        std::thread::sleep(Duration::from_millis(200));
        child.kill().unwrap();
        let _ = child.wait();
        pump.join().unwrap();
        assert!(session
            .lock()
            .unwrap()
            .cpu
            .keys()
            .any(|k| k.frames == [0x44]));
    }

    /// A collector on a socket of its own (two `Collector::start` in one second of one
    /// process would pick the same directory).
    fn collector() -> (tempfile::TempDir, crate::collect::Collector) {
        let dir = tempfile::tempdir().unwrap();
        let c = crate::collect::Collector::listen_at(
            dir.path().join("sock"),
            crate::collect::Options {
                hello_timeout: Some(Duration::from_secs(5)),
                ..Default::default()
            },
        )
        .unwrap();
        (dir, c)
    }

    /// The whole hand-over over a real socket: Region with the memfd, hello, close; then
    /// the ring; then a re-attach without a descriptor (map_files).
    #[test]
    fn a_process_hands_over_its_region_through_the_collector() {
        use nix::sys::socket::{
            connect, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
            UnixAddr,
        };
        let (_dir, collector) = collector();
        let me = std::process::id();
        let mapping = region();
        let s = shared(&mapping);
        s.header.pid.store(me, Ordering::Release); // as the preload does
        let mut buf = [0u8; 64];
        let info = RegionInfo {
            version: SHARED_VERSION,
            size: SHARED_SIZE as u64,
            address: mapping.as_ptr() as u64,
        };
        let n = anyprof_wire::shared::encode_region(&mut buf, &info).unwrap();
        let memfd_of = |m: &Mapping| {
            Process::of_pid(me)
                .unwrap()
                .open_map_file(m.as_ptr() as u64, SHARED_SIZE as u64, 0)
                .unwrap()
        };
        let hand_over = |with_fd: bool| {
            let sock = socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            connect(
                sock.as_raw_fd(),
                &UnixAddr::new(collector.socket_path()).unwrap(),
            )
            .unwrap();
            let memfd = memfd_of(&mapping);
            let fds = [memfd.as_raw_fd()];
            let cmsgs = [ControlMessage::ScmRights(&fds)];
            let iov = [std::io::IoSlice::new(&buf[..n])];
            let cmsgs: &[ControlMessage] = if with_fd { &cmsgs } else { &[] };
            sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
            let h = hello(me);
            let iov = [std::io::IoSlice::new(&h)];
            sendmsg::<()>(sock.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).unwrap();
            // Both closed at once: no descriptor of ours stays in the process.
        };
        hand_over(true);
        assert!(message_write(&s.messages, &samples(me, 2)));
        wait_for("the process to be listed", || {
            collector.processes().iter().any(|p| p.pid == me)
        });
        wait_for("the ring to be read", || message_ring_empty(&s.messages));
        collector.command(me, Command::CpuStop).unwrap();
        assert_eq!(pop_command(&s.commands), Some(Command::CpuStop));
        // The collector restarts in the process's eyes: it re-attaches without a descriptor.
        hand_over(false);
        assert!(message_write(&s.messages, &samples(me, 5)));
        wait_for("the ring to be read again", || {
            message_ring_empty(&s.messages)
        });
        s.header.finished.store(FINISHED, Ordering::Release);
        let sessions = collector.finish(me, Duration::from_secs(5));
        assert_eq!(sessions.len(), 1, "one image: sessions merged");
        let session = &sessions[0];
        assert_eq!(session.error, None);
        assert_eq!(session.cpu.values().map(|t| t.count).sum::<u64>(), 7);
        assert!(session.closed_at.is_some());
        assert!(
            !session.read_at_death,
            "it finished: nothing was read at its death"
        );
    }
    /// A short program sends its region and hello, writes everything into its ring and
    /// exits before the collector has even looked: all of it is still read, from the
    /// memfd, without the process.
    #[test]
    fn a_process_gone_before_it_is_attached_is_read_from_its_memfd() {
        let (_dir, collector) = collector();
        let (memfd, mapping) = crate::death_read::tests::region_and_memfd();
        let s = shared(&mapping);
        // The child's pid is not known before the fork: the hello's pid is replaced by the
        // kernel's anyway.
        assert!(message_write(&s.messages, &hello(1)));
        assert!(message_write(&s.messages, &samples(7, 3)));
        put_sample(s, 3, SAMPLE_READY, 7, &[0x99], 1);
        let mut region_msg = [0u8; 64];
        let n = anyprof_wire::shared::encode_region(
            &mut region_msg,
            &RegionInfo {
                version: SHARED_VERSION,
                size: SHARED_SIZE as u64,
                address: 0,
            },
        )
        .unwrap();
        let hello_msg = hello(1);
        // Everything the child needs is built before the fork: it only makes system calls.
        let path = collector
            .socket_path()
            .as_os_str()
            .as_encoded_bytes()
            .to_vec();
        // SAFETY: an all-zero sockaddr_un is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, b) in addr.sun_path.iter_mut().zip(&path) {
            *d = *b as libc::c_char;
        }
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(4) } as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: region_msg.as_mut_ptr().cast(),
            iov_len: n,
        };
        // SAFETY: an all-zero msghdr is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds one header with room for one descriptor.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            libc::CMSG_DATA(c)
                .cast::<i32>()
                .write_unaligned(memfd.as_raw_fd());
        }
        // SAFETY: the child only makes async-signal-safe system calls on data prepared
        // above, then _exits.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: as above.
            unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0
                    || libc::sendmsg(fd, &msg, 0) < 0
                    || libc::send(fd, hello_msg.as_ptr().cast(), hello_msg.len(), 0) < 0
                {
                    libc::_exit(1);
                }
                libc::_exit(0);
            }
        }
        assert!(child > 0);
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert_eq!(status, 0, "the child handed its region over");
        let sessions = collector.finish(child as u32, Duration::from_secs(10));
        assert_eq!(sessions.len(), 1);
        let session = &sessions[0];
        assert_eq!(session.error, None);
        assert_eq!(session.pid(), Some(child as u32));
        assert_eq!(session.cpu.len(), 4, "3 from the ring, 1 from a ready slot");
    }
}
