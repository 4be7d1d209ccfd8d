//! Turns a session's raw addresses into source-level frames, module by module, through the
//! symbolizer library.
//!
//! The one place where the "return address minus one" rule is applied is
//! [`StackKind::lookup_addresses`]: the leaf of a stack taken by a signal is the exact
//! interrupted instruction, every caller frame is a return address whose call instruction
//! ends one byte earlier. Which kind each stack of a session is, is said once, by the
//! constants of [`StackKind`]. From there on addresses are [`RuntimeAddress`]es, and they
//! become [`FileAddress`]es for the symbolizer in one place too ([`resolve_all`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub use anyprof_symbolizer::RuntimeAddress;
use anyprof_symbolizer::{
    Access, DebugSources, FileAddress, Frame, Miss, ObjectRef, Symbolized, Symbolizer,
};
use anyprof_wire::Module;

use crate::ingest::{Peer, Session};
use crate::pprof::builder::FrameLine;

/// How a stack was taken, which says what the address of each of its frames means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackKind {
    /// Taken by a signal that interrupted the thread: the leaf is the interrupted instruction
    /// itself, every other frame a return address.
    Interrupted,
    /// Taken inside a call into the profiler: every frame, the leaf too, is a return address.
    Called,
}

impl StackKind {
    /// CPU samples: taken by the profiling signal.
    pub const CPU: StackKind = StackKind::Interrupted;
    /// Thread dumps: each thread's stack taken by a signal sent to it.
    pub const THREAD_DUMP: StackKind = StackKind::Interrupted;
    /// Heap samples: taken in the allocation hook, called by the allocating function.
    pub const HEAP: StackKind = StackKind::Called;
    /// Thread creations: taken in the `pthread_create` hook.
    pub const THREAD_CREATE: StackKind = StackKind::Called;

    /// The addresses to look up and record for the frames of a stack of this kind (raw
    /// values, leaf first): a return address minus one, so that the call instruction and not
    /// the statement after it is named; an interrupted instruction as it is.
    pub fn lookup_addresses(self, frames: &[u64]) -> impl Iterator<Item = RuntimeAddress> + '_ {
        frames.iter().enumerate().map(move |(index, &raw)| {
            if index == 0 && self == StackKind::Interrupted {
                RuntimeAddress(raw)
            } else {
                RuntimeAddress(raw.saturating_sub(1))
            }
        })
    }
}

/// What an address resolved to.
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    /// Module id containing the address, if any.
    pub module: Option<u32>,
    /// Frames innermost first; empty if unknown.
    pub lines: Vec<FrameLine>,
}

/// Per-module outcome, for the pprof mapping's `has_*` flags.
#[derive(Clone, Copy, Debug, Default)]
pub struct ModuleOutcome {
    /// Addresses looked up in the module.
    pub looked_up: usize,
    /// Addresses that got at least a function name.
    pub resolved: usize,
    /// Whether any address resolved to more than one frame (inlining).
    pub inlined: bool,
}

/// Finds the module whose executable range contains `addr`.
pub fn module_of(modules: &BTreeMap<u32, Module>, addr: RuntimeAddress) -> Option<&Module> {
    modules
        .values()
        .filter(|m| m.start <= addr.0 && addr.0 < m.end)
        .max_by_key(|m| m.id)
}

/// Where debug information is looked for, from anyprof's own environment (never a profiled
/// process's): `/usr/lib/debug`, and the debuginfod servers of `DEBUGINFOD_URLS` with the
/// client cache gdb and perf share (`DEBUGINFOD_CACHE_PATH`, `DEBUGINFOD_TIMEOUT`,
/// `DEBUGINFOD_MAXTIME` and `DEBUGINFOD_MAXSIZE` as elfutils reads them). A wrong setting is
/// said once, and debuginfod is then not used.
pub fn debug_sources_from_env() -> DebugSources {
    static WARNED: AtomicBool = AtomicBool::new(false);
    DebugSources::from_env().unwrap_or_else(|why| {
        if !WARNED.swap(true, Ordering::SeqCst) {
            eprintln!("anyprof: warning: {why}; debuginfod is not used");
        }
        DebugSources::local()
    })
}

/// The one way the collector makes a symbolizer (`record`, `serve`, heap snapshots,
/// `symbolize`), so that every command looks for debug files in the same places: each of
/// `extra_debug_dirs` first (`anyprof symbolize --debug-dir`), then
/// [`debug_sources_from_env`]. With `quiet`, debuginfod downloads are not announced. Objects
/// whose DWARF is not found locally are fetched from debuginfod inside its calls, so call it
/// only where the collector may wait (never on the thread that reads the processes' rings).
pub fn new_symbolizer(extra_debug_dirs: &[PathBuf], quiet: bool) -> Symbolizer {
    let mut sources = debug_sources_from_env();
    sources
        .debug_dirs
        .splice(0..0, extra_debug_dirs.iter().cloned());
    if quiet {
        if let Some(debuginfod) = &mut sources.debuginfod {
            debuginfod.progress = false;
        }
    }
    Symbolizer::with_sources(sources)
}

