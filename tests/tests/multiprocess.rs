//! Programs that run programs (issue 15, point 4): `cpu.pb.gz`, `heap.pb.gz` and
//! `allocs.pb.gz` hold every process of the run, each sample labelled with its `pid` and
//! `process`, so the default view is the whole run (as perf and samply show it) and `go tool
//! pprof -tagfocus=process=NAME` shows one process; each process keeps its own files too.
//!
//! Two runs: `gcc -O2 -c big.c` (the driver does nothing, `cc1` does the work: before, the
//! program's profile had 0 samples and the summary an empty top list), and a shell script that
//! runs two copies of `tests/programs/cpu_split.c` with a known 1:2 split of CPU time (each
//! copy prints its own CPU time, the ground truth per process).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyprof_tests::{
    binaries, clean_command, compile, cpu_lock, files_in, other_process_files, read_profile_in,
    run, scratch_dir, workspace_root, ProfileView, RunOutput,
};

/// Sampling rate of both runs: the tick (250 Hz here) lets it through.
const HZ: u32 = 200;

/// Runs `anyprof record -o DIR --cpu-hz HZ -- program args` (not quiet: the summary is
/// checked too) in `cwd`, holding the CPU lock.
fn record_run(scratch: &Path, cwd: &Path, program: &str, args: &[&str]) -> (RunOutput, PathBuf) {
    let dir = scratch.join("profile");
    let mut cmd = clean_command(binaries().anyprof);
    cmd.arg("record")
        .arg("-o")
        .arg(&dir)
        .args(["--cpu-hz", &HZ.to_string(), "--"])
        .arg(program)
        .args(args)
        .current_dir(cwd);
    let out = {
        let _cpu = cpu_lock();
        run(&mut cmd)
    };
    assert_eq!(
        out.code,
        0,
        "`anyprof record -- {program} {args:?}` failed\nstdout:\n{}\nstderr:\n{}",
        out.stdout_text(),
        out.stderr_text()
    );
    (out, dir)
}

/// Runs `go tool pprof ARGS` (HOME and PPROF_TMPDIR in `scratch`); panics unless it exits 0.
/// Returns stdout.
fn go_tool_pprof(scratch: &Path, args: &[&str], profile: &Path) -> String {
    let go_version = Command::new("go").arg("version").output();
    assert!(
        go_version.as_ref().is_ok_and(|o| o.status.success()),
        "`go version` failed ({go_version:?}): these tests need Go's `go tool pprof`. \
         Install it: apt-get install -y golang-go"
    );
    let home = scratch.join("home");
    std::fs::create_dir_all(&home).expect("creating scratch HOME");
    let mut cmd = clean_command("go");
    cmd.args(["tool", "pprof"])
        .args(args)
        .arg(profile)
        .env("HOME", &home)
        .env("PPROF_TMPDIR", scratch)
        .env_remove("PPROF_BINARY_PATH");
    let out = run(&mut cmd);
    assert_eq!(
        out.code,
        0,
        "`go tool pprof {args:?} {}` exited with {}\nstdout:\n{}\nstderr:\n{}",
        profile.display(),
        out.code,
        out.stdout_text(),
        out.stderr_text()
    );
    out.stdout_text()
}

/// What `go tool pprof -top -unit=ms -nodefraction=0 -nodecount=N` shows ("Showing nodes
/// accounting for 984.79ms, 99.49% of 989.79ms total"): with no node dropped, the first
/// figure is the total of the samples its filters kept, in ms.
fn pprof_shown_ms(top: &str) -> f64 {
    top.lines()
        .find_map(|l| {
            let shown = l.strip_prefix("Showing nodes accounting for ")?;
            shown.split(',').next()?.strip_suffix("ms")?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no `accounting for Nms` in go tool pprof's output:\n{top}"))
}

/// The arguments of a `go tool pprof -top` that drops no node and shows ms.
const TOP_ALL: [&str; 4] = ["-top", "-unit=ms", "-nodefraction=0", "-nodecount=1000000"];

/// A sample's `process` label.
fn process_of<'a>(view: &'a ProfileView, s: &anyprof_tests::proto::Sample) -> &'a str {
    view.str_label(s, "process").unwrap_or("")
}

