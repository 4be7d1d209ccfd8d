//! Function symbols of `.symtab` or `.dynsym`, sorted for lookup by address.
//!
//! This is the fallback when DWARF says nothing about an address (stripped or release-built
//! libraries): a function name is better than a bare address. A symbol covers
//! `[value, value + size)`. Symbols of size 0 (hand-written assembly without `.size`) cover up
//! to the next symbol, and never past the end of their section. Of several names for the same
//! address (`malloc` and `__libc_malloc`), the one people call is kept: global before weak
//! before local, then the fewest leading underscores, then the shortest.
//!
//! Names are not copied: an entry records where its name lies in the mapped file, and lookups
//! are given the same bytes back.

use object::{Object, ObjectSection, ObjectSymbol, SectionIndex, SymbolKind, SymbolSection};

/// Which symbol table to read.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Table {
    /// `.symtab`: all symbols, removed by `strip --strip-all`.
    Static,
    /// `.dynsym`: exported and imported symbols, always present in shared objects.
    Dynamic,
}

/// One function symbol, as looked up.
#[derive(Clone, Copy, Debug)]
struct Entry {
    start: u64,
    /// Exclusive.
    end: u64,
    /// Where the name lies in the file's bytes.
    name_offset: usize,
    name_len: usize,
}

/// A function symbol as read, before aliases are merged and sizes turned into ends.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    start: u64,
    size: u64,
    /// Bound for a size-0 symbol.
    section_end: u64,
    /// Preference among names for the same address; smaller is better.
    rank: (u8, usize, usize),
    name_offset: usize,
    name_len: usize,
}

/// The function symbols of one table, sorted by address, one name per address.
#[derive(Debug, Default)]
pub(crate) struct SymbolTable {
    entries: Vec<Entry>,
}

impl SymbolTable {
    /// Reads the function symbols of `table` from `file`, which was parsed from `data`.
    pub(crate) fn read(data: &[u8], file: &object::File<'_>, table: Table) -> SymbolTable {
        let symbols = match table {
            Table::Static => file.symbols(),
            Table::Dynamic => file.dynamic_symbols(),
        };
        let candidates = symbols
            .filter_map(|symbol| candidate(data, file, &symbol))
            .collect();
        SymbolTable::from_candidates(candidates)
    }

    /// Sorts, merges aliases and bounds size-0 symbols.
    fn from_candidates(mut candidates: Vec<Candidate>) -> SymbolTable {
        candidates.sort_unstable_by_key(|c| (c.start, c.rank));

        // One per address: the preferred name (sorted first), the largest size of the aliases.
        let mut merged: Vec<Candidate> = Vec::with_capacity(candidates.len());
        for candidate in candidates {
            match merged.last_mut() {
                Some(last) if last.start == candidate.start => {
                    last.size = last.size.max(candidate.size);
                }
                _ => merged.push(candidate),
            }
        }
        let entries = merged
            .iter()
            .enumerate()
            .map(|(i, c)| Entry {
                start: c.start,
                end: if c.size > 0 {
                    c.start.saturating_add(c.size)
                } else {
                    let next = merged.get(i + 1).map_or(u64::MAX, |next| next.start);
                    next.min(c.section_end)
                },
                name_offset: c.name_offset,
                name_len: c.name_len,
            })
            .collect();
        SymbolTable { entries }
    }

    /// Whether the table has no function symbol.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// This table with its names copied out of `data` (the bytes it was read from) into a
    /// buffer of their own, returned with it: for a table read from bytes that are not kept.
    pub(crate) fn with_own_names(&self, data: &[u8]) -> (SymbolTable, Vec<u8>) {
        let mut names = Vec::new();
        let mut entries = Vec::with_capacity(self.entries.len());
        for entry in &self.entries {
            let Some(name) = entry
                .name_offset
                .checked_add(entry.name_len)
                .and_then(|end| data.get(entry.name_offset..end))
            else {
                continue;
            };
            entries.push(Entry {
                name_offset: names.len(),
                ..*entry
            });
            names.extend_from_slice(name);
        }
        (SymbolTable { entries }, names)
    }

    /// Bytes held by the entries.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
    }

    /// The name of the symbol covering `address`. `data` must be the bytes the table was read
    /// from; the name is `None` if they are not.
    pub(crate) fn lookup<'d>(&self, data: &'d [u8], address: u64) -> Option<&'d [u8]> {
        let after = self.entries.partition_point(|e| e.start <= address);
        // A symbol can be nested in a bigger one (a local label inside a function with a
        // size); look back a few entries for the innermost that covers the address.
        const LOOK_BACK: usize = 8;
        let entry = self.entries[after.saturating_sub(LOOK_BACK)..after]
            .iter()
            .rev()
            .find(|e| address < e.end)?;
        data.get(entry.name_offset..entry.name_offset.checked_add(entry.name_len)?)
    }
}

