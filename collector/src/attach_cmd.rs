//! `anyprof attach PID...`: the command line of [`anyprof::attach`]. It profiles, builds the
//! CPU profile of each process as `record` does, merges them (samples labelled with `pid`
//! and `process`) and writes one file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use anyprof::attach;
use anyprof::pprof::merge::{merge_processes, Part};

#[derive(clap::Args)]
pub struct AttachArgs {
    /// The processes to profile (they keep running, untouched)
    #[arg(required = true, value_name = "PID")]
    pids: Vec<u32>,
    /// How long to profile; Ctrl-C or SIGTERM ends it early and still writes the profile
    #[arg(long, default_value_t = 30, value_name = "N")]
    seconds: u64,
    /// CPU samples per second of each thread's CPU time
    #[arg(long, default_value_t = 100, value_name = "N")]
    cpu_hz: u32,
    /// Where to write the profile [default: cpu.PID.COMMAND.pb.gz in the current directory,
    /// numbered rather than overwriting]
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print nothing but warnings
    #[arg(short, long)]
    quiet: bool,
    /// Write the profile with addresses, mappings and build ids only, no names: for a host
    /// without debug information. `anyprof symbolize` names it later where the binaries or
    /// debug files are
    #[arg(long = "no-symbolize")]
    no_symbolize: bool,
}

/// Set by SIGINT or SIGTERM: stop profiling and write what was collected.
static STOP: AtomicBool = AtomicBool::new(false);

pub fn run(args: AttachArgs) -> Result<ExitCode> {
    if !(1..=10_000).contains(&args.cpu_hz) {
        bail!(
            "--cpu-hz {} is out of range: give 1 to 10000 (100 is Go's rate)",
            args.cpu_hz
        );
    }
    if args.seconds == 0 {
        bail!("--seconds 0 profiles nothing: give 1 or more (30 by default, like Go's /debug/pprof/profile)");
    }
    if args.no_symbolize {
        anyprof::symbolize::NO_SYMBOLIZE.store(true, Ordering::SeqCst);
    }
    stop_on_signals();
    let duration = Duration::from_secs(args.seconds);
    let path = match &args.output {
        Some(path) => path.clone(),
        None => free_name(args.pids[0]),
    };
    check_writable(&path)?;
    let profiling = attach::start(&args.pids, args.cpu_hz)?;
    if !args.quiet {
        eprintln!(
            "anyprof: profiling pid {} for {} s at {} Hz (Ctrl-C ends it early)",
            join(&args.pids),
            args.seconds,
            args.cpu_hz
        );
    }
    let attached = profiling.finish(duration, &STOP);
    let ended = Instant::now();
    let mut symbolizer = anyprof::symbolize::new_symbolizer(&[], args.quiet);
    let names: Vec<String> = attached.iter().map(|a| a.session.command_name()).collect();
    let built: Vec<_> = attached
        .iter()
        .map(|a| {
            let s = &a.session;
            let duration = s.connected_for().unwrap_or(duration);
            anyprof::profile::cpu::build(s, &mut symbolizer, duration.as_nanos() as u64)
        })
        .collect();
    let parts: Vec<Part<'_>> = attached
        .iter()
        .zip(&built)
        .zip(&names)
        .map(|((a, profile), name)| Part {
            pid: a.session.pid().unwrap_or(0),
            process: name,
            profile,
        })
        .collect();
    let comments = vec![format!(
        "anyprof attach: pid {} ({}), perf cpu-clock events at {} Hz, unwound with framehop",
        join(&args.pids),
        names.join(", "),
        args.cpu_hz
    )];
    let merged = merge_processes(&parts, &comments);
    anyprof::output::write_atomic(&path, &anyprof::pprof::encode_gzipped(&merged))?;
    for (a, name) in attached.iter().zip(&names) {
        if a.unfollowed > 0 {
            eprintln!(
                "anyprof: {name} (pid {}): {} of its threads were not followed (at most {} \
                 events, one per thread and CPU, per process)",
                a.session.pid().unwrap_or(0),
                a.unfollowed,
                anyprof::attach::events::MAX_EVENTS
            );
        }
        if a.exited {
            eprintln!(
                "anyprof: {name} (pid {}) exited during the profile; the profile has what was \
                 collected until then",
                a.session.pid().unwrap_or(0)
            );
        }
    }
    if !args.quiet {
        let samples: u64 = attached
            .iter()
            .flat_map(|a| a.session.cpu.values())
            .map(|t| t.count)
            .sum();
        let lost: u64 = attached.iter().map(|a| a.session.lost_samples()).sum();
        eprintln!(
            "anyprof: {samples} CPU samples, {lost} lost; wrote {0} {1} ms after the profile \
             ended (view it with: go tool pprof -top {0})",
            path.display(),
            ended.elapsed().as_millis()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn join(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Refuses, before profiling, a file that could not be written after it: a profile of 30
/// seconds is not to be lost to a directory that is not writable.
fn check_writable(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    tempfile::Builder::new()
        .prefix(".anyprof-attach-check")
        .tempfile_in(dir)
        .map(drop)
        .with_context(|| {
            format!(
                "cannot write the profile to {}: choose a directory you can write with -o",
                path.display()
            )
        })
}

/// `cpu.PID.COMMAND.pb.gz`, or with `-2`, `-3`... before `.pb.gz` when that exists: an
/// earlier profile is never overwritten.
fn free_name(pid: u32) -> PathBuf {
    let command = String::from_utf8_lossy(&anyprof::attach::procfs::exe_and_cmdline(pid).0)
        .rsplit('/')
        .next()
        .filter(|name| !name.is_empty())
        .unwrap_or("unknown")
        .to_string();
    let command: String = command
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    (1..)
        .map(|n| match n {
            1 => PathBuf::from(format!("cpu.{pid}.{command}.pb.gz")),
            n => PathBuf::from(format!("cpu.{pid}.{command}-{n}.pb.gz")),
        })
        .find(|p| std::fs::symlink_metadata(p).is_err())
        .unwrap_or_else(|| PathBuf::from("cpu.pb.gz"))
}

/// SIGINT and SIGTERM set [`STOP`]; a second one ends anyprof as it would have.
fn stop_on_signals() {
    extern "C" fn on_signal(sig: libc::c_int) {
        if STOP.swap(true, Ordering::SeqCst) {
            // SAFETY: signal and raise are async-signal-safe.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::raise(sig);
            }
        }
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls async-signal-safe functions.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}