/// Sum of value `type_name` by the samples' `process` label.
fn value_by_process(view: &ProfileView, type_name: &str) -> BTreeMap<String, i64> {
    let i = view.value_index(type_name);
    let mut out = BTreeMap::new();
    for s in &view.profile.sample {
        *out.entry(process_of(view, s).to_string()).or_insert(0) += s.value[i];
    }
    out
}

/// Sum of value `type_name` by the samples' `pid` label.
fn value_by_pid(view: &ProfileView, type_name: &str) -> BTreeMap<i64, i64> {
    let i = view.value_index(type_name);
    let mut out = BTreeMap::new();
    for s in &view.profile.sample {
        let pid = view.num_label(s, "pid").unwrap_or(-1);
        *out.entry(pid).or_insert(0) += s.value[i];
    }
    out
}

/// Every sample has both labels; ids of mappings are unique and every location lies in its
/// own mapping, so two processes' copies of one library never share a mapping.
fn check_labels_and_mappings(view: &ProfileView, what: &str) {
    let unlabelled = view
        .profile
        .sample
        .iter()
        .filter(|s| view.num_label(s, "pid").is_none() || process_of(view, s).is_empty())
        .count();
    assert_eq!(
        unlabelled,
        0,
        "{what}: every sample needs a pid and a process label\n{}",
        view.describe()
    );
    let mappings: BTreeMap<u64, &anyprof_tests::proto::Mapping> =
        view.profile.mapping.iter().map(|m| (m.id, m)).collect();
    assert_eq!(
        mappings.len(),
        view.profile.mapping.len(),
        "{what}: mapping ids repeat"
    );
    for l in &view.profile.location {
        if l.mapping_id == 0 {
            continue;
        }
        let m = mappings
            .get(&l.mapping_id)
            .unwrap_or_else(|| panic!("{what}: location {} names mapping {}", l.id, l.mapping_id));
        assert!(
            (m.memory_start..m.memory_limit).contains(&l.address),
            "{what}: location {} at {:#x} lies outside its mapping {} ({:#x}..{:#x})",
            l.id,
            l.address,
            m.id,
            m.memory_start,
            m.memory_limit
        );
    }
}

/// How many mappings of `view` are of a file whose name contains `name`.
fn mappings_of(view: &ProfileView, name: &str) -> usize {
    view.profile
        .mapping
        .iter()
        .filter(|m| view.string(m.filename).contains(name))
        .count()
}

/// The functions with the most self CPU time, hottest first, and the process each one's
/// time came from mostly.
fn top_functions(view: &ProfileView, n: usize) -> Vec<(String, String, i64)> {
    let cpu = view.value_index("cpu");
    let mut by: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for s in &view.profile.sample {
        let Some(leaf) = view.frames(s).first().map(|f| f.name.to_string()) else {
            continue;
        };
        *by.entry(leaf)
            .or_default()
            .entry(process_of(view, s).to_string())
            .or_insert(0) += s.value[cpu];
    }
    let mut out: Vec<(String, String, i64)> = by
        .into_iter()
        .map(|(name, per)| {
            let total = per.values().sum();
            let main = per
                .into_iter()
                .max_by_key(|(_, v)| *v)
                .map(|(p, _)| p)
                .unwrap_or_default();
            (name, main, total)
        })
        .collect();
    out.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    out.truncate(n);
    out
}

