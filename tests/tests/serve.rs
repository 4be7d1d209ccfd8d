//! `anyprof serve` end to end: a real daemon, real preloaded processes
//! (`tests/programs/serve_worker.c`, whose header states what each one does) and real HTTP
//! clients (the harness's small HTTP/1.1 client, `anyprof_tests::daemon`, and `go tool pprof`).
//!
//! * [`every_endpoint_answers_for_one_of_three_processes`]: status, headers and content of
//!   every net/http/pprof endpoint for one process while three are connected.
//! * [`go_tool_pprof_fetches_cpu_and_heap_profiles`]: Go's own client reads the CPU and heap
//!   profiles and names the program's hot functions.
//! * [`killed_process_daemon_restart_and_no_leaks`]: a process killed during its CPU profile,
//!   a daemon restarted under running processes (they reconnect by themselves), and no
//!   thread or descriptor left behind by processes that came and went.
//! * [`many_sequential_and_concurrent_requests`]: 200 requests in a row without memory
//!   growth, then 20 CPU profiles of 20 processes at once and 20 concurrent heap/threads
//!   requests.
//! * [`bad_requests_get_go_style_errors`]: 400/404/500 with `X-Go-Pprof: 1` and a reason.
//! * [`only_allowed_uids_may_connect`]: a process of a uid that is not allowed never shows up;
//!   with `--allow-uid` it does.
//!
//! Every test starts its own daemon on its own socket and a free port, and a guard kills every
//! child and daemon it started, whatever happens. The tests whose assertions depend on CPU
//! time hold the harness's [`cpu_lock`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyprof_tests::daemon::{
    self, get, post, request, wait_for, Daemon, DaemonBuilder, Reply, HTTP_TIMEOUT,
};
use anyprof_tests::{
    binaries, clean_command, compile, cpu_lock, scratch_dir, skip_outside_ci, ProfileView,
};

/// The test program, and the names its header promises.
const WORKER_SOURCE: &str = "serve_worker.c";
const HOT_FN: &str = "serve_hot_spin";
const ALLOC_FN: &str = "serve_alloc_site";
const HELPER_FN: &str = "serve_helper_loop";
const HELPER_THREAD: &str = "serve-helper";

/// anyprof's default heap sampling rate (Go's MemProfileRate).
const DEFAULT_MEM_RATE: i64 = 512 * 1024;

/// Go's heap/allocs sample types, in Go's order.
const HEAP_SAMPLE_TYPES: [(&str, &str); 4] = [
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
];

/// How long a process may take to show up in the daemon's index (it connects at start, or
/// within about a second of a daemon (re)start; this is generous for a loaded machine).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Checking responses
// ---------------------------------------------------------------------------------------

/// Checks a 200 binary pprof response (`Content-Type`, `Content-Disposition`, gzip) and
/// decodes it.
fn pprof_reply(reply: &Reply, what: &str, filename: &str) -> ProfileView {
    assert_eq!(reply.status, 200, "{what}: expected 200\n{}", reply.show());
    assert_eq!(
        reply.header("Content-Type"),
        Some("application/octet-stream"),
        "{what}: Content-Type\n{}",
        reply.show()
    );
    let disposition = format!("attachment; filename=\"{filename}\"");
    assert_eq!(
        reply.header("Content-Disposition"),
        Some(disposition.as_str()),
        "{what}: Content-Disposition\n{}",
        reply.show()
    );
    assert!(
        reply.body.starts_with(&[0x1f, 0x8b]),
        "{what}: the body is not gzipped ({} bytes)",
        reply.body.len()
    );
    let profile = anyprof::pprof::decode(&reply.body)
        .unwrap_or_else(|e| panic!("{what}: the body is not a pprof profile: {e:#}"));
    ProfileView::new(profile)
}

/// Checks a 200 `text/plain` response and returns its body.
fn text_reply(reply: &Reply, what: &str) -> String {
    assert_eq!(reply.status, 200, "{what}: expected 200\n{}", reply.show());
    assert_eq!(
        reply.header("Content-Type"),
        Some("text/plain; charset=utf-8"),
        "{what}: Content-Type\n{}",
        reply.show()
    );
    assert!(
        reply.header("Content-Disposition").is_none(),
        "{what}: a text response has no Content-Disposition\n{}",
        reply.show()
    );
    reply.text()
}

/// Checks a Go-style error: the status, `X-Go-Pprof: 1`, a text body containing `reason`.
fn assert_go_error(reply: &Reply, status: u16, reason: &str, what: &str) {
    assert_eq!(
        reply.status,
        status,
        "{what}: expected status {status}\n{}",
        reply.show()
    );
    assert_eq!(
        reply.header("X-Go-Pprof"),
        Some("1"),
        "{what}: an error needs `X-Go-Pprof: 1` (pprof shows the body only then)\n{}",
        reply.show()
    );
    assert_eq!(
        reply.header("Content-Type"),
        Some("text/plain; charset=utf-8"),
        "{what}: error Content-Type\n{}",
        reply.show()
    );
    assert!(
        reply.header("Content-Disposition").is_none(),
        "{what}: an error has no Content-Disposition\n{}",
        reply.show()
    );
    assert!(
        reply.text().contains(reason),
        "{what}: the error body should say {reason:?}\n{}",
        reply.show()
    );
}

/// GET the index and return the pids it lists.
fn index_pids(port: u16) -> BTreeSet<u32> {
    let reply = get(port, "/debug/pprof/");
    assert_eq!(reply.status, 200, "index\n{}", reply.show());
    reply.index_pids()
}

/// Waits until the index lists every pid in `present` and none in `absent`; returns how long
/// it took.
fn wait_for_index(port: u16, present: &[u32], absent: &[u32], timeout: Duration) -> Duration {
    let start = Instant::now();
    wait_for(
        &format!("the index to list {present:?} and not {absent:?}"),
        timeout,
        || {
            let pids = index_pids(port);
            if present.iter().all(|p| pids.contains(p)) && !absent.iter().any(|p| pids.contains(p))
            {
                Ok(())
            } else {
                Err(format!("index lists {pids:?}"))
            }
        },
    );
    start.elapsed()
}

/// Sample-type names of a profile.
fn type_names(view: &ProfileView) -> Vec<(String, String)> {
    view.sample_types()
}

/// Sum of value `type_name` over the samples whose stack contains `function`.
fn value_with(view: &ProfileView, type_name: &str, function: &str) -> i64 {
    let i = view.value_index(type_name);
    view.profile
        .sample
        .iter()
        .filter(|s| view.frames(s).iter().any(|f| f.name == function))
        .map(|s| s.value[i])
        .sum()
}

/// Sum of value `type_name` over all samples.
fn value_total(view: &ProfileView, type_name: &str) -> i64 {
    let i = view.value_index(type_name);
    view.profile.sample.iter().map(|s| s.value[i]).sum()
}

