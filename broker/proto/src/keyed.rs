//! Maps that stay small while they are small: most of what a broker keeps per subscription is a
//! map with one entry (a topic level with one child, a filter with one subscriber, a session
//! with one subscription), and a `HashMap` allocates room for four on its first insert.
//!
//! [`KeyedSet`] stores values that carry their own key (a subscriber is found by its session's
//! client id) in a vector sized exactly while there are at most [`SPILL`] of them, searched
//! linearly, and in a hash table with its own random keys (a hostile client cannot choose
//! colliding topic names) above that. [`SmallMap`] is the same for key-value pairs.

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};

use hashbrown::HashTable;

/// Most entries kept in a plain vector; one more moves them into a hash table.
pub const SPILL: usize = 8;

/// A value that carries the key it is found by.
pub trait Keyed {
    /// The key's type.
    type Key: Hash + Eq;
    /// The key.
    fn key(&self) -> &Self::Key;
}

impl<K: Hash + Eq, V> Keyed for (K, V) {
    type Key = K;
    fn key(&self) -> &K {
        &self.0
    }
}

/// A set of values looked up by the key each carries (see the module's docs).
#[derive(Debug)]
pub struct KeyedSet<T> {
    repr: Repr<T>,
}

#[derive(Debug)]
enum Repr<T> {
    Few(Vec<T>),
    Many(Box<Table<T>>),
}

#[derive(Debug)]
struct Table<T> {
    hasher: RandomState,
    table: HashTable<T>,
}

impl<T> Default for KeyedSet<T> {
    fn default() -> Self {
        Self {
            repr: Repr::Few(Vec::new()),
        }
    }
}

impl<T: Keyed> Table<T> {
    fn hash<Q: Hash + ?Sized>(&self, q: &Q) -> u64 {
        self.hasher.hash_one(q)
    }

    fn insert_unique(&mut self, value: T) -> &mut T {
        let h = self.hash(value.key());
        let hasher = &self.hasher;
        self.table
            .insert_unique(h, value, |t| hasher.hash_one(t.key()))
            .into_mut()
    }
}

impl<T: Keyed> KeyedSet<T> {
    /// An empty set; allocates nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many values it holds.
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Few(v) => v.len(),
            Repr::Many(t) => t.table.len(),
        }
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value with key `q`.
    pub fn get<Q>(&self, q: &Q) -> Option<&T>
    where
        T::Key: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match &self.repr {
            Repr::Few(v) => v.iter().find(|t| t.key().borrow() == q),
            Repr::Many(t) => t.table.find(t.hash(q), |x| x.key().borrow() == q),
        }
    }

    /// The value with key `q`, mutably. Changing its key breaks the set.
    pub fn get_mut<Q>(&mut self, q: &Q) -> Option<&mut T>
    where
        T::Key: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match &mut self.repr {
            Repr::Few(v) => v.iter_mut().find(|t| t.key().borrow() == q),
            Repr::Many(t) => {
                let h = t.hash(q);
                t.table.find_mut(h, |x| x.key().borrow() == q)
            }
        }
    }

    /// Whether a value with key `q` is there.
    pub fn contains<Q>(&self, q: &Q) -> bool
    where
        T::Key: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(q).is_some()
    }

    /// Stores `value`, returning the one with the same key it replaces.
    pub fn insert(&mut self, value: T) -> Option<T> {
        if let Some(old) = self.get_mut(value.key()) {
            return Some(std::mem::replace(old, value));
        }
        self.push_new(value);
        None
    }

    /// The value with key `q`, made by `make` first if there is none.
    pub fn get_or_insert_with<Q>(&mut self, q: &Q, make: impl FnOnce() -> T) -> &mut T
    where
        T::Key: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // Find the vector's index first and borrow again to return it: a borrow returned from
        // one branch may not be followed by another use of `self` (NLL's limit).
        let at = match &self.repr {
            Repr::Few(v) => match v.iter().position(|t| t.key().borrow() == q) {
                Some(i) => i,
                None => return self.push_new(make()),
            },
            Repr::Many(_) => 0, // the table finds its own
        };
        match &mut self.repr {
            Repr::Few(v) => &mut v[at],
            Repr::Many(t) => {
                let h = t.hash(q);
                let hasher = &t.hasher;
                t.table
                    .entry(h, |x| x.key().borrow() == q, |x| hasher.hash_one(x.key()))
                    .or_insert_with(make)
                    .into_mut()
            }
        }
    }

    /// Adds a value whose key is not there yet.
    fn push_new(&mut self, value: T) -> &mut T {
        if let Repr::Few(v) = &mut self.repr {
            if v.len() >= SPILL {
                let mut t = Box::new(Table {
                    hasher: RandomState::new(),
                    table: HashTable::with_capacity(2 * SPILL),
                });
                for x in v.drain(..) {
                    t.insert_unique(x);
                }
                self.repr = Repr::Many(t);
            }
        }
        match &mut self.repr {
            Repr::Few(v) => {
                // Exactly one more slot: `push` would make room for four.
                v.reserve_exact(1);
                v.push(value);
                let last = v.len() - 1;
                &mut v[last]
            }
            Repr::Many(t) => t.insert_unique(value),
        }
    }

    /// Removes and returns the value with key `q`; gives memory back when it shrinks well
    /// below what it holds room for.
    pub fn remove<Q>(&mut self, q: &Q) -> Option<T>
    where
        T::Key: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let out = match &mut self.repr {
            Repr::Few(v) => {
                let i = v.iter().position(|t| t.key().borrow() == q)?;
                let x = v.swap_remove(i);
                if v.capacity() > 2 * v.len() {
                    v.shrink_to_fit();
                }
                return Some(x);
            }
            Repr::Many(t) => {
                let h = t.hash(q);
                t.table
                    .find_entry(h, |x| x.key().borrow() == q)
                    .ok()?
                    .remove()
                    .0
            }
        };
        self.settle();
        Some(out)
    }

    /// After a removal from the table: back to a vector when few are left (half of [`SPILL`],
    /// so an entry added and removed at the edge does not move everything each time), or a
    /// smaller table when it is mostly empty.
    fn settle(&mut self) {
        let Repr::Many(t) = &mut self.repr else {
            return;
        };
        let len = t.table.len();
        if len <= SPILL / 2 {
            let mut v = Vec::with_capacity(len);
            v.extend(std::mem::take(&mut t.table));
            self.repr = Repr::Few(v);
        } else if t.table.capacity() > 4 * len {
            let hasher = &t.hasher;
            t.table.shrink_to(2 * len, |x| hasher.hash_one(x.key()));
        }
    }

    /// The values, in no particular order.
    pub fn iter(&self) -> Iter<'_, T> {
        match &self.repr {
            Repr::Few(v) => Iter::Few(v.iter()),
            Repr::Many(t) => Iter::Many(t.table.iter()),
        }
    }

    /// Empties the set, returning what it held; the set keeps no allocation.
    pub fn drain(&mut self) -> IntoIter<T> {
        std::mem::take(self).into_iter()
    }
}

