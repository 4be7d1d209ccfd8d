//! Telling the user that the kernel's OOM killer ended the program.
//!
//! A program the OOM killer ends just dies of SIGKILL: nothing in its exit status says why,
//! and the kernel's own line goes to the kernel log, which the user of `anyprof record` may
//! not be allowed to read. Yet that is the first thing an OOM investigation needs to know.
//! Each memory cgroup counts the OOM kills of its processes (`oom_kill N` in cgroup v1's
//! `memory.oom_control` and in cgroup v2's `memory.events`), and the kernel counts them all
//! in `/proc/vmstat`.
//!
//! [`Watch::start`] follows the program's memory cgroup (the `memory` line of
//! `/proc/PID/cgroup` with cgroup v1, the `0::` line with v2) from the moment it is started,
//! and notes each cgroup's count when the program first appears in it: a program is often
//! moved into its cgroup just after it starts (`sh -c 'echo $$ > …/cgroup.procs; exec
//! prog'`, systemd-run, a container runtime), so it is polled often at first and rarely
//! later. [`Watch::finish`], called when the program has exited but is not reaped yet,
//! reads its cgroup one last time: if it died of SIGKILL and the cgroup's count (and the
//! kernel's) rose since, the OOM killer ended it, and [`OomKill::message`] says so with the
//! cgroup and its limit.
//!
//! Only the program itself (the process `record` started) is watched, not the processes it
//! starts. A SIGKILL from someone else at the very moment another process of the same cgroup
//! is OOM-killed would be reported as an OOM kill of the program; the kernel gives no way to
//! tell who sent a SIGKILL.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where cgroup v1's memory controller and the cgroup v2 hierarchy are mounted.
const V1_MEMORY_ROOT: &str = "/sys/fs/cgroup/memory";
const V2_ROOT: &str = "/sys/fs/cgroup";

/// Limits at or above this are "no limit" (cgroup v1 shows no limit as `PAGE_COUNTER_MAX`
/// pages in bytes, about 2^63).
const NO_LIMIT: u64 = 1 << 62;

/// A process's memory cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MemCgroup {
    /// Under cgroup v1's memory controller; the path as `/proc/PID/cgroup` gives it.
    V1(String),
    /// Under the cgroup v2 hierarchy.
    V2(String),
}

impl MemCgroup {
    /// The cgroup's path as the kernel names it (`/` is the root).
    pub fn path(&self) -> &str {
        match self {
            MemCgroup::V1(p) | MemCgroup::V2(p) => p,
        }
    }

    /// The cgroup's directory in the cgroup file system.
    fn dir(&self) -> PathBuf {
        let (root, path) = match self {
            MemCgroup::V1(p) => (V1_MEMORY_ROOT, p),
            MemCgroup::V2(p) => (V2_ROOT, p),
        };
        PathBuf::from(root).join(path.trim_start_matches('/'))
    }

    /// How many processes of this cgroup the OOM killer has ended, if the kernel says.
    fn oom_kills(&self) -> Option<u64> {
        let file = match self {
            MemCgroup::V1(_) => "memory.oom_control",
            MemCgroup::V2(_) => "memory.events",
        };
        let text = std::fs::read_to_string(self.dir().join(file)).ok()?;
        parse_oom_kill(&text)
    }

    /// The cgroup's own memory limit in bytes (`None`: none, or unreadable).
    fn limit(&self) -> Option<u64> {
        let file = match self {
            MemCgroup::V1(_) => "memory.limit_in_bytes",
            MemCgroup::V2(_) => "memory.max",
        };
        let text = std::fs::read_to_string(self.dir().join(file)).ok()?;
        parse_limit(&text)
    }
}

/// The memory cgroup in a `/proc/PID/cgroup` text: the v1 hierarchy whose controllers
/// include `memory`, else the v2 line `0::PATH` if the v2 hierarchy has the memory
/// controller (`v2_has_memory`).
pub fn parse_cgroup_file(text: &str, v2_has_memory: bool) -> Option<MemCgroup> {
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.split(',').any(|c| c == "memory") {
            return Some(MemCgroup::V1(path.to_string()));
        }
        if id == "0" && controllers.is_empty() {
            v2 = Some(MemCgroup::V2(path.to_string()));
        }
    }
    v2.filter(|_| v2_has_memory)
}

