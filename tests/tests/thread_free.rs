//! A single-threaded program runs without a thread of ours (issue 14): glibc and `/proc` see
//! one thread, its allocator keeps its single-thread fast paths, and the profile is as
//! complete as with our thread — the collector empties the sample ring and reads the
//! counters from the shared region, a library loaded with `dlopen` is caught up at the
//! program's next `dlsym`, and our thread starts when the program starts its second one.
//!
//! Ground truth: `tests/programs/single_thread.c` (about 1 s of thread CPU time in
//! `main_burn`, then optionally 1 s in a `dlopen`ed library's `plugin_inner`, then 0.5 s in a
//! thread's `thread_burn`), recorded at 1000 Hz. The kernel services thread CPU timers at its
//! tick, so a sample stands for a tick's worth of CPU time (each carries the CPU time it
//! covers); the checks sum that time, and ask for 70 % of the known CPU time, which only a
//! lost stream or a lost thread falls below.

use anyprof_tests::{
    clean_command, compile, cpu_lock, record, run, scratch_dir, ProfileView, Recording,
};

const HZ: u32 = 1000;

fn record_single_thread(name: &str, args: &[&str]) -> (Recording, String) {
    let scratch = scratch_dir(name);
    let exe = compile("single_thread.c", &["-O1", "-g"], &scratch);
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    if let Some(at) = args.iter().position(|a| a == "plugin") {
        let plugin = compile(
            "single_thread_plugin.c",
            &["-O1", "-g", "-shared", "-fPIC"],
            &scratch,
        );
        args.insert(at + 1, plugin.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let recording = {
        let _cpu = cpu_lock();
        record(&scratch, HZ, &exe, &args)
    };
    assert_eq!(
        recording.output.code,
        0,
        "single_thread failed:\n{}\n{}",
        recording.output.stdout_text(),
        recording.output.stderr_text()
    );
    let stdout = recording.output.stdout_text();
    (recording, stdout)
}

/// CPU nanoseconds of the samples whose stack holds `function`, and of those whose stack
/// also holds every one of `callers` and `main`.
fn samples_in(view: &ProfileView, function: &str, callers: &[&str]) -> (i64, i64) {
    let cpu = view.value_index("cpu");
    let (mut all, mut rooted) = (0, 0);
    for s in &view.profile.sample {
        let frames = view.frames(s);
        let ns = s.value.get(cpu).copied().unwrap_or(0);
        let has = |name: &str| frames.iter().any(|f| f.name == name);
        if has(function) {
            all += ns;
            if has("main") && callers.iter().all(|c| has(c)) {
                rooted += ns;
            }
        }
    }
    (all, rooted)
}

/// 70 % of `seconds` of CPU time, in ns.
fn most_of(seconds: f64) -> i64 {
    (seconds * 0.7 * 1e9) as i64
}

/// What the program sees is what it sees without the profiler: glibc's
/// `__libc_single_threaded` is still 1 and `/proc/self/task` lists one thread. Before, our
/// thread made them 0 and 2 (and made glibc's malloc lock its arena on every call its
/// per-thread cache missed). Its CPU samples and allocations still all arrive.
#[test]
fn a_single_threaded_program_sees_no_thread_of_ours() {
    let (recording, stdout) = record_single_thread("thread_free_plain", &[]);
    assert!(
        stdout.contains("before: single=1 tasks=1"),
        "the program saw a thread of ours: {stdout:?}"
    );
    let view = recording.cpu_profile();
    let (burn, rooted) = samples_in(&view, "main_burn", &[]);
    assert!(
        burn >= most_of(1.0),
        "{burn} ns of samples in main_burn, which ran about 1 s: the collector lost samples\n{}",
        view.describe()
    );
    assert!(
        rooted * 100 >= burn * 95,
        "{rooted} of {burn} ns of main_burn samples reach main"
    );
}

/// A library loaded with `dlopen` while the program has no thread of ours is known to the
/// unwinder from the program's next `dlsym` on: its samples unwind through the library
/// (`plugin_inner` ← `plugin_burn`) to `main`. Without the catch-up at `dlsym`, the unwinder
/// knows nothing of the library until the program exits, and its frames are lost.
#[test]
fn a_library_loaded_without_our_thread_is_unwound_to_main() {
    let (recording, stdout) = record_single_thread("thread_free_plugin", &["plugin"]);
    assert!(stdout.contains("before: single=1 tasks=1"), "{stdout:?}");
    let view = recording.cpu_profile();
    let (inner, rooted) = samples_in(&view, "plugin_inner", &["plugin_burn"]);
    assert!(
        inner >= most_of(1.0),
        "{inner} ns of samples in the library's plugin_inner, which ran about 1 s\n{}",
        view.describe()
    );
    assert!(
        rooted * 100 >= inner * 95,
        "only {rooted} of {inner} ns of samples in the dlopen'ed library reach main through \
         plugin_burn: the unwinder \
         did not learn of it\n{}",
        view.describe()
    );
}

/// When the program starts a thread, ours starts first and takes the sample ring over from
/// the collector: samples before, during and after the hand-over all arrive, from both of the
/// program's threads.
#[test]
fn our_thread_starts_with_the_programs_second() {
    let (recording, stdout) = record_single_thread("thread_free_then_threads", &["thread"]);
    assert!(stdout.contains("before: single=1 tasks=1"), "{stdout:?}");
    // The program's thread counts itself, the main thread and ours.
    assert!(stdout.contains("after: single=0 tasks=3"), "{stdout:?}");
    let view = recording.cpu_profile();
    let (main, _) = samples_in(&view, "main_burn", &[]);
    let (thread, _) = samples_in(&view, "thread_burn", &[]);
    assert!(
        main >= most_of(1.0) && thread >= most_of(0.5),
        "{main} ns of samples in main_burn (about 1 s) and {thread} in thread_burn (about \
         0.5 s)\n{}",
        view.describe()
    );
}

/// The program's heap holds nothing of ours: anyprof's own Rust code allocates from memory
/// mapped for it alone, so as `main` starts, glibc's heap holds what it holds without
/// anyprof, plus what glibc allocated for our calls into it: its per-thread cache, one
/// `dlopen` record and the freed blocks of the start-up check of its block headers, about 2
/// KiB. Before, anyprof's half MiB of start-up allocations sat there, and the holes they left
/// made glibc serve the program's blocks from bins (about 5 ns a pair at 16..4096 B); then
/// the main thread's stack bounds, read through glibc's `pthread_getattr_np`, left 4 KiB of
/// `FILE` buffers and lines of `/proc/self/maps`.
#[test]
fn the_programs_heap_holds_nothing_of_ours() {
    let (recording, stdout) = record_single_thread("thread_free_heap", &[]);
    let direct = run(&mut clean_command(
        recording.dir.parent().unwrap().join("single_thread"),
    ));
    let at_start = |text: &str| -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix("heap_at_start="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no heap_at_start= line in {text:?}"))
    };
    let (ours, bare) = (at_start(&stdout), at_start(&direct.stdout_text()));
    assert!(
        ours - bare <= 3 << 10,
        "glibc's heap holds {ours} bytes as main starts under anyprof, {bare} without: \
         {} bytes are ours",
        ours - bare
    );
}

/// Records `tests/programs/fork_thread.c` in `mode` at 1000 Hz; the run's directory.
fn record_fork_thread(mode: &str) -> Recording {
    let scratch = scratch_dir(&format!("thread_free_fork_{mode}"));
    let exe = compile("fork_thread.c", &["-O1", "-g", "-pthread"], &scratch);
    let recording = {
        let _cpu = cpu_lock();
        record(&scratch, HZ, &exe, &[mode])
    };
    assert_eq!(
        (recording.output.code, recording.output.stdout_text().trim()),
        (0, "child=0"),
        "fork_thread {mode} failed:\n{}",
        recording.output.stderr_text()
    );
    recording
}

/// The parent's profile of a `fork_thread` run holds its own `main_burn` (about 0.8 s) and
/// nothing of its child's `child_burn`.
fn assert_parent_alone(recording: &Recording) {
    let parent = recording.cpu_profile();
    let (main, _) = samples_in(&parent, "main_burn", &[]);
    let (stray, _) = samples_in(&parent, "child_burn", &[]);
    assert!(
        main >= most_of(0.8) && stray == 0,
        "the parent's profile holds {main} ns in main_burn (about 0.8 s) and {stray} ns in its \
         child's child_burn (none)\n{}",
        parent.describe()
    );
}

/// A library's fork handler that starts a thread in the child (from inside `fork`, while the
/// handlers run) starts ours there first: the child has a profile of its own with its
/// thread's samples, and the parent's holds its own `main_burn` and nothing of the child's.
#[test]
fn a_fork_handler_that_starts_a_thread_gets_the_child_profiled() {
    let recording = record_fork_thread("atfork");
    assert_parent_alone(&recording);
    let children = anyprof_tests::other_process_files(&recording.dir, "cpu");
    assert_eq!(children.len(), 1, "one child profile: {children:?}");
    let child = anyprof_tests::read_profile_in(
        &recording.dir,
        children[0].file_name().unwrap().to_str().unwrap(),
        &recording.output,
    );
    let (thread, _) = samples_in(&child, "child_burn", &[]);
    assert!(
        thread >= most_of(0.3),
        "the child's profile holds {thread} ns in child_burn (about 0.3 s)\n{}",
        child.describe()
    );
}

/// A child made with `_Fork` runs none of the fork handlers, ours neither, so it still shares
/// its parent's region with the collector: it steps aside. Its thread's samples must not land
/// in the parent's profile (before, 0.3 s of `child_burn` did, as if the parent had run it).
#[test]
fn a_fork_without_handlers_leaves_the_parents_profile_alone() {
    assert_parent_alone(&record_fork_thread("_Fork"));
}
