//! The short text summary `anyprof record` prints at exit: a `pprof -top`-like list of the
//! functions where the CPU time went (over every process of the run), and for a run of
//! several processes the ones that used the most CPU and memory.

use std::collections::HashMap;
use std::fmt::Write;

use crate::pprof::Profile;

/// One function's share of a profile.
#[derive(Clone, Debug, PartialEq)]
pub struct TopEntry {
    /// Function name (the innermost line of the location).
    pub name: String,
    /// `file:line` of the hottest line, if known.
    pub place: String,
    /// Value where the function is the leaf.
    pub flat: i64,
    /// Value where the function is anywhere on the stack (once per sample).
    pub cum: i64,
}

/// Computes flat and cumulative totals of sample value `index` by function, hottest first.
pub fn top(profile: &Profile, index: usize) -> Vec<TopEntry> {
    let name_of = |i: i64| {
        profile
            .string_table
            .get(i as usize)
            .cloned()
            .unwrap_or_default()
    };
    let functions: HashMap<u64, (String, String)> = profile
        .function
        .iter()
        .map(|f| (f.id, (name_of(f.name), name_of(f.filename))))
        .collect();
    let locations: HashMap<u64, _> = profile.location.iter().map(|l| (l.id, l)).collect();
    let mappings: HashMap<u64, String> = profile
        .mapping
        .iter()
        .map(|m| (m.id, name_of(m.filename)))
        .collect();
    let mut table: HashMap<String, TopEntry> = HashMap::new();
    for s in &profile.sample {
        let v = s.value.get(index).copied().unwrap_or(0);
        let mut seen = Vec::new();
        for (depth, id) in s.location_id.iter().enumerate() {
            let Some(loc) = locations.get(id) else {
                continue;
            };
            let lines: Vec<_> = if loc.line.is_empty() {
                // Like pprof: an address without symbols is shown as its object.
                let object = mappings
                    .get(&loc.mapping_id)
                    .map(|f| short(f))
                    .filter(|f| !f.is_empty());
                let name =
                    object.map_or_else(|| format!("{:#x}", loc.address), |o| format!("[{o}]"));
                vec![(name, String::new())]
            } else {
                loc.line
                    .iter()
                    .map(|l| {
                        let (n, f) = functions.get(&l.function_id).cloned().unwrap_or_default();
                        let place = if f.is_empty() {
                            String::new()
                        } else {
                            format!("{}:{}", short(&f), l.line)
                        };
                        (n, place)
                    })
                    .collect()
            };
            for (j, (name, place)) in lines.into_iter().enumerate() {
                let e = table.entry(name.clone()).or_insert_with(|| TopEntry {
                    name: name.clone(),
                    place,
                    flat: 0,
                    cum: 0,
                });
                if depth == 0 && j == 0 {
                    e.flat = e.flat.saturating_add(v);
                }
                if !seen.contains(&name) {
                    e.cum = e.cum.saturating_add(v);
                    seen.push(name);
                }
            }
        }
    }
    let mut out: Vec<_> = table.into_values().collect();
    out.sort_by(|a, b| {
        b.flat
            .cmp(&a.flat)
            .then(b.cum.cmp(&a.cum))
            .then(a.name.cmp(&b.name))
    });
    out
}

fn short(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Formats the top `n` entries of a CPU profile (value index 1, nanoseconds).
pub fn format_cpu_top(profile: &Profile, n: usize) -> String {
    let entries = top(profile, 1);
    let total = profile
        .sample
        .iter()
        .filter_map(|s| s.value.get(1))
        .fold(0i64, |a, &b| a.saturating_add(b));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>9} {:>6} {:>9} {:>6}  function",
        "flat", "flat%", "cum", "cum%"
    );
    let pct = |v: i64| {
        if total > 0 {
            100.0 * v as f64 / total as f64
        } else {
            0.0
        }
    };
    for e in entries.iter().take(n) {
        let _ = writeln!(
            out,
            "{:>8.2}s {:>5.1}% {:>8.2}s {:>5.1}%  {} {}",
            e.flat as f64 / 1e9,
            pct(e.flat),
            e.cum as f64 / 1e9,
            pct(e.cum),
            e.name,
            e.place
        );
    }
    out
}

