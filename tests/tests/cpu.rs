//! CPU profiles of programs whose CPU use is known: are the numbers right, are the stacks
//! complete, are the names and lines right, and can `go tool pprof` read the files?
//!
//! Each program is recorded once per test binary (see [`Shared`]) and checked by several
//! tests, one property each. Recording holds the [`cpu_lock`], so two recordings never compete
//! for the CPU. The programs and their ground truth are described in the headers of
//! `tests/programs/*.c{,pp}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyprof_tests::{
    clean_command, compile, cpu_lock, record, run, scratch_dir, ProfileView, Recording, Shared,
};

/// A program recorded once and the profile it produced.
struct Recorded {
    recording: Recording,
    view: ProfileView,
}

/// Compiles `source` with `flags`, records it at `hz` (holding the CPU lock) and checks that
/// the run itself went well.
fn compile_and_record(
    name: &str,
    source: &str,
    flags: &[&str],
    hz: u32,
    args: &[&str],
) -> Recorded {
    let scratch = scratch_dir(name);
    let exe = compile(source, flags, &scratch);
    let recording = {
        let _cpu = cpu_lock();
        record(&scratch, hz, &exe, args)
    };
    assert_eq!(
        recording.output.code,
        0,
        "`anyprof record -q -- {}` exited with {}, expected the program's 0\nstdout:\n{}\nstderr:\n{}",
        exe.display(),
        recording.output.code,
        recording.output.stdout_text(),
        recording.output.stderr_text()
    );
    let view = recording.cpu_profile();
    assert!(
        view.total_samples() > 0,
        "the profile of {name} has no samples\n{}",
        view.describe()
    );
    Recorded { recording, view }
}

/// Parses `key=value` fields of one line of a program's output.
fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|field| field.split_once('='))
        .collect()
}

fn parse_u64(fields: &BTreeMap<&str, &str>, key: &str, line: &str) -> u64 {
    fields
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric `{key}=` in the program's output line {line:?}"))
}

/// |actual - expected| as a fraction of expected.
fn relative_error(actual: f64, expected: f64) -> f64 {
    (actual - expected).abs() / expected
}

// ---------------------------------------------------------------------------------------------
// cpu_split.c: 50/30/20 over hot_a/hot_b/hot_c, no frame pointers.

/// Sampling rate of the cpu_split recording. Below CONFIG_HZ (250 on the test machines), the
/// kernel's cap for per-thread CPU timers, so the rate asked for is the rate delivered.
const CPU_SPLIT_HZ: u32 = 200;

/// Compile flags of cpu_split: optimised, with debug info, and without frame pointers, so
/// that the profiler has to unwind with DWARF CFI.
const CPU_SPLIT_FLAGS: &[&str] = &["-O2", "-g", "-fomit-frame-pointer"];

/// The hot functions of cpu_split and their share of its work, in percent.
const CPU_SPLIT_SHARES: &[(&str, f64)] = &[("hot_a", 50.0), ("hot_b", 30.0), ("hot_c", 20.0)];

static CPU_SPLIT: Shared<Recorded> = Shared::new();

fn cpu_split() -> &'static Recorded {
    CPU_SPLIT.get(|| {
        compile_and_record(
            "cpu_split",
            "cpu_split.c",
            CPU_SPLIT_FLAGS,
            CPU_SPLIT_HZ,
            &[],
        )
    })
}

