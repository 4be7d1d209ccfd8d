//! The pprof endpoints of `anyprof serve`: net/http/pprof's endpoints, per process. This
//! module answers one request at a time, blocking (profiles take seconds); the HTTP server
//! around it, its limits and who the requester is are in [`super::server`] and
//! [`super::access`].
//!
//! A process is chosen with `?pid=N` or a `/pid/N` prefix (`/pid/N/debug/pprof/heap`); with
//! one process visible to the requester the pid may be left out. A process the requester may
//! not see answers exactly like a pid that is not connected. Content types,
//! `Content-Disposition` and error responses (`X-Go-Pprof: 1`, text body) are Go's, so
//! `go tool pprof` treats this server like a Go program's.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyprof_symbolizer::Symbolizer;
use anyprof_wire::Command;

use super::access::{self, Viewer};
use crate::collect::{Collector, ProcessInfo};
use crate::ingest::Session;
use crate::profile;

/// Requests' shared state.
pub struct State {
    collector: Arc<Collector>,
    symbolizer: Mutex<Symbolizer>,
    /// The long requests in progress, by kind and pid: at most one of each per process.
    busy: Mutex<HashSet<(LongKind, u32)>>,
    next_dump: AtomicU32,
    max_seconds: u64,
    /// Set when the daemon ends: long requests stop waiting and answer with what they have.
    stopping: AtomicBool,
    /// Whose requests may profile a process that is not preloaded.
    attach: AttachPolicy,
}

/// Whose requests may CPU-profile a process that runs without the preload, by attaching to
/// it with perf events (`--attach`). The rule: a local user may profile the processes it
/// could ptrace, as it sees preloaded ones ([`crate::serve::access::may_trace`]); root and
/// token holders, who see every preloaded process, attach to others only where configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachPolicy {
    /// Only preloaded processes are profiled.
    Off,
    /// A local user's requests attach to the processes that user could ptrace.
    Own,
    /// As `own`, and root's and token holders' requests attach to every process.
    Any,
}

impl State {
    /// State for a daemon whose CPU profiles may last at most `max_seconds`.
    pub fn new(collector: Arc<Collector>, max_seconds: u64) -> State {
        State {
            collector,
            symbolizer: Mutex::new(crate::symbolize::serve_symbolizer()),
            busy: Mutex::new(HashSet::new()),
            next_dump: AtomicU32::new(1),
            max_seconds,
            stopping: AtomicBool::new(false),
            attach: AttachPolicy::Own,
        }
    }

    /// The same state with attach policy `policy`.
    pub fn attaching(mut self, policy: AttachPolicy) -> State {
        self.attach = policy;
        self
    }

    /// Ends the long requests in progress early (they answer with what they have) and stops
    /// the CPU sampling they started: the daemon is ending.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let pids: Vec<u32> = match self.busy.lock() {
            Ok(busy) => busy
                .iter()
                .filter(|(kind, _)| *kind == LongKind::Cpu)
                .map(|&(_, pid)| pid)
                .collect(),
            Err(_) => return,
        };
        for pid in pids {
            let _ = self.collector.command(pid, Command::CpuStop);
        }
    }

    /// Sleeps until `deadline`, or less if the daemon is ending or `done` says so.
    fn wait_until(&self, deadline: Instant, mut done: impl FnMut() -> bool) {
        while Instant::now() < deadline && !self.stopping.load(Ordering::SeqCst) && !done() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Largest request body read (the `symbol` POST).
pub const MAX_BODY: usize = 64 * 1024;
/// CPU sampling rate of `profile` requests, as Go's `StartCPUProfile`.
const PROFILE_HZ: u32 = 100;

/// The requests that last `?seconds=`: each kind runs at most once per process at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LongKind {
    /// `profile` (30 s without `?seconds=`).
    Cpu,
    /// `heap?seconds=N`.
    HeapDelta,
    /// `allocs?seconds=N`.
    AllocsDelta,
}