/// `anyprof record -- gcc -O2 -c big.c`: the run's profile is cc1's work, labelled, and
/// `go tool pprof -tagfocus=process=cc1` selects exactly cc1's samples; the summary's top
/// list is not empty and names cc1 among the processes; each process has its own files.
#[test]
fn gcc_compiling_a_large_file_is_profiled_as_one_run() {
    let scratch = scratch_dir("multiprocess_gcc");
    let generator = workspace_root().join("bench/programs/gen_large_c.py");
    let made = Command::new("python3")
        .arg(&generator)
        .arg(scratch.join("big.c"))
        .arg("200")
        .status()
        .unwrap_or_else(|e| panic!("running python3 (install python3): {e}"));
    assert!(made.success(), "{} failed", generator.display());
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".to_string());
    let (out, dir) = record_run(&scratch, &scratch, &cc, &["-O2", "-c", "big.c"]);
    let stderr = out.stderr_text();
    let run = read_profile_in(&dir, "cpu.pb.gz", &out);
    check_labels_and_mappings(&run, "cpu.pb.gz");

    // cc1 did the work, and the run's profile shows it.
    let by_process = value_by_process(&run, "cpu");
    let total: i64 = by_process.values().sum();
    let cc1 = by_process.get("cc1").copied().unwrap_or(0);
    assert!(
        total > 0 && cc1 as f64 >= 0.8 * total as f64,
        "cc1 should have most of the run's CPU time: {by_process:?}\n{stderr}"
    );
    let top = top_functions(&run, 5);
    let of_cc1 = top.iter().filter(|(_, p, _)| p == "cc1").count();
    assert!(
        top.first().is_some_and(|(_, p, _)| p == "cc1") && of_cc1 >= 3,
        "the run's top functions should be cc1's: {top:?}"
    );
    assert!(
        mappings_of(&run, "libc.so") >= 2,
        "each process has its own libc mapping: {} of them in cpu.pb.gz\n{}",
        mappings_of(&run, "libc.so"),
        run.describe()
    );

    // go tool pprof: the whole run by default, one process with -tagfocus.
    let whole = go_tool_pprof(&scratch, &TOP_ALL, &dir.join("cpu.pb.gz"));
    // pprof shows an address without symbols as its object, `[cc1]`.
    let first = top[0].0.replace("[unsymbolized ", "[");
    let first = first.as_str();
    let listed: Vec<&str> = whole
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .skip(1)
        .take(5)
        .collect();
    assert!(
        listed.iter().any(|l| l.contains(first)),
        "go tool pprof -top should list cc1's {first} among its first lines:\n{whole}"
    );
    let focused = go_tool_pprof(
        &scratch,
        &[&TOP_ALL[..], &["-tagfocus=process=cc1"]].concat(),
        &dir.join("cpu.pb.gz"),
    );
    let (whole_ms, cc1_ms) = (pprof_shown_ms(&whole), pprof_shown_ms(&focused));
    assert!(
        cc1_ms <= whole_ms && (cc1_ms - cc1 as f64 / 1e6).abs() <= 1.0,
        "-tagfocus=process=cc1 should show exactly cc1's {} ms of the run's {whole_ms} ms, \
         showed {cc1_ms} ms:\n{focused}",
        cc1 as f64 / 1e6
    );
    let cc1_pids: BTreeSet<i64> = run
        .profile
        .sample
        .iter()
        .filter(|s| process_of(&run, s) == "cc1")
        .filter_map(|s| run.num_label(s, "pid"))
        .collect();
    assert_eq!(cc1_pids.len(), 1, "one cc1 process: {cc1_pids:?}");
    let cc1_pid = *cc1_pids.first().expect("a cc1 pid");
    let by_pid = go_tool_pprof(
        &scratch,
        &[&TOP_ALL[..], &[format!("-tagfocus=pid={cc1_pid}").as_str()]].concat(),
        &dir.join("cpu.pb.gz"),
    );
    assert!(
        (pprof_shown_ms(&by_pid) - cc1_ms).abs() <= 1.0,
        "-tagfocus=pid={cc1_pid} should select what -tagfocus=process=cc1 does:\n{by_pid}"
    );

    // cc1's own file holds what the run's profile labels cc1.
    let own = dir.join(format!("cpu.{cc1_pid}.cc1.pb.gz"));
    let own = ProfileView::new(
        anyprof::pprof::read_file(&own)
            .unwrap_or_else(|e| panic!("{e:#}; files: {:?}", files_in(&dir))),
    );
    let own_cpu: i64 = own
        .profile
        .sample
        .iter()
        .map(|s| s.value[own.value_index("cpu")])
        .sum();
    assert_eq!(
        own_cpu, cc1,
        "cc1's own file and its part of cpu.pb.gz differ"
    );

    // Heap and allocs: every process, labelled; cc1 allocated most.
    for file in ["heap.pb.gz", "allocs.pb.gz"] {
        let view = read_profile_in(&dir, file, &out);
        check_labels_and_mappings(&view, file);
        let allocated = value_by_process(&view, "alloc_space");
        let most = allocated.iter().max_by_key(|(_, v)| **v).map(|(p, _)| p);
        assert_eq!(
            most.map(String::as_str),
            Some("cc1"),
            "{file}: cc1 allocated most: {allocated:?}"
        );
    }

    // The summary: a top list over the run, and the busiest processes with cc1 first.
    let processes = stderr
        .lines()
        .skip_while(|l| !l.contains("the busiest:"))
        .nth(1)
        .unwrap_or("");
    assert!(
        processes
            .trim_start()
            .starts_with(&format!("cc1 (pid {cc1_pid})")),
        "the summary should name cc1 as the busiest process:\n{stderr}"
    );
    let top_list: Vec<&str> = stderr
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .skip(1)
        .take_while(|l| {
            l.trim_start()
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .collect();
    assert!(
        top_list.len() >= 5 && top_list.iter().take(3).any(|l| l.contains(first)),
        "the summary's top list should show cc1's functions, {first} among the first:\n{stderr}"
    );
}

/// A shell script runs two programs whose CPU times are known (each prints its own): the
/// run's `cpu.pb.gz` holds both, in the same split, each under its own `pid` and `process`
/// label, and each has its own file that holds the same.
#[test]
fn a_script_running_two_programs_holds_both_in_their_split() {
    let scratch = scratch_dir("multiprocess_script");
    let built = compile("cpu_split.c", &["-O2", "-g"], &scratch);
    let (one, two) = (scratch.join("split_one"), scratch.join("split_two"));
    std::fs::copy(&built, &one).expect("copying cpu_split");
    std::fs::rename(&built, &two).expect("renaming cpu_split");
    let script = scratch.join("two.sh");
    // About 0.4 s and 0.8 s of CPU on the test machines: 1 : 2.
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n'{}' 300000000\n'{}' 600000000\n",
            one.display(),
            two.display()
        ),
    )
    .expect("writing the script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod the script");
    let (out, dir) = record_run(&scratch, &scratch, &script.to_string_lossy(), &[]);
    // Each program's own CPU time, as it measured it.
    let truth: Vec<f64> = out
        .stdout_text()
        .lines()
        .map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("cpu_ns="))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no cpu_ns= in {l:?}"))
        })
        .collect();
    assert_eq!(truth.len(), 2, "two lines of output: {}", out.stdout_text());
    let run = read_profile_in(&dir, "cpu.pb.gz", &out);
    check_labels_and_mappings(&run, "cpu.pb.gz");
    let cpu = value_by_process(&run, "cpu");
    let samples = value_by_process(&run, "samples");
    let measured = [
        cpu.get("split_one").copied().unwrap_or(0) as f64,
        cpu.get("split_two").copied().unwrap_or(0) as f64,
    ];
    let counts = [
        samples.get("split_one").copied().unwrap_or(0) as f64,
        samples.get("split_two").copied().unwrap_or(0) as f64,
    ];
    // The weights are measured thread CPU time; what is lost is the time after a thread's
    // last sample (under one period) and before the timer was armed.
    let period = 1e9 / f64::from(HZ);
    for (i, name) in ["split_one", "split_two"].iter().enumerate() {
        assert!(
            (measured[i] - truth[i]).abs() <= 0.1 * truth[i] + 2.0 * period,
            "{name} used {:.3} s of CPU by its own clock, cpu.pb.gz gives it {:.3} s \
             (by process: {cpu:?})",
            truth[i] / 1e9,
            measured[i] / 1e9
        );
    }
    // The split by samples: each sample lands in one of the two with probability p (the
    // true share); 4 standard deviations of the binomial, plus a little for the tick.
    let p = truth[0] / (truth[0] + truth[1]);
    let n = counts[0] + counts[1];
    let share = counts[0] / n;
    let tolerance = 4.0 * (p * (1.0 - p) / n).sqrt() + 0.02;
    assert!(
        n > 100.0 && (share - p).abs() <= tolerance,
        "split_one's share of the samples is {share:.3}, its share of the CPU time {p:.3} \
         (tolerance {tolerance:.3}, {n} samples; by process: {samples:?})"
    );
    // Two processes, each under a pid of its own; each has its own file with the same total.
    let by_pid = value_by_pid(&run, "cpu");
    for name in ["split_one", "split_two"] {
        let pids: BTreeSet<i64> = run
            .profile
            .sample
            .iter()
            .filter(|s| process_of(&run, s) == name)
            .filter_map(|s| run.num_label(s, "pid"))
            .collect();
        assert_eq!(pids.len(), 1, "{name}: one pid label, got {pids:?}");
        let pid = *pids.first().expect("a pid");
        let file = dir.join(format!("cpu.{pid}.{name}.pb.gz"));
        let own =
            ProfileView::new(anyprof::pprof::read_file(&file).unwrap_or_else(|e| {
                panic!("{name}'s own file: {e:#}; files: {:?}", files_in(&dir))
            }));
        let own_cpu: i64 = own
            .profile
            .sample
            .iter()
            .map(|s| s.value[own.value_index("cpu")])
            .sum();
        assert_eq!(
            Some(&own_cpu),
            by_pid.get(&pid),
            "{name}'s own file and its part of cpu.pb.gz differ"
        );
        assert!(
            own.profile
                .sample
                .iter()
                .all(|s| own.num_label(s, "pid").is_none()),
            "a process's own file needs no pid label"
        );
    }
    assert!(
        other_process_files(&dir, "cpu").len() >= 2,
        "the two programs have their own files: {:?}",
        files_in(&dir)
    );
}

