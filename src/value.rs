//! The value cache: JSON values under keys of your own, and memoized async functions (the
//! Python utility's `set_cache` / `get_cache` / `delete_cache` and `@cached`).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::OnceCell;

use crate::engine::inflight::Inflight;
use crate::handle::{CacheError, CacheHandle};

/// The key of a cached value: a name, parts (escaped), and optionally the user it belongs
/// to, so that [`CacheHandle::invalidate_user`] removes it together with the user's cached
/// responses.
///
/// ```
/// use tower_redis_cache::ValueKey;
///
/// // The Python utility's `user_perms:{user_id}` and `menu_cache_key(user_id)`:
/// let perms = ValueKey::for_user("user_perms", "42");
/// let menu = ValueKey::for_user("menu", "42");
/// // Any other value, keyed by parts that may contain any character:
/// let prompt = ValueKey::new("prompt").part("welcome").part("en:v2");
/// # let _ = (perms, menu, prompt);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ValueKey {
    name: String,
    parts: Vec<String>,
    user: Option<String>,
}

impl ValueKey {
    /// A key named `name` (letters, digits, `_` and `-` are kept in the Redis key for
    /// readability; the rest only enters its hash).
    pub fn new(name: impl Into<String>) -> Self {
        ValueKey {
            name: name.into(),
            parts: Vec::new(),
            user: None,
        }
    }

    /// A key of one user's value, removed by [`CacheHandle::invalidate_user`].
    pub fn for_user(name: impl Into<String>, user: impl Into<String>) -> Self {
        Self::new(name).user(user)
    }

    /// Adds a part; parts are length-prefixed, so `("a:b")` and `("a", "b")` differ.
    pub fn part(mut self, part: impl fmt::Display) -> Self {
        self.parts.push(part.to_string());
        self
    }

    /// Ties the value to a user (an identity as the layer's `Identity` extracts it).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }
}

impl fmt::Debug for ValueKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValueKey")
            .field("name", &self.name)
            .field("parts", &self.parts.len())
            .field("user", &self.user.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A stored value: `"TRV"`, version 1, state (pending/confirmed, as for entries, at the same
/// offset so the same scripts confirm it), an 8-byte nonce, then the JSON.
const VALUE_MAGIC: &[u8; 4] = b"TRV\x01";
const VALUE_HEADER: usize = 4 + 1 + 8;

fn envelope(state: u8, nonce: [u8; 8], json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(VALUE_HEADER + json.len());
    out.extend_from_slice(VALUE_MAGIC);
    out.push(state);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(json);
    Bytes::from(out)
}

/// The JSON of a confirmed value; a pending, foreign or truncated value is none.
fn json_of(raw: &[u8]) -> Option<&[u8]> {
    (raw.len() >= VALUE_HEADER
        && raw.starts_with(VALUE_MAGIC)
        && raw[VALUE_MAGIC.len()] == crate::entry::CONFIRMED)
        .then(|| &raw[VALUE_HEADER..])
}

/// Forgets a computation when its caller is done or dropped (cancelled), so the map never
/// keeps keys nobody computes.
struct Forget<'a> {
    inflight: &'a Inflight,
    key: &'a str,
    cell: Arc<OnceCell<Bytes>>,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.inflight.done(self.key, &self.cell);
    }
}

