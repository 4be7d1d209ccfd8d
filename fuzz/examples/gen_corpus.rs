//! Writes the seed corpora of the wire and stream targets, made with the wire crate's own
//! encoders so that the fuzzer starts from every valid message kind:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus
//! ```
//!
//! Files go to `fuzz/corpus/{wire_decode,wire_command,stream_session}/seed-*`; running it
//! again rewrites the same files.

use std::path::{Path, PathBuf};

use anyprof_wire::*;

fn msg(f: impl FnOnce(&mut [u8]) -> Option<usize>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = f(&mut buf).expect("seed message fits");
    buf.truncate(n);
    buf
}

fn hello(exe: &[u8], cpu_hz: u32, mem_rate: u64) -> Vec<u8> {
    msg(|b| {
        encode_hello(
            b,
            &HelloInfo {
                pid: 4242,
                ppid: 1,
                cpu_hz,
                timer: if cpu_hz > 0 {
                    TimerKind::ThreadCpuTimer
                } else {
                    TimerKind::Off
                },
                mem_rate,
                start_realtime_ns: 1_700_000_000_000_000_000,
                start_monotonic_ns: 123_456_789,
                exe,
                cmdline: b"prog\0--flag\0arg",
            },
        )
    })
}

fn module(id: u32, start: u64, end: u64, bias: u64, path: &[u8], build_id: &[u8]) -> Vec<u8> {
    msg(|b| {
        encode_module_loaded(
            b,
            &ModuleInfo {
                id,
                start,
                end,
                file_offset: 0x1000,
                load_bias: bias,
                path,
                build_id,
            },
        )
    })
}

fn samples(list: &[(u32, u8, u64, &[u64])]) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut batch = SampleBatch::new(&mut buf);
    for (i, &(tid, flags, cpu_ns, frames)) in list.iter().enumerate() {
        assert!(batch.push(tid, flags, 1_000 + i as u64, cpu_ns, frames));
    }
    let n = batch.len();
    buf.truncate(n);
    buf
}

fn buckets(list: &[(u32, u64, BucketCounts, &[u64])]) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut batch = HeapBatch::new(&mut buf);
    for &(id, size, counts, frames) in list {
        assert!(batch.push(id, size, &counts, frames));
    }
    let n = batch.len();
    buf.truncate(n);
    buf
}

