//! Debug information wherever it lives (issue 15): a stripped program is named from its
//! MiniDebugInfo, from a separate debug file in the places gdb and perf look, and from a
//! real `debuginfod` server on loopback (Debian's `debuginfod` package; `.ci/run` installs
//! it); a server that sends garbage costs a warning, not the run.
//!
//! The program is `cpu_split.c`, whose hot functions are `static`: once the program is
//! stripped, no symbol table of its own names them.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyprof_symbolizer::{ObjectRef, Symbolized, Symbolizer};
use anyprof_tests::daemon::{free_port, Daemon, Request};
use anyprof_tests::{
    binaries, clean_command, compile, cpu_lock, record_with, scratch_dir, skip_outside_ci,
    ProfileView, Recording,
};

/// The hot functions of `cpu_split.c`.
const HOT: [&str; 3] = ["hot_a", "hot_b", "hot_c"];

/// Iterations of `cpu_split`: about half a second of CPU.
const ITERATIONS: &str = "300000000";

/// Runs a command that must succeed (a build tool), or panics with what it printed.
fn tool(program: &str, args: &[&str], dir: &Path) -> Vec<u8> {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {program} (binutils/xz-utils): {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// `cpu_split` built with `-O2 -g` into `dir` (as `prog`), plus `flags`.
fn build(dir: &Path, flags: &[&str]) -> PathBuf {
    let mut all = vec!["-O2", "-g", "-fomit-frame-pointer"];
    all.extend_from_slice(flags);
    let exe = compile("cpu_split.c", &all, dir);
    let prog = dir.join("prog");
    std::fs::rename(&exe, &prog).unwrap();
    prog
}

/// The GNU build id of `path` in hex, read by `readelf`.
fn build_id(path: &Path) -> String {
    let notes = tool("readelf", &["-n", path.to_str().unwrap()], Path::new("/"));
    String::from_utf8_lossy(&notes)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_string))
        .expect("the program has a build id")
}

/// Records `prog` with `env` added to the environment, holding the CPU lock.
fn record_env(scratch: &Path, prog: &Path, env: &[(&str, &str)]) -> Recording {
    let _cpu = cpu_lock();
    let recording = record_with(scratch, 200, prog, &[ITERATIONS], |cmd| {
        for (k, v) in env {
            cmd.env(k, v);
        }
    });
    assert_eq!(
        recording.output.code,
        0,
        "anyprof record failed:\n{}",
        recording.output.stderr_text()
    );
    recording
}

/// For each hot function: the (file, line) of the frames that name it in `view`.
fn hot_frames(view: &ProfileView) -> Vec<(String, Vec<(String, i64)>)> {
    HOT.iter()
        .map(|hot| {
            let mut found = Vec::new();
            for sample in &view.profile.sample {
                for frame in view.frames(sample) {
                    if frame.name == *hot {
                        found.push((frame.filename.to_string(), frame.line));
                    }
                }
            }
            (hot.to_string(), found)
        })
        .collect()
}

/// Asserts that every hot function is named in `view`, with `cpu_split.c` and a line when
/// `with_lines`.
fn assert_named(view: &ProfileView, with_lines: bool, context: &str) {
    for (hot, frames) in hot_frames(view) {
        assert!(
            !frames.is_empty(),
            "{context}: {hot} is not named in the profile:\n{}",
            view.dump()
        );
        if with_lines {
            assert!(
                frames
                    .iter()
                    .all(|(file, line)| file.ends_with("cpu_split.c") && *line > 0),
                "{context}: {hot} lacks its file and line: {frames:?}"
            );
        }
    }
}

fn assert_unnamed(view: &ProfileView, context: &str) {
    for (hot, frames) in hot_frames(view) {
        assert!(
            frames.is_empty(),
            "{context}: {hot} is named although nothing should name it:\n{}",
            view.dump()
        );
    }
}