/// Iterator over a [`KeyedSet`]'s values.
pub enum Iter<'a, T> {
    /// Over the vector.
    Few(std::slice::Iter<'a, T>),
    /// Over the table.
    Many(hashbrown::hash_table::Iter<'a, T>),
}

impl<'a, T> Iterator for Iter<'a, T> {
    type Item = &'a T;
    fn next(&mut self) -> Option<&'a T> {
        match self {
            Iter::Few(i) => i.next(),
            Iter::Many(i) => i.next(),
        }
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Iter::Few(i) => i.size_hint(),
            Iter::Many(i) => i.size_hint(),
        }
    }
}

/// Owning iterator over a [`KeyedSet`]'s values.
pub enum IntoIter<T> {
    /// Over the vector.
    Few(std::vec::IntoIter<T>),
    /// Over the table.
    Many(hashbrown::hash_table::IntoIter<T>),
}

impl<T> Iterator for IntoIter<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        match self {
            IntoIter::Few(i) => i.next(),
            IntoIter::Many(i) => i.next(),
        }
    }
}

impl<T> IntoIterator for KeyedSet<T> {
    type Item = T;
    type IntoIter = IntoIter<T>;
    fn into_iter(self) -> IntoIter<T> {
        match self.repr {
            Repr::Few(v) => IntoIter::Few(v.into_iter()),
            Repr::Many(t) => IntoIter::Many(t.table.into_iter()),
        }
    }
}

impl<'a, T: Keyed> IntoIterator for &'a KeyedSet<T> {
    type Item = &'a T;
    type IntoIter = Iter<'a, T>;
    fn into_iter(self) -> Iter<'a, T> {
        self.iter()
    }
}

/// A map as a [`KeyedSet`] of pairs: the `HashMap` calls the broker uses, small while small.
#[derive(Debug)]
pub struct SmallMap<K, V>(KeyedSet<(K, V)>);

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        Self(KeyedSet::default())
    }
}

impl<K: Hash + Eq, V> SmallMap<K, V> {
    /// An empty map; allocates nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value under `q`.
    pub fn get<Q>(&self, q: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.get(q).map(|(_, v)| v)
    }

    /// The value under `q`, mutably.
    pub fn get_mut<Q>(&mut self, q: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.get_mut(q).map(|(_, v)| v)
    }

