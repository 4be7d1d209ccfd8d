//! Transparency with heap profiling on: the malloc hooks must not change what a program does,
//! and a program that brings its own allocator must keep working.
//!
//! Each program runs directly, then under `anyprof record -q --cpu-hz 0 --mem-rate 1` (every
//! allocation recorded: the hooks' slow path on every call) and under
//! `anyprof record -q --cpu-hz 0` (the default rate), in the same clean environment. stdout,
//! stderr and the exit code must be byte-identical, and the recorded runs must have written
//! heap profiles with samples. CPU profiling is off: these runs are about the heap (the CPU
//! side is `transparency.rs`).
//!
//! The programs are interpreters with their own allocators on top of malloc (Python, Perl),
//! running allocation-heavy scripts, and `tests/programs/heap_threads.c`, four threads
//! allocating, reallocating and freeing blocks of all sizes with every malloc-family call.
//!
//! The last tests preload tcmalloc, then jemalloc, after anyprof
//! (`LD_PRELOAD=libanyprof.so:libtcmalloc.so.4`): the program must run as it does on that
//! allocator alone, and its allocations must be profiled exactly at rate 1. They fail when the
//! allocator is not installed (`.ci/run` installs libgoogle-perftools4 and libjemalloc2).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyprof_tests::{
    assert_same_run, clean_command, compile, cpu_lock, heap_record_command, read_profile_in,
    required_library, run, scratch_dir, ProfileView, RunOutput, Shared, HEAP_VARIANTS,
    OTHER_ALLOCATORS,
};

/// Sum of the value `type_name` over all samples.
fn total(view: &ProfileView, type_name: &str) -> i64 {
    let i = view.value_index(type_name);
    view.profile.sample.iter().map(|s| s.value[i]).sum()
}

/// Runs `program args` directly and under both recorded variants, with `env` applied to
/// every run; checks the runs are indistinguishable, that the direct one exited with
/// `expected_code`, and that every recorded run wrote heap and allocs profiles with samples.
fn check_transparent(
    name: &str,
    program: &Path,
    args: &[&str],
    expected_code: i32,
    env: &dyn Fn(&mut Command),
) {
    let scratch = scratch_dir(&format!("heap_transparency_{name}"));
    // These runs measure nothing, but they burn CPU: keep them away from accuracy tests.
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

    for (i, (how, flags)) in HEAP_VARIANTS.iter().enumerate() {
        let dir = scratch.join(format!("profile-{i}"));
        let mut cmd = heap_record_command(&dir, flags, program, args);
        env(&mut cmd);
        let recorded = run(&mut cmd);
        let how = format!("under `anyprof record -q --cpu-hz 0` at {how}");
        assert_same_run(name, &how, &direct, &recorded);
        for file in ["heap.pb.gz", "allocs.pb.gz"] {
            let view = read_profile_in(&dir, file, &recorded);
            assert!(
                !view.profile.sample.is_empty() && total(&view, "alloc_space") > 0,
                "{name} {how}: {file} has no allocations ({} samples)",
                view.profile.sample.len()
            );
        }
    }
}

/// The interpreter binary itself, not a wrapper: version managers (pyenv, asdf) put shell
/// scripts named `python3` first on PATH; the interpreter reports its own path.
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

/// Deterministic interpreters: no hash randomisation, no bytecode files written.
fn interpreter_env(cmd: &mut Command) {
    cmd.env("PYTHONHASHSEED", "0")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PERL_HASH_SEED", "0")
        .env("PERL_PERTURB_KEYS", "0");
}

/// Python builds and drops dicts, lists, strings and byte strings of all sizes (its small
/// object allocator and malloc both), round-trips them through json, prints digests to
/// stdout and a line to stderr, and exits with 3.
#[test]
fn python3_is_unchanged_by_heap_profiling() {
    let python = interpreter("python3", &["-c", "import sys; print(sys.executable)"]);
    let script = r#"
import hashlib, json, sys
table = {("key%d" % i): [i, str(i) * (i % 17), {"sq": i * i}] for i in range(150000)}
blob = json.dumps(table, sort_keys=True)
back = json.loads(blob)
chunks = [bytes(range(256)) * (i % 300 + 1) for i in range(3000)]
big = [bytearray(1 << 20) for _ in range(40)]
del big
words = sorted(set(blob[i:i + 7] for i in range(0, len(blob), 13)))
print("entries:", len(back), "json bytes:", len(blob))
print("sha256:", hashlib.sha256(blob.encode()).hexdigest())
print("chunks:", sum(len(c) for c in chunks), "words:", len(words), words[:3])
print("unicode: \u00e9\u00e8\u2713", [round(1 / k, 6) for k in range(1, 6)])
print("warning: done on stderr", len(table) % 97, file=sys.stderr)
sys.exit(3)
"#;
    check_transparent("python3", &python, &["-c", script], 3, &interpreter_env);
}

