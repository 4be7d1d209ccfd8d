//! Checks made before running a program, so that a program the preload cannot enter gets a
//! clear message instead of a silent empty profile.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Endianness, Object, ObjectSymbol};

/// Resolves `program` like `execvp` does and checks that `LD_PRELOAD` can work on it.
/// Returns the resolved path.
pub fn check_program(program: &OsStr) -> Result<PathBuf> {
    let path = resolve(program).with_context(|| {
        format!(
            "cannot run {}: no such program (not a path, and not found in PATH)",
            program.to_string_lossy()
        )
    })?;
    let meta =
        std::fs::metadata(&path).with_context(|| format!("cannot run {}", path.display()))?;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.mode() & 0o4000 != 0 && meta.uid() != euid && euid != 0 {
        bail!(
            "{} is setuid: the dynamic loader ignores LD_PRELOAD for it, so it cannot be profiled \
             (run anyprof as its owner, or profile a copy without the setuid bit)",
            path.display()
        );
    }
    if is_static_elf(&path)? {
        bail!(
            "{} is statically linked: LD_PRELOAD cannot load libanyprof.so into it \
             (link it dynamically to profile it)",
            path.display()
        );
    }
    Ok(path)
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

/// The contents of the regular file at `path`, opened once without blocking: a FIFO put where
/// the program was found (after the checks of [`resolve`]) is refused instead of hanging.
fn read_regular_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    Ok(data)
}

/// True for a 64-bit ELF executable without `PT_INTERP` (nothing to load a preload).
/// Scripts and files we cannot parse are given the benefit of the doubt.
fn is_static_elf(path: &Path) -> Result<bool> {
    let data =
        read_regular_file(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !data.starts_with(b"\x7fELF") {
        return Ok(false);
    }
    let Ok(elf) = ElfFile64::<Endianness>::parse(data.as_slice()) else {
        return Ok(false);
    };
    let endian = elf.endian();
    let has_interp = elf
        .elf_program_headers()
        .iter()
        .any(|ph| ph.p_type(endian) == object::elf::PT_INTERP);
    let has_dynamic = elf
        .elf_program_headers()
        .iter()
        .any(|ph| ph.p_type(endian) == object::elf::PT_DYNAMIC);
    // A static-pie has PT_DYNAMIC but no interpreter; a shared library run directly has
    // neither requirement, so only the missing interpreter on an executable counts.
    let is_exec = matches!(
        elf.elf_header().e_type.get(endian),
        object::elf::ET_EXEC | object::elf::ET_DYN
    );
    Ok(is_exec
        && !has_interp
        && (elf.elf_header().e_type.get(endian) == object::elf::ET_EXEC || has_dynamic))
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

    #[test]
    fn an_ordinary_executable_has_no_prefixed_allocator() {
        // This test binary allocates through Rust's System allocator, i.e. malloc.
        let me = std::env::current_exe().expect("test binary path");
        assert_eq!(prefixed_allocator_warning(&me), None);
    }
}
