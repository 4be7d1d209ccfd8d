//! `anyprof attach`: a CPU profile of a running process that was started without the
//! preload, from perf events. Is the split right, are the stacks whole, are threads started
//! while attached followed, does the program run on untouched, is the profile `record`'s
//! shape, does `go tool pprof` read it, and does each way of ending work?

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyprof_tests::{
    binaries, clean_command, compile, cpu_lock, record, run, scratch_dir, ProfileView, RunOutput,
};

/// Compile flags: no frame pointers, so reaching `main` takes DWARF CFI.
const FLAGS: &[&str] = &["-O2", "-g", "-fomit-frame-pointer", "-pthread"];

/// The main thread's hot functions and their share of its work, in percent.
const SHARES: &[(&str, f64)] = &[("hot_a", 50.0), ("hot_b", 30.0), ("hot_c", 20.0)];

/// The rate of the attach runs. perf's cpu-clock is an hrtimer, not the scheduler tick, so
/// 1000 Hz is delivered as asked; 3 s of the main thread's CPU then gives about 3000 samples,
/// and a share's binomial spread is at most sqrt(0.25/3000) = 0.9 points: a 3-point miss is
/// more than 3 standard deviations, and means samples are put in the wrong function.
const HZ: u32 = 1000;

/// The target, started bare (no preload, nothing of ours in its environment), once it said
/// "ready".
struct Target {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

fn start_target(exe: &Path, seconds: &str, late_ms: &str) -> Target {
    let mut child = clean_command(exe)
        .args([seconds, late_ms])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting attach_target");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("reading attach_target's first line");
    assert_eq!(line, "ready\n", "attach_target did not start");
    Target { child, stdout }
}

impl Target {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the end; the rest of its stdout, its stderr and its status.
    fn finish(mut self) -> (String, String, i32) {
        let mut rest = String::new();
        self.stdout
            .read_to_string(&mut rest)
            .expect("reading stdout");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err).expect("reading stderr");
        }
        let status = self.child.wait().expect("waiting for attach_target");
        (rest, err, anyprof_tests::exit_code(status))
    }
}

fn attach(pid: u32, hz: u32, out: &Path, extra: &[&str]) -> RunOutput {
    attach_then(pid, hz, out, extra, |_| {})
}

/// Runs `anyprof attach`, and calls `then` with its pid once it said it is profiling.
fn attach_then(pid: u32, hz: u32, out: &Path, extra: &[&str], then: impl FnOnce(u32)) -> RunOutput {
    let started = Instant::now();
    let mut anyprof = clean_command(binaries().anyprof)
        .arg("attach")
        .arg(pid.to_string())
        .args(["--cpu-hz", &hz.to_string(), "-o"])
        .arg(out)
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting anyprof attach");
    let mut stderr = BufReader::new(anyprof.stderr.take().expect("piped stderr"));
    let mut first = String::new();
    stderr
        .read_line(&mut first)
        .expect("reading anyprof's stderr");
    assert!(
        first.contains("profiling pid"),
        "anyprof attach did not start: {first}"
    );
    then(anyprof.id());
    let mut rest = String::new();
    stderr
        .read_to_string(&mut rest)
        .expect("reading anyprof's stderr");
    let status = anyprof.wait().expect("waiting for anyprof");
    RunOutput {
        code: anyprof_tests::exit_code(status),
        stdout: Vec::new(),
        stderr: (first + &rest).into_bytes(),
        wall: started.elapsed(),
    }
}

fn read(path: &Path, output: &RunOutput) -> ProfileView {
    let profile = anyprof::pprof::read_file(path).unwrap_or_else(|e| {
        panic!(
            "could not read {}: {e:#}\nexit code {}\nstderr:\n{}",
            path.display(),
            output.code,
            output.stderr_text()
        )
    });
    ProfileView::new(profile)
}

fn build(scratch: &Path) -> PathBuf {
    compile("attach_target.c", FLAGS, scratch)
}

