//! What the tests of `anyprof serve` share: starting the daemon, and talking HTTP to it.
//!
//! Several test files (`serve.rs`, `security_http.rs`, `security_peer.rs`,
//! `security_preload.rs`, `robustness.rs`) run a real `anyprof serve` and query its
//! net/http/pprof endpoints. This module holds the one copy of what they need for that:
//!
//! * [`Daemon::serve`] builds an `anyprof serve --socket SOCKET --http HOST:PORT ARGS...` run
//!   (its stderr in a file, optionally under another umask or another user), starts it and
//!   waits until a readiness probe answers; the [`Daemon`] it returns is killed when dropped.
//! * [`Request`] is a minimal HTTP/1.1 client (`Connection: close`, Content-Length or chunked
//!   bodies, an overall timeout) that gives back a [`Reply`] (status, headers, body); the
//!   `Host` header, the address and extra header lines can be set for the tests that attack
//!   the daemon's checks of them. [`get`], [`post`] and [`request`] are its short forms for
//!   `127.0.0.1:PORT`, and [`parse_reply`] reads a response another client printed.
//! * [`free_port`] picks a loopback port, [`poll`] and [`wait_for`] wait for a condition.
//!
//! It is deliberately small and dependency-free (std and libc): the tests check the daemon's
//! HTTP handling byte by byte, so the client must send exactly what the test says and nothing
//! a library would add. Like the rest of the harness it panics with a message that says what
//! went wrong.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{Error, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{binaries, clean_command};

/// Longest an HTTP request sent by [`get`] and [`post`] may take before the client gives up
/// (and the test fails).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Daemon::serve`] waits for a started daemon to answer its readiness probe.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

/// Calls `check` every `every` until it returns `Some` (that value), or until `timeout` has
/// passed (`None`). `check` is always called at least once.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Polls `check` every 100 ms until it returns `Ok`, or panics after `timeout` with `what`
/// and the last `Err` it returned.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let mut last = String::new();
    poll(timeout, Duration::from_millis(100), || {
        check().map_err(|e| last = e).ok()
    })
    .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}; last state: {last}"))
}

/// A free TCP port on loopback (bound, read and released; the daemon binds it next).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    listener.local_addr().expect("local address").port()
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// One HTTP response.
#[derive(Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The header lines, names and values trimmed, in the order they came.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Reply {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Status, headers and (the start of) the body, for failure messages.
    pub fn show(&self) -> String {
        let mut out = format!("HTTP {}\n", self.status);
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\n"));
        }
        let printable = self
            .body
            .iter()
            .take(2000)
            .all(|&b| b == b'\n' || b == b'\t' || b == 0 || (0x20..0x7f).contains(&b));
        if printable {
            let text = self.text();
            let cut: String = text.chars().take(2000).collect();
            out.push_str(&format!("\n{cut}"));
        } else {
            out.push_str(&format!("\n<{} bytes of binary data>", self.body.len()));
        }
        out
    }

    /// The pids listed in the body, read as the daemon's HTML index (the first cell of each
    /// `<tr><td>` row).
    pub fn index_pids(&self) -> BTreeSet<u32> {
        index_pids(&self.text())
    }
}

/// The pids listed in the daemon's HTML index `html` (the first cell of each row).
pub fn index_pids(html: &str) -> BTreeSet<u32> {
    html.split("<tr><td>")
        .skip(1)
        .filter_map(|row| row.split("</td>").next()?.trim().parse().ok())
        .collect()
}

/// One request: `METHOD PATH HTTP/1.1` with `Host`, `User-Agent: anyprof-tests`,
/// `Accept-Encoding: identity`, the extra header lines, `Connection: close` and (for a body)
/// `Content-Type` and `Content-Length`. Build it with [`Request::new`] and the setters, send
/// it with [`Request::send`].
#[derive(Debug, Clone)]
pub struct Request {
    addr: SocketAddr,
    method: String,
    path: String,
    host: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Duration,
    connect_timeout: Option<Duration>,
}

