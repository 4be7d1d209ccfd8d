//! A bounded cache of opened objects, keyed by path and expected build id.
//!
//! Failures are cached like successes, so a missing or broken file costs one attempt, not one
//! per batch. A successfully opened object is dropped and opened again when the path now names
//! another file (rebuilt, upgraded): the caller's staleness check decides. When the cache is
//! full the entry used least recently is dropped, which unmaps its files.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::Miss;

/// How many objects stay open. A process rarely maps more than a few dozen objects that it
/// executes code from; this leaves room for several processes.
pub(crate) const DEFAULT_CAPACITY: usize = 128;

/// Cached results of opening objects.
pub(crate) struct Cache<T> {
    entries: HashMap<(PathBuf, Vec<u8>), Slot<T>>,
    capacity: usize,
    clock: u64,
}

struct Slot<T> {
    value: Result<T, Miss>,
    last_used: u64,
}

impl<T> Cache<T> {
    /// An empty cache holding at most `capacity` (at least one) entries.
    pub(crate) fn new(capacity: usize) -> Cache<T> {
        Cache {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            clock: 0,
        }
    }

    /// The cached result for `path` and `build_id`, opened with `open` if there is none or if
    /// `is_stale` says the cached object no longer matches the file.
    pub(crate) fn get_or_open(
        &mut self,
        path: &Path,
        build_id: &[u8],
        is_stale: impl FnOnce(&T) -> bool,
        open: impl FnOnce() -> Result<T, Miss>,
    ) -> &Result<T, Miss> {
        self.clock += 1;
        let key = (path.to_path_buf(), build_id.to_vec());
        if let Some(Slot {
            value: Ok(value), ..
        }) = self.entries.get(&key)
        {
            if is_stale(value) {
                self.entries.remove(&key);
            }
        }
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.evict_least_recently_used();
        }
        let slot = match self.entries.entry(key) {
            Entry::Occupied(occupied) => occupied.into_mut(),
            Entry::Vacant(vacant) => vacant.insert(Slot {
                value: open(),
                last_used: 0,
            }),
        };
        slot.last_used = self.clock;
        &slot.value
    }

    /// The number of entries.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn evict_least_recently_used(&mut self) {
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, slot)| slot.last_used)
            .map(|(key, _)| key.clone());
        if let Some(key) = oldest {
            self.entries.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_counting(count: &mut u32, value: u32) -> impl FnOnce() -> Result<u32, Miss> + '_ {
        move || {
            *count += 1;
            Ok(value)
        }
    }

    #[test]
    fn opens_once_per_path_and_build_id() {
        let mut cache = Cache::new(4);
        let mut opened = 0;
        for _ in 0..3 {
            let got = cache.get_or_open(
                Path::new("/a"),
                b"",
                |_| false,
                open_counting(&mut opened, 1),
            );
            assert_eq!(got, &Ok(1));
        }
        cache.get_or_open(
            Path::new("/a"),
            b"\x01",
            |_| false,
            open_counting(&mut opened, 2),
        );
        assert_eq!(opened, 2);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn failures_are_cached() {
        let mut cache: Cache<u32> = Cache::new(4);
        let mut opened = 0;
        for _ in 0..3 {
            let got = cache.get_or_open(
                Path::new("/gone"),
                b"",
                |_| false,
                || {
                    opened += 1;
                    Err(Miss::NotElf)
                },
            );
            assert_eq!(got, &Err(Miss::NotElf));
        }
        assert_eq!(opened, 1);
    }

    #[test]
    fn stale_entries_are_reopened() {
        let mut cache = Cache::new(4);
        let mut opened = 0;
        cache.get_or_open(
            Path::new("/a"),
            b"",
            |_| false,
            open_counting(&mut opened, 1),
        );
        let got = cache.get_or_open(
            Path::new("/a"),
            b"",
            |_| true,
            open_counting(&mut opened, 2),
        );
        assert_eq!(got, &Ok(2));
        assert_eq!(opened, 2);
    }

    #[test]
    fn least_recently_used_is_evicted() {
        let mut cache = Cache::new(2);
        let mut opened = 0;
        cache.get_or_open(
            Path::new("/a"),
            b"",
            |_| false,
            open_counting(&mut opened, 1),
        );
        cache.get_or_open(
            Path::new("/b"),
            b"",
            |_| false,
            open_counting(&mut opened, 2),
        );
        cache.get_or_open(
            Path::new("/a"),
            b"",
            |_| false,
            open_counting(&mut opened, 1),
        );
        cache.get_or_open(
            Path::new("/c"),
            b"",
            |_| false,
            open_counting(&mut opened, 3),
        );
        assert_eq!(cache.len(), 2);
        assert_eq!(opened, 3);
        // `/a` survived, `/b` was evicted and is opened again.
        cache.get_or_open(
            Path::new("/a"),
            b"",
            |_| false,
            open_counting(&mut opened, 1),
        );
        assert_eq!(opened, 3);
        cache.get_or_open(
            Path::new("/b"),
            b"",
            |_| false,
            open_counting(&mut opened, 2),
        );
        assert_eq!(opened, 4);
    }
}
