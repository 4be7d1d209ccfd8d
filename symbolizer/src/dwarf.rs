//! Inline chains from DWARF, through `addr2line`.
//!
//! The file that holds the DWARF (the object itself or its separate debug file) and its `dwz`
//! supplementary file come in already opened and mapped; units are parsed lazily on first use.
//! Split DWARF is followed too: a `.dwp` package next to the DWARF file, else the `.dwo` file
//! the skeleton unit names, each opened only when a lookup first falls in a split unit, and
//! through [`MappedFile::open`] like every other file (never with a blocking open of its own:
//! that is why this crate does not use `addr2line::Loader`). A failure to load only means no
//! DWARF: the caller falls back to symbol tables.

use std::borrow::Cow;
use std::cell::{OnceCell, RefCell};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use addr2line::gimli;
use addr2line::{Context, LookupContinuation, LookupResult, SplitDwarfLoad};

use crate::demangle::demangle;
use crate::mmap::MappedFile;
use crate::Frame;

/// Sections as `addr2line` reads them. The `'static` is a promise kept by [`Dwarf`]: every
/// slice points into its [`Store`], which outlives the readers (see [`Store::keep`]).
type Reader = gimli::EndianSlice<'static, gimli::RunTimeEndian>;

/// The DWARF of one object, ready for lookups.
pub(crate) struct Dwarf {
    // Field order is drop order: the readers in `ctx` and `package` point into `store`.
    ctx: Context<Reader>,
    /// The `.dwp` package, looked for on the first split unit; `None` inside if there is none.
    package: OnceCell<Option<gimli::DwarfPackage<Reader>>>,
    /// Where a `.dwp` package may be, in order.
    package_paths: Vec<PathBuf>,
    store: Store,
}

impl Dwarf {
    /// Loads the DWARF of `file` (mapped), with its supplementary file if there is one.
    /// `package_paths` are the places a `.dwp` may be. `None` if the DWARF cannot be parsed,
    /// or if `abandon` is set before the last section is read (each section may have to be
    /// inflated, the slow part: a caller that no longer needs the answer gets out within one).
    pub(crate) fn load(
        file: &MappedFile,
        supplementary: Option<&MappedFile>,
        package_paths: Vec<PathBuf>,
        abandon: &AtomicBool,
    ) -> Option<Dwarf> {
        let store = Store::default();
        // SAFETY: the slices handed out by `store` are used only by `dwarf` and the parsed
        // files here, which are dropped before `store` (declared later, or returned inside
        // the `Dwarf` that owns `store`, whose field order drops `ctx` first).
        let data = unsafe { store.keep(Kept::Map(file.clone())) };
        let object = object::File::parse(data).ok()?;
        let endian = endian_of(&object);
        let mut dwarf = gimli::Dwarf::load(|id| {
            if abandon.load(Ordering::Relaxed) {
                return Err(gimli::Error::Io);
            }
            if !needed(id) {
                return Ok(gimli::EndianSlice::new(&[][..], endian));
            }
            // SAFETY: as above; `object`'s bytes are kept by `store`.
            unsafe { section(&object, Some(id.name()), endian, &store) }
        })
        .ok()?;
        if let Some(sup) = supplementary {
            // SAFETY: as above.
            let data = unsafe { store.keep(Kept::Map(sup.clone())) };
            let sup = object::File::parse(data).ok()?;
            dwarf
                .load_sup(|id| {
                    if abandon.load(Ordering::Relaxed) {
                        return Err(gimli::Error::Io);
                    }
                    if !needed(id) {
                        return Ok(gimli::EndianSlice::new(&[][..], endian));
                    }
                    // SAFETY: as above.
                    unsafe { section(&sup, Some(id.name()), endian, &store) }
                })
                .ok()?;
        }
        dwarf.populate_abbreviations_cache(gimli::AbbreviationsCacheStrategy::Duplicates);
        let ctx = Context::from_dwarf(dwarf).ok()?;
        Some(Dwarf {
            ctx,
            package: OnceCell::new(),
            package_paths,
            store,
        })
    }

    /// The inline chain at `address`, innermost first; empty when DWARF does not cover it.
    ///
    /// The last frame's function may be `None` when the line table covers the address but no
    /// function entry does; the caller fills it from the symbol table.
    pub(crate) fn frames(&self, address: u64) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut lookup = self.ctx.find_frames(address);
        let found = loop {
            match lookup {
                LookupResult::Output(found) => break found,
                LookupResult::Load { load, continuation } => {
                    lookup = continuation.resume(self.split_unit(load));
                }
            }
        };
        let Ok(mut iter) = found else {
            return frames;
        };
        // A broken entry ends the chain; the frames before it are still right. Everything is
        // copied out: nothing borrowed from the store leaves this module.
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