/// Checks the shape of a heap or allocs profile (Go's sample types, period type and period)
/// and returns the view.
fn check_heap_profile(reply: &Reply, what: &str, filename: &str) -> ProfileView {
    let view = pprof_reply(reply, what, filename);
    let expected: Vec<(String, String)> = HEAP_SAMPLE_TYPES
        .iter()
        .map(|(t, u)| (t.to_string(), u.to_string()))
        .collect();
    assert_eq!(type_names(&view), expected, "{what}: sample types");
    assert_eq!(
        view.period_type(),
        Some(("space".to_string(), "bytes".to_string())),
        "{what}: period type"
    );
    assert_eq!(
        view.profile.period, DEFAULT_MEM_RATE,
        "{what}: period (the sampling rate)"
    );
    view
}

// ---------------------------------------------------------------------------------------
// Processes: the daemon and the workers
// ---------------------------------------------------------------------------------------

/// A directory under the system temp dir (short paths: a Unix socket path has at most 107
/// bytes), removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str, mode: u32) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("anyprof-{name}-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn send_signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) only takes two integers; the pid is one of our own children, which we
    // have not reaped yet (so it cannot have been reused).
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Waits up to `timeout` for `child` to exit.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if start.elapsed() >= timeout => return None,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    }
}

/// `anyprof serve --socket SOCKET` with its stderr in `<scratch>/<label>.stderr`; a running
/// daemon is killed (SIGKILL) when dropped unless it was terminated.
fn serve<'a>(scratch: &Path, label: &str, socket: &Path) -> DaemonBuilder<'a> {
    Daemon::serve(&scratch.join(format!("{label}.stderr"))).socket(socket)
}

/// A running `serve_worker` under the preload; killed (SIGKILL) when dropped.
struct Worker {
    child: Child,
    /// The program's own pid (from its `ready pid=N` line; the same as the child's unless a
    /// wrapper forked).
    pid: u32,
    /// The program's argv, as the daemon should report it.
    argv: Vec<String>,
    /// When it said it was ready.
    ready_at: Instant,
}

/// How to start a worker.
struct WorkerSpec<'a> {
    /// Seconds until it exits by itself; 0 = never.
    seconds: u32,
    /// Percent of each 10 ms period spent in `serve_hot_spin`.
    busy: u32,
    /// Extra arguments (ignored by the program; they show up in `cmdline`).
    extra: &'a [&'a str],
    /// A command that runs the program as another user (`setpriv ... --`), or empty.
    wrapper: &'a [&'a str],
    /// The preload library, if not the build's own (a copy another user can read).
    preload: Option<&'a Path>,
}

impl Default for WorkerSpec<'_> {
    fn default() -> Self {
        WorkerSpec {
            seconds: 0,
            busy: 5,
            extra: &[],
            wrapper: &[],
            preload: None,
        }
    }
}

