//! Naming a profile after the fact (`anyprof symbolize`): a profile written with
//! `--no-symbolize` on a host without debug information holds, for each location, its runtime
//! address and its mapping (file name, build id, where it was loaded); this adds functions,
//! files, lines and inline frames where the binaries or their debug files are.
//!
//! For each mapping that has locations without lines, the object is found by build id (see
//! [`find_object`]) and the load bias worked out from its program headers and the mapping
//! (see [`load_bias`]); the addresses then go through the same symbolizer, the same batch
//! call and the same conversion to pprof lines as in `anyprof record`
//! ([`crate::symbolize::symbolize_guarded`], [`crate::symbolize::frame_lines`]), so the names
//! are the ones `record` would have given. Locations that already have lines keep them: names
//! are only ever added (a stand-in such as `libfoo.so+0x1a2b`, which says only where the
//! address is, counts as no name and is replaced when a name is found). A file whose build id differs from the mapping's is never used:
//! wrong names are worse than none.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyprof_symbolizer::{FileAddress, Miss, ObjectRef, RuntimeAddress, Symbolized, Symbolizer};
use object::{Object, ObjectSegment, SegmentFlags};

use crate::pprof::builder::ProfileBuilder;
use crate::pprof::proto::{Function, Location, Mapping, Profile};
use crate::profile::hex;
use crate::symbolize::{frame_lines, symbolize_guarded, warn_symbolizer_failed};

/// The page size the preload rounds a module's executable range to (`preload/src/modules.rs`).
const PAGE: u64 = 4096;

/// What happened to one mapping that had locations without names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MappingOutcome {
    /// Looked up in `object`; `named` of its `unnamed` locations got a name.
    Named {
        object: PathBuf,
        unnamed: usize,
        named: usize,
    },
    /// No file with its build id was found (`unnamed` locations stay without names).
    NotFound { unnamed: usize },
    /// A file at the mapping's path (or under a debug dir by its name) is another build:
    /// not used.
    BuildIdMismatch {
        path: PathBuf,
        found: String,
        unnamed: usize,
    },
    /// A file with the right build id was found, but its program headers do not place the
    /// mapping (`why`).
    Unplaceable {
        path: PathBuf,
        why: String,
        unnamed: usize,
    },
    /// A name the kernel or loader gives to memory without a file (`[vdso]`, `[anon]`).
    NoFile { unnamed: usize },
}

/// What [`symbolize_profile`] did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Locations that had lines already, left as they were.
    pub already_named: usize,
    /// Locations without lines in a mapping (the ones to name).
    pub unnamed: usize,
    /// Of those, the ones that got a name.
    pub named: usize,
    /// Per mapping with locations to name: its file name and build id (hex), and the outcome.
    pub mappings: Vec<(String, String, MappingOutcome)>,
}

