//! Integration tests: real programs built here with `cc`/`c++ -g -O2`, stripped and split with
//! binutils, then symbolized; plus broken, missing and pseudo files, the system libc, and this
//! test binary itself.

mod support;

use std::path::{Path, PathBuf};

use anyprof_symbolizer::{
    DebugSources, DebuginfodConfig, Frame, Miss, ObjectRef, Symbolized, Symbolizer,
};
use support::{build_id, compile, frames, marked_line, run, symbol, TempDir};

const C_SOURCE: &str = r#"#include <stdio.h>

volatile int sink;

__attribute__((noinline)) int leaf(int x) { // MARK: leaf_begin
    for (int i = 0; i < x; i++)
        sink += i * x; // MARK: leaf_loop
    return sink;
} // MARK: leaf_end

__attribute__((noinline)) int caller(int x) { // MARK: caller_begin
    return leaf(x) + 1;
} // MARK: caller_end

int main(int argc, char **argv) {
    (void)argv;
    printf("%d\n", caller(argc));
    return 0;
}
"#;

const CPP_SOURCE: &str = r#"extern volatile int g_sink;

namespace ns {
class Klass {
  public:
    explicit Klass(int base) : base_(base) {}
    int method(int x);

  private:
    __attribute__((always_inline)) inline int twice(int v) { // MARK: twice_begin
        g_sink = v;
        return v * 2;
    } // MARK: twice_end
    int base_;
};

__attribute__((noinline)) int Klass::method(int x) { // MARK: method_begin
    int r = twice(x + base_); // MARK: method_calls_twice
    g_sink = r + 3;
    return r + 1;
} // MARK: method_end
} // namespace ns

volatile int g_sink;

int main(int argc, char **) {
    ns::Klass k(argc);
    return k.method(argc) & 1;
}
"#;

const METHOD: &str = "_ZN2ns5Klass6methodEi";

fn build_c(dir: &TempDir, output: &str, extra: &[&str]) -> PathBuf {
    compile(dir, "cc", "prog.c", C_SOURCE, output, extra)
}

fn build_cpp(dir: &TempDir, output: &str) -> PathBuf {
    compile(dir, "c++", "prog.cpp", CPP_SOURCE, output, &[])
}

fn object(path: &Path) -> ObjectRef<'_> {
    ObjectRef {
        path,
        build_id: &[],
    }
}

fn lines_between(source: &str, begin: &str, end: &str) -> std::ops::RangeInclusive<u32> {
    marked_line(source, begin)..=marked_line(source, end)
}

/// A frame that has a name and nothing else, as the symbol tables give.
fn name_only(function: &str, raw: &str) -> Frame {
    Frame {
        function: Some(function.to_owned()),
        raw_function: Some(raw.to_owned()),
        file: None,
        line: None,
        column: None,
    }
}

fn copy(from: &Path, to: PathBuf) -> PathBuf {
    std::fs::copy(from, &to).expect("copy the binary");
    to
}

#[test]
fn c_function_has_name_file_and_lines() {
    let dir = TempDir::new("c-lines");
    let prog = build_c(&dir, "prog", &[]);
    let leaf = symbol(&prog, "leaf");
    let answers = Symbolizer::new().symbolize(&object(&prog), &leaf.addresses());
    assert_eq!(answers.len(), leaf.size as usize);
    let source = std::fs::canonicalize(dir.path()).unwrap().join("prog.c");

    let body = lines_between(C_SOURCE, "leaf_begin", "leaf_end");
    let mut lines = Vec::new();
    for answer in &answers {
        let physical = frames(answer).last().unwrap();
        assert_eq!(physical.function.as_deref(), Some("leaf"));
        assert_eq!(physical.raw_function.as_deref(), Some("leaf"));
        // Compiled as `cc prog.c` inside the directory: the compilation directory is joined.
        assert_eq!(physical.file.as_deref(), Some(source.to_str().unwrap()));
        let line = physical.line.expect("DWARF gives a line");
        assert!(body.contains(&line), "line {line} is outside leaf()");
        lines.push(line);
    }
    let loop_line = marked_line(C_SOURCE, "leaf_loop");
    assert!(
        lines.contains(&loop_line),
        "no address maps to line {loop_line}: {lines:?}"
    );
}

#[test]
fn work_ahead_that_is_abandoned_is_not_kept() {
    use std::sync::atomic::AtomicBool;
    let dir = TempDir::new("abandoned");
    let prog = build_c(&dir, "prog", &[]);
    let leaf = symbol(&prog, "leaf");
    let addresses = [leaf.address];
    let request = [(object(&prog), &addresses[..])];
    let mut symbolizer = Symbolizer::new();
    // Abandoned before it starts: the DWARF is not read, so no line comes back ...
    let abandoned = symbolizer.symbolize_many_locally_as(None, &request, &AtomicBool::new(true));
    let has_line = |answers: &[Vec<Symbolized>]| match &answers[0][0] {
        Symbolized::Frames(f) => f.iter().any(|f| f.line.is_some()),
        Symbolized::Miss(_) => false,
    };
    assert!(!has_line(&abandoned), "an abandoned open read the DWARF");
    // ... and the object opened in part is not cached as if it had none.
    let later = symbolizer.symbolize_many_as(None, &request);
    assert!(has_line(&later), "the abandoned open was kept: {later:?}");
}

