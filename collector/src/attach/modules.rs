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
    if mapping.path == procfs::VDSO {
        let ours = own_vdso().context("this process has no vDSO to read")?;
        if ours.len() as u64 != mapping.end - mapping.start {
            anyhow::bail!("its vDSO is not this kernel's (another size than ours)");
        }
        return describe(mapping, id, ours);
    }
    // As root, the mapping's own file through /proc/PID/map_files (the very inode mapped,
    // deleted or not, whatever now lies at its path); else its path in the process's root.
    // SAFETY: geteuid has no preconditions.
    let path = if unsafe { libc::geteuid() } == 0 {
        std::path::PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            mapping.start, mapping.end
        ))
    } else {
        procfs::file_of(pid, &mapping.path)
    };
    anyprof_symbolizer::with_file_as(access, &path, |data| describe(mapping, id, data))
        .map_err(|miss| anyhow::anyhow!("{}: {miss}", path.display()))?
}

fn describe(mapping: &ExecMapping, id: u32, data: &[u8]) -> Result<Mapped> {
    let file = object::File::parse(data).context("not an ELF file")?;
    let build_id = file.build_id().ok().flatten().unwrap_or_default().to_vec();
    let segments: Vec<Segment> = file
        .segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            let executable = match s.flags() {
                object::SegmentFlags::Elf { p_flags, .. } => p_flags.contains(object::elf::PF_X),
                _ => false,
            };
            Segment {
                offset,
                size,
                address: s.address(),
                executable,
            }
        })
        .collect();
    let load_bias = load_bias(&segments, mapping.start, mapping.offset);
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
        // Raw bytes: unwind tables are never compressed, and inflating what a file claims
        // would let it make us allocate without bound.
        let bytes = s
            .data()
            .ok()?
            .get(..MAX_TABLE_BYTES.min(s.size() as usize))?
            .to_vec();
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

/// This process's vDSO, the same image the kernel maps into every process of the host: its
/// unwind tables are the target's (which we could otherwise read only with ptrace's right to
/// attach, through /proc/PID/mem).
fn own_vdso() -> Option<&'static [u8]> {
    // SAFETY: getauxval has no preconditions.
    let start = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    let maps = std::fs::read("/proc/self/maps").ok()?;
    let mapping = maps
        .split(|&b| b == b'\n')
        .filter_map(procfs::parse_maps_line)
        .find(|m| m.path == procfs::VDSO && m.start == start)?;
    // SAFETY: the kernel maps the vDSO readable for the life of the process, from `start`
    // for the length /proc/self/maps gives, and never unmaps or changes it.
    Some(unsafe {
        std::slice::from_raw_parts(start as *const u8, (mapping.end - mapping.start) as usize)
    })
}

/// The most bytes of one unwind table copied (libxul's `.eh_frame` is about 10 MiB).
const MAX_TABLE_BYTES: usize = 64 << 20;

/// A program header, as far as the load bias goes.
#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    size: u64,
    address: u64,
    executable: bool,
}

/// Runtime address minus file address for an executable mapping at `start` of the file from
/// `offset` on: taken from the executable segment the offset falls in (its addresses in the
/// file are p_vaddr - p_offset + offset, wherever the loader put it). Only an executable one:
/// lld puts a read-only segment in the same page as the code (R at offset 0, RX at 0x6f0
/// with p_vaddr 0x16f0), and that one's addresses are a page off.
fn load_bias(segments: &[Segment], start: u64, offset: u64) -> u64 {
    segments
        .iter()
        .filter(|s| s.executable)
        .find(|s| s.offset & !0xfff <= offset && offset < s.offset + s.size.max(1))
        .map(|s| start.wrapping_sub(s.address.wrapping_sub(s.offset).wrapping_add(offset)))
        .unwrap_or(start.wrapping_sub(offset))
}

/// The modules of one process seen so far: those mapped now, and those unmapped since (old
/// samples may point into them).
#[derive(Default)]
pub struct ModuleSet {
    known: HashMap<ExecMapping, u32>,
    /// The mappings of the last read, whose unwind tables the unwinder has.
    current: Vec<ExecMapping>,
    next_id: u32,
}

/// The most mappings read for one process: one that maps code at new addresses without end
/// must not make us read without end.
const MAX_MAPPINGS: u32 = 16_384;

/// What changed between two reads of a process's mappings.
#[derive(Default)]
pub struct Changes {
    pub added: Vec<Mapped>,
    /// Start addresses of the mappings gone since (to leave the unwinder).
    pub removed: Vec<u64>,
}

impl ModuleSet {
    /// The mappings of `pid` not seen before, read (see [`read`]) with `access`'s rights,
    /// and those gone since the last call; a file that cannot be read is warned about once
    /// and left out.
    pub fn changes(&mut self, pid: u32, access: Option<&Access>) -> Changes {
        let Ok(mappings) = procfs::exec_mappings(pid) else {
            return Changes::default();
        };
        let mut out = Changes {
            added: Vec::new(),
            removed: self
                .current
                .iter()
                .filter(|old| !mappings.contains(old))
                .map(|old| old.start)
                .collect(),
        };
        self.current.clone_from(&mappings);
        for m in mappings {
            if self.known.contains_key(&m) || self.next_id >= MAX_MAPPINGS {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.known.insert(m.clone(), id);
            match read(pid, &m, id, access) {
                Ok(mapped) => out.added.push(mapped),
                Err(err) => eprintln!(
                    "anyprof: {}: its frames are left unwound and unnamed: {err:#}",
                    String::from_utf8_lossy(&m.path)
                ),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_bias_comes_from_the_executable_segment() {
        // lld's layout: R at offset 0, RX at 0x6f0 (p_vaddr 0x16f0), the code mapped from
        // offset 0 at 0x5555_0000_0000.
        let lld = [
            Segment {
                offset: 0,
                size: 0x6f0,
                address: 0,
                executable: false,
            },
            Segment {
                offset: 0x6f0,
                size: 0x2000,
                address: 0x16f0,
                executable: true,
            },
        ];
        assert_eq!(
            load_bias(&lld, 0x5555_0000_0000, 0),
            0x5555_0000_0000 - 0x1000
        );
        // GNU ld's: RX at offset 0x1000 and p_vaddr 0x1000, mapped from offset 0x1000.
        let bfd = [
            Segment {
                offset: 0,
                size: 0x800,
                address: 0,
                executable: false,
            },
            Segment {
                offset: 0x1000,
                size: 0x3000,
                address: 0x1000,
                executable: true,
            },
        ];
        assert_eq!(load_bias(&bfd, 0x5555_0000_1000, 0x1000), 0x5555_0000_0000);
        // A non-PIE executable: p_vaddr 0x401000 at 0x401000, no bias.
        let fixed = [Segment {
            offset: 0x1000,
            size: 0x1000,
            address: 0x401000,
            executable: true,
        }];
        assert_eq!(load_bias(&fixed, 0x401000, 0x1000), 0);
    }
}
