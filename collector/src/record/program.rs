//! The program itself: finding the library to preload, running a program that cannot be
//! profiled as the shell would, waiting for the program (and hearing of an OOM kill), its
//! exit code, and watching which executable its pid runs (to tell of an exec'd image that
//! never loaded the library).

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use anyprof::ingest::Session;
use anyprof::preflight;

use super::named_thread;
use super::signals::CHILD_PID;
use crate::oom;

/// Starts a thread that reads which executable the program's pid runs (`/proc/PID/exe`)
/// every few milliseconds until its stop flag is set: the last one seen, and when it was
/// first seen (see [`unprofiled_exec`]).
#[allow(clippy::type_complexity)]
pub(super) fn watch_executable(
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
pub(super) fn unprofiled_exec(
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
pub(super) fn run_unprofiled(program: &OsString, args: &[OsString]) -> Result<ExitCode> {
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
pub(super) fn wait_program(
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
pub(super) fn exit_code(status: std::process::ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    }
}

/// Finds libanyprof.so: `--lib`/`ANYPROF_LIB`, else next to this binary (or in ../lib).
pub(super) fn find_library(explicit: Option<&Path>) -> Result<PathBuf> {
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
