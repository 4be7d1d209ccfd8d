//! Sudden death (issue 13, point 3): a process killed by SIGKILL, by the kernel's OOM killer,
//! or crashing, is profiled up to the moment it died, and a crash keeps its exit status and
//! core-dump behaviour.
//!
//! * SIGKILL, heap: `death_heap` builds a 64 MiB live set at one site (`build_live_set`: 8 MiB
//!   of blocks of 16 B..4 KiB and 56 blocks of 1 MiB, every byte touched), prints `ready`
//!   and sleeps; the test sends SIGKILL as soon as it reads that line. The heap profile must
//!   show ≥ 90 % of the live set at the site, and the exact allocator counters
//!   (`# HeapAlloc`) ≥ 90 % of it too. At `--mem-rate 1` the profile is exact. At the default
//!   rate it is Go's unbiased estimate, whose standard deviation σ for this live set the test
//!   computes from the block sizes (σ² = Σ s²·(1-p)/p, p = 1 - e^(-s/rate)); the bar is then
//!   90 % - 3σ, which a profile missing more than about a quarter of the set still fails,
//!   and an intact one passes but once in a million runs. Three rounds each, as a loss
//!   depends on when the kill lands.
//! * SIGKILL, CPU: `death_cpu` spins in `burn`; after one second of its CPU time the test
//!   reads the thread's CPU time from `/proc` and kills it. At the default 100 Hz, the samples
//!   in `burn` must be ≥ 90 % of (CPU time burnt × hz), less 3 samples: per-thread CPU timers
//!   fire every 1/hz of CPU time, so the count is not a Poisson draw but exact up to the timer
//!   phase at each end (1 sample each) and the 10 ms granularity of `/proc`'s CPU time (1
//!   sample). At `--cpu-hz 1000` the kernel tick caps the sample count, so there the `cpu`
//!   values (measured CPU nanoseconds) must cover ≥ 90 % of the thread's CPU time.
//! * OOM killer: `death_oom` grows at `grow_until_killed` (blocks of 1..4 MiB, touched)
//!   inside a fresh memory cgroup limited to 256 MiB until the kernel kills it. Its heap
//!   profile must show ≥ 85 % of the limit at that site (less 3σ at the default rate), and
//!   `anyprof record` must say on its stderr that the OOM killer ended it, and exit with 137.
//!   The report alone has its own test, which does not depend on the transport. The cgroup
//!   is made under cgroup v1's memory controller or cgroup v2 (whichever has the memory
//!   controller and is writable) and removed afterwards; without one the tests say why and
//!   skip.
//! * Crashes: `death_crash` allocates 100 known blocks at `before_crash` and dies of SIGSEGV
//!   or SIGABRT, run directly and as the child of `death_crash run`, which prints how its
//!   child died (signal and core-dump bit). With the same core limit in both runs (unlimited
//!   when the kernel writes cores as a plain file in the working directory, a scratch
//!   directory here; else 0), the program's view of its core limit and `PR_GET_DUMPABLE`,
//!   its exit status and the core-dump bit must be those of a run without the profiler,
//!   and its heap profile must hold the 100 blocks, exactly (`--mem-rate 1`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyprof_tests::{
    assert_same_run, binaries, clean_command, compile, exit_code, files_in, read_profile_in, run,
    scratch_dir, skip_outside_ci, ProfileView, RunOutput,
};

/// How long a step may take before the test gives up (a build of the live set, a run).
const DEADLINE: Duration = Duration::from_secs(90);

/// `death_heap`'s live set: 8 MiB of small blocks and 56 blocks of 1 MiB.
const SMALL_BYTES: u64 = 8 << 20;
const BIG_BLOCKS: u64 = 56;
const MIB: u64 = 1 << 20;

/// The default `--mem-rate` (512 KiB).
const DEFAULT_RATE: f64 = 524_288.0;

/// The memory limit of the OOM tests' cgroup.
const OOM_LIMIT: u64 = 256 << 20;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn send_signal(pid: i32, signal: libc::c_int) {
    // SAFETY: kill(2) takes two integers; the pid is one this test started (a process or,
    // negative, a process group).
    unsafe {
        libc::kill(pid, signal);
    }
}

