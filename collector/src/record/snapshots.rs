//! Heap snapshots while the program runs (`--heap-every`, `--heap-signal`): written as
//! `DIR/heap-PID-N.pb.gz` by a thread at idle priority.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyprof::collect::Collector;
use anyprof::{priority, profile};

use super::named_thread;
use super::signals::SNAPSHOT_WANTED;

/// Starts the thread that writes heap snapshots every `every` seconds and when the snapshot
/// signal arrives. Returns its stop flag and handle.
pub(super) fn start_snapshots(
    collector: &Collector,
    pid: u32,
    dir: PathBuf,
    every: Option<u64>,
) -> (std::sync::Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let sessions = collector.sessions();
    let flag = stop.clone();
    let handle = named_thread("heap-snapshots", move || {
        // Snapshots while the program runs are for later reading: at idle priority. The one
        // asked for just before the program exited is written when the CPUs are free anyway.
        priority::background();
        // Quiet: the main symbolizer announces the downloads; this one mostly finds them cached.
        let mut symbolizer = anyprof::symbolize::quiet_symbolizer_from_env();
        let mut next = every.map(|s| Instant::now() + Duration::from_secs(s.max(1)));
        let mut n = 0;
        loop {
            let stopping = flag.load(Ordering::SeqCst);
            if !stopping {
                std::thread::park_timeout(Duration::from_millis(50));
            }
            let due = !stopping && next.is_some_and(|t| Instant::now() >= t);
            // A signal that came just before the program exited still gets its snapshot.
            let wanted = SNAPSHOT_WANTED.swap(false, Ordering::SeqCst);
            if stopping && !wanted {
                break;
            }
            if !(due || wanted) {
                continue;
            }
            if let (true, Some(s)) = (due, every) {
                next = Some(Instant::now() + Duration::from_secs(s.max(1)));
            }
            n += 1;
            for session in anyprof::collect::fresh_snapshot(&sessions)
                .iter()
                .filter(|s| s.pid() == Some(pid))
            {
                let heap = profile::heap::build(
                    session,
                    &mut symbolizer,
                    profile::heap::View::Heap,
                    anyprof::output::unix_nanos(),
                );
                let path = dir.join(format!("heap-{pid}-{n}.pb.gz"));
                if let Err(e) =
                    anyprof::output::write_atomic(&path, &anyprof::pprof::encode_gzipped(&heap))
                {
                    eprintln!("anyprof: error: {e:#}");
                }
            }
        }
    });
    (stop, handle)
}
