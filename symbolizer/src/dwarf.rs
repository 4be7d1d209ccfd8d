//! Inline chains from DWARF, through `addr2line`.
//!
//! `addr2line::Loader` maps the file that holds the DWARF (the object itself or its separate
//! debug file), optionally a `dwz` supplementary file, and split-DWARF `.dwo`/`.dwp` files next
//! to it, and parses units lazily on first use. A failure to load only means no DWARF: the
//! caller falls back to symbol tables.

use std::path::Path;

use addr2line::Loader;

use crate::demangle::demangle;
use crate::Frame;

/// The DWARF of one object, ready for lookups.
pub(crate) struct Dwarf {
    loader: Loader,
}

impl Dwarf {
    /// Loads the DWARF of the file at `path`, with its supplementary file if there is one.
    /// `None` if the file cannot be read or its DWARF cannot be parsed.
    pub(crate) fn load(path: &Path, supplementary: Option<&Path>) -> Option<Dwarf> {
        Loader::new_with_sup(path, supplementary)
            .ok()
            .map(|loader| Dwarf { loader })
    }

    /// The inline chain at `address`, innermost first; empty when DWARF does not cover it.
    ///
    /// The last frame's function may be `None` when the line table covers the address but no
    /// function entry does; the caller fills it from the symbol table.
    pub(crate) fn frames(&self, address: u64) -> Vec<Frame> {
        let mut frames = Vec::new();
        let Ok(mut iter) = self.loader.find_frames(address) else {
            return frames;
        };
        // A broken entry ends the chain; the frames before it are still right.
        while let Ok(Some(frame)) = iter.next() {
            let raw_function = frame
                .function
                .as_ref()
                .and_then(|name| name.raw_name().ok())
                .map(|name| name.into_owned());
            let location = frame.location.as_ref();
            frames.push(Frame {
                function: raw_function.as_deref().map(demangle),
                raw_function,
                file: location.and_then(|l| l.file).map(str::to_owned),
                line: location.and_then(|l| l.line).filter(|&n| n != 0),
                column: location.and_then(|l| l.column).filter(|&n| n != 0),
            });
        }
        // Frames that say nothing at all are no answer.
        if frames
            .iter()
            .all(|f| f.raw_function.is_none() && f.file.is_none() && f.line.is_none())
        {
            frames.clear();
        }
        frames
    }
}