impl LongKind {
    fn describe(self) -> &'static str {
        match self {
            LongKind::Cpu => "CPU profile",
            LongKind::HeapDelta => "heap delta profile (heap?seconds=N)",
            LongKind::AllocsDelta => "allocs delta profile (allocs?seconds=N)",
        }
    }
}

/// Whether a request target is a long request (one that waits `?seconds=`), and which kind.
/// The server runs these apart from the short requests, so they cannot take every worker.
pub fn long_kind(url: &str) -> Option<LongKind> {
    let t = parse_target(url).ok()??;
    match t.name.as_str() {
        "profile" => Some(LongKind::Cpu),
        "heap" if t.param("seconds").is_some() => Some(LongKind::HeapDelta),
        "allocs" if t.param("seconds").is_some() => Some(LongKind::AllocsDelta),
        _ => None,
    }
}

/// Marks a long request of one kind as running for one process, until dropped.
struct Busy<'a> {
    state: &'a State,
    key: (LongKind, u32),
}

impl<'a> Busy<'a> {
    fn claim(state: &'a State, kind: LongKind, pid: u32) -> Result<Busy<'a>, HttpError> {
        let mut busy = state.busy.lock().map_err(|_| err(500, "state poisoned"))?;
        if !busy.insert((kind, pid)) {
            return Err(match kind {
                // Go's words, so that pprof users recognise them.
                LongKind::Cpu => err(
                    500,
                    format!(
                        "Could not enable CPU profiling: cpu profiling already in use for pid \
                         {pid}"
                    ),
                ),
                _ => err(
                    409,
                    format!(
                        "a {} of pid {pid} is already in progress: one at a time per process; \
                         try again when it has finished",
                        kind.describe()
                    ),
                ),
            });
        }
        Ok(Busy {
            state,
            key: (kind, pid),
        })
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.state.busy.lock() {
            busy.remove(&self.key);
        }
    }
}

/// An HTTP error with the reason shown to the client.
struct HttpError(u16, String);

fn err(code: u16, msg: impl Into<String>) -> HttpError {
    HttpError(code, msg.into())
}

/// One response: status, headers and body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Header names and values.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    fn ok(headers: Vec<(&'static str, String)>, body: Vec<u8>) -> Response {
        Response {
            status: 200,
            headers,
            body,
        }
    }

    /// An error as net/http/pprof sends it: the reason as text, `X-Go-Pprof: 1`.
    pub fn error(status: u16, msg: &str) -> Response {
        Response {
            status,
            headers: vec![
                ("Content-Type", "text/plain; charset=utf-8".into()),
                ("X-Go-Pprof", "1".into()),
                ("X-Content-Type-Options", "nosniff".into()),
            ],
            body: format!("{msg}\n").into_bytes(),
        }
    }
}

type Reply = Result<Response, HttpError>;

fn binary(name: &str, bytes: Vec<u8>) -> Reply {
    Ok(Response::ok(
        vec![
            ("Content-Type", "application/octet-stream".into()),
            (
                "Content-Disposition",
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        bytes,
    ))
}

fn text(body: String) -> Reply {
    Ok(Response::ok(
        vec![
            ("Content-Type", "text/plain; charset=utf-8".into()),
            ("X-Content-Type-Options", "nosniff".into()),
        ],
        body.into_bytes(),
    ))
}

fn html(body: String) -> Reply {
    Ok(Response::ok(
        vec![("Content-Type", "text/html; charset=utf-8".into())],
        body.into_bytes(),
    ))
}

/// Who asks, as the handlers need it.
pub struct Requester {
    /// Which processes they may see.
    pub viewer: Viewer,
    /// The token they passed in the query, repeated in the index's links.
    pub token_in_query: Option<String>,
}

/// Answers one request (blocking: profiles take their `?seconds=`); errors become Go-style
/// error responses.
pub fn handle(state: &State, who: &Requester, post: bool, url: &str, body: &[u8]) -> Response {
    let ctx = Ctx { state, who };
    route(&ctx, post, url, body).unwrap_or_else(|HttpError(code, msg)| Response::error(code, &msg))
}

/// A request's shared state and requester.
struct Ctx<'a> {
    state: &'a State,
    who: &'a Requester,
}

impl std::ops::Deref for Ctx<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.state
    }
}