/// Bytes in binary units, as people read them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The heap part of the exit summary: the exact counters, the top allocation sites by bytes
/// allocated, and the sites of what was still live at exit (leak candidates).
pub fn format_heap_top(
    allocs: &Profile,
    stats: Option<&anyprof_wire::MemStats>,
    n: usize,
) -> String {
    use anyprof_wire::MemStat;
    let mut out = String::new();
    if let Some(m) = stats {
        let live = m
            .get(MemStat::AllocBytes)
            .saturating_sub(m.get(MemStat::FreeBytes));
        let _ = writeln!(
            out,
            "anyprof: heap: {} allocations ({}), {} frees; live at exit {} in {} objects; peak live {}; max RSS {}",
            m.get(MemStat::Mallocs),
            human_bytes(m.get(MemStat::AllocBytes)),
            m.get(MemStat::Frees),
            human_bytes(live),
            m.get(MemStat::Mallocs).saturating_sub(m.get(MemStat::Frees)),
            human_bytes(m.get(MemStat::PeakLiveBytes)),
            human_bytes(m.get(MemStat::MaxRssBytes)),
        );
    }
    for (index, title) in [
        (1, "allocated (alloc_space)"),
        (3, "still live at exit (inuse_space): leak candidates"),
    ] {
        let entries: Vec<_> = top(allocs, index)
            .into_iter()
            .filter(|e| e.flat > 0)
            .take(n)
            .collect();
        if entries.is_empty() {
            continue;
        }
        let _ = writeln!(out, "  top allocation sites by bytes {title}:");
        for e in entries {
            let _ = writeln!(
                out,
                "  {:>10}  {} {}",
                human_bytes(e.flat as u64),
                e.name,
                e.place
            );
        }
    }
    out
}

/// One `--memstats` line: the native analogue of a `GODEBUG=gctrace=1` line. Format (subject
/// to change): `mem @T s: live B in N objects, +A allocs/-F frees (+X/-Y) since last,
/// total Z allocated, peak P, rss R`.
pub fn mem_trace_line(
    previous: Option<&anyprof_wire::MemStats>,
    now: &anyprof_wire::MemStats,
    since_start: f64,
) -> String {
    use anyprof_wire::MemStat;
    let get = |m: Option<&anyprof_wire::MemStats>, f: MemStat| m.map_or(0, |m| m.get(f));
    let live = now
        .get(MemStat::AllocBytes)
        .saturating_sub(now.get(MemStat::FreeBytes));
    let objects = now
        .get(MemStat::Mallocs)
        .saturating_sub(now.get(MemStat::Frees));
    format!(
        "mem @{since_start:.1}s: live {} in {objects} objects, +{} allocs/-{} frees (+{}/-{}) since last, total {} allocated, peak {}, rss {}",
        human_bytes(live),
        now.get(MemStat::Mallocs).saturating_sub(get(previous, MemStat::Mallocs)),
        now.get(MemStat::Frees).saturating_sub(get(previous, MemStat::Frees)),
        human_bytes(now.get(MemStat::AllocBytes).saturating_sub(get(previous, MemStat::AllocBytes))),
        human_bytes(now.get(MemStat::FreeBytes).saturating_sub(get(previous, MemStat::FreeBytes))),
        human_bytes(now.get(MemStat::AllocBytes)),
        human_bytes(now.get(MemStat::PeakLiveBytes)),
        human_bytes(now.get(MemStat::RssBytes)),
    )
}

/// What one process of a run used, for the exit summary's process list.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessUsage {
    /// Command name.
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// Measured CPU time, nanoseconds.
    pub cpu_ns: u64,
    /// Bytes allocated over its life (exact), if it reported them.
    pub alloc_bytes: Option<u64>,
    /// Peak resident set size, if it reported it.
    pub max_rss: Option<u64>,
}

