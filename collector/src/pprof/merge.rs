//! One profile of a whole run from the profiles of its processes, as perf and samply show a
//! run: every sample of every process, each labelled with the process it came from.
//!
//! Each sample gets two labels: `pid`, numeric with unit `pid` (so `go tool pprof
//! -tagfocus=pid=1234` selects one process: pprof reads a filter made of digits as a numeric
//! range, which never matches a string label), and `process`, the command name as a string
//! (`-tagfocus=process=cc1`). Mappings and locations stay those of their process, under new
//! ids: the same library loaded by two processes at different addresses is two mappings, so
//! no address of one is read in the other's. Functions are shared (they hold names only).
//! The parts must have the same sample types (they come from the same builder); period, period
//! type and default sample type are the first part's. Values are added as they are: CPU
//! values are measured thread CPU time and heap values are already unbiased, so they add up
//! even where two processes sampled at different rates.

use std::collections::HashMap;

use super::proto::{Function, Label, Line, Location, Mapping, Profile, Sample, ValueType};

/// One process's profile and who it was.
pub struct Part<'a> {
    /// The process id (the `pid` label).
    pub pid: u32,
    /// The command name (the `process` label).
    pub process: &'a str,
    /// Its profile.
    pub profile: &'a Profile,
}

/// Label key of the process id.
pub const PID_LABEL: &str = "pid";
/// Label key of the command name.
pub const PROCESS_LABEL: &str = "process";

struct Merger {
    out: Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(i64, i64, i64, i64), u64>,
}

impl Merger {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.out.string_table.len() as i64;
        self.out.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    /// Re-interns string `i` of `from`.
    fn moved(&mut self, from: &Profile, i: i64) -> i64 {
        let s = from
            .string_table
            .get(usize::try_from(i).unwrap_or(usize::MAX))
            .map_or("", String::as_str);
        self.string(s)
    }

    fn value_type(&mut self, from: &Profile, v: &ValueType) -> ValueType {
        ValueType {
            r#type: self.moved(from, v.r#type),
            unit: self.moved(from, v.unit),
        }
    }
}

