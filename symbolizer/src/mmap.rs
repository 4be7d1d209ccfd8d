//! The one place where this crate opens files, and maps them into memory.
//!
//! Every file the crate reads (objects, separate debug files, `dwz` supplementary files,
//! split-DWARF `.dwp` and `.dwo` files) is opened here, once: read-only, without blocking (a
//! FIFO or device behind a path, perhaps placed there by the profiled process's user, must not
//! hang the collector), close-on-exec; the *descriptor* is then checked to be a regular file
//! and mapped whole. Nothing is re-opened by path, so what was checked is what is read.
//! Symbolic links are followed: distributions ship debug files as links under
//! `/usr/lib/debug/.build-id/`. Whose rights the open uses is decided by the caller (see
//! [`crate::access`]).
//!
//! The mapping stays valid after the file is deleted, so a library that was upgraded or
//! removed while the profiled program ran can still be symbolized from the copy we hold.

use std::fs::{Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

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

/// Why a path could not be mapped.
#[derive(Debug)]
pub(crate) enum MapError {
    /// The path names a directory, device, FIFO or socket.
    NotAFile,
    /// Opening, inspecting or mapping the file failed.
    Io(io::Error),
}

impl From<io::Error> for MapError {
    fn from(err: io::Error) -> MapError {
        MapError::Io(err)
    }
}

/// A whole file mapped read-only. Clones share the mapping.
#[derive(Clone)]
pub(crate) struct MappedFile {
    /// `None` for an empty file, which cannot be mapped.
    map: Option<Arc<Mmap>>,
    identity: FileIdentity,
}

impl MappedFile {
    /// Opens `path` and maps all of it: `O_RDONLY | O_NONBLOCK | O_CLOEXEC`, then `fstat` of
    /// that descriptor must show a regular file, then that descriptor is mapped.
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
        let map = if meta.len() == 0 {
            None
        } else {
            // SAFETY: the mapping is read-only and private to this process, and it is only ever
            // read as plain bytes. `Mmap::map` is unsafe because another process could change
            // the file while it is mapped; object files are replaced by rename (linkers, package
            // managers), which leaves this mapping intact. A file truncated in place would raise
            // SIGBUS on access, the same risk every symbolizer that maps files (gdb, perf,
            // addr2line) takes; it is listed as a limitation in the crate docs.
            Some(Arc::new(unsafe { Mmap::map(&file) }?))
        };
        Ok(MappedFile {
            map,
            identity: FileIdentity::of(&meta),
        })
    }

    /// The file's contents.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.map.as_deref().map_or(&[], |map| &map[..])
    }

    /// The identity of the file as it was when it was mapped.
    pub(crate) fn identity(&self) -> FileIdentity {
        self.identity
    }
}
