//! `Store`: the store a layer keeps its entries in, Redis or this process's memory. Every
//! operation of the cache goes through it and means the same on both.

#[cfg(feature = "memory")]
pub(crate) mod memory;
#[cfg(feature = "near")]
pub(crate) mod near;
pub(crate) mod redis;

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::Error as FredError;

#[cfg(feature = "memory")]
use crate::store::memory::MemoryStore;
use crate::store::redis::breaker::BreakerState;
use crate::store::redis::config::ConfigError;
use crate::store::redis::RedisStore;

/// Where a [`CacheLayer`](crate::CacheLayer) keeps its entries: a [`RedisStore`] (shared by
/// every instance of a service) or, with the `memory` feature, a `MemoryStore` (this
/// process only). Made with `From`/`Into`, which [`CacheLayer::new`](crate::CacheLayer::new)
/// does for you.
#[derive(Clone)]
pub struct Store(Backend);

#[derive(Clone)]
enum Backend {
    Redis(RedisStore),
    #[cfg(feature = "memory")]
    Memory(MemoryStore),
}

impl From<RedisStore> for Store {
    fn from(store: RedisStore) -> Self {
        Store(Backend::Redis(store))
    }
}

#[cfg(feature = "memory")]
impl From<MemoryStore> for Store {
    fn from(store: MemoryStore) -> Self {
        Store(Backend::Memory(store))
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Backend::Redis(s) => s.fmt(f),
            #[cfg(feature = "memory")]
            Backend::Memory(s) => s.fmt(f),
        }
    }
}

impl Store {
    /// The Redis store, if this is one (the near-cache and its pub/sub need it).
    #[cfg_attr(not(feature = "near"), allow(dead_code))]
    pub(crate) fn as_redis(&self) -> Option<&RedisStore> {
        match &self.0 {
            Backend::Redis(s) => Some(s),
            #[cfg(feature = "memory")]
            Backend::Memory(_) => None,
        }
    }

    /// The deadline of a lookup (the in-process store answers at once; the default applies
    /// to the waits measured against it).
    pub(crate) fn lookup_timeout(&self) -> Duration {
        match &self.0 {
            Backend::Redis(s) => s.lookup_timeout(),
            #[cfg(feature = "memory")]
            Backend::Memory(_) => crate::store::redis::config::DEFAULT_LOOKUP_TIMEOUT,
        }
    }

    pub(crate) fn breaker_state(&self) -> BreakerState {
        match &self.0 {
            Backend::Redis(s) => s.breaker_state(),
            #[cfg(feature = "memory")]
            Backend::Memory(_) => BreakerState::Closed,
        }
    }

