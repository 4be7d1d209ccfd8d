//! Issue 12, points 7 and 8: what `anyprof record` writes, and that it can always be stopped.
//!
//! - A symlink planted where `record` writes (its temporary name or the final one) never makes
//!   it write through the link: the file the link points at stays as it was.
//! - One profile that cannot be written does not cost the others.
//! - After the program has exited, SIGTERM makes `record` write its profiles at once, without
//!   waiting for a symbolizer that is stuck (simulated with a test-only stall that, like a
//!   symbolizer inside a huge debug file, does not look at the stop flag).
//! - An output directory another user controls is refused (run as root): `-o` naming a
//!   symlink of `nobody` (as in a sticky `/tmp`, to a directory of root's), or a directory of
//!   `nobody`'s (a default name created first); nothing is written. A new path and a
//!   directory of our own still work.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyprof_tests::{
    binaries, capture_output, clean_command, compile, exit_code, read_profile_in, run, scratch_dir,
    skip_outside_ci, RunOutput,
};

/// Iterations of cpu_split: about 0.3 s of CPU, enough for a few dozen samples.
const ITERATIONS: &str = "200000000";

fn record_command(out: &Path, program: &Path) -> Command {
    let mut cmd = clean_command(binaries().anyprof);
    cmd.arg("record")
        .arg("-q")
        .arg("-o")
        .arg(out)
        .arg("--")
        .arg(program)
        .arg(ITERATIONS);
    cmd
}

#[test]
fn planted_symlinks_in_the_output_directory_are_never_written_through() {
    let scratch = scratch_dir("security_record_symlinks");
    let program = compile("cpu_split.c", &["-O2", "-g"], &scratch);
    let out = scratch.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let victim = scratch.join("victim.txt");
    std::fs::write(&victim, "precious\n").unwrap();
    // The old temporary name, and the final names themselves.
    for name in [
        "cpu.pb.gz.tmp",
        "heap.pb.gz.tmp",
        "cpu.pb.gz",
        "allocs.pb.gz",
    ] {
        symlink(&victim, out.join(name)).unwrap();
    }

    let output = run(&mut record_command(&out, &program));

    assert_eq!(output.code, 0, "record failed:\n{}", output.stderr_text());
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "record wrote through a planted symlink into {}",
        victim.display()
    );
    for name in ["cpu.pb.gz", "heap.pb.gz", "allocs.pb.gz"] {
        let meta = std::fs::symlink_metadata(out.join(name)).unwrap();
        assert!(meta.is_file(), "{name} is not a regular file: {meta:?}");
    }
    assert!(read_profile_in(&out, "cpu.pb.gz", &output).total_samples() > 0);
}