#[test]
fn cpp_inline_chain_is_innermost_first_and_demangled() {
    let dir = TempDir::new("cpp-inline");
    let prog = build_cpp(&dir, "prog");
    let method = symbol(&prog, METHOD);
    let answers = Symbolizer::new().symbolize(&object(&prog), &method.addresses());

    let method_lines = lines_between(CPP_SOURCE, "method_begin", "method_end");
    let twice_lines = lines_between(CPP_SOURCE, "twice_begin", "twice_end");
    let call_line = marked_line(CPP_SOURCE, "method_calls_twice");
    let mut saw_inline = false;
    for answer in &answers {
        let chain = frames(answer);
        let physical = chain.last().unwrap();
        assert_eq!(physical.function.as_deref(), Some("ns::Klass::method(int)"));
        assert_eq!(physical.raw_function.as_deref(), Some(METHOD));
        assert!(physical.file.as_deref().unwrap().ends_with("/prog.cpp"));
        if let [inlined, caller] = chain {
            saw_inline = true;
            assert_eq!(inlined.function.as_deref(), Some("ns::Klass::twice(int)"));
            assert_eq!(
                inlined.raw_function.as_deref(),
                Some("_ZN2ns5Klass5twiceEi")
            );
            assert!(inlined.file.as_deref().unwrap().ends_with("/prog.cpp"));
            let line = inlined.line.unwrap();
            assert!(
                twice_lines.contains(&line),
                "inlined line {line} outside twice()"
            );
            // The outer frame of an inline chain is at the call site.
            assert_eq!(caller.line, Some(call_line));
        } else {
            assert_eq!(chain.len(), 1, "unexpected chain {chain:?}");
            let line = physical.line.unwrap();
            assert!(method_lines.contains(&line), "line {line} outside method()");
        }
    }
    assert!(
        saw_inline,
        "no address of method() is in the inlined twice()"
    );
}

#[test]
fn every_kind_of_object_symbolizes() {
    let dir = TempDir::new("kinds");
    let kinds = [
        build_c(&dir, "pie", &["-pie", "-fPIE"]),
        build_c(&dir, "no-pie", &["-no-pie", "-fno-PIE"]),
        build_c(&dir, "libprog.so", &["-shared", "-fPIC"]),
        build_c(&dir, "compressed-dwarf", &["-gz=zlib"]),
        build_c(&dir, "dwarf-4", &["-gdwarf-4"]),
    ];
    let body = lines_between(C_SOURCE, "leaf_begin", "leaf_end");
    let mut symbolizer = Symbolizer::new();
    for prog in &kinds {
        let leaf = symbol(prog, "leaf");
        let answer = &symbolizer.symbolize(&object(prog), &[leaf.address + 1])[0];
        let physical = frames(answer).last().unwrap();
        assert_eq!(
            physical.function.as_deref(),
            Some("leaf"),
            "{}",
            prog.display()
        );
        assert!(body.contains(&physical.line.unwrap()), "{}", prog.display());
    }
}

#[test]
fn strip_debug_falls_back_to_symtab() {
    let dir = TempDir::new("strip-debug");
    let c = build_c(&dir, "c-prog", &[]);
    let cpp = build_cpp(&dir, "cpp-prog");
    let leaf = symbol(&c, "leaf");
    let method = symbol(&cpp, METHOD);
    run("strip", &[&"--strip-debug", &c, &cpp]);

    let mut symbolizer = Symbolizer::new();
    let answers = symbolizer.symbolize(&object(&c), &[leaf.address, leaf.address + 1]);
    for answer in answers {
        assert_eq!(answer, Symbolized::Frames(vec![name_only("leaf", "leaf")]));
    }
    let answers = symbolizer.symbolize(&object(&cpp), &[method.address + method.size - 1]);
    assert_eq!(
        answers,
        vec![Symbolized::Frames(vec![name_only(
            "ns::Klass::method(int)",
            METHOD
        )])]
    );
}

/// A relocatable object (`cc -c`) is never a loaded module: its functions are named from the
/// symbol table, and its DWARF (which would need relocating) is left alone.
#[test]
fn relocatable_object_is_named_from_its_symbol_table() {
    let dir = TempDir::new("relocatable");
    let obj = build_c(&dir, "prog.o", &["-c"]);
    let leaf = symbol(&obj, "leaf");
    let mut symbolizer = Symbolizer::new();
    let answers = symbolizer.symbolize(&object(&obj), &[leaf.address + 1]);
    assert_eq!(
        answers,
        vec![Symbolized::Frames(vec![name_only("leaf", "leaf")])],
        "{}",
        obj.display()
    );
}

#[test]
fn strip_all_leaves_dynsym_or_nothing() {
    let dir = TempDir::new("strip-all");
    let plain = build_c(&dir, "plain", &[]);
    let exported = build_c(&dir, "exported", &["-rdynamic"]);
    let plain_leaf = symbol(&plain, "leaf");
    let exported_leaf = symbol(&exported, "leaf");
    run("strip", &[&"--strip-all", &plain, &exported]);

    let mut symbolizer = Symbolizer::new();
    // `-rdynamic` put `leaf` in .dynsym, which survives --strip-all.
    assert_eq!(
        symbolizer.symbolize(&object(&exported), &[exported_leaf.address + 2]),
        vec![Symbolized::Frames(vec![name_only("leaf", "leaf")])]
    );
    assert_eq!(
        symbolizer.symbolize(&object(&plain), &[plain_leaf.address + 2]),
        vec![Symbolized::Miss(Miss::NoSymbol)]
    );
}

