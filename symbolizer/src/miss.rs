//! Why an address could not be symbolized.
//!
//! A miss is an answer for one address, not an error for the batch: the caller keeps the address
//! and shows the reason. Each message says what the user can do about it.

use thiserror::Error;

/// The reason one address has no frames.
///
/// Reasons that concern the whole object (the file is missing, not ELF, rebuilt) are given for
/// every address in that object; [`Miss::OutsideObject`] and [`Miss::NoSymbol`] are per address.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum Miss {
    /// The mapping has no file behind it: an empty path, `[vdso]`, `[heap]`, `linux-vdso.so.1`,
    /// `//anon`, a memfd, or a device such as `/dev/zero`.
    #[error(
        "no object file backs this mapping (vdso, JIT or anonymous memory); \
         there is nothing on disk to read symbols from"
    )]
    NoFile,
    /// The file could not be opened or mapped; the text is the operating system's reason.
    #[error(
        "cannot read the object file ({0}); make sure it still exists and is readable by the \
         user running the symbolizer (it may have been deleted or upgraded since the program ran)"
    )]
    FileUnreadable(String),
    /// The file is readable but is not an ELF object.
    #[error(
        "the file is not an ELF object; check that the path names the loaded binary or shared \
         library and not a script or a linker script"
    )]
    NotElf,
    /// The file starts like ELF but its headers or tables could not be parsed (truncated or
    /// corrupt); the text is the parser's reason.
    #[error(
        "the ELF file is truncated or corrupt ({0}); reinstall or rebuild it, then profile again"
    )]
    MalformedElf(String),
    /// The file on disk has a different GNU build id than the one the profiled process loaded.
    #[error(
        "the file on disk has a different build id than the one the process loaded: it was \
         rebuilt or upgraded after the program started; profile again with the current binary"
    )]
    BuildIdMismatch,
    /// The address lies outside every loadable segment of the object.
    #[error(
        "the address lies outside every loadable segment of the object; it was probably \
         converted with the wrong load bias, or the mapping belongs to another file"
    )]
    OutsideObject,
    /// Reading the file made the symbolizer panic: a bug, in it or in a parser it uses, met
    /// on this file (most likely a malformed one). The text is the panic's message. The
    /// other files are not affected.
    #[error(
        "the symbolizer failed on this file ({0}); this is a bug in anyprof: please report          it with the file. Addresses in it are left unnamed (go tool pprof can name them          from the file)"
    )]
    SymbolizerPanicked(String),
    /// Neither debug info nor any symbol table covers the address.
    #[error(
        "no debug info or symbol covers this address; install the debug info for this file \
         (e.g. the -dbgsym/-debuginfo package) or build it with -g and without stripping"
    )]
    NoSymbol,
}