/// Perl builds a large hash of strings, sorts and joins it, grows and shrinks arrays and
/// strings, prints to stdout and stderr, and exits with 3.
#[test]
fn perl_is_unchanged_by_heap_profiling() {
    let perl = interpreter("perl", &["-e", "print $^X"]);
    let script = r#"
my %h; for my $i (1..150000) { $h{"key$i"} = ("x" x ($i % 50)) . $i; }
my @keys = sort keys %h;
my $joined = join(",", map { $h{$_} } @keys[0..999]);
my @big = map { "y" x 100000 } 1..50; @big = ();
my $s = ""; for my $i (1..20000) { $s .= chr(65 + $i % 26); } substr($s, 100, 5000) = "";
my $sum = 0; $sum += length($h{$_}) for @keys;
print "keys: ", scalar(@keys), " total length: $sum\n";
print "joined: ", length($joined), " first: ", substr($joined, 0, 40), "\n";
print "string: ", length($s), " ", substr($s, 0, 30), "\n";
printf STDERR "stderr line: %d\n", $sum % 1000;
exit 3;
"#;
    check_transparent("perl", &perl, &["-e", script], 3, &interpreter_env);
}

/// Four threads allocate, reallocate and free with every malloc-family call; exit status 5.
#[test]
fn multithreaded_c_is_unchanged_by_heap_profiling() {
    let scratch = scratch_dir("heap_transparency_threads_build");
    let exe = compile("heap_threads.c", &["-O2", "-g", "-pthread"], &scratch);
    check_transparent("heap_threads", &exe, &[], 5, &|_| {});
}

// ---------------------------------------------------------------------------------------
// tcmalloc preloaded after anyprof
// ---------------------------------------------------------------------------------------

/// tcmalloc preloaded after anyprof, taking its memory from mmap only
/// (`TCMALLOC_SKIP_SBRK=1`): tcmalloc exports `__libc_malloc` as an alias of its malloc, so
/// the start-up check took it for glibc's and read the word before a block, which for a
/// page-aligned span at the start of a fresh mapping is unmapped: SIGSEGV in our
/// constructor, before `main`.
#[test]
fn tcmalloc_on_mmap_only_is_not_taken_for_glibc() {
    let library = required_library(anyprof_tests::TCMALLOC, "libgoogle-perftools4");
    let scratch = scratch_dir("heap_transparency_tcmalloc_mmap_build");
    let exe = compile("heap_threads.c", &["-O2", "-g", "-pthread"], &scratch);
    check_transparent("heap_threads_tcmalloc_mmap", &exe, &[], 5, &|cmd| {
        cmd.env("LD_PRELOAD", library)
            .env("TCMALLOC_SKIP_SBRK", "1");
    });
}

/// `heap_sites` built once per test binary.
static HEAP_SITES: Shared<PathBuf> = Shared::new();

fn heap_sites() -> &'static Path {
    HEAP_SITES.get(|| {
        let scratch = scratch_dir("heap_transparency_sites_build");
        compile("heap_sites.cpp", &["-O2", "-g"], &scratch)
    })
}

/// The `site NAME objects=.. alloc_bytes=.. live_objects=.. live_bytes=..` lines as
/// `site_NAME` → [objects, alloc_bytes, live_objects, live_bytes].
fn tallies(text: &str) -> BTreeMap<String, [i64; 4]> {
    text.lines()
        .filter_map(|l| l.strip_prefix("site "))
        .map(|rest| {
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap_or("");
            let fields: BTreeMap<&str, i64> = words
                .filter_map(|w| w.split_once('='))
                .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
                .collect();
            let get = |k: &str| fields.get(k).copied().unwrap_or(-1);
            (
                format!("site_{name}"),
                [
                    get("objects"),
                    get("alloc_bytes"),
                    get("live_objects"),
                    get("live_bytes"),
                ],
            )
        })
        .collect()
}

/// `heap_sites 16` on another allocator alone (tcmalloc or jemalloc, from
/// [`OTHER_ALLOCATORS`]), then recorded with that allocator after anyprof at rate 1 and at the
/// default rate; returns the direct run and the rate-1 heap profile. Panics, saying what to
/// install, when the allocator is missing (`.ci/run` installs both).
struct AllocatorRuns {
    direct: RunOutput,
    exact: ProfileView,
}

