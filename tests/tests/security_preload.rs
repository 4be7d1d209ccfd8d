//! Issue 12, points 1 to 3: what a local, unprivileged user can make a preloaded process do.
//! Each test plays the attacker as `nobody` (uid/gid 65534) and needs root to do so (it is
//! skipped, saying why, otherwise).
//!
//! * [`setuid_program_ignores_the_callers_anyprof_settings`]: a setuid-root program
//!   (`tests/programs/secure_target.c`) run by `nobody` with the library preloaded and a
//!   hostile `ANYPROF_*` environment: no log file is created, nothing connects to the socket
//!   the caller named, and the program's output is as without the library (which the
//!   program proves was mapped). (glibc itself removes `LD_PRELOAD` from the environment of
//!   a secure-execution program.)
//! * [`squatted_sockets_get_nothing`]: `nobody` listens where a root process might look for
//!   the daemon (`$XDG_RUNTIME_DIR` pointing to a directory of `nobody`, a `/tmp/anyprof-0/`
//!   made by `nobody`, the old `/tmp/anyprof-0.sock` fallback) and on a root-owned socket
//!   file in a root-owned directory whose listener is `nobody` (only `SO_PEERCRED` can tell):
//!   `tests/programs/squat_listener.c` receives no connection (and on the last one, whose
//!   check can only come after `connect`, not one byte), and the root process warns.
//! * [`daemon_socket_mode_does_not_depend_on_the_umask`]: `anyprof serve --allow-uid 65534`
//!   started under umask 022 and 077 gets `nobody`'s process.
//! * [`non_root_daemon_uses_a_private_directory_and_refuses_a_squatted_one`]: the default
//!   socket of a daemon without `XDG_RUNTIME_DIR` is in `/tmp/anyprof-UID/`, which it creates
//!   private and refuses when someone else made it first.
//!
//! Whatever happens, the guards below remove every file made outside the scratch directory
//! and kill every process started.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyprof_tests::daemon::{free_port, poll, Daemon, Request};
use anyprof_tests::{
    binaries, clean_command, compile, run, scratch_dir, skip_outside_ci, RunOutput,
};

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

/// True when the tests can act as root and as `nobody`; else prints why `test` is skipped.
fn can_switch_users(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        let _ = test;
        skip_outside_ci(&format!(
            "it needs root to act as nobody (running as uid {euid})"
        ));
        return false;
    }
    true
}

/// Removes a file or directory (outside the scratch dir) when dropped, even on panic.
struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.0) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir_all(&self.0);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(&self.0);
            }
            Err(_) => {}
        }
    }
}

/// A child process killed and reaped when dropped.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {uid}:{gid} {}: {e}", path.display()));
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// A new directory `path` with the given owner and mode.
fn make_dir(path: &Path, uid: u32, gid: u32, mode: u32) -> PathBuf {
    std::fs::create_dir(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    chown(path, uid, gid);
    chmod(path, mode);
    path.to_path_buf()
}

/// `cmd` as `nobody:nogroup` (std drops the supplementary groups when it sets the uid).
fn as_nobody(cmd: &mut Command) -> &mut Command {
    cmd.uid(NOBODY).gid(NOGROUP)
}

/// The value of `key=` in the program's output.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no `{key}=` line in the program's output:\n{out}"))
}

/// Asserts that `preloaded` behaved as `plain` (exit code, stderr, result, secure) and that
/// the library was really mapped in it (and not in `plain`).
fn assert_unaffected(what: &str, plain: &RunOutput, preloaded: &RunOutput) {
    let (p, q) = (plain.stdout_text(), preloaded.stdout_text());
    assert_eq!(
        (plain.code, preloaded.code),
        (0, 0),
        "{what}: exit codes without/with the preload; stderr:\n{}\n{}",
        plain.stderr_text(),
        preloaded.stderr_text()
    );
    assert_eq!(
        preloaded.stderr_text(),
        plain.stderr_text(),
        "{what}: stderr differs"
    );
    for key in ["result", "secure"] {
        assert_eq!(field(&q, key), field(&p, key), "{what}: `{key}` differs");
    }
    assert_eq!(field(&p, "libanyprof"), "no", "{what}: plain run:\n{p}");
    assert_eq!(
        field(&q, "libanyprof"),
        "yes",
        "{what}: the library was not loaded, so this run proves nothing:\n{q}"
    );
}

