//! Names where debug information is missing (issue 15, points 3 and 5, and the judging item
//! "`sort`, `xz` and `sqlite3` from the distribution are named at least as well as `perf
//! report` names them").
//!
//! * [`a_stripped_program_shows_module_and_file_address_and_the_summary_says_how_to_name_it`]:
//!   an unnamed frame is `MODULE+0xADDR` with the address `addr2line -e` takes, and the exit
//!   summary names the module, its share and the fix.
//! * [`xz_from_the_distribution_is_named_from_liblzma_exports`]: a stripped distribution
//!   program and library: the exported `lzma_*` functions are named (as `perf report` names
//!   them), the rest are addresses in their module, never a bare `[module]`.
//! * [`anyprofs_own_hooks_are_one_frame_under_the_caller`]: CPU time in the malloc hooks is
//!   one `[anyprof]` frame right under the program's caller of malloc.
//! * [`python3_importing_json_gets_no_allocator_warning_and_its_heap_profile`]: the "malloc
//!   is answered by" warning is not printed for CPython, whose allocations are all profiled.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyprof_tests::{
    binaries, clean_command, compile, cpu_lock, heap_record_command, is_address_name,
    read_profile_in, record, required_library, run, scratch_dir, ProfileView, RunOutput,
};

/// `anyprof record -o DIR --cpu-hz HZ -- program args` without `-q`: the exit summary is
/// printed.
fn record_with_summary(dir: &Path, hz: u32, program: &Path, args: &[&str]) -> RunOutput {
    std::fs::create_dir_all(dir).expect("output dir");
    let mut cmd = clean_command(&binaries().anyprof);
    cmd.arg("record")
        .arg("-o")
        .arg(dir)
        .args(["--cpu-hz", &hz.to_string()])
        .arg("--")
        .arg(program)
        .args(args)
        // The advice depends on it; debuginfod is not what these tests are about.
        .env_remove("DEBUGINFOD_URLS");
    run(&mut cmd)
}

fn read_cpu(dir: &Path, output: &RunOutput) -> ProfileView {
    read_profile_in(dir, "cpu.pb.gz", output)
}

/// Address and size of the function `name` in the symbol table of `path` (`nm -S`).
fn nm_symbol(path: &Path, name: &str) -> (u64, u64) {
    let output = Command::new("nm")
        .arg("-S")
        .arg(path)
        .output()
        .expect("run nm (binutils)");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields[..] {
                [address, size, _, symbol] if symbol == name => Some((
                    u64::from_str_radix(address, 16).ok()?,
                    u64::from_str_radix(size, 16).ok()?,
                )),
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("nm -S {} shows no {name}", path.display()))
}

/// Samples by the leaf frame's name.
fn leaf_counts(view: &ProfileView) -> BTreeMap<String, i64> {
    view.self_samples()
}

#[test]
fn a_stripped_program_shows_module_and_file_address_and_the_summary_says_how_to_name_it() {
    let _cpu = cpu_lock();
    let scratch = scratch_dir("naming_stripped");
    let unstripped = compile("naming_hot.c", &["-O2"], &scratch);
    let (spin, spin_size) = nm_symbol(&unstripped, "spin");
    let stripped_dir = scratch.join("stripped");
    std::fs::create_dir_all(&stripped_dir).expect("dir");
    let program: PathBuf = stripped_dir.join("naming_hot");
    let status = Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&program)
        .arg(&unstripped)
        .status()
        .expect("run strip (binutils)");
    assert!(status.success());

    let dir = scratch.join("profile");
    let output = record_with_summary(&dir, 1000, &program, &[]);
    assert_eq!(output.code, 0, "stderr:\n{}", output.stderr_text());
    let view = read_cpu(&dir, &output);
    let total = view.total_samples();
    assert!(total >= 20, "too few samples:\n{}", view.describe());

    // The hot leaf frames are `naming_hot+0xADDR`, ADDR inside `spin` as the unstripped
    // file's symbol table (and so addr2line -e, objdump) places it.
    let leaves = leaf_counts(&view);
    let in_spin: i64 = leaves
        .iter()
        .filter_map(|(name, count)| {
            let hex = name.strip_prefix("naming_hot+0x")?;
            let address = u64::from_str_radix(hex, 16).ok()?;
            (spin..spin + spin_size)
                .contains(&address)
                .then_some(*count)
        })
        .sum();
    assert!(
        in_spin * 10 >= total * 8,
        "at least 80% of the samples should be `naming_hot+0xADDR` with ADDR in spin \
         ({spin:#x}, {spin_size} bytes); {in_spin} of {total}. Leaves: {leaves:?}"
    );
    assert!(
        !leaves.keys().any(|n| n.starts_with("[unsymbolized")),
        "every looked-up address has a name, a function or MODULE+0xADDR: {leaves:?}"
    );

    // The summary says which module, how much, and what to do.
    let stderr = output.stderr_text();
    let line = stderr
        .lines()
        .find(|l| l.contains("naming_hot:") && l.contains('%'))
        .unwrap_or_else(|| panic!("the summary should name naming_hot; stderr:\n{stderr}"));
    assert!(
        line.contains("-g") && line.contains("not from a package"),
        "the advice for a program of one's own is to build it with -g: {line}"
    );
    assert!(
        stderr.contains("no function names for code that took"),
        "stderr:\n{stderr}"
    );
}

