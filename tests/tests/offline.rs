//! Profile on one host, name on another (issue 15, point 2): `anyprof record --no-symbolize`
//! writes addresses, mappings and build ids only, and `anyprof symbolize` adds the names
//! later, from the binary or its separate debug file found by build id. The names must be the
//! ones a symbolized `record` gives; a file of another build must never lend its names.
//!
//! The program is `tests/programs/inline.cpp` (`-O2 -g`): demangled C++ names, a template,
//! and a hot loop that exists only as inlined code, so inline frames are compared too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyprof::pprof::proto::Profile;
use anyprof_tests::{
    binaries, clean_command, compile, cpu_lock, run, scratch_dir, Frame, ProfileView, Recording,
    RunOutput,
};

/// Iterations of inline.cpp's loop: about half a second of CPU.
const ITERATIONS: &str = "300000000";
const HZ: u32 = 200;

/// The functions of inline.cpp every sample runs in.
const HOT: [&str; 3] = [
    "anyprof_test::inlined_hot_loop",
    "anyprof_test::Worker::run_batch",
    "anyprof_test::drive<unsigned long>",
];

/// Compiles inline.cpp into `<scratch>/build/inline`.
fn build_program(scratch: &Path) -> PathBuf {
    let build = scratch.join("build");
    std::fs::create_dir_all(&build).unwrap();
    compile("inline.cpp", &["-O2", "-g"], &build)
}

/// `anyprof record -q -o <scratch>/profile --cpu-hz HZ <extra> -- exe ITERATIONS`, holding
/// the CPU lock.
fn record_program(scratch: &Path, exe: &Path, extra: &[&str]) -> Recording {
    let dir = scratch.join("profile");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = clean_command(binaries().anyprof);
    cmd.arg("record")
        .arg("-q")
        .arg("-o")
        .arg(&dir)
        .arg("--cpu-hz")
        .arg(HZ.to_string())
        .args(extra)
        .arg("--")
        .arg(exe)
        .arg(ITERATIONS);
    let output = {
        let _cpu = cpu_lock();
        run(&mut cmd)
    };
    assert_eq!(
        output.code,
        0,
        "anyprof record {extra:?} failed\nstderr:\n{}",
        output.stderr_text()
    );
    Recording {
        dir,
        hz: HZ,
        output,
    }
}

/// Runs `anyprof symbolize <args>`.
fn symbolize(args: &[&Path], flags: &[&str]) -> RunOutput {
    let mut cmd = clean_command(binaries().anyprof);
    cmd.arg("symbolize").args(args).args(flags);
    run(&mut cmd)
}

fn read(path: &Path) -> ProfileView {
    ProfileView::new(
        anyprof::pprof::read_file(path)
            .unwrap_or_else(|e| panic!("reading {}: {e:#}", path.display())),
    )
}

/// The mapping of `exe` in `view`.
fn mapping_of<'a>(view: &'a ProfileView, exe: &Path) -> &'a anyprof::pprof::proto::Mapping {
    view.profile
        .mapping
        .iter()
        .find(|m| view.string(m.filename) == exe.to_str().unwrap())
        .unwrap_or_else(|| panic!("no mapping of {}:\n{}", exe.display(), view.describe()))
}

/// Each location's frames (name, system name, file, line), by location id.
fn frames_by_location(view: &ProfileView) -> BTreeMap<u64, Vec<(String, String, String, i64)>> {
    view.profile
        .location
        .iter()
        .map(|l| {
            let frames = view
                .location_frames(l)
                .into_iter()
                .map(
                    |Frame {
                         name,
                         system_name,
                         filename,
                         line,
                     }| {
                        (name.into(), system_name.into(), filename.into(), line)
                    },
                )
                .collect();
            (l.id, frames)
        })
        .collect()
}

/// The readable build id of `exe` (as hex), from its `.note.gnu.build-id` via `readelf -n`.
fn build_id_of(exe: &Path) -> String {
    let out = Command::new("readelf").arg("-n").arg(exe).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build id in `readelf -n {}`:\n{text}", exe.display()))
        .trim()
        .to_string()
}

/// `<dir>/.build-id/xx/rest.debug` holding only `exe`'s debug information, as
/// `objcopy --only-keep-debug` makes it for a `-dbgsym` package.
fn debug_dir_for(exe: &Path, dir: &Path) -> PathBuf {
    let id = build_id_of(exe);
    let place = dir.join(".build-id").join(&id[..2]);
    std::fs::create_dir_all(&place).unwrap();
    let debug = place.join(format!("{}.debug", &id[2..]));
    let out = Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(exe)
        .arg(&debug)
        .output()
        .expect("running objcopy (binutils)");
    assert!(out.status.success(), "objcopy: {out:?}");
    debug
}

