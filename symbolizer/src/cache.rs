//! A bounded cache of opened objects, keyed by path, expected build id and the access they
//! were opened with.
//!
//! The access is part of the key because an object opened for one user (root's process) must
//! not answer for another who could not have opened its files: each user whose rights the
//! symbolizer takes (see [`crate::access`]) gets objects opened with those rights. `None`
//! stands for the symbolizer's own rights.
//!
//! Failures are cached like successes, so a missing or broken file costs one attempt, not one
//! per batch. A successfully opened object is dropped and opened again when the path now names
//! another file (rebuilt, upgraded): the caller's staleness check decides. When the cache is
//! full the entry used least recently is dropped, which unmaps its files.
//!
//! An entry in use is taken out of the cache and put back afterwards, so that the objects of
//! one call can be opened and searched on several threads at once, each owning its own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{Access, Miss};

type Key = (PathBuf, Vec<u8>, Option<Access>);

/// How many objects stay open. A process rarely maps more than a few dozen objects that it
/// executes code from; this leaves room for several processes.
pub(crate) const DEFAULT_CAPACITY: usize = 128;

/// Cached results of opening objects.
pub(crate) struct Cache<T> {
    entries: HashMap<Key, Slot<T>>,
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

    /// Takes the cached result for `path` and `build_id` out of the cache, to be used and
    /// [put back](Cache::insert). `None` if there is none, or if `is_stale` says the cached
    /// object no longer matches the file (the stale object is dropped). Taking entries out
    /// lets several threads work on different objects without sharing the cache.
    pub(crate) fn take(
        &mut self,
        path: &Path,
        build_id: &[u8],
        access: Option<&Access>,
        is_stale: impl FnOnce(&T) -> bool,
    ) -> Option<Result<T, Miss>> {
        let value = self
            .entries
            .remove(&(path.to_path_buf(), build_id.to_vec(), access.cloned()))?
            .value;
        match &value {
            Ok(object) if is_stale(object) => None,
            _ => Some(value),
        }
    }

    /// Caches `value` for `path` and `build_id` as the entry used most recently, closing the
    /// one used least recently if the cache is full.
    pub(crate) fn insert(
        &mut self,
        path: &Path,
        build_id: &[u8],
        access: Option<&Access>,
        value: Result<T, Miss>,
    ) {
        self.clock += 1;
        let key = (path.to_path_buf(), build_id.to_vec(), access.cloned());
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.evict_least_recently_used();
        }
        self.entries.insert(
            key,
            Slot {
                value,
                last_used: self.clock,
            },
        );
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

    /// What `Symbolizer` does with one object: take it, open it if it was not there, put it
    /// back. Returns the value and counts the opens.
    fn use_object(
        cache: &mut Cache<u32>,
        path: &str,
        build_id: &[u8],
        stale: bool,
        opened: &mut u32,
        open: Result<u32, Miss>,
    ) -> Result<u32, Miss> {
        let value = cache
            .take(Path::new(path), build_id, None, |_| stale)
            .unwrap_or_else(|| {
                *opened += 1;
                open
            });
        cache.insert(Path::new(path), build_id, None, value.clone());
        value
    }

    #[test]
    fn opens_once_per_path_and_build_id() {
        let mut cache = Cache::new(4);
        let mut opened = 0;
        for _ in 0..3 {
            assert_eq!(
                use_object(&mut cache, "/a", b"", false, &mut opened, Ok(1)),
                Ok(1)
            );
        }
        assert_eq!(
            use_object(&mut cache, "/a", b"\x01", false, &mut opened, Ok(2)),
            Ok(2)
        );
        assert_eq!(opened, 2);
        assert_eq!(cache.len(), 2);
    }

    /// What was opened with one user's rights is not handed to another.
    #[test]
    fn entries_belong_to_one_access() {
        let mut cache = Cache::new(4);
        let nobody = Access::new(65534, 65534, vec![]);
        cache.insert(Path::new("/a"), b"", None, Ok(1));
        assert!(cache
            .take(Path::new("/a"), b"", Some(&nobody), |_| false)
            .is_none());
        cache.insert(Path::new("/a"), b"", Some(&nobody), Err(Miss::NotElf));
        assert_eq!(
            cache.take(Path::new("/a"), b"", None, |_| false),
            Some(Ok(1))
        );
        assert_eq!(
            cache.take(Path::new("/a"), b"", Some(&nobody), |_| false),
            Some(Err(Miss::NotElf))
        );
    }

    #[test]
    fn failures_are_cached() {
        let mut cache: Cache<u32> = Cache::new(4);
        let mut opened = 0;
        for _ in 0..3 {
            let got = use_object(
                &mut cache,
                "/gone",
                b"",
                true,
                &mut opened,
                Err(Miss::NotElf),
            );
            assert_eq!(got, Err(Miss::NotElf));
        }
        assert_eq!(opened, 1);
    }

    #[test]
    fn stale_entries_are_reopened() {
        let mut cache = Cache::new(4);
        let mut opened = 0;
        assert_eq!(
            use_object(&mut cache, "/a", b"", false, &mut opened, Ok(1)),
            Ok(1)
        );
        let got = use_object(&mut cache, "/a", b"", true, &mut opened, Ok(2));
        assert_eq!(got, Ok(2));
        assert_eq!(opened, 2);
    }

    #[test]
    fn least_recently_used_is_evicted() {
        let mut cache = Cache::new(2);
        let mut opened = 0;
        assert_eq!(
            use_object(&mut cache, "/a", b"", false, &mut opened, Ok(1)),
            Ok(1)
        );
        assert_eq!(
            use_object(&mut cache, "/b", b"", false, &mut opened, Ok(2)),
            Ok(2)
        );
        assert_eq!(
            use_object(&mut cache, "/a", b"", false, &mut opened, Ok(1)),
            Ok(1)
        );
        assert_eq!(
            use_object(&mut cache, "/c", b"", false, &mut opened, Ok(3)),
            Ok(3)
        );
        assert_eq!(cache.len(), 2);
        assert_eq!(opened, 3);
        // `/a` survived, `/b` was evicted and is opened again.
        assert_eq!(
            use_object(&mut cache, "/a", b"", false, &mut opened, Ok(1)),
            Ok(1)
        );
        assert_eq!(opened, 3);
        assert_eq!(
            use_object(&mut cache, "/b", b"", false, &mut opened, Ok(2)),
            Ok(2)
        );
        assert_eq!(opened, 4);
    }
}
