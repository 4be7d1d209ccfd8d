//! The module map: which objects are loaded where, for the unwinder (in process) and for the
//! collector (which symbolizes).
//!
//! Objects are enumerated with `dl_iterate_phdr`. For each one we take, straight from memory
//! the loader already mapped: the executable `PT_LOAD` range, the `PT_GNU_EH_FRAME` header and
//! the `.eh_frame` it points to (framehop's unwind data), and the GNU build id from `PT_NOTE`.
//! No file is opened.
//!
//! dlopen/dlclose are noticed by polling the loader's `dlpi_adds`/`dlpi_subs` counters from
//! the background thread ([`ModuleMap::refresh`]); `dlopen` itself is not wrapped, because
//! glibc uses the caller's address to pick `$ORIGIN` and the namespace. On a change a new
//! unwinder is built and published ([`crate::signal::unwind::publish`]).
//!
//! World: background thread only (a hook whose stack runs into an object not known yet
//! wakes that thread, it never touches the map); may allocate.

use std::ffi::CStr;
use std::sync::Arc;

use framehop::x86_64::UnwinderX86_64;
use framehop::{ExplicitModuleSectionInfo, Module, Unwinder as _};

use anyprof_wire::ModuleInfo;

use crate::signal::unwind::{self, Unwinder};

const PAGE: u64 = 4096;

/// One loaded object.
#[derive(Clone, Debug)]
pub struct LoadedModule {
    /// Id sent to the collector.
    pub id: u32,
    /// Runtime address minus ELF address (`dlpi_addr`).
    pub load_bias: u64,
    /// Path, absolute where it could be made so; `[vdso]` for the vDSO.
    pub path: Vec<u8>,
    /// GNU build id (may be empty).
    pub build_id: Vec<u8>,
    /// Page-aligned executable mapping `[start, end)` and its file offset, as in
    /// `/proc/self/maps`.
    pub map_start: u64,
    pub map_end: u64,
    pub map_offset: u64,
    /// Exact executable range (union of executable segments).
    exec: (u64, u64),
    /// `.eh_frame_hdr` and `.eh_frame` in memory, if present.
    eh_frame_hdr: Option<&'static [u8]>,
    eh_frame: Option<&'static [u8]>,
    /// For objects loaded after start (which `dlclose` may unmap while a signal handler is
    /// unwinding through their tables): our own copy of the unwind tables.
    unwind_copy: Option<Arc<UnwindCopy>>,
}

/// A private copy of an object's `.eh_frame_hdr` and `.eh_frame`, so that unwinding never
/// reads memory that `dlclose` may unmap at any moment. Freed only after every unwinder that
/// refers to it has been retired.
#[derive(Debug)]
pub struct UnwindCopy {
    hdr: Box<[u8]>,
    eh: Box<[u8]>,
}

