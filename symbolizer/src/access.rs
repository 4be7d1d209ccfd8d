//! Whose file-system rights a lookup uses, and the per-thread switch to them.
//!
//! A collector that runs as root symbolizes for processes of other users. The paths it opens
//! come from those processes (a module's path, and everything found from it: debug files,
//! `dwz` supplementary files, split-DWARF `.dwp`/`.dwo` files), so it must not read a file for
//! a process whose user could not read it: a process of `nobody` that names `/root/secret.so`
//! must not get its function names. Root's own rights are the wrong ones to open with.
//!
//! The switch is Linux's file-system credentials: `setfsuid`, `setfsgid` and `setgroups`
//! issued as raw system calls change only the calling *thread* (glibc's wrappers of
//! `setgroups` and friends signal every thread of the process to change together, which is
//! not wanted here). The kernel then checks every path component's search permission and the
//! file's read permission as that user would be checked, ACLs included; and while the fsuid
//! is not 0, root's `CAP_DAC_OVERRIDE` and `CAP_DAC_READ_SEARCH` do not apply. The previous
//! credentials come back when the [`Switched`] guard is dropped.
//!
//! Only a collector whose effective uid is 0 switches, and only for users other than root. A
//! collector running as a normal user opens files as itself for its own processes (`anyprof
//! record`) and root's; for another user's process (a daemon started with `--allow-uid`) it
//! cannot take that user's rights, so it checks each opened file's permission bits against
//! them instead (owner, group, others; not ACLs, nor the directories on the way).

use std::io;

/// The file-system identity to open files with on behalf of one process: its uid, gid and
/// supplementary groups (as `SO_PEERCRED` and `/proc/PID/status` give them).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub groups: Vec<u32>,
}

impl Access {
    /// The access of a process with these credentials. Groups are sorted so that two
    /// processes of the same user and groups share cached objects.
    pub fn new(uid: u32, gid: u32, mut groups: Vec<u32>) -> Access {
        groups.sort_unstable();
        groups.dedup();
        Access { uid, gid, groups }
    }

    /// Whether files opened for this process are opened with our own rights unchanged: it
    /// is our own user's, or root's (root may read them all anyway).
    pub(crate) fn is_own(&self) -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        self.uid == euid || self.uid == 0
    }

    /// Whether the permission bits of `meta` let this user read the file (owner class, then
    /// group class, then others, as the kernel decides; ACLs are not looked at).
    pub(crate) fn may_read(&self, meta: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        let mode = meta.mode();
        if meta.uid() == self.uid {
            mode & 0o400 != 0
        } else if meta.gid() == self.gid || self.groups.contains(&meta.gid()) {
            mode & 0o040 != 0
        } else {
            mode & 0o004 != 0
        }
    }
}

/// Files opened on this thread are opened for another user's process until it is dropped.
pub(crate) enum Rights {
    /// Root switched this thread's file-system credentials to the user's.
    Switched(#[allow(dead_code)] Switched), // held for its Drop
    /// Not root: this thread cannot take the user's rights, so each opened file's permission
    /// bits are checked against them (see [`check_as`]).
    Checked,
}

impl Drop for Rights {
    fn drop(&mut self) {
        if let Rights::Checked = self {
            CHECK_AS.with(|c| c.borrow_mut().take());
        }
    }
}

std::thread_local! {
    /// The user whose permission bits files opened on this thread must grant read access to.
    static CHECK_AS: std::cell::RefCell<Option<Access>> = const { std::cell::RefCell::new(None) };
}

/// Makes the calling thread open files for `access` (which is not [`Access::is_own`]) until
/// the guard is dropped: with its credentials when this process is root, else checking each
/// file's permission bits against them.
pub(crate) fn act_as(access: &Access) -> io::Result<Rights> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return switch_to(access).map(Rights::Switched);
    }
    CHECK_AS.with(|c| *c.borrow_mut() = Some(access.clone()));
    Ok(Rights::Checked)
}

/// Whether the file behind `meta`, just opened on this thread, may be read for the user this
/// thread acts for (always, when it acts for no one or has taken the user's credentials).
pub(crate) fn may_read(meta: &std::fs::Metadata) -> bool {
    CHECK_AS.with(|c| {
        c.borrow()
            .as_ref()
            .is_none_or(|access| access.may_read(meta))
    })
}

