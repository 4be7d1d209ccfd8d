//! `anyprof_wire::decode` treats every datagram as hostile: any bytes must give a message or a
//! `DecodeError`, never a panic, and a decoded message never holds more data than it came in.
#![no_main]

use anyprof_wire::{decode, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode(data) {
        // Every length is bounded by the message: the decoded payload fits in the input.
        let payload = match &msg {
            Message::Hello(h) => h.exe.len() + h.cmdline.len(),
            Message::ModuleLoaded(m) => m.path.len() + m.build_id.len(),
            Message::CpuSamples(s) => s.iter().map(|s| 24 + s.frames.len() * 8).sum(),
            Message::Counters(c) | Message::Goodbye(c) => c.len() * 8,
            Message::Log(_, t) | Message::ThreadName(_, t) => t.len(),
            Message::HeapBuckets(b) => b.iter().map(|b| 48 + b.frames.len() * 8).sum(),
            Message::MemStats(m) => (m.fields.len() + m.class_mallocs.len() * 2) * 8,
            Message::ThreadCreates(s) => s.iter().map(|(_, f)| 10 + f.len() * 8).sum(),
            Message::ModuleUnloaded(_) | Message::Control(_) | Message::Region(_) => 0,
        };
        assert!(
            payload <= data.len(),
            "{payload} > {} for {msg:?}",
            data.len()
        );
        if let Message::Control(cmd) = msg {
            assert_eq!(anyprof_wire::decode_command(data), Some(cmd));
        }
    }
});
