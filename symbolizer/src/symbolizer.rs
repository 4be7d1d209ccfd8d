//! The public entry point: batches of addresses in, one answer per address out.
//!
//! This module decides what is not worth opening (pseudo paths), takes objects from the cache,
//! opens and searches different objects on parallel threads, answers each distinct address
//! once, and keeps a bug in a parser from taking the caller down (see [`crate::panics`]): a
//! panic while opening an object costs that object's answers, one while looking up an
//! address that address's.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::access::{self, Access};
use crate::address::FileAddress;
use crate::cache::{self, Cache};
use crate::debug_file::{self, DebugFile};
use crate::debuginfod::{Debuginfod, DebuginfodConfig, Wanted};
use crate::loaded::LoadedObject;
use crate::mmap::FileIdentity;
use crate::panics;
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
    debuginfod: Option<Debuginfod>,
    cache: Cache<LoadedObject>,
}

impl Default for Symbolizer {
    fn default() -> Symbolizer {
        Symbolizer::new()
    }
}

/// Where a [`Symbolizer`] looks for debug information beyond the object itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebugSources {
    /// Local debug directories, searched in order (see [`Symbolizer::with_debug_dirs`]).
    pub debug_dirs: Vec<PathBuf>,
    /// debuginfod servers and cache, asked for objects whose DWARF is not found locally.
    pub debuginfod: Option<DebuginfodConfig>,
}

impl DebugSources {
    /// `/usr/lib/debug` only, nothing over the network.
    pub fn local() -> DebugSources {
        DebugSources {
            debug_dirs: vec![PathBuf::from("/usr/lib/debug")],
            debuginfod: None,
        }
    }

    /// What gdb and perf would use in this process's environment: `/usr/lib/debug`, and the
    /// debuginfod servers of `DEBUGINFOD_URLS` with the standard client cache
    /// ([`DebuginfodConfig::from_env`]). `Err` says which variable is wrong; the local
    /// sources are then still usable through [`DebugSources::local`].
    pub fn from_env() -> Result<DebugSources, String> {
        Ok(DebugSources {
            debuginfod: DebuginfodConfig::from_env()?,
            ..DebugSources::local()
        })
    }
}

impl Symbolizer {
    /// A symbolizer that looks for separate debug files under `/usr/lib/debug`.
    pub fn new() -> Symbolizer {
        Symbolizer::with_sources(DebugSources::local())
    }

    /// A symbolizer that looks for separate debug files under each of `dirs`, in order: in
    /// `<dir>/.build-id/` by build id and in `<dir>/<object's directory>/` by
    /// `.gnu_debuglink` name. Files next to the object are searched as well.
    pub fn with_debug_dirs(dirs: Vec<PathBuf>) -> Symbolizer {
        Symbolizer::with_sources(DebugSources {
            debug_dirs: dirs,
            debuginfod: None,
        })
    }

    /// A symbolizer that looks for debug information in `sources`: the local directories
    /// first; then, for each object whose DWARF is still missing and that has a build id, the
    /// debuginfod servers (see [`DebuginfodConfig`]). Downloads happen inside the
    /// `symbolize` calls, on the calling thread and threads it starts, with this process's
    /// own rights (never a profiled process's), so call them where waiting is acceptable.
    pub fn with_sources(sources: DebugSources) -> Symbolizer {
        Symbolizer {
            debug_dirs: sources.debug_dirs,
            debuginfod: sources.debuginfod.map(Debuginfod::new),
            cache: Cache::new(cache::DEFAULT_CAPACITY),
        }
    }

