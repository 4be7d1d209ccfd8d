//! The collector's listening side: a private `SOCK_SEQPACKET` socket that preloaded
//! processes connect to, one reader thread per connection, and the sessions they fill.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use anyprof_wire::Level;

use crate::ingest::{read_connection, Peer, Session, SharedSession, UserBudget};
use crate::region::{Channel, Link, Registry};

/// Most connections served at once; more are refused (closed at once).
const MAX_CONNECTIONS: usize = 4096;
/// Default of `serve --max-processes-per-user`: connections one non-root user's processes
/// may hold open at once (each costs the daemon a thread and two descriptors, three for a
/// process that shares a region: its pidfd, its /proc directory and its memfd).
pub const DEFAULT_MAX_PROCESSES_PER_USER: usize = 512;
/// How long a daemon waits for a new connection's hello (the preload sends it right after
/// connecting) before closing it.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Least time between two warnings about one uid's refused connections.
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(60);

struct Connection {
    session: SharedSession,
    reader: Option<JoinHandle<()>>,
    /// How commands reach the process: a second descriptor of its socket, or its region.
    channel: Arc<Channel>,
    /// The place this connection takes in its user's count (given back when the connection
    /// is forgotten, with its thread and descriptors).
    _slot: Option<UserSlot>,
}

/// One connection counted against its user's `--max-processes-per-user`; dropping it gives
/// the place back.
struct UserSlot(Arc<AtomicUsize>);

impl Drop for UserSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a collector treats its connections.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Print the processes' informational messages too (warnings always print).
    pub verbose: bool,
    /// Print a `--memstats` line for each allocator-counter report.
    pub trace_mem: bool,
    /// Peer uids accepted (checked with SO_PEERCRED); `None` accepts anyone who can reach
    /// the socket (record's socket sits in a private directory).
    pub allowed_uids: Option<Vec<u32>>,
    /// Forget connections that ended (a daemon runs for months; record keeps them all).
    pub reap: bool,
    /// Most bytes of profile data kept per connection (see [`Session::max_bytes`]); `None`
    /// for no cap (record: its processes are the user's own).
    pub max_process_bytes: Option<usize>,
    /// Most bytes of profile data kept for all the connections of one non-root user
    /// together; `None` for no such cap.
    pub max_user_bytes: Option<usize>,
    /// Most connections one non-root user may hold open at once (each has a reader thread
    /// and two or three descriptors); more are closed when accepted. `None` for no such cap (record:
    /// its socket is private). Root's processes are never capped this way.
    pub max_connections_per_user: Option<usize>,
    /// Read the sample ring, counters and peak heap of a process that has no thread of
    /// ours from its region while it runs (record: the preload does without its thread in
    /// a single-threaded program only in record mode). A daemon leaves it off, so that a
    /// process claiming to need it cannot make it poll more.
    pub read_regions_live: bool,
    /// How long a new connection may take to send its hello before it is closed; `None` to
    /// wait for ever. Once the hello arrived a connection may stay silent (a stopped
    /// process).
    pub hello_timeout: Option<Duration>,
}

/// A running collector for one `record` run.
pub struct Collector {
    dir: Option<PathBuf>,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    /// An eventfd the acceptor polls beside the socket, so that a stop wakes it at once
    /// (instead of at the end of its poll interval: up to 20 ms added to every `record`).
    wake: Arc<OwnedFd>,
    acceptor: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<Connection>>>,
}