impl LoadedModule {
    /// The wire form of this module.
    pub fn info(&self) -> ModuleInfo<'_> {
        ModuleInfo {
            id: self.id,
            start: self.map_start,
            end: self.map_end,
            file_offset: self.map_offset,
            load_bias: self.load_bias,
            path: &self.path,
            build_id: &self.build_id,
        }
    }

    /// The exact executable range `[start, end)`.
    pub fn exec_range(&self) -> (u64, u64) {
        self.exec
    }

    fn key(&self) -> (u64, &[u8]) {
        (self.load_bias, &self.path)
    }

    /// Copies the unwind tables out of the object (call while the loader lock is held, so
    /// the object cannot go away meanwhile).
    fn copy_unwind_tables(&mut self) {
        if let (Some(hdr), Some(eh)) = (self.eh_frame_hdr, self.eh_frame) {
            let eh = eh.get(..eh_frame_len(eh)).unwrap_or(eh);
            self.unwind_copy = Some(Arc::new(UnwindCopy {
                hdr: hdr.into(),
                eh: eh.into(),
            }));
            self.eh_frame = Some(eh);
        }
    }

    fn framehop_module(&self) -> Option<Module<&'static [u8]>> {
        let (hdr, eh) = (self.eh_frame_hdr?, self.eh_frame?);
        let bias = self.load_bias;
        // Addresses as stated in the object, from where the tables sit in the object's mapping.
        let svma = |s: &'static [u8]| {
            let start = (s.as_ptr() as u64).wrapping_sub(bias);
            start..start + s.len() as u64
        };
        let (exec_start, exec_end) = self.exec;
        let (hdr_data, eh_data, text): (&'static [u8], &'static [u8], Option<&'static [u8]>) =
            match &self.unwind_copy {
                // SAFETY: the copy outlives every unwinder built from it (ModuleMap keeps it in
                // `retired_copies` until those unwinders are freed); without the object's code
                // mapping, framehop does without prologue analysis.
                Some(c) => unsafe {
                    (
                        core::slice::from_raw_parts(c.hdr.as_ptr(), c.hdr.len()),
                        core::slice::from_raw_parts(c.eh.as_ptr(), c.eh.len()),
                        None,
                    )
                },
                // SAFETY: objects loaded at start are never unloaded; their executable range is
                // mapped readable (x86_64 has no execute-only pages under Linux's default policy).
                None => (
                    hdr,
                    eh,
                    Some(unsafe {
                        core::slice::from_raw_parts(
                            exec_start as *const u8,
                            (exec_end - exec_start) as usize,
                        )
                    }),
                ),
            };
        let info = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: Some(exec_start.wrapping_sub(bias)..exec_end.wrapping_sub(bias)),
            text,
            eh_frame_svma: Some(svma(eh)),
            eh_frame: Some(eh_data),
            eh_frame_hdr_svma: Some(svma(hdr)),
            eh_frame_hdr: Some(hdr_data),
            ..Default::default()
        };
        let name = String::from_utf8_lossy(&self.path).into_owned();
        Some(Module::new(name, exec_start..exec_end, bias, info))
    }
}

/// What changed in one refresh.
#[derive(Default)]
pub struct Changes {
    /// Newly loaded modules (indices into [`ModuleMap::modules`]).
    pub added: Vec<usize>,
    /// Ids of unloaded modules.
    pub removed: Vec<u32>,
}

/// The current set of loaded modules and the bookkeeping to notice changes.
pub struct ModuleMap {
    /// Loaded modules.
    pub modules: Vec<LoadedModule>,
    next_id: u32,
    generation: Option<(u64, u64)>,
    /// Ids the collector has been told about.
    reported: Vec<u32>,
    retired: Vec<*mut Unwinder>,
    /// Unwind-table copies of unloaded objects, kept until the unwinders using them go.
    retired_copies: Vec<Arc<UnwindCopy>>,
    /// True after the first enumeration: objects found later were dlopen'ed and get copies.
    started: bool,
    exe_path: Vec<u8>,
}

// SAFETY: the raw pointers in `retired` are owned unwinders only ever touched by the thread
// holding the ModuleMap (it lives behind a Mutex).
unsafe impl Send for ModuleMap {}

impl ModuleMap {
    /// An empty map; `exe_path` names the main executable (the loader calls it "").
    pub const fn new() -> ModuleMap {
        ModuleMap {
            modules: Vec::new(),
            next_id: 1,
            generation: None,
            reported: Vec::new(),
            retired: Vec::new(),
            retired_copies: Vec::new(),
            started: false,
            exe_path: Vec::new(),
        }
    }

    /// Re-enumerates loaded objects if the loader's counters moved (or on the first call),
    /// publishes a new unwinder on change, frees retired unwinders when safe, and returns
    /// what the collector has not been told yet.
    pub fn refresh(&mut self) -> Changes {
        self.update();
        self.unreported()
    }

