//! Names for the PLT stubs of an x86-64 object: `memcmp@plt`, as objdump and `perf report`
//! name them.
//!
//! A call from a program to a function of another object goes through a stub in `.plt` (or
//! `.plt.sec` with CET, `.plt.got` for functions whose address is also taken or that are
//! bound at start). No symbol table
//! names the stubs, not even `.symtab`: tools make the names up from the relocations. Each
//! stub jumps through a GOT slot (`jmp *disp32(%rip)`), and the dynamic relocation of that
//! slot (`R_X86_64_JUMP_SLOT` or `GLOB_DAT`) names the function. So a stub is named by decoding
//! its jump, not by its index, which would depend on the PLT layout the linker chose.
//! The lazy-binding entry (`PLT0`) jumps through a slot without a relocation and stays unnamed.
//!
//! The object may be hostile: many stubs can jump through one slot whose symbol has a huge
//! name. Each name is therefore kept once (shared by all stubs through it), at most
//! [`MAX_NAME`] bytes long, `@plt` is added only when a stub is looked up, and the table
//! holds at most as many stubs as the object has dynamic relocations, and never more than
//! [`MAX_ENTRIES`].

use std::collections::HashMap;
use std::sync::Arc;

use object::{Object, ObjectSection, ObjectSymbol, ObjectSymbolTable, RelocationTarget};

/// The longest function name kept for a stub; longer names are cut (at a character
/// boundary) so that one symbol cannot make every stub through it large.
pub(crate) const MAX_NAME: usize = 4 << 10;

/// The most stubs one object's table holds.
pub(crate) const MAX_ENTRIES: usize = 1 << 20;

/// The stubs of one object, sorted by address.
#[derive(Debug, Default)]
pub(crate) struct PltTable {
    /// `(start, end, function name without "@plt")`; stubs through one slot share the name.
    entries: Vec<(u64, u64, Arc<str>)>,
}

impl PltTable {
    /// Reads the stubs of `file`; empty when it is not x86-64 or has no PLT.
    pub(crate) fn read(file: &object::File<'_>) -> PltTable {
        if file.architecture() != object::Architecture::X86_64 {
            return PltTable::default();
        }
        let (slots, relocations) = slot_names(file);
        if slots.is_empty() {
            return PltTable::default();
        }
        let max_entries = relocations.min(MAX_ENTRIES);
        let mut entries = Vec::new();
        'sections: for section in file.sections() {
            let Ok(name) = section.name() else { continue };
            let Ok(bytes) = section.data() else { continue };
            let entry_size: u64 = match name {
                ".plt" | ".plt.sec" => 16,
                // 8 bytes (jmp, nop), or 16 with CET (endbr64, jmp, nop).
                ".plt.got" if bytes.starts_with(&ENDBR64) => 16,
                ".plt.got" => 8,
                _ => continue,
            };
            let base = section.address();
            for (index, entry) in bytes.chunks_exact(entry_size as usize).enumerate() {
                let start = base + index as u64 * entry_size;
                let Some(slot) = jump_slot(entry, start) else {
                    continue;
                };
                if let Some(function) = slots.get(&slot) {
                    if entries.len() >= max_entries {
                        break 'sections;
                    }
                    entries.push((start, start + entry_size, Arc::clone(function)));
                }
            }
        }
        entries.sort_unstable_by_key(|e| e.0);
        PltTable { entries }
    }

    /// The name of the stub covering `address`: `function@plt`.
    pub(crate) fn lookup(&self, address: u64) -> Option<String> {
        let after = self.entries.partition_point(|e| e.0 <= address);
        let (_, end, name) = self.entries.get(after.checked_sub(1)?)?;
        (address < *end).then(|| format!("{name}@plt"))
    }
}

/// The `endbr64` instruction that starts every entry of a PLT built for CET (IBT).
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// The GOT slot an x86-64 PLT entry at `address` jumps through: `jmp *disp32(%rip)`
/// (`ff 25`), possibly after `endbr64` and with a `bnd` prefix (`f2`).
fn jump_slot(entry: &[u8], address: u64) -> Option<u64> {
    let mut at = 0usize;
    if entry.starts_with(&ENDBR64) {
        at = 4;
    }
    if entry.get(at) == Some(&0xf2) {
        at += 1;
    }
    if entry.get(at..at + 2)? != [0xff, 0x25] {
        return None;
    }
    let disp = i32::from_le_bytes(entry.get(at + 2..at + 6)?.try_into().ok()?);
    let next = address.checked_add(at as u64 + 6)?;
    Some(next.wrapping_add_signed(i64::from(disp)))
}

