//! What is known about a program before it runs: where it is (found like `execvp` finds it),
//! and whether `libanyprof.so` can get into it at all. A program it cannot get into
//! (statically linked, another architecture than the library, or run with secure execution
//! because it is setuid, setgid or has file capabilities) still runs, exactly as without
//! anyprof; `record` says in one line why it is not profiled, or refuses it with
//! `--require-profile`.
//!
//! A script (`#!`) is judged by the interpreter that really runs, followed as the kernel
//! follows it. Files that cannot be read or parsed get the benefit of the doubt: the run then
//! tells (a process that never connects is reported at the end).

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use object::elf;
use object::read::elf::{Dyn, ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, Object, ObjectSymbol};

/// What [`check_program`] found out about a program.
#[derive(Debug)]
pub struct Program {
    /// The file that `exec` runs, resolved like `execvp` does.
    pub path: PathBuf,
    /// Why the library cannot get into it, if it cannot.
    pub unprofilable: Option<Unprofilable>,
}

/// Why a program cannot load `libanyprof.so`, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unprofilable {
    /// What stands in the way.
    pub obstacle: Obstacle,
    /// The interpreter in which the obstacle lies, when the program is a `#!` script.
    pub interpreter: Option<PathBuf>,
}

/// What keeps the library out of a program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Obstacle {
    /// No ELF interpreter (`PT_INTERP`): nothing in the process reads `LD_PRELOAD`.
    StaticallyLinked,
    /// An ELF of another class or machine than the library's: the dynamic loader cannot load
    /// the library, and says so on the program's stderr if asked to.
    OtherArchitecture {
        /// The program's, e.g. "32-bit i386".
        program: String,
        /// The library's, e.g. "64-bit x86-64".
        library: String,
    },
    /// The kernel runs it with secure execution (`AT_SECURE`): the dynamic loader ignores a
    /// `LD_PRELOAD` path (and removes the variable), and the library would only talk to a
    /// daemon run by root.
    SecureExecution(SecureCause),
}

/// Why a program runs with secure execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecureCause {
    /// Setuid to `owner`, run by `real` uid.
    Setuid { owner: u32, real: u32 },
    /// Setgid to `group`, run by `real` gid.
    Setgid { group: u32, real: u32 },
    /// File capabilities, run by a user other than root.
    Capabilities,
}

impl Unprofilable {
    /// Whether the program should still find the library in its environment. A statically
    /// linked program ignores `LD_PRELOAD` quietly and passes it on, so the dynamically
    /// linked programs it starts are profiled (a static shell, a Go program running tools).
    /// The loader of another architecture would print an error on the program's stderr, and
    /// a secure-execution loader removes the variable anyway: those run with the environment
    /// untouched.
    pub fn keeps_environment(&self) -> bool {
        self.obstacle == Obstacle::StaticallyLinked
    }

    /// What would make the program profilable, as the end of a sentence ("link it ...").
    pub fn remedy(&self) -> String {
        let target = if self.interpreter.is_some() {
            "its interpreter"
        } else {
            "it"
        };
        match &self.obstacle {
            Obstacle::StaticallyLinked => format!("link {target} dynamically"),
            Obstacle::OtherArchitecture { library, .. } => {
                format!("build {target} for {library}, like libanyprof.so")
            }
            Obstacle::SecureExecution(SecureCause::Setuid { owner, .. }) => format!(
                "run anyprof as uid {owner}, or profile a copy of {target} without the setuid bit"
            ),
            Obstacle::SecureExecution(SecureCause::Setgid { group, .. }) => format!(
                "run anyprof with gid {group}, or profile a copy of {target} without the setgid bit"
            ),
            Obstacle::SecureExecution(SecureCause::Capabilities) => format!(
                "run anyprof as root, or profile a copy of {target} without file capabilities"
            ),
        }
    }
}

