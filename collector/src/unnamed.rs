//! What the profiles and the exit summary say about code that got no function name.
//!
//! A frame the symbolizer could not name (a stripped executable's own functions, a library's
//! internal functions when only `.dynsym` is left, the vdso, code whose file is gone) is named
//! `MODULE+0xADDR` ([`frame`]), where `MODULE` is the file name of the object and `ADDR` the
//! address as stated in the ELF file: the address `addr2line -e FILE`, `objdump
//! --start-address` and gdb take for that file, and the one `perf report` prints for an
//! unnamed address of an ordinary object (whose executable segment starts at the same
//! offset in the file and in memory). Samples in the same instruction still group together,
//! and the name can be fed back to those tools once debug information is found.
//!
//! [`format_missing_names`] is the part of the exit summary that says which modules lacked
//! names for a material share of the CPU time, and how to get the names: the Debian package of
//! debug symbols (found with `dpkg-query -S`), `DEBUGINFOD_URLS`, or building with `-g`.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyprof_symbolizer::FileAddress;

use crate::pprof::builder::FrameLine;
use crate::pprof::Profile;

/// A module is mentioned in the summary when code of it without names was the leaf of more
/// than this share of the CPU time.
pub const MATERIAL_SHARE: f64 = 0.05;

/// The frame of an address of the module at `path` that has no name: `MODULE+0xADDR`.
pub fn frame(path: &[u8], address: FileAddress) -> FrameLine {
    let name = format!(
        "{}+{:#x}",
        base_name(&String::from_utf8_lossy(path)),
        address.0
    );
    FrameLine {
        system_name: name.clone(),
        name,
        file: String::new(),
        line: 0,
    }
}

/// Whether `lines` is the single frame [`frame`] makes.
pub fn is_fallback(lines: &[FrameLine]) -> bool {
    match lines {
        [only] => only.file.is_empty() && split_name(&only.name).is_some(),
        _ => false,
    }
}