/// [`new_symbolizer`] for `record` (`serve` has [`serve_symbolizer`]).
pub fn symbolizer_from_env() -> Symbolizer {
    new_symbolizer(&[], false)
}

/// The symbolizer of `anyprof serve`: [`symbolizer_from_env`] under the daemon's debuginfod
/// policy ([`daemon_debuginfod_policy`]).
pub fn serve_symbolizer() -> Symbolizer {
    let mut sources = debug_sources_from_env();
    daemon_debuginfod_policy(&mut sources);
    Symbolizer::with_sources(sources)
}

/// The daemon's debuginfod policy (it runs as root and symbolizes for every local user):
/// debuginfod is asked only about objects owned by root and writable by neither group nor
/// others, which no local user can have made, and a download lasts at most
/// `DAEMON_MAX_TIME` unless `DEBUGINFOD_MAXTIME` says otherwise. A build id is only what the
/// file says: without this, any peer could give a file of its own forged build ids and make
/// the daemon download, and keep in its cache, whatever the servers have.
pub fn daemon_debuginfod_policy(sources: &mut DebugSources) {
    if let Some(debuginfod) = &mut sources.debuginfod {
        debuginfod.only_root_owned_objects = true;
        debuginfod.default_max_time = Some(anyprof_symbolizer::DAEMON_MAX_TIME);
    }
}

/// [`symbolizer_from_env`] for a command run with `-q`: downloads are not announced.
pub fn quiet_symbolizer_from_env() -> Symbolizer {
    new_symbolizer(&[], true)
}

/// Set for the whole run by `record --no-symbolize` and `serve --no-symbolize`: profiles keep
/// addresses, mappings and build ids only, and [`resolve_all`] looks nothing up (the
/// mappings then say `has_functions: false`, so `anyprof symbolize` or pprof names them later,
/// where the debug files are).
pub static NO_SYMBOLIZE: AtomicBool = AtomicBool::new(false);

/// Whether names are looked up at all in this run (see [`NO_SYMBOLIZE`]).
pub fn names_wanted() -> bool {
    !NO_SYMBOLIZE.load(Ordering::SeqCst)
}

/// Set when the user asked to stop (`anyprof record` after the program ended): from then on
/// [`resolve_all`] answers at once, every address unnamed.
pub static GIVE_UP: AtomicBool = AtomicBool::new(false);