impl Worker {
    /// Starts `exe SECONDS BUSY EXTRA...` with the preload in serve mode (no ANYPROF_MODE)
    /// connecting to `socket`, and waits for its `ready` line.
    fn start(exe: &Path, socket: &Path, spec: WorkerSpec, stderr_path: &Path) -> Worker {
        let bins = binaries();
        let preload_path = spec.preload.unwrap_or(&bins.preload);
        let mut argv = vec![
            exe.to_string_lossy().into_owned(),
            spec.seconds.to_string(),
            spec.busy.to_string(),
        ];
        argv.extend(spec.extra.iter().map(|s| s.to_string()));
        let preload = format!("LD_PRELOAD={}", preload_path.display());
        let socket_var = format!("ANYPROF_SOCKET={}", socket.display());
        let mut cmd = if spec.wrapper.is_empty() {
            let mut cmd = clean_command(exe);
            cmd.args(&argv[1..])
                .env("LD_PRELOAD", preload_path)
                .env("ANYPROF_SOCKET", socket);
            cmd
        } else {
            // `wrapper... env LD_PRELOAD=... program`: only the program itself is preloaded,
            // not the wrapper (which would connect under its own uid before exec).
            let mut cmd = clean_command(spec.wrapper[0]);
            cmd.args(&spec.wrapper[1..])
                .arg("env")
                .arg(&preload)
                .arg(&socket_var);
            cmd.args(&argv);
            cmd
        };
        let stderr = std::fs::File::create(stderr_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", stderr_path.display()));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let pid = line
            .trim()
            .strip_prefix("ready pid=")
            .and_then(|p| p.parse().ok());
        let Some(pid) = pid else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not print `ready pid=N` (got {line:?}); stderr:\n{}",
                std::fs::read_to_string(stderr_path).unwrap_or_default()
            );
        };
        Worker {
            child,
            pid,
            argv,
            ready_at: Instant::now(),
        }
    }

    /// Sleeps until the program has run for `time` (so that its allocation ring is full and
    /// its heap profile has had time to fill: a heap profile taken in its first tenths of a
    /// second holds only what it allocated so far).
    fn wait_running(&self, time: Duration) {
        if let Some(left) = time.checked_sub(self.ready_at.elapsed()) {
            std::thread::sleep(left);
        }
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        send_signal(self.pid, libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// A scratch directory with the worker compiled into it.
fn setup(name: &str) -> (PathBuf, PathBuf) {
    let scratch = scratch_dir(name);
    let exe = compile(WORKER_SOURCE, &["-O2", "-g", "-pthread"], &scratch);
    (scratch, exe)
}

/// Starts `n` default workers (busy 5 %) connected to `socket`.
fn start_workers(n: usize, exe: &Path, socket: &Path, scratch: &Path, tag: &str) -> Vec<Worker> {
    (0..n)
        .map(|i| {
            Worker::start(
                exe,
                socket,
                WorkerSpec::default(),
                &scratch.join(format!("{tag}-{i}.stderr")),
            )
        })
        .collect()
}

fn pids(workers: &[Worker]) -> Vec<u32> {
    workers.iter().map(|w| w.pid).collect()
}

// ---------------------------------------------------------------------------------------
// 1. Every endpoint, for one process among three
// ---------------------------------------------------------------------------------------

#[test]
fn every_endpoint_answers_for_one_of_three_processes() {
    let (scratch, exe) = setup("serve_endpoints");
    let sock_dir = TempDir::new("serve-endpoints", 0o700);
    let socket = sock_dir.path().join("sock");
    let _cpu = cpu_lock();
    let daemon = serve(&scratch, "daemon", &socket).start();
    let port = daemon.port;
    let target = Worker::start(
        &exe,
        &socket,
        WorkerSpec {
            busy: 50,
            extra: &["tag-one", "two words", ""],
            ..WorkerSpec::default()
        },
        &scratch.join("target.stderr"),
    );
    let others = start_workers(2, &exe, &socket, &scratch, "other");
    let all = [target.pid, others[0].pid, others[1].pid];
    wait_for_index(port, &all, &[], CONNECT_TIMEOUT);
    target.wait_running(Duration::from_millis(1500));
    let pid = target.pid;

    // Index: HTML listing every pid with links to its profiles.
    let index = get(port, "/debug/pprof/");
    assert_eq!(index.status, 200, "index\n{}", index.show());
    assert_eq!(
        index.header("Content-Type"),
        Some("text/html; charset=utf-8"),
        "index Content-Type"
    );
    let html = index.text();
    assert_eq!(
        daemon::index_pids(&html),
        all.iter().copied().collect::<BTreeSet<u32>>(),
        "the index lists exactly the three connected processes\n{html}"
    );
    for p in all {
        for name in ["heap", "allocs", "profile", "threads", "cmdline"] {
            let link = format!("/debug/pprof/{name}?pid={p}");
            assert!(html.contains(&link), "the index has no link {link}\n{html}");
        }
    }
    // The index for one pid lists only that one.
    let one = get(port, &format!("/pid/{pid}/debug/pprof/"));
    assert_eq!(
        one.index_pids(),
        BTreeSet::from([pid]),
        "/pid/{pid}/debug/pprof/ lists only {pid}\n{}",
        one.show()
    );

    // cmdline: argv joined with NUL bytes, for each process its own.
    let expected_cmdline = target.argv.join("\0");
    let cmdline = get(port, &format!("/debug/pprof/cmdline?pid={pid}"));
    assert_eq!(
        text_reply(&cmdline, "cmdline"),
        expected_cmdline,
        "cmdline is argv joined with NUL"
    );
    let by_prefix = get(port, &format!("/pid/{pid}/debug/pprof/cmdline"));
    assert_eq!(
        text_reply(&by_prefix, "/pid/N/ cmdline"),
        expected_cmdline,
        "the /pid/N/ prefix chooses the process too"
    );
    let other_cmdline = get(port, &format!("/debug/pprof/cmdline?pid={}", others[0].pid));
    assert_eq!(
        text_reply(&other_cmdline, "cmdline of another pid"),
        others[0].argv.join("\0")
    );

    // heap: Go's four sample types, period = the rate, the alloc site with live bytes.
    let heap = check_heap_profile(
        &get(port, &format!("/debug/pprof/heap?pid={pid}")),
        "heap",
        "heap",
    );
    assert_eq!(
        heap.profile.default_sample_type, 0,
        "heap: no default sample type (pprof then shows inuse_space, as for Go)"
    );
    let inuse = value_with(&heap, "inuse_space", ALLOC_FN);
    let allocated = value_with(&heap, "alloc_space", ALLOC_FN);
    // The program keeps 8 MiB live from serve_alloc_site; at 512 KiB each 64 KiB block is
    // sampled with p = 0.118, so ~15 of its 128 live blocks are sampled and scaled up. The
    // bounds below hold unless fewer than 2 or more than 60 are sampled (p < 1e-5).
    assert!(
        (1 << 20..=32 << 20).contains(&inuse),
        "heap: {ALLOC_FN} holds 8 MiB live; the profile says inuse_space {inuse} (expected \
         1-32 MiB)\n{}",
        heap.describe_heap()
    );
    assert!(
        allocated >= inuse,
        "heap: alloc_space {allocated} < inuse_space {inuse} for {ALLOC_FN}"
    );
    let gc = check_heap_profile(
        &get(port, &format!("/debug/pprof/heap?gc=1&pid={pid}")),
        "heap?gc=1",
        "heap",
    );
    assert!(
        value_with(&gc, "alloc_space", ALLOC_FN) > 0,
        "heap?gc=1 has no {ALLOC_FN}"
    );

    // allocs: the same data with alloc_space as the default.
    let allocs = check_heap_profile(
        &get(port, &format!("/debug/pprof/allocs?pid={pid}")),
        "allocs",
        "allocs",
    );
    assert_eq!(
        allocs.string(allocs.profile.default_sample_type),
        "alloc_space",
        "allocs: default sample type"
    );
    let alloc_total = value_total(&allocs, "alloc_space");
    let alloc_site = value_with(&allocs, "alloc_space", ALLOC_FN);
    assert!(
        alloc_site > 0 && alloc_site * 10 >= alloc_total * 9,
        "allocs: {ALLOC_FN} allocates nearly everything; it has {alloc_site} of {alloc_total} \
         bytes"
    );

    // heap?debug=1: Go's legacy text, with a MemStats block of `# Name = value` lines.
    let legacy = text_reply(
        &get(port, &format!("/debug/pprof/heap?debug=1&pid={pid}")),
        "heap?debug=1",
    );
    assert!(
        legacy.starts_with("heap profile: "),
        "heap?debug=1 starts with `heap profile: `:\n{legacy}"
    );
    assert!(
        legacy.contains(ALLOC_FN),
        "heap?debug=1 names {ALLOC_FN}:\n{legacy}"
    );
    let memstats: BTreeMap<&str, &str> = legacy
        .lines()
        .filter_map(|l| l.strip_prefix("# ")?.split_once(" = "))
        .collect();
    let heap_alloc: i64 = memstats
        .get("HeapAlloc")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("heap?debug=1 has no `# HeapAlloc = N` line:\n{legacy}"));
    assert!(
        heap_alloc >= 8 << 20,
        "heap?debug=1: HeapAlloc = {heap_alloc}, but the program keeps 8 MiB live\n{legacy}"
    );
    assert!(
        memstats.len() >= 5,
        "heap?debug=1: expected a MemStats block of `# Name = value` lines, found {memstats:?}"
    );

    // profile?seconds=2: a CPU profile of about 2 s whose samples are in serve_hot_spin.
    let started = Instant::now();
    let reply = get(port, &format!("/debug/pprof/profile?seconds=2&pid={pid}"));
    let took = started.elapsed();
    let cpu = pprof_reply(&reply, "profile?seconds=2", "profile");
    assert!(
        took >= Duration::from_secs(2),
        "profile?seconds=2 answered after {took:?}, before the 2 s were up"
    );
    let types = type_names(&cpu);
    assert!(
        types.contains(&("samples".into(), "count".into()))
            && types.contains(&("cpu".into(), "nanoseconds".into())),
        "profile: sample types {types:?}"
    );
    let duration = Duration::from_nanos(cpu.profile.duration_nanos.max(0) as u64);
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(10)).contains(&duration),
        "profile?seconds=2: duration_nanos says {duration:?}"
    );
    let hot = cpu.cumulative_samples().get(HOT_FN).copied().unwrap_or(0);
    let total = cpu.total_samples();
    // 50 % of 2 s at 100 Hz is ~100 samples on an idle machine; even with a third of that on a
    // loaded one, 10 is far below.
    assert!(
        hot >= 10 && hot * 2 >= total,
        "profile?seconds=2: {HOT_FN} has {hot} of {total} samples (expected >= 10 and most)\n{}",
        cpu.describe()
    );

    // symbol: GET probe; POST resolves addresses taken from the profiles.
    let probe = get(port, &format!("/debug/pprof/symbol?pid={pid}"));
    assert_eq!(text_reply(&probe, "symbol GET"), "num_symbols: 1\n");
    let hot_addr = address_of(&cpu, HOT_FN);
    let alloc_addr = address_of(&heap, ALLOC_FN);
    let body = format!("{hot_addr:#x}+{alloc_addr:#x}+0x1");
    let symbols = text_reply(
        &post(
            port,
            &format!("/debug/pprof/symbol?pid={pid}"),
            body.as_bytes(),
        ),
        "symbol POST",
    );
    let lines: BTreeSet<&str> = symbols.lines().collect();
    let expected: BTreeSet<String> = [
        format!("{hot_addr:#x} {HOT_FN}"),
        format!("{alloc_addr:#x} {ALLOC_FN}"),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        lines,
        expected
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<&str>>(),
        "symbol POST {body:?}: one `ADDR name` line per known address (0x1 is unknown)"
    );

    // threads (and its alias goroutine): one sample per thread, the named helper among them.
    for name in ["threads", "goroutine"] {
        let view = pprof_reply(
            &get(port, &format!("/debug/pprof/{name}?pid={pid}")),
            name,
            "threads",
        );
        assert_eq!(
            type_names(&view),
            vec![("goroutine".to_string(), "count".to_string())],
            "{name}: sample type"
        );
        let threads = view.thread_names_by_tid();
        assert!(
            threads.len() >= 2,
            "{name}: expected >= 2 threads, got {threads:?}"
        );
        assert!(
            threads.contains_key(&i64::from(pid)),
            "{name}: the main thread (tid {pid}) is missing: {threads:?}"
        );
        let helper = view.profile.sample.iter().find(|s| {
            view.str_label(s, "thread") == Some(HELPER_THREAD)
                && view
                    .num_label(s, "tid")
                    .is_some_and(|t| t != i64::from(pid))
        });
        let helper = helper.unwrap_or_else(|| {
            panic!("{name}: no sample labelled thread={HELPER_THREAD:?}: {threads:?}")
        });
        assert!(
            view.frames(helper).iter().any(|f| f.name == HELPER_FN),
            "{name}: the helper thread's stack does not contain {HELPER_FN}\n{}",
            view.dump()
        );
    }
    let dump = text_reply(
        &get(port, &format!("/debug/pprof/threads?debug=2&pid={pid}")),
        "threads?debug=2",
    );
    let headers: Vec<&str> = dump.lines().filter(|l| l.starts_with("thread ")).collect();
    assert!(
        headers.len() >= 2
            && headers
                .iter()
                .any(|h| h.ends_with(&format!("[{HELPER_THREAD}]:")))
            && headers
                .iter()
                .any(|h| h.starts_with(&format!("thread {pid} ["))),
        "threads?debug=2: expected `thread TID [NAME]:` blocks for the main thread and \
         {HELPER_THREAD}:\n{dump}"
    );
    assert!(
        dump.contains(HELPER_FN),
        "threads?debug=2 has no {HELPER_FN}:\n{dump}"
    );

    // threadcreate: where the helper thread was created (from main).
    let created = pprof_reply(
        &get(port, &format!("/debug/pprof/threadcreate?pid={pid}")),
        "threadcreate",
        "threadcreate",
    );
    assert_eq!(
        type_names(&created),
        vec![("threadcreate".to_string(), "count".to_string())],
        "threadcreate: sample type"
    );
    let from_main = value_with(&created, "threadcreate", "main");
    assert!(
        from_main >= 1,
        "threadcreate: main created a thread; the profile says {from_main}\n{}",
        created.dump()
    );
    drop(daemon);
}