/// `go tool pprof -top` of `profile`, as the other tests run it.
fn go_top(scratch: &Path, profile: &Path) -> String {
    let home = scratch.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = clean_command("go");
    cmd.args(["tool", "pprof", "-top"])
        .arg(profile)
        .env("HOME", &home)
        .env("PPROF_TMPDIR", scratch)
        .env_remove("PPROF_BINARY_PATH");
    let out = run(&mut cmd);
    assert_eq!(out.code, 0, "go tool pprof -top: {}", out.stderr_text());
    out.stdout_text()
}

/// `record --no-symbolize`: no functions, no lines, no `has_*` flags; every location keeps
/// its address and mapping, and the mapping its file name, build id and placement.
#[test]
fn no_symbolize_writes_addresses_mappings_and_build_ids_only() {
    let scratch = scratch_dir("offline_unnamed");
    let exe = build_program(&scratch);
    let rec = record_program(&scratch, &exe, &["--no-symbolize"]);
    let view = rec.cpu_profile();
    assert!(view.total_samples() > 0, "{}", view.describe());
    assert!(
        view.profile.function.is_empty(),
        "--no-symbolize wrote functions:\n{}",
        view.describe()
    );
    for l in &view.profile.location {
        if l.mapping_id != 0 {
            assert!(l.line.is_empty(), "location {l:?} has lines");
            assert_ne!(l.address, 0, "location {l:?} has no address");
        }
    }
    for m in &view.profile.mapping {
        assert!(
            !(m.has_functions || m.has_filenames || m.has_line_numbers || m.has_inline_frames),
            "mapping {} claims names: {m:?}",
            view.string(m.filename)
        );
    }
    let main = mapping_of(&view, &exe);
    assert_eq!(view.string(main.build_id), build_id_of(&exe));
    assert!(main.memory_start < main.memory_limit && main.memory_start.is_multiple_of(4096));
    // The leaf of nearly every sample is in the program.
    let in_main = view
        .profile
        .sample
        .iter()
        .filter(|s| view.location(s.location_id[0]).mapping_id == main.id)
        .count();
    assert!(
        in_main * 2 > view.profile.sample.len(),
        "{}",
        view.describe()
    );
}

/// `anyprof symbolize` gives every location exactly the lines `record` gives it: a recorded
/// profile with its names taken out is named again, location by location.
#[test]
fn symbolize_names_every_location_as_record_does() {
    let scratch = scratch_dir("offline_same_names");
    let exe = build_program(&scratch);
    let rec = record_program(&scratch, &exe, &[]);
    let named = rec.cpu_profile();
    let mut stripped: Profile = named.profile.clone();
    for l in stripped.location.iter_mut().filter(|l| l.mapping_id != 0) {
        l.line.clear();
    }
    for m in &mut stripped.mapping {
        m.has_functions = false;
        m.has_filenames = false;
        m.has_line_numbers = false;
        m.has_inline_frames = false;
    }
    let input = scratch.join("stripped.pb.gz");
    std::fs::write(&input, anyprof::pprof::encode_gzipped(&stripped)).unwrap();
    let output = scratch.join("named.pb.gz");
    let out = symbolize(&[&input, Path::new("-o"), &output], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr_text());
    let again = read(&output);
    assert_eq!(frames_by_location(&again), frames_by_location(&named));
    let main = mapping_of(&again, &exe);
    assert!(main.has_functions && main.has_line_numbers && main.has_inline_frames);
}

