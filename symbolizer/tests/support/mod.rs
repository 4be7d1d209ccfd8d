//! Helpers for the integration tests: temporary directories, building the test programs with
//! the system C and C++ compilers, binutils, reading symbol tables, finding marked lines.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyprof_symbolizer::{Frame, Symbolized};
use object::{Object, ObjectSegment, ObjectSymbol};

/// A directory under the system temp dir, removed when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new empty directory whose name says which test made it.
    pub fn new(test: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "anyprof-symbolizer-{test}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs a tool and panics with its output if it fails.
pub fn run(program: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}; is it installed?"));
    assert!(
        output.status.success(),
        "{program} {:?} failed: {}",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Writes `source` to `dir/name` and compiles it with `compiler` (`cc` or `c++`), `-g -O2`,
/// a GNU build id and `extra` flags, into `dir/output`. The compiler runs in `dir` and is given
/// the relative name, so the DWARF file name only becomes a full path when the compilation
/// directory is joined to it.
pub fn compile(
    dir: &TempDir,
    compiler: &str,
    name: &str,
    source: &str,
    output_path: &str,
    extra: &[&str],
) -> PathBuf {
    std::fs::write(dir.join(name), source).expect("write the test program");
    let output = Command::new(compiler)
        .current_dir(dir.path())
        .args(["-g", "-O2", "-Wl,--build-id=sha1", "-o", output_path])
        .args(extra)
        .arg(name)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {compiler}: {err}; is it installed?"));
    assert!(
        output.status.success(),
        "{compiler} {name} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    dir.join(output_path)
}

/// The 1-based line of `source` that contains `// MARK: <marker>`.
pub fn marked_line(source: &str, marker: &str) -> u32 {
    let needle = format!("MARK: {marker}");
    let index = source
        .lines()
        .position(|line| line.trim_end().ends_with(&needle))
        .unwrap_or_else(|| panic!("no line marked {marker}"));
    u32::try_from(index + 1).unwrap()
}

/// A function symbol: its address and size.
#[derive(Clone, Copy, Debug)]
pub struct Symbol {
    pub address: u64,
    pub size: u64,
}

impl Symbol {
    /// Every address of the function's code.
    pub fn addresses(&self) -> Vec<u64> {
        (self.address..self.address + self.size).collect()
    }
}

/// The defined symbols of `path` by name: `.symtab` and `.dynsym`.
pub fn symbols(path: &Path) -> HashMap<String, Symbol> {
    let data = std::fs::read(path).expect("read the binary");
    let file = object::File::parse(&*data).expect("parse the binary");
    file.symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.is_definition())
        .filter_map(|s| {
            let symbol = Symbol {
                address: s.address(),
                size: s.size(),
            };
            Some((s.name().ok()?.to_owned(), symbol))
        })
        .collect()
}

/// The symbol `name` of `path`.
pub fn symbol(path: &Path, name: &str) -> Symbol {
    *symbols(path)
        .get(name)
        .unwrap_or_else(|| panic!("{} has no symbol {name}", path.display()))
}

/// The GNU build id of `path`.
pub fn build_id(path: &Path) -> Vec<u8> {
    let data = std::fs::read(path).expect("read the binary");
    let file = object::File::parse(&*data).expect("parse the binary");
    file.build_id()
        .expect("read the build id note")
        .expect("the binary has a build id")
        .to_vec()
}

/// The frames of an answer, or a panic that shows the miss.
pub fn frames(answer: &Symbolized) -> &[Frame] {
    match answer {
        Symbolized::Frames(frames) => {
            assert!(!frames.is_empty(), "Frames is never empty");
            frames
        }
        Symbolized::Miss(miss) => panic!("expected frames, got a miss: {miss}"),
    }
}

/// The file and file address of a runtime address of this test process, found with
/// `/proc/self/maps` and the program headers of the mapped file.
pub fn own_file_address(runtime: u64) -> (PathBuf, u64) {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    let (start, offset, path) = maps
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (low, high) = fields.first()?.split_once('-')?;
            let low = u64::from_str_radix(low, 16).ok()?;
            let high = u64::from_str_radix(high, 16).ok()?;
            let offset = u64::from_str_radix(fields.get(2)?, 16).ok()?;
            let path = PathBuf::from(fields.get(5)?);
            (low..high)
                .contains(&runtime)
                .then_some((low, offset, path))
        })
        .expect("the address lies in a file mapping");
    let file_offset = offset + (runtime - start);
    let data = std::fs::read(&path).expect("read the mapped file");
    let file = object::File::parse(&*data).expect("parse the mapped file");
    let segment = file
        .segments()
        .find(|s| {
            let (seg_offset, seg_size) = s.file_range();
            (seg_offset..seg_offset + seg_size).contains(&file_offset)
        })
        .expect("a segment holds the address");
    let svma = segment.address() + (file_offset - segment.file_range().0);
    (path, svma)
}
