//! C++ `operator new` and `delete`, interposed by the preload: every form must be profiled
//! exactly at `--mem-rate 1`, whichever way anyprof handles it, and the program must not be
//! able to tell that anyprof is there (same output, same exceptions, same new-handler calls).
//!
//! The ways anyprof handles `new` (see `preload/src/alloc/cxx.rs`), and the tests for each:
//! - forward mode (libstdc++ on glibc: `operator new` calls `malloc`, which the hooks
//!   account): [`forms_on_glibc_are_exact_at_rate_1`];
//! - account mode (tcmalloc or jemalloc preloaded after anyprof: its `operator new` does not
//!   call `malloc`, anyprof accounts for the block itself): [`forms_on_tcmalloc_are_exact_at_rate_1`],
//!   [`forms_on_jemalloc_are_exact_at_rate_1`] (they fail when the library is missing; `.ci/run`
//!   installs libgoogle-perftools4 and libjemalloc2);
//! - a next `operator new` out of `dlsym(RTLD_NEXT)`'s sight (a C program that `dlopen()`s
//!   a C++ plugin `RTLD_LOCAL`: anyprof finds the plugin's libstdc++ among the loaded
//!   objects, and unwinds through it although it was loaded less than a drain cycle ago):
//!   [`cxx_plugin_in_c_host_is_exact`], [`cxx_plugin_out_of_memory_is_unchanged`];
//! - the malloc route (the call that decides the mode goes through the malloc family; the
//!   program makes a failing nothrow `new` its first `new`):
//!   [`nothrow_new_as_first_new_runs_the_new_handler`].
//!
//! The programs are `tests/programs/cxx_new_forms.cpp` (a site function per form of `new`,
//! each freeing with its own forms of `delete`, then the out-of-memory cases: huge `new` caught
//! as `std::bad_alloc`, huge nothrow `new` returning null, new-handlers that count their calls
//! and throw `std::bad_alloc`, throw a type of the program's own, or uninstall themselves) and
//! `tests/programs/cxx_plugin_host.c` with `tests/programs/cxx_plugin.cpp`. Their headers
//! state the ground truth.
//!
//! Each program runs directly, then under `anyprof record -q --cpu-hz 0 --mem-rate 1` and
//! `anyprof record -q --cpu-hz 0` (the default rate), in the same clean environment: stdout,
//! stderr and the exit code must be byte-identical. The programs' stdout holds no usable sizes:
//! they depend on the heap's layout (glibc's aligned blocks carry 0 to 16 bytes of slack, by
//! where they fall), which a profiler in the process changes. Each run writes its per-site
//! tally of usable sizes to a file instead, and the rate-1 profile is compared with the tally
//! of the same run: per site `[alloc_objects, alloc_space, inuse_objects, inuse_space]` must be
//! equal. A sample belongs to the first frame of its stack that is not an `operator new`
//! (libstdc++'s `new` calls `malloc`, so on glibc the hooks see `operator new` frames below the
//! site, as for `site_cxx_array` in `heap_transparency.rs`).
//!
//! Could the exactness checks pass if anyprof missed the allocations? No: every site allocates
//! a known, non-zero number of objects, and the assertion compares all four values with the
//! program's tally, so a site the profiler does not see shows `[0, 0, 0, 0]` against e.g.
//! `[2000, 64000, 100, 3200]`; a profiler that saw the `new`s but not the `delete`s shows
//! `inuse_objects` = 2000 instead of 100. Run against the preload of d5e01e1 (malloc hooks
//! only, before the interposition), the tcmalloc test fails with `[0, 0, 0, 0]` at all nine
//! sites, and the plugin test with `[0, 0, 0, 0]` at `site_plugin` (there its samples stop at
//! libstdc++'s `operator new`). A check that the
//! recorded run really ran on tcmalloc (its usable size of a 24-byte object is 32; glibc's is
//! 24) keeps the tcmalloc test from passing on glibc by accident.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyprof_tests::{
    assert_same_run, clean_command, compile, cpu_lock, heap_record_command, program_source,
    read_profile_in, required_library, run, scratch_dir, ProfileView, RunOutput, Shared,
    HEAP_VARIANTS, JEMALLOC, OTHER_ALLOCATORS, TCMALLOC,
};

