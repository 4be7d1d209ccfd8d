//! The CPU profile, as Go's `runtime/pprof` writes it: sample types `samples/count` and
//! `cpu/nanoseconds`, period type `cpu/nanoseconds`, period `1e9/hz`.
//!
//! Unlike Go, the `cpu` value of a sample is the thread CPU time measured since that thread's
//! previous sample, not `count × period`: per-thread CPU timers are serviced from the
//! scheduler tick, so the real interval can differ from the requested one, and the measured
//! time keeps the totals honest. Samples carry a `thread` (name) and a `tid` label.
//! Samples the process lost are shown as a `[lost samples]` frame, stacks whose unwinding
//! stopped early end in a `[truncated stack]` root frame.

use std::collections::BTreeMap;

use anyprof_symbolizer::Symbolizer;
use anyprof_wire::{Counter, FLAG_TRUNCATED};

use crate::ingest::Session;
use crate::pprof::builder::{FrameLine, LabelValue, ProfileBuilder};
use crate::pprof::Profile;
use crate::symbolize::{RuntimeAddress, StackKind};

use super::Locator;

/// Name of the synthetic frame for samples the process dropped.
pub const LOST_SAMPLES: &str = "[lost samples]";
/// Name of the synthetic root frame of stacks that were not unwound to the end.
pub const TRUNCATED_STACK: &str = "[truncated stack]";

fn synthetic(name: &str) -> FrameLine {
    FrameLine {
        name: name.into(),
        system_name: name.into(),
        file: String::new(),
        line: 0,
    }
}

/// Builds the CPU profile of `session`; `duration_ns` is the wall time it covers.
pub fn build(session: &Session, symbolizer: &mut Symbolizer, duration_ns: u64) -> Profile {
    let hz = session.hello.as_ref().map(|h| h.cpu_hz).unwrap_or(0).max(1);
    let period = 1_000_000_000 / i64::from(hz);
    let mut b = ProfileBuilder::new(
        &[("samples", "count"), ("cpu", "nanoseconds")],
        ("cpu", "nanoseconds"),
        period,
    );
    let start = session
        .hello
        .as_ref()
        .map(|h| h.start_realtime_ns)
        .unwrap_or(0);
    b.set_time(start as i64, duration_ns as i64);

    let mut locate = Locator::new(
        &mut b,
        session,
        symbolizer,
        session.cpu.keys().map(|k| k.frames.as_slice()),
        StackKind::CPU,
    );

    let mut truncated_loc = None;
    let mut totals: BTreeMap<u32, u64> = BTreeMap::new();
    for (key, t) in &session.cpu {
        let mut locs = locate.stack(&mut b, &key.frames);
        if key.flags & FLAG_TRUNCATED != 0 {
            let loc = *truncated_loc.get_or_insert_with(|| {
                b.location(0, RuntimeAddress(0), &[synthetic(TRUNCATED_STACK)])
            });
            locs.push(loc);
        }
        let name = session
            .thread_names
            .get(&key.tid)
            .cloned()
            .unwrap_or_else(|| format!("tid {}", key.tid));
        b.sample(
            locs,
            vec![t.count as i64, t.cpu_ns as i64],
            &[
                ("thread", LabelValue::Str(&name)),
                ("tid", LabelValue::Num(i64::from(key.tid), "tid")),
            ],
        );
        let total = totals.entry(key.tid).or_default();
        *total = total.saturating_add(t.count);
    }

    let lost = session.lost_samples();
    if lost > 0 {
        let loc = b.location(0, RuntimeAddress(0), &[synthetic(LOST_SAMPLES)]);
        b.sample(
            vec![loc],
            vec![lost as i64, (lost as i64).saturating_mul(period)],
            &[],
        );
    }

    let samples = totals.values().fold(0u64, |a, &b| a.saturating_add(b));
    let cpu_ns = session
        .cpu
        .values()
        .fold(0u64, |a, t| a.saturating_add(t.cpu_ns));
    let effective = if cpu_ns > 0 {
        samples as f64 / (cpu_ns as f64 / 1e9)
    } else {
        0.0
    };
    b.comment(&format!(
        "anyprof: {samples} samples on {} threads at {hz} Hz requested, {effective:.0} Hz effective \
         (weights are measured thread CPU time)",
        totals.len()
    ));
    if let Some(text) = cpu_source_comment(session) {
        b.comment(&text);
    }
    b.comment(&format!(
        "anyprof: lost samples: {} (ring full {}, send failed {}); truncated stacks: {}",
        lost,
        session.counter(Counter::DroppedRingFull),
        session.counter(Counter::DroppedSend),
        session.counter(Counter::Truncated),
    ));
    if !session.said_goodbye && session.read_at_death {
        b.comment(
            "anyprof: the process ended without its last flush (killed, crashed, or it called \
             _exit); its last samples, heap and counters were read from its memory",
        );
    } else if !session.said_goodbye && session.closed_at.is_some() {
        b.comment(
            "anyprof: the process did not report its final counters (killed, or it called _exit)",
        );
    }
    b.finish()
}

/// Names the CPU sources the preloaded process used, by thread count, and why threads fell
/// back (None for a process that reported neither, such as one profiled by `attach`).
pub fn cpu_source_comment(session: &Session) -> Option<String> {
    let perf = session.counter(Counter::ThreadsPerf);
    let timed = session.counter(Counter::ThreadsTimed);
    if perf == 0 && timed == 0 {
        return None;
    }
    let refused = session.counter(Counter::PerfRefused);
    let blocked = session.counter(Counter::PerfBlocked);
    let mut text = format!(
        "anyprof: CPU source: perf cpu-clock events given to {perf} threads (exact rate, user \
         time; system-call time is weighed into the next sample), POSIX CPU timers to {timed} \
         threads (serviced at the kernel's tick; a thread may have had both)"
    );
    if refused > 0 {
        text.push_str(&format!(
            "; {refused} threads got a timer because no perf event could be had for them (the \
             kernel's locked-memory budget for perf, or permission; a seccomp filter; or 256 \
             threads had one already)"
        ));
    }
    if blocked > 0 {
        text.push_str(&format!(
            "; {blocked} threads were moved to a timer because they ran 32 periods without a \
             sample (the sampling signal blocked, or nearly all their time in system calls)"
        ));
    }
    let without_thread = session.counter(Counter::PerfWithoutThread);
    if without_thread > 0 {
        text.push_str(&format!(
            "; {without_thread} threads got a timer while the program was single-threaded (the \
             perf source needs anyprof's own thread, which `record` starts only with the \
             program's second thread); threads that lived on got a perf event then"
        ));
    }
    if perf == 0 && timed > 0 && without_thread == 0 {
        text.push_str(
            "; no perf events (--cpu-source perf asks for them; they are not used where \
             perf_event_open is not allowed: kernel.perf_event_paranoid above 2, a seccomp \
             filter, or a low RLIMIT_SIGPENDING)",
        );
    }
    Some(text)
}
