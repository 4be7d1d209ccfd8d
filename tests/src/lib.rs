//! The harness of anyprof's end-to-end tests.
//!
//! The tests under `tests/tests/` check the product from the outside, the way a user meets it:
//! they build small C and C++ programs from `tests/programs/` (each file's header states its
//! ground truth: which functions burn how much CPU, on which threads), run them under
//! `anyprof record`, decode the `cpu.pb.gz` it writes and compare what the profile says with
//! what the program is known to do.
//!
//! This crate holds what those tests share:
//!
//! * [`binaries`] finds the release build of `anyprof` and `libanyprof.so` (the tests do not
//!   build them; `make test` runs `cargo build --release --workspace` first).
//! * [`scratch_dir`] and [`compile`] give each test its own directory under
//!   `<target>/anyprof-tests/` and build a test program into it.
//! * [`record`] runs `anyprof record -q` with a clean environment and a timeout, and
//!   [`clean_command`] / [`run`] do the same for runs without the profiler.
//! * [`ProfileView`] answers the questions the tests ask of a decoded profile (self and
//!   cumulative samples per function, samples and CPU time per thread, how many stacks were
//!   unwound to the root) and renders it as a normalised text dump ([`ProfileView::dump`]: one
//!   `root;...;leaf count` line per stack, names only, sorted) that failing tests print.
//! * [`cpu_lock`] serialises the tests whose numbers depend on having the CPU to themselves,
//!   and [`Shared`] lets several tests check one recording without recording it again.
//! * [`daemon`] starts `anyprof serve` and talks HTTP to it, for the tests of the daemon.
//!
//! Everything here panics with a message that says what went wrong and what to do next: these
//! are test helpers, and a panic is how a test fails.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod daemon;

pub use anyprof::pprof::proto;
pub use anyprof::pprof::Profile;

/// How long any single program run may take before the harness kills it and fails the test.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// Function names that mark the root end of a fully unwound stack: the program's entry
/// (`_start`, the libc start-up functions, `main`) and a thread's entry (`start_thread`,
/// `clone`, `clone3`). The double-underscore spellings are the names glibc's dynamic symbol
/// table uses for the same code (`__libc_start_main_impl` is the 2.34+ implementation name).
pub const ROOT_FUNCTIONS: &[&str] = &[
    "main",
    "_start",
    "__libc_start_main",
    "__libc_start_main_impl",
    "__libc_start_call_main",
    "start_thread",
    "clone",
    "__clone",
    "clone3",
    "__clone3",
];

/// The synthetic frames the profiler adds; they are not code and never count as a root.
pub const SYNTHETIC_FUNCTIONS: &[&str] = &[LOST_SAMPLES, TRUNCATED_STACK];

/// Name of the synthetic leaf of samples dropped inside the profiled process.
pub const LOST_SAMPLES: &str = "[lost samples]";

/// Name of the synthetic frame at the root end of a stack whose unwinding stopped early.
pub const TRUNCATED_STACK: &str = "[truncated stack]";

/// The workspace root (the directory above this crate).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` if set (at run time, else at build time;
/// relative paths are taken from the workspace root), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    let configured = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_TARGET_DIR").map(PathBuf::from));
    match configured {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// The product under test: the collector binary and the preload library.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `target/release/anyprof`.
    pub anyprof: PathBuf,
    /// `target/release/libanyprof.so`.
    pub preload: PathBuf,
}

/// Finds the release build of `anyprof` and `libanyprof.so`, or panics telling the user how to
/// build them.
pub fn binaries() -> Binaries {
    let release = target_dir().join("release");
    let found = Binaries {
        anyprof: release.join("anyprof"),
        preload: release.join("libanyprof.so"),
    };
    for path in [&found.anyprof, &found.preload] {
        assert!(
            path.is_file(),
            "{} does not exist. The end-to-end tests run the release build of the product: \
             run `make test`, or `cargo build --release --workspace` before \
             `cargo test --release -p anyprof-tests`.",
            path.display()
        );
    }
    found
}

/// A fresh, empty directory `<target>/anyprof-tests/<name>` for one test's files.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = target_dir().join("anyprof-tests").join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .unwrap_or_else(|e| panic!("removing old scratch dir {}: {e}", dir.display()));
    }
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("creating scratch dir {}: {e}", dir.display()));
    dir
}

/// Path of a test program's source file in `tests/programs/`.
pub fn program_source(file_name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("programs")
        .join(file_name)
}

/// Compiles `tests/programs/<source>` with `flags` into `<dir>/<stem>` and returns the
/// executable's path. C files use `$CC` (default `cc`), C++ files `$CXX` (default `c++`).
pub fn compile(source: &str, flags: &[&str], dir: &Path) -> PathBuf {
    let src = program_source(source);
    let src_path = Path::new(source);
    let stem = src_path
        .file_stem()
        .and_then(OsStr::to_str)
        .expect("source file has a stem");
    let is_cxx = matches!(
        src_path.extension().and_then(OsStr::to_str),
        Some("cpp" | "cc" | "cxx")
    );
    let (var, default) = if is_cxx { ("CXX", "c++") } else { ("CC", "cc") };
    let compiler = std::env::var(var).unwrap_or_else(|_| default.to_string());
    let exe = dir.join(stem);
    let output = Command::new(&compiler)
        .args(flags)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| {
            panic!("running the compiler `{compiler}` (install gcc/g++, or set ${var}): {e}")
        });
    assert!(
        output.status.success(),
        "compiling {} with `{compiler} {}` failed ({}):\n{}",
        src.display(),
        flags.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}

