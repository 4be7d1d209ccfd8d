//! Signals: no signal meant for the program is ever taken by a thread of ours, and the
//! program's own profiling timers keep their rate while ours sample.
//!
//! Each test runs `tests/programs/signals.c` (its header says what each mode does and prints)
//! directly and under `anyprof record -q --cpu-hz 1000 --mem-rate 1`, the harshest settings,
//! and compares. The program checks itself and prints a fixed verdict line per check ("ok",
//! or a line with "WRONG" that says what it saw), so "the same stdout and exit code as without
//! the profiler" is the assertion. Before the fix each test up to the timers failed: the
//! library's background thread did not block signals, so the kernel handed it
//! process-directed signals that the program's threads blocked or were too busy to take. Our
//! timers now send a real-time signal of their own instead of `SIGPROF`; the last test checks
//! that a program using that signal itself still owns it.

use std::path::{Path, PathBuf};

use anyprof_tests::{
    assert_same_run, binaries, clean_command, compile, cpu_lock, read_profile_in, run, scratch_dir,
    RunOutput, Shared,
};

/// The test program, built once per test binary.
static PROGRAM: Shared<PathBuf> = Shared::new();

fn program() -> &'static Path {
    PROGRAM.get(|| {
        let dir = scratch_dir("signals_build");
        compile("signals.c", &["-O1", "-g", "-pthread"], &dir)
    })
}

/// The profiler's settings for every recorded run: every allocation recorded, 1000 Hz.
const FLAGS: [&str; 4] = ["--cpu-hz", "1000", "--mem-rate", "1"];

/// Runs `signals ARGS` directly; it must pass its own checks.
fn direct(args: &[&str]) -> RunOutput {
    let mut cmd = clean_command(program());
    cmd.args(args);
    let out = run(&mut cmd);
    assert!(
        out.code == 0 && !out.stdout_text().contains("WRONG"),
        "`signals {}` fails its own checks without the profiler (the test program is broken, \
         or this machine cannot run it):\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.stdout_text(),
        out.stderr_text()
    );
    out
}

/// Runs `signals ARGS` under `anyprof record -q FLAGS`; returns its output and the profile
/// directory.
fn recorded(name: &str, args: &[&str]) -> (RunOutput, PathBuf) {
    let dir = scratch_dir(&format!("signals_{name}")).join("profile");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let mut cmd = clean_command(&binaries().anyprof);
    cmd.arg("record")
        .arg("-q")
        .arg("-o")
        .arg(&dir)
        .args(FLAGS)
        .arg("--")
        .arg(program())
        .args(args);
    (run(&mut cmd), dir)
}

/// Runs `signals ARGS` both ways and asserts the same exit code, stdout and (unless the mode
/// prints measurements there) stderr.
fn check_same(name: &str, args: &[&str], compare_stderr: bool) -> (RunOutput, PathBuf) {
    let plain = direct(args);
    let (profiled, dir) = recorded(name, args);
    let how = "under `anyprof record --cpu-hz 1000 --mem-rate 1`";
    if compare_stderr {
        assert_same_run(
            &format!("signals {}", args.join(" ")),
            how,
            &plain,
            &profiled,
        );
    } else {
        assert!(
            profiled.code == plain.code && profiled.stdout == plain.stdout,
            "`signals {}` behaved differently {how} (exit {} vs {} directly)\n\
             stdout {how}:\n{}\nstdout directly:\n{}\nstderr {how}:\n{}\nstderr directly:\n{}",
            args.join(" "),
            profiled.code,
            plain.code,
            profiled.stdout_text(),
            plain.stdout_text(),
            profiled.stderr_text(),
            plain.stderr_text()
        );
    }
    (profiled, dir)
}

