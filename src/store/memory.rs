//! The in-process store: entries in this process's memory, for a single instance or for the
//! tests of an application, with the rules of the Redis store.
//!
//! It keeps Redis's data model, reduced to what the cache uses, so that every operation
//! means the same thing on both stores:
//! - strings (entries, values, locks) live in a moka cache weighed in bytes, each with its
//!   own deadline, evicted least recently used first past the byte bound (like Redis under
//!   `maxmemory-policy allkeys-lru`);
//! - indexes and the path registry are sets of members, each member with its expiry (raised,
//!   never lowered), a set outliving its newest member by a second;
//! - the invalidation sequence and markers are counters, markers expiring after
//!   [`MARKER_TTL`].
//!
//! A member is held by the strings that registered it (an entry holds its own key in its
//! path, route, user and tag indexes, and its path in the registry, which the variants of a
//! path share). A string leaving the store for any reason (evicted past the bound, expired,
//! replaced, removed) releases what it held; the last release removes the member, the last
//! member its set. So the sets never hold more than the strings do, and the bytes of the
//! memberships are weighed with their strings against the bound. A write costs the same
//! whatever its indexes hold (amortised: a set's table grows by doubling): it adds its
//! memberships and applies a bounded number of releases (moka reports each string once, so
//! they never outrun the writes). Nothing sweeps a whole set.
//!
//! A write checks its markers and stores its entry under one lock, which invalidations also
//! take: an invalidation either comes before the check (the write is refused) or after the
//! entry is stored (and removes it). No pending value is needed, as no reader can see the
//! entry before its check passed. An invalidation of indexes raises its markers and takes
//! the sets out under that lock at once, then removes their strings in slices, releasing the
//! lock between slices (waiting callers take it first) so that misses and writes are never
//! held behind a large index; a string is removed only if it still holds its membership of
//! a set taken out (one stored since belongs to a new set and stays, like a member re-added
//! in Redis with a new score).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use moka::ops::compute::{CompResult, Op};
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use crate::store::{Write, Written, MARKER_TTL};

/// Bytes counted for each string beyond its key and value (the slot and moka's own entry).
const SLOT_OVERHEAD: usize = 96;

/// Bytes counted for each membership of a string beyond the names it holds: the member in
/// its set, the string's link to it and a share of the set itself.
const LINK_OVERHEAD: usize = 160;

/// Releases a write applies at most (strings leave at most as fast as they are stored, so a
/// few per write keep up with them).
const RELEASES_PER_WRITE: usize = 8;

/// Expired markers a write or an invalidation drops at most.
const MARKERS_PER_WRITE: usize = 8;

/// Strings an invalidation removes under one hold of the lock.
const SLICE: usize = 64;

/// An in-process store: the cache in this process's memory, bounded in bytes, for a service
/// that runs as one instance or for the tests of an application (no Redis needed).
///
/// It honours everything the Redis store does: TTLs, every invalidation of
/// [`CacheHandle`](crate::CacheHandle) with its race guarantees, the value cache, request
/// coalescing. Past `max_bytes` of keys and values, the least recently used entries are
/// evicted, as Redis does under `maxmemory-policy allkeys-lru`. Several layers given clones of
/// one store share its entries, as instances sharing a Redis do. The near-cache
/// ([`Policy::near`](crate::Policy::near)) is not used with it: the store is near already.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cache::{CacheLayer, MemoryStore, Policy};
///
/// let store = MemoryStore::new(64 * 1024 * 1024);
/// let cache = CacheLayer::new(store.clone(), Policy::shared(Duration::from_secs(60)));
/// assert_eq!(store.used_bytes(), 0);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    strings: Cache<String, Slot>,
    state: Mutex<State>,
    /// Callers waiting for `state`.
    waiting: AtomicUsize,
    capacity: u64,
}

/// A string and the instant it expires.
#[derive(Clone)]
struct Slot {
    value: Bytes,
    expires: Instant,
    /// The memberships the string holds (entries and values registered in indexes).
    links: Option<Arc<[Link]>>,
}

impl Slot {
    fn live(&self, now: Instant) -> bool {
        self.expires > now
    }

    /// Whether the string holds this incarnation of its own key's membership.
    fn holds(&self, id: u64) -> bool {
        self.links
            .as_deref()
            .is_some_and(|links| links.iter().any(|l| l.id == id && l.member.is_none()))
    }

    /// Bytes the bound counts for the string.
    fn weight(&self, key: &str) -> u32 {
        let links = self.links.as_deref().map_or(0, |links| {
            // The key once more (the members share one copy), then each membership.
            key.len()
                + 16
                + links
                    .iter()
                    .map(|l| LINK_OVERHEAD + l.set.len() + l.member.as_ref().map_or(0, |m| m.len()))
                    .sum::<usize>()
        });
        u32::try_from(key.len() + self.value.len() + SLOT_OVERHEAD + links).unwrap_or(u32::MAX)
    }
}

/// A string's membership of a set.
struct Link {
    /// The set's name.
    set: Arc<str>,
    /// The member, unless it is the string's own key (the path, in the registry).
    member: Option<Arc<str>>,
    /// The incarnation of the member (one removed and added again is another).
    id: u64,
}

/// What a string that left the store held, for its release (its value is dropped at once).
struct Gone {
    key: Arc<String>,
    links: Arc<[Link]>,
}

struct SlotExpiry;

impl moka::Expiry<String, Slot> for SlotExpiry {
    fn expire_after_create(&self, _: &String, slot: &Slot, now: Instant) -> Option<Duration> {
        Some(slot.expires.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &String,
        slot: &Slot,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.expires.saturating_duration_since(now))
    }
}

