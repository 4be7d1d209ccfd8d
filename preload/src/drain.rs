//! The only part of the preload that does I/O: the hand-over of the shared region to the
//! collector, and the background thread that feeds it.
//!
//! **Hand-over.** [`connect`] checks and connects to the collector's socket; [`handshake`]
//! sends one [`Kind::Region`] datagram carrying the region's memfd (`SCM_RIGHTS`), then the
//! hello, and closes the socket at once: no reply is awaited, and from then on no descriptor
//! of ours exists in the process (issue 13). Every send is `MSG_DONTWAIT | MSG_NOSIGNAL`; a
//! full backlog means "not profiled this time".
//!
//! **Stream.** Every 20 ms the background thread notices module-map changes, empties the
//! sample [`ring`] into [`SampleBatch`]es and writes them, as the same wire messages the
//! socket used to carry, into the message ring of the shared region ([`send`]); once a
//! second it writes the counters. A full ring drops the message (counted); nothing waits
//! except the last flush at exit, for at most [`EXIT_PATIENCE`]. Commands come back through
//! the command ring ([`poll_commands`]).
//!
//! **Collector presence.** The collector writes `collector_seen_ms` each time it polls. In
//! serve mode, a value older than 3 s (or none 2 s after the hand-over) means the daemon is
//! gone: CPU sampling stops, and every second the thread re-attaches if a daemon's socket
//! passes the checks (a root daemon opens `/proc/PID/map_files` itself; another one gets a
//! fresh memfd). The background thread opens no file periodically: thread names and RSS are
//! read by the collector from `/proc/PID`. Thread dumps (on request) still read
//! `/proc/self/task`.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyprof_wire::shared::{self as shm, RegionInfo, SHARED_SIZE, SHARED_VERSION};
use anyprof_wire::{self as wire, Counter, Kind, SampleBatch, MAX_MESSAGE};

use crate::modules::ModuleMap;
use crate::region::SHARED;
use crate::signal::{ring, thread_state};
use crate::{counters, log};

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
/// Held by whoever is draining the ring (the ring has a single reader).
static DRAINING: AtomicBool = AtomicBool::new(false);
/// Tells the background thread to stop.
static STOP: AtomicBool = AtomicBool::new(false);
/// The module map, owned by whoever drains.
pub static MODULES: Mutex<ModuleMap> = Mutex::new(ModuleMap::new());

const TICK: Duration = Duration::from_millis(20);
const COUNTERS_EVERY: Duration = Duration::from_secs(1);
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
fn detach() {
    ATTACHED_MS.store(0, Ordering::Release);
}

/// Hands the region to the collector on our (just connected) socket: a [`Kind::Region`]
/// datagram carrying `memfd` (none on a re-attach to a root daemon, which opens
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

/// The background thread, while it runs.
static THREAD: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);

/// A last flush asked of the background thread by a thread about to end the process without
/// destructors (`_exit`).
static LAST_FLUSH: AtomicU8 = AtomicU8::new(LAST_FLUSH_NONE);
const LAST_FLUSH_NONE: u8 = 0;
const LAST_FLUSH_ASKED: u8 = 1;
const LAST_FLUSH_DONE: u8 = 2;
/// Longest that `_exit` waits for it: a patient flush gives up on a busy drain after 200 ms.
const LAST_FLUSH_WAIT_NS: u64 = 500_000_000;

/// Has the background thread send everything left, with the final counters, and waits until
/// it has (at most [`LAST_FLUSH_WAIT_NS`]); false if there is no background thread or it did
/// not finish in time.
///
/// For `_exit`, which a program may call from a signal handler or while it holds locks
/// (malloc's among them): the calling thread only sets a flag, wakes the background thread
/// and sleeps, so it allocates nothing and waits on no lock (`try_lock` only). The background
/// thread flushes in ordinary context; if it gets stuck, the wait runs out and the process
/// ends as it would have.
pub fn last_flush_by_background() -> bool {
    {
        let Ok(thread) = THREAD.try_lock() else {
            return false;
        };
        let Some(handle) = thread.as_ref() else {
            return false;
        };
        if LAST_FLUSH
            .compare_exchange(
                LAST_FLUSH_NONE,
                LAST_FLUSH_ASKED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return false;
        }
        handle.thread().unpark();
    }
    let deadline = crate::signal::sys::monotonic_ns().saturating_add(LAST_FLUSH_WAIT_NS);
    while LAST_FLUSH.load(Ordering::Acquire) != LAST_FLUSH_DONE {
        if crate::signal::sys::monotonic_ns() >= deadline {
            return false;
        }
        let nap = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // SAFETY: a valid timespec; nanosleep is async-signal-safe.
        unsafe { libc::nanosleep(&nap, core::ptr::null_mut()) };
    }
    true
}

