//! Checks made before running a program, so that a program the preload cannot enter gets a
//! clear message instead of a silent empty profile.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use object::read::elf::{ElfFile64, ProgramHeader};
use object::Endianness;

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

/// True for a 64-bit ELF executable without `PT_INTERP` (nothing to load a preload).
/// Scripts and files we cannot parse are given the benefit of the doubt.
fn is_static_elf(path: &Path) -> Result<bool> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
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
