//! The named statements a pass-through client (the wire front end) has
//! prepared on one server session, by the front end's own statement ids.
//!
//! The session keeps them for whichever client it serves next: a client
//! binding a statement another client prepared on this session pays no
//! Parse. The set is bounded; the least recently used statement is the
//! one to close when a new one needs room. A reset (`DISCARD ALL`) empties
//! it, as it empties the server's.

use std::collections::HashMap;

/// Statements prepared on a session, least recently used first out.
#[derive(Debug)]
pub struct PreparedSet {
    /// Statement id → the tick of its last use.
    used: HashMap<u64, u64>,
    /// Statements the server holds in a form that may not serve their next
    /// use (its plan's result type changed): closed before they are
    /// prepared again.
    stale: Vec<u64>,
    tick: u64,
    capacity: usize,
}

/// What a session holds of one statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Prepared: it may be bound as it is.
    Ready,
    /// Not there: it must be prepared first.
    Missing,
    /// There but stale: it must be closed and prepared again.
    Stale,
}

impl Default for PreparedSet {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

/// Statements a session keeps unless configured otherwise (PgBouncer's
/// `max_prepared_statements` defaults to 200).
pub const DEFAULT_CAPACITY: usize = 256;

impl PreparedSet {
    /// An empty set that keeps at most `capacity` statements (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            used: HashMap::new(),
            stale: Vec::new(),
            tick: 0,
            capacity: capacity.max(1),
        }
    }

    /// Changes how many statements the set keeps; an overfull set sheds
    /// its surplus at the next [`PreparedSet::insert`].
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
    }

    /// What the session holds of `id`; a held statement counts as used now.
    pub fn lookup(&mut self, id: u64) -> Held {
        if self.stale.contains(&id) {
            return Held::Stale;
        }
        match self.used.get_mut(&id) {
            Some(tick) => {
                self.tick += 1;
                *tick = self.tick;
                Held::Ready
            }
            None => Held::Missing,
        }
    }

    /// Records `id` as prepared; returns the statements to close to keep
    /// the set within its capacity (least recently used first).
    pub fn insert(&mut self, id: u64) -> Vec<u64> {
        self.stale.retain(|&s| s != id);
        self.tick += 1;
        self.used.insert(id, self.tick);
        let mut evicted = Vec::new();
        while self.used.len() > self.capacity {
            let oldest = self
                .used
                .iter()
                .filter(|&(&s, _)| s != id)
                .min_by_key(|&(_, &tick)| tick)
                .map(|(&s, _)| s);
            let Some(oldest) = oldest else { break };
            self.used.remove(&oldest);
            evicted.push(oldest);
        }
        evicted
    }

    /// Forgets `id` (its Parse failed or was never run, or it was closed).
    pub fn remove(&mut self, id: u64) {
        self.used.remove(&id);
        self.stale.retain(|&s| s != id);
    }

    /// Marks `id` as possibly held in a form that must not be used: it is
    /// closed (which the server allows for a statement it lacks) before
    /// it is prepared again.
    pub fn mark_stale(&mut self, id: u64) {
        self.used.remove(&id);
        if !self.stale.contains(&id) {
            self.stale.push(id);
        }
    }

    /// Marks every statement stale (a client's own `DEALLOCATE ALL` or
    /// `DISCARD ALL` went to the server, which may or may not run it).
    pub fn mark_all_stale(&mut self) {
        let held: Vec<u64> = self.used.drain().map(|(id, _)| id).collect();
        for id in held {
            if !self.stale.contains(&id) {
                self.stale.push(id);
            }
        }
    }

    /// The session lost every prepared statement (a reset).
    pub fn clear(&mut self) {
        self.used.clear();
        self.stale.clear();
    }

    /// Statements held (stale ones included).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.used.len() + self.stale.len()
    }

    /// True when the session holds none.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_statement_makes_room() {
        let mut set = PreparedSet::with_capacity(2);
        assert!(set.insert(1).is_empty());
        assert!(set.insert(2).is_empty());
        assert_eq!(set.lookup(1), Held::Ready);
        assert_eq!(set.insert(3), vec![2]);
        assert_eq!(set.lookup(2), Held::Missing);
        assert_eq!(set.lookup(1), Held::Ready);
        assert_eq!(set.lookup(3), Held::Ready);
    }

    #[test]
    fn a_stale_statement_is_closed_before_it_is_prepared_again() {
        let mut set = PreparedSet::with_capacity(4);
        set.insert(7);
        set.mark_stale(7);
        assert_eq!(set.lookup(7), Held::Stale);
        assert_eq!(set.len(), 1);
        set.insert(7);
        assert_eq!(set.lookup(7), Held::Ready);
        set.clear();
        assert!(set.is_empty());
    }

    #[test]
    fn a_smaller_capacity_sheds_the_surplus_at_the_next_insert() {
        let mut set = PreparedSet::with_capacity(4);
        for id in 1..=4 {
            set.insert(id);
        }
        set.set_capacity(2);
        let evicted = set.insert(5);
        assert_eq!(evicted, vec![1, 2, 3]);
        assert_eq!(set.len(), 2);
    }
}
