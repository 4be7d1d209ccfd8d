//! The collector's listening side: a private `SOCK_SEQPACKET` socket that preloaded
//! processes connect to, one reader thread per connection, and the sessions they fill.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use anyprof_wire::Level;

use crate::ingest::{read_connection, Session, SharedSession};

/// Most connections served at once; more are refused (closed at once).
const MAX_CONNECTIONS: usize = 4096;

struct Connection {
    session: SharedSession,
    reader: Option<JoinHandle<()>>,
}

/// A running collector for one `record` run.
pub struct Collector {
    dir: PathBuf,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<Connection>>>,
}

impl Collector {
    /// Creates a private socket directory and starts accepting. `verbose` prints the
    /// processes' informational messages too (warnings are always printed).
    pub fn start(verbose: bool, trace_mem: bool) -> Result<Collector> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            "anyprof-{}-{}",
            std::process::id(),
            crate::output::timestamp()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create the socket directory {}", dir.display()))?;
        let socket = dir.join("sock");
        let listener =
            listen(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<Connection>>> = Arc::default();
        let acceptor = {
            let (stop, connections) = (stop.clone(), connections.clone());
            std::thread::Builder::new()
                .name("accept".into())
                .spawn(move || accept_loop(listener, stop, connections, verbose, trace_mem))?
        };
        Ok(Collector {
            dir,
            socket,
            stop,
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

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn listen(path: &Path) -> Result<OwnedFd> {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    listen(&fd, Backlog::new(128)?)?;
    Ok(fd)
}

fn accept_loop(
    listener: OwnedFd,
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<Connection>>>,
    verbose: bool,
    trace_mem: bool,
) {
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, if stopping { 0 } else { 20 }) };
        if ready <= 0 {
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
        let Ok(mut conns) = connections.lock() else {
            return;
        };
        if conns.len() >= MAX_CONNECTIONS {
            continue;
        }
        let session: SharedSession = Arc::new(Mutex::new(Session::default()));
        let s = session.clone();
        let reader = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                read_connection(fd, s, trace_mem, |pid, level, text| {
                    if level == Level::Warn || verbose {
                        eprintln!("anyprof[{}]: {text}", pid.unwrap_or(0));
                    }
                })
            });
        conns.push(Connection {
            session,
            reader: reader.ok(),
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

/// Copies of the current sessions, merged per process image.
pub fn snapshot(list: &SessionList) -> Vec<Session> {
    let sessions: Vec<SharedSession> = list
        .0
        .lock()
        .map(|c| c.iter().map(|c| c.session.clone()).collect())
        .unwrap_or_default();
    merge_by_pid(
        sessions
            .iter()
            .filter_map(|s| s.lock().ok().map(|s| s.clone()))
            .collect(),
    )
}
