//! Attacks on the collector by the processes it serves (issue 12: files opened for a process,
//! the pid it claims, and the memory it may make the collector keep).
//!
//! * [`fifo_split_dwarf_files_do_not_hang_record`]: FIFOs named like the `.dwp` package and
//!   the `.dwo` file of a library the program uses; `anyprof record` still finishes, with a
//!   profile that names the library's function (from its symbol table).
//! * [`root_daemon_reads_files_with_the_peers_rights`]: a process of `nobody` connects to a
//!   root `anyprof serve --allow-uid 65534` and names, as its modules, a root-only (0600)
//!   library and a world-readable one; the daemon names the function of the readable one
//!   only. The same process claims to be pid 1 and is listed under its real pid.
//! * [`peer_over_its_memory_cap_is_cut_off`]: a process sends hundreds of MiB of distinct
//!   stacks to a daemon with `--max-process-memory 16`: the daemon's memory stays bounded, it
//!   warns once naming the pid and the flag, and it still serves another process.
//! * [`one_user_cannot_take_every_daemon_thread`]: `nobody` opens 2,000 connections that
//!   send nothing: the daemon keeps at most `--max-processes-per-user` of them (threads and
//!   descriptors stay bounded), warns once naming the uid and the flag, and still takes a
//!   preloaded process of root.
//! * [`silent_connections_are_closed_after_the_hello_timeout`]: connections without a hello
//!   are closed after 5 s; a process that said hello and then went silent, or was stopped,
//!   stays connected.
//! * [`library_cut_in_place_by_its_owner_does_not_kill_the_daemon`]: a process of `nobody`
//!   names a library `nobody` owns; after the root daemon has opened it, the file is cut in
//!   place; the daemon still names a function whose debug info lay past the cut (it read the
//!   file rather than mapping it) and does not die of `SIGBUS`.
//!
//! * [`an_unsealed_region_is_refused_and_cannot_kill_the_daemon`]: a process of `nobody`
//!   hands the root daemon a shared region (issue 13) in a memfd it did not seal, then cuts
//!   the memfd to nothing; the daemon refused it with one warning and does not die of
//!   `SIGBUS`. A sealed one is taken, and cannot be cut.
//!
//! The hostile processes are `tests/programs/seqpacket_relay.c`, which sends whatever
//! messages the test built with the wire crate's encoders,
//! `tests/programs/silent_connections.c`, which sends nothing, and
//! `tests/programs/region_attack.c`, which hands over a region; all run as `nobody`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyprof_tests::daemon::{Daemon, Request};
use anyprof_tests::{binaries, clean_command, compile, scratch_dir, skip_outside_ci, ProfileView};
use anyprof_wire as wire;

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A scratch directory that `nobody` can search.
fn open_scratch(name: &str) -> PathBuf {
    let dir = scratch_dir(name);
    let mut up = dir.as_path();
    // Every directory above must be searchable too (they normally are: 755).
    while let Some(parent) = up.parent() {
        let mode = std::fs::metadata(parent).map_or(0, |m| m.permissions().mode());
        assert!(
            mode & 0o001 != 0,
            "{} is not searchable by other users; the test needs it to be",
            parent.display()
        );
        up = parent;
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compiles C `source` into a shared library `dir/name`, in `dir`, with `flags`.
fn shared_library(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    run_ok(
        Command::new("cc")
            .current_dir(dir)
            .args(["-shared", "-fPIC", "-O1"])
            .args(flags)
            .arg("-o")
            .arg(name)
            .arg(&src),
    );
    dir.join(name)
}

/// The address of function `name` in the ELF file at `path`, as `nm` states it.
fn function_address(path: &Path, name: &str) -> u64 {
    let out = Command::new("nm")
        .arg("--defined-only")
        .arg(path)
        .output()
        .expect("running nm (install binutils)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.next()?;
            let _kind = fields.next()?;
            (fields.next()? == name).then(|| u64::from_str_radix(address, 16).ok())?
        })
        .unwrap_or_else(|| panic!("{name} not found by nm in {}", path.display()))
}

// ---------------------------------------------------------------------------------------
// (a) FIFOs where split DWARF is looked for
// ---------------------------------------------------------------------------------------

const FIFO_LIB: &str = r#"
volatile unsigned long fifo_sink;
__attribute__((noinline)) void fifo_lib_spin(void) {
    for (unsigned long i = 0; i < 400000000UL; i++)
        fifo_sink += i;
}
"#;

const FIFO_MAIN: &str = r#"
void fifo_lib_spin(void);
int main(void) {
    fifo_lib_spin();
    return 0;
}
"#;

#[test]
fn fifo_split_dwarf_files_do_not_hang_record() {
    let dir = scratch_dir("security_peer_fifo");
    // Split DWARF: the library's skeleton units name a .dwo file, and a .dwp package is
    // looked for beside the library. Both become FIFOs that no one ever writes.
    let lib = shared_library(
        &dir,
        "libfifo.so",
        FIFO_LIB,
        &["-g", "-gsplit-dwarf", "-gdwarf-4"],
    );
    let mut fifos = vec![dir.join("libfifo.so.dwp")];
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "dwo") {
            std::fs::remove_file(&path).unwrap();
            fifos.push(path);
        }
    }
    assert!(fifos.len() >= 2, "the compiler wrote no .dwo file");
    for fifo in &fifos {
        run_ok(Command::new("mkfifo").arg(fifo));
    }
    std::fs::write(dir.join("main.c"), FIFO_MAIN).unwrap();
    let rpath = format!("-Wl,-rpath,{}", dir.display());
    run_ok(
        Command::new("cc")
            .current_dir(&dir)
            .args(["-O1", "-o", "main", "main.c", "-L."])
            .arg("-lfifo")
            .arg(&rpath),
    );
    assert!(lib.is_file());

    let out_dir = dir.join("profile");
    let mut child = clean_command(binaries().anyprof)
        .args(["record", "-q", "-o"])
        .arg(&out_dir)
        .arg("--")
        .arg(dir.join("main"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting anyprof record");
    let limit = Duration::from_secs(120);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "HANG: anyprof record did not finish within {limit:?} with FIFOs at {fifos:?} \
                 (a blocking open of a split-DWARF file)"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    assert!(
        status.success(),
        "anyprof record failed: {status}\n{stderr}"
    );
    let profile = anyprof::pprof::read_file(&out_dir.join("cpu.pb.gz"))
        .unwrap_or_else(|e| panic!("no CPU profile: {e:#}\n{stderr}"));
    let dump = ProfileView::new(profile).dump();
    assert!(
        dump.contains("fifo_lib_spin"),
        "the library's function is not named (its symbol table still names it):\n{dump}"
    );
}

// ---------------------------------------------------------------------------------------
// A daemon, an HTTP client and a hostile peer
// ---------------------------------------------------------------------------------------

/// `anyprof serve --socket SOCKET --http 127.0.0.1:PORT ARGS`, started with umask 0 so that
/// its socket file is connectable by `nobody` whatever the daemon's own policy for it; ready
/// once it answers HTTP and its socket exists.
fn start_daemon(dir: &Path, socket: &Path, args: &[&str]) -> Daemon {
    Daemon::serve(&dir.join("daemon.stderr"))
        .socket(socket)
        .args(args)
        .umask(0)
        .start()
}

/// What these tests ask the daemon, with its stderr in the failure messages.
trait Queries {
    /// GET `path`: the status and the body.
    fn get(&self, path: &str) -> (u16, Vec<u8>);
    /// The names `/symbol` gives for `addresses` of process `pid`, one line per address,
    /// once they include `expected` (the process's messages may still be on their way), or
    /// what they are after 10 s.
    fn symbols(&self, pid: u32, addresses: &[u64], expected: &str) -> String;
    /// The status and names `/symbol` gives for `addresses` of process `pid` now.
    fn symbols_now(&self, pid: u32, addresses: &[u64]) -> (u16, String);
}

impl Queries for Daemon {
    fn get(&self, path: &str) -> (u16, Vec<u8>) {
        http(self.port, "GET", path, b"")
            .unwrap_or_else(|e| panic!("GET {path}: {e}\ndaemon stderr:\n{}", self.stderr()))
    }

    fn symbols(&self, pid: u32, addresses: &[u64], expected: &str) -> String {
        let start = Instant::now();
        loop {
            let (status, names) = self.symbols_now(pid, addresses);
            if (status == 200 && names.contains(expected))
                || start.elapsed() > Duration::from_secs(10)
            {
                assert_eq!(status, 200, "/symbol: {names}\n{}", self.stderr());
                return names;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn symbols_now(&self, pid: u32, addresses: &[u64]) -> (u16, String) {
        let body: Vec<String> = addresses.iter().map(|a| format!("{a:#x}")).collect();
        let (status, text) = http(
            self.port,
            "POST",
            &format!("/debug/pprof/symbol?pid={pid}"),
            body.join("+").as_bytes(),
        )
        .unwrap_or_else(|e| panic!("POST /symbol: {e}\ndaemon stderr:\n{}", self.stderr()));
        (status, String::from_utf8_lossy(&text).into_owned())
    }
}

/// One request (connecting within 5 s, answered within 60 s); returns the status and the
/// body.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let reply = Request::new(method, port, path)
        .body(body)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .send()?;
    Ok((reply.status, reply.body))
}

/// A hostile process: `seqpacket_relay` connected to the daemon, having sent the messages
/// the test wrote; killed when dropped.
struct Peer {
    child: Child,
    pid: u32,
}

impl Peer {
    /// Starts the relay (as `uid`/`gid` if given), lets `write` produce its messages (each
    /// passed to the sink given to it) and waits until all were sent.
    fn start(
        relay: &Path,
        socket: &Path,
        ids: Option<(u32, u32)>,
        write: impl FnOnce(&mut dyn FnMut(&[u8])) + Send + 'static,
    ) -> Peer {
        let mut cmd = Command::new(relay);
        cmd.arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some((uid, gid)) = ids {
            // std drops root's supplementary groups when a root parent sets a uid.
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().expect("starting seqpacket_relay");
        let pid = child.id();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            let mut count = 0u64;
            let mut failed = false;
            write(&mut |msg: &[u8]| {
                count += 1;
                if !failed {
                    let framed = stdin
                        .write_all(&(msg.len() as u32).to_le_bytes())
                        .and_then(|_| stdin.write_all(msg));
                    failed = framed.is_err();
                }
            });
            count
        });
        let count = writer.join().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            format!("sent {count}"),
            "the relay could not send every message (connection refused or cut?)"
        );
        Peer { child, pid }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn message(encode: impl FnOnce(&mut [u8]) -> Option<usize>) -> Vec<u8> {
    let mut buf = vec![0u8; wire::MAX_MESSAGE];
    let n = encode(&mut buf).expect("message fits");
    buf.truncate(n);
    buf
}

fn hello(claimed_pid: u32) -> Vec<u8> {
    message(|buf| {
        wire::encode_hello(
            buf,
            &wire::HelloInfo {
                pid: claimed_pid,
                ppid: 0,
                cpu_hz: 0,
                timer: wire::TimerKind::Off,
                mem_rate: 1,
                start_realtime_ns: 1,
                start_monotonic_ns: 1,
                exe: b"/usr/sbin/hostile",
                cmdline: b"hostile",
            },
        )
    })
}

/// Module `id` at `path`, mapped with `load_bias`, its executable range 1 MiB from there.
fn module(id: u32, path: &Path, load_bias: u64) -> Vec<u8> {
    let path = path.as_os_str().as_encoded_bytes();
    message(|buf| {
        wire::encode_module_loaded(
            buf,
            &wire::ModuleInfo {
                id,
                start: load_bias,
                end: load_bias + (1 << 20),
                file_offset: 0,
                load_bias,
                path,
                build_id: b"",
            },
        )
    })
}

/// Heap buckets, each allocated once at the given return address.
fn heap_buckets(buckets: &[(u32, u64)]) -> Vec<u8> {
    let mut buf = vec![0u8; wire::MAX_MESSAGE];
    let mut batch = wire::HeapBatch::new(&mut buf);
    let counts = wire::BucketCounts {
        alloc_objects: 1,
        alloc_bytes: 4096,
        free_objects: 0,
        free_bytes: 0,
    };
    for &(id, return_address) in buckets {
        assert!(batch.push(id, 4096, &counts, &[return_address]));
    }
    let n = batch.len();
    buf.truncate(n);
    buf
}

/// The library only root may read, and one everyone may; each with one named function.
const SECRET_LIB: &str =
    "__attribute__((noinline)) int anyprof_secret_fn(int x) { return x * 7 + 1; }\n";
const PUBLIC_LIB: &str =
    "__attribute__((noinline)) int anyprof_public_fn(int x) { return x * 5 + 3; }\n";
const SECRET_BIAS: u64 = 0x7f00_0000_0000;
const PUBLIC_BIAS: u64 = 0x7f10_0000_0000;

/// Builds both libraries in `dir`: `secret.so` mode 0600 owned by root, `public.so` 0644.
/// Returns their paths and the runtime addresses of their functions.
fn libraries(dir: &Path) -> (PathBuf, PathBuf, u64, u64) {
    let secret = shared_library(dir, "secret.so", SECRET_LIB, &[]);
    let public = shared_library(dir, "public.so", PUBLIC_LIB, &[]);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
    let secret_at = SECRET_BIAS + function_address(&secret, "anyprof_secret_fn");
    let public_at = PUBLIC_BIAS + function_address(&public, "anyprof_public_fn");
    (secret, public, secret_at, public_at)
}

fn relay_program(dir: &Path) -> PathBuf {
    let relay = compile("seqpacket_relay.c", &["-O1"], dir);
    std::fs::set_permissions(&relay, std::fs::Permissions::from_mode(0o755)).unwrap();
    relay
}

// ---------------------------------------------------------------------------------------
// (b) Files are read with the peer's rights; the pid is the kernel's
// ---------------------------------------------------------------------------------------

#[test]
fn root_daemon_reads_files_with_the_peers_rights() {
    if !is_root() {
        skip_outside_ci("it needs root (a root daemon and a process of nobody)");
        return;
    }
    let dir = open_scratch("security_peer_rights");
    let relay = relay_program(&dir);
    let (secret, public, secret_at, public_at) = libraries(&dir);
    let socket = dir.join("sock");
    let daemon = start_daemon(&dir, &socket, &["--allow-uid", "65534"]);

    // Root's own look at the secret library first, as a root process of the same daemon
    // would cause: what is cached for root must not answer for nobody.
    let (secret2, public2) = (secret.clone(), public.clone());
    let root_peer = Peer::start(&relay, &socket, None, move |send| {
        send(&hello(4_000_000));
        send(&module(1, &secret2, SECRET_BIAS));
        send(&module(2, &public2, PUBLIC_BIAS));
    });
    let root_names = daemon.symbols(root_peer.pid, &[secret_at, public_at], "anyprof_secret_fn");
    assert!(
        root_names.contains("anyprof_secret_fn") && root_names.contains("anyprof_public_fn"),
        "root's process should get both names: {root_names:?}\n{}",
        daemon.stderr()
    );

    let peer = Peer::start(&relay, &socket, Some((NOBODY, NOGROUP)), move |send| {
        // The process claims to be init.
        send(&hello(1));
        send(&module(1, &secret, SECRET_BIAS));
        send(&module(2, &public, PUBLIC_BIAS));
        send(&heap_buckets(&[(1, secret_at + 1), (2, public_at + 1)]));
    });

    // Listed under the pid the kernel gives, not the one it claims.
    let (status, _) = daemon.get("/debug/pprof/heap?pid=1");
    assert_ne!(status, 200, "a process claiming pid 1 is served as pid 1");

    let names = daemon.symbols(peer.pid, &[secret_at, public_at], "anyprof_public_fn");
    assert!(
        names.contains("anyprof_public_fn"),
        "the library nobody can read must be symbolized for nobody: {names:?}\n{}",
        daemon.stderr()
    );
    assert!(
        !names.contains("anyprof_secret_fn"),
        "a root-only file was read for a process of nobody: {names:?}"
    );

    let (status, body) = daemon.get(&format!("/debug/pprof/heap?pid={}", peer.pid));
    assert_eq!(status, 200, "heap: {}", String::from_utf8_lossy(&body));
    // Every string the profile holds (function names, files, mappings).
    let strings = anyprof::pprof::decode(&body)
        .expect("a pprof profile")
        .string_table;
    let has = |name: &str| strings.iter().any(|s| s.contains(name));
    assert!(
        has("anyprof_public_fn"),
        "heap profile strings: {strings:?}"
    );
    assert!(
        !has("anyprof_secret_fn"),
        "a root-only file was read for a process of nobody: {strings:?}"
    );
}

// ---------------------------------------------------------------------------------------
// (c) The memory cap
// ---------------------------------------------------------------------------------------

#[test]
fn peer_over_its_memory_cap_is_cut_off() {
    if !is_root() {
        skip_outside_ci("it needs root (a process of nobody)");
        return;
    }
    let dir = open_scratch("security_peer_memory");
    let relay = relay_program(&dir);
    let (_, public, _, public_at) = libraries(&dir);
    let socket = dir.join("sock");
    let cap_mib = 16;
    let daemon = start_daemon(
        &dir,
        &socket,
        &[
            "--allow-uid",
            "65534",
            "--max-process-memory",
            &cap_mib.to_string(),
        ],
    );
    let before = daemon.rss_kib();

    // About 330 MiB of distinct 128-frame stacks: kept whole, they would take more than
    // that in the daemon.
    const MESSAGES: u64 = 10_000;
    let flood = Peer::start(&relay, &socket, Some((NOBODY, NOGROUP)), |send| {
        send(&hello(1));
        let mut buf = vec![0u8; wire::MAX_MESSAGE];
        let mut frames = [0u64; wire::MAX_FRAMES];
        let mut next = 0u64;
        for _ in 0..MESSAGES {
            let mut batch = wire::SampleBatch::new(&mut buf);
            loop {
                for f in frames.iter_mut() {
                    next += 1;
                    *f = next;
                }
                if !batch.push(1, 0, next, 1, &frames) {
                    break;
                }
            }
            let n = batch.len();
            send(&buf[..n]);
        }
    });
    // The last messages may still be in the socket's queue.
    std::thread::sleep(Duration::from_millis(500));
    let after = daemon.rss_kib();
    let grown_mib = after.saturating_sub(before) / 1024;
    assert!(
        grown_mib < cap_mib + 100,
        "the daemon grew by {grown_mib} MiB for one process with a cap of {cap_mib} MiB"
    );

    let stderr = daemon.stderr();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("--max-process-memory"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning naming the flag expected:\n{stderr}"
    );
    assert!(
        warnings[0].contains(&format!("[{}]", flood.pid)),
        "the warning names the process: {}",
        warnings[0]
    );

    // Still serving: the flooding process and another one.
    let (status, _) = daemon.get(&format!("/debug/pprof/heap?pid={}", flood.pid));
    assert_eq!(status, 200);
    let other = Peer::start(&relay, &socket, None, move |send| {
        send(&hello(2));
        send(&module(1, &public, PUBLIC_BIAS));
    });
    let names = daemon.symbols(other.pid, &[public_at], "anyprof_public_fn");
    assert!(names.contains("anyprof_public_fn"), "{names:?}");
}

// ---------------------------------------------------------------------------------------
// (d) Connections that never say hello
// ---------------------------------------------------------------------------------------

/// `silent_connections SOCKET COUNT` run as `nobody`: connections that never send anything,
/// held until dropped.
struct Silent {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Silent {
    /// Opens `count` connections and waits until they are open.
    fn start(dir: &Path, socket: &Path, count: usize) -> Silent {
        let program = compile("silent_connections.c", &["-O1"], dir);
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut child = Command::new(&program)
            .arg(socket)
            .arg(count.to_string())
            .uid(NOBODY)
            .gid(NOGROUP)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting silent_connections");
        let stdin = child.stdin.take().unwrap();
        let mut silent = Silent {
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
            stdin,
        };
        let line = silent.line();
        assert_eq!(
            line,
            format!("connected {count}"),
            "silent_connections could not open its connections"
        );
        silent
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// How many of its connections the daemon has closed.
    fn closed(&mut self) -> usize {
        self.stdin.write_all(b"?\n").unwrap();
        self.stdin.flush().unwrap();
        let line = self.line();
        line.strip_prefix("closed ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("silent_connections said {line:?}"))
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Threads and open descriptors of process `pid`.
fn tasks_and_fds(pid: u32) -> (usize, usize) {
    let count = |what: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{what}")).map_or(0, |entries| entries.count())
    };
    (count("task"), count("fd"))
}

/// `sleep 600` preloaded (as root), connected to the daemon at `socket`; killed when dropped.
fn preloaded_sleep(socket: &Path) -> Peer {
    let child = clean_command("sleep")
        .arg("600")
        .env("LD_PRELOAD", &binaries().preload)
        .env("ANYPROF_SOCKET", socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting sleep");
    Peer {
        pid: child.id(),
        child,
    }
}

/// Whether the daemon lists a process, for the tests of its connection limits.
trait Listing {
    /// Whether the index (`/debug/pprof/`) lists `pid`.
    fn lists(&self, pid: u32) -> bool;
    /// Waits up to 10 s for the index to list `pid`.
    fn wait_listed(&self, pid: u32, what: &str);
}

impl Listing for Daemon {
    fn lists(&self, pid: u32) -> bool {
        let (status, html) = self.get("/debug/pprof/");
        assert_eq!(status, 200, "index: {}", String::from_utf8_lossy(&html));
        String::from_utf8_lossy(&html).contains(&format!("<tr><td>{pid}</td>"))
    }

    fn wait_listed(&self, pid: u32, what: &str) {
        let start = Instant::now();
        while !self.lists(pid) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{what} (pid {pid}) is not listed by the daemon\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One user opens 2,000 connections that send nothing: the daemon keeps at most
/// `--max-processes-per-user` (512 by default) of them, each with its thread and two
/// descriptors, closes the others at once, warns once naming the uid and the flag, and still
/// takes a process of root.
#[test]
fn one_user_cannot_take_every_daemon_thread() {
    if !is_root() {
        skip_outside_ci("it needs root (a root daemon and a process of nobody)");
        return;
    }
    const CONNECTIONS: usize = 2000;
    const CAP: usize = 512; // the default of --max-processes-per-user
    let dir = open_scratch("security_peer_connections");
    let socket = dir.join("sock");
    let daemon = start_daemon(&dir, &socket, &["--allow-uid", "65534"]);
    let (tasks_before, fds_before) = tasks_and_fds(daemon.pid);

    let mut silent = Silent::start(&dir, &socket, CONNECTIONS);
    let opened = Instant::now();
    // A process of root connects while nobody's connections are held.
    let root_process = preloaded_sleep(&socket);
    // The connections the daemon refuses are closed at once; the ones it keeps only when
    // their hello is overdue (5 s). Watch the daemon until all refusals are seen.
    let (mut most_tasks, mut most_fds) = (0, 0);
    let mut closed = 0;
    while opened.elapsed() < Duration::from_secs(4) {
        let (tasks, fds) = tasks_and_fds(daemon.pid);
        most_tasks = most_tasks.max(tasks);
        most_fds = most_fds.max(fds);
        closed = silent.closed();
        if closed >= CONNECTIONS - CAP && opened.elapsed() > Duration::from_secs(1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (tasks, fds) = tasks_and_fds(daemon.pid);
    most_tasks = most_tasks.max(tasks);
    most_fds = most_fds.max(fds);
    eprintln!(
        "daemon: {tasks_before} -> at most {most_tasks} threads, {fds_before} -> at most \
         {most_fds} descriptors; {closed} of {CONNECTIONS} connections closed"
    );
    assert!(
        most_tasks <= tasks_before + CAP + 16 && most_fds <= fds_before + 2 * CAP + 32,
        "{CONNECTIONS} silent connections of one user took the daemon from {tasks_before} to \
         {most_tasks} threads and from {fds_before} to {most_fds} descriptors"
    );
    assert!(
        closed >= CONNECTIONS - CAP,
        "the daemon closed only {closed} of {CONNECTIONS} connections of one user"
    );
    daemon.wait_listed(root_process.pid, "a preloaded process of root");

    let stderr = daemon.stderr();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("--max-processes-per-user"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning naming the flag expected:\n{stderr}"
    );
    assert!(
        warnings[0].contains("uid 65534"),
        "the warning names the uid: {}",
        warnings[0]
    );
}

/// Connections that send no hello are closed after 5 s, with their threads; a process that
/// said hello and then went silent (a relay that sends nothing more, a stopped process)
/// stays connected.
#[test]
fn silent_connections_are_closed_after_the_hello_timeout() {
    if !is_root() {
        skip_outside_ci("it needs root (a root daemon and a process of nobody)");
        return;
    }
    const CONNECTIONS: usize = 100;
    let dir = open_scratch("security_peer_hello_timeout");
    let relay = relay_program(&dir);
    let socket = dir.join("sock");
    let daemon = start_daemon(&dir, &socket, &["--allow-uid", "65534"]);
    let (tasks_before, _) = tasks_and_fds(daemon.pid);

    let quiet = Peer::start(&relay, &socket, Some((NOBODY, NOGROUP)), |send| {
        send(&hello(1));
    });
    let stopped = preloaded_sleep(&socket);
    daemon.wait_listed(stopped.pid, "a preloaded process of root");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(stopped.pid as libc::pid_t, libc::SIGSTOP) };

    let mut silent = Silent::start(&dir, &socket, CONNECTIONS);
    let opened = Instant::now();
    assert_eq!(
        silent.closed(),
        0,
        "connections were closed before their time"
    );
    while silent.closed() < CONNECTIONS {
        assert!(
            opened.elapsed() < Duration::from_secs(20),
            "{} of {CONNECTIONS} connections that sent nothing were closed after {:?}\n{}",
            silent.closed(),
            opened.elapsed(),
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "silent connections were closed after {took:?}, before the 5 s hello timeout"
    );
    // Their threads end with them (the reaper joins them within a second or two).
    let start = Instant::now();
    loop {
        let (tasks, _) = tasks_and_fds(daemon.pid);
        if tasks <= tasks_before + 8 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the daemon still has {tasks} threads (it had {tasks_before})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Well past the timeout, the processes that said hello are still there.
    assert!(
        daemon.lists(quiet.pid),
        "a process that said hello and then nothing was disconnected\n{}",
        daemon.stderr()
    );
    assert!(
        daemon.lists(stopped.pid),
        "a stopped process was disconnected\n{}",
        daemon.stderr()
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(stopped.pid as libc::pid_t, libc::SIGCONT) };
}

// ---------------------------------------------------------------------------------------
// (e) A library its owner cuts in place while the daemon holds it
// ---------------------------------------------------------------------------------------

/// Two compilation units, so that the second one's DWARF is read only when an address first
/// falls in it.
const CUT_LIB_A: &str =
    "__attribute__((noinline)) int anyprof_cut_first(int x) { return x * 3; }\n";
const CUT_LIB_B: &str =
    "__attribute__((noinline)) int anyprof_cut_second(int x) { return x * 11 + 2; }\n";
const CUT_BIAS: u64 = 0x7f20_0000_0000;

/// The GNU build id of the ELF file at `path`, as `readelf -n` prints it.
fn build_id_of(path: &Path) -> Vec<u8> {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(path)
        .output()
        .expect("running readelf (install binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Build ID:"))
        .unwrap_or_else(|| panic!("{} has no build id", path.display()))
        .trim();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Regression test for a review finding on issue 12: a process of `nobody` named a library
/// `nobody` owns; once the root daemon had it open, `nobody` cut the file in place
/// (`ftruncate`) and asked for an address whose debug info lay past the cut. The daemon had
/// the file mapped and died of `SIGBUS`, for every user. It now reads such files into memory:
/// it answers from its copy and keeps serving.
#[test]
fn library_cut_in_place_by_its_owner_does_not_kill_the_daemon() {
    if !is_root() {
        skip_outside_ci("it needs root (a root daemon and a process of nobody)");
        return;
    }
    let dir = open_scratch("security_peer_cut");
    let relay = relay_program(&dir);
    std::fs::write(dir.join("cut_a.c"), CUT_LIB_A).unwrap();
    std::fs::write(dir.join("cut_b.c"), CUT_LIB_B).unwrap();
    run_ok(
        Command::new("cc")
            .current_dir(&dir)
            .args(["-shared", "-fPIC", "-O1", "-g", "-o", "libcut.so"])
            .args(["cut_a.c", "cut_b.c"]),
    );
    let lib = dir.join("libcut.so");
    std::os::unix::fs::chown(&lib, Some(NOBODY), Some(NOGROUP)).unwrap();
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o644)).unwrap();
    let first = CUT_BIAS + function_address(&lib, "anyprof_cut_first");
    let second = CUT_BIAS + function_address(&lib, "anyprof_cut_second");
    // With the build id the process loaded, the daemon keeps the object it opened whatever
    // happens to the file on disk: the second lookup reads what it opened before the cut.
    let build_id = build_id_of(&lib);
    let socket = dir.join("sock");
    let mut daemon = start_daemon(&dir, &socket, &["--allow-uid", "65534"]);

    let module_message = {
        let path = lib.as_os_str().as_encoded_bytes().to_vec();
        message(|buf| {
            wire::encode_module_loaded(
                buf,
                &wire::ModuleInfo {
                    id: 1,
                    start: CUT_BIAS,
                    end: CUT_BIAS + (1 << 20),
                    file_offset: 0,
                    load_bias: CUT_BIAS,
                    path: &path,
                    build_id: &build_id,
                },
            )
        })
    };
    let peer = Peer::start(&relay, &socket, Some((NOBODY, NOGROUP)), move |send| {
        send(&hello(4_000_001));
        send(&module_message);
    });
    let names = daemon.symbols(peer.pid, &[first], "anyprof_cut_first");
    assert!(names.contains("anyprof_cut_first"), "{names:?}");

    // Cut to less than a page, in place, as nobody (the owner) can.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lib)
        .unwrap()
        .set_len(64)
        .unwrap();
    let answer = http(
        daemon.port,
        "POST",
        &format!("/debug/pprof/symbol?pid={}", peer.pid),
        format!("{second:#x}").as_bytes(),
    );
    if answer.is_err() {
        // The connection closes as the process ends, a moment before it can be waited for.
        std::thread::sleep(Duration::from_millis(500));
    }
    let died = daemon.try_wait();
    assert!(
        died.is_none(),
        "the daemon died ({died:?}) when a library it held was cut in place\n{}",
        daemon.stderr()
    );
    let (status, names) = answer.expect("POST /symbol after the cut");
    let names = String::from_utf8_lossy(&names);
    assert_eq!(status, 200, "{names}");
    assert!(
        names.contains("anyprof_cut_second"),
        "the copy read before the cut should still name it: {names:?}"
    );
    assert_eq!(daemon.get("/debug/pprof/").0, 200, "{}", daemon.stderr());
}

// ---------------------------------------------------------------------------------------
// (f) A shared region the process could cut under the daemon
// ---------------------------------------------------------------------------------------

/// `region_attack` run as `nobody`: it has handed its region over; it cuts the memfd when
/// told. Killed when dropped.
struct RegionPeer {
    child: Child,
    pid: u32,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl RegionPeer {
    fn start(program: &Path, socket: &Path, mode: &str) -> RegionPeer {
        let mut child = Command::new(program)
            .arg(socket)
            .arg(mode)
            .arg(wire::shared::SHARED_SIZE.to_string())
            .arg(wire::shared::SHARED_VERSION.to_string())
            .uid(NOBODY)
            .gid(NOGROUP)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting region_attack");
        let pid = child.id();
        let mut stdin = child.stdin.take().unwrap();
        let region = message(|buf| {
            wire::shared::encode_region(
                buf,
                &wire::shared::RegionInfo {
                    version: wire::shared::SHARED_VERSION,
                    size: wire::shared::SHARED_SIZE as u64,
                    address: 0x7f30_0000_0000,
                },
            )
        });
        for msg in [region, hello(4_000_002)] {
            stdin.write_all(&(msg.len() as u32).to_le_bytes()).unwrap();
            stdin.write_all(&msg).unwrap();
        }
        stdin.flush().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            "sent",
            "region_attack could not hand its region over"
        );
        RegionPeer {
            child,
            pid,
            stdin,
            stdout,
        }
    }

    /// Cuts the memfd to nothing; its answer: "cut RC ERRNO".
    fn cut(&mut self) -> String {
        self.stdin.write_all(b"cut\n").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }
}

impl Drop for RegionPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process of `nobody` hands the root daemon its shared region in a memfd it did not
/// seal, and cuts the memfd to nothing once the daemon could have mapped it. Mapped, every
/// later read of the region would kill the daemon with SIGBUS; refused, it costs one
/// warning that says what is wrong. The same hand-over with the seals is taken (the
/// process is listed), and then the memfd cannot be cut.
#[test]
fn an_unsealed_region_is_refused_and_cannot_kill_the_daemon() {
    if !is_root() {
        skip_outside_ci("it needs root (a root daemon and a process of nobody)");
        return;
    }
    let dir = open_scratch("security_peer_region");
    let attacker = compile("region_attack.c", &["-O1"], &dir);
    std::fs::set_permissions(&attacker, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.join("sock");
    let mut daemon = start_daemon(&dir, &socket, &["--allow-uid", "65534"]);

    let mut sealed = RegionPeer::start(&attacker, &socket, "sealed");
    daemon.wait_listed(sealed.pid, "the process with a sealed region");
    assert_eq!(
        sealed.cut(),
        format!("cut -1 {}", libc::EPERM),
        "sealed: cannot be cut"
    );

    let mut unsealed = RegionPeer::start(&attacker, &socket, "unsealed");
    // Time for the daemon to take the region (and, were it mapped, to start reading it).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(unsealed.cut(), "cut 0 0", "an unsealed memfd can be cut");
    // Longer than the daemon's slowest poll of a region (100 ms): a mapping would have
    // been touched by now.
    std::thread::sleep(Duration::from_millis(500));
    let died = daemon.try_wait();
    assert!(
        died.is_none(),
        "the daemon died ({died:?}) when a region was cut under it\n{}",
        daemon.stderr()
    );
    assert!(
        daemon.stderr().contains("not sealed against shrinking"),
        "the daemon did not say why it refused the region\n{}",
        daemon.stderr()
    );
    assert!(!daemon.lists(unsealed.pid), "the unsealed region was taken");
    assert!(
        daemon.lists(sealed.pid),
        "the daemon still serves the sealed process"
    );
    let warnings = daemon
        .stderr()
        .matches("not sealed against shrinking")
        .count();
    assert_eq!(warnings, 1, "{}", daemon.stderr());
}
