//! Settings, read once from `ANYPROF_*` environment variables when the library starts, and
//! the list of sockets to try.
//!
//! A bad value never stops the program: the default is used and one clear message explains
//! what was wrong (sent to the collector, which prints it).
//!
//! **Secure execution.** In a process the kernel marks `AT_SECURE` (setuid or setgid
//! programs, file capabilities, some LSM transitions) the environment belongs to the caller,
//! who may be less privileged than the process. There the library ignores every `ANYPROF_*`
//! variable and `XDG_RUNTIME_DIR`, opens no path taken from the environment (no log file),
//! leaves `LD_PRELOAD` as it is, runs in serve mode with the default rates, and talks only to a
//! root daemon at [`SYSTEM_SOCKET`]: the socket file and its directory must be owned by root
//! (the directory not writable by group or others) and the peer must be uid 0
//! (see [`crate::drain::connect`]).
//!
//! **Where sockets are looked for** (serve mode, no `ANYPROF_SOCKET`): `$XDG_RUNTIME_DIR/
//! anyprof.sock`, [`SYSTEM_SOCKET`], and `/tmp/anyprof-UID/anyprof.sock` (a private directory
//! the daemon creates with mode 0700). Never a path directly in a world-writable directory.
//!
//! World: constructor (may allocate; never read again after start).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyprof_wire::DEFAULT_MEM_RATE;

use crate::threads::CpuSource;

/// Default CPU sampling rate, as Go's `runtime/pprof`.
pub const DEFAULT_CPU_HZ: u32 = 100;
/// Highest rate accepted. Per-thread CPU timers are serviced from the scheduler tick, so the
/// kernel caps the effective rate at CONFIG_HZ (often 250) anyway.
pub const MAX_CPU_HZ: u32 = 1000;

/// The system-wide daemon's socket (`anyprof serve` run as root).
pub const SYSTEM_SOCKET: &str = "/run/anyprof.sock";

/// True when the kernel marked this process for secure execution (`AT_SECURE`: setuid,
/// setgid, file capabilities): then the environment is not to be trusted.
pub fn secure_execution() -> bool {
    // SAFETY: getauxval only reads the auxiliary vector; it returns 0 for a missing entry.
    unsafe { libc::getauxval(libc::AT_SECURE) != 0 }
}

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
    /// `ANYPROF_CPU_SOURCE`: `timer` (default) or `perf` (perf events where allowed) — what
    /// triggers CPU samples (see [`crate::threads::CpuSource`]).
    pub cpu_source: CpuSource,
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
    /// A secure-execution process (see the module doc): nothing above came from the
    /// environment, and only a root daemon at [`SYSTEM_SOCKET`] is trusted.
    pub secure: bool,
    /// `XDG_RUNTIME_DIR` (not in a secure-execution process): where a per-user daemon listens.
    pub runtime_dir: Option<PathBuf>,
}

impl Config {
    /// Reads the settings from the environment, unless this is a secure-execution process.
    pub fn from_env() -> Config {
        Self::from_lookup(|name| std::env::var_os(name), secure_execution())
    }

    /// Reads the settings through `get` (separate for tests). With `secure`, `get` is never
    /// called: every setting is the default and only the system daemon is tried.
    pub fn from_lookup(get: impl Fn(&str) -> Option<OsString>, secure: bool) -> Config {
        if secure {
            return Config {
                mode: Mode::Serve,
                socket: None,
                cpu_hz: DEFAULT_CPU_HZ,
                cpu_source: CpuSource::Timer,
                mem_rate: DEFAULT_MEM_RATE,
                fork_children: true,
                exec_children: true, // leaves LD_PRELOAD untouched
                log_file: None,
                problems: Vec::new(),
                secure: true,
                runtime_dir: None,
            };
        }
        let runtime_dir = get("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from);
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
        let cpu_source = match get("ANYPROF_CPU_SOURCE")
            .as_deref()
            .and_then(|m| m.to_str())
        {
            None | Some("") | Some("timer") => CpuSource::Timer,
            Some("perf") => CpuSource::Perf,
            Some(other) => {
                problems.push(format!(
                    "ANYPROF_CPU_SOURCE={other} is not `timer` or `perf`; using timer"
                ));
                CpuSource::Timer
            }
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
            cpu_source,
            mem_rate,
            fork_children,
            exec_children,
            log_file,
            problems,
            secure: false,
            runtime_dir,
        }
    }
}

impl Config {
    /// The sockets to try, in order. `own_uid` is the effective uid the process started with
    /// (the private directory's name).
    pub fn sockets(&self, own_uid: u32) -> Vec<PathBuf> {
        if self.secure {
            return vec![PathBuf::from(SYSTEM_SOCKET)];
        }
        match (&self.socket, self.mode) {
            (Some(s), _) => vec![s.clone()],
            (None, Mode::Record) => Vec::new(),
            (None, Mode::Serve) => default_daemon_sockets(self.runtime_dir.as_deref(), own_uid),
        }
    }
}

/// Where `anyprof serve` listens by default, in the order a process tries them: the user's
/// runtime directory, the system-wide [`SYSTEM_SOCKET`] (a root daemon), and the private
/// directory a daemon without a runtime directory creates, [`private_socket_dir`]. Kept in
/// step with the daemon's own default (`collector/src/serve/mod.rs`).
pub fn default_daemon_sockets(runtime_dir: Option<&Path>, own_uid: u32) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = runtime_dir {
        out.push(dir.join("anyprof.sock"));
    }
    out.push(PathBuf::from(SYSTEM_SOCKET));
    out.push(private_socket_dir(own_uid).join("anyprof.sock"));
    out
}