/// What is not a string: sets (indexes) and counters (sequence, markers).
struct State {
    sets: HashMap<Arc<str>, Set>,
    counters: HashMap<Arc<str>, Counter>,
    /// Markers with the expiry they were given, oldest first (they all live `MARKER_TTL`
    /// from when they are raised, under this lock): a raised marker is in it twice, its
    /// older expiry dropped when it comes.
    marker_expiry: VecDeque<(Instant, Arc<str>)>,
    /// What strings that left the store held, reported by moka (which must not take this
    /// lock: it may report while a write holds it).
    gone: Receiver<Gone>,
    /// The last incarnation given to a member.
    last_id: u64,
    #[cfg(test)]
    work: Work,
}

/// What index maintenance did, for the tests.
#[cfg(test)]
#[derive(Default, Clone, Copy, Debug)]
struct Work {
    /// Members and links looked at (added, released, swept).
    examined: u64,
    /// The most strings an invalidation removed under one hold of the lock.
    largest_hold: usize,
}

struct Set {
    name: Arc<str>,
    /// Member, its expiry (a Redis sorted set scored by expiry) and who holds it.
    members: HashMap<Arc<str>, Member>,
    /// The set outlives its newest member a little, like its Redis twin.
    expires: Instant,
}

struct Member {
    expires: Instant,
    /// Strings holding the member (moka has not reported them gone yet).
    holders: u32,
    id: u64,
}

struct Counter {
    value: u64,
    expires: Option<Instant>,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("capacity", &self.inner.capacity)
            .field("entries", &self.inner.strings.entry_count())
            .finish()
    }
}

impl MemoryStore {
    /// A store holding at most `max_bytes` of keys and values (each counted with a small
    /// overhead), with the index memberships of each (counted with it); past it, the least
    /// recently used are evicted and their memberships go with them. The markers of
    /// invalidations are outside the bound: one per invalidated index, expiring after ten
    /// minutes.
    pub fn new(max_bytes: u64) -> Self {
        let (report, gone) = channel();
        let strings = Cache::builder()
            .max_capacity(max_bytes)
            .eviction_policy(EvictionPolicy::lru())
            .weigher(|key: &String, slot: &Slot| slot.weight(key))
            .expire_after(SlotExpiry)
            .eviction_listener(move |key, slot: Slot, _| {
                // Every way out alike (evicted, expired, replaced, removed): each string is
                // reported once. The receiver lives as long as the cache.
                if let Some(links) = slot.links {
                    let _ = report.send(Gone { key, links });
                }
            })
            .build();
        MemoryStore {
            inner: Arc::new(Inner {
                strings,
                state: Mutex::new(State::new(gone)),
                waiting: AtomicUsize::new(0),
                capacity: max_bytes,
            }),
        }
    }

    /// The bound given to [`new`](Self::new).
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// Bytes held now, as the bound counts them (after evictions due are done).
    pub fn used_bytes(&self) -> u64 {
        self.inner.strings.run_pending_tasks();
        self.inner.strings.weighted_size()
    }

