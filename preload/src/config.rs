//! Settings, read once from `ANYPROF_*` environment variables when the library starts.
//!
//! A bad value never stops the program: the default is used and one clear message explains
//! what was wrong (sent to the collector, which prints it).

use std::ffi::OsString;
use std::path::PathBuf;

use anyprof_wire::DEFAULT_MEM_RATE;

/// Default CPU sampling rate, as Go's `runtime/pprof`.
pub const DEFAULT_CPU_HZ: u32 = 100;
/// Highest rate accepted. Per-thread CPU timers are serviced from the scheduler tick, so the
/// kernel caps the effective rate at CONFIG_HZ (often 250) anyway.
pub const MAX_CPU_HZ: u32 = 1000;

/// Who the library talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `anyprof record` started the program: sample CPU from the start, give up if the
    /// collector cannot be reached.
    Record,
    /// A long-running process and the `anyprof serve` daemon: heap sampling always, CPU
    /// sampling only while the daemon asks for a profile; (re)connect whenever the daemon
    /// is (back) up.
    Serve,
}

/// The library's settings.
#[derive(Debug)]
pub struct Config {
    /// `ANYPROF_MODE`: `record` (set by `anyprof record`) or `serve` (the default).
    pub mode: Mode,
    /// `ANYPROF_SOCKET`: the collector's Unix socket; in serve mode the daemon's default
    /// paths are tried when it is unset ([`default_daemon_sockets`]).
    pub socket: Option<PathBuf>,
    /// `ANYPROF_CPU_HZ`: samples per second of thread CPU time; 0 = no CPU sampling.
    pub cpu_hz: u32,
    /// `ANYPROF_MEM_RATE`: mean bytes between heap samples; 0 = off, 1 = every allocation.
    pub mem_rate: u64,
    /// `ANYPROF_FORK`: `child` (default) profiles a forked child as a process of its own,
    /// `off` leaves it unprofiled.
    pub fork_children: bool,
    /// `ANYPROF_EXEC`: `profile` (default) keeps the library in `LD_PRELOAD` so programs this
    /// one execs are profiled too; `off` takes it out of the environment at start.
    pub exec_children: bool,
    /// `ANYPROF_LOG_FILE`: where the library's own messages also go.
    pub log_file: Option<PathBuf>,
    /// Messages about bad values, for the user.
    pub problems: Vec<String>,
}

impl Config {
    /// Reads the settings from the environment.
    pub fn from_env() -> Config {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// Reads the settings through `get` (separate for tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<OsString>) -> Config {
        let mut problems = Vec::new();
        let mode = match get("ANYPROF_MODE").as_deref().and_then(|m| m.to_str()) {
            None | Some("") | Some("serve") => Mode::Serve,
            Some("record") => Mode::Record,
            Some(other) => {
                problems.push(format!(
                    "ANYPROF_MODE={other} is not `record` or `serve`; using serve"
                ));
                Mode::Serve
            }
        };
        let socket = get("ANYPROF_SOCKET")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        let log_file = get("ANYPROF_LOG_FILE")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        let cpu_hz = match get("ANYPROF_CPU_HZ") {
            None => DEFAULT_CPU_HZ,
            Some(raw) => match raw.to_str().map(str::trim).map(str::parse::<u32>) {
                Some(Ok(hz)) if hz <= MAX_CPU_HZ => hz,
                Some(Ok(hz)) => {
                    problems.push(format!(
                        "ANYPROF_CPU_HZ={hz} is above the maximum of {MAX_CPU_HZ}; using {MAX_CPU_HZ}"
                    ));
                    MAX_CPU_HZ
                }
                _ => {
                    problems.push(format!(
                        "ANYPROF_CPU_HZ={} is not a whole number of samples per second \
                         (0 turns CPU sampling off); using {DEFAULT_CPU_HZ}",
                        raw.to_string_lossy()
                    ));
                    DEFAULT_CPU_HZ
                }
            },
        };
        let mem_rate = match get("ANYPROF_MEM_RATE") {
            None => DEFAULT_MEM_RATE,
            Some(raw) => match raw.to_str().and_then(anyprof_wire::parse_byte_size) {
                Some(rate) => rate,
                None => {
                    problems.push(format!(
                        "ANYPROF_MEM_RATE={} is not a byte count like 524288 or 512KiB \
                         (1 samples every allocation, 0 turns heap profiling off); using 512KiB",
                        raw.to_string_lossy()
                    ));
                    DEFAULT_MEM_RATE
                }
            },
        };
        let fork_children = match get("ANYPROF_FORK").as_deref().and_then(|m| m.to_str()) {
            None | Some("") | Some("child") => true,
            Some("off") => false,
            Some(other) => {
                problems.push(format!(
                    "ANYPROF_FORK={other} is not `child` or `off`; using child"
                ));
                true
            }
        };
        let exec_children = match get("ANYPROF_EXEC").as_deref().and_then(|m| m.to_str()) {
            None | Some("") | Some("profile") => true,
            Some("off") => false,
            Some(other) => {
                problems.push(format!(
                    "ANYPROF_EXEC={other} is not `profile` or `off`; using profile"
                ));
                true
            }
        };
        Config {
            mode,
            socket,
            cpu_hz,
            mem_rate,
            fork_children,
            exec_children,
            log_file,
            problems,
        }
    }
}

impl Config {
    /// The sockets to try, in order.
    pub fn sockets(&self) -> Vec<PathBuf> {
        match (&self.socket, self.mode) {
            (Some(s), _) => vec![s.clone()],
            (None, Mode::Record) => Vec::new(),
            (None, Mode::Serve) => default_daemon_sockets(),
        }
    }
}

/// Where `anyprof serve` listens by default, in the order a process tries them: the user's
/// runtime directory, the system-wide `/run/anyprof.sock` (a root daemon), and
/// `/tmp/anyprof-UID.sock` when there is no runtime directory. Kept in step with the
/// daemon's own default.
pub fn default_daemon_sockets() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        out.push(PathBuf::from(dir).join("anyprof.sock"));
    }
    out.push(PathBuf::from("/run/anyprof.sock"));
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    out.push(PathBuf::from(format!("/tmp/anyprof-{uid}.sock")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Config {
        Config::from_lookup(|n| {
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn defaults_without_environment() {
        let c = with(&[]);
        assert_eq!(
            (c.socket, c.cpu_hz, c.problems.len()),
            (None, DEFAULT_CPU_HZ, 0)
        );
    }

    #[test]
    fn bad_values_fall_back_with_one_message_each() {
        let c = with(&[("ANYPROF_CPU_HZ", "fast")]);
        assert_eq!(c.cpu_hz, DEFAULT_CPU_HZ);
        assert_eq!(c.problems.len(), 1);
        assert!(c.problems[0].contains("ANYPROF_CPU_HZ=fast"));
        let c = with(&[("ANYPROF_CPU_HZ", "5000")]);
        assert_eq!(c.cpu_hz, MAX_CPU_HZ);
        assert_eq!(with(&[("ANYPROF_CPU_HZ", "0")]).cpu_hz, 0);
        let c = with(&[("ANYPROF_MEM_RATE", "lots")]);
        assert_eq!((c.mem_rate, c.problems.len()), (DEFAULT_MEM_RATE, 1));
        assert_eq!(with(&[("ANYPROF_MEM_RATE", "1MiB")]).mem_rate, 1 << 20);
        assert_eq!(with(&[("ANYPROF_MEM_RATE", "0")]).mem_rate, 0);
    }
}
