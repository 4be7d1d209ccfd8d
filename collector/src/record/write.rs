//! Writing the profiles at the end: one set of files per process of the run (the program's
//! without a pid in their names), each through a temporary file renamed into place, and the
//! summary printed for the program.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use anyprof::ingest::Session;
use anyprof::{profile, summary};

/// Removes `dir` if nothing is in it: no profile was written (the program never loaded the
/// library), so there is nothing to leave behind.
pub(super) fn remove_if_empty(dir: &Path) {
    // remove_dir fails on a directory that is not empty, which is what we want.
    let _ = std::fs::remove_dir(dir);
}

/// Where and what [`write_profiles`] writes.
#[derive(Clone)]
pub(super) struct WriteOptions {
    pub(super) dir: PathBuf,
    /// How long the program ran.
    pub(super) elapsed: Duration,
    /// The image key of the program itself (its files have no pid in their names).
    pub(super) main: Option<(u32, u64)>,
    pub(super) cpu: bool,
    pub(super) heap: bool,
    pub(super) quiet: bool,
    /// The kernel's OOM killer ended the program (said in its summary).
    pub(super) oom_killed: bool,
}

/// Writes each process's profiles: the program's as `cpu.pb.gz`, `heap.pb.gz`,
/// `allocs.pb.gz`; every other process's with `.PID.COMMAND` before `.pb.gz`. Returns how
/// many files it wrote.
pub(super) fn write_profiles(
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

pub(super) fn print_summary(
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
        eprint!("{}", anyprof::unnamed::format_missing_names(p));
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

pub(super) fn sanitize(name: &str) -> String {
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

pub(super) fn default_output_dir(program: &Path) -> PathBuf {
    let name = program
        .file_name()
        .map(|n| sanitize(&n.to_string_lossy()))
        .unwrap_or_else(|| "program".into());
    PathBuf::from(format!("anyprof-{name}-{}", anyprof::output::timestamp()))
}