/// Fedora's MiniDebugInfo, made as gdb's manual says: the function symbols that `.dynsym`
/// lacks, in an xz-compressed ELF file in `.gnu_debugdata` of the stripped program.
#[test]
fn minidebuginfo_names_a_stripped_program() {
    let scratch = scratch_dir("debuginfo-mini");
    let prog = build(&scratch, &[]);
    let script = r#"
        set -e
        nm -D prog --format=posix --defined-only | awk '{ print $1 }' | sort > dynsyms
        nm prog --format=posix --defined-only \
            | awk '{ if ($2 == "T" || $2 == "t" || $2 == "D") print $1 }' | sort > funcsyms
        comm -13 dynsyms funcsyms > keep_symbols
        objcopy --only-keep-debug prog debug
        objcopy -S --remove-section .gdb_index --remove-section .comment \
            --keep-symbols=keep_symbols debug mini_debuginfo
        strip --strip-all -R .comment prog
        xz mini_debuginfo
        objcopy --add-section .gnu_debugdata=mini_debuginfo.xz prog
        rm debug
    "#;
    tool("sh", &["-c", script], &scratch);
    let recording = record_env(&scratch, &prog, &[]);
    assert_named(&recording.cpu_profile(), false, "MiniDebugInfo");

    // Without the section, nothing names them: the names above came from it.
    tool(
        "objcopy",
        &["--remove-section", ".gnu_debugdata", "prog"],
        &scratch,
    );
    let recording = record_env(&scratch, &prog, &[]);
    assert_unnamed(&recording.cpu_profile(), "MiniDebugInfo removed");
}

/// The file address of `function` in the unstripped `prog`, one byte in.
fn address_of(prog: &Path, function: &str) -> u64 {
    let symbols = tool("nm", &[prog.to_str().unwrap()], Path::new("/"));
    let text = String::from_utf8_lossy(&symbols);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(function))
        .unwrap_or_else(|| panic!("{function} not in nm output"));
    u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap() + 1
}

/// What a symbolizer with `debug_dirs` says `address` of `prog` is.
fn name_at(prog: &Path, address: u64, debug_dirs: Vec<PathBuf>) -> Option<String> {
    let object = ObjectRef {
        path: prog,
        build_id: &[],
    };
    match Symbolizer::with_debug_dirs(debug_dirs)
        .symbolize(&object, &[address])
        .pop()
    {
        Some(Symbolized::Frames(frames)) => frames.last().and_then(|f| f.function.clone()),
        _ => None,
    }
}

/// perf's places: `<debug dir>/<object path>.debug` and `<debug dir>/<object path>`, for a
/// program stripped without a debuglink.
#[test]
fn debug_files_at_the_objects_path_under_the_debug_dir() {
    let scratch = scratch_dir("debuginfo-path-layout");
    let prog = build(&scratch, &[]);
    let address = address_of(&prog, "hot_a");
    let debug_dir = scratch.join("debug");
    let inside = debug_dir.join(prog.strip_prefix("/").unwrap());
    std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
    let p = prog.to_str().unwrap();
    tool(
        "objcopy",
        &["--only-keep-debug", p, inside.to_str().unwrap()],
        &scratch,
    );
    tool("strip", &["--strip-all", p], &scratch);
    assert_eq!(name_at(&prog, address, vec![]), None, "stripped");
    assert_eq!(
        name_at(&prog, address, vec![debug_dir.clone()]).as_deref(),
        Some("hot_a"),
        "{} (Ubuntu's old layout)",
        inside.display()
    );
    let mut with_suffix = inside.clone().into_os_string();
    with_suffix.push(".debug");
    std::fs::rename(&inside, &with_suffix).unwrap();
    assert_eq!(
        name_at(&prog, address, vec![debug_dir]).as_deref(),
        Some("hot_a"),
        "{with_suffix:?} (Fedora's old layout)"
    );
}

