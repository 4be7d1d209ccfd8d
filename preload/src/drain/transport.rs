//! The transport to the collector (background thread and constructor world; may allocate
//! and do I/O): the hand-over of the shared region and the message ring.
//!
//! **Hand-over.** [`connect`] checks and connects to the collector's socket; [`handshake`]
//! sends one [`anyprof_wire::Kind::Region`] datagram carrying the region's memfd
//! (`SCM_RIGHTS`), then the hello, and closes the socket at once: no reply is awaited, and from then on no descriptor
//! of ours exists in the process (issue 13). Every send is `MSG_DONTWAIT | MSG_NOSIGNAL`; a
//! full backlog means "not profiled this time".
//!
//! **Stream.** Every message after the hello is written into the message ring of the shared
//! region ([`send`]); a full ring drops the message (counted by the caller); nothing waits
//! except the last flush at exit, for at most [`EXIT_PATIENCE`].
//!
//! **Collector presence.** The collector writes `collector_seen_ms` each time it polls. In
//! serve mode, a value older than 3 s (or none 2 s after the hand-over) means the daemon is
//! gone ([`collector_present`]).

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyprof_wire::shared::{self as shm, RegionInfo, SHARED_SIZE, SHARED_VERSION};

use crate::log;
use crate::region::SHARED;

/// The connected socket (-1 = none).
static SOCKET: AtomicI32 = AtomicI32::new(-1);
/// Device and inode of our socket: programs that close every descriptor (daemons do) may
/// close ours and reuse the number; before each use we check it is still the same socket.
static SOCKET_IDENTITY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn identity(fd: libc::c_int) -> Option<u64> {
    // SAFETY: a zeroed stat is a valid out-buffer for fstat.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: fstat on any descriptor number is harmless; `st` is valid.
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    Some(st.st_ino ^ st.st_dev.rotate_left(40))
}

/// Our socket, if the descriptor still refers to it; otherwise forgets it without closing
/// (the number now belongs to the program).
fn our_socket() -> Option<libc::c_int> {
    let fd = SOCKET.load(Ordering::Acquire);
    if fd < 0 {
        return None;
    }
    if identity(fd) == Some(SOCKET_IDENTITY.load(Ordering::Acquire)) {
        Some(fd)
    } else {
        SOCKET.store(-1, Ordering::Release);
        None
    }
}

/// Lowest descriptor number our socket is moved to.
const HIGH_FD: libc::c_int = 800;

/// Whom the library may talk to: root always, and the uid the process started with unless
/// it runs with secure execution (then `own_uid` is `None`: root only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trust {
    /// The process's own effective uid at library start, if trusted.
    pub own_uid: Option<u32>,
}

impl Trust {
    fn allows(self, uid: u32) -> bool {
        uid == 0 || Some(uid) == self.own_uid
    }

    fn describe(self) -> String {
        match self.own_uid {
            Some(0) | None => "root".into(),
            Some(uid) => format!("root or uid {uid} (this process)"),
        }
    }
}

/// Owner and mode of a file, as `lstat` found them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileFacts {
    kind: libc::mode_t,
    mode: libc::mode_t,
    uid: u32,
    dev: u64,
    ino: u64,
}

/// Why a socket is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Refusal {
    NotSocket,
    SocketOwner(u32),
    DirNotDirectory,
    DirOwner(u32),
    DirWritable(libc::mode_t),
    Peer(Option<u32>),
    Replaced,
}

impl Refusal {
    fn describe(&self, trust: Trust) -> String {
        let who = trust.describe();
        match self {
            Refusal::NotSocket => "it is not a socket".into(),
            Refusal::SocketOwner(uid) => format!("the socket is owned by uid {uid}, not {who}"),
            Refusal::DirNotDirectory => "its directory is not a directory (a symlink?)".into(),
            Refusal::DirOwner(uid) => {
                format!("its directory is owned by uid {uid}, not {who}")
            }
            Refusal::DirWritable(mode) => format!(
                "its directory (mode {mode:o}) is writable by group or others, who could put \
                 their own socket there; use a directory only {who} can write to"
            ),
            Refusal::Peer(Some(uid)) => {
                format!("the process listening on it runs as uid {uid}, not {who}")
            }
            Refusal::Peer(None) => "the listening process's credentials are unknown".into(),
            Refusal::Replaced => "the socket file was replaced while connecting".into(),
        }
    }
}