/// Merges the parts into one profile with `comments`; a part's own comments are kept only
/// when it is the only part. A part whose sample types differ from the
/// first part's is left out, with a comment saying so.
pub fn merge_processes(parts: &[Part<'_>], comments: &[String]) -> Profile {
    let mut m = Merger {
        out: Profile::default(),
        strings: HashMap::new(),
        functions: HashMap::new(),
    };
    m.string("");
    let Some(first) = parts.first() else {
        return m.out;
    };
    let types_of = |p: &Profile| -> Vec<(String, String)> {
        let s = |i: i64| {
            p.string_table
                .get(usize::try_from(i).unwrap_or(usize::MAX))
                .cloned()
                .unwrap_or_default()
        };
        p.sample_type
            .iter()
            .map(|v| (s(v.r#type), s(v.unit)))
            .collect()
    };
    let types = types_of(first.profile);
    m.out.sample_type = first
        .profile
        .sample_type
        .iter()
        .map(|v| m.value_type(first.profile, v))
        .collect();
    m.out.period_type = first
        .profile
        .period_type
        .as_ref()
        .map(|v| m.value_type(first.profile, v));
    m.out.period = first.profile.period;
    if first.profile.default_sample_type != 0 {
        m.out.default_sample_type = m.moved(first.profile, first.profile.default_sample_type);
    }
    for c in comments {
        let i = m.string(c);
        m.out.comment.push(i);
    }
    // The run spans from its first start to its last end.
    let spans: Vec<(i64, i64)> = parts
        .iter()
        .map(|p| (p.profile.time_nanos, p.profile.duration_nanos))
        .filter(|(t, _)| *t > 0)
        .collect();
    if let Some(start) = spans.iter().map(|(t, _)| *t).min() {
        let end = spans
            .iter()
            .map(|(t, d)| t.saturating_add(*d))
            .max()
            .unwrap_or(start);
        m.out.time_nanos = start;
        m.out.duration_nanos = end.saturating_sub(start);
    }
    let several = parts.len() > 1;
    for part in parts {
        let p = part.profile;
        if types_of(p) != types {
            let text = format!(
                "anyprof: pid {} ({}) left out: its sample types differ from the others'",
                part.pid, part.process
            );
            let i = m.string(&text);
            m.out.comment.push(i);
            continue;
        }
        // One process's comments describe it alone: a run of many processes would open
        // `pprof -top` with screens of them, so the caller sums them up instead.
        if !several {
            for &c in &p.comment {
                let i = m.moved(p, c);
                m.out.comment.push(i);
            }
        }
        let mut mapping_ids = HashMap::new();
        for map in &p.mapping {
            let id = m.out.mapping.len() as u64 + 1;
            mapping_ids.insert(map.id, id);
            let (filename, build_id) = (m.moved(p, map.filename), m.moved(p, map.build_id));
            m.out.mapping.push(Mapping {
                id,
                filename,
                build_id,
                ..*map
            });
        }
        let mut function_ids = HashMap::new();
        for f in &p.function {
            let key = (
                m.moved(p, f.name),
                m.moved(p, f.system_name),
                m.moved(p, f.filename),
                f.start_line,
            );
            let next = m.out.function.len() as u64 + 1;
            let id = *m.functions.entry(key).or_insert(next);
            if id == next {
                m.out.function.push(Function {
                    id,
                    name: key.0,
                    system_name: key.1,
                    filename: key.2,
                    start_line: key.3,
                });
            }
            function_ids.insert(f.id, id);
        }
        let mut location_ids = HashMap::new();
        for l in &p.location {
            let id = m.out.location.len() as u64 + 1;
            location_ids.insert(l.id, id);
            m.out.location.push(Location {
                id,
                mapping_id: mapping_ids.get(&l.mapping_id).copied().unwrap_or(0),
                address: l.address,
                line: l
                    .line
                    .iter()
                    .map(|line| Line {
                        function_id: function_ids.get(&line.function_id).copied().unwrap_or(0),
                        ..*line
                    })
                    .collect(),
                is_folded: l.is_folded,
            });
        }
        let (pid_key, pid_unit) = (m.string(PID_LABEL), m.string("pid"));
        let (process_key, process) = (m.string(PROCESS_LABEL), m.string(part.process));
        for s in &p.sample {
            let mut label: Vec<Label> = s
                .label
                .iter()
                // A process's own profile never carries these keys; if one did, the run's
                // labels win rather than giving a sample two values for one key.
                .filter(|l| {
                    let key = p.string_table.get(l.key as usize).map(String::as_str);
                    key != Some(PID_LABEL) && key != Some(PROCESS_LABEL)
                })
                .map(|l| Label {
                    key: m.moved(p, l.key),
                    str: if l.str != 0 { m.moved(p, l.str) } else { 0 },
                    num: l.num,
                    num_unit: if l.num_unit != 0 {
                        m.moved(p, l.num_unit)
                    } else {
                        0
                    },
                })
                .collect();
            label.push(Label {
                key: pid_key,
                str: 0,
                num: i64::from(part.pid),
                num_unit: pid_unit,
            });
            label.push(Label {
                key: process_key,
                str: process,
                num: 0,
                num_unit: 0,
            });
            m.out.sample.push(Sample {
                location_id: s
                    .location_id
                    .iter()
                    .map(|id| location_ids.get(id).copied().unwrap_or(0))
                    .collect(),
                value: s.value.clone(),
                label,
            });
        }
    }
    m.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pprof::builder::{FrameLine, LabelValue, ProfileBuilder};
    use anyprof_symbolizer::{FileOffset, RuntimeAddress};

    /// A process's CPU profile: one sample in `function` of `library` mapped at `start`.
    fn process(library: &str, start: u64, function: &str, ns: i64) -> Profile {
        let mut b = ProfileBuilder::new(
            &[("samples", "count"), ("cpu", "nanoseconds")],
            ("cpu", "nanoseconds"),
            10_000_000,
        );
        b.set_time(1_000, 500);
        let map = b.mapping(
            RuntimeAddress(start),
            RuntimeAddress(start + 0x1000),
            FileOffset(0),
            library,
            "ab",
            true,
            false,
        );
        let line = FrameLine {
            name: function.into(),
            system_name: function.into(),
            file: "f.c".into(),
            line: 3,
        };
        let loc = b.location(map, RuntimeAddress(start + 0x10), &[line]);
        b.sample(
            vec![loc],
            vec![1, ns],
            &[("thread", LabelValue::Str("main"))],
        );
        b.comment("anyprof: 1 samples");
        b.finish()
    }

    #[test]
    fn every_process_keeps_its_mappings_and_gets_its_labels() {
        let a = process("/lib/libc.so.6", 0x7000_0000, "memcpy", 30);
        let b = process("/lib/libc.so.6", 0x7100_0000, "memcpy", 70);
        let merged = merge_processes(
            &[
                Part {
                    pid: 10,
                    process: "gcc",
                    profile: &a,
                },
                Part {
                    pid: 11,
                    process: "cc1",
                    profile: &b,
                },
            ],
            &["anyprof: the run".into()],
        );
        assert_eq!(merged.mapping.len(), 2);
        assert_eq!(merged.location.len(), 2);
        assert_eq!(merged.function.len(), 1, "memcpy is one function");
        let starts: Vec<u64> = merged.mapping.iter().map(|m| m.memory_start).collect();
        assert_eq!(starts, [0x7000_0000, 0x7100_0000]);
        for (l, m) in merged.location.iter().zip(&merged.mapping) {
            assert_eq!(l.mapping_id, m.id);
            assert!(l.address >= m.memory_start && l.address < m.memory_limit);
        }
        let s = |i: i64| merged.string_table[i as usize].as_str();
        let labels: Vec<Vec<(String, String, i64)>> = merged
            .sample
            .iter()
            .map(|x| {
                x.label
                    .iter()
                    .map(|l| (s(l.key).into(), s(l.str).into(), l.num))
                    .collect()
            })
            .collect();
        assert_eq!(
            labels[1],
            [
                ("thread".into(), "main".into(), 0),
                ("pid".into(), String::new(), 11),
                ("process".into(), "cc1".into(), 0)
            ]
        );
        let comments: Vec<&str> = merged.comment.iter().map(|&i| s(i)).collect();
        assert_eq!(comments, ["anyprof: the run"]);
        assert_eq!(merged.period, 10_000_000);
        assert_eq!((merged.time_nanos, merged.duration_nanos), (1_000, 500));
        assert_eq!(
            merged.sample.iter().map(|x| x.value[1]).sum::<i64>(),
            100,
            "values add up"
        );
    }
}