/// The address of a Location whose physical (last) Line is `function`.
fn address_of(view: &ProfileView, function: &str) -> u64 {
    view.profile
        .location
        .iter()
        .find(|loc| {
            loc.address != 0
                && loc
                    .line
                    .last()
                    .is_some_and(|l| view.string(view.function(l.function_id).name) == function)
        })
        .map(|loc| loc.address)
        .unwrap_or_else(|| panic!("no location of {function} in the profile\n{}", view.dump()))
}

trait DescribeHeap {
    fn describe_heap(&self) -> String;
}

impl DescribeHeap for ProfileView {
    /// The samples' values and stacks, for heap failure messages.
    fn describe_heap(&self) -> String {
        let mut out = format!("sample types {:?}\n", self.sample_types());
        for s in &self.profile.sample {
            let names: Vec<&str> = self.frames(s).iter().rev().map(|f| f.name).collect();
            out.push_str(&format!("{:?} {}\n", s.value, names.join(";")));
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// 2. go tool pprof
// ---------------------------------------------------------------------------------------

/// Runs `go tool pprof -top URL` with HOME and PPROF_TMPDIR in `home`; returns stdout after
/// checking that it exited 0.
fn go_pprof_top(home: &Path, url: &str) -> String {
    let mut cmd = clean_command("go");
    cmd.args(["tool", "pprof", "-top", url])
        .env("HOME", home)
        .env("PPROF_TMPDIR", home)
        .env("GOCACHE", home.join("gocache"))
        .env("GOPATH", home.join("gopath"));
    let out = anyprof_tests::run(&mut cmd);
    assert_eq!(
        out.code,
        0,
        "`go tool pprof -top {url}` exited with {}\nstdout:\n{}\nstderr:\n{}",
        out.code,
        out.stdout_text(),
        out.stderr_text()
    );
    out.stdout_text()
}

/// The function names of `-top` output rows, in order (the last column).
fn top_rows(output: &str) -> Vec<String> {
    output
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(5).map(str::to_string))
        .collect()
}

#[test]
fn go_tool_pprof_fetches_cpu_and_heap_profiles() {
    let have_go = Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have_go,
        "`go` is not installed; this test runs `go tool pprof` against the daemon: \
         apt-get install -y golang-go"
    );
    let (scratch, exe) = setup("serve_go_pprof");
    let home = scratch.join("home");
    std::fs::create_dir_all(&home).expect("creating the scratch HOME");
    let sock_dir = TempDir::new("serve-go-pprof", 0o700);
    let socket = sock_dir.path().join("sock");
    let _cpu = cpu_lock();
    let daemon = serve(&scratch, "daemon", &socket).start();
    let port = daemon.port;
    let target = Worker::start(
        &exe,
        &socket,
        WorkerSpec {
            busy: 50,
            ..WorkerSpec::default()
        },
        &scratch.join("target.stderr"),
    );
    // A second process, so that the pid in the URL matters.
    let _other = start_workers(1, &exe, &socket, &scratch, "other");
    wait_for_index(port, &[target.pid, _other[0].pid], &[], CONNECT_TIMEOUT);
    let pid = target.pid;

    let cpu_url = format!("http://127.0.0.1:{port}/debug/pprof/profile?seconds=2&pid={pid}");
    let cpu = go_pprof_top(&home, &cpu_url);
    let rows = top_rows(&cpu);
    assert_eq!(
        rows.first().map(String::as_str),
        Some(HOT_FN),
        "go tool pprof -top {cpu_url}: the top function should be {HOT_FN}\n{cpu}"
    );

    let heap_url = format!("http://127.0.0.1:{port}/debug/pprof/heap?pid={pid}");
    let heap = go_pprof_top(&home, &heap_url);
    let rows = top_rows(&heap);
    assert_eq!(
        rows.first().map(String::as_str),
        Some(ALLOC_FN),
        "go tool pprof -top {heap_url}: the top function should be {ALLOC_FN}\n{heap}"
    );
    assert!(
        heap.contains("Type: inuse_space"),
        "go tool pprof shows inuse_space for heap by default\n{heap}"
    );
    // A delta profile (Go >= 1.16's `?seconds=N` on allocs) reads the same way.
    let delta_url = format!("http://127.0.0.1:{port}/debug/pprof/allocs?seconds=1&pid={pid}");
    let delta = go_pprof_top(&home, &delta_url);
    assert_eq!(
        top_rows(&delta).first().map(String::as_str),
        Some(ALLOC_FN),
        "go tool pprof -top {delta_url}: the top function should be {ALLOC_FN}\n{delta}"
    );
    // pprof saved every fetched profile where PPROF_TMPDIR says.
    let saved: Vec<String> = std::fs::read_dir(&home)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".pb.gz"))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        saved.len(),
        3,
        "go tool pprof should have saved 3 profiles in PPROF_TMPDIR, found {saved:?}"
    );
    drop(daemon);
}