    /// The first half of [`ModuleMap::refresh`]: brings the module list and the unwinder up
    /// to date, without reporting. True if the unwinder changed.
    pub fn update(&mut self) -> bool {
        if unwind::retire_when_quiet(&mut self.retired) {
            self.retired_copies.clear();
        }
        let generation = loader_generation();
        if self.generation == Some(generation) {
            return false;
        }
        self.generation = Some(generation);
        if self.exe_path.is_empty() {
            self.exe_path = std::fs::read_link("/proc/self/exe")
                .map(|p| p.into_os_string().into_encoded_bytes())
                .unwrap_or_else(|_| b"[main]".to_vec());
        }
        let known: Vec<(u64, Vec<u8>)> = self
            .modules
            .iter()
            .map(|m| (m.load_bias, m.path.clone()))
            .collect();
        let found = enumerate(&self.exe_path, self.started.then_some(known.as_slice()));
        self.started = true;
        let old = std::mem::take(&mut self.modules);
        let mut structure_changed = false;
        for mut m in found {
            if let Some(prev) = old.iter().find(|o| o.key() == m.key()) {
                m.id = prev.id;
                if m.unwind_copy.is_none() {
                    m.unwind_copy.clone_from(&prev.unwind_copy);
                }
            } else {
                m.id = self.next_id;
                self.next_id += 1;
                structure_changed = true;
            }
            self.modules.push(m);
        }
        structure_changed |= old
            .iter()
            .any(|o| !self.modules.iter().any(|m| m.id == o.id));
        if structure_changed {
            let mut unwinder: Box<Unwinder> = Box::new(UnwinderX86_64::new());
            for m in &self.modules {
                if let Some(fm) = m.framehop_module() {
                    unwinder.add_module(fm);
                }
            }
            let previous = unwind::publish(unwinder);
            if !previous.is_null() {
                self.retired.push(previous);
            }
            for o in &old {
                if let (Some(copy), false) =
                    (&o.unwind_copy, self.modules.iter().any(|m| m.id == o.id))
                {
                    self.retired_copies.push(copy.clone());
                }
            }
            if unwind::retire_when_quiet(&mut self.retired) {
                self.retired_copies.clear();
            }
        }
        structure_changed
    }

    /// Modules loaded and unloaded since the collector was last told, marked as told.
    fn unreported(&mut self) -> Changes {
        let mut changes = Changes::default();
        for (i, m) in self.modules.iter().enumerate() {
            if !self.reported.contains(&m.id) {
                changes.added.push(i);
                self.reported.push(m.id);
            }
        }
        let modules = &self.modules;
        self.reported.retain(|id| {
            let present = modules.iter().any(|m| m.id == *id);
            if !present {
                changes.removed.push(*id);
            }
            present
        });
        changes
    }
}

impl ModuleMap {
    /// Makes the next [`ModuleMap::refresh`] report every module as added (for a new
    /// connection). Ids stay the same, so samples and modules keep matching.
    pub fn forget_reported(&mut self) {
        self.generation = None;
        self.reported.clear();
    }
}

/// The loader's (adds, subs) counters.
pub(crate) fn loader_generation() -> (u64, u64) {
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid info; `data` is the &mut (u64, u64) below.
        unsafe {
            let out = &mut *(data as *mut (u64, u64));
            *out = ((*info).dlpi_adds, (*info).dlpi_subs);
        }
        1
    }
    let mut out = (0u64, 0u64);
    // SAFETY: the callback only writes through `data`, which points at `out`.
    unsafe { libc::dl_iterate_phdr(Some(first), &mut out as *mut _ as *mut libc::c_void) };
    out
}