impl Collector {
    /// Creates a private socket directory and starts accepting. `verbose` prints the
    /// processes' informational messages too (warnings are always printed).
    ///
    /// The directory is new (creating it fails if the name exists), mode 0700, in
    /// `$XDG_RUNTIME_DIR` or the temp directory, or in `/tmp` if the socket's path would be
    /// too long for a socket address there (a deep `$TMPDIR` must not stop the program); the
    /// socket in it is mode 0600. The preload checks the directory (ours, not writable by
    /// others) and our credentials before it sends anything.
    pub fn start(options: Options) -> Result<Collector> {
        let name = format!(
            "anyprof-{}-{}",
            std::process::id(),
            crate::output::timestamp()
        );
        // `sun_path` holds 108 bytes with the terminating NUL.
        let fits = |base: &PathBuf| base.join(&name).join("sock").as_os_str().len() < 108;
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .into_iter()
            .chain([std::env::temp_dir()])
            .find(fits)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        let dir = base.join(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create the socket directory {}", dir.display()))?;
        let socket = dir.join("sock");
        Self::spawn(Some(dir), socket, 0o600, options)
    }

    /// Listens at `socket` (a daemon's well-known path). A stale socket file left by a
    /// daemon that died is replaced; a live one is an error. The socket is mode 0666
    /// whatever the umask: who may connect is decided by `options.allowed_uids`
    /// (SO_PEERCRED), not by the file's mode. Its directory must be one that only root or
    /// this user can write to, or no process would connect (they check it).
    pub fn listen_at(socket: PathBuf, options: Options) -> Result<Collector> {
        check_socket_dir(&socket)?;
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        let others: Vec<u32> = (options.allowed_uids.iter().flatten())
            .copied()
            .filter(|&uid| uid != 0 && uid != euid)
            .collect();
        if euid != 0 && !others.is_empty() {
            eprintln!(
                "anyprof: warning: processes of uid {others:?} will not connect: a process only \
                 talks to a daemon of root or of its own uid. Run `anyprof serve` as root to \
                 serve several users"
            );
        }
        if socket.exists() {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok()
                || connect_seqpacket(&socket)
            {
                anyhow::bail!(
                    "another anyprof serve is already listening on {} (stop it, or pass --socket)",
                    socket.display()
                );
            }
            std::fs::remove_file(&socket)
                .with_context(|| format!("cannot remove the stale socket {}", socket.display()))?;
        }
        Self::spawn(None, socket, 0o666, options)
    }

    fn spawn(
        dir: Option<PathBuf>,
        socket: PathBuf,
        mode: u32,
        options: Options,
    ) -> Result<Collector> {
        let listener = listen(&socket, mode)
            .with_context(|| format!("cannot listen on {}", socket.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        // SAFETY: eventfd with valid flags; a non-negative result is a new descriptor that
        // nothing else owns.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(std::io::Error::last_os_error()).context("cannot create an eventfd");
        }
        // SAFETY: see above.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(wake) });
        let connections: Arc<Mutex<Vec<Connection>>> = Arc::default();
        let acceptor = {
            let (stop, wake, connections) = (stop.clone(), wake.clone(), connections.clone());
            std::thread::Builder::new()
                .name("accept".into())
                .spawn(move || accept_loop(listener, stop, &wake, connections, options))?
        };
        Ok(Collector {
            dir,
            socket,
            stop,
            wake,
            acceptor: Some(acceptor),
            connections,
        })
    }

    /// A handle on the live sessions, for snapshots while the program runs.
    pub fn sessions(&self) -> SessionList {
        SessionList(self.connections.clone())
    }

    /// The socket path to hand to processes (`ANYPROF_SOCKET`).
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Waits up to `grace` for the connection of `main_pid` (and then briefly for others) to
    /// end, stops accepting, and returns every session.
    pub fn finish(mut self, main_pid: u32, grace: Duration) -> Vec<Session> {
        // The program has exited: accept whatever is still queued on the socket (a short
        // program can connect, say everything and exit before we ever polled), then stop
        // accepting and wait for the readers.
        self.stop.store(true, Ordering::SeqCst);
        self.wake_acceptor();
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let deadline = Instant::now() + grace;
        let open = |only_main: bool| {
            self.connections.lock().map_or(0, |c| {
                c.iter()
                    .filter(|c| {
                        let s = c.session.lock();
                        let (closed, pid) =
                            s.map_or((true, None), |s| (s.closed_at.is_some(), s.pid()));
                        !closed && (!only_main || pid == Some(main_pid) || pid.is_none())
                    })
                    .count()
            })
        };
        while open(true) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let others_deadline = Instant::now() + Duration::from_millis(500);
        while open(false) > 0 && Instant::now() < others_deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let conns = self
            .connections
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        let mut sessions = Vec::new();
        for mut c in conns {
            // Readers of processes that outlive the program keep running detached; take a
            // snapshot of what they sent so far.
            if c.session
                .lock()
                .map(|s| s.closed_at.is_some())
                .unwrap_or(true)
            {
                if let Some(r) = c.reader.take() {
                    let _ = r.join();
                }
            }
            let snapshot = c
                .session
                .lock()
                .map(|mut s| std::mem::take(&mut *s))
                .unwrap_or_default();
            sessions.push(snapshot);
        }
        merge_by_pid(sessions)
    }
}

impl Collector {
    fn wake_acceptor(&self) {
        let one: u64 = 1;
        // SAFETY: an 8-byte write from a valid u64 to our eventfd (it cannot block: the
        // descriptor is non-blocking, and a full counter only means it is awake already).
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake_acceptor();
        let _ = std::fs::remove_file(&self.socket);
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The directory of a daemon's socket must be one the preload accepts: owned by root or by
/// us, and not writable by group or others (else anyone could have put their own socket
/// there first, and processes refuse it).
fn check_socket_dir(socket: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot examine the socket's directory {}", dir.display()))?;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    let problem = if !meta.file_type().is_dir() {
        Some("it is not a directory (a symlink?)".to_string())
    } else if meta.uid() != 0 && meta.uid() != euid {
        Some(format!(
            "it is owned by uid {}, neither root nor you (uid {euid})",
            meta.uid()
        ))
    } else if mode & 0o022 != 0 {
        Some(format!(
            "it is writable by group or others (mode {mode:o}), who could have put their own \
             socket there"
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => anyhow::bail!(
            "preloaded processes would refuse the socket {}: {problem}. Put it in a directory \
             that only root or you can write to (--socket PATH)",
            socket.display()
        ),
        None => Ok(()),
    }
}

/// Serialises our own umask changes (umask is process-wide).
static UMASK: Mutex<()> = Mutex::new(());

/// Binds and listens at `path`; the socket file gets `mode`, whatever the umask. It is
/// bound under umask 0177 (so that it is never wider than owner-only before the chmod) and
/// then chmodded without following symlinks. Collectors are started before the threads of
/// `record` or `serve` create files, so the brief umask change affects nobody else.
fn listen(path: &Path, mode: u32) -> Result<OwnedFd> {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    use nix::sys::stat::{fchmodat, umask, FchmodatFlags, Mode};
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    let bound = {
        let _one_at_a_time = UMASK.lock();
        let old = umask(Mode::from_bits_truncate(0o177));
        let bound = bind(fd.as_raw_fd(), &addr);
        umask(old);
        bound
    };
    bound?;
    fchmodat(
        None,
        path,
        Mode::from_bits_truncate(mode),
        FchmodatFlags::NoFollowSymlink,
    )
    .with_context(|| format!("cannot set mode {mode:o} on the socket"))?;
    listen(&fd, Backlog::new(128)?)?;
    Ok(fd)
}

fn accept_loop(
    listener: OwnedFd,
    stop: Arc<AtomicBool>,
    wake: &OwnedFd,
    connections: Arc<Mutex<Vec<Connection>>>,
    options: Options,
) {
    let mut last_reap = Instant::now();
    // Each non-root user's memory budget, shared by its connections.
    let mut budgets: HashMap<u32, Arc<UserBudget>> = HashMap::new();
    // Each non-root user's count of connections not yet forgotten.
    let mut per_user: HashMap<u32, Arc<AtomicUsize>> = HashMap::new();
    // When each uid was last told about its refused connections.
    let mut warned: HashMap<u32, Instant> = HashMap::new();
    // Processes that share a region, by pid (an exec'd image ends its predecessor's session).
    let registry: Arc<Registry> = Arc::default();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if options.reap && last_reap.elapsed() >= Duration::from_secs(1) {
            last_reap = Instant::now();
            reap(&connections);
            per_user.retain(|_, count| count.load(Ordering::SeqCst) > 0);
        }
        let mut pfds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Once stopping, only the socket is polled, without waiting: whatever is still
        // queued is accepted, then the loop ends.
        let (count, timeout) = if stopping { (1, 0) } else { (2, 20) };
        // SAFETY: `count` valid pollfds.
        let ready = unsafe { libc::poll(pfds.as_mut_ptr(), count, timeout) };
        if ready <= 0 || pfds[0].revents == 0 {
            if stopping {
                return; // nothing left in the queue
            }
            continue;
        }
        // SAFETY: accept4 on our listening socket; null address pointers are allowed.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            continue;
        }
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Who connected, from the kernel: the pid the process claims in its handshake is
        // replaced by this one, and its files are read with these rights.
        let peer = Peer::of_socket(&fd);
        let uid = peer.as_ref().map(|p| p.uid);
        if let Some(allowed) = &options.allowed_uids {
            match uid {
                Some(uid) if allowed.contains(&uid) => {}
                uid => {
                    if options.verbose {
                        eprintln!(
                            "anyprof: refused a connection from uid {uid:?} (allowed: {allowed:?})"
                        );
                    }
                    continue; // dropping `fd` closes it
                }
            }
        }
        let Ok(mut conns) = connections.lock() else {
            return;
        };
        if conns.len() >= MAX_CONNECTIONS {
            continue;
        }
        // One user's processes may not take every thread and descriptor of the daemon.
        let slot = match (options.max_connections_per_user, uid) {
            (Some(max), Some(uid)) if uid != 0 => {
                let count = per_user.entry(uid).or_default().clone();
                if count.load(Ordering::SeqCst) >= max {
                    let due = warned
                        .get(&uid)
                        .is_none_or(|at| at.elapsed() >= REFUSAL_WARNING_EVERY);
                    if due {
                        warned.insert(uid, Instant::now());
                        eprintln!(
                            "anyprof: refusing connections from uid {uid}: its processes hold \
                             {max} connections already (--max-processes-per-user {max}); raise \
                             the flag if that user runs more preloaded processes"
                        );
                    }
                    continue; // dropping `fd` closes it
                }
                count.fetch_add(1, Ordering::SeqCst);
                Some(UserSlot(count))
            }
            _ => None,
        };
        let link = Link {
            channel: Arc::new(Channel::default()),
            registry: registry.clone(),
        };
        link.channel
            .read_live
            .store(options.read_regions_live, Ordering::Relaxed);
        if let Ok(mut c) = link.channel.control.lock() {
            *c = fd.try_clone().ok();
        }
        let channel = link.channel.clone();
        let user_budget = match (options.max_user_bytes, uid) {
            (Some(max), Some(uid)) if uid != 0 => Some(
                budgets
                    .entry(uid)
                    .or_insert_with(|| Arc::new(UserBudget::new(max)))
                    .clone(),
            ),
            _ => None,
        };
        let session: SharedSession = Arc::new(Mutex::new(Session {
            peer,
            max_bytes: options.max_process_bytes,
            user_budget,
            ..Session::default()
        }));
        let s = session.clone();
        let (verbose, trace_mem, hello_timeout) =
            (options.verbose, options.trace_mem, options.hello_timeout);
        let reader = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                read_connection(fd, s, link, trace_mem, hello_timeout, |pid, level, text| {
                    if level == Level::Warn || verbose {
                        eprintln!("anyprof[{}]: {text}", pid.unwrap_or(0));
                    }
                })
            });
        if reader.is_err() {
            // No thread to read it (the descriptor went with the closure): forget it at
            // the next reaping.
            if let Ok(mut s) = session.lock() {
                s.closed_at = Some(Instant::now());
            }
        }
        conns.push(Connection {
            session,
            reader: reader.ok(),
            channel,
            _slot: slot,
        });
    }
}

/// Joins the sessions of one process image that reconnected (same pid and start time) into
/// one, in connection order. An exec'd image (same pid, later start) stays separate, and so
/// do sessions without a handshake.
pub fn merge_by_pid(sessions: Vec<Session>) -> Vec<Session> {
    let mut out: Vec<Session> = Vec::new();
    for s in sessions {
        let key = s.image_key();
        match key.and_then(|k| out.iter_mut().find(|o| o.image_key() == Some(k))) {
            Some(first) => first.merge(s),
            None => out.push(s),
        }
    }
    out
}

/// The sessions of a running collector (see [`Collector::sessions`]).
pub struct SessionList(Arc<Mutex<Vec<Connection>>>);

/// How old the heap buckets of a process without our thread may be in a [`snapshot`]
/// (they are read from its region, which costs a pass over its bucket table).
const SNAPSHOT_HEAP_AGE: Duration = Duration::from_millis(500);

/// Copies of the current sessions, merged per process image. The heap of a process that
/// has no thread of ours to send it may be up to half a second old.
pub fn snapshot(list: &SessionList) -> Vec<Session> {
    snapshot_with_heap_age(list, SNAPSHOT_HEAP_AGE)
}

/// [`snapshot`], with every heap read as it is now (heap snapshots).
pub fn fresh_snapshot(list: &SessionList) -> Vec<Session> {
    snapshot_with_heap_age(list, Duration::ZERO)
}

fn snapshot_with_heap_age(list: &SessionList, heap_age: Duration) -> Vec<Session> {
    let connections: Vec<(SharedSession, Arc<Channel>)> = list
        .0
        .lock()
        .map(|c| {
            c.iter()
                .map(|c| (c.session.clone(), c.channel.clone()))
                .collect()
        })
        .unwrap_or_default();
    for (session, channel) in &connections {
        channel.refresh_heap(session, heap_age);
    }
    let sessions: Vec<SharedSession> = connections.into_iter().map(|(s, _)| s).collect();
    merge_by_pid(
        sessions
            .iter()
            .filter_map(|s| s.lock().ok().map(|s| s.clone()))
            .collect(),
    )
}

/// Drops connections that ended and whose reader has finished: no thread or descriptor
/// outlives the process it served.
fn reap(connections: &Mutex<Vec<Connection>>) {
    let Ok(mut conns) = connections.lock() else {
        return;
    };
    let mut i = 0;
    while i < conns.len() {
        let done = conns.get(i).is_some_and(|c| {
            c.reader.as_ref().is_none_or(JoinHandle::is_finished)
                && c.session
                    .lock()
                    .map(|s| s.closed_at.is_some())
                    .unwrap_or(true)
        });
        if done {
            let c = conns.swap_remove(i);
            if let Some(r) = c.reader {
                let _ = r.join();
            }
            if let Ok(mut s) = c.session.lock() {
                s.release_all(); // its user may keep that much elsewhere now
            };
        } else {
            i += 1;
        }
    }
}

fn connect_seqpacket(path: &Path) -> bool {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    connect(fd.as_raw_fd(), &addr).is_ok()
}

/// The newest open connection of `pid` (a process that reconnected has older, closed ones).
fn live_connection(conns: &[Connection], pid: u32) -> Option<&Connection> {
    conns.iter().rev().find(|c| {
        c.session
            .lock()
            .is_ok_and(|s| is_live(&s) && s.pid() == Some(pid))
    })
}

/// Whether a session stands for a running process: its connection is open, and the process
/// that opened it still holds its pid (a connection inherited by a `clone` child outlives
/// it, and the pid may then belong to another user's process).
fn is_live(s: &Session) -> bool {
    s.closed_at.is_none() && s.peer.as_ref().is_none_or(Peer::still_running)
}

/// A live process as the daemon lists it.
#[derive(Clone, Debug)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: u32,
    /// Its command line, arguments separated by spaces.
    pub cmdline: String,
    /// The executable.
    pub exe: String,
}

