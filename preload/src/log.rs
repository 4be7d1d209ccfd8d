//! The library's own messages. They never go to the program's stdout or stderr (which tests
//! and pipelines compare): they are queued for the collector, which prints them on its own
//! stderr, and also appended to `ANYPROF_LOG_FILE` when the user set one.
//!
//! Not for the signal handler: logging allocates and locks.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;

use anyprof_wire::Level;

static QUEUE: Mutex<Vec<(Level, String)>> = Mutex::new(Vec::new());
static LOG_FILE: Mutex<Option<PathBuf>> = Mutex::new(None);
/// Messages kept at most while no collector takes them.
const MAX_QUEUED: usize = 64;

/// Sets the file that messages are also appended to.
pub fn set_file(path: Option<PathBuf>) {
    if let Ok(mut f) = LOG_FILE.lock() {
        *f = path;
    }
}

/// Queues a message for the collector (and the log file).
pub fn message(level: Level, text: String) {
    let _section = crate::fork::section();
    append_to_file(&text);
    if let Ok(mut q) = QUEUE.lock() {
        if q.len() < MAX_QUEUED {
            q.push((level, text));
        }
    }
}

/// A warning with the OS error that caused it.
pub fn warn_errno(what: &str, errno: i32) {
    let err = std::io::Error::from_raw_os_error(errno);
    message(Level::Warn, format!("{what}: {err}"));
}

/// Takes every queued message.
pub fn take() -> Vec<(Level, String)> {
    QUEUE
        .lock()
        .map(|mut q| std::mem::take(&mut *q))
        .unwrap_or_default()
}

fn append_to_file(text: &str) {
    let Ok(path) = LOG_FILE.lock().map(|p| p.clone()) else {
        return;
    };
    let Some(path) = path else { return };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path);
    if let Ok(mut file) = file {
        let _ = writeln!(file, "anyprof[{}]: {text}", std::process::id());
    }
}