/// The judge's case: a program without frame pointers, started without the preload,
/// profiled for 3 s while it runs; a thread it starts 1 s into the profile is followed.
#[test]
fn attach_splits_a_running_programs_cpu_and_leaves_it_running() {
    let scratch = scratch_dir("attach_split");
    let exe = build(&scratch);
    let _cpu = cpu_lock();
    let target = start_target(&exe, "6", "-1");
    let pid = target.pid();
    let out = scratch.join("cpu.pb.gz");
    let started = Instant::now();
    // Once anyprof says it is profiling, the target starts its late thread: a thread
    // created while attached, followed only if the events are inherited.
    let output = attach_then(pid, HZ, &out, &["--seconds", "3"], |_| {
        // SAFETY: kill with the pid of our own child.
        unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    });
    let took = started.elapsed();
    assert_eq!(
        output.code,
        0,
        "anyprof attach failed:\n{}",
        output.stderr_text()
    );
    assert!(
        took < Duration::from_secs(5),
        "anyprof attach --seconds 3 took {took:?}"
    );
    assert!(
        anyprof::attach::procfs::is_running(pid),
        "attach_target did not keep running after the profile was written"
    );
    let (rest, err, code) = target.finish();
    assert_eq!(
        (rest.as_str(), err.as_str(), code),
        ("done\n", "", 7),
        "the target's output or status changed"
    );

    let view = read(&out, &output);
    // The main thread's samples: its tid is the pid.
    let main_samples: Vec<_> = view
        .profile
        .sample
        .iter()
        .filter(|s| view.num_label(s, "tid") == Some(i64::from(pid)))
        .collect();
    let total: i64 = main_samples.iter().map(|s| view.count(s)).sum();
    // At most one sample per period of the thread's CPU time: a thread followed twice
    // (inherited and opened) would show twice as many.
    let most = (1.1 * f64::from(HZ) * 3.0) as i64;
    assert!(
        total <= most,
        "{total} samples of the main thread in 3 s at {HZ} Hz: more than {most}"
    );
    assert!(
        total >= 1500,
        "only {total} samples of the main thread in 3 s at {HZ} Hz\n{}",
        view.describe()
    );
    let mut report = String::new();
    let mut failed = false;
    for &(function, expected) in SHARES {
        let count: i64 = main_samples
            .iter()
            .filter(|s| view.frames(s).iter().any(|f| f.name == function))
            .map(|s| view.count(s))
            .sum();
        let share = 100.0 * count as f64 / total as f64;
        let miss = (share - expected).abs() > 3.0;
        failed |= miss;
        report.push_str(&format!(
            "  {function}: {count} of {total} = {share:.2} %, expected {expected} % ± 3{}\n",
            if miss { "   <-- out of range" } else { "" }
        ));
    }
    assert!(
        !failed,
        "the main thread's split is wrong:\n{report}{}",
        view.describe()
    );
    let to_main: i64 = main_samples
        .iter()
        .filter(|s| view.frames(s).iter().any(|f| f.name == "main"))
        .map(|s| view.count(s))
        .sum();
    assert!(
        to_main as f64 >= 0.95 * total as f64,
        "only {to_main} of {total} main-thread samples were unwound to main\n{}",
        view.describe()
    );
    // The thread started once the profile was under way.
    let late: i64 = view
        .profile
        .sample
        .iter()
        .filter(|s| {
            view.num_label(s, "tid")
                .is_some_and(|t| t != i64::from(pid))
        })
        .filter(|s| view.frames(s).iter().any(|f| f.name == "hot_late"))
        .map(|s| view.count(s))
        .sum();
    assert!(
        late >= 500,
        "the thread started while attached has {late} samples in hot_late (about 2500 \
         expected)\n{}",
        view.describe()
    );
    for s in &view.profile.sample {
        assert!(
            view.str_label(s, "thread").is_some() && view.num_label(s, "tid").is_some(),
            "a sample without thread/tid labels"
        );
    }
}

/// The same program under `record` and `attach`: the same sample types, period, labels
/// and function names.
#[test]
fn attach_profiles_have_records_shape() {
    let scratch = scratch_dir("attach_shape");
    let exe = build(&scratch);
    let _cpu = cpu_lock();
    let recorded = record(&scratch, 200, &exe, &["1", "300"]);
    assert_eq!(recorded.output.code, 7, "{}", recorded.output.stderr_text());
    let by_record = recorded.run_cpu_profile();

    let target = start_target(&exe, "3", "300");
    let out = scratch.join("attached.pb.gz");
    let output = attach(target.pid(), 200, &out, &["--seconds", "1"]);
    assert_eq!(output.code, 0, "{}", output.stderr_text());
    target.finish();
    let by_attach = read(&out, &output);

    assert_eq!(by_attach.sample_types(), by_record.sample_types());
    assert_eq!(by_attach.period_type(), by_record.period_type());
    assert_eq!(by_attach.profile.period, by_record.profile.period);
    let label_keys = |v: &ProfileView| -> std::collections::BTreeSet<String> {
        v.profile
            .sample
            .iter()
            .flat_map(|s| s.label.iter().map(|l| v.string(l.key).to_string()))
            .collect()
    };
    assert_eq!(label_keys(&by_attach), label_keys(&by_record));
    let hot = |v: &ProfileView| -> std::collections::BTreeSet<String> {
        v.cumulative_samples()
            .into_keys()
            .filter(|n| {
                n.starts_with("hot_")
                    || ["main", "run_rounds", "mid_b", "late_worker"].contains(&n.as_str())
            })
            .collect()
    };
    assert_eq!(
        hot(&by_attach),
        hot(&by_record),
        "attach and record name different functions"
    );
}