/// Without build ids, a debug file found by `.gnu_debuglink` is taken only when its CRC is
/// the one the link records, as gdb requires: a rebuilt debug file beside the program is not
/// taken for it.
#[test]
fn debuglink_crc_decides_without_build_ids() {
    let scratch = scratch_dir("debuginfo-crc");
    let prog = build(&scratch, &["-Wl,--build-id=none"]);
    let address = address_of(&prog, "hot_a");
    tool(
        "objcopy",
        &["--only-keep-debug", "prog", "prog.debug"],
        &scratch,
    );
    tool("strip", &["--strip-all", "prog"], &scratch);
    tool(
        "objcopy",
        &["--add-gnu-debuglink=prog.debug", "prog"],
        &scratch,
    );
    assert_eq!(
        name_at(&prog, address, vec![]).as_deref(),
        Some("hot_a"),
        "the debug file beside the program, with the recorded CRC"
    );
    // The same debug file with one byte more (still valid ELF): another CRC.
    let mut other = std::fs::OpenOptions::new()
        .append(true)
        .open(scratch.join("prog.debug"))
        .unwrap();
    other.write_all(b"\0").unwrap();
    drop(other);
    assert_eq!(
        name_at(&prog, address, vec![]),
        None,
        "a debug file whose CRC differs must not be used"
    );
}