/// No missing names are reported when the program has its names.
#[test]
fn a_program_with_its_names_gets_no_advice() {
    let _cpu = cpu_lock();
    let scratch = scratch_dir("naming_named");
    let program = compile("naming_hot.c", &["-O2", "-g"], &scratch);
    let output = record_with_summary(&scratch.join("profile"), 1000, &program, &[]);
    assert_eq!(output.code, 0, "stderr:\n{}", output.stderr_text());
    let stderr = output.stderr_text();
    assert!(
        stderr.contains(" spin ") && !stderr.contains("no function names"),
        "a program with its symbols: spin named, no advice; stderr:\n{stderr}"
    );
}

/// Some megabytes that xz -9 compresses in well under a second: words drawn from a small
/// vocabulary by a fixed generator.
fn xz_input(path: &Path) {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let vocabulary: Vec<String> = (0..3000)
        .map(|_| {
            let len = 2 + next() % 8;
            (0..len)
                .map(|_| (b'a' + (next() % 16) as u8) as char)
                .collect()
        })
        .collect();
    let mut text = String::new();
    while text.len() < 1_500_000 {
        text.push_str(&vocabulary[next() % vocabulary.len()]);
        text.push(' ');
    }
    std::fs::write(path, text).expect("write xz input");
}

#[test]
fn xz_from_the_distribution_is_named_from_liblzma_exports() {
    let _cpu = cpu_lock();
    let xz = required_library("/usr/bin/xz", "xz-utils");
    let scratch = scratch_dir("naming_xz");
    let input = scratch.join("input.txt");
    xz_input(&input);
    let input_arg = input.to_string_lossy().into_owned();
    let recording = record(
        &scratch,
        1000,
        Path::new(xz),
        &["-9", "-k", "-c", &input_arg],
    );
    assert_eq!(
        recording.output.code,
        0,
        "stderr:\n{}",
        recording.output.stderr_text()
    );
    let view = recording.cpu_profile();
    let total = view.total_samples();
    assert!(total >= 20, "too few samples:\n{}", view.describe());

    // perf report names lzma_* (liblzma's .dynsym): so must we, on the stacks.
    let cumulative = view.cumulative_samples();
    let lzma: Vec<&String> = cumulative
        .keys()
        .filter(|n| n.starts_with("lzma_"))
        .collect();
    assert!(
        cumulative.get("lzma_code").copied().unwrap_or(0) * 10 >= total * 9,
        "lzma_code (exported by liblzma) is on at least 90% of the stacks; lzma_* seen: \
         {lzma:?}\n{}",
        view.describe()
    );
    // Every leaf is a function or an address in its module: nothing is a bare module. A
    // sample in anyprof's own malloc hook is named `[anyprof]` (one in 361 in a CI run).
    let leaves = leaf_counts(&view);
    let named_or_addressed: i64 = leaves
        .iter()
        .filter(|(name, _)| !name.starts_with('[') || *name == anyprof::profile::ANYPROF_FRAME)
        .map(|(_, count)| count)
        .sum();
    assert_eq!(
        named_or_addressed, total,
        "every leaf is a function or MODULE+0xADDR: {leaves:?}"
    );
    let in_liblzma: i64 = leaves
        .iter()
        .filter(|(name, _)| name.starts_with("liblzma.so.5+0x") && is_address_name(name))
        .map(|(_, count)| count)
        .sum();
    // Without liblzma's debug symbols (the CI machine has none), most of the time is in its
    // internal functions, named by address.
    if in_liblzma * 2 >= total {
        let output = record_with_summary(
            &scratch.join("summary"),
            1000,
            Path::new(xz),
            &["-9", "-k", "-c", &input_arg],
        );
        let stderr = output.stderr_text();
        let line = stderr
            .lines()
            .find(|l| l.contains("liblzma.so.5:") && l.contains('%'))
            .unwrap_or_else(|| panic!("the summary names liblzma.so.5; stderr:\n{stderr}"));
        assert!(
            line.contains("DEBUGINFOD_URLS"),
            "the advice mentions debuginfod: {line}"
        );
        if Path::new("/usr/bin/dpkg-query").exists() {
            assert!(
                line.contains("liblzma5-dbgsym"),
                "on Debian the advice names the debug package: {line}"
            );
        }
    }
}

