//! The near-cache: an in-process tier (moka) in front of Redis, for routes that opt in with
//! [`Policy::near`](crate::Policy::near).
//!
//! Coherence, in three parts:
//! - every invalidation made through a [`CacheHandle`](crate::CacheHandle) flushes this
//!   process's tier and publishes a message on the namespace's channel (`<ns>:near`); every
//!   instance subscribed to it flushes its own tier when the message arrives;
//! - the tier is used only while the subscription is up: when its connection drops (or has
//!   not come up yet), the tier is flushed and bypassed until the subscription is back;
//! - an entry lives in the tier for at most the route's bound and never past its freshness in
//!   Redis, so an entry replaced in Redis by another instance is not served beyond the bound.
//!
//! An entry read from Redis before an invalidation but inserted after the flush would survive
//! it; an epoch, bumped by every flush and checked after every insert, removes it.
//!
//! A flush drops every entry of the tier, whatever was invalidated: invalidations are rare
//! next to hits, and the cost is one Redis read per entry afterwards.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::types::ClientState;
use moka::sync::Cache;

use crate::entry::Entry;
use crate::entry::Ready;
use crate::outcome::{set_headers, with_number, CacheStatus, CACHE_STATUS, NEAR_HIT_PREFIX};
use crate::store::redis::RedisStore;

/// The default size of the tier: 64 MiB of bodies and headers.
pub(crate) const DEFAULT_NEAR_CAPACITY: u64 = 64 * 1024 * 1024;

/// An entry and how long it may stay in the tier, with the head of the response a hit
/// sends, ready but for `Age` and `Cache-Status` (replaced in place on each hit, so cloning
/// the template is the only work on the headers).
pub(crate) struct Held {
    entry: Entry,
    /// The stored headers without the internal ones, then `Content-Length` (without
    /// trailers), `Age`, `Cache-Status` and the layer's `X-Cache` header.
    head: http::HeaderMap,
    ttl: Duration,
}

impl Held {
    /// A copy of the entry (for the paths that need one: conditional requests).
    pub(crate) fn entry(&self) -> Entry {
        self.entry.clone()
    }

    /// The response of a near hit at `now_ms` (headers only for HEAD).
    pub(crate) fn respond(&self, head: bool, now_ms: u64) -> Ready {
        let e = &self.entry;
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = e.status;
        parts.headers = self.head.clone();
        let age_secs = now_ms.saturating_sub(e.stored_at_ms) / 1000;
        let ttl_secs = e
            .stored_at_ms
            .saturating_add(e.ttl_ms)
            .saturating_sub(now_ms)
            / 1000;
        // The template holds one `Age` and one `Cache-Status`: replaced where they are,
        // without hashing their names again.
        let mut age = with_number("", age_secs);
        let mut status = with_number(NEAR_HIT_PREFIX, ttl_secs);
        for (name, value) in parts.headers.iter_mut() {
            let new = if name == http::header::AGE {
                age.take()
            } else if name == CACHE_STATUS {
                status.take()
            } else {
                None
            };
            if let Some(new) = new {
                *value = new;
            }
        }
        parts.extensions.insert(CacheStatus::NearHit);
        let (body, trailers) = if head {
            (None, None)
        } else {
            (Some(e.body.clone()), e.trailers.clone())
        };
        Ready {
            parts,
            body,
            trailers,
        }
    }
}

/// The head of a near hit, built once per entry (see `Held`).
fn template(entry: &Entry, x_cache: Option<&http::HeaderName>) -> http::HeaderMap {
    let mut head = http::HeaderMap::with_capacity(entry.headers.len() + 4);
    for (name, value) in &entry.headers {
        if name != crate::policy::VARY_FINGERPRINT {
            head.append(name.clone(), value.clone());
        }
    }
    if entry.trailers.is_none() {
        // With trailers, HTTP/1.1 needs chunked framing: no length.
        if let Some(len) = with_number("", entry.body.len() as u64) {
            head.insert(http::header::CONTENT_LENGTH, len);
        }
    }
    head.insert(http::header::AGE, http::HeaderValue::from_static("0"));
    set_headers(&mut head, CacheStatus::NearHit, 0, x_cache);
    head
}

struct HeldExpiry;

impl moka::Expiry<String, Arc<Held>> for HeldExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<Held>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The near tier of one layer (shared by its clones).
pub(crate) struct Near {
    cache: Cache<String, Arc<Held>>,
    /// Bumped by every flush.
    epoch: AtomicU64,
    /// Whether the subscription is up (the tier is used only then).
    live: Arc<AtomicBool>,
    /// The subscription task, started on first use.
    started: OnceLock<()>,
    channel: String,
    pub(crate) hits: AtomicU64,
    pub(crate) flushes: AtomicU64,
}