#[test]
fn one_profile_that_cannot_be_written_does_not_cost_the_others() {
    let scratch = scratch_dir("security_record_one_failure");
    let program = compile("cpu_split.c", &["-O2", "-g"], &scratch);
    let out = scratch.join("out");
    // A non-empty directory where heap.pb.gz belongs: no rename can replace it.
    std::fs::create_dir_all(out.join("heap.pb.gz").join("keep")).unwrap();

    let output = run(&mut record_command(&out, &program));

    assert_ne!(
        output.code, 0,
        "a profile was not written, yet record succeeded"
    );
    let stderr = output.stderr_text();
    assert!(
        stderr.contains("heap.pb.gz"),
        "the error does not name the file that failed:\n{stderr}"
    );
    assert!(out.join("heap.pb.gz").join("keep").is_dir());
    assert!(read_profile_in(&out, "cpu.pb.gz", &output).total_samples() > 0);
    read_profile_in(&out, "allocs.pb.gz", &output);
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// Whether process `pid` has no child process left.
fn has_no_children(pid: u32) -> bool {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {path} (needs CONFIG_PROC_CHILDREN): {e}"))
        .trim()
        .is_empty()
}

#[test]
fn sigterm_after_the_program_exited_writes_the_profiles_at_once() {
    let scratch = scratch_dir("security_record_stop");
    let program = compile("cpu_split.c", &["-O2", "-g"], &scratch);
    let out = scratch.join("out");
    let mut cmd = record_command(&out, &program);
    // Every symbolizing call stalls for a minute and does not look at the stop flag.
    cmd.env("ANYPROF_TEST_SYMBOLIZE_DELAY_MS", "60000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut anyprof = cmd.spawn().expect("starting anyprof record");
    let (stdout, stderr) = capture_output(&mut anyprof);
    let pid = anyprof.id();
    // Wait until the program has ended and anyprof is busy symbolizing.
    std::thread::sleep(Duration::from_millis(200));
    while !has_no_children(pid) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the program did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        anyprof.try_wait().unwrap().is_none(),
        "anyprof ended before it was asked to stop: the stall did not happen"
    );

    // SAFETY: kill with a valid pid and signal.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let asked = Instant::now();
    let status = loop {
        if let Some(status) = anyprof.try_wait().unwrap() {
            break status;
        }
        if asked.elapsed() > Duration::from_secs(10) {
            let _ = anyprof.kill();
            let _ = anyprof.wait();
            panic!("anyprof record was still running 10 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = asked.elapsed();
    let output = RunOutput {
        code: exit_code(status),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
        wall: started.elapsed(),
    };
    assert!(
        took < Duration::from_secs(3),
        "anyprof took {took:?} to stop after SIGTERM"
    );
    assert_eq!(
        output.code,
        0,
        "anyprof did not exit with the program's status:\n{}",
        output.stderr_text()
    );
    assert!(
        output.stderr_text().contains("without symbolizing"),
        "anyprof did not say what it did:\n{}",
        output.stderr_text()
    );
    let cpu = read_profile_in(&out, "cpu.pb.gz", &output);
    assert!(cpu.total_samples() > 0, "{}", cpu.describe());
    read_profile_in(&out, "heap.pb.gz", &output);
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `anyprof record -q -o OUT -- /bin/true`.
fn record_true(out: &Path) -> RunOutput {
    run(clean_command(binaries().anyprof)
        .args(["record", "-q", "-o"])
        .arg(out)
        .args(["--", "/bin/true"]))
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The refusal names the directory, its owner and what to do.
fn assert_refused(output: &RunOutput, out: &Path, what: &str) {
    let stderr = output.stderr_text();
    assert_ne!(output.code, 0, "record accepted {what}:\n{stderr}");
    assert!(
        stderr.contains(&out.display().to_string())
            && stderr.contains("65534")
            && stderr.contains("pass -o"),
        "the refusal should name {} and its owner (uid 65534) and say to pass -o:\n{stderr}",
        out.display()
    );
}

#[test]
fn output_directory_of_another_user_is_refused() {
    const NOBODY: u32 = 65534;
    if !is_root() {
        skip_outside_ci("it needs root (files owned by nobody)");
        return;
    }
    let scratch = scratch_dir("security_record_foreign_dir");

    // A symlink of nobody's (as `ln -s` in a sticky /tmp) to a directory of root's.
    let target = scratch.join("target");
    std::fs::create_dir(&target).unwrap();
    let link = scratch.join("squat");
    symlink(&target, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(NOBODY), Some(NOBODY)).unwrap();
    let output = record_true(&link);
    assert_refused(&output, &link, "a symlink of another user");
    assert!(
        entries(&target).is_empty(),
        "record wrote through another user's symlink: {:?}",
        entries(&target)
    );
    // With a trailing slash too (lstat would follow the link).
    let slashed = std::path::PathBuf::from(format!("{}/", link.display()));
    assert_ne!(
        record_true(&slashed).code,
        0,
        "{} accepted",
        slashed.display()
    );
    assert!(entries(&target).is_empty(), "{:?}", entries(&target));

    // A directory of nobody's, as a default name created first.
    let theirs = scratch.join("anyprof-true-20260101-000000");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let output = record_true(&theirs);
    assert_refused(&output, &theirs, "a directory of another user");
    assert!(entries(&theirs).is_empty(), "{:?}", entries(&theirs));

    // Our own: a new path, an existing directory, and a symlink of ours to it.
    for out in [scratch.join("fresh"), target.clone(), scratch.join("ours")] {
        if out.ends_with("ours") {
            symlink(&target, &out).unwrap();
        }
        let output = record_true(&out);
        assert_eq!(
            output.code,
            0,
            "record -o {} failed:\n{}",
            out.display(),
            output.stderr_text()
        );
        assert!(
            out.join("cpu.pb.gz").is_file(),
            "no cpu.pb.gz in {}: {:?}",
            out.display(),
            entries(&out)
        );
    }
}
