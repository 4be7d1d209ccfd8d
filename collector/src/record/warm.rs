//! Symbolizing ahead: while the program runs, a thread at idle priority does the slow part
//! of symbolizing (opening files, inflating and indexing DWARF) so that writing the profiles
//! at exit does not have to.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyprof::collect::Collector;
use anyprof::ingest::{Peer, Session};
use anyprof::priority;
use anyprof::symbolize::{module_of, RuntimeAddress, StackKind};
use anyprof_symbolizer::{Access, FileAddress};
use anyprof_wire::Module;

use super::named_thread;

/// How long the warming thread waits before its first look at the sessions, and the
/// shortest wait after a look that found something new: a process reports its modules as
/// soon as the library starts in it, and a short program may be gone within a few tens of
/// milliseconds.
pub(super) const WARM_SOON: Duration = Duration::from_millis(2);

/// The longest wait between looks, reached by doubling the wait while nothing new turns up.
pub(super) const WARM_AT_LEAST_EVERY: Duration = Duration::from_millis(100);

/// After a look that found something new, the wait is this many times as long as finding it
/// took (symbolizing what it found is work that exit would do anyway), so looking uses at
/// most 2 % of a CPU. Idle priority keeps the thread off a CPU the program wants, but a
/// CPU the program leaves free is not free of cost: a look copies every session and walks
/// every stack, and looking every 2 ms at a long run's thousands of stacks took about 8 % of
/// a CPU (CPython with 512 KiB heap samples), competing with the program for caches and
/// memory.
const WARM_DUTY_RATIO: u32 = 49;

/// Does the symbolizer's slow work while the program still runs, on a thread of the collector,
/// so that writing the profiles at exit does not have to: with full debug info installed
/// (libc6-dbg) that work is most of the time between the program's exit and its profiles.
///
/// Each look first symbolizes the addresses of the samples that arrived since the last one,
/// which parses the DWARF units they fall in (the answers are dropped; looking an address up
/// again in a parsed unit is cheap), then opens the modules that no sample points into yet
/// (mapping the files, inflating and indexing their DWARF), in case one does by the end.
///
/// It works on one module at a time, on one thread at idle priority (see [`priority`]), so it
/// only takes CPU time the program leaves unused. When the program exits it finishes the
/// module it is in if a sample points into it (writing the profiles would open it anyway),
/// and drops it within one DWARF section if none does (gcc's cc1 loads a dozen libraries,
/// and finishing one of them after the exit cost about 40 ms of a 20 ms compile). What is
/// left is then done on all CPUs at once (see
/// [`anyprof_symbolizer::Symbolizer::symbolize_many`]). It leaves its former priority in
/// `lowered`, to be restored when the program has exited.
pub(super) fn start_prewarming(
    collector: &Collector,
    symbolizer: Arc<Mutex<anyprof_symbolizer::Symbolizer>>,
    lowered: Arc<OnceLock<priority::Lowered>>,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let sessions = collector.sessions();
    let flag = stop.clone();
    let handle = named_thread("warm-symbols", move || {
        let _ = lowered.set(priority::background());
        if !anyprof::symbolize::names_wanted() {
            return; // --no-symbolize: nothing to prepare
        }
        let mut opened: HashSet<(Vec<u8>, Vec<u8>)> = HashSet::new();
        let mut looked_up: HashMap<(u32, u64), HashSet<RuntimeAddress>> = HashMap::new();
        let mut wait = WARM_SOON;
        while !flag.load(Ordering::SeqCst) {
            std::thread::park_timeout(wait);
            let look_started = std::time::Instant::now();
            let snapshot = anyprof::collect::snapshot(&sessions);
            // Each module with the file addresses to look up in it, those of samples first.
            // With the rights of the process that loaded it (see symbolize::resolve_all).
            // The last field: whether a sample points into it. Debug files are downloaded
            // (debuginfod) only for those; the others are opened from local files only.
            let mut work: Vec<(&Module, Vec<FileAddress>, Option<Access>, bool)> = Vec::new();
            for s in &snapshot {
                let Some(image) = s.image_key() else { continue };
                let seen = looked_up.entry(image).or_default();
                let mut by_module: BTreeMap<u32, Vec<FileAddress>> = BTreeMap::new();
                for a in sample_addresses(s).filter(|&a| seen.insert(a)) {
                    if let Some(m) = module_of(&s.modules, a) {
                        by_module
                            .entry(m.id)
                            .or_default()
                            .push(a.to_file(m.load_bias));
                    }
                }
                for (id, svmas) in by_module {
                    let m = &s.modules[&id];
                    opened.insert((m.path.clone(), m.build_id.clone()));
                    work.push((m, svmas, s.peer.as_ref().map(Peer::access), true));
                }
            }
            for s in &snapshot {
                for m in s.modules.values() {
                    if opened.insert((m.path.clone(), m.build_id.clone())) {
                        let svmas = vec![RuntimeAddress(m.start).to_file(m.load_bias)];
                        work.push((m, svmas, s.peer.as_ref().map(Peer::access), false));
                    }
                }
            }
            let found = !work.is_empty();
            let scan_took = look_started.elapsed();
            for (m, svmas, access, sampled) in work {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let path = PathBuf::from(String::from_utf8_lossy(&m.path).into_owned());
                let object = anyprof_symbolizer::ObjectRef {
                    path: &path,
                    build_id: &m.build_id,
                };
                if let Ok(mut sym) = symbolizer.lock() {
                    let request = [(object, &svmas[..])];
                    if sampled {
                        anyprof::symbolize::symbolize_guarded(&mut sym, access.as_ref(), &request);
                    } else {
                        // Dropped as soon as the program exits: no sample may ever point
                        // into it, and writing the profiles would wait for it.
                        anyprof::symbolize::symbolize_guarded_with(
                            &mut sym,
                            access.as_ref(),
                            &request,
                            |sym, access, request| {
                                sym.symbolize_many_locally_as(access, request, &flag)
                            },
                        );
                    }
                }
            }
            wait = if found {
                (scan_took * WARM_DUTY_RATIO).max(WARM_SOON)
            } else {
                (wait * 2).min(WARM_AT_LEAST_EVERY)
            };
        }
    });
    (stop, handle)
}

/// The addresses that the CPU and heap profiles of `session` will look up.
pub(super) fn sample_addresses(session: &Session) -> impl Iterator<Item = RuntimeAddress> + '_ {
    let cpu = session
        .cpu
        .keys()
        .flat_map(|k| StackKind::CPU.lookup_addresses(&k.frames));
    let heap = session
        .heap
        .values()
        .flat_map(|b| StackKind::HEAP.lookup_addresses(&b.frames));
    cpu.chain(heap)
}