    /// The keys held now that match a Redis glob pattern (`*`, `?`, `[a-z]`, `\` escapes),
    /// sorted: entries, values, indexes and markers, named as in Redis. For inspection and
    /// tests; it visits every key.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let now = Instant::now();
        let pattern = pattern.as_bytes();
        let mut keys: Vec<String> = self
            .inner
            .strings
            .iter()
            .filter(|(k, slot)| slot.live(now) && glob_match(pattern, k.as_bytes()))
            .map(|(k, _)| String::clone(&k))
            .collect();
        {
            let state = self.lock();
            keys.extend(
                state
                    .live_names(now)
                    .filter(|k| glob_match(pattern, k.as_bytes()))
                    .map(str::to_owned),
            );
        }
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every statement that could panic (none can): a
        // poisoned lock is taken over.
        match self.inner.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                // Counted while waiting, so that a long removal lets this caller in between
                // two of its slices (see `let_waiters_in`).
                self.inner.waiting.fetch_add(1, Ordering::Relaxed);
                let state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
                self.inner.waiting.fetch_sub(1, Ordering::Relaxed);
                state
            }
        }
    }

    /// Between two slices of a long removal, with the lock released: waits (a millisecond at
    /// most) until whoever was waiting for the lock has taken it. std's mutex is not fair: the
    /// releasing thread would take it back at once, again and again, while the requests
    /// waiting for it stall for the whole removal.
    fn let_waiters_in(&self) {
        let since = Instant::now();
        while self.inner.waiting.load(Ordering::Relaxed) > 0
            && since.elapsed() < Duration::from_millis(1)
        {
            std::thread::yield_now();
        }
    }

    /// A string, if held and not expired.
    pub(crate) fn get(&self, key: &str) -> Option<Bytes> {
        let now = Instant::now();
        self.inner
            .strings
            .get(key)
            .filter(|slot| slot.live(now))
            .map(|slot| slot.value)
    }

    /// The namespace's invalidation sequence (0 before the first invalidation).
    pub(crate) fn read_seq(&self, seq_key: &str) -> u64 {
        self.lock().counter(seq_key, Instant::now())
    }

    /// Stores an entry if no invalidation it must respect ran since its miss began, and
    /// registers it in its indexes: all under the state lock.
    pub(crate) fn write(&self, w: Write) -> Written {
        let now = Instant::now();
        let mut state = self.lock();
        state.housekeep(now, RELEASES_PER_WRITE);
        if let Some(v) = &w.variants {
            if state.variants_full(&v.key, &w.key, v.max, now) {
                return Written::TooManyVariants;
            }
        }
        let moved = state.counter(&w.seq_key, now) < w.miss_seq
            || w.markers.iter().any(|m| state.counter(m, now) > w.miss_seq)
            || w.started.elapsed() + Duration::from_secs(10) >= MARKER_TTL;
        if moved {
            return Written::Refused;
        }
        let ttl = w.ttl.max(Duration::from_millis(1));
        let expires = deadline(now, ttl);
        let value = confirmed(&w.value);
        // The entry is a member of its variant set as of an index: it leaves the set when it
        // leaves the store (invalidated, expired, evicted), so an invalidation frees its slot.
        let mut indexes = w.indexes;
        if let Some(v) = w.variants {
            indexes.push(v.key);
        }
        let links = state.register(&w.key, &indexes, w.path.as_ref(), expires, now);
        // The string it replaces (if any) is reported gone and releases its own links.
        self.inner.strings.insert(
            w.key,
            Slot {
                value,
                expires,
                links,
            },
        );
        Written::Stored
    }

    /// Takes a lock (a string set only if absent) for `ttl`: true if this caller took it.
    pub(crate) fn try_lock(&self, key: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let slot = Slot {
            value: Bytes::from_static(b"1"),
            expires: deadline(now, ttl.max(Duration::from_millis(1))),
            links: None,
        };
        let result = self
            .inner
            .strings
            .entry_by_ref(key)
            .and_compute_with(|held| match held {
                Some(e) if e.value().live(now) => Op::Nop,
                _ => Op::Put(slot),
            });
        matches!(
            result,
            CompResult::Inserted(_) | CompResult::ReplacedWith(_)
        )
    }

    /// Stores a plain value for `ttl`, registered in `indexes`.
    pub(crate) fn set_value(&self, key: &str, value: Bytes, ttl: Duration, indexes: &[String]) {
        let now = Instant::now();
        let expires = deadline(now, ttl.max(Duration::from_millis(1)));
        let mut state = self.lock();
        state.housekeep(now, RELEASES_PER_WRITE);
        let links = state.register(key, indexes, None, expires, now);
        self.inner.strings.insert(
            key.to_owned(),
            Slot {
                value,
                expires,
                links,
            },
        );
    }

    /// Removes `key` only if it still holds `value` (under the state lock, which every
    /// write of entries and values takes, so a value written meanwhile is never removed).
    pub(crate) fn delete_if_equal(&self, key: &str, value: &Bytes) -> bool {
        let mut state = self.lock();
        let now = Instant::now();
        let removed = match self.inner.strings.get(key) {
            Some(slot) if slot.live(now) && slot.value == *value => {
                self.inner.strings.invalidate(key);
                true
            }
            _ => false,
        };
        state.release_gone(RELEASES_PER_WRITE);
        removed
    }

    /// Removes keys (strings, sets or counters); returns how many existed.
    pub(crate) fn unlink(&self, keys: &[String]) -> u64 {
        let mut state = self.lock();
        let now = Instant::now();
        self.remove_all(&mut state, keys, now)
    }

    /// Raises `markers` to the next sequence number, then removes `keys` (strings, sets or
    /// counters); returns how many existed.
    pub(crate) fn invalidate_keys(
        &self,
        seq_key: &str,
        markers: &[String],
        keys: &[String],
    ) -> u64 {
        let mut state = self.lock();
        let now = Instant::now();
        state.housekeep(now, RELEASES_PER_WRITE);
        state.mark(seq_key, markers, now);
        self.remove_all(&mut state, keys, now)
    }

    /// Raises `markers`, then removes every member of `indexes` and empties them; returns how
    /// many members existed, but those starting with `uncounted` (bookkeeping sets; this
    /// store registers none in indexes: an entry leaves its variant set when it is removed).
    ///
    /// The sets are taken out with the markers raised, under one hold of the lock; their
    /// strings are removed [`SLICE`] at a time, the lock released (and the task yielding)
    /// between slices. If the task is dropped halfway, the rest is removed at once.
    pub(crate) async fn invalidate_indexes(
        &self,
        seq_key: &str,
        markers: &[String],
        indexes: &[String],
        uncounted: &str,
    ) -> u64 {
        let taken: Vec<Set> = {
            let mut state = self.lock();
            let now = Instant::now();
            state.housekeep(now, RELEASES_PER_WRITE);
            state.mark(seq_key, markers, now);
            indexes
                .iter()
                .filter_map(|i| state.sets.remove(i.as_str()))
                .collect()
        };
        // Outside the lock: what the sets held (their memory is freed here too).
        let now = Instant::now();
        let members = taken
            .into_iter()
            .filter(|set| set.expires > now)
            .flat_map(|set| set.members.into_iter())
            .filter(|(_, m)| m.expires > now)
            .filter(|(member, _)| uncounted.is_empty() || !member.starts_with(uncounted))
            .map(|(member, m)| (member, m.id))
            .collect();
        let mut doomed = Doomed {
            store: self,
            members,
            next: 0,
            removed: 0,
        };
        while doomed.slice() {
            tokio::task::yield_now().await;
        }
        doomed.removed
    }

    /// The members of the path registry that match a glob pattern, sorted.
    pub(crate) fn matching_paths(&self, paths_key: &str, pattern: &str) -> Vec<String> {
        let now = Instant::now();
        // Under the lock, only a copy of the live members (shared names, no matching).
        let live: Vec<Arc<str>> = {
            let state = self.lock();
            state
                .sets
                .get(paths_key)
                .filter(|set| set.expires > now)
                .map(|set| {
                    set.members
                        .iter()
                        .filter(|(_, m)| m.expires > now)
                        .map(|(p, _)| p.clone())
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut paths: Vec<String> = live
            .iter()
            .filter(|p| glob_match(pattern.as_bytes(), p.as_bytes()))
            .map(|p| p.to_string())
            .collect();
        paths.sort_unstable();
        paths
    }

    /// Removes every key matching the patterns, in their order (every key of a pattern is
    /// gone before the next pattern is looked at); returns how many live keys matched pattern
    /// number `counted`. Keys are removed [`SLICE`] at a time, the lock released (and the
    /// task yielding) between slices. If the task is dropped halfway, the rest is removed at
    /// once.
    pub(crate) async fn scan_unlink(&self, patterns: &[String], counted: usize) -> u64 {
        let mut unlinking = Unlinking {
            store: self,
            patterns,
            counted,
            pattern: 0,
            names: Vec::new(),
            next: 0,
            removed: 0,
        };
        while unlinking.slice() {
            tokio::task::yield_now().await;
        }
        unlinking.removed
    }

    /// The names of every key (string, set or counter) matching a glob pattern. moka is read
    /// without the state lock: every string present from now until it is removed is seen.
    fn matching_names(&self, pattern: &[u8]) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self
            .inner
            .strings
            .iter()
            .filter(|(k, _)| glob_match(pattern, k.as_bytes()))
            .map(|(k, _)| Arc::from(k.as_str()))
            .collect();
        // Under the lock, only a copy of the names (shared, no matching).
        let others: Vec<Arc<str>> = {
            let state = self.lock();
            state
                .sets
                .keys()
                .chain(state.counters.keys())
                .cloned()
                .collect()
        };
        names.extend(
            others
                .into_iter()
                .filter(|k| glob_match(pattern, k.as_bytes())),
        );
        names
    }

    /// Removes keys of any kind; returns how many live ones existed.
    fn remove_all(&self, state: &mut State, keys: &[String], now: Instant) -> u64 {
        let removed = keys.iter().filter(|k| self.remove(state, k, now)).count() as u64;
        state.release_gone(keys.len() + RELEASES_PER_WRITE);
        removed
    }

    /// Removes a key of any kind; true if a live one existed.
    fn remove(&self, state: &mut State, key: &str, now: Instant) -> bool {
        let string = self
            .inner
            .strings
            .remove(key)
            .is_some_and(|slot| slot.live(now));
        let set = state.sets.remove(key).is_some_and(|s| s.expires > now);
        let counter = state
            .counters
            .remove(key)
            .is_some_and(|c| c.expires.map_or(true, |e| e > now));
        string || set || counter
    }
}

/// The strings of the sets an invalidation took out, removed a slice at a time.
struct Doomed<'a> {
    store: &'a MemoryStore,
    /// Each member with the incarnation the set held.
    members: Vec<(Arc<str>, u64)>,
    next: usize,
    /// Live strings removed.
    removed: u64,
}

