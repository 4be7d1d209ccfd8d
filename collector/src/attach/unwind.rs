//! Unwinding a perf sample in the collector: the user registers and the copy of the top of
//! the user stack the kernel took, walked with framehop against the modules the process
//! has mapped (DWARF CFI from `.eh_frame`, frame pointers where there is none). Collector
//! side (std): this runs after the fact, never in the profiled process.

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{FrameAddress, Unwinder as _};

use super::modules::UnwindModule;

/// Deepest stack kept, as deep as the preload's; deeper ones are cut and marked truncated.
pub const MAX_FRAMES: usize = anyprof_wire::MAX_FRAMES;

/// The unwinder of one process, with its rule cache.
pub struct StackUnwinder {
    unwinder: UnwinderX86_64<Vec<u8>>,
    cache: CacheX86_64,
}

impl Default for StackUnwinder {
    fn default() -> StackUnwinder {
        StackUnwinder {
            unwinder: UnwinderX86_64::new(),
            cache: CacheX86_64::new(),
        }
    }
}

impl StackUnwinder {
    /// Adds a module (one mapped before at the same address must have been removed).
    pub fn add_module(&mut self, module: UnwindModule) {
        self.unwinder.add_module(module);
    }

    /// Removes the module that starts at `start`, unmapped since.
    pub fn remove_module(&mut self, start: u64) {
        self.unwinder.remove_module(start);
    }

    /// The frames of one sample, leaf first (the interrupted instruction, then return
    /// addresses, as the preload reports them), and whether the walk stopped before the
    /// outermost frame. `stack` is the copy of memory from `sp` up.
    pub fn unwind(&mut self, ip: u64, sp: u64, bp: u64, stack: &[u8]) -> (Vec<u64>, bool) {
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let offset = usize::try_from(addr.checked_sub(sp).ok_or(())?).map_err(|_| ())?;
            let bytes = stack
                .get(offset..offset.checked_add(8).ok_or(())?)
                .ok_or(())?;
            Ok(u64::from_ne_bytes(bytes.try_into().map_err(|_| ())?))
        };
        let regs = UnwindRegsX86_64::new(ip, sp, bp);
        let mut frames = Vec::new();
        let mut iter = self
            .unwinder
            .iter_frames(ip, regs, &mut self.cache, &mut read_stack);
        let truncated = loop {
            match iter.next() {
                Ok(Some(frame)) => {
                    if frames.len() == MAX_FRAMES {
                        break true;
                    }
                    frames.push(match frame {
                        FrameAddress::InstructionPointer(a) => a,
                        FrameAddress::ReturnAddress(a) => a.get(),
                    });
                }
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        if frames.is_empty() {
            frames.push(ip);
        }
        (frames, truncated)
    }
}