/// Each hot function's share of the samples (counting every sample whose stack contains it)
/// must be within 3 percentage points of its share of the work.
///
/// Why 3 pp is safe: the run takes about 4.5 s of CPU, so at 200 Hz there are N ≈ 900 samples.
/// If samples fell at random times, a function's sample count would be binomial, and the
/// standard deviation of a share p is sqrt(p(1-p)/N) ≤ sqrt(0.25/900) ≈ 1.7 pp for the 50 %
/// share (1.5 pp for 30 %, 1.3 pp for 20 %). But the samples are not random: a CPU timer fires
/// every 5 ms of the process's CPU time, and the three functions run one after the other, so
/// each function's count is its CPU time divided by 5 ms, give or take one sample at each
/// phase boundary, plus the few samples in start-up code: the real spread is well under 1 pp.
/// A 3 pp miss means samples are attributed to the wrong function, lost, or taken at the
/// wrong rate in some phase.
#[test]
fn cpu_split_samples_split_50_30_20_over_the_hot_functions() {
    let rec = cpu_split();
    let view = &rec.view;
    let total = view.total_samples();
    let cumulative = view.cumulative_samples();
    let stdout = rec.recording.output.stdout_text();
    assert!(
        total >= 300,
        "only {total} samples (program output: {stdout:?}); the 3 pp tolerance assumes about \
         900 (4.5 s of CPU at {CPU_SPLIT_HZ} Hz)\n{}",
        view.describe()
    );
    let mut report = String::new();
    let mut failed = false;
    for &(function, expected) in CPU_SPLIT_SHARES {
        let count = cumulative.get(function).copied().unwrap_or(0);
        let share = 100.0 * count as f64 / total as f64;
        let miss = (share - expected).abs() > 3.0;
        failed |= miss;
        report.push_str(&format!(
            "  {function}: {count} of {total} samples = {share:.2} %, expected {expected} % ± 3{}\n",
            if miss { "   <-- out of range" } else { "" }
        ));
    }
    assert!(
        !failed,
        "cumulative sample shares of the hot functions are off:\n{report}program output: \
         {stdout:?}\n{}",
        view.describe()
    );
}

/// Without frame pointers, at least 99 % of the samples must still be unwound to the root
/// (`_start` or another root function, see `ROOT_FUNCTIONS`), through DWARF CFI.
#[test]
fn cpu_split_stacks_reach_the_root_without_frame_pointers() {
    let view = &cpu_split().view;
    let fraction = view.root_reached_fraction();
    assert!(
        fraction >= 0.99,
        "only {:.2} % of {} samples were unwound to a root function; root-most frames of the \
         others (with sample counts): {:?}\n{}",
        100.0 * fraction,
        view.total_samples(),
        view.unrooted_roots(),
        view.describe()
    );
}

/// Each hot function appears by name, with a file name ending in `cpu_split.c` and a line
/// number greater than 0.
#[test]
fn cpu_split_hot_functions_have_their_source_file_and_line() {
    let view = &cpu_split().view;
    for &(function, _) in CPU_SPLIT_SHARES {
        let frames: Vec<_> = view
            .profile
            .sample
            .iter()
            .flat_map(|s| view.frames(s))
            .filter(|f| f.name == function)
            .collect();
        assert!(
            !frames.is_empty(),
            "no frame named {function} in the profile\n{}",
            view.describe()
        );
        let good = frames
            .iter()
            .any(|f| f.filename.ends_with("cpu_split.c") && f.line > 0);
        let seen: Vec<(&str, i64)> = frames.iter().map(|f| (f.filename, f.line)).collect();
        assert!(
            good,
            "{function} never has a file name ending in cpu_split.c with a line > 0; \
             (file, line) pairs seen: {seen:?}"
        );
    }
}

/// The header fields of a CPU profile, as the contract (and Go) defines them.
#[test]
fn cpu_profile_declares_sample_types_and_period() {
    let view = &cpu_split().view;
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        view.sample_types(),
        vec![pair("samples", "count"), pair("cpu", "nanoseconds")],
        "sample_type"
    );
    assert_eq!(
        view.period_type(),
        Some(pair("cpu", "nanoseconds")),
        "period_type"
    );
    assert_eq!(
        view.profile.period,
        1_000_000_000 / i64::from(CPU_SPLIT_HZ),
        "period = 1e9 / hz"
    );
    for sample in &view.profile.sample {
        assert_eq!(sample.value.len(), 2, "values of a sample: {sample:?}");
    }
}