/// `?seconds=N` on heap and allocs: Go's delta profile, what changed over the next N seconds.
/// The worker allocates 8 blocks of 64 KiB every 10 ms in `serve_alloc_site` (52 MB/s) and
/// keeps a steady 8 MiB live. Over a 2 s delta, `serve_alloc_site` must show the bytes of
/// about 1 600 blocks: at the default 512 KiB rate that is about 200 samples (7 % standard
/// deviation), so the test allows 60-130 % of the nominal figure (4 sd above; below, also a
/// worker slowed by a busy machine). The profile since start (1.5 s of running before the
/// delta starts, then 2 s) would be at least 175 % of it: a delta that is really the whole
/// history fails. Bad parameters get Go's errors.
#[test]
fn heap_and_allocs_take_seconds_for_delta_profiles() {
    let (scratch, exe) = setup("serve_delta");
    let sock_dir = TempDir::new("serve-delta", 0o700);
    let socket = sock_dir.path().join("sock");
    let _cpu = cpu_lock();
    let daemon = serve(&scratch, "daemon", &socket).start();
    let port = daemon.port;
    let target = Worker::start(
        &exe,
        &socket,
        WorkerSpec::default(),
        &scratch.join("w.stderr"),
    );
    wait_for_index(port, &[target.pid], &[], CONNECT_TIMEOUT);
    target.wait_running(Duration::from_millis(1500));
    let pid = target.pid;

    let started = Instant::now();
    let reply = get(port, &format!("/debug/pprof/allocs?seconds=2&pid={pid}"));
    let took = started.elapsed();
    let what = "allocs?seconds=2";
    let view = check_heap_profile(&reply, what, "allocs-delta");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{what}: answered after {took:?}, expected a little over 2 s"
    );
    let duration = view.profile.duration_nanos as f64 / 1e9;
    assert!(
        (1.95..3.0).contains(&duration),
        "{what}: duration_nanos says {duration} s, expected about 2"
    );
    assert_eq!(
        view.string(view.profile.default_sample_type),
        "alloc_space",
        "{what}: default sample type"
    );
    // glibc's usable size of a 64 KiB block: 65 536 + 8 bytes of chunk rounding.
    let nominal = 2.0 * 800.0 * 65_544.0;
    let got = value_with(&view, "alloc_space", ALLOC_FN) as f64;
    assert!(
        (0.6 * nominal..=1.3 * nominal).contains(&got),
        "{what}: alloc_space in {ALLOC_FN} is {got:.0} bytes, expected about {nominal:.0} \
         (60-130 %)\n{}",
        view.describe()
    );

    let reply = get(port, &format!("/debug/pprof/heap?seconds=1&pid={pid}"));
    let view = check_heap_profile(&reply, "heap?seconds=1", "heap-delta");
    assert_eq!(
        view.profile.default_sample_type, 0,
        "heap?seconds=1: no default sample type (pprof shows inuse_space)"
    );

    for (query, reason) in [
        (
            "allocs?seconds=0",
            "invalid value for \"seconds\" - must be a positive integer",
        ),
        (
            "heap?seconds=x",
            "invalid value for \"seconds\" - must be a positive integer",
        ),
        (
            "heap?seconds=1&debug=1",
            "seconds and debug params are incompatible",
        ),
        (
            "goroutine?seconds=1",
            "\"seconds\" parameter is not supported for this profile type",
        ),
    ] {
        let reply = get(port, &format!("/debug/pprof/{query}&pid={pid}"));
        assert_go_error(&reply, 400, reason, query);
    }
    drop(daemon);
}

// ---------------------------------------------------------------------------------------
// 3. A process killed mid-profile, a daemon restart, no leaks
// ---------------------------------------------------------------------------------------

