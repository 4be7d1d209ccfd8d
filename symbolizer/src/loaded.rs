//! One object opened for symbolization, and the lookup of one address in it.
//!
//! Opening maps the file, checks it is ELF and, when the caller knows the build id, that it is
//! the same build; then looks for a separate debug file and loads the DWARF of the debug file
//! if it has some, else the object's own. Symbol tables are read on the first address DWARF cannot
//! name.
//!
//! A lookup asks, in order: DWARF (for the inline chain, files and lines), then the symbol
//! tables of the debug file and of the object (`.symtab`), the object's MiniDebugInfo
//! (`.gnu_debugdata`, see [`crate::minidebug`]), the dynamic symbols (`.dynsym`), for the
//! name of the physical function, and last the object's PLT stubs (`memcmp@plt`).

use std::cell::OnceCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::debug_file::{self, DebugFile};
use crate::demangle::demangle;
use crate::dwarf::Dwarf;
use crate::elf::{self, ElfFacts};
use crate::minidebug::MiniDebugInfo;
use crate::mmap::{FileIdentity, MapError, MappedFile};
use crate::plt::PltTable;
use crate::symtab::{SymbolTable, Table};
use crate::{Frame, Miss, Symbolized};

/// An object file ready for lookups.
pub(crate) struct LoadedObject {
    /// Facts of the object itself (not of its debug file).
    facts: ElfFacts,
    main: Image,
    debug: Option<Image>,
    dwarf: Option<Dwarf>,
    /// The object's MiniDebugInfo, decompressed on the first address nothing else names.
    mini: OnceCell<Option<MiniDebugInfo>>,
    /// When debuginfod was last asked for its debug file, if it was.
    pub(crate) asked_debuginfod: Option<std::time::Instant>,
}

impl LoadedObject {
    /// Opens the object at `path`. `build_id` is the id the caller expects, or empty. Once
    /// `abandon` is set, the rest of the DWARF is not loaded (see [`Dwarf::load`]): the object
    /// then has none, and must not be kept as if that were the whole answer.
    pub(crate) fn open(
        path: &Path,
        build_id: &[u8],
        debug_dirs: &[PathBuf],
        abandon: &AtomicBool,
    ) -> Result<LoadedObject, Miss> {
        let map = MappedFile::open(path).map_err(|err| match err {
            MapError::NotAFile => Miss::NoFile,
            MapError::Io(err) => Miss::FileUnreadable(err.to_string()),
        })?;
        let facts = ElfFacts::read(&elf::parse(map.bytes())?);
        crate::panics::panic_if_asked(path);
        // The caller read its build id from the loaded image: a file on disk with another id,
        // or with none, is not the file that ran.
        if !build_id.is_empty() && facts.build_id.as_deref() != Some(build_id) {
            return Err(Miss::BuildIdMismatch);
        }

        // Looked for even when the object has DWARF of its own: that may be partial (only the
        // CRT or a static library built with -g), and a separate debug file is complete.
        let debug = debug_file::find(path, map.identity(), &facts, debug_dirs);
        let mut loaded = LoadedObject {
            facts,
            main: Image::new(map),
            debug: None,
            dwarf: None,
            mini: OnceCell::new(),
            asked_debuginfod: None,
        };
        if !abandon.load(Ordering::Relaxed) {
            loaded.load_dwarf(path, debug, debug_dirs, abandon);
        }
        Ok(loaded)
    }

    /// Takes `debug` (a debug file fetched from elsewhere: debuginfod) as the object's debug
    /// file, in place of the one found locally, if any.
    pub(crate) fn attach_debug_file(
        &mut self,
        path: &Path,
        debug: DebugFile,
        debug_dirs: &[PathBuf],
    ) {
        self.load_dwarf(path, Some(debug), debug_dirs, &AtomicBool::new(false));
    }

    /// Loads the DWARF of `debug` if it has some, else the object's own.
    fn load_dwarf(
        &mut self,
        path: &Path,
        debug: Option<DebugFile>,
        debug_dirs: &[PathBuf],
        abandon: &AtomicBool,
    ) {
        let dwarf_source = match &debug {
            Some(debug) if debug.facts.has_dwarf => {
                Some((debug.path.as_path(), &debug.map, &debug.facts))
            }
            _ if self.facts.has_dwarf => Some((path, &self.main.map, &self.facts)),
            _ => None,
        };
        let dwarf = dwarf_source.and_then(|(dwarf_path, dwarf_map, dwarf_facts)| {
            let supplementary = dwarf_facts
                .altlink
                .as_ref()
                .and_then(|link| debug_file::find_supplementary(dwarf_path, link, debug_dirs));
            // `<file>.dwp` beside the DWARF, as gdb and addr2line look for it; beside the
            // object too when the DWARF is in a separate debug file.
            let mut packages = vec![with_dwp_suffix(dwarf_path)];
            if dwarf_path != path {
                packages.push(with_dwp_suffix(path));
            }
            Dwarf::load(dwarf_map, supplementary.as_ref(), packages, abandon)
        });
        self.dwarf = dwarf;
        self.debug = debug.map(|debug| Image::new(debug.map));
    }

