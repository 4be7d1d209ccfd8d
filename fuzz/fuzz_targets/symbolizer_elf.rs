//! `Symbolizer::symbolize` on a hostile object file: malformed ELF headers, sections, symbol
//! tables, compressed sections and DWARF must give a `Miss` or frames, never a panic or a
//! crash. (libfuzzer-sys aborts on any panic, including those the symbolizer would catch.)
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use anyprof_symbolizer::{ObjectRef, Symbolizer};
use libfuzzer_sys::fuzz_target;

/// One directory per fuzzing process, so that parallel jobs do not share files.
fn object_path() -> &'static (PathBuf, PathBuf) {
    static PATH: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("anyprof-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzzing directory");
        (dir.join("object.tmp"), dir.join("object"))
    })
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = data.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let (tmp, path) = object_path();
    // A new file each time, renamed into place: the previous input's mapping (if any was
    // still alive) is never truncated under it, and the symbolizer sees a new file.
    std::fs::write(tmp, data).expect("write the object");
    std::fs::rename(tmp, path).expect("rename the object");

    // Typical file addresses, plus some taken from the input (entry point, section addresses).
    let addresses = [
        0,
        0x1000,
        0x401000,
        u64_at(data, 0x18),
        u64_at(data, 0x28),
        u64_at(data, data.len().saturating_sub(8)),
        u64_at(data, 0x18).wrapping_add(0x10),
    ];
    let mut symbolizer = Symbolizer::new();
    let out = symbolizer.symbolize(
        &ObjectRef {
            path,
            build_id: &[],
        },
        &addresses,
    );
    assert_eq!(out.len(), addresses.len());
});
