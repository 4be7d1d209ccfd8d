//! Robustness: whatever the program does, and whatever happens to the collector, profiling
//! must not change what the program does (output, exit code, timing beyond a little), crash
//! it or hang it.
//!
//! Each test builds a small C program from `tests/programs/robust_*.c` (each file's header
//! says what it does and what it prints), runs it without the profiler and under it, and
//! compares. The programs check themselves where the profiler could change something they
//! can observe (signal dispositions, EINTR, descriptors they reuse) and print a fixed verdict
//! line, so "same output as without the profiler" is the main assertion. Runs that could hang
//! have a deadline; when it passes, the test prints a `gdb` backtrace of every process of the
//! run before killing them. Every process a test starts runs in a process group of its own,
//! killed when the test ends ([`Group`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyprof_tests::daemon::{free_port, poll, request};
use anyprof_tests::{
    binaries, capture_output, clean_command, compile, cpu_lock, exit_code, files_in,
    other_process_files, program_profile_path, record_with, scratch_dir, skip_outside_ci,
    ProfileView, RunOutput, Shared,
};

/// How long a run that could deadlock may take before the test calls it a hang (normal runs
/// take a few seconds, even on a loaded machine).
const HANG_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the tests poll for what they wait for.
const TICK: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Sends `signal` to a process (or, with a negative pid, a process group) this test started.
fn send_signal(pid: i32, signal: libc::c_int) {
    // SAFETY: kill(2) takes two integers; the pid is one of the processes (or process groups)
    // this test started itself.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// A child process started in a process group of its own; dropping it kills the whole group
/// (the program under `anyprof record`, its children, a daemon) and reaps the child.
struct Group {
    child: Child,
    pgid: i32,
}

impl Group {
    fn spawn(cmd: &mut Command) -> Group {
        let description = format!("{cmd:?}");
        let child = cmd
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {description}: {e}"));
        let pgid = child.id() as i32;
        Group { child, pgid }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits up to `timeout` for the child to exit; its exit code (128 + signal if killed).
    fn wait_timeout(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(exit_code(status)),
                Ok(None) if start.elapsed() > timeout => return None,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("waiting for pid {}: {e}", self.pid()),
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        send_signal(-self.pgid, libc::SIGCONT);
        send_signal(-self.pgid, libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pids of the live processes in process group `pgid`, from `/proc`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Some((state, _ppid, group)) = proc_stat(pid) else {
            continue;
        };
        if group == pgid && state != 'Z' {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// State, parent pid and process group of `pid` from `/proc/PID/stat`.
fn proc_stat(pid: i32) -> Option<(char, i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

/// `gdb` backtraces of every thread of every live process in group `pgid`, for the failure
/// message of a hang.
fn backtraces(pgid: i32) -> String {
    let mut out = String::new();
    for pid in group_members(pgid).into_iter().take(6) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        out.push_str(&format!("=== pid {pid}: {cmdline}\n"));
        let gdb = Command::new("timeout")
            .args(["30", "gdb", "-p", &pid.to_string(), "-batch", "-ex"])
            .arg("thread apply all bt 15")
            .stdin(Stdio::null())
            .output();
        match gdb {
            Ok(o) => out.push_str(&String::from_utf8_lossy(&o.stdout)),
            Err(e) => out.push_str(&format!("(gdb not available: {e})\n")),
        }
    }
    out
}

/// Runs `cmd` in its own process group with stdout/stderr captured. If it has not finished
/// after `timeout`, fails the test with `gdb` backtraces of every process of the run.
fn run_or_hang(cmd: &mut Command, timeout: Duration) -> RunOutput {
    let description = format!("{cmd:?}");
    let start = Instant::now();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut group = Group::spawn(cmd);
    let (out_reader, err_reader) = capture_output(&mut group.child);
    let Some(code) = group.wait_timeout(timeout) else {
        let stacks = backtraces(group.pgid);
        drop(group);
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        panic!(
            "HANG: {description} did not finish within {timeout:?}; killed it.\nstdout so far:\n{}\n\
             stderr so far:\n{}\nbacktraces:\n{stacks}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    let wall = start.elapsed();
    // The group may hold processes that outlive the child; they go when `group` drops, which
    // also closes any pipe ends they hold.
    drop(group);
    RunOutput {
        code,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        wall,
    }
}

/// `anyprof record -q -o <scratch>/<label> FLAGS -- program args` with a clean environment.
/// Returns the command and the output directory.
fn record_command(
    scratch: &Path,
    label: &str,
    flags: &[&str],
    program: &Path,
    args: &[&str],
) -> (Command, PathBuf) {
    let dir = scratch.join(label);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let mut cmd = clean_command(binaries().anyprof);
    cmd.arg("record")
        .arg("-q")
        .arg("-o")
        .arg(&dir)
        .args(flags)
        .arg("--")
        .arg(program)
        .args(args);
    (cmd, dir)
}

/// Runs the program without the profiler (deadline [`HANG_TIMEOUT`]).
fn direct(program: &Path, args: &[&str]) -> RunOutput {
    let mut cmd = clean_command(program);
    cmd.args(args);
    run_or_hang(&mut cmd, HANG_TIMEOUT)
}

/// Runs the program under `anyprof record FLAGS` (deadline [`HANG_TIMEOUT`]).
fn recorded(
    scratch: &Path,
    label: &str,
    flags: &[&str],
    program: &Path,
    args: &[&str],
) -> (RunOutput, PathBuf) {
    let (mut cmd, dir) = record_command(scratch, label, flags, program, args);
    (run_or_hang(&mut cmd, HANG_TIMEOUT), dir)
}

/// Asserts that a profiled run behaved exactly like the direct one: same exit code, same
/// stdout and same stderr.
fn assert_same_behaviour(what: &str, direct: &RunOutput, profiled: &RunOutput) {
    assert_eq!(
        (
            profiled.code,
            profiled.stdout_text(),
            profiled.stderr_text()
        ),
        (direct.code, direct.stdout_text(), direct.stderr_text()),
        "{what}: the profiled run (left: exit code, stdout, stderr) differs from the run \
         without the profiler (right)"
    );
}

/// Decodes a profile file.
fn read_profile(path: &Path) -> ProfileView {
    let profile = anyprof::pprof::read_file(path)
        .unwrap_or_else(|e| panic!("could not read the profile {}: {e:#}", path.display()));
    ProfileView::new(profile)
}

/// The value `type_name` per function, counted once per sample wherever the function is on
/// the stack (for heap profiles, which have no `samples` value).
fn cumulative_value(view: &ProfileView, type_name: &str) -> BTreeMap<String, i64> {
    let i = view.value_index(type_name);
    let mut out = BTreeMap::new();
    for sample in &view.profile.sample {
        let names: BTreeSet<&str> = view.frames(sample).iter().map(|f| f.name).collect();
        for name in names {
            *out.entry(name.to_string()).or_insert(0) += sample.value[i];
        }
    }
    out
}

fn samples_of(view: &ProfileView, function: &str) -> i64 {
    view.cumulative_samples()
        .get(function)
        .copied()
        .unwrap_or(0)
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn has_exited(pid: i32) -> bool {
    proc_stat(pid).is_none_or(|(state, _, _)| state == 'Z' || state == 'X')
}

fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

// ---------------------------------------------------------------------------------------------
// 1. fork
// ---------------------------------------------------------------------------------------------

/// A forked child is profiled as a process of its own: its CPU and allocations are in its own
/// files and not in the parent's, and the parent's are not in the child's. With
/// `ANYPROF_FORK=off` the child gets no files and the program's output is unchanged.
#[test]
fn forked_child_is_profiled_as_its_own_process_and_fork_off_leaves_it_alone() {
    let scratch = scratch_dir("robust_fork");
    let exe = compile("robust_fork.c", &["-O1", "-g"], &scratch);
    let plain = direct(&exe, &[]);
    assert_eq!(
        plain.code,
        0,
        "robust_fork itself failed: {}",
        plain.stderr_text()
    );

    let rec = record_with(&scratch, 250, &exe, &[], |_| {});
    assert_same_behaviour("robust_fork under record", &plain, &rec.output);
    let files = files_in(&rec.dir);
    let main_cpu = rec.cpu_profile();
    let children = other_process_files(&rec.dir, "cpu");
    assert_eq!(
        children.len(),
        1,
        "expected exactly one cpu.PID.COMMAND.pb.gz for the forked child; files: {files:?}"
    );
    let child_cpu = read_profile(&children[0]);
    assert!(
        samples_of(&main_cpu, "parent_work") > 0 && samples_of(&main_cpu, "child_work") == 0,
        "the program's cpu.pb.gz must show parent_work and not child_work:\n{}",
        main_cpu.describe()
    );
    assert!(
        samples_of(&child_cpu, "child_work") > 0 && samples_of(&child_cpu, "parent_work") == 0,
        "the child's {} must show child_work and not parent_work:\n{}",
        children[0].display(),
        child_cpu.describe()
    );
    let child_allocs_path = other_process_files(&rec.dir, "allocs");
    assert_eq!(
        child_allocs_path.len(),
        1,
        "one allocs file for the child; files: {files:?}"
    );
    let child_allocs = read_profile(&child_allocs_path[0]);
    let child_sites = cumulative_value(&child_allocs, "alloc_space");
    assert!(
        child_sites.get("child_alloc").copied().unwrap_or(0) > 0,
        "the child's allocs profile has no child_alloc: {child_sites:?}"
    );
    let main_sites = cumulative_value(
        &read_profile(&program_profile_path(&rec.dir, "allocs")),
        "alloc_space",
    );
    assert!(
        !main_sites.contains_key("child_alloc"),
        "the program's own allocs file shows the child's child_alloc: {main_sites:?}"
    );
    // The run's cpu.pb.gz holds both, each sample labelled with its process.
    let run = rec.run_cpu_profile();
    let pid_of = |function: &str| -> BTreeSet<i64> {
        run.profile
            .sample
            .iter()
            .filter(|s| run.frames(s).iter().any(|f| f.name == function))
            .filter_map(|s| run.num_label(s, "pid"))
            .collect()
    };
    let (parent_pids, child_pids) = (pid_of("parent_work"), pid_of("child_work"));
    assert!(
        parent_pids.len() == 1 && child_pids.len() == 1 && parent_pids != child_pids,
        "cpu.pb.gz must hold parent_work and child_work, each under one pid label of its \
         own (parent {parent_pids:?}, child {child_pids:?}):\n{}",
        run.describe()
    );

    // ANYPROF_FORK=off: `anyprof record` passes its environment on to the program.
    let scratch_off = scratch_dir("robust_fork_off");
    let off = record_with(&scratch_off, 250, &exe, &[], |cmd| {
        cmd.env("ANYPROF_FORK", "off");
    });
    assert_same_behaviour(
        "robust_fork under record with ANYPROF_FORK=off",
        &plain,
        &off.output,
    );
    let files = files_in(&off.dir);
    assert!(
        other_process_files(&off.dir, "cpu").is_empty()
            && other_process_files(&off.dir, "allocs").is_empty(),
        "with ANYPROF_FORK=off the child must get no files; files: {files:?}"
    );
    let main_cpu = off.cpu_profile();
    assert!(
        samples_of(&main_cpu, "parent_work") > 0 && samples_of(&main_cpu, "child_work") == 0,
        "with ANYPROF_FORK=off cpu.pb.gz must still show parent_work and never child_work:\n{}",
        main_cpu.describe()
    );
}

/// A process that ends with `_exit` runs no destructors, so a profiler that sends its last
/// data from one (or on its 20 ms cycle) loses what the program did last. Here the last thing
/// each process does is allocate 100 blocks; at `--mem-rate 1` its heap profile must hold
/// every one of them, exactly: when `main` calls `_exit`, when a SIGTERM handler does, and
/// when a forked child (profiled as a process of its own) does. A `vfork` child's `_exit`
/// runs on its parent's memory and must leave the parent's profile alone: the parent's
/// allocations after it must be there too.
#[test]
fn allocations_just_before_exit_underscore_are_in_the_profile() {
    let scratch = scratch_dir("robust_exit_fast");
    let exe = compile("exit_fast.c", &["-O1", "-g"], &scratch);
    for mode in ["direct", "signal", "child", "vfork"] {
        let plain = direct(&exe, &[mode]);
        assert_eq!(
            plain.code,
            0,
            "exit_fast {mode} itself failed: {}",
            plain.stderr_text()
        );
        let total: i64 = plain
            .stdout_text()
            .trim()
            .strip_prefix("allocated ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("exit_fast {mode} printed {:?}", plain.stdout_text()));
        let (rec, dir) = recorded(
            &scratch,
            mode,
            &["--cpu-hz", "0", "--mem-rate", "1"],
            &exe,
            &[mode],
        );
        assert_same_behaviour(&format!("exit_fast {mode} under record"), &plain, &rec);
        let path = if mode == "child" {
            let children = other_process_files(&dir, "heap");
            assert_eq!(
                children.len(),
                1,
                "one heap file for the child; files: {:?}",
                files_in(&dir)
            );
            children[0].clone()
        } else {
            program_profile_path(&dir, "heap")
        };
        let sites = read_profile(&path).heap_values_by_site();
        assert_eq!(
            sites.get("last_allocs").copied().unwrap_or_default(),
            [100, total, 100, total],
            "exit_fast {mode}: [alloc_objects, alloc_space, inuse_objects, inuse_space] of \
             last_allocs, the program's last allocations before _exit, in {}; all sites: \
             {sites:?}",
            path.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. fork while other threads are in malloc
// ---------------------------------------------------------------------------------------------

/// 200 forks while four threads churn malloc/free and the profiler's own thread runs: no
/// child may inherit a held lock (deadlock), and the output is unchanged.
/// glibc ends a process with exit(0) when its last thread exits through pthread_exit; the
/// profiler's own thread must not keep it alive. Both a main thread that calls pthread_exit
/// and a child forked from a worker thread whose only thread returns (CPython's
/// test_threading.ThreadJoinOnShutdown hung this way at 1000 Hz) must end, run their atexit
/// handlers, and be profiled.
#[test]
fn a_process_whose_threads_all_exit_ends_as_without_the_profiler() {
    let scratch = scratch_dir("robust_thread_exit");
    let exe = compile("robust_thread_exit.c", &["-O1", "-g", "-pthread"], &scratch);
    let plain = direct(&exe, &[]);
    assert_eq!(
        plain.stdout_text(),
        "child: worker returns\natexit\nparent: child exited 0\natexit\n",
        "robust_thread_exit itself: {plain:?}"
    );
    let (profiled, dir) = recorded(
        &scratch,
        "profile",
        &["--cpu-hz", "1000", "--mem-rate", "1"],
        &exe,
        &[],
    );
    assert_same_behaviour("robust_thread_exit under record", &plain, &profiled);
    assert!(
        dir.join("heap.pb.gz").is_file(),
        "the program's heap profile was not written: {:?}",
        files_in(&dir)
    );
}

#[test]
fn fork_during_malloc_churn_never_deadlocks() {
    let scratch = scratch_dir("robust_fork_churn");
    let exe = compile("robust_fork_churn.c", &["-O1", "-g", "-pthread"], &scratch);
    let plain = direct(&exe, &["200"]);
    assert_eq!(plain.code, 0, "robust_fork_churn itself failed: {plain:?}");
    let (profiled, _) = recorded(
        &scratch,
        "profile",
        &["--cpu-hz", "1000", "--mem-rate", "1"],
        &exe,
        &["200"],
    );
    assert_same_behaviour("robust_fork_churn under record", &plain, &profiled);
}

// ---------------------------------------------------------------------------------------------
// 3. dlopen / dlclose
// ---------------------------------------------------------------------------------------------

/// 2000 dlopen → call → dlclose cycles while sampling at 1000 Hz with every allocation
/// recorded: same output, and the samples inside the (since unloaded) library are named.
#[test]
fn dlopen_dlclose_loop_keeps_output_and_names_the_plugin_function() {
    let scratch = scratch_dir("robust_dlopen");
    let plugin = compile(
        "robust_plugin.c",
        &["-O1", "-g", "-shared", "-fPIC"],
        &scratch,
    );
    let exe = compile("robust_dlopen.c", &["-O1", "-g", "-ldl"], &scratch);
    let plugin_arg = plugin.to_str().expect("utf-8 path");
    let plain = direct(&exe, &[plugin_arg, "2000"]);
    assert_eq!(plain.code, 0, "robust_dlopen itself failed: {plain:?}");
    let (profiled, dir) = recorded(
        &scratch,
        "profile",
        &["--cpu-hz", "1000", "--mem-rate", "1"],
        &exe,
        &[plugin_arg, "2000"],
    );
    assert_same_behaviour("robust_dlopen under record", &plain, &profiled);
    let view = read_profile(&dir.join("cpu.pb.gz"));
    let total = view.total_samples();
    let hot = samples_of(&view, "plugin_hot");
    assert!(
        total > 0 && hot * 4 >= total,
        "plugin_hot (most of the program's CPU time, in a library loaded and unloaded 2000 \
         times) has {hot} of {total} samples:\n{}",
        view.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. the program's own SIGPROF
// ---------------------------------------------------------------------------------------------

/// Runs `robust_sigprof MODE` directly and under record at 1000 Hz; same output (which says
/// whether the program's handler saw what it should), and our profile still has samples.
fn check_own_sigprof(mode: &str) {
    let scratch = scratch_dir(&format!("robust_sigprof_{mode}"));
    let exe = compile("robust_sigprof.c", &["-O1", "-g"], &scratch);
    let plain = direct(&exe, &[mode]);
    assert!(
        plain.code == 0 && !plain.stdout_text().contains("WRONG"),
        "robust_sigprof {mode} is broken without the profiler: {plain:?}"
    );
    let (profiled, dir) = recorded(&scratch, "profile", &["--cpu-hz", "1000"], &exe, &[mode]);
    assert_same_behaviour(
        &format!("robust_sigprof {mode} under record"),
        &plain,
        &profiled,
    );
    let view = read_profile(&dir.join("cpu.pb.gz"));
    assert!(
        view.total_samples() > 0,
        "our CPU profile has no samples next to the program's own SIGPROF handler:\n{}",
        view.describe()
    );
}

/// A SIGPROF handler installed with `signal()` after start-up (and re-armed from inside
/// itself) receives the program's own ITIMER_PROF ticks, in a number that fits its CPU time:
/// not fewer (ours swallowed), not more (ours leaked to it).
#[test]
fn own_sigprof_handler_installed_with_signal_gets_its_own_ticks() {
    check_own_sigprof("signal");
}

/// The same with `sigaction(SA_SIGINFO)`; no tick with `si_code == SI_TIMER` (ours) reaches
/// it.
#[test]
fn own_sigprof_handler_installed_with_sigaction_gets_its_own_ticks() {
    check_own_sigprof("sigaction");
}

/// `sigaction(SIGPROF, NULL, &old)` reports SIG_DFL before the program installs anything and
/// then exactly its own handler, flags and mask; `signal()` returns it; SIG_IGN ignores.
#[test]
fn sigaction_query_returns_the_programs_own_sigprof_action() {
    check_own_sigprof("query");
}

// ---------------------------------------------------------------------------------------------
// 5. EINTR
// ---------------------------------------------------------------------------------------------

/// Blocking reads (restarted by SA_RESTART), nanosleep and usleep never fail with EINTR
/// while another thread is sampled at 1000 Hz.
#[test]
fn sampling_never_makes_reads_or_sleeps_fail_with_eintr() {
    let scratch = scratch_dir("robust_eintr");
    let exe = compile("robust_eintr.c", &["-O1", "-g", "-pthread"], &scratch);
    let plain = direct(&exe, &[]);
    assert_eq!(plain.code, 0, "robust_eintr itself failed: {plain:?}");
    let (profiled, dir) = recorded(&scratch, "profile", &["--cpu-hz", "1000"], &exe, &[]);
    let text = profiled.stdout_text();
    for counter in [
        "read EINTR",
        "nanosleep EINTR",
        "usleep EINTR",
        "writer EINTR",
    ] {
        assert!(
            text.contains(&format!("{counter}: 0\n")),
            "under the profiler the program saw EINTR ({counter}); it printed:\n{text}"
        );
    }
    assert_same_behaviour("robust_eintr under record", &plain, &profiled);
    let view = read_profile(&dir.join("cpu.pb.gz"));
    assert!(view.total_samples() > 0, "no samples:\n{}", view.describe());
}

// ---------------------------------------------------------------------------------------------
// 6. collector faults
// ---------------------------------------------------------------------------------------------

/// Reads `PREFIX.time` (nanoseconds) written by robust_faults.
fn faults_run_time(prefix: &Path) -> Option<Duration> {
    let text = std::fs::read_to_string(prefix.with_extension("time")).ok()?;
    text.trim().parse::<u64>().ok().map(Duration::from_nanos)
}

fn faults_pid(prefix: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(prefix.with_extension("pid")).ok()?;
    text.trim().parse().ok()
}

fn assert_faults_output_complete(prefix: &Path, iterations: u32, what: &str) {
    let out = read_text(&prefix.with_extension("out"));
    let expected: String = (0..iterations)
        .map(|i| format!("line {i}\n"))
        .chain(std::iter::once(format!("complete {iterations}\n")))
        .collect();
    assert!(
        out == expected,
        "{what}: the program's output file {} is not complete (killed mid-way, e.g. by \
         SIGPIPE?); it ends with:\n{}",
        prefix.with_extension("out").display(),
        &out[out.len().saturating_sub(300)..]
    );
}

const FAULTS_ITERATIONS: u32 = 1000;

/// `anyprof record` is stopped (SIGSTOP) right after the program starts: the program runs to
/// the end at its normal speed (its sends must not block), exits, and once the collector is
/// continued `record` exits with the program's exit code.
#[test]
fn stopped_collector_does_not_slow_or_block_the_program() {
    let _cpu = cpu_lock();
    let scratch = scratch_dir("robust_collector_stopped");
    let exe = compile("robust_faults.c", &["-O1", "-g"], &scratch);
    let iterations = FAULTS_ITERATIONS.to_string();

    // The machine's load changes; the unprofiled reference is the slower of a run before and
    // a run after the profiled one.
    let plain_run = |label: &str| {
        let plain_prefix = scratch.join(label);
        let plain = direct(&exe, &[plain_prefix.to_str().unwrap(), &iterations, "3"]);
        assert_eq!(plain.code, 3, "robust_faults itself failed: {plain:?}");
        faults_run_time(&plain_prefix).expect("plain run wrote its run time")
    };
    let plain_before = plain_run("plain_before");

    let prefix = scratch.join("stopped");
    let (mut cmd, _dir) = record_command(
        &scratch,
        "profile",
        &["--cpu-hz", "1000", "--mem-rate", "1"],
        &exe,
        &[prefix.to_str().unwrap(), &iterations, "3"],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut group = Group::spawn(&mut cmd);
    let record_pid = group.pid();
    let program_pid = poll(Duration::from_secs(30), TICK, || faults_pid(&prefix))
        .unwrap_or_else(|| panic!("the program never started under record"));
    assert_eq!(
        proc_stat(program_pid).map(|(_, ppid, _)| ppid),
        Some(record_pid),
        "the program's parent should be `anyprof record`"
    );
    send_signal(record_pid, libc::SIGSTOP);
    let stopped_at = Instant::now();

    let finished = poll(HANG_TIMEOUT, TICK, || faults_run_time(&prefix));
    let exited = poll(Duration::from_secs(20), TICK, || {
        has_exited(program_pid).then_some(())
    });
    if finished.is_none() || exited.is_none() {
        let stacks = backtraces(group.pgid);
        panic!(
            "HANG: with `anyprof record` stopped, the program {} (finished its work: {}, \
             exited: {}) after {:?}.\nbacktraces:\n{stacks}",
            program_pid,
            finished.is_some(),
            exited.is_some(),
            stopped_at.elapsed()
        );
    }
    let run_time = finished.unwrap();
    let exit_after = started.elapsed();
    send_signal(record_pid, libc::SIGCONT);
    let code = group.wait_timeout(HANG_TIMEOUT);
    let mut stderr = String::new();
    if let Some(mut e) = group.child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert_eq!(
        code,
        Some(3),
        "after SIGCONT `anyprof record` must exit with the program's code 3; stderr:\n{stderr}"
    );
    assert_faults_output_complete(&prefix, FAULTS_ITERATIONS, "collector stopped");
    let plain_time = plain_before.max(plain_run("plain_after"));
    let limit = plain_time.mul_f64(1.5) + Duration::from_millis(300);
    assert!(
        run_time <= limit,
        "with the collector stopped the program took {run_time:?} (its own measure), more than \
         1.5 x {plain_time:?} + 0.3 s without the profiler"
    );
    // The program also has to get out: its exit hooks may wait for the collector only briefly.
    assert!(
        exit_after <= limit + Duration::from_secs(2),
        "the program only exited {exit_after:?} after record started (work took {run_time:?})"
    );
}

/// `anyprof record` is killed (SIGKILL) mid-run: its program, now an orphan that finds its
/// socket dead, must not be killed by SIGPIPE and must finish its work.
#[test]
fn killed_record_collector_leaves_the_program_running_to_completion() {
    let scratch = scratch_dir("robust_collector_killed_record");
    let exe = compile("robust_faults.c", &["-O1", "-g"], &scratch);
    let prefix = scratch.join("killed");
    let iterations = FAULTS_ITERATIONS.to_string();
    let (mut cmd, _dir) = record_command(
        &scratch,
        "profile",
        &["--cpu-hz", "1000", "--mem-rate", "1"],
        &exe,
        &[prefix.to_str().unwrap(), &iterations, "0"],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut group = Group::spawn(&mut cmd);
    let program_pid = poll(Duration::from_secs(30), TICK, || faults_pid(&prefix))
        .unwrap_or_else(|| panic!("the program never started under record"));
    std::thread::sleep(Duration::from_millis(200));
    send_signal(group.pid(), libc::SIGKILL);
    assert_eq!(group.wait_timeout(Duration::from_secs(10)), Some(128 + 9));
    let exited = poll(HANG_TIMEOUT, TICK, || has_exited(program_pid).then_some(()));
    if exited.is_none() {
        let stacks = backtraces(group.pgid);
        panic!("HANG: the orphaned program {program_pid} did not exit.\nbacktraces:\n{stacks}");
    }
    assert_faults_output_complete(&prefix, FAULTS_ITERATIONS, "record killed");
}

/// The body of `GET path`, or None if no whole response came within `timeout`.
fn http_get(port: u16, path: &str, timeout: Duration) -> Option<String> {
    request(port, "GET", path, b"", timeout)
        .ok()
        .map(|reply| reply.text())
}

/// Starts `anyprof serve` on a socket in `scratch`; returns it, the socket and the HTTP port
/// once it answers.
fn start_daemon(scratch: &Path) -> (Group, PathBuf, u16) {
    let socket = scratch.join("d.sock");
    let port = free_port();
    let mut cmd = clean_command(binaries().anyprof);
    cmd.arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--http")
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let daemon = Group::spawn(&mut cmd);
    poll(Duration::from_secs(30), TICK, || {
        (socket.exists() && http_get(port, "/debug/pprof/", Duration::from_secs(2)).is_some())
            .then_some(())
    })
    .unwrap_or_else(|| panic!("anyprof serve did not come up on {}", socket.display()));
    (daemon, socket, port)
}

/// The `anyprof serve` daemon is killed (SIGKILL) while it streams a CPU profile from the
/// program and every allocation is sampled: the program must exit 0, not by SIGPIPE, with
/// its output complete.
#[test]
fn killed_daemon_does_not_kill_the_program_with_sigpipe() {
    let scratch = scratch_dir("robust_collector_killed_daemon");
    let exe = compile("robust_faults.c", &["-O1", "-g"], &scratch);
    let (daemon, socket, port) = start_daemon(&scratch);
    let prefix = scratch.join("killed");
    let mut cmd = clean_command(&exe);
    cmd.arg(&prefix)
        .arg(FAULTS_ITERATIONS.to_string())
        .arg("0")
        .env("LD_PRELOAD", binaries().preload)
        .env("ANYPROF_SOCKET", &socket)
        .env("ANYPROF_MEM_RATE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut program = Group::spawn(&mut cmd);
    let pid = program.pid();
    let listed = poll(Duration::from_secs(20), TICK, || {
        http_get(port, "/debug/pprof/", Duration::from_secs(2))
            .filter(|index| index.contains(&format!("<td>{pid}</td>")))
            .map(|_| ())
    });
    // Ask for a CPU profile so that the program's timers run when the daemon dies.
    let profile_request = std::thread::spawn(move || {
        http_get(
            port,
            &format!("/debug/pprof/profile?seconds=5&pid={pid}"),
            Duration::from_secs(10),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    send_signal(daemon.pid(), libc::SIGKILL);
    drop(daemon);
    let _ = profile_request.join();
    let code = program.wait_timeout(HANG_TIMEOUT);
    let Some(code) = code else {
        let stacks = backtraces(program.pgid);
        panic!("HANG: the program did not exit after the daemon was killed.\n{stacks}");
    };
    let mut stderr = String::new();
    if let Some(mut e) = program.child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert_eq!(
        code, 0,
        "the program must exit 0 after its daemon was killed (128+13 = SIGPIPE); its stderr:\n\
         {stderr}"
    );
    assert!(
        listed.is_some(),
        "the daemon never listed the program, so the test did not exercise a live connection"
    );
    assert_faults_output_complete(&prefix, FAULTS_ITERATIONS, "daemon killed");
}

// ---------------------------------------------------------------------------------------------
// 7. programs that close every descriptor
// ---------------------------------------------------------------------------------------------

/// A program that closes every descriptor it did not open and reuses the numbers (for files,
/// then for sockets): same output, same file contents, and it finds exactly the descriptors it
/// finds without the profiler (the library holds none once it has handed its region over), and
/// the profile still has samples from after the close.
#[test]
fn closing_every_descriptor_never_gets_profiler_bytes_into_the_programs_files() {
    let scratch = scratch_dir("robust_closefds");
    let exe = compile("robust_closefds.c", &["-O1", "-g"], &scratch);
    let plain_dir = scratch.join("plain_files");
    let profiled_dir = scratch.join("profiled_files");
    std::fs::create_dir_all(&plain_dir).unwrap();
    std::fs::create_dir_all(&profiled_dir).unwrap();
    let plain = direct(&exe, &[plain_dir.to_str().unwrap()]);
    assert!(
        plain.code == 0 && !plain.stdout_text().contains("WRONG"),
        "robust_closefds itself failed: {plain:?}"
    );
    let (profiled, dir) = recorded(
        &scratch,
        "profile",
        &["--cpu-hz", "1000", "--mem-rate", "1"],
        &exe,
        &[profiled_dir.to_str().unwrap()],
    );
    assert_same_behaviour("robust_closefds under record", &plain, &profiled);
    assert_eq!(
        read_text(&profiled_dir.join("out.txt")),
        read_text(&plain_dir.join("out.txt")),
        "out.txt differs between the profiled run (left) and the plain one (right)"
    );
    // Whatever the test harness passed down (a CI runner passes nothing, a terminal may pass
    // some) is found by both runs alike; one more file under the profiler is a descriptor of
    // ours that the program could close and reuse.
    assert_eq!(
        files_in(&profiled_dir),
        files_in(&plain_dir),
        "under the profiler (left) the program found descriptors it did not open that it does \
         not find without it (right): the library holds a descriptor at main"
    );
    let view = read_profile(&dir.join("cpu.pb.gz"));
    assert!(
        samples_of(&view, "work_after_close") > 0,
        "no samples of work_after_close: sampling stopped after the program closed every \
         descriptor:\n{}",
        view.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// 8. unshare(CLONE_NEWUSER)
// ---------------------------------------------------------------------------------------------

/// unshare(CLONE_NEWUSER), which the kernel refuses to multithreaded processes, still works
/// in a single-threaded program under the profiler (whose own thread must step aside).
#[test]
fn unshare_newuser_works_in_a_single_threaded_program() {
    let probe = clean_command("unshare")
        .args(["-U", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        skip_outside_ci(&format!(
            "`unshare -U true` fails without the profiler ({probe:?}): no user namespaces here"
        ));
        return;
    }
    let scratch = scratch_dir("robust_unshare");
    let exe = compile("robust_unshare.c", &["-O1", "-g", "-pthread"], &scratch);
    let plain = direct(&exe, &[]);
    if plain.code != 0 {
        skip_outside_ci(&format!(
            "the program's own unshare fails without the profiler: {}",
            plain.stdout_text()
        ));
        return;
    }
    let (profiled, _) = recorded(
        &scratch,
        "profile",
        &["--cpu-hz", "1000", "--mem-rate", "1"],
        &exe,
        &[],
    );
    assert_same_behaviour("robust_unshare under record", &plain, &profiled);
}

// ---------------------------------------------------------------------------------------------
// 9. programs the library cannot get into
// ---------------------------------------------------------------------------------------------

/// `tests/programs/robust_static.c` built with `-static` in `scratch`; panics (naming `test`)
/// where static linking does not work.
fn build_static(scratch: &Path, test: &str) -> Option<PathBuf> {
    let exe = scratch.join("robust_static");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let built = Command::new(&cc)
        .args(["-O1", "-g", "-static", "-o"])
        .arg(&exe)
        .arg(anyprof_tests::program_source("robust_static.c"))
        .output();
    match built {
        Ok(o) if o.status.success() => Some(exe),
        other => {
            // libc6-dev (which every C compiler here brings) has the static libc: this is
            // a broken toolchain, not a reason to skip.
            panic!("{test}: `{cc} -static` does not work here (no static libc?): {other:?}")
        }
    }
}

/// The lines of `stderr` that anyprof wrote (they start with `anyprof:`).
fn anyprof_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("anyprof:"))
        .collect()
}

/// `stderr` without anyprof's lines: what the program itself wrote.
fn program_stderr(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with("anyprof:"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Asserts that `profiled` behaved exactly like `direct` (exit code, stdout, the program's
/// stderr) and that anyprof added exactly one line to stderr, containing each of `words`.
/// Returns that line.
fn assert_unprofiled_run(
    what: &str,
    direct: &RunOutput,
    profiled: &RunOutput,
    words: &[&str],
) -> String {
    let stderr = profiled.stderr_text();
    assert_eq!(
        (
            profiled.code,
            profiled.stdout_text(),
            program_stderr(&stderr)
        ),
        (direct.code, direct.stdout_text(), direct.stderr_text()),
        "{what}: the run under record (left: exit code, stdout, the program's stderr) differs \
         from the run without it (right); stderr under record:\n{stderr}"
    );
    let lines = anyprof_lines(&stderr);
    assert_eq!(
        lines.len(),
        1,
        "{what}: anyprof should say in exactly one line why the program is not profiled; its \
         stderr:\n{stderr}"
    );
    for word in words {
        assert!(
            lines[0].contains(word),
            "{what}: anyprof's line should mention `{word}`: {}",
            lines[0]
        );
    }
    lines[0].to_string()
}

/// Runs `cmd` like [`run_or_hang`], with stdin read from the file `input`.
fn run_fed(cmd: &mut Command, input: &Path) -> RunOutput {
    let file =
        std::fs::File::open(input).unwrap_or_else(|e| panic!("opening {}: {e}", input.display()));
    cmd.stdin(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut group = Group::spawn(cmd);
    let (out_reader, err_reader) = capture_output(&mut group.child);
    let code = group
        .wait_timeout(HANG_TIMEOUT)
        .unwrap_or_else(|| panic!("HANG: {cmd:?} did not finish within {HANG_TIMEOUT:?}"));
    drop(group);
    RunOutput {
        code,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        wall: start.elapsed(),
    }
}

/// `bash -c '...; exec STATIC'` under record: bash (profiled, sampled at 1000 Hz while it
/// loops) execs a program that cannot load the library. The static program must run normally
/// (no stray signal of our timers killing it: "Real-time signal 28", or "Profiling timer
/// expired" when they sent SIGPROF), its exit code must come back
/// through record, no profile may claim samples of it, and record says so in one line.
#[test]
fn exec_into_a_static_program_runs_it_normally() {
    let scratch = scratch_dir("robust_exec_static");
    let Some(exe) = build_static(&scratch, "exec_into_a_static_program_runs_it_normally") else {
        return;
    };
    let plain = direct(&exe, &[]);
    assert_eq!(
        (plain.code, plain.stdout_text()),
        (7, "static done\n".to_string()),
        "the static program itself misbehaves"
    );
    let script = format!(
        "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec '{}'",
        exe.display()
    );
    for round in 0..3 {
        let (out, dir) = recorded(
            &scratch,
            &format!("exec_{round}"),
            &["--cpu-hz", "1000", "--mem-rate", "1"],
            Path::new("bash"),
            &["-c", &script],
        );
        let stderr = out.stderr_text();
        assert!(
            out.code == 7 && out.stdout_text() == "static done\n",
            "round {round}: `bash -c '... exec robust_static'` under record exited {} (expected \
             7) with stdout {:?}; stderr:\n{stderr}",
            out.code,
            out.stdout_text()
        );
        assert!(
            !stderr.contains("Profiling timer expired") && !stderr.contains("Real-time signal"),
            "round {round}: a signal of our timers reached the static program:\n{stderr}"
        );
        let lines = anyprof_lines(&stderr);
        assert!(
            lines.len() == 1
                && lines[0].contains(&exe.display().to_string())
                && lines[0].contains("statically linked"),
            "round {round}: anyprof should say in one line that bash exec'd a static program, \
             which is not profiled:\n{stderr}"
        );
        for name in files_in(&dir) {
            assert!(
                !name.contains("robust_static"),
                "round {round}: a profile file is named after the static program: {name}"
            );
            if name.starts_with("cpu") && name.ends_with(".pb.gz") {
                let view = read_profile(&dir.join(&name));
                assert_eq!(
                    samples_of(&view, "static_work"),
                    0,
                    "round {round}: {name} claims samples of the static program:\n{}",
                    view.describe()
                );
            }
        }
    }
}

/// Issue 13, point 4: a statically linked program under `anyprof record` runs as without
/// it — same stdin, stdout, the program's own stderr and exit status — and anyprof adds one
/// line to stderr saying why it is not profiled and what to do (with `-q` and without), and
/// writes no profile file. So does a script whose `#!` interpreter is static. With
/// `--require-profile` the program is refused: it does not run, and record fails saying why.
#[test]
fn static_program_runs_as_without_anyprof_with_one_line_saying_why() {
    const TEST: &str = "static_program_runs_as_without_anyprof_with_one_line_saying_why";
    let scratch = scratch_dir("robust_static_direct");
    let Some(exe) = build_static(&scratch, TEST) else {
        return;
    };
    let exe_name = exe.display().to_string();
    let input = scratch.join("input.txt");
    std::fs::write(&input, "line one\nline two\n").expect("writing the input file");
    let plain = run_fed(clean_command(&exe).arg("echo"), &input);
    assert_eq!(
        (plain.code, plain.stdout_text(), plain.stderr_text()),
        (
            7,
            "line one\nline two\nstatic done\n".to_string(),
            "static read 18 bytes\n".to_string()
        ),
        "the static program itself misbehaves"
    );
    let words = [
        exe_name.as_str(),
        "statically linked",
        "link it dynamically",
    ];
    for quiet in [true, false] {
        let dir = scratch.join(format!("out_quiet_{quiet}"));
        let mut cmd = clean_command(binaries().anyprof);
        cmd.arg("record").arg("-o").arg(&dir);
        if quiet {
            cmd.arg("-q");
        }
        cmd.args(["--cpu-hz", "1000", "--mem-rate", "1", "--"])
            .arg(&exe)
            .arg("echo");
        let out = run_fed(&mut cmd, &input);
        assert_unprofiled_run(
            &format!("the static program under record (quiet: {quiet})"),
            &plain,
            &out,
            &words,
        );
        assert!(
            !dir.exists(),
            "record created {} for a program it could not profile, and left it: {:?}",
            dir.display(),
            files_in(&dir)
        );
    }

    // A script run by a static interpreter: the same, and the line names the interpreter.
    let script = scratch.join("static_script");
    std::fs::write(&script, format!("#!{}\nignored\n", exe.display())).expect("writing script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod the script");
    let plain_script = direct(&script, &[]);
    assert_eq!(
        (plain_script.code, plain_script.stdout_text()),
        (7, "static done\n".to_string()),
        "the script with the static interpreter misbehaves"
    );
    let (out, dir) = recorded(&scratch, "script", &["--cpu-hz", "1000"], &script, &[]);
    let line = assert_unprofiled_run(
        "a script whose interpreter is static, under record",
        &plain_script,
        &out,
        &[
            &script.display().to_string(),
            "interpreter",
            "statically linked",
        ],
    );
    assert!(
        line.contains(&exe_name),
        "the line should name the interpreter: {line}"
    );
    assert_eq!(
        files_in(&dir),
        Vec::<String>::new(),
        "profile files for the script"
    );

    // With --require-profile: refused, not run.
    for (what, program) in [("the static program", &exe), ("the script", &script)] {
        let (out, dir) = recorded(
            &scratch,
            "required",
            &["--require-profile"],
            program,
            &["echo"],
        );
        let stderr = out.stderr_text();
        assert!(
            out.code == 2
                && out.stdout_text().is_empty()
                && !stderr.contains("static read")
                && stderr.contains("cannot be profiled")
                && stderr.contains("statically linked")
                && anyprof_lines(&stderr).len() == 1,
            "record --require-profile should refuse {what} without running it (exit 2, one \
             line saying it is statically linked); it exited {} with stdout {:?} and \
             stderr:\n{stderr}",
            out.code,
            out.stdout_text()
        );
        assert_eq!(
            files_in(&dir),
            Vec::<String>::new(),
            "files for a refused program"
        );
    }
}

/// Issue 13, point 4: a setuid-root program run through `anyprof record` by `nobody` (the
/// dynamic loader ignores `LD_PRELOAD` in it) runs as it does for `nobody` without anyprof,
/// with one line on stderr saying it is setuid, and no profile; `--require-profile` refuses
/// it. Needs root to make the program setuid root and to act as `nobody`.
#[test]
fn setuid_program_run_by_another_user_runs_as_without_anyprof() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip_outside_ci("it needs root to make a setuid-root program and act as nobody");
        return;
    }
    const NOBODY: u32 = 65534;
    let scratch = scratch_dir("robust_setuid");
    let exe = compile("secure_target.c", &["-O1"], &scratch);
    std::os::unix::fs::lchown(&exe, Some(0), Some(0)).expect("chown root the program");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o4755))
        .expect("chmod 4755 the program");
    // nobody must reach the program, anyprof and the library (all under target/, which the
    // tests create with the default umask), and have a place for record's socket.
    let as_nobody = |cmd: &mut Command| {
        cmd.uid(NOBODY)
            .gid(NOBODY)
            .env_remove("XDG_RUNTIME_DIR")
            .env("TMPDIR", "/tmp");
    };
    let mut plain_cmd = clean_command(&exe);
    as_nobody(&mut plain_cmd);
    let plain = run_or_hang(plain_cmd.arg("100"), HANG_TIMEOUT);
    if !plain.stdout_text().contains("secure=1") {
        skip_outside_ci(&format!(
            "the setuid program does not run with secure execution here (nosuid mount?):\n{}",
            plain.stdout_text()
        ));
        return;
    }
    assert_eq!(
        plain.code,
        0,
        "the setuid program failed: {}",
        plain.stderr_text()
    );

    let (mut cmd, dir) = record_command(
        &scratch,
        "recorded",
        &["--cpu-hz", "1000", "--mem-rate", "1"],
        &exe,
        &["100"],
    );
    as_nobody(&mut cmd);
    let out = run_or_hang(&mut cmd, HANG_TIMEOUT);
    assert_unprofiled_run(
        "the setuid program run by nobody under record",
        &plain,
        &out,
        &[&exe.display().to_string(), "setuid to uid 0", "uid 65534"],
    );
    assert_eq!(
        files_in(&dir),
        Vec::<String>::new(),
        "profile files for the setuid program"
    );

    let (mut cmd, _) = record_command(&scratch, "required", &["--require-profile"], &exe, &["100"]);
    as_nobody(&mut cmd);
    let out = run_or_hang(&mut cmd, HANG_TIMEOUT);
    assert!(
        out.code == 2 && out.stdout_text().is_empty() && out.stderr_text().contains("setuid"),
        "record --require-profile should refuse the setuid program without running it; it \
         exited {} with stdout {:?} and stderr:\n{}",
        out.code,
        out.stdout_text(),
        out.stderr_text()
    );
}

/// Issue 13, point 4: a shell script under record that runs a static program and then a
/// dynamic one (the same source): both run as without anyprof, and the dynamic one is
/// profiled in a file of its own.
#[test]
fn script_running_a_static_and_a_dynamic_program_profiles_the_dynamic_one() {
    const TEST: &str = "script_running_a_static_and_a_dynamic_program_profiles_the_dynamic_one";
    let scratch = scratch_dir("robust_static_mixed");
    let Some(static_exe) = build_static(&scratch, TEST) else {
        return;
    };
    let dynamic_dir = scratch.join("dyn");
    std::fs::create_dir_all(&dynamic_dir).expect("creating dyn/");
    let dynamic_exe = scratch.join("robust_dynamic");
    std::fs::rename(
        compile("robust_static.c", &["-O1", "-g"], &dynamic_dir),
        &dynamic_exe,
    )
    .expect("renaming the dynamic build");
    let script = scratch.join("mixed.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n'{}'; echo \"static exited $?\"\n'{}'; echo \"dynamic exited $?\"\n",
            static_exe.display(),
            dynamic_exe.display()
        ),
    )
    .expect("writing the script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod the script");
    let plain = direct(&script, &[]);
    assert_eq!(
        (plain.code, plain.stdout_text()),
        (
            0,
            "static done\nstatic exited 7\nstatic done\ndynamic exited 7\n".to_string()
        ),
        "the script itself misbehaves: {}",
        plain.stderr_text()
    );
    let (out, dir) = recorded(
        &scratch,
        "recorded",
        &["--cpu-hz", "1000", "--mem-rate", "1"],
        &script,
        &[],
    );
    assert_same_behaviour("the mixed script under record", &plain, &out);
    let files = files_in(&dir);
    assert!(
        !files.iter().any(|n| n.contains("robust_static")),
        "a file is named after the static program, which cannot be profiled: {files:?}"
    );
    let cpu: Vec<PathBuf> = other_process_files(&dir, "cpu")
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("robust_dynamic"))
        .collect();
    assert_eq!(
        cpu.len(),
        1,
        "the dynamic program should have one CPU profile of its own; files: {files:?}"
    );
    let view = read_profile(&cpu[0]);
    assert!(
        samples_of(&view, "static_work") > 0,
        "the dynamic program's profile has no samples of its static_work:\n{}",
        view.describe()
    );
}

/// Issue 13, point 4: a program that never loads the library for a reason record cannot see
/// beforehand (here `--lib` names a library that is not anyprof's, so nothing ever connects)
/// runs as without anyprof, gets one line at the end and no profile files (the output
/// directory record made for it is removed). With `--require-profile` record exits 2. A
/// program that a profiled `env -u LD_PRELOAD` becomes by exec gets one line too.
#[test]
fn program_that_never_connects_gets_one_line_and_no_files() {
    let scratch = scratch_dir("robust_never_connects");
    let source = scratch.join("not_anyprof.c");
    std::fs::write(&source, "int not_anyprof_marker(void) { return 1; }\n").expect("source");
    let lib = scratch.join("libnot_anyprof.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let built = Command::new(&cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&source)
        .status()
        .expect("running the C compiler");
    assert!(built.success(), "building {}", lib.display());
    let exe = compile("robust_static.c", &["-O1", "-g"], &scratch);
    let plain = direct(&exe, &[]);
    assert_eq!(
        (plain.code, plain.stdout_text()),
        (7, "static done\n".to_string())
    );
    for require in [false, true] {
        let out_dir = scratch.join(format!("out_{require}"));
        let mut cmd = clean_command(binaries().anyprof);
        cmd.arg("record")
            .arg("-q")
            .arg("-o")
            .arg(&out_dir)
            .arg("--lib")
            .arg(&lib);
        if require {
            cmd.arg("--require-profile");
        }
        cmd.arg("--").arg(&exe);
        let out = run_or_hang(&mut cmd, HANG_TIMEOUT);
        let stderr = out.stderr_text();
        let lines = anyprof_lines(&stderr);
        assert!(
            out.stdout_text() == "static done\n"
                && program_stderr(&stderr).is_empty()
                && lines.len() == 1
                && lines[0].contains("never loaded libanyprof.so")
                && lines[0].contains(&exe.display().to_string()),
            "require: {require}: the program must run as usual and anyprof say in one line \
             that it never loaded the library; exit {}, stdout {:?}, stderr:\n{stderr}",
            out.code,
            out.stdout_text()
        );
        let expected_code = if require { 2 } else { 7 };
        assert_eq!(
            out.code, expected_code,
            "require: {require}: exit code; stderr:\n{stderr}"
        );
        assert!(
            !out_dir.exists(),
            "require: {require}: record left {} with {:?} for a program that never connected",
            out_dir.display(),
            files_in(&out_dir)
        );
    }

    // `env -u LD_PRELOAD PROGRAM`: env is profiled, then replaces itself with the program,
    // which runs without the library: one line says so.
    let (out, _) = recorded(
        &scratch,
        "env_u",
        &[],
        Path::new("env"),
        &["-u", "LD_PRELOAD", &exe.display().to_string()],
    );
    let stderr = out.stderr_text();
    let lines = anyprof_lines(&stderr);
    assert!(
        out.code == 7
            && out.stdout_text() == "static done\n"
            && program_stderr(&stderr).is_empty()
            && lines.len() == 1
            && lines[0].contains(&exe.display().to_string())
            && lines[0].contains("LD_PRELOAD was cleared"),
        "`env -u LD_PRELOAD PROGRAM` under record: the program must run as usual and anyprof \
         say in one line that it ran without the library; exit {}, stdout {:?}, \
         stderr:\n{stderr}",
        out.code,
        out.stdout_text()
    );
}

// ---------------------------------------------------------------------------------------------
// 10. bad configuration
// ---------------------------------------------------------------------------------------------

/// Bad `ANYPROF_*` values never change the program's output, and each one is explained by
/// exactly one line in `ANYPROF_LOG_FILE` naming the variable and the value.
#[test]
fn bad_settings_are_reported_once_each_and_change_nothing() {
    let scratch = scratch_dir("robust_bad_settings");
    let exe = compile(
        "robust_thread_churn.c",
        &["-O1", "-g", "-pthread"],
        &scratch,
    );
    let plain = direct(&exe, &["40"]);
    assert_eq!(
        plain.code, 0,
        "robust_thread_churn itself failed: {plain:?}"
    );
    let bad = [
        ("ANYPROF_CPU_HZ", "fast"),
        ("ANYPROF_MEM_RATE", "lots"),
        ("ANYPROF_MODE", "weird"),
    ];
    let mut cases: Vec<(String, Vec<(&str, &str)>)> = bad
        .iter()
        .map(|&(k, v)| (k.to_lowercase(), vec![(k, v)]))
        .collect();
    cases.push(("all".to_string(), bad.to_vec()));
    for (label, vars) in cases {
        let log = scratch.join(format!("{label}.log"));
        let mut cmd = clean_command(&exe);
        cmd.arg("40")
            .env("LD_PRELOAD", binaries().preload)
            .env("ANYPROF_SOCKET", scratch.join("nobody-listens.sock"))
            .env("ANYPROF_LOG_FILE", &log);
        for (k, v) in &vars {
            cmd.env(k, v);
        }
        let out = run_or_hang(&mut cmd, HANG_TIMEOUT);
        assert_same_behaviour(&format!("robust_thread_churn with {vars:?}"), &plain, &out);
        let text = read_text(&log);
        for (k, v) in &vars {
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(k)).collect();
            assert!(
                lines.len() == 1 && lines[0].contains(&format!("{k}={v}")),
                "with {vars:?} the log file should hold exactly one line naming {k}={v}; it \
                 holds:\n{text}"
            );
        }
    }

    // Under `anyprof record`, which passes its environment on: a bad ANYPROF_FORK in a program
    // that forks is reported once in the log file and once on record's stderr (the child
    // must not repeat it), and the program's output and exit code are unchanged.
    let fork_exe = compile("robust_fork.c", &["-O1", "-g"], &scratch);
    let fork_plain = direct(&fork_exe, &["0.1"]);
    assert_eq!(
        fork_plain.code, 0,
        "robust_fork itself failed: {fork_plain:?}"
    );
    let log = scratch.join("record_fork.log");
    let rec = record_with(&scratch, 100, &fork_exe, &["0.1"], |cmd| {
        cmd.env("ANYPROF_FORK", "sideways")
            .env("ANYPROF_LOG_FILE", &log);
    });
    assert_eq!(
        (rec.output.code, rec.output.stdout_text()),
        (fork_plain.code, fork_plain.stdout_text()),
        "robust_fork with ANYPROF_FORK=sideways under record: exit code and stdout (left) differ \
         from the plain run (right)"
    );
    let text = read_text(&log);
    let stderr = rec.output.stderr_text();
    for (what, text) in [("the log file", &text), ("record's stderr", &stderr)] {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("ANYPROF_FORK"))
            .collect();
        assert!(
            lines.len() == 1 && lines[0].contains("ANYPROF_FORK=sideways"),
            "with ANYPROF_FORK=sideways under record {what} should hold exactly one line naming \
             it; it holds:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 11. threads that exit while sampled
// ---------------------------------------------------------------------------------------------

/// The program's run without the profiler and under record (2000 short-lived threads at
/// 1000 Hz with every allocation recorded), shared by the two tests below.
static THREAD_CHURN: Shared<(RunOutput, RunOutput, PathBuf)> = Shared::new();

fn thread_churn() -> &'static (RunOutput, RunOutput, PathBuf) {
    THREAD_CHURN.get(|| {
        let scratch = scratch_dir("robust_thread_churn");
        let exe = compile(
            "robust_thread_churn.c",
            &["-O1", "-g", "-pthread"],
            &scratch,
        );
        let plain = direct(&exe, &["2000"]);
        assert_eq!(
            plain.code, 0,
            "robust_thread_churn itself failed: {plain:?}"
        );
        let (profiled, dir) = recorded(
            &scratch,
            "profile",
            &["--cpu-hz", "1000", "--mem-rate", "1"],
            &exe,
            &["2000"],
        );
        (plain, profiled, dir)
    })
}

/// 2000 short-lived threads, each sampled and allocating, created and joined under 1000 Hz
/// and every allocation recorded: same output, readable profiles, and every one of the
/// threads' 2000 allocations in the allocs profile (none lost when its thread exits).
#[test]
fn short_lived_threads_under_sampling_keep_output_and_profiles_readable() {
    let (plain, profiled, dir) = thread_churn();
    assert_same_behaviour("robust_thread_churn 2000 under record", plain, profiled);
    // Decoding is the check here (samples are `short_lived_threads_cpu_time_is_sampled`'s).
    let _ = read_profile(&dir.join("cpu.pb.gz"));
    let allocs = read_profile(&dir.join("allocs.pb.gz"));
    let sites = cumulative_value(&allocs, "alloc_objects");
    assert_eq!(
        sites.get("thread_main").copied().unwrap_or(0),
        2000,
        "with --mem-rate 1 the allocs profile must count each of the 2000 threads' one \
         allocation in thread_main: {sites:?}"
    );
}

/// Threads that live less than a sampling period are sampled in proportion to their CPU time
/// (issue 16.3): 10 000 threads, each using 0.3 or 0.6 ms of CPU in `short_a` or `short_b`,
/// get each function's CPU time within 10 % of what the threads measured with their own CPU
/// clocks, at 1000 Hz. Per-thread POSIX timers, serviced at the scheduler tick, give them
/// almost nothing (`--cpu-source timer`: 12 ms of short_a's 970); the perf source's hrtimer,
/// with each thread's first sample drawn over one period, gives each about 0.3 or 0.6 samples
/// of 1 ms.
///
/// Tolerance: `short_a` gets about 5000 × 0.3 = 1500 samples, a binomial count with a
/// standard deviation of √(5000 × 0.3 × 0.7) ≈ 32 (2.2 %). The profile reads 3 to 5 % low:
/// the threads' own measurement also holds what cannot be sampled — the handler's own time,
/// and kernel time (the events count user time, and a thread this short gets no later sample
/// to carry its kernel time). 10 % is then more than 2.2 standard deviations (short_b: more
/// than 3) away.
#[test]
fn short_lived_threads_cpu_time_is_sampled() {
    let scratch = scratch_dir("robust_short_threads");
    let exe = compile("short_threads.c", &["-O1", "-g", "-pthread"], &scratch);
    let (run, dir) = recorded(
        &scratch,
        "profile",
        &[
            "--cpu-source",
            "perf",
            "--cpu-hz",
            "1000",
            "--mem-rate",
            "0",
        ],
        &exe,
        &[],
    );
    assert_eq!(run.code, 0, "short_threads failed under record: {run:?}");
    let truth: BTreeMap<String, i64> = run
        .stdout_text()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(name, ns)| Some((name.to_string(), ns.parse().ok()?)))
        .collect();
    let view = read_profile(&dir.join("cpu.pb.gz"));
    let cpu = cumulative_value(&view, "cpu");
    let comments = view.comment_lines().join("\n");
    // The first few threads may start before anyprof's own thread runs (the program was
    // single-threaded until then) and get a timer; every other one a perf event.
    let with_events: u64 = comments
        .split("perf cpu-clock events given to ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        with_events >= 9990,
        "(nearly) every thread should have had a perf event here (root, \
         perf_event_paranoid <= 2): {comments}"
    );
    for function in ["short_a", "short_b"] {
        let want = truth[function] as f64;
        let got = cpu.get(function).copied().unwrap_or(0) as f64;
        assert!(
            (got - want).abs() <= 0.10 * want,
            "{function}: the threads measured {:.1} ms of CPU, the profile has {:.1} ms \
             (more than 10 % apart)\n{comments}\n{}",
            want / 1e6,
            got / 1e6,
            view.describe()
        );
    }
}

/// A thread that runs with every signal blocked (issue 16.3): the perf source queues one
/// real-time signal per period for it, and past the user's `RLIMIT_SIGPENDING` the kernel
/// would send `SIGIO` instead, ending the program. The background thread's watchdog moves such
/// a thread to a POSIX timer (one pending signal at most) within about 70 ms of CPU time, so
/// a second of blocked work at 1000 Hz leaves a few dozen signals queued, not a thousand; the
/// thread's CPU time still adds up, at the point where it unblocks.
#[test]
fn a_thread_that_blocks_the_signal_queues_few_signals_and_keeps_its_cpu_time() {
    let scratch = scratch_dir("robust_blocked_worker");
    let exe = compile("blocked_worker.c", &["-O1", "-g", "-pthread"], &scratch);
    let (run, dir) = recorded(
        &scratch,
        "profile",
        &[
            "--cpu-source",
            "perf",
            "--cpu-hz",
            "1000",
            "--mem-rate",
            "0",
        ],
        &exe,
        &[],
    );
    assert_eq!(run.code, 0, "blocked_worker failed under record: {run:?}");
    assert!(run.stdout_text().starts_with("done "), "{run:?}");
    let stderr = run.stderr_text();
    let number = |key: &str| -> i64 {
        stderr
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{key}` line from blocked_worker: {stderr}"))
    };
    let queued = number("queued ");
    assert!(
        (0..=500).contains(&queued),
        "{queued} signals were queued for this user while the worker ran a second with signals \
         blocked; without the watchdog it would be about 1000"
    );
    let view = read_profile(&dir.join("cpu.pb.gz"));
    let comments = view.comment_lines().join("\n");
    assert!(
        comments.contains("1 threads were moved to a timer because they ran 32 periods"),
        "the watchdog should have moved the worker to a timer: {comments}"
    );
    let want = number("worker_cpu ") as f64;
    let got = cumulative_value(&view, "cpu")
        .get("worker")
        .copied()
        .unwrap_or(0) as f64;
    assert!(
        (got - want).abs() <= 0.10 * want,
        "the worker used {:.0} ms of CPU, the profile has {:.0} ms in it\n{comments}\n{}",
        want / 1e6,
        got / 1e6,
        view.describe()
    );
}

/// A program that sandboxes itself once it runs (a seccomp filter on its main thread that
/// kills the process on `perf_event_open`, then new threads, which inherit it) keeps running
/// under the perf source: a thread under a filter is given a timer instead of opening an
/// event. Before the check it died of SIGSYS.
#[test]
fn a_program_that_sandboxes_itself_is_not_killed_by_the_perf_source() {
    let scratch = scratch_dir("robust_perf_sandbox");
    let exe = compile("perf_sandbox.c", &["-O1", "-g", "-pthread"], &scratch);
    let plain = direct(&exe, &[]);
    assert_eq!(plain.code, 0, "perf_sandbox itself failed: {plain:?}");
    let (profiled, dir) = recorded(
        &scratch,
        "profile",
        &[
            "--cpu-source",
            "perf",
            "--cpu-hz",
            "1000",
            "--mem-rate",
            "0",
        ],
        &exe,
        &[],
    );
    assert_same_behaviour("perf_sandbox under record", &plain, &profiled);
    let view = read_profile(&dir.join("cpu.pb.gz"));
    assert!(
        samples_of(&view, "sandboxed_work") > 0,
        "the sandboxed threads were not sampled:\n{}",
        view.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// 12. small stacks
// ---------------------------------------------------------------------------------------------

/// Runs `robust_tinystack MODE` directly and under record at 1000 Hz with every allocation
/// recorded: no crash, same output, samples.
fn check_tinystack(mode: &str) {
    let scratch = scratch_dir(&format!("robust_tinystack_{mode}"));
    let exe = compile(
        "robust_tinystack.c",
        &["-O1", "-g", "-pthread", "-ldl"],
        &scratch,
    );
    let plain = direct(&exe, &[mode]);
    assert_eq!(
        plain.code, 0,
        "robust_tinystack {mode} itself failed: {plain:?}"
    );
    let (profiled, dir) = recorded(
        &scratch,
        "profile",
        &["--cpu-hz", "1000", "--mem-rate", "1"],
        &exe,
        &[mode],
    );
    assert_same_behaviour(
        &format!("robust_tinystack {mode} under record"),
        &plain,
        &profiled,
    );
    // Threads made behind our back have no CPU timer of ours: their allocations are sampled.
    let file = if mode == "bypass" {
        "allocs.pb.gz"
    } else {
        "cpu.pb.gz"
    };
    let view = read_profile(&dir.join(file));
    assert!(!view.profile.sample.is_empty(), "no samples in {file}");
}

/// Threads on PTHREAD_STACK_MIN (16 KiB) stacks doing CPU work and mallocs: the sampling
/// signal handler and the malloc hook run on those stacks and must fit.
#[test]
fn tiny_thread_stacks_survive_sampling() {
    check_tinystack("threads");
}

/// The same on threads made behind our `pthread_create` interposer (libc's own, found with
/// dlsym): their stack bounds are unknown, and a malloc hook unwound them with checked
/// reads without knowing how much stack was left: framehop's ~12 KiB on a 16 KiB stack
/// overflowed it (SIGSEGV).
#[test]
fn tiny_stacks_of_threads_made_behind_our_back_survive_sampling() {
    check_tinystack("bypass");
}

/// CPU work and mallocs inside a SIGUSR1 handler running on a SIGSTKSZ sigaltstack: our
/// handler then runs on that small alternate stack too.
#[test]
fn cpu_work_in_a_sigaltstack_handler_survives_sampling() {
    check_tinystack("altstack");
}

/// posix_spawn and vfork+exec (no atfork handlers run in those children): same output and
/// exit statuses, and the exec'd programs are profiled as processes of their own, with the
/// content their ground truth says (`tests/programs/robust_spawn.c`): each self-started child's
/// profiles hold its CPU function's samples and its allocation site exactly (rate 1).
#[test]
fn posix_spawn_and_vfork_children_behave_the_same() {
    let scratch = scratch_dir("robust_spawn");
    let program = compile("robust_spawn.c", &["-O2", "-g"], &scratch);
    let plain = direct(&program, &[]);
    let (profiled, dir) = recorded(
        &scratch,
        "profile",
        &["--cpu-hz", "1000", "--mem-rate", "1"],
        &program,
        &[],
    );
    assert_same_behaviour("robust_spawn under record", &plain, &profiled);
    assert!(
        files_in(&dir)
            .iter()
            .any(|f| f.contains(".echo.") || f.contains(".sh.") || f.contains(".dash.")),
        "the spawned programs should have profiles of their own: {:?}",
        files_in(&dir)
    );
    // The children that are this program again: `cpu.PID.robust_spawn.pb.gz` and
    // `heap.PID.robust_spawn.pb.gz`, one pair each.
    let child_profiles = |kind: &str| -> Vec<ProfileView> {
        files_in(&dir)
            .iter()
            .filter(|f| f.starts_with(&format!("{kind}.")) && f.ends_with(".robust_spawn.pb.gz"))
            .map(|f| {
                anyprof::pprof::read_file(&dir.join(f))
                    .map(ProfileView::new)
                    .unwrap_or_else(|e| panic!("reading {f}: {e:#}"))
            })
            .collect()
    };
    let cpu = child_profiles("cpu");
    let heap = child_profiles("heap");
    for how in ["spawned", "vforked"] {
        // 0.2 s of CPU in spin_HOW: about 50 samples at the 250 Hz tick; ask for a fifth.
        let spin = format!("spin_{how}");
        let samples: Vec<i64> = cpu
            .iter()
            .map(|v| v.cumulative_samples().get(&spin).copied().unwrap_or(0))
            .collect();
        assert!(
            samples.iter().any(|&n| n >= 10),
            "the {how} child spent 0.2 s of CPU in {spin}: its CPU profile should hold at \
             least 10 samples there; per child CPU profile: {samples:?} (files: {:?})",
            files_in(&dir)
        );
        // Exactly 1000 mallocs at site_HOW, 100 of them live at exit.
        let site = format!("site_{how}");
        let found: Vec<[i64; 4]> = heap
            .iter()
            .filter_map(|v| v.heap_values_by_site().get(&site).copied())
            .collect();
        assert!(
            found.len() == 1 && found[0][0] == 1000 && found[0][2] == 100,
            "the {how} child made 1000 allocations at {site}, 100 live at exit: expected one \
             heap profile with [alloc_objects, _, inuse_objects, _] = [1000, _, 100, _] at \
             --mem-rate 1, found {found:?} (files: {:?})",
            files_in(&dir)
        );
    }
}

/// Writing profiles fails (here: the file-size limit, with SIGXFSZ ignored, stands in for a
/// full disk): anyprof says which file it could not write, and the profile an earlier run left
/// under that name is intact (profiles are written to a temporary file and renamed).
#[test]
fn a_failed_profile_write_is_reported_and_leaves_earlier_profiles_intact() {
    let scratch = scratch_dir("robust_full_disk");
    let dir = scratch.join("profile");
    std::fs::create_dir_all(&dir).expect("profile dir");
    let earlier = b"an earlier profile";
    std::fs::write(dir.join("cpu.pb.gz"), earlier).expect("earlier profile");
    let mut cmd = clean_command(binaries().anyprof);
    cmd.args(["record", "-q", "-o"])
        .arg(&dir)
        .args(["--cpu-hz", "100", "--", "/bin/true"]);
    // SAFETY: between fork and exec only async-signal-safe calls: setrlimit and signal.
    unsafe {
        cmd.pre_exec(|| {
            // Only the soft limit: the profiled program's preload sizes its shared memory
            // by raising it for a moment (a hard limit this low leaves it unprofiled).
            let limit = libc::rlimit {
                rlim_cur: 16,
                rlim_max: libc::RLIM_INFINITY,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = run_or_hang(&mut cmd, HANG_TIMEOUT);
    assert_ne!(out.code, 0, "a failed write must not look like success");
    assert!(
        out.stderr_text().contains("cannot write") && out.stderr_text().contains("cpu.pb.gz"),
        "the error should name the file it could not write: {}",
        out.stderr_text()
    );
    assert_eq!(
        std::fs::read(dir.join("cpu.pb.gz")).expect("earlier profile"),
        earlier
    );
    assert!(
        !files_in(&dir).iter().any(|f| f.ends_with(".tmp")),
        "no half-written temporary file is left behind: {:?}",
        files_in(&dir)
    );
}

/// Hostile streams to the daemon — garbage, a wrong magic, a huge length, a truncated and an
/// oversized message — end those connections only: the daemon keeps running and serves a
/// well-behaved process that connects afterwards.
#[test]
fn hostile_streams_end_their_connection_and_nothing_else() {
    use std::os::fd::AsRawFd;
    let scratch = scratch_dir("robust_hostile_stream");
    let (mut daemon, socket, port) = start_daemon(&scratch);
    let mut hello = vec![0u8; 256];
    let n = anyprof_wire::encode_hello(
        &mut hello,
        &anyprof_wire::HelloInfo {
            pid: 999_999,
            ppid: 1,
            cpu_hz: 100,
            timer: anyprof_wire::TimerKind::ThreadCpuTimer,
            mem_rate: 524_288,
            start_realtime_ns: 0,
            start_monotonic_ns: 0,
            exe: b"/nonexistent",
            cmdline: b"hostile",
        },
    )
    .expect("hello fits");
    hello.truncate(n);
    let mut huge_length = hello.clone();
    huge_length.extend_from_slice(&[0xff; 8]);
    let mut wrong_magic = hello.clone();
    wrong_magic[0] ^= 0xff;
    let streams: Vec<Vec<Vec<u8>>> = vec![
        vec![b"GET / HTTP/1.1\r\n\r\n".to_vec()],
        vec![wrong_magic],
        vec![
            hello.clone(),
            vec![0x41, 0x50, 0x52, 0x46, 1, 0, 9, 0, 0xff, 0xff, 0xff, 0xff],
        ],
        vec![hello.clone(), hello[..5].to_vec()],
        vec![hello.clone(), vec![7u8; 60_000]],
        vec![huge_length],
    ];
    for stream in &streams {
        let fd = nix_socket(&socket);
        for msg in stream {
            // SAFETY: `fd` is our connected socket; `msg` is a valid buffer.
            unsafe {
                libc::send(
                    fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    libc::MSG_NOSIGNAL,
                );
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        daemon.wait_timeout(Duration::from_millis(1)).is_none(),
        "the daemon died"
    );
    // A well-behaved process still gets served.
    let program = compile("serve_worker.c", &["-O2", "-g", "-pthread"], &scratch);
    let mut cmd = clean_command(&program);
    cmd.args(["10", "10"])
        .env("LD_PRELOAD", binaries().preload)
        .env("ANYPROF_SOCKET", &socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let good = Group::spawn(&mut cmd);
    let pid = good.pid();
    let listed = poll(Duration::from_secs(10), TICK, || {
        http_get(port, "/debug/pprof/", Duration::from_secs(2))
            .filter(|index| index.contains(&format!("<td>{pid}</td>")))
    });
    assert!(
        listed.is_some(),
        "a process connecting after the hostile streams was not served"
    );
    drop(good);
}

/// A connected SOCK_SEQPACKET socket to `path`.
fn nix_socket(path: &Path) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a zeroed sockaddr_un is valid; we fill family and path.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: `addr` is a valid sockaddr_un; `fd` is the socket created above.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// exec: by default the exec'd image is profiled too (both images are in the run's
/// `cpu.pb.gz`, and each gets a file of its own); with
/// `ANYPROF_EXEC=off` the library leaves `LD_PRELOAD` at start and the exec'd shell runs
/// without it. Output is the same either way.
#[test]
fn exec_is_profiled_or_not_as_configured() {
    let scratch = scratch_dir("robust_exec");
    let program = compile("robust_exec.c", &["-O2", "-g"], &scratch);
    let plain = direct(&program, &[]);
    let (profiled, dir) = recorded(&scratch, "default", &[], &program, &[]);
    assert_same_behaviour("robust_exec under record", &plain, &profiled);
    assert!(
        files_in(&dir)
            .iter()
            .any(|f| f.starts_with("cpu.") && f.contains(".robust_exec.")),
        "the image before exec should have its own profile: {:?}",
        files_in(&dir)
    );
    let (mut cmd, off_dir) = record_command(&scratch, "exec-off", &[], &program, &[]);
    cmd.env("ANYPROF_EXEC", "off");
    let off = run_or_hang(&mut cmd, HANG_TIMEOUT);
    assert_same_behaviour("robust_exec with ANYPROF_EXEC=off", &plain, &off);
    assert_eq!(
        files_in(&off_dir),
        ["allocs.pb.gz", "cpu.pb.gz", "heap.pb.gz"],
        "with ANYPROF_EXEC=off only the program itself is profiled"
    );
    let cpu = read_profile(&off_dir.join("cpu.pb.gz"));
    assert!(
        samples_of(&cpu, "work") > 0,
        "the program's own CPU is still profiled"
    );
}

/// A child forked by the raw system call (no atfork handler of ours runs in it, so it shares
/// its parent's region) that ends through `exit()` must not end its parent's profile: the
/// parent's 0.8 s of CPU after the child exited is in the profile.
#[test]
fn a_raw_forked_child_that_exits_does_not_end_its_parents_profile() {
    let scratch = scratch_dir("robust_raw_fork");
    let exe = compile("raw_fork_exit.c", &["-O1", "-g"], &scratch);
    let hz = 250;
    let recording = anyprof_tests::record(&scratch, hz, &exe, &[]);
    assert_eq!(
        recording.output.stdout_text(),
        "child exited 0\n",
        "stderr:\n{}",
        recording.output.stderr_text()
    );
    let view = recording.cpu_profile();
    let after = view.self_samples().get("burn").copied().unwrap_or(0).max(
        view.cumulative_samples()
            .get("burn_after_the_child")
            .copied()
            .unwrap_or(0),
    );
    // 0.8 s at 250 Hz is about 200 samples; a profile that ended with the child has none.
    assert!(
        after >= 100,
        "burn_after_the_child has {after} samples, expected about {}: the raw-forked child's \
         exit ended its parent's profile\n{}",
        (0.8 * f64::from(hz)) as i64,
        view.describe()
    );
}

/// Found by GLib's installed tests in the matrix, which run with TMPDIR in a scratch
/// directory: with a TMPDIR deep enough that `record`'s socket path did not fit in a socket
/// address (108 bytes), `record` failed with ENAMETOOLONG and the program never ran.
#[test]
fn a_deep_tmpdir_does_not_stop_the_program() {
    let scratch = scratch_dir("robust_deep_tmpdir");
    let deep = scratch.join("d".repeat(100));
    std::fs::create_dir_all(&deep).expect("creating the deep TMPDIR");
    let program = Path::new("/bin/sh");
    let args = ["-c", "echo hello; echo err >&2; exit 3"];
    let plain = direct(program, &args);
    let (mut cmd, dir) = record_command(&scratch, "profile", &[], program, &args);
    cmd.env_remove("XDG_RUNTIME_DIR").env("TMPDIR", &deep);
    let profiled = run_or_hang(&mut cmd, HANG_TIMEOUT);
    assert_same_behaviour("sh under a deep TMPDIR", &plain, &profiled);
    assert!(
        dir.join("heap.pb.gz").is_file(),
        "no profile written: {:?}",
        anyprof_tests::files_in(&dir)
    );
}

// ---------------------------------------------------------------------------------------------
// A stopped collector
// ---------------------------------------------------------------------------------------------

/// User + system CPU seconds of process `pid` so far, from `/proc/PID/stat`; `None` once it
/// is gone. The second value is its state letter (`Z` once it has exited).
fn process_cpu(pid: u32) -> Option<(f64, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((ticks / hz, state))
}

/// The collector (`anyprof record`) is stopped with SIGSTOP while the program runs on: the
/// program must go on and finish, the samples that found no room must be counted, and the
/// profile written once the collector goes on must show them as `[lost samples]`. (That the
/// program keeps its speed is `stopped_collector_does_not_slow_or_block_the_program`.) The program (`tests/programs/stopped_collector.c`)
/// samples at the deepest stacks (128 frames, ~1 KiB a sample), so the 4 MiB message ring and
/// the 512-slot sample ring hold about 4,000 samples: at the kernel's 250 Hz tick per thread,
/// about 16 CPU-seconds. The collector stays stopped until the program has spent 22.
#[test]
fn a_stopped_collector_loses_samples_counted_and_the_program_finishes() {
    // The rings filled up after ~4,000 samples (16 CPU-seconds) in a run on the test machine:
    // 22 leaves ~1,500 samples lost.
    const CPU_WHILE_STOPPED: f64 = 22.0;
    let _cpu = cpu_lock();
    let scratch = scratch_dir("robust_stopped_collector");
    let exe = compile(
        "stopped_collector.c",
        &["-O1", "-g", "-pthread", "-fno-omit-frame-pointer"],
        &scratch,
    );
    let flag = scratch.join("stop");
    let _ = std::fs::remove_file(&flag);
    let flag_arg = flag.to_string_lossy().into_owned();
    let (mut cmd, dir) = record_command(
        &scratch,
        "profile",
        &["--cpu-hz", "1000", "--mem-rate", "0"],
        &exe,
        &[&flag_arg, "4"],
    );
    let mut record = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting anyprof record");
    let record_pid = record.id();
    let (out_reader, err_reader) = capture_output(&mut record);
    // The program: record's child.
    let started = Instant::now();
    let program = loop {
        let children =
            std::fs::read_to_string(format!("/proc/{record_pid}/task/{record_pid}/children"))
                .unwrap_or_default();
        if let Some(pid) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
        {
            break pid;
        }
        assert!(
            started.elapsed() < HANG_TIMEOUT,
            "anyprof record started no program"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(300));
    let signal = |sig| {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(record_pid as libc::pid_t, sig) };
    };
    signal(libc::SIGSTOP);
    let (cpu_at_stop, _) = process_cpu(program).expect("the program runs");
    let stopped = Instant::now();
    let mut finished = false;
    while let Some((cpu, state)) = process_cpu(program) {
        if state == 'Z' {
            finished = true;
            break;
        }
        if cpu - cpu_at_stop >= CPU_WHILE_STOPPED && !flag.exists() {
            std::fs::write(&flag, b"").expect("write the flag file");
        }
        if stopped.elapsed() > Duration::from_secs(180) {
            signal(libc::SIGCONT);
            panic!(
                "with the collector stopped, the program did not finish within 180 s (CPU \
                 {cpu:.1} s, state {state}, flag written: {})",
                flag.exists()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopped_for = stopped.elapsed();
    signal(libc::SIGCONT);
    let status = record.wait().expect("waiting for anyprof record");
    let output = RunOutput {
        code: exit_code(status),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        wall: started.elapsed(),
    };
    let stderr = output.stderr_text();
    assert!(
        finished,
        "the program should finish (exit, a zombie until record reaps it) while the collector \
         is stopped; stderr:\n{stderr}"
    );
    assert_eq!(
        (output.code, output.stdout_text().as_str()),
        (0, "done\n"),
        "the program should run as without a profiler; stderr:\n{stderr}"
    );
    let view = anyprof::pprof::read_file(&dir.join("cpu.pb.gz"))
        .map(ProfileView::new)
        .unwrap_or_else(|e| panic!("no CPU profile: {e:#}\nstderr:\n{stderr}"));
    let lost = view
        .self_samples()
        .get(anyprof_tests::LOST_SAMPLES)
        .copied()
        .unwrap_or(0);
    assert!(
        lost > 0,
        "the collector was stopped for {stopped_for:?} while the program spent \
         {CPU_WHILE_STOPPED} CPU-seconds at 128-frame stacks: samples must have found no room, \
         and the profile must show them as `{}`; it shows {lost} ({} samples in all)\nstderr:\n\
         {stderr}",
        anyprof_tests::LOST_SAMPLES,
        view.total_samples()
    );
    eprintln!(
        "stopped for {stopped_for:?}: {lost} of {} samples lost",
        view.total_samples()
    );
}

// ---------------------------------------------------------------------------------------------
// 13. what a malloc hook may call
// ---------------------------------------------------------------------------------------------

/// A sampled allocation must not reach the dynamic loader, the file system or a locking libc
/// call (issue 14): `hook_reach` (see its header) counts the calls to `dl_iterate_phdr`,
/// `readlink`, `realpath` and `pthread_getattr_np` made while one of its mallocs is in
/// progress, at `--mem-rate 1`, from a thread made behind our `pthread_create` interposer
/// (unknown stack bounds) and from the constructor of a library being dlopen'ed (unknown to
/// the unwinder). Before the fix the hook learnt the thread's bounds with
/// `pthread_getattr_np` and caught up with the loader itself (4 such calls). The thread's
/// allocations must still have whole stacks (unwound with checked reads).
#[test]
fn a_sampled_allocation_reaches_no_loader_file_or_lock() {
    let scratch = scratch_dir("hook_reach");
    let plugin = compile(
        "hook_reach_plugin.c",
        &["-O1", "-g", "-shared", "-fPIC"],
        &scratch,
    );
    let exe = compile(
        "hook_reach.c",
        &["-O1", "-g", "-rdynamic", "-pthread", "-ldl"],
        &scratch,
    );
    let plugin_arg = plugin.to_str().expect("utf-8 path");
    let plain = direct(&exe, &[plugin_arg]);
    assert_eq!(
        (plain.code, plain.stdout_text()),
        (0, "forbidden calls from inside malloc: 0\n".to_string()),
        "hook_reach itself failed: {plain:?}"
    );
    let (profiled, dir) = recorded(
        &scratch,
        "profile",
        &["--cpu-hz", "0", "--mem-rate", "1"],
        &exe,
        &[plugin_arg],
    );
    assert_same_behaviour("hook_reach under record", &plain, &profiled);
    let view = read_profile(&dir.join("allocs.pb.gz"));
    let whole: i64 = view
        .profile
        .sample
        .iter()
        .filter(|s| {
            let names: Vec<&str> = view.frames(s).iter().map(|f| f.name).collect();
            names.starts_with(&["hook_reach_marked_alloc", "bypass_worker"])
        })
        .map(|s| view.heap_values(s)[0])
        .sum();
    assert_eq!(
        whole,
        200,
        "the allocations of the thread with unknown stack bounds have no stack through \
         bypass_worker:\n{}",
        view.describe()
    );
}

/// The checked reads that unwind a thread with unknown stack bounds from a malloc hook must
/// not use a system call a sandboxed program's seccomp filter does not expect: with
/// `process_vm_readv`, a program whose filter kills the process on it (systemd's
/// `SystemCallFilter=`, browser sandboxes) died of SIGSYS on its first sampled allocation on
/// such a thread (exit 159), at any `--mem-rate`. Its stacks must still be whole.
#[test]
fn a_sampled_allocation_keeps_to_the_programs_seccomp_filter() {
    let scratch = scratch_dir("seccomp_unwind");
    let exe = compile(
        "seccomp_unwind.c",
        &["-O1", "-g", "-pthread", "-ldl"],
        &scratch,
    );
    for (mode, rate) in [("kill", "1"), ("kill", "512KiB"), ("errno", "1")] {
        let plain = direct(&exe, &[mode]);
        assert_eq!(
            (plain.code, plain.stdout_text()),
            (0, "allocations: 2000\n".to_string()),
            "seccomp_unwind {mode} itself failed: {plain:?}"
        );
        let (profiled, dir) = recorded(
            &scratch,
            &format!("profile-{mode}-{rate}"),
            &["--cpu-hz", "0", "--mem-rate", rate],
            &exe,
            &[mode],
        );
        assert_same_behaviour(
            &format!("seccomp_unwind {mode} under record --mem-rate {rate}"),
            &plain,
            &profiled,
        );
        if rate != "1" {
            continue;
        }
        let view = read_profile(&dir.join("allocs.pb.gz"));
        let whole: i64 = view
            .profile
            .sample
            .iter()
            .filter(|s| view.frames(s).first().map(|f| f.name) == Some("seccomp_worker"))
            .map(|s| view.heap_values(s)[0])
            .sum();
        assert_eq!(
            whole,
            2000,
            "seccomp_unwind {mode}: the allocations of the thread with unknown stack bounds \
             have no stack through seccomp_worker:\n{}",
            view.describe()
        );
    }
}
