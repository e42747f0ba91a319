//! The in-process store: entries in this process's memory, for a single instance or for the
//! tests of an application, with the rules of the Redis store.
//!
//! It keeps Redis's data model, reduced to what the cache uses, so that every operation
//! means the same thing on both stores:
//! - strings (entries, values, locks) live in a moka cache weighed in bytes, each with its
//!   own deadline, evicted least recently used first past the byte bound (like Redis under
//!   `maxmemory-policy allkeys-lru`);
//! - indexes and the path registry are sets of members, each member with its expiry,
//!   pruned when a member is added and swept once a second;
//! - the invalidation sequence and markers are counters, markers expiring after
//!   [`MARKER_TTL`].
//!
//! A write checks its markers and stores its entry under one lock, which invalidations also
//! take: an invalidation either comes before the check (the write is refused) or after the
//! entry is stored (and removes it). No pending value is needed, as no reader can see the
//! entry before its check passed.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use moka::ops::compute::{CompResult, Op};
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use crate::store::{Write, Written, MARKER_TTL};

/// Bytes counted for each string beyond its key and value (the slot and moka's own entry).
const SLOT_OVERHEAD: usize = 96;

/// How often expired index members and sets are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

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
    capacity: u64,
}

/// A string and the instant it expires.
#[derive(Clone)]
struct Slot {
    value: Bytes,
    expires: Instant,
}