/// For the tests of giving up: `ANYPROF_TEST_SYMBOLIZE_DELAY_MS` makes every [`resolve_all`]
/// call stall that long first, as a symbolizer stuck on a huge debug file would (and, like
/// one, it does not look at [`GIVE_UP`] while it stalls). Not for users.
fn slow_down_for_tests() {
    static DELAY: OnceLock<Option<Duration>> = OnceLock::new();
    let delay = DELAY.get_or_init(|| {
        std::env::var("ANYPROF_TEST_SYMBOLIZE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
    });
    if let Some(delay) = delay {
        std::thread::sleep(*delay);
    }
}

/// Symbolizes `addresses` (from [`StackKind::lookup_addresses`]) in the modules of
/// `session`. The modules are looked up in one call to the symbolizer, which works on several
/// of them at once. Their files are read with the rights of the process that sent them (see
/// [`anyprof_symbolizer::Symbolizer::symbolize_many_as`]): a process gets no names from a file
/// its user could not read.
pub fn resolve_all(
    symbolizer: &mut Symbolizer,
    session: &Session,
    addresses: impl IntoIterator<Item = RuntimeAddress>,
) -> (
    HashMap<RuntimeAddress, Resolved>,
    HashMap<u32, ModuleOutcome>,
) {
    let modules = &session.modules;
    let access = session.peer.as_ref().map(Peer::access);
    let mut by_module: HashMap<Option<u32>, Vec<RuntimeAddress>> = HashMap::new();
    if GIVE_UP.load(Ordering::SeqCst) || !names_wanted() {
        // Addresses in their modules, without names: `anyprof symbolize` names them later
        // from the files the profile's mappings name (by build id).
        let out = addresses
            .into_iter()
            .map(|a| {
                let module = module_of(modules, a).map(|m| m.id);
                (
                    a,
                    Resolved {
                        module,
                        lines: Vec::new(),
                    },
                )
            })
            .collect();
        return (out, HashMap::new());
    }
    slow_down_for_tests();
    for a in addresses {
        by_module
            .entry(module_of(modules, a).map(|m| m.id))
            .or_default()
            .push(a);
    }
    let mut out = HashMap::new();
    // Each module's addresses (sorted, distinct), where it was loaded, and its path.
    let mut batches: Vec<(&Module, Vec<RuntimeAddress>, Vec<FileAddress>, String)> = Vec::new();
    for (module_id, mut addrs) in by_module {
        addrs.sort_unstable();
        addrs.dedup();
        let Some(module) = module_id.and_then(|id| modules.get(&id)) else {
            for a in addrs {
                out.insert(a, Resolved::default());
            }
            continue;
        };
        let svmas: Vec<FileAddress> = addrs.iter().map(|a| a.to_file(module.load_bias)).collect();
        let path_text = String::from_utf8_lossy(&module.path).into_owned();
        batches.push((module, addrs, svmas, path_text));
    }
    let requests: Vec<(ObjectRef<'_>, &[FileAddress])> = batches
        .iter()
        .map(|(module, _, svmas, path_text)| {
            let object = ObjectRef {
                path: Path::new(path_text),
                build_id: &module.build_id,
            };
            (object, &svmas[..])
        })
        .collect();
    let answers = symbolize_guarded(symbolizer, access.as_ref(), &requests);
    let mut outcomes = HashMap::new();
    for ((module, addrs, svmas, _), results) in batches.iter().zip(answers) {
        let outcome: &mut ModuleOutcome = outcomes.entry(module.id).or_default();
        for ((a, svma), r) in addrs.iter().zip(svmas).zip(results) {
            outcome.looked_up += 1;
            let lines = match r {
                Symbolized::Frames(frames) => frame_lines(*a, frames),
                Symbolized::Miss(miss) => {
                    if let Miss::SymbolizerPanicked(why) = &miss {
                        warn_symbolizer_failed(&module.path, why);
                    }
                    vec![crate::unnamed::frame(&module.path, *svma)]
                }
            };
            if !crate::unnamed::is_fallback(&lines) {
                outcome.resolved += 1;
            }
            if lines.len() > 1 {
                outcome.inlined = true;
            }
            out.insert(
                *a,
                Resolved {
                    module: Some(module.id),
                    lines,
                },
            );
        }
    }
    (out, outcomes)
}

/// The pprof lines of one address's frames (innermost first, as the symbolizer gives them):
/// the demangled name, the raw one as the system name, file and line; a frame without any
/// name is called by its address.
pub fn frame_lines(address: impl std::fmt::LowerHex, frames: Vec<Frame>) -> Vec<FrameLine> {
    frames
        .into_iter()
        .map(|f| {
            let system = f
                .raw_function
                .clone()
                .or_else(|| f.function.clone())
                .unwrap_or_default();
            FrameLine {
                name: f
                    .function
                    .or(f.raw_function)
                    .unwrap_or_else(|| format!("{address:#x}")),
                system_name: system,
                file: f.file.unwrap_or_default(),
                line: f.line.map(i64::from).unwrap_or(0),
            }
        })
        .collect()
}

/// [`Symbolizer::symbolize_many_as`], and if it panics all the same (the symbolizer catches
/// its parsers' panics itself, per object and per address; this is for a bug outside them),
/// again one object at a time, so that a panic costs only the names of the object it
/// happened in. The symbolizer runs with `panic = "unwind"` (the workspace's profile).
pub fn symbolize_guarded(
    symbolizer: &mut Symbolizer,
    access: Option<&Access>,
    requests: &[(ObjectRef<'_>, &[FileAddress])],
) -> Vec<Vec<Symbolized>> {
    symbolize_guarded_with(symbolizer, access, requests, Symbolizer::symbolize_many_as)
}

/// [`symbolize_guarded`] through `symbolize` (one of the symbolizer's batch methods: with or
/// without debuginfod).
pub fn symbolize_guarded_with(
    symbolizer: &mut Symbolizer,
    access: Option<&Access>,
    requests: &[(ObjectRef<'_>, &[FileAddress])],
    symbolize: impl Fn(
        &mut Symbolizer,
        Option<&Access>,
        &[(ObjectRef<'_>, &[FileAddress])],
    ) -> Vec<Vec<Symbolized>>,
) -> Vec<Vec<Symbolized>> {
    let all = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        symbolize(symbolizer, access, requests)
    }));
    if let Ok(answers) = all {
        return answers;
    }
    requests
        .iter()
        .map(|request| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                symbolize(symbolizer, access, std::slice::from_ref(request))
                    .pop()
                    .unwrap_or_default()
            }))
            .unwrap_or_else(|_| {
                let miss = Miss::SymbolizerPanicked("outside its parsers".into());
                vec![Symbolized::Miss(miss); request.1.len()]
            })
        })
        .collect()
}

/// Says once per file, for the whole run (a daemon's too), that the symbolizer failed on it
/// and what that costs: its names, and nothing else.
pub fn warn_symbolizer_failed(path: &[u8], why: &str) {
    static WARNED: Mutex<Option<HashSet<Vec<u8>>>> = Mutex::new(None);
    let Ok(mut warned) = WARNED.lock() else {
        return;
    };
    if !warned
        .get_or_insert_with(HashSet::new)
        .insert(path.to_vec())
    {
        return;
    }
    eprintln!(
        "anyprof: warning: the symbolizer failed on {} ({why}): its functions are left as \
         addresses in the profiles, everything else is named. This is a bug in anyprof: please report it with that file",
        String::from_utf8_lossy(path)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_of_signal_stack_is_exact_callers_step_back_into_the_call() {
        let frames = [0x1000, 0x2000, 0];
        let looked_up = |kind: StackKind| {
            kind.lookup_addresses(&frames)
                .map(|a| a.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(looked_up(StackKind::Interrupted), [0x1000, 0x1fff, 0]);
        assert_eq!(looked_up(StackKind::Called), [0xfff, 0x1fff, 0]);
    }
}