/// Adds names to the locations of `profile` that have none, finding each mapping's object by
/// build id in `debug_dirs` (and at the mapping's own path); `symbolizer` should be made by
/// [`crate::symbolize::new_symbolizer`] with the same directories, so that it finds the
/// separate debug file of an object found by path.
pub fn symbolize_profile(
    profile: Profile,
    symbolizer: &mut Symbolizer,
    debug_dirs: &[PathBuf],
) -> (Profile, Report) {
    let mut report = Report::default();
    let text = |i: i64| -> String {
        usize::try_from(i)
            .ok()
            .and_then(|i| profile.string_table.get(i))
            .cloned()
            .unwrap_or_default()
    };
    let functions: HashMap<u64, &Function> = profile.function.iter().map(|f| (f.id, f)).collect();
    let mapping_files: HashMap<u64, String> = profile
        .mapping
        .iter()
        .map(|m| (m.id, text(m.filename)))
        .collect();
    // A location whose only line is a stand-in for a name (`libfoo.so+0x1a2b`, `[libfoo.so]`,
    // as a profile shows an address it could not name) has no name yet.
    let placeholder = |location: &Location| -> bool {
        let [line] = &location.line[..] else {
            return false;
        };
        let Some(f) = functions.get(&line.function_id) else {
            return false;
        };
        let file = mapping_files
            .get(&location.mapping_id)
            .map(|f| f.rsplit('/').next().unwrap_or(f))
            .unwrap_or_default();
        let name = text(f.name);
        line.line == 0
            && text(f.filename).is_empty()
            && !file.is_empty()
            && (name == format!("[{file}]")
                || crate::unnamed::split_name(&name).is_some_and(|(module, _)| module == file))
    };
    // The locations to name, by mapping id: (location id, address).
    let mut pending: BTreeMap<u64, Vec<(u64, RuntimeAddress)>> = BTreeMap::new();
    for location in &profile.location {
        if !location.line.is_empty() && !placeholder(location) {
            report.already_named += 1;
        } else if location.mapping_id != 0 && location.address != 0 {
            report.unnamed += 1;
            pending
                .entry(location.mapping_id)
                .or_default()
                .push((location.id, RuntimeAddress(location.address)));
        }
    }
    let mappings: BTreeMap<u64, Mapping> = profile.mapping.iter().map(|m| (m.id, *m)).collect();
    let mut batches: Vec<Batch> = Vec::new();
    for (mapping_id, locations) in pending {
        let Some(mapping) = mappings.get(&mapping_id) else {
            continue;
        };
        let (filename, build_id_hex) = (text(mapping.filename), text(mapping.build_id));
        let unnamed = locations.len();
        let build_id = parse_hex(&build_id_hex).unwrap_or_default();
        let outcome = if is_pseudo(&filename) {
            Err(MappingOutcome::NoFile { unnamed })
        } else {
            find_object(
                Path::new(&filename),
                &build_id,
                mapping,
                debug_dirs,
                unnamed,
            )
        };
        match outcome {
            Ok((object, bias)) => {
                let addresses = locations.iter().map(|(_, a)| a.to_file(bias)).collect();
                batches.push(Batch {
                    mapping_id,
                    object,
                    build_id,
                    locations,
                    addresses,
                });
            }
            Err(outcome) => report.mappings.push((filename, build_id_hex, outcome)),
        }
    }

    let requests: Vec<(ObjectRef<'_>, &[FileAddress])> = batches
        .iter()
        .map(|batch| {
            let object = ObjectRef {
                path: &batch.object,
                build_id: &batch.build_id,
            };
            (object, &batch.addresses[..])
        })
        .collect();
    let answers = symbolize_guarded(symbolizer, None, &requests);
    let mut b = ProfileBuilder::from_profile(profile);
    for (batch, answers) in batches.iter().zip(answers) {
        let Batch {
            mapping_id,
            object,
            locations,
            addresses,
            ..
        } = batch;
        // What `record` names an address without a name: `MODULE+0xADDR` of the mapped file.
        let module = text_of(&b, mappings[mapping_id].filename);
        let mut named = 0;
        let mut inlined = false;
        for (((location_id, address), file_address), answer) in
            locations.iter().zip(addresses).zip(answers)
        {
            let lines = match answer {
                Symbolized::Frames(frames) => frame_lines(*address, frames),
                Symbolized::Miss(miss) => {
                    if let Miss::SymbolizerPanicked(why) = &miss {
                        warn_symbolizer_failed(object.as_os_str().as_bytes(), why);
                    }
                    vec![crate::unnamed::frame(module.as_bytes(), *file_address)]
                }
            };
            if lines.is_empty() {
                continue;
            }
            if !crate::unnamed::is_fallback(&lines) {
                named += 1;
            }
            inlined |= lines.len() > 1;
            b.set_location_lines(*location_id, &lines);
        }
        report.named += named;
        // As `record` does: looked up here, with the right file, so what is not named stays
        // unnamed (pprof need not try again), and inline frames are ours.
        if let Some(m) = b.mappings_mut().iter_mut().find(|m| m.id == *mapping_id) {
            m.has_functions = true;
            m.has_filenames = true;
            m.has_line_numbers = true;
            m.has_inline_frames |= inlined;
        }
        let mapping = &mappings[mapping_id];
        report.mappings.push((
            text_of(&b, mapping.filename),
            text_of(&b, mapping.build_id),
            MappingOutcome::Named {
                object: object.clone(),
                unnamed: locations.len(),
                named,
            },
        ));
    }
    (b.finish(), report)
}

/// The locations of one mapping to look up in its object.
struct Batch {
    mapping_id: u64,
    object: PathBuf,
    /// The mapping's build id, which the symbolizer checks again.
    build_id: Vec<u8>,
    /// Location id and address of each.
    locations: Vec<(u64, RuntimeAddress)>,
    /// The same addresses in the object's file address space.
    addresses: Vec<FileAddress>,
}

/// A string of the profile being built (the mappings' strings are never changed).
fn text_of(b: &ProfileBuilder, index: i64) -> String {
    b.string_at(index).to_string()
}

/// Finds the object file of `mapping` (loaded from `path` with `build_id`): by build id in
/// each debug directory (`DIR/.build-id/xx/rest`, the binary, as debuginfod clients and
/// `perf buildid-cache` keep it), then the mapping's own path, then a file of the same name in
/// each debug directory (binaries copied from the profiled host), then the separate debug file
/// by build id (`DIR/.build-id/xx/rest.debug`). A file with another build id is skipped (and
/// reported if nothing else fits); without a build id in the mapping only its own path is
/// used. Returns the file and the load bias of the mapping.
pub fn find_object(
    path: &Path,
    build_id: &[u8],
    mapping: &Mapping,
    debug_dirs: &[PathBuf],
    unnamed: usize,
) -> Result<(PathBuf, u64), MappingOutcome> {
    let by_build_id = |suffix: &str| -> Vec<PathBuf> {
        let Some((first, rest)) = build_id.split_first() else {
            return Vec::new();
        };
        if rest.is_empty() {
            return Vec::new();
        }
        debug_dirs
            .iter()
            .map(|dir| {
                dir.join(".build-id")
                    .join(format!("{first:02x}"))
                    .join(format!("{}{suffix}", hex(rest)))
            })
            .collect()
    };
    let mut candidates = by_build_id("");
    candidates.push(path.to_path_buf());
    if let Some(name) = path.file_name() {
        candidates.extend(debug_dirs.iter().map(|dir| dir.join(name)));
    }
    candidates.extend(by_build_id(".debug"));
    let mut refused = None;
    for candidate in candidates {
        if build_id.is_empty() && candidate != path {
            continue;
        }
        let Some(file) = ElfHeaders::read(&candidate) else {
            continue;
        };
        if !build_id.is_empty() && file.build_id.as_deref() != Some(build_id) {
            refused.get_or_insert(MappingOutcome::BuildIdMismatch {
                found: file.build_id.as_deref().map(hex).unwrap_or_default(),
                path: candidate,
                unnamed,
            });
            continue;
        }
        match load_bias(&file.segments, mapping) {
            Some(bias) => return Ok((candidate, bias)),
            None => {
                refused = Some(MappingOutcome::Unplaceable {
                    path: candidate,
                    why: format!(
                        "no loadable segment holds file offset {:#x}",
                        mapping.file_offset
                    ),
                    unnamed,
                });
            }
        }
    }
    Err(refused.unwrap_or(MappingOutcome::NotFound { unnamed }))
}

/// A `PT_LOAD` segment: file offset, size in the file, address as stated, executable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub file_size: u64,
    pub address: u64,
    pub executable: bool,
}

