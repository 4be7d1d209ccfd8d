//! `anyprof record -- PROGRAM ARGS...`: run a program with `libanyprof.so` preloaded, collect
//! what every process of it sends, and write profiles when it exits.
//!
//! The whole process tree is profiled (`LD_PRELOAD` is inherited across exec): the program
//! itself is written as `DIR/cpu.pb.gz`, every other process as `DIR/cpu.PID.COMMAND.pb.gz`.
//! Signals that another process sends to `anyprof` are forwarded to the program; signals from
//! the terminal (Ctrl-C) already reach the program through its process group, so `anyprof`
//! just outlives them and writes the profile up to that point. `anyprof` exits with the
//! program's exit code (128 + signal number if it was killed).
//!
//! A program the library cannot get into (statically linked, built for another architecture
//! than the library, or run with secure execution because it is setuid, setgid or has file
//! capabilities; for a script, its interpreter: see [`preflight`]) runs all the same, exactly
//! as without anyprof: same arguments, descriptors, output and exit status. `anyprof` says
//! why in one line on its own stderr (even with `-q`) and writes no profile for it. A static
//! program keeps the library in its environment, so the dynamically linked programs it starts
//! are profiled; the others run with the environment untouched (their loader would complain
//! on stderr, or drops the variable anyway). A program that never loads the library for a
//! reason seen only at run time (`LD_PRELOAD` cleared on the way) gets one line at the end,
//! and so does an image the program became by exec that never loaded it (`env -u LD_PRELOAD
//! prog`: a thread watches `/proc/PID/exe`, see [`unprofiled_exec`]). No file either: no profile file is written for a process that never connected, and an
//! output directory that `anyprof` created and nothing was written to is removed.
//! `--require-profile` turns both into errors: such a program is refused before it runs, and
//! a run whose program never connected exits with 2.
//!
//! After the program has exited, `anyprof` can always be stopped: symbolizing runs on a
//! thread of its own, and a SIGINT or SIGTERM then has the profiles written at once with the
//! addresses left unnamed; a second one ends `anyprof` outright.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use anyprof::collect::Collector;
use anyprof::ingest::{Peer, Session};
use anyprof::symbolize::{lookup_address, module_of};
use anyprof::{preflight, priority, profile, summary};
use anyprof_symbolizer::Access;
use anyprof_wire::Module;

use crate::oom;

/// Arguments of `anyprof record`.
#[derive(Args, Debug)]
pub struct RecordArgs {
    /// Directory for the profiles [default: a new directory named after the program and time]
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// CPU samples per second of each thread's CPU time; 0 turns CPU profiling off. The kernel
    /// services per-thread CPU timers from its tick, which caps the effective rate (often 250)
    #[arg(long = "cpu-hz", value_name = "N", env = "ANYPROF_CPU_HZ", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub cpu_hz: u32,
    /// Mean bytes allocated between heap samples, like Go's MemProfileRate: 1 records every
    /// allocation, 0 turns heap profiling off. Accepts suffixes: 512KiB, 4MiB
    #[arg(long = "mem-rate", value_name = "BYTES", env = "ANYPROF_MEM_RATE", default_value = "512KiB",
          value_parser = parse_mem_rate)]
    pub mem_rate: u64,
    /// Also write the heap profile every SECS seconds, as DIR/heap-PID-N.pb.gz
    #[arg(long = "heap-every", value_name = "SECS")]
    pub heap_every: Option<u64>,
    /// Write heap profiles (DIR/heap-PID-N.pb.gz) when anyprof receives this signal
    /// (e.g. USR1: `kill -USR1 <anyprof pid>`); it is then not forwarded to the program
    #[arg(long = "heap-signal", value_name = "SIGNAL", value_parser = parse_signal)]
    pub heap_signal: Option<i32>,
    /// Print the program's allocator counters once a second (like GODEBUG=gctrace=1)
    #[arg(long = "memstats")]
    pub memstats: bool,
    /// Print nothing but warnings (no summary), so the program's output passes through alone
    #[arg(short, long)]
    pub quiet: bool,
    /// Refuse to run a program that cannot be profiled (statically linked, setuid, another
    /// architecture), and exit with 2 if the program never loaded the library, instead of
    /// running it unprofiled with a one-line warning
    #[arg(long = "require-profile")]
    pub require_profile: bool,
    /// Path of libanyprof.so [default: next to the anyprof binary]
    #[arg(long = "lib", value_name = "PATH", env = "ANYPROF_LIB")]
    pub lib: Option<PathBuf>,
    /// The program to run and its arguments
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM"
    )]
    pub command: Vec<OsString>,
}