    /// Whether `q` is a key.
    pub fn contains_key<Q>(&self, q: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.contains(q)
    }

    /// Stores `v` under `k`, returning the value it replaces (the stored key is kept).
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        if let Some(slot) = self.0.get_mut(&k) {
            return Some(std::mem::replace(&mut slot.1, v));
        }
        self.0.push_new((k, v));
        None
    }

    /// The value under `q`, made with `make` (key and value) first if missing.
    pub fn get_or_insert_with<Q>(&mut self, q: &Q, make: impl FnOnce() -> (K, V)) -> &mut V
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        &mut self.0.get_or_insert_with(q, make).1
    }

    /// Removes the entry under `q`, returning its value.
    pub fn remove<Q>(&mut self, q: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.remove(q).map(|(_, v)| v)
    }

    /// Entries, in no particular order.
    pub fn iter(&self) -> MapIter<'_, K, V> {
        fn pair<K, V>((k, v): &(K, V)) -> (&K, &V) {
            (k, v)
        }
        self.0.iter().map(pair as fn(&(K, V)) -> (&K, &V))
    }

    /// Keys, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }

    /// Values, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    /// Empties the map, returning its entries; keeps no allocation.
    pub fn drain(&mut self) -> IntoIter<(K, V)> {
        self.0.drain()
    }
}

/// Borrowing iterator over a [`SmallMap`]'s entries.
pub type MapIter<'a, K, V> = std::iter::Map<Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;

impl<'a, K: Hash + Eq, V> IntoIterator for &'a SmallMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = MapIter<'a, K, V>;
    fn into_iter(self) -> MapIter<'a, K, V> {
        self.iter()
    }
}

impl<K, V> IntoIterator for SmallMap<K, V> {
    type Item = (K, V);
    type IntoIter = IntoIter<(K, V)>;
    fn into_iter(self) -> IntoIter<(K, V)> {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(m: &SmallMap<String, u32>) -> Vec<String> {
        let mut k: Vec<String> = m.keys().cloned().collect();
        k.sort();
        k
    }

    #[test]
    fn one_entry_allocates_room_for_one() {
        let mut m: SmallMap<Box<str>, u64> = SmallMap::new();
        m.insert("a".into(), 1);
        let KeyedSet { repr: Repr::Few(v) } = &m.0 else {
            panic!("one entry is kept in the vector");
        };
        assert_eq!(v.capacity(), 1);
        assert_eq!(std::mem::size_of::<KeyedSet<(Box<str>, u64)>>(), 24);
    }

    #[test]
    fn behaves_like_a_hash_map_across_the_spill_and_back() {
        let mut m: SmallMap<String, u32> = SmallMap::new();
        let mut reference = std::collections::HashMap::new();
        // Up past the spill and down below its half, twice, with replacements on the way.
        for round in 0..2u32 {
            for i in 0..40u32 {
                let k = format!("k{}", i % 25);
                assert_eq!(
                    m.insert(k.clone(), i + round),
                    reference.insert(k, i + round)
                );
                assert_eq!(m.len(), reference.len());
            }
            for i in 0..25u32 {
                let k = format!("k{i}");
                assert_eq!(m.get(k.as_str()), reference.get(&k));
                if i % 3 != 0 {
                    assert_eq!(m.remove(k.as_str()), reference.remove(&k));
                }
            }
            let mut want: Vec<String> = reference.keys().cloned().collect();
            want.sort();
            assert_eq!(keys(&m), want);
        }
        assert_eq!(m.drain().count(), reference.len());
        assert!(m.is_empty());
        assert!(matches!(&m.0.repr, Repr::Few(v) if v.capacity() == 0));
    }

    #[test]
    fn get_or_insert_with_makes_only_when_missing() {
        let mut m: SmallMap<Box<str>, u32> = SmallMap::new();
        for i in 0..20u32 {
            *m.get_or_insert_with(&*format!("k{}", i % 10), || {
                (format!("k{}", i % 10).into(), 0)
            }) += 1;
        }
        assert_eq!(m.len(), 10);
        assert!(m.values().all(|&v| v == 2));
    }

    #[test]
    fn a_table_that_empties_gives_its_memory_back() {
        let mut s: KeyedSet<(u32, ())> = KeyedSet::new();
        for i in 0..10_000 {
            s.insert((i, ()));
        }
        for i in 0..9_990 {
            assert!(s.remove(&i).is_some());
        }
        let Repr::Many(t) = &s.repr else {
            panic!("ten are more than the spill");
        };
        assert!(t.table.capacity() < 100, "{}", t.table.capacity());
        for i in 9_990..9_996 {
            s.remove(&i);
        }
        assert!(matches!(&s.repr, Repr::Few(v) if v.len() == 4));
    }
}