/// The processes of a run that used the most CPU (then memory), one line each: the `n`
/// with the most CPU time, plus the one that allocated most if it is not among them.
/// Empty for a run of one process.
pub fn format_processes(usage: &[ProcessUsage], n: usize) -> String {
    let mut out = String::new();
    if usage.len() < 2 {
        return out;
    }
    let mut by_cpu: Vec<&ProcessUsage> = usage.iter().collect();
    by_cpu.sort_by(|a, b| {
        b.cpu_ns
            .cmp(&a.cpu_ns)
            .then(b.alloc_bytes.cmp(&a.alloc_bytes))
            .then(a.pid.cmp(&b.pid))
    });
    let mut shown: Vec<&ProcessUsage> = by_cpu.iter().take(n).copied().collect();
    if let Some(most) = usage
        .iter()
        .filter(|u| u.alloc_bytes.unwrap_or(0) > 0)
        .max_by_key(|u| u.alloc_bytes)
    {
        if !shown.iter().any(|u| std::ptr::eq(*u, most)) {
            shown.push(most);
        }
    }
    let cpu_total = usage.iter().fold(0u64, |a, u| a.saturating_add(u.cpu_ns));
    let _ = writeln!(
        out,
        "anyprof: {} processes, {:.2} s CPU in all; the busiest:",
        usage.len(),
        cpu_total as f64 / 1e9
    );
    let width = shown
        .iter()
        .map(|u| u.name.len() + u.pid.to_string().len())
        .max()
        .unwrap_or(0);
    for u in &shown {
        let who = format!("{} (pid {})", u.name, u.pid);
        let mut line = format!(
            "  {who:<w$} {:>8.2} s CPU",
            u.cpu_ns as f64 / 1e9,
            w = width + 7
        );
        if let Some(bytes) = u.alloc_bytes {
            let _ = write!(line, ", {} allocated", human_bytes(bytes));
        }
        if let Some(rss) = u.max_rss.filter(|&r| r > 0) {
            let _ = write!(line, ", max RSS {}", human_bytes(rss));
        }
        let _ = writeln!(out, "{line}");
    }
    let rest = usage.len().saturating_sub(shown.len());
    if rest > 0 {
        let _ = writeln!(out, "  and {rest} more");
    }
    out
}

/// The heap counters of a run of several processes, added up: allocations, frees and what
/// each process had live at its own exit.
pub fn format_run_heap(stats: &[&anyprof_wire::MemStats]) -> String {
    use anyprof_wire::MemStat;
    let sum = |f: MemStat| stats.iter().fold(0u64, |a, m| a.saturating_add(m.get(f)));
    let live = stats.iter().fold(0u64, |a, m| {
        a.saturating_add(
            m.get(MemStat::AllocBytes)
                .saturating_sub(m.get(MemStat::FreeBytes)),
        )
    });
    format!(
        "anyprof: heap of all {} processes: {} allocations ({}), {} frees; live at their exits {}\n",
        stats.len(),
        sum(MemStat::Mallocs),
        human_bytes(sum(MemStat::AllocBytes)),
        sum(MemStat::Frees),
        human_bytes(live),
    )
}

#[cfg(test)]
mod process_tests {
    use super::*;

    fn usage(name: &str, pid: u32, cpu_ms: u64, alloc: u64) -> ProcessUsage {
        ProcessUsage {
            name: name.into(),
            pid,
            cpu_ns: cpu_ms * 1_000_000,
            alloc_bytes: Some(alloc),
            max_rss: None,
        }
    }

    #[test]
    fn the_busiest_processes_come_first_and_the_largest_allocator_is_named() {
        let text = format_processes(
            &[
                usage("gcc", 1, 2, 1 << 10),
                usage("cc1", 2, 2310, 85 << 20),
                usage("as", 3, 50, 1 << 20),
                usage("collect2", 4, 1, 200 << 20),
            ],
            2,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "anyprof: 4 processes, 2.36 s CPU in all; the busiest:"
        );
        assert!(
            lines[1].starts_with("  cc1 (pid 2)")
                && lines[1].contains("2.31 s CPU, 85.0 MiB allocated"),
            "{text}"
        );
        assert!(lines[2].starts_with("  as (pid 3)"), "{text}");
        assert!(lines[3].starts_with("  collect2 (pid 4)"), "{text}");
        assert_eq!(lines[4], "  and 1 more");
        assert_eq!(format_processes(&[usage("a", 1, 1, 1)], 5), "");
    }
}
