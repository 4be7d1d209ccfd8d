//! What the symbolizer answers for one address: an inline chain of frames, or a miss.

use crate::Miss;

/// The answer for one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Symbolized {
    /// The functions executing at the address. Never empty.
    ///
    /// Order: the innermost frame (the function that was inlined deepest) comes **first**, and
    /// the physical function — the one whose machine code contains the address — comes
    /// **last**. This is the order of pprof's `Location.line`. Every frame but the first has
    /// the file and line of the call site of the frame before it.
    Frames(Vec<Frame>),
    /// Nothing is known about the address, and why.
    Miss(Miss),
}

/// One function in an inline chain.
///
/// When the name came from a symbol table rather than from DWARF, only the two name fields are
/// set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The demangled name, as `c++filt` or `rustfilt` prints it: C++ with parameter types
    /// (`ns::Klass::method(int)`), Rust without the hash (`std::rt::lang_start`). Names that are
    /// not mangled are kept as they are.
    pub function: Option<String>,
    /// The name as it is stored in the object, mangled if the language mangles.
    pub raw_function: Option<String>,
    /// The full path of the source file, joined from the compilation directory and the line
    /// table's directory as the compiler recorded them.
    pub file: Option<String>,
    /// The 1-based source line; `None` when unknown (DWARF line 0).
    pub line: Option<u32>,
    /// The 1-based source column; `None` when unknown (DWARF column 0).
    pub column: Option<u32>,
}