    /// The object's own GNU build id, if it has one.
    pub(crate) fn build_id(&self) -> Option<&[u8]> {
        self.facts.build_id.as_deref()
    }

    /// The identity of the object file as it was when it was opened.
    pub(crate) fn identity(&self) -> FileIdentity {
        self.main.map.identity()
    }

    /// Symbolizes one file virtual address.
    pub(crate) fn symbolize(&self, address: u64) -> Symbolized {
        if !self.facts.is_loaded(address) {
            return Symbolized::Miss(Miss::OutsideObject);
        }
        let mut frames = self
            .dwarf
            .as_ref()
            .map(|dwarf| dwarf.frames(address))
            .unwrap_or_default();
        match frames.last_mut() {
            Some(physical) if physical.raw_function.is_none() => {
                if let Some(raw) = self.symbol_name(address) {
                    physical.function = Some(demangle(&raw));
                    physical.raw_function = Some(raw);
                }
            }
            Some(_) => {}
            None => {
                if let Some(raw) = self.symbol_name(address) {
                    frames.push(Frame {
                        function: Some(demangle(&raw)),
                        raw_function: Some(raw),
                        file: None,
                        line: None,
                        column: None,
                    });
                }
            }
        }
        if frames.is_empty() {
            Symbolized::Miss(Miss::NoSymbol)
        } else {
            Symbolized::Frames(frames)
        }
    }

    /// The raw name of the function symbol covering `address`, from the first table that has
    /// one.
    fn symbol_name(&self, address: u64) -> Option<String> {
        let images = || self.debug.iter().chain(std::iter::once(&self.main));
        images()
            .find_map(|image| image.symbol(address, Table::Static))
            .or_else(|| {
                self.mini
                    .get_or_init(|| MiniDebugInfo::read(self.main.map.bytes()))
                    .as_ref()
                    .and_then(|mini| mini.symbol(address))
            })
            .or_else(|| images().find_map(|image| image.symbol(address, Table::Dynamic)))
            .map(|name| String::from_utf8_lossy(name).into_owned())
            .or_else(|| self.main.plt_stub(address))
    }

    /// Whether the object has DWARF to answer from, its own or its debug file's: without it,
    /// names come from symbol tables at best, without files and lines.
    pub(crate) fn has_dwarf(&self) -> bool {
        self.dwarf.is_some()
    }

    /// Whether the object's file, as opened, is owned by root and writable by root alone
    /// (and not on FUSE): a file no other user can have made or changed.
    pub(crate) fn root_owned(&self) -> bool {
        self.main.map.root_owned()
    }
}

/// `path` with `.dwp` appended to its file name (`libx.so.1` → `libx.so.1.dwp`).
fn with_dwp_suffix(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".dwp");
    PathBuf::from(name)
}

/// A mapped ELF file and its symbol tables, read on first use.
struct Image {
    map: MappedFile,
    /// `.symtab` then `.dynsym`.
    tables: OnceCell<[SymbolTable; 2]>,
    /// Names of the PLT stubs (of the object itself: a debug file has no code).
    plt: OnceCell<PltTable>,
}

impl Image {
    fn new(map: MappedFile) -> Image {
        Image {
            map,
            tables: OnceCell::new(),
            plt: OnceCell::new(),
        }
    }

    /// `name@plt` for an address in a PLT stub.
    fn plt_stub(&self, address: u64) -> Option<String> {
        self.plt
            .get_or_init(|| match elf::parse(self.map.bytes()) {
                Ok(file) => PltTable::read(&file),
                Err(_) => PltTable::default(),
            })
            .lookup(address)
    }

    fn symbol(&self, address: u64, table: Table) -> Option<&[u8]> {
        let data = self.map.bytes();
        let tables = self.tables.get_or_init(|| match elf::parse(data) {
            Ok(file) => [
                SymbolTable::read(data, &file, Table::Static),
                SymbolTable::read(data, &file, Table::Dynamic),
            ],
            Err(_) => Default::default(),
        });
        let index = match table {
            Table::Static => 0,
            Table::Dynamic => 1,
        };
        tables[index].lookup(data, address)
    }
}
