//! The public entry point: batches of addresses in, one answer per address out.
//!
//! This module decides what is not worth opening (pseudo paths), takes objects from the cache,
//! answers each distinct address once, and keeps a bug in a parser from taking the caller down
//! when panics unwind.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use crate::cache::{self, Cache};
use crate::loaded::LoadedObject;
use crate::mmap::FileIdentity;
use crate::{Miss, Symbolized};

/// An object file to symbolize addresses in.
#[derive(Clone, Copy, Debug)]
pub struct ObjectRef<'a> {
    /// Where the object is on disk, as the process mapped it (a line of `/proc/<pid>/maps`).
    pub path: &'a Path,
    /// The GNU build id the process loaded, read from its memory; empty if unknown. When it is
    /// given, a file on disk with another build id is refused ([`Miss::BuildIdMismatch`]).
    pub build_id: &'a [u8],
}

/// Turns addresses in ELF objects into inline chains of functions, files and lines.
///
/// Opened objects (mappings, parsed DWARF, symbol tables) are cached across calls, keyed by
/// path and build id, failures included; at most 128 objects stay open, the least recently
/// used are closed first. Keep one symbolizer for a whole run. It is `Send`, not `Sync`:
/// lookups fill caches, hence `&mut self`.
pub struct Symbolizer {
    debug_dirs: Vec<PathBuf>,
    cache: Cache<LoadedObject>,
}

impl Default for Symbolizer {
    fn default() -> Symbolizer {
        Symbolizer::new()
    }
}

impl Symbolizer {
    /// A symbolizer that looks for separate debug files under `/usr/lib/debug`.
    pub fn new() -> Symbolizer {
        Symbolizer::with_debug_dirs(vec![PathBuf::from("/usr/lib/debug")])
    }

    /// A symbolizer that looks for separate debug files under each of `dirs`, in order: in
    /// `<dir>/.build-id/` by build id and in `<dir>/<object's directory>/` by
    /// `.gnu_debuglink` name. Files next to the object are searched as well.
    pub fn with_debug_dirs(dirs: Vec<PathBuf>) -> Symbolizer {
        Symbolizer {
            debug_dirs: dirs,
            cache: Cache::new(cache::DEFAULT_CAPACITY),
        }
    }

    /// Symbolizes addresses given as *file virtual addresses* (SVMA: the address as stated in
    /// the ELF file = runtime address − load bias) inside the object at `object.path`.
    ///
    /// Returns exactly one entry per input address, in the same order. Addresses are taken as
    /// they are: for a return address from a stack walk, pass the return address minus one, so
    /// that the call instruction, not the next statement, is looked up.
    ///
    /// Never panics on any input: missing, truncated or malformed files give a [`Miss`] for
    /// each address.
    pub fn symbolize(&mut self, object: &ObjectRef<'_>, addresses: &[u64]) -> Vec<Symbolized> {
        let miss_all = |miss: &Miss| vec![Symbolized::Miss(miss.clone()); addresses.len()];
        if addresses.is_empty() {
            return Vec::new();
        }
        if is_pseudo_path(object.path) {
            return miss_all(&Miss::NoFile);
        }
        let debug_dirs = &self.debug_dirs;
        let loaded = self.cache.get_or_open(
            object.path,
            object.build_id,
            // Without a build id, a file replaced on disk is a new object. With one, the object
            // we hold was checked to be the build the process loaded, whatever the path names
            // now.
            |loaded| {
                object.build_id.is_empty()
                    && FileIdentity::current(object.path)
                        .is_some_and(|now| now != loaded.identity())
            },
            || {
                catch_unwind(AssertUnwindSafe(|| {
                    LoadedObject::open(object.path, object.build_id, debug_dirs)
                }))
                .unwrap_or_else(|_| Err(parser_panicked()))
            },
        );
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(miss) => return miss_all(miss),
        };

        // Each distinct address is looked up once, in address order, which keeps the DWARF
        // units and symbol entries being read close together.
        let mut order: Vec<usize> = (0..addresses.len()).collect();
        order.sort_unstable_by_key(|&i| addresses[i]);
        let mut answers = vec![Symbolized::Miss(Miss::NoSymbol); addresses.len()];
        let mut previous: Option<usize> = None;
        for i in order {
            answers[i] = match previous {
                Some(p) if addresses[p] == addresses[i] => answers[p].clone(),
                _ => catch_unwind(AssertUnwindSafe(|| loaded.symbolize(addresses[i])))
                    .unwrap_or_else(|_| Symbolized::Miss(parser_panicked())),
            };
            previous = Some(i);
        }
        answers
    }
}

/// The miss reported when a parser panicked on a file (only seen with `panic = "unwind"`).
fn parser_panicked() -> Miss {
    Miss::MalformedElf("the parser failed on it".to_owned())
}

/// Whether `path` is a name the kernel or the dynamic loader gives to memory without a file
/// (`[vdso]`, `[heap]`, `[anon:…]`, `linux-vdso.so.1`, `//anon`, memfds), or empty.
fn is_pseudo_path(path: &Path) -> bool {
    let Some(name) = path.to_str() else {
        return false;
    };
    name.is_empty()
        || name.starts_with('[')
        || name == "//anon"
        || name.starts_with("anon_inode:")
        || name.starts_with("/memfd:")
        || name.starts_with("memfd:")
        || name.starts_with("/SYSV")
        || name.starts_with("linux-vdso.so")
        || name.starts_with("linux-gate.so")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_paths_are_recognised() {
        for name in [
            "",
            "[vdso]",
            "[heap]",
            "[anon:scudo]",
            "//anon",
            "linux-vdso.so.1",
            "/memfd:jit (deleted)",
            "anon_inode:[perf_event]",
        ] {
            assert!(is_pseudo_path(Path::new(name)), "{name}");
        }
        for name in ["/usr/lib/libc.so.6", "relative/prog", "prog"] {
            assert!(!is_pseudo_path(Path::new(name)), "{name}");
        }
    }
}