/// The reason, after the program's name: "is statically linked, so ...".
impl fmt::Display for Unprofilable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subject = match &self.interpreter {
            Some(i) => format!("its interpreter {}", i.display()),
            None => "it".to_string(),
        };
        match &self.obstacle {
            Obstacle::StaticallyLinked => write!(
                f,
                "{subject} is statically linked, so LD_PRELOAD cannot load libanyprof.so into it"
            ),
            Obstacle::OtherArchitecture { program, library } => write!(
                f,
                "{subject} is a {program} program and libanyprof.so is {library}, so the dynamic \
                 loader cannot load the library into it"
            ),
            Obstacle::SecureExecution(cause) => {
                let what = match cause {
                    SecureCause::Setuid { owner, real } => {
                        format!("is setuid to uid {owner} (you are uid {real})")
                    }
                    SecureCause::Setgid { group, real } => {
                        format!("is setgid to gid {group} (you are gid {real})")
                    }
                    SecureCause::Capabilities => {
                        "has file capabilities (and you are not root)".to_string()
                    }
                };
                write!(
                    f,
                    "{subject} {what}, so it runs with secure execution and the dynamic loader \
                     ignores LD_PRELOAD for it"
                )
            }
        }
    }
}

/// Resolves `program` like `execvp` does and finds out whether `library` can be preloaded
/// into it (see [`Program`]). Fails only if there is no such program.
pub fn check_program(program: &OsStr, library: &Path) -> Result<Program> {
    let path = resolve(program).with_context(|| {
        format!(
            "cannot run {}: no such program (not a path, and not found in PATH)",
            program.to_string_lossy()
        )
    })?;
    std::fs::metadata(&path).with_context(|| format!("cannot run {}", path.display()))?;
    let unprofilable = obstacle_of(&path, library);
    Ok(Program { path, unprofilable })
}

/// How many `#!` interpreters the kernel follows (its `BINPRM_MAX_RECURSION`, counting the
/// program itself).
const MAX_INTERPRETERS: usize = 5;

/// The first bytes of a file that [`obstacle_of`] reads: enough for the ELF header and the
/// program headers of any ordinary executable, and for a `#!` line (the kernel reads 256).
const HEAD_BYTES: u64 = 64 * 1024;

/// Why `library` cannot get into the process that runs `path`, if it cannot.
fn obstacle_of(path: &Path, library: &Path) -> Option<Unprofilable> {
    let mut file = path.to_path_buf();
    let mut interpreter: Option<PathBuf> = None;
    for _ in 0..MAX_INTERPRETERS {
        let found = |obstacle| {
            Some(Unprofilable {
                obstacle,
                interpreter: interpreter.clone(),
            })
        };
        // The kernel takes setuid, setgid and capabilities from the file it finally maps:
        // the interpreter of a script (whose own setuid bit it ignores). That needs no read
        // access, which a setuid program may not give (mode 4711).
        let head = read_head(&file).ok();
        if let Some(next) = head.as_deref().and_then(shebang_interpreter) {
            file = next.clone();
            interpreter = Some(next);
            continue;
        }
        if let Some(cause) = secure_execution_cause(&file) {
            return found(Obstacle::SecureExecution(cause));
        }
        // A file we cannot read (mode --x) may still run: benefit of the doubt.
        let mut program = elf_facts(&head?)?;
        let is_static = match program.is_static() {
            Some(s) => s,
            None => {
                // The dynamic section lies further in (the loader itself is a large file).
                program = elf_facts(&read_regular_file(&file).ok()?)?;
                program.is_static()?
            }
        };
        if is_static {
            return found(Obstacle::StaticallyLinked);
        }
        let lib = read_head(library).ok().and_then(|h| elf_facts(&h))?;
        if (program.class_64, program.machine) != (lib.class_64, lib.machine) {
            return found(Obstacle::OtherArchitecture {
                program: program.architecture(),
                library: lib.architecture(),
            });
        }
        return None;
    }
    None
}

/// The interpreter named by a `#!` line, as the kernel reads it: the first word after `#!`
/// (a relative name is taken from the current directory, as the kernel does).
fn shebang_interpreter(head: &[u8]) -> Option<PathBuf> {
    let line = head.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let word = line
        .split(|&b| b == b' ' || b == b'\t')
        .find(|w| !w.is_empty())?;
    Some(PathBuf::from(OsStr::from_bytes(word)))
}