static CHILD_PID: AtomicI32 = AtomicI32::new(0);
/// The signal that asks for a heap snapshot (0 = none) and whether one arrived.
static SNAPSHOT_SIGNAL: AtomicI32 = AtomicI32::new(0);
static SNAPSHOT_WANTED: AtomicBool = AtomicBool::new(false);
/// Set once the program has exited: SIGINT, SIGTERM, SIGHUP and SIGQUIT then ask `anyprof`
/// to stop ([`STOP_REQUESTED`]) instead of being forwarded.
static PROGRAM_ENDED: AtomicBool = AtomicBool::new(false);
/// The user asked to stop after the program ended: write what we have, unsymbolized.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

fn parse_mem_rate(text: &str) -> Result<u64, String> {
    anyprof_wire::parse_byte_size(text)
        .ok_or_else(|| format!("`{text}` is not a byte count like 524288, 512KiB or 4MiB"))
}

fn parse_signal(text: &str) -> Result<i32, String> {
    let name = text.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let sig = match name {
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "HUP" => libc::SIGHUP,
        "QUIT" => libc::SIGQUIT,
        "PWR" => libc::SIGPWR,
        "WINCH" => libc::SIGWINCH,
        n => match n.parse::<i32>() {
            Ok(v) if (1..=64).contains(&v) && v != libc::SIGKILL && v != libc::SIGSTOP => v,
            _ => {
                return Err(format!(
                    "`{text}` is not a signal anyprof can catch (try USR1)"
                ))
            }
        },
    };
    Ok(sig)
}