/// The background thread's handle for [`wake`] (null before the first spawn).
static WAKER: std::sync::atomic::AtomicPtr<std::thread::Thread> =
    std::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// Wakes the background thread for an early cycle. Called from malloc hooks: `unpark` is an
/// atomic swap and at most one futex wake, no lock, no allocation.
fn wake() {
    let t = WAKER.load(Ordering::Acquire);
    if !t.is_null() {
        // SAFETY: WAKER only holds null or a leaked, never freed `Thread` (see `spawn`).
        unsafe { (*t).unpark() };
    }
}

/// Starts the background thread, with every signal blocked from its first instruction (see
/// [`crate::threads::AllSignalsBlocked`]): signals are the program's.
pub fn spawn() -> std::io::Result<()> {
    let was = thread_state::set_internal(true);
    STOP.store(false, Ordering::Release);
    let blocked = crate::threads::AllSignalsBlocked::new();
    let result = std::thread::Builder::new()
        .name("anyprof".into())
        .spawn(run);
    drop(blocked);
    thread_state::set_internal(was);
    let handle = result?;
    // What a hook calls to wake this thread (signal::unwinder::request_catch_up): a handle
    // that stays valid for good (leaked; one per spawn), read without a lock.
    let thread = Box::into_raw(Box::new(handle.thread().clone()));
    WAKER.store(thread, Ordering::Release);
    anyprof_preload_core::signal::unwinder::publish_waker(wake);
    if let Ok(mut t) = THREAD.lock() {
        *t = Some(handle);
    }
    Ok(())
}

/// In a forked child: the parent's background thread does not exist here; forget its
/// handle without touching it.
pub fn forget_thread_in_child() {
    if let Ok(mut t) = THREAD.lock() {
        std::mem::forget(t.take());
    }
    DRAINING.store(false, Ordering::Release);
    STOP.store(false, Ordering::Release);
    LAST_FLUSH.store(LAST_FLUSH_NONE, Ordering::Release);
    detach(); // the parent's collector was given the parent's region, not ours
}

/// Stops the background thread and waits for it; returns whether one was running. Used
/// around calls that require a single-threaded process (`unshare(CLONE_NEWUSER)`).
pub fn pause() -> bool {
    let handle = THREAD.lock().ok().and_then(|mut t| t.take());
    let Some(handle) = handle else { return false };
    STOP.store(true, Ordering::Release);
    handle.thread().unpark();
    let _ = handle.join();
    true
}

/// True in serve mode: a lost connection also stops CPU sampling (nobody is asking).
pub static SERVE_MODE: AtomicBool = AtomicBool::new(false);

fn run() {
    thread_state::set_internal(true);
    crate::threads::DRAIN_TID.store(thread_state::tid(), Ordering::Release);
    let mut last_counters = Instant::now();
    let mut last_reconnect = Instant::now()
        .checked_sub(RECONNECT_EVERY)
        .unwrap_or_else(Instant::now);
    let mut reconnect_wait = RECONNECT_EVERY;
    while !STOP.load(Ordering::Acquire) {
        std::thread::park_timeout(TICK);
        if LAST_FLUSH.load(Ordering::Acquire) == LAST_FLUSH_ASKED {
            flush(Some(Kind::Goodbye), true);
            LAST_FLUSH.store(LAST_FLUSH_DONE, Ordering::Release);
            break;
        }
        if STOP.load(Ordering::Acquire) {
            break;
        }
        if crate::threads::only_ours_left() {
            // What glibc does when a process's last thread exits: exit(0), which runs the
            // program's atexit handlers and our destructor (the final flush). Without this,
            // a program whose threads all end through pthread_exit would never end.
            // SAFETY: exit ends the process; no lock of ours is held here.
            unsafe { libc::exit(0) };
        }
        if SERVE_MODE.load(Ordering::Relaxed) && !collector_present() {
            detach();
            if crate::threads::CPU_HZ.load(Ordering::Relaxed) != 0 {
                crate::threads::stop_cpu_sampling();
            }
            // No daemon polls the region (none yet, or it stopped or restarted): try again
            // now and then, never in a tight loop.
            if last_reconnect.elapsed() >= reconnect_wait {
                last_reconnect = Instant::now();
                let _section = crate::fork::section();
                if let Some(reconnect) = RECONNECT.lock().ok().and_then(|r| *r) {
                    // A hand-over a daemon took but does not follow up (it refused the
                    // process) is repeated ever more rarely: each one may copy the region.
                    reconnect_wait = if reconnect() {
                        (reconnect_wait * 2).min(RECONNECT_AT_MOST)
                    } else {
                        RECONNECT_EVERY
                    };
                }
            }
            if !attached() {
                ring::drain(|_| counters::bump(Counter::DroppedSend));
                continue;
            }
        }
        if collector_present() && SHARED.header.collector_seen_ms.load(Ordering::Relaxed) != 0 {
            reconnect_wait = RECONNECT_EVERY; // a daemon follows this process
        }
        let section = crate::fork::section();
        poll_commands();
        drop(section);
        let counters_due = last_counters.elapsed() >= COUNTERS_EVERY;
        if counters_due {
            last_counters = Instant::now();
        }
        flush(counters_due.then_some(Kind::Counters), false);
    }
}

