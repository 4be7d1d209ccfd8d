//! The heap and allocs profiles, as Go's `runtime/pprof` writes them (`writeHeapProto`).
//!
//! Both carry the same four values per bucket — `alloc_objects/count`, `alloc_space/bytes`,
//! `inuse_objects/count`, `inuse_space/bytes` — with period type `space/bytes` and period =
//! the sampling rate. They differ only in the default sample type: unset for `heap` (pprof
//! then shows the last, `inuse_space`), `alloc_space` for `allocs`.
//!
//! Values are unbiased here, exactly as Go's `scaleHeapSample` does: a bucket of average
//! size `S` sampled at rate `R` is scaled by `1 / (1 - exp(-S/R))`, counts and bytes alike,
//! truncated to integers; at `R <= 1` nothing is scaled (every allocation was recorded).
//! Each sample has Go's numeric `bytes` label (the bucket's object size, no unit).

use anyprof_symbolizer::Symbolizer;
use anyprof_wire::{BucketCounts, MemStat, MemStats};

use crate::ingest::Session;
use crate::pprof::builder::{LabelValue, ProfileBuilder};
use crate::pprof::Profile;
use crate::symbolize::StackKind;

/// Which of the two views to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// `heap`: in-use by default.
    Heap,
    /// `allocs`: allocated by default.
    Allocs,
}

/// Go's `scaleHeapSample`: unbias `count` objects of `size` total bytes sampled at `rate`.
pub fn scale(count: u64, size: u64, rate: u64) -> (i64, i64) {
    if count == 0 || size == 0 {
        return (0, 0);
    }
    if rate <= 1 {
        return (count as i64, size as i64);
    }
    let avg = size as f64 / count as f64;
    let factor = 1.0 / (1.0 - (-avg / rate as f64).exp());
    (
        (count as f64 * factor) as i64,
        (size as f64 * factor) as i64,
    )
}

/// Builds the `view` profile of `session`. `time_nanos` is the snapshot time.
pub fn build(
    session: &Session,
    symbolizer: &mut Symbolizer,
    view: View,
    time_nanos: i64,
) -> Profile {
    let rate = rate_of(session);
    let mut b = builder(rate, view);
    b.set_time(time_nanos, 0);
    add_samples(&mut b, session, symbolizer, |counts| {
        Some(bucket_values(counts, rate))
    });
    if let Some(stats) = &session.mem_stats {
        for line in mem_stats_lines(stats, rate) {
            b.comment(&line);
        }
    }
    b.finish()
}

/// Builds the delta profile of `view` between two snapshots of one process, as Go's
/// net/http/pprof answers `?seconds=N`: every value (in-use ones too, which may be negative)
/// is the later unbiased value minus the earlier one, per stack; stacks whose values did not
/// change are left out. `time_nanos` is the later snapshot's time, `duration_nanos` the time
/// between the two.
pub fn build_delta(
    before: &Session,
    after: &Session,
    symbolizer: &mut Symbolizer,
    view: View,
    time_nanos: i64,
    duration_nanos: i64,
) -> Profile {
    let rate = rate_of(after);
    let mut b = builder(rate, view);
    b.set_time(time_nanos, duration_nanos);
    add_samples(&mut b, after, symbolizer, |(id, counts)| {
        let later = bucket_values((id, counts), rate);
        let earlier = before
            .heap
            .get(&id)
            .map_or([0; 4], |e| bucket_values((id, &e.counts), rate));
        let delta = [
            later[0] - earlier[0],
            later[1] - earlier[1],
            later[2] - earlier[2],
            later[3] - earlier[3],
        ];
        (delta != [0; 4]).then_some(delta)
    });
    b.comment(&format!(
        "# delta profile over {:.3} s: every value is its change over the interval",
        duration_nanos as f64 / 1e9
    ));
    b.finish()
}

fn rate_of(session: &Session) -> u64 {
    session.hello.as_ref().map(|h| h.mem_rate).unwrap_or(0)
}

fn builder(rate: u64, view: View) -> ProfileBuilder {
    let mut b = ProfileBuilder::new(
        &[
            ("alloc_objects", "count"),
            ("alloc_space", "bytes"),
            ("inuse_objects", "count"),
            ("inuse_space", "bytes"),
        ],
        ("space", "bytes"),
        rate as i64,
    );
    if view == View::Allocs {
        b.set_default_sample_type("alloc_space");
    }
    b
}

/// A bucket's unbiased `[alloc_objects, alloc_space, inuse_objects, inuse_space]`.
fn bucket_values((_, c): (u32, &BucketCounts), rate: u64) -> [i64; 4] {
    let (alloc_objects, alloc_space) = scale(c.alloc_objects, c.alloc_bytes, rate);
    let (inuse_objects, inuse_space) = scale(
        c.alloc_objects.saturating_sub(c.free_objects),
        c.alloc_bytes.saturating_sub(c.free_bytes),
        rate,
    );
    [alloc_objects, alloc_space, inuse_objects, inuse_space]
}

