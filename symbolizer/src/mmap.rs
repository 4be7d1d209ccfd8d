//! The one place where this crate opens files, and maps them into memory or reads them.
//!
//! Every file the crate reads (objects, separate debug files, `dwz` supplementary files,
//! split-DWARF `.dwp` and `.dwo` files) is opened here, once: read-only, without blocking (a
//! FIFO or device behind a path, perhaps placed there by the profiled process's user, must not
//! hang the collector), close-on-exec; the *descriptor* is then checked to be a regular file,
//! and its contents are taken from that descriptor. Nothing is re-opened by path, so what was
//! checked is what is read. Symbolic links are followed: distributions ship debug files as
//! links under `/usr/lib/debug/.build-id/`. Whose rights the open uses is decided by the caller
//! (see [`crate::access`]).
//!
//! # Mapped or read
//!
//! A mapped file that is truncated *in place* raises `SIGBUS` in the process that touches a
//! page past its new end, and a signal cannot be turned into a [`crate::Miss`]: it kills the
//! collector, and a root `anyprof serve` with it, for every user. So a file is mapped only when
//! no one but root or the collector's own user can change it in place: by the `fstat` of the
//! opened descriptor it is owned by root or by our effective uid, it is neither group- nor
//! other-writable (with POSIX ACLs the group bits are the ACL mask, so a named user or group
//! with write access shows as group-writable), and it does not live on FUSE (whose server, run
//! by any user, says what the owner and the size are). Anything else — a library the profiled
//! process's user built in `/tmp`, a debug file in their home — is *read* into memory from the
//! same descriptor, at most [`MAX_READ`] bytes: truncating it while it is read only gives short
//! or garbled bytes, which the parsers turn into misses. Replacing a file by rename, as
//! linkers and package managers do, leaves a mapping intact.
//!
//! Read files are the collector's own memory, not page cache the kernel can take back, and a
//! user can make one that is mostly a hole (a sparse file costs no disk). So all files read
//! into memory and still held together stay under [`MAX_READ_TOTAL`]; past it a file is not
//! read (a miss that says so) until cached objects are closed.
//!
//! Either way the contents stay valid after the file is deleted, so a library that was
//! upgraded or removed while the profiled program ran can still be symbolized from the copy we
//! hold.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::Mmap;

/// The largest file read into memory (one that another user could change in place, so it is
/// not mapped): 1 GiB. Debug files of big programs come close, but a bigger one would hold a
/// gigabyte of the collector's memory per file for as long as it is cached.
pub(crate) const MAX_READ: u64 = 1 << 30;

/// The most bytes that all files read into memory and held at one time may take: 2 GiB.
pub(crate) const MAX_READ_TOTAL: u64 = 2 << 30;

/// Bytes of files read into memory and held now (each counted from its `fstat` length).
static READ_HELD: AtomicU64 = AtomicU64::new(0);

/// Which file a path named when it was read: a rebuilt or replaced file gets a new identity, so
/// cached results for the old one are dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
}

impl FileIdentity {
    fn of(meta: &Metadata) -> FileIdentity {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }

    /// The identity of what `path` names now, or `None` if it cannot be looked at (gone).
    pub(crate) fn current(path: &Path) -> Option<FileIdentity> {
        std::fs::metadata(path)
            .ok()
            .map(|meta| FileIdentity::of(&meta))
    }