/// GOT slot address → name of the function a dynamic relocation puts there (one shared
/// copy per symbol, cut to [`MAX_NAME`] bytes), and the number of dynamic relocations.
fn slot_names(file: &object::File<'_>) -> (HashMap<u64, Arc<str>>, usize) {
    let mut out = HashMap::new();
    let mut count = 0usize;
    let (Some(relocations), Some(symbols)) =
        (file.dynamic_relocations(), file.dynamic_symbol_table())
    else {
        return (out, count);
    };
    let mut names: HashMap<object::SymbolIndex, Arc<str>> = HashMap::new();
    for (offset, relocation) in relocations {
        count += 1;
        let RelocationTarget::Symbol(index) = relocation.target() else {
            continue;
        };
        if let Some(name) = names.get(&index) {
            out.insert(offset, Arc::clone(name));
            continue;
        }
        let Ok(symbol) = symbols.symbol_by_index(index) else {
            continue;
        };
        match symbol.name() {
            Ok(name) if !name.is_empty() => {
                let name: Arc<str> = Arc::from(cut(name, MAX_NAME));
                names.insert(index, Arc::clone(&name));
                out.insert(offset, name);
            }
            _ => {}
        }
    }
    (out, count)
}

/// `name` cut to at most `max` bytes, at a character boundary.
fn cut(name: &str, max: usize) -> &str {
    if name.len() <= max {
        return name;
    }
    let mut end = max;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_jumps_of_the_three_stub_forms() {
        // Lazy `.plt` entry at 0x3030: jmp *0x18fca(%rip) → 0x3036 + 0x18fca.
        let lazy = [
            0xff, 0x25, 0xca, 0x8f, 0x01, 0x00, 0x68, 0, 0, 0, 0, 0xe9, 0, 0, 0, 0,
        ];
        assert_eq!(jump_slot(&lazy, 0x3030), Some(0x1c000));
        // `.plt.sec` with endbr64 and bnd: the jump starts at +5, ends at +11.
        let ibt = [
            0xf3, 0x0f, 0x1e, 0xfa, 0xf2, 0xff, 0x25, 0x10, 0x00, 0x00, 0x00, 0x0f, 0x1f, 0x44, 0,
            0,
        ];
        assert_eq!(jump_slot(&ibt, 0x1000), Some(0x1000 + 11 + 0x10));
        // PLT0 pushes first: not a stub of a function.
        let plt0 = [
            0xff, 0x35, 0, 0, 0, 0, 0xff, 0x25, 0, 0, 0, 0, 0x0f, 0x1f, 0x40, 0,
        ];
        assert_eq!(jump_slot(&plt0, 0x3020), None);
        // A negative displacement.
        let back = [0xff, 0x25, 0xf0, 0xff, 0xff, 0xff, 0x66, 0x90];
        assert_eq!(jump_slot(&back, 0x100), Some(0x106 - 0x10));
    }

    #[test]
    fn lookup_covers_each_stub_only() {
        let table = PltTable {
            entries: vec![(0x10, 0x20, "a".into()), (0x30, 0x40, "b".into())],
        };
        assert_eq!(table.lookup(0xf), None);
        assert_eq!(table.lookup(0x10).as_deref(), Some("a@plt"));
        assert_eq!(table.lookup(0x1f).as_deref(), Some("a@plt"));
        assert_eq!(table.lookup(0x20), None);
        assert_eq!(table.lookup(0x3f).as_deref(), Some("b@plt"));
        assert_eq!(table.lookup(0x40), None);
    }

    /// This test binary has a few PLT stubs (Rust calls most functions through the GOT, but
    /// the linker still makes stubs for some, such as `_Unwind_Resume`): each has a name.
    #[test]
    fn names_the_stubs_of_this_test_binary() {
        let data = std::fs::read("/proc/self/exe").unwrap();
        let file = object::File::parse(&*data).unwrap();
        let table = PltTable::read(&file);
        let names: Vec<String> = table
            .entries
            .iter()
            .filter_map(|e| table.lookup(e.0))
            .collect();
        assert!(!names.is_empty(), "no PLT stub named");
        assert!(
            names.iter().all(|n| n.len() > 4 && n.ends_with("@plt")),
            "{names:?}"
        );
    }

    #[test]
    fn long_names_are_cut_at_a_character_boundary() {
        assert_eq!(cut("abc", 4), "abc");
        assert_eq!(cut("abcdef", 4), "abcd");
        assert_eq!(cut("aé", 2), "a");
    }
}
