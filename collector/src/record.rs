//! `anyprof record -- PROGRAM ARGS...`: run a program with `libanyprof.so` preloaded, collect
//! what every process of it sends, and write profiles when it exits.
//!
//! The whole process tree is profiled (`LD_PRELOAD` is inherited across exec): the program
//! itself is written as `DIR/cpu.pb.gz`, every other process as `DIR/cpu.PID.COMMAND.pb.gz`.
//! Signals that another process sends to `anyprof` are forwarded to the program; signals from
//! the terminal (Ctrl-C) already reach the program through its process group, so `anyprof`
//! just outlives them and writes the profile up to that point. `anyprof` exits with the
//! program's exit code (128 + signal number if it was killed).

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use anyprof::collect::Collector;
use anyprof::ingest::Session;
use anyprof::{preflight, profile, summary};

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
    /// Print nothing but warnings (no summary), so the program's output passes through alone
    #[arg(short, long)]
    pub quiet: bool,
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

/// Runs `anyprof record`.
pub fn run(args: RecordArgs) -> Result<ExitCode> {
    let lib = find_library(args.lib.as_deref())?;
    let (program, program_args) = args.command.split_first().context("no program given")?;
    let resolved = preflight::check_program(program)?;
    let out_dir = match &args.output {
        Some(d) => d.clone(),
        None => default_output_dir(&resolved),
    };
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create the output directory {}", out_dir.display()))?;

    let collector = Collector::start(!args.quiet)?;
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
        .env("ANYPROF_CPU_HZ", args.cpu_hz.to_string())
        .spawn()
        .with_context(|| format!("cannot run {}", program.to_string_lossy()))?;
    let pid = child.id();
    CHILD_PID.store(pid as i32, Ordering::SeqCst);
    forward_signals();
    let status = child.wait().context("waiting for the program")?;
    let elapsed = started.elapsed();
    CHILD_PID.store(0, Ordering::SeqCst);

    let sessions = collector.finish(pid, Duration::from_secs(2));
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    };
    // The program is the last image that ran under the pid we started (`env X=1 prog`
    // execs `prog`); earlier images of that pid are written like any other process.
    let main = sessions
        .iter()
        .filter(|s| s.pid() == Some(pid))
        .max_by_key(|s| s.image_key());
    let main_key = main.and_then(|s| s.image_key());
    if main.is_none() {
        eprintln!(
            "anyprof: no profile for {}: it never loaded libanyprof.so (statically linked, setuid, \
             or it cleared LD_PRELOAD before exec)",
            program.to_string_lossy()
        );
    }
    if args.cpu_hz > 0 {
        write_cpu_profiles(&sessions, main_key, &out_dir, elapsed, args.quiet)?;
    }
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

fn write_cpu_profiles(
    sessions: &[Session],
    main: Option<(u32, u64)>,
    dir: &Path,
    elapsed: Duration,
    quiet: bool,
) -> Result<()> {
    let mut symbolizer = anyprof_symbolizer::Symbolizer::new();
    let mut others = Vec::new();
    for s in sessions {
        let Some(pid) = s.pid() else { continue };
        let duration = match (s.connected_at, s.closed_at) {
            (Some(a), Some(b)) => b.duration_since(a),
            _ => elapsed,
        };
        let profile = profile::cpu::build(s, &mut symbolizer, duration.as_nanos() as u64);
        let is_main = s.image_key() == main;
        let name = if is_main {
            "cpu.pb.gz".to_string()
        } else {
            format!("cpu.{pid}.{}.pb.gz", sanitize(&s.command_name()))
        };
        let path = dir.join(name);
        anyprof::output::write_atomic(&path, &anyprof::pprof::encode_gzipped(&profile))?;
        if is_main {
            if !quiet {
                print_summary(s, &profile, &path, elapsed);
            }
        } else {
            others.push(path);
        }
    }
    if !quiet && !others.is_empty() {
        eprintln!(
            "anyprof: also profiled {} other process(es) of the program, in {}",
            others.len(),
            dir.display()
        );
    }
    Ok(())
}

fn print_summary(s: &Session, profile: &anyprof::pprof::Profile, path: &Path, elapsed: Duration) {
    let samples: u64 = s.cpu.values().map(|t| t.count).sum();
    let cpu: u64 = s.cpu.values().map(|t| t.cpu_ns).sum();
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
        cpu as f64 / 1e9,
        s.lost_samples()
    );
    eprint!("{}", summary::format_cpu_top(profile, 10));
    eprintln!(
        "anyprof: wrote {0}  (view it with: go tool pprof -top {0})",
        path.display()
    );
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
/// got them already) but no longer kill us.
fn forward_signals() {
    extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
        let code = if info.is_null() {
            0
        } else {
            // SAFETY: the kernel passes a valid siginfo to SA_SIGINFO handlers.
            unsafe { (*info).si_code }
        };
        let child = CHILD_PID.load(Ordering::SeqCst);
        // si_code <= 0: sent by a process (kill, sigqueue, tkill); SI_KERNEL: the terminal.
        if child > 0 && code <= 0 {
            // SAFETY: kill is async-signal-safe.
            unsafe { libc::kill(child, sig) };
        }
    }
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        // SAFETY: a zeroed sigaction is valid; we set handler and flags.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: installing a handler that only calls async-signal-safe functions.
        unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) };
    }
}