/// The sites of `cxx_new_forms.cpp`, one per form of `new`.
const FORM_SITES: [&str; 9] = [
    "site_new",
    "site_new_array",
    "site_new_nothrow",
    "site_new_array_nothrow",
    "site_new_aligned",
    "site_new_aligned_page",
    "site_new_array_aligned",
    "site_new_aligned_nothrow",
    "site_new_array_aligned_nothrow",
];

/// Lines that `cxx_new_forms` must print in its out-of-memory section (the same with
/// libstdc++ and tcmalloc).
const FORMS_OOM_LINES: [&str; 19] = [
    "new huge: threw std::bad_alloc, new-handler calls 0",
    "new[] huge: threw std::bad_alloc, new-handler calls 0",
    "new char[huge]: threw std::bad_alloc, new-handler calls 0",
    "aligned new huge: threw std::bad_alloc, new-handler calls 0",
    "aligned new[] huge: threw std::bad_alloc, new-handler calls 0",
    "nothrow new huge: returned null, new-handler calls 0",
    "nothrow new[] huge: returned null, new-handler calls 0",
    "aligned nothrow new huge: returned null, new-handler calls 0",
    "aligned nothrow new[] huge: returned null, new-handler calls 0",
    "new huge, handler throws bad_alloc on call 3: threw std::bad_alloc, new-handler calls 3",
    "new[] huge, handler throws bad_alloc on call 3: threw std::bad_alloc, new-handler calls 3",
    "aligned new huge, handler throws bad_alloc on call 3: threw std::bad_alloc, new-handler \
     calls 3",
    "nothrow new huge, handler throws bad_alloc on call 3: returned null, new-handler calls 3",
    "aligned nothrow new[] huge, handler throws bad_alloc on call 3: returned null, \
     new-handler calls 3",
    "new huge, handler throws Custom on call 4: threw Custom{4}, new-handler calls 4",
    "aligned new[] huge, handler throws Custom on call 4: threw Custom{4}, new-handler calls 4",
    "new huge, handler uninstalls itself on call 2: threw std::bad_alloc, new-handler calls 2",
    "nothrow new[] huge, handler uninstalls itself on call 2: returned null, new-handler \
     calls 2",
    "new after the failures: ok",
];

/// One program run: directly or recorded.
struct Run {
    output: RunOutput,
    /// The run's per-site tally (from its tally file), if it wrote one.
    tally: BTreeMap<String, [i64; 4]>,
}

/// A program to run: its path, its arguments (`{TALLY}` stands for the tally file's path),
/// and the environment every run gets.
struct Program<'a> {
    name: &'a str,
    exe: &'a Path,
    args: &'a [&'a str],
    env: &'a [(&'a str, &'a str)],
}

impl Program<'_> {
    /// The arguments with `{TALLY}` replaced by `tally`.
    fn args(&self, tally: &Path) -> Vec<String> {
        let tally = tally.to_string_lossy();
        self.args
            .iter()
            .map(|a| a.replace("{TALLY}", &tally))
            .collect()
    }

    fn finish(&self, mut cmd: Command, tally: &Path) -> Run {
        for (k, v) in self.env {
            cmd.env(k, v);
        }
        let _ = std::fs::remove_file(tally);
        let output = run(&mut cmd);
        let tally = std::fs::read_to_string(tally)
            .map(|text| tallies(&text))
            .unwrap_or_default();
        Run { output, tally }
    }

    fn direct(&self, scratch: &Path) -> Run {
        let tally = scratch.join("tally-direct.txt");
        let mut cmd = clean_command(self.exe);
        cmd.args(self.args(&tally));
        self.finish(cmd, &tally)
    }

    /// Recorded into `scratch/profile-<i>` with `flags`; returns the run and the directory.
    fn recorded(&self, scratch: &Path, i: usize, flags: &[&str]) -> (Run, PathBuf) {
        let dir = scratch.join(format!("profile-{i}"));
        let tally = scratch.join(format!("tally-{i}.txt"));
        let args = self.args(&tally);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = heap_record_command(&dir, flags, self.exe, &args);
        (self.finish(cmd, &tally), dir)
    }
}

/// What the exactness tests check: the direct run, and the rate-1 run with its heap profile.
struct Checked {
    direct: Run,
    exact: Run,
    heap: ProfileView,
}