    /// One line on what debuginfod gave this symbolizer so far (files downloaded, found in
    /// the cache, on no server), or `None` if it is not used or was not asked.
    pub fn debuginfod_summary(&self) -> Option<String> {
        self.debuginfod.as_ref().and_then(Debuginfod::summary)
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
    pub fn symbolize<A: Copy + Into<FileAddress> + Sync>(
        &mut self,
        object: &ObjectRef<'_>,
        addresses: &[A],
    ) -> Vec<Symbolized> {
        self.symbolize_many(&[(*object, addresses)])
            .pop()
            .unwrap_or_default()
    }

    /// Symbolizes several batches at once, each as [`Symbolizer::symbolize`] would: one answer
    /// list per batch, in the same order.
    ///
    /// Batches in different objects are opened and answered on parallel threads (as many as
    /// the machine has CPUs), because opening an object with full debug info — inflating
    /// compressed sections, indexing the units — and parsing the units its addresses fall in
    /// takes tens of milliseconds, and a profile usually needs several such objects.
    pub fn symbolize_many<A: Copy + Into<FileAddress> + Sync>(
        &mut self,
        batches: &[(ObjectRef<'_>, &[A])],
    ) -> Vec<Vec<Symbolized>> {
        self.symbolize_many_as(None, batches)
    }

    /// [`Symbolizer::symbolize_many`] for a process of another user: when this process runs
    /// as root and `access` is not root's, every file is opened with `access`'s rights only
    /// (a file that user could not read is [`Miss::FileUnreadable`]); when it runs as another
    /// user, each file's permission bits must also let `access` read it. The objects cached
    /// for `access` are kept apart from those opened with other rights. `None`, root's or
    /// our own user's access open files with this process's own rights.
    pub fn symbolize_many_as<A: Copy + Into<FileAddress> + Sync>(
        &mut self,
        access: Option<&Access>,
        batches: &[(ObjectRef<'_>, &[A])],
    ) -> Vec<Vec<Symbolized>> {
        self.run(access, batches, true, &AtomicBool::new(false))
    }

    /// [`Symbolizer::symbolize_many_as`] without asking debuginfod: what the local files
    /// answer. For work done ahead (opening the objects a process loaded, in case a sample
    /// points into them later), so that nothing is downloaded for an object no address of
    /// a profile falls in. A later call that symbolizes in it still asks debuginfod.
    ///
    /// Work done ahead may turn out not to be needed: once `abandon` is set the call returns
    /// within one DWARF section (instead of after inflating and indexing every one), its
    /// answers are worthless, and an object it did not finish opening is not cached.
    pub fn symbolize_many_locally_as<A: Copy + Into<FileAddress> + Sync>(
        &mut self,
        access: Option<&Access>,
        batches: &[(ObjectRef<'_>, &[A])],
        abandon: &AtomicBool,
    ) -> Vec<Vec<Symbolized>> {
        self.run(access, batches, false, abandon)
    }

    fn run<A: Copy + Into<FileAddress> + Sync>(
        &mut self,
        access: Option<&Access>,
        batches: &[(ObjectRef<'_>, &[A])],
        fetch: bool,
        abandon: &AtomicBool,
    ) -> Vec<Vec<Symbolized>> {
        let access = access.filter(|a| !a.is_own());
        let mut answers: Vec<Vec<Symbolized>> = vec![Vec::new(); batches.len()];
        let mut jobs: Vec<Job<'_>> = Vec::new();
        let mut job_of: HashMap<(&Path, &[u8]), usize> = HashMap::new();
        for (i, (object, addresses)) in batches.iter().enumerate() {
            if addresses.is_empty() {
                continue;
            }
            if is_pseudo_path(object.path) {
                answers[i] = vec![Symbolized::Miss(Miss::NoFile); addresses.len()];
                continue;
            }
            let job = *job_of
                .entry((object.path, object.build_id))
                .or_insert_with(|| {
                    jobs.push(Job {
                        object: *object,
                        loaded: self
                            .cache
                            .take(object.path, object.build_id, access, |loaded| {
                                is_stale(object, loaded)
                            }),
                        fetched: None,
                        uncached: false,
                        batches: Vec::new(),
                        addresses: 0,
                    });
                    jobs.len() - 1
                });
            jobs[job].batches.push(i);
            jobs[job].addresses += addresses.len();
        }
        // The longest jobs first, so that no thread is left with one at the end: objects still
        // to be opened, then those with the most addresses.
        jobs.sort_by_key(|job| (job.loaded.is_some(), Reverse(job.addresses)));

        let debug_dirs = &self.debug_dirs;
        // 1. Open the objects not cached yet, with the access's rights (no threads to start
        // when all are cached).
        let all_cached = jobs.iter().all(|job| job.loaded.is_some());
        let jobs = if all_cached {
            jobs
        } else {
            parallel_map(jobs, |mut job| {
                if job.loaded.is_none() {
                    let opened = match rights_for(access) {
                        Ok(_rights) => panics::catch(|| {
                            let path = job.object.path;
                            LoadedObject::open(path, job.object.build_id, debug_dirs, abandon)
                        })
                        .unwrap_or_else(Err),
                        Err(miss) => {
                            // Not cached: another call may have the rights.
                            job.uncached = true;
                            Err(miss)
                        }
                    };
                    job.loaded = Some(opened);
                    // Perhaps opened only in part: the next call opens it again.
                    job.uncached |= abandon.load(Ordering::Relaxed);
                }
                job
            })
        };
        // 2. debuginfod, for the objects still without DWARF, with our own rights.
        let mut jobs = jobs;
        if let Some(debuginfod) = self.debuginfod.as_ref().filter(|_| fetch) {
            fetch_debug_files(debuginfod, &mut jobs);
        }
        // 3. Take what was fetched, and answer, with the access's rights again.
        let done = parallel_map(jobs, |mut job| {
            let rights = rights_for(access);
            if let (Ok(_), Some(Ok(loaded)), Some(debug)) =
                (&rights, job.loaded.as_mut(), job.fetched.take())
            {
                let path = job.object.path;
                let attached = panics::catch(|| loaded.attach_debug_file(path, debug, debug_dirs));
                if let Err(miss) = attached {
                    job.loaded = Some(Err(miss));
                }
            }
            let answered: Vec<(usize, Vec<Symbolized>)> = job
                .batches
                .iter()
                .map(|&i| {
                    let addresses = batches[i].1;
                    let answer = match (&rights, &job.loaded) {
                        (Err(miss), _) | (_, Some(Err(miss))) => {
                            vec![Symbolized::Miss(miss.clone()); addresses.len()]
                        }
                        (Ok(_), Some(Ok(loaded))) => answer(loaded, addresses),
                        (Ok(_), None) => vec![Symbolized::Miss(Miss::NoSymbol); addresses.len()],
                    };
                    (i, answer)
                })
                .collect();
            drop(rights);
            let keep = if job.uncached { None } else { job.loaded };
            (job.object, keep, answered)
        });
        for (object, loaded, answered) in done {
            for (i, answer) in answered {
                answers[i] = answer;
            }
            if let Some(loaded) = loaded {
                self.cache
                    .insert(object.path, object.build_id, access, loaded);
            }
        }
        answers
    }
}

/// Runs `read` on the bytes of the file at `path`, opened as this crate opens every file
/// (see [`crate::mmap`]: no blocking open, regular files only, a file its user may change
/// read rather than mapped) with the rights of `access` (see [`crate::access`]; `None` for our
/// own). For a caller that reads a process's objects for itself: `anyprof attach` takes the
/// unwind tables of the process's modules, which must not come from a file its user could
/// not read.
pub fn with_file_as<T>(
    access: Option<&Access>,
    path: &Path,
    read: impl FnOnce(&[u8]) -> T,
) -> Result<T, Miss> {
    let _rights = rights_for(access.filter(|a| !a.is_own()))?;
    let map = crate::mmap::MappedFile::open(path).map_err(|err| match err {
        crate::mmap::MapError::NotAFile => Miss::NoFile,
        crate::mmap::MapError::Io(err) => Miss::FileUnreadable(err.to_string()),
    })?;
    Ok(read(map.bytes()))
}

/// Takes the rights of `access` on this thread until the guard is dropped (nothing to take
/// for `None`), or the miss to answer when that is refused.
fn rights_for(access: Option<&Access>) -> Result<Option<access::Rights>, Miss> {
    match access.map(access::act_as) {
        Some(Err(err)) => Err(Miss::FileUnreadable(format!(
            "cannot take the profiled process's user rights to read it: {err}"
        ))),
        Some(Ok(rights)) => Ok(Some(rights)),
        None => Ok(None),
    }
}

/// Asks debuginfod for the debug file of every opened object that has no DWARF yet and a
/// build id, all at once, and opens what it gives (from its cache, with our own rights),
/// to be attached to the objects in `jobs`.
fn fetch_debug_files(debuginfod: &Debuginfod, jobs: &mut [Job<'_>]) {
    let mut asking: Vec<usize> = Vec::new();
    let mut wanted: Vec<Wanted<'_>> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let Some(Ok(loaded)) = &job.loaded else {
            continue;
        };
        let asked_lately = loaded
            .asked_debuginfod
            .is_some_and(|t| t.elapsed() < crate::debuginfod::RETRY_AFTER);
        if loaded.has_dwarf() || asked_lately || !debuginfod.may_ask_for(loaded.root_owned()) {
            continue;
        }
        let Some(build_id) = loaded
            .build_id()
            .filter(|id| crate::debuginfod::BUILD_ID_LEN.contains(&id.len()))
        else {
            continue;
        };
        asking.push(i);
        wanted.push(Wanted {
            build_id,
            name: crate::debuginfod::printable(
                &job.object
                    .path
                    .file_name()
                    .unwrap_or(job.object.path.as_os_str())
                    .to_string_lossy(),
            ),
        });
    }
    if wanted.is_empty() {
        return;
    }
    let found = debuginfod.fetch_all(&wanted);
    let opened: Vec<Option<DebugFile>> = found
        .iter()
        .zip(&wanted)
        .map(|(path, w)| {
            path.as_deref().and_then(|p| {
                // A bug in parsing the file costs this object only.
                panics::catch(|| debug_file::open_fetched(p, w.build_id)).unwrap_or(None)
            })
        })
        .collect();
    drop(wanted);
    for (i, debug) in asking.into_iter().zip(opened) {
        if let Some(Ok(loaded)) = &mut jobs[i].loaded {
            loaded.asked_debuginfod = Some(std::time::Instant::now());
        }
        jobs[i].fetched = debug;
    }
}

/// One object of a [`Symbolizer::symbolize_many`] call and the batches that fall in it.
struct Job<'a> {
    object: ObjectRef<'a>,
    /// The object as cached, or `None` if it is still to be opened.
    loaded: Option<Result<LoadedObject, Miss>>,
    /// A debug file fetched from debuginfod, to be attached to the object.
    fetched: Option<DebugFile>,
    /// The object could not be opened for a reason of this call only: not to be cached.
    uncached: bool,
    /// Indices of the batches.
    batches: Vec<usize>,
    /// Addresses in all of them.
    addresses: usize,
}

/// Whether a cached object no longer stands for `object`. Without a build id, a file replaced
/// on disk is a new object. With one, the object we hold was checked to be the build the
/// process loaded, whatever the path names now.
fn is_stale(object: &ObjectRef<'_>, loaded: &LoadedObject) -> bool {
    object.build_id.is_empty()
        && FileIdentity::current(object.path).is_some_and(|now| now != loaded.identity())
}

/// Answers each distinct address once, in address order, which keeps the DWARF units and
/// symbol entries being read close together.
fn answer<A: Copy + Into<FileAddress>>(loaded: &LoadedObject, addresses: &[A]) -> Vec<Symbolized> {
    let addresses: Vec<FileAddress> = addresses.iter().map(|&a| a.into()).collect();
    let mut order: Vec<usize> = (0..addresses.len()).collect();
    order.sort_unstable_by_key(|&i| addresses[i]);
    let mut answers = vec![Symbolized::Miss(Miss::NoSymbol); addresses.len()];
    let mut previous: Option<usize> = None;
    for i in order {
        answers[i] = match previous {
            Some(p) if addresses[p] == addresses[i] => answers[p].clone(),
            _ => {
                panics::catch(|| loaded.symbolize(addresses[i].0)).unwrap_or_else(Symbolized::Miss)
            }
        };
        previous = Some(i);
    }
    answers
}

/// `work` applied to every item, on as many threads as there are CPUs (and items), the calling
/// thread included; the results in no particular order. Each thread takes the next item when
/// it is done with one, so a slow item does not hold up the others.
fn parallel_map<T: Send, R: Send>(items: Vec<T>, work: impl Fn(T) -> R + Sync) -> Vec<R> {
    let cpus = std::thread::available_parallelism().map_or(1, |cpus| cpus.get());
    parallel_map_on(cpus, items, work)
}

/// [`parallel_map`] on at most `max_threads` threads (the calling thread included).
pub(crate) fn parallel_map_on<T: Send, R: Send>(
    max_threads: usize,
    items: Vec<T>,
    work: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let threads = max_threads.min(items.len()).max(1);
    if threads == 1 {
        return items.into_iter().map(work).collect();
    }
    let queue = Mutex::new(items.into_iter());
    let results = Mutex::new(Vec::new());
    let worker = || loop {
        // A poisoned lock means another worker panicked; the scope passes that panic on.
        let Some(item) = queue.lock().ok().and_then(|mut q| q.next()) else {
            return;
        };
        let result = work(item);
        if let Ok(mut results) = results.lock() {
            results.push(result);
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(worker);
        }
        worker();
    });
    results.into_inner().unwrap_or_default()
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

    /// Several objects at once answer as each does alone, batch by batch, whatever the cache
    /// held before; two batches in one object share it.
    #[test]
    fn many_batches_answer_as_one_at_a_time() {
        let exe = std::env::current_exe().unwrap();
        let data = std::fs::read(&exe).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        let text = object::Object::section_by_name(&elf, ".text").unwrap();
        let start = object::ObjectSection::address(&text);
        let size = object::ObjectSection::size(&text);
        let spread: Vec<u64> = (0..64).map(|i| start + size * i / 64).collect();
        let object = |path| ObjectRef {
            path,
            build_id: &[],
        };
        let batches = [
            (object(&exe), &spread[..32]),
            (object(Path::new("/nonexistent/lib.so")), &spread[..2]),
            (object(Path::new("[vdso]")), &spread[..1]),
            (object(&exe), &spread[32..]),
            (object(&exe), &[][..]),
        ];
        let alone: Vec<Vec<Symbolized>> = batches
            .iter()
            .map(|(object, addresses)| Symbolizer::new().symbolize(object, addresses))
            .collect();
        let mut symbolizer = Symbolizer::new();
        assert_eq!(symbolizer.symbolize_many(&batches), alone);
        // Again, now from the cache.
        assert_eq!(symbolizer.symbolize_many(&batches), alone);
        assert!(matches!(alone[0][0], Symbolized::Frames(_)));
        assert_eq!(alone[2], vec![Symbolized::Miss(Miss::NoFile)]);
        assert!(alone[4].is_empty());
    }
}