impl Doomed<'_> {
    /// Removes the next slice under one hold of the lock; true if some are left.
    fn slice(&mut self) -> bool {
        if self.next == self.members.len() {
            return false;
        }
        let store = self.store;
        let end = (self.next + SLICE).min(self.members.len());
        let slice = &self.members[self.next..end];
        let mut state = store.lock();
        let now = Instant::now();
        for (key, id) in slice {
            // Only the string that held this membership: one stored since is newer.
            match store.inner.strings.get(&**key) {
                Some(slot) if slot.holds(*id) => {
                    store.inner.strings.invalidate(&**key);
                    self.removed += u64::from(slot.live(now));
                }
                _ => {}
            }
        }
        state.release_gone(slice.len() + RELEASES_PER_WRITE);
        #[cfg(test)]
        {
            state.work.largest_hold = state.work.largest_hold.max(slice.len());
        }
        drop(state);
        self.next = end;
        let more = self.next < self.members.len();
        if more {
            store.let_waiters_in();
        }
        more
    }
}

impl Drop for Doomed<'_> {
    /// Strings out of their indexes must not outlive the invalidation: a task dropped
    /// between slices (its runtime shut down) removes the rest now.
    fn drop(&mut self) {
        while self.slice() {}
    }
}

/// The keys `scan_unlink` removes, pattern after pattern, a slice at a time.
struct Unlinking<'a> {
    store: &'a MemoryStore,
    patterns: &'a [String],
    counted: usize,
    /// The pattern whose keys are being removed.
    pattern: usize,
    /// Its keys, found when the previous pattern's were all removed.
    names: Vec<Arc<str>>,
    next: usize,
    /// Live keys of pattern `counted` removed.
    removed: u64,
}

impl Unlinking<'_> {
    /// Removes the next slice under one hold of the lock; true if some are left.
    fn slice(&mut self) -> bool {
        let store = self.store;
        while self.next == self.names.len() {
            let Some(pattern) = self.patterns.get(self.pattern) else {
                return false;
            };
            if self.next > 0 {
                // The previous pattern is done.
                self.pattern += 1;
                self.names.clear();
                self.next = 0;
                continue;
            }
            self.names = store.matching_names(pattern.as_bytes());
            if self.names.is_empty() {
                self.pattern += 1;
            }
        }
        let end = (self.next + SLICE).min(self.names.len());
        let mut state = store.lock();
        let now = Instant::now();
        for name in &self.names[self.next..end] {
            if store.remove(&mut state, name, now) && self.pattern == self.counted {
                self.removed += 1;
            }
        }
        state.release_gone(end - self.next + RELEASES_PER_WRITE);
        drop(state);
        self.next = end;
        store.let_waiters_in();
        true
    }
}

impl Drop for Unlinking<'_> {
    /// Finishes what a dropped task began (see `Doomed`).
    fn drop(&mut self) {
        while self.slice() {}
    }
}

impl State {
    fn new(gone: Receiver<Gone>) -> Self {
        State {
            sets: HashMap::new(),
            counters: HashMap::new(),
            marker_expiry: VecDeque::new(),
            gone,
            last_id: 0,
            #[cfg(test)]
            work: Work::default(),
        }
    }

    /// A counter's value (0 when absent or expired).
    fn counter(&self, key: &str, now: Instant) -> u64 {
        self.counters
            .get(key)
            .filter(|c| c.expires.map_or(true, |e| e > now))
            .map_or(0, |c| c.value)
    }

    /// Takes the next sequence number and raises every marker to it (never lowers one).
    fn mark(&mut self, seq_key: &str, markers: &[String], now: Instant) {
        let seq = self.counter(seq_key, now).saturating_add(1);
        self.set_counter(seq_key, seq, None);
        let expires = deadline(now, MARKER_TTL);
        for marker in markers {
            let value = self.counter(marker, now).max(seq);
            let name = self.set_counter(marker, value, Some(expires));
            self.marker_expiry.push_back((expires, name));
        }
    }