    pub(crate) fn breaker_opened(&self) -> u64 {
        match &self.0 {
            Backend::Redis(s) => s.breaker_opened(),
            #[cfg(feature = "memory")]
            Backend::Memory(_) => 0,
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Bytes>, FredError> {
        match &self.0 {
            Backend::Redis(s) => s.get(key).await,
            #[cfg(feature = "memory")]
            Backend::Memory(s) => Ok(s.get(key)),
        }
    }

    /// An entry, and the invalidation sequence at `seq_key` when it could be read with it.
    pub(crate) async fn lookup(
        &self,
        key: &str,
        seq_key: &std::sync::Arc<str>,
    ) -> Result<(Option<Bytes>, Option<u64>), FredError> {
        match &self.0 {
            Backend::Redis(s) => s.lookup(key, Some(seq_key)).await,
            #[cfg(feature = "memory")]
            // The sequence is read on a miss only: a hit takes no lock.
            Backend::Memory(s) => {
                let _ = seq_key;
                Ok((s.get(key), None))
            }
        }
    }

    pub(crate) async fn read_seq(
        &self,
        seq_key: &str,
        timeout: Duration,
    ) -> Result<u64, FredError> {
        match &self.0 {
            Backend::Redis(s) => s.read_seq(seq_key, timeout).await,
            #[cfg(feature = "memory")]
            Backend::Memory(s) => Ok(s.read_seq(seq_key)),
        }
    }

    pub(crate) async fn write(&self, w: Write) -> Result<Written, FredError> {
        match &self.0 {
            Backend::Redis(s) => s.write(w).await,
            #[cfg(feature = "memory")]
            Backend::Memory(s) => Ok(s.write(w)),
        }
    }

    pub(crate) async fn try_lock(&self, key: &str, ttl: Duration) -> Result<bool, FredError> {
        match &self.0 {
            Backend::Redis(s) => s.try_lock(key, ttl).await,
            #[cfg(feature = "memory")]
            Backend::Memory(s) => Ok(s.try_lock(key, ttl)),
        }
    }

    pub(crate) async fn get_value(&self, key: &str) -> Result<Option<Bytes>, FredError> {
        match &self.0 {
            Backend::Redis(s) => s.get_value(key).await,
            #[cfg(feature = "memory")]
            Backend::Memory(s) => Ok(s.get(key)),
        }
    }

    pub(crate) async fn set_value(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
        indexes: &[String],
    ) -> Result<(), FredError> {
        match &self.0 {
            Backend::Redis(s) => s.set_value(key, value, ttl, indexes).await,
            #[cfg(feature = "memory")]
            Backend::Memory(s) => {
                s.set_value(key, value, ttl, indexes);
                Ok(())
            }
        }
    }

    pub(crate) async fn delete_if_equal(&self, key: &str, value: Bytes) -> Result<bool, FredError> {
        match &self.0 {
            Backend::Redis(s) => s.delete_if_equal(key, value).await,
            #[cfg(feature = "memory")]
            Backend::Memory(s) => Ok(s.delete_if_equal(key, &value)),
        }
    }

    /// Removes keys; returns how many existed.
    pub(crate) async fn unlink(&self, keys: Vec<String>) -> Result<u64, FredError> {
        match &self.0 {
            Backend::Redis(s) => s.unlink(keys).await,
            #[cfg(feature = "memory")]
            Backend::Memory(s) => Ok(s.unlink(&keys)),
        }
    }

    pub(crate) async fn invalidate_keys(
        &self,
        seq_key: &str,
        markers: &[String],
        keys: Vec<String>,
    ) -> Result<u64, FredError> {
        match &self.0 {
            Backend::Redis(s) => s.invalidate_keys(seq_key, markers, keys).await,
            #[cfg(feature = "memory")]
            Backend::Memory(s) => Ok(s.invalidate_keys(seq_key, markers, &keys)),
        }
    }

    /// Removes every member of `indexes` after raising `markers`; members starting with
    /// `uncounted` (bookkeeping, not entries) are removed but not counted.
    pub(crate) async fn invalidate_indexes(
        &self,
        seq_key: &str,
        markers: &[String],
        indexes: &[String],
        uncounted: &str,
    ) -> Result<u64, Incomplete> {
        match &self.0 {
            Backend::Redis(s) => {
                s.invalidate_indexes(seq_key, markers, indexes, uncounted)
                    .await
            }
            #[cfg(feature = "memory")]
            Backend::Memory(s) => Ok(s
                .invalidate_indexes(seq_key, markers, indexes, uncounted)
                .await),
        }
    }

    pub(crate) async fn matching_paths(
        &self,
        paths_key: &str,
        pattern: &str,
    ) -> Result<Vec<String>, FredError> {
        match &self.0 {
            Backend::Redis(s) => s.matching_paths(paths_key, pattern).await,
            #[cfg(feature = "memory")]
            Backend::Memory(s) => Ok(s.matching_paths(paths_key, pattern)),
        }
    }

    pub(crate) async fn scan_unlink(
        &self,
        patterns: &[String],
        counted: usize,
    ) -> Result<u64, Incomplete> {
        match &self.0 {
            Backend::Redis(s) => s.scan_unlink(patterns, counted).await,
            #[cfg(feature = "memory")]
            Backend::Memory(s) => Ok(s.scan_unlink(patterns, counted).await),
        }
    }

    /// The round trip of a PING (zero in process).
    pub(crate) async fn ping(&self) -> Result<Duration, FredError> {
        match &self.0 {
            Backend::Redis(s) => s.ping().await,
            #[cfg(feature = "memory")]
            Backend::Memory(_) => Ok(Duration::ZERO),
        }
    }

    /// The start-up permission check (nothing to check in process).
    pub(crate) async fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        match &self.0 {
            Backend::Redis(s) => s.check(prefix).await,
            #[cfg(feature = "memory")]
            Backend::Memory(_) => {
                let _ = prefix;
                Ok(())
            }
        }
    }

    /// Whether this is the in-process store.
    pub(crate) fn is_memory(&self) -> bool {
        self.as_redis().is_none()
    }
}

/// How long an invalidation marker lives. A response whose miss began longer ago than this
/// is never stored, so a marker always outlives the writes it must stop.
pub(crate) const MARKER_TTL: Duration = Duration::from_secs(600);

/// One entry to write, with what it must be registered under and checked against.
pub(crate) struct Write {
    pub(crate) key: String,
    pub(crate) value: Bytes,
    pub(crate) nonce: [u8; 8],
    pub(crate) ttl: Duration,
    /// Indexes the entry belongs to (path, user, route, tags).
    pub(crate) indexes: Vec<String>,
    /// The path and the registry it goes into, for glob patterns (responses only).
    pub(crate) path: Option<(String, String)>,
    /// Markers that must not have moved past `miss_seq`.
    pub(crate) markers: Vec<String>,
    /// The namespace's invalidation sequence when the miss began.
    pub(crate) miss_seq: u64,
    /// The sequence counter itself: a counter lower than `miss_seq` (Redis restarted empty,
    /// or evicted it) refuses the write.
    pub(crate) seq_key: String,
    /// When the miss began: past the marker TTL a race can no longer be detected.
    pub(crate) started: std::time::Instant,
    /// The set of the variants of the entry's path for its caller and route, and how many it
    /// may hold (responses only): a new variant past the bound is not written.
    pub(crate) variants: Option<Variants>,
}

/// Where a write's variant is counted, and the bound (`Policy::max_variants`).
pub(crate) struct Variants {
    pub(crate) key: String,
    pub(crate) max: u32,
}

/// What became of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// Stored and confirmed.
    Stored,
    /// An invalidation ran while the response was computed: withdrawn.
    Refused,
    /// Its path already has as many variants for its caller as the route allows: not
    /// written.
    TooManyVariants,
    /// Redis is (nearly) out of memory: entry writes are paused (see `MemoryGuard`).
    Paused,
}

/// An invalidation that failed part-way: how many entries it removed before it stopped
/// (they stay removed), and why it stopped.
#[derive(Debug)]
pub(crate) struct Incomplete {
    pub(crate) removed: u64,
    pub(crate) error: FredError,
}

impl From<FredError> for Incomplete {
    fn from(error: FredError) -> Self {
        Incomplete { removed: 0, error }
    }
}