/// The `oom_kill N` line of `memory.oom_control` (v1), `memory.events` (v2) or
/// `/proc/vmstat`.
pub fn parse_oom_kill(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("oom_kill"))
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}

/// A limit file's value in bytes; `None` for no limit (`max`, or cgroup v1's huge number).
pub fn parse_limit(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok().filter(|&n| n < NO_LIMIT)
}

fn v2_has_memory() -> bool {
    std::fs::read_to_string(format!("{V2_ROOT}/cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "memory"))
}

/// The memory cgroup of process `pid` now (`None` if it cannot be read).
fn cgroup_of(pid: u32, v2_memory: bool) -> Option<MemCgroup> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    parse_cgroup_file(&text, v2_memory)
}

/// The kernel's count of OOM kills since boot.
fn system_oom_kills() -> Option<u64> {
    parse_oom_kill(&std::fs::read_to_string("/proc/vmstat").ok()?)
}

/// What the watcher saw: each cgroup the program was in, with its OOM-kill count then.
#[derive(Default)]
struct Seen {
    baselines: HashMap<MemCgroup, Option<u64>>,
    last: Option<MemCgroup>,
}

impl Seen {
    fn note(&mut self, cgroup: MemCgroup) {
        // cgroup v1 moves an exiting task to the root before it is a zombie: a move to the
        // root after another cgroup is taken for that (a program that really moves itself
        // to the root is then followed no further).
        let exiting = cgroup.path() == "/" && self.last.as_ref().is_some_and(|l| l.path() != "/");
        if !exiting && self.last.as_ref() != Some(&cgroup) {
            let kills = cgroup.oom_kills();
            self.baselines.entry(cgroup.clone()).or_insert(kills);
            self.last = Some(cgroup);
        }
    }
}

/// Follows one process's memory cgroup from its start to its end.
pub struct Watch {
    pid: u32,
    v2_memory: bool,
    system_before: Option<u64>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the watcher reads the program's cgroup: every 5 ms for its first second (when
/// a launcher moves it), then every 50 ms for two more, then every 250 ms.
fn poll_interval(since_start: Duration) -> Duration {
    if since_start < Duration::from_secs(1) {
        Duration::from_millis(5)
    } else if since_start < Duration::from_secs(3) {
        Duration::from_millis(50)
    } else {
        Duration::from_millis(250)
    }
}

impl Watch {
    /// Starts following process `pid` (just started by us).
    pub fn start(pid: u32) -> Watch {
        let v2_memory = v2_has_memory();
        let system_before = system_oom_kills();
        let seen = Arc::new(Mutex::new(Seen::default()));
        if let (Some(cgroup), Ok(mut s)) = (cgroup_of(pid, v2_memory), seen.lock()) {
            s.note(cgroup);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::Builder::new()
                .name("oom-watch".into())
                .spawn(move || {
                    let started = Instant::now();
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::park_timeout(poll_interval(started.elapsed()));
                        let Some(cgroup) = cgroup_of(pid, v2_memory) else {
                            continue;
                        };
                        if let Ok(mut s) = seen.lock() {
                            s.note(cgroup);
                        }
                    }
                })
                .ok()
        };
        Watch {
            pid,
            v2_memory,
            system_before,
            seen,
            stop,
            thread,
        }
    }

    /// Stops watching. Call it once the program has exited and before it is reaped (with
    /// cgroup v2 its `/proc/PID` still names its cgroup); `killed_by_sigkill` says how it
    /// died. Returns the OOM kill, if that is what ended it.
    pub fn finish(mut self, killed_by_sigkill: bool) -> Option<OomKill> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
        if !killed_by_sigkill {
            return None;
        }
        let seen = self.seen.lock().ok()?;
        // Its cgroup at death: the zombie's /proc/PID may still name it (cgroup v2), but
        // cgroup v1 has already moved an exited task to the root; then the last one the
        // watcher saw.
        let cgroup = cgroup_of(self.pid, self.v2_memory)
            .filter(|c| c.path() != "/")
            .or_else(|| seen.last.clone())?;
        // A cgroup it moved into after the last poll has no count from before: None.
        let before = seen.baselines.get(&cgroup).copied().flatten();
        let after = cgroup.oom_kills();
        let cgroup_says = match (before, after) {
            (Some(b), Some(a)) => Some(a > b),
            // Never seen with a readable count: only a count that is not 0 can be ours.
            (None, Some(a)) => Some(a > 0),
            (_, None) => None,
        };
        let system_says = match (self.system_before, system_oom_kills()) {
            (Some(b), Some(a)) => Some(a > b),
            _ => None,
        };
        let killed = match (cgroup_says, system_says) {
            (Some(c), Some(s)) => c && s,
            (Some(one), None) | (None, Some(one)) => one,
            (None, None) => false,
        };
        let name = std::fs::read_to_string(format!("/proc/{}/comm", self.pid))
            .map(|n| n.trim_end().to_string())
            .unwrap_or_default();
        killed.then(|| OomKill {
            pid: self.pid,
            name,
            limit: cgroup.limit(),
            cgroup: cgroup.path().to_string(),
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = &self.thread {
            thread.thread().unpark();
        }
    }
}

/// A process the kernel's OOM killer ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OomKill {
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub name: String,
    /// Its memory cgroup's path.
    pub cgroup: String,
    /// That cgroup's own limit in bytes, if it has one.
    pub limit: Option<u64>,
}

impl OomKill {
    /// The line `record` prints (after `anyprof: `).
    pub fn message(&self) -> String {
        let limit = match self.limit {
            Some(bytes) => format!("limit {} MiB", bytes >> 20),
            None => "no limit of its own".to_string(),
        };
        format!(
            "process {} ({}) was killed by the kernel's OOM killer (memory cgroup {}, {limit})",
            self.pid, self.name, self.cgroup
        )
    }
}

/// Waits until process `pid` (a child of ours) has exited, without reaping it, so that its
/// `/proc/PID` can still be read. Returns whether SIGKILL ended it.
pub fn wait_exited_unreaped(pid: u32) -> std::io::Result<bool> {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-buffer for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes into `info`, which lives across the call; WNOWAIT leaves the
        // child to be reaped by the caller's own wait.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            // SAFETY: after a successful waitid for an exited child, si_status is set.
            let status = unsafe { info.si_status() };
            return Ok(info.si_code == libc::CLD_KILLED && status == libc::SIGKILL);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_line_of_v1_wins_and_v2_needs_the_controller() {
        let hybrid = "12:pids:/x\n4:cpu,cpuacct:/y\n7:memory:/user.slice/test-1\n0::/unified/z\n";
        assert_eq!(
            parse_cgroup_file(hybrid, true),
            Some(MemCgroup::V1("/user.slice/test-1".into()))
        );
        let pure_v2 = "0::/system.slice/app.service\n";
        assert_eq!(
            parse_cgroup_file(pure_v2, true),
            Some(MemCgroup::V2("/system.slice/app.service".into()))
        );
        assert_eq!(parse_cgroup_file(pure_v2, false), None);
        assert_eq!(parse_cgroup_file("garbage\n", true), None);
        // A path may contain ':'.
        assert_eq!(
            parse_cgroup_file("3:memory:/a:b\n", false),
            Some(MemCgroup::V1("/a:b".into()))
        );
    }

    #[test]
    fn oom_kill_counts_are_read_from_v1_v2_and_vmstat() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_oom_kill(v1), Some(3));
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kill(v2), Some(1));
        assert_eq!(parse_oom_kill("oom_kill_disable 0\n"), None);
        assert_eq!(parse_oom_kill("pgfault 9\noom_kill 17\n"), Some(17));
    }

    #[test]
    fn limits_of_max_or_page_counter_max_are_no_limit() {
        assert_eq!(parse_limit("268435456\n"), Some(256 << 20));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
    }

    #[test]
    fn the_message_names_pid_command_cgroup_and_limit() {
        let kill = OomKill {
            pid: 42,
            name: "grow".into(),
            cgroup: "/anyprof-test".into(),
            limit: Some(256 << 20),
        };
        assert_eq!(
            kill.message(),
            "process 42 (grow) was killed by the kernel's OOM killer (memory cgroup \
             /anyprof-test, limit 256 MiB)"
        );
    }

    #[test]
    fn polling_is_frequent_at_first_then_rare() {
        assert_eq!(poll_interval(Duration::ZERO), Duration::from_millis(5));
        assert_eq!(
            poll_interval(Duration::from_secs(2)),
            Duration::from_millis(50)
        );
        assert_eq!(
            poll_interval(Duration::from_secs(60)),
            Duration::from_millis(250)
        );
    }
}