fn lstat(path: &std::ffi::CStr) -> Result<FileFacts, i32> {
    // SAFETY: a zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` valid.
    if unsafe { libc::lstat(path.as_ptr(), &mut st) } != 0 {
        return Err(crate::signal::sys::errno());
    }
    Ok(FileFacts {
        kind: st.st_mode & libc::S_IFMT,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// The rules for a socket file and the directory it is in: the socket is owned by someone
/// we trust, and so is its directory, which nobody else can write to (a sticky
/// world-writable directory like /tmp is not enough: anyone could have created the name
/// first).
fn judge(socket: FileFacts, dir: FileFacts, trust: Trust) -> Result<(), Refusal> {
    if socket.kind != libc::S_IFSOCK {
        return Err(Refusal::NotSocket);
    }
    if !trust.allows(socket.uid) {
        return Err(Refusal::SocketOwner(socket.uid));
    }
    if dir.kind != libc::S_IFDIR {
        return Err(Refusal::DirNotDirectory);
    }
    if !trust.allows(dir.uid) {
        return Err(Refusal::DirOwner(dir.uid));
    }
    if dir.mode & 0o022 != 0 {
        return Err(Refusal::DirWritable(dir.mode));
    }
    Ok(())
}

/// Checks `path` and its directory; the socket's identity on success. `Err(None)` when it
/// does not exist (or cannot be examined): simply unreachable.
fn inspect(path: &Path, trust: Trust) -> Result<FileFacts, Option<Refusal>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| None);
    let socket = lstat(&c(path)?).map_err(|_| None)?;
    let dir = lstat(&c(dir)?).map_err(|_| None)?;
    judge(socket, dir, trust).map_err(Some)?;
    Ok(socket)
}

/// The uid of the process at the other end of a connected Unix socket.
fn peer_uid(fd: libc::c_int) -> Option<u32> {
    // SAFETY: a zeroed ucred is a valid out-buffer.
    let mut cred: libc::ucred = unsafe { core::mem::zeroed() };
    let mut len = core::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt with a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize == core::mem::size_of::<libc::ucred>()).then_some(cred.uid)
}

/// Refusals already reported (one warning per socket and reason, not one per retry).
static WARNED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn warn_refusal(path: &Path, refusal: &Refusal, trust: Trust) {
    let text = format!(
        "not connecting to {}: {}",
        path.display(),
        refusal.describe(trust)
    );
    let _section = crate::fork::section();
    let first = WARNED.lock().is_ok_and(|mut w| {
        if w.contains(&text) || w.len() >= 16 {
            false
        } else {
            w.push(text.clone());
            true
        }
    });
    if first {
        log::message(anyprof_wire::Level::Warn, text);
    }
}

/// Connects to the collector's socket at `path`, after checking whom it belongs to: the
/// socket file and its directory before and after `connect` ([`judge`]), and the peer's
/// credentials (`SO_PEERCRED`) — each must be root or, unless [`Trust::own_uid`] is `None`,
/// our own uid. A socket that fails a check is closed and treated as unreachable, with one
/// warning naming the path and the owner found. Returns the errno on failure (`EPERM` for a
/// refused socket).
pub fn connect(path: &Path, trust: Trust) -> Result<(), i32> {
    let before = match inspect(path, trust) {
        Ok(facts) => facts,
        Err(None) => return Err(libc::ENOENT),
        Err(Some(refusal)) => {
            warn_refusal(path, &refusal, trust);
            return Err(libc::EPERM);
        }
    };
    let fd = connect_unverified(path)?;
    let verdict = match (peer_uid(fd), inspect(path, trust)) {
        (Some(uid), _) if !trust.allows(uid) => Err(Refusal::Peer(Some(uid))),
        (None, _) => Err(Refusal::Peer(None)),
        (_, Ok(after)) if (after.dev, after.ino) == (before.dev, before.ino) => Ok(()),
        (_, Err(Some(refusal))) => Err(refusal),
        (_, _) => Err(Refusal::Replaced),
    };
    if let Err(refusal) = verdict {
        close(fd);
        warn_refusal(path, &refusal, trust);
        return Err(libc::EPERM);
    }
    adopt(fd);
    Ok(())
}