/// The whole path: `record --no-symbolize`, the program's binary gone from where it ran, its
/// debug file only in a `.build-id` directory; `anyprof symbolize --debug-dir` names the hot
/// functions with the names, files and lines of a symbolized `record`, with inline frames,
/// and `go tool pprof` reads the result.
#[test]
fn record_no_symbolize_then_symbolize_from_a_debug_file_matches_record() {
    let scratch = scratch_dir("offline_debug_dir");
    let exe = build_program(&scratch);
    let reference = record_program(&scratch.join("named"), &exe, &[]).cpu_profile();
    let unnamed = record_program(&scratch.join("unnamed"), &exe, &["--no-symbolize"]);
    let debug_dir = scratch.join("debug");
    debug_dir_for(&exe, &debug_dir);
    // Another host: the binary is not where it ran.
    let elsewhere = scratch.join("inline.elsewhere");
    std::fs::rename(&exe, &elsewhere).unwrap();

    let output = scratch.join("cpu.named.pb.gz");
    let out = symbolize(
        &[&unnamed.cpu_profile_path(), Path::new("-o"), &output],
        &["--debug-dir", debug_dir.to_str().unwrap()],
    );
    assert_eq!(out.code, 0, "{}", out.stderr_text());
    assert!(
        !out.stderr_text().contains("stay unnamed"),
        "{}",
        out.stderr_text()
    );
    let view = read(&output);

    // The same functions on the hot path, from the same files, each with source lines.
    let hot = |v: &ProfileView| -> BTreeSet<(String, String)> {
        let total = v.total_samples();
        let cumulative = v.cumulative_samples();
        let mut out = BTreeSet::new();
        for l in &v.profile.location {
            for f in v.location_frames(l) {
                let share = cumulative.get(f.name).copied().unwrap_or(0);
                if share * 10 >= total && HOT.iter().any(|h| f.name.contains(h)) {
                    assert!(f.line > 0, "{} has no line", f.name);
                    out.insert((f.name.to_string(), f.filename.to_string()));
                }
            }
        }
        out
    };
    let (offline, recorded) = (hot(&view), hot(&reference));
    assert_eq!(offline, recorded, "offline:\n{}", view.describe());
    assert_eq!(offline.len(), HOT.len(), "{offline:?}");
    // Lines: each hot function's lines offline are lines record also gave it (the samples
    // differ between the two runs, so one set need not hold every line of the other).
    let lines = |v: &ProfileView| -> BTreeSet<(String, i64)> {
        v.profile
            .location
            .iter()
            .flat_map(|l| v.location_frames(l))
            .filter(|f| HOT.iter().any(|h| f.name.contains(h)))
            .map(|f| (f.name.to_string(), f.line))
            .collect()
    };
    let (offline_lines, recorded_lines) = (lines(&view), lines(&reference));
    let shared = offline_lines.intersection(&recorded_lines).count();
    assert!(
        shared * 2 >= offline_lines.len(),
        "offline lines {offline_lines:?}\nrecord's {recorded_lines:?}"
    );
    // The inlined loop is a Line before run_batch's in the same Location.
    assert!(
        view.profile.location.iter().any(|l| {
            let f = view.location_frames(l);
            f.len() >= 2 && f[0].name.contains(HOT[0]) && f.iter().any(|x| x.name.contains(HOT[1]))
        }),
        "no inline frames:\n{}",
        view.describe()
    );
    let main = mapping_of(&view, &exe);
    assert!(main.has_functions && main.has_inline_frames, "{main:?}");

    let top = go_top(&scratch, &output);
    for name in ["inlined_hot_loop", "run_batch"] {
        assert!(
            top.contains(name),
            "go tool pprof -top lacks {name}:\n{top}"
        );
    }
}

/// A binary of another build at the mapping's path lends no names: the user is told, and the
/// locations stay unnamed. With the right debug file given, they are named.
#[test]
fn symbolize_never_uses_a_file_of_another_build() {
    let scratch = scratch_dir("offline_mismatch");
    let exe = build_program(&scratch);
    let debug_dir = scratch.join("debug");
    debug_dir_for(&exe, &debug_dir);
    let unnamed = record_program(&scratch, &exe, &["--no-symbolize"]);
    // Rebuilt since, at the same path, differently.
    compile(
        "inline.cpp",
        &["-O1", "-g", "-DREBUILT"],
        &scratch.join("build"),
    );
    assert_ne!(build_id_of(&exe), view_build_id(&unnamed, &exe));

    let output = scratch.join("out.pb.gz");
    let out = symbolize(
        &[&unnamed.cpu_profile_path(), Path::new("-o"), &output],
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr_text());
    let stderr = out.stderr_text();
    assert!(
        stderr.contains("is not the") && stderr.contains("that was profiled"),
        "no warning about the other build:\n{stderr}"
    );
    let view = read(&output);
    let main = mapping_of(&view, &exe);
    assert!(
        view.profile
            .location
            .iter()
            .filter(|l| l.mapping_id == main.id)
            .all(|l| l.line.is_empty()),
        "names from another build were attached:\n{}",
        view.describe()
    );
    assert!(!main.has_functions);

    // The right debug file, by build id, wins over the wrong binary.
    let out = symbolize(
        &[&unnamed.cpu_profile_path(), Path::new("-o"), &output],
        &["--force", "--debug-dir", debug_dir.to_str().unwrap()],
    );
    assert_eq!(out.code, 0, "{}", out.stderr_text());
    let view = read(&output);
    assert!(
        view.cumulative_samples().keys().any(|n| n.contains(HOT[1])),
        "{}",
        view.describe()
    );
}