/// Runs `anyprof record`.
pub fn run(args: RecordArgs) -> Result<ExitCode> {
    let lib = find_library(args.lib.as_deref())?;
    let (program, program_args) = args.command.split_first().context("no program given")?;
    let checked = preflight::check_program(program, &lib)?;
    let resolved = checked.path;
    let unprofilable = checked.unprofilable;
    if let Some(why) = &unprofilable {
        if args.require_profile {
            bail!(
                "{} cannot be profiled: {why}. To profile it, {}; without --require-profile, \
                 anyprof runs it unprofiled",
                resolved.display(),
                why.remedy()
            );
        }
        let others = if why.keeps_environment() {
            "and the programs it starts are still profiled"
        } else {
            "with the environment untouched, so nothing it starts is profiled either"
        };
        // A warning: it prints with -q too.
        eprintln!(
            "anyprof: not profiling {}: {why}. It runs as usual, {others}. To profile it, {}.",
            resolved.display(),
            why.remedy()
        );
    }
    // Before the program starts: a signal it provokes at once (it prints, a script sends
    // USR1) must find our handlers in place, not kill us. The program starts with default
    // dispositions all the same (exec resets caught signals).
    SNAPSHOT_SIGNAL.store(args.heap_signal.unwrap_or(0), Ordering::SeqCst);
    forward_signals(args.heap_signal);
    if !unprofilable
        .as_ref()
        .is_none_or(preflight::Unprofilable::keeps_environment)
    {
        // Nothing of it can connect: no collector, no output directory, nothing that could
        // fail where the program alone would not.
        return run_unprofiled(program, program_args);
    }
    // Reading a large executable's symbols takes a while: beside the program, not before it.
    let allocator_check = (args.mem_rate > 0 && unprofilable.is_none()).then(|| {
        let exe = resolved.clone();
        named_thread("alloc-check", move || {
            priority::background();
            if let Some(warning) = preflight::prefixed_allocator_warning(&exe) {
                eprintln!("anyprof: warning: {warning}");
            }
        })
    });
    let out_dir = match &args.output {
        Some(d) => d.clone(),
        None => default_output_dir(&resolved),
    };
    // Removed at the end if nothing was written to it (see `remove_if_empty`).
    let created_dir = !out_dir.exists();
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create the output directory {}", out_dir.display()))?;
    anyprof::output::check_output_dir(&out_dir)?;

    let collector = Collector::start(anyprof::collect::Options {
        verbose: !args.quiet,
        trace_mem: args.memstats,
        ..Default::default()
    })?;
    let mut preload = OsString::from(lib.as_os_str());
    if let Some(existing) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(existing);
    }
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(program_args)
        .env("LD_PRELOAD", &preload)
        .env("ANYPROF_SOCKET", collector.socket_path())
        .env("ANYPROF_MODE", "record")
        .env("ANYPROF_CPU_HZ", args.cpu_hz.to_string())
        .env("ANYPROF_MEM_RATE", args.mem_rate.to_string())
        .spawn()
        .with_context(|| format!("cannot run {}", program.to_string_lossy()))?;
    let pid = child.id();
    CHILD_PID.store(pid as i32, Ordering::SeqCst);
    let oom_watch = oom::Watch::start(pid);
    let exe_watch = watch_executable(pid);
    let snapshots = (args.mem_rate > 0
        && (args.heap_every.is_some() || args.heap_signal.is_some()))
    .then(|| start_snapshots(&collector, pid, out_dir.clone(), args.heap_every));
    let symbolizer = Arc::new(Mutex::new(anyprof_symbolizer::Symbolizer::new()));
    let warm_tid = Arc::new(AtomicI32::new(0));
    let (warm_stop, warm) = start_prewarming(&collector, symbolizer.clone(), warm_tid.clone());
    let (status, oom_kill) = wait_program(&mut child, oom_watch)?;
    let exited_at = Instant::now();
    // The program no longer needs the CPUs: what is left of the work done at idle priority
    // while it ran is finished at normal priority, if the kernel lets us raise it.
    priority::normal(warm_tid.load(Ordering::SeqCst));
    exe_watch.0.store(true, Ordering::SeqCst);
    // From here on SIGINT and SIGTERM mean "stop" (see `forward_signals`).
    CHILD_PID.store(0, Ordering::SeqCst);
    PROGRAM_ENDED.store(true, Ordering::SeqCst);
    // The warming thread finishes the module it is in while the last messages arrive.
    warm_stop.store(true, Ordering::SeqCst);
    warm.thread().unpark();
    if let Some((stop, handle)) = &snapshots {
        stop.store(true, Ordering::SeqCst);
        handle.thread().unpark();
    }
    let elapsed = started.elapsed();

    let sessions = Arc::new(collector.finish(pid, Duration::from_secs(2)));
    let code = exit_code(status);
    // The program is the last image that ran under the pid we started (`env X=1 prog`
    // execs `prog`); earlier images of that pid are written like any other process.
    let main = sessions
        .iter()
        .filter(|s| s.pid() == Some(pid))
        .max_by_key(|s| s.image_key());
    let main_key = main.and_then(|s| s.image_key());
    let program_name = program.to_string_lossy().into_owned();
    // Said once: up front if the program could not be profiled; else here, or as the error
    // of --require-profile.
    let never_connected = (main_key.is_none() && unprofilable.is_none()).then(|| {
        format!(
            "no profile for {program_name}: it never loaded libanyprof.so (LD_PRELOAD was \
             cleared or ignored before it started)"
        )
    });
    let warn_never_connected = never_connected
        .clone()
        .filter(|_| !args.require_profile)
        .map(|m| format!("{m}; it ran as usual, and no profile was written for it"))
        .or_else(|| {
            let last_exe = exe_watch.1.join().ok().flatten();
            // With ANYPROF_EXEC=off an exec'd image is unprofiled as asked: nothing to say.
            let exec_off = std::env::var_os("ANYPROF_EXEC").is_some_and(|v| v == "off");
            unprofiled_exec(&sessions, pid, last_exe, &lib).filter(|_| !exec_off)
        });
    let written = WriteOptions {
        dir: out_dir.clone(),
        elapsed,
        main: main_key,
        cpu: args.cpu_hz > 0,
        heap: args.mem_rate > 0,
        quiet: args.quiet,
        oom_killed: oom_kill.is_some(),
    };
    // Symbolizing takes the longest, and the user may not want to wait for it: it runs on a
    // thread of its own while this one watches for SIGINT/SIGTERM (see `forward_signals`).
    let (done_tx, done) = std::sync::mpsc::channel();
    let _finishing = {
        let (sessions, written) = (sessions.clone(), written.clone());
        named_thread("write-profiles", move || {
            if let Some(check) = allocator_check {
                let _ = check.join(); // its warning comes before the summary
            }
            if let Some((_, handle)) = snapshots {
                let _ = handle.join();
            }
            let _ = warm.join();
            if let Some(message) = warn_never_connected {
                eprintln!("anyprof: {message}");
            }
            let mut symbolizer = symbolizer.lock().map_or_else(
                |_| anyprof_symbolizer::Symbolizer::new(),
                |mut s| std::mem::take(&mut *s),
            );
            let _ = done_tx.send(write_profiles(&sessions, &written, &mut symbolizer));
        })
    };
    let files = loop {
        // Woken as soon as the profiles are written, not at the next poll.
        match done.recv_timeout(Duration::from_millis(20)) {
            Ok(result) => break result?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("writing the profiles failed")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if STOP_REQUESTED.load(Ordering::SeqCst) {
            eprintln!(
                "anyprof: stopping: writing the profiles without symbolizing what is left \
                 (go tool pprof names the addresses from the binaries the profiles name; \
                 a second signal ends anyprof at once)"
            );
            anyprof::symbolize::GIVE_UP.store(true, Ordering::SeqCst);
            break write_profiles(
                &sessions,
                &written,
                &mut anyprof_symbolizer::Symbolizer::new(),
            )?;
        }
    };
    if !args.quiet && files > 0 {
        // What a user waiting on `anyprof record` in a script pays after the program itself.
        eprintln!(
            "anyprof: profiles written {} ms after the program exited",
            exited_at.elapsed().as_millis()
        );
    }
    if created_dir {
        remove_if_empty(&out_dir);
    }
    if let (true, Some(message)) = (args.require_profile, never_connected) {
        bail!("{message}, and --require-profile is set (the program exited with {code})");
    }
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// Starts a thread that reads which executable the program's pid runs (`/proc/PID/exe`)
/// every few milliseconds until its stop flag is set: the last one seen, and when it was
/// first seen (see [`unprofiled_exec`]).
#[allow(clippy::type_complexity)]
fn watch_executable(
    pid: u32,
) -> (
    Arc<AtomicBool>,
    std::thread::JoinHandle<Option<(Vec<u8>, Instant)>>,
) {
    use std::os::unix::ffi::OsStrExt;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = named_thread("exe-watch", move || {
        let link = format!("/proc/{pid}/exe");
        let mut last: Option<(Vec<u8>, Instant)> = None;
        while !flag.load(Ordering::SeqCst) {
            // Fails once the program is a zombie (and for a non-dumpable one): keep the last.
            if let Ok(exe) = std::fs::read_link(&link) {
                let exe = exe.as_os_str().as_bytes();
                if last.as_ref().is_none_or(|(seen, _)| seen.as_slice() != exe) {
                    last = Some((exe.to_vec(), Instant::now()));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        last
    });
    (stop, handle)
}

/// The warning for a program that replaced itself by exec with an image that never loaded
/// the library (`env -u LD_PRELOAD prog`): `last_exe` (from [`watch_executable`]) is the
/// last executable its pid ran, and no image of that pid with that executable connected, nor
/// any later one. An image that lived less than the watcher's interval is not seen.
fn unprofiled_exec(
    sessions: &[Session],
    pid: u32,
    last_exe: Option<(Vec<u8>, Instant)>,
    lib: &Path,
) -> Option<String> {
    let (exe, seen) = last_exe?;
    let images: Vec<&Session> = sessions.iter().filter(|s| s.pid() == Some(pid)).collect();
    let before = images.iter().max_by_key(|s| s.image_key())?.command_name();
    // An image that started after `exe` was seen is a later one. Its start time comes from
    // its hello: a process hands over its region and leaves, so when the collector got to it
    // says nothing about when it ran.
    let seen_ns = anyprof::region::monotonic_ns().saturating_sub(seen.elapsed().as_nanos() as u64);
    let connected = images.iter().any(|s| {
        s.hello
            .as_ref()
            .is_some_and(|h| h.exe == exe || h.start_monotonic_ns >= seen_ns)
    });
    if connected {
        return None;
    }
    use std::os::unix::ffi::OsStrExt;
    let exe = std::ffi::OsStr::from_bytes(&exe);
    let why = match preflight::check_program(exe, lib).ok()?.unprofilable {
        Some(why) => why.to_string(),
        None => "it never loaded libanyprof.so (LD_PRELOAD was cleared)".to_string(),
    };
    Some(format!(
        "no profile for {} (pid {pid}): {before} replaced itself with it by exec, and {why}; \
         the profile is of {before}, before the exec",
        exe.to_string_lossy()
    ))
}

/// Runs a program that gets none of anyprof's environment (see [`preflight::Unprofilable`])
/// as the shell would, with signals forwarded as for any program, and returns its status.
fn run_unprofiled(program: &OsString, args: &[OsString]) -> Result<ExitCode> {
    let mut child = Command::new(program)
        .args(args)
        .spawn()
        .with_context(|| format!("cannot run {}", program.to_string_lossy()))?;
    CHILD_PID.store(child.id() as i32, Ordering::SeqCst);
    let oom_watch = oom::Watch::start(child.id());
    let (status, _) = wait_program(&mut child, oom_watch)?;
    CHILD_PID.store(0, Ordering::SeqCst);
    Ok(ExitCode::from(exit_code(status).clamp(0, 255) as u8))
}

/// Waits for the program to exit and reaps it; in between, while its `/proc/PID` is still
/// there, asks `oom_watch` whether the OOM killer ended it, and if so says so at once (a
/// warning: it prints with -q too).
fn wait_program(
    child: &mut std::process::Child,
    oom_watch: oom::Watch,
) -> Result<(std::process::ExitStatus, Option<oom::OomKill>)> {
    let oom_kill = match oom::wait_exited_unreaped(child.id()) {
        Ok(sigkill) => oom_watch.finish(sigkill),
        Err(_) => None,
    };
    let status = child.wait().context("waiting for the program")?;
    if let Some(kill) = &oom_kill {
        eprintln!("anyprof: {}", kill.message());
    }
    Ok((status, oom_kill))
}

/// The program's exit code, or 128 + the signal number that killed it, as a shell says.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    }
}

/// Removes `dir` if nothing is in it: no profile was written (the program never loaded the
/// library), so there is nothing to leave behind.
fn remove_if_empty(dir: &Path) {
    // remove_dir fails on a directory that is not empty, which is what we want.
    let _ = std::fs::remove_dir(dir);
}

/// Where and what [`write_profiles`] writes.
#[derive(Clone)]
struct WriteOptions {
    dir: PathBuf,
    /// How long the program ran.
    elapsed: Duration,
    /// The image key of the program itself (its files have no pid in their names).
    main: Option<(u32, u64)>,
    cpu: bool,
    heap: bool,
    quiet: bool,
    /// The kernel's OOM killer ended the program (said in its summary).
    oom_killed: bool,
}

/// Writes each process's profiles: the program's as `cpu.pb.gz`, `heap.pb.gz`,
/// `allocs.pb.gz`; every other process's with `.PID.COMMAND` before `.pb.gz`. Returns how
/// many files it wrote.
fn write_profiles(
    sessions: &[Session],
    options: &WriteOptions,
    symbolizer: &mut anyprof_symbolizer::Symbolizer,
) -> Result<usize> {
    let WriteOptions {
        dir, elapsed, main, ..
    } = options;
    let (main, elapsed) = (*main, *elapsed);
    let mut others = 0;
    // One file that cannot be written (a full disk, a directory in its place) must not cost
    // the others: each failure is reported and counted, and the run fails at the end.
    let mut failed = 0;
    let mut files = 0;
    for s in sessions {
        let Some(pid) = s.pid() else { continue };
        let is_main = s.image_key() == main;
        // A forked child that execs at once (a shell running a command) reports nothing of
        // its own before the exec'd image takes over: no file for it.
        if !is_main && s.cpu.is_empty() && s.heap.values().all(|b| b.counts.alloc_objects == 0) {
            continue;
        }
        let suffix = if is_main {
            String::new()
        } else {
            format!(".{pid}.{}", sanitize(&s.command_name()))
        };
        let mut written = Vec::new();
        let mut write = |kind: &str, profile: &anyprof::pprof::Profile| {
            let path = dir.join(format!("{kind}{suffix}.pb.gz"));
            match anyprof::output::write_atomic(&path, &anyprof::pprof::encode_gzipped(profile)) {
                Ok(()) => {
                    files += 1;
                    written.push(path);
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("anyprof: error: {e:#}");
                }
            }
        };
        let mut cpu_profile = None;
        if options.cpu {
            let duration = match (s.connected_at, s.closed_at) {
                (Some(a), Some(b)) => b.duration_since(a),
                _ => elapsed,
            };
            let p = profile::cpu::build(s, symbolizer, duration.as_nanos() as u64);
            write("cpu", &p);
            cpu_profile = Some(p);
        }
        let mut allocs_profile = None;
        if options.heap {
            let now = anyprof::output::unix_nanos();
            let heap = profile::heap::build(s, symbolizer, profile::heap::View::Heap, now);
            write("heap", &heap);
            let allocs = profile::heap::build(s, symbolizer, profile::heap::View::Allocs, now);
            write("allocs", &allocs);
            allocs_profile = Some(allocs);
        }
        if !is_main {
            others += 1;
        } else if !options.quiet {
            print_summary(
                s,
                cpu_profile.as_ref(),
                allocs_profile.as_ref(),
                &written,
                elapsed,
                options.oom_killed,
            );
        }
    }
    if !options.quiet && others > 0 {
        eprintln!(
            "anyprof: also profiled {others} other process(es) of the program, in {}",
            dir.display()
        );
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} profile file(s) could not be written (see above); the others are in {}",
            dir.display()
        );
    }
    Ok(files)
}

fn print_summary(
    s: &Session,
    cpu: Option<&anyprof::pprof::Profile>,
    allocs: Option<&anyprof::pprof::Profile>,
    written: &[PathBuf],
    elapsed: Duration,
    oom_killed: bool,
) {
    let samples = s.cpu.values().fold(0u64, |a, t| a.saturating_add(t.count));
    let cpu_ns = s.cpu.values().fold(0u64, |a, t| a.saturating_add(t.cpu_ns));
    let threads = s
        .cpu
        .keys()
        .map(|k| k.tid)
        .collect::<std::collections::HashSet<_>>()
        .len();
    eprintln!(
        "anyprof: {} (pid {}) ran {:.2}s: {samples} CPU samples, {:.2}s CPU on {threads} thread(s), {} lost",
        s.command_name(),
        s.pid().unwrap_or(0),
        elapsed.as_secs_f64(),
        cpu_ns as f64 / 1e9,
        s.lost_samples()
    );
    if oom_killed {
        eprintln!(
            "anyprof: the kernel's OOM killer ended it: heap.pb.gz shows what was live when \
             it died (go tool pprof -sample_index=inuse_space -top heap.pb.gz)"
        );
    }
    if let Some(p) = cpu {
        eprint!("{}", summary::format_cpu_top(p, 10));
    }
    if let Some(p) = allocs {
        eprint!("{}", summary::format_heap_top(p, s.mem_stats.as_ref(), 5));
    }
    for path in written {
        eprintln!(
            "anyprof: wrote {0}  (view it with: go tool pprof -top {0})",
            path.display()
        );
    }
}

/// How long the warming thread waits before its first look at the sessions, and again after
/// each look that found something new: a process reports its modules as soon as the library
/// starts in it, and a short program may be gone within a few tens of milliseconds.
const WARM_SOON: Duration = Duration::from_millis(2);
/// The longest wait between looks, reached by doubling the wait while nothing new turns up.
const WARM_AT_LEAST_EVERY: Duration = Duration::from_millis(100);

/// Does the symbolizer's slow work while the program still runs, on a thread of the collector,
/// so that writing the profiles at exit does not have to: with full debug info installed
/// (libc6-dbg) that work is most of the time between the program's exit and its profiles.
///
/// Each look first symbolizes the addresses of the samples that arrived since the last one,
/// which parses the DWARF units they fall in (the answers are dropped; looking an address up
/// again in a parsed unit is cheap), then opens the modules that no sample points into yet
/// (mapping the files, inflating and indexing their DWARF), in case one does by the end.
///
/// It works on one module at a time, on one thread at idle priority (see [`priority`]), so it
/// only takes CPU time the program leaves unused, and stops after the module it is in when the
/// program exits: what is left is then done on all CPUs at once (see
/// [`anyprof_symbolizer::Symbolizer::symbolize_many`]). It stores its thread id in `tid`, so
/// that its priority can be raised when the program has exited.
fn start_prewarming(
    collector: &Collector,
    symbolizer: Arc<Mutex<anyprof_symbolizer::Symbolizer>>,
    tid: Arc<AtomicI32>,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let sessions = collector.sessions();
    let flag = stop.clone();
    let handle = named_thread("warm-symbols", move || {
        priority::background();
        tid.store(priority::current_tid(), Ordering::SeqCst);
        let mut opened: HashSet<(Vec<u8>, Vec<u8>)> = HashSet::new();
        let mut looked_up: HashMap<(u32, u64), HashSet<u64>> = HashMap::new();
        let mut wait = WARM_SOON;
        while !flag.load(Ordering::SeqCst) {
            std::thread::park_timeout(wait);
            let snapshot = anyprof::collect::snapshot(&sessions);
            // Each module with the file addresses to look up in it, those of samples first.
            // With the rights of the process that loaded it (see symbolize::resolve_all).
            let mut work: Vec<(&Module, Vec<u64>, Option<Access>)> = Vec::new();
            for s in &snapshot {
                let Some(image) = s.image_key() else { continue };
                let seen = looked_up.entry(image).or_default();
                let mut by_module: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
                for a in sample_addresses(s).filter(|&a| seen.insert(a)) {
                    if let Some(m) = module_of(&s.modules, a) {
                        by_module
                            .entry(m.id)
                            .or_default()
                            .push(a.wrapping_sub(m.load_bias));
                    }
                }
                for (id, svmas) in by_module {
                    let m = &s.modules[&id];
                    opened.insert((m.path.clone(), m.build_id.clone()));
                    work.push((m, svmas, s.peer.as_ref().map(Peer::access)));
                }
            }
            for s in &snapshot {
                for m in s.modules.values() {
                    if opened.insert((m.path.clone(), m.build_id.clone())) {
                        let svmas = vec![m.start.wrapping_sub(m.load_bias)];
                        work.push((m, svmas, s.peer.as_ref().map(Peer::access)));
                    }
                }
            }
            wait = if work.is_empty() {
                (wait * 2).min(WARM_AT_LEAST_EVERY)
            } else {
                WARM_SOON
            };
            for (m, svmas, access) in work {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let path = PathBuf::from(String::from_utf8_lossy(&m.path).into_owned());
                let object = anyprof_symbolizer::ObjectRef {
                    path: &path,
                    build_id: &m.build_id,
                };
                if let Ok(mut sym) = symbolizer.lock() {
                    anyprof::symbolize::symbolize_guarded(
                        &mut sym,
                        access.as_ref(),
                        &[(object, &svmas)],
                    );
                }
            }
        }
    });
    (stop, handle)
}

/// The addresses that the CPU and heap profiles of `session` will look up, each as
/// [`lookup_address`] adjusts it.
fn sample_addresses(session: &Session) -> impl Iterator<Item = u64> + '_ {
    let cpu = session.cpu.keys().flat_map(|k| {
        k.frames
            .iter()
            .enumerate()
            .map(|(i, &raw)| lookup_address(i, raw, true))
    });
    let heap = session.heap.values().flat_map(|b| {
        b.frames
            .iter()
            .enumerate()
            .map(|(i, &raw)| lookup_address(i, raw, false))
    });
    cpu.chain(heap)
}