/// `anyprof record` started in a process group of its own, killed with everything in it when
/// dropped.
struct Group {
    child: Child,
}

impl Drop for Group {
    fn drop(&mut self) {
        send_signal(-(self.child.id() as i32), libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=value` fields of a line.
fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|f| f.split_once('='))
        .collect()
}

fn field(line: &str, key: &str) -> u64 {
    fields(line)
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key}=N in the program's line {line:?}"))
}

/// `anyprof record -q -o DIR FLAGS -- program args`: a clean environment, stdin closed.
fn record_command(dir: &Path, flags: &[&str], program: &Path, args: &[&str]) -> Command {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let mut cmd = clean_command(binaries().anyprof);
    cmd.arg("record")
        .arg("-o")
        .arg(dir)
        .args(flags)
        .arg("--")
        .arg(program)
        .args(args);
    cmd
}

/// What a run killed by the test left.
struct Killed {
    output: RunOutput,
    /// The program's line the test waited for.
    line: String,
}

/// Starts `cmd` (an `anyprof record`) with stdout and stderr captured, waits for a line of
/// the program starting with `prefix` that holds `pid=N`, calls `before_kill(N, line)`, sends
/// SIGKILL to the program and waits for `anyprof record` to finish.
fn run_and_kill(cmd: &mut Command, prefix: &str, before_kill: impl FnOnce(i32, &str)) -> Killed {
    let description = format!("{cmd:?}");
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {description}: {e}"));
    let mut group = Group { child };
    let stdout = group.child.stdout.take().expect("stdout is piped");
    let mut stderr = group.child.stderr.take().expect("stderr is piped");
    let (lines_tx, lines) = mpsc::channel::<String>();
    let out_reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = lines_tx.send(line);
        }
        all
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let line = loop {
        match lines.recv_timeout(DEADLINE.saturating_sub(start.elapsed())) {
            Ok(line) if line.starts_with(prefix) => break line,
            Ok(_) => continue,
            Err(_) => {
                drop(group);
                panic!(
                    "{description} printed no line starting with {prefix:?} within {DEADLINE:?}\n\
                     stdout:\n{}\nstderr:\n{}",
                    out_reader.join().unwrap_or_default(),
                    String::from_utf8_lossy(&err_reader.join().unwrap_or_default())
                );
            }
        }
    };
    let pid = field(&line, "pid") as i32;
    before_kill(pid, &line);
    send_signal(pid, libc::SIGKILL);
    let status = loop {
        match group.child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > DEADLINE => {
                drop(group);
                panic!(
                    "{description} did not finish within {DEADLINE:?} after its program was killed"
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for {description}: {e}"),
        }
    };
    let output = RunOutput {
        code: exit_code(status),
        stdout: out_reader.join().unwrap_or_default().into_bytes(),
        stderr: err_reader.join().unwrap_or_default(),
        wall: start.elapsed(),
    };
    drop(group);
    Killed { output, line }
}

/// The `# Name = value` comments of a profile that are numbers.
fn numeric_comments(view: &ProfileView) -> BTreeMap<String, i64> {
    view.comments()
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.trim().parse().ok()?)))
        .collect()
}

/// `[alloc_objects, alloc_space, inuse_objects, inuse_space]` of allocation site `site`.
fn site_values(view: &ProfileView, site: &str) -> [i64; 4] {
    view.heap_values_by_site()
        .get(site)
        .copied()
        .unwrap_or_default()
}

/// The standard deviation of the heap profile's byte estimate of blocks of `sizes` at mean
/// sampling distance `rate` (Go's sampling: a block of s bytes is sampled with probability
/// p = 1 - e^(-s/rate) and then counts s/p).
fn estimate_sd(sizes: impl Iterator<Item = u64>, rate: f64) -> f64 {
    sizes
        .map(|s| {
            let s = s as f64;
            let p = 1.0 - (-s / rate).exp();
            s * s * (1.0 - p) / p
        })
        .sum::<f64>()
        .sqrt()
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / MIB as f64)
}

