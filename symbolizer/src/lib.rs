//! Addresses in ELF objects to functions, source files, lines and inline frames.
//!
//! This crate knows nothing about profiles. It answers one question, in batches: *which
//! functions are executing at these addresses of this object file?* The answer for each address
//! is an inline chain ([`Symbolized::Frames`], innermost inlined callee first, the physical
//! function last — the order of pprof's `Location.line`) or a reason ([`Miss`]) that tells the
//! user what to do. A miss belongs to one address; it never fails the batch.
//!
//! # What the caller does
//!
//! - Convert runtime addresses to *file addresses* (SVMA) by subtracting the load bias of the
//!   object ([`RuntimeAddress::to_file`]; the address spaces are types, see [`FileAddress`]),
//!   and use *return address − 1* for every frame but the sampled one. That rule lives with
//!   the caller, once, because only it knows which addresses are return addresses.
//! - Pass the GNU build id the process loaded when it is known. A file on disk that was rebuilt
//!   since is then refused ([`Miss::BuildIdMismatch`]): wrong symbols are worse than none.
//! - Keep one [`Symbolizer`] for the whole run: it caches opened objects.
//!
//! # Where the answers come from
//!
//! 1. DWARF, read by `addr2line`, for functions, inline chains, files, lines and columns; from
//!    the object itself or from its separate debug file, found where gdb and perf look: by
//!    build id under the debug directories (`/usr/lib/debug/.build-id/xx/rest.debug`, where
//!    Debian's `-dbgsym` packages and `libc6-dbg` put them), by `.gnu_debuglink` (its CRC
//!    checked when build ids cannot tell), and at the object's own path under the debug
//!    directories; `dwz` supplementary files and split DWARF are followed too.
//! 2. debuginfod, for an object with a build id whose DWARF was not found locally, when the
//!    symbolizer is given servers ([`DebugSources`], usually from `DEBUGINFOD_URLS`): its
//!    debug file is downloaded by build id into the client cache that gdb and perf share,
//!    several objects in parallel, with the symbolizer's own rights (see
//!    [`DebuginfodConfig`]).
//! 3. Symbol tables, when DWARF does not cover the address (stripped or release-built
//!    libraries): the debug file's `.symtab`, then the object's `.symtab`, then its
//!    MiniDebugInfo (`.gnu_debugdata`, the xz-compressed symbol table Fedora and RHEL ship),
//!    then its `.dynsym`. A function name alone is better than an address.
//! 4. The stubs of the object's PLT, named `function@plt` from the relocations of the slots
//!    they jump through, as objdump and `perf report` name them.
//!
//! # Whose rights open the files
//!
//! Every file is opened once, without blocking, checked through its descriptor to be a regular
//! file, and mapped from that descriptor, or read from it when another user could change it
//! (a FIFO named like a debug file cannot hang the caller, nor a truncated file kill it). A collector running as root that symbolizes for another user's process passes that
//! process's [`Access`] ([`Symbolizer::symbolize_many_as`]): files are then opened with that
//! user's rights only, on the thread that opens them, and objects opened for one user are not
//! handed to another.
//!
//! Names are demangled by their mangling scheme: Rust (legacy and v0, without the hash) and
//! Itanium C++, as `c++filt` prints them; the raw name is kept beside the readable one.
//!
//! # What it is not for
//!
//! It does not read process memory, so the vdso and JIT code are a [`Miss::NoFile`]; it reads
//! ELF only. It allocates, does file I/O and, when given debuginfod servers, network I/O
//! freely: it runs in the collector, never in the profiled process, and a call that has to
//! download waits for it (each request within a timeout).
//!
//! # Why it is fast enough
//!
//! Files are mapped, not read (all but those another user could change in place). Opening an object reads its headers only; DWARF units are parsed
//! on the first address that falls in them, symbol tables on the first address DWARF cannot
//! name. Each distinct address of a batch is looked up once, in address order. Opened objects,
//! and failures to open them, are cached across calls (at most 128 objects, least recently
//! used closed first); an object whose file was replaced on disk is opened again. Batches in
//! several objects ([`Symbolizer::symbolize_many`]) are opened and answered on parallel
//! threads.
//!
//! # Limitations
//!
//! - A file truncated *in place* while it is mapped raises `SIGBUS`, as in every symbolizer
//!   that maps files. So only files that no one but root or the collector's own user can
//!   write to (owner root or our effective uid, not group- or other-writable, not on FUSE) are
//!   mapped, and only those users — who could kill the collector anyway — can raise it. Other
//!   files are read into memory from the opened descriptor, up to 1 GiB a file and 2 GiB held
//!   at once (past either, a [`Miss::FileUnreadable`] that says so); cutting one while it is
//!   read gives a miss, not a signal. Replacing a file by rename, as linkers and package
//!   managers do, is always safe.
//! - The `.gnu_debuglink` CRC is checked only when build ids cannot tell (either side has
//!   none): reading a whole debug file for it is not worth it when they can.
//! - debuginfod is asked for debug files only (not for executables or sources), one server
//!   after the other in `DEBUGINFOD_URLS` order; the `dwz` supplementary file of a downloaded
//!   debug file is looked for locally only. HTTPS is verified against the webpki roots
//!   compiled in, not the system's certificate store.
//!
//! # Example
//!
//! Symbolize a function of the running program: find its runtime address, convert it to a file
//! address with `/proc/self/maps` and the program headers, and look it up.
//!
//! ```
//! use std::path::Path;
//!
//! use anyprof_symbolizer::{ObjectRef, Symbolized, Symbolizer};
//! use object::{Object, ObjectSegment};
//!
//! #[inline(never)]
//! fn probe() -> u64 {
//!     std::hint::black_box(42)
//! }
//!
//! let runtime = probe as usize as u64;
//! // The mapping that holds `probe`: its start, its file offset and its file.
//! let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
//! let (start, offset, path) = maps
//!     .lines()
//!     .find_map(|line| {
//!         let fields: Vec<&str> = line.split_whitespace().collect();
//!         let (low, high) = fields.first()?.split_once('-')?;
//!         let low = u64::from_str_radix(low, 16).ok()?;
//!         let high = u64::from_str_radix(high, 16).ok()?;
//!         let offset = u64::from_str_radix(fields.get(2)?, 16).ok()?;
//!         let path = fields.get(5)?.to_string();
//!         (low..high).contains(&runtime).then_some((low, offset, path))
//!     })
//!     .expect("probe() lies in a file mapping");
//! // The file offset of `probe`, and the segment that says at which file address it belongs.
//! let file_offset = offset + (runtime - start);
//! let data = std::fs::read(&path).unwrap();
//! let elf = object::File::parse(&*data).unwrap();
//! let segment = elf
//!     .segments()
//!     .find(|s| {
//!         let (seg_offset, seg_size) = s.file_range();
//!         (seg_offset..seg_offset + seg_size).contains(&file_offset)
//!     })
//!     .unwrap();
//! let svma = segment.address() + (file_offset - segment.file_range().0);
//!
//! let mut symbolizer = Symbolizer::new();
//! let object = ObjectRef { path: Path::new(&path), build_id: &[] };
//! match &symbolizer.symbolize(&object, &[svma])[0] {
//!     Symbolized::Frames(frames) => {
//!         let physical = frames.last().unwrap();
//!         assert!(physical.function.as_deref().unwrap().ends_with("probe"));
//!     }
//!     Symbolized::Miss(miss) => panic!("{miss}"),
//! }
//! ```

mod access;
mod address;
mod cache;
mod debug_file;
mod debuginfod;
mod demangle;
mod dwarf;
mod elf;
mod loaded;
mod minidebug;
mod miss;
mod mmap;
mod panics;
mod plt;
mod symbolized;
mod symbolizer;
mod symtab;

pub use access::Access;
pub use address::{FileAddress, FileOffset, RuntimeAddress};
pub use debuginfod::{DebuginfodConfig, DAEMON_MAX_TIME};
pub use miss::Miss;
pub use symbolized::{Frame, Symbolized};
pub use symbolizer::{with_file_as, DebugSources, ObjectRef, Symbolizer};

#[cfg(test)]
mod tests {
    /// The collector may move a symbolizer to a worker thread.
    #[test]
    fn symbolizer_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<crate::Symbolizer>();
    }
}