impl Ctx<'_> {
    /// The connected processes the requester may see.
    fn processes(&self) -> Vec<ProcessInfo> {
        let mut all = self.collector.processes();
        all.retain(|p| self.who.viewer.sees(p.pid));
        all
    }
}

/// Parsed request target: path below `/debug/pprof/`, query parameters, chosen pid.
struct Target {
    name: String,
    query: Vec<(String, String)>,
    pid: Option<u32>,
}

impl Target {
    fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn debug(&self) -> Result<u32, HttpError> {
        match self.param("debug") {
            None | Some("") => Ok(0),
            Some(v) => v
                .parse()
                .map_err(|_| err(400, format!("debug={v}: not a number"))),
        }
    }
}

fn parse_target(url: &str) -> Result<Option<Target>, HttpError> {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let query: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let mut pid = None;
    let mut rest = path;
    if let Some(after) = path.strip_prefix("/pid/") {
        let (num, tail) = after.split_once('/').unwrap_or((after, ""));
        pid = Some(
            num.parse::<u32>()
                .map_err(|_| err(400, format!("/pid/{num}: not a process id")))?,
        );
        rest = if tail.is_empty() {
            "/"
        } else {
            &path[path.len() - tail.len() - 1..]
        };
    }
    if let Some((_, v)) = query.iter().rev().find(|(k, _)| k == "pid") {
        pid = Some(
            v.parse::<u32>()
                .map_err(|_| err(400, format!("pid={v}: not a process id")))?,
        );
    }
    let Some(name) = rest.strip_prefix("/debug/pprof") else {
        return Ok(None);
    };
    Ok(Some(Target {
        name: name.trim_start_matches('/').to_string(),
        query,
        pid,
    }))
}

fn route(state: &Ctx, post: bool, url: &str, body: &[u8]) -> Reply {
    let Some(t) = parse_target(url)? else {
        if url == "/" || url.starts_with("/?") {
            return index(state, None);
        }
        return Err(err(404, "not found: anyprof serves /debug/pprof/"));
    };
    match t.name.as_str() {
        "" => index(state, t.pid),
        "cmdline" => cmdline(state, &t),
        "symbol" => symbol(state, &t, post, body),
        "profile" => cpu_profile(state, &t),
        "heap" => heap(state, &t, profile::heap::View::Heap),
        "allocs" => heap(state, &t, profile::heap::View::Allocs),
        "threads" | "goroutine" => threads(state, &t),
        "threadcreate" => threadcreate(state, &t),
        "block" | "mutex" | "trace" => {
            Err(err(404, format!("profile {} is not supported yet", t.name)))
        }
        other => Err(err(404, format!("unknown profile {other}"))),
    }
}

/// The process a request is about: the one it names, or the only one the requester may see.
/// A process the requester may not see is answered like one that is not connected.
fn choose_pid(state: &Ctx, t: &Target) -> Result<u32, HttpError> {
    let processes = state.processes();
    match t.pid {
        Some(pid) if processes.iter().any(|p| p.pid == pid) => Ok(pid),
        Some(pid) => Err(err(
            404,
            format!("unknown pid {pid}: no such process is connected to anyprof serve"),
        )),
        None => match processes.as_slice() {
            [only] => Ok(only.pid),
            [] => Err(err(
                404,
                match state.who.viewer {
                    Viewer::All => "no process is connected to anyprof serve".to_string(),
                    Viewer::Uid(uid) => format!(
                        "no process is connected to anyprof serve that uid {uid} may see \
                         (a user sees the processes it could ptrace)"
                    ),
                },
            )),
            _ => Err(err(
                400,
                format!(
                    "{} processes are connected: choose one with ?pid=N (see /debug/pprof/)",
                    processes.len()
                ),
            )),
        },
    }
}

