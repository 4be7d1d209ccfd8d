//! The one place where this crate maps files into memory.
//!
//! Object files are opened read-only and without blocking (a FIFO or device behind a path must
//! not hang the collector), checked to be regular files, and mapped whole. The mapping stays
//! valid after the file is deleted, so a library that was upgraded or removed while the profiled
//! program ran can still be symbolized from the copy we hold.
//!
//! The DWARF side of the crate is read through `addr2line::Loader`, which maps the file it is
//! given by itself; everything else (ELF headers, symbol tables, debug-file probing) reads the
//! bytes mapped here.

use std::fs::{Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

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

/// A whole file mapped read-only.
pub(crate) struct MappedFile {
    /// `None` for an empty file, which cannot be mapped.
    map: Option<Mmap>,
    identity: FileIdentity,
}

impl MappedFile {
    /// Opens `path` and maps all of it.
    pub(crate) fn open(path: &Path) -> Result<MappedFile, MapError> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(MapError::NotAFile);
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
            Some(unsafe { Mmap::map(&file) }?)
        };
        Ok(MappedFile {
            map,
            identity: FileIdentity::of(&meta),
        })
    }

    /// The file's contents.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The identity of the file as it was when it was mapped.
    pub(crate) fn identity(&self) -> FileIdentity {
        self.identity
    }
}
