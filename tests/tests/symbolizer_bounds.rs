//! Hostile objects must not make the symbolizer's memory grow without bound (attack review of
//! issue 15): a root `anyprof serve` symbolizes files a peer may have made. Each test makes
//! its object with the assembler and linker, puts it in a profile that `anyprof symbolize`
//! names, and checks the peak memory (max RSS) of that `anyprof symbolize`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyprof::pprof::proto::{Location, Mapping, Profile, Sample, ValueType};
use anyprof_tests::{binaries, clean_command, scratch_dir};

/// Peak memory an `anyprof symbolize` of a few small objects may reach: real runs of these
/// profiles take about 20 MiB.
const MAX_RSS: u64 = 100 << 20;

/// Links the assembler source `asm` into the shared object `<dir>/<name>`.
fn shared_object(dir: &Path, name: &str, asm: &str) -> PathBuf {
    let source = dir.join(format!("{name}.s"));
    std::fs::write(&source, asm).unwrap();
    let object = dir.join(name);
    let out = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-shared", "-nostdlib", "-Wl,--build-id", "-o"])
        .arg(&object)
        .arg(&source)
        .output()
        .expect("running cc");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    object
}

/// `readelf -W <flag> <file>`.
fn readelf(flag: &str, file: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-W")
        .arg(flag)
        .arg(file)
        .output()
        .expect("running readelf (binutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn build_id(file: &Path) -> String {
    let notes = readelf("-n", file);
    notes
        .split("Build ID: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .expect("a build id")
}

/// The file offset and address of the executable segment of `file`.
fn code_segment(file: &Path) -> (u64, u64) {
    let text = readelf("-l", file);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("LOAD") && l.contains("R E"))
        .expect("an executable segment");
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (hex(fields[1]), hex(fields[2]))
}

/// A profile with one sample per address in `objects`, each object mapped at its own place
/// with its executable segment; addresses are the objects' own (link-time) addresses.
fn profile(objects: &[(PathBuf, Vec<u64>)]) -> Profile {
    let mut strings = vec![String::new(), "samples".into(), "count".into()];
    let mut string = |s: String| {
        strings.push(s);
        strings.len() as i64 - 1
    };
    let mut mappings = Vec::new();
    let mut locations = Vec::new();
    let mut samples = Vec::new();
    for (i, (file, addresses)) in objects.iter().enumerate() {
        let (offset, vaddr) = code_segment(file);
        let base = 0x7f00_0000_0000 + ((i as u64) << 32);
        let mapping = Mapping {
            id: i as u64 + 1,
            memory_start: base + vaddr,
            memory_limit: base + vaddr + (16 << 20),
            file_offset: offset,
            filename: string(file.display().to_string()),
            build_id: string(build_id(file)),
            ..Default::default()
        };
        for &address in addresses {
            let id = locations.len() as u64 + 1;
            locations.push(Location {
                id,
                mapping_id: mapping.id,
                address: base + address,
                ..Default::default()
            });
            samples.push(Sample {
                location_id: vec![id],
                value: vec![1],
                ..Default::default()
            });
        }
        mappings.push(mapping);
    }
    Profile {
        sample_type: vec![ValueType { r#type: 1, unit: 2 }],
        sample: samples,
        mapping: mappings,
        location: locations,
        string_table: strings,
        ..Default::default()
    }
}

/// Runs `anyprof symbolize` on `profile` and returns its peak memory in bytes and stderr.
fn symbolize_peak(dir: &Path, profile: &Profile) -> (u64, String) {
    let input = dir.join("in.pb.gz");
    let output = dir.join("out.pb.gz");
    let _ = std::fs::remove_file(&output);
    std::fs::write(&input, anyprof::pprof::encode_gzipped(profile)).unwrap();
    let stderr_path = dir.join("stderr");
    let mut cmd = clean_command(binaries().anyprof);
    cmd.arg("symbolize")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    // Reaped below with wait4, which also reports the child's peak memory.
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().expect("starting anyprof symbolize");
    let pid = child.id() as libc::pid_t;
    let start = Instant::now();
    let (status, usage) = loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our child, not yet reaped; both pointers are valid for writes.
        let got = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if got == pid {
            break (status, usage);
        }
        assert!(got == 0, "wait4: {}", std::io::Error::last_os_error());
        if start.elapsed() > Duration::from_secs(120) {
            // SAFETY: kill has no memory preconditions; `pid` is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("anyprof symbolize did not finish within two minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "anyprof symbolize failed ({status:#x}):\n{stderr}"
    );
    let peak = usage.ru_maxrss as u64 * 1024;
    eprintln!("anyprof symbolize peaked at {} MiB", peak >> 20);
    (peak, stderr)
}

/// Many `.plt.got` stubs jump through one GOT slot whose symbol has a 100 KB name: the name
/// is kept once, not once per stub (5000 stubs made 511 MB before), and is cut.
#[test]
fn one_long_plt_name_does_not_multiply() {
    let dir = scratch_dir("bounds-plt");
    let name = "F".repeat(100_000);
    let stubs = 5000;
    let mut asm =
        String::from(".globl entry\n.text\nentry: ret\n.section .plt.got,\"ax\",@progbits\n");
    writeln!(
        asm,
        ".rept {stubs}\njmp *{name}@GOTPCREL(%rip)\n.byte 0x66, 0x90\n.endr"
    )
    .unwrap();
    let object = shared_object(&dir, "libplt.so", &asm);
    let plt_got = readelf("-S", &object)
        .lines()
        .find(|l| l.contains(".plt.got"))
        .and_then(|l| {
            let after = &l[l.find(".plt.got").unwrap()..];
            after.split_whitespace().nth(2).map(str::to_string)
        })
        .map(|a| u64::from_str_radix(&a, 16).unwrap())
        .expect("a .plt.got section");
    // Every stub is sampled once (8 bytes each), so each is looked up.
    let addresses: Vec<u64> = (0..stubs).map(|i| plt_got + i * 8 + 2).collect();
    let (peak, stderr) = symbolize_peak(&dir, &profile(&[(object, addresses)]));
    assert!(
        peak < MAX_RSS,
        "anyprof symbolize peaked at {} MiB:\n{stderr}",
        peak >> 20
    );
    let named = anyprof::pprof::read_file(&dir.join("out.pb.gz")).unwrap();
    let plt_names: Vec<&String> = named
        .string_table
        .iter()
        .filter(|s| s.ends_with("@plt"))
        .collect();
    assert!(!plt_names.is_empty(), "the stubs are named");
    assert!(
        plt_names.iter().all(|s| s.len() <= 4096 + 4),
        "names are cut to 4 KiB"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Ten small objects whose `.gnu_debugdata` (MiniDebugInfo) each decompresses to 15 MiB
/// (an ELF file with one function symbol, padded): only the symbols and their names are
/// kept, not the decompressed files (they made 790 MB with the old 64 MiB cap).
#[test]
fn minidebuginfo_is_not_kept_whole() {
    let dir = scratch_dir("bounds-minidebug");
    let mut objects = Vec::new();
    for i in 0..10 {
        let asm = format!(
            ".globl hidden_{i}\n.hidden hidden_{i}\n.type hidden_{i},@function\n.text\n\
             hidden_{i}: .zero 0x2000\n.size hidden_{i}, 0x2000\n.data\n.quad {i}\n"
        );
        let lib = shared_object(&dir, &format!("lib{i}.so"), &asm);
        // The MiniDebugInfo: the object itself (its .symtab names the function), padded.
        let inner = dir.join(format!("inner{i}"));
        let mut bytes = std::fs::read(&lib).unwrap();
        bytes.resize(bytes.len() + (15 << 20), 0);
        std::fs::write(&inner, bytes).unwrap();
        let out = Command::new("xz")
            .args(["-k", "-f", "-0"])
            .arg(&inner)
            .output()
            .expect("running xz (xz-utils)");
        assert!(out.status.success(), "xz: {out:?}");
        let stripped = dir.join(format!("libmini{i}.so"));
        let out = Command::new("objcopy")
            .arg("--strip-all")
            .arg(format!(
                "--add-section=.gnu_debugdata={}",
                inner.with_extension("xz").display()
            ))
            .arg(&lib)
            .arg(&stripped)
            .output()
            .expect("running objcopy (binutils)");
        assert!(out.status.success(), "objcopy: {out:?}");
        let symbols = readelf("-s", &lib);
        let address = symbols
            .lines()
            .find(|l| l.trim_end().ends_with(&format!(" hidden_{i}")))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(|a| u64::from_str_radix(a, 16).unwrap())
            .expect("the function's address");
        objects.push((stripped, vec![address + 0x10]));
    }
    let (peak, stderr) = symbolize_peak(&dir, &profile(&objects));
    assert!(
        peak < MAX_RSS,
        "anyprof symbolize peaked at {} MiB:\n{stderr}",
        peak >> 20
    );
    let named = anyprof::pprof::read_file(&dir.join("out.pb.gz")).unwrap();
    let hidden = named
        .string_table
        .iter()
        .filter(|s| s.starts_with("hidden_"))
        .count();
    assert_eq!(hidden, 10, "each object named from its MiniDebugInfo");
    std::fs::remove_dir_all(&dir).unwrap();
}