#[test]
fn anyprofs_own_hooks_are_one_frame_under_the_caller() {
    let _cpu = cpu_lock();
    let scratch = scratch_dir("naming_hooks");
    let program = compile("hook_overhead.c", &["-O2", "-g"], &scratch);
    let recording = record(&scratch, 1000, &program, &[]);
    assert_eq!(
        recording.output.code,
        0,
        "stderr:\n{}",
        recording.output.stderr_text()
    );
    let view = recording.cpu_profile();
    let total = view.total_samples();
    assert!(total >= 20, "too few samples:\n{}", view.describe());

    // No frame of anyprof's internals, by name or by module.
    let own_mappings: Vec<u64> = view
        .profile
        .mapping
        .iter()
        .filter(|m| view.string(m.filename).ends_with("libanyprof.so"))
        .map(|m| m.id)
        .collect();
    let mut with_own = 0;
    for sample in &view.profile.sample {
        let frames = view.frames(sample);
        for frame in &frames {
            assert!(
                !frame.name.contains("anyprof_preload")
                    && !frame.name.contains("anyprof::")
                    && !frame.name.contains("core::sync::atomic")
                    && !frame.system_name.contains("anyprof_preload"),
                "an internal frame of anyprof shows: {frame:?}\n{}",
                view.describe()
            );
        }
        for &id in &sample.location_id {
            let location = view.location(id);
            if own_mappings.contains(&location.mapping_id) {
                let names: Vec<&str> = view
                    .location_frames(location)
                    .iter()
                    .map(|f| f.name)
                    .collect();
                assert_eq!(names, ["[anyprof]"], "{}", view.describe());
            }
        }
        // Each [anyprof] frame is called by churn, the program's caller of malloc/free.
        for (i, frame) in frames.iter().enumerate() {
            if frame.name == "[anyprof]" {
                with_own += view.count(sample);
                assert_eq!(
                    frames.get(i + 1).map(|f| f.name),
                    Some("churn"),
                    "[anyprof] sits right under churn: {:?}",
                    frames.iter().map(|f| f.name).collect::<Vec<_>>()
                );
            }
        }
    }
    assert!(
        with_own > 0,
        "the hooks took some CPU, shown as [anyprof]:\n{}",
        view.describe()
    );
}

/// CPython (Debian's, a non-PIE executable that takes malloc's address) importing json: its
/// allocations reach anyprof, so the "malloc is answered by ..." warning must not appear, and
/// the heap profile holds its allocations.
#[test]
fn python3_importing_json_gets_no_allocator_warning_and_its_heap_profile() {
    let python = required_library("/usr/bin/python3", "python3");
    let scratch = scratch_dir("naming_python_json");
    let script = scratch.join("dump.py");
    // 30 strings of about 600 KB and 30 lists of 800 KB: past pymalloc's 512-byte limit, so
    // from malloc; about 40 MiB in all.
    std::fs::write(
        &script,
        "import json\n\
         kept = []\n\
         for i in range(30):\n\
         \x20   numbers = list(range(100000))\n\
         \x20   kept.append(len(json.dumps(numbers)))\n\
         print(sum(kept))\n",
    )
    .expect("write script");
    let dir = scratch.join("profile");
    let mut cmd = heap_record_command(&dir, &[], Path::new(python), &[]);
    cmd.arg(&script);
    let output = run(&mut cmd);
    let stderr = output.stderr_text();
    assert_eq!(output.code, 0, "stderr:\n{stderr}");
    assert!(
        !stderr.contains("answered by"),
        "python3 gets its allocations profiled, so no warning that they are not:\n{stderr}"
    );
    let allocs = read_profile_in(&dir, "allocs.pb.gz", &output);
    let index = allocs.value_index("alloc_space");
    let bytes: i64 = allocs.profile.sample.iter().map(|s| s.value[index]).sum();
    assert!(
        bytes >= 20 << 20,
        "the heap profile holds the script's ~40 MiB of allocations; it has {bytes} bytes:\n{}",
        allocs.describe()
    );
}