/// The facts of an ELF file that placing a mapping needs.
struct ElfHeaders {
    build_id: Option<Vec<u8>>,
    segments: Vec<Segment>,
}

impl ElfHeaders {
    /// Reads the build id and the loadable segments of the regular file at `path`, reading
    /// only those parts of it (at most [`HEADERS_READ_MAX`] bytes in all); `None` if it is
    /// missing, not a regular file (see [`open_regular`]) or not ELF.
    fn read(path: &Path) -> Option<ElfHeaders> {
        let file = open_regular(path).ok()?;
        let cache = object::ReadCache::new(file);
        let read = CappedRead {
            cache: &cache,
            left: &std::cell::Cell::new(HEADERS_READ_MAX),
        };
        let elf = object::File::parse(read).ok()?;
        let build_id = elf.build_id().ok().flatten().map(<[u8]>::to_vec);
        let segments = elf
            .segments()
            .map(|s| {
                let (offset, file_size) = s.file_range();
                let executable = match s.flags() {
                    SegmentFlags::Elf { p_flags, .. } => p_flags.0 & object::elf::PF_X.0 != 0,
                    _ => false,
                };
                Segment {
                    offset,
                    file_size,
                    address: s.address(),
                    executable,
                }
            })
            .collect();
        Some(ElfHeaders { build_id, segments })
    }
}