/// Runs `program` directly (it must exit with 0 and print `done`), then recorded at rate 1
/// and at the default rate; asserts every recorded run is indistinguishable from the direct
/// one, and that the rate-1 run wrote a heap profile. Returns the runs for the exactness
/// checks.
fn check_transparent(program: &Program<'_>) -> Checked {
    let name = program.name;
    let scratch = scratch_dir(&format!("cxx_new_{name}"));
    let _cpu = cpu_lock();
    let direct = program.direct(&scratch);
    assert!(
        direct.output.code == 0 && direct.output.stdout_text().lines().any(|l| l == "done"),
        "{name} run directly exited with {} without printing `done`, expected exit 0 and \
         `done` (the test program itself is broken)\nstdout:\n{}\nstderr:\n{}",
        direct.output.code,
        direct.output.stdout_text(),
        direct.output.stderr_text()
    );
    let mut exact = None;
    for (i, (how, flags)) in HEAP_VARIANTS.iter().enumerate() {
        let (recorded, dir) = program.recorded(&scratch, i, flags);
        let how = format!("under `anyprof record -q --cpu-hz 0` at {how}");
        assert_same_run(name, &how, &direct.output, &recorded.output);
        // At the default rate the programs allocate too little for samples to be certain:
        // that run is only about transparency.
        if i == 0 {
            let heap = read_profile_in(&dir, "heap.pb.gz", &recorded.output);
            assert!(
                !heap.profile.sample.is_empty(),
                "{name} {how}: expected a heap profile with samples, found none"
            );
            exact = Some((recorded, heap));
        }
    }
    let (exact, heap) = exact.expect("the first variant is --mem-rate 1");
    Checked {
        direct,
        exact,
        heap,
    }
}

// ---------------------------------------------------------------------------------------
// Ground truth and profile
// ---------------------------------------------------------------------------------------

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

/// The stacks (leaf first, names only) of the samples whose site is `site` or that contain a
/// frame named `site`, with their values: what a failure message shows.
fn stacks_of(view: &ProfileView, site: &str) -> String {
    let mut stacks: BTreeMap<String, [i64; 4]> = BTreeMap::new();
    for sample in &view.profile.sample {
        let frames = view.frames(sample);
        if !frames.iter().any(|f| f.name == site) {
            continue;
        }
        let names: Vec<&str> = frames.iter().map(|f| f.name).collect();
        let v = stacks.entry(names.join(" <- ")).or_default();
        for (slot, value) in v.iter_mut().zip(view.heap_values(sample)) {
            *slot += value;
        }
    }
    if stacks.is_empty() {
        return format!("    (no sample has a frame named {site})\n");
    }
    stacks
        .into_iter()
        .map(|(s, v)| format!("    {s}: {v:?}\n"))
        .collect()
}

