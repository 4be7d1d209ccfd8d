//! Writing the profiles at the end: the profiles of the whole run (`cpu.pb.gz`, `heap.pb.gz`,
//! `allocs.pb.gz`: every process, each sample labelled with its `pid` and `process`), and for
//! a run of several processes one set per process (`cpu.PID.COMMAND.pb.gz`, the program's
//! own included), each file through a temporary file renamed into place; then the summary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use anyprof::ingest::Session;
use anyprof::pprof::merge::{merge_processes, Part};
use anyprof::pprof::Profile;
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
    /// The image key of the program itself (first in the run's profiles, named in the summary).
    pub(super) main: Option<(u32, u64)>,
    pub(super) cpu: bool,
    pub(super) heap: bool,
    pub(super) quiet: bool,
    /// The kernel's OOM killer ended the program (said in its summary).
    pub(super) oom_killed: bool,
}

/// One process of the run.
struct Process<'a> {
    session: &'a Session,
    pid: u32,
    name: String,
    is_main: bool,
}

/// Writes the run's profiles: `cpu.pb.gz`, `heap.pb.gz`, `allocs.pb.gz` hold every process
/// (the program first); when the run had more than one process, each also gets its own
/// files with `.PID.COMMAND` before `.pb.gz`. Returns how many files it wrote.
///
/// One kind at a time: the processes' profiles of that kind are built, merged, written and
/// dropped before the next kind is built, so that at most one kind's profiles (and the merged
/// CPU and allocation profiles the summary reads) are held at once.
pub(super) fn write_profiles(
    sessions: &[Session],
    options: &WriteOptions,
    symbolizer: &mut anyprof_symbolizer::Symbolizer,
) -> Result<usize> {
    let WriteOptions {
        dir, elapsed, main, ..
    } = options;
    let (main, elapsed) = (*main, *elapsed);
    let mut processes = Vec::new();
    for s in sessions {
        let Some(pid) = s.pid() else { continue };
        let is_main = s.image_key() == main;
        // A forked child that execs at once (a shell running a command) reports nothing of
        // its own before the exec'd image takes over: nothing of it to write. Such an image
        // never says goodbye (exec runs neither our destructor nor `_exit`); a child that
        // ended by itself did, and is written even if none of its allocations happened to
        // be sampled (a single 1 MiB block escapes the default rate one time in seven): its
        // exact counters are its own.
        if !is_main
            && !s.said_goodbye
            && s.cpu.is_empty()
            && s.heap.values().all(|b| b.counts.alloc_objects == 0)
        {
            continue;
        }
        processes.push(Process {
            session: s,
            pid,
            name: s.command_name(),
            is_main,
        });
    }
    // The program first (pprof takes the first mapping as the main binary), then the others
    // in the order they connected.
    processes.sort_by_key(|p| !p.is_main);
    // Two images of one pid with one name (a program that execs itself) get a file each: the
    // program keeps the plain name, the other is numbered (`PID.NAME-2`).
    let mut used = std::collections::HashSet::new();
    let suffixes: Vec<String> = processes
        .iter()
        .map(|p| {
            let base = format!("{}.{}", p.pid, sanitize(&p.name));
            (1..)
                .map(|n| {
                    if n == 1 {
                        base.clone()
                    } else {
                        format!("{base}-{n}")
                    }
                })
                .find(|s| used.insert(s.clone()))
                .unwrap_or(base)
        })
        .collect();

    // One file that cannot be written (a full disk, a directory in its place) must not cost
    // the others: each failure is reported and counted, and the run fails at the end.
    let mut failed = 0;
    let mut files = 0;
    let mut written = Vec::new();
    let mut write = |name: String, profile: &Profile, written: &mut Vec<PathBuf>| {
        let path = dir.join(name);
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
    let header = run_comments(&processes);
    let now = anyprof::output::unix_nanos();
    let (mut whole_cpu, mut whole_allocs) = (None, None);
    let mut per_process = 0;
    for kind in ["cpu", "heap", "allocs"] {
        if processes.is_empty()
            || !(if kind == "cpu" {
                options.cpu
            } else {
                options.heap
            })
        {
            continue;
        }
        let built: Vec<Profile> = processes
            .iter()
            .map(|p| {
                let s = p.session;
                match kind {
                    "cpu" => {
                        let duration = s.connected_for().unwrap_or(elapsed);
                        profile::cpu::build(s, symbolizer, duration.as_nanos() as u64)
                    }
                    "heap" => profile::heap::build(s, symbolizer, profile::heap::View::Heap, now),
                    _ => profile::heap::build(s, symbolizer, profile::heap::View::Allocs, now),
                }
            })
            .collect();
        let parts: Vec<Part<'_>> = processes
            .iter()
            .zip(&built)
            .map(|(p, profile)| Part {
                pid: p.pid,
                process: &p.name,
                profile,
            })
            .collect();
        let mut comments = header.clone();
        if processes.len() > 1 {
            if kind == "cpu" {
                comments.push(run_cpu_stats(&processes));
            } else {
                comments.extend(run_mem_stats(&processes));
            }
        }
        let merged = merge_processes(&parts, &comments);
        write(format!("{kind}.pb.gz"), &merged, &mut written);
        if processes.len() > 1 {
            for (suffix, profile) in suffixes.iter().zip(&built) {
                let mut ignored = Vec::new();
                write(format!("{kind}.{suffix}.pb.gz"), profile, &mut ignored);
                per_process += ignored.len();
            }
        }
        match kind {
            "cpu" => whole_cpu = Some(merged),
            "allocs" => whole_allocs = Some(merged),
            _ => {}
        }
    }
    if !options.quiet && !processes.is_empty() {
        print_summary(
            &processes,
            whole_cpu.as_ref(),
            whole_allocs.as_ref(),
            &written,
            elapsed,
            options.oom_killed,
        );
        if per_process > 0 {
            eprintln!(
                "anyprof: each of the {} processes also has its own files, KIND.PID.COMMAND.pb.gz, in {}",
                processes.len(),
                dir.display()
            );
        }
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} profile file(s) could not be written (see above); the others are in {}",
            dir.display()
        );
    }
    Ok(files)
}