/// The addresses objdump gives the PLT stubs of `path` (`0000000000001030 <printf@plt>:`).
fn objdump_plt_stubs(path: &Path) -> Vec<(u64, String)> {
    let output = std::process::Command::new("objdump")
        .arg("-d")
        .arg(path)
        .output()
        .expect("run objdump (binutils)");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (address, rest) = line.split_once(" <")?;
            let name = rest.strip_suffix(">:")?;
            if !name.ends_with("@plt") {
                return None;
            }
            Some((
                u64::from_str_radix(address.trim(), 16).ok()?,
                name.to_owned(),
            ))
        })
        .collect()
}

/// A stripped program's PLT stubs, where its calls into libc spend their first instructions,
/// are named as objdump and perf name them: no symbol table has them, the relocations do.
/// Lazy binding, `-z now` (Debian's hardening) and CET's IBT PLT (Ubuntu's default, with
/// `.plt.sec`) lay the PLT out differently.
#[test]
fn plt_stubs_are_named_after_the_function_they_call() {
    let dir = TempDir::new("plt");
    let variants: [(&str, &[&str]); 4] = [
        ("lazy", &[]),
        ("now", &["-Wl,-z,now"]),
        ("ibt", &["-fcf-protection=full", "-Wl,-z,ibtplt"]),
        (
            "ibt-now",
            &["-fcf-protection=full", "-Wl,-z,ibtplt", "-Wl,-z,now"],
        ),
    ];
    for (output, extra) in variants {
        let prog = build_c(&dir, output, extra);
        let stubs = objdump_plt_stubs(&prog);
        assert!(
            stubs.iter().any(|(_, name)| name == "printf@plt"),
            "objdump shows printf@plt in {output}: {stubs:?}"
        );
        run("strip", &[&"--strip-all", &prog]);
        let mut symbolizer = Symbolizer::new();
        for (address, name) in &stubs {
            let answer = symbolizer.symbolize(&object(&prog), &[*address + 2]);
            assert_eq!(
                answer,
                vec![Symbolized::Frames(vec![name_only(name, name)])],
                "{output}: the stub at {address:#x}"
            );
        }
    }
}

/// Splits the DWARF of `prog` into `debug` and strips `prog` completely.
fn split_debug(prog: &Path, debug: &Path) {
    std::fs::create_dir_all(debug.parent().unwrap()).unwrap();
    run("objcopy", &[&"--only-keep-debug", &prog, &debug]);
    run("strip", &[&"--strip-all", &prog]);
}

/// Checks that `prog` symbolizes with full DWARF, inline chain included.
fn assert_full_dwarf(symbolizer: &mut Symbolizer, prog: &Path, method_address: u64, size: u64) {
    let addresses: Vec<u64> = (method_address..method_address + size).collect();
    let answers = symbolizer.symbolize(&object(prog), &addresses);
    let call_line = marked_line(CPP_SOURCE, "method_calls_twice");
    let inlined = answers.iter().map(frames).find(|chain| chain.len() == 2);
    let [twice, method] = inlined.expect("an inline chain from the debug file") else {
        unreachable!()
    };
    assert_eq!(twice.function.as_deref(), Some("ns::Klass::twice(int)"));
    assert_eq!(method.function.as_deref(), Some("ns::Klass::method(int)"));
    assert_eq!(method.line, Some(call_line));
    assert!(method.file.as_deref().unwrap().ends_with("/prog.cpp"));
}

#[test]
fn debug_file_found_by_build_id() {
    let dir = TempDir::new("build-id");
    let prog = build_cpp(&dir, "prog");
    let method = symbol(&prog, METHOD);
    let id = build_id(&prog);
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let debug_dir = dir.join("debug");
    let debug = debug_dir
        .join(".build-id")
        .join(&hex[..2])
        .join(format!("{}.debug", &hex[2..]));
    split_debug(&prog, &debug);

    // Without the debug dir there are no symbols left at all.
    let mut bare = Symbolizer::with_debug_dirs(vec![dir.join("elsewhere")]);
    assert_eq!(
        bare.symbolize(&object(&prog), &[method.address]),
        vec![Symbolized::Miss(Miss::NoSymbol)]
    );

    let mut symbolizer = Symbolizer::with_debug_dirs(vec![dir.join("elsewhere"), debug_dir]);
    assert_full_dwarf(&mut symbolizer, &prog, method.address, method.size);
    // The caller's build id is the file's: still found.
    let with_id = ObjectRef {
        path: &prog,
        build_id: &id,
    };
    let answer = &symbolizer.symbolize(&with_id, &[method.address])[0];
    assert_eq!(
        frames(answer).last().unwrap().function.as_deref(),
        Some("ns::Klass::method(int)")
    );
}

