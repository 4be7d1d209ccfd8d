//! Descriptors (issue 13, point 2): a profiled program, and the programs it execs, see no
//! descriptor they did not open, at any moment and in any way they can look.
//!
//! `tests/programs/fd_observer.c` looks the way test suites and daemons do: it lists
//! `/proc/self/fd` at start and then continuously for 2 s while three threads allocate and
//! burn CPU, probes `fcntl(F_GETFD)` on 0..1023, runs a close-all loop and looks again, and
//! fork-execs a child that prints the descriptors it inherited. It prints what it saw,
//! deterministically, and exits 1 if it met a descriptor it did not open. Under
//! `anyprof record --cpu-hz 1000 --mem-rate 1` its output and exit status must be those of a
//! run without the profiler, byte for byte; and the run must really have been profiled (its
//! threads' CPU and allocations are in the profiles), or the comparison proves nothing.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use anyprof_tests::{
    assert_same_run, binaries, clean_command, compile, read_profile_in, run, scratch_dir, RunOutput,
};

/// The settings under which the program must not see us: the harshest.
const FLAGS: &[&str] = &["--cpu-hz", "1000", "--mem-rate", "1"];

/// Makes `cmd` start with no descriptor but stdin, stdout and stderr, whatever the test
/// runner left open (a shell's or a build tool's), so that both runs start alike.
fn only_stdio(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec and makes one system call,
    // close_range, which is async-signal-safe; it marks descriptors 3.. close-on-exec rather
    // than closing them, so the pipe std uses to report a failed exec keeps working.
    unsafe {
        cmd.pre_exec(|| {
            let rc = libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

fn recorded(dir: &Path, program: &Path) -> RunOutput {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let mut cmd = clean_command(binaries().anyprof);
    cmd.arg("record")
        .arg("-q")
        .arg("-o")
        .arg(dir)
        .args(FLAGS)
        .arg("--")
        .arg(program);
    run(only_stdio(&mut cmd))
}

#[test]
fn a_profiled_program_and_its_exec_child_never_see_a_descriptor_they_did_not_open() {
    let scratch = scratch_dir("descriptors_observer");
    let exe = compile("fd_observer.c", &["-O1", "-g", "-pthread"], &scratch);
    let plain = run(only_stdio(&mut clean_command(&exe)));
    let plain_text = plain.stdout_text();
    assert!(
        plain.code == 0
            && plain_text.starts_with("start: 0 1 2\n")
            && plain_text.contains("looked at least 10 times\n")
            && plain_text.contains("child listing: 0 1 2 7\n"),
        "fd_observer without the profiler must start with only stdin, stdout and stderr, look \
         at least 10 times and pass fd 7 to its child; it printed (exit {}):\n{plain_text}\n\
         stderr:\n{}",
        plain.code,
        plain.stderr_text()
    );

    let dir = scratch.join("profile");
    let profiled = recorded(&dir, &exe);
    assert_same_run(
        "fd_observer",
        "under `anyprof record --cpu-hz 1000 --mem-rate 1` (a line that differs names the \
         descriptor of ours the program saw, and how)",
        &plain,
        &profiled,
    );

    // Not vacuous: the program was profiled while it looked.
    let cpu = read_profile_in(&dir, "cpu.pb.gz", &profiled);
    let busy = cpu
        .cumulative_samples()
        .get("busy_work")
        .copied()
        .unwrap_or(0);
    let threads = cpu.samples_by_tid().len();
    assert!(
        busy >= 100 && threads >= 4,
        "fd_observer's profile must show its threads working (busy_work {busy} samples, \
         {threads} threads with samples; expected ≥ 100 and ≥ 4): without that, the \
         comparison above says nothing about the profiler\n{}",
        cpu.describe()
    );
    let allocs = read_profile_in(&dir, "allocs.pb.gz", &profiled).heap_values_by_site();
    let allocated = allocs.get("busy_work").map_or(0, |v| v[0]);
    assert!(
        allocated > 10_000,
        "fd_observer's allocs profile must show busy_work's allocations (alloc_objects \
         {allocated}, expected > 10000 at --mem-rate 1); sites: {allocs:?}"
    );
}