static TCMALLOC_RUNS: Shared<AllocatorRuns> = Shared::new();
static JEMALLOC_RUNS: Shared<AllocatorRuns> = Shared::new();

fn allocator_runs(which: &str) -> (&'static str, &'static AllocatorRuns) {
    let (name, library, package) = OTHER_ALLOCATORS
        .iter()
        .copied()
        .find(|(name, _, _)| *name == which)
        .expect("a known allocator");
    let library = required_library(library, package);
    let cell = if name == "tcmalloc" {
        &TCMALLOC_RUNS
    } else {
        &JEMALLOC_RUNS
    };
    let runs = cell.get(|| {
        let exe = heap_sites();
        let scratch = scratch_dir(&format!("heap_{name}"));
        let _cpu = cpu_lock();
        let mut direct_cmd = clean_command(exe);
        direct_cmd.arg("16").env("LD_PRELOAD", library);
        let direct = run(&mut direct_cmd);
        assert_eq!(
            direct.code,
            0,
            "heap_sites on {name} alone failed\nstdout:\n{}\nstderr:\n{}",
            direct.stdout_text(),
            direct.stderr_text()
        );
        let mut exact = None;
        for (i, (how, flags)) in HEAP_VARIANTS.iter().enumerate() {
            let dir = scratch.join(format!("profile-{i}"));
            // anyprof puts its library first and keeps what LD_PRELOAD already holds.
            let mut cmd = heap_record_command(&dir, flags, exe, &["16"]);
            cmd.env("LD_PRELOAD", library);
            let recorded = run(&mut cmd);
            assert_same_run(
                "heap_sites",
                &format!("with LD_PRELOAD={library} under anyprof record at {how}"),
                &direct,
                &recorded,
            );
            let view = read_profile_in(&dir, "heap.pb.gz", &recorded);
            assert!(
                total(&view, "alloc_space") > 0,
                "on {name} at {how}: the heap profile has no allocations"
            );
            if i == 0 {
                exact = Some(view);
            }
        }
        AllocatorRuns {
            direct,
            exact: exact.expect("the first variant is --mem-rate 1"),
        }
    });
    (library, runs)
}