/// Starts the thread that writes heap snapshots every `every` seconds and when the snapshot
/// signal arrives. Returns its stop flag and handle.
fn start_snapshots(
    collector: &Collector,
    pid: u32,
    dir: PathBuf,
    every: Option<u64>,
) -> (std::sync::Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let sessions = collector.sessions();
    let flag = stop.clone();
    let handle = named_thread("heap-snapshots", move || {
        // Snapshots while the program runs are for later reading: at idle priority. The one
        // asked for just before the program exited is written when the CPUs are free anyway.
        priority::background();
        let mut symbolizer = anyprof_symbolizer::Symbolizer::new();
        let mut next = every.map(|s| Instant::now() + Duration::from_secs(s.max(1)));
        let mut n = 0;
        loop {
            let stopping = flag.load(Ordering::SeqCst);
            if !stopping {
                std::thread::park_timeout(Duration::from_millis(50));
            }
            let due = !stopping && next.is_some_and(|t| Instant::now() >= t);
            // A signal that came just before the program exited still gets its snapshot.
            let wanted = SNAPSHOT_WANTED.swap(false, Ordering::SeqCst);
            if stopping && !wanted {
                break;
            }
            if !(due || wanted) {
                continue;
            }
            if let (true, Some(s)) = (due, every) {
                next = Some(Instant::now() + Duration::from_secs(s.max(1)));
            }
            n += 1;
            for session in anyprof::collect::snapshot(&sessions)
                .iter()
                .filter(|s| s.pid() == Some(pid))
            {
                let heap = profile::heap::build(
                    session,
                    &mut symbolizer,
                    profile::heap::View::Heap,
                    anyprof::output::unix_nanos(),
                );
                let path = dir.join(format!("heap-{pid}-{n}.pb.gz"));
                if let Err(e) =
                    anyprof::output::write_atomic(&path, &anyprof::pprof::encode_gzipped(&heap))
                {
                    eprintln!("anyprof: error: {e:#}");
                }
            }
        }
    });
    (stop, handle)
}