/// A listening, non-blocking `SOCK_SEQPACKET` socket at `path`, made by this (root) process.
fn listen_here(path: &Path) -> OwnedFd {
    // SAFETY: plain socket(2); a non-negative result is a descriptor nothing else owns.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: see above.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_un is valid; we fill family and path.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    // SAFETY: `addr` is a valid sockaddr_un and `fd` our socket.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "bind {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: listen on our bound socket.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), 16) };
    assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
    fd
}

/// True if a connection is waiting on `listener` (accepted without blocking, then closed).
fn was_connected(listener: &OwnedFd) -> bool {
    // SAFETY: accept4 on our listening socket, null address pointers allowed.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor accept4 just gave us.
        unsafe { libc::close(fd) };
    }
    fd >= 0
}

// ---------------------------------------------------------------------------------------
// 1. Secure execution
// ---------------------------------------------------------------------------------------

#[test]
fn setuid_program_ignores_the_callers_anyprof_settings() {
    const TEST: &str = "setuid_program_ignores_the_callers_anyprof_settings";
    if !can_switch_users(TEST) {
        return;
    }
    let scratch = scratch_dir("security_setuid");
    let exe = compile("secure_target.c", &["-O1"], &scratch);
    chown(&exe, 0, 0);
    chmod(&exe, 0o4755);
    // glibc preloads into a setuid program only a bare library name found in its trusted
    // directories, and only if that file is setuid itself.
    let lib_dir = Path::new("/usr/lib/x86_64-linux-gnu");
    if !lib_dir.is_dir() {
        skip_outside_ci(&format!("no {}", lib_dir.display()));
        return;
    }
    let lib_name = format!("libanyprof-sectest-{}.so", std::process::id());
    let lib = lib_dir.join(&lib_name);
    let _remove_lib = Remove(lib.clone());
    std::fs::copy(binaries().preload, &lib)
        .unwrap_or_else(|e| panic!("copying the preload to {}: {e}", lib.display()));
    chmod(&lib, 0o4755);

    // What the caller controls: a directory it can write to, where the library must not
    // create the log file, and the socket it names (root's own, in a root-owned directory:
    // the checks of every connection would accept it, only the secure-execution rule
    // refuses it).
    let writable = make_dir(&scratch.join("nobody-writes"), NOBODY, NOGROUP, 0o777);
    let log = writable.join("written-as-root.log");
    let sock_dir = make_dir(&scratch.join("sock"), 0, 0, 0o755);
    let socket = sock_dir.join("caller.sock");
    let listener = listen_here(&socket);

    let plain = run(as_nobody(&mut clean_command(&exe)).arg("300"));
    let mut cmd = clean_command(&exe);
    as_nobody(&mut cmd)
        .arg("300")
        .env("LD_PRELOAD", &lib_name)
        .env("ANYPROF_LOG_FILE", &log)
        .env("ANYPROF_MODE", "bogus\nroot::0:0::/root:/bin/sh")
        .env("ANYPROF_SOCKET", &socket)
        .env("ANYPROF_EXEC", "off")
        .env("ANYPROF_CPU_HZ", "1000")
        .env("ANYPROF_MEM_RATE", "1")
        .env("XDG_RUNTIME_DIR", &writable);
    let preloaded = run(&mut cmd);
    let out = preloaded.stdout_text();
    assert_eq!(
        field(&out, "secure"),
        "1",
        "the setuid program did not run in secure mode (nosuid mount?):\n{out}"
    );
    assert_unaffected("setuid program run by nobody", &plain, &preloaded);
    assert!(
        !log.exists(),
        "the setuid-root program wrote the caller's ANYPROF_LOG_FILE {}:\n{}",
        log.display(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(
        std::fs::read_dir(&writable).map(|d| d.count()).unwrap_or(0),
        0,
        "the setuid-root program created files in the caller's directory"
    );
    assert!(
        !was_connected(&listener),
        "the setuid-root program connected to the caller's ANYPROF_SOCKET {}",
        socket.display()
    );
}

// ---------------------------------------------------------------------------------------
// 2. Squatted sockets
// ---------------------------------------------------------------------------------------

/// `squat_listener` running as nobody.
struct Squatter {
    child: Kill,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Squatter {
    fn start(exe: &Path, paths: &[PathBuf]) -> Squatter {
        let mut cmd = clean_command(exe);
        as_nobody(&mut cmd)
            .args(paths)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = lines.recv_timeout(Duration::from_secs(10));
        assert_eq!(
            first.as_deref(),
            Ok("listening"),
            "squat_listener did not start listening on {paths:?}"
        );
        Squatter {
            child: Kill(child),
            stdin,
            lines,
        }
    }

    /// Stops it; every line it printed after `listening`.
    fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            let done = line == "done";
            out.push(line);
            if done {
                break;
            }
        }
        let _ = self.child.0.wait();
        out
    }
}

/// Claims `path` in /tmp for the attacker unless something is there already (then the part
/// of the test that needs it is left out, and said so).
fn claim_tmp(path: &str) -> Option<Remove> {
    let path = PathBuf::from(path);
    if std::fs::symlink_metadata(&path).is_ok() {
        eprintln!(
            "note: {} exists already; this run does not squat it",
            path.display()
        );
        return None;
    }
    Some(Remove(path))
}

#[test]
fn squatted_sockets_get_nothing() {
    const TEST: &str = "squatted_sockets_get_nothing";
    if !can_switch_users(TEST) {
        return;
    }
    let scratch = scratch_dir("security_squat");
    let victim = compile("secure_target.c", &["-O1"], &scratch);
    let squatter = compile("squat_listener.c", &["-O1"], &scratch);

    // Where a root process looks for the daemon, occupied by nobody.
    let xdg = make_dir(&scratch.join("xdg-of-nobody"), NOBODY, NOGROUP, 0o700);
    let mut paths = vec![xdg.join("anyprof.sock")];
    let private = claim_tmp("/tmp/anyprof-0");
    if let Some(dir) = &private {
        make_dir(&dir.0, NOBODY, NOGROUP, 0o755);
        paths.push(dir.0.join("anyprof.sock"));
    }
    let old_fallback = claim_tmp("/tmp/anyprof-0.sock");
    if let Some(sock) = &old_fallback {
        paths.push(sock.0.clone());
    }
    // A socket file that passes every file check (root's, in root's own directory) but
    // whose listener is nobody: bound by nobody in its own directory, then moved and
    // chowned by root. Only SO_PEERCRED tells.
    let drop_dir = make_dir(&scratch.join("nobody-binds"), NOBODY, NOGROUP, 0o755);
    let bound_at = drop_dir.join("peer.sock");
    paths.push(bound_at.clone());
    let attacker = Squatter::start(&squatter, &paths);
    let root_dir = make_dir(&scratch.join("root-dir"), 0, 0, 0o755);
    let peer_sock = root_dir.join("peer.sock");
    std::fs::rename(&bound_at, &peer_sock).expect("moving nobody's socket");
    chown(&peer_sock, 0, 0);

    let plain = run(clean_command(&victim).arg("1500"));
    // The default places (serve mode, no ANYPROF_SOCKET), tried at start and retried about
    // every second while the program runs.
    let log_defaults = scratch.join("defaults.log");
    let defaults = run(clean_command(&victim)
        .arg("1500")
        .env("LD_PRELOAD", binaries().preload)
        .env("XDG_RUNTIME_DIR", &xdg)
        .env("ANYPROF_LOG_FILE", &log_defaults));
    assert_unaffected("root process, squatted default sockets", &plain, &defaults);
    // ANYPROF_SOCKET naming a socket that nobody listens on.
    let log_named = scratch.join("named.log");
    let named = run(clean_command(&victim)
        .arg("1500")
        .env("LD_PRELOAD", binaries().preload)
        .env("ANYPROF_SOCKET", &peer_sock)
        .env("ANYPROF_LOG_FILE", &log_named));
    assert_unaffected("root process, ANYPROF_SOCKET of nobody", &plain, &named);

    let heard = attacker.finish();
    // The listener behind the root-owned file is only found out by SO_PEERCRED, after
    // connect: it sees the connection, and the hang-up, but not one byte.
    let peer_line = format!("connection {}", bound_at.display());
    let leaks: Vec<&String> = heard
        .iter()
        .filter(|l| l.starts_with("data") || (l.starts_with("connection") && **l != peer_line))
        .collect();
    assert!(
        leaks.is_empty(),
        "root's preloaded process connected or sent data to sockets of nobody: {leaks:?}"
    );
    assert_eq!(
        heard.last().map(String::as_str),
        Some("done"),
        "squat_listener did not end cleanly: {heard:?}"
    );

    // Each refusal is explained once, naming the socket and the owner found.
    let text = std::fs::read_to_string(&log_defaults).unwrap_or_default();
    let mut expected = vec![xdg.join("anyprof.sock")];
    if let Some(dir) = &private {
        expected.push(dir.0.join("anyprof.sock"));
    }
    for path in expected {
        let needle = format!("not connecting to {}", path.display());
        assert!(
            text.lines()
                .any(|l| l.contains(&needle) && l.contains(&NOBODY.to_string())),
            "no warning {needle:?} naming uid {NOBODY} in the log:\n{text}"
        );
    }
    let text = std::fs::read_to_string(&log_named).unwrap_or_default();
    let needle = format!(
        "not connecting to {}: the process listening on it runs as uid {NOBODY}",
        peer_sock.display()
    );
    assert!(
        text.contains(&needle),
        "no warning {needle:?} in the log:\n{text}"
    );
    drop((private, old_fallback));
}

// ---------------------------------------------------------------------------------------
// 3. The daemon's socket and the umask
// ---------------------------------------------------------------------------------------

/// The text of the daemon's index page, or "" if it does not answer within 5 s.
fn index_text(port: u16) -> String {
    Request::new("GET", port, "/debug/pprof/")
        .timeout(Duration::from_secs(5))
        .send()
        .map(|reply| reply.text())
        .unwrap_or_default()
}

/// Whether `done` comes true (polled every 100 ms) within `timeout`.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    poll(timeout, Duration::from_millis(100), || done().then_some(())).is_some()
}