#[test]
fn debug_file_found_by_debuglink() {
    let dir = TempDir::new("debuglink");
    let built = build_cpp(&dir, "built");
    let method = symbol(&built, METHOD);
    let debug_dir = dir.join("debug");
    std::fs::create_dir_all(&debug_dir).unwrap();
    let no_build_id_dirs = || Symbolizer::with_debug_dirs(vec![debug_dir.clone()]);

    // gdb's three places: beside the file, in .debug/ beside it, under the debug dir.
    // (name, where the debug file goes given the binary's dir and the debug dir)
    type Place = fn(&Path, &Path) -> PathBuf;
    let places: [(&str, Place); 3] = [
        ("beside", |bin_dir, _| bin_dir.to_path_buf()),
        ("dot-debug", |bin_dir, _| bin_dir.join(".debug")),
        ("debug-dir", |bin_dir, debug_dir| {
            let relative: PathBuf = bin_dir
                .components()
                .filter(|c| matches!(c, std::path::Component::Normal(_)))
                .collect();
            debug_dir.join(relative)
        }),
    ];
    for (name, place) in places {
        let bin_dir = dir.join(name);
        std::fs::create_dir_all(&bin_dir).unwrap();
        let prog = copy(&built, bin_dir.join("prog"));
        let debug = place(&bin_dir, &debug_dir).join("prog.debug");
        split_debug(&prog, &debug);
        run(
            "objcopy",
            &[&format!("--add-gnu-debuglink={}", debug.display()), &prog],
        );
        assert_full_dwarf(&mut no_build_id_dirs(), &prog, method.address, method.size);
    }
}

#[test]
fn build_id_mismatch_refuses_the_file() {
    let dir = TempDir::new("mismatch");
    let prog = build_c(&dir, "prog", &[]);
    let leaf = symbol(&prog, "leaf");
    let mut symbolizer = Symbolizer::new();

    let mut wrong = build_id(&prog);
    wrong[0] ^= 0xff;
    let stale = ObjectRef {
        path: &prog,
        build_id: &wrong,
    };
    assert_eq!(
        symbolizer.symbolize(&stale, &[leaf.address, leaf.address + 1]),
        vec![Symbolized::Miss(Miss::BuildIdMismatch); 2]
    );

    let id = build_id(&prog);
    let current = ObjectRef {
        path: &prog,
        build_id: &id,
    };
    let answer = &symbolizer.symbolize(&current, &[leaf.address])[0];
    assert_eq!(frames(answer)[0].function.as_deref(), Some("leaf"));

    // A file without a build id cannot be the one the process loaded with an id.
    let no_id = build_c(&dir, "no-id", &["-Wl,--build-id=none"]);
    let claimed = ObjectRef {
        path: &no_id,
        build_id: &id,
    };
    assert_eq!(
        symbolizer.symbolize(&claimed, &[leaf.address]),
        vec![Symbolized::Miss(Miss::BuildIdMismatch)]
    );
}

#[test]
fn missing_file_is_unreadable() {
    let dir = TempDir::new("missing");
    let path = dir.join("does-not-exist.so");
    let answers = Symbolizer::new().symbolize(&object(&path), &[0x1000, 0x2000]);
    assert_eq!(answers.len(), 2);
    for answer in answers {
        let Symbolized::Miss(miss @ Miss::FileUnreadable(reason)) = &answer else {
            panic!("expected FileUnreadable, got {answer:?}");
        };
        assert!(reason.contains("No such file"), "{reason}");
        assert!(
            miss.to_string().contains("make sure it still exists"),
            "{miss}"
        );
    }
}

#[test]
fn truncated_elf_misses_without_panicking() {
    let dir = TempDir::new("truncated");
    let prog = build_c(&dir, "prog", &[]);
    let leaf = symbol(&prog, "leaf");
    let data = std::fs::read(&prog).unwrap();
    let mut symbolizer = Symbolizer::new();
    for len in [1, 4, 16, 63, 64, 100, 1000, data.len() / 2, data.len() - 1] {
        let path = dir.join(format!("cut-{len}"));
        std::fs::write(&path, &data[..len]).unwrap();
        let answers = symbolizer.symbolize(&object(&path), &[leaf.address, 0, u64::MAX]);
        assert_eq!(answers.len(), 3);
        assert!(!answers.iter().any(parser_panicked), "cut at {len}");
        for answer in &answers {
            assert!(
                matches!(
                    answer,
                    Symbolized::Miss(Miss::NotElf | Miss::MalformedElf(_))
                ),
                "cut at {len}: {answer:?}"
            );
        }
    }
    let path = dir.join(format!("cut-{}", data.len() / 2));
    assert!(matches!(
        &symbolizer.symbolize(&object(&path), &[leaf.address])[0],
        Symbolized::Miss(Miss::MalformedElf(_))
    ));
}

/// What the symbolizer answers when a parser panicked (caught because tests unwind).
fn parser_panicked(answer: &Symbolized) -> bool {
    matches!(answer, Symbolized::Miss(Miss::SymbolizerPanicked(_)))
}