    /// Whether both identities name the same inode (possibly at different times).
    pub(crate) fn same_inode(&self, other: &FileIdentity) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

/// Why a path could not be mapped or read.
#[derive(Debug)]
pub(crate) enum MapError {
    /// The path names a directory, device, FIFO or socket.
    NotAFile,
    /// Opening, inspecting, mapping or reading the file failed.
    Io(io::Error),
}

impl From<io::Error> for MapError {
    fn from(err: io::Error) -> MapError {
        MapError::Io(err)
    }
}

/// A whole file's contents, mapped read-only or read into memory (see the module doc for
/// which). Clones share them.
#[derive(Clone)]
pub(crate) struct MappedFile {
    contents: Arc<Contents>,
    identity: FileIdentity,
    /// Owned by root, writable by neither group nor others, not on FUSE (from the `fstat` of
    /// the descriptor it was read from).
    root_owned: bool,
}

enum Contents {
    /// Mapped: only root or our own user can change the file in place.
    Mapped(Mmap),
    /// Read into memory: someone else could truncate it in place. Also an empty file, which
    /// cannot be mapped.
    Read(Vec<u8>, #[allow(dead_code)] Reservation), // the reservation is held for its Drop
}

/// A share of [`MAX_READ_TOTAL`], given back when dropped. Also held for other memory made
/// from files (decompressed MiniDebugInfo), so that all of it together is bounded.
#[derive(Debug)]
pub(crate) struct Reservation(u64);

impl Reservation {
    /// `bytes` more of the total, or `None` if that would go over it.
    pub(crate) fn take(bytes: u64) -> Option<Reservation> {
        READ_HELD
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_add(bytes)
                    .filter(|&total| total <= MAX_READ_TOTAL)
            })
            .ok()
            .map(|_| Reservation(bytes))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        READ_HELD.fetch_sub(self.0, Ordering::SeqCst);
    }
}

impl MappedFile {
    /// Opens `path` (`O_RDONLY | O_NONBLOCK | O_CLOEXEC`), checks with `fstat` of that
    /// descriptor that it is a regular file, then maps that descriptor if only root or our own
    /// user can change the file in place, else reads it from that descriptor.
    pub(crate) fn open(path: &Path) -> Result<MappedFile, MapError> {
        // std opens with O_CLOEXEC always.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(MapError::NotAFile);
        }
        if !crate::access::may_read(&meta) {
            return Err(MapError::Io(io::Error::from(
                io::ErrorKind::PermissionDenied,
            )));
        }
        let root_owned = meta.uid() == 0 && meta.mode() & 0o022 == 0 && !on_fuse(&file)?;
        let contents = if meta.len() == 0 {
            Contents::Read(Vec::new(), Reservation(0))
        } else if only_trusted_can_change(&file, &meta)? {
            // SAFETY: the mapping is read-only and private to this process, and it is only ever
            // read as plain bytes. `Mmap::map` is unsafe because another process could change
            // the file while it is mapped: replacing it by rename (linkers, package managers)
            // leaves this mapping intact; truncating it in place would raise SIGBUS on access,
            // but only root or our own user can write to this file (checked just above on this
            // descriptor), and they can kill the collector anyway.
            Contents::Mapped(unsafe { Mmap::map(&file) }?)
        } else {
            let (data, reservation) = read_whole(&file, &meta)?;
            Contents::Read(data, reservation)
        };
        Ok(MappedFile {
            contents: Arc::new(contents),
            identity: FileIdentity::of(&meta),
            root_owned,
        })
    }

    /// Whether the file is owned by root, writable by neither group nor others, and not on
    /// FUSE, as `fstat` of the descriptor it was read from said.
    pub(crate) fn root_owned(&self) -> bool {
        self.root_owned
    }

    /// The file's contents.
    pub(crate) fn bytes(&self) -> &[u8] {
        match &*self.contents {
            Contents::Mapped(map) => map,
            Contents::Read(data, _) => data,
        }
    }

    /// The identity of the file as it was when it was opened.
    pub(crate) fn identity(&self) -> FileIdentity {
        self.identity
    }

    /// Whether the contents are mapped rather than read.
    #[cfg(test)]
    fn is_mapped(&self) -> bool {
        matches!(*self.contents, Contents::Mapped(_))
    }
}

/// Whether the opened `file` (whose `fstat` is `meta`) can be changed in place only by root or
/// by our effective user: then it may be mapped.
fn only_trusted_can_change(file: &File, meta: &Metadata) -> io::Result<bool> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if !may_map(meta.uid(), meta.mode(), euid) {
        return Ok(false);
    }
    // A FUSE server, which any user may run, reports whatever owner and mode it likes and can
    // shrink the file under a mapping.
    Ok(!on_fuse(file)?)
}

/// Whether the opened `file` is on a FUSE file system.
fn on_fuse(file: &File) -> io::Result<bool> {
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for as long as `file` lives; `fs` is a valid, writable
    // `statfs` that fstatfs fills in.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's and the constant's types vary by target
    Ok(fs.f_type as i64 == libc::FUSE_SUPER_MAGIC as i64)
}