/// Lists the loaded objects. With `known` (every refresh after the first), objects not in
/// it were loaded since and get their unwind tables copied, inside the loader's callback.
fn enumerate(exe_path: &[u8], known: Option<&[(u64, Vec<u8>)]>) -> Vec<LoadedModule> {
    struct Ctx<'a> {
        out: Vec<LoadedModule>,
        exe_path: &'a [u8],
        known: Option<&'a [(u64, Vec<u8>)]>,
    }
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid info for the duration of the call; `data` is
        // the Ctx below.
        let (info, ctx) = unsafe { (&*info, &mut *(data as *mut Ctx<'_>)) };
        // SAFETY: dlpi_phdr points at dlpi_phnum program headers of a loaded object.
        let phdrs =
            unsafe { core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
        let name = if info.dlpi_name.is_null() {
            &[][..]
        } else {
            // SAFETY: dlpi_name is a NUL-terminated string owned by the loader.
            unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes()
        };
        if let Some(mut m) = describe(info.dlpi_addr, name, phdrs, ctx.exe_path) {
            if let Some(known) = ctx.known {
                if !known
                    .iter()
                    .any(|(bias, path)| *bias == m.load_bias && *path == m.path)
                {
                    m.copy_unwind_tables();
                }
            }
            ctx.out.push(m);
        }
        0
    }
    let mut ctx = Ctx {
        out: Vec::new(),
        exe_path,
        known,
    };
    // SAFETY: the callback only touches `ctx` through `data`.
    unsafe { libc::dl_iterate_phdr(Some(each), &mut ctx as *mut Ctx<'_> as *mut libc::c_void) };
    ctx.out
}

fn describe(
    bias: u64,
    name: &[u8],
    phdrs: &[libc::Elf64_Phdr],
    exe_path: &[u8],
) -> Option<LoadedModule> {
    let mut exec: Option<(u64, u64)> = None;
    let mut first_exec: Option<&libc::Elf64_Phdr> = None;
    let mut eh_frame_hdr = None;
    let mut build_id = Vec::new();
    for ph in phdrs {
        match ph.p_type {
            libc::PT_LOAD if ph.p_flags & libc::PF_X != 0 && ph.p_memsz > 0 => {
                let (s, e) = (
                    bias.wrapping_add(ph.p_vaddr),
                    bias.wrapping_add(ph.p_vaddr + ph.p_memsz),
                );
                exec = Some(match exec {
                    Some((a, b)) => (a.min(s), b.max(e)),
                    None => (s, e),
                });
                first_exec.get_or_insert(ph);
            }
            libc::PT_GNU_EH_FRAME if ph.p_memsz >= 4 => {
                // SAFETY: the segment is mapped by the loader for the object's lifetime.
                eh_frame_hdr = Some(unsafe {
                    core::slice::from_raw_parts(
                        bias.wrapping_add(ph.p_vaddr) as *const u8,
                        ph.p_memsz as usize,
                    )
                });
            }
            libc::PT_NOTE if build_id.is_empty() => {
                // SAFETY: as above.
                let notes = unsafe {
                    core::slice::from_raw_parts(
                        bias.wrapping_add(ph.p_vaddr) as *const u8,
                        ph.p_memsz as usize,
                    )
                };
                build_id = find_build_id(notes).map(<[u8]>::to_vec).unwrap_or_default();
            }
            _ => {}
        }
    }
    let exec = exec?;
    let first_exec = first_exec?;
    let eh_frame = eh_frame_hdr.and_then(|hdr| locate_eh_frame(hdr, bias, phdrs));
    let path = if name.is_empty() {
        exe_path.to_vec()
    } else if name.starts_with(b"linux-vdso") || name.starts_with(b"linux-gate") {
        b"[vdso]".to_vec()
    } else if name.starts_with(b"/") {
        name.to_vec()
    } else {
        use std::os::unix::ffi::OsStrExt;
        std::fs::canonicalize(std::ffi::OsStr::from_bytes(name))
            .map(|p| p.into_os_string().into_encoded_bytes())
            .unwrap_or_else(|_| name.to_vec())
    };
    let seg_start = bias.wrapping_add(first_exec.p_vaddr);
    Some(LoadedModule {
        id: 0,
        load_bias: bias,
        path,
        build_id,
        map_start: seg_start & !(PAGE - 1),
        map_end: (exec.1 + PAGE - 1) & !(PAGE - 1),
        map_offset: first_exec.p_offset & !(PAGE - 1),
        exec,
        eh_frame_hdr,
        eh_frame,
        unwind_copy: None,
    })
}

/// Finds the `.eh_frame` that a `.eh_frame_hdr` points to; its length runs to the end of the
/// loaded segment that contains it (the section's own size is not in memory).
fn locate_eh_frame(
    hdr: &'static [u8],
    bias: u64,
    phdrs: &[libc::Elf64_Phdr],
) -> Option<&'static [u8]> {
    let (&version, &enc) = (hdr.first()?, hdr.get(1)?);
    if version != 1 {
        return None;
    }
    let field_addr = hdr.as_ptr() as u64 + 4;
    let value = decode_pointer(enc, hdr.get(4..)?, field_addr, hdr.as_ptr() as u64)?;
    let seg = phdrs.iter().find(|ph| {
        let start = bias.wrapping_add(ph.p_vaddr);
        ph.p_type == libc::PT_LOAD && value >= start && value < start + ph.p_memsz
    })?;
    let end = bias.wrapping_add(seg.p_vaddr + seg.p_memsz);
    // SAFETY: [value, end) lies inside a PT_LOAD segment mapped for the object's lifetime.
    Some(unsafe { core::slice::from_raw_parts(value as *const u8, (end - value) as usize) })
}

/// The length of `.eh_frame` proper within `eh` (which runs to the end of its segment):
/// entries are length-prefixed and the section ends with a zero-length terminator.
fn eh_frame_len(eh: &[u8]) -> usize {
    let mut at = 0usize;
    while let Some(word) = eh.get(at..at + 4) {
        let len = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) as usize;
        if len == 0 {
            return at + 4;
        }
        let entry = if len == 0xffff_ffff {
            let Some(ext) = eh.get(at + 4..at + 12) else {
                return eh.len();
            };
            let mut b = [0u8; 8];
            b.copy_from_slice(ext);
            12usize.saturating_add(u64::from_le_bytes(b) as usize)
        } else {
            4 + len
        };
        at = at.saturating_add(entry);
    }
    eh.len().min(at)
}

/// Decodes a DWARF EH pointer with encoding `enc` from `bytes`.
fn decode_pointer(enc: u8, bytes: &[u8], field_addr: u64, datarel_base: u64) -> Option<u64> {
    fn le<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
        b.get(..N)?.try_into().ok()
    }
    let raw: u64 = match enc & 0x0f {
        0x00 | 0x04 => u64::from_le_bytes(le(bytes)?),
        0x0c => i64::from_le_bytes(le(bytes)?) as u64,
        0x03 => u64::from(u32::from_le_bytes(le(bytes)?)),
        0x0b => i32::from_le_bytes(le(bytes)?) as i64 as u64,
        0x02 => u64::from(u16::from_le_bytes(le(bytes)?)),
        0x0a => i16::from_le_bytes(le(bytes)?) as i64 as u64,
        _ => return None,
    };
    match enc & 0x70 {
        0x00 => Some(raw),
        0x10 => Some(field_addr.wrapping_add(raw)),
        0x30 => Some(datarel_base.wrapping_add(raw)),
        _ => None,
    }
}

/// Finds the NT_GNU_BUILD_ID descriptor in a PT_NOTE segment.
fn find_build_id(mut notes: &[u8]) -> Option<&[u8]> {
    fn word(b: &[u8], at: usize) -> Option<usize> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
    }
    let align4 = |n: usize| (n + 3) & !3;
    while notes.len() >= 12 {
        let (namesz, descsz, kind) = (word(notes, 0)?, word(notes, 4)?, word(notes, 8)?);
        let name = notes.get(12..12 + namesz)?;
        let desc_at = 12 + align4(namesz);
        let desc = notes.get(desc_at..desc_at + descsz)?;
        if kind == 3 && name == b"GNU\0" {
            return Some(desc);
        }
        notes = notes.get(desc_at + align4(descsz)..)?;
    }
    None
}