/// A command for `program` with an environment free of anything that would load or configure
/// the profiler (`LD_PRELOAD`, `ANYPROF_*`, and `DEBUGINFOD_URLS`, which would send the
/// symbolizer to the network), so runs with and without it differ only in what the test adds.
pub fn clean_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_remove("LD_PRELOAD");
    cmd.env_remove("DEBUGINFOD_URLS");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ANYPROF_") {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// The exit code, or 128 + signal number if the process was killed by a signal.
    pub code: i32,
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
    /// Wall time of the run.
    pub wall: Duration,
}

impl RunOutput {
    /// stdout as text (lossy).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text (lossy).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// The exit code of `status`, or 128 + signal number, as a shell reports it.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => -1,
    }
}

/// Starts reading a spawned child's piped stdout and stderr to the end, each on a thread of
/// its own (so neither pipe can fill up and stall the child).
pub fn capture_output(
    child: &mut std::process::Child,
) -> (
    std::thread::JoinHandle<Vec<u8>>,
    std::thread::JoinHandle<Vec<u8>>,
) {
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let read_all = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    (read_all(Box::new(stdout)), read_all(Box::new(stderr)))
}

/// Runs `cmd` with stdin closed and stdout/stderr captured; kills it and panics after
/// [`RUN_TIMEOUT`].
pub fn run(cmd: &mut Command) -> RunOutput {
    let description = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {description}: {e}"));
    let (out_reader, err_reader) = capture_output(&mut child);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > RUN_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{description} did not finish within {RUN_TIMEOUT:?}; killed it");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for {description}: {e}"),
        }
    };
    let wall = start.elapsed();
    RunOutput {
        code: exit_code(status),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        wall,
    }
}

/// One `anyprof record` run: its output and the directory the profiles went to.
#[derive(Debug, Clone)]
pub struct Recording {
    /// The `-o` directory.
    pub dir: PathBuf,
    /// The sampling rate that was asked for.
    pub hz: u32,
    /// What `anyprof record -q` printed and returned (which, with `-q`, is the program's).
    pub output: RunOutput,
}

impl Recording {
    /// Path of the program's own CPU profile (see [`program_profile_path`]).
    pub fn cpu_profile_path(&self) -> PathBuf {
        program_profile_path(&self.dir, "cpu")
    }

    /// Decodes the whole run's CPU profile (`cpu.pb.gz`: every process), or panics.
    pub fn run_cpu_profile(&self) -> ProfileView {
        read_profile_in(&self.dir, "cpu.pb.gz", &self.output)
    }

    /// Decodes the program's own CPU profile (see [`program_profile_path`]), or panics with
    /// what the run printed.
    pub fn cpu_profile(&self) -> ProfileView {
        let path = self.cpu_profile_path();
        let profile = anyprof::pprof::read_file(&path).unwrap_or_else(|e| {
            panic!(
                "could not read the profile {}: {e:#}\nexit code {}\nstdout:\n{}\nstderr:\n{}\n\
                 files in {}: {:?}",
                path.display(),
                self.output.code,
                self.output.stdout_text(),
                self.output.stderr_text(),
                self.dir.display(),
                files_in(&self.dir),
            )
        });
        ProfileView::new(profile)
    }
}

/// The sample types of a heap profile, in Go's order.
pub const HEAP_VALUES: [&str; 4] = [
    "alloc_objects",
    "alloc_space",
    "inuse_objects",
    "inuse_space",
];

/// Says that the running test cannot run here, and why; the caller then returns. Only a reason that
/// never holds in CI may skip a test (not being root, a kernel feature a developer's machine
/// lacks): CI runs as root on a machine where `.ci/run` installed every tool the tests use.
/// Under CI (`CI` is set, as it is for `.ci/run`) skipping is a failure, so no test can pass
/// there without having run. A missing tool is never a reason: call [`required_library`] or
/// panic with what to install.
pub fn skip_outside_ci(why: &str) {
    // libtest names each test's thread after the test.
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("this test");
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} cannot run: {why}. In CI every test must run (it runs as root, with what \
         .ci/run installs)"
    );
    eprintln!("SKIPPED {test}: {why}");
}

/// Where Debian/Ubuntu's libgoogle-perftools4 puts tcmalloc.
pub const TCMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4";

/// Where Debian/Ubuntu's libjemalloc2 puts jemalloc.
pub const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";