/// `go tool pprof` reads an attach profile (CI installs Go: a missing one is a failure).
#[test]
fn go_tool_pprof_reads_an_attach_profile() {
    let scratch = scratch_dir("attach_go_pprof");
    let exe = build(&scratch);
    let _cpu = cpu_lock();
    let target = start_target(&exe, "2", "100000");
    let out = scratch.join("cpu.pb.gz");
    let output = attach(target.pid(), HZ, &out, &["--seconds", "1"]);
    assert_eq!(output.code, 0, "{}", output.stderr_text());
    target.finish();
    let home = scratch.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut go = clean_command("go");
    go.args(["tool", "pprof", "-top"])
        .arg(&out)
        .env("HOME", &home)
        .env("PPROF_TMPDIR", &scratch);
    let top = run(&mut go);
    assert_eq!(
        top.code,
        0,
        "go tool pprof -top failed (install golang-go):\n{}",
        top.stderr_text()
    );
    assert!(
        top.stdout_text().contains("hot_a"),
        "go tool pprof -top does not name hot_a:\n{}",
        top.stdout_text()
    );
}

/// SIGTERM (and Ctrl-C) end the profile early, and it is still written.
#[test]
fn sigterm_ends_attach_early_and_writes_the_profile() {
    let scratch = scratch_dir("attach_sigterm");
    let exe = build(&scratch);
    let _cpu = cpu_lock();
    let target = start_target(&exe, "4", "100000");
    let out = scratch.join("cpu.pb.gz");
    let mut stopped = None;
    let output = attach_then(target.pid(), 100, &out, &["--seconds", "60"], |anyprof| {
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: kill with a pid we started.
        unsafe { libc::kill(anyprof as i32, libc::SIGTERM) };
        stopped = Some(Instant::now());
    });
    let stopped = stopped.expect("SIGTERM was sent");
    assert_eq!(
        output.code,
        0,
        "anyprof attach ended with {} on SIGTERM:\n{}",
        output.code,
        output.stderr_text()
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(3),
        "SIGTERM took {:?} to end the profile",
        stopped.elapsed()
    );
    target.finish();
    let profile = anyprof::pprof::read_file(&out).expect("the profile written on SIGTERM");
    let view = ProfileView::new(profile);
    assert!(
        view.total_samples() > 0,
        "the profile written on SIGTERM is empty"
    );
}

/// A target that exits during the profile: the profile ends with it, holds what was
/// collected, and anyprof says so.
#[test]
fn a_target_that_exits_during_the_profile_gets_what_was_collected() {
    let scratch = scratch_dir("attach_exit");
    let exe = build(&scratch);
    let _cpu = cpu_lock();
    let target = start_target(&exe, "2", "100000");
    let out = scratch.join("cpu.pb.gz");
    let started = Instant::now();
    let output = attach(target.pid(), HZ, &out, &["--seconds", "30"]);
    let (_, _, code) = target.finish();
    assert_eq!(code, 7);
    assert_eq!(output.code, 0, "{}", output.stderr_text());
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "attach did not end with its target"
    );
    assert!(
        output.stderr_text().contains("exited during the profile"),
        "anyprof did not say the target exited:\n{}",
        output.stderr_text()
    );
    let view = read(&out, &output);
    assert!(
        view.total_samples() > 0,
        "nothing collected before the target exited"
    );
}

/// A pid that is no process: one line saying so, exit status 2.
#[test]
fn attach_to_a_missing_pid_says_so() {
    // Above the largest pid Linux hands out (4194304).
    let output =
        run(clean_command(binaries().anyprof).args(["attach", "99999999", "--seconds", "1"]));
    assert_eq!(output.code, 2, "{}", output.stderr_text());
    let err = output.stderr_text();
    assert!(
        err.contains("no process with pid 99999999"),
        "the error does not say the process does not exist:\n{err}"
    );
    assert_eq!(err.lines().count(), 1, "more than one line:\n{err}");
}