/// How much of one file [`ElfHeaders::read`] reads at most: headers, section headers, the
/// symbol tables `object` parses with them and the notes. A file that claims more (a sparse
/// file with forged sizes, named by an untrusted profile) is not read.
const HEADERS_READ_MAX: u64 = 256 << 20;

/// Opens the file a profile names for reading without trusting the name: `O_NONBLOCK` (a FIFO
/// put there between any check and the open does not block), `O_NOCTTY`, `O_CLOEXEC`; then,
/// on that descriptor, it must be a regular file and not on procfs or sysfs (`/proc/kmsg`
/// looks regular, and reading it consumes the kernel log).
#[allow(clippy::unnecessary_cast)] // the types of f_type and the magics differ between libcs
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::io::{Error, ErrorKind};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `file` is an open descriptor for the whole call and `fs` is a writable
    // `statfs` that fstatfs fills in.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return Err(Error::last_os_error());
    }
    let kind = fs.f_type as i64;
    if kind == libc::PROC_SUPER_MAGIC as i64 || kind == libc::SYSFS_MAGIC as i64 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "a file of procfs or sysfs",
        ));
    }
    Ok(file)
}

/// A [`object::ReadRef`] over a [`object::ReadCache`] that refuses reads once `left` bytes
/// have been asked for: `ReadCache` allocates whatever size a header claims.
#[derive(Clone, Copy)]
struct CappedRead<'a> {
    cache: &'a object::ReadCache<std::fs::File>,
    left: &'a std::cell::Cell<u64>,
}

impl CappedRead<'_> {
    fn spend(&self, size: u64) -> Result<(), ()> {
        let left = self.left.get().checked_sub(size).ok_or(())?;
        self.left.set(left);
        Ok(())
    }
}

impl<'a> object::ReadRef<'a> for CappedRead<'a> {
    fn len(self) -> Result<u64, ()> {
        self.cache.len()
    }

    fn read_bytes_at(self, offset: u64, size: u64) -> Result<&'a [u8], ()> {
        self.spend(size)?;
        self.cache.read_bytes_at(offset, size)
    }

    fn read_bytes_at_until(
        self,
        range: std::ops::Range<u64>,
        delimiter: u8,
    ) -> Result<&'a [u8], ()> {
        // Reads up to the whole range while looking for the delimiter.
        self.spend(range.end.saturating_sub(range.start).min(4096))?;
        self.cache.read_bytes_at_until(range, delimiter)
    }
}