impl Request {
    /// `METHOD PATH` to `127.0.0.1:PORT` with `Host: 127.0.0.1:PORT`, no body, and a timeout
    /// of [`HTTP_TIMEOUT`].
    pub fn new(method: &str, port: u16, path: &str) -> Request {
        Request {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            method: method.to_string(),
            path: path.to_string(),
            host: format!("127.0.0.1:{port}"),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: HTTP_TIMEOUT,
            connect_timeout: None,
        }
    }

    /// Sends to `addr` instead (the `Host` header stays as it is).
    pub fn addr(mut self, addr: SocketAddr) -> Request {
        self.addr = addr;
        self
    }

    /// The `Host` header's value, sent as given.
    pub fn host(mut self, host: &str) -> Request {
        self.host = host.to_string();
        self
    }

    /// One more header line `name: value`.
    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The body; a request with a body also sends `Content-Type: application/octet-stream`
    /// and its `Content-Length`.
    pub fn body(mut self, body: &[u8]) -> Request {
        self.body = body.to_vec();
        self
    }

    /// How long connecting, sending and reading the whole response may take together.
    pub fn timeout(mut self, timeout: Duration) -> Request {
        self.timeout = timeout;
        self
    }

    /// How long connecting may take (the whole [`Request::timeout`] unless set).
    pub fn connect_timeout(mut self, timeout: Duration) -> Request {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Sends the request and reads the whole response: an error if none (a complete one)
    /// arrives within the timeout.
    pub fn send(&self) -> std::io::Result<Reply> {
        let (method, path, timeout) = (&self.method, &self.path, self.timeout);
        let deadline = Instant::now() + timeout;
        let mut stream =
            TcpStream::connect_timeout(&self.addr, self.connect_timeout.unwrap_or(timeout))?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: anyprof-tests\r\n\
             Accept-Encoding: identity\r\n",
            self.host
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("Connection: close\r\n");
        if !self.body.is_empty() || method == "POST" {
            head.push_str(&format!(
                "Content-Type: application/octet-stream\r\nContent-Length: {}\r\n",
                self.body.len()
            ));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(&self.body)?;
        let mut raw = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    raw.extend_from_slice(&buf[..n]);
                    if response_complete(&raw) {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "{method} {path}: no complete response within {timeout:?} ({} bytes so \
                         far)",
                        raw.len()
                    ),
                ));
            }
        }
        parse_reply(&raw).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidData,
                format!(
                    "{method} {path}: malformed HTTP response ({} bytes): {:?}",
                    raw.len(),
                    String::from_utf8_lossy(&raw[..raw.len().min(500)])
                ),
            )
        })
    }
}

/// `METHOD PATH` to `127.0.0.1:PORT` with `body`, and `timeout` for the whole exchange.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<Reply> {
    Request::new(method, port, path)
        .body(body)
        .timeout(timeout)
        .send()
}

/// GET `path` from `127.0.0.1:PORT`, panicking if no response arrives within
/// [`HTTP_TIMEOUT`].
pub fn get(port: u16, path: &str) -> Reply {
    request(port, "GET", path, b"", HTTP_TIMEOUT)
        .unwrap_or_else(|e| panic!("GET http://127.0.0.1:{port}{path} failed: {e}"))
}

/// POST `body` to `path` on `127.0.0.1:PORT`, panicking if no response arrives within
/// [`HTTP_TIMEOUT`].
pub fn post(port: u16, path: &str, body: &[u8]) -> Reply {
    request(port, "POST", path, body, HTTP_TIMEOUT)
        .unwrap_or_else(|e| panic!("POST http://127.0.0.1:{port}{path} failed: {e}"))
}