fn snapshot(state: &State, pid: u32) -> Result<Session, HttpError> {
    let shared = state
        .collector
        .session_of(pid)
        .ok_or_else(|| err(404, format!("process {pid} disconnected")))?;
    let s = shared
        .lock()
        .map_err(|_| err(500, "session state poisoned"))?
        .clone();
    Ok(s)
}

/// The daemon's symbolizer. One left poisoned by a panic (a bug that
/// [`crate::symbolize::symbolize_guarded`] did not catch) is replaced by a fresh one, so that
/// the next request still gets names.
fn symbolizer(state: &State) -> Result<std::sync::MutexGuard<'_, Symbolizer>, HttpError> {
    Ok(state.symbolizer.lock().unwrap_or_else(|poisoned| {
        let mut fresh = poisoned.into_inner();
        *fresh = crate::symbolize::serve_symbolizer();
        state.symbolizer.clear_poison();
        fresh
    }))
}

fn index(state: &Ctx, pid: Option<u32>) -> Reply {
    let processes = state.processes();
    // The token, when it came in the query, goes into every link, so that the links work.
    let token = state
        .who
        .token_in_query
        .as_deref()
        .map(|t| format!("&token={}", escape(t)))
        .unwrap_or_default();
    let mut out = String::from(
        "<html><head><title>/debug/pprof/</title></head><body>\n<p>anyprof serve: profiles of \
         connected processes. Pick a process, then a profile.</p>\n",
    );
    if let Viewer::Uid(uid) = state.who.viewer {
        out.push_str(&format!(
            "<p>Requests from uid {uid}: the processes that uid could ptrace (root sees all).\
             </p>\n"
        ));
    }
    out.push_str("<table>\n");
    for p in &processes {
        if pid.is_some_and(|want| want != p.pid) {
            continue;
        }
        let q = format!("pid={}", p.pid);
        out.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>",
            p.pid,
            escape(&p.cmdline)
        ));
        for (name, extra) in [
            ("profile", "&seconds=30"),
            ("heap", ""),
            ("allocs", ""),
            ("threads", "&debug=2"),
            ("threadcreate", ""),
            ("cmdline", ""),
        ] {
            out.push_str(&format!(
                "<a href=\"/debug/pprof/{name}?{q}{extra}{token}\">{name}</a> "
            ));
        }
        out.push_str("</td></tr>\n");
    }
    // A process that is not preloaded, which the requester may profile by attaching: its
    // CPU profile is all there is.
    if let Some(pid) = pid.filter(|&p| !processes.iter().any(|c| c.pid == p)) {
        may_attach(state, pid)?;
        let cmdline = crate::attach::procfs::exe_and_cmdline(pid).1;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        out.push_str(&format!(
            "<tr><td>{pid}</td><td>{} (not preloaded: CPU profile only, with perf events)</td>\
             <td><a href=\"/debug/pprof/profile?pid={pid}&seconds=30{token}\">profile</a></td></tr>\n",
            escape(cmdline.trim_end())
        ));
    }
    out.push_str(
        "</table>\n<p>profile: CPU profile (?seconds=N, default 30). heap: live memory; \
                  allocs: all past allocations (same data, other default); both with \
                  ?seconds=N give what changed over the next N seconds. threads: every \
                  thread's current stack (debug=2 for text). threadcreate: where threads were \
                  created. cmdline: the command line.</p>\n</body></html>\n",
    );
    html(out)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn cmdline(state: &Ctx, t: &Target) -> Reply {
    let s = snapshot(state, choose_pid(state, t)?)?;
    let cmdline = s.hello.map(|h| h.cmdline).unwrap_or_default();
    text(String::from_utf8_lossy(&cmdline).into_owned())
}