impl Collector {
    /// Processes connected now, by pid.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        let Ok(conns) = self.connections.lock() else {
            return Vec::new();
        };
        let mut out: Vec<ProcessInfo> = conns
            .iter()
            .filter_map(|c| {
                let s = c.session.lock().ok()?;
                if !is_live(&s) {
                    return None;
                }
                let h = s.hello.as_ref()?;
                Some(ProcessInfo {
                    pid: h.pid,
                    cmdline: h
                        .cmdline
                        .split(|&b| b == 0)
                        .map(String::from_utf8_lossy)
                        .collect::<Vec<_>>()
                        .join(" "),
                    exe: String::from_utf8_lossy(&h.exe).into_owned(),
                })
            })
            .collect();
        out.sort_by_key(|p| p.pid);
        out.dedup_by_key(|p| p.pid);
        out
    }

    /// The session of the live connection of `pid` (the newest, if it reconnected).
    pub fn session_of(&self, pid: u32) -> Option<SharedSession> {
        let conns = self.connections.lock().ok()?;
        live_connection(&conns, pid).map(|c| c.session.clone())
    }

    /// Sends `cmd` to the live connection of `pid`.
    pub fn command(&self, pid: u32, cmd: anyprof_wire::Command) -> Result<()> {
        let conns = self
            .connections
            .lock()
            .map_err(|_| anyhow::anyhow!("collector state poisoned"))?;
        let conn = live_connection(&conns, pid)
            .ok_or_else(|| anyhow::anyhow!("process {pid} is not connected"))?;
        if let Some(region) = conn.channel.region() {
            return region.command(cmd);
        }
        let control = conn
            .channel
            .control
            .lock()
            .map_err(|_| anyhow::anyhow!("collector state poisoned"))?;
        let fd = control
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no control channel to {pid}"))?;
        let mut buf = [0u8; 64];
        let n = anyprof_wire::encode_command(&mut buf, cmd)
            .ok_or_else(|| anyhow::anyhow!("command too large"))?;
        // SAFETY: `buf` holds `n` valid bytes; MSG_NOSIGNAL keeps a dead peer from raising SIGPIPE.
        let rc = unsafe {
            libc::send(
                fd.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                n,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sending a command to process {pid}"));
        }
        Ok(())
    }
}
