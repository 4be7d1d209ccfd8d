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
//! decompressed size is capped ([`MAX_DECOMPRESSED`]): past it the section is ignored.

use std::io::Read;

use object::{Object, ObjectSection};

use crate::elf;
use crate::symtab::{SymbolTable, Table};

/// The most bytes one `.gnu_debugdata` may decompress to. Real ones are a few hundred KiB to a
/// few MiB (a symbol table and its names); a hostile one must not make the collector
/// allocate without bound.
pub(crate) const MAX_DECOMPRESSED: u64 = 64 << 20;

/// The decompressed MiniDebugInfo of one object and its function symbols.
pub(crate) struct MiniDebugInfo {
    data: Vec<u8>,
    table: SymbolTable,
}

impl MiniDebugInfo {
    /// Reads the `.gnu_debugdata` of the ELF file `data`, if it has one that decompresses (within
    /// [`MAX_DECOMPRESSED`]) to an ELF file with function symbols.
    pub(crate) fn read(data: &[u8]) -> Option<MiniDebugInfo> {
        let file = elf::parse(data).ok()?;
        let compressed = file.section_by_name(".gnu_debugdata")?.data().ok()?;
        let inner = decompress(compressed)?;
        let inner_file = elf::parse(&inner).ok()?;
        let table = SymbolTable::read(&inner, &inner_file, Table::Static);
        drop(inner_file);
        Some(MiniDebugInfo { data: inner, table })
    }

    /// The name of the function symbol covering `address`.
    pub(crate) fn symbol(&self, address: u64) -> Option<&[u8]> {
        self.table.lookup(&self.data, address)
    }
}

/// The xz stream `compressed`, decompressed, or `None` if it is not one or is larger than
/// [`MAX_DECOMPRESSED`].
fn decompress(compressed: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    liblzma::read::XzDecoder::new(compressed)
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
        // Zeros compress about 1000:1: 65 MiB of them is over the cap.
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

    #[test]
    fn objects_without_the_section_have_none() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(MiniDebugInfo::read(&exe).is_none());
        assert!(MiniDebugInfo::read(b"\x7fELF short").is_none());
    }
}