/// A `debuginfod` started on loopback over a directory of debug files, killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `debuginfod` over `debug_dir`, with its database in `scratch`, and waits until
    /// it serves `build_id`.
    fn start(scratch: &Path, debug_dir: &Path, build_id: &str) -> Server {
        let program = "/usr/bin/debuginfod";
        assert!(
            Path::new(program).is_file(),
            "{program} is not installed; this test needs a real debuginfod server: \
             apt-get install debuginfod (.ci/run installs it)"
        );
        let port = free_port();
        let log = std::fs::File::create(scratch.join("debuginfod.log")).unwrap();
        let child = Command::new(program)
            .arg("-F")
            .args(["-p", &port.to_string()])
            .arg("-d")
            .arg(scratch.join("debuginfod.sqlite"))
            .args(["-t", "1", "-g", "0"])
            .arg(debug_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}"));
        let server = Server { child, port };
        let path = format!("/buildid/{build_id}/debuginfo");
        let start = Instant::now();
        loop {
            let reply = Request::new("GET", port, &path)
                .timeout(Duration::from_secs(5))
                .send();
            if matches!(&reply, Ok(r) if r.status == 200) {
                return server;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "debuginfod did not serve {path} within a minute (last answer {:?}); its log:\n{}",
                reply.map(|r| r.status),
                std::fs::read_to_string(scratch.join("debuginfod.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The judge's case: a stripped program whose debug file only a loopback debuginfod serves
/// is named with files and lines when `DEBUGINFOD_URLS` is set, and the file lands in the
/// standard client cache; without the variable it is not named.
#[test]
fn debuginfod_names_a_stripped_program() {
    let scratch = scratch_dir("debuginfo-debuginfod");
    let prog = build(&scratch, &[]);
    let id = build_id(&prog);
    let debug_dir = scratch.join("served");
    std::fs::create_dir_all(&debug_dir).unwrap();
    tool(
        "objcopy",
        &["--only-keep-debug", "prog", "served/prog.debug"],
        &scratch,
    );
    tool("strip", &["--strip-all", "prog"], &scratch);
    let server = Server::start(&scratch, &debug_dir, &id);
    let cache = scratch.join("cache");
    let url = server.url();
    let env = [
        ("DEBUGINFOD_URLS", url.as_str()),
        ("DEBUGINFOD_CACHE_PATH", cache.to_str().unwrap()),
    ];

    let without = record_env(&scratch, &prog, &[]);
    assert_unnamed(&without.cpu_profile(), "without DEBUGINFOD_URLS");

    let with = record_env(&scratch, &prog, &env);
    assert_named(&with.cpu_profile(), true, "with DEBUGINFOD_URLS");
    let cached = cache.join(&id).join("debuginfo");
    let meta = std::fs::metadata(&cached)
        .unwrap_or_else(|e| panic!("{} is not in the cache: {e}", cached.display()));
    assert!(meta.len() > 0);
    // Only the finished file: no temporary file left behind.
    let left: Vec<_> = std::fs::read_dir(cache.join(&id))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["debuginfo"]);

    // From the cache alone, as gdb and perf would use it: the server is gone.
    drop(server);
    let again = record_env(&scratch, &prog, &env);
    assert_named(&again.cpu_profile(), true, "from the debuginfod cache");
}

/// A server that answers every request with `status` and `body` (and `Content-Length:
/// claimed`, or the body's length), on a thread, until the test ends.
fn fake_server(status: u16, body: &'static [u8], claimed: Option<u64>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let length = claimed.unwrap_or(body.len() as u64);
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(body);
        }
    });
    port
}

/// A server that sends something else than a debug file, or one too large, costs a warning
/// that names the URL; the profile is written, nothing is left in the cache, and the program
/// runs as usual. A server without the file (404) leaves elfutils' negative mark, an empty
/// `debuginfo`, and no warning.
#[test]
fn debuginfod_garbage_is_a_warning() {
    let scratch = scratch_dir("debuginfo-garbage");
    let prog = build(&scratch, &[]);
    let id = build_id(&prog);
    tool("strip", &["--strip-all", "prog"], &scratch);
    let cache = scratch.join("cache");
    // What, status, body, Content-Length claimed, what the warning says (None: no warning).
    type Case = (
        &'static str,
        u16,
        &'static [u8],
        Option<u64>,
        Option<&'static str>,
    );
    let cases: [Case; 3] = [
        (
            "garbage",
            200,
            b"<html>not a debug file</html>",
            None,
            Some("something else"),
        ),
        ("huge", 200, b"", Some(5 << 30), Some("larger than")),
        ("not found", 404, b"not found", None, None),
    ];
    for (what, status, body, claimed, says) in cases {
        let port = fake_server(status, body, claimed);
        let url = format!("http://127.0.0.1:{port}");
        let recording = record_env(
            &scratch,
            &prog,
            &[
                ("DEBUGINFOD_URLS", url.as_str()),
                ("DEBUGINFOD_CACHE_PATH", cache.to_str().unwrap()),
            ],
        );
        let stderr = recording.output.stderr_text();
        match says {
            Some(says) => assert!(
                stderr.contains(&url) && stderr.contains(says),
                "{what}: no warning naming {url} and saying {says:?}:\n{stderr}"
            ),
            None => assert!(!stderr.contains("warning"), "{what}: {stderr}"),
        }
        assert!(recording.output.stdout_text().contains("checksum="));
        assert_unnamed(&recording.cpu_profile(), what);
        let dir = cache.join(&id);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        if says.is_some() {
            assert!(
                left.is_empty(),
                "{what}: left in {}: {left:?}",
                dir.display()
            );
        } else {
            assert_eq!(left, ["debuginfo"], "{what}: {}", dir.display());
            assert_eq!(std::fs::metadata(dir.join("debuginfo")).unwrap().len(), 0);
        }
        std::fs::remove_dir_all(&cache).unwrap();
    }
}

/// A server that counts the requests it gets and answers 404 to each.
fn counting_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counted.fetch_add(1, Ordering::SeqCst);
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(b"HTTP/1.1 404 X\r\nContent-Length: 0\r\n\r\n");
        }
    });
    (port, count)
}

/// A root `anyprof serve` with `DEBUGINFOD_URLS` names a stripped program of `nobody` from
/// its debuginfod: the download goes into the daemon's own cache (created 0700, files 0600,
/// owned by root), which the daemon reads with its own rights although it opens the
/// program's files with nobody's. The `DEBUGINFOD_URLS` in the *program's* environment is
/// never used: a peer cannot point the daemon at a server.
#[test]
fn root_daemon_fetches_for_a_process_of_nobody_from_its_own_servers_only() {
    root_daemon_serves_a_process_of_nobody(false);
}