#[test]
fn corrupt_dwarf_answers_without_panicking() {
    let dir = TempDir::new("corrupt-dwarf");
    let prog = build_cpp(&dir, "prog");
    let method = symbol(&prog, METHOD);
    let data = std::fs::read(&prog).unwrap();
    let debug_ranges: Vec<std::ops::Range<usize>> = {
        use object::{Object, ObjectSection};
        let file = object::File::parse(&*data).unwrap();
        file.sections()
            .filter(|s| s.name().is_ok_and(|n| n.starts_with(".debug_")))
            .filter_map(|s| s.file_range())
            .map(|(offset, size)| offset as usize..(offset + size) as usize)
            .collect()
    };
    assert!(!debug_ranges.is_empty());
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // Each round damages one DWARF section in a few places, more in later rounds, so that
    // some rounds break a unit header, some an entry deep inside, some a line program.
    for round in 0..64 {
        let mut corrupt = data.clone();
        let range = &debug_ranges[round % debug_ranges.len()];
        for _ in 0..=round / debug_ranges.len() {
            let at = range.start + (next() as usize) % range.len();
            corrupt[at] = next() as u8;
        }
        let path = dir.join(format!("corrupt-{round}"));
        std::fs::write(&path, &corrupt).unwrap();
        let answers = Symbolizer::new().symbolize(&object(&path), &method.addresses());
        assert_eq!(answers.len(), method.size as usize);
        // The symbol table is intact: broken DWARF falls back to it, never to a miss.
        for answer in &answers {
            assert!(!parser_panicked(answer), "round {round} panicked");
            assert!(
                matches!(answer, Symbolized::Frames(_)),
                "round {round}: {answer:?}"
            );
        }
    }
}

#[test]
fn garbage_and_non_files_miss_without_panicking() {
    let dir = TempDir::new("garbage");
    // Deterministic noise, with and without an ELF header in front.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let noise: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, &noise).unwrap();
    let mut elf_noise = b"\x7fELF\x02\x01\x01\0".to_vec();
    elf_noise.extend_from_slice(&noise);
    let fake_elf = dir.join("fake-elf");
    std::fs::write(&fake_elf, &elf_noise).unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let script = dir.join("script.sh");
    std::fs::write(&script, b"#!/bin/sh\necho hi\n").unwrap();

    let mut symbolizer = Symbolizer::new();
    let addresses = [0, 0x1000, u64::MAX];
    type Expected = fn(&Miss) -> bool;
    let cases: [(&Path, Expected); 6] = [
        (&garbage, |m| *m == Miss::NotElf),
        (&script, |m| *m == Miss::NotElf),
        (&empty, |m| *m == Miss::NotElf),
        (&fake_elf, |m| matches!(m, Miss::MalformedElf(_))),
        (dir.path(), |m| *m == Miss::NoFile),
        (Path::new("/dev/null"), |m| *m == Miss::NoFile),
    ];
    for (path, expected) in cases {
        for answer in symbolizer.symbolize(&object(path), &addresses) {
            match &answer {
                Symbolized::Miss(miss) if expected(miss) => {}
                other => panic!("{}: unexpected {other:?}", path.display()),
            }
        }
    }
}

#[test]
fn pseudo_paths_have_no_file() {
    let mut symbolizer = Symbolizer::new();
    for path in [
        "",
        "[vdso]",
        "[heap]",
        "[stack]",
        "linux-vdso.so.1",
        "//anon",
    ] {
        assert_eq!(
            symbolizer.symbolize(&object(Path::new(path)), &[0x1000, 0x1001]),
            vec![Symbolized::Miss(Miss::NoFile); 2],
            "{path:?}"
        );
    }
    assert!(symbolizer
        .symbolize(&object(Path::new("[vdso]")), &[] as &[u64])
        .is_empty());
}

#[test]
fn batch_answers_each_address_in_order() {
    let dir = TempDir::new("batch");
    let prog = build_c(&dir, "prog", &[]);
    let leaf = symbol(&prog, "leaf");
    let caller = symbol(&prog, "caller");
    let batch = [
        caller.address,
        u64::MAX,
        leaf.address,
        0, // the ELF header: loaded, but no function
        leaf.address,
        caller.address + 1,
        0x7fff_ffff_0000,
    ];
    let answers = Symbolizer::new().symbolize(&object(&prog), &batch);
    assert_eq!(answers.len(), batch.len());
    let name = |i: usize| frames(&answers[i]).last().unwrap().function.clone();
    assert_eq!(name(0).as_deref(), Some("caller"));
    assert_eq!(answers[1], Symbolized::Miss(Miss::OutsideObject));
    assert_eq!(name(2).as_deref(), Some("leaf"));
    assert_eq!(answers[3], Symbolized::Miss(Miss::NoSymbol));
    assert_eq!(answers[4], answers[2]);
    assert_eq!(name(5).as_deref(), Some("caller"));
    assert_eq!(answers[6], Symbolized::Miss(Miss::OutsideObject));
    assert!(Symbolizer::new()
        .symbolize(&object(&prog), &[] as &[u64])
        .is_empty());
}

#[test]
fn system_libc_malloc_comes_from_dynsym() {
    let libc = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/aarch64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
        "/usr/lib/libc.so.6",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.exists())
    .expect("a glibc libc.so.6 in a standard place");
    let malloc = symbol(libc, "malloc");
    let id = build_id(libc);
    let object = ObjectRef {
        path: libc,
        build_id: &id,
    };
    // An empty debug dir: the answer must come from libc's own symbol tables.
    let dir = TempDir::new("libc");
    let mut symbolizer = Symbolizer::with_debug_dirs(vec![dir.path().to_path_buf()]);
    let answers = symbolizer.symbolize(&object, &[malloc.address, malloc.address + 16]);
    for answer in &answers {
        // `malloc` and `__libc_malloc` share the address; the plain name is the one people call.
        assert_eq!(
            frames(answer).last().unwrap().function.as_deref(),
            Some("malloc")
        );
    }
}

