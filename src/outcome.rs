//! Outcomes of a request (hit, miss, bypass) and their `Cache-Status` / `X-Cache` rendering.

use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderName, HeaderValue};

/// The name this cache uses in the `Cache-Status` header (RFC 9211).
pub const CACHE_NAME: &str = "tower-redis-cache";

/// The `Cache-Status` response header (RFC 9211).
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// What the cache did with a request. Put in the response extensions by the layer, so an
/// outer layer (logging, metrics) can read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheStatus {
    /// Served from Redis; the inner service was not called.
    Hit,
    /// Served from the in-process near-cache ([`Policy::near`](crate::Policy)); neither
    /// Redis nor the inner service was asked.
    NearHit,
    /// Served with the response of a concurrent miss of the same key (request coalescing);
    /// the inner service was not called for this request.
    Collapsed,
    /// The inner service failed (5xx or error) and a stale entry answered instead
    /// ([`Policy::stale_if_error`](crate::Policy::stale_if_error)).
    Stale,
    /// A stale entry served while it is refreshed in the background
    /// ([`Policy::stale_while_revalidate`](crate::Policy::stale_while_revalidate)).
    Revalidating,
    /// Not in Redis (or the entry could not be used); the inner service answered.
    Miss,
    /// Redis could not be asked (error or deadline); the inner service answered. Clients
    /// see this as a miss.
    Unavailable,
    /// The cache was deliberately not used for this request.
    Bypass(BypassReason),
}

/// Why a GET or HEAD request did not use the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BypassReason {
    /// The route's policy is [`Policy::bypass`](crate::Policy::bypass).
    Route,
    /// A shared route got a request with `Authorization`.
    Authorization,
    /// A shared route got a request with `Cookie`.
    Cookie,
    /// A `Range` request.
    Range,
    /// A per-user route got a request without identity.
    NoIdentity,
    /// A shared route got a request with an identity (see
    /// [`Policy::shared_for_authenticated`](crate::Policy::shared_for_authenticated)).
    Identity,
    /// A GET or HEAD request with a body: the key does not hold bodies.
    Body,
    /// A shared route got a request with a credential-bearing header (see
    /// [`CacheLayer::credential_header`](crate::CacheLayer::credential_header)).
    Credential,
    /// A route that keys on the authority got a request that names two (two `Host`
    /// headers, or a `Host` other than the URI's authority).
    Authority,
    /// An opted-in gRPC call whose request is not one message within
    /// [`CacheLayer::grpc_max_request_size`](crate::CacheLayer::grpc_max_request_size)
    /// (or whose body failed).
    Message,
    /// An opted-in gRPC call whose request body type the layer cannot rebuild (see
    /// [`CacheLayer::grpc_method`](crate::CacheLayer::grpc_method)).
    BodyType,
}

impl BypassReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BypassReason::Route => "route",
            BypassReason::Authorization => "authorization",
            BypassReason::Cookie => "cookie",
            BypassReason::Range => "range",
            BypassReason::NoIdentity => "no-identity",
            BypassReason::Identity => "identity",
            BypassReason::Body => "body",
            BypassReason::Credential => "credential",
            BypassReason::Authority => "authority",
            BypassReason::Message => "grpc-message",
            BypassReason::BodyType => "body-type",
        }
    }
}

/// Why a response was not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotStored {
    Status,
    Handler,
    SetCookie,
    NoStore,
    Private,
    Vary,
    Headers,
    /// Shared-cache mode: a request with `Authorization`, and a response that does not
    /// allow shared caching of it.
    Authorization,
    /// Shared-cache mode: no freshness lifetime, or none left on arrival.
    Stale,
}

impl NotStored {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NotStored::Status => "status",
            NotStored::Handler => "handler",
            NotStored::SetCookie => "set-cookie",
            NotStored::NoStore => "no-store",
            NotStored::Private => "private",
            NotStored::Vary => "vary",
            NotStored::Headers => "too-many-headers",
            NotStored::Authorization => "authorization",
            NotStored::Stale => "stale",
        }
    }
}

/// Writes `Cache-Status` and the optional `X-Cache` header for an outcome. `ttl_secs` is the
/// remaining freshness of a hit.
pub(crate) fn set_headers(
    headers: &mut HeaderMap,
    status: CacheStatus,
    ttl_secs: u64,
    x_cache: Option<&HeaderName>,
) {
    let (cache_status, x) = match status {
        CacheStatus::Hit => (with_number(HIT_PREFIX, ttl_secs), "HIT"),
        CacheStatus::NearHit => (with_number(NEAR_HIT_PREFIX, ttl_secs), "HIT"),
        CacheStatus::Collapsed => (
            Some(HeaderValue::from_static(
                "tower-redis-cache; fwd=miss; collapsed",
            )),
            "HIT",
        ),
        CacheStatus::Revalidating => (
            Some(HeaderValue::from_static(
                "tower-redis-cache; hit; fwd=stale",
            )),
            "STALE",
        ),
        CacheStatus::Stale => (with_number(STALE_PREFIX, ttl_secs), "STALE"),
        CacheStatus::Miss | CacheStatus::Unavailable => (
            Some(HeaderValue::from_static("tower-redis-cache; fwd=miss")),
            "MISS",
        ),
        CacheStatus::Bypass(reason) => (
            HeaderValue::try_from(format!(
                "{CACHE_NAME}; fwd=bypass; detail={}",
                reason.as_str()
            ))
            .ok(),
            "BYPASS",
        ),
    };
    if let Some(v) = cache_status {
        headers.insert(CACHE_STATUS, v);
    }
    if let Some(name) = x_cache {
        headers.insert(name.clone(), HeaderValue::from_static(x));
    }
}