/// A program file of nobody's own (which nobody could have built with any build id it likes):
/// the root daemon does not ask its servers about it, and its cache stays empty.
#[test]
fn root_daemon_asks_no_server_about_a_users_own_file() {
    root_daemon_serves_a_process_of_nobody(true);
}

fn root_daemon_serves_a_process_of_nobody(file_of_nobody: bool) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip_outside_ci("it needs root (a root daemon and a process of nobody)");
        return;
    }
    let scratch = scratch_dir(if file_of_nobody {
        "debuginfo-serve-own"
    } else {
        "debuginfo-serve"
    });
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o755)).unwrap();
    let prog = build(&scratch, &[]);
    let address = address_of(&prog, "hot_a");
    let id = build_id(&prog);
    let served = scratch.join("served");
    std::fs::create_dir_all(&served).unwrap();
    tool(
        "objcopy",
        &["--only-keep-debug", "prog", "served/prog.debug"],
        &scratch,
    );
    tool("strip", &["--strip-all", "prog"], &scratch);
    if file_of_nobody {
        std::os::unix::fs::chown(&prog, Some(65534), Some(65534)).unwrap();
    }
    let server = Server::start(&scratch, &served, &id);
    let (peer_port, peer_requests) = counting_server();
    let cache = scratch.join("daemon-cache");
    let socket = scratch.join("anyprof.sock");
    let daemon = Daemon::serve(&scratch.join("daemon.stderr"))
        .socket(&socket)
        .args(&["--allow-uid", "65534"])
        .env("DEBUGINFOD_URLS", &server.url())
        .env("DEBUGINFOD_CACHE_PATH", cache.to_str().unwrap())
        .umask(0)
        .start();
    let mut program = clean_command(&prog)
        .arg("100000000000")
        .env("LD_PRELOAD", binaries().preload)
        .env("ANYPROF_SOCKET", &socket)
        .env("DEBUGINFOD_URLS", format!("http://127.0.0.1:{peer_port}"))
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the program as nobody");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = program.id();
    let _kill = Kill(&mut program);
    // The program's base: its first mapping (a PIE's first segment is at file offset 0).
    let start = Instant::now();
    let names = loop {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        let base = maps
            .lines()
            .find(|l| l.ends_with(prog.to_str().unwrap()))
            .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok());
        let reply = base.and_then(|base| {
            Request::new(
                "POST",
                daemon.port,
                &format!("/debug/pprof/symbol?pid={pid}"),
            )
            .body(format!("{:#x}", base + address).as_bytes())
            .timeout(Duration::from_secs(60))
            .send()
            .ok()
        });
        let text = reply.map(|r| r.text()).unwrap_or_default();
        let waited = if file_of_nobody { 5 } else { 30 };
        if text.contains("hot_a") || start.elapsed() > Duration::from_secs(waited) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if file_of_nobody {
        assert!(
            !names.contains("hot_a"),
            "the daemon fetched debug info for a file nobody owns: {names:?}"
        );
        assert!(
            !cache.join(&id).join("debuginfo").exists(),
            "the daemon's cache holds the debug file of a file nobody owns"
        );
        return;
    }
    assert!(
        names.contains("hot_a"),
        "the daemon did not name hot_a from its debuginfod: {names:?}\ndaemon stderr:\n{}",
        daemon.stderr()
    );
    let cached = cache.join(&id).join("debuginfo");
    let meta = std::fs::metadata(&cached).expect("the debug file is in the daemon's cache");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    let dir_mode = std::fs::metadata(&cache).unwrap().mode() & 0o777;
    assert_eq!(dir_mode, 0o700, "nobody cannot read the daemon's cache");
    assert_eq!(
        peer_requests.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the server named in the program's environment was asked"
    );
}