fn view_build_id(rec: &Recording, exe: &Path) -> String {
    let view = rec.cpu_profile();
    view.string(mapping_of(&view, exe).build_id).to_string()
}

/// What is not a profile is refused with one message naming the file and what to pass; an
/// existing output is kept unless --force; `-o IN` names in place; a named profile keeps its
/// names.
#[test]
fn symbolize_checks_its_input_and_output() {
    let scratch = scratch_dir("offline_files");
    let exe = build_program(&scratch);
    let unnamed = record_program(&scratch, &exe, &["--no-symbolize"]);
    let input = unnamed.cpu_profile_path();
    let out_path = scratch.join("out.pb.gz");

    let text = scratch.join("notes.txt");
    std::fs::write(&text, "not a profile\n").unwrap();
    let out = symbolize(&[&text, Path::new("-o"), &out_path], &[]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr_text().contains("is not a pprof profile")
            && out.stderr_text().contains("notes.txt"),
        "{}",
        out.stderr_text()
    );
    let bytes = std::fs::read(&input).unwrap();
    let cut = scratch.join("cut.pb.gz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = symbolize(&[&cut, Path::new("-o"), &out_path], &[]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr_text().contains("cannot be decompressed"),
        "{}",
        out.stderr_text()
    );
    assert!(
        !out_path.exists(),
        "a failed run wrote {}",
        out_path.display()
    );

    std::fs::write(&out_path, "keep me").unwrap();
    let out = symbolize(&[&input, Path::new("-o"), &out_path], &[]);
    assert_eq!(out.code, 2, "{}", out.stderr_text());
    assert!(
        out.stderr_text().contains("--force"),
        "{}",
        out.stderr_text()
    );
    assert_eq!(std::fs::read(&out_path).unwrap(), b"keep me");
    let out = symbolize(&[&input, Path::new("-o"), &out_path], &["--force"]);
    assert_eq!(out.code, 0, "{}", out.stderr_text());
    let named = frames_by_location(&read(&out_path));

    // In place: the same names, nothing lost.
    let in_place = scratch.join("in_place.pb.gz");
    std::fs::copy(&input, &in_place).unwrap();
    let out = symbolize(&[&in_place, Path::new("-o"), &in_place], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr_text());
    assert_eq!(frames_by_location(&read(&in_place)), named);

    // In place, the file keeps its permissions and owner (it became 0644 and root's when
    // root named it in place).
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let private = scratch.join("private.pb.gz");
        std::fs::copy(&input, &private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&private, Some(65534), Some(65534)).unwrap();
        let out = symbolize(&[&private, Path::new("-o"), &private], &[]);
        assert_eq!(out.code, 0, "{}", out.stderr_text());
        let meta = std::fs::metadata(&private).unwrap();
        assert_eq!(
            meta.mode() & 0o7777,
            0o600,
            "named in place, its mode changed"
        );
        assert_eq!(
            (meta.uid(), meta.gid()),
            (65534, 65534),
            "its owner changed"
        );
        assert_eq!(frames_by_location(&read(&private)), named);
    }

    // Already named: said, and left as it was.
    let again = scratch.join("again.pb.gz");
    let out = symbolize(&[&out_path, Path::new("-o"), &again], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr_text());
    assert!(
        out.stderr_text().contains("already had a name"),
        "{}",
        out.stderr_text()
    );
    assert_eq!(frames_by_location(&read(&again)), named);
}