/// Carries out the collector's commands from the command ring, without waiting for any.
fn poll_commands() {
    while let Some(cmd) = shm::pop_command(&SHARED.commands) {
        match cmd {
            wire::Command::CpuStart(hz) => {
                crate::threads::start_cpu_sampling(hz.clamp(1, crate::config::MAX_CPU_HZ))
            }
            wire::Command::CpuStop => crate::threads::stop_cpu_sampling(),
            wire::Command::ThreadDump(id) => dump_threads(id),
        }
    }
}

/// Records every thread's current stack, tagged with `id`.
///
/// A thread blocked in a system call (most threads, most of the time) is not disturbed: the
/// kernel reports its stack pointer and instruction pointer in `/proc/self/task/TID/syscall`,
/// and it is unwound from here while it stays blocked. Only a thread that is running gets our
/// sampling signal through `tgkill`, whose handler records its stack — a signal to a sleeping
/// thread would cut its sleep short with EINTR. Threads that block the signal are left out.
fn dump_threads(id: u32) {
    let id = id.max(1);
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() };
    let me = crate::threads::DRAIN_TID.load(Ordering::Acquire);
    let mut signalled = false;
    for tid in crate::threads::task_ids() {
        if tid == me {
            continue;
        }
        let state =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap_or_default();
        if let Some((sp, pc)) = blocked_registers(&state) {
            record_blocked_thread(tid, sp, pc, id);
            continue;
        }
        if !signalled {
            if crate::signal::handler::install(crate::exports::real_sigaction).is_err() {
                continue;
            }
            crate::signal::handler::DUMP_REQUEST.store(id, Ordering::Release);
            signalled = true;
        }
        // SAFETY: tgkill to a thread of our own process; one that exited meanwhile just makes
        // it fail with ESRCH.
        unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                pid,
                tid as libc::c_int,
                crate::signal::handler::SIGNAL,
            )
        };
    }
    if signalled {
        // Give the running threads a moment to take the signal; late ones are left out.
        std::thread::sleep(Duration::from_millis(20));
        crate::signal::handler::DUMP_REQUEST.store(0, Ordering::Release);
    }
}

/// The stack and instruction pointers of a thread blocked in a system call, from its
/// `/proc/.../syscall` line (`NR ARG1..ARG6 SP PC`); `None` for "running" or unreadable.
fn blocked_registers(line: &str) -> Option<(u64, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 9 {
        return None;
    }
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    Some((hex(fields.get(fields.len() - 2)?)?, hex(fields.last()?)?))
}

fn record_blocked_thread(tid: u32, sp: u64, pc: u64, id: u32) {
    let Some(mut claim) = ring::claim() else {
        counters::bump(Counter::DroppedRingFull);
        return;
    };
    let record = claim.record();
    crate::signal::unwind::IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    let (len, flags) =
        crate::signal::unwind::unwind(pc, sp, 0, crate::threads::stack_of(tid), &mut record.frames);
    crate::signal::unwind::IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    record.len = len as u16;
    record.flags = flags | wire::FLAG_THREAD_DUMP;
    record.tid = tid;
    record.time_ns = crate::signal::sys::monotonic_ns();
    record.cpu_ns = u64::from(id);
    claim.publish();
}