/// The load bias (runtime address − address stated in the file) of an object that `mapping`
/// maps, from the object's loadable segments.
///
/// In the binary, the segment whose file range holds the mapping's file offset (the
/// executable one, when the page is shared) says which stated address that offset has; the
/// mapping's start is where it was loaded. A separate
/// debug file has the binary's segment addresses but not its file offsets (objcopy gives
/// the code's segments zero sizes and offsets); there, the mapping is taken to start at the first executable
/// segment, on the page boundary below it, which is how the preload reports a module's
/// executable range (`preload/src/modules.rs`).
pub fn load_bias(segments: &[Segment], mapping: &Mapping) -> Option<u64> {
    let offset = mapping.file_offset;
    // The page that holds the mapping's first byte may also hold the end of the segment
    // before (lld packs segments): the executable one is the one mapped.
    let holds = |s: &&Segment| {
        s.file_size > 0 && s.offset & !(PAGE - 1) <= offset && offset < s.offset + s.file_size
    };
    let first_exec = segments.iter().find(|s| s.executable);
    let in_file = match first_exec {
        Some(exec) if exec.file_size == 0 => None,
        _ => segments
            .iter()
            .filter(|s| s.executable)
            .find(holds)
            .or_else(|| segments.iter().find(holds)),
    };
    if let Some(s) = in_file {
        let stated = s.address.wrapping_add(offset).wrapping_sub(s.offset);
        return Some(mapping.memory_start.wrapping_sub(stated));
    }
    let first_exec = first_exec?;
    if first_exec.file_size > 0 {
        // A binary (its code is in the file) with no segment at that offset is not the
        // file that was mapped.
        return None;
    }
    Some(
        mapping
            .memory_start
            .wrapping_sub(first_exec.address & !(PAGE - 1)),
    )
}