/// The OOM line `anyprof record` prints for a program, if any.
fn oom_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("was killed by the kernel's OOM killer"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// SIGKILL: heap
// ---------------------------------------------------------------------------------------------

/// Kills `death_heap` right after it built its live set, `rounds` times under `flags`, and
/// checks each heap profile (module doc). `rate` is the mean sampling distance in force.
fn check_heap_after_sigkill(name: &str, flags: &[&str], rate: f64) {
    let scratch = scratch_dir(name);
    let exe = compile("death_heap.c", &["-O1", "-g"], &scratch);
    let args = [SMALL_BYTES.to_string(), BIG_BLOCKS.to_string()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for round in 1..=3 {
        let dir = scratch.join(format!("round{round}"));
        let mut cmd = record_command(&dir, &[&["-q"], flags].concat(), &exe, &args);
        let killed = run_and_kill(&mut cmd, "ready", |_, _| {});
        let out = &killed.output;
        assert_eq!(
            out.code,
            128 + libc::SIGKILL,
            "anyprof record must exit with 137 when its program is killed by SIGKILL\n\
             stderr:\n{}",
            out.stderr_text()
        );
        assert!(
            oom_lines(&out.stderr_text()).is_empty(),
            "a program killed by the test's SIGKILL was reported as OOM-killed:\n{}",
            out.stderr_text()
        );
        let small_objects = field(&killed.line, "small_objects");
        let truth = field(&killed.line, "small_bytes") + field(&killed.line, "big_bytes");
        let sizes = (0..small_objects)
            .map(|i| 16u64 << (i % 9))
            .chain((0..BIG_BLOCKS).map(|_| MIB));
        let sd = if rate <= 1.0 {
            0.0
        } else {
            estimate_sd(sizes, rate)
        };
        let bar = 0.9 * truth as f64 - 3.0 * sd;
        let view = read_profile_in(&dir, "heap.pb.gz", out);
        let inuse = site_values(&view, "build_live_set")[3];
        let heap_alloc = numeric_comments(&view).get("HeapAlloc").copied();
        let line = format!(
            "round {round}: inuse_space at build_live_set {} of the live set's {} ({:.1} %; \
             bar {} = 90 % - 3 sd, sd {}); # HeapAlloc {} (bar 90 % = {})",
            mib(inuse as f64),
            mib(truth as f64),
            100.0 * inuse as f64 / truth as f64,
            mib(bar),
            mib(sd),
            heap_alloc.map_or_else(
                || "missing (no allocator counters reached the collector)".into(),
                |h| mib(h as f64)
            ),
            mib(0.9 * truth as f64),
        );
        if (inuse as f64) < bar {
            failures.push(format!(
                "{line}\n  heap profile (sites: [alloc_objects, alloc_space, inuse_objects, \
                 inuse_space]): {:?}",
                view.heap_values_by_site()
            ));
        } else if heap_alloc.is_none_or(|h| (h as f64) < 0.9 * truth as f64) {
            failures.push(format!(
                "{line}\n  the exact counters must show the live set too: comments {:?}",
                numeric_comments(&view)
            ));
        }
        report.push(line);
    }
    assert!(
        failures.is_empty(),
        "death_heap killed by SIGKILL right after building its live set (flags {flags:?}): \
         the profile lost what was live at death in {} of 3 rounds:\n{}\nall rounds:\n{}",
        failures.len(),
        failures.join("\n"),
        report.join("\n")
    );
    eprintln!("{}", report.join("\n"));
}

#[test]
fn sigkill_right_after_building_a_64_mib_live_set_keeps_it_at_rate_1() {
    check_heap_after_sigkill(
        "death_heap_rate1",
        &["--cpu-hz", "1000", "--mem-rate", "1"],
        1.0,
    );
}

#[test]
fn sigkill_right_after_building_a_64_mib_live_set_keeps_it_at_the_default_rate() {
    check_heap_after_sigkill("death_heap_default", &[], DEFAULT_RATE);
}

// ---------------------------------------------------------------------------------------------
// SIGKILL: CPU
// ---------------------------------------------------------------------------------------------

/// CPU time (user + system) of thread `tid` of process `pid` from `/proc`, in nanoseconds
/// (granularity: one clock tick, `sysconf(_SC_CLK_TCK)`).
fn thread_cpu_ns(pid: i32, tid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After "(comm) ": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 1_000_000_000 / clock_ticks())
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf takes an integer and returns one.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).unwrap_or(100).max(1)
}

