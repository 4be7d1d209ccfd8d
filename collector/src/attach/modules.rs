//! The code a process we attach to has mapped: each executable file mapping as a profile
//! module (the same [`Module`] the preload reports, so profiles and symbolization are
//! `record`'s) and as a framehop module with its unwind tables, read from the file through
//! `/proc/PID/root`. Collector side (std).

use std::collections::HashMap;

use anyhow::{Context, Result};
use anyprof_symbolizer::Access;
use anyprof_wire::Module;
use framehop::ExplicitModuleSectionInfo;
use object::{Object, ObjectSection, ObjectSegment};

use super::procfs::{self, ExecMapping};

/// A framehop module whose tables are owned copies.
pub type UnwindModule = framehop::Module<Vec<u8>>;

/// What one executable file mapping is for the profile and for the unwinder.
pub struct Mapped {
    pub module: Module,
    /// `None` when the file has no `.eh_frame` (frame pointers are then all there is).
    pub unwind: Option<UnwindModule>,
}

/// Reads what the profile and the unwinder need of `mapping` of process `pid`, opening the
/// file with `access`'s rights (the process's own); `id` is the module's id in the profile.
pub fn read(pid: u32, mapping: &ExecMapping, id: u32, access: Option<&Access>) -> Result<Mapped> {
    let path = procfs::file_of(pid, &mapping.path);
    anyprof_symbolizer::with_file_as(access, &path, |data| describe(mapping, id, data))
        .map_err(|miss| anyhow::anyhow!("{}: {miss}", path.display()))?
}

fn describe(mapping: &ExecMapping, id: u32, data: &[u8]) -> Result<Mapped> {
    let file = object::File::parse(data).context("not an ELF file")?;
    let build_id = file.build_id().ok().flatten().unwrap_or_default().to_vec();
    // The segment the mapping's file offset falls in: its addresses in the file are
    // p_vaddr - p_offset + (file offset), wherever the loader put it.
    let load_bias = file
        .segments()
        .find_map(|s| {
            let (offset, size) = s.file_range();
            let aligned = offset & !0xfff;
            (aligned <= mapping.offset && mapping.offset < offset + size.max(1)).then(|| {
                let address_of_offset = s
                    .address()
                    .wrapping_sub(offset)
                    .wrapping_add(mapping.offset);
                mapping.start.wrapping_sub(address_of_offset)
            })
        })
        .unwrap_or(mapping.start.wrapping_sub(mapping.offset));
    let module = Module {
        id,
        start: mapping.start,
        end: mapping.end,
        file_offset: mapping.offset,
        load_bias,
        path: mapping.path.clone(),
        build_id,
    };
    let section = |name: &str| {
        let s = file.section_by_name(name)?;
        let bytes = s.uncompressed_data().ok()?.into_owned();
        Some((s.address()..s.address() + bytes.len() as u64, bytes))
    };
    let unwind = section(".eh_frame").map(|(eh_svma, eh)| {
        let hdr = section(".eh_frame_hdr");
        let text = file
            .sections()
            .find(|s| s.name() == Ok(".text"))
            .map(|s| s.address()..s.address() + s.size());
        let info = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: text,
            eh_frame_svma: Some(eh_svma),
            eh_frame: Some(eh),
            eh_frame_hdr_svma: hdr.as_ref().map(|(svma, _)| svma.clone()),
            eh_frame_hdr: hdr.map(|(_, bytes)| bytes),
            ..Default::default()
        };
        let name = String::from_utf8_lossy(&mapping.path).into_owned();
        framehop::Module::new(name, mapping.start..mapping.end, load_bias, info)
    });
    Ok(Mapped { module, unwind })
}

/// The modules of one process seen so far: those mapped now, and those unmapped since (old
/// samples may point into them).
#[derive(Default)]
pub struct ModuleSet {
    known: HashMap<ExecMapping, u32>,
    next_id: u32,
}

impl ModuleSet {
    /// The mappings of `pid` not seen before, read (see [`read`]) with `access`'s rights; a
    /// file that cannot be read is warned about once and left out.
    pub fn new_mappings(&mut self, pid: u32, access: Option<&Access>) -> Vec<Mapped> {
        let Ok(mappings) = procfs::exec_mappings(pid) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for m in mappings {
            if self.known.contains_key(&m) {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.known.insert(m.clone(), id);
            match read(pid, &m, id, access) {
                Ok(mapped) => out.push(mapped),
                Err(err) => eprintln!(
                    "anyprof: {}: its frames are left unwound and unnamed: {err:#}",
                    String::from_utf8_lossy(&m.path)
                ),
            }
        }
        out
    }
}