/// Every C allocation of `heap_sites` on `which` (preloaded after anyprof) is exact at rate 1,
/// and the program really ran on that allocator.
fn check_other_allocator_exact(which: &str) {
    let (library, runs) = allocator_runs(which);
    // tcmalloc's and jemalloc's usable size of a 1 MiB block is exactly 1 MiB (glibc's is
    // 1 MiB + 4080): the program really ran on the preloaded allocator.
    let truth = tallies(&runs.direct.stdout_text());
    assert_eq!(
        truth.get("site_large").map(|t| t[1] / t[0]),
        Some(1 << 20),
        "heap_sites did not run on {library}:\n{}",
        runs.direct.stdout_text()
    );
    // Every C allocation reaches the allocator through anyprof's hooks: exact at rate 1.
    let got = runs.exact.heap_values_by_site();
    let mut failures = Vec::new();
    for (site, t) in truth.iter().filter(|(s, _)| *s != "site_cxx_array") {
        let v = got.get(site).copied().unwrap_or_default();
        if v != *t {
            failures.push(format!(
                "{site}: profile [alloc_objects, alloc_space, inuse_objects, inuse_space] = \
                 {v:?}, program {t:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "on {which} at --mem-rate 1:\n{}",
        failures.join("\n")
    );
}

/// Both allocators define `operator new` themselves, so C++ `new` does not go through malloc
/// there; a heap profiler of native programs must still see it (anyprof interposes
/// `operator new` and `delete`, and accounts for them itself when they do not reach the
/// malloc family).
fn check_other_allocator_cxx_new(which: &str) {
    let (library, runs) = allocator_runs(which);
    let truth = tallies(&runs.direct.stdout_text())["site_cxx_array"];
    let got = runs
        .exact
        .heap_values_by_site()
        .get("site_cxx_array")
        .copied()
        .unwrap_or_default();
    assert_eq!(
        got, truth,
        "site_cxx_array (new Obj[1024]) on {library} at --mem-rate 1: profile \
         [alloc_objects, alloc_space, inuse_objects, inuse_space] = {got:?}, program \
         {truth:?}. {which} exports its own operator new/delete, which do not call malloc, \
         so an interposer that hooks only the malloc family sees none of these allocations"
    );
}

#[test]
fn tcmalloc_preloaded_after_anyprof_keeps_working_and_is_profiled() {
    check_other_allocator_exact("tcmalloc");
}

#[test]
fn tcmalloc_cxx_new_is_profiled() {
    check_other_allocator_cxx_new("tcmalloc");
}

#[test]
fn jemalloc_preloaded_after_anyprof_keeps_working_and_is_profiled() {
    check_other_allocator_exact("jemalloc");
}

#[test]
fn jemalloc_cxx_new_is_profiled() {
    check_other_allocator_cxx_new("jemalloc");
}

/// Compiles `tests/programs/NAME.c` with `flags`, runs it directly and under `anyprof record`
/// with heap profiling, asserts that the exit code (0) and stdout are the same both ways, and
/// returns the recorded run's stderr and the direct run's.
fn stderr_of_unchanged_heap_run(
    name: &str,
    scratch_name: &str,
    flags: &[&str],
) -> (String, String) {
    let scratch = scratch_dir(scratch_name);
    let exe = compile(&format!("{name}.c"), flags, &scratch);
    let direct = run(&mut clean_command(&exe));
    assert_eq!(direct.code, 0, "{name} failed\n{}", direct.stderr_text());
    let recorded = {
        let _cpu = cpu_lock();
        run(&mut heap_record_command(
            &scratch.join("profile"),
            &[],
            &exe,
            &[],
        ))
    };
    assert_eq!(
        (recorded.code, recorded.stdout_text()),
        (direct.code, direct.stdout_text()),
        "{name} under anyprof record: exit code and stdout must be as without it"
    );
    (recorded.stderr_text(), direct.stderr_text())
}

/// A program whose executable defines `malloc` (an allocator linked into it) is reached first
/// by every call in the process, so the preload's hooks see nothing. It must run as it does
/// without anyprof, and the user must be told in one line why its heap profile is empty —
/// the other tests here compare stderr byte for byte, so the line never appears for a program
/// that does not bring its own malloc.
#[test]
fn a_program_with_its_own_malloc_is_told_its_allocations_are_unseen() {
    let stderr = stderr_of_unchanged_heap_run("own_malloc", "heap_own_malloc", &["-O2"]).0;
    let warning = stderr
        .lines()
        .find(|l| l.contains("malloc is answered by"))
        .unwrap_or_else(|| {
            panic!(
                "anyprof record should say that the program's own malloc hides its allocations; \
                 its stderr:\n{stderr}"
            )
        });
    assert!(
        warning.contains("own_malloc") && warning.contains("not in the heap profile"),
        "the warning should name the program and what it means: {warning}"
    );
    assert!(
        !stderr.contains("allocator of its own"),
        "a program that defines malloc gets the preload's warning only, not the prefixed-\
         allocator one as well:\n{stderr}"
    );
}

/// A non-PIE program that takes malloc's address (CPython's allocator table does) owns a
/// canonical PLT entry for it, and `dlsym(RTLD_DEFAULT, "malloc")` returns that stub in the
/// executable. Its calls still reach the preload, so the "malloc is answered by" warning must
/// not appear: it used to, once per process, in every CPython subprocess test's stderr.
#[test]
fn a_non_pie_program_taking_mallocs_address_gets_no_allocator_warning() {
    let (recorded, direct) = stderr_of_unchanged_heap_run(
        "malloc_address",
        "heap_malloc_address",
        &["-O2", "-fno-pie", "-no-pie"],
    );
    assert_eq!(
        recorded, direct,
        "a non-PIE program that takes malloc's address: stderr under anyprof record must be \
         as without it"
    );
}

/// A program whose allocator lives under prefixed names (Redis's je_malloc, a Rust program's
/// tikv-jemallocator `_rjem_malloc`) never calls malloc for that memory, so no malloc
/// interposer can see it. `anyprof record` must say so, naming the program and the symbol,
/// and the program must run as without it. (Every other program in these tests is checked
/// for byte-identical stderr, so the line cannot appear where it does not belong.)
#[test]
fn a_program_with_a_prefixed_allocator_is_told_its_allocations_are_unseen() {
    let stderr = stderr_of_unchanged_heap_run("prefixed_alloc", "heap_prefixed_alloc", &["-O2"]).0;
    let warning = stderr
        .lines()
        .find(|l| l.contains("allocator of its own"))
        .unwrap_or_else(|| {
            panic!(
                "anyprof record should say that the program's je_malloc hides its allocations; \
                 its stderr:\n{stderr}"
            )
        });
    assert!(
        warning.contains("prefixed_alloc")
            && warning.contains("je_malloc")
            && warning.contains("missing from the heap profile"),
        "the warning should name the program, the symbol and what it means: {warning}"
    );
}