/// Whether a file owned by `owner` with permission bits `mode` may be mapped by a process whose
/// effective uid is `euid`: owned by root or by `euid`, and neither group- nor other-writable.
fn may_map(owner: u32, mode: u32, euid: u32) -> bool {
    (owner == 0 || owner == euid) && mode & 0o022 == 0
}

/// The whole of the opened `file`, read from its start, at most its length at `fstat` time
/// (`meta`) and at most [`MAX_READ`] bytes, with its share of [`MAX_READ_TOTAL`]. A file that
/// shrinks meanwhile gives fewer bytes.
fn read_whole(file: &File, meta: &Metadata) -> Result<(Vec<u8>, Reservation), MapError> {
    let len = meta.len();
    if len > MAX_READ {
        return Err(MapError::Io(io::Error::other(format!(
            "it is {len} bytes, over the {} MiB read into memory from a file that a user other \
             than root or the collector's own can change (such files are not mapped); make it \
             owned by root and writable by its owner only, not on FUSE, so that it is mapped",
            MAX_READ >> 20
        ))));
    }
    let reservation = Reservation::take(len).ok_or_else(|| {
        io::Error::other(format!(
            "it is {len} bytes, and the collector already holds close to {} MiB of files read \
             into memory, the most it holds at once of files that a user other than root or \
             its own can change (such files are not mapped); try again once fewer objects are \
             open, or make the files owned by root and writable by their owner only so that \
             they are mapped",
            MAX_READ_TOTAL >> 20
        ))
    })?;
    // `len` is at most 1 GiB: it fits in usize on every target with 32-bit pointers or more.
    let mut data = Vec::with_capacity(len as usize);
    // The descriptor was just opened: it reads from offset 0.
    file.take(len).read_to_end(&mut data)?;
    Ok((data, reservation))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only root's or our own files that no group or other may write to are mapped.
    #[test]
    fn mapped_only_when_only_root_or_we_can_write() {
        let euid = 1000;
        assert!(may_map(0, 0o100644, euid));
        assert!(may_map(0, 0o100755, euid));
        assert!(may_map(euid, 0o100600, euid));
        assert!(may_map(0, 0o100444, euid));
        assert!(!may_map(65534, 0o100644, euid), "another user's file");
        assert!(!may_map(0, 0o100664, euid), "group-writable");
        assert!(!may_map(0, 0o100646, euid), "other-writable");
        assert!(!may_map(euid, 0o100666, euid));
        assert!(may_map(0, 0o100644, 0));
        assert!(
            !may_map(65534, 0o100444, 0),
            "read-only for the owner, who can chmod it"
        );
    }

    /// A file another user owns is read, not mapped, and gives the same bytes; our own is
    /// mapped. As root, the other user's file is made by chown; otherwise by mode 0666.
    #[test]
    fn other_users_files_are_read_into_memory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("anyprof-mmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("file");
        let contents: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        std::fs::write(&path, &contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

        let own = MappedFile::open(&path).unwrap();
        assert!(own.is_mapped());
        assert_eq!(own.bytes(), &contents[..]);

        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        } else {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        let theirs = MappedFile::open(&path).unwrap();
        assert!(!theirs.is_mapped());
        assert_eq!(theirs.bytes(), &contents[..]);

        std::fs::write(&path, b"").unwrap();
        assert!(MappedFile::open(&path).unwrap().bytes().is_empty());

        // Too big to read (a sparse file: nothing is written): refused before reading, and
        // the message says how to get it mapped instead.
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(MAX_READ + 1)
            .unwrap();
        match MappedFile::open(&path) {
            Err(MapError::Io(err)) => assert!(err.to_string().contains("owned by root"), "{err}"),
            Err(MapError::NotAFile) => panic!("a regular file"),
            Ok(_) => panic!("a file over the limit was read"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Shares of the total are refused past it and given back when dropped. (Other tests
    /// of this binary hold at most kilobytes meanwhile.)
    #[test]
    fn files_read_into_memory_share_one_budget() {
        let half = MAX_READ_TOTAL / 2 + 1;
        let first = Reservation::take(half).expect("half the budget is free");
        assert!(Reservation::take(half).is_none(), "over the total");
        drop(first);
        assert!(Reservation::take(half).is_some(), "given back when dropped");
    }
}