/// The module and address of a `MODULE+0xADDR` name.
pub fn split_name(name: &str) -> Option<(&str, u64)> {
    let (module, hex) = name.rsplit_once("+0x")?;
    if module.is_empty() || hex.is_empty() {
        return None;
    }
    Some((module, u64::from_str_radix(hex, 16).ok()?))
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Share of the CPU time (sample value `cpu`, or the first value) whose leaf frame was looked
/// up and has no name (a [`frame`] name), by module file (the mapping's path), largest first.
pub fn unnamed_leaf_shares(profile: &Profile) -> Vec<(String, f64)> {
    let string = |i: i64| {
        profile
            .string_table
            .get(usize::try_from(i).unwrap_or(usize::MAX))
            .map(String::as_str)
            .unwrap_or("")
    };
    let index = profile
        .sample_type
        .iter()
        .position(|t| string(t.r#type) == "cpu")
        .unwrap_or(0);
    let functions: BTreeMap<u64, &str> = profile
        .function
        .iter()
        .map(|f| (f.id, string(f.name)))
        .collect();
    let locations: BTreeMap<u64, _> = profile.location.iter().map(|l| (l.id, l)).collect();
    let mappings: BTreeMap<u64, &str> = profile
        .mapping
        .iter()
        .map(|m| (m.id, string(m.filename)))
        .collect();
    let mut total = 0i64;
    let mut unnamed: BTreeMap<&str, i64> = BTreeMap::new();
    for sample in &profile.sample {
        let value = sample.value.get(index).copied().unwrap_or(0);
        total = total.saturating_add(value);
        let Some(leaf) = sample.location_id.first().and_then(|id| locations.get(id)) else {
            continue;
        };
        let Some(path) = mappings.get(&leaf.mapping_id).filter(|p| !p.is_empty()) else {
            continue;
        };
        let leaf_name = leaf
            .line
            .first()
            .and_then(|l| functions.get(&l.function_id))
            .copied();
        // Only a fallback name says "looked up, nothing found". A location without lines
        // was not looked up (`--no-symbolize`, or symbolizing given up at exit): debug
        // packages would not change that, so it is not counted.
        if leaf_name.is_some_and(|n| split_name(n).is_some()) {
            let v = unnamed.entry(path).or_default();
            *v = v.saturating_add(value);
        }
    }
    if total <= 0 {
        return Vec::new();
    }
    let mut shares: Vec<(String, f64)> = unnamed
        .into_iter()
        .map(|(path, v)| (path.to_string(), v as f64 / total as f64))
        .collect();
    shares.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    shares
}

/// The exit summary's lines about modules whose code without names took more than
/// [`MATERIAL_SHARE`] of the CPU time: one line per module with the way to get its names.
/// Empty when there are none.
pub fn format_missing_names(profile: &Profile) -> String {
    let material: Vec<(String, f64)> = unnamed_leaf_shares(profile)
        .into_iter()
        .filter(|(_, share)| *share > MATERIAL_SHARE)
        .collect();
    if material.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "anyprof: no function names for code that took {:.0}% of the CPU time (shown as \
         FILE+0xADDR, the address in the file that addr2line -e FILE takes):",
        100.0 * material.iter().map(|(_, s)| s).sum::<f64>()
    );
    let debuginfod = std::env::var_os("DEBUGINFOD_URLS").filter(|v| !v.is_empty());
    // Package managers can wait on a lock (rpmdb) for long: the summary never does.
    let deadline = Instant::now() + PACKAGE_QUERY_TIME;
    let system = System::detect();
    for (path, share) in &material {
        let _ = writeln!(
            out,
            "  {:>5.1}%  {}: {}",
            100.0 * share,
            base_name(path),
            how_to_get_names(Path::new(path), debuginfod.is_some(), &system, deadline)
        );
    }
    out
}

/// What to do to get the names of the module at `path` on `system`.
fn how_to_get_names(
    path: &Path,
    debuginfod_set: bool,
    system: &System,
    deadline: Instant,
) -> String {
    let debuginfod = match (debuginfod_set, system.debuginfod_server) {
        (true, _) => "; DEBUGINFOD_URLS gave no debug file for it".to_string(),
        (false, Some(server)) => format!(", or set DEBUGINFOD_URLS={server}"),
        (false, None) => ", or set DEBUGINFOD_URLS to a debuginfod server".to_string(),
    };
    if path.as_os_str().as_encoded_bytes().starts_with(b"[") {
        return "code without a file (the vdso, or code made at run time), which has no names \
                to read"
            .to_string();
    }
    if !path.is_absolute() || !path.is_file() {
        return "its file could not be read (gone, or not a file), so no names can be found"
            .to_string();
    }
    match owner(path, deadline) {
        Owner::Deb(package) => format!(
            "install {} (from {}){debuginfod}",
            debug_package(&package),
            system.debug_archive
        ),
        Owner::Rpm(package) => {
            format!("run dnf debuginfo-install {package}{debuginfod}")
        }
        Owner::None => format!(
            "not from a package: build it with -g and do not strip it, or put its debug file \
             in /usr/lib/debug/.build-id{debuginfod}"
        ),
        Owner::Unknown => format!("install its package's debug symbols{debuginfod}"),
    }
}

/// What the distribution calls its debug packages and debuginfod server, from
/// `/etc/os-release`.
struct System {
    debug_archive: &'static str,
    debuginfod_server: Option<&'static str>,
}

impl System {
    fn detect() -> System {
        let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        let id = release
            .lines()
            .find_map(|l| l.strip_prefix("ID="))
            .map(|v| v.trim_matches('"'))
            .unwrap_or("");
        match id {
            "ubuntu" => System {
                debug_archive: "ddebs.ubuntu.com",
                debuginfod_server: Some("https://debuginfod.ubuntu.com"),
            },
            "debian" => System {
                debug_archive: "the debian-debug archive",
                debuginfod_server: Some("https://debuginfod.debian.net"),
            },
            "fedora" => System {
                debug_archive: "the debuginfo repositories",
                debuginfod_server: Some("https://debuginfod.fedoraproject.org"),
            },
            _ => System {
                debug_archive: "the distribution's debug archive",
                debuginfod_server: None,
            },
        }
    }
}

/// The Debian package of debug symbols for the binary package `package`: `libc6-dbg` for
/// glibc, `<package>-dbgsym` (the automatic debug packages) for everything else.
pub fn debug_package(package: &str) -> String {
    match package {
        "libc6" | "libc6-dev" | "libc-bin" => "libc6-dbg".to_string(),
        _ => format!("{package}-dbgsym"),
    }
}

/// Who installed a file.
enum Owner {
    /// A Debian package (without its architecture).
    Deb(String),
    /// An RPM package.
    Rpm(String),
    /// The package manager knows no package with that file.
    None,
    /// No package manager we know of answered.
    Unknown,
}

/// How long the exit summary waits for package managers, for all its modules together.
const PACKAGE_QUERY_TIME: Duration = Duration::from_secs(2);

/// Runs `program` with `args`, returning its exit status and standard output, unless it is
/// still running at `deadline`: then it is killed and `None` returned (as when it cannot be
/// started).
fn run_until(program: &str, args: &[&OsStr], deadline: Instant) -> Option<(bool, Vec<u8>)> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // Read in a thread, so a child that fills the pipe still finishes.
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ =
            std::io::Read::read_to_end(&mut std::io::Read::take(&mut stdout, 1 << 20), &mut out);
        out
    });
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some((status.success(), reader.join().ok()?)),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// `path` as a `dpkg-query -S` pattern that matches only itself: dpkg-query takes shell
/// glob patterns (`*`, `?`, `[`), escaped with a backslash.
fn dpkg_pattern(path: &Path) -> OsString {
    let mut out = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
    OsString::from_vec(out)
}