impl std::fmt::Debug for Near {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Near")
            .field("channel", &self.channel)
            .field("live", &self.live.load(Ordering::Relaxed))
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl Near {
    pub(crate) fn new(capacity: u64, channel: String) -> Self {
        let cache = Cache::builder()
            .max_capacity(capacity)
            .weigher(|key: &String, held: &Arc<Held>| {
                let e = &held.entry;
                let headers: usize = e
                    .headers
                    .iter()
                    .map(|(n, v)| n.as_str().len() + v.len() + 16)
                    .sum();
                let size = key.len() + e.body.len() + headers + 128;
                u32::try_from(size).unwrap_or(u32::MAX)
            })
            .expire_after(HeldExpiry)
            .build();
        Near {
            cache,
            epoch: AtomicU64::new(0),
            live: Arc::new(AtomicBool::new(false)),
            started: OnceLock::new(),
            channel,
            hits: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    /// Whether the tier may be used now; starts the subscription on first call.
    pub(crate) fn usable(self: &Arc<Self>, store: &RedisStore) -> bool {
        if self.live.load(Ordering::Acquire) {
            return true;
        }
        self.started.get_or_init(|| self.start(store));
        false
    }

    /// A fresh entry of `key`, if the tier holds one.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<Held>> {
        let held = self.cache.get(key)?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(held)
    }

    /// The epoch to pass to [`insert`](Self::insert), read before the Redis lookup.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Keeps a copy of an entry read from Redis (at `epoch`) for at most `ttl`; its hits
    /// carry `x_cache` (the layer's `X-Cache` header) too.
    pub(crate) fn insert(
        &self,
        key: &str,
        entry: &Entry,
        ttl: Duration,
        epoch: u64,
        x_cache: Option<&http::HeaderName>,
    ) {
        if ttl.is_zero() || !self.live.load(Ordering::Acquire) || self.epoch() != epoch {
            return;
        }
        let entry = owned(entry);
        let head = template(&entry, x_cache);
        self.cache
            .insert(key.to_owned(), Arc::new(Held { entry, head, ttl }));
        // A flush that ran meanwhile may have missed the insert: undo it.
        if self.epoch() != epoch || !self.live.load(Ordering::Acquire) {
            self.cache.invalidate(key);
        }
    }

    /// Drops every entry.
    pub(crate) fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.cache.invalidate_all();
    }

    /// After an invalidation through the handle: flush here, and tell the other instances.
    pub(crate) async fn invalidated(&self, store: &RedisStore) {
        self.flush();
        if let Err(e) = store.publish(&self.channel, "flush").await {
            tracing::warn!(channel = %self.channel, error = %e.details(), "could not tell other instances to flush their near-caches; they may serve invalidated entries until the near bound");
        }
    }

    /// Entries and weighted bytes held now.
    pub(crate) fn size(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.entry_count(), self.cache.weighted_size())
    }

    fn start(self: &Arc<Self>, store: &RedisStore) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let subscriber = match store.subscriber() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e.details(), "near-cache subscription could not be set up; the near-cache stays off");
                return;
            }
        };
        // The task holds only a weak reference: it ends when the layer is gone.
        let near = Arc::downgrade(self);
        rt.spawn(subscribe(subscriber, near));
    }
}

/// A copy of the entry that owns its bytes. A decoded entry's body and header values are
/// slices of the Redis reply, which may share a larger read buffer: kept for seconds, such a
/// slice would keep that whole buffer alive, and the tier would hold far more than it weighs.
fn owned(entry: &Entry) -> Entry {
    let copy = |map: &http::HeaderMap| {
        let mut out = http::HeaderMap::with_capacity(map.len());
        for (name, value) in map {
            let value =
                http::HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            out.append(name.clone(), value);
        }
        out
    };
    Entry {
        headers: copy(&entry.headers),
        trailers: entry.trailers.as_ref().map(copy),
        body: bytes::Bytes::copy_from_slice(&entry.body),
        ..*entry
    }
}