fn header_end(raw: &[u8]) -> Option<usize> {
    raw.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Whether `raw` holds a whole response: its headers, then Content-Length bytes or a final
/// chunk. Without either, the response ends when the server closes the connection.
fn response_complete(raw: &[u8]) -> bool {
    let Some(end) = header_end(raw) else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return raw.len() >= end + len;
    }
    if head.contains("transfer-encoding: chunked") {
        return raw.ends_with(b"0\r\n\r\n");
    }
    false
}

/// Parses a whole response (status line, headers, then a Content-Length, chunked or
/// read-to-the-end body); `None` if it is malformed or shorter than it says.
pub fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let end = header_end(raw)?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(len) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        if body.len() < len {
            return None;
        }
        body.truncate(len);
    }
    Some(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

// ---------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------

/// How a test wants `anyprof serve` started; made by [`Daemon::serve`], run by
/// [`DaemonBuilder::start`] (or [`DaemonBuilder::spawn`]).
pub struct DaemonBuilder<'a> {
    stderr_path: PathBuf,
    socket: Option<PathBuf>,
    http_host: String,
    port: Option<u16>,
    args: Vec<OsString>,
    env_remove: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    umask: Option<libc::mode_t>,
    user: Option<(u32, u32)>,
    probe: Option<Box<dyn Fn(u16) -> bool + 'a>>,
}

impl<'a> DaemonBuilder<'a> {
    /// `--socket PATH` (none by default: the daemon picks its own).
    pub fn socket(mut self, path: &Path) -> Self {
        self.socket = Some(path.to_path_buf());
        self
    }

    /// The address part of `--http HOST:PORT` (`127.0.0.1` by default).
    pub fn http_host(mut self, host: &str) -> Self {
        self.http_host = host.to_string();
        self
    }

