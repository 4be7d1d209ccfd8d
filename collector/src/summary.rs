//! The short text summary `anyprof record` prints at exit: a `pprof -top`-like list of the
//! functions where the CPU time went.

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
                    e.flat += v;
                }
                if !seen.contains(&name) {
                    e.cum += v;
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
    let total: i64 = profile.sample.iter().filter_map(|s| s.value.get(1)).sum();
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