/// The comments that open each profile of the run: which processes it holds, the program's
/// first (`pid N COMMAND (the program)`), and how to see one of them.
fn run_comments(processes: &[Process<'_>]) -> Vec<String> {
    const LISTED: usize = 12;
    let mut list: Vec<String> = processes
        .iter()
        .take(LISTED)
        .map(|p| {
            let main = if p.is_main { " (the program)" } else { "" };
            format!("pid {} {}{main}", p.pid, p.name)
        })
        .collect();
    if processes.len() > LISTED {
        list.push(format!("{} more", processes.len() - LISTED));
    }
    let count = match processes.len() {
        1 => "1 process".to_string(),
        n => format!("{n} processes"),
    };
    let mut out = vec![format!(
        "anyprof: the whole run, {count}: {}",
        list.join(", ")
    )];
    // A run of one process needs no filter.
    if let Some(p) = processes
        .iter()
        .find(|p| !p.is_main)
        .filter(|_| processes.len() > 1)
    {
        out.push(format!(
            "anyprof: samples are labelled with pid and process; one process: go tool pprof \
             -tagfocus=process={} (or -tagfocus=pid={})",
            p.name, p.pid
        ));
    }
    out
}

/// The CPU counters of a run of several processes, added up (each process's own are in the
/// comments of its own file).
fn run_cpu_stats(processes: &[Process<'_>]) -> String {
    use anyprof_wire::Counter;
    let sum = |f: &dyn Fn(&Session) -> u64| {
        processes
            .iter()
            .fold(0u64, |a, p| a.saturating_add(f(p.session)))
    };
    let samples = sum(&|s| s.cpu.values().fold(0u64, |a, t| a.saturating_add(t.count)));
    let hz: std::collections::BTreeSet<u32> = processes
        .iter()
        .filter_map(|p| p.session.hello.as_ref().map(|h| h.cpu_hz))
        .collect();
    let hz: Vec<String> = hz.iter().map(u32::to_string).collect();
    format!(
        "anyprof: {samples} samples at {} Hz requested (weights are measured thread CPU time); \
         lost samples: {}; truncated stacks: {}; each process's details are in its own file",
        hz.join("/"),
        sum(&|s| s.lost_samples()),
        sum(&|s| s.counter(Counter::Truncated)),
    )
}

/// The exact heap counters of a run of several processes, added up, as the `# Name = value`
/// lines a process's own heap profile has (the per-process ones are prefixed by their pid).
fn run_mem_stats(processes: &[Process<'_>]) -> Vec<String> {
    use anyprof_wire::MemStat;
    let stats: Vec<_> = processes
        .iter()
        .filter_map(|p| p.session.mem_stats.as_ref())
        .collect();
    let sum = |f: MemStat| stats.iter().fold(0u64, |a, m| a.saturating_add(m.get(f)));
    let (mallocs, frees) = (sum(MemStat::Mallocs), sum(MemStat::Frees));
    let (alloc, free) = (sum(MemStat::AllocBytes), sum(MemStat::FreeBytes));
    vec![
        format!("# TotalAlloc = {alloc}"),
        format!("# HeapAlloc = {}", alloc.saturating_sub(free)),
        format!("# HeapObjects = {}", mallocs.saturating_sub(frees)),
        format!("# Mallocs = {mallocs}"),
        format!("# Frees = {frees}"),
    ]
}

/// The exit summary: the run in one line, its busiest processes (when there are several),
/// the top functions over the whole run, and the files written.
fn print_summary(
    processes: &[Process<'_>],
    cpu: Option<&Profile>,
    allocs: Option<&Profile>,
    written: &[PathBuf],
    elapsed: Duration,
    oom_killed: bool,
) {
    let sessions = || processes.iter().map(|p| p.session);
    let samples = sessions()
        .flat_map(|s| s.cpu.values())
        .fold(0u64, |a, t| a.saturating_add(t.count));
    let cpu_ns = |s: &Session| s.cpu.values().fold(0u64, |a, t| a.saturating_add(t.cpu_ns));
    let threads: usize = sessions()
        .map(|s| {
            s.cpu
                .keys()
                .map(|k| k.tid)
                .collect::<std::collections::HashSet<_>>()
                .len()
        })
        .sum();
    let lost = sessions().fold(0u64, |a, s| a.saturating_add(s.lost_samples()));
    let total_cpu = sessions().fold(0u64, |a, s| a.saturating_add(cpu_ns(s)));
    let program = processes.iter().find(|p| p.is_main);
    let who = program.map_or_else(
        || "the program's processes".to_string(),
        |p| format!("{} (pid {})", p.name, p.pid),
    );
    let across = if processes.len() > 1 {
        format!(" in {} processes", processes.len())
    } else {
        String::new()
    };
    eprintln!(
        "anyprof: {who} ran {:.2}s: {samples} CPU samples, {:.2}s CPU on {threads} thread(s){across}, {lost} lost",
        elapsed.as_secs_f64(),
        total_cpu as f64 / 1e9,
    );
    if oom_killed {
        eprintln!(
            "anyprof: the kernel's OOM killer ended it: heap.pb.gz shows what was live when \
             it died (go tool pprof -sample_index=inuse_space -top heap.pb.gz)"
        );
    }
    let usage: Vec<summary::ProcessUsage> = processes
        .iter()
        .map(|p| {
            let stats = p.session.mem_stats.as_ref();
            summary::ProcessUsage {
                name: p.name.clone(),
                pid: p.pid,
                cpu_ns: cpu_ns(p.session),
                alloc_bytes: stats.map(|m| m.get(anyprof_wire::MemStat::AllocBytes)),
                max_rss: stats.map(|m| m.get(anyprof_wire::MemStat::MaxRssBytes)),
            }
        })
        .collect();
    eprint!("{}", summary::format_processes(&usage, 5));
    if let Some(p) = cpu {
        eprint!("{}", summary::format_cpu_top(p, 10));
        eprint!("{}", anyprof::unnamed::format_missing_names(p));
    }
    if let Some(p) = allocs {
        let stats: Vec<_> = sessions().filter_map(|s| s.mem_stats.as_ref()).collect();
        if processes.len() > 1 {
            if !stats.is_empty() {
                eprint!("{}", summary::format_run_heap(&stats));
            }
            eprint!("{}", summary::format_heap_top(p, None, 5));
        } else {
            eprint!("{}", summary::format_heap_top(p, stats.first().copied(), 5));
        }
    }
    for path in written {
        eprintln!(
            "anyprof: wrote {0}  (view it with: go tool pprof -top {0})",
            path.display()
        );
    }
}

/// How many characters of a command name go into a file name: with `.PID.`, the kind, the
/// suffix and `write_atomic`'s temporary suffix, a file name must stay below NAME_MAX (255).
const NAME_CHARS: usize = 64;

/// `name` as part of a file name: only `[A-Za-z0-9-_+]` (others become `_`), at most
/// [`NAME_CHARS`] of them.
pub(super) fn sanitize(name: &str) -> String {
    name.chars()
        .take(NAME_CHARS)
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