// MARK: self_probe_begin
#[inline(never)]
fn self_probe(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(3)
} // MARK: self_probe_end

#[test]
fn this_test_binary_symbolizes_itself() {
    let (path, address) = support::own_file_address(self_probe as *const () as usize as u64);
    std::hint::black_box(self_probe(1));
    let answer = &Symbolizer::new().symbolize(&object(&path), &[address])[0];
    let physical = frames(answer).last().unwrap();
    let function = physical.function.as_deref().unwrap();
    assert!(function.ends_with("symbolize::self_probe"), "{function}");
    assert!(
        physical.raw_function.as_deref().unwrap().starts_with("_R")
            || physical.raw_function.as_deref().unwrap().starts_with("_ZN")
    );
    let source = std::fs::read_to_string(file!())
        .or_else(|_| {
            std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/symbolize.rs"),
            )
        })
        .unwrap();
    let file = physical.file.as_deref().expect("the test binary has DWARF");
    assert!(file.ends_with("tests/symbolize.rs"), "{file}");
    let line = physical.line.unwrap();
    assert!(
        lines_between(&source, "self_probe_begin", "self_probe_end").contains(&line),
        "line {line}"
    );
}

#[test]
fn replaced_files_are_reopened_and_deleted_ones_still_answer() {
    let dir = TempDir::new("replaced");
    let c = build_c(&dir, "c-prog", &[]);
    let cpp = build_cpp(&dir, "cpp-prog");
    let leaf = symbol(&c, "leaf");
    let method = symbol(&cpp, METHOD);
    let path = copy(&c, dir.join("prog"));
    let mut symbolizer = Symbolizer::new();
    let function_at = |symbolizer: &mut Symbolizer, address: u64| {
        let answer = &symbolizer.symbolize(&object(&path), &[address])[0];
        frames(answer).last().unwrap().function.clone().unwrap()
    };
    assert_eq!(function_at(&mut symbolizer, leaf.address), "leaf");

    // Rebuilt in place (by rename, as linkers do): the new file is read.
    std::fs::rename(copy(&cpp, dir.join("tmp")), &path).unwrap();
    assert_eq!(
        function_at(&mut symbolizer, method.address),
        "ns::Klass::method(int)"
    );

    // Deleted after it was opened: the mapping still answers.
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        function_at(&mut symbolizer, method.address),
        "ns::Klass::method(int)"
    );
    // A symbolizer that never saw it reports it gone.
    assert!(matches!(
        &Symbolizer::new().symbolize(&object(&path), &[method.address])[0],
        Symbolized::Miss(Miss::FileUnreadable(_))
    ));
}

#[test]
fn miss_messages_say_what_to_do() {
    let messages = [
        Miss::NoFile.to_string(),
        Miss::FileUnreadable("Permission denied (os error 13)".into()).to_string(),
        Miss::NotElf.to_string(),
        Miss::MalformedElf("bad header".into()).to_string(),
        Miss::BuildIdMismatch.to_string(),
        Miss::OutsideObject.to_string(),
        Miss::NoSymbol.to_string(),
    ];
    for message in &messages {
        assert!(message.len() > 40, "{message}");
    }
    assert!(messages[1].contains("Permission denied"));
    assert!(messages[6].contains("-g"));
}

/// Regression test for a fuzzer finding: a compressed debug section whose header claims
/// gigabytes made the collector reserve that much memory before failing. Such DWARF is now
/// skipped, and the symbol table still names the function.
#[test]
fn compressed_debug_section_claiming_gigabytes_is_not_decompressed() {
    use object::{Object, ObjectSection};
    let dir = TempDir::new("lying-compression");
    let prog = build_c(&dir, "compressed-dwarf", &["-gz=zlib"]);
    let mut bytes = std::fs::read(&prog).unwrap();
    let offset = {
        let file = object::File::parse(bytes.as_slice()).unwrap();
        let section = file.section_by_name(".debug_line").expect(".debug_line");
        let (offset, _) = section.file_range().expect("in the file");
        offset as usize
    };
    // Elf64_Chdr: ch_type u32, ch_reserved u32, ch_size u64 (the claimed size), ...
    bytes[offset + 8..offset + 16].copy_from_slice(&(4u64 << 30).to_le_bytes());
    let liar = dir.path().join("liar");
    std::fs::write(&liar, &bytes).unwrap();
    let leaf = symbol(&prog, "leaf");
    let started = std::time::Instant::now();
    let answer = &Symbolizer::new().symbolize(&object(&liar), &[leaf.address + 1])[0];
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        frames(answer).last().unwrap().function.as_deref(),
        Some("leaf")
    );
}