/// The other allocators the heap tests preload after anyprof: (name for messages, library,
/// the Debian package that installs it; `.ci/run` installs them).
pub const OTHER_ALLOCATORS: [(&str, &str, &str); 2] = [
    ("tcmalloc", TCMALLOC, "libgoogle-perftools4"),
    ("jemalloc", JEMALLOC, "libjemalloc2"),
];

/// `library`, or a panic telling how to install it: a test that needs a library fails when it
/// is missing rather than passing without having run (CI installs it, see `.ci/run`).
pub fn required_library(library: &'static str, package: &str) -> &'static str {
    assert!(
        Path::new(library).is_file(),
        "{library} is not installed; this test needs it: apt-get install {package} \
         (.ci/run installs it)"
    );
    library
}

/// The heap-profiling variants the transparency tests record: the flags after `--cpu-hz 0`,
/// and a name for messages.
pub const HEAP_VARIANTS: [(&str, &[&str]); 2] = [
    ("--mem-rate 1", &["--mem-rate", "1"]),
    ("the default rate", &[]),
];

/// `anyprof record -q -o DIR --cpu-hz 0 FLAGS -- program ARGS` in a clean environment: a
/// heap-only recording.
pub fn heap_record_command(dir: &Path, flags: &[&str], program: &Path, args: &[&str]) -> Command {
    let bins = binaries();
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let mut cmd = clean_command(&bins.anyprof);
    cmd.arg("record")
        .arg("-q")
        .arg("-o")
        .arg(dir)
        .args(["--cpu-hz", "0"])
        .args(flags)
        .arg("--")
        .arg(program)
        .args(args);
    cmd
}

/// The pid and command name of the program itself in the run whose profiles are in `dir`:
/// the run's profiles (`cpu.pb.gz`, else `heap.pb.gz`) name it in a comment,
/// `pid N COMMAND (the program)`.
pub fn program_process(dir: &Path) -> Option<(u32, String)> {
    ["cpu.pb.gz", "heap.pb.gz"].iter().find_map(|file| {
        let profile = anyprof::pprof::read_file(&dir.join(file)).ok()?;
        profile.comment.iter().find_map(|&i| {
            let text = profile.string_table.get(i as usize)?;
            let list = text.strip_prefix("anyprof: the whole run, ")?;
            let (_, list) = list.split_once(": ")?;
            let program = list
                .split(", ")
                .find_map(|p| p.strip_suffix(" (the program)"))?;
            let (pid, name) = program.strip_prefix("pid ")?.split_once(' ')?;
            Some((pid.parse().ok()?, name.to_string()))
        })
    })
}

/// The pid of the program itself (see [`program_process`]).
pub fn program_pid(dir: &Path) -> Option<u32> {
    program_process(dir).map(|(pid, _)| pid)
}

/// The own file of process `pid` (`KIND.PID.COMMAND.pb.gz`, written when the run had more
/// than one process), if there is one.
pub fn process_profile_path(dir: &Path, kind: &str, pid: u32) -> Option<PathBuf> {
    let prefix = format!("{kind}.{pid}.");
    files_in(dir)
        .into_iter()
        .find(|n| n.starts_with(&prefix) && n.ends_with(".pb.gz"))
        .map(|n| dir.join(n))
}

/// The program's own profile of `kind` (`cpu`, `heap`, `allocs`): its own file when the run
/// had several processes, else `KIND.pb.gz` (which then holds the program alone).
pub fn program_profile_path(dir: &Path, kind: &str) -> PathBuf {
    let Some((pid, name)) = program_process(dir) else {
        return dir.join(format!("{kind}.pb.gz"));
    };
    // An earlier image of the same pid (before an exec) has a file with the same pid.
    let exact = dir.join(format!("{kind}.{pid}.{name}.pb.gz"));
    if exact.is_file() {
        return exact;
    }
    process_profile_path(dir, kind, pid).unwrap_or_else(|| dir.join(format!("{kind}.pb.gz")))
}

/// The own files (`KIND.PID.COMMAND.pb.gz`) of the processes of the run in `dir` other than
/// the program (an image its pid had before an exec is one of them).
pub fn other_process_files(dir: &Path, kind: &str) -> Vec<PathBuf> {
    let prefix = format!("{kind}.");
    let program = program_profile_path(dir, kind);
    files_in(dir)
        .into_iter()
        .filter(|n| {
            n.starts_with(&prefix) && n.ends_with(".pb.gz") && *n != format!("{kind}.pb.gz")
        })
        .map(|n| dir.join(n))
        .filter(|path| *path != program)
        .collect()
}

/// Decodes `dir/file`, or panics with what the run (`output`) printed.
pub fn read_profile_in(dir: &Path, file: &str, output: &RunOutput) -> ProfileView {
    let path = dir.join(file);
    let profile = anyprof::pprof::read_file(&path).unwrap_or_else(|e| {
        panic!(
            "could not read {}: {e:#}\nexit code {}\nstdout:\n{}\nstderr:\n{}",
            path.display(),
            output.code,
            output.stdout_text(),
            output.stderr_text()
        )
    });
    ProfileView::new(profile)
}

/// Asserts that `other` (program `name` run `how`) is indistinguishable from `direct`: the
/// same exit code, stdout and stderr, byte for byte.
pub fn assert_same_run(name: &str, how: &str, direct: &RunOutput, other: &RunOutput) {
    assert_eq!(
        other.code,
        direct.code,
        "{name} exited with {} {how}, but with {} when run directly\nstdout {how}:\n{}\n\
         stderr {how}:\n{}",
        other.code,
        direct.code,
        other.stdout_text(),
        other.stderr_text()
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

/// The file names in `dir`, sorted (empty if it cannot be read).
pub fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            let mut names: Vec<String> = entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        })
        .unwrap_or_default()
}