#[test]
fn daemon_socket_mode_does_not_depend_on_the_umask() {
    const TEST: &str = "daemon_socket_mode_does_not_depend_on_the_umask";
    if !can_switch_users(TEST) {
        return;
    }
    let scratch = scratch_dir("security_umask");
    let worker = compile("serve_worker.c", &["-O1", "-pthread"], &scratch);
    for umask in [0o022, 0o077] {
        let dir = make_dir(&scratch.join(format!("umask-{umask:03o}")), 0, 0, 0o755);
        let socket = dir.join("d.sock");
        let daemon = Daemon::serve(&dir.join("daemon.stderr"))
            .socket(&socket)
            .args(&["--allow-uid", &NOBODY.to_string()])
            .umask(umask)
            .try_start()
            .unwrap_or_else(|e| {
                panic!("anyprof serve did not come up under umask {umask:03o}: {e}")
            });
        let port = daemon.port;
        let (process, pid) = start_nobody_worker(&worker, |cmd| {
            cmd.env("ANYPROF_SOCKET", &socket);
        });
        let row = format!("<td>{pid}</td>");
        let mut index = String::new();
        let listed = wait_until(Duration::from_secs(10), || {
            index = index_text(port);
            index.contains(&row)
        });
        assert!(
            listed,
            "nobody's process {pid} never reached the daemon started under umask {umask:03o} \
             with --allow-uid {NOBODY}; index:\n{index}\ndaemon stderr:\n{}",
            daemon.stderr()
        );
        let mode = std::fs::metadata(&socket)
            .map(|m| m.mode() & 0o777)
            .unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
        assert_eq!(mode, 0o666, "daemon socket mode under umask {umask:03o}");

        drop(process);
        drop(daemon);
    }
}