/// Asserts that each of `sites` has, in the rate-1 heap profile, exactly the values of the
/// same run's tally.
fn assert_sites_exact(what: &str, checked: &Checked, sites: &[&str]) {
    let truth = &checked.exact.tally;
    assert!(
        sites.iter().all(|s| truth.contains_key(*s)),
        "{what}: expected a tally for each of {sites:?} from the recorded run, found {:?}",
        truth.keys().collect::<Vec<_>>()
    );
    let got = checked.heap.heap_values_by_site();
    let mut failures = Vec::new();
    for site in sites {
        let t = truth[*site];
        let v = got.get(*site).copied().unwrap_or_default();
        if v != t {
            failures.push(format!(
                "{site}: expected [alloc_objects, alloc_space, inuse_objects, inuse_space] = \
                 {t:?} (the program's tally), profile has {v:?}; its stacks:\n{}",
                stacks_of(&checked.heap, site)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{what} at --mem-rate 1:\n{}",
        failures.join("\n")
    );
}

/// Asserts that stdout holds `lines`, in order and contiguous.
fn assert_prints(what: &str, out: &RunOutput, lines: &[&str]) {
    let text = out.stdout_text();
    let expected = lines.join("\n");
    assert!(
        text.contains(&expected),
        "{what}: expected these lines on stdout:\n{expected}\nstdout was:\n{text}\nstderr:\n{}",
        out.stderr_text()
    );
}

// ---------------------------------------------------------------------------------------
// Programs
// ---------------------------------------------------------------------------------------

static FORMS: Shared<PathBuf> = Shared::new();

fn forms_exe() -> &'static Path {
    FORMS.get(|| {
        let scratch = scratch_dir("cxx_new_forms_build");
        compile(
            "cxx_new_forms.cpp",
            &["-O2", "-g", "-std=gnu++17"],
            &scratch,
        )
    })
}

/// The C host and the C++ plugin: (host, plugin).
static PLUGIN: Shared<(PathBuf, PathBuf)> = Shared::new();

fn plugin_host() -> &'static (PathBuf, PathBuf) {
    PLUGIN.get(|| {
        let scratch = scratch_dir("cxx_new_plugin_build");
        let host = compile("cxx_plugin_host.c", &["-O2", "-g"], &scratch);
        let plugin = scratch.join("libcxx_plugin.so");
        let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
        let out = Command::new(&compiler)
            .args(["-shared", "-fPIC", "-O2", "-g", "-std=gnu++17", "-o"])
            .arg(&plugin)
            .arg(program_source("cxx_plugin.cpp"))
            .output()
            .unwrap_or_else(|e| panic!("running `{compiler}`: {e}"));
        assert!(
            out.status.success(),
            "compiling cxx_plugin.cpp into a shared library failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // The host must not bring libstdc++ itself: the point is a libstdc++ that only the
        // plugin's RTLD_LOCAL scope holds.
        let ldd = Command::new("ldd")
            .arg(&host)
            .output()
            .unwrap_or_else(|e| panic!("running ldd: {e}"));
        let deps = String::from_utf8_lossy(&ldd.stdout);
        assert!(
            !deps.contains("libstdc++"),
            "expected cxx_plugin_host not to depend on libstdc++, ldd says:\n{deps}"
        );
        (host, plugin)
    })
}

/// `cxx_new_forms TALLY` directly and recorded, with `env`; checked once per test binary per
/// environment.
fn forms_checked(env: &'static [(&'static str, &'static str)], name: &str) -> Checked {
    let program = Program {
        name,
        exe: forms_exe(),
        args: &["{TALLY}"],
        env,
    };
    let checked = check_transparent(&program);
    let mut expected: Vec<String> = FORM_SITES
        .iter()
        .map(|s| {
            format!(
                "site {} objects=2000 live_objects=100",
                s.trim_start_matches("site_")
            )
        })
        .collect();
    expected.extend(FORMS_OOM_LINES.iter().map(|l| l.to_string()));
    expected.push("done".into());
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    assert_prints(
        &format!("{name} run directly"),
        &checked.direct.output,
        &expected,
    );
    checked
}

static GLIBC_FORMS: Shared<Checked> = Shared::new();
static TCMALLOC_FORMS: Shared<Checked> = Shared::new();
static JEMALLOC_FORMS: Shared<Checked> = Shared::new();

fn glibc_forms() -> &'static Checked {
    GLIBC_FORMS.get(|| forms_checked(&[], "cxx_new_forms"))
}

/// `cxx_new_forms` checked with `library` (tcmalloc or jemalloc) preloaded after anyprof;
/// panics, saying what to install, when it is missing (`.ci/run` installs both).
fn other_allocator_forms(which: &str) -> (&'static str, &'static Checked) {
    let (name, library, package) = OTHER_ALLOCATORS
        .iter()
        .copied()
        .find(|(name, _, _)| *name == which)
        .expect("a known allocator");
    let library = required_library(library, package);
    let (cell, env): (&Shared<Checked>, &'static [(&str, &str)]) = if name == "tcmalloc" {
        (&TCMALLOC_FORMS, &[("LD_PRELOAD", TCMALLOC)])
    } else {
        (&JEMALLOC_FORMS, &[("LD_PRELOAD", JEMALLOC)])
    };
    // anyprof puts its library first and keeps what LD_PRELOAD already holds.
    let checked = cell.get(|| forms_checked(env, &format!("cxx_new_forms on {name}")));
    (library, checked)
}

/// Account mode on `which`: its operators do not call malloc; anyprof calls them and accounts
/// for the blocks itself.
fn check_forms_on(which: &str) {
    let (library, checked) = other_allocator_forms(which);
    // tcmalloc's and jemalloc's usable size of a 24-byte object is 32 (glibc's is 24): the
    // program really ran on that allocator, directly and recorded.
    for (how, run) in [("directly", &checked.direct), ("recorded", &checked.exact)] {
        let t = run.tally.get("site_new").copied().unwrap_or_default();
        assert!(
            t[0] > 0 && t[1] / t[0] == 32,
            "cxx_new_forms with LD_PRELOAD={library} run {how}: expected usable size 32 \
             for `new Obj` ({which}'s size class), found tally {t:?}; it did not run on \
             {which}"
        );
    }
    assert_sites_exact(&format!("cxx_new_forms on {which}"), checked, &FORM_SITES);
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Forward mode: libstdc++'s operators call malloc/free, which the hooks account. Every form,
/// and the out-of-memory behaviour, unchanged at rate 1 and at the default rate; every site
/// exact at rate 1.
#[test]
fn forms_on_glibc_are_exact_at_rate_1() {
    let checked = glibc_forms();
    assert_sites_exact("cxx_new_forms on glibc", checked, &FORM_SITES);
}

/// Account mode: tcmalloc's operators do not call malloc; anyprof calls them and accounts for
/// the blocks itself.
#[test]
fn forms_on_tcmalloc_are_exact_at_rate_1() {
    check_forms_on("tcmalloc");
}

/// Account mode on jemalloc (which exports its own `operator new` and `delete` too).
#[test]
fn forms_on_jemalloc_are_exact_at_rate_1() {
    check_forms_on("jemalloc");
}

/// A C host (no libstdc++) dlopen()s a C++ plugin RTLD_LOCAL, so the next `operator new` is
/// out of dlsym(RTLD_NEXT)'s sight (anyprof finds it among the loaded objects). The plugin's new/delete, and an
/// exception it throws and catches, work as without anyprof, and its site is exact at rate 1.
#[test]
fn cxx_plugin_in_c_host_is_exact() {
    let (host, plugin) = plugin_host();
    let plugin = plugin.to_string_lossy();
    let program = Program {
        name: "cxx_plugin_host run",
        exe: host,
        args: &[&plugin, "run", "{TALLY}"],
        env: &[],
    };
    let checked = check_transparent(&program);
    let mut expected = vec!["plugin objects=6000 live_objects=400".to_string()];
    expected.extend((1..=3).map(|k| {
        format!(
            "plugin caught: plugin exception number {k}, long enough not to fit in a small \
             string"
        )
    }));
    expected.push("done".into());
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    assert_prints(
        "cxx_plugin_host run directly",
        &checked.direct.output,
        &expected,
    );
    assert_sites_exact("the C++ plugin of a C host", &checked, &["site_plugin"]);
}

/// Out of memory in the plugin: a huge `new` must throw std::bad_alloc (and run the
/// new-handler) as it does without anyprof.
#[test]
fn cxx_plugin_out_of_memory_is_unchanged() {
    let (host, plugin) = plugin_host();
    let plugin = plugin.to_string_lossy();
    let program = Program {
        name: "cxx_plugin_host oom",
        exe: host,
        args: &[&plugin, "oom"],
        env: &[],
    };
    let checked = check_transparent(&program);
    assert_prints(
        "cxx_plugin_host oom run directly",
        &checked.direct.output,
        &[
            "plugin new huge: threw std::bad_alloc, new-handler calls 0",
            "plugin nothrow new huge: returned null, new-handler calls 0",
            "plugin new huge, handler throws on call 3: threw std::bad_alloc, new-handler calls 3",
            "plugin nothrow new huge, handler throws on call 3: returned null, new-handler \
             calls 3",
            "done",
        ],
    );
}

/// The call that decides the mode takes the malloc route; when that is a nothrow `new` that
/// fails, the new-handler must still run, as it does in libstdc++'s.
#[test]
fn nothrow_new_as_first_new_runs_the_new_handler() {
    let program = Program {
        name: "cxx_new_forms nothrow-first",
        exe: forms_exe(),
        args: &["nothrow-first"],
        env: &[],
    };
    let checked = check_transparent(&program);
    assert_prints(
        "cxx_new_forms nothrow-first run directly",
        &checked.direct.output,
        &[
            "first new of the process: nothrow new huge, handler throws bad_alloc on call 2: \
             returned null, new-handler calls 2",
            "then new huge: threw std::bad_alloc, new-handler calls 0",
            "done",
        ],
    );
}