/// The package that owns the file at `path` (as the loader named it, or as it resolves
/// through symlinks and the merged /usr): `dpkg-query -S`, else `rpm -qf`; `Unknown` once
/// `deadline` has passed.
fn owner(path: &Path, deadline: Instant) -> Owner {
    let mut candidates: Vec<PathBuf> = vec![path.to_path_buf()];
    if let Ok(real) = std::fs::canonicalize(path) {
        candidates.push(real);
    }
    for candidate in candidates.clone() {
        let text = candidate.to_string_lossy().into_owned();
        match text.strip_prefix("/usr") {
            Some(rest) if rest.starts_with('/') => candidates.push(PathBuf::from(rest)),
            _ => candidates.push(PathBuf::from(format!("/usr{text}"))),
        }
    }
    candidates.dedup();
    let mut answered = false;
    for candidate in &candidates {
        let pattern = dpkg_pattern(candidate);
        let Some((success, stdout)) =
            run_until("dpkg-query", &[OsStr::new("-S"), &pattern], deadline)
        else {
            break;
        };
        answered = true;
        if success {
            if let Some(package) = parse_dpkg_search(&String::from_utf8_lossy(&stdout)) {
                return Owner::Deb(package);
            }
        }
    }
    if answered {
        return Owner::None;
    }
    for candidate in &candidates {
        let args = [
            OsStr::new("-qf"),
            OsStr::new("--queryformat"),
            OsStr::new("%{NAME}\n"),
            candidate.as_os_str(),
        ];
        let Some((success, stdout)) = run_until("rpm", &args, deadline) else {
            return Owner::Unknown;
        };
        if success {
            let text = String::from_utf8_lossy(&stdout);
            if let Some(package) = text.lines().next().filter(|l| !l.is_empty()) {
                return Owner::Rpm(package.to_string());
            }
        }
    }
    Owner::None
}

