//! Requests waiting for their replies, in a bounded map: when it is full
//! the oldest request is dropped, so lost replies and one-way traffic can
//! never grow memory.

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
};

pub struct Pending<K, V> {
    entries: HashMap<K, (u64, V)>,
    by_age: BTreeMap<u64, K>,
    next_age: u64,
    capacity: usize,
    evicted: u64,
}

impl<K: Hash + Eq + Clone, V> Pending<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self { entries: HashMap::new(), by_age: BTreeMap::new(), next_age: 0, capacity: capacity.max(1), evicted: 0 }
    }

    /// Adds or replaces `key` (a reused identifier means a new request).
    pub fn insert(&mut self, key: K, value: V) {
        if let Some((age, _)) = self.entries.remove(&key) {
            self.by_age.remove(&age);
        }
        if self.entries.len() >= self.capacity
            && let Some((_, oldest)) = self.by_age.pop_first()
        {
            self.entries.remove(&oldest);
            self.evicted += 1;
        }
        self.by_age.insert(self.next_age, key.clone());
        self.entries.insert(key, (self.next_age, value));
        self.next_age += 1;
    }

    /// Adds `key` unless it is already waiting (a second sighting of the same
    /// request, e.g. on another device, must not move its start time).
    pub fn insert_if_absent(&mut self, key: K, value: V) {
        if !self.entries.contains_key(&key) {
            self.insert(key, value);
        }
    }

    /// Removes and returns the request a reply answers; a duplicate reply
    /// finds nothing.
    pub fn take(&mut self, key: &K) -> Option<V> {
        let (age, value) = self.entries.remove(key)?;
        self.by_age.remove(&age);
        Some(value)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Requests dropped unanswered because the map was full.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_oldest_first() {
        let mut p = Pending::new(2);
        p.insert(1, "a");
        p.insert(2, "b");
        p.insert(3, "c");
        assert_eq!(p.len(), 2);
        assert_eq!(p.evicted(), 1);
        assert_eq!(p.take(&1), None, "the oldest went first");
        assert_eq!(p.take(&3), Some("c"));
    }

    #[test]
    fn duplicates_reuse_and_reorder() {
        let mut p = Pending::new(8);
        p.insert(7, 100);
        p.insert(8, 200);
        assert_eq!(p.take(&8), Some(200), "replies may come out of order");
        assert_eq!(p.take(&8), None, "a duplicate reply pairs with nothing");
        p.insert(7, 300);
        assert_eq!(p.take(&7), Some(300), "a reused id pairs with the newest request");
        p.insert_if_absent(9, 1);
        p.insert_if_absent(9, 2);
        assert_eq!(p.take(&9), Some(1), "a second sighting keeps the first time");
        assert!(p.is_empty());
    }
}