/// Connects without any check; the new descriptor.
fn connect_unverified(path: &Path) -> Result<libc::c_int, i32> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(crate::signal::sys::errno());
    }
    // SAFETY: a zeroed sockaddr_un is valid; we fill family and path.
    let mut addr: libc::sockaddr_un = unsafe { core::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        close(fd);
        return Err(libc::ENAMETOOLONG);
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = core::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes.
    let rc = unsafe {
        libc::connect(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        let err = crate::signal::sys::errno();
        close(fd);
        return Err(err);
    }
    Ok(fd)
}

/// Makes a connected, verified descriptor our socket.
fn adopt(fd: libc::c_int) {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own.
    let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, HIGH_FD) };
    let fd = if high >= 0 {
        close(fd);
        high
    } else {
        fd
    };
    // A bigger send buffer rides out a slow collector for longer before anything is dropped.
    let size: libc::c_int = 1 << 20;
    // SAFETY: setsockopt with a valid int; failure just keeps the default size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &size as *const libc::c_int as *const libc::c_void,
            core::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    SOCKET_IDENTITY.store(identity(fd).unwrap_or(0), Ordering::Release);
    SOCKET.store(fd, Ordering::Release);
}

fn close(fd: libc::c_int) {
    // SAFETY: closing a descriptor we own.
    unsafe { libc::close(fd) };
}

/// Closes our socket (after the hand-over; in a forked child: the parent's).
pub fn forget_connection() {
    if let Some(fd) = our_socket() {
        SOCKET.store(-1, Ordering::Release);
        close(fd);
    }
}

/// The uid of the collector at the other end of our socket, if connected.
pub fn collector_uid() -> Option<u32> {
    our_socket().and_then(peer_uid)
}

/// Sends one datagram on our socket, with `pass` attached as `SCM_RIGHTS` if given. Never
/// blocks, never raises SIGPIPE.
fn send_datagram(msg: &[u8], pass: Option<libc::c_int>) -> bool {
    let Some(fd) = our_socket() else {
        return false;
    };
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: msg.len(),
    };
    // Room for one descriptor's control message, 8-aligned.
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr is valid; we fill the fields we use.
    let mut hdr: libc::msghdr = unsafe { core::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if let Some(pass) = pass {
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
        let (space, len) = unsafe {
            (
                libc::CMSG_SPACE(core::mem::size_of::<libc::c_int>() as u32) as usize,
                libc::CMSG_LEN(core::mem::size_of::<libc::c_int>() as u32) as usize,
            )
        };
        if space > core::mem::size_of_val(&control) {
            return false;
        }
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = space;
        // SAFETY: msg_control points to `space` bytes of 8-aligned storage, enough for one
        // cmsghdr and one int (checked above), so CMSG_FIRSTHDR is non-null and in bounds.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            if cmsg.is_null() {
                return false;
            }
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = len;
            libc::CMSG_DATA(cmsg)
                .cast::<libc::c_int>()
                .write_unaligned(pass);
        }
    }
    loop {
        // SAFETY: `hdr` points to valid iovec and control buffers that outlive the call.
        let rc = unsafe { libc::sendmsg(fd, &hdr, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if rc >= 0 {
            return rc as usize == msg.len();
        }
        if crate::signal::sys::errno() != libc::EINTR {
            return false;
        }
    }
}

/// CLOCK_MONOTONIC ms of the last hand-over to a collector; 0 = none, or it is gone.
static ATTACHED_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// A collector that has not polled the region for this long is gone (serve mode).
const SEEN_TIMEOUT_MS: u64 = 3000;
/// A collector that has not polled the region this long after the hand-over never will.
const FIRST_SEEN_GRACE_MS: u64 = 2000;

fn monotonic_ms() -> u64 {
    crate::signal::sys::monotonic_ns() / 1_000_000
}

/// True once a collector was given the region (and, in serve mode, not found gone since).
pub fn attached() -> bool {
    ATTACHED_MS.load(Ordering::Acquire) != 0
}

/// True while the collector given the region keeps polling it.
pub fn collector_present() -> bool {
    let at = ATTACHED_MS.load(Ordering::Acquire);
    if at == 0 {
        return false;
    }
    let now = monotonic_ms();
    match SHARED.header.collector_seen_ms.load(Ordering::Acquire) {
        0 => now.saturating_sub(at) < FIRST_SEEN_GRACE_MS,
        seen => now.saturating_sub(seen) <= SEEN_TIMEOUT_MS,
    }
}

/// Forgets the collector (serve mode, when it stopped polling).
pub fn detach() {
    ATTACHED_MS.store(0, Ordering::Release);
}

/// Hands the region to the collector on our (just connected) socket: a
/// [`anyprof_wire::Kind::Region`] datagram carrying `memfd` (none on a re-attach to a root daemon, which opens
/// `/proc/PID/map_files/…` itself), then `hello`; then closes the socket whatever happened.
/// True if both were sent.
pub fn handshake(memfd: Option<libc::c_int>, hello: &[u8]) -> bool {
    let mut buf = [0u8; 64];
    let info = RegionInfo {
        version: SHARED_VERSION,
        size: SHARED_SIZE as u64,
        address: crate::region::address(),
    };
    let sent = match shm::encode_region(&mut buf, &info) {
        Some(n) => send_datagram(buf.get(..n).unwrap_or(&[]), memfd) && send_datagram(hello, None),
        None => false,
    };
    forget_connection();
    if sent {
        ATTACHED_MS.store(monotonic_ms().max(1), Ordering::Release);
    }
    sent
}

/// How long a process may wait, in all, for room on the socket at exit (a stopped or slow
/// collector then costs the program at most this much, once).
const EXIT_PATIENCE: Duration = Duration::from_millis(100);
/// When patient sends must give up (set by the first one).
static PATIENCE_DEADLINE: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);

