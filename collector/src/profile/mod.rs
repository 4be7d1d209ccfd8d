//! Profile builders: from a [`crate::ingest::Session`] to pprof, one module per profile kind,
//! plus the [`Locator`] they share to turn raw addresses into mappings and locations.

pub mod cpu;
pub mod heap;
pub mod threads;

use std::collections::HashMap;

use anyprof_symbolizer::Symbolizer;

use crate::ingest::Session;
use crate::pprof::builder::ProfileBuilder;
use crate::symbolize::{resolve_all, Resolved, RuntimeAddress, StackKind};
use anyprof_symbolizer::FileOffset;

/// Symbolizes every address of a profile's stacks at once and hands out pprof locations.
pub struct Locator {
    /// The kind of every stack it locates (said once, so symbolizing and locating agree).
    kind: StackKind,
    resolved: HashMap<RuntimeAddress, Resolved>,
    mapping_ids: HashMap<u32, u64>,
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
        Locator {
            kind,
            resolved,
            mapping_ids,
        }
    }

    /// The location ids of the frames of a stack (raw, leaf first) of the kind given to
    /// [`Locator::new`].
    pub fn stack(&mut self, b: &mut ProfileBuilder, frames: &[u64]) -> Vec<u64> {
        let kind = self.kind;
        kind.lookup_addresses(frames)
            .map(|address| self.location(b, address))
            .collect()
    }

    /// The location id of `address` (from [`StackKind::lookup_addresses`]).
    fn location(&mut self, b: &mut ProfileBuilder, address: RuntimeAddress) -> u64 {
        let r = self.resolved.get(&address).cloned().unwrap_or_default();
        let mapping = r
            .module
            .and_then(|id| self.mapping_ids.get(&id))
            .copied()
            .unwrap_or(0);
        b.location(mapping, address, &r.lines)
    }
}

/// Lowercase hex, as Go writes build ids.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