/// `Cache-Status` of a hit, before its TTL (starts with [`CACHE_NAME`]; a test checks).
const HIT_PREFIX: &str = "tower-redis-cache; hit; ttl=";
/// `Cache-Status` of a near-cache hit, before its TTL.
pub(crate) const NEAR_HIT_PREFIX: &str = "tower-redis-cache; hit; detail=near; ttl=";
/// `Cache-Status` of a stale-if-error answer, before its TTL.
const STALE_PREFIX: &str = "tower-redis-cache; fwd=stale; detail=stale-if-error; ttl=";

/// `prefix` then `n` in decimal, as a header value, in one allocation (`format!` and
/// `HeaderValue::from(u64)` take two each; this runs on every hit).
pub(crate) fn with_number(prefix: &str, n: u64) -> Option<HeaderValue> {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(n);
    let mut v = Vec::with_capacity(prefix.len() + digits.len());
    v.extend_from_slice(prefix.as_bytes());
    v.extend_from_slice(digits.as_bytes());
    // Exactly sized, so `Bytes` takes the vector over without another allocation.
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
}

/// Counters since the layer was built. Read them with
/// [`CacheHandle::stats`](crate::CacheHandle::stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Requests served from Redis.
    pub hits: u64,
    /// Requests served with a concurrent miss's response (coalescing).
    pub collapsed: u64,
    /// Requests answered with a stale entry because the inner service failed.
    pub stale_if_error: u64,
    /// Requests answered with a stale entry while it was refreshed.
    pub stale_while_revalidate: u64,
    /// Background refreshes started (stale-while-revalidate).
    pub refreshes: u64,
    /// Requests served from the near-cache (also counted in `hits`).
    pub near_hits: u64,
    /// Times the near-cache was emptied: an invalidation here or in another instance, or
    /// its subscription down.
    pub near_flushes: u64,
    /// Bytes held by the near-cache (bodies, headers and keys, approximately).
    pub near_bytes: u64,
    /// Coalesced misses whose client went away before the response was complete: the
    /// response was finished in the background so that the waiting requests get it.
    pub detached: u64,
    /// Responses not stored because their `Vary` names a header the route does not key on.
    pub vary_refused: u64,
    /// Requests looked up and not found (or found unusable).
    pub misses: u64,
    /// Requests that could not be looked up because of a Redis problem.
    pub unavailable: u64,
    /// GET/HEAD requests that did not use the cache.
    pub bypassed: u64,
    /// Entries written to Redis.
    pub stored: u64,
    /// Responses that could have been stored but were not: body too large, ended early,
    /// errored, or the client went away.
    pub abandoned: u64,
    /// Writes dropped because too many were pending.
    pub writes_dropped: u64,
    /// Writes that Redis refused or did not answer in time.
    pub write_errors: u64,
    /// Responses not stored because an invalidation of theirs ran while they were computed.
    pub refused: u64,
    /// Responses not stored because their path already has as many variants stored for that
    /// caller as the route allows ([`Policy::max_variants`](crate::Policy::max_variants)).
    pub variants_refused: u64,
    /// Responses not stored because Redis is nearly full and cannot evict (`noeviction`),
    /// or answered a write with out-of-memory: writes pause so that invalidations still run.
    pub writes_paused: u64,
    /// Stored values that could not be decoded (corrupt, foreign or another format version).
    pub undecodable: u64,
    /// How many times the circuit breaker has opened.
    pub breaker_opened: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) collapsed: AtomicU64,
    pub(crate) stale_if_error: AtomicU64,
    pub(crate) stale_while_revalidate: AtomicU64,
    pub(crate) refreshes: AtomicU64,
    pub(crate) detached: AtomicU64,
    pub(crate) vary_refused: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) unavailable: AtomicU64,
    pub(crate) bypassed: AtomicU64,
    pub(crate) stored: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    pub(crate) writes_dropped: AtomicU64,
    pub(crate) write_errors: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) variants_refused: AtomicU64,
    pub(crate) writes_paused: AtomicU64,
    pub(crate) undecodable: AtomicU64,
}

impl Counters {
    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            hits: r(&self.hits),
            collapsed: r(&self.collapsed),
            stale_if_error: r(&self.stale_if_error),
            stale_while_revalidate: r(&self.stale_while_revalidate),
            refreshes: r(&self.refreshes),
            detached: r(&self.detached),
            vary_refused: r(&self.vary_refused),
            misses: r(&self.misses),
            unavailable: r(&self.unavailable),
            bypassed: r(&self.bypassed),
            stored: r(&self.stored),
            abandoned: r(&self.abandoned),
            writes_dropped: r(&self.writes_dropped),
            write_errors: r(&self.write_errors),
            refused: r(&self.refused),
            variants_refused: r(&self.variants_refused),
            writes_paused: r(&self.writes_paused),
            undecodable: r(&self.undecodable),
            breaker_opened: 0,
            near_hits: 0,
            near_flushes: 0,
            near_bytes: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_values() {
        assert!(HIT_PREFIX.starts_with(CACHE_NAME) && STALE_PREFIX.starts_with(CACHE_NAME));
        let mut h = HeaderMap::new();
        let x = HeaderName::from_static("x-cache");
        set_headers(&mut h, CacheStatus::Hit, 42, Some(&x));
        assert_eq!(h[CACHE_STATUS], "tower-redis-cache; hit; ttl=42");
        assert_eq!(h[&x], "HIT");
        set_headers(&mut h, CacheStatus::Stale, 0, None);
        assert_eq!(
            h[CACHE_STATUS],
            "tower-redis-cache; fwd=stale; detail=stale-if-error; ttl=0"
        );
        assert_eq!(with_number("", u64::MAX).unwrap(), &u64::MAX.to_string());
    }
}
