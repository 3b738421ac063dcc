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

    pub(crate) fn reserve(&mut self, extra: usize) {
        self.items.reserve(extra);
        let items = &self.items;
        self.by_key.reserve(extra, |&s| fx(key_of(items, s) as u64));
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

    /// The slab, for the side tables that hash slots by some other field of the record.
    pub(crate) fn items(&self) -> &[Option<T>] {
        &self.items
    }
}

#[inline]
fn key_of<T: Keyed>(items: &[Option<T>], slot: u32) -> i64 {
    items[slot as usize].as_ref().map_or(i64::MIN, Keyed::key)
}
