//! Builds profiles from hand-made sessions and checks them against the rules pprof enforces
//! (`CheckValid` in google/pprof) and the conventions in shared/notes/pprof.md.

use std::collections::HashSet;

use anyprof::ingest::{Session, StackKey, StackTotals};
use anyprof::pprof::{self, Profile};
use anyprof::profile::cpu;
use anyprof_symbolizer::Symbolizer;
use anyprof_wire::{Counter, Hello, Message, TimerKind, COUNTER_COUNT, FLAG_TRUNCATED};

fn hello(hz: u32) -> Hello {
    Hello {
        pid: 42,
        ppid: 1,
        cpu_hz: hz,
        timer: TimerKind::ThreadCpuTimer,
        mem_rate: 524288,
        start_realtime_ns: 1_700_000_000_000_000_000,
        start_monotonic_ns: 5,
        exe: b"/nonexistent/prog".to_vec(),
        cmdline: b"prog\0arg".to_vec(),
    }
}

fn session_with(stacks: &[(u32, &[u64], u8, u64, u64)]) -> Session {
    let mut s = Session {
        hello: Some(hello(100)),
        ..Session::default()
    };
    for &(tid, frames, flags, count, cpu_ns) in stacks {
        s.cpu.insert(
            StackKey {
                tid,
                frames: frames.to_vec(),
                flags,
            },
            StackTotals { count, cpu_ns },
        );
    }
    s
}

fn string(p: &Profile, i: i64) -> &str {
    &p.string_table[i as usize]
}

/// The structural rules pprof's parser enforces.
fn assert_valid(p: &Profile) {
    assert_eq!(
        p.string_table.first().map(String::as_str),
        Some(""),
        "string_table[0] must be empty"
    );
    let n = p.string_table.len() as i64;
    let ids = |v: Vec<u64>| {
        assert!(v.iter().all(|&id| id != 0), "ids must be nonzero");
        let set: HashSet<u64> = v.iter().copied().collect();
        assert_eq!(set.len(), v.len(), "ids must be unique");
        set
    };
    let mappings = ids(p.mapping.iter().map(|m| m.id).collect());
    let functions = ids(p.function.iter().map(|f| f.id).collect());
    let locations = ids(p.location.iter().map(|l| l.id).collect());
    for f in &p.function {
        assert!(f.name < n && f.system_name < n && f.filename < n);
    }
    for l in &p.location {
        assert!(l.mapping_id == 0 || mappings.contains(&l.mapping_id));
        for line in &l.line {
            assert!(
                functions.contains(&line.function_id),
                "line with nil function"
            );
        }
    }
    for s in &p.sample {
        assert_eq!(s.value.len(), p.sample_type.len());
        for id in &s.location_id {
            assert!(locations.contains(id));
        }
        for l in &s.label {
            assert!(l.key < n && l.str < n && l.num_unit < n);
        }
    }
}