    /// Sets a counter; returns its name as the map holds it.
    fn set_counter(&mut self, key: &str, value: u64, expires: Option<Instant>) -> Arc<str> {
        let counter = Counter { value, expires };
        match self.counters.get_key_value(key) {
            Some((name, _)) => {
                let name = name.clone();
                self.counters.insert(name.clone(), counter);
                name
            }
            None => {
                let name: Arc<str> = Arc::from(key);
                self.counters.insert(name.clone(), counter);
                name
            }
        }
    }

    /// Registers a string in `indexes` (its key as the member) and, for a response, its path
    /// in the registry, until `expires`; returns the links the string holds.
    fn register(
        &mut self,
        key: &str,
        indexes: &[String],
        path: Option<&(String, String)>,
        expires: Instant,
        now: Instant,
    ) -> Option<Arc<[Link]>> {
        if indexes.is_empty() && path.is_none() {
            return None;
        }
        let own: Arc<str> = Arc::from(key);
        let mut links = Vec::with_capacity(indexes.len() + 1);
        for index in indexes {
            links.extend(self.add(index, &own, true, expires, now));
        }
        if let Some((registry, path)) = path {
            links.extend(self.add(registry, &Arc::from(path.as_str()), false, expires, now));
        }
        Some(links.into())
    }

    /// Adds `member` to a set until `expires` (never lowering its expiry) for one more
    /// holder, keeps the set a second past its newest member, and returns the holder's link.
    /// `own` is whether the member is the holder's own key. An expired set is replaced by a
    /// new one (its members are not carried over, as in Redis).
    fn add(
        &mut self,
        index: &str,
        member: &Arc<str>,
        own: bool,
        expires: Instant,
        now: Instant,
    ) -> Option<Link> {
        #[cfg(test)]
        {
            self.work.examined += 1;
        }
        if !self.sets.get(index).is_some_and(|set| set.expires > now) {
            let name: Arc<str> = Arc::from(index);
            let set = Set {
                name: name.clone(),
                members: HashMap::new(),
                expires,
            };
            self.sets.insert(name, set);
        }
        let set = self.sets.get_mut(index)?;
        let last_id = &mut self.last_id;
        let m = set.members.entry(member.clone()).or_insert_with(|| {
            *last_id += 1;
            Member {
                expires,
                holders: 0,
                id: *last_id,
            }
        });
        m.expires = m.expires.max(expires);
        m.holders = m.holders.saturating_add(1);
        set.expires = set.expires.max(deadline(expires, Duration::from_secs(1)));
        Some(Link {
            set: set.name.clone(),
            member: (!own).then(|| member.clone()),
            id: m.id,
        })
    }

    /// Whether the variant set `set` is full for `member`: live, without `member` among its
    /// live members, and with `max` live members already (the Redis store's `ADMIT_VARIANT`).
    /// Members leave with their entries, so the count of live ones is taken only when the
    /// set holds `max` or more (at most `max` plus the expired ones not yet released).
    fn variants_full(&self, set: &str, member: &str, max: u32, now: Instant) -> bool {
        let Some(s) = self.sets.get(set).filter(|s| s.expires > now) else {
            return false;
        };
        let max = max as usize;
        s.members.len() >= max
            && !s.members.get(member).is_some_and(|m| m.expires > now)
            && s.members.values().filter(|m| m.expires > now).count() >= max
    }

    /// What a write (or invalidation) does besides its own work: at most `releases` strings
    /// reported gone are released, at most `MARKERS_PER_WRITE` expired markers dropped.
    fn housekeep(&mut self, now: Instant, releases: usize) {
        self.release_gone(releases);
        for _ in 0..MARKERS_PER_WRITE {
            match self.marker_expiry.front() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            if let Some((at, name)) = self.marker_expiry.pop_front() {
                // Only if it was not raised again since.
                if self
                    .counters
                    .get(&name)
                    .is_some_and(|c| c.expires == Some(at))
                {
                    self.counters.remove(&name);
                }
            }
        }
    }

    /// Releases at most `n` of the strings moka reported gone.
    fn release_gone(&mut self, n: usize) {
        for _ in 0..n {
            match self.gone.try_recv() {
                Ok(gone) => self.release(&gone.key, &gone.links),
                Err(_) => break,
            }
        }
    }

    /// A string left the store: each membership it held loses a holder; the last holder
    /// takes the member out, the last member its set.
    fn release(&mut self, key: &str, links: &[Link]) {
        for link in links {
            #[cfg(test)]
            {
                self.work.examined += 1;
            }
            let member = link.member.as_deref().unwrap_or(key);
            let Some(set) = self.sets.get_mut(&*link.set) else {
                continue;
            };
            // A member of another incarnation (the set was invalidated or expired and made
            // anew since) is not this link's.
            let Some(m) = set.members.get_mut(member).filter(|m| m.id == link.id) else {
                continue;
            };
            m.holders = m.holders.saturating_sub(1);
            if m.holders > 0 {
                continue;
            }
            set.members.remove(member);
            if set.members.is_empty() {
                self.sets.remove(&*link.set);
                shrink(&mut self.sets);
            } else {
                shrink(&mut set.members);
            }
        }
    }

    /// Names of the live sets and counters.
    fn live_names(&self, now: Instant) -> impl Iterator<Item = &str> {
        let sets = self
            .sets
            .iter()
            .filter(move |(_, s)| s.expires > now)
            .map(|(k, _)| &**k);
        let counters = self
            .counters
            .iter()
            .filter(move |(_, c)| c.expires.map_or(true, |e| e > now))
            .map(|(k, _)| &**k);
        sets.chain(counters)
    }
}

/// Gives memory back once a map holds less than a quarter of its room (to twice what it
/// holds, so that the cost is amortised over the removals that emptied it).
fn shrink<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