#[test]
fn killed_process_daemon_restart_and_no_leaks() {
    let (scratch, exe) = setup("serve_kill_restart");
    let sock_dir = TempDir::new("serve-restart", 0o700);
    let socket = sock_dir.path().join("sock");
    let daemon = serve(&scratch, "daemon-1", &socket).start();
    let port = daemon.port;
    let mut workers = start_workers(3, &exe, &socket, &scratch, "worker");
    let all = pids(&workers);
    wait_for_index(port, &all, &[], CONNECT_TIMEOUT);
    let (victim, survivors) = (all[0], [all[1], all[2]]);

    // Kill the victim 1 s into a 3 s profile of it: the request must still end, quickly,
    // with a profile or an error.
    let path = format!("/debug/pprof/profile?seconds=3&pid={victim}");
    let profiling = {
        let path = path.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let reply = request(port, "GET", &path, b"", Duration::from_secs(20));
            (reply, start.elapsed())
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    workers[0].kill();
    let (reply, took) = profiling.join().expect("the profiling thread panicked");
    assert!(
        took < Duration::from_secs(10),
        "GET {path} with the process killed after 1 s took {took:?}"
    );
    let reply = reply.unwrap_or_else(|e| {
        panic!("GET {path}: the process was killed during the profile and no response came: {e}")
    });
    match reply.status {
        200 => {
            pprof_reply(&reply, "profile of a killed process", "profile");
        }
        400..=599 => assert_eq!(
            reply.header("X-Go-Pprof"),
            Some("1"),
            "error without X-Go-Pprof\n{}",
            reply.show()
        ),
        _ => panic!("GET {path}: unexpected response\n{}", reply.show()),
    }

    // The other two are still served, the victim is gone.
    wait_for_index(port, &survivors, &[victim], Duration::from_secs(5));
    assert_go_error(
        &get(port, &format!("/debug/pprof/heap?pid={victim}")),
        404,
        &victim.to_string(),
        "heap of the killed process",
    );
    for pid in survivors {
        let heap = check_heap_profile(
            &get(port, &format!("/debug/pprof/heap?pid={pid}")),
            &format!("heap of survivor {pid}"),
            "heap",
        );
        assert!(value_with(&heap, "alloc_space", ALLOC_FN) > 0);
    }
    pprof_reply(
        &get(
            port,
            &format!("/debug/pprof/profile?seconds=1&pid={}", survivors[0]),
        ),
        "profile of a survivor after the kill",
        "profile",
    );

    // Restart: SIGTERM ends the daemon cleanly and removes its socket; a new daemon on the
    // same socket and port gets the survivors back without anyone touching them.
    let status = daemon.terminate();
    assert!(
        status.success(),
        "anyprof serve exited with {status} on SIGTERM"
    );
    assert!(
        !socket.exists(),
        "anyprof serve left its socket {} behind after SIGTERM",
        socket.display()
    );
    let restarted = Instant::now();
    let daemon = serve(&scratch, "daemon-2", &socket).port(port).start();
    wait_for_index(port, &survivors, &[victim], CONNECT_TIMEOUT);
    eprintln!(
        "the survivors were back {:?} after the new daemon was started",
        restarted.elapsed()
    );
    for pid in survivors {
        check_heap_profile(
            &get(port, &format!("/debug/pprof/heap?pid={pid}")),
            &format!("heap of {pid} after the restart"),
            "heap",
        );
        // It keeps allocating; what it allocates after the reconnection shows up.
        wait_for(
            &format!("{ALLOC_FN} in the allocs profile of {pid} after the restart"),
            Duration::from_secs(5),
            || {
                let allocs = check_heap_profile(
                    &get(port, &format!("/debug/pprof/allocs?pid={pid}")),
                    "allocs after the restart",
                    "allocs",
                );
                match value_with(&allocs, "alloc_space", ALLOC_FN) {
                    0 => Err(allocs.describe_heap()),
                    _ => Ok(()),
                }
            },
        );
    }
    // Warm the daemon up with every kind of request for a process of this program, so that
    // whatever it caches (symbol tables of the binary and libc) is in the baseline.
    for name in ["heap", "allocs", "threads", "threadcreate", "cmdline"] {
        let reply = get(port, &format!("/debug/pprof/{name}?pid={}", survivors[0]));
        assert_eq!(reply.status, 200, "{name}\n{}", reply.show());
    }

    // Leaks: threads and descriptors before 4 more processes connect, while they are
    // connected, and after they have gone (killed mid-profile, killed, exited by itself).
    let (tasks_before, fds_before) = daemon.settled_counts();
    let mut group = start_workers(3, &exe, &socket, &scratch, "leak");
    group.push(Worker::start(
        &exe,
        &socket,
        WorkerSpec {
            seconds: 4,
            ..WorkerSpec::default()
        },
        &scratch.join("leak-exits.stderr"),
    ));
    let group_pids = pids(&group);
    wait_for_index(port, &group_pids, &[], CONNECT_TIMEOUT);
    let (tasks_during, fds_during) = daemon.settled_counts();
    // Each connection has a reader thread and its descriptors: if these did not grow, the
    // counts below would prove nothing.
    assert!(
        tasks_during >= tasks_before + 4 && fds_during >= fds_before + 4,
        "with 4 more processes connected the daemon has {tasks_during} threads and \
         {fds_during} descriptors, before {tasks_before} and {fds_before}: expected one reader \
         thread and at least one descriptor per connection"
    );
    for &pid in &group_pids {
        let reply = get(port, &format!("/debug/pprof/threads?pid={pid}"));
        assert_eq!(reply.status, 200, "threads of {pid}\n{}", reply.show());
    }
    let mid_profile = {
        let path = format!("/debug/pprof/profile?seconds=2&pid={}", group_pids[0]);
        std::thread::spawn(move || request(port, "GET", &path, b"", Duration::from_secs(20)))
    };
    std::thread::sleep(Duration::from_millis(700));
    group[0].kill();
    let reply = mid_profile.join().expect("the profiling thread panicked");
    assert!(
        reply.is_ok(),
        "no response for the profile of a killed process: {reply:?}"
    );
    group[1].kill();
    send_signal(group[2].pid, libc::SIGTERM);
    for w in &mut group[2..] {
        let status = wait_exit(&mut w.child, Duration::from_secs(10));
        assert!(status.is_some(), "worker {} did not exit", w.pid);
    }
    wait_for_index(port, &survivors, &group_pids, Duration::from_secs(5));
    // The reaper runs every second; give it two rounds and a bit.
    std::thread::sleep(Duration::from_millis(2500));
    let (tasks_after, fds_after) = daemon.settled_counts();
    eprintln!(
        "daemon threads/descriptors: before {tasks_before}/{fds_before}, with 4 more \
         processes {tasks_during}/{fds_during}, after they went {tasks_after}/{fds_after}"
    );
    // Slack of 2: tiny_http's connection pool keeps at least 4 threads and keeps any extra
    // thread it started (when a connection arrived while all were busy) for 5 s after it
    // goes idle, possibly with the descriptor of a connection being closed. A leak of a
    // reader thread or a descriptor per process would show here as 4 or more.
    assert!(
        tasks_after <= tasks_before + 2,
        "thread leak: the daemon had {tasks_before} threads before 4 processes connected and \
         {tasks_after} after they went away"
    );
    assert!(
        fds_after <= fds_before + 2,
        "descriptor leak: the daemon had {fds_before} open descriptors before 4 processes \
         connected and {fds_after} after they went away"
    );
    drop(workers);
    drop(daemon);
}

// ---------------------------------------------------------------------------------------
// 4. Load: 200 requests in a row, then 20 at once
// ---------------------------------------------------------------------------------------

#[test]
fn many_sequential_and_concurrent_requests() {
    let (scratch, exe) = setup("serve_load");
    let sock_dir = TempDir::new("serve-load", 0o700);
    let socket = sock_dir.path().join("sock");
    let _cpu = cpu_lock();
    let daemon = serve(&scratch, "daemon", &socket).start();
    let port = daemon.port;
    let mut workers = start_workers(3, &exe, &socket, &scratch, "seq");
    let first = pids(&workers);
    wait_for_index(port, &first, &[], CONNECT_TIMEOUT);
    workers[2].wait_running(Duration::from_secs(1));

    // A mix of the cheap endpoints, round robin over the processes; one thread dump in ten.
    let symbol_body = {
        let heap = check_heap_profile(
            &get(port, &format!("/debug/pprof/heap?pid={}", first[0])),
            "heap",
            "heap",
        );
        format!("{:#x}", address_of(&heap, ALLOC_FN))
    };
    let one_request = |i: usize| {
        let pid = first[i % first.len()];
        let (path, binary) = match i % 10 {
            0 => (format!("/debug/pprof/heap?pid={pid}"), Some("heap")),
            1 => (format!("/debug/pprof/allocs?pid={pid}"), Some("allocs")),
            2 => (format!("/debug/pprof/heap?debug=1&pid={pid}"), None),
            3 => (format!("/debug/pprof/cmdline?pid={pid}"), None),
            4 => ("/debug/pprof/".to_string(), None),
            5 => (
                format!("/debug/pprof/threadcreate?pid={pid}"),
                Some("threadcreate"),
            ),
            6 => (format!("/debug/pprof/goroutine?pid={pid}"), Some("threads")),
            7 => (format!("/debug/pprof/symbol?pid={}", first[0]), None),
            8 => (format!("/pid/{pid}/debug/pprof/heap"), Some("heap")),
            _ => (format!("/debug/pprof/cmdline?pid={pid}"), None),
        };
        let reply = if i % 10 == 7 {
            post(port, &path, symbol_body.as_bytes())
        } else {
            get(port, &path)
        };
        let what = format!("sequential request {i}: {path}");
        match binary {
            Some(name) => {
                pprof_reply(&reply, &what, name);
            }
            None => {
                assert_eq!(reply.status, 200, "{what}\n{}", reply.show());
                assert!(!reply.body.is_empty(), "{what}: empty body");
            }
        }
        if i % 10 == 7 {
            assert!(
                reply.text().contains(ALLOC_FN),
                "{what}: {symbol_body} not resolved\n{}",
                reply.show()
            );
        }
    };
    let start = Instant::now();
    for i in 0..100 {
        one_request(i);
    }
    let rss_half = daemon.rss_kib();
    for i in 100..200 {
        one_request(i);
    }
    let rss_end = daemon.rss_kib();
    eprintln!(
        "200 sequential requests in {:?}; daemon VmRSS {rss_half} KiB after 100, {rss_end} KiB \
         after 200",
        start.elapsed()
    );
    // The first half brings the daemon to its steady state (every worker thread's malloc
    // arena and the symbolizer's caches warmed up by the same mix of requests). glibc may
    // still hand a few MiB more to arenas of worker threads that got their first request in
    // the second half, so allow 8 MiB; leaking a response, a session copy or a profile per
    // request (tens of KiB or more each, 100 times) would exceed that.
    assert!(
        rss_end <= rss_half + 8 * 1024,
        "daemon memory grew from {rss_half} KiB after 100 requests to {rss_end} KiB after 200"
    );

    // 20 processes, each profiled for 1 s, all at once.
    workers.extend(start_workers(17, &exe, &socket, &scratch, "conc"));
    let all = pids(&workers);
    wait_for_index(port, &all, &[], CONNECT_TIMEOUT);
    let concurrently = |make_path: &(dyn Fn(usize, u32) -> String + Sync)| {
        let barrier = std::sync::Barrier::new(all.len());
        let start = Instant::now();
        let results: Vec<(String, std::io::Result<Reply>, Duration)> = std::thread::scope(|s| {
            let handles: Vec<_> = all
                .iter()
                .enumerate()
                .map(|(i, &pid)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        let path = make_path(i, pid);
                        barrier.wait();
                        let t = Instant::now();
                        let reply = request(port, "GET", &path, b"", HTTP_TIMEOUT);
                        (path, reply, t.elapsed())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("request thread panicked"))
                .collect()
        });
        (results, start.elapsed())
    };
    let (results, wall) =
        concurrently(&|_, pid| format!("/debug/pprof/profile?seconds=1&pid={pid}"));
    let slowest = results.iter().map(|r| r.2).max().unwrap_or_default();
    eprintln!("20 concurrent 1 s CPU profiles: all done in {wall:?}, slowest {slowest:?}");
    for (path, reply, took) in &results {
        let reply = reply
            .as_ref()
            .unwrap_or_else(|e| panic!("concurrent GET {path}: {e}"));
        let view = pprof_reply(reply, &format!("concurrent GET {path}"), "profile");
        assert!(
            type_names(&view).contains(&("samples".into(), "count".into())),
            "{path}: not a CPU profile"
        );
        assert!(
            *took < Duration::from_secs(10),
            "concurrent GET {path} took {took:?}"
        );
    }
    // The daemon has 32 workers: the 20 profiles run side by side (in a row they would take
    // over 20 s).
    assert!(
        wall < Duration::from_secs(10),
        "20 concurrent 1 s profiles took {wall:?} in all: they did not run concurrently"
    );

    let (results, wall) = concurrently(&|i, pid| {
        if i % 2 == 0 {
            format!("/debug/pprof/heap?pid={pid}")
        } else {
            format!("/debug/pprof/threads?pid={pid}")
        }
    });
    eprintln!("20 concurrent heap/threads requests: all done in {wall:?}");
    for (path, reply, _) in &results {
        let reply = reply
            .as_ref()
            .unwrap_or_else(|e| panic!("concurrent GET {path}: {e}"));
        let name = if path.contains("heap") {
            "heap"
        } else {
            "threads"
        };
        let view = pprof_reply(reply, &format!("concurrent GET {path}"), name);
        assert!(!view.profile.sample.is_empty(), "{path}: no samples");
    }
    drop(workers);
    drop(daemon);
}

// ---------------------------------------------------------------------------------------
// 5. Errors and security
// ---------------------------------------------------------------------------------------

#[test]
fn bad_requests_get_go_style_errors() {
    let (scratch, exe) = setup("serve_errors");
    let sock_dir = TempDir::new("serve-errors", 0o700);
    let socket = sock_dir.path().join("sock");
    let daemon = serve(&scratch, "daemon", &socket)
        .args(&["--max-seconds", "5"])
        .start();
    let port = daemon.port;

    // Nobody connected yet: nothing to choose.
    assert_go_error(
        &get(port, "/debug/pprof/heap"),
        404,
        "no process",
        "heap with no process connected",
    );

    let workers = start_workers(2, &exe, &socket, &scratch, "worker");
    let all = pids(&workers);
    wait_for_index(port, &all, &[], CONNECT_TIMEOUT);
    let pid = all[0];

    for (path, status, reason) in [
        (
            format!("/debug/pprof/profile?seconds=100000&pid={pid}"),
            400,
            "seconds",
        ),
        (
            format!("/debug/pprof/profile?seconds=6&pid={pid}"),
            400,
            "seconds",
        ),
        (
            format!("/debug/pprof/profile?seconds=abc&pid={pid}"),
            400,
            "seconds",
        ),
        (
            format!("/debug/pprof/profile?seconds=-1&pid={pid}"),
            400,
            "seconds",
        ),
        // Two processes and no pid: the client must choose.
        ("/debug/pprof/heap".to_string(), 400, "pid="),
        ("/debug/pprof/cmdline".to_string(), 400, "pid="),
        // A pid that is not connected (this test's own).
        (
            format!("/debug/pprof/heap?pid={}", std::process::id()),
            404,
            "unknown pid",
        ),
        (
            format!("/pid/{}/debug/pprof/threads", std::process::id()),
            404,
            "unknown pid",
        ),
        ("/debug/pprof/heap?pid=abc".to_string(), 400, "pid=abc"),
        (format!("/debug/pprof/nonesuch?pid={pid}"), 404, "nonesuch"),
        (format!("/debug/pprof/heap?debug=x&pid={pid}"), 400, "debug"),
        ("/metrics".to_string(), 404, "/debug/pprof/"),
    ] {
        assert_go_error(&get(port, &path), status, reason, &format!("GET {path}"));
    }

    // A second CPU profile of the same process while one runs: Go's "already in use".
    let path = format!("/debug/pprof/profile?seconds=3&pid={pid}");
    let first = {
        let path = path.clone();
        std::thread::spawn(move || request(port, "GET", &path, b"", HTTP_TIMEOUT))
    };
    std::thread::sleep(Duration::from_secs(1));
    let second = get(port, &format!("/debug/pprof/profile?seconds=1&pid={pid}"));
    // Another process can be profiled meanwhile.
    let other = get(
        port,
        &format!("/debug/pprof/profile?seconds=1&pid={}", all[1]),
    );
    let first = first
        .join()
        .expect("profiling thread panicked")
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_go_error(
        &second,
        500,
        "already in use",
        "a second profile of the same pid",
    );
    pprof_reply(&first, "the first profile", "profile");
    pprof_reply(&other, "a profile of another pid meanwhile", "profile");
    // Once the first is over, the process can be profiled again.
    pprof_reply(
        &get(port, &format!("/debug/pprof/profile?seconds=1&pid={pid}")),
        "a profile after the first one ended",
        "profile",
    );
    drop(workers);
    drop(daemon);
}

/// The command that runs a program as `nobody`, if this system has one.
fn as_nobody() -> Option<Vec<&'static str>> {
    let works = |cmd: &[&str]| {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let setpriv = vec![
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "--",
    ];
    if works(&setpriv) {
        return Some(setpriv);
    }
    let runuser = vec!["runuser", "-u", "nobody", "--"];
    if works(&runuser) {
        return Some(runuser);
    }
    None
}

fn uid_of(user: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(':').collect();
        (fields.first() == Some(&user))
            .then(|| fields.get(2)?.parse().ok())
            .flatten()
    })
}