/// Runs `anyprof record -q -o <scratch>/profile --cpu-hz <hz> -- program args...` with a clean
/// environment (see [`clean_command`]).
pub fn record(scratch: &Path, hz: u32, program: &Path, args: &[&str]) -> Recording {
    record_with(scratch, hz, program, args, |_| {})
}

/// Like [`record`], with a hook to adjust the command (environment, working directory) first.
pub fn record_with(
    scratch: &Path,
    hz: u32,
    program: &Path,
    args: &[&str],
    adjust: impl FnOnce(&mut Command),
) -> Recording {
    let bins = binaries();
    let dir = scratch.join("profile");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("creating output dir {}: {e}", dir.display()));
    let mut cmd = clean_command(&bins.anyprof);
    cmd.arg("record")
        .arg("-q")
        .arg("-o")
        .arg(&dir)
        .arg("--cpu-hz")
        .arg(hz.to_string())
        .arg("--")
        .arg(program)
        .args(args);
    adjust(&mut cmd);
    let output = run(&mut cmd);
    Recording { dir, hz, output }
}

/// A lock that the tests whose numbers depend on CPU time take, so that they do not run at the
/// same time as each other. It is an `flock` on `<target>/anyprof-tests/cpu.lock`, so it holds
/// across threads, test binaries and test runners that start one process per test.
pub struct CpuLock {
    _file: File,
}

/// Takes the [`CpuLock`] (blocking until it is free).
pub fn cpu_lock() -> CpuLock {
    cpu_lock_as(libc::LOCK_EX)
}

/// Takes the [`CpuLock`] shared: for the long suites that compare a program's outcomes with
/// and without the profiler (CPython's and GLib's tests, mostly waiting, each comparing runs
/// made under the same load). They run beside each other, never beside a test whose numbers
/// depend on CPU time, which takes the lock alone.
pub fn cpu_lock_shared() -> CpuLock {
    cpu_lock_as(libc::LOCK_SH)
}

fn cpu_lock_as(mode: libc::c_int) -> CpuLock {
    use std::os::fd::AsRawFd;
    let dir = target_dir().join("anyprof-tests");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let path = dir.join("cpu.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    loop {
        // SAFETY: flock takes a file descriptor and flags; the descriptor is owned by `file`,
        // which is open for the whole call and stays open as long as the lock is held.
        let rc = unsafe { libc::flock(file.as_raw_fd(), mode) };
        if rc == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            panic!("locking {}: {err}", path.display());
        }
    }
    // The lock is released when the file is closed, i.e. when the CpuLock is dropped.
    CpuLock { _file: file }
}

/// A value built once per test binary and shared by several tests (typically a recording that
/// several tests check). If building it panics, every test that asks for it fails with that
/// panic's message, without building it again.
pub struct Shared<T> {
    cell: OnceLock<Result<T, String>>,
}

impl<T> Shared<T> {
    /// An empty cell, for a `static`.
    pub const fn new() -> Self {
        Self {
            cell: OnceLock::new(),
        }
    }

