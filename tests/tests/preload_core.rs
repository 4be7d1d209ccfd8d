//! The structure of the preload (issue 14): the code that runs in the signal handler and the
//! malloc hooks is the `anyprof-preload-core` crate, `#![no_std]` without `alloc`, so the
//! compiler refuses an allocation, a `format!` or a std lock there. These checks fail if
//! someone weakens that: adds `extern crate alloc`/`std`, drops `#![no_std]`, or makes the
//! core depend on the std part (the cdylib) or on a crate that brings an allocator in.

use std::path::{Path, PathBuf};

fn core_dir() -> PathBuf {
    anyprof_tests::workspace_root().join("preload/core")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read preload/core/src") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_core_is_no_std_without_alloc() {
    let lib = std::fs::read_to_string(core_dir().join("src/lib.rs")).expect("read lib.rs");
    assert!(
        lib.lines().any(|l| l.trim() == "#![no_std]"),
        "preload/core/src/lib.rs must start with #![no_std]: the core runs in signal handlers \
         and malloc hooks, where std is not safe"
    );
    let mut files = Vec::new();
    rust_files(&core_dir().join("src"), &mut files);
    assert!(
        files.len() > 5,
        "found too few files in preload/core/src: {files:?}"
    );
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read a core file");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for forbidden in [
                "extern crate alloc",
                "extern crate std",
                "std::",
                "no_std)]",
            ] {
                assert!(
                    !code.contains(forbidden),
                    "{}:{}: `{forbidden}` in the preload core: it must not reach std or an \
                     allocator (move this code to the cdylib, preload/src/, and hand the core \
                     what it needs through an atomic or a function pointer published at start)",
                    file.display(),
                    n + 1
                );
            }
        }
    }
}

#[test]
fn the_core_depends_on_no_std_part() {
    let manifest = std::fs::read_to_string(core_dir().join("Cargo.toml"))
        .expect("read preload/core/Cargo.toml");
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .expect("a [dependencies] section")
        .split("\n[")
        .next()
        .unwrap_or("");
    let names: Vec<&str> = deps
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(['=', '.']).next().unwrap_or("").trim())
        .collect();
    // Each of these is no_std (the wire crate without its `decode` feature).
    let allowed = ["anyprof-wire", "libc", "libm"];
    for name in &names {
        assert!(
            allowed.contains(name),
            "preload/core depends on `{name}`: the core may only use no_std crates without an \
             allocator ({allowed:?}); the std part depends on the core, never the reverse"
        );
    }
    assert!(
        !deps.contains("decode"),
        "the core must not enable anyprof-wire's `decode` feature (it needs an allocator)"
    );
}

/// The exported-symbol list in `preload/src/exports.rs` is complete and true: every symbol
/// `libanyprof.so` exports is listed there, and every symbol listed there is exported.
#[test]
fn the_exports_list_names_every_exported_symbol() {
    let lib = anyprof_tests::binaries().preload;
    let out = std::process::Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
        .expect("run nm (binutils) on libanyprof.so");
    assert!(out.status.success(), "nm -D {} failed", lib.display());
    let exported: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect();
    let source =
        std::fs::read_to_string(anyprof_tests::workspace_root().join("preload/src/exports.rs"))
            .expect("read exports.rs");
    let section: String = source
        .lines()
        .skip_while(|l| !l.starts_with("//! # Every exported symbol"))
        .take_while(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let listed: std::collections::BTreeSet<String> = section
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_string)
        .collect();
    // Words in backquotes that are not symbols.
    let prose = ["nm", "alloc", "hooks"];
    let listed: std::collections::BTreeSet<String> = listed
        .into_iter()
        .filter(|w| !prose.contains(&w.as_str()))
        .collect();
    let missing: Vec<&String> = exported.difference(&listed).collect();
    let stale: Vec<&String> = listed.difference(&exported).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "the `# Every exported symbol` list of preload/src/exports.rs is out of date: \
         exported but not listed {missing:?}; listed but not exported {stale:?}"
    );
}