#[test]
fn cpu_profile_has_go_sample_types_period_and_valid_tables() {
    let s = session_with(&[
        (7, &[0x1000, 0x2005, 0x3009], 0, 3, 30_000_000),
        (8, &[0x1000], 0, 1, 9_000_000),
    ]);
    let p = cpu::build(&s, &mut Symbolizer::new(), 1_000_000_000);
    assert_valid(&p);
    let types: Vec<_> = p
        .sample_type
        .iter()
        .map(|t| (string(&p, t.r#type), string(&p, t.unit)))
        .collect();
    assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
    let pt = p.period_type.as_ref().unwrap();
    assert_eq!(
        (string(&p, pt.r#type), string(&p, pt.unit), p.period),
        ("cpu", "nanoseconds", 10_000_000)
    );
    assert_eq!(p.duration_nanos, 1_000_000_000);
    assert_eq!(p.time_nanos, 1_700_000_000_000_000_000);
    let total: i64 = p.sample.iter().map(|s| s.value[0]).sum();
    assert_eq!(total, 4);
    let cpu_total: i64 = p.sample.iter().map(|s| s.value[1]).sum();
    assert_eq!(
        cpu_total, 39_000_000,
        "cpu values are the measured thread CPU time"
    );
}

#[test]
fn leaf_address_is_exact_and_callers_point_into_the_call() {
    let s = session_with(&[(7, &[0x1000, 0x2005, 0x3009], 0, 1, 1)]);
    let p = cpu::build(&s, &mut Symbolizer::new(), 1);
    let sample = &p.sample[0];
    let addr = |id: u64| p.location.iter().find(|l| l.id == id).unwrap().address;
    let addrs: Vec<u64> = sample.location_id.iter().map(|&id| addr(id)).collect();
    assert_eq!(addrs, [0x1000, 0x2004, 0x3008]);
}

#[test]
fn samples_carry_thread_name_and_tid_labels() {
    let mut s = session_with(&[(7, &[0x1000], 0, 1, 1)]);
    s.apply(Message::ThreadName(7, b"worker-1".to_vec()), &mut |_, _| {});
    let p = cpu::build(&s, &mut Symbolizer::new(), 1);
    let labels: Vec<_> = p.sample[0]
        .label
        .iter()
        .map(|l| {
            (
                string(&p, l.key).to_string(),
                string(&p, l.str).to_string(),
                l.num,
                string(&p, l.num_unit).to_string(),
            )
        })
        .collect();
    assert!(
        labels.contains(&("thread".into(), "worker-1".into(), 0, "".into())),
        "{labels:?}"
    );
    assert!(
        labels.contains(&("tid".into(), "".into(), 7, "tid".into())),
        "{labels:?}"
    );
}

fn function_names_of(p: &Profile, sample: &pprof::proto::Sample) -> Vec<String> {
    sample
        .location_id
        .iter()
        .flat_map(|id| p.location.iter().find(|l| l.id == *id).unwrap().line.iter())
        .map(|line| {
            let f = p
                .function
                .iter()
                .find(|f| f.id == line.function_id)
                .unwrap();
            string(p, f.name).to_string()
        })
        .collect()
}

#[test]
fn lost_samples_are_shown_not_hidden() {
    let mut s = session_with(&[(7, &[0x1000], 0, 10, 100_000_000)]);
    let mut counters = vec![0u64; COUNTER_COUNT];
    counters[Counter::DroppedRingFull as usize] = 2;
    counters[Counter::DroppedSend as usize] = 3;
    s.apply(Message::Goodbye(counters), &mut |_, _| {});
    let p = cpu::build(&s, &mut Symbolizer::new(), 1);
    assert_valid(&p);
    let lost = p
        .sample
        .iter()
        .find(|smp| function_names_of(&p, smp) == [cpu::LOST_SAMPLES])
        .expect("a [lost samples] sample");
    assert_eq!(lost.value, [5, 5 * 10_000_000]);
    let comments: Vec<_> = p.comment.iter().map(|&c| string(&p, c)).collect();
    assert!(
        comments.iter().any(|c| c.contains("lost samples: 5")),
        "{comments:?}"
    );
}

#[test]
fn truncated_stacks_end_in_a_marker_frame() {
    let s = session_with(&[(7, &[0x1000, 0x2000], FLAG_TRUNCATED, 1, 1)]);
    let p = cpu::build(&s, &mut Symbolizer::new(), 1);
    let names = function_names_of(&p, &p.sample[0]);
    assert_eq!(names.last().map(String::as_str), Some(cpu::TRUNCATED_STACK));
}

#[test]
fn encoded_profile_round_trips_through_gzip() {
    let s = session_with(&[(7, &[0x1000, 0x2000], 0, 2, 20)]);
    let p = cpu::build(&s, &mut Symbolizer::new(), 1);
    let bytes = pprof::encode_gzipped(&p);
    assert_eq!(&bytes[..2], &[0x1f, 0x8b]);
    assert_eq!(pprof::decode(&bytes).unwrap(), p);
}

#[test]
fn reconnected_sessions_of_one_image_merge_and_exec_images_do_not() {
    let a = session_with(&[(7, &[0x1000], 0, 2, 20)]);
    let b = session_with(&[(7, &[0x1000], 0, 3, 30)]);
    let mut c = session_with(&[(7, &[0x1000], 0, 1, 10)]);
    c.hello.as_mut().unwrap().start_monotonic_ns = 99; // same pid, exec'd later
    let merged = anyprof::collect::merge_by_pid(vec![a, b, c]);
    assert_eq!(merged.len(), 2);
    let totals: Vec<u64> = merged
        .iter()
        .map(|s| s.cpu.values().map(|t| t.count).sum())
        .collect();
    assert_eq!(totals, [5, 1]);
}

#[test]
fn a_session_with_more_stacks_than_any_process_has_is_over_its_limits() {
    let mut s = session_with(&[]);
    assert_eq!(s.over_limits(), None);
    for i in 0..1_000_001u64 {
        s.cpu.insert(
            StackKey {
                tid: 1,
                frames: vec![i],
                flags: 0,
            },
            StackTotals {
                count: 1,
                cpu_ns: 1,
            },
        );
    }
    let why = s.over_limits().expect("over the limit");
    assert!(why.contains("distinct CPU stacks"), "{why}");
}