/// `symbol`: GET answers `num_symbols: 1`; POST takes `0xADDR+0xADDR...` (runtime addresses
/// of the chosen process) and answers one `0xADDR name` line per address it knows.
fn symbol(state: &Ctx, t: &Target, post: bool, body: &[u8]) -> Reply {
    if !post {
        return text("num_symbols: 1\n".into());
    }
    let session = snapshot(state, choose_pid(state, t)?)?;
    let input = String::from_utf8_lossy(body);
    // pprof asks for the addresses of a profile's locations, which are already the ones to
    // look up (see StackKind::lookup_addresses).
    let addrs: Vec<crate::symbolize::RuntimeAddress> = input
        .split('+')
        .filter_map(|a| u64::from_str_radix(a.trim().trim_start_matches("0x"), 16).ok())
        .map(crate::symbolize::RuntimeAddress)
        .take(10_000)
        .collect();
    let (resolved, _) =
        crate::symbolize::resolve_all(&mut *symbolizer(state)?, &session, addrs.iter().copied());
    let mut out = String::new();
    for a in addrs {
        // An address without a name is left out, as pprof's symbolz expects (not given its
        // MODULE+0xADDR stand-in, which pprof would take for a function name).
        let named = resolved
            .get(&a)
            .filter(|r| !crate::unnamed::is_fallback(&r.lines));
        if let Some(line) = named.and_then(|r| r.lines.last()) {
            out.push_str(&format!("{a:#x} {}\n", line.name));
        }
    }
    text(out)
}

fn cpu_profile(state: &Ctx, t: &Target) -> Reply {
    let seconds: u64 = match t.param("seconds") {
        None | Some("") => 30,
        Some(v) => v
            .parse()
            .map_err(|_| err(400, format!("seconds={v}: not a whole number of seconds")))?,
    };
    within_max_seconds(state, seconds)?;
    if let Some(pid) = t
        .pid
        .filter(|&pid| state.collector.session_of(pid).is_none())
    {
        may_attach(state, pid)?;
        let _busy = Busy::claim(state, LongKind::Cpu, pid)?;
        return attach_cpu_profile(state, pid, seconds);
    }
    let pid = choose_pid(state, t)?;
    let _busy = Busy::claim(state, LongKind::Cpu, pid)?;
    run_cpu_profile(state, pid, seconds)
}

/// Whether the requester may profile `pid`, which is not preloaded, by attaching to it (see
/// [`AttachPolicy`]). A process it may not see answers as one that does not exist.
fn may_attach(state: &Ctx, pid: u32) -> Result<(), HttpError> {
    let unknown = || {
        err(
            404,
            format!("unknown pid {pid}: no such process is connected to anyprof serve"),
        )
    };
    match (state.attach, state.who.viewer) {
        (AttachPolicy::Off, _) => Err(unknown()),
        (_, Viewer::Uid(uid)) if access::may_trace(uid, pid) => Ok(()),
        (_, Viewer::Uid(_)) => Err(unknown()),
        (AttachPolicy::Any, Viewer::All) if crate::attach::procfs::is_running(pid) => Ok(()),
        (AttachPolicy::Any, Viewer::All) => Err(unknown()),
        (AttachPolicy::Own, Viewer::All) => Err(err(
            403,
            format!(
                "pid {pid} is not preloaded, and this daemon attaches to such processes only                  for the local user who could ptrace them: start anyprof serve with                  --attach any to let root and token holders profile every process"
            ),
        )),
    }
}

/// `profile` of a process that runs without the preload: perf events for `seconds` (see
/// [`crate::attach`]), in the same shape as a preloaded process's profile.
fn attach_cpu_profile(state: &State, pid: u32, seconds: u64) -> Reply {
    let profiling = crate::attach::start(&[pid], PROFILE_HZ)
        .map_err(|e| err(500, format!("Could not enable CPU profiling: {e:#}")))?;
    let attached = profiling.finish(Duration::from_secs(seconds), &state.stopping);
    let Some(a) = attached.first() else {
        return Err(err(500, "Could not enable CPU profiling"));
    };
    let s = &a.session;
    let duration = s.connected_for().unwrap_or(Duration::from_secs(seconds));
    let p = profile::cpu::build(s, &mut *symbolizer(state)?, duration.as_nanos() as u64);
    binary("profile", crate::pprof::encode_gzipped(&p))
}