/// Records `death_cpu` under `flags`, kills it after one second of its CPU time, and returns
/// the profile, the thread's CPU time at the kill (ns), the CPU time it had before `burn`
/// (ns) and its pid.
fn burn_and_kill(name: &str, flags: &[&str]) -> (ProfileView, u64, u64, i64) {
    let scratch = scratch_dir(name);
    let exe = compile("death_cpu.c", &["-O1", "-g"], &scratch);
    let dir = scratch.join("profile");
    let mut cmd = record_command(&dir, &[&["-q"], flags].concat(), &exe, &[]);
    let mut at_kill = 0;
    let killed = run_and_kill(&mut cmd, "burning", |pid, _| {
        let start = Instant::now();
        loop {
            let cpu = thread_cpu_ns(pid, pid).unwrap_or_else(|| {
                panic!("cannot read /proc/{pid}/task/{pid}/stat of the burning program")
            });
            at_kill = cpu;
            if cpu >= 1_000_000_000 {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "death_cpu got only {cpu} ns of CPU in {DEADLINE:?}: the machine is too busy"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let out = &killed.output;
    assert_eq!(
        out.code,
        128 + libc::SIGKILL,
        "anyprof record must exit with 137 when its program is killed by SIGKILL\nstderr:\n{}",
        out.stderr_text()
    );
    assert!(
        oom_lines(&out.stderr_text()).is_empty(),
        "a program killed by the test's SIGKILL was reported as OOM-killed:\n{}",
        out.stderr_text()
    );
    let view = read_profile_in(&dir, "cpu.pb.gz", out);
    let before = field(&killed.line, "cpu_ns");
    let pid = field(&killed.line, "pid") as i64;
    (view, at_kill, before, pid)
}

/// Samples of thread `tid` with `function` on the stack.
fn samples_in(view: &ProfileView, tid: i64, function: &str) -> i64 {
    view.profile
        .sample
        .iter()
        .filter(|s| view.num_label(s, "tid") == Some(tid))
        .filter(|s| view.frames(s).iter().any(|f| f.name == function))
        .map(|s| view.count(s))
        .sum()
}

#[test]
fn sigkill_during_a_cpu_burn_keeps_its_cpu_samples() {
    let hz = 100.0;
    let (view, at_kill, before, pid) = burn_and_kill("death_cpu_default", &[]);
    let burnt = at_kill.saturating_sub(before);
    let expected = burnt as f64 * hz / 1e9;
    let bar = 0.9 * expected - 3.0;
    let got = samples_in(&view, pid, "burn");
    eprintln!(
        "death_cpu: {got} samples in burn, expected {expected:.1} ({burnt} ns at {hz} Hz), \
         bar {bar:.1}; cpu values of the thread: {:?} ns of {at_kill} ns",
        view.cpu_ns_by_tid().get(&pid)
    );
    assert!(
        got as f64 >= bar,
        "death_cpu killed by SIGKILL while burning: {got} samples in burn, expected at least \
         {bar:.1} = 90 % of {expected:.1} ({burnt} ns of CPU in burn at {hz} Hz) less 3 \
         (timer phase at both ends, /proc's tick): the samples of its last moments were \
         lost\n{}",
        view.describe()
    );
    let cpu_ns = view.cpu_ns_by_tid().get(&pid).copied().unwrap_or(0);
    assert!(
        cpu_ns as f64 >= 0.9 * at_kill as f64 - 3e9 / hz,
        "death_cpu's samples account for {cpu_ns} ns of CPU, the thread had {at_kill} ns when \
         it was killed: less than 90 % (less 3 periods)\n{}",
        view.describe()
    );
}

#[test]
fn sigkill_during_a_cpu_burn_at_1000_hz_keeps_its_cpu_time() {
    let (view, at_kill, _, pid) =
        burn_and_kill("death_cpu_1000", &["--cpu-hz", "1000", "--mem-rate", "1"]);
    let cpu_ns = view.cpu_ns_by_tid().get(&pid).copied().unwrap_or(0);
    let in_burn = samples_in(&view, pid, "burn");
    eprintln!("death_cpu at 1000 Hz: {in_burn} samples in burn, {cpu_ns} ns of {at_kill} ns");
    // The kernel tick (often 250 Hz) caps the count; 3 of its periods of slack.
    let bar = 0.9 * at_kill as f64 - 3.0 * 4e6;
    assert!(
        cpu_ns as f64 >= bar && in_burn > 0,
        "death_cpu killed by SIGKILL at --cpu-hz 1000: its samples account for {cpu_ns} ns \
         of CPU ({in_burn} samples in burn), the thread had {at_kill} ns when it was killed; \
         expected ≥ {bar:.0} (90 % less 3 ticks of 4 ms)\n{}",
        view.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// OOM killer
// ---------------------------------------------------------------------------------------------

/// A memory cgroup made for one test, removed when dropped.
struct TestCgroup {
    dir: PathBuf,
    /// Its directory name (the last part of the path the kernel gives it).
    name: String,
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Its processes are gone (killed, reaped by `anyprof record`); the kernel may take a
        // moment to let go of the cgroup.
        for _ in 0..200 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "warning: could not remove the test's memory cgroup {}",
            self.dir.display()
        );
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {text:?} to {}: {e}", path.display()))
}

/// Makes a memory cgroup limited to `limit` bytes (no swap), or says why none can be made.
fn memory_cgroup(tag: &str, limit: u64) -> Result<TestCgroup, String> {
    static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "anyprof-test-{tag}-{}-{}",
        std::process::id(),
        COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let v1 = Path::new("/sys/fs/cgroup/memory");
    let v2 = Path::new("/sys/fs/cgroup");
    let v2_controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    let (base, v1_mode) = if v1.join("memory.limit_in_bytes").exists() {
        (v1, true)
    } else if v2_controllers.split_whitespace().any(|c| c == "memory") {
        let subtree =
            std::fs::read_to_string(v2.join("cgroup.subtree_control")).unwrap_or_default();
        if !subtree.split_whitespace().any(|c| c == "memory") {
            return Err(format!(
                "cgroup v2 at {} does not hand the memory controller to its children \
                 (cgroup.subtree_control: {subtree:?}); enable it with \
                 `echo +memory > {}/cgroup.subtree_control`",
                v2.display(),
                v2.display()
            ));
        }
        (v2, false)
    } else {
        return Err(
            "no memory controller: neither /sys/fs/cgroup/memory (cgroup v1) nor \
             /sys/fs/cgroup/cgroup.controllers with `memory` (cgroup v2)"
                .into(),
        );
    };
    let dir = base.join(&name);
    std::fs::create_dir(&dir).map_err(|e| {
        format!(
            "cannot create a memory cgroup {} ({e}); run the tests as root with a writable \
             cgroup file system",
            dir.display()
        )
    })?;
    let cgroup = TestCgroup { dir, name };
    if v1_mode {
        write_file(
            &cgroup.dir.join("memory.limit_in_bytes"),
            &limit.to_string(),
        )?;
        let memsw = cgroup.dir.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write_file(&memsw, &limit.to_string())?;
        }
    } else {
        write_file(&cgroup.dir.join("memory.max"), &limit.to_string())?;
        let swap = cgroup.dir.join("memory.swap.max");
        if swap.exists() {
            write_file(&swap, "0")?;
        }
    }
    Ok(cgroup)
}

/// `anyprof record [-q] FLAGS -- sh -c '…' sh CGROUP PROGRAM ARGS`: the shell moves itself into
/// the cgroup, then becomes the program.
fn record_in_cgroup(
    dir: &Path,
    flags: &[&str],
    cgroup: &TestCgroup,
    program: &Path,
    args: &[&str],
) -> Command {
    let mut all = vec![
        "-c",
        r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#,
        "sh",
        cgroup.dir.to_str().expect("UTF-8 cgroup path"),
        program.to_str().expect("UTF-8 program path"),
    ];
    all.extend(args);
    record_command(dir, flags, Path::new("/bin/sh"), &all)
}

/// Whether the test can make a memory cgroup; if not, prints why the test is skipped.
fn cgroup_or_skip(tag: &str) -> Option<TestCgroup> {
    match memory_cgroup(tag, OOM_LIMIT) {
        Ok(c) => Some(c),
        Err(why) => {
            skip_outside_ci(&format!(
                "it needs a memory cgroup to run a program in: {why}"
            ));
            None
        }
    }
}

/// Checks that `anyprof record`'s stderr has exactly one OOM line for `pid` naming the
/// program, the cgroup and the limit.
fn assert_oom_reported(out: &RunOutput, pid: u64, cgroup: &TestCgroup) {
    let stderr = out.stderr_text();
    let lines = oom_lines(&stderr);
    let start = format!(
        "anyprof: process {pid} (death_oom) was killed by the kernel's OOM killer (memory \
         cgroup "
    );
    let end = format!("/{}, limit 256 MiB)", cgroup.name);
    assert!(
        lines.len() == 1 && lines[0].starts_with(&start) && lines[0].ends_with(&end),
        "anyprof record must say in one line that the OOM killer ended the program: \
         expected a line `{start}…{end}`; its stderr:\n{stderr}"
    );
    assert_eq!(
        out.code,
        128 + libc::SIGKILL,
        "anyprof record must exit with the program's status, 137 (killed by SIGKILL)\n\
         stderr:\n{stderr}"
    );
}

/// Runs `death_oom` in a 256 MiB cgroup under `flags` and checks the live heap at death.
fn check_oom_heap(name: &str, flags: &[&str], rate: f64) {
    let Some(cgroup) = cgroup_or_skip(name) else {
        return;
    };
    let scratch = scratch_dir(name);
    let exe = compile("death_oom.c", &["-O1", "-g"], &scratch);
    let dir = scratch.join("profile");
    let mut cmd = record_in_cgroup(&dir, &[&["-q"], flags].concat(), &cgroup, &exe, &["4096"]);
    let out = run(&mut cmd);
    let pid = out
        .stdout_text()
        .lines()
        .find(|l| l.starts_with("growing"))
        .map(|l| field(l, "pid"))
        .unwrap_or_else(|| {
            panic!(
                "death_oom printed no `growing pid=N` line (exit {}):\nstdout:\n{}\nstderr:\n{}",
                out.code,
                out.stdout_text(),
                out.stderr_text()
            )
        });
    assert_oom_reported(&out, pid, &cgroup);
    // What was live at death is at most the limit; its blocks are 1, 2, 3, 4, 1, ... MiB.
    let mut sizes = Vec::new();
    let mut total = 0;
    for i in 0.. {
        let size = (i % 4 + 1) * MIB;
        if total + size > OOM_LIMIT {
            break;
        }
        total += size;
        sizes.push(size);
    }
    let sd = if rate <= 1.0 {
        0.0
    } else {
        estimate_sd(sizes.into_iter(), rate)
    };
    let bar = 0.85 * OOM_LIMIT as f64 - 3.0 * sd;
    let view = read_profile_in(&dir, "heap.pb.gz", &out);
    let inuse = site_values(&view, "grow_until_killed")[3];
    assert!(
        inuse as f64 >= bar,
        "death_oom, killed by the OOM killer in a {} cgroup (flags {flags:?}): its heap \
         profile shows {} in use at grow_until_killed, expected at least {} (85 % of the \
         limit less 3 sd of the sampling estimate, sd {}): what was live at death was lost.\n\
         sites [alloc_objects, alloc_space, inuse_objects, inuse_space]: {:?}\ncomments: {:?}",
        mib(OOM_LIMIT as f64),
        mib(inuse as f64),
        mib(bar),
        mib(sd),
        view.heap_values_by_site(),
        numeric_comments(&view)
    );
}

#[test]
fn oom_killed_program_shows_its_live_heap_at_death_at_the_default_rate() {
    check_oom_heap("death_oom_default", &[], DEFAULT_RATE);
}

#[test]
fn oom_killed_program_shows_its_live_heap_at_death_at_rate_1() {
    check_oom_heap(
        "death_oom_rate1",
        &["--cpu-hz", "1000", "--mem-rate", "1"],
        1.0,
    );
}

/// The report alone (it does not depend on how the data travels): one line on `anyprof
/// record`'s stderr, with `-q` too, a note in the summary without it, the program's exit
/// status; and no such line for a SIGKILL that did not come from the OOM killer, in a
/// cgroup that has seen an OOM kill before.
#[test]
fn oom_kill_is_reported_on_records_stderr_and_in_its_summary() {
    let Some(cgroup) = cgroup_or_skip("oom_report") else {
        return;
    };
    let scratch = scratch_dir("death_oom_report");
    let exe = compile("death_oom.c", &["-O1", "-g"], &scratch);
    for quiet in [true, false] {
        let dir = scratch.join(if quiet { "quiet" } else { "summary" });
        let flags: &[&str] = if quiet { &["-q"] } else { &[] };
        let out = run(&mut record_in_cgroup(&dir, flags, &cgroup, &exe, &["4096"]));
        let pid = out
            .stdout_text()
            .lines()
            .find(|l| l.starts_with("growing"))
            .map(|l| field(l, "pid"))
            .unwrap_or_else(|| panic!("death_oom printed no `growing pid=N` line: {out:?}"));
        assert_oom_reported(&out, pid, &cgroup);
        if !quiet {
            let stderr = out.stderr_text();
            assert!(
                stderr.contains("anyprof: the kernel's OOM killer ended it: heap.pb.gz shows"),
                "the summary must say the OOM killer ended the program; stderr:\n{stderr}"
            );
        }
    }

    // A SIGKILL from the test, in the same cgroup (whose OOM-kill count is not 0 now).
    let heap_exe = compile("death_heap.c", &["-O1", "-g"], &scratch);
    let dir = scratch.join("sigkill");
    let mut cmd = record_in_cgroup(&dir, &["-q"], &cgroup, &heap_exe, &["1048576", "0"]);
    // Killed a while after it is ready: `anyprof record` has seen it in the cgroup by then
    // (it could not tell this SIGKILL from an OOM kill of a process it never saw there, while
    // the other tests' OOM kills raise the kernel's count).
    let killed = run_and_kill(&mut cmd, "ready", |_, _| {
        std::thread::sleep(Duration::from_millis(300))
    });
    assert_eq!(killed.output.code, 128 + libc::SIGKILL);
    assert!(
        oom_lines(&killed.output.stderr_text()).is_empty(),
        "a program killed by the test's SIGKILL in a cgroup that had an OOM kill before was \
         reported as OOM-killed:\n{}",
        killed.output.stderr_text()
    );
}

// ---------------------------------------------------------------------------------------------
// Crashes
// ---------------------------------------------------------------------------------------------

/// The core limit both runs get: unlimited when the kernel writes a core as a plain file in
/// the crashing process's working directory (a scratch directory here), else 0 (a core
/// handler program or an absolute path would put cores where the test cannot clean up).
fn core_limit() -> libc::rlim_t {
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    let pattern = pattern.trim();
    if !pattern.is_empty() && !pattern.starts_with('|') && !pattern.contains('/') {
        libc::RLIM_INFINITY
    } else {
        0
    }
}

/// Runs `cmd` in `cwd` with RLIMIT_CORE set to `limit` (soft and hard).
fn with_core_limit<'a>(cmd: &'a mut Command, cwd: &Path, limit: libc::rlim_t) -> &'a mut Command {
    std::fs::create_dir_all(cwd).unwrap_or_else(|e| panic!("creating {}: {e}", cwd.display()));
    cmd.current_dir(cwd);
    // SAFETY: the closure runs between fork and exec and makes one async-signal-safe system
    // call, setrlimit, on a value on its own stack.
    unsafe {
        cmd.pre_exec(move || {
            let rl = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Removes the core files a run left in `dir`.
fn remove_cores(dir: &Path) {
    for name in files_in(dir) {
        if name == "core" || name.starts_with("core.") {
            let _ = std::fs::remove_file(dir.join(name));
        }
    }
}

/// What the heap profile must show at `before_crash` for the 100 blocks `death_crash`
/// allocated there, given its output: [alloc_objects, alloc_space, inuse_objects,
/// inuse_space], with the sizes malloc_usable_size reports (as the profile does).
fn before_crash(out: &RunOutput) -> [i64; 4] {
    let stdout = out.stdout_text();
    let usable = stdout
        .lines()
        .find(|l| l.starts_with("before_crash"))
        .map(|l| field(l, "usable") as i64)
        .unwrap_or_else(|| panic!("death_crash printed no `before_crash usable=N`: {out:?}"));
    [100, usable, 100, usable]
}

fn check_crash(mode: &str, signal: i32) {
    let scratch = scratch_dir(&format!("death_crash_{mode}"));
    let exe = compile("death_crash.c", &["-O1", "-g"], &scratch);
    let limit = core_limit();
    let flags = ["-q", "--mem-rate", "1"];

    // The crashing program itself: exit status, output, profile.
    let direct_cwd = scratch.join("direct");
    let direct = run(with_core_limit(
        clean_command(&exe).arg(mode),
        &direct_cwd,
        limit,
    ));
    remove_cores(&direct_cwd);
    assert_eq!(
        direct.code,
        128 + signal,
        "death_crash {mode} itself must die of signal {signal}: {direct:?}"
    );
    let dir = scratch.join("profile");
    let profiled = run(with_core_limit(
        &mut record_command(&dir, &flags, &exe, &[mode]),
        &scratch.join("profiled"),
        limit,
    ));
    remove_cores(&scratch.join("profiled"));
    assert_same_run(
        &format!("death_crash {mode}"),
        "under anyprof record --mem-rate 1",
        &direct,
        &profiled,
    );
    let view = read_profile_in(&dir, "heap.pb.gz", &profiled);
    assert_eq!(
        site_values(&view, "before_crash"),
        before_crash(&direct),
        "death_crash {mode}: the heap profile must hold the 100 blocks allocated at \
         before_crash just before the crash ([alloc_objects, alloc_space, inuse_objects, \
         inuse_space]); sites: {:?}",
        view.heap_values_by_site()
    );

    // As the child of a parent that reports the core-dump bit of its status.
    let direct = run(with_core_limit(
        clean_command(&exe).args(["run", mode]),
        &direct_cwd,
        limit,
    ));
    remove_cores(&direct_cwd);
    let expected_line = format!(
        "child: signal {signal} core {}",
        u8::from(limit == libc::RLIM_INFINITY)
    );
    assert!(
        direct.code == 0 && direct.stdout_text().contains(&expected_line),
        "death_crash run {mode} itself must print {expected_line:?} (core limit {limit}): \
         {direct:?}"
    );
    let dir = scratch.join("profile_run");
    let profiled = run(with_core_limit(
        &mut record_command(&dir, &flags, &exe, &["run", mode]),
        &scratch.join("profiled"),
        limit,
    ));
    remove_cores(&scratch.join("profiled"));
    assert_same_run(
        &format!("death_crash run {mode}"),
        "under anyprof record --mem-rate 1 (its lines: the crashing child's core limit and \
         dumpable flag, then how it died and whether it dumped core)",
        &direct,
        &profiled,
    );
    // The program's own file has the same name but its pid: not it.
    let child_files: Vec<String> = anyprof_tests::other_process_files(&dir, "heap")
        .into_iter()
        .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".death_crash.pb.gz"))
        .collect();
    assert_eq!(
        child_files.len(),
        1,
        "death_crash run {mode}: the crashed child must have its own heap profile \
         heap.PID.death_crash.pb.gz; files: {:?}",
        files_in(&dir)
    );
    let view = read_profile_in(&dir, &child_files[0], &profiled);
    assert_eq!(
        site_values(&view, "before_crash"),
        before_crash(&direct),
        "death_crash run {mode}: the crashed child's heap profile {} must hold the 100 blocks \
         allocated at before_crash; sites: {:?}",
        child_files[0],
        view.heap_values_by_site()
    );
}

#[test]
fn sigsegv_keeps_exit_status_core_dump_and_profile() {
    check_crash("segv", libc::SIGSEGV);
}

#[test]
fn sigabrt_keeps_exit_status_core_dump_and_profile() {
    check_crash("abort", libc::SIGABRT);
}
