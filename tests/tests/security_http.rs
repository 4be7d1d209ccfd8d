//! The HTTP side of `anyprof serve`, attacked as a local user would (issue 12, points 4 and
//! 5). The daemon runs as root, as the README installs it; the attacker is `nobody`, whose
//! requests come from `tests/programs/http_client.c` run under `setpriv`.
//!
//! * [`each_user_sees_only_the_processes_it_could_ptrace`]: a root process is invisible to
//!   nobody (answered like an unknown pid, absent from the index and from the "only one
//!   process" choice) while root sees it; nobody's own process is visible to nobody.
//! * [`host_header_must_name_the_loopback`]: `Host: evil.example` (DNS rebinding) gets 403.
//! * [`network_exposure_needs_the_flag_and_then_the_token`]: `--http 0.0.0.0:PORT` is refused
//!   without `--expose-profiles-to-network`; with it, requests without the token get 401 and
//!   requests with it (query or bearer, also from `go tool pprof`) see every process.
//! * [`a_thousand_slow_clients_are_bounded`]: 1,000 connections that send half a request and
//!   stall: the daemon's threads and descriptors stay bounded, root is still answered at once,
//!   and every stalled connection is closed within the header timeout.
//! * [`one_long_request_of_each_kind_per_process`]: a second `heap?seconds=N` for one pid is
//!   refused at once; other kinds and other processes go on; long requests beyond
//!   `--max-long-requests` are refused at once.
//!
//! Tests that need root (to act as nobody) say SKIPPED and pass when not run as root, except
//! in CI, where they fail (`skip_outside_ci`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyprof_tests::daemon::{
    free_port, parse_reply, wait_for, Daemon, DaemonBuilder, Reply, Request,
};
use anyprof_tests::{binaries, clean_command, compile, scratch_dir, skip_outside_ci};

/// How long a process may take to show up in the daemon's index.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Users, files and programs
// ---------------------------------------------------------------------------------------

const NOBODY: u32 = 65534;

/// Runs a command as nobody:nogroup without supplementary groups.
const AS_NOBODY: [&str; 5] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--",
];

/// Everything nobody must reach (worker, preload, client, socket), in one directory that
/// any user can enter, removed when dropped.
struct Setup {
    scratch: PathBuf,
    dir: PathBuf,
    worker: PathBuf,
    preload: PathBuf,
    client: PathBuf,
}

impl Setup {
    /// None (with a SKIPPED line) unless running as root with a working `setpriv`.
    fn new(name: &str) -> Option<Setup> {
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            skip_outside_ci(&format!(
                "it needs root to act as nobody (running as uid {euid})"
            ));
            return None;
        }
        let works = Command::new(AS_NOBODY[0])
            .args(&AS_NOBODY[1..])
            .arg("true")
            .status()
            .is_ok_and(|s| s.success());
        if !works {
            skip_outside_ci("`setpriv --reuid=65534` does not work here");
            return None;
        }
        let scratch = scratch_dir(name);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Short path: a Unix socket path has at most 107 bytes.
        let dir = std::env::temp_dir().join(format!("anyprof-{name}-{nanos:x}"));
        std::fs::create_dir_all(&dir).expect("creating the shared directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the shared directory");
        let copy = |from: &Path, name: &str| {
            let to = dir.join(name);
            std::fs::copy(from, &to)
                .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))
                .expect("chmod 755");
            to
        };
        let worker = copy(
            &compile("serve_worker.c", &["-O2", "-g", "-pthread"], &scratch),
            "serve_worker",
        );
        let client = copy(&compile("http_client.c", &["-O2"], &scratch), "http_client");
        let preload = copy(&binaries().preload, "libanyprof.so");
        Some(Setup {
            scratch,
            dir,
            worker,
            preload,
            client,
        })
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("sock")
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// One GET as root (this test process) to `addr`, with `Host: host` and an extra header line
/// if given; the whole response, read within 60 s.
fn request_at(
    addr: SocketAddr,
    path: &str,
    host: &str,
    extra: Option<(&str, &str)>,
) -> std::io::Result<Reply> {
    let mut request = Request::new("GET", addr.port(), path)
        .addr(addr)
        .host(host)
        .timeout(Duration::from_secs(60))
        .connect_timeout(Duration::from_secs(10));
    if let Some((name, value)) = extra {
        request = request.header(name, value);
    }
    request.send()
}