/// The base address and file name of the loaded object containing code address `f`.
pub fn object_at(f: usize) -> Option<(usize, *const libc::c_char)> {
    if f == 0 {
        return None;
    }
    let mut info = core::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr only fills `info`; on failure (0) nothing is read from it.
    if unsafe { libc::dladdr(f as *const libc::c_void, info.as_mut_ptr()) } == 0 {
        return None;
    }
    // SAFETY: dladdr succeeded and filled `info` (zeroed before).
    let info = unsafe { info.assume_init() };
    Some((info.dli_fbase as usize, info.dli_fname))
}

/// True if `f` is a canonical PLT entry: the address a non-PIE executable gives a function
/// it imports and takes the address of (its dynamic symbol is undefined but has a value, and
/// `dlsym` returns that value). Calls through it still reach whatever the loader bound the
/// name to, so it says nothing about who implements the function.
pub fn is_plt_stub(f: usize) -> bool {
    /// glibc's `RTLD_DL_SYMENT`: `dladdr1` also returns the matching symbol table entry.
    const RTLD_DL_SYMENT: libc::c_int = 1;
    let mut info = core::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    let mut sym: *mut libc::c_void = core::ptr::null_mut();
    // SAFETY: dladdr1 fills `info` and `sym`; on failure (0) neither is read.
    let found = unsafe {
        libc::dladdr1(
            f as *const libc::c_void,
            info.as_mut_ptr(),
            &mut sym,
            RTLD_DL_SYMENT,
        )
    };
    if found == 0 || sym.is_null() {
        return false;
    }
    // SAFETY: with RTLD_DL_SYMENT a non-null `sym` points at the loader's own, immutable
    // dynamic symbol table entry of a loaded object.
    let sym = unsafe { &*(sym as *const libc::Elf64_Sym) };
    // SHN_UNDEF is section index 0.
    sym.st_shndx == 0 && sym.st_value != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_test_binarys_modules_with_unwind_data() {
        let found = enumerate(b"/proc/self/exe", None);
        assert!(found.len() >= 2, "expected the executable and libc");
        let libc = found
            .iter()
            .find(|m| m.path.windows(7).any(|w| w == b"libc.so"))
            .expect("libc");
        assert!(libc.eh_frame.is_some() && libc.eh_frame_hdr.is_some());
        assert_eq!(libc.build_id.len(), 20);
        assert!(libc.map_start <= libc.exec.0 && libc.exec.1 <= libc.map_end);
    }

    #[test]
    fn eh_frame_length_stops_at_the_terminator() {
        let mut eh = Vec::new();
        eh.extend_from_slice(&8u32.to_le_bytes());
        eh.extend_from_slice(&[1; 8]);
        eh.extend_from_slice(&4u32.to_le_bytes());
        eh.extend_from_slice(&[2; 4]);
        eh.extend_from_slice(&0u32.to_le_bytes());
        eh.extend_from_slice(&[0xee; 32]); // what follows in the segment
        assert_eq!(eh_frame_len(&eh), 24);
        assert_eq!(
            eh_frame_len(&eh[..10]),
            10,
            "a cut table is taken whole, never overrun"
        );
    }

    #[test]
    fn decodes_eh_pointer_encodings() {
        assert_eq!(
            decode_pointer(0x1b, &(-16i32).to_le_bytes(), 1000, 0),
            Some(984)
        );
        assert_eq!(decode_pointer(0x03, &7u32.to_le_bytes(), 1000, 0), Some(7));
        assert_eq!(
            decode_pointer(0x3b, &8i32.to_le_bytes(), 1000, 500),
            Some(508)
        );
        assert_eq!(decode_pointer(0x1b, &[1, 2], 1000, 0), None);
        assert_eq!(decode_pointer(0x0f, &[0; 8], 1000, 0), None);
    }

    #[test]
    fn parses_build_id_note_and_survives_garbage() {
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&3u32.to_le_bytes());
        note.extend_from_slice(&3u32.to_le_bytes());
        note.extend_from_slice(b"GNU\0");
        note.extend_from_slice(&[0xaa, 0xbb, 0xcc, 0]);
        assert_eq!(find_build_id(&note), Some(&[0xaa, 0xbb, 0xcc][..]));
        assert_eq!(find_build_id(&note[..13]), None);
        assert_eq!(find_build_id(&[0xff; 40]), None);
    }
}