fn run_cpu_profile(state: &State, pid: u32, seconds: u64) -> Reply {
    let shared = state
        .collector
        .session_of(pid)
        .ok_or_else(|| err(404, format!("process {pid} disconnected")))?;
    let counters_before = {
        let mut s = shared.lock().map_err(|_| err(500, "session poisoned"))?;
        s.take_cpu();
        s.counters.clone()
    };
    state
        .collector
        .command(pid, Command::CpuStart(PROFILE_HZ))
        .map_err(|e| err(500, format!("Could not enable CPU profiling: {e:#}")))?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    // Until the time is up, the process goes away (then: what it sent) or the daemon ends.
    state.wait_until(deadline, || {
        shared.lock().map(|s| s.closed_at.is_some()).unwrap_or(true)
    });
    let _ = state.collector.command(pid, Command::CpuStop);
    std::thread::sleep(Duration::from_millis(150)); // its last samples are in flight
    let mut session = {
        let mut s = shared.lock().map_err(|_| err(500, "session poisoned"))?;
        let copy = s.clone();
        s.take_cpu();
        copy
    };
    for (now, before) in session.counters.iter_mut().zip(&counters_before) {
        *now = now.saturating_sub(*before);
    }
    if let Some(h) = session.hello.as_mut() {
        h.cpu_hz = PROFILE_HZ;
        h.start_realtime_ns =
            crate::output::unix_nanos() as u64 - started.elapsed().as_nanos() as u64;
    }
    let p = profile::cpu::build(
        &session,
        &mut *symbolizer(state)?,
        started.elapsed().as_nanos() as u64,
    );
    binary("profile", crate::pprof::encode_gzipped(&p))
}

fn heap(state: &Ctx, t: &Target, view: profile::heap::View) -> Reply {
    let debug = t.debug()?; // ?gc=1 is accepted and ignored: there is no collector to run
    let delta = delta_seconds(state, t, debug)?;
    let pid = choose_pid(state, t)?;
    let session = snapshot(state, pid)?;
    if session.hello.as_ref().is_some_and(|h| h.mem_rate == 0) {
        return Err(err(
            404,
            "heap profiling is disabled in this process (ANYPROF_MEM_RATE=0)",
        ));
    }
    let name = if view == profile::heap::View::Heap {
        "heap"
    } else {
        "allocs"
    };
    if let Some(seconds) = delta {
        let kind = match view {
            profile::heap::View::Heap => LongKind::HeapDelta,
            profile::heap::View::Allocs => LongKind::AllocsDelta,
        };
        let _busy = Busy::claim(state, kind, pid)?;
        // Go's delta profile: a snapshot now, another after `seconds`, the difference.
        let started = crate::output::unix_nanos();
        state.wait_until(Instant::now() + Duration::from_secs(seconds), || false);
        let later = snapshot(state, pid)?;
        let now = crate::output::unix_nanos();
        let p = profile::heap::build_delta(
            &session,
            &later,
            &mut *symbolizer(state)?,
            view,
            now,
            now - started,
        );
        return binary(&format!("{name}-delta"), crate::pprof::encode_gzipped(&p));
    }
    if debug > 0 {
        return text(profile::heap::legacy_text(
            &session,
            &mut *symbolizer(state)?,
        ));
    }
    let p = profile::heap::build(
        &session,
        &mut *symbolizer(state)?,
        view,
        crate::output::unix_nanos(),
    );
    binary(name, crate::pprof::encode_gzipped(&p))
}

/// `?seconds=N` on a named profile (Go >= 1.16): a delta profile over N seconds. None
/// without the parameter; errors as net/http/pprof words them.
fn delta_seconds(state: &State, t: &Target, debug: u32) -> Result<Option<u64>, HttpError> {
    let Some(v) = t.param("seconds") else {
        return Ok(None);
    };
    let seconds: u64 = match v.parse() {
        Ok(n) if n > 0 => n,
        _ => {
            return Err(err(
                400,
                "invalid value for \"seconds\" - must be a positive integer",
            ))
        }
    };
    if debug != 0 {
        return Err(err(400, "seconds and debug params are incompatible"));
    }
    within_max_seconds(state, seconds)?;
    Ok(Some(seconds))
}

