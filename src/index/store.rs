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

use std::{hash::BuildHasher, sync::Arc};

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

/// Records a chunk holds. A chunk is the unit a snapshot shares and a write copies: 1024 records
/// of 48 bytes (and their strings) are copied in tens of microseconds, under the writer's lock,
/// once per chunk per snapshot; the chunk table stays small enough (1k entries per million
/// records) to stay in cache for lookups.
pub(crate) const CHUNK: usize = 1024;
const CHUNK_BITS: u32 = CHUNK.trailing_zeros();

/// One chunk of a slab, shared with snapshots being written ([`Store::frozen`]).
pub(crate) type Chunk<T> = Arc<[Option<T>]>;

/// A slab of records plus a unique index on their key.
///
/// The slab is a list of fixed-size chunks behind `Arc`s, copy-on-write: [`Store::frozen`] hands
/// out the current chunks for a snapshot to encode at its pace (a clone of the list, not of the
/// records), and a later write to a chunk still held by a snapshot copies that chunk first. With
/// no snapshot running no chunk is shared and writes go straight in.
pub(crate) struct Store<T> {
    chunks: Vec<Chunk<T>>,
    /// Slots handed out so far (the next new slot when `free` is empty).
    used: u32,
    free: Vec<u32>,
    by_key: HashTable<u32>,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            used: 0,
            free: Vec::new(),
            by_key: HashTable::new(),
        }
    }
}

#[inline]
fn split(slot: u32) -> (usize, usize) {
    ((slot >> CHUNK_BITS) as usize, slot as usize & (CHUNK - 1))
}

/// The record in `slot` of a chunk list, if any.
#[inline]
pub(crate) fn record<T>(chunks: &[Chunk<T>], slot: u32) -> Option<&T> {
    let (c, i) = split(slot);
    chunks.get(c)?[i].as_ref()
}

fn empty_chunk<T>() -> Chunk<T> {
    (0..CHUNK).map(|_| None).collect()
}

impl<T: Keyed + Clone> Store<T> {
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    pub(crate) fn slot(&self, key: i64) -> Option<u32> {
        let chunks = &self.chunks;
        self.by_key
            .find(fx(key as u64), |&s| key_of(chunks, s) == key)
            .copied()
    }

    pub(crate) fn get(&self, key: i64) -> Option<&T> {
        self.slot(key).map(|s| self.at(s))
    }

    /// The record in an occupied slot. Slots come only from this store's own tables, so a vacant
    /// slot here is a bug in the index, not bad input.
    #[inline]
    pub(crate) fn at(&self, slot: u32) -> &T {
        record(&self.chunks, slot).expect("index slot points at a live record")
    }

    /// The slot's entry, writable: its chunk is copied first if a snapshot still holds it.
    fn entry_mut(&mut self, slot: u32) -> &mut Option<T> {
        let (c, i) = split(slot);
        let chunk = &mut self.chunks[c];
        if Arc::get_mut(chunk).is_none() {
            *chunk = chunk.iter().cloned().collect();
        }
        &mut Arc::get_mut(chunk).expect("a chunk just copied is not shared")[i]
    }

    #[inline]
    pub(crate) fn at_mut(&mut self, slot: u32) -> &mut T {
        self.entry_mut(slot)
            .as_mut()
            .expect("index slot points at a live record")
    }

    /// Inserts a record whose key is not present yet; returns its slot.
    pub(crate) fn insert_new(&mut self, rec: T) -> u32 {
        let hash = fx(rec.key() as u64);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let s = self.used;
                self.used = s.checked_add(1).expect("fewer than 2^32 records");
                if split(s).0 == self.chunks.len() {
                    self.chunks.push(empty_chunk());
                }
                s
            }
        };
        *self.entry_mut(slot) = Some(rec);
        let chunks = &self.chunks;
        self.by_key
            .insert_unique(hash, slot, |&s| fx(key_of(chunks, s) as u64));
        slot
    }

    pub(crate) fn remove(&mut self, key: i64) -> Option<(u32, T)> {
        let chunks = &self.chunks;
        let entry = self
            .by_key
            .find_entry(fx(key as u64), |&s| key_of(chunks, s) == key)
            .ok()?;
        let (slot, _) = entry.remove();
        let rec = self.entry_mut(slot).take()?;
        self.free.push(slot);
        Some((slot, rec))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        iter_chunks(&self.chunks)
    }

    /// The current chunks, for a snapshot to read while the store goes on changing (see the type
    /// doc). Costs one `Arc` clone per chunk.
    pub(crate) fn frozen(&self) -> Frozen<T> {
        Frozen {
            chunks: self.chunks.clone(),
            len: self.len(),
        }
    }

    /// Fills an empty store with `recs` (slots 0, 1, … in their order), inserting the key table in
    /// bucket order (see [`insert_in_bucket_order`]). A key that appears twice is returned as the
    /// error and leaves the store empty.
    pub(crate) fn bulk_load(&mut self, recs: Vec<T>) -> Result<(), i64> {
        debug_assert!(self.chunks.is_empty() && self.free.is_empty());
        let n = u32::try_from(recs.len()).map_err(|_| i64::MIN)?;
        let entries: Vec<(u64, u32)> = recs
            .iter()
            .zip(0..n)
            .map(|(r, slot)| (fx(r.key() as u64), slot))
            .collect();
        let mut recs = recs.into_iter();
        let mut left = recs.len();
        while left > 0 {
            let chunk: Chunk<T> = (0..CHUNK).map(|_| recs.next()).collect();
            self.chunks.push(chunk);
            left = left.saturating_sub(CHUNK);
        }
        self.used = n;
        let chunks = &self.chunks;
        let dup = insert_in_bucket_order(
            &mut self.by_key,
            entries,
            |&s| fx(key_of(chunks, s) as u64),
            |&a, &b| key_of(chunks, a) == key_of(chunks, b),
        );
        if let Some(slot) = dup {
            let key = key_of(&self.chunks, slot);
            *self = Self::default();
            return Err(key);
        }
        Ok(())
    }

    /// The slab, for the side tables that hash slots by some other field of the record.
    pub(crate) fn chunks(&self) -> &[Chunk<T>] {
        &self.chunks
    }
}

/// A store's records as they were when [`Store::frozen`] was called.
pub(crate) struct Frozen<T> {
    chunks: Vec<Chunk<T>>,
    len: usize,
}

impl<T> Frozen<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        iter_chunks(&self.chunks).map(|(_, r)| r)
    }
}

fn iter_chunks<T>(chunks: &[Chunk<T>]) -> impl Iterator<Item = (u32, &T)> {
    chunks
        .iter()
        .flat_map(|c| c.iter())
        .enumerate()
        .filter_map(|(s, r)| r.as_ref().map(|r| (s as u32, r)))
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
fn key_of<T: Keyed>(chunks: &[Chunk<T>], slot: u32) -> i64 {
    record(chunks, slot).map_or(i64::MIN, Keyed::key)
}