/// `symbol` as a candidate, if it is a named function defined in a section of `file`.
fn candidate<'data>(
    data: &[u8],
    file: &object::File<'data>,
    symbol: &object::Symbol<'data, '_>,
) -> Option<Candidate> {
    // FUNC and GNU_IFUNC; data and undefined imports are not where code runs.
    if symbol.kind() != SymbolKind::Text {
        return None;
    }
    let SymbolSection::Section(section) = symbol.section() else {
        return None;
    };
    let name = symbol.name_bytes().ok().filter(|name| !name.is_empty())?;
    let binding = if symbol.is_weak() {
        1
    } else if symbol.is_global() {
        0
    } else {
        2
    };
    let underscores = name.iter().take_while(|&&b| b == b'_').count();
    let start = symbol.address();
    Some(Candidate {
        start,
        size: symbol.size(),
        section_end: section_end(file, section).unwrap_or(start),
        rank: (binding, underscores, name.len()),
        name_offset: offset_in(data, name)?,
        name_len: name.len(),
    })
}

/// Where `part` starts inside `whole`, if it is a sub-slice of it.
fn offset_in(whole: &[u8], part: &[u8]) -> Option<usize> {
    let offset = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    (offset.checked_add(part.len())? <= whole.len()).then_some(offset)
}

/// The end address of a section.
fn section_end(file: &object::File<'_>, index: SectionIndex) -> Option<u64> {
    let section = file.section_by_index(index).ok()?;
    section.address().checked_add(section.size())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table whose i-th candidate is named by byte i of the bytes given to `lookup`.
    fn table(candidates: &[(u64, u64, u64, u8)]) -> SymbolTable {
        SymbolTable::from_candidates(
            candidates
                .iter()
                .enumerate()
                .map(|(i, &(start, size, section_end, binding))| Candidate {
                    start,
                    size,
                    section_end,
                    rank: (binding, 0, 1),
                    name_offset: i,
                    name_len: 1,
                })
                .collect(),
        )
    }

    #[test]
    fn sized_symbols_cover_their_size_only() {
        let names = b"ab";
        let table = table(&[(0x100, 0x10, 0x1000, 0), (0x200, 0x8, 0x1000, 0)]);
        assert_eq!(table.lookup(names, 0xff), None);
        assert_eq!(table.lookup(names, 0x100), Some(&b"a"[..]));
        assert_eq!(table.lookup(names, 0x10f), Some(&b"a"[..]));
        assert_eq!(table.lookup(names, 0x110), None, "gap between functions");
        assert_eq!(table.lookup(names, 0x207), Some(&b"b"[..]));
        assert_eq!(table.lookup(names, 0x208), None);
        assert_eq!(table.lookup(names, u64::MAX), None);
    }

    #[test]
    fn size_zero_symbols_end_at_the_next_symbol_or_section_end() {
        let names = b"abc";
        let table = table(&[
            (0x100, 0, 0x1000, 0),
            (0x180, 0x10, 0x1000, 0),
            (0x300, 0, 0x340, 0),
        ]);
        assert_eq!(table.lookup(names, 0x17f), Some(&b"a"[..]));
        assert_eq!(table.lookup(names, 0x180), Some(&b"b"[..]));
        assert_eq!(table.lookup(names, 0x33f), Some(&b"c"[..]));
        assert_eq!(table.lookup(names, 0x340), None);
    }

    #[test]
    fn aliases_keep_the_preferred_name_and_largest_size() {
        let names = b"wgl";
        // weak, global, local at one address; only the weak one has a size.
        let table = table(&[
            (0x100, 0x20, 0x1000, 1),
            (0x100, 0, 0x1000, 0),
            (0x100, 0, 0x1000, 2),
        ]);
        assert_eq!(table.lookup(names, 0x11f), Some(&b"g"[..]));
        assert_eq!(table.lookup(names, 0x120), None);
    }

    #[test]
    fn nested_symbols_resolve_to_the_innermost() {
        let names = b"oi";
        let table = table(&[(0x100, 0x100, 0x1000, 0), (0x140, 0x10, 0x1000, 0)]);
        assert_eq!(table.lookup(names, 0x145), Some(&b"i"[..]));
        // Past the inner symbol, the outer one still covers the address.
        assert_eq!(table.lookup(names, 0x150), Some(&b"o"[..]));
    }

    #[test]
    fn names_outside_the_data_are_not_returned() {
        let table = table(&[(0x100, 0x10, 0x1000, 0), (0x200, 0x10, 0x1000, 0)]);
        assert_eq!(table.lookup(b"a", 0x200), None);
    }

    #[test]
    fn sub_slices_are_located() {
        let whole = b"hello world";
        assert_eq!(offset_in(whole, &whole[6..]), Some(6));
        assert_eq!(offset_in(whole, b"other"), None);
    }
}