/// GET `path` as root from 127.0.0.1.
fn get(port: u16, path: &str) -> Reply {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    request_at(addr, path, &format!("127.0.0.1:{port}"), None)
        .unwrap_or_else(|e| panic!("GET {path} as root: {e}"))
}

/// GET `path` as nobody (http_client under setpriv), with `Host: host` if given.
fn get_as_nobody(setup: &Setup, port: u16, path: &str, host: Option<&str>) -> Reply {
    let mut cmd = Command::new(AS_NOBODY[0]);
    cmd.args(&AS_NOBODY[1..])
        .arg(&setup.client)
        .arg("get")
        .arg(port.to_string())
        .arg(path);
    if let Some(host) = host {
        cmd.arg(host);
    }
    let out = cmd.output().expect("running http_client as nobody");
    parse_reply(&out.stdout).unwrap_or_else(|| {
        panic!(
            "GET {path} as nobody: no response ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn assert_status(reply: &Reply, status: u16, reason: &str, what: &str) {
    assert_eq!(reply.status, status, "{what}\n{}", reply.show());
    assert!(
        reply.text().contains(reason),
        "{what}: the body should say {reason:?}\n{}",
        reply.show()
    );
}

// ---------------------------------------------------------------------------------------
// The daemon and the workers
// ---------------------------------------------------------------------------------------

/// `anyprof serve --socket SOCKET --http HOST:PORT ARGS...` (as root), started with umask 0
/// (so that nobody's processes can connect to the socket whatever the daemon's own rule),
/// with its stderr in `<scratch>/<label>.stderr`; killed when dropped.
fn serve<'a>(setup: &Setup, label: &str, args: &[&str]) -> DaemonBuilder<'a> {
    Daemon::serve(&setup.scratch.join(format!("{label}.stderr")))
        .socket(&setup.socket())
        .args(args)
        .umask(0)
}

/// [`serve`] on 127.0.0.1, ready when root's `GET /debug/pprof/` (with `Host: 127.0.0.1`)
/// answers 200.
fn on_loopback(setup: &Setup, label: &str, args: &[&str]) -> Daemon {
    serve(setup, label, args)
        .probe(|port| {
            request_at(
                SocketAddr::from(([127, 0, 0, 1], port)),
                "/debug/pprof/",
                "127.0.0.1",
                None,
            )
            .is_ok_and(|r| r.status == 200)
        })
        .start()
}

/// A preloaded `serve_worker`, as root or as nobody; killed when dropped.
struct Worker {
    child: Child,
    pid: u32,
}

impl Worker {
    fn start(setup: &Setup, as_nobody: bool, label: &str) -> Worker {
        Worker::spawn(setup, as_nobody, true, label)
    }

    /// A `serve_worker` started without the preload (nothing of ours in it).
    fn start_bare(setup: &Setup, as_nobody: bool, label: &str) -> Worker {
        Worker::spawn(setup, as_nobody, false, label)
    }

    fn spawn(setup: &Setup, as_nobody: bool, preloaded: bool, label: &str) -> Worker {
        let mut cmd = if as_nobody {
            let mut cmd = clean_command(AS_NOBODY[0]);
            cmd.args(&AS_NOBODY[1..]).arg("env");
            if preloaded {
                cmd.arg(format!("LD_PRELOAD={}", setup.preload.display()))
                    .arg(format!("ANYPROF_SOCKET={}", setup.socket().display()));
            }
            cmd.arg(&setup.worker);
            cmd
        } else {
            let mut cmd = clean_command(&setup.worker);
            if preloaded {
                cmd.env("LD_PRELOAD", &setup.preload)
                    .env("ANYPROF_SOCKET", setup.socket());
            }
            cmd
        };
        let stderr_path = setup.scratch.join(format!("{label}.stderr"));
        let mut child = cmd
            .args(["0", "5"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("starting serve_worker");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let Some(pid) = line
            .trim()
            .strip_prefix("ready pid=")
            .and_then(|p| p.parse().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve_worker did not start (got {line:?}): {}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        };
        Worker { child, pid }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: kill(2) with integers; the pid is our unreaped child's (or its exec'd
        // program's: setpriv and env exec, so it is the same process).
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until root's index lists all of `pids`.
fn wait_listed(port: u16, pids: &[u32]) {
    wait_for("the processes to connect", CONNECT_TIMEOUT, || {
        let listed = get(port, "/debug/pprof/").index_pids();
        if pids.iter().all(|p| listed.contains(p)) {
            Ok(())
        } else {
            Err(format!("listed {listed:?}, want {pids:?}"))
        }
    });
}

// ---------------------------------------------------------------------------------------
// 1. Who sees what
// ---------------------------------------------------------------------------------------

#[test]
fn each_user_sees_only_the_processes_it_could_ptrace() {
    let Some(setup) = Setup::new("security_http_ptrace") else {
        return;
    };
    let daemon = on_loopback(&setup, "daemon", &["--allow-uid", &NOBODY.to_string()]);
    let port = daemon.port;
    let roots = Worker::start(&setup, false, "root-worker");
    let theirs = Worker::start(&setup, true, "nobody-worker");
    wait_listed(port, &[roots.pid, theirs.pid]);
    let (r, n) = (roots.pid, theirs.pid);

    // Root sees both.
    for pid in [r, n] {
        let reply = get(port, &format!("/debug/pprof/heap?pid={pid}"));
        assert_eq!(reply.status, 200, "root's heap of {pid}\n{}", reply.show());
    }
    assert_status(
        &get(port, "/debug/pprof/heap"),
        400,
        "2 processes are connected",
        "root without ?pid= sees two processes",
    );

    // Nobody: the index shows who the daemon thinks is asking, and only nobody's process.
    let index = get_as_nobody(&setup, port, "/debug/pprof/", None);
    assert_eq!(index.status, 200, "nobody's index\n{}", index.show());
    assert_eq!(
        index.index_pids(),
        BTreeSet::from([n]),
        "nobody's index must list nobody's process only\n{}",
        index.show()
    );
    assert!(
        index
            .text()
            .contains(&format!("Requests from uid {NOBODY}")),
        "the daemon did not identify the request as uid {NOBODY}\n{}",
        index.show()
    );
    // Root's process answers exactly like a pid that is not connected, on every endpoint
    // and in both URL forms.
    let unknown = get_as_nobody(&setup, port, "/debug/pprof/heap?pid=999999999", None);
    assert_status(
        &unknown,
        404,
        "unknown pid",
        "nobody asks for a pid that does not exist",
    );
    for path in [
        format!("/debug/pprof/heap?pid={r}"),
        format!("/debug/pprof/allocs?pid={r}"),
        format!("/debug/pprof/cmdline?pid={r}"),
        format!("/debug/pprof/threads?pid={r}&debug=2"),
        format!("/debug/pprof/threadcreate?pid={r}"),
        format!("/debug/pprof/profile?seconds=1&pid={r}"),
        format!("/debug/pprof/heap?seconds=1&pid={r}"),
        format!("/pid/{r}/debug/pprof/heap"),
    ] {
        let reply = get_as_nobody(&setup, port, &path, None);
        assert_status(&reply, 404, "unknown pid", &format!("nobody: GET {path}"));
        assert_eq!(
            reply.text().replace(&r.to_string(), "PID"),
            unknown.text().replace("999999999", "PID"),
            "nobody: GET {path} must read like an unknown pid"
        );
    }
    // Without ?pid=, nobody's only visible process is chosen, although two are connected.
    let cmdline = get_as_nobody(&setup, port, "/debug/pprof/cmdline", None);
    assert_eq!(cmdline.status, 200, "nobody's cmdline\n{}", cmdline.show());
    assert!(
        cmdline.text().contains("serve_worker"),
        "nobody's cmdline\n{}",
        cmdline.show()
    );
    let heap = get_as_nobody(&setup, port, &format!("/debug/pprof/heap?pid={n}"), None);
    assert_eq!(heap.status, 200, "nobody's own heap\n{}", heap.show());
    assert!(heap.body.starts_with(&[0x1f, 0x8b]), "a gzipped profile");

    // Once nobody's process is gone, nobody sees nothing, and is told who it is.
    drop(theirs);
    wait_for("nobody's process to go", CONNECT_TIMEOUT, || {
        let reply = get_as_nobody(&setup, port, "/debug/pprof/heap", None);
        if reply.status == 404 {
            Ok(reply)
        } else {
            Err(reply.show())
        }
    });
    assert_status(
        &get_as_nobody(&setup, port, "/debug/pprof/heap", None),
        404,
        &format!("that uid {NOBODY} may see"),
        "nobody without processes",
    );
    drop(roots);
    drop(daemon);
}

// ---------------------------------------------------------------------------------------
// 2. DNS rebinding
// ---------------------------------------------------------------------------------------

#[test]
fn host_header_must_name_the_loopback() {
    let Some(setup) = Setup::new("security_http_host") else {
        return;
    };
    let daemon = on_loopback(&setup, "daemon", &[]);
    let port = daemon.port;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
    ] {
        let reply = request_at(addr, "/debug/pprof/", &host, None).expect("request");
        assert_status(&reply, 403, "DNS rebinding", &format!("Host: {host}"));
        assert!(
            reply.text().contains("loopback"),
            "the refusal says what Host is accepted\n{}",
            reply.show()
        );
    }
    let reply = get_as_nobody(&setup, port, "/debug/pprof/", Some("evil.example"));
    assert_status(
        &reply,
        403,
        "DNS rebinding",
        "nobody with Host: evil.example",
    );
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "localhost".to_string(),
        format!("[::1]:{port}"),
        format!("127.1.2.3:{port}"),
    ] {
        let reply = request_at(addr, "/debug/pprof/", &host, None).expect("request");
        assert_eq!(reply.status, 200, "Host: {host}\n{}", reply.show());
    }
    drop(daemon);
}

/// A page on another site, shown in the user's browser, may send requests to the daemon (an
/// `<img>` that starts a 300 s profile): the browser says so, and the daemon refuses them.
#[test]
fn requests_from_other_sites_pages_are_refused() {
    let Some(setup) = Setup::new("security_http_cross_site") else {
        return;
    };
    let daemon = on_loopback(&setup, "daemon", &[]);
    let port = daemon.port;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let host = format!("127.0.0.1:{port}");
    for header in [
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Site", "same-site"),
        ("Origin", "https://evil.example"),
    ] {
        let reply = request_at(addr, "/debug/pprof/", &host, Some(header)).expect("request");
        assert_status(
            &reply,
            403,
            "web page",
            &format!("{}: {}", header.0, header.1),
        );
    }
    for header in [
        ("Sec-Fetch-Site", "none"),
        ("Sec-Fetch-Site", "same-origin"),
    ] {
        let reply = request_at(addr, "/debug/pprof/", &host, Some(header)).expect("request");
        assert_eq!(reply.status, 200, "{header:?}\n{}", reply.show());
    }
    drop(daemon);
}

/// A connection can outlive the process that opened it (a child made with `clone` keeps the
/// socket). The process's pid must leave the index when the process ends, or whoever gets
/// the pid next would be shown with its data (and judged by its own credentials).
#[test]
fn a_process_that_ended_leaves_the_index_though_its_socket_lives_on() {
    let Some(setup) = Setup::new("security_http_gone") else {
        return;
    };
    let program = compile("clone_keeps_socket.c", &["-O2"], &setup.scratch);
    let daemon = on_loopback(&setup, "daemon", &[]);
    let port = daemon.port;
    let mut child = clean_command(&program)
        .env("LD_PRELOAD", &setup.preload)
        .env("ANYPROF_SOCKET", setup.socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting clone_keeps_socket");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("reading its pid");
    let pid: u32 = line
        .trim()
        .strip_prefix("ready pid=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("clone_keeps_socket said {line:?}"));
    wait_listed(port, &[pid]);
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(b"go\n")
        .expect("telling it to go");
    line.clear();
    stdout
        .read_line(&mut line)
        .expect("reading its child's pid");
    let holder: u32 = line
        .trim()
        .strip_prefix("child=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("clone_keeps_socket said {line:?}"));
    let _ = child.wait();
    let gone = wait_for_result(Duration::from_secs(5), || {
        !get(port, "/debug/pprof/").index_pids().contains(&pid)
    });
    let still_open = std::fs::read_dir(format!("/proc/{holder}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    // SAFETY: kill(2) with integers; the holder is the clone child started above.
    unsafe { libc::kill(holder as libc::pid_t, libc::SIGKILL) };
    assert!(
        still_open > 0,
        "the clone child did not keep its descriptors"
    );
    assert!(
        gone,
        "pid {pid} ended but is still listed while its clone child {holder} holds the \
         connection"
    );
    drop(daemon);
}

/// Polls `check` every 100 ms for up to `timeout`; whether it became true.
fn wait_for_result(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    anyprof_tests::daemon::poll(timeout, Duration::from_millis(100), || {
        check().then_some(())
    })
    .is_some()
}

// ---------------------------------------------------------------------------------------
// 3. Beyond the loopback
// ---------------------------------------------------------------------------------------

/// This host's address on its default route, if it has one (no packet is sent).
fn non_loopback_address() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn network_exposure_needs_the_flag_and_then_the_token() {
    let Some(setup) = Setup::new("security_http_expose") else {
        return;
    };
    let port = free_port();
    // Refused without the flag, at once, before anything is created.
    let refused_stderr = setup.scratch.join("refused.stderr");
    let mut refused = clean_command(binaries().anyprof)
        .arg("serve")
        .arg("--socket")
        .arg(setup.socket())
        .arg("--http")
        .arg(format!("0.0.0.0:{port}"))
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&refused_stderr).expect("stderr file"))
        .spawn()
        .expect("running anyprof serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(Some(status)) = refused.try_wait() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = refused.kill();
            let _ = refused.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out_stderr = std::fs::read_to_string(&refused_stderr).unwrap_or_default();
    let Some(status) = status else {
        panic!(
            "anyprof serve --http 0.0.0.0:{port} without --expose-profiles-to-network was not \
             refused: it was still running after 10 s; stderr:\n{out_stderr}"
        );
    };
    let stderr = out_stderr;
    assert!(
        !status.success(),
        "anyprof serve --http 0.0.0.0:{port} must be refused; stderr:\n{stderr}"
    );
    for words in ["not a loopback address", "--expose-profiles-to-network"] {
        assert!(
            stderr.contains(words),
            "the refusal must say {words:?}:\n{stderr}"
        );
    }
    assert!(
        !setup.socket().exists(),
        "a refused daemon created its socket {}",
        setup.socket().display()
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "a refused daemon listens on {port}"
    );

    // With the flag: a token, in a file only root can read.
    let token_file = setup.scratch.join("token");
    let token_arg = token_file.to_string_lossy().into_owned();
    let daemon = serve(
        &setup,
        "daemon",
        &["--expose-profiles-to-network", "--token-file", &token_arg],
    )
    .http_host("0.0.0.0")
    .probe(|port| {
        let Ok(token) = std::fs::read_to_string(&token_file) else {
            return false;
        };
        request_at(
            SocketAddr::from(([127, 0, 0, 1], port)),
            &format!("/debug/pprof/?token={}", token.trim()),
            "x",
            None,
        )
        .is_ok_and(|r| r.status == 200)
    })
    .start();
    let port = daemon.port;
    let token = std::fs::read_to_string(&token_file)
        .expect("reading the token file")
        .trim()
        .to_string();
    assert!(token.len() >= 32, "a short token: {token:?}");
    let meta = std::fs::metadata(&token_file).expect("token file");
    let mode = meta.permissions().mode() & 0o777;
    assert_eq!(
        mode & 0o007,
        0,
        "the token file is readable by others: {mode:o}"
    );
    let worker = Worker::start(&setup, false, "root-worker");
    wait_for("the worker to connect", CONNECT_TIMEOUT, || {
        let r = get(port, &format!("/debug/pprof/?token={token}"));
        if r.index_pids().contains(&worker.pid) {
            Ok(())
        } else {
            Err(r.show())
        }
    });

    let mut addrs = vec![SocketAddr::from(([127, 0, 0, 1], port))];
    match non_loopback_address() {
        Some(ip) => addrs.push(SocketAddr::new(ip, port)),
        None => eprintln!("no non-loopback address here: checking over 127.0.0.1 only"),
    }
    let heap = format!("/debug/pprof/heap?pid={}", worker.pid);
    for addr in addrs {
        let host = addr.to_string();
        for (path, extra, what) in [
            (heap.clone(), None, "no token"),
            (format!("{heap}&token=wrong"), None, "a wrong token"),
            (
                format!("{heap}&token={}", &token[..token.len() - 1]),
                None,
                "a token missing its last character",
            ),
            (
                heap.clone(),
                Some(("Authorization", "Bearer wrong")),
                "a wrong bearer token",
            ),
        ] {
            let reply = request_at(addr, &path, &host, extra).expect("request");
            assert_status(&reply, 401, "token", &format!("{what}, over {addr}"));
            assert!(
                reply.header("WWW-Authenticate").is_some(),
                "a 401 names its scheme\n{}",
                reply.show()
            );
        }
        let with_query =
            request_at(addr, &format!("{heap}&token={token}"), &host, None).expect("request");
        assert_eq!(
            with_query.status,
            200,
            "?token= over {addr}\n{}",
            with_query.show()
        );
        let with_bearer = request_at(
            addr,
            &heap,
            &host,
            Some(("Authorization", &format!("Bearer {token}"))),
        )
        .expect("request");
        assert_eq!(
            with_bearer.status,
            200,
            "bearer over {addr}\n{}",
            with_bearer.show()
        );
    }
    // A local user is no exception: nobody needs the token too, and with it sees root's
    // process (a token holder sees every process).
    let reply = get_as_nobody(&setup, port, &heap, None);
    assert_status(&reply, 401, "token", "nobody without the token");
    let reply = get_as_nobody(&setup, port, &format!("{heap}&token={token}"), None);
    assert_eq!(reply.status, 200, "nobody with the token\n{}", reply.show());
    // The index's links carry the token, so that they work.
    let index = get(port, &format!("/debug/pprof/?token={token}"));
    assert!(
        index.text().contains(&format!("&token={token}")),
        "index links without the token\n{}",
        index.show()
    );

    // go tool pprof with the token in the URL, as the README shows.
    if Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let home = setup.scratch.join("gohome");
        std::fs::create_dir_all(&home).expect("go home");
        let out = clean_command("go")
            .args(["tool", "pprof", "-top"])
            .arg(format!("http://127.0.0.1:{port}{heap}&token={token}"))
            .env("HOME", &home)
            .env("PPROF_TMPDIR", &home)
            .output()
            .expect("running go tool pprof");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            // A profile was fetched and read (the worker may not have sampled much yet).
            out.status.success() && text.contains("Type: inuse_space"),
            "go tool pprof with ?token=: {}\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("go is not installed: not checking go tool pprof with ?token=");
    }
    let mut daemon = daemon;
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait();
    assert!(status.success(), "anyprof serve exited with {status}");
    assert!(
        !token_file.exists(),
        "the token file outlived the daemon: {}",
        token_file.display()
    );
    drop(worker);
}

// ---------------------------------------------------------------------------------------
// 4. Slow clients
// ---------------------------------------------------------------------------------------

#[test]
fn a_thousand_slow_clients_are_bounded() {
    let Some(setup) = Setup::new("security_http_slow") else {
        return;
    };
    let daemon = on_loopback(&setup, "daemon", &[]);
    let port = daemon.port;
    let worker = Worker::start(&setup, false, "root-worker");
    wait_listed(port, &[worker.pid]);
    let heap = format!("/debug/pprof/heap?pid={}", worker.pid);
    assert_eq!(get(port, &heap).status, 200);
    let (threads_before, fds_before) = daemon.counts();

    // nobody opens 1,000 connections, sends half a request on each, and waits.
    let started = Instant::now();
    let mut attacker = Command::new(AS_NOBODY[0])
        .args(&AS_NOBODY[1..])
        .arg(&setup.client)
        .args(["stall", &port.to_string(), "1000", "40"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the slow clients");
    let stdout = attacker.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let connected = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the slow clients did not report");
    assert_eq!(connected, "connected 1000", "the slow clients' first line");

    // While they stall: bounded threads and descriptors, and root is answered at once.
    let mut most = (0, 0);
    for _ in 0..5 {
        let (threads, fds) = daemon.counts();
        most = (most.0.max(threads), most.1.max(fds));
        let t = Instant::now();
        let reply = get(port, &heap);
        let took = t.elapsed();
        assert_eq!(
            reply.status,
            200,
            "root's heap during the attack\n{}",
            reply.show()
        );
        assert!(
            took < Duration::from_secs(2),
            "root's request took {took:?} while 1,000 slow clients stalled"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!(
        "daemon before: {threads_before} threads, {fds_before} fds; during 1,000 slow clients \
         at most {} threads, {} fds",
        most.0, most.1
    );
    // The per-user cap (32 by default) holds nobody's connections; the async threads serve
    // them, so the thread count moves by the blocking workers in use, not by connections.
    assert!(
        most.0 <= threads_before + 8,
        "1,000 slow clients made the daemon go from {threads_before} to {} threads",
        most.0
    );
    assert!(
        most.1 <= fds_before + 32 + 16,
        "1,000 slow clients made the daemon go from {fds_before} to {} descriptors",
        most.1
    );

    // Every stalled connection is closed by the daemon: over the cap at once, the others
    // when their headers do not arrive within the header timeout (10 s).
    let mut last = String::new();
    let all_closed = loop {
        match rx.recv_timeout(Duration::from_secs(45)) {
            Ok(line) if line == "closed 1000" => break true,
            Ok(line) if line.starts_with("timeout") => {
                last = line;
                break false;
            }
            Ok(line) => last = line,
            Err(_) => break false,
        }
    };
    let took = started.elapsed();
    assert!(
        all_closed,
        "the daemon did not close the 1,000 stalled connections (last report: {last:?})"
    );
    assert!(
        took < Duration::from_secs(25),
        "closing the stalled connections took {took:?}"
    );
    let _ = attacker.wait();
    let (threads_after, fds_after) = daemon.counts();
    assert!(
        fds_after <= fds_before + 4,
        "descriptors after the attack: {fds_after}, before {fds_before}"
    );
    assert!(
        threads_after <= threads_before + 8,
        "threads after the attack: {threads_after}, before {threads_before}"
    );
    // The daemon counted them against nobody, and said so.
    let said = format!("uid {NOBODY} has 32 HTTP connections open");
    assert!(
        daemon.stderr().contains(&said),
        "the daemon's stderr should say {said:?}:\n{}",
        daemon.stderr()
    );
    drop(worker);
    drop(daemon);
}

// ---------------------------------------------------------------------------------------
// 5. Long requests
// ---------------------------------------------------------------------------------------

#[test]
fn one_long_request_of_each_kind_per_process() {
    let Some(setup) = Setup::new("security_http_long") else {
        return;
    };
    let daemon = on_loopback(&setup, "daemon-1", &[]);
    let port = daemon.port;
    let workers: Vec<Worker> = (0..2)
        .map(|i| Worker::start(&setup, false, &format!("worker-{i}")))
        .collect();
    let (a, b) = (workers[0].pid, workers[1].pid);
    wait_listed(port, &[a, b]);

    let in_background = |port: u16, path: String| std::thread::spawn(move || get(port, &path));
    let first = in_background(port, format!("/debug/pprof/heap?seconds=3&pid={a}"));
    std::thread::sleep(Duration::from_millis(500));
    // The same kind for the same process: refused at once.
    let t = Instant::now();
    let second = get(port, &format!("/debug/pprof/heap?seconds=3&pid={a}"));
    assert_status(
        &second,
        409,
        "already in progress",
        "a second heap?seconds= for one pid",
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the second heap?seconds= waited {:?}",
        t.elapsed()
    );
    let second = get(port, &format!("/debug/pprof/allocs?seconds=1&pid={a}"));
    assert_eq!(
        second.status,
        200,
        "allocs?seconds= beside heap?seconds=\n{}",
        second.show()
    );
    let reply = first.join().expect("request thread");
    assert_eq!(
        reply.status,
        200,
        "the first heap?seconds=3\n{}",
        reply.show()
    );
    // Once it has finished, the next one may run.
    let again = get(port, &format!("/debug/pprof/heap?seconds=1&pid={a}"));
    assert_eq!(
        again.status,
        200,
        "heap?seconds= after the first ended\n{}",
        again.show()
    );
    // CPU profiles as Go words it.
    let cpu = in_background(port, format!("/debug/pprof/profile?seconds=2&pid={a}"));
    std::thread::sleep(Duration::from_millis(500));
    let second_cpu = get(port, &format!("/debug/pprof/profile?seconds=2&pid={a}"));
    assert_status(
        &second_cpu,
        500,
        "cpu profiling already in use",
        "a second CPU profile for one pid",
    );
    assert_eq!(cpu.join().expect("request thread").status, 200);
    drop(daemon);

    // At most --max-long-requests long requests at once; more are refused at once, and the
    // short requests still have their own workers.
    let daemon = on_loopback(&setup, "daemon-2", &["--max-long-requests", "2"]);
    let port = daemon.port;
    wait_listed(port, &[a, b]);
    let running = [
        in_background(port, format!("/debug/pprof/heap?seconds=2&pid={a}")),
        in_background(port, format!("/debug/pprof/heap?seconds=2&pid={b}")),
    ];
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let third = get(port, &format!("/debug/pprof/profile?seconds=1&pid={b}"));
    assert_status(
        &third,
        503,
        "too many long requests",
        "a third long request",
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the third long request waited"
    );
    let short = get(port, &format!("/debug/pprof/heap?pid={b}"));
    assert_eq!(
        short.status,
        200,
        "a short request while long ones run\n{}",
        short.show()
    );
    for handle in running {
        let reply = handle.join().expect("request thread");
        assert_eq!(reply.status, 200, "heap?seconds=2\n{}", reply.show());
    }
    // A long request does not hold the daemon up when it ends: SIGTERM answers it with
    // what it has, and the daemon exits cleanly at once, removing its socket.
    let long = in_background(port, format!("/debug/pprof/profile?seconds=60&pid={a}"));
    std::thread::sleep(Duration::from_millis(1000));
    let mut daemon = daemon;
    let t = Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait();
    assert!(status.success(), "anyprof serve exited with {status}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "anyprof serve took {:?} to end during a 60 s profile",
        t.elapsed()
    );
    assert!(
        !setup.socket().exists(),
        "the daemon left its socket {} behind",
        setup.socket().display()
    );
    let reply = long.join().expect("request thread");
    assert_eq!(reply.status, 200, "the profile cut short\n{}", reply.show());
    drop(workers);
    drop(daemon);
}

// ---------------------------------------------------------------------------------------
// Attaching to processes that are not preloaded
// ---------------------------------------------------------------------------------------

/// `/debug/pprof/profile?pid=P` of a process started without the preload attaches to it
/// with perf events, by the rule of `--attach`: by default (`own`) a user profiles the
/// processes it could ptrace and nothing else, root none; `any` lets root profile every
/// process; `off` none. A process the requester may not profile answers like an unknown pid.
#[test]
fn the_daemon_attaches_only_to_processes_the_requester_could_ptrace() {
    let Some(setup) = Setup::new("serve_attach") else {
        return;
    };
    let nobodys = Worker::start_bare(&setup, true, "nobody_bare");
    let roots = Worker::start_bare(&setup, false, "root_bare");
    let profile_of = |pid: u32| format!("/debug/pprof/profile?seconds=1&pid={pid}");
    let assert_profile = |reply: &Reply, what: &str| {
        assert_eq!(reply.status, 200, "{what}\n{}", reply.show());
        let profile = anyprof::pprof::decode(&reply.body)
            .unwrap_or_else(|e| panic!("{what}: not a profile: {e:#}"));
        let view = anyprof_tests::ProfileView::new(profile);
        assert!(
            view.cumulative_samples().contains_key("serve_hot_spin"),
            "{what}: no samples in serve_hot_spin\n{}",
            view.describe()
        );
    };

    let daemon = on_loopback(&setup, "attach_own", &[]);
    let port = daemon.port;
    let own = get_as_nobody(&setup, port, &profile_of(nobodys.pid), None);
    assert_profile(
        &own,
        "nobody's profile of its own process that is not preloaded",
    );
    let index = get_as_nobody(
        &setup,
        port,
        &format!("/debug/pprof/?pid={}", nobodys.pid),
        None,
    );
    assert_status(
        &index,
        200,
        "not preloaded",
        "nobody's index of its own process",
    );
    let roots_by_nobody = get_as_nobody(&setup, port, &profile_of(roots.pid), None);
    assert_status(
        &roots_by_nobody,
        404,
        "unknown pid",
        "nobody asked for a profile of root's process",
    );
    let by_root = get(port, &profile_of(nobodys.pid));
    assert_status(&by_root, 403, "--attach any", "root, without --attach any");
    drop(daemon);

    let daemon = on_loopback(&setup, "attach_any", &["--attach", "any"]);
    assert_profile(
        &get(daemon.port, &profile_of(nobodys.pid)),
        "root's profile of nobody's process with --attach any",
    );
    let roots_by_nobody = get_as_nobody(&setup, daemon.port, &profile_of(roots.pid), None);
    assert_status(
        &roots_by_nobody,
        404,
        "unknown pid",
        "nobody, with --attach any",
    );
    // go tool pprof reads it over HTTP (CI installs Go: a missing one is a failure).
    let home = setup.scratch.join("home");
    std::fs::create_dir_all(&home).expect("creating a HOME for go");
    let url = format!(
        "http://127.0.0.1:{}/debug/pprof/profile?pid={}",
        daemon.port, nobodys.pid
    );
    let go = clean_command("go")
        .args(["tool", "pprof", "-top", "-seconds", "1", &url])
        .env("HOME", &home)
        .env("PPROF_TMPDIR", &setup.scratch)
        .output()
        .expect("running go tool pprof (install golang-go)");
    let top = String::from_utf8_lossy(&go.stdout);
    assert!(
        go.status.success() && top.contains("serve_hot_spin"),
        "go tool pprof -top {url}: {}\n{top}{}",
        go.status,
        String::from_utf8_lossy(&go.stderr)
    );
    drop(daemon);

    let daemon = on_loopback(&setup, "attach_off", &["--attach", "off"]);
    let own = get_as_nobody(&setup, daemon.port, &profile_of(nobodys.pid), None);
    assert_status(&own, 404, "unknown pid", "nobody, with --attach off");
}