/// `now + ttl`, or far in the future when that cannot be represented (a TTL of
/// `Duration::MAX` from a handler's header must not panic; the Redis store saturates too).
fn deadline(now: Instant, ttl: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(ttl)
        .or_else(|| now.checked_add(CENTURY))
        .unwrap_or(now)
}

/// The entry with its state byte flipped to confirmed (it is written as pending, see
/// `entry`); an exact-size copy, so the store never keeps a larger buffer alive.
fn confirmed(value: &Bytes) -> Bytes {
    let mut out = BytesMut::from(&value[..]);
    if let Some(state) = out.get_mut(crate::entry::STATE_OFFSET) {
        *state = crate::entry::CONFIRMED;
    }
    out.freeze()
}

/// Redis's glob matching (`KEYS`, `SCAN MATCH`, `ZSCAN MATCH`): `*` any run of bytes, `?`
/// one byte, `[abc]`, `[^abc]`, `[a-z]` one byte of (or not of) a class, `\` escapes the next
/// byte.
pub(crate) fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    // Where to resume after the last `*`: the pattern after it, and the byte it took up to.
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p + 1, i));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => match class(pattern, p + 1, s[i]) {
                (true, next) => Some(next),
                (false, _) => None,
            },
            Some(b'\\') if p + 1 < pattern.len() => (pattern[p + 1] == s[i]).then_some(p + 2),
            Some(&c) => (c == s[i]).then_some(p + 1),
            None => None,
        };
        match (step, star) {
            (Some(next), _) => {
                p = next;
                i += 1;
            }
            (None, Some((after, taken))) => {
                // Let the last `*` take one more byte and try again.
                star = Some((after, taken + 1));
                p = after;
                i = taken + 1;
            }
            (None, None) => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// Whether byte `c` is in the class starting at `start` (after its `[`), and where the
/// pattern goes on after the class. An unclosed class ends with the pattern, as in Redis.
fn class(pattern: &[u8], start: usize, c: u8) -> (bool, usize) {
    let mut p = start;
    let negated = pattern.get(p) == Some(&b'^');
    if negated {
        p += 1;
    }
    let mut matched = false;
    while p < pattern.len() {
        match pattern[p] {
            b']' => {
                p += 1;
                return (matched != negated, p);
            }
            b'\\' if p + 1 < pattern.len() => {
                matched |= pattern[p + 1] == c;
                p += 2;
            }
            lo if p + 2 < pattern.len() && pattern[p + 1] == b'-' => {
                let hi = pattern[p + 2];
                let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                matched |= (lo..=hi).contains(&c);
                p += 3;
            }
            other => {
                matched |= other == c;
                p += 1;
            }
        }
    }
    (matched != negated, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_in_redis() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "anything/at/all", true),
            ("/users/*/permissions", "/users/42/permissions", true),
            ("/users/*/permissions", "/users/4/2/permissions", true),
            ("/users/*/permissions", "/users/42/menu", false),
            ("/users/?", "/users/7", true),
            ("/users/?", "/users/77", false),
            (r"/odd/a\*b", "/odd/a*b", true),
            (r"/odd/a\*b", "/odd/axxb", false),
            ("ns:v[0-9]*:*", "ns:v1:abc", true),
            ("ns:v[0-9]*:*", "ns:vx:abc", false),
            ("[^a]x", "bx", true),
            ("[^a]x", "ax", false),
            ("[z-a]", "m", true),
            (r"[\]]", "]", true),
            ("[abc", "b", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("*a", "bbbba", true),
            ("a**", "a", true),
            (r"x\", r"x\", true),
            ("{cache:*", "{cache:v1:k}:w", true),
            ("cache:ix:*", "cache:inv:p:1", false),
        ];
        for (pattern, s, want) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), s.as_bytes()),
                *want,
                "{pattern} ~ {s}"
            );
        }
    }

    impl MemoryStore {
        fn work(&self) -> Work {
            self.lock().work
        }

        /// Members of every set, after releasing every string reported gone.
        fn members(&self) -> usize {
            self.inner.strings.run_pending_tasks();
            let mut state = self.lock();
            state.release_gone(usize::MAX);
            state.sets.values().map(|s| s.members.len()).sum()
        }
    }

    /// A write of `key` with no invalidation in its way, registered in `indexes` and under
    /// `path` in `ns:paths`.
    fn entry(key: &str, value: Bytes, ttl: Duration, indexes: &[&str], path: &str) -> Write {
        Write {
            key: key.to_owned(),
            value,
            nonce: [0; 8],
            ttl,
            indexes: indexes.iter().map(|i| i.to_string()).collect(),
            path: Some(("ns:paths".into(), path.into())),
            markers: Vec::new(),
            miss_seq: 0,
            seq_key: "ns:seq".into(),
            started: Instant::now(),
            variants: None,
        }
    }

    const PATH_IX: &str = "ns:ix:p:items";
    const ROUTE_IX: &str = "ns:ix:r:items";

    #[test]
    fn a_write_costs_the_same_whatever_its_index_holds() {
        // 20,000 variants of one path (unique query strings): each write looks at its own
        // memberships and a bounded number of releases, never at the members already there.
        let store = MemoryStore::new(1 << 30);
        let ttl = Duration::from_secs(600);
        let mut most = 0;
        for round in 0..2 {
            // The second round replaces every entry: each replaced one is released.
            for n in 0..20_000 {
                let before = store.work().examined;
                let value = Bytes::from(format!("{round}"));
                let w = entry(
                    &format!("ns:v1:{n}"),
                    value,
                    ttl,
                    &[PATH_IX, ROUTE_IX],
                    "/items",
                );
                assert_eq!(store.write(w), Written::Stored);
                most = most.max(store.work().examined - before);
            }
        }
        assert_eq!(store.members(), 2 * 20_000 + 1);
        // Three memberships added, and up to eight strings released with three each.
        let bound = 3 + RELEASES_PER_WRITE as u64 * 3;
        assert!(
            most <= bound,
            "a write looked at {most} members (bound {bound})"
        );
    }

    #[test]
    fn index_memberships_leave_with_their_entries() {
        // A flood of unique queries through a store bounded to 1 MiB: evicted entries take
        // their memberships with them, and the memberships are counted in the bound.
        const BOUND: u64 = 1 << 20;
        let store = MemoryStore::new(BOUND);
        let value = Bytes::from(vec![b'x'; 1024]);
        for n in 0..20_000 {
            let w = entry(
                &format!("ns:v1:{n}"),
                value.clone(),
                Duration::from_secs(600),
                &[PATH_IX, ROUTE_IX],
                "/items",
            );
            store.write(w);
        }
        assert!(store.used_bytes() <= BOUND, "{}", store.used_bytes());
        let held = store.inner.strings.entry_count() as usize;
        assert!((1..2_000).contains(&held), "{held} entries held");
        // Two indexes per entry held, and the one path they share.
        let members = store.members();
        assert!(
            members <= 2 * held + 1,
            "{members} members for {held} entries"
        );
        // The path stays registered while a variant is held.
        assert_eq!(store.matching_paths("ns:paths", "/it*"), ["/items"]);
    }

    #[test]
    fn memberships_weigh_against_the_bound() {
        let (bare, indexed) = (MemoryStore::new(1 << 20), MemoryStore::new(1 << 20));
        let value = || Bytes::from_static(b"0123456789");
        let ttl = Duration::from_secs(60);
        bare.set_value("ns:val:k", value(), ttl, &[]);
        indexed.set_value(
            "ns:val:k",
            value(),
            ttl,
            &["a".into(), "b".into(), "c".into()],
        );
        assert!(indexed.used_bytes() >= bare.used_bytes() + 3 * LINK_OVERHEAD as u64);
    }

    #[test]
    fn a_path_stays_registered_while_any_variant_is_held() {
        let store = MemoryStore::new(1 << 20);
        let v = || Bytes::from_static(b"v");
        let long = Duration::from_secs(60);
        store.write(entry("ns:v1:a", v(), long, &[PATH_IX], "/items"));
        store.write(entry("ns:v1:b", v(), long, &[PATH_IX], "/items"));
        assert_eq!(store.unlink(&["ns:v1:a".into()]), 1);
        assert_eq!(store.matching_paths("ns:paths", "/items"), ["/items"]);
        assert_eq!(store.keys("ns:ix:*"), [PATH_IX]);
        assert_eq!(store.unlink(&["ns:v1:b".into()]), 1);
        // Nothing holds the path or the index any more.
        assert!(store.matching_paths("ns:paths", "*").is_empty());
        assert_eq!(store.keys("ns:*"), Vec::<String>::new());

        // A shorter TTL never lowers the path's expiry in the registry (the entry rewritten
        // with it holds the path until it leaves).
        store.write(entry("ns:v1:s", v(), long, &[], "/solo"));
        let short = Duration::from_millis(30);
        store.write(entry("ns:v1:s", v(), short, &[], "/solo"));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(store.matching_paths("ns:paths", "/solo"), ["/solo"]);
        // Expired, so not counted; removed all the same, and the path with it.
        assert_eq!(store.unlink(&["ns:v1:s".into()]), 0);
        assert!(store.matching_paths("ns:paths", "*").is_empty());
    }

    #[tokio::test]
    async fn a_large_invalidation_holds_the_lock_a_slice_at_a_time() {
        let store = MemoryStore::new(1 << 30);
        let ttl = Duration::from_secs(600);
        for n in 0..10_000 {
            let w = entry(
                &format!("ns:v1:{n}"),
                Bytes::from_static(b"v"),
                ttl,
                &[PATH_IX, ROUTE_IX],
                "/items",
            );
            store.write(w);
        }
        let removed = store
            .invalidate_indexes("ns:seq", &["ns:inv:p:items".into()], &[PATH_IX.into()], "")
            .await;
        assert_eq!(removed, 10_000);
        let most = store.work().largest_hold;
        assert!(
            most <= SLICE,
            "{most} strings removed under one hold of the lock"
        );
        assert!(store.keys("ns:v1:*").is_empty());
        // The other index lost its members with their entries.
        assert_eq!(store.members(), 0);
    }

    #[test]
    fn writes_between_slices_of_an_invalidation_stay() {
        use std::future::Future;
        use std::task::{Context, Poll};
        let store = MemoryStore::new(1 << 30);
        let ttl = Duration::from_secs(600);
        let n = 1_000;
        for i in 0..n {
            store.write(entry(
                &format!("ns:v1:{i}"),
                Bytes::from_static(b"old"),
                ttl,
                &[PATH_IX],
                "/items",
            ));
        }
        let indexes = [PATH_IX.to_string()];
        let mut invalidation = Box::pin(store.invalidate_indexes("ns:seq", &[], &indexes, ""));
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        // The sets are out and the first slice removed...
        assert!(invalidation.as_mut().poll(&mut cx).is_pending());
        assert_eq!(store.keys("ns:v1:*").len(), n - SLICE);
        // ...then fresh responses are stored (their misses began after the invalidation), of
        // every variant and of a new one.
        for i in 0..=n {
            let w = entry(
                &format!("ns:v1:{i}"),
                Bytes::from_static(b"new"),
                ttl,
                &[PATH_IX],
                "/items",
            );
            assert_eq!(store.write(w), Written::Stored);
        }
        let removed = loop {
            if let Poll::Ready(removed) = invalidation.as_mut().poll(&mut cx) {
                break removed;
            }
        };
        // Only what the first slice removed counted; every fresh entry is held, and indexed.
        assert_eq!(removed, SLICE as u64);
        assert_eq!(store.keys("ns:v1:*").len(), n + 1);
        assert!((0..=n).all(|i| store
            .get(&format!("ns:v1:{i}"))
            .is_some_and(|v| v.as_ref() == b"new")));
        let again = store.invalidate_indexes("ns:seq", &[], &indexes, "");
        let mut again = Box::pin(again);
        let removed = loop {
            if let Poll::Ready(removed) = again.as_mut().poll(&mut cx) {
                break removed;
            }
        };
        assert_eq!(removed, n as u64 + 1);
    }

    #[test]
    fn a_dropped_invalidation_still_removes_what_it_took_out() {
        use std::future::Future;
        let store = MemoryStore::new(1 << 30);
        let ttl = Duration::from_secs(600);
        for i in 0..1_000 {
            let w = entry(
                &format!("ns:v1:{i}"),
                Bytes::from_static(b"v"),
                ttl,
                &[PATH_IX],
                "/items",
            );
            store.write(w);
        }
        let indexes = [PATH_IX.to_string()];
        let mut invalidation = Box::pin(store.invalidate_indexes("ns:seq", &[], &indexes, ""));
        let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
        assert!(invalidation.as_mut().poll(&mut cx).is_pending());
        assert_eq!(store.keys("ns:v1:*").len(), 1_000 - SLICE);
        // Its task is dropped between slices (a runtime shutting down): no entry is left
        // behind out of its index.
        drop(invalidation);
        assert!(store.keys("ns:v1:*").is_empty());
        let patterns = ["ns:ix:*".to_string(), "ns:*".to_string()];
        let mut clear = Box::pin(store.scan_unlink(&patterns, 1));
        for i in 0..1_000 {
            store.set_value(&format!("ns:val:{i}"), Bytes::from_static(b"v"), ttl, &[]);
        }
        assert!(clear.as_mut().poll(&mut cx).is_pending());
        drop(clear);
        assert!(store.keys("ns:*").is_empty());
    }

    #[tokio::test]
    async fn counters_sets_and_strings_share_one_keyspace() {
        let store = MemoryStore::new(1 << 20);
        let now = Instant::now();
        {
            let mut state = store.lock();
            state.mark("ns:seq", &["ns:inv:p:1".into()], now);
            state.add(
                "ns:ix:p:1",
                &Arc::from("ns:v1:k"),
                true,
                now + Duration::from_secs(5),
                now,
            );
        }
        store.set_value(
            "ns:val:a",
            Bytes::from_static(b"x"),
            Duration::from_secs(5),
            &[],
        );
        assert_eq!(
            store.keys("ns:*"),
            ["ns:inv:p:1", "ns:ix:p:1", "ns:seq", "ns:val:a"]
        );
        assert_eq!(store.read_seq("ns:seq"), 1);
        assert_eq!(store.scan_unlink(&["ns:i*".into()], 0).await, 2);
        assert_eq!(store.keys("ns:*"), ["ns:seq", "ns:val:a"]);
    }

    #[tokio::test]
    async fn the_longest_ttls_do_not_overflow() {
        let store = MemoryStore::new(1 << 20);
        store.set_value("v", Bytes::from_static(b"x"), Duration::MAX, &["ix".into()]);
        assert!(store.get("v").is_some());
        assert!(store.try_lock("l", Duration::MAX));
        assert!(!store.try_lock("l", Duration::MAX));
        assert_eq!(
            store
                .invalidate_indexes("seq", &["m".into()], &["ix".into()], "")
                .await,
            1
        );
    }

    #[test]
    fn a_lock_is_taken_once_until_it_expires() {
        let store = MemoryStore::new(1 << 20);
        assert!(store.try_lock("l", Duration::from_millis(50)));
        assert!(!store.try_lock("l", Duration::from_millis(50)));
        std::thread::sleep(Duration::from_millis(80));
        assert!(store.try_lock("l", Duration::from_millis(50)));
    }

    #[test]
    fn delete_if_equal_keeps_a_replaced_value() {
        let store = MemoryStore::new(1 << 20);
        store.set_value("k", Bytes::from_static(b"new"), Duration::from_secs(5), &[]);
        assert!(!store.delete_if_equal("k", &Bytes::from_static(b"old")));
        assert!(store.get("k").is_some());
        assert!(store.delete_if_equal("k", &Bytes::from_static(b"new")));
        assert!(store.get("k").is_none());
    }

    #[tokio::test]
    async fn expired_members_are_not_removed_twice() {
        let store = MemoryStore::new(1 << 20);
        store.set_value(
            "a",
            Bytes::from_static(b"1"),
            Duration::from_millis(30),
            &["ix".into()],
        );
        store.set_value(
            "b",
            Bytes::from_static(b"1"),
            Duration::from_secs(5),
            &["ix".into()],
        );
        std::thread::sleep(Duration::from_millis(60));
        // `a` expired: only `b` is counted.
        assert_eq!(
            store
                .invalidate_indexes("seq", &[], &["ix".into()], "")
                .await,
            1
        );
        assert!(store.keys("*").iter().all(|k| k == "seq"));
    }

    #[test]
    fn expired_markers_are_dropped_and_raised_ones_kept() {
        let store = MemoryStore::new(1 << 20);
        let now = Instant::now();
        let mut state = store.lock();
        state.mark("seq", &["m1".into(), "m2".into()], now);
        // `m2` raised again later: its first expiry no longer applies.
        state.mark("seq", &["m2".into()], now + Duration::from_secs(60));
        state.housekeep(now + MARKER_TTL + Duration::from_secs(1), 0);
        assert!(!state.counters.contains_key("m1"));
        assert_eq!(
            state.counter("m2", now + MARKER_TTL + Duration::from_secs(1)),
            2
        );
        state.housekeep(now + MARKER_TTL + Duration::from_secs(61), 0);
        assert!(!state.counters.contains_key("m2"));
        assert_eq!(state.marker_expiry.len(), 0);
    }
}