/// Starts a thread with a name (`top -H`, `ps -L` and /proc show it), panicking like
/// `std::thread::spawn` if the system cannot start one.
fn named_thread<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(work)
        .unwrap_or_else(|e| panic!("cannot start a thread ({e}): raise the process limit"))
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn default_output_dir(program: &Path) -> PathBuf {
    let name = program
        .file_name()
        .map(|n| sanitize(&n.to_string_lossy()))
        .unwrap_or_else(|| "program".into());
    PathBuf::from(format!("anyprof-{name}-{}", anyprof::output::timestamp()))
}

/// Finds libanyprof.so: `--lib`/`ANYPROF_LIB`, else next to this binary (or in ../lib).
fn find_library(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(std::fs::canonicalize(p)?);
        }
        bail!("--lib {}: no such file", p.display());
    }
    let exe = std::env::current_exe().context("cannot locate the anyprof binary")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [dir.join("libanyprof.so"), dir.join("../lib/libanyprof.so")];
    for c in &candidates {
        if c.is_file() {
            return Ok(std::fs::canonicalize(c)?);
        }
    }
    bail!(
        "cannot find libanyprof.so (looked in {} and {}): build it with `cargo build --release`, \
         or name it with --lib PATH",
        candidates[0].display(),
        candidates[1].display()
    )
}

/// Forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to us by another
/// process to the program; the same signals from the terminal are not forwarded (the program
/// got them already) but no longer kill us. Once the program has exited, the first SIGINT,
/// SIGTERM, SIGHUP or SIGQUIT makes `anyprof` write its profiles at once without symbolizing
/// the rest, and a second one ends it as that signal would.
fn forward_signals(snapshot_signal: Option<i32>) {
    extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
        if sig == SNAPSHOT_SIGNAL.load(Ordering::SeqCst) {
            SNAPSHOT_WANTED.store(true, Ordering::SeqCst);
            return;
        }
        let code = if info.is_null() {
            0
        } else {
            // SAFETY: the kernel passes a valid siginfo to SA_SIGINFO handlers.
            unsafe { (*info).si_code }
        };
        if PROGRAM_ENDED.load(Ordering::SeqCst)
            && [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT].contains(&sig)
        {
            if STOP_REQUESTED.swap(true, Ordering::SeqCst) {
                // The second request: end now, as the signal would without us.
                // SAFETY: signal and raise are async-signal-safe.
                unsafe {
                    libc::signal(sig, libc::SIG_DFL);
                    libc::raise(sig);
                }
            }
            return;
        }
        let child = CHILD_PID.load(Ordering::SeqCst);
        // si_code <= 0: sent by a process (kill, sigqueue, tkill); SI_KERNEL: the terminal.
        if child > 0 && code <= 0 {
            // SAFETY: kill is async-signal-safe.
            unsafe { libc::kill(child, sig) };
        }
    }
    for sig in snapshot_signal.into_iter().chain([
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ]) {
        // SAFETY: a zeroed sigaction is valid; we set handler and flags.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: installing a handler that only calls async-signal-safe functions.
        unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) };
    }
}
