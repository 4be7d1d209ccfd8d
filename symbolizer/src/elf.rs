//! ELF facts this crate needs from one object file, read once when the file is opened.
//!
//! Only ELF is accepted: the profiler runs on Linux. The facts are owned values so they outlive
//! the parse: the GNU build id, the `.gnu_debuglink` and `.gnu_debugaltlink` names that point at
//! separate debug files, whether DWARF is present, and the loadable address ranges (used to
//! tell an address that is outside the object, usually a wrong load bias, from one that merely
//! has no symbol).

use std::ops::Range;

use object::{FileKind, Object, ObjectSection, ObjectSegment};

use crate::Miss;

/// Parses `data` as an ELF file, telling "not ELF" from "ELF but broken".
pub(crate) fn parse(data: &[u8]) -> Result<object::File<'_>, Miss> {
    match FileKind::parse(data) {
        Ok(FileKind::Elf32 | FileKind::Elf64) => {}
        _ => return Err(Miss::NotElf),
    }
    object::File::parse(data).map_err(|err| Miss::MalformedElf(err.to_string()))
}

/// A `.gnu_debugaltlink`: the supplementary debug file (made by `dwz`) that this file's DWARF
/// refers into.
#[derive(Clone, Debug)]
pub(crate) struct AltLink {
    /// The file name as recorded; absolute, or relative to the directory of the debug file.
    pub(crate) file: Vec<u8>,
    /// The supplementary file's build id.
    pub(crate) build_id: Vec<u8>,
}

/// What this crate needs to know about one ELF file.
#[derive(Clone, Debug)]
pub(crate) struct ElfFacts {
    /// The GNU build id, if the file has a readable one.
    pub(crate) build_id: Option<Vec<u8>>,
    /// The file name recorded in `.gnu_debuglink`.
    pub(crate) debuglink: Option<Vec<u8>>,
    /// The CRC-32 of the debug file recorded in `.gnu_debuglink`.
    pub(crate) debuglink_crc: Option<u32>,
    /// The supplementary debug file recorded in `.gnu_debugaltlink`.
    pub(crate) altlink: Option<AltLink>,
    /// Whether the file carries DWARF (`.debug_info` with contents, possibly compressed).
    pub(crate) has_dwarf: bool,
    /// The `PT_LOAD` address ranges (file virtual addresses); empty for files without program
    /// headers.
    pub(crate) load_ranges: Vec<Range<u64>>,
}

impl ElfFacts {
    /// Reads the facts from a parsed file. Unreadable notes and sections count as absent.
    pub(crate) fn read(file: &object::File<'_>) -> ElfFacts {
        let build_id = file.build_id().ok().flatten().map(<[u8]>::to_vec);
        let link = file.gnu_debuglink().ok().flatten();
        let debuglink = link.map(|(name, _crc)| name.to_vec());
        let debuglink_crc = link.map(|(_name, crc)| crc);
        let altlink = file
            .gnu_debugaltlink()
            .ok()
            .flatten()
            .map(|(name, build_id)| AltLink {
                file: name.to_vec(),
                build_id: build_id.to_vec(),
            });
        // `section_by_name` also finds the old `.zdebug_info` spelling of compressed DWARF.
        // Sections without file contents are NOBITS placeholders left by `strip`/`objcopy`.
        // A relocatable object (`.o`) is never a loaded module: its DWARF would need
        // relocating, which addr2line does with a line on stderr for every relocation it does
        // not know (hostile or odd files only); its symbol table still names its functions.
        let has_dwarf = file
            .section_by_name(".debug_info")
            .is_some_and(|s| s.size() > 0 && s.file_range().is_some())
            && file.kind() != object::ObjectKind::Relocatable
            && !claims_impossible_decompression(file);
        let load_ranges = file
            .segments()
            .filter(|segment| segment.size() > 0)
            .map(|segment| {
                let start = segment.address();
                start..start.saturating_add(segment.size())
            })
            .collect();
        ElfFacts {
            build_id,
            debuglink,
            debuglink_crc,
            altlink,
            has_dwarf,
            load_ranges,
        }
    }

    /// Whether `address` lies in a loadable segment. Files without program headers (debug
    /// files, relocatable objects) say yes to everything.
    pub(crate) fn is_loaded(&self, address: u64) -> bool {
        self.load_ranges.is_empty() || self.load_ranges.iter().any(|r| r.contains(&address))
    }
}

/// Whether `file` holds debug data only: no section of code with contents in the file, as
/// `objcopy --only-keep-debug` and `eu-strip -f` leave them (the code sections become
/// `NOBITS`). A program or library is not.
pub(crate) fn is_debug_only(file: &object::File<'_>) -> bool {
    !file.sections().any(|section| {
        section.kind() == object::SectionKind::Text
            && section.size() > 0
            && section.file_range().is_some()
    })
}

/// Largest DWARF section we are willing to decompress.
const MAX_DECOMPRESSED: u64 = 4 << 30;
/// zlib and zstd cannot expand data more than about 1032:1; a header claiming more lies.
const MAX_RATIO: u64 = 1100;

/// True if a compressed debug section claims a decompressed size that no real file has:
/// more than its compressed bytes could expand to, or more than [`MAX_DECOMPRESSED`]. The
/// decompressor reserves the claimed size up front, so trusting such a header lets a hostile
/// or corrupt file make the collector allocate gigabytes; its DWARF is skipped instead (the
/// symbol tables still answer).
fn claims_impossible_decompression(file: &object::File<'_>) -> bool {
    use object::{Object, ObjectSection};
    file.sections().any(|section| {
        let debug = section
            .name()
            .is_ok_and(|n| n.starts_with(".debug") || n.starts_with(".zdebug"));
        match section.compressed_file_range() {
            Ok(range) if debug && range.format != object::CompressionFormat::None => {
                range.uncompressed_size > MAX_DECOMPRESSED
                    || range.uncompressed_size > range.compressed_size.saturating_mul(MAX_RATIO)
            }
            Ok(_) => false,
            Err(_) => debug,
        }
    })
}