/// Starts `serve_worker 20 5` as nobody with the preload; the child and its pid.
fn start_nobody_worker(worker: &Path, configure: impl FnOnce(&mut Command)) -> (Kill, u32) {
    let mut cmd = clean_command(worker);
    as_nobody(&mut cmd)
        .args(["20", "5"])
        .env("LD_PRELOAD", binaries().preload)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    configure(&mut cmd);
    let mut child = cmd.spawn().expect("starting serve_worker as nobody");
    let stdout = child.stdout.take().expect("piped stdout");
    let process = Kill(child);
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    let pid: u32 = line
        .trim()
        .strip_prefix("ready pid=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("serve_worker printed {line:?}, not `ready pid=N`"));
    (process, pid)
}

/// A daemon of nobody without `XDG_RUNTIME_DIR` (and without `--socket`) listens in the
/// private directory `/tmp/anyprof-65534/`, which it creates mode 0700 and where nobody's
/// processes find it by themselves; if someone else made that directory first, it refuses
/// to start and says what to do.
#[test]
fn non_root_daemon_uses_a_private_directory_and_refuses_a_squatted_one() {
    const TEST: &str = "non_root_daemon_uses_a_private_directory_and_refuses_a_squatted_one";
    if !can_switch_users(TEST) {
        return;
    }
    let Some(private) = claim_tmp(&format!("/tmp/anyprof-{NOBODY}")) else {
        // Not ours to remove (a daemon of nobody's may be using it): the one skip CI allows,
        // as it depends on what else ran on the machine, not on what is installed.
        eprintln!("SKIPPED {TEST}: /tmp/anyprof-{NOBODY} exists already");
        return;
    };
    let scratch = scratch_dir("security_private_dir");
    let worker = compile("serve_worker.c", &["-O1", "-pthread"], &scratch);
    // `anyprof serve` as nobody, without `--socket` and `XDG_RUNTIME_DIR`.
    let daemon = |label: &str| {
        Daemon::serve(&scratch.join(format!("{label}.stderr")))
            .user(NOBODY, NOGROUP)
            .env_remove("XDG_RUNTIME_DIR")
    };

    // Squatted by another user (root here): refused.
    make_dir(&private.0, 0, 0, 0o700);
    let mut refused = daemon("squatted").spawn(free_port());
    let status = wait_until(Duration::from_secs(10), || refused.try_wait().is_some());
    let stderr = refused.stderr();
    assert!(
        status,
        "anyprof serve started although /tmp/anyprof-{NOBODY} belongs to root:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "/tmp/anyprof-{NOBODY} is not a private directory of yours"
        )) && stderr.contains("XDG_RUNTIME_DIR"),
        "the refusal does not say what is wrong and what to do:\n{stderr}"
    );
    assert!(
        !private.0.join("anyprof.sock").exists(),
        "a socket was created in the squatted directory"
    );
    drop(refused);
    std::fs::remove_dir(&private.0).expect("removing the squatted directory");

    // Absent: created, private, and found by nobody's processes without ANYPROF_SOCKET.
    let port = free_port();
    let _daemon = daemon("private")
        .port(port)
        .try_start()
        .unwrap_or_else(|e| panic!("anyprof serve as nobody did not come up: {e}"));
    let meta = std::fs::symlink_metadata(&private.0).expect("the private directory");
    assert!(
        meta.is_dir() && meta.uid() == NOBODY && meta.mode() & 0o7777 == 0o700,
        "/tmp/anyprof-{NOBODY} is not a 0700 directory of nobody: uid {} mode {:o}",
        meta.uid(),
        meta.mode() & 0o7777
    );
    let (_process, pid) = start_nobody_worker(&worker, |cmd| {
        cmd.env_remove("XDG_RUNTIME_DIR");
    });
    let row = format!("<td>{pid}</td>");
    let mut index = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            index = index_text(port);
            index.contains(&row)
        }),
        "nobody's process {pid} did not find nobody's daemon in /tmp/anyprof-{NOBODY}; \
         index:\n{index}"
    );
}