/// The shared deadline of every patient send: set by the first one.
fn patience_deadline() -> Instant {
    let Ok(mut d) = PATIENCE_DEADLINE.lock() else {
        return Instant::now();
    };
    *d.get_or_insert_with(|| Instant::now() + EXIT_PATIENCE)
}

/// Writes one message into the shared region's message ring. `patient` (only at exit)
/// allows waiting for the collector to make room, all patient sends together at most
/// [`EXIT_PATIENCE`], and only while it keeps polling. Returns false if it was not written
/// (no collector was given the region, or the ring is full).
pub fn send(msg: &[u8], patient: bool) -> bool {
    if !attached() {
        return false;
    }
    let ring = &SHARED.messages;
    if shm::message_write(ring, msg) {
        return true;
    }
    if !patient {
        return false;
    }
    let deadline = patience_deadline();
    while Instant::now() < deadline && collector_present() {
        std::thread::sleep(Duration::from_millis(1));
        if shm::message_write(ring, msg) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(kind: libc::mode_t, mode: libc::mode_t, uid: u32) -> FileFacts {
        FileFacts {
            kind,
            mode,
            uid,
            dev: 1,
            ino: 2,
        }
    }
    const SOCK: libc::mode_t = libc::S_IFSOCK;
    const DIR: libc::mode_t = libc::S_IFDIR;
    const ME: Trust = Trust {
        own_uid: Some(1000),
    };
    const ROOT_ONLY: Trust = Trust { own_uid: None };

    #[test]
    fn sockets_of_root_or_our_own_uid_in_private_directories_are_used() {
        for (sock_uid, dir_uid, dir_mode) in [(0, 0, 0o755), (1000, 1000, 0o700), (1000, 0, 0o755)]
        {
            let verdict = judge(
                facts(SOCK, 0o666, sock_uid),
                facts(DIR, dir_mode, dir_uid),
                ME,
            );
            assert_eq!(verdict, Ok(()), "{sock_uid} {dir_uid} {dir_mode:o}");
        }
        assert_eq!(
            judge(facts(SOCK, 0o666, 0), facts(DIR, 0o755, 0), ROOT_ONLY),
            Ok(())
        );
    }

    #[test]
    fn squatted_or_exposed_sockets_are_refused() {
        let ok_dir = facts(DIR, 0o700, 1000);
        assert_eq!(
            judge(facts(SOCK, 0o666, 65534), ok_dir, ME),
            Err(Refusal::SocketOwner(65534))
        );
        assert_eq!(
            judge(facts(libc::S_IFREG, 0o666, 1000), ok_dir, ME),
            Err(Refusal::NotSocket)
        );
        // /tmp: root's, but sticky and world-writable.
        assert_eq!(
            judge(facts(SOCK, 0o666, 1000), facts(DIR, 0o1777, 0), ME),
            Err(Refusal::DirWritable(0o1777))
        );
        assert_eq!(
            judge(facts(SOCK, 0o666, 1000), facts(DIR, 0o700, 65534), ME),
            Err(Refusal::DirOwner(65534))
        );
        assert_eq!(
            judge(
                facts(SOCK, 0o666, 1000),
                facts(libc::S_IFLNK, 0o777, 1000),
                ME
            ),
            Err(Refusal::DirNotDirectory)
        );
        // Secure execution: our own uid is not enough.
        assert_eq!(
            judge(facts(SOCK, 0o666, 1000), facts(DIR, 0o755, 0), ROOT_ONLY),
            Err(Refusal::SocketOwner(1000))
        );
        assert!(!ROOT_ONLY.allows(1000) && ROOT_ONLY.allows(0) && ME.allows(1000));
    }
}