/// `/tmp/anyprof-UID`: the directory (mode 0700, owned by UID) where a daemon of UID without
/// `XDG_RUNTIME_DIR` puts its socket. Its ownership and mode are checked before every use.
pub fn private_socket_dir(uid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/anyprof-{uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        |n| {
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| OsString::from(v))
        }
    }

    fn with(vars: &[(&str, &str)]) -> Config {
        Config::from_lookup(lookup(vars), false)
    }

    const HOSTILE: &[(&str, &str)] = &[
        ("ANYPROF_MODE", "bogus"),
        ("ANYPROF_SOCKET", "/home/attacker/listen.sock"),
        ("ANYPROF_LOG_FILE", "/etc/ld.so.preload"),
        ("ANYPROF_CPU_HZ", "1000"),
        ("ANYPROF_MEM_RATE", "1"),
        ("ANYPROF_FORK", "off"),
        ("ANYPROF_EXEC", "off"),
        ("XDG_RUNTIME_DIR", "/home/attacker"),
    ];

    #[test]
    fn secure_execution_ignores_the_environment() {
        let asked = std::cell::Cell::new(0);
        let c = Config::from_lookup(
            |n| {
                asked.set(asked.get() + 1);
                lookup(HOSTILE)(n)
            },
            true,
        );
        assert_eq!(
            asked.get(),
            0,
            "a secure process must not read its environment"
        );
        assert!(c.secure);
        assert_eq!(c.mode, Mode::Serve);
        assert_eq!((c.socket, c.log_file, c.runtime_dir), (None, None, None));
        assert_eq!((c.cpu_hz, c.mem_rate), (DEFAULT_CPU_HZ, DEFAULT_MEM_RATE));
        assert!(
            c.fork_children && c.exec_children,
            "LD_PRELOAD must stay untouched"
        );
        assert!(
            c.problems.is_empty(),
            "no caller-chosen text reaches any log"
        );
        let c = Config::from_lookup(lookup(HOSTILE), true);
        assert_eq!(c.sockets(1000), vec![PathBuf::from(SYSTEM_SOCKET)]);
        assert_eq!(c.sockets(0), vec![PathBuf::from(SYSTEM_SOCKET)]);
    }

    #[test]
    fn the_same_environment_is_obeyed_without_secure_execution() {
        let c = Config::from_lookup(lookup(HOSTILE), false);
        assert!(!c.secure);
        assert_eq!(
            c.sockets(1000),
            vec![PathBuf::from("/home/attacker/listen.sock")]
        );
        assert_eq!(c.log_file, Some(PathBuf::from("/etc/ld.so.preload")));
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
    }

    #[test]
    fn default_sockets_avoid_world_writable_directories() {
        let c = with(&[("XDG_RUNTIME_DIR", "/run/user/1000")]);
        assert_eq!(
            c.sockets(1000),
            vec![
                PathBuf::from("/run/user/1000/anyprof.sock"),
                PathBuf::from("/run/anyprof.sock"),
                PathBuf::from("/tmp/anyprof-1000/anyprof.sock"),
            ]
        );
        let c = with(&[]);
        assert_eq!(
            c.sockets(0),
            vec![
                PathBuf::from("/run/anyprof.sock"),
                PathBuf::from("/tmp/anyprof-0/anyprof.sock"),
            ]
        );
        assert!(with(&[("ANYPROF_MODE", "record")]).sockets(0).is_empty());
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
