//! The storage primitives behind [`Index`](super::Index): a slab of records addressed by `u32`
//! slots, with hash tables that hold only slots.
//!
//! Why not `HashMap<i64, Record>`: at a million entries a power-of-two table sits anywhere between
//! 44 % and 87 % full, so every byte of the value is paid up to 2.3 times. Keeping records in a
//! dense `Vec` and hashing only their 4-byte slot (the key is read back from the record) pays that
//! factor on 5 bytes (slot + control byte) instead of on the whole record. The same trick gives
//! multi-maps for free: `HashTable` allows several slots under one hash, and [`iter_hash`] walks
//! them, so a shared number or a second open ticket needs no `Vec` per key.
//!
//! [`iter_hash`]: hashbrown::HashTable::iter_hash

use std::hash::BuildHasher;

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

/// Fx is enough here: keys are Zendesk ids and phone digits, not attacker-chosen strings that
/// could be crafted to collide (the phone index is keyed by parsed numbers, see `super`).
#[inline]
pub(crate) fn fx(key: u64) -> u64 {
    FxBuildHasher.hash_one(key)
}

/// Records with a stable key.
pub(crate) trait Keyed {
    fn key(&self) -> i64;
}

/// A slab of records plus a unique index on their key.
pub(crate) struct Store<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
    by_key: HashTable<u32>,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            free: Vec::new(),
            by_key: HashTable::new(),
        }
    }
}

impl<T: Keyed> Store<T> {
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    pub(crate) fn slot(&self, key: i64) -> Option<u32> {
        let items = &self.items;
        self.by_key
            .find(fx(key as u64), |&s| key_of(items, s) == key)
            .copied()
    }

    pub(crate) fn get(&self, key: i64) -> Option<&T> {
        self.slot(key).map(|s| self.at(s))
    }

    /// The record in an occupied slot. Slots come only from this store's own tables, so a vacant
    /// slot here is a bug in the index, not bad input.
    #[inline]
    pub(crate) fn at(&self, slot: u32) -> &T {
        self.items[slot as usize]
            .as_ref()
            .expect("index slot points at a live record")
    }

    #[inline]
    pub(crate) fn at_mut(&mut self, slot: u32) -> &mut T {
        self.items[slot as usize]
            .as_mut()
            .expect("index slot points at a live record")
    }

    /// Inserts a record whose key is not present yet; returns its slot.
    pub(crate) fn insert_new(&mut self, rec: T) -> u32 {
        let hash = fx(rec.key() as u64);
        let slot = match self.free.pop() {
            Some(s) => {
                self.items[s as usize] = Some(rec);
                s
            }
            None => {
                let s = u32::try_from(self.items.len()).expect("fewer than 2^32 records");
                self.items.push(Some(rec));
                s
            }
        };
        let items = &self.items;
        self.by_key
            .insert_unique(hash, slot, |&s| fx(key_of(items, s) as u64));
        slot
    }

    pub(crate) fn remove(&mut self, key: i64) -> Option<(u32, T)> {
        let items = &self.items;
        let entry = self
            .by_key
            .find_entry(fx(key as u64), |&s| key_of(items, s) == key)
            .ok()?;
        let (slot, _) = entry.remove();
        let rec = self.items[slot as usize].take()?;
        self.free.push(slot);
        Some((slot, rec))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.items
            .iter()
            .enumerate()
            .filter_map(|(s, r)| r.as_ref().map(|r| (s as u32, r)))
    }

    /// Fills an empty store with `recs` (slots 0, 1, … in their order), inserting the key table in
    /// bucket order (see [`insert_in_bucket_order`]). A key that appears twice is returned as the
    /// error and leaves the store empty.
    pub(crate) fn bulk_load(&mut self, recs: Vec<T>) -> Result<(), i64> {
        debug_assert!(self.items.is_empty() && self.free.is_empty());
        let n = u32::try_from(recs.len()).map_err(|_| i64::MIN)?;
        let entries: Vec<(u64, u32)> = recs
            .iter()
            .zip(0..n)
            .map(|(r, slot)| (fx(r.key() as u64), slot))
            .collect();
        self.items = recs.into_iter().map(Some).collect();
        let items = &self.items;
        let dup = insert_in_bucket_order(
            &mut self.by_key,
            entries,
            |&s| fx(key_of(items, s) as u64),
            |&a, &b| key_of(items, a) == key_of(items, b),
        );
        if let Some(slot) = dup {
            let key = key_of(&self.items, slot);
            *self = Self::default();
            return Err(key);
        }
        Ok(())
    }

    /// The slab, for the side tables that hash slots by some other field of the record.
    pub(crate) fn items(&self) -> &[Option<T>] {
        &self.items
    }
}

/// Inserts `(hash, value)` pairs into `table`, sized for them first, in the order of the bucket
/// each starts probing at (hashbrown probes from `hash & bucket_mask`), so that millions of inserts
/// sweep the table once instead of landing on a random cache line and page each. Restoring a 5M
/// snapshot spent most of its time in those misses, which is why restart time grew faster than the
/// account. With `same` given, returns the first value whose key equals an earlier one's (equal keys
/// have equal hashes, so they sort next to each other) and stops; otherwise `None`.
pub(crate) fn insert_in_bucket_order<E: Copy>(
    table: &mut HashTable<E>,
    mut entries: Vec<(u64, E)>,
    hasher: impl Fn(&E) -> u64,
    same: impl Fn(&E, &E) -> bool,
) -> Option<E> {
    table.reserve(entries.len(), &hasher);
    // capacity() is 7/8 of the buckets (a power of two) once the table has 8 or more.
    let buckets = (table.capacity() / 7 * 8).next_power_of_two() as u64;
    let mask = buckets.max(1) - 1;
    entries.sort_unstable_by_key(|&(h, _)| (h & mask, h));
    let mut run = 0; // first entry with the current hash
    for i in 0..entries.len() {
        let (h, e) = entries[i];
        if entries[run].0 != h {
            run = i;
        }
        if entries[run..i].iter().any(|(_, earlier)| same(earlier, &e)) {
            return Some(e);
        }
        table.insert_unique(h, e, &hasher);
    }
    None
}

#[inline]
fn key_of<T: Keyed>(items: &[Option<T>], slot: u32) -> i64 {
    items[slot as usize].as_ref().map_or(i64::MIN, Keyed::key)
}
