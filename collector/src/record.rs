//! `anyprof record -- PROGRAM ARGS...`: run a program with `libanyprof.so` preloaded, collect
//! what every process of it sends, and write profiles when it exits.
//!
//! The whole process tree is profiled (`LD_PRELOAD` is inherited across exec and fork), and
//! `DIR/cpu.pb.gz` (`heap.pb.gz`, `allocs.pb.gz`) holds all of it, as perf and samply show a
//! run: every sample is labelled with its `pid` and `process` (see [`anyprof::pprof::merge`]).
//! When the run had more than one process, each (the program too) also gets its own
//! `DIR/cpu.PID.COMMAND.pb.gz`.
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
//! prog`: a thread watches `/proc/PID/exe`, see [`program::unprofiled_exec`]). No file
//! either: no profile file is written for a process that never connected, and an output
//! directory that `anyprof` created and nothing was written to is removed.
//! `--require-profile` turns both into errors: such a program is refused before it runs, and
//! a run whose program never connected exits with 2.
//!
//! After the program has exited, `anyprof` can always be stopped: symbolizing runs on a
//! thread of its own, and a SIGINT or SIGTERM then has the profiles written at once with the
//! addresses left unnamed; a second one ends `anyprof` outright.
//!
//! This file holds the command line and the order of events ([`run`]); each job has a module:
//! [`program`] runs and waits for the program, [`signals`] forwards signals and hears "stop",
//! [`warm`] symbolizes ahead while the program runs, [`snapshots`] writes heap snapshots while
//! it runs, and [`write`] writes the profiles and the summary at the end.

mod program;
mod signals;
mod snapshots;
mod warm;
mod write;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use anyprof::collect::Collector;
use anyprof::{preflight, priority};

use crate::oom;
use program::{
    exit_code, find_library, run_unprofiled, unprofiled_exec, wait_program, watch_executable,
};
use signals::{forward_signals, CHILD_PID, PROGRAM_ENDED, SNAPSHOT_SIGNAL, STOP_REQUESTED};
use write::{default_output_dir, remove_if_empty, write_profiles, WriteOptions};

/// Arguments of `anyprof record`.
#[derive(Args, Debug)]
pub struct RecordArgs {
    /// Directory for the profiles [default: a new directory named after the program and time]
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// CPU samples per second of each thread's CPU time; 0 turns CPU profiling off
    #[arg(long = "cpu-hz", value_name = "N", env = "ANYPROF_CPU_HZ", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub cpu_hz: u32,
    /// What triggers CPU samples. `timer`: a POSIX CPU timer per thread, which the kernel
    /// services at its tick (often 250 Hz at most; threads shorter than a tick are hardly
    /// sampled). `perf`: a perf cpu-clock event per thread where the kernel allows it
    /// (kernel.perf_event_paranoid 2 or less): the exact rate, and short threads sampled
    /// fairly, but a descriptor of anyprof's exists for microseconds as each thread starts
    #[arg(long = "cpu-source", value_name = "SOURCE", env = "ANYPROF_CPU_SOURCE",
          default_value = "timer", value_parser = ["timer", "perf"])]
    pub cpu_source: String,
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
    /// Write the profiles with addresses, mappings and build ids only, no names: for a host
    /// without debug information. `anyprof symbolize` names them later where the binaries or
    /// debug files are
    #[arg(long = "no-symbolize")]
    pub no_symbolize: bool,
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
        read_regions_live: true,
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
        .env("ANYPROF_CPU_SOURCE", &args.cpu_source)
        .env("ANYPROF_MEM_RATE", args.mem_rate.to_string())
        .spawn()
        .with_context(|| format!("cannot run {}", program.to_string_lossy()))?;
    let pid = child.id();
    CHILD_PID.store(pid as i32, Ordering::SeqCst);
    let oom_watch = oom::Watch::start(pid);
    let exe_watch = watch_executable(pid);
    let snapshots = (args.mem_rate > 0
        && (args.heap_every.is_some() || args.heap_signal.is_some()))
    .then(|| snapshots::start_snapshots(&collector, pid, out_dir.clone(), args.heap_every));
    if args.no_symbolize {
        anyprof::symbolize::NO_SYMBOLIZE.store(true, Ordering::SeqCst);
    }
    let new_symbolizer = if args.quiet {
        anyprof::symbolize::quiet_symbolizer_from_env
    } else {
        anyprof::symbolize::symbolizer_from_env
    };
    let symbolizer = Arc::new(Mutex::new(new_symbolizer()));
    let warm_lowered = Arc::new(std::sync::OnceLock::new());
    let (warm_stop, warm) =
        warm::start_prewarming(&collector, symbolizer.clone(), warm_lowered.clone());
    let (status, oom_kill) = wait_program(&mut child, oom_watch)?;
    let exited_at = Instant::now();
    // The program no longer needs the CPUs: what is left of the work done at idle priority
    // while it ran is finished at normal priority, if the kernel lets us raise it.
    if let Some(lowered) = warm_lowered.get() {
        lowered.restore();
    }
    exe_watch.0.store(true, Ordering::SeqCst);
    // From here on SIGINT and SIGTERM mean "stop" (see `forward_signals`).
    CHILD_PID.store(0, Ordering::SeqCst);
    PROGRAM_ENDED.store(true, Ordering::SeqCst);
    // The warming thread finishes the module it is in while the last messages arrive, or
    // drops it if no sample points into it.
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
            let mut symbolizer = symbolizer
                .lock()
                .map_or_else(|_| new_symbolizer(), |mut s| std::mem::take(&mut *s));
            let result = write_profiles(&sessions, &written, &mut symbolizer);
            if let Some(line) = symbolizer.debuginfod_summary().filter(|_| !written.quiet) {
                eprintln!("anyprof: {line}");
            }
            let _ = done_tx.send(result);
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
                 (`anyprof symbolize {} -o cpu.named.pb.gz` names them later; a second \
                 signal ends anyprof at once)",
                out_dir.join("cpu.pb.gz").display()
            );
            anyprof::symbolize::GIVE_UP.store(true, Ordering::SeqCst);
            break write_profiles(
                &sessions,
                &written,
                &mut anyprof::symbolize::symbolizer_from_env(),
            )?;
        }
    };
    if args.no_symbolize && !args.quiet && files > 0 {
        eprintln!(
            "anyprof: the profiles hold addresses and build ids only (--no-symbolize): name \
             them where the binaries or their debug files are with `anyprof symbolize {0} -o \
             cpu.named.pb.gz [--debug-dir DIR]`",
            out_dir.join("cpu.pb.gz").display()
        );
    }
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
