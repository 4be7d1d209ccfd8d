//! Profile builders: from a [`crate::ingest::Session`] to pprof, one module per profile kind,
//! plus the [`Locator`] they share to turn raw addresses into mappings and locations.
//!
//! The Locator also hides anyprof's own code: a run of frames in `libanyprof.so` (a CPU sample
//! that interrupted a malloc hook: the exported `malloc`, the hook, its atomics) becomes one
//! [`ANYPROF_FRAME`] frame under the program's caller, so the profile shows what the hooks cost
//! without internals a user cannot act on.

pub mod cpu;
pub mod heap;
pub mod threads;

use std::collections::HashMap;

use anyprof_symbolizer::Symbolizer;

use crate::ingest::Session;
use crate::pprof::builder::{FrameLine, ProfileBuilder};
use crate::symbolize::{resolve_all, Resolved, RuntimeAddress, StackKind};
use anyprof_symbolizer::FileOffset;

/// Name of the one frame that stands for a run of frames in anyprof's own library.
pub const ANYPROF_FRAME: &str = "[anyprof]";

/// Whether the module at `path` is anyprof's preloaded library: its file name starts with
/// `libanyprof` (`libanyprof.so`, as built and as `--lib` names it by default).
pub fn is_anyprof_library(path: &[u8]) -> bool {
    let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
    name.starts_with(b"libanyprof")
}

/// Symbolizes every address of a profile's stacks at once and hands out pprof locations.
pub struct Locator {
    /// The kind of every stack it locates (said once, so symbolizing and locating agree).
    kind: StackKind,
    resolved: HashMap<RuntimeAddress, Resolved>,
    mapping_ids: HashMap<u32, u64>,
    /// Module ids of anyprof's own library, with the start of their executable range.
    own: HashMap<u32, u64>,
    /// The location of [`ANYPROF_FRAME`] in each of them, once made.
    own_locations: HashMap<u32, u64>,
    /// The location of each address, once made: stacks share most of their frames, and
    /// making one hashes and copies every name of its inline chain.
    locations: HashMap<RuntimeAddress, u64>,
}

impl Locator {
    /// Symbolizes the addresses of `stacks` (raw frames, leaf first, all of `kind`) and adds one pprof mapping per module, the main executable
    /// first (pprof takes mapping[0] as the main binary).
    pub fn new<'a>(
        b: &mut ProfileBuilder,
        session: &Session,
        symbolizer: &mut Symbolizer,
        stacks: impl Iterator<Item = &'a [u64]>,
        kind: StackKind,
    ) -> Locator {
        let addresses: Vec<RuntimeAddress> = stacks
            .flat_map(|frames| kind.lookup_addresses(frames))
            .collect();
        let (resolved, outcomes) = resolve_all(symbolizer, session, addresses);
        let exe = session
            .hello
            .as_ref()
            .map(|h| h.exe.clone())
            .unwrap_or_default();
        let mut order: Vec<_> = session.modules.values().collect();
        order.sort_by_key(|m| (m.path != exe, m.start));
        let mut mapping_ids = HashMap::new();
        for m in order {
            let o = outcomes.get(&m.id).copied().unwrap_or_default();
            // We are the authority on this host's files: once a module's addresses were looked
            // up, what we could not name stays unnamed. Claiming the symbols keeps pprof from
            // asking /symbol (which the daemon would answer from the same files) or replacing
            // our inline frames with its own lookups. (Go sets the flag only when every lookup
            // succeeded; it has no second source to defer to either.)
            let symbolized = o.looked_up > 0;
            let id = b.mapping(
                RuntimeAddress(m.start),
                RuntimeAddress(m.end),
                FileOffset(m.file_offset),
                &String::from_utf8_lossy(&m.path),
                &hex(&m.build_id),
                symbolized,
                o.inlined,
            );
            mapping_ids.insert(m.id, id);
        }
        let own = session
            .modules
            .values()
            .filter(|m| is_anyprof_library(&m.path))
            .map(|m| (m.id, m.start))
            .collect();
        Locator {
            kind,
            resolved,
            mapping_ids,
            own,
            own_locations: HashMap::new(),
            locations: HashMap::new(),
        }
    }

    /// The location ids of the frames of a stack (raw, leaf first) of the kind given to
    /// [`Locator::new`]. Each run of frames in anyprof's own library is one [`ANYPROF_FRAME`].
    pub fn stack(&mut self, b: &mut ProfileBuilder, frames: &[u64]) -> Vec<u64> {
        let kind = self.kind;
        let mut out: Vec<u64> = Vec::with_capacity(frames.len());
        let mut in_own_run = false;
        for address in kind.lookup_addresses(frames) {
            match self.own_location(b, address) {
                Some(own) => {
                    if !in_own_run {
                        out.push(own);
                    }
                    in_own_run = true;
                }
                None => {
                    out.push(self.location(b, address));
                    in_own_run = false;
                }
            }
        }
        out
    }

    /// The [`ANYPROF_FRAME`] location if `address` lies in anyprof's own library.
    fn own_location(&mut self, b: &mut ProfileBuilder, address: RuntimeAddress) -> Option<u64> {
        if self.own.is_empty() {
            return None;
        }
        let module = self.resolved.get(&address)?.module?;
        let start = *self.own.get(&module)?;
        let mapping = self.mapping_ids.get(&module).copied().unwrap_or(0);
        let id = *self.own_locations.entry(module).or_insert_with(|| {
            let frame = FrameLine {
                name: ANYPROF_FRAME.into(),
                system_name: ANYPROF_FRAME.into(),
                file: String::new(),
                line: 0,
            };
            b.location(mapping, RuntimeAddress(start), &[frame])
        });
        Some(id)
    }

    /// The location id of `address` (from [`StackKind::lookup_addresses`]).
    fn location(&mut self, b: &mut ProfileBuilder, address: RuntimeAddress) -> u64 {
        if let Some(&id) = self.locations.get(&address) {
            return id;
        }
        let r = self.resolved.get(&address);
        let mapping = r
            .and_then(|r| r.module)
            .and_then(|id| self.mapping_ids.get(&id))
            .copied()
            .unwrap_or(0);
        let lines = r.map_or(&[][..], |r| &r.lines[..]);
        let id = b.location(mapping, address, lines);
        self.locations.insert(address, id);
        id
    }
}

/// Lowercase hex, as Go writes build ids.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