impl Slot {
    fn live(&self, now: Instant) -> bool {
        self.expires > now
    }
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
#[derive(Default)]
struct State {
    sets: HashMap<String, Set>,
    counters: HashMap<String, Counter>,
    next_sweep: Option<Instant>,
}

struct Set {
    /// Member and the instant it expires (a Redis sorted set scored by expiry).
    members: HashMap<String, Instant>,
    /// The set outlives its newest member a little, like its Redis twin.
    expires: Instant,
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
    /// overhead); past it, the least recently used are evicted. The bookkeeping of
    /// invalidation (indexes, markers) is outside the bound: it is a key per entry and
    /// expires with the entries.
    pub fn new(max_bytes: u64) -> Self {
        let strings = Cache::builder()
            .max_capacity(max_bytes)
            .eviction_policy(EvictionPolicy::lru())
            .weigher(|key: &String, slot: &Slot| {
                u32::try_from(key.len() + slot.value.len() + SLOT_OVERHEAD).unwrap_or(u32::MAX)
            })
            .expire_after(SlotExpiry)
            .build();
        MemoryStore {
            inner: Arc::new(Inner {
                strings,
                state: Mutex::new(State::default()),
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
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
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
        state.sweep(now);
        let ttl = w.ttl.max(Duration::from_millis(1));
        let expires = deadline(now, ttl);
        if let Some(v) = &w.variants {
            if !state.admit_variant(&v.key, &w.key, expires, v.max, now) {
                return Written::TooManyVariants;
            }
        }
        let moved = state.counter(&w.seq_key, now) < w.miss_seq
            || w.markers.iter().any(|m| state.counter(m, now) > w.miss_seq)
            || w.started.elapsed() + Duration::from_secs(10) >= MARKER_TTL;
        if moved {
            return Written::Refused;
        }
        let value = confirmed(&w.value);
        self.inner
            .strings
            .insert(w.key.clone(), Slot { value, expires });
        for index in &w.indexes {
            state.add(index, &w.key, expires, now);
            // Its variant set too, so that invalidating the index resets the bound.
            if let Some(v) = &w.variants {
                state.add(index, &v.key, expires, now);
            }
        }
        if let Some((registry, path)) = &w.path {
            state.add(registry, path, expires, now);
        }
        Written::Stored
    }

    /// Takes a lock (a string set only if absent) for `ttl`: true if this caller took it.
    pub(crate) fn try_lock(&self, key: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let slot = Slot {
            value: Bytes::from_static(b"1"),
            expires: deadline(now, ttl.max(Duration::from_millis(1))),
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
        state.sweep(now);
        self.inner
            .strings
            .insert(key.to_owned(), Slot { value, expires });
        for index in indexes {
            state.add(index, key, expires, now);
        }
    }

    /// Removes `key` only if it still holds `value` (under the state lock, which every
    /// write of entries and values takes, so a value written meanwhile is never removed).
    pub(crate) fn delete_if_equal(&self, key: &str, value: &Bytes) -> bool {
        let _state = self.lock();
        let now = Instant::now();
        match self.inner.strings.get(key) {
            Some(slot) if slot.live(now) && slot.value == *value => {
                self.inner.strings.invalidate(key);
                true
            }
            _ => false,
        }
    }

    /// Removes keys (strings, sets or counters); returns how many existed.
    pub(crate) fn unlink(&self, keys: &[String]) -> u64 {
        let now = Instant::now();
        let mut state = self.lock();
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
        let now = Instant::now();
        let mut state = self.lock();
        state.sweep(now);
        state.mark(seq_key, markers, now);
        self.remove_all(&mut state, keys, now)
    }

    /// Raises `markers`, then removes every member of `indexes` and empties them; returns how
    /// many members existed, but those starting with `uncounted` (variant sets).
    pub(crate) fn invalidate_indexes(
        &self,
        seq_key: &str,
        markers: &[String],
        indexes: &[String],
        uncounted: &str,
    ) -> u64 {
        let now = Instant::now();
        let mut state = self.lock();
        state.sweep(now);
        state.mark(seq_key, markers, now);
        let mut members: Vec<String> = indexes
            .iter()
            .filter_map(|i| state.sets.remove(i))
            .filter(|set| set.expires > now)
            .flat_map(|set| set.members.into_iter())
            .filter(|(_, expires)| *expires > now)
            .map(|(member, _)| member)
            .collect();
        members.sort_unstable();
        members.dedup();
        let (own, entries): (Vec<String>, Vec<String>) = members
            .into_iter()
            .partition(|m| !uncounted.is_empty() && m.starts_with(uncounted));
        self.remove_all(&mut state, &own, now);
        self.remove_all(&mut state, &entries, now)
    }

    /// The members of the path registry that match a glob pattern, sorted.
    pub(crate) fn matching_paths(&self, paths_key: &str, pattern: &str) -> Vec<String> {
        let now = Instant::now();
        let state = self.lock();
        let mut paths: Vec<String> = state
            .sets
            .get(paths_key)
            .filter(|set| set.expires > now)
            .map(|set| {
                set.members
                    .iter()
                    .filter(|(p, expires)| {
                        **expires > now && glob_match(pattern.as_bytes(), p.as_bytes())
                    })
                    .map(|(p, _)| p.clone())
                    .collect()
            })
            .unwrap_or_default();
        paths.sort_unstable();
        paths
    }

    /// Removes every key matching the patterns, in their order; returns how many live keys
    /// matched pattern number `counted`.
    pub(crate) fn scan_unlink(&self, patterns: &[String], counted: usize) -> u64 {
        let now = Instant::now();
        let mut state = self.lock();
        let mut counted_removed = 0;
        for (i, pattern) in patterns.iter().enumerate() {
            let pattern = pattern.as_bytes();
            let mut names: Vec<String> = self
                .inner
                .strings
                .iter()
                .filter(|(k, _)| glob_match(pattern, k.as_bytes()))
                .map(|(k, _)| String::clone(&k))
                .collect();
            names.extend(
                state
                    .sets
                    .keys()
                    .chain(state.counters.keys())
                    .filter(|k| glob_match(pattern, k.as_bytes()))
                    .cloned(),
            );
            for name in names {
                if self.remove(&mut state, &name, now) && i == counted {
                    counted_removed += 1;
                }
            }
        }
        counted_removed
    }

    /// Removes keys of any kind; returns how many live ones existed.
    fn remove_all(&self, state: &mut State, keys: &[String], now: Instant) -> u64 {
        keys.iter().filter(|k| self.remove(state, k, now)).count() as u64
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

impl State {
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
        self.counters.insert(
            seq_key.to_owned(),
            Counter {
                value: seq,
                expires: None,
            },
        );
        for marker in markers {
            let value = self.counter(marker, now).max(seq);
            self.counters.insert(
                marker.clone(),
                Counter {
                    value,
                    expires: Some(deadline(now, MARKER_TTL)),
                },
            );
        }
    }

    /// Adds a member until `expires` (never lowering its expiry), prunes expired members and
    /// keeps the set a second past its newest member.
    fn add(&mut self, index: &str, member: &str, expires: Instant, now: Instant) {
        let set = self.sets.entry(index.to_owned()).or_insert_with(|| Set {
            members: HashMap::new(),
            expires,
        });
        if set.expires <= now {
            set.members.clear();
        }
        set.members.retain(|_, e| *e > now);
        let e = set.members.entry(member.to_owned()).or_insert(expires);
        *e = (*e).max(expires);
        set.expires = set.expires.max(deadline(expires, Duration::from_secs(1)));
    }

    /// Admits `member` into the variant set `set` until `expires`: always if it is there
    /// (live), else only while the set has fewer than `max` live members. The Redis store's
    /// `ADMIT_VARIANT`.
    fn admit_variant(
        &mut self,
        set: &str,
        member: &str,
        expires: Instant,
        max: u32,
        now: Instant,
    ) -> bool {
        let full = self.sets.get(set).is_some_and(|s| {
            s.expires > now
                && !s.members.get(member).is_some_and(|e| *e > now)
                && s.members.values().filter(|e| **e > now).count() >= max as usize
        });
        if !full {
            self.add(set, member, expires, now);
        }
        !full
    }

    /// Once a second: drops expired sets, members and markers.
    fn sweep(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|next| next > now) {
            return;
        }
        self.next_sweep = Some(deadline(now, SWEEP_EVERY));
        self.sets.retain(|_, set| {
            set.members.retain(|_, e| *e > now);
            set.expires > now
        });
        self.counters
            .retain(|_, c| c.expires.map_or(true, |e| e > now));
    }

    /// Names of the live sets and counters.
    fn live_names(&self, now: Instant) -> impl Iterator<Item = &str> {
        let sets = self
            .sets
            .iter()
            .filter(move |(_, s)| s.expires > now)
            .map(|(k, _)| k.as_str());
        let counters = self
            .counters
            .iter()
            .filter(move |(_, c)| c.expires.map_or(true, |e| e > now))
            .map(|(k, _)| k.as_str());
        sets.chain(counters)
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

    #[test]
    fn counters_sets_and_strings_share_one_keyspace() {
        let store = MemoryStore::new(1 << 20);
        let now = Instant::now();
        {
            let mut state = store.lock();
            state.mark("ns:seq", &["ns:inv:p:1".into()], now);
            state.add("ns:ix:p:1", "ns:v1:k", now + Duration::from_secs(5), now);
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
        assert_eq!(store.scan_unlink(&["ns:i*".into()], 0), 2);
        assert_eq!(store.keys("ns:*"), ["ns:seq", "ns:val:a"]);
    }

    #[test]
    fn the_longest_ttls_do_not_overflow() {
        let store = MemoryStore::new(1 << 20);
        store.set_value("v", Bytes::from_static(b"x"), Duration::MAX, &["ix".into()]);
        assert!(store.get("v").is_some());
        assert!(store.try_lock("l", Duration::MAX));
        assert!(!store.try_lock("l", Duration::MAX));
        assert_eq!(
            store.invalidate_indexes("seq", &["m".into()], &["ix".into()], ""),
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

    #[test]
    fn expired_members_are_not_removed_twice() {
        let store = MemoryStore::new(1 << 20);
        let now = Instant::now();
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
        let _ = now;
        std::thread::sleep(Duration::from_millis(60));
        // `a` expired: only `b` is counted.
        assert_eq!(store.invalidate_indexes("seq", &[], &["ix".into()], ""), 1);
        assert!(store.keys("*").iter().all(|k| k == "seq"));
    }
}