/// The daemon's bound on how long one request may profile (`--max-seconds`), for the CPU
/// profile and the delta profiles alike.
fn within_max_seconds(state: &State, seconds: u64) -> Result<(), HttpError> {
    if seconds == 0 || seconds > state.max_seconds {
        return Err(err(
            400,
            format!(
                "seconds={seconds}: must be between 1 and {} (anyprof serve --max-seconds)",
                state.max_seconds
            ),
        ));
    }
    Ok(())
}

/// Go answers `?seconds=N` on goroutine and threadcreate with a delta profile too; anyprof
/// does not yet, and says so rather than ignore the parameter.
fn no_delta(t: &Target) -> Result<(), HttpError> {
    match t.param("seconds") {
        None => Ok(()),
        Some(_) => Err(err(
            400,
            format!(
                "\"seconds\" parameter is not supported for this profile type ({}) in anyprof \
                 yet; heap and allocs take it",
                t.name
            ),
        )),
    }
}

fn threads(state: &Ctx, t: &Target) -> Reply {
    no_delta(t)?;
    let debug = t.debug()?;
    let pid = choose_pid(state, t)?;
    let id = state.next_dump.fetch_add(1, Ordering::Relaxed);
    state
        .collector
        .command(pid, Command::ThreadDump(id))
        .map_err(|e| err(500, format!("{e:#}")))?;
    // The process answers within a few drain cycles; wait until the dump stops growing.
    let shared = state
        .collector
        .session_of(pid)
        .ok_or_else(|| err(404, format!("process {pid} disconnected")))?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = usize::MAX;
    loop {
        std::thread::sleep(Duration::from_millis(60));
        let n = shared
            .lock()
            .map(|s| s.thread_dumps.get(&id).map_or(0, Vec::len))
            .unwrap_or(0);
        if (n > 0 && n == last) || Instant::now() >= deadline {
            break;
        }
        last = n;
    }
    let mut session = {
        let mut s = shared.lock().map_err(|_| err(500, "session poisoned"))?;
        let copy = s.clone();
        s.take_thread_dump(id);
        copy
    };
    session.thread_dumps.retain(|k, _| *k == id);
    let mut sym = symbolizer(state)?;
    match debug {
        0 => binary(
            "threads",
            crate::pprof::encode_gzipped(&profile::threads::dump_profile(
                &session,
                &mut sym,
                id,
                crate::output::unix_nanos(),
            )),
        ),
        _ => text(profile::threads::dump_text(&session, &mut sym, id)),
    }
}

fn threadcreate(state: &Ctx, t: &Target) -> Reply {
    no_delta(t)?;
    let session = snapshot(state, choose_pid(state, t)?)?;
    let p = profile::threads::create_profile(
        &session,
        &mut *symbolizer(state)?,
        crate::output::unix_nanos(),
    );
    binary("threadcreate", crate::pprof::encode_gzipped(&p))
}

#[cfg(test)]
mod tests {
    use super::parse_target;

    #[test]
    fn targets_name_the_profile_and_the_process() {
        let t = parse_target("/debug/pprof/heap?gc=1&pid=42")
            .ok()
            .flatten()
            .unwrap();
        assert_eq!((t.name.as_str(), t.pid), ("heap", Some(42)));
        let t = parse_target("/pid/7/debug/pprof/profile?seconds=2")
            .ok()
            .flatten()
            .unwrap();
        assert_eq!(
            (t.name.as_str(), t.pid, t.param("seconds")),
            ("profile", Some(7), Some("2"))
        );
        let t = parse_target("/debug/pprof/").ok().flatten().unwrap();
        assert_eq!((t.name.as_str(), t.pid), ("", None));
        assert!(parse_target("/pid/x/debug/pprof/heap").is_err());
        assert!(parse_target("/metrics").ok().flatten().is_none());
    }
}
