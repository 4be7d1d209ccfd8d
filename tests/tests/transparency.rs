//! Transparency: profiling must not change what a program does.
//!
//! Each program runs three times, in the same clean environment: directly; under
//! `anyprof record -q --cpu-hz 250` (the highest rate the kernel delivers on the test machines,
//! so the most signals); and with `LD_PRELOAD=libanyprof.so` but no `ANYPROF_SOCKET`, where the
//! library must stay inert. stdout, stderr and the exit code must be byte-identical in all
//! three, and the recorded run must have produced a CPU profile with samples.
//!
//! The programs are interpreters (Python, Perl: large, dynamically loading, signal-aware) and a
//! multithreaded C program (`tests/programs/mt_output.c`), each writing to both streams and
//! exiting with a non-zero status.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyprof_tests::{
    binaries, clean_command, compile, cpu_lock, record_with, run, scratch_dir, RunOutput,
};

/// The sampling rate of the recorded runs.
const HZ: u32 = 250;

/// Runs `program args` directly, recorded and preloaded-without-socket, and checks that the
/// three runs are indistinguishable and that the first one exited with `expected_code`.
fn check_transparent(name: &str, program: &Path, args: &[&str], expected_code: i32) {
    let bins = binaries();
    let scratch = scratch_dir(&format!("transparency_{name}"));
    let env = |cmd: &mut Command| {
        // Deterministic interpreters: no hash randomisation, no bytecode files written.
        cmd.env("PYTHONHASHSEED", "0")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PERL_HASH_SEED", "0")
            .env("PERL_PERTURB_KEYS", "0");
    };
    // These runs do not measure anything, but they do burn CPU: keep them out of the way of the
    // accuracy tests.
    let _cpu = cpu_lock();

    let mut direct_cmd = clean_command(program);
    direct_cmd.args(args);
    env(&mut direct_cmd);
    let direct = run(&mut direct_cmd);
    assert_eq!(
        direct.code,
        expected_code,
        "{name} run directly exited with {}, expected {expected_code} (the test program itself \
         is broken)\nstdout:\n{}\nstderr:\n{}",
        direct.code,
        direct.stdout_text(),
        direct.stderr_text()
    );

    let recording = record_with(&scratch, HZ, program, args, env);
    assert_same_run(
        name,
        "under `anyprof record -q`",
        &direct,
        &recording.output,
    );

    let mut preload_cmd = clean_command(program);
    preload_cmd.args(args).env("LD_PRELOAD", &bins.preload);
    env(&mut preload_cmd);
    let preloaded = run(&mut preload_cmd);
    assert_same_run(
        name,
        "with LD_PRELOAD=libanyprof.so and no ANYPROF_SOCKET",
        &direct,
        &preloaded,
    );

    let view = recording.cpu_profile();
    assert!(
        view.total_samples() > 0,
        "the recorded run of {name} wrote {} without samples\n{}",
        recording.cpu_profile_path().display(),
        view.describe()
    );
}

fn assert_same_run(name: &str, how: &str, direct: &RunOutput, other: &RunOutput) {
    assert_eq!(
        other.code, direct.code,
        "{name} exited with {} {how}, but with {} when run directly",
        other.code, direct.code
    );
    assert!(
        other.stdout == direct.stdout,
        "{name}'s stdout differs {how}\ndirectly:\n{:?}\n{how}:\n{:?}",
        direct.stdout_text(),
        other.stdout_text()
    );
    assert!(
        other.stderr == direct.stderr,
        "{name}'s stderr differs {how}\ndirectly:\n{:?}\n{how}:\n{:?}",
        direct.stderr_text(),
        other.stderr_text()
    );
}

/// The interpreter binary itself, not a wrapper: version managers (pyenv, asdf) put shell
/// scripts named `python3` first on PATH, and profiling those would test the shell and `exec`
/// rather than the interpreter. The interpreter reports its own path.
fn interpreter(command: &str, print_own_path: &[&str]) -> PathBuf {
    let out = Command::new(command)
        .args(print_own_path)
        .output()
        .unwrap_or_else(|e| {
            panic!("running `{command}`: {e}; install it (apt-get install -y {command})")
        });
    assert!(out.status.success(), "`{command}` failed: {out:?}");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.is_file(),
        "`{command}` says it is {path:?}, which is not a file"
    );
    path
}

/// Python computes (about 0.3 s of CPU), prints non-ASCII text and floats to stdout, a line to
/// stderr, and exits with 3.
#[test]
fn python3_output_and_exit_code_are_unchanged_by_the_profiler() {
    let python = interpreter("python3", &["-c", "import sys; print(sys.executable)"]);
    let script = r#"
import sys
def collatz_steps(n):
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps
best = max(range(1, 60000), key=collatz_steps)
print("longest collatz start below 60000:", best, "steps:", collatz_steps(best))
print("sum of squares:", sum(i * i for i in range(200000)))
print("unicode: \u00e9\u00e8\u2713", [round(1 / k, 6) for k in range(1, 6)])
print("warning: computed", best, "on stderr", file=sys.stderr)
sys.exit(3)
"#;
    check_transparent("python3", &python, &["-c", script], 3);
}

/// Perl computes (about 0.3 s of CPU), prints to stdout and stderr, and exits with 3.
#[test]
fn perl_output_and_exit_code_are_unchanged_by_the_profiler() {
    let perl = interpreter("perl", &["-e", "print $^X"]);
    let script = r#"
my $sum = 0; for my $i (1..12000000) { $sum += ($i * $i) % 7919; }
print "sum mod: $sum\n";
my @primes = grep { my $n = $_; !grep { $n % $_ == 0 } 2 .. int(sqrt $n) } 2 .. 3000;
print "primes below 3000: ", scalar(@primes), " last ", $primes[-1], "\n";
printf STDERR "stderr line: %.6f\n", $sum / 3;
exit 3;
"#;
    check_transparent("perl", &perl, &["-e", script], 3);
}

/// Four threads burn CPU, then print in a fixed order to both streams; exit status 7.
#[test]
fn multithreaded_c_output_and_exit_code_are_unchanged_by_the_profiler() {
    let scratch = scratch_dir("transparency_mt_output_build");
    let exe = compile("mt_output.c", &["-O2", "-g", "-pthread"], &scratch);
    check_transparent("mt_output", &exe, &[], 7);
}

/// errno at `main`, and in a forked child after `fork()` returns, is what it is without the
/// library: its constructor (which may fail to find a collector, ENOENT) and its fork handler
/// leave errno as they found it.
#[test]
fn errno_at_main_and_after_fork_is_unchanged_by_the_profiler() {
    let scratch = scratch_dir("transparency_errno_build");
    let exe = compile("errno_at_start.c", &["-O1", "-g"], &scratch);
    check_transparent("errno_at_start", &exe, &[], 5);
}