    /// The split unit a skeleton unit refers to: from the `.dwp` package if there is one,
    /// else from the `.dwo` file it names, checked to carry the same DWO id.
    fn split_unit(&self, load: SplitDwarfLoad<Reader>) -> Option<Arc<gimli::Dwarf<Reader>>> {
        if let Some(package) = self.package() {
            if let Ok(Some(unit)) = package.find_cu(load.dwo_id, &load.parent) {
                return Some(Arc::new(unit));
            }
        }
        let mut path = PathBuf::new();
        if let Some(dir) = &load.comp_dir {
            path.push(OsStr::from_bytes(dir.slice()));
        }
        path.push(OsStr::from_bytes(load.path.as_ref()?.slice()));
        let map = MappedFile::open(&path).ok()?;
        // SAFETY: the slices live in `self.store`, which outlives `self.ctx`, the only place
        // the split unit is kept (`resume` hands it to the context).
        let data = unsafe { self.store.keep(Kept::Map(map)) };
        let object = object::File::parse(data).ok()?;
        let endian = endian_of(&object);
        // SAFETY: as above.
        let mut dwo = gimli::Dwarf::load(|id| unsafe {
            section(&object, id.dwo_name(), endian, &self.store)
        })
        .ok()?;
        let header = dwo.units().next().ok()??;
        let unit = dwo.unit(header).ok()?;
        if unit.dwo_id != Some(load.dwo_id) {
            return None;
        }
        dwo.make_dwo(&load.parent);
        Some(Arc::new(dwo))
    }

    fn package(&self) -> Option<&gimli::DwarfPackage<Reader>> {
        self.package
            .get_or_init(|| {
                self.package_paths.iter().find_map(|path| {
                    let map = MappedFile::open(path).ok()?;
                    // SAFETY: kept in `self.store`, which outlives `self.package`.
                    let data = unsafe { self.store.keep(Kept::Map(map)) };
                    let object = object::File::parse(data).ok()?;
                    let endian = endian_of(&object);
                    let empty = gimli::EndianSlice::new(&[][..], endian);
                    gimli::DwarfPackage::load(
                        // SAFETY: as above.
                        |id| unsafe { section(&object, id.dwo_name(), endian, &self.store) },
                        empty,
                    )
                    .ok()
                })
            })
            .as_ref()
    }
}

/// Whether a section is read at all: the location lists say where variables live, which no
/// lookup here asks, and they are the second largest section of an optimized build (0.6 of
/// libc6-dbg's 3.5 MiB of compressed DWARF), each inflated in full when it is read.
fn needed(id: gimli::SectionId) -> bool {
    !matches!(
        id,
        gimli::SectionId::DebugLoc | gimli::SectionId::DebugLocLists
    )
}

/// What the readers of one [`Dwarf`] point into: mapped files and inflated sections. It only
/// grows; everything goes when the `Dwarf` is dropped.
#[derive(Default)]
struct Store(RefCell<Vec<Kept>>);

enum Kept {
    Map(MappedFile),
    Inflated(Vec<u8>),
}

impl Store {
    /// Keeps `kept` for as long as the store lives and returns its bytes.
    ///
    /// # Safety
    ///
    /// The slice must not be used after the store is dropped. (The bytes themselves never
    /// move: a mapping stays where it was mapped and a `Vec`'s buffer where it was allocated,
    /// whatever happens to the `Vec` of kept things.)
    unsafe fn keep(&self, kept: Kept) -> &'static [u8] {
        let bytes: *const [u8] = match &kept {
            Kept::Map(map) => map.bytes(),
            Kept::Inflated(data) => data.as_slice(),
        };
        self.0.borrow_mut().push(kept);
        // SAFETY: `bytes` points into memory owned by `kept`, now owned by the store, which
        // never drops or changes it before the store itself goes; the caller promises not to
        // use the slice after that.
        unsafe { &*bytes }
    }
}

fn endian_of(object: &object::File<'_>) -> gimli::RunTimeEndian {
    use object::Object;
    if object.is_little_endian() {
        gimli::RunTimeEndian::Little
    } else {
        gimli::RunTimeEndian::Big
    }
}

/// The contents of section `name` of `object` (inflated if compressed), or an empty section.
///
/// # Safety
///
/// The reader must not be used after `store` is dropped, nor after the bytes `object` was
/// parsed from are (they must be kept by `store` too).
unsafe fn section(
    object: &object::File<'static>,
    name: Option<&str>,
    endian: gimli::RunTimeEndian,
    store: &Store,
) -> Result<Reader, gimli::Error> {
    use object::{Object, ObjectSection};
    let data: &'static [u8] = match name.and_then(|name| object.section_by_name(name)) {
        Some(section) => match section.uncompressed_data() {
            Ok(Cow::Borrowed(data)) => data,
            // SAFETY: the caller keeps the reader no longer than the store.
            Ok(Cow::Owned(data)) => unsafe { store.keep(Kept::Inflated(data)) },
            Err(_) => &[],
        },
        None => &[],
    };
    Ok(gimli::EndianSlice::new(data, endian))
}