/// Why the kernel would run `path` with secure execution, if it would.
fn secure_execution_cause(path: &Path) -> Option<SecureCause> {
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.mode();
    if mode & 0o6000 == 0 && !has_file_capabilities(path) {
        return None;
    }
    if privileges_ignored(path) {
        return None;
    }
    // SAFETY: getuid and getgid cannot fail.
    let (real_uid, real_gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if mode & 0o4000 != 0 && meta.uid() != real_uid {
        return Some(SecureCause::Setuid {
            owner: meta.uid(),
            real: real_uid,
        });
    }
    if mode & 0o2000 != 0 && meta.gid() != real_gid {
        return Some(SecureCause::Setgid {
            group: meta.gid(),
            real: real_gid,
        });
    }
    // Root has every capability already: the file's add none, and no secure execution.
    if real_uid != 0 && has_file_capabilities(path) {
        return Some(SecureCause::Capabilities);
    }
    None
}

/// True if the kernel ignores setuid, setgid and capabilities for `path`: it is on a
/// `nosuid` mount, or this process (and so the program) has `no_new_privs`.
fn privileges_ignored(path: &Path) -> bool {
    // SAFETY: PR_GET_NO_NEW_PRIVS takes no pointer and returns 0 or 1.
    if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } == 1 {
        return true;
    }
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut st) };
    rc == 0 && st.f_flag & libc::ST_NOSUID != 0
}

/// True if `path` carries file capabilities (the `security.capability` attribute).
fn has_file_capabilities(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: both strings are NUL-terminated; a null buffer of size 0 asks for the size only.
    let size = unsafe {
        libc::getxattr(
            c_path.as_ptr(),
            c"security.capability".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    size > 0
}

/// What [`obstacle_of`] needs from an ELF header.
struct ElfFacts {
    class_64: bool,
    machine: u16,
    file_type: elf::FileType,
    has_interp: bool,
    dynamic: Dynamic,
}

/// What the dynamic section says about the file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dynamic {
    /// No `PT_DYNAMIC`.
    Absent,
    /// It lies beyond the bytes read.
    Unread,
    /// Whether it names the file (`DT_SONAME`): a shared object does, a static-pie does not.
    Read { has_soname: bool },
}

impl ElfFacts {
    /// Whether nothing in a process of this file would read `LD_PRELOAD`: an executable
    /// without an interpreter (`PT_INTERP`) — a static executable, or a static-pie (position
    /// independent, with a dynamic section but no `DT_SONAME`). A shared object run directly
    /// (the dynamic loader itself, which does read `LD_PRELOAD`) is not. `None` when the
    /// dynamic section must be read to tell.
    fn is_static(&self) -> Option<bool> {
        if self.has_interp {
            return Some(false);
        }
        match (self.file_type, self.dynamic) {
            (elf::ET_EXEC, _) => Some(true),
            (elf::ET_DYN, Dynamic::Read { has_soname }) => Some(!has_soname),
            (elf::ET_DYN, Dynamic::Unread) => None,
            _ => Some(false),
        }
    }

    /// "64-bit x86-64", "32-bit i386".
    fn architecture(&self) -> String {
        let name = match elf::Machine(self.machine) {
            elf::EM_386 => "i386".to_string(),
            elf::EM_X86_64 => "x86-64".to_string(),
            elf::EM_AARCH64 => "aarch64".to_string(),
            elf::EM_ARM => "arm".to_string(),
            elf::EM_RISCV => "riscv".to_string(),
            elf::EM_PPC64 => "ppc64".to_string(),
            elf::EM_S390 => "s390".to_string(),
            other => format!("{other}"),
        };
        format!("{}-bit {name}", if self.class_64 { 64 } else { 32 })
    }
}

/// The facts of the ELF file whose first bytes are `head`; `None` if it is not ELF, or not
/// one we can read (then we do not judge it).
fn elf_facts(head: &[u8]) -> Option<ElfFacts> {
    if !head.starts_with(&elf::ELFMAG) {
        return None;
    }
    match elf::FileClass(*head.get(4)?) {
        elf::ELFCLASS64 => facts_of::<elf::FileHeader64<Endianness>>(head),
        elf::ELFCLASS32 => facts_of::<elf::FileHeader32<Endianness>>(head),
        _ => None,
    }
}

fn facts_of<H: FileHeader<Endian = Endianness>>(data: &[u8]) -> Option<ElfFacts> {
    let header = H::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let headers = header.program_headers(endian, data).ok()?;
    let mut dynamic = Dynamic::Absent;
    for ph in headers
        .iter()
        .filter(|ph| ph.p_type(endian) == elf::PT_DYNAMIC)
    {
        dynamic = match ph.dynamic(endian, data) {
            Ok(Some(entries)) => Dynamic::Read {
                has_soname: entries.iter().any(|d| d.d_tag(endian) == elf::DT_SONAME),
            },
            _ => Dynamic::Unread,
        };
    }
    Some(ElfFacts {
        class_64: header.is_class_64(),
        machine: header.e_machine(endian).0,
        file_type: header.e_type(endian),
        has_interp: headers.iter().any(|ph| ph.p_type(endian) == elf::PT_INTERP),
        dynamic,
    })
}

/// The first [`HEAD_BYTES`] of the regular file at `path`, opened without blocking.
fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = open_regular_file(path)?;
    let mut data = Vec::new();
    file.take(HEAD_BYTES).read_to_end(&mut data)?;
    Ok(data)
}