/// The calling thread's file-system credentials as they were before a switch; restores them
/// when dropped.
pub(crate) struct Switched {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<libc::gid_t>,
}

/// Makes the calling thread open files as `access` until the guard is dropped.
pub(crate) fn switch_to(access: &Access) -> io::Result<Switched> {
    let groups = current_groups()?;
    let fsgid = set_fsgid(u32::MAX); // -1: no change, returns the current value
    let fsuid = set_fsuid(u32::MAX);
    let previous = Switched {
        fsuid,
        fsgid,
        groups,
    };
    // Groups first: the thread still has CAP_SETGID (setfsuid to non-zero drops only the
    // file capabilities, but the order keeps every step plainly permitted).
    set_groups(&access.groups)?;
    set_fsgid(access.gid);
    set_fsuid(access.uid);
    // setfsuid and setfsgid report no errors: read the values back.
    if set_fsuid(u32::MAX) != access.uid || set_fsgid(u32::MAX) != access.gid {
        drop(previous);
        return Err(io::Error::other(format!(
            "cannot take uid {} and gid {} for opening files (setfsuid/setfsgid refused)",
            access.uid, access.gid
        )));
    }
    Ok(previous)
}

impl Drop for Switched {
    fn drop(&mut self) {
        set_fsuid(self.fsuid);
        set_fsgid(self.fsgid);
        // Cannot fail for a thread that could set them before (it has CAP_SETGID again once
        // its fsuid is back); a failure would leave the thread with fewer groups, not more.
        let _ = set_groups(&self.groups);
    }
}

fn set_fsuid(uid: u32) -> u32 {
    // SAFETY: setfsuid takes a plain integer and changes only this thread's fsuid; it returns
    // the previous fsuid (or the current one for an invalid id such as -1).
    unsafe { libc::syscall(libc::SYS_setfsuid, uid as libc::c_long) as u32 }
}

fn set_fsgid(gid: u32) -> u32 {
    // SAFETY: as for setfsuid, for the thread's fsgid.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid as libc::c_long) as u32 }
}

fn set_groups(groups: &[u32]) -> io::Result<()> {
    // SAFETY: the raw system call (not glibc's wrapper, which changes every thread) reads
    // `groups.len()` gids from a valid slice and changes only this thread's groups.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            groups.len() as libc::c_long,
            groups.as_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn current_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: a size of 0 only asks for the count.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0; n as usize];
    // SAFETY: `groups` has room for `n` gids. getgroups reads the calling thread's groups.
    let n = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(n as usize);
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Owner class first, then group class (primary or supplementary), then others.
    #[test]
    fn permission_bits_are_read_as_the_kernel_does() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let path = std::env::temp_dir().join(format!("anyprof-bits-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let meta = |mode| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            std::fs::metadata(&path).unwrap()
        };
        let m = meta(0o640);
        let (owner, group) = (m.uid(), m.gid());
        let stranger = Access::new(owner.wrapping_add(1000), group.wrapping_add(1000), vec![]);
        let member = Access::new(owner.wrapping_add(1000), 4242, vec![group]);
        assert!(Access::new(owner, 4242, vec![]).may_read(&m));
        assert!(member.may_read(&m));
        assert!(!stranger.may_read(&m));
        assert!(stranger.may_read(&meta(0o604)));
        // The owner class decides for the owner, even when others may read.
        assert!(!Access::new(owner, group, vec![]).may_read(&meta(0o044)));
        std::fs::remove_file(&path).unwrap();
    }

    /// As root: a file only root may read cannot be opened after switching to `nobody`, and
    /// can again once the guard is gone; other threads keep root's rights meanwhile.
    #[test]
    fn switch_is_per_thread_and_undone() {
        let access = Access::new(65534, 65534, vec![]);
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: nothing to test");
            return;
        }
        let dir = std::env::temp_dir().join(format!("anyprof-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, b"x").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        // A thread started before the switch (a thread started by a switched thread would
        // inherit its credentials) tries while this one is switched.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|s| {
            let secret = &secret;
            let other = s.spawn(move || {
                wait.recv().unwrap();
                std::fs::File::open(secret).is_ok()
            });
            let _guard = switch_to(&access).unwrap();
            assert!(std::fs::File::open(secret).is_err());
            go.send(()).unwrap();
            assert!(
                other.join().unwrap(),
                "another thread must keep its own rights"
            );
        });
        assert!(std::fs::File::open(&secret).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