/// A command name longer than a file name may be (review of issue 15): `cpu.PID.NAME.pb.gz`
/// and its temporary file went over NAME_MAX, so the per-process files were not written and
/// record failed. The name is cut; every file is written; record exits as the program did.
#[test]
fn a_command_with_a_very_long_name_gets_its_files() {
    let scratch = scratch_dir("multiprocess_long_name");
    let built = compile("cpu_split.c", &["-O2", "-g"], &scratch);
    let long = scratch.join("x".repeat(240));
    std::fs::rename(&built, &long).expect("renaming cpu_split");
    let script = scratch.join("long.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n'{0}' 20000000\n'{0}' 20000000\nexit 7\n",
            long.display()
        ),
    )
    .expect("writing the script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod the script");
    let dir = scratch.join("profile");
    let mut cmd = clean_command(binaries().anyprof);
    cmd.arg("record")
        .arg("-o")
        .arg(&dir)
        .args(["--cpu-hz", &HZ.to_string(), "--"])
        .arg(&script)
        .current_dir(&scratch);
    let out = {
        let _cpu = cpu_lock();
        run(&mut cmd)
    };
    assert_eq!(
        out.code,
        7,
        "record did not exit as the program did\nstderr:\n{}",
        out.stderr_text()
    );
    let names = files_in(&dir);
    let own: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("cpu.") && n.contains(&"x".repeat(64)))
        .collect();
    assert_eq!(own.len(), 2, "not one cpu file per copy: {names:?}");
    assert!(names.iter().all(|n| n.len() < 200), "{names:?}");
    assert!(names.contains(&"cpu.pb.gz".to_string()), "{names:?}");
}
