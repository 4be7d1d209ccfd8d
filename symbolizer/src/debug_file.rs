//! Finding separate debug files, where distributions and `objcopy --only-keep-debug` put them.
//!
//! The places are gdb's, in gdb's order, then perf's:
//!
//! 1. by build id: `<debug dir>/.build-id/<first byte in hex>/<other bytes in hex>.debug`
//!    (Debian's `-dbgsym` packages and `libc6-dbg`, Fedora's `-debuginfo`);
//! 2. by `.gnu_debuglink` name: next to the object, in `.debug/` beside it, and under
//!    `<debug dir>/<the object's directory>/` (the directory both as given and with symlinks
//!    resolved, since `/lib` is often a link to `/usr/lib`);
//! 3. by the object's own path under the debug directory, as perf also looks:
//!    `<debug dir>/<object path>.debug` (older Fedora) and `<debug dir>/<object path>` (older
//!    Ubuntu `-dbg` packages), for objects stripped without a debuglink.
//!
//! A candidate is used when it is an ELF file other than the object itself and, when both have
//! a build id, the ids are equal. When they cannot tell (either side has none), a candidate
//! found by debuglink name must have the CRC-32 the debuglink records, as gdb requires; one
//! found by the object's path must then at least not carry code of its own
//! (`objcopy --only-keep-debug` leaves the code sections empty): a file there that is
//! another program is not taken for its debug file.
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
        .find_map(|(path, how)| accept(path, how, object, facts))
}

/// Opens a debug file fetched for the object whose build id is `build_id` (by debuginfod,
/// into its cache), if it is an ELF file with that build id.
pub(crate) fn open_fetched(path: &Path, build_id: &[u8]) -> Option<DebugFile> {
    let map = MappedFile::open(path).ok()?;
    let facts = ElfFacts::read(&elf::parse(map.bytes()).ok()?);
    (facts.build_id.as_deref() == Some(build_id)).then(|| DebugFile {
        path: path.to_path_buf(),
        map,
        facts,
    })
}

/// How a candidate was found, which says what must hold when build ids cannot tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Found {
    /// By build id: its path already says which build it is for.
    BuildId,
    /// By `.gnu_debuglink` name: the CRC-32 the link records must match.
    DebugLink,
    /// By the object's path under a debug directory: it must be a debug-only file.
    ObjectPath,
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
fn candidates(
    object_path: &Path,
    facts: &ElfFacts,
    debug_dirs: &[PathBuf],
) -> Vec<(PathBuf, Found)> {
    let mut out: Vec<(PathBuf, Found)> = Vec::new();
    if let Some(build_id) = &facts.build_id {
        out.extend(
            debug_dirs
                .iter()
                .filter_map(|dir| build_id_path(dir, build_id))
                .map(|path| (path, Found::BuildId)),
        );
    }
    // The object's path as given and with symlinks resolved.
    let resolved_object = std::fs::canonicalize(object_path).ok();
    let object_paths: Vec<&Path> = std::iter::once(object_path)
        .chain(resolved_object.as_deref())
        .collect();
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
            out.push((dir.join(name), Found::DebugLink));
            out.push((dir.join(".debug").join(name), Found::DebugLink));
        }
        for debug_dir in debug_dirs {
            for dir in &dirs {
                // `<debug dir>/usr/lib/x.debug`: the object's directory without its root.
                out.push((
                    debug_dir.join(without_root(dir)).join(name),
                    Found::DebugLink,
                ));
            }
        }
    }
    // perf's places, for objects that were stripped without leaving a debuglink: only
    // absolute paths, so that a relative one does not point into the working directory.
    for debug_dir in debug_dirs {
        for object in object_paths.iter().filter(|p| p.is_absolute()) {
            let inside = debug_dir.join(without_root(object));
            let mut with_suffix = inside.clone().into_os_string();
            with_suffix.push(".debug");
            out.push((PathBuf::from(with_suffix), Found::ObjectPath));
            out.push((inside, Found::ObjectPath));
        }
    }
    let mut unique: Vec<(PathBuf, Found)> = Vec::with_capacity(out.len());
    for candidate in out {
        if !unique.iter().any(|(path, _)| *path == candidate.0) {
            unique.push(candidate);
        }
    }
    unique
}

/// `path` without its root and without `.` or `..`: `/usr/lib/x` → `usr/lib/x`, to be put
/// under a debug directory.
fn without_root(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

/// Opens a candidate and keeps it if it can be the debug file of the object.
fn accept(
    path: PathBuf,
    how: Found,
    object: FileIdentity,
    object_facts: &ElfFacts,
) -> Option<DebugFile> {
    let map = MappedFile::open(&path).ok()?;
    if map.identity().same_inode(&object) {
        return None;
    }
    let file = elf::parse(map.bytes()).ok()?;
    let facts = ElfFacts::read(&file);
    match (object_facts.build_id.as_deref(), facts.build_id.as_deref()) {
        (Some(want), Some(have)) if want != have => return None,
        (Some(_), Some(_)) => {}
        // Build ids cannot tell: as gdb, the debuglink's CRC must; as perf, a file at the
        // object's path must be debug data only.
        _ => match how {
            Found::BuildId => {}
            Found::DebugLink => {
                let want = object_facts.debuglink_crc?;
                if crc32fast::hash(map.bytes()) != want {
                    return None;
                }
            }
            Found::ObjectPath => {
                if !elf::is_debug_only(&file) {
                    return None;
                }
            }
        },
    }
    drop(file);
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
            debuglink_crc: Some(0),
            altlink: None,
            has_dwarf: false,
            load_ranges: Vec::new(),
        };
        let found = candidates(
            Path::new("/nonexistent-dir/bin/prog"),
            &facts,
            &[PathBuf::from("/usr/lib/debug")],
        );
        let expected: Vec<(PathBuf, Found)> = [
            ("/usr/lib/debug/.build-id/12/34.debug", Found::BuildId),
            ("/nonexistent-dir/bin/prog.debug", Found::DebugLink),
            ("/nonexistent-dir/bin/.debug/prog.debug", Found::DebugLink),
            (
                "/usr/lib/debug/nonexistent-dir/bin/prog.debug",
                Found::DebugLink,
            ),
            (
                "/usr/lib/debug/nonexistent-dir/bin/prog.debug",
                Found::ObjectPath,
            ),
            ("/usr/lib/debug/nonexistent-dir/bin/prog", Found::ObjectPath),
        ]
        .iter()
        .map(|(p, f)| (PathBuf::from(p), *f))
        .collect();
        // The object-path candidate that repeats the debuglink one is not tried twice.
        let expected: Vec<_> = expected
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != 4)
            .map(|(_, c)| c)
            .collect();
        assert_eq!(found, expected);
    }
}