/// An executable linked with lld (Rust's default linker on x86_64 Linux): its code shares a
/// page with a read-only segment, so the load bias must come from the executable segment, or
/// every address is a page off and named wrongly.
#[test]
fn attach_names_an_lld_linked_program() {
    let scratch = scratch_dir("attach_lld");
    let sysroot = run(Command::new("rustc").args(["--print", "sysroot"])).stdout_text();
    let gcc_ld = Path::new(sysroot.trim()).join("lib/rustlib/x86_64-unknown-linux-gnu/bin/gcc-ld");
    assert!(
        gcc_ld.join("ld.lld").exists(),
        "no rust-lld at {}",
        gcc_ld.display()
    );
    let b = format!("-B{}", gcc_ld.display());
    let mut flags = FLAGS.to_vec();
    flags.extend(["-fuse-ld=lld", b.as_str()]);
    let exe = compile("attach_target.c", &flags, &scratch);
    let _cpu = cpu_lock();
    let target = start_target(&exe, "3", "100000");
    let out = scratch.join("cpu.pb.gz");
    let output = attach(target.pid(), HZ, &out, &["--seconds", "1"]);
    assert_eq!(output.code, 0, "{}", output.stderr_text());
    target.finish();
    let view = read(&out, &output);
    let total = view.total_samples();
    let cumulative = view.cumulative_samples();
    // About 1000 samples: a share's spread is at most 1.6 points, so 5 is over 3 of them.
    for &(function, expected) in SHARES {
        let share = 100.0 * cumulative.get(function).copied().unwrap_or(0) as f64 / total as f64;
        assert!(
            (share - expected).abs() <= 5.0,
            "{function}: {share:.1} % of {total} samples, expected {expected} % ± 5\n{}",
            view.describe()
        );
    }
    let to_main = cumulative.get("main").copied().unwrap_or(0);
    assert!(
        to_main as f64 >= 0.95 * total as f64,
        "only {to_main} of {total} samples reach main\n{}",
        view.describe()
    );
}

/// A program that runs mostly in the vDSO (clock_gettime): its samples are unwound through
/// the vDSO's own tables (the kernel maps the same image into every process) to `main`.
#[test]
fn attach_unwinds_through_the_vdso() {
    let scratch = scratch_dir("attach_vdso");
    let exe = compile("attach_vdso.c", FLAGS, &scratch);
    let _cpu = cpu_lock();
    let mut child = clean_command(&exe)
        .arg("3")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting attach_vdso");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("reading attach_vdso's first line");
    assert_eq!(line, "ready\n");
    let out = scratch.join("cpu.pb.gz");
    let output = attach(child.id(), HZ, &out, &["--seconds", "1"]);
    let _ = child.wait();
    assert_eq!(output.code, 0, "{}", output.stderr_text());
    let view = read(&out, &output);
    let total = view.total_samples();
    let in_vdso: i64 = view
        .profile
        .sample
        .iter()
        .filter(|s| {
            view.frames(s)
                .first()
                .is_some_and(|f| f.name.contains("vdso"))
        })
        .map(|s| view.count(s))
        .sum();
    assert!(
        in_vdso as f64 >= 0.3 * total as f64,
        "only {in_vdso} of {total} samples are in the vDSO: the program is not what this \
         test is about\n{}",
        view.describe()
    );
    let to_main = view.cumulative_samples().get("main").copied().unwrap_or(0);
    assert!(
        to_main as f64 >= 0.95 * total as f64,
        "only {to_main} of {total} samples reach main: the walk stopped in the vDSO\n{}",
        view.describe()
    );
}

/// `attach --no-symbolize` on a host without debug information, then `anyprof symbolize`
/// where the binary is: the first profile has addresses, mappings and build ids only, and
/// the second names the hot functions.
#[test]
fn attach_no_symbolize_then_symbolize_names_the_profile() {
    let scratch = scratch_dir("attach_no_symbolize");
    let exe = build(&scratch);
    let _cpu = cpu_lock();
    let target = start_target(&exe, "3", "100000");
    let out = scratch.join("cpu.pb.gz");
    let output = attach(
        target.pid(),
        HZ,
        &out,
        &["--seconds", "1", "--no-symbolize"],
    );
    assert_eq!(output.code, 0, "{}", output.stderr_text());
    target.finish();
    let unnamed = read(&out, &output);
    assert!(unnamed.total_samples() > 0, "{}", unnamed.describe());
    assert!(
        unnamed.profile.function.is_empty(),
        "--no-symbolize wrote functions:\n{}",
        unnamed.describe()
    );
    let named_path = scratch.join("cpu.named.pb.gz");
    let symbolized = run(clean_command(binaries().anyprof)
        .arg("symbolize")
        .arg(&out)
        .arg("-o")
        .arg(&named_path));
    assert_eq!(symbolized.code, 0, "{}", symbolized.stderr_text());
    let named = read(&named_path, &symbolized);
    let cumulative = named.cumulative_samples();
    for &(function, _) in SHARES {
        assert!(
            cumulative.contains_key(function),
            "anyprof symbolize did not name {function}:\n{}",
            named.describe()
        );
    }
}