#[test]
fn only_allowed_uids_may_connect() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        skip_outside_ci(&format!(
            "it needs root to run a process as another user (running as uid {euid})"
        ));
        return;
    }
    let Some(wrapper) = as_nobody() else {
        skip_outside_ci("neither `setpriv --reuid=nobody` nor `runuser -u nobody` works here");
        return;
    };
    let Some(nobody) = uid_of("nobody") else {
        skip_outside_ci("no user `nobody` in /etc/passwd");
        return;
    };
    let (scratch, exe) = setup("serve_security");
    // Everything `nobody` needs (the program, the preload, the socket) in one world-readable
    // directory, whatever the permissions of the build tree. Not world-writable: processes
    // refuse a socket in a directory that others can write to.
    let dir = TempDir::new("serve-security", 0o755);
    let bins = binaries();
    let exe_copy = dir.path().join("serve_worker");
    std::fs::copy(&exe, &exe_copy).expect("copying the worker");
    std::fs::set_permissions(&exe_copy, std::fs::Permissions::from_mode(0o755))
        .expect("chmod worker");
    let preload_copy = dir.path().join("libanyprof.so");
    std::fs::copy(&bins.preload, &preload_copy).expect("copying the preload");
    std::fs::set_permissions(&preload_copy, std::fs::Permissions::from_mode(0o755))
        .expect("chmod preload");
    let socket = dir.path().join("sock");

    // Without --allow-uid: root's own process is listed, nobody's is refused.
    let daemon = serve(&scratch, "daemon-1", &socket)
        .args(&["-v"])
        .umask(0)
        .start();
    let port = daemon.port;
    let mode = std::fs::metadata(&socket)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    assert_eq!(
        mode & 0o002,
        0o002,
        "the socket {} must be writable by others for this test (mode {mode:o})",
        socket.display()
    );
    let mine = Worker::start(
        &exe,
        &socket,
        WorkerSpec::default(),
        &scratch.join("root-worker.stderr"),
    );
    let theirs = Worker::start(
        &exe_copy,
        &socket,
        WorkerSpec {
            wrapper: &wrapper,
            preload: Some(&preload_copy),
            ..WorkerSpec::default()
        },
        &scratch.join("nobody-worker.stderr"),
    );
    let refusal = format!("refused a connection from uid Some({nobody})");
    // The process tries at start and then about every second: wait until the daemon has
    // refused it twice (or, wrongly, lists it), then check that it is not listed.
    wait_for(
        "the daemon to refuse nobody's process twice (`-v` prints each refusal)",
        Duration::from_secs(10),
        || {
            let err = daemon.stderr();
            if err.matches(&refusal).count() >= 2 || index_pids(port).contains(&theirs.pid) {
                Ok(())
            } else {
                Err(format!(
                    "nobody's process {} is not listed, and the daemon's stderr has fewer than \
                     2 lines {refusal:?}:\n{err}",
                    theirs.pid
                ))
            }
        },
    );
    wait_for_index(port, &[mine.pid], &[], CONNECT_TIMEOUT);
    let listed = index_pids(port);
    assert!(
        !listed.contains(&theirs.pid),
        "a process of uid {nobody} (pid {}) was accepted by a daemon without --allow-uid: \
         index lists {listed:?}",
        theirs.pid
    );
    assert_go_error(
        &get(port, &format!("/debug/pprof/heap?pid={}", theirs.pid)),
        404,
        "unknown pid",
        "heap of a refused process",
    );
    let status = daemon.terminate();
    assert!(status.success(), "anyprof serve exited with {status}");

    // With --allow-uid nobody: the same process connects by itself.
    let daemon = serve(&scratch, "daemon-2", &socket)
        .args(&["-v", "--allow-uid", &nobody.to_string()])
        .umask(0)
        .port(port)
        .start();
    wait_for_index(port, &[mine.pid, theirs.pid], &[], CONNECT_TIMEOUT);
    // A process that just reconnected sends its buckets on its next cycle: poll briefly.
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let heap = loop {
        let heap = check_heap_profile(
            &get(port, &format!("/debug/pprof/heap?pid={}", theirs.pid)),
            "heap of nobody's process",
            "heap",
        );
        if !heap.profile.sample.is_empty() || Instant::now() >= deadline {
            break heap;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        !heap.profile.sample.is_empty(),
        "heap of nobody's process has no samples"
    );
    drop(theirs);
    drop(mine);
    drop(daemon);
}