/// The daemon's equivalent: `anyprof serve --no-symbolize` serves profiles without names, with
/// the build ids that let `anyprof symbolize` name them afterwards.
#[test]
fn serve_no_symbolize_serves_profiles_that_symbolize_names() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    use anyprof_tests::daemon::{get, wait_for, Daemon};

    let scratch = scratch_dir("offline_serve");
    let exe = compile("serve_worker.c", &["-O2", "-g", "-pthread"], &scratch);
    let socket = scratch.join("sock");
    let daemon = Daemon::serve(&scratch.join("daemon.stderr"))
        .socket(&socket)
        .args(&["--no-symbolize"])
        .start();
    // serve_worker.c: 20 s, 50 % busy in serve_hot_spin, allocating in serve_alloc_site.
    let mut worker = clean_command(&exe)
        .args(["20", "50"])
        .env("LD_PRELOAD", binaries().preload)
        .env("ANYPROF_SOCKET", &socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    let _ = BufReader::new(worker.stdout.take().unwrap()).read_line(&mut ready);
    let pid: u32 = ready
        .trim()
        .strip_prefix("ready pid=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("serve_worker said {ready:?}"));
    let path = format!("/debug/pprof/heap?pid={pid}");
    let reply = wait_for(
        "a heap profile with samples",
        std::time::Duration::from_secs(15),
        || {
            let reply = get(daemon.port, &path);
            let view = (reply.status == 200)
                .then(|| anyprof::pprof::decode(&reply.body).ok())
                .flatten();
            match view {
                Some(p) if !p.sample.is_empty() => Ok(reply),
                _ => Err(format!("status {}", reply.status)),
            }
        },
    );
    let _ = worker.kill();
    let _ = worker.wait();
    let served = scratch.join("heap.pb.gz");
    std::fs::write(&served, &reply.body).unwrap();
    let view = read(&served);
    assert!(
        view.profile.function.is_empty(),
        "serve --no-symbolize served names:\n{}",
        view.describe()
    );
    assert_eq!(
        view.string(mapping_of(&view, &exe).build_id),
        build_id_of(&exe)
    );

    let output = scratch.join("heap.named.pb.gz");
    let out = symbolize(&[&served, Path::new("-o"), &output], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr_text());
    let named = read(&output);
    assert!(
        named
            .profile
            .sample
            .iter()
            .any(|s| named.frames(s).iter().any(|f| f.name == "serve_alloc_site")),
        "{}",
        named.describe()
    );
}

/// A profile names the files `anyprof symbolize` opens, so it is not trusted (review of issue
/// 15): a FIFO at a mapping's path must not block it (it did: `metadata` then a blocking
/// `open`), and a procfs file that looks regular (`/proc/kmsg`: root would read, and consume,
/// the kernel log) is not read. Each skipped mapping gets its one message; the run ends.
#[test]
fn symbolize_does_not_open_fifos_or_procfs_files_a_profile_names() {
    use anyprof::pprof::proto::{Location, Mapping, Sample, ValueType};
    use std::os::unix::ffi::OsStrExt;
    let scratch = scratch_dir("offline_hostile_paths");
    let fifo = scratch.join("fifo.so");
    let _ = std::fs::remove_file(&fifo);
    let c_fifo = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let paths = [fifo.to_str().unwrap(), "/proc/kmsg"];
    let mut profile = Profile {
        string_table: vec!["".into(), "samples".into(), "count".into()],
        ..Profile::default()
    };
    profile.sample_type.push(ValueType { r#type: 1, unit: 2 });
    for (i, path) in paths.iter().enumerate() {
        let id = i as u64 + 1;
        profile.string_table.push(path.to_string());
        profile.mapping.push(Mapping {
            id,
            memory_start: 0x10000 * id,
            memory_limit: 0x10000 * id + 0x1000,
            filename: profile.string_table.len() as i64 - 1,
            ..Mapping::default()
        });
        profile.location.push(Location {
            id,
            mapping_id: id,
            address: 0x10000 * id + 0x10,
            ..Location::default()
        });
        profile.sample.push(Sample {
            location_id: vec![id],
            value: vec![1],
            ..Sample::default()
        });
    }
    let input = scratch.join("hostile.pb.gz");
    std::fs::write(&input, anyprof::pprof::encode_gzipped(&profile)).unwrap();
    let output = scratch.join("hostile-named.pb.gz");
    let _ = std::fs::remove_file(&output);

    let mut child = clean_command(binaries().anyprof)
        .arg("symbolize")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > std::time::Duration::from_secs(20) {
            child.kill().unwrap();
            child.wait().unwrap();
            let _ = std::fs::remove_file(&fifo);
            panic!("anyprof symbolize hung on a profile that names a FIFO or /proc/kmsg");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let _ = std::fs::remove_file(&fifo);
    assert!(status.success(), "{stderr}");
    for path in paths {
        assert_eq!(
            stderr.matches(&format!("no file for {path} ")).count(),
            1,
            "not one message for {path}:\n{stderr}"
        );
    }
    assert!(output.exists());
}
