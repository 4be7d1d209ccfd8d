//! A hostile process's whole connection: datagrams decoded and folded into a `Session` as the
//! collector's reader does, then every profile built from it. Huge counts, bogus module paths
//! and ranges, duplicate ids and odd stacks must not panic.
//!
//! Input: datagrams, each a little-endian u16 length then that many bytes (cut to the input).
//! A zero length ends the connection: what follows is a reconnection of the same process,
//! merged into the first session, as `anyprof serve` merges them.
//!
//! The seeds name [`PROG`], a small C++ program with DWARF that the target writes at start, so
//! that symbolization finds real functions without the cost of a large binary.
#![no_main]

use std::sync::Once;

use anyprof::ingest::Session;
use anyprof::profile::{cpu, heap, threads};
use anyprof::{pprof, summary};
use anyprof_symbolizer::Symbolizer;
use anyprof_wire::{decode, Message, MAX_MESSAGE};
use libfuzzer_sys::fuzz_target;

/// Where the seeds' main module lives (fixed: the path is inside the inputs).
const PROG: &str = "/tmp/anyprof-fuzz-stream-prog";

fn write_prog() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Written next to its final name and renamed: parallel jobs write the same bytes.
        let tmp = format!("{PROG}.{}", std::process::id());
        std::fs::write(&tmp, include_bytes!("../seeds/elf/c-cxx")).expect("write the program");
        std::fs::rename(&tmp, PROG).expect("rename the program");
    });
}

fn sessions(mut data: &[u8]) -> Vec<Session> {
    let mut out = vec![Session::default()];
    let mut broken = false;
    while data.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([data[0], data[1]]));
        data = &data[2..];
        let (datagram, rest) = data.split_at(n.min(data.len()));
        data = rest;
        if n == 0 {
            out.push(Session::default());
            broken = false;
            continue;
        }
        let s = out.last_mut().expect("one session at least");
        if broken || datagram.len() > MAX_MESSAGE {
            continue;
        }
        match decode(datagram) {
            Ok(msg) => {
                if let Message::MemStats(new) = &msg {
                    let _ = summary::mem_trace_line(s.mem_stats.as_ref(), new, 1.5);
                }
                s.apply(msg, &mut |_, _| {});
            }
            Err(e) => {
                // The reader stops at the first bad message, as `read_connection` does.
                s.error = Some(e.to_string());
                broken = true;
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    write_prog();
    let mut all = sessions(data).into_iter();
    let mut session = all.next().expect("one session at least");
    for later in all {
        session.merge(later);
    }
    let _ = session.command_name();
    let _ = session.lost_samples();

    let mut sym = Symbolizer::new();
    let cpu = cpu::build(&session, &mut sym, 1);
    let _ = summary::format_cpu_top(&cpu, 10);
    let _ = pprof::encode_gzipped(&cpu);
    let inuse = heap::build(&session, &mut sym, heap::View::Heap, 0);
    let allocs = heap::build(&session, &mut sym, heap::View::Allocs, 0);
    let _ = summary::format_heap_top(&allocs, session.mem_stats.as_ref(), 10);
    let _ = pprof::encode_gzipped(&inuse);
    let _ = heap::legacy_text(&session, &mut sym);
    let _ = threads::create_profile(&session, &mut sym, 0);
    let ids: Vec<u32> = session.thread_dumps.keys().copied().take(4).collect();
    for id in ids {
        let _ = threads::dump_profile(&session, &mut sym, id, 0);
        let _ = threads::dump_text(&session, &mut sym, id);
    }
});