/// The first package of `dpkg-query -S` output (`liblzma5:amd64: /lib/.../liblzma.so.5`).
fn parse_dpkg_search(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| !l.starts_with("diversion ") && l.contains(": "))?;
    let (packages, _) = line.split_once(": ")?;
    let first = packages.split(',').next()?.trim();
    let name = first.split(':').next()?.trim();
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pprof::proto::{Function, Line, Location, Mapping, Sample, ValueType};

    #[test]
    fn fallback_names_carry_module_and_file_address() {
        let f = frame(
            b"/usr/lib/x86_64-linux-gnu/liblzma.so.5",
            FileAddress(0x1a2b3),
        );
        assert_eq!(f.name, "liblzma.so.5+0x1a2b3");
        assert_eq!(f.system_name, f.name);
        assert!(is_fallback(std::slice::from_ref(&f)));
        assert_eq!(split_name(&f.name), Some(("liblzma.so.5", 0x1a2b3)));
        assert_eq!(split_name("operator+"), None);
        assert_eq!(split_name("+0x10"), None);
        assert_eq!(split_name("a+0xzz"), None);
    }

    #[test]
    fn dpkg_output_gives_the_package_without_architecture() {
        assert_eq!(
            parse_dpkg_search("liblzma5:amd64: /lib/x86_64-linux-gnu/liblzma.so.5\n").as_deref(),
            Some("liblzma5")
        );
        assert_eq!(
            parse_dpkg_search("coreutils: /usr/bin/sort\n").as_deref(),
            Some("coreutils")
        );
        assert_eq!(
            parse_dpkg_search("diversion by x from: /a\nfoo, bar: /a\n").as_deref(),
            Some("foo")
        );
        assert_eq!(parse_dpkg_search(""), None);
        assert_eq!(debug_package("libc6"), "libc6-dbg");
        assert_eq!(debug_package("liblzma5"), "liblzma5-dbgsym");
    }

    /// A path is asked about as itself, not as a glob pattern that names other packages'
    /// files; a package manager that hangs (an rpmdb lock) is killed at the deadline.
    #[test]
    fn package_queries_are_literal_and_bounded_in_time() {
        assert_eq!(
            dpkg_pattern(Path::new("/opt/a*b?[c]\\d")),
            OsString::from("/opt/a\\*b\\?\\[c\\]\\\\d")
        );
        if Command::new("dpkg-query").arg("--version").output().is_ok() {
            let far = Instant::now() + Duration::from_secs(30);
            let glob = Path::new("/usr/bin/s*");
            assert!(matches!(owner(glob, far), Owner::None));
        }
        let start = Instant::now();
        let deadline = start + Duration::from_millis(200);
        assert!(run_until("sleep", &[OsStr::new("30")], deadline).is_none());
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(matches!(
            owner(Path::new("/usr/bin/sort"), start),
            Owner::Unknown
        ));
    }

    /// A CPU profile with a named, an unnamed and a not looked-up leaf: only the unnamed one
    /// counts.
    #[test]
    fn summary_lists_modules_whose_unnamed_code_is_material() {
        let strings: Vec<String> = [
            "",
            "samples",
            "count",
            "cpu",
            "nanoseconds",
            "/nonexistent/libnone.so.1",
            "libnone.so.1+0x10",
            "named",
            "/nonexistent/prog",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let profile = Profile {
            sample_type: vec![
                ValueType { r#type: 1, unit: 2 },
                ValueType { r#type: 3, unit: 4 },
            ],
            mapping: vec![
                Mapping {
                    id: 1,
                    filename: 5,
                    ..Default::default()
                },
                Mapping {
                    id: 2,
                    filename: 8,
                    ..Default::default()
                },
            ],
            function: vec![
                Function {
                    id: 1,
                    name: 6,
                    system_name: 6,
                    ..Default::default()
                },
                Function {
                    id: 2,
                    name: 7,
                    system_name: 7,
                    ..Default::default()
                },
            ],
            location: vec![
                Location {
                    id: 1,
                    mapping_id: 1,
                    address: 0x1010,
                    line: vec![Line {
                        function_id: 1,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                Location {
                    id: 3,
                    mapping_id: 1,
                    address: 0x1020,
                    ..Default::default()
                },
                Location {
                    id: 2,
                    mapping_id: 2,
                    address: 0x2000,
                    line: vec![Line {
                        function_id: 2,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
            sample: vec![
                Sample {
                    location_id: vec![1, 2],
                    value: vec![1, 30],
                    ..Default::default()
                },
                Sample {
                    location_id: vec![2],
                    value: vec![1, 70],
                    ..Default::default()
                },
                // Not looked up (--no-symbolize): not "missing names".
                Sample {
                    location_id: vec![3],
                    value: vec![1, 100],
                    ..Default::default()
                },
            ],
            string_table: strings,
            ..Default::default()
        };
        let shares = unnamed_leaf_shares(&profile);
        assert_eq!(shares.len(), 1);
        assert_eq!(shares[0].0, "/nonexistent/libnone.so.1");
        assert!((shares[0].1 - 0.15).abs() < 1e-9, "{shares:?}");
        let text = format_missing_names(&profile);
        assert!(text.contains("15%"), "{text}");
        assert!(
            text.contains("libnone.so.1: its file could not be read"),
            "{text}"
        );
    }
}