fn resolve(program: &OsStr) -> Option<PathBuf> {
    let p = Path::new(program);
    if p.components().count() > 1 || program.to_string_lossy().contains('/') {
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(p)).find(|c| {
        std::fs::metadata(c)
            .map(|m| m.is_file() && m.mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// The regular file at `path`, opened without blocking: a FIFO put where the program was
/// found (after the checks of [`resolve`]) is refused instead of hanging.
fn open_regular_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}

/// The contents of the regular file at `path` (see [`open_regular_file`]).
fn read_regular_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    open_regular_file(path)?.read_to_end(&mut data)?;
    Ok(data)
}

/// Allocators that a program can link in under prefixed names, so that its allocations never
/// reach `malloc` and so never reach the preload: (defined symbol, what it is).
const PREFIXED_ALLOCATORS: &[(&str, &str)] = &[
    (
        "_rjem_malloc",
        "jemalloc as a Rust global allocator (tikv-jemallocator)",
    ),
    (
        "_rjem_mallocx",
        "jemalloc as a Rust global allocator (tikv-jemallocator)",
    ),
    ("je_malloc", "jemalloc, built with the je_ prefix"),
    ("je_mallocx", "jemalloc, built with the je_ prefix"),
    ("mi_malloc", "mimalloc"),
    ("mi_malloc_aligned", "mimalloc"),
    ("sn_rust_alloc", "snmalloc as a Rust global allocator"),
    ("rpmalloc", "rpmalloc"),
];

/// If the executable at `path` has an allocator of its own under prefixed names (see
/// [`PREFIXED_ALLOCATORS`]), a warning saying that its allocations are not in the heap
/// profile. An executable that defines `malloc` itself is left to the preload, which sees at
/// start that `malloc` is answered before it and says so.
pub fn prefixed_allocator_warning(path: &Path) -> Option<String> {
    let data = read_regular_file(path).ok()?;
    let elf = ElfFile64::<Endianness>::parse(data.as_slice()).ok()?;
    let mut found = None;
    for sym in elf.symbols().chain(elf.dynamic_symbols()) {
        let Some(name) = sym.is_definition().then(|| sym.name_bytes().ok()).flatten() else {
            continue;
        };
        if name == b"malloc" {
            return None;
        }
        if found.is_none() {
            found = PREFIXED_ALLOCATORS
                .iter()
                .find(|(n, _)| n.as_bytes() == name)
                .copied();
        }
    }
    let (symbol, what) = found?;
    Some(format!(
        "{} has an allocator of its own, {what} (it defines {symbol}): memory it hands out does \
         not go through malloc, so it is missing from the heap profile and the allocator \
         counters. To profile the heap of a Rust program, build it with the System allocator \
         (no #[global_allocator]).",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in the temp directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> TempFile {
            let path = std::env::temp_dir()
                .join(format!("anyprof-preflight-{}-{name}", std::process::id()));
            std::fs::write(&path, contents).expect("writing a temp file");
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A minimal little-endian ELF32 header of `e_type` for `machine`, with one program
    /// header of type `p_type`.
    fn elf32(e_type: u16, machine: u16, p_type: u32) -> Vec<u8> {
        let mut b = vec![0x7f, b'E', b'L', b'F', 1, 1, 1, 0];
        b.resize(16, 0);
        b.extend_from_slice(&e_type.to_le_bytes());
        b.extend_from_slice(&machine.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes()); // e_version
        b.extend_from_slice(&0x8048000u32.to_le_bytes()); // e_entry
        b.extend_from_slice(&52u32.to_le_bytes()); // e_phoff
        b.extend_from_slice(&0u32.to_le_bytes()); // e_shoff
        b.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        for half in [52u16, 32, 1, 40, 0, 0] {
            // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
            b.extend_from_slice(&half.to_le_bytes());
        }
        for word in [p_type, 84, 0, 0, 19, 19, 4, 1] {
            b.extend_from_slice(&word.to_le_bytes());
        }
        b.extend_from_slice(b"/lib/ld-linux.so.2\0");
        b
    }

    #[test]
    fn a_dynamic_executable_of_our_architecture_is_profilable() {
        let me = std::env::current_exe().expect("test binary path");
        assert_eq!(obstacle_of(&me, &me), None);
    }

    #[test]
    fn a_32_bit_program_is_another_architecture() {
        let me = std::env::current_exe().expect("test binary path");
        let program = TempFile::new("elf32", &elf32(2, 3, 3));
        let found = obstacle_of(&program.0, &me).expect("a 32-bit program is unprofilable");
        assert_eq!(
            found.obstacle,
            Obstacle::OtherArchitecture {
                program: "32-bit i386".into(),
                library: "64-bit x86-64".into()
            }
        );
        assert!(
            !found.keeps_environment(),
            "its loader would complain on stderr"
        );
        let text = found.to_string();
        assert!(
            text.contains("32-bit i386") && text.contains("64-bit x86-64"),
            "{text}"
        );
    }

    #[test]
    fn a_32_bit_static_program_is_statically_linked() {
        let me = std::env::current_exe().expect("test binary path");
        let program = TempFile::new("elf32-static", &elf32(2, 3, 1)); // PT_LOAD only
        let found = obstacle_of(&program.0, &me).expect("unprofilable");
        assert_eq!(found.obstacle, Obstacle::StaticallyLinked);
        assert!(found.keeps_environment(), "its children may be profiled");
    }

    #[test]
    fn a_script_is_judged_by_its_interpreter() {
        let me = std::env::current_exe().expect("test binary path");
        let interpreter = TempFile::new("interp", &elf32(2, 3, 1));
        let script = TempFile::new(
            "script",
            format!("#!{} -x\necho hi\n", interpreter.0.display()).as_bytes(),
        );
        let found = obstacle_of(&script.0, &me).expect("unprofilable");
        assert_eq!(found.obstacle, Obstacle::StaticallyLinked);
        assert_eq!(found.interpreter.as_deref(), Some(interpreter.0.as_path()));
        assert!(found.to_string().starts_with("its interpreter "), "{found}");
        assert!(
            found.remedy().contains("its interpreter"),
            "{}",
            found.remedy()
        );
        // A script of a dynamic interpreter is profilable.
        let sh = TempFile::new("sh-script", b"#!/bin/sh\ntrue\n");
        assert_eq!(obstacle_of(&sh.0, &me), None);
    }

    #[test]
    fn the_shebang_line_names_the_first_word() {
        assert_eq!(
            shebang_interpreter(b"#! /usr/bin/env  python3\n"),
            Some(PathBuf::from("/usr/bin/env"))
        );
        assert_eq!(
            shebang_interpreter(b"#!/bin/sh"),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(shebang_interpreter(b"#!\n"), None);
        assert_eq!(shebang_interpreter(b"\x7fELF"), None);
    }

    #[test]
    fn the_dynamic_loader_run_as_a_program_is_not_static() {
        // It has no interpreter, like a static-pie, but names itself (DT_SONAME) and reads
        // LD_PRELOAD: `ld.so ./prog` is profilable.
        let me = std::env::current_exe().expect("test binary path");
        for ld in ["/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1"] {
            let ld = Path::new(ld);
            if ld.exists() {
                assert_eq!(obstacle_of(ld, &me), None, "{}", ld.display());
            }
        }
    }

    #[test]
    fn secure_execution_says_who_and_what_to_do() {
        let found = Unprofilable {
            obstacle: Obstacle::SecureExecution(SecureCause::Setuid {
                owner: 0,
                real: 65534,
            }),
            interpreter: None,
        };
        let text = found.to_string();
        assert!(
            text.contains("setuid to uid 0 (you are uid 65534)"),
            "{text}"
        );
        assert!(
            found.remedy().contains("run anyprof as uid 0"),
            "{}",
            found.remedy()
        );
        assert!(!found.keeps_environment());
    }

    #[test]
    fn an_ordinary_executable_has_no_prefixed_allocator() {
        // This test binary allocates through Rust's System allocator, i.e. malloc.
        let me = std::env::current_exe().expect("test binary path");
        assert_eq!(prefixed_allocator_warning(&me), None);
    }
}