/// The ground truth behind the 50/30/20 claim, measured without the profiler: callgrind's
/// inclusive instruction counts of the three hot functions are 50/30/20 of their sum within
/// 1 percentage point. (Fails if valgrind is not installed; `.ci/run` installs it.)
#[test]
fn cpu_split_instruction_counts_split_50_30_20_under_callgrind() {
    assert!(
        Command::new("valgrind").arg("--version").output().is_ok(),
        "valgrind is not installed: apt-get install -y valgrind (.ci/run installs it)"
    );
    let scratch = scratch_dir("cpu_split_callgrind");
    let exe = compile("cpu_split.c", CPU_SPLIT_FLAGS, &scratch);
    let out_file = scratch.join("callgrind.out");
    let out = run(clean_command("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(&exe)
        .arg("10000000"));
    assert_eq!(out.code, 0, "valgrind failed:\n{}", out.stderr_text());
    let annotate = run(clean_command("callgrind_annotate")
        .arg("--inclusive=yes")
        .arg("--threshold=100")
        .arg(&out_file));
    assert_eq!(
        annotate.code,
        0,
        "callgrind_annotate failed:\n{}",
        annotate.stderr_text()
    );
    let text = annotate.stdout_text();
    let counts = inclusive_counts(&text);
    let found: Vec<u64> = CPU_SPLIT_SHARES
        .iter()
        .map(|&(function, _)| {
            *counts.get(function).unwrap_or_else(|| {
                panic!("no inclusive count for {function} in callgrind_annotate's output:\n{text}")
            })
        })
        .collect();
    let sum: u64 = found.iter().sum();
    for (&(function, expected), &count) in CPU_SPLIT_SHARES.iter().zip(&found) {
        let share = 100.0 * count as f64 / sum as f64;
        assert!(
            (share - expected).abs() <= 1.0,
            "{function}: {count} of {sum} instructions = {share:.3} %, expected {expected} % ± 1\n{text}"
        );
    }
}

/// Inclusive instruction counts by function name from `callgrind_annotate --inclusive=yes`,
/// whose lines look like `40,000,007 (49.92%)  /path/cpu_split.c:hot_a [/path/cpu_split]`.
fn inclusive_counts(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(Ok(count)) = words.next().map(|w| w.replace(',', "").parse::<u64>()) else {
            continue;
        };
        let Some(location) = words.find(|w| !w.starts_with('(')) else {
            continue;
        };
        if let Some((_, function)) = location.rsplit_once(':') {
            out.insert(function.to_string(), count);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// threads.c: four named threads with 1:2:3:4 units of work, each reporting its CPU time.

/// Sampling rate of the threads recording.
const THREADS_HZ: u32 = 100;

static THREADS: Shared<(Recorded, Vec<Worker>)> = Shared::new();

/// One worker thread as the program reported it.
#[derive(Debug, Clone)]
struct Worker {
    /// 1..=4: its name is `worker-<index>` and it did `index` units of work.
    index: u32,
    tid: i64,
    cpu_ns: u64,
}

fn threads() -> &'static (Recorded, Vec<Worker>) {
    THREADS.get(|| {
        let rec = compile_and_record(
            "threads",
            "threads.c",
            &["-O2", "-g", "-pthread"],
            THREADS_HZ,
            &[],
        );
        let stdout = rec.recording.output.stdout_text();
        let workers: Vec<Worker> = stdout
            .lines()
            .filter(|line| line.starts_with("worker-"))
            .map(|line| {
                let f = fields(line);
                let index = line["worker-".len()..]
                    .split_whitespace()
                    .next()
                    .and_then(|i| i.parse().ok())
                    .unwrap_or_else(|| panic!("bad worker line {line:?}"));
                Worker {
                    index,
                    tid: parse_u64(&f, "tid", line) as i64,
                    cpu_ns: parse_u64(&f, "cpu_ns", line),
                }
            })
            .collect();
        assert_eq!(workers.len(), 4, "expected 4 worker lines in {stdout:?}");
        (rec, workers)
    })
}

fn expected_samples(cpu_ns: u64, hz: u32) -> f64 {
    cpu_ns as f64 * f64::from(hz) / 1e9
}

/// Each thread's sample count (by `tid` label) is within 10 % of its own CPU time × hz. The
/// reference is the CPU time the thread measured itself, so load from other processes does not
/// matter. Each thread runs 0.5 s or more of CPU (≥ 50 samples), so one sample of timer
/// granularity is at most 2 %.
#[test]
fn threads_each_thread_gets_samples_for_its_own_cpu_time() {
    let (rec, workers) = threads();
    let by_tid = rec.view.samples_by_tid();
    let mut report = String::new();
    let mut failed = false;
    for w in workers {
        let count = by_tid.get(&w.tid).copied().unwrap_or(0);
        let expected = expected_samples(w.cpu_ns, THREADS_HZ);
        let err = relative_error(count as f64, expected);
        failed |= err > 0.10;
        report.push_str(&format!(
            "  worker-{} tid {}: {count} samples, expected {expected:.1} ({} ns CPU at {THREADS_HZ} Hz): off by {:.1} %{}\n",
            w.index,
            w.tid,
            w.cpu_ns,
            100.0 * err,
            if err > 0.10 { "   <-- more than 10 %" } else { "" }
        ));
    }
    assert!(
        !failed,
        "per-thread sample counts:\n{report}{}",
        rec.view.describe()
    );
}

/// The four workers' sample counts follow their 1:2:3:4 split of the work: worker-i has
/// i/10 of the workers' samples, within 10 % (relative).
#[test]
fn threads_sample_counts_follow_the_1_2_3_4_work_split() {
    let (rec, workers) = threads();
    let by_tid = rec.view.samples_by_tid();
    let counts: Vec<i64> = workers
        .iter()
        .map(|w| by_tid.get(&w.tid).copied().unwrap_or(0))
        .collect();
    let sum: i64 = counts.iter().sum();
    assert!(
        sum > 0,
        "no samples for any worker tid\n{}",
        rec.view.describe()
    );
    for (w, &count) in workers.iter().zip(&counts) {
        let share = count as f64 / sum as f64;
        let ideal = f64::from(w.index) / 10.0;
        assert!(
            relative_error(share, ideal) <= 0.10,
            "worker-{} has {count} of the workers' {sum} samples = {:.1} %, expected {:.0} % \
             ± 10 % (counts for worker-1..4: {counts:?}; reported CPU ns: {:?})\n{}",
            w.index,
            100.0 * share,
            100.0 * ideal,
            workers.iter().map(|w| w.cpu_ns).collect::<Vec<_>>(),
            rec.view.describe()
        );
    }
}

/// All samples of the process add up to hz × the workers' total CPU time, within 10 % (the
/// main thread only creates and joins them).
#[test]
fn threads_total_samples_match_rate_times_cpu_time() {
    let (rec, workers) = threads();
    let total = rec.view.total_samples();
    let cpu_ns: u64 = workers.iter().map(|w| w.cpu_ns).sum();
    let expected = expected_samples(cpu_ns, THREADS_HZ);
    assert!(
        relative_error(total as f64, expected) <= 0.10,
        "{total} samples in all, expected {expected:.1} ± 10 % ({cpu_ns} ns of worker CPU at \
         {THREADS_HZ} Hz)\n{}",
        rec.view.describe()
    );
}

/// The `cpu` values (measured thread CPU ns) of each thread's samples add up to the CPU time
/// the thread reported, within 5 %.
#[test]
fn threads_cpu_nanoseconds_per_thread_match_reported_cpu_time() {
    let (rec, workers) = threads();
    let cpu_by_tid = rec.view.cpu_ns_by_tid();
    for w in workers {
        let measured = cpu_by_tid.get(&w.tid).copied().unwrap_or(0);
        assert!(
            relative_error(measured as f64, w.cpu_ns as f64) <= 0.05,
            "worker-{} tid {}: the profile's cpu values add up to {measured} ns, the thread \
             reported {} ns: off by {:.1} % (limit 5 %)\n{}",
            w.index,
            w.tid,
            w.cpu_ns,
            100.0 * relative_error(measured as f64, w.cpu_ns as f64),
            rec.view.describe()
        );
    }
}

/// Every sample of a worker's tid carries its `thread` label `worker-<i>`, the name the
/// thread gave itself with pthread_setname_np.
#[test]
fn threads_samples_carry_the_thread_names() {
    let (rec, workers) = threads();
    let names = rec.view.thread_names_by_tid();
    for w in workers {
        let expected = format!("worker-{}", w.index);
        let got: Vec<&String> = names
            .get(&w.tid)
            .map(|s| s.iter().collect())
            .unwrap_or_default();
        assert!(
            got == [&expected],
            "tid {}: thread labels {got:?}, expected only {expected:?}\n{}",
            w.tid,
            rec.view.describe()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// inline.cpp: an always_inline hot loop inside a C++ method, called from a template.

/// Sampling rate of the inline recording.
const INLINE_HZ: u32 = 100;

static INLINE: Shared<Recorded> = Shared::new();

fn inline_cpp() -> &'static Recorded {
    INLINE.get(|| compile_and_record("inline", "inline.cpp", &["-O2", "-g"], INLINE_HZ, &[]))
}

/// Some sample's leaf Location has two or more Lines, the first (innermost) for the inlined
/// `inlined_hot_loop` and a later one for `Worker::run_batch`, the function it was inlined
/// into.
#[test]
fn inline_cpp_leaf_location_lists_the_inlined_function_before_its_caller() {
    let view = &inline_cpp().view;
    let leaves: Vec<Vec<&str>> = view
        .profile
        .sample
        .iter()
        .filter_map(|s| s.location_id.first())
        .map(|&id| {
            view.location_frames(view.location(id))
                .iter()
                .map(|f| f.name)
                .collect()
        })
        .collect();
    let found = leaves.iter().any(|lines| {
        lines.len() >= 2
            && lines[0].contains("inlined_hot_loop")
            && lines[1..]
                .iter()
                .any(|name| name.contains("Worker::run_batch"))
    });
    let mut distinct = leaves.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        found,
        "no leaf Location has Lines [..inlined_hot_loop.., .., ..Worker::run_batch..]; the \
         leaf Locations' Lines (innermost first) are: {distinct:#?}\n{}",
        view.describe()
    );
}

/// C++ names are demangled (`name` has `::` and does not start with `_Z`), the template
/// argument shows (`drive<unsigned long>`), and `system_name` keeps the mangled form.
#[test]
fn inline_cpp_function_names_are_demangled_and_system_names_mangled() {
    let view = &inline_cpp().view;
    let expected = [
        "anyprof_test::inlined_hot_loop",
        "anyprof_test::Worker::run_batch",
        "anyprof_test::drive<unsigned long>",
    ];
    for wanted in expected {
        let matching: Vec<(&str, &str)> = view
            .profile
            .function
            .iter()
            .map(|f| (view.string(f.name), view.string(f.system_name)))
            .filter(|(name, system)| name.contains(wanted) || system.contains(wanted))
            .collect();
        assert!(
            !matching.is_empty(),
            "no function whose name contains {wanted:?}; functions (name, system_name): {:?}\n{}",
            view.profile
                .function
                .iter()
                .map(|f| (view.string(f.name), view.string(f.system_name)))
                .collect::<Vec<_>>(),
            view.describe()
        );
        for (name, system_name) in matching {
            assert!(
                name.contains(wanted) && name.contains("::") && !name.starts_with("_Z"),
                "function name {name:?} (system_name {system_name:?}) is not the demangled \
                 form containing {wanted:?}"
            );
            assert!(
                system_name.starts_with("_Z"),
                "function {name:?} has system_name {system_name:?}; expected the mangled name \
                 (starting with _Z)"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// go tool pprof reads each profile.

/// Runs `go tool pprof <mode> <profile>` with HOME and PPROF_TMPDIR in a scratch directory and
/// no PPROF_BINARY_PATH; panics unless it exits 0. Returns its stdout.
fn go_tool_pprof(scratch: &Path, mode: &str, profile: &Path) -> String {
    let home = scratch.join("home");
    std::fs::create_dir_all(&home).expect("creating scratch HOME");
    let mut cmd = clean_command("go");
    cmd.args(["tool", "pprof", mode])
        .arg(profile)
        .env("HOME", &home)
        .env("PPROF_TMPDIR", scratch)
        .env_remove("PPROF_BINARY_PATH");
    let out = run(&mut cmd);
    assert_eq!(
        out.code,
        0,
        "`go tool pprof {mode} {}` exited with {}\nstdout:\n{}\nstderr:\n{}",
        profile.display(),
        out.code,
        out.stdout_text(),
        out.stderr_text()
    );
    out.stdout_text()
}

/// Checks that `go` exists (it must: CI installs it; a missing Go is a failure, not a skip),
/// then runs `go tool pprof -top` and `-traces` on `rec`'s profile and checks that -top names
/// each of `functions`.
fn check_go_tool_pprof(name: &str, rec: &Recorded, functions: &[&str]) {
    let go_version = Command::new("go").arg("version").output();
    assert!(
        go_version.as_ref().is_ok_and(|o| o.status.success()),
        "`go version` failed ({go_version:?}): the pprof compatibility tests need Go's \
         `go tool pprof`. Install it: apt-get install -y golang-go"
    );
    let profile: PathBuf = rec.recording.cpu_profile_path();
    let scratch = scratch_dir(&format!("go_pprof_{name}"));
    let _cpu = cpu_lock();
    let top = go_tool_pprof(&scratch, "-top", &profile);
    for function in functions {
        assert!(
            top.contains(function),
            "`go tool pprof -top {}` does not mention {function}:\n{top}",
            profile.display()
        );
    }
    let traces = go_tool_pprof(&scratch, "-traces", &profile);
    assert!(
        !traces.trim().is_empty(),
        "`go tool pprof -traces` printed nothing"
    );
}

#[test]
fn go_tool_pprof_reads_the_cpu_split_profile() {
    check_go_tool_pprof("cpu_split", cpu_split(), &["hot_a", "hot_b", "hot_c"]);
}

#[test]
fn go_tool_pprof_reads_the_threads_profile() {
    check_go_tool_pprof("threads", &threads().0, &["burn"]);
}

#[test]
fn go_tool_pprof_reads_the_inline_profile() {
    check_go_tool_pprof("inline", inline_cpp(), &["inlined_hot_loop", "run_batch"]);
}

/// The policy (`/proc/.../stat` field 41) and name of every thread of process `pid`.
fn thread_policies(pid: u32) -> Vec<(String, i32)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.ok()?.path().join("stat")).ok()?;
            let (head, tail) = stat.rsplit_once(") ")?;
            let name = head.split_once(" (")?.1.to_string();
            // Fields after the name start at field 3 (state); the policy is field 41.
            let policy = tail.split_whitespace().nth(41 - 3)?.parse().ok()?;
            Some((name, policy))
        })
        .collect()
}

/// Issue 14, point 4: while the program runs, the collector's thread that symbolizes ahead
/// runs at idle priority (the one reading the message ring does not: it must keep up), and
/// the profiles are written soon after the program exits, which `record` says. The bound
/// here is generous (a loaded CI machine); `make bench` measures the figure.
#[test]
fn collector_symbolizes_at_idle_priority_and_writes_soon_after_exit() {
    let scratch = scratch_dir("idle_priority");
    let demo = compile(
        "../../examples/demo.c",
        &["-O2", "-g", "-pthread"],
        &scratch,
    );
    let _cpu = cpu_lock();
    let mut anyprof = clean_command(anyprof_tests::binaries().anyprof)
        .args(["record", "-o"])
        .arg(scratch.join("profile"))
        .arg("--")
        .arg(&demo)
        .arg("2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting anyprof record");
    let mut seen: BTreeMap<String, i32> = BTreeMap::new();
    while anyprof.try_wait().expect("waiting for anyprof").is_none() {
        for (name, policy) in thread_policies(anyprof.id()) {
            seen.entry(name).or_insert(policy);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let output = anyprof.wait_with_output().expect("anyprof's output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stderr:\n{stderr}");
    assert_eq!(
        seen.get("warm-symbols"),
        Some(&libc::SCHED_IDLE),
        "threads seen: {seen:?}"
    );
    assert_eq!(seen.get("conn"), Some(&libc::SCHED_OTHER), "{seen:?}");
    let ms: u64 = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("anyprof: profiles written ")?
                .strip_suffix(" ms after the program exited")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no timing line in stderr:\n{stderr}"));
    assert!(ms < 2000, "profiles written {ms} ms after exit:\n{stderr}");
}