/// Split DWARF (`-gsplit-dwarf`): the inline chain comes from the `.dwo` file the skeleton
/// names, and from a `.dwp` package beside the program once the `.dwo` is gone.
#[test]
fn split_dwarf_from_dwo_and_dwp() {
    let dir = TempDir::new("split-dwarf");
    // DWARF 4: binutils' `dwp` cannot package DWARF 5 split units.
    let prog = compile(
        &dir,
        "c++",
        "prog.cpp",
        CPP_SOURCE,
        "prog",
        &["-gsplit-dwarf", "-gdwarf-4"],
    );
    let method = symbol(&prog, METHOD);
    let dwo = dir.join("prog.dwo");
    assert!(dwo.exists(), "the compiler wrote no prog.dwo");
    assert_full_dwarf(&mut Symbolizer::new(), &prog, method.address, method.size);

    // `dwp` finds the `.dwo` files relative to its working directory.
    let packed = std::process::Command::new("dwp")
        .current_dir(dir.path())
        .args(["-e", "prog", "-o", "prog.dwp"])
        .status()
        .expect("cannot run dwp; is binutils installed?");
    assert!(packed.success(), "dwp failed");
    std::fs::remove_file(&dwo).unwrap();
    assert_full_dwarf(&mut Symbolizer::new(), &prog, method.address, method.size);
}

/// A FIFO where the `.dwp` package and the `.dwo` file are looked for (anyone who can write
/// beside a library can make one) is refused without blocking: the symbol table still
/// names the function. Opening either with a blocking open would hang here for ever.
#[test]
fn fifo_split_dwarf_files_do_not_hang() {
    let dir = TempDir::new("split-fifo");
    let prog = compile(
        &dir,
        "c++",
        "prog.cpp",
        CPP_SOURCE,
        "prog",
        &["-gsplit-dwarf", "-gdwarf-4"],
    );
    let method = symbol(&prog, METHOD);
    let dwo = dir.join("prog.dwo");
    std::fs::remove_file(&dwo).unwrap();
    run("mkfifo", &[&dwo, &dir.join("prog.dwp")]);

    let (done, answer) = std::sync::mpsc::channel();
    let path = prog.clone();
    std::thread::spawn(move || {
        let answers = Symbolizer::new().symbolize(&object(&path), &[method.address]);
        let _ = done.send(answers);
    });
    let answers = answer
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("symbolizing hung on a FIFO named like a split-DWARF file");
    assert_eq!(
        frames(&answers[0]).last().unwrap().function.as_deref(),
        Some("ns::Klass::method(int)")
    );
}

/// As root, for a process of `nobody`: a file only root may read gives no symbols, whatever
/// root's own lookups cached before; the same program readable by everyone does.
#[test]
fn files_are_read_with_the_processes_rights() {
    use anyprof_symbolizer::Access;
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: the credential switch is not used");
        return;
    }
    let dir = TempDir::new("access");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let open = build_c(&dir, "open", &[]);
    let secret = dir.join("secret");
    std::fs::copy(&open, &secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let leaf = symbol(&open, "leaf").address;
    let nobody = Access::new(65534, 65534, vec![]);
    let name = |answer: &Symbolized| {
        frames(answer)
            .last()
            .and_then(|f| f.function.clone())
            .unwrap_or_default()
    };

    let mut symbolizer = Symbolizer::new();
    let as_root = symbolizer.symbolize(&object(&secret), &[leaf]);
    assert_eq!(name(&as_root[0]), "leaf");
    let for_nobody = symbolizer.symbolize_many_as(Some(&nobody), &[(object(&secret), &[leaf])]);
    assert!(
        matches!(&for_nobody[0][0], Symbolized::Miss(Miss::FileUnreadable(_))),
        "{:?}",
        for_nobody[0][0]
    );
    let readable = symbolizer.symbolize_many_as(Some(&nobody), &[(object(&open), &[leaf])]);
    assert_eq!(name(&readable[0][0]), "leaf");
}

/// A FIFO where the debug file is looked for by build id, and one named by
/// `.gnu_debuglink` beside the program, are passed over without blocking.
#[test]
fn fifo_debug_files_do_not_hang() {
    let dir = TempDir::new("debug-fifo");
    let prog = build_cpp(&dir, "prog");
    let method = symbol(&prog, METHOD);
    let hex: String = build_id(&prog).iter().map(|b| format!("{b:02x}")).collect();
    let by_id = dir
        .join("debug")
        .join(".build-id")
        .join(&hex[..2])
        .join(format!("{}.debug", &hex[2..]));
    std::fs::create_dir_all(by_id.parent().unwrap()).unwrap();
    run("mkfifo", &[&by_id]);
    let linked = dir.join("prog.debug");
    run("objcopy", &[&"--only-keep-debug", &prog, &linked]);
    run("strip", &[&"--strip-debug", &prog]);
    run("objcopy", &[&"--add-gnu-debuglink", &linked, &prog]);
    std::fs::remove_file(&linked).unwrap();
    run("mkfifo", &[&linked]);

    let (done, answer) = std::sync::mpsc::channel();
    let (path, debug_dir) = (prog.clone(), dir.join("debug"));
    std::thread::spawn(move || {
        let mut symbolizer = Symbolizer::with_debug_dirs(vec![debug_dir]);
        let _ = done.send(symbolizer.symbolize(&object(&path), &[method.address]));
    });
    let answers = answer
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("symbolizing hung on a FIFO named like a debug file");
    assert_eq!(
        frames(&answers[0]).last().unwrap().function.as_deref(),
        Some("ns::Klass::method(int)")
    );
}

