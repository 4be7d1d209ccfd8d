//! Thread dumps (`/debug/pprof/threads`) of a process whose threads exit while they are being
//! dumped (issue 14). A thread blocked in a system call is unwound from the background
//! thread, not through a signal; it may wake up, exit and have its stack unmapped while that
//! runs. Its stack is therefore copied without faulting first and unwound from the copy:
//! the program must never crash, and the dumps must still show the blocked threads' stacks.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyprof_tests::daemon::{get, Daemon};
use anyprof_tests::{binaries, clean_command, compile, scratch_dir};

/// Starts `exe SECONDS` under the preload in serve mode, connected to `socket`; returns it
/// with its stdout reader and the pid from its `ready pid=N` line.
fn start_program(
    exe: &std::path::Path,
    socket: &std::path::Path,
    seconds: u64,
) -> (
    std::process::Child,
    BufReader<std::process::ChildStdout>,
    u32,
) {
    let mut child = clean_command(exe)
        .arg(seconds.to_string())
        .env("LD_PRELOAD", &binaries().preload)
        .env("ANYPROF_SOCKET", socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dump_churn");
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read the ready line");
    let pid: u32 = line
        .trim()
        .strip_prefix("ready pid=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("expected `ready pid=N`, got {line:?}"));
    (child, out, pid)
}

/// The rest of `child`'s stdout and its stderr, after it exited.
fn rest_of_output(
    child: &mut std::process::Child,
    out: &mut BufReader<std::process::ChildStdout>,
) -> (String, String) {
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(out, &mut rest);
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    (rest, stderr)
}

#[test]
fn dumping_threads_that_exit_meanwhile_never_crashes_the_program() {
    let scratch = scratch_dir("thread_dump_churn");
    let exe = compile("dump_churn.c", &["-O1", "-g", "-pthread"], &scratch);
    let socket = scratch.join("sock");
    let daemon = Daemon::serve(&scratch.join("daemon.stderr"))
        .socket(&socket)
        .start();
    let port = daemon.port;
    let seconds = 6;
    let (mut child, mut out, pid) = start_program(&exe, &socket, seconds);

    // Dump as often as the daemon answers until the program ends.
    let start = Instant::now();
    let (mut answered, mut with_leaf) = (0, 0);
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(seconds - 1) {
        let reply = get(port, &format!("/debug/pprof/threads?debug=2&pid={pid}"));
        if reply.status != 200 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        answered += 1;
        last = reply.text();
        if last.contains("churn_leaf") {
            with_leaf += 1;
        }
    }
    let status = child.wait().expect("wait for dump_churn");
    let (rest, stderr) = rest_of_output(&mut child, &mut out);
    assert!(
        status.success(),
        "dump_churn died while its threads were dumped ({status:?}) after {answered} dumps; \
         stdout {rest:?}, stderr:\n{stderr}"
    );
    assert!(
        rest.starts_with("churned "),
        "dump_churn did not finish: {rest:?}"
    );
    assert!(
        answered >= 10,
        "only {answered} thread dumps were answered in {seconds} s"
    );
    // The blocked short-lived threads were unwound (from the copy of their stacks).
    assert!(
        with_leaf > 0,
        "no dump of {answered} showed a blocked thread in churn_leaf; the last one:\n{last}"
    );
    eprintln!("{answered} dumps, {with_leaf} with a churn_leaf stack; {rest}");
}

/// Deterministic: a blocked thread whose stack has an unmapped page above its stack pointer
/// (as when a thread exits and its stack is unmapped during the dump). Before the stack was
/// copied without faulting, the first dump killed the program with SIGSEGV.
#[test]
fn a_hole_in_a_blocked_threads_stack_ends_its_dump_instead_of_faulting() {
    let scratch = scratch_dir("thread_dump_hole");
    let exe = compile("dump_hole.c", &["-O1", "-g", "-pthread"], &scratch);
    let socket = scratch.join("sock");
    let daemon = Daemon::serve(&scratch.join("daemon.stderr"))
        .socket(&socket)
        .start();
    let port = daemon.port;
    let seconds = 4;
    let (mut child, mut out, pid) = start_program(&exe, &socket, seconds);
    let start = Instant::now();
    let mut dumps = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds - 1) && dumps.len() < 3 {
        let reply = get(port, &format!("/debug/pprof/threads?debug=2&pid={pid}"));
        if reply.status == 200 {
            dumps.push(reply.text());
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let status = child.wait().expect("wait for dump_hole");
    let (rest, stderr) = rest_of_output(&mut child, &mut out);
    assert!(
        status.success() && rest.contains("survived"),
        "dump_hole died when its threads were dumped ({status:?}); stdout {rest:?}, \
         stderr:\n{stderr}"
    );
    assert!(!dumps.is_empty(), "no thread dump was answered");
    // The holed thread's stack is there, cut at the hole.
    assert!(
        dumps.iter().any(|d| d.contains("hole_then_sleep")),
        "no dump shows the blocked thread in hole_then_sleep:\n{}",
        dumps.join("\n----\n")
    );
}

/// A program whose sandbox puts every thread, ours too (`SECCOMP_FILTER_FLAG_TSYNC`), under
/// a seccomp filter that kills the process on `process_vm_readv`: a thread dump must not
/// copy a blocked thread's stack with it. Before, the first dump killed the program with
/// SIGSYS; now such a thread gets its leaf only.
#[test]
fn a_thread_dump_keeps_to_the_programs_seccomp_filter() {
    let scratch = scratch_dir("thread_dump_seccomp");
    let exe = compile("dump_seccomp.c", &["-O1", "-g", "-pthread"], &scratch);
    let socket = scratch.join("sock");
    let daemon = Daemon::serve(&scratch.join("daemon.stderr"))
        .socket(&socket)
        .start();
    let port = daemon.port;
    let seconds = 4;
    let (mut child, mut out, pid) = start_program(&exe, &socket, seconds);
    let start = Instant::now();
    let mut dumps = 0;
    while start.elapsed() < Duration::from_secs(seconds - 1) && dumps < 3 {
        let reply = get(port, &format!("/debug/pprof/threads?debug=2&pid={pid}"));
        if reply.status == 200 {
            dumps += 1;
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let status = child.wait().expect("wait for dump_seccomp");
    let (rest, stderr) = rest_of_output(&mut child, &mut out);
    assert!(
        status.success() && rest.contains("survived"),
        "dump_seccomp died when its threads were dumped ({status:?}) after {dumps} dumps; \
         stdout {rest:?}, stderr:\n{stderr}"
    );
    assert!(dumps > 0, "no thread dump was answered");
}