    /// The port of `--http`: this one, tried once. By default a [`free_port`], and if the
    /// daemon exits at start (someone else took the port) another one, up to three times.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// More arguments after `--http` (`--allow-uid`, `--max-seconds`, `-v`, ...).
    pub fn args<S: AsRef<std::ffi::OsStr>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Sets `key` to `value` in the daemon's environment.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Removes `key` from the daemon's environment (which is otherwise
    /// [`clean_command`]'s).
    pub fn env_remove(mut self, key: &str) -> Self {
        self.env_remove.push(key.into());
        self
    }

    /// Starts the daemon with this umask (set between fork and exec). With 0 its socket file
    /// is connectable by any uid, whatever the daemon's own policy for it.
    pub fn umask(mut self, umask: libc::mode_t) -> Self {
        self.umask = Some(umask);
        self
    }

    /// Runs the daemon as `uid:gid` (std also drops the supplementary groups).
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// When the daemon counts as ready: `probe(port)` returns true. By default: `GET
    /// /debug/pprof/` answers 200 within 5 s, and the `--socket` file (if given) exists.
    pub fn probe(mut self, probe: impl Fn(u16) -> bool + 'a) -> Self {
        self.probe = Some(Box::new(probe));
        self
    }

    /// Starts the daemon on `port` and returns at once, ready or not.
    pub fn spawn(&self, port: u16) -> Daemon {
        let bins = binaries();
        let stderr = std::fs::File::create(&self.stderr_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", self.stderr_path.display()));
        let mut cmd = clean_command(&bins.anyprof);
        for key in &self.env_remove {
            cmd.env_remove(key);
        }
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        cmd.arg("serve");
        if let Some(socket) = &self.socket {
            cmd.arg("--socket").arg(socket);
        }
        cmd.arg("--http")
            .arg(format!("{}:{port}", self.http_host))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(umask) = self.umask {
            // SAFETY: the closure runs in the forked child before exec and only calls
            // umask(2), which is async-signal-safe and cannot fail.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(umask);
                    Ok(())
                });
            }
        }
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bins.anyprof.display()));
        Daemon {
            pid: child.id(),
            child,
            port,
            stderr_path: self.stderr_path.clone(),
        }
    }

    /// Starts the daemon and waits until it is ready; panics if it is not within
    /// [`READY_TIMEOUT`] or could not be started (with its stderr).
    pub fn start(&self) -> Daemon {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`DaemonBuilder::start`], with the failure as an error (what happened and the daemon's
    /// stderr) instead of a panic.
    pub fn try_start(&self) -> Result<Daemon, String> {
        // A port picked by free_port() may be taken by someone else before the daemon binds
        // it: then try another one. A port given by the caller is used as is.
        let attempts = if self.port.is_some() { 1 } else { 3 };
        let mut last_failure = String::new();
        for _ in 0..attempts {
            let port = self.port.unwrap_or_else(free_port);
            let mut daemon = self.spawn(port);
            let start = Instant::now();
            loop {
                if let Some(status) = daemon.try_wait() {
                    last_failure = format!(
                        "anyprof serve exited with {status} at start; stderr:\n{}",
                        daemon.stderr()
                    );
                    break;
                }
                if self.is_ready(port) {
                    return Ok(daemon);
                }
                if start.elapsed() > READY_TIMEOUT {
                    return Err(format!(
                        "anyprof serve did not answer on port {port} within {READY_TIMEOUT:?}; \
                         stderr:\n{}",
                        daemon.stderr()
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Err(format!("could not start anyprof serve: {last_failure}"))
    }

    fn is_ready(&self, port: u16) -> bool {
        match &self.probe {
            Some(probe) => probe(port),
            None => {
                request(port, "GET", "/debug/pprof/", b"", Duration::from_secs(5))
                    .is_ok_and(|reply| reply.status == 200)
                    && self.socket.as_ref().is_none_or(|s| s.exists())
            }
        }
    }
}

/// A running `anyprof serve`; killed (SIGKILL) and reaped when dropped.
pub struct Daemon {
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// The port of its `--http` address.
    pub port: u16,
    stderr_path: PathBuf,
}

impl Daemon {
    /// A daemon to start with its stderr in `stderr_path`; see [`DaemonBuilder`] for the rest.
    pub fn serve<'a>(stderr_path: &Path) -> DaemonBuilder<'a> {
        DaemonBuilder {
            stderr_path: stderr_path.to_path_buf(),
            socket: None,
            http_host: "127.0.0.1".to_string(),
            port: None,
            args: Vec::new(),
            env_remove: Vec::new(),
            env: Vec::new(),
            umask: None,
            user: None,
            probe: None,
        }
    }

    /// What the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) only takes two integers; the pid is our own child, which we have
        // not reaped yet (so it cannot have been reused).
        unsafe {
            libc::kill(self.pid as libc::pid_t, signal);
        }
    }

    /// Its exit status if it has exited (and is now reaped), else `None`.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for it to exit, however long that takes.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("waiting for the daemon")
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll(timeout, Duration::from_millis(20), || self.try_wait())
    }

    /// SIGTERM, then waits (up to 10 s) for it to exit; returns the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let status = self.wait_timeout(Duration::from_secs(10));
        status.unwrap_or_else(|| {
            panic!(
                "anyprof serve (pid {}) did not exit within 10 s of SIGTERM; stderr:\n{}",
                self.pid,
                self.stderr()
            )
        })
    }

    /// Its threads and open descriptors now.
    pub fn counts(&self) -> (usize, usize) {
        (
            count_entries(&format!("/proc/{}/task", self.pid)),
            count_entries(&format!("/proc/{}/fd", self.pid)),
        )
    }

    /// Its threads and open descriptors, each the minimum of 5 readings 200 ms apart (so a
    /// thread or descriptor that only exists for an instant does not count).
    pub fn settled_counts(&self) -> (usize, usize) {
        let mut tasks = usize::MAX;
        let mut fds = usize::MAX;
        for i in 0..5 {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            let (t, f) = self.counts();
            tasks = tasks.min(t);
            fds = fds.min(f);
        }
        (tasks, fds)
    }

    /// Its VmRSS, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "reading {path}: {e}; the daemon's stderr:\n{}",
                self.stderr()
            )
        });
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {path}:\n{status}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
        .count()
}