/// How often a lost connection is retried.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// Longest wait between two hand-overs that no daemon followed up.
const RECONNECT_AT_MOST: Duration = Duration::from_secs(60);
/// Hands the region over again (set by [`crate::lifecycle`]); true if a daemon took it.
pub static RECONNECT: Mutex<Option<fn() -> bool>> = Mutex::new(None);

/// Makes the next drain cycle report every module, bucket and thread-creation stack again
/// (a new collector knows nothing).
pub fn report_everything_again() {
    if let Ok(mut map) = MODULES.lock() {
        map.forget_reported();
    }
    heap_report::forget_sent();
    crate::threads::touch_creations();
}

/// One drain cycle: module changes, samples, log messages, then counters of kind
/// `counters` if given. At exit (`last`), waits briefly for the background thread's cycle
/// to end and for socket room, and stops the thread.
pub fn flush(counters_kind: Option<Kind>, last: bool) {
    if last {
        STOP.store(true, Ordering::Release);
    }
    let _section = crate::fork::section();
    if !acquire_drain(last) {
        return;
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    send_module_changes(&mut buf, last);
    send_samples(&mut buf, last);
    if last {
        // Small and what tests and CI budgets read first: send it before the bulky buckets.
        heap_report::send_mem_stats(&mut buf, last);
    }
    heap_report::send_changed_buckets(&mut buf, last);
    send_thread_creates(&mut buf, last);
    for (level, text) in log::take() {
        if let Some(n) = wire::encode_log(&mut buf, level, text.as_bytes()) {
            send(buf.get(..n).unwrap_or(&[]), last);
        }
    }
    heap_report::track_peak();
    if let Some(kind) = counters_kind {
        heap_report::send_mem_stats(&mut buf, last);
        if let Some(n) = wire::encode_counters(&mut buf, kind, &counters::snapshot()) {
            send(buf.get(..n).unwrap_or(&[]), last);
        }
    }
    if last {
        // The collector may end the session as soon as it has read the ring.
        SHARED
            .header
            .finished
            .store(shm::FINISHED, Ordering::Release);
    }
    DRAINING.store(false, Ordering::Release);
}

fn acquire_drain(patient: bool) -> bool {
    let deadline = Instant::now() + Duration::from_millis(200);
    loop {
        if DRAINING
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return true;
        }
        if !patient || Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn send_module_changes(buf: &mut [u8], patient: bool) {
    let Ok(mut map) = MODULES.try_lock() else {
        return;
    };
    let changes = map.refresh();
    if !changes.added.is_empty() || !changes.removed.is_empty() {
        // The unwinder knows the new set of objects: a hook's next truncated stack may wake
        // us again. (Kept set otherwise, so that a stack that is always truncated, through
        // JIT code, does not wake us on every sample.)
        let _ = anyprof_preload_core::signal::unwinder::take_catch_up_request();
    }
    for id in changes.removed {
        if let Some(n) = wire::encode_module_unloaded(buf, id) {
            if !send(buf.get(..n).unwrap_or(&[]), patient) {
                counters::bump(Counter::DroppedModules);
            }
        }
    }
    for i in changes.added {
        let Some(m) = map.modules.get(i) else {
            continue;
        };
        if let Some(n) = wire::encode_module_loaded(buf, &m.info()) {
            if !send(buf.get(..n).unwrap_or(&[]), patient) {
                counters::bump(Counter::DroppedModules);
            }
        }
    }
}

/// Sends the thread-creation stacks if they changed since last sent.
fn send_thread_creates(buf: &mut [u8], patient: bool) {
    static SENT_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let generation = crate::threads::creations_generation();
    if generation == SENT_GENERATION.load(Ordering::Relaxed) {
        return;
    }
    let stacks = crate::threads::creations();
    if let Some(n) =
        wire::encode_thread_creates(buf, stacks.iter().map(|(f, c)| (*c, f.as_slice())))
    {
        if send(buf.get(..n).unwrap_or(&[]), patient) {
            SENT_GENERATION.store(generation, Ordering::Relaxed);
        }
    }
}

fn send_samples(buf: &mut [u8], patient: bool) {
    let mut pending: Vec<ring::Record> = Vec::new();
    ring::drain(|r| pending.push(*r));
    let mut rest = pending.as_slice();
    while !rest.is_empty() {
        let mut batch = SampleBatch::new(buf);
        let mut taken = 0;
        for r in rest {
            if !batch.push(r.tid, r.flags, r.time_ns, r.cpu_ns, r.frames()) {
                break;
            }
            taken += 1;
        }
        if taken == 0 {
            break;
        }
        let (count, len) = (batch.count(), batch.len());
        if !send(buf.get(..len).unwrap_or(&[]), patient) {
            counters::add(Counter::DroppedSend, u64::from(count));
        }
        rest = rest.get(taken..).unwrap_or(&[]);
    }
}

/// Sending heap buckets and allocator counters.
mod heap_report {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    use anyprof_wire::{self as wire, BucketCounts, HeapBatch, MemStat, MEM_STAT_COUNT};

    use super::send;
    use crate::alloc::{buckets, counters, hooks, live};

    /// Counts last sent, by bucket position; `None` = frames not sent yet.
    static SENT: Mutex<Vec<Option<BucketCounts>>> = Mutex::new(Vec::new());
    static PEAK_LIVE: AtomicU64 = AtomicU64::new(0);

    /// Sends every bucket whose counts changed since it was last sent (with its frames the
    /// first time).
    pub fn send_changed_buckets(buf: &mut [u8], patient: bool) {
        let Ok(mut sent) = SENT.try_lock() else {
            return;
        };
        let mut pending = Vec::new();
        for n in 0..buckets::created() {
            let Some((id, size, counts, frames)) = buckets::get(n) else {
                break;
            };
            let previous = sent.get(n).copied().flatten();
            if previous != Some(counts) {
                let frames = if previous.is_none() { frames } else { &[][..] };
                pending.push((n, id, size, counts, frames));
            }
        }
        let mut rest = pending.as_slice();
        while !rest.is_empty() {
            let mut batch = HeapBatch::new(buf);
            let taken = rest
                .iter()
                .take_while(|(_, id, size, c, f)| batch.push(*id, *size, c, f))
                .count();
            let len = batch.len();
            if taken == 0 || !send(buf.get(..len).unwrap_or(&[]), patient) {
                return; // unsent buckets stay "changed" and go out on a later cycle
            }
            for &(n, _, _, counts, _) in rest.iter().take(taken) {
                if sent.len() <= n {
                    sent.resize(n + 1, None);
                }
                if let Some(slot) = sent.get_mut(n) {
                    *slot = Some(counts);
                }
            }
            rest = rest.get(taken..).unwrap_or(&[]);
        }
    }

    /// Forgets what was sent (a new connection knows nothing).
    pub fn forget_sent() {
        if let Ok(mut sent) = SENT.lock() {
            sent.clear();
        }
    }

    /// Records the highest live-bytes figure seen (checked every drain cycle).
    pub fn track_peak() {
        PEAK_LIVE.fetch_max(counters::live_bytes(), Ordering::Relaxed);
    }

    /// Sends the exact counters, the size histogram, RSS and the profiler's own footprint.
    pub fn send_mem_stats(buf: &mut [u8], patient: bool) {
        let t = counters::totals();
        let mut fields = [0u64; MEM_STAT_COUNT];
        let mut set = |f: MemStat, v: u64| {
            if let Some(x) = fields.get_mut(f as usize) {
                *x = v;
            }
        };
        set(MemStat::Mallocs, t.mallocs);
        set(MemStat::Frees, t.frees);
        set(MemStat::AllocBytes, t.alloc_bytes);
        set(MemStat::FreeBytes, t.free_bytes);
        set(
            MemStat::PeakLiveBytes,
            PEAK_LIVE.load(Ordering::Relaxed).max(t.live_bytes()),
        );
        // RSS is read by the collector from /proc/PID/statm: no file is opened here.
        set(MemStat::RssBytes, 0);
        set(MemStat::MaxRssBytes, max_rss_bytes());
        set(MemStat::LiveTableFull, hooks::lost(MemStat::LiveTableFull));
        set(MemStat::BucketsFull, hooks::lost(MemStat::BucketsFull));
        set(
            MemStat::ProfilerBytes,
            (buckets::FOOTPRINT + live::FOOTPRINT) as u64,
        );
        if let Some(n) = wire::encode_mem_stats(buf, &fields, &t.class_mallocs, &t.class_frees) {
            send(buf.get(..n).unwrap_or(&[]), patient);
        }
    }

    fn max_rss_bytes() -> u64 {
        // SAFETY: a zeroed rusage is a valid out-buffer.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
            return 0;
        }
        ru.ru_maxrss.max(0) as u64 * 1024
    }
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