    /// The shared value, built by `make` on first use.
    pub fn get(&self, make: impl FnOnce() -> T) -> &T {
        let result = self.cell.get_or_init(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(make)).map_err(|payload| {
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "(non-string panic)".to_string())
            })
        });
        match result {
            Ok(value) => value,
            Err(message) => panic!("setting up this test's shared input failed: {message}"),
        }
    }
}

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether `name` is the collector's name for an address it could not name:
/// `MODULE+0xADDR` (`liblzma.so.5+0x15b76`).
pub fn is_address_name(name: &str) -> bool {
    name.rsplit_once("+0x").is_some_and(|(module, hex)| {
        !module.is_empty() && !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// One frame of a stack as the profile names it: one `Line` of a `Location`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// `Function.name` (demangled; `MODULE+0xADDR` where the collector found no name, see
    /// [`is_address_name`]), or `[unsymbolized <mapping file name>]` for a Location without
    /// Lines (not looked up).
    pub name: &'a str,
    /// `Function.system_name` (mangled); empty for an unsymbolized Location.
    pub system_name: &'a str,
    /// `Function.filename`; empty if unknown.
    pub filename: &'a str,
    /// `Line.line`; 0 if unknown.
    pub line: i64,
}

/// A decoded profile with indexes, and the questions the tests ask of it.
pub struct ProfileView {
    /// The decoded profile.
    pub profile: Profile,
    functions: BTreeMap<u64, usize>,
    locations: BTreeMap<u64, usize>,
    mappings: BTreeMap<u64, usize>,
    unsymbolized_names: BTreeMap<u64, String>,
}

impl ProfileView {
    /// Indexes `profile`. Panics if an id it refers to does not exist (pprof rejects such
    /// profiles too).
    pub fn new(profile: Profile) -> Self {
        let functions = profile
            .function
            .iter()
            .enumerate()
            .map(|(i, f)| (f.id, i))
            .collect();
        let locations = profile
            .location
            .iter()
            .enumerate()
            .map(|(i, l)| (l.id, i))
            .collect();
        let mappings = profile
            .mapping
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id, i))
            .collect();
        let mut view = Self {
            profile,
            functions,
            locations,
            mappings,
            unsymbolized_names: BTreeMap::new(),
        };
        let mut unsymbolized = BTreeMap::new();
        for loc in view.profile.location.iter().filter(|l| l.line.is_empty()) {
            let file = view
                .mappings
                .get(&loc.mapping_id)
                .map(|&i| view.string(view.profile.mapping[i].filename))
                .unwrap_or("");
            let base = file.rsplit('/').next().unwrap_or(file);
            let name = if base.is_empty() {
                "[unsymbolized]".to_string()
            } else {
                format!("[unsymbolized {base}]")
            };
            unsymbolized.insert(loc.id, name);
        }
        view.unsymbolized_names = unsymbolized;
        view
    }

    /// `string_table[index]`; panics if out of range.
    pub fn string(&self, index: i64) -> &str {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.profile.string_table.get(i))
            .unwrap_or_else(|| {
                panic!(
                    "string index {index} out of range (string_table has {} entries)",
                    self.profile.string_table.len()
                )
            })
    }

    /// The `Function` with this id; panics if there is none.
    pub fn function(&self, id: u64) -> &proto::Function {
        let i = self
            .functions
            .get(&id)
            .unwrap_or_else(|| panic!("a Line refers to function id {id}, which does not exist"));
        &self.profile.function[*i]
    }

    /// The `Location` with this id; panics if there is none.
    pub fn location(&self, id: u64) -> &proto::Location {
        let i = self
            .locations
            .get(&id)
            .unwrap_or_else(|| panic!("a Sample refers to location id {id}, which does not exist"));
        &self.profile.location[*i]
    }

    /// The frames of one Location, innermost (inlined) first, the physical function last.
    pub fn location_frames(&self, location: &proto::Location) -> Vec<Frame<'_>> {
        if location.line.is_empty() {
            let name = self
                .unsymbolized_names
                .get(&location.id)
                .map(String::as_str)
                .unwrap_or("[unsymbolized]");
            return vec![Frame {
                name,
                system_name: "",
                filename: "",
                line: 0,
            }];
        }
        location
            .line
            .iter()
            .map(|line| {
                let f = self.function(line.function_id);
                Frame {
                    name: self.string(f.name),
                    system_name: self.string(f.system_name),
                    filename: self.string(f.filename),
                    line: line.line,
                }
            })
            .collect()
    }

    /// All frames of a sample, leaf first, with inlined frames expanded (so the last frame is
    /// the physical function of the root-most Location).
    pub fn frames(&self, sample: &proto::Sample) -> Vec<Frame<'_>> {
        sample
            .location_id
            .iter()
            .flat_map(|&id| self.location_frames(self.location(id)))
            .collect()
    }

    /// A heap profile sample's `[alloc_objects, alloc_space, inuse_objects, inuse_space]`.
    pub fn heap_values(&self, sample: &proto::Sample) -> [i64; 4] {
        let mut v = [0; 4];
        for (slot, t) in v.iter_mut().zip(HEAP_VALUES) {
            *slot = sample.value[self.value_index(t)];
        }
        v
    }

    /// A heap profile's values summed per allocation site: the first frame of each stack that
    /// is not an `operator new` (libstdc++'s calls malloc, so on glibc it is below the site).
    pub fn heap_values_by_site(&self) -> BTreeMap<String, [i64; 4]> {
        let mut out: BTreeMap<String, [i64; 4]> = BTreeMap::new();
        for sample in &self.profile.sample {
            let frames = self.frames(sample);
            let Some(site) = frames.iter().find(|f| !f.name.starts_with("operator new")) else {
                continue;
            };
            let v = out.entry(site.name.to_string()).or_default();
            for (slot, value) in v.iter_mut().zip(self.heap_values(sample)) {
                *slot += value;
            }
        }
        out
    }

    /// Index of the value whose `sample_type.type` is `type_name`; panics if there is none.
    pub fn value_index(&self, type_name: &str) -> usize {
        self.profile
            .sample_type
            .iter()
            .position(|vt| self.string(vt.r#type) == type_name)
            .unwrap_or_else(|| {
                panic!(
                    "the profile has no sample type {type_name:?}; it has {:?}",
                    self.sample_types()
                )
            })
    }

    /// `sample_type` as `(type, unit)` pairs.
    pub fn sample_types(&self) -> Vec<(String, String)> {
        self.profile
            .sample_type
            .iter()
            .map(|vt| {
                (
                    self.string(vt.r#type).to_string(),
                    self.string(vt.unit).to_string(),
                )
            })
            .collect()
    }

    /// `period_type` as a `(type, unit)` pair, if present.
    pub fn period_type(&self) -> Option<(String, String)> {
        self.profile.period_type.as_ref().map(|vt| {
            (
                self.string(vt.r#type).to_string(),
                self.string(vt.unit).to_string(),
            )
        })
    }

    /// The sample count of a sample (its `samples` value).
    pub fn count(&self, sample: &proto::Sample) -> i64 {
        sample.value[self.value_index("samples")]
    }

    /// Total of the `samples` values.
    pub fn total_samples(&self) -> i64 {
        let i = self.value_index("samples");
        self.profile.sample.iter().map(|s| s.value[i]).sum()
    }

    /// Samples per function counted at the leaf only: the first (innermost) Line of each
    /// sample's leaf Location.
    pub fn self_samples(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for sample in &self.profile.sample {
            let Some(&leaf) = sample.location_id.first() else {
                continue;
            };
            if let Some(frame) = self.location_frames(self.location(leaf)).first() {
                *out.entry(frame.name.to_string()).or_insert(0) += self.count(sample);
            }
        }
        out
    }

    /// Samples per function counted wherever the function is on the stack, once per sample
    /// (recursion and repeated inlining do not count twice).
    pub fn cumulative_samples(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for sample in &self.profile.sample {
            let names: BTreeSet<&str> = self.frames(sample).iter().map(|f| f.name).collect();
            for name in names {
                *out.entry(name.to_string()).or_insert(0) += self.count(sample);
            }
        }
        out
    }

    /// The numeric label `key` of a sample, if it has one.
    pub fn num_label(&self, sample: &proto::Sample, key: &str) -> Option<i64> {
        sample
            .label
            .iter()
            .find(|l| l.str == 0 && self.string(l.key) == key)
            .map(|l| l.num)
    }

    /// The string label `key` of a sample, if it has one.
    pub fn str_label<'a>(&'a self, sample: &proto::Sample, key: &str) -> Option<&'a str> {
        sample
            .label
            .iter()
            .find(|l| l.str != 0 && self.string(l.key) == key)
            .map(|l| self.string(l.str))
    }

    /// Sum of the value `type_name` per `tid` label (samples without one are left out).
    pub fn value_by_tid(&self, type_name: &str) -> BTreeMap<i64, i64> {
        let i = self.value_index(type_name);
        let mut out = BTreeMap::new();
        for sample in &self.profile.sample {
            if let Some(tid) = self.num_label(sample, "tid") {
                *out.entry(tid).or_insert(0) += sample.value[i];
            }
        }
        out
    }

    /// Samples per `tid` label.
    pub fn samples_by_tid(&self) -> BTreeMap<i64, i64> {
        self.value_by_tid("samples")
    }

    /// Measured CPU nanoseconds (the `cpu` value) per `tid` label.
    pub fn cpu_ns_by_tid(&self) -> BTreeMap<i64, i64> {
        self.value_by_tid("cpu")
    }

    /// The `thread` labels seen for each `tid` label.
    pub fn thread_names_by_tid(&self) -> BTreeMap<i64, BTreeSet<String>> {
        let mut out: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
        for sample in &self.profile.sample {
            if let Some(tid) = self.num_label(sample, "tid") {
                let name = self.str_label(sample, "thread").unwrap_or("").to_string();
                out.entry(tid).or_default().insert(name);
            }
        }
        out
    }

    /// The root-most frame of a sample that is not a synthetic frame
    /// ([`SYNTHETIC_FUNCTIONS`]), if any.
    pub fn root_frame<'a>(&'a self, sample: &proto::Sample) -> Option<Frame<'a>> {
        self.frames(sample)
            .into_iter()
            .rev()
            .find(|f| !SYNTHETIC_FUNCTIONS.contains(&f.name))
    }

    /// Whether a sample's stack was unwound to the root: it is not marked truncated and its
    /// root-most real frame is one of [`ROOT_FUNCTIONS`].
    pub fn reaches_root(&self, sample: &proto::Sample) -> bool {
        let frames = self.frames(sample);
        if frames.iter().any(|f| f.name == TRUNCATED_STACK) {
            return false;
        }
        self.root_frame(sample)
            .is_some_and(|f| ROOT_FUNCTIONS.contains(&f.name))
    }

    /// Fraction of samples (by `samples` value, lost samples included) whose stack reached the
    /// root (see [`ProfileView::reaches_root`]); 0 for an empty profile.
    pub fn root_reached_fraction(&self) -> f64 {
        let total = self.total_samples();
        if total == 0 {
            return 0.0;
        }
        let reached: i64 = self
            .profile
            .sample
            .iter()
            .filter(|s| self.reaches_root(s))
            .map(|s| self.count(s))
            .sum();
        reached as f64 / total as f64
    }

    /// Root-most real frame names of the samples that did not reach the root, with their
    /// sample counts, to explain a low [`ProfileView::root_reached_fraction`].
    pub fn unrooted_roots(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for sample in self.profile.sample.iter().filter(|s| !self.reaches_root(s)) {
            let frames = self.frames(sample);
            let mut name = self
                .root_frame(sample)
                .map(|f| f.name.to_string())
                .unwrap_or_else(|| "(no frames)".to_string());
            if frames.iter().any(|f| f.name == TRUNCATED_STACK) {
                name.push_str(" + [truncated stack]");
            }
            *out.entry(name).or_insert(0) += self.count(sample);
        }
        out
    }

    /// Normalised text dump: one line per distinct stack, `root;...;leaf count` with function
    /// names only (inlined frames expanded, no addresses, labels or timestamps), sorted, and
    /// the counts of identical stacks added up.
    pub fn dump(&self) -> String {
        let mut stacks: BTreeMap<String, i64> = BTreeMap::new();
        for sample in &self.profile.sample {
            let names: Vec<&str> = self.frames(sample).iter().rev().map(|f| f.name).collect();
            *stacks.entry(names.join(";")).or_insert(0) += self.count(sample);
        }
        let mut out = String::new();
        for (stack, count) in stacks {
            out.push_str(&stack);
            out.push(' ');
            out.push_str(&count.to_string());
            out.push('\n');
        }
        out
    }

    /// Every comment of the profile, as text.
    pub fn comment_lines(&self) -> Vec<&str> {
        self.profile
            .comment
            .iter()
            .map(|&i| self.string(i))
            .collect()
    }

    /// The `# Name = value` comments of the profile (the exact counters heap profiles carry).
    pub fn comments(&self) -> BTreeMap<String, String> {
        self.profile
            .comment
            .iter()
            .filter_map(|&i| {
                let text = self.string(i).strip_prefix("# ")?;
                let (k, v) = text.split_once(" = ")?;
                Some((k.to_string(), v.to_string()))
            })
            .collect()
    }

    /// A short summary for failure messages: sample types, totals, per-thread counts, then the
    /// normalised dump.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "sample_type {:?}, period_type {:?}, period {}, {} samples in {} Sample messages\n",
            self.sample_types(),
            self.period_type(),
            self.profile.period,
            self.total_samples(),
            self.profile.sample.len()
        );
        let names = self.thread_names_by_tid();
        let cpu = self.cpu_ns_by_tid();
        for (tid, count) in self.samples_by_tid() {
            out.push_str(&format!(
                "  tid {tid} {:?}: {count} samples, {} cpu ns\n",
                names.get(&tid).cloned().unwrap_or_default(),
                cpu.get(&tid).copied().unwrap_or(0)
            ));
        }
        out.push_str("normalised dump (root;...;leaf count):\n");
        out.push_str(&self.dump());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Function, Label, Line, Location, Sample, ValueType};

    /// A hand-built profile: strings are interned in order, ids from 1.
    struct Builder {
        profile: Profile,
    }

    impl Builder {
        fn new() -> Self {
            let mut b = Self {
                profile: Profile::default(),
            };
            b.profile.string_table.push(String::new());
            let (samples, count, cpu, ns) =
                (b.s("samples"), b.s("count"), b.s("cpu"), b.s("nanoseconds"));
            b.profile.sample_type = vec![
                ValueType {
                    r#type: samples,
                    unit: count,
                },
                ValueType {
                    r#type: cpu,
                    unit: ns,
                },
            ];
            b
        }

        fn s(&mut self, text: &str) -> i64 {
            if let Some(i) = self.profile.string_table.iter().position(|s| s == text) {
                return i as i64;
            }
            self.profile.string_table.push(text.to_string());
            (self.profile.string_table.len() - 1) as i64
        }

        fn function(&mut self, name: &str) -> u64 {
            let n = self.s(name);
            if let Some(f) = self.profile.function.iter().find(|f| f.name == n) {
                return f.id;
            }
            let id = self.profile.function.len() as u64 + 1;
            let file = self.s("prog.c");
            self.profile.function.push(Function {
                id,
                name: n,
                system_name: n,
                filename: file,
                start_line: 0,
            });
            id
        }

        /// A Location whose Lines are `names`, innermost first.
        fn location(&mut self, names: &[&str]) -> u64 {
            let line = names
                .iter()
                .enumerate()
                .map(|(i, name)| Line {
                    function_id: self.function(name),
                    line: 10 + i as i64,
                    column: 0,
                })
                .collect();
            let id = self.profile.location.len() as u64 + 1;
            self.profile.location.push(Location {
                id,
                mapping_id: 0,
                address: 0x1000 + id,
                line,
                is_folded: false,
            });
            id
        }

        /// A sample over `stack` (leaf first; each element a Location's Lines).
        fn sample(&mut self, stack: &[&[&str]], count: i64, tid: i64, thread: &str) {
            let location_id = stack.iter().map(|lines| self.location(lines)).collect();
            let label = vec![
                Label {
                    key: self.s("thread"),
                    str: self.s(thread),
                    num: 0,
                    num_unit: 0,
                },
                Label {
                    key: self.s("tid"),
                    str: 0,
                    num: tid,
                    num_unit: 0,
                },
            ];
            self.profile.sample.push(Sample {
                location_id,
                value: vec![count, count * 10_000_000],
                label,
            });
        }
    }

    fn example() -> ProfileView {
        let mut b = Builder::new();
        b.sample(
            &[&["hot_a"], &["phase_a"], &["main"], &["_start"]],
            5,
            100,
            "main",
        );
        // Inlined: helper inlined into hot_b; recursion on mid_b.
        b.sample(
            &[&["helper", "hot_b"], &["mid_b"], &["mid_b"], &["main"]],
            3,
            100,
            "main",
        );
        b.sample(
            &[&["work"], &["start_thread"], &["clone3"]],
            2,
            101,
            "worker-1",
        );
        b.sample(
            &[&["work"], &["lib_fn"], &[TRUNCATED_STACK]],
            1,
            101,
            "worker-1",
        );
        b.sample(&[&[LOST_SAMPLES]], 4, 101, "worker-1");
        // Same stack as the first sample, separate message: the dump adds them up.
        b.sample(
            &[&["hot_a"], &["phase_a"], &["main"], &["_start"]],
            1,
            100,
            "main",
        );
        ProfileView::new(b.profile)
    }

    #[test]
    fn dump_lists_each_stack_root_first_sorted_with_counts_added_up() {
        let expected = "\
[lost samples] 4
[truncated stack];lib_fn;work 1
_start;main;phase_a;hot_a 6
clone3;start_thread;work 2
main;mid_b;mid_b;hot_b;helper 3
";
        assert_eq!(example().dump(), expected);
    }

    #[test]
    fn self_samples_use_the_innermost_line_of_the_leaf() {
        let got = example().self_samples();
        let expected: BTreeMap<String, i64> =
            [("hot_a", 6), ("helper", 3), ("work", 3), (LOST_SAMPLES, 4)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn cumulative_samples_count_each_function_once_per_sample() {
        let got = example().cumulative_samples();
        assert_eq!(got["main"], 9);
        assert_eq!(got["mid_b"], 3, "recursion counts once");
        assert_eq!(
            got["hot_b"], 3,
            "the physical function of an inlined frame counts"
        );
        assert_eq!(got["helper"], 3);
        assert_eq!(got["work"], 3);
        assert_eq!(got["_start"], 6);
    }

    #[test]
    fn per_tid_values_and_thread_names() {
        let view = example();
        assert_eq!(view.total_samples(), 16);
        let by_tid = view.samples_by_tid();
        assert_eq!(by_tid[&100], 9);
        assert_eq!(by_tid[&101], 7);
        assert_eq!(view.cpu_ns_by_tid()[&101], 70_000_000);
        assert_eq!(
            view.thread_names_by_tid()[&101],
            BTreeSet::from(["worker-1".to_string()])
        );
    }

    #[test]
    fn root_fraction_counts_full_stacks_and_not_truncated_or_lost_ones() {
        let view = example();
        // Reached: 6 (_start) + 3 (main) + 2 (clone3) = 11 of 16.
        assert!((view.root_reached_fraction() - 11.0 / 16.0).abs() < 1e-12);
        let unrooted = view.unrooted_roots();
        assert_eq!(unrooted["lib_fn + [truncated stack]"], 1);
        assert_eq!(unrooted["(no frames)"], 4);
    }

    #[test]
    fn locations_without_lines_are_named_after_their_mapping() {
        let mut b = Builder::new();
        let file = b.s("/usr/lib/libfoo.so.1");
        b.profile.mapping.push(proto::Mapping {
            id: 1,
            filename: file,
            ..Default::default()
        });
        b.profile.location.push(Location {
            id: 1,
            mapping_id: 1,
            address: 0x1234,
            line: vec![],
            is_folded: false,
        });
        let main = b.location(&["main"]);
        b.profile.sample.push(Sample {
            location_id: vec![1, main],
            value: vec![1, 10],
            label: vec![],
        });
        let view = ProfileView::new(b.profile);
        assert_eq!(view.dump(), "main;[unsymbolized libfoo.so.1] 1\n");
        assert!(view.samples_by_tid().is_empty());
    }

    #[test]
    fn exit_code_reports_signals_as_128_plus_signal() {
        let out = run(Command::new("sh").args(["-c", "kill -9 $$"]));
        assert_eq!(out.code, 128 + 9);
        let out = run(Command::new("sh").args(["-c", "echo hi; echo err >&2; exit 3"]));
        assert_eq!(
            (out.code, out.stdout_text(), out.stderr_text()),
            (3, "hi\n".into(), "err\n".into())
        );
    }
}