impl CacheHandle {
    fn value_key(&self, key: &ValueKey) -> (String, Vec<String>) {
        let keyer = self.keyer();
        let label: String = key
            .name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
            .take(32)
            .collect();
        let mut h = blake3::Hasher::new();
        for part in std::iter::once(&key.name).chain(&key.parts) {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let scope = match &key.user {
            Some(u) => format!("u{}", keyer.identity_hash(u.as_bytes())),
            None => "s".to_owned(),
        };
        let hash = h.finalize().to_hex();
        let redis_key = format!("{}:val:{label}:{scope}:{}", keyer.namespace(), &hash[..32]);
        let indexes = key
            .user
            .iter()
            .map(|u| keyer.user_index(u.as_bytes()))
            .collect();
        (redis_key, indexes)
    }

    /// Stores `value` as JSON for `ttl`.
    pub async fn set_json<T: Serialize + ?Sized>(
        &self,
        key: &ValueKey,
        value: &T,
        ttl: Duration,
    ) -> Result<(), CacheError> {
        let json = serde_json::to_vec(value).map_err(CacheError::serialize)?;
        let (redis_key, indexes) = self.value_key(key);
        let value = envelope(crate::entry::CONFIRMED, [0; 8], &json);
        self.store()
            .set_value(&redis_key, value, ttl, &indexes)
            .await
            .map_err(CacheError::from)
    }

    /// The value stored under `key`, if any. A value that no longer deserializes into `T`
    /// (its type changed between deploys) is `None`, not an error; the next `set_json`
    /// replaces it.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        key: &ValueKey,
    ) -> Result<Option<T>, CacheError> {
        let (redis_key, _) = self.value_key(key);
        let raw = self.store().get_value(&redis_key).await?;
        Ok(raw.and_then(|raw| json_of(&raw).and_then(|json| decode(&redis_key, json))))
    }

    /// Removes the value under `key`; returns how many values were removed (0 or 1).
    pub async fn delete(&self, key: &ValueKey) -> Result<u64, CacheError> {
        let (redis_key, _) = self.value_key(key);
        self.store()
            .unlink(vec![redis_key])
            .await
            .map_err(CacheError::from)
    }

