//! Finding separate debug files, where distributions and `objcopy --only-keep-debug` put them.
//!
//! The places are gdb's, in gdb's order:
//!
//! 1. by build id: `<debug dir>/.build-id/<first byte in hex>/<other bytes in hex>.debug`;
//! 2. by `.gnu_debuglink` name: next to the object, in `.debug/` beside it, and under
//!    `<debug dir>/<the object's directory>/` (the directory both as given and with symlinks
//!    resolved, since `/lib` is often a link to `/usr/lib`).
//!
//! A candidate is used when it is an ELF file other than the object itself and, when both have
//! a build id, the ids are equal. The debuglink CRC is not checked: it would mean reading the
//! whole debug file, and the build id is the stronger check where there is one.
//!
//! DWARF compressed with `dwz` refers into a supplementary file named by `.gnu_debugaltlink`;
//! it is found next to the debug file or by its build id, and must carry that build id.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::elf::{self, AltLink, ElfFacts};
use crate::mmap::{FileIdentity, MappedFile};

/// A separate debug file that belongs to an object.
pub(crate) struct DebugFile {
    pub(crate) path: PathBuf,
    pub(crate) map: MappedFile,
    pub(crate) facts: ElfFacts,
}

/// Looks for the debug file of the object at `object_path`, whose own facts are `facts`.
pub(crate) fn find(
    object_path: &Path,
    object: FileIdentity,
    facts: &ElfFacts,
    debug_dirs: &[PathBuf],
) -> Option<DebugFile> {
    candidates(object_path, facts, debug_dirs)
        .into_iter()
        .find_map(|path| accept(path, object, facts.build_id.as_deref()))
}

/// Looks for the supplementary (`dwz`) file named by `altlink` in the debug data read from
/// `dwarf_path`.
pub(crate) fn find_supplementary(
    dwarf_path: &Path,
    altlink: &AltLink,
    debug_dirs: &[PathBuf],
) -> Option<MappedFile> {
    let mut candidates = Vec::new();
    let name = Path::new(OsStr::from_bytes(&altlink.file));
    if !name.as_os_str().is_empty() {
        match dwarf_path.parent() {
            Some(dir) if name.is_relative() => candidates.push(dir.join(name)),
            _ => candidates.push(name.to_path_buf()),
        }
    }
    candidates.extend(
        debug_dirs
            .iter()
            .filter_map(|dir| build_id_path(dir, &altlink.build_id)),
    );
    candidates.into_iter().find_map(|path| {
        let map = MappedFile::open(&path).ok()?;
        let file = elf::parse(map.bytes()).ok()?;
        let matches = ElfFacts::read(&file).build_id.as_deref() == Some(&altlink.build_id[..]);
        drop(file);
        matches.then_some(map)
    })
}

/// `<dir>/.build-id/xx/rest.debug` for a build id, if it is long enough to be split.
pub(crate) fn build_id_path(dir: &Path, build_id: &[u8]) -> Option<PathBuf> {
    let (first, rest) = build_id.split_first()?;
    if rest.is_empty() {
        return None;
    }
    let rest: String = rest.iter().map(|b| format!("{b:02x}")).collect();
    Some(
        dir.join(".build-id")
            .join(format!("{first:02x}"))
            .join(format!("{rest}.debug")),
    )
}

/// Every place the debug file may be, most specific first, without repeats.
fn candidates(object_path: &Path, facts: &ElfFacts, debug_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    if let Some(build_id) = &facts.build_id {
        out.extend(
            debug_dirs
                .iter()
                .filter_map(|dir| build_id_path(dir, build_id)),
        );
    }
    // The link is a plain file name; anything with a directory in it is not followed.
    let link = facts
        .debuglink
        .as_deref()
        .map(|l| Path::new(OsStr::from_bytes(l)));
    let plain_name = |name: &&Path| {
        let mut parts = name.components();
        matches!(
            (parts.next(), parts.next()),
            (Some(Component::Normal(_)), None)
        )
    };
    if let Some(name) = link.filter(plain_name) {
        let given = match object_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let resolved = std::fs::canonicalize(object_path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let dirs: Vec<PathBuf> = std::iter::once(given).chain(resolved).collect();
        for dir in &dirs {
            out.push(dir.join(name));
            out.push(dir.join(".debug").join(name));
        }
        for debug_dir in debug_dirs {
            for dir in &dirs {
                // `<debug dir>/usr/lib/x.debug`: the object's directory without its root.
                let relative: PathBuf = dir
                    .components()
                    .filter(|c| matches!(c, Component::Normal(_)))
                    .collect();
                out.push(debug_dir.join(relative).join(name));
            }
        }
    }
    let mut unique = Vec::with_capacity(out.len());
    for path in out {
        if !unique.contains(&path) {
            unique.push(path);
        }
    }
    unique
}

/// Opens a candidate and keeps it if it can be the debug file of the object.
fn accept(path: PathBuf, object: FileIdentity, build_id: Option<&[u8]>) -> Option<DebugFile> {
    let map = MappedFile::open(&path).ok()?;
    if map.identity().same_inode(&object) {
        return None;
    }
    let facts = ElfFacts::read(&elf::parse(map.bytes()).ok()?);
    if let (Some(want), Some(have)) = (build_id, facts.build_id.as_deref()) {
        if want != have {
            return None;
        }
    }
    Some(DebugFile { path, map, facts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_id_paths_split_the_first_byte() {
        assert_eq!(
            build_id_path(Path::new("/usr/lib/debug"), &[0xab, 0x01, 0xff]),
            Some(PathBuf::from("/usr/lib/debug/.build-id/ab/01ff.debug"))
        );
        assert_eq!(build_id_path(Path::new("/d"), &[0xab]), None);
        assert_eq!(build_id_path(Path::new("/d"), &[]), None);
    }

    #[test]
    fn debuglink_candidates_follow_gdb() {
        let facts = ElfFacts {
            build_id: Some(vec![0x12, 0x34]),
            debuglink: Some(b"prog.debug".to_vec()),
            altlink: None,
            has_dwarf: false,
            load_ranges: Vec::new(),
        };
        let found = candidates(
            Path::new("/nonexistent-dir/bin/prog"),
            &facts,
            &[PathBuf::from("/usr/lib/debug")],
        );
        let expected: Vec<PathBuf> = [
            "/usr/lib/debug/.build-id/12/34.debug",
            "/nonexistent-dir/bin/prog.debug",
            "/nonexistent-dir/bin/.debug/prog.debug",
            "/usr/lib/debug/nonexistent-dir/bin/prog.debug",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(found, expected);
    }
}