/// A program started with signals ignored (`nohup`, a background job of a shell) inherits
/// them ignored under `anyprof record` too: CPython's `test_signal` fails its SIGINT checks in
/// such a job, and passed under the profiler before this, which had reset them to the
/// default by catching them to forward them.
#[test]
fn signals_ignored_by_the_caller_stay_ignored_in_the_program() {
    use std::os::unix::process::CommandExt;
    let ignored = [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ];
    let status_line = |mut cmd: std::process::Command| -> String {
        // SAFETY: only `signal`, which is async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for sig in ignored {
                    libc::signal(sig, libc::SIG_IGN);
                }
                Ok(())
            });
        }
        let out = run(&mut cmd);
        assert_eq!(out.code, 0, "{out:?}");
        out.stdout_text()
    };
    let mut plain = clean_command(Path::new("grep"));
    plain.args(["^SigIgn", "/proc/self/status"]);
    let want = status_line(plain);
    let dir = scratch_dir("signals_ignored").join("profile");
    let mut profiled = clean_command(&binaries().anyprof);
    profiled.args(["record", "-q", "-o"]).arg(&dir).args([
        "--",
        "grep",
        "^SigIgn",
        "/proc/self/status",
    ]);
    let got = status_line(profiled);
    // The standard signals only: glibc's posix_spawn may leave its own two internal signals
    // (32 and 33) ignored in a child, depending on the parent's state, with or without us.
    let standard = |line: &str| -> u64 {
        u64::from_str_radix(line.trim().trim_start_matches("SigIgn:").trim(), 16)
            .unwrap_or_else(|e| panic!("reading {line:?}: {e}"))
            & 0x7fff_ffff
    };
    let (mask, profiled_mask) = (standard(&want), standard(&got));
    assert_eq!(
        profiled_mask, mask,
        "the program's ignored standard signals under `anyprof record` ({got:?}) differ from \
         without it ({want:?})"
    );
    for sig in ignored {
        assert!(
            mask & (1 << (sig - 1)) != 0,
            "signal {sig} not ignored: {want}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Signals sent to the process
// ---------------------------------------------------------------------------------------------

/// Block SIGUSR1, `kill(getpid(), SIGUSR1)`, unblock: the handler runs exactly once, on the
/// main thread, only after the unblock (200 rounds). CPython's own signal tests fail this way
/// when our thread takes the signal at once.
#[test]
fn a_signal_sent_to_itself_while_blocked_arrives_once_when_unblocked() {
    check_same("selfkill", &["selfkill", "0"], true);
}

/// The same with four more threads of the program alive (busy and sleeping), all blocking it.
#[test]
fn a_signal_sent_to_itself_while_blocked_in_every_thread_waits_for_the_unblock() {
    check_same("selfkill_threads", &["selfkill", "4"], true);
}

/// The same in a child forked by a multithreaded program: the child's own anyprof thread,
/// started anew when the child starts its two threads, takes no signal either.
#[test]
fn a_forked_child_sending_itself_a_blocked_signal_gets_it_when_unblocked() {
    check_same("selfkill_fork", &["selfkill", "2", "fork"], true);
}

/// A daemon blocks SIGTERM, SIGHUP and SIGCHLD in every thread, leaves them at their default
/// actions and reads them with a signalfd: it receives all 50 of each (sent by a child
/// process, and by 50 children exiting), and is not killed by a SIGTERM nobody should take.
#[test]
fn a_daemon_reading_blocked_signals_with_signalfd_receives_every_one() {
    check_same("signalfd", &["signalfd", "50"], true);
}

/// The same read with `sigtimedwait`, with handlers installed: none of the signals is handled
/// instead of waited for.
#[test]
fn a_daemon_reading_blocked_signals_with_sigwait_receives_every_one() {
    check_same("sigwait", &["sigwait", "50"], true);
}

// ---------------------------------------------------------------------------------------------
// The program's own profiling timers
// ---------------------------------------------------------------------------------------------

/// The number of CPU samples our own profile must still have for about 1 s of CPU: the
/// kernel services thread CPU timers at its tick (250 Hz on the test machines), so 1000 Hz
/// gives about 250; far fewer means our timers were starved by the program's.
const OUR_MIN_SAMPLES: i64 = 100;

fn check_our_samples(dir: &Path, output: &RunOutput, what: &str) {
    let view = read_profile_in(dir, "cpu.pb.gz", output);
    let samples = view.total_samples();
    assert!(
        samples >= OUR_MIN_SAMPLES,
        "{what}: our own profile has {samples} samples for about 1 s of CPU at 1000 Hz \
         (expected at least {OUR_MIN_SAMPLES})\n{}",
        view.describe()
    );
}

/// `setitimer(ITIMER_PROF)` at 100 Hz over 1 s of CPU: the program's handler gets a number of
/// SIGPROFs that fits its CPU time (within 10 %: bare runs land within a few signals of it,
/// see the program), all on its own (only) thread and on the alternate stack its handler asked
/// for (which failed while our timers shared SIGPROF and ran its handler from ours), while our
/// timers sample it at 1000 Hz.
#[test]
fn the_programs_itimer_prof_keeps_its_rate_while_we_sample() {
    let _cpu = cpu_lock();
    let (out, dir) = check_same("itimer", &["itimer", "100"], false);
    check_our_samples(&dir, &out, "itimer");
}

/// `timer_create` on the process CPU clock and on the main thread's CPU clock, sending
/// SIGPROF, SIGALRM or a real-time signal at 100 Hz: every expiration reaches the program
/// (signals plus the overruns they report, within 10 % of its CPU time), on its own thread,
/// with the value it set.
#[test]
fn the_programs_cpu_clock_timers_keep_their_rate_while_we_sample() {
    let _cpu = cpu_lock();
    for clock in ["process", "thread"] {
        for signal in ["PROF", "ALRM", "RT"] {
            let name = format!("posixtimer_{clock}_{signal}");
            let (out, dir) = check_same(&name, &["posixtimer", clock, signal, "100"], false);
            check_our_samples(&dir, &out, &name);
        }
    }
}

/// A program that takes our timers' real-time signal (SIGRTMAX-2) for itself keeps it: its
/// handler reads back as installed, receives exactly the 200 values it sends itself and none
/// of our ticks, and ignoring the signal later does not kill it; we still sample it.
#[test]
fn a_program_using_our_real_time_signal_keeps_it() {
    let _cpu = cpu_lock();
    let (out, dir) = check_same("rtsignal", &["rtsignal"], true);
    check_our_samples(&dir, &out, "rtsignal");
}

/// The interposed `sigaction` and `signal` look the real ones up once, at start, not on
/// every call: `dlsym` is not async-signal-safe (it takes the loader's lock and may
/// allocate), and programs call both from signal handlers. The program defines its own
/// `dlsym` and counts the library's lookups while it calls each 400 times, half of them from
/// a signal handler. Before the fix: 401 lookups of each.
#[test]
fn sigaction_and_signal_resolve_the_real_ones_once() {
    let scratch = scratch_dir("signals_lookups");
    let exe = compile("sigaction_lookups.c", &["-O1", "-g", "-rdynamic"], &scratch);
    let plain = run(&mut clean_command(&exe));
    assert_eq!(
        plain.stdout_text().trim(),
        "sigaction lookups 0, signal lookups 0",
        "without the profiler nothing looks them up: {}",
        plain.stderr_text()
    );
    let dir = scratch.join("profile");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let mut cmd = clean_command(&binaries().anyprof);
    cmd.arg("record")
        .arg("-q")
        .arg("-o")
        .arg(&dir)
        .args(FLAGS)
        .arg("--")
        .arg(&exe);
    let out = run(&mut cmd);
    assert_eq!(out.code, 0, "stderr:\n{}", out.stderr_text());
    let counts: Vec<u32> = out
        .stdout_text()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        counts.len() == 2 && counts.iter().all(|&n| n <= 1),
        "the library looked up sigaction/signal with dlsym more than once: {:?}",
        out.stdout_text()
    );
}
