//! MiniDebugInfo: the small symbol table that Fedora, RHEL and their kin ship inside stripped
//! binaries, in a section named `.gnu_debugdata`.
//!
//! The section holds an xz-compressed ELF file whose `.symtab` lists the functions that
//! `.dynsym` does not (local and hidden ones), so that a stripped program's stack still names
//! its functions without the separate debug package. gdb documents the format ("MiniDebugInfo"
//! in its manual); the recipe that makes it is `nm`/`objcopy`/`xz` on the debug file.
//!
//! It is read only when neither DWARF nor a symbol table of the object or of its debug file
//! covers an address. The compressed bytes come from a file a user may have made, so the
//! decompressed size is capped ([`MAX_DECOMPRESSED`]): past it the section is ignored; the
//! decoder may use at most [`MAX_DECODER_MEMORY`] (an xz header asks for its dictionary); and
//! the decompressed bytes are counted, while they are held, against the symbolizer's budget
//! for file contents in memory ([`crate::mmap::MAX_READ_TOTAL`]). Only the function symbols
//! and their names are kept (also counted), not the decompressed file; a section without
//! function symbols keeps nothing.

use std::io::Read;

use object::{Object, ObjectSection};

use crate::elf;
use crate::mmap::Reservation;
use crate::symtab::{SymbolTable, Table};

/// The most bytes one `.gnu_debugdata` may decompress to. Real ones are a few hundred KiB to a
/// few MiB (a symbol table and its names); a hostile one must not make the collector
/// allocate without bound.
pub(crate) const MAX_DECOMPRESSED: u64 = 16 << 20;

/// The most memory the xz decoder may use: enough for the dictionaries of `xz -0` to `xz -8`
/// (MiniDebugInfo is made with the default, `-6`: 8 MiB).
pub(crate) const MAX_DECODER_MEMORY: u64 = 40 << 20;

/// The function symbols of one object's MiniDebugInfo, with their names.
pub(crate) struct MiniDebugInfo {
    /// The names, which the table's entries point into.
    names: Vec<u8>,
    table: SymbolTable,
    /// The share of the budget the table and names hold.
    _reservation: Reservation,
}

impl MiniDebugInfo {
    /// Reads the `.gnu_debugdata` of the ELF file `data`, if it has one that decompresses (within
    /// [`MAX_DECOMPRESSED`]) to an ELF file with function symbols.
    pub(crate) fn read(data: &[u8]) -> Option<MiniDebugInfo> {
        let file = elf::parse(data).ok()?;
        let compressed = file.section_by_name(".gnu_debugdata")?.data().ok()?;
        // Held while the decompressed bytes are.
        let decompressing = Reservation::take(MAX_DECOMPRESSED + 1)?;
        let inner = decompress(compressed)?;
        let inner_file = elf::parse(&inner).ok()?;
        let table = SymbolTable::read(&inner, &inner_file, Table::Static);
        if table.is_empty() {
            return None;
        }
        let (table, names) = table.with_own_names(&inner);
        drop(inner_file);
        drop(inner);
        let kept = (names.capacity() + table.heap_bytes()) as u64;
        drop(decompressing);
        let reservation = Reservation::take(kept)?;
        Some(MiniDebugInfo {
            names,
            table,
            _reservation: reservation,
        })
    }

    /// The name of the function symbol covering `address`.
    pub(crate) fn symbol(&self, address: u64) -> Option<&[u8]> {
        self.table.lookup(&self.names, address)
    }
}

/// The xz stream `compressed`, decompressed, or `None` if it is not one, is larger than
/// [`MAX_DECOMPRESSED`], or needs more than [`MAX_DECODER_MEMORY`] to decode.
fn decompress(compressed: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let stream = liblzma::stream::Stream::new_stream_decoder(MAX_DECODER_MEMORY, 0).ok()?;
    liblzma::read::XzDecoder::new_stream(compressed, stream)
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut out)
        .ok()?;
    (out.len() as u64 <= MAX_DECOMPRESSED).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_bombs_are_refused() {
        assert!(decompress(b"not xz at all").is_none());
        // Zeros compress about 1000:1: 17 MiB of them is over the cap.
        let zeros = vec![0u8; (MAX_DECOMPRESSED + (1 << 20)) as usize];
        let mut compressed = Vec::new();
        liblzma::read::XzEncoder::new(&zeros[..], 1)
            .read_to_end(&mut compressed)
            .unwrap();
        assert!(compressed.len() < 1 << 20);
        assert!(decompress(&compressed).is_none());
        let mut small = Vec::new();
        liblzma::read::XzEncoder::new(&b"hello"[..], 6)
            .read_to_end(&mut small)
            .unwrap();
        assert_eq!(decompress(&small).as_deref(), Some(&b"hello"[..]));
    }

    /// A stream whose header asks for a dictionary larger than the decoder may use is
    /// refused before anything is allocated for it.
    #[test]
    fn huge_dictionaries_are_refused() {
        let mut options = liblzma::stream::LzmaOptions::new_preset(6).unwrap();
        options.dict_size(256 << 20);
        let mut filters = liblzma::stream::Filters::new();
        filters.lzma2(&options);
        let stream =
            liblzma::stream::Stream::new_stream_encoder(&filters, liblzma::stream::Check::Crc64)
                .unwrap();
        let mut compressed = Vec::new();
        liblzma::read::XzEncoder::new_stream(&b"hello"[..], stream)
            .read_to_end(&mut compressed)
            .unwrap();
        assert!(decompress(&compressed).is_none());
    }

    #[test]
    fn objects_without_the_section_have_none() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(MiniDebugInfo::read(&exe).is_none());
        assert!(MiniDebugInfo::read(b"\x7fELF short").is_none());
    }
}