/// Keeps the subscription and the tier's `live` flag in step with the connection.
async fn subscribe(subscriber: SubscriberClient, near: std::sync::Weak<Near>) {
    let Some(channel) = near.upgrade().map(|n| n.channel.clone()) else {
        return;
    };
    let mut messages = subscriber.message_rx();
    let mut reconnects = subscriber.reconnect_rx();
    let mut errors = subscriber.error_rx();
    let _connection = subscriber.connect();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut subscribed = false;
    loop {
        let Some(n) = near.upgrade() else {
            break;
        };
        let connected = subscriber.state() == ClientState::Connected;
        if !connected || !subscribed {
            if n.live.swap(false, Ordering::AcqRel) {
                tracing::warn!(channel = %channel, "near-cache subscription lost; near-cache flushed and bypassed until it is back");
            }
            n.flush();
        }
        if connected && !subscribed {
            subscribed = subscriber.subscribe(channel.as_str()).await.is_ok();
            if subscribed {
                // Whatever was published while down is lost: start empty.
                n.flush();
                n.live.store(true, Ordering::Release);
                tracing::info!(channel = %channel, "near-cache subscription up");
            }
        }
        drop(n);
        tokio::select! {
            m = messages.recv() => {
                // A message, or messages lost (lagged): flush either way.
                if let Some(n) = near.upgrade() {
                    n.flush();
                }
                if matches!(m, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    break;
                }
            }
            _ = reconnects.recv() => subscribed = false,
            _ = errors.recv() => subscribed = false,
            _ = tick.tick() => {}
        }
    }
    let _ = subscriber.quit().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: &'static [u8]) -> Entry {
        Entry {
            status: http::StatusCode::OK,
            headers: http::HeaderMap::new(),
            trailers: None,
            body: bytes::Bytes::from_static(body),
            stored_at_ms: 0,
            ttl_ms: 0,
            swr_ms: 0,
            sie_ms: 0,
            delta_ms: 0,
            confirmed: true,
        }
    }

    fn live_near() -> Near {
        let near = Near::new(1 << 20, "t:near".into());
        near.live.store(true, Ordering::Release);
        near
    }

    #[test]
    fn entries_leave_at_their_bound() {
        let near = live_near();
        near.insert(
            "k",
            &entry(b"v"),
            Duration::from_millis(50),
            near.epoch(),
            None,
        );
        assert_eq!(
            near.get("k").map(|e| e.entry().body),
            Some(bytes::Bytes::from_static(b"v"))
        );
        // Past the bound (whatever the scheduling, it can only be later).
        std::thread::sleep(Duration::from_millis(100));
        assert!(near.get("k").is_none());
    }

    #[test]
    fn an_entry_read_before_a_flush_is_not_kept_after_it() {
        let near = live_near();
        let epoch = near.epoch();
        near.flush();
        near.insert("k", &entry(b"old"), Duration::from_secs(60), epoch, None);
        assert!(near.get("k").is_none());
        near.insert(
            "k",
            &entry(b"new"),
            Duration::from_secs(60),
            near.epoch(),
            None,
        );
        assert!(near.get("k").is_some());
    }

    #[test]
    fn a_near_hit_carries_the_headers_of_a_hit() {
        let near = live_near();
        let mut e = entry(b"hello");
        e.stored_at_ms = 1_000_000;
        e.ttl_ms = 60_000;
        e.headers
            .insert(http::header::CONTENT_TYPE, "text/plain".parse().unwrap());
        e.headers
            .insert(crate::policy::VARY_FINGERPRINT, "abc".parse().unwrap());
        let x_cache = http::HeaderName::from_static("x-cache");
        near.insert(
            "k",
            &e,
            Duration::from_secs(60),
            near.epoch(),
            Some(&x_cache),
        );
        let held = near.get("k").unwrap();
        // 12.5 s after it was stored: Age 12, 47 s left.
        let ready = held.respond(false, 1_012_500);
        let h = &ready.parts.headers;
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h["content-length"], "5");
        assert_eq!(h["age"], "12");
        assert_eq!(
            h["cache-status"],
            "tower-redis-cache; hit; detail=near; ttl=47"
        );
        assert_eq!(h["x-cache"], "HIT");
        assert!(!h.contains_key(crate::policy::VARY_FINGERPRINT));
        assert_eq!(h.len(), 5);
        assert_eq!(
            ready.parts.extensions.get::<CacheStatus>(),
            Some(&CacheStatus::NearHit)
        );
        assert_eq!(ready.body.as_deref(), Some(&b"hello"[..]));
        // HEAD: the same head, no body.
        let head = held.respond(true, 1_012_500);
        assert_eq!(head.parts.headers["content-length"], "5");
        assert!(head.body.is_none());
    }

    #[test]
    fn nothing_is_kept_while_the_subscription_is_down() {
        let near = live_near();
        near.live.store(false, Ordering::Release);
        near.insert(
            "k",
            &entry(b"v"),
            Duration::from_secs(60),
            near.epoch(),
            None,
        );
        assert!(near.get("k").is_none());
    }
}