fn counts(a: u64, ab: u64, f: u64, fb: u64) -> BucketCounts {
    BucketCounts {
        alloc_objects: a,
        alloc_bytes: ab,
        free_objects: f,
        free_bytes: fb,
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
}

/// A stream for `stream_session`: each datagram as a u16 length and its bytes; an empty
/// datagram marks a reconnection.
fn stream(datagrams: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for d in datagrams {
        out.extend_from_slice(&(d.len() as u16).to_le_bytes());
        out.extend_from_slice(d);
    }
    out
}

fn main() {
    let fuzz: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf();
    let dirs = ["wire_decode", "wire_command", "stream_session"].map(|t| {
        let d = fuzz.join("corpus").join(t);
        std::fs::create_dir_all(&d).expect("create corpus dir");
        d
    });
    let [decode_dir, command_dir, stream_dir] = &dirs;

    // Every message kind, plus a few edge cases.
    let deep: Vec<u64> = (0..MAX_FRAMES as u64)
        .map(|i| 0x40_1000 + i * 0x10)
        .collect();
    let all: Vec<(&str, Vec<u8>)> = vec![
        ("hello", hello(b"/usr/bin/prog", 100, DEFAULT_MEM_RATE)),
        ("hello-off", hello(b"", 0, 0)),
        (
            "module",
            module(
                1,
                0x40_0000,
                0x40_2000,
                0x40_0000,
                b"/usr/bin/prog",
                &[0xab; 20],
            ),
        ),
        (
            "module-vdso",
            module(2, 0x7fff_0000, 0x7fff_1000, 0x7fff_0000, b"[vdso]", &[]),
        ),
        ("module-unloaded", msg(|b| encode_module_unloaded(b, 2))),
        (
            "samples",
            samples(&[
                (11, 0, 10_000_000, &[0x40_1234, 0x40_1100, 0x40_1000]),
                (12, FLAG_TRUNCATED, 9_000_000, &[0x40_1400]),
                (13, FLAG_NO_STACK_BOUNDS, 1, &[]),
            ]),
        ),
        ("samples-deep", samples(&[(11, 0, 1, &deep)])),
        (
            "samples-dump",
            samples(&[(11, FLAG_THREAD_DUMP, 7, &[0x40_1234, 0x40_1000])]),
        ),
        (
            "counters",
            msg(|b| encode_counters(b, Kind::Counters, &[10, 1, 2, 3, 4, 5, 6, 7])),
        ),
        (
            "goodbye",
            msg(|b| encode_counters(b, Kind::Goodbye, &[10, 0, 0, 0])),
        ),
        (
            "log-warn",
            msg(|b| encode_log(b, Level::Warn, b"anyprof: something happened")),
        ),
        (
            "log-info",
            msg(|b| encode_log(b, Level::Info, "\u{e9}t\u{e9} \u{1f600}".as_bytes())),
        ),
        (
            "log-bad-utf8",
            msg(|b| encode_log(b, Level::Info, b"\xff\xfe\xc3")),
        ),
        (
            "thread-name",
            msg(|b| encode_thread_name(b, 11, b"worker-1")),
        ),
        (
            "heap",
            buckets(&[
                (1, 64, counts(10, 640, 4, 256), &[0x40_1234, 0x40_1100]),
                (2, 1 << 20, counts(1, 1 << 20, 0, 0), &[0x40_1400]),
                (1, 64, counts(12, 768, 5, 320), &[]),
            ]),
        ),
        (
            "heap-huge",
            buckets(&[(3, u64::MAX, counts(u64::MAX, u64::MAX, 1, u64::MAX), &deep)]),
        ),
        (
            "mem-stats",
            msg(|b| {
                encode_mem_stats(
                    b,
                    &[100, 40, 6400, 2560, 4096, 1 << 22, 1 << 23, 0, 0, 4096],
                    &[1; SIZE_CLASSES],
                    &[0; SIZE_CLASSES],
                )
            }),
        ),
        (
            "command-start",
            msg(|b| encode_command(b, Command::CpuStart(100))),
        ),
        ("command-stop", msg(|b| encode_command(b, Command::CpuStop))),
        (
            "command-dump",
            msg(|b| encode_command(b, Command::ThreadDump(7))),
        ),
        (
            "thread-creates",
            msg(|b| {
                encode_thread_creates(
                    b,
                    [(2u64, &[0x40_1234u64, 0x40_1000][..]), (1, &[][..])].into_iter(),
                )
            }),
        ),
    ];
    for (name, bytes) in &all {
        write(decode_dir, name, bytes);
        decode(bytes).unwrap_or_else(|e| panic!("seed {name} does not decode: {e}"));
    }
    // Headers alone, and a message of an unknown kind.
    let mut unknown = all[0].1.clone();
    unknown[6..8].copy_from_slice(&99u16.to_le_bytes());
    write(decode_dir, "unknown-kind", &unknown);

    for (name, bytes) in all.iter().filter(|(n, _)| n.starts_with("command")) {
        write(command_dir, name, bytes);
    }

    // Whole connections.
    let get = |name: &str| {
        all.iter()
            .find(|(n, _)| *n == name)
            .expect("seed")
            .1
            .clone()
    };
    // The program `stream_session` writes at start (fuzz/seeds/elf/c-cxx, a PIE: main at
    // 0x5b0, ns::Box<int>::get at 0x6aa), loaded at 0x5555_0000_0000.
    let exe = b"/tmp/anyprof-fuzz-stream-prog";
    let base = 0x5555_0000_0000u64;
    write(
        stream_dir,
        "cpu",
        &stream(&[
            hello(exe, 100, 0),
            module(1, base, base + 0x1000, base, exe, &[]),
            samples(&[
                (
                    11,
                    0,
                    10_000_000,
                    &[base + 0x6ab, base + 0x5b5, base + 0x5e0],
                ),
                (11, 0, 10_000_000, &[base + 0x5b0]),
                (12, FLAG_THREAD_DUMP, 3, &[base + 0x6aa, base + 0x5b5]),
            ]),
            buckets(&[(7, 32, counts(3, 96, 1, 32), &[base + 0x6b0, base + 0x5b5])]),
            module(
                2,
                0x7f00_0000,
                0x7f00_1000,
                0x7f00_0000,
                b"/usr/bin/true",
                &[],
            ),
            get("module-vdso"),
            get("thread-name"),
            get("samples"),
            get("samples-deep"),
            get("samples-dump"),
            get("counters"),
            get("log-warn"),
            get("goodbye"),
        ]),
    );
    write(
        stream_dir,
        "heap",
        &stream(&[
            hello(b"/nonexistent/prog", 0, DEFAULT_MEM_RATE),
            module(
                1,
                0x40_0000,
                0x40_2000,
                0x40_0000,
                b"/nonexistent/prog",
                &[1, 2, 3],
            ),
            get("heap"),
            get("heap-huge"),
            get("mem-stats"),
            get("mem-stats"),
            get("thread-creates"),
            get("goodbye"),
        ]),
    );
    write(
        stream_dir,
        "reconnect",
        &stream(&[
            hello(b"/usr/bin/true", 1000, 1),
            module(1, 0x1000, 0x2000, 0, b"/usr/bin/true", &[]),
            get("samples"),
            get("heap"),
            Vec::new(),
            hello(b"/usr/bin/true", 1000, 1),
            get("samples"),
            get("heap"),
            get("goodbye"),
        ]),
    );
    write(
        stream_dir,
        "bad-message",
        &stream(&[hello(exe, 100, 0), get("samples"), unknown, get("samples")]),
    );
    println!("wrote seeds under {}", fuzz.join("corpus").display());
}