/// Adds one sample per bucket of `session` (in bucket order) whose `values` are not `None`
/// and not all zero, with its stack and Go's `bytes` label.
fn add_samples(
    b: &mut ProfileBuilder,
    session: &Session,
    symbolizer: &mut Symbolizer,
    mut values: impl FnMut((u32, &BucketCounts)) -> Option<[i64; 4]>,
) {
    let stacks = session.heap.values().map(|bucket| bucket.frames.as_slice());
    let mut locate = super::Locator::new(b, session, symbolizer, stacks, StackKind::HEAP);
    let mut buckets: Vec<_> = session.heap.iter().collect();
    buckets.sort_by_key(|(id, _)| **id);
    for (&id, bucket) in buckets {
        let c = &bucket.counts;
        let Some(v) = values((id, c)) else { continue };
        if v[0] == 0 && v[2] == 0 {
            continue;
        }
        let locs = locate.stack(b, &bucket.frames);
        let per_object = c.alloc_bytes.checked_div(c.alloc_objects).unwrap_or(0) as i64;
        let labels: Vec<(&str, LabelValue<'_>)> = if per_object > 0 {
            vec![("bytes", LabelValue::Num(per_object, ""))]
        } else {
            Vec::new()
        };
        b.sample(locs, v.to_vec(), &labels);
    }
}

/// The exact counters as `# Name = value` lines, the native counterpart of the MemStats
/// block Go appends to `heap?debug=1`.
pub fn mem_stats_lines(m: &MemStats, rate: u64) -> Vec<String> {
    let live = m
        .get(MemStat::AllocBytes)
        .saturating_sub(m.get(MemStat::FreeBytes));
    let objects = m
        .get(MemStat::Mallocs)
        .saturating_sub(m.get(MemStat::Frees));
    let mut out = vec![
        format!("# MemProfileRate = {rate}"),
        format!("# TotalAlloc = {}", m.get(MemStat::AllocBytes)),
        format!("# HeapAlloc = {live}"),
        format!("# HeapObjects = {objects}"),
        format!("# Mallocs = {}", m.get(MemStat::Mallocs)),
        format!("# Frees = {}", m.get(MemStat::Frees)),
        format!("# PeakHeapAlloc = {}", m.get(MemStat::PeakLiveBytes)),
        format!("# RSS = {}", m.get(MemStat::RssBytes)),
        format!("# MaxRSS = {}", m.get(MemStat::MaxRssBytes)),
        format!("# ProfilerSys = {}", m.get(MemStat::ProfilerBytes)),
        format!(
            "# LostSamples = {}",
            m.get(MemStat::LiveTableFull) + m.get(MemStat::BucketsFull)
        ),
    ];
    let by_size: Vec<String> = m
        .class_mallocs
        .iter()
        .zip(&m.class_frees)
        .enumerate()
        .filter(|(_, (a, f))| **a > 0 || **f > 0)
        .map(|(c, (a, f))| format!("{}: {a} {f}", anyprof_wire::size_class_limit(c)))
        .collect();
    out.push(format!(
        "# BySize (size: mallocs frees) = [{}]",
        by_size.join(", ")
    ));
    out
}

/// `heap?debug=1` (and `allocs?debug=1`): Go's legacy text heap profile — raw sampled counts
/// per bucket, header rate `heap/2*rate` as Go writes it — followed by the exact counters.
pub fn legacy_text(session: &Session, symbolizer: &mut Symbolizer) -> String {
    use std::fmt::Write;
    let rate = session.hello.as_ref().map(|h| h.mem_rate).unwrap_or(0);
    let mut buckets: Vec<_> = session.heap.values().collect();
    buckets.sort_by_key(|b| {
        std::cmp::Reverse(b.counts.alloc_bytes.saturating_sub(b.counts.free_bytes))
    });
    let (mut ti, mut tib, mut ta, mut tab) = (0u64, 0u64, 0u64, 0u64);
    for b in &buckets {
        let c = &b.counts;
        ti = ti.saturating_add(c.alloc_objects.saturating_sub(c.free_objects));
        tib = tib.saturating_add(c.alloc_bytes.saturating_sub(c.free_bytes));
        ta = ta.saturating_add(c.alloc_objects);
        tab = tab.saturating_add(c.alloc_bytes);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "heap profile: {ti}: {tib} [{ta}: {tab}] @ heap/{}",
        rate.saturating_mul(2)
    );
    for b in buckets {
        let c = &b.counts;
        let addrs: Vec<String> = StackKind::HEAP
            .lookup_addresses(&b.frames)
            .map(|a| format!("{a:#x}"))
            .collect();
        let _ = writeln!(
            out,
            "{}: {} [{}: {}] @ {}",
            c.alloc_objects.saturating_sub(c.free_objects),
            c.alloc_bytes.saturating_sub(c.free_bytes),
            c.alloc_objects,
            c.alloc_bytes,
            addrs.join(" ")
        );
        for line in super::threads::stack_lines(session, symbolizer, &b.frames, StackKind::HEAP) {
            let (func, place) = line.split_once("\n\t").unwrap_or((&line, ""));
            let _ = writeln!(out, "#\t{func}\t{place}");
        }
        out.push('\n');
    }
    if let Some(stats) = &session.mem_stats {
        out.push_str("\n# anyprof MemStats (exact, every allocation of the process)\n");
        for line in mem_stats_lines(stats, rate) {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::scale;

    #[test]
    fn scaling_matches_gos_formula() {
        // One 512 KiB object sampled at 512 KiB: P(sampled) = 1 - 1/e.
        let (n, b) = scale(1, 524288, 524288);
        assert_eq!(n, (1.0 / (1.0 - (-1.0f64).exp())) as i64);
        assert_eq!(b, (524288.0 / (1.0 - (-1.0f64).exp())) as i64);
        assert_eq!(scale(10, 1000, 1), (10, 1000));
        assert_eq!(scale(0, 0, 524288), (0, 0));
        // Tiny objects are scaled up by about rate/size.
        let (n, _) = scale(1, 16, 524288);
        assert!((32768..=32769).contains(&n), "{n}");
    }
}