    /// The value under `key`, or else the result of `compute`, stored for `ttl`: the
    /// `@cached(ttl)` of the Python utility, for any async function.
    ///
    /// - Concurrent callers of the same key in this process share one run of `compute`;
    ///   the others wait for its result.
    /// - An error from `compute` is returned to its caller and not cached (a waiting caller
    ///   then runs its own `compute`).
    /// - A Redis problem is never an error: the function runs, uncached.
    /// - Race-safe like responses: a value computed while an invalidation of its user (or of
    ///   the namespace) ran is returned to its caller but not stored, and a caller that
    ///   arrives after such an invalidation does not join the computation that began before.
    /// - The value is written in the background: a call right after may compute again.
    ///
    /// Two things to know: when the computation fails, the callers waiting on it retry one
    /// after another (each with its own `compute`), not all at once; and `compute` must not
    /// call `get_or_insert_json` with the same key (it would wait for itself).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_redis_cache::{CacheHandle, ValueKey};
    ///
    /// async fn permissions(cache: &CacheHandle, user: u64) -> Result<Vec<String>, String> {
    ///     cache
    ///         .get_or_insert_json(&ValueKey::for_user("user_perms", user.to_string()), Duration::from_secs(600), || async {
    ///             // the database query
    ///             Ok(vec!["read".to_owned()])
    ///         })
    ///         .await
    /// }
    /// ```
    pub async fn get_or_insert_json<T, E, F, Fut>(
        &self,
        key: &ValueKey,
        ttl: Duration,
        compute: F,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (redis_key, indexes) = self.value_key(key);
        let store = self.store();
        let keyer = self.keyer();
        let started = std::time::Instant::now();
        // Within the lookup deadline and behind the circuit breaker, like a response lookup.
        match store.get(&redis_key).await {
            Ok(Some(raw)) => {
                if let Some(v) = json_of(&raw).and_then(|json| decode(&redis_key, json)) {
                    return Ok(v);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e.details(), "value cache unavailable; computing"),
        }
        // The invalidation sequence before computing: the result is stored only if no
        // invalidation of its user ran meanwhile (as for responses).
        let seq = store
            .read_seq(keyer.seq_key(), store.lookup_timeout())
            .await
            .ok();
        let inflight = &self.runtime().inflight;
        let cell = inflight.cell(&redis_key, seq);
        let _forget = Forget {
            inflight,
            key: &redis_key,
            cell: Arc::clone(&cell),
        };
        // Kept outside the shared computation so that a caller whose computation did not run
        // can still run it (when the leader's value could not be shared).
        let mut compute = Some(compute);
        let mut own: Option<T> = None;
        let shared = cell
            .get_or_try_init(|| async {
                let Some(compute) = compute.take() else {
                    // Runs at most once per caller, and `compute` starts as `Some`.
                    return Ok(Bytes::new());
                };
                let value = compute().await?;
                let json = match serde_json::to_vec(&value) {
                    Ok(json) => Bytes::from(json),
                    Err(e) => {
                        tracing::warn!(error = %e, "value does not serialize to JSON; not cached");
                        Bytes::new()
                    }
                };
                if let (false, Some(miss_seq)) = (json.is_empty(), seq) {
                    self.store_computed(&redis_key, &json, ttl, indexes, miss_seq, started);
                }
                own = Some(value);
                Ok(json)
            })
            .await
            .cloned();
        let shared = shared?;
        if let Some(v) = own {
            return Ok(v);
        }
        if let Some(v) = decode(&redis_key, &shared) {
            return Ok(v);
        }
        // The leader's value could not be shared: compute our own, uncached. (`compute` is
        // gone only if our own computation ran, and then it returned above: with its value
        // in `own`, or with its error.)
        let Some(compute) = compute.take() else {
            unreachable!("a computation that ran left its value or its error")
        };
        compute().await
    }

    /// Writes a computed value in the background (under the bound on pending writes), with
    /// the race-safe protocol of responses: pending, indexed, checked against the markers of
    /// its user and the namespace, then confirmed or withdrawn.
    fn store_computed(
        &self,
        redis_key: &str,
        json: &[u8],
        ttl: Duration,
        indexes: Vec<String>,
        miss_seq: u64,
        started: std::time::Instant,
    ) {
        let runtime = self.runtime();
        let Ok(permit) = Arc::clone(&runtime.writes).try_acquire_owned() else {
            crate::outcome::Counters::incr(&runtime.counters.writes_dropped);
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let keyer = self.keyer();
        let nonce = crate::entry::nonce_now();
        let mut markers: Vec<String> = indexes.iter().map(|i| keyer.marker_of(i)).collect();
        markers.push(keyer.all_marker());
        let write = crate::store::Write {
            key: redis_key.to_owned(),
            value: envelope(crate::entry::PENDING, nonce, json),
            nonce,
            ttl,
            indexes,
            path: None,
            markers,
            miss_seq,
            seq_key: keyer.seq_key().to_owned(),
            started,
            variants: None,
        };
        let handle = self.clone();
        rt.spawn(async move {
            let counters = &handle.runtime().counters;
            match handle.store().write(write).await {
                Ok(crate::store::Written::Stored) => {
                    crate::outcome::Counters::incr(&counters.stored)
                }
                Ok(crate::store::Written::Refused) => {
                    crate::outcome::Counters::incr(&counters.refused)
                }
                // Values are not bounded by variants.
                Ok(crate::store::Written::TooManyVariants) => {
                    crate::outcome::Counters::incr(&counters.variants_refused)
                }
                Ok(crate::store::Written::Paused) => {
                    crate::outcome::Counters::incr(&counters.writes_paused)
                }
                Err(e) => {
                    crate::outcome::Counters::incr(&counters.write_errors);
                    tracing::debug!(error = %e.details(), "value not cached");
                }
            }
            drop(permit);
        });
    }
}

/// Deserializes a value's JSON; a value of another shape is a miss.
fn decode<T: DeserializeOwned>(key: &str, raw: &[u8]) -> Option<T> {
    if raw.is_empty() {
        return None;
    }
    match serde_json::from_slice(raw) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::debug!(key, error = %e, "cached value does not fit the type asked for; treated as a miss");
            None
        }
    }
}
