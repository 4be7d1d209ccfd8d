//! Thread profiles: `threads` (every thread's current stack, the native counterpart of Go's
//! goroutine profile) and `threadcreate` (where threads were created), in pprof and in the
//! `debug=1`/`debug=2` text forms of net/http/pprof.

use std::fmt::Write;

use anyprof_symbolizer::Symbolizer;

use crate::ingest::Session;
use crate::pprof::builder::{FrameLine, LabelValue, ProfileBuilder};
use crate::pprof::Profile;
use crate::symbolize::{module_of, resolve_all, RuntimeAddress, StackKind};

/// The pprof profile of thread dump `id`: one sample per thread, value 1, labelled with the
/// thread's name and tid. Sample type `goroutine/count`, as Go's goroutine profile, so tools
/// that know that profile read this one.
pub fn dump_profile(
    session: &Session,
    symbolizer: &mut Symbolizer,
    id: u32,
    time_nanos: i64,
) -> Profile {
    let mut b = ProfileBuilder::new(&[("goroutine", "count")], ("goroutine", "count"), 1);
    b.set_time(time_nanos, 0);
    let threads = session.thread_dumps.get(&id).cloned().unwrap_or_default();
    let mut locate = super::Locator::new(
        &mut b,
        session,
        symbolizer,
        threads.iter().map(|(_, f)| f.as_slice()),
        StackKind::THREAD_DUMP,
    );
    for (tid, frames) in &threads {
        let locs = locate.stack(&mut b, frames);
        let name = thread_name(session, *tid);
        b.sample(
            locs,
            vec![1],
            &[
                ("thread", LabelValue::Str(&name)),
                ("tid", LabelValue::Num(i64::from(*tid), "tid")),
            ],
        );
    }
    b.comment(&format!("anyprof: {} threads", threads.len()));
    b.finish()
}

/// The pprof `threadcreate` profile: creating stacks with counts.
pub fn create_profile(session: &Session, symbolizer: &mut Symbolizer, time_nanos: i64) -> Profile {
    let mut b = ProfileBuilder::new(&[("threadcreate", "count")], ("threadcreate", "count"), 1);
    b.set_time(time_nanos, 0);
    let stacks = &session.thread_creates;
    let mut locate = super::Locator::new(
        &mut b,
        session,
        symbolizer,
        stacks.iter().map(|(_, f)| f.as_slice()),
        StackKind::THREAD_CREATE,
    );
    for (count, frames) in stacks {
        let locs = locate.stack(&mut b, frames);
        b.sample(locs, vec![*count as i64], &[]);
    }
    b.finish()
}

fn thread_name(session: &Session, tid: u32) -> String {
    session
        .thread_names
        .get(&tid)
        .cloned()
        .unwrap_or_else(|| format!("tid {tid}"))
}

/// `threads?debug=2`: every thread's stack as text, like Go's `goroutine?debug=2`.
pub fn dump_text(session: &Session, symbolizer: &mut Symbolizer, id: u32) -> String {
    let threads = session.thread_dumps.get(&id).cloned().unwrap_or_default();
    let mut out = String::new();
    for (tid, frames) in &threads {
        let _ = writeln!(out, "thread {tid} [{}]:", thread_name(session, *tid));
        for line in stack_lines(session, symbolizer, frames, StackKind::THREAD_DUMP) {
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
    }
    out
}

/// The text lines describing one stack: `function\n\tfile:line +0xoffset`, innermost first.
pub fn stack_lines(
    session: &Session,
    symbolizer: &mut Symbolizer,
    frames: &[u64],
    kind: StackKind,
) -> Vec<String> {
    let addrs: Vec<RuntimeAddress> = kind.lookup_addresses(frames).collect();
    let (resolved, _) = resolve_all(symbolizer, session, addrs.iter().copied());
    let mut out = Vec::new();
    for a in addrs {
        let r = resolved.get(&a).cloned().unwrap_or_default();
        if r.lines.is_empty() {
            let object = module_of(&session.modules, a)
                .map(|m| String::from_utf8_lossy(&m.path).into_owned())
                .unwrap_or_default();
            out.push(format!("{a:#x}\n\t{object}"));
            continue;
        }
        for FrameLine {
            name, file, line, ..
        } in r.lines
        {
            if file.is_empty() {
                // Named from a symbol table, or MODULE+0xADDR: no source line to show.
                let object = module_of(&session.modules, a)
                    .map(|m| String::from_utf8_lossy(&m.path).into_owned())
                    .unwrap_or_default();
                out.push(format!("{name}\n\t{object} {a:#x}"));
            } else {
                out.push(format!("{name}\n\t{file}:{line} {a:#x}"));
            }
        }
    }
    out
}