/// Regression test for a review finding on issue 12: a library owned by the profiled
/// process's user (`nobody`), cut in place (`ftruncate`) while the collector had it mapped,
/// killed the collector — a root `anyprof serve`, for every user — with `SIGBUS`. A file that
/// anyone but root or the collector's own user can write to is now read into memory, not
/// mapped: the object opened before the cut answers from its copy, a fresh open of what is
/// left is a miss, and neither is a signal. Root's own file is still mapped.
#[test]
fn files_other_users_can_truncate_are_read_not_mapped() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot give a file to another user; skipped");
        return;
    }
    let dir = TempDir::new("truncated");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let prog = build_c(&dir, "prog", &[]);
    let id = build_id(&prog);
    let leaf = symbol(&prog, "leaf");
    let caller = symbol(&prog, "caller");
    let is_mapped = |path: &Path| {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .any(|line| line.ends_with(path.to_str().unwrap()))
    };
    let name = |answer: &Symbolized| {
        frames(answer)
            .last()
            .and_then(|f| f.function.clone())
            .unwrap_or_default()
    };

    // Owned by `nobody`; root's but writable by everyone.
    for (file, owner, mode) in [("nobodys", Some(65534), 0o755), ("writable", None, 0o666)] {
        let path = copy(&prog, dir.join(file));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&path, owner, owner).unwrap();
        // With the build id the process loaded, the cached object is kept whatever happens to
        // the file on disk (it was checked to be that build), so the second call below reads
        // what was opened before the cut.
        let object = ObjectRef {
            path: &path,
            build_id: &id,
        };
        let mut symbolizer = Symbolizer::new();
        // Opened and cached; an address outside the object reads none of its DWARF or symbols.
        assert_eq!(
            symbolizer.symbolize(&object, &[u64::MAX - 1]),
            vec![Symbolized::Miss(Miss::OutsideObject)],
            "{file}"
        );
        // Cut to less than its first page, in place, as the attacker's loop does.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(64)
            .unwrap();
        // A mapping would raise SIGBUS here, on the first DWARF byte past the cut.
        let answers = symbolizer.symbolize(&object, &[leaf.address, caller.address]);
        assert_eq!(name(&answers[0]), "leaf", "{file}");
        assert_eq!(name(&answers[1]), "caller", "{file}");
        assert!(frames(&answers[0]).last().unwrap().line.is_some(), "{file}");
        assert!(!is_mapped(&path), "{file} is mapped");
        // What is left on disk is no ELF file: a miss for a fresh symbolizer.
        assert!(
            matches!(
                &Symbolizer::new().symbolize(&object, &[leaf.address])[0],
                Symbolized::Miss(_)
            ),
            "{file}"
        );
    }

    // Root's, writable by root only: mapped, as before.
    let roots = copy(&prog, dir.join("roots"));
    std::fs::set_permissions(&roots, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut symbolizer = Symbolizer::new();
    assert_eq!(
        name(&symbolizer.symbolize(&object(&roots), &[leaf.address])[0]),
        "leaf"
    );
    assert!(is_mapped(&roots), "root's own file is read, not mapped");
}

/// A loopback server that answers 404 to everything and counts the requests.
fn counting_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    (format!("http://127.0.0.1:{port}"), count)
}

/// With `only_root_owned_objects`, debuginfod is asked only for objects whose file is owned
/// by root and writable by root alone: a user's own build (which could claim any build id)
/// is not looked up, a root-owned one is.
#[test]
fn only_root_owned_objects_are_looked_up_when_asked() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to give a file to nobody");
        return;
    }
    let dir = TempDir::new("root-owned-only");
    let prog = build_c(&dir, "c-prog", &[]);
    run("strip", &[&"--strip-debug", &prog]);
    let leaf = symbol(&prog, "leaf");
    let id = build_id(&prog);
    let users = copy(&prog, dir.join("users-prog"));
    std::os::unix::fs::chown(&users, Some(65534), Some(65534)).unwrap();
    let (url, asked) = counting_server();
    let ask = |path: &Path, only_root: bool| {
        let cache = dir.join(format!(
            "cache-{}",
            asked.load(std::sync::atomic::Ordering::SeqCst)
        ));
        let mut symbolizer = Symbolizer::with_sources(DebugSources {
            debug_dirs: Vec::new(),
            debuginfod: Some(DebuginfodConfig {
                urls: vec![url.clone()],
                cache_dir: cache,
                timeout: std::time::Duration::from_secs(5),
                max_time: None,
                max_size: 1 << 20,
                progress: false,
                default_max_time: None,
                only_root_owned_objects: only_root,
            }),
        });
        let before = asked.load(std::sync::atomic::Ordering::SeqCst);
        let _ = symbolizer.symbolize(
            &ObjectRef {
                path,
                build_id: &id,
            },
            &[leaf.address],
        );
        asked.load(std::sync::atomic::Ordering::SeqCst) - before
    };
    assert_eq!(ask(&users, true), 0, "a user's file was looked up");
    assert_eq!(ask(&prog, true), 1, "a root-owned file is looked up");
    assert_eq!(
        ask(&users, false),
        1,
        "without the option every file is looked up"
    );
}