/// Lowercase or uppercase hex to bytes; `None` if it is not hex.
fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether a mapping's file name is one the kernel or loader gives to memory without a file.
fn is_pseudo(name: &str) -> bool {
    name.is_empty()
        || name.starts_with('[')
        || [
            "//anon",
            "linux-vdso",
            "linux-gate",
            "/memfd:",
            "memfd:",
            "anon_inode:",
            "/SYSV",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a profile names is opened without blocking and only if it is a regular file off
    /// procfs and sysfs; a header that claims more than the cap is not read.
    #[test]
    fn open_regular_refuses_fifos_procfs_and_sysfs() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c_fifo = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
        // No writer: a blocking open would wait here forever.
        assert!(open_regular(&fifo).is_err());
        assert!(open_regular(Path::new("/proc/self/status")).is_err());
        assert!(open_regular(Path::new("/sys/kernel/mm/transparent_hugepage/enabled")).is_err());
        let own = std::env::current_exe().unwrap();
        assert!(open_regular(&own).is_ok());
        assert!(ElfHeaders::read(&own).is_some());
    }

    /// A sparse file whose symbol table claims 4 GiB: `object`'s ReadCache would allocate
    /// and read all of it (seconds, and 4 GiB of memory); the cap refuses the file at once.
    #[test]
    fn headers_that_claim_more_than_the_cap_are_not_read() {
        let mut elf = vec![0u8; 64 + 3 * 64];
        elf[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
        let put = |elf: &mut Vec<u8>, at: usize, bytes: &[u8]| {
            elf[at..at + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut elf, 16, &3u16.to_le_bytes()); // ET_DYN
        put(&mut elf, 18, &62u16.to_le_bytes()); // EM_X86_64
        put(&mut elf, 20, &1u32.to_le_bytes());
        put(&mut elf, 40, &64u64.to_le_bytes()); // e_shoff
        put(&mut elf, 52, &64u16.to_le_bytes()); // e_ehsize
        put(&mut elf, 54, &56u16.to_le_bytes());
        put(&mut elf, 58, &64u16.to_le_bytes()); // e_shentsize
        put(&mut elf, 60, &3u16.to_le_bytes()); // e_shnum
        put(&mut elf, 62, &2u16.to_le_bytes()); // e_shstrndx: the strtab
        let symtab = 64 + 64;
        put(&mut elf, symtab + 4, &2u32.to_le_bytes()); // SHT_SYMTAB
        put(&mut elf, symtab + 24, &4096u64.to_le_bytes());
        put(&mut elf, symtab + 32, &(4u64 << 30).to_le_bytes());
        put(&mut elf, symtab + 40, &2u32.to_le_bytes()); // sh_link: the strtab
        put(&mut elf, symtab + 56, &24u64.to_le_bytes());
        let strtab = 64 + 2 * 64;
        put(&mut elf, strtab + 4, &3u32.to_le_bytes()); // SHT_STRTAB
        put(&mut elf, strtab + 24, &300u64.to_le_bytes());
        put(&mut elf, strtab + 32, &1u64.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.so");
        std::fs::write(&path, &elf).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096 + (4 << 30))
            .unwrap();
        let start = std::time::Instant::now();
        assert!(ElfHeaders::read(&path).is_none());
        let took = start.elapsed();
        assert!(
            took < std::time::Duration::from_secs(2),
            "{took:?}: the claimed symbol table was read"
        );
        // The same file with a small symbol table is read.
        put(&mut elf, symtab + 32, &24u64.to_le_bytes());
        std::fs::write(&path, &elf).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(8192)
            .unwrap();
        assert!(ElfHeaders::read(&path).is_some());
    }

    fn mapping(start: u64, offset: u64) -> Mapping {
        Mapping {
            id: 1,
            memory_start: start,
            memory_limit: start + 0x10000,
            file_offset: offset,
            ..Default::default()
        }
    }

    /// `gcc` output (ld.bfd, -z separate-code): text at offset 0x1000, address 0x1000.
    #[test]
    fn bias_from_the_binarys_segment() {
        let segments = [
            Segment {
                offset: 0,
                file_size: 0x600,
                address: 0,
                executable: false,
            },
            Segment {
                offset: 0x1000,
                file_size: 0x2000,
                address: 0x1000,
                executable: true,
            },
        ];
        let bias = load_bias(&segments, &mapping(0x5555_0000_1000, 0x1000));
        assert_eq!(bias, Some(0x5555_0000_0000));
        // lld: the text's address is one page above its offset.
        let lld = [Segment {
            offset: 0x1230,
            file_size: 0x2000,
            address: 0x2230,
            executable: true,
        }];
        assert_eq!(
            load_bias(&lld, &mapping(0x7f00_0000_2000, 0x1000)),
            Some(0x7f00_0000_0000)
        );
        // lld again, as it links Rust test binaries: the read-only segment ends in the page
        // where the code begins.
        let packed = [
            Segment {
                offset: 0,
                file_size: 0x93bec,
                address: 0,
                executable: false,
            },
            Segment {
                offset: 0x93bf0,
                file_size: 0x1bde40,
                address: 0x94bf0,
                executable: true,
            },
        ];
        assert_eq!(
            load_bias(&packed, &mapping(0x5555_0009_4000, 0x93000)),
            Some(0x5555_0000_0000)
        );
        // No segment at that offset: not this file.
        assert_eq!(load_bias(&lld, &mapping(0x7f00_0000_2000, 0x9000)), None);
    }

    /// A debug file made by `objcopy --only-keep-debug`: addresses kept, the code's offsets
    /// and sizes 0 (the headers and notes of the first segment are still in the file).
    #[test]
    fn bias_from_a_debug_files_segments() {
        let segments = [
            Segment {
                offset: 0,
                file_size: 0x39c,
                address: 0,
                executable: false,
            },
            Segment {
                offset: 0,
                file_size: 0,
                address: 0x1230,
                executable: true,
            },
        ];
        assert_eq!(
            load_bias(&segments, &mapping(0x5555_0000_1000, 0x1000)),
            Some(0x5555_0000_0000)
        );
    }

    #[inline(never)]
    fn probe() -> u64 {
        std::hint::black_box(42) * std::hint::black_box(3)
    }

    /// This test binary's mapping of `probe`, as the preload would report it: start, end,
    /// file offset, path.
    fn own_mapping(runtime: u64) -> (u64, u64, u64, String) {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (low, high) = fields.first()?.split_once('-')?;
                let low = u64::from_str_radix(low, 16).ok()?;
                let high = u64::from_str_radix(high, 16).ok()?;
                let offset = u64::from_str_radix(fields.get(2)?, 16).ok()?;
                let path = fields.get(5)?.to_string();
                (low..high)
                    .contains(&runtime)
                    .then_some((low, high, offset, path))
            })
            .expect("probe() lies in a file mapping")
    }

    /// An unnamed location and one with a stand-in name get names; a named one keeps its own;
    /// function ids of another writer's numbering do not collide with the new ones.
    #[test]
    fn names_what_has_no_name_and_keeps_the_rest() {
        use crate::pprof::builder::FrameLine;
        use anyprof_symbolizer::FileOffset;

        let runtime = probe as *const () as usize as u64;
        let (start, end, offset, path) = own_mapping(runtime);
        let build_id = ElfHeaders::read(Path::new(&path))
            .and_then(|h| h.build_id)
            .unwrap_or_default();
        let base = path.rsplit('/').next().unwrap().to_string();
        let mut b = ProfileBuilder::new(&[("samples", "count")], ("cpu", "nanoseconds"), 1);
        let m = b.mapping(
            RuntimeAddress(start),
            RuntimeAddress(end),
            FileOffset(offset),
            &path,
            &hex(&build_id),
            false,
            false,
        );
        let line = |name: String, file: &str, line| FrameLine {
            name: name.clone(),
            system_name: name,
            file: file.into(),
            line,
        };
        let unnamed = b.location(m, RuntimeAddress(runtime), &[]);
        let stand_in = line(
            format!("{base}+0x{:x}", runtime + 1 - start + offset),
            "",
            0,
        );
        let placeholder = b.location(m, RuntimeAddress(runtime + 1), &[stand_in]);
        let kept = b.location(
            m,
            RuntimeAddress(runtime + 2),
            &[line("kept".into(), "k.c", 7)],
        );
        b.sample(vec![unnamed, placeholder, kept], vec![1], &[]);
        let mut profile = b.finish();
        for f in &mut profile.function {
            f.id += 100;
        }
        for l in profile.location.iter_mut().flat_map(|l| l.line.iter_mut()) {
            l.function_id += 100;
        }

        let mut symbolizer = crate::symbolize::symbolizer_from_env();
        let (named, report) = symbolize_profile(profile, &mut symbolizer, &[]);
        assert_eq!(
            (report.already_named, report.unnamed, report.named),
            (1, 2, 2)
        );
        let name_of = |location_id: u64| -> Vec<String> {
            let location = named.location.iter().find(|l| l.id == location_id).unwrap();
            location
                .line
                .iter()
                .map(|l| {
                    let f = named
                        .function
                        .iter()
                        .find(|f| f.id == l.function_id)
                        .unwrap();
                    named.string_table[f.name as usize].clone()
                })
                .collect()
        };
        assert!(
            name_of(unnamed).last().unwrap().ends_with("probe"),
            "{:?}",
            name_of(unnamed)
        );
        assert!(name_of(placeholder).last().unwrap().ends_with("probe"));
        assert_eq!(name_of(kept), ["kept"]);
        let ids: std::collections::HashSet<u64> = named.function.iter().map(|f| f.id).collect();
        assert_eq!(ids.len(), named.function.len(), "function ids collide");
        assert!(named.mapping[0].has_functions);
    }

    #[test]
    fn hex_build_ids() {
        assert_eq!(parse_hex("0aFf"), Some(vec![0x0a, 0xff]));
        assert_eq!(parse_hex("abc"), None);
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(parse_hex(""), Some(vec![]));
    }
}
