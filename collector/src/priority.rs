//! The collector's threads that only prepare (symbolizing ahead, heap snapshots, reading the
//! program's executable) run at idle priority while the program runs, so that they take only
//! CPU time the program leaves unused (issue 14, point 4).
//!
//! Idle is Linux's `SCHED_IDLE`: the thread runs when nothing else wants the CPU, and gets a
//! sliver (a weight of 3 against a normal thread's 1024) when everything does, so it is not
//! starved for ever. Where that policy is refused (a seccomp filter, a kernel without it),
//! `SCHED_BATCH` at nice 19 comes close. A thread can always lower itself; raising it back
//! needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows it, so [`Lowered::restore`] is best
//! effort:
//! the collector only raises threads once the program has exited, when an idle thread gets a
//! free CPU anyway unless other programs keep it busy.
//!
//! What stays at normal priority: the thread that reads a process's message ring (see
//! [`crate::region::pump`]). It wakes at most every 5 ms and decodes little, and if it
//! starved, the ring would fill and the process would drop samples. And every thread
//! `anyprof record` starts after the program exited, which writes the profiles.

/// What [`background`] did to a thread, and what it had before, to put back with
/// [`Lowered::restore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lowered {
    /// The kernel's id of the thread.
    pub tid: i32,
    /// The policy it is in now.
    pub now: Background,
    /// Its policy and nice value before (those `anyprof` was started with: `nice`, `chrt`).
    policy: i32,
    nice: i32,
}

/// Which policy [`background`] put the calling thread in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Background {
    /// `SCHED_IDLE`.
    Idle,
    /// `SCHED_BATCH` at nice 19 (`SCHED_IDLE` was refused).
    BatchNice19,
    /// Neither could be set: the thread keeps its priority.
    Unchanged,
}

/// The kernel's id of the calling thread.
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// Moves the calling thread to idle priority (see the module doc). Threads it starts
/// afterwards inherit that priority.
pub fn background() -> Lowered {
    let tid = current_tid();
    // SAFETY: pid 0 is the calling thread; no memory is passed.
    let policy = unsafe { libc::sched_getscheduler(0) };
    // SAFETY: PRIO_PROCESS with a tid reads that thread's nice value on Linux. -1 is also a
    // valid nice value, so errno would tell an error apart; an error leaves it at 0 below.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for a non-RT policy.
    let now = if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        Background::Idle
    } else {
        // SAFETY: as above.
        let batch = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } == 0;
        // SAFETY: PRIO_PROCESS with a tid sets that thread's nice value on Linux.
        let niced = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) } == 0;
        if batch || niced {
            Background::BatchNice19
        } else {
            Background::Unchanged
        }
    };
    Lowered {
        tid,
        now,
        policy: if policy < 0 {
            libc::SCHED_OTHER
        } else {
            policy
        },
        nice,
    }
}

impl Lowered {
    /// Puts the thread back in the policy and nice value it had before [`background`], if
    /// the kernel lets us (see the module doc); true if it did. Callable from any thread.
    pub fn restore(&self) -> bool {
        if self.now == Background::Unchanged {
            return true;
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is valid for the non-RT policy saved by `background`; a tid that
        // has exited gives ESRCH, nothing else happens.
        let policy = unsafe { libc::sched_setscheduler(self.tid, self.policy, &param) } == 0;
        // SAFETY: PRIO_PROCESS with a tid sets that thread's nice value; no memory passed.
        let nice =
            unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid as libc::id_t, self.nice) }
                == 0;
        policy && nice
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> i32 {
        // SAFETY: pid 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn a_thread_goes_idle_and_back_and_its_children_inherit() {
        std::thread::spawn(|| {
            let lowered = background();
            assert_eq!(lowered.now, Background::Idle);
            assert_eq!(policy(), libc::SCHED_IDLE);
            let child = std::thread::spawn(policy).join().unwrap();
            assert_eq!(child, libc::SCHED_IDLE, "threads started later inherit it");
            // Raising needs CAP_SYS_NICE or RLIMIT_NICE; the tests run as root.
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                assert!(std::thread::spawn(move || lowered.restore())
                    .join()
                    .unwrap());
                assert_eq!(policy(), libc::SCHED_OTHER);
            }
        })
        .join()
        .unwrap();
        assert_eq!(policy(), libc::SCHED_OTHER, "other threads keep theirs");
    }
}
