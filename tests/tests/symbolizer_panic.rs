//! The collector and the daemon survive a panic of the symbolizer on one file (issue 14,
//! point 2): that file's functions stay addresses, everything else is named, the user is
//! told once, and `record` still writes its profiles / `serve` still answers.
//!
//! No real malformed file is known to make the symbolizer panic (the fuzzers' findings are
//! fixed), so the tests use the symbolizer's test hook: with the `test-hooks` feature (which
//! this crate turns on, so the workspace build has it), `ANYPROF_TEST_SYMBOLIZER_PANIC=NAME`
//! in the collector's environment makes the opening of a file named NAME panic as a parser
//! bug would. Here NAME is `libc.so.6`, which every program maps. Built with
//! `panic = "abort"` (as the workspace was before), both tests fail: the collector dies.
//!
//! * [`record_writes_the_profiles_when_the_symbolizer_panics_on_a_file`]
//! * [`serve_answers_after_the_symbolizer_panicked_on_a_file`]

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyprof_tests::daemon::{get, wait_for, Daemon};
use anyprof_tests::{binaries, clean_command, compile, record_with, scratch_dir, ProfileView};

const HOOK: &str = "ANYPROF_TEST_SYMBOLIZER_PANIC";
const BAD_FILE: &str = "libc.so.6";
/// How the profile names a location of libc that got no name: `libc.so.6+0xADDR`.
const UNNAMED_LIBC: &str = "libc.so.6+0x";
/// The start of the collector's one message about it.
const WARNING: &str = "anyprof: warning: the symbolizer failed on ";

/// Every function name in the profile's samples.
fn names(view: &ProfileView) -> Vec<String> {
    let mut names: Vec<String> = view
        .profile
        .sample
        .iter()
        .flat_map(|s| view.frames(s))
        .map(|f| f.name.to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The collector's stderr says once, naming libc, that its names are lost.
fn assert_one_warning(stderr: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(WARNING)).collect();
    assert!(
        !lines.is_empty(),
        "no warning: is the hook compiled in? target/release/anyprof has it when built with \
         the workspace's features (`cargo build --release --workspace`); `cargo test -p \
         anyprof` rebuilds it without. stderr:\n{stderr}"
    );
    assert_eq!(lines.len(), 1, "one warning expected; stderr:\n{stderr}");
    assert!(
        lines[0].contains(BAD_FILE) && lines[0].contains(HOOK),
        "the warning names the file and the panic: {}",
        lines[0]
    );
    assert!(
        !stderr.contains("panicked at"),
        "the panic itself is not printed on top of the warning; stderr:\n{stderr}"
    );
}

#[test]
fn record_writes_the_profiles_when_the_symbolizer_panics_on_a_file() {
    let scratch = scratch_dir("symbolizer_panic_record");
    let demo = compile(
        "../../examples/demo.c",
        &["-O2", "-g", "-pthread"],
        &scratch,
    );
    let recording = record_with(&scratch, 250, &demo, &["1"], |cmd| {
        cmd.env(HOOK, BAD_FILE);
    });
    let stderr = recording.output.stderr_text();
    assert_eq!(recording.output.code, 0, "stderr:\n{stderr}");
    assert!(
        recording.output.stdout_text().starts_with("primes: "),
        "the program ran to its end"
    );
    for file in ["cpu.pb.gz", "heap.pb.gz", "allocs.pb.gz"] {
        assert!(
            recording.dir.join(file).is_file(),
            "{file} is written; stderr:\n{stderr}"
        );
    }
    assert_one_warning(&stderr);
    let names = names(&recording.cpu_profile());
    for wanted in ["count_primes", "compare_records", "main"] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} is named: {names:?}"
        );
    }
    // qsort runs in libc: its frames are addresses now, and nothing of libc has a name.
    assert!(
        names.iter().any(|n| n.starts_with(UNNAMED_LIBC)),
        "libc's frames are left unnamed: {names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains("qsort")),
        "no name comes from libc: {names:?}"
    );
}

/// `serve_worker` under the preload, connected to `socket`, burning half of each 10 ms.
fn start_worker(exe: &Path, socket: &Path) -> Child {
    let bins = binaries();
    clean_command(exe)
        .args(["0", "50"])
        .env("LD_PRELOAD", &bins.preload)
        .env("ANYPROF_SOCKET", socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting serve_worker")
}

#[test]
fn serve_answers_after_the_symbolizer_panicked_on_a_file() {
    let scratch = scratch_dir("symbolizer_panic_serve");
    let exe = compile("serve_worker.c", &["-O2", "-g", "-pthread"], &scratch);
    let socket = scratch.join("daemon.sock");
    let daemon: Daemon = Daemon::serve(&scratch.join("daemon.stderr"))
        .socket(&socket)
        .env(HOOK, BAD_FILE)
        .start();
    let mut worker = start_worker(&exe, &socket);
    let pid = worker.id();
    let port = daemon.port;
    wait_for("the worker in the index", Duration::from_secs(10), || {
        let reply = get(port, "/debug/pprof/");
        if reply.index_pids().contains(&pid) {
            Ok(())
        } else {
            Err(reply.text())
        }
    });
    for round in 0..2 {
        let reply = get(port, &format!("/debug/pprof/profile?seconds=1&pid={pid}"));
        assert_eq!(
            reply.status,
            200,
            "CPU profile {round}: {}\ndaemon stderr:\n{}",
            reply.show(),
            daemon.stderr()
        );
        let view = ProfileView::new(
            anyprof::pprof::decode(&reply.body)
                .unwrap_or_else(|e| panic!("round {round}: not a pprof profile: {e:#}")),
        );
        assert_one_warning(&daemon.stderr());
        let names = names(&view);
        assert!(
            names.iter().any(|n| n == "serve_hot_spin"),
            "round {round}: the program's functions are named: {names:?}"
        );
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with("__") || n.contains("nanosleep")),
            "round {round}: no name comes from libc: {names:?}"
        );
    }
    // The daemon still answers other requests, and is still running.
    assert_eq!(get(port, "/debug/pprof/").status, 200);
    assert_eq!(
        get(port, &format!("/debug/pprof/heap?pid={pid}")).status,
        200
    );
    let _ = worker.kill();
    let _ = worker.wait();
    assert_one_warning(&daemon.stderr());
}
