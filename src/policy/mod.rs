//! What may be cached and for how long. Pure functions: no I/O, time passed in.

use std::time::Duration;

use http::{header, HeaderMap, HeaderName, Method, StatusCode};

use crate::outcome::{BypassReason, NotStored};

pub(crate) mod grpc;
mod shared_cache;
pub(crate) use shared_cache::{storage, SharedRequest, VARY_FINGERPRINT};

/// How long a coalesced miss waits for the one in flight, by default.
pub const DEFAULT_COALESCE_WAIT: Duration = Duration::from_secs(5);

/// The default limit on a cached body: 1 MiB.
pub const DEFAULT_MAX_BODY_SIZE: usize = 1024 * 1024;

/// The default bound on the variants of one path kept for one caller: 1,000 (see
/// [`Policy::max_variants`]).
pub const DEFAULT_MAX_VARIANTS: u32 = 1000;

/// The response header through which a handler changes the TTL of one response, or skips
/// caching it. The layer strips it before the response leaves.
///
/// Its value is a whole number of seconds (`x-cache-ttl: 30`); `0` or `skip` means "do not
/// store this response". Any other value also means "do not store" and is logged, so a typo
/// never caches something for longer than intended.
pub const TTL_OVERRIDE_HEADER: HeaderName = HeaderName::from_static("x-cache-ttl");

/// Whether entries of a route are shared between callers or kept per caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// One entry for everybody. Requests with `Authorization` or `Cookie` are bypassed.
    Shared,
    /// One entry for everybody, even for requests with `Authorization` or `Cookie`.
    SharedForAuthenticated,
    /// One entry per caller identity; requests without identity are not cached.
    PerUser,
}

/// How the layer caches one route (or every route without a policy of its own).
///
/// ```
/// use std::time::Duration;
/// use http::{header, StatusCode};
/// use tower_redis_cache::Policy;
///
/// // One entry per user for 10 minutes, 404s kept for 30 s.
/// let perms = Policy::per_user(Duration::from_secs(600))
///     .status(StatusCode::NOT_FOUND, Duration::from_secs(30));
/// // One entry for everybody, a variant per `Accept-Language`.
/// let roles = Policy::shared(Duration::from_secs(3600)).key_header(header::ACCEPT_LANGUAGE);
/// # let _ = (perms, roles);
/// ```
#[derive(Clone, Debug)]
pub struct Policy {
    pub(crate) enabled: bool,
    pub(crate) ttl: Duration,
    pub(crate) scope: Scope,
    pub(crate) key_headers: Vec<HeaderName>,
    pub(crate) status_ttls: Vec<(StatusCode, Duration)>,
    pub(crate) max_body_size: usize,
    /// Entries kept at once per route, caller and path (query strings, keyed headers).
    pub(crate) max_variants: u32,
    pub(crate) tags: Vec<String>,
    /// When set, the response's own freshness sets the TTL, clamped to this range.
    pub(crate) ttl_from_response: Option<(Duration, Duration)>,
    pub(crate) etag: bool,
    /// How long a concurrent miss waits for the one in flight (`None`: no coalescing).
    pub(crate) coalesce: Option<Duration>,
    /// How long past its freshness an entry is kept to answer when the inner service fails.
    pub(crate) stale_if_error: Option<Duration>,
    /// How long past its freshness an entry is served at once while it is refreshed.
    pub(crate) stale_while_revalidate: Option<Duration>,
    /// Whether the response's own stale directives apply (`None`: on all but per-user routes).
    pub(crate) stale_from_response: Option<bool>,
    /// A Redis lock so that one instance of many computes a miss.
    pub(crate) lock: Option<Duration>,
    /// XFetch's beta: refresh hot entries early, with a probability rising near expiry.
    pub(crate) early_refresh: Option<f64>,
    /// How long an entry may be kept in the in-process near-cache.
    #[cfg_attr(not(feature = "near"), allow(dead_code))]
    pub(crate) near: Option<Duration>,
    /// Shared-cache mode (RFC 9111): the origin's headers decide; `ttl` is the upper bound.
    pub(crate) http_shared: bool,
}

impl Policy {
    fn new(ttl: Duration, scope: Scope) -> Self {
        Policy {
            enabled: true,
            ttl,
            scope,
            key_headers: Vec::new(),
            status_ttls: Vec::new(),
            max_body_size: DEFAULT_MAX_BODY_SIZE,
            max_variants: DEFAULT_MAX_VARIANTS,
            tags: Vec::new(),
            ttl_from_response: None,
            etag: true,
            coalesce: Some(DEFAULT_COALESCE_WAIT),
            stale_if_error: None,
            stale_while_revalidate: None,
            stale_from_response: None,
            lock: None,
            early_refresh: None,
            near: None,
            http_shared: false,
        }
    }

    /// One entry for every caller, kept for `ttl`.
    ///
    /// Requests that carry `Authorization` or `Cookie` are not served from nor stored in a
    /// shared entry (see [`shared_for_authenticated`](Self::shared_for_authenticated)).
    /// A `ttl` below one millisecond stores nothing.
    pub fn shared(ttl: Duration) -> Self {
        Self::new(ttl, Scope::Shared)
    }

    /// One entry per caller identity, kept for `ttl`.
    ///
    /// The identity comes from the layer's [`Identity`](crate::Identity) and goes into the
    /// key hashed. A request without an identity is passed through, never cached.
    pub fn per_user(ttl: Duration) -> Self {
        Self::new(ttl, Scope::PerUser)
    }

    /// A shared HTTP cache as [RFC 9111](https://www.rfc-editor.org/rfc/rfc9111) describes
    /// it, for routes (or a whole reverse proxy) whose responses say themselves whether and
    /// how long they may be cached. `max_ttl` bounds how long any response stays fresh here.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_redis_cache::Policy;
    ///
    /// // Whatever the origin allows, for at most a day; a variant per Accept-Encoding.
    /// let policy = Policy::http_shared(Duration::from_secs(86_400))
    ///     .key_header(http::header::ACCEPT_ENCODING);
    /// # let _ = policy;
    /// ```
    ///
    /// **What is stored.** A response to a GET is stored when all of these hold:
    /// - its status is final and not 206 or 304; with `must-understand`, a status this
    ///   crate knows;
    /// - it has no `Set-Cookie` (never stored, in every mode), and its `Cache-Control` has
    ///   no `no-store`, no `private` (in any form) and no `no-cache` (in any form: such a
    ///   response would have to be revalidated on every use, so it is simply not stored);
    /// - the request had no `Cache-Control: no-store`;
    /// - if the request had `Authorization`: the response says `public`, `s-maxage` or
    ///   `must-revalidate` (RFC 9111 §3.5);
    /// - its `Vary` is not `*`;
    /// - it is still fresh on arrival, by its freshness lifetime: `s-maxage`, else
    ///   `max-age`, else `Expires` minus `Date` (an invalid `Expires` is in the past); and
    ///   without any of them, for statuses that are heuristically cacheable (200, 203, 204,
    ///   300, 301, 308, 404, 405, 410, 414, 501) or responses marked `public`, a heuristic
    ///   of 10 % of the time since `Last-Modified` (at most a day). A response with none of
    ///   these is not stored.
    ///
    /// **How long.** The response's current age on arrival (the larger of its `Age` plus
    /// the time the inner service took, and `Date` to now) is taken off its freshness
    /// lifetime, and what is left is bounded by `max_ttl` (and by a handler's
    /// [`CacheOverride`] or `x-cache-ttl`, which can only shorten it or skip the response).
    /// Hits carry an `Age` counted from the origin's, so that caches downstream see the
    /// true age; the layer adds no `Cache-Control` of its own.
    ///
    /// **What is reused.** A stored response answers a request only if:
    /// - the request's headers named by the stored response's `Vary` have the same values
    ///   as those of the request it was stored for (a hash of them is stored, never the
    ///   values). One variant is kept per key: a request of another variant is a miss and
    ///   its response replaces the stored one (and concurrent misses of another variant
    ///   than the one in flight do not wait for it). Key on a header with [`key_header`]
    ///   (`Accept-Encoding` behind no compression layer, say) to keep a variant per value;
    /// - with `Authorization` on the request, the stored response says `public`,
    ///   `s-maxage` or `must-revalidate`;
    /// - the request has no `Cache-Control: no-cache` (nor `Pragma: no-cache` without
    ///   `Cache-Control`), and its `max-age`, if any, is not below the stored response's
    ///   age. Such requests go to the inner service, and its response is stored as for a
    ///   miss. Other request directives (`max-stale`, `min-fresh`, `only-if-cached`) are
    ///   advisory (RFC 9111 §5.2.1) and ignored.
    ///
    /// **Stale responses.** The route's [`stale_while_revalidate`] and [`stale_if_error`]
    /// windows are configuration (RFC 9111 §4.2.4) and do not apply to responses with
    /// `s-maxage`, `must-revalidate` or `proxy-revalidate`. The response's own
    /// `stale-while-revalidate` and `stale-if-error` directives apply, except with
    /// `must-revalidate` or `proxy-revalidate`.
    ///
    /// **Requests.** `Range` requests and GETs with a body pass through, as on every route;
    /// so do requests with `Cookie`, which RFC 9111 leaves to the origin but many origins
    /// personalise without saying so: declare the route
    /// [`shared_for_authenticated`](Self::shared_for_authenticated) if your origin marks
    /// such responses `private` or `Vary: Cookie`. `Authorization` follows the rules above.
    ///
    /// [`key_header`], `max_body_size`, `tag`, `etag`, `coalesce`, `lock_across_instances`
    /// and `early_refresh` apply as on other routes; [`status`](Self::status) and
    /// [`ttl_from_response`](Self::ttl_from_response) do not (the response decides).
    ///
    /// [`key_header`]: Self::key_header
    /// [`stale_while_revalidate`]: Self::stale_while_revalidate
    /// [`stale_if_error`]: Self::stale_if_error
    pub fn http_shared(max_ttl: Duration) -> Self {
        Policy {
            http_shared: true,
            ..Self::new(max_ttl, Scope::Shared)
        }
    }

    /// Never cache: requests pass through (marked `BYPASS`).
    pub fn bypass() -> Self {
        Policy {
            enabled: false,
            ..Self::new(Duration::ZERO, Scope::Shared)
        }
    }

    /// Declares a shared route's response the same for every caller, authenticated or not,
    /// so that requests with `Authorization` or `Cookie` are cached too.
    ///
    /// **Only use this when the handler ignores who is calling.** Otherwise one user's
    /// response is served to everybody. Has no effect on per-user policies.
    pub fn shared_for_authenticated(mut self) -> Self {
        if self.scope == Scope::Shared {
            self.scope = Scope::SharedForAuthenticated;
        }
        self
    }

    /// Keys entries on the values of a request header as well (for example
    /// `Accept-Language`), so that each value gets its own entry. A response whose `Vary`
    /// names a header that is not keyed is not stored.
    ///
    /// `Host` means the request's authority, the same over HTTP/1.1 and HTTP/2 (which has
    /// no `Host` header: the authority travels in the URI): the URI's authority, else the
    /// `Host` header, compared without case. A request that names two authorities (two
    /// `Host` headers, or a `Host` other than the URI's authority) is not cached
    /// (`BYPASS`, detail `authority`), since the handler could read either one. Key on it
    /// whenever a handler's response depends on the host: several tenants on one router,
    /// or absolute links built from the host.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_redis_cache::Policy;
    ///
    /// let per_tenant = Policy::shared(Duration::from_secs(60)).key_header(http::header::HOST);
    /// # let _ = per_tenant;
    /// ```
    pub fn key_header(mut self, name: HeaderName) -> Self {
        if !self.key_headers.contains(&name) {
            self.key_headers.push(name);
        }
        self
    }

    /// Also stores responses with this status (by default only 2xx other than 206 are),
    /// with their own, usually short, time to live. 206 and 304 are never stored.
    pub fn status(mut self, status: StatusCode, ttl: Duration) -> Self {
        self.status_ttls.retain(|(s, _)| *s != status);
        self.status_ttls.push((status, ttl));
        self
    }

    /// The largest body that is stored, in bytes (default 1 MiB). A larger body streams to
    /// the client untouched and is not stored.
    pub fn max_body_size(mut self, bytes: usize) -> Self {
        self.max_body_size = bytes;
        self
    }

    /// The most entries kept at once for one path of the route and one caller (default
    /// [`DEFAULT_MAX_VARIANTS`]): its query strings times its keyed-header variants (times
    /// its request messages, for gRPC). Every unique query string is an entry, so without a
    /// bound a client sending `?q=1`, `?q=2`... grows the store and its indexes without end.
    ///
    /// Past the bound, responses of new variants are served but not stored (counted in
    /// [`Stats::variants_refused`](crate::Stats::variants_refused)) until variants expire or
    /// the path is invalidated; variants already stored are refreshed as usual. Shared
    /// routes count one caller (everybody), per-user routes one per identity. `0` counts as
    /// `1`.
    pub fn max_variants(mut self, n: u32) -> Self {
        self.max_variants = n.max(1);
        self
    }

    /// Tags every entry of the route, for
    /// [`CacheHandle::invalidate_tag`](crate::CacheHandle::invalidate_tag). Handlers add
    /// tags of their own with a `Cache-Tag` or `Surrogate-Key` response header.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        let tag = tag.into();
        if !tag.is_empty() && !self.tags.contains(&tag) {
            self.tags.push(tag);
        }
        self
    }

    /// Shared, and not declared the same for authenticated callers.
    /// Lets the response's own headers set the TTL, clamped to `min..=max`: `s-maxage` (on
    /// shared routes), then `max-age`, then `Expires` (against `Date`). Without them the
    /// route's TTL applies; `max-age=0` (or an `Expires` in the past) stores nothing.
    pub fn ttl_from_response(mut self, min: Duration, max: Duration) -> Self {
        self.ttl_from_response = Some((min.min(max), max.max(min)));
        self
    }

    /// Whether hits carry a strong `ETag` (computed from the body when the handler set none)
    /// and answer `If-None-Match` / `If-Modified-Since` with `304 Not Modified`. On by
    /// default.
    pub fn etag(mut self, on: bool) -> Self {
        self.etag = on;
        self
    }

    /// Request coalescing: concurrent misses of one key in this process make one call to the
    /// inner service, and the others wait up to `wait` for its response. A response that
    /// turns out not storable (private, `Set-Cookie`, an error status, too large, cut short)
    /// is never handed to them: each then calls the inner service itself, as after the wait.
    /// On by default with a 5 s wait; `Duration::ZERO` turns it off.
    pub fn coalesce(mut self, wait: Duration) -> Self {
        self.coalesce = (!wait.is_zero()).then_some(wait);
        self
    }

    /// stale-if-error: entries are kept `window` past their freshness; when a request for a
    /// stale entry gets a 5xx, a 408 (a timeout layer's answer) or an error from the inner
    /// service, the stale entry answers
    /// instead (`Cache-Status: ...; fwd=stale`, `X-Cache: STALE`), and is counted.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale_if_error = (!window.is_zero()).then_some(window);
        self
    }

    /// stale-while-revalidate: for `window` past its freshness, an entry is served at once
    /// (`Cache-Status: ...; hit; fwd=stale`) while one request per process refreshes it in
    /// the background (the inner service answers that request's refresh, not its client).
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale_while_revalidate = (!window.is_zero()).then_some(window);
        self
    }

    /// Whether the response's own `Cache-Control: stale-while-revalidate=N` and
    /// `stale-if-error=N` lengthen the route's stale windows.
    ///
    /// On by default, except on [`per_user`](Self::per_user) routes: there those directives
    /// are usually meant for the browser's own cache, and a stale personal response served
    /// for an hour is one its user may no longer be allowed to see. The route's own
    /// [`stale_while_revalidate`](Self::stale_while_revalidate) and
    /// [`stale_if_error`](Self::stale_if_error) windows apply either way. Whatever the
    /// window, a refresh (or a miss) that the handler refuses (a 4xx other than 408, or a
    /// response that may not be stored: `no-store`, `private` on a shared route,
    /// `Set-Cookie`...) removes the stale entry instead of leaving it to be served.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_redis_cache::Policy;
    ///
    /// // This per-user route trusts its handler's stale-while-revalidate directives.
    /// let menu = Policy::per_user(Duration::from_secs(60)).stale_from_response(true);
    /// # let _ = menu;
    /// ```
    pub fn stale_from_response(mut self, on: bool) -> Self {
        self.stale_from_response = Some(on);
        self
    }

    /// Coalescing across instances: the instance whose miss leads also takes a short Redis
    /// lock (`SET NX PX lock_ttl`); misses of other instances then wait (up to the
    /// coalescing wait) for its entry to appear, and give up and call their handler after.
    /// Costs one more Redis command per leading miss. Off by default; needs coalescing on.
    pub fn lock_across_instances(mut self, lock_ttl: Duration) -> Self {
        self.lock = (!lock_ttl.is_zero()).then_some(lock_ttl);
        self
    }

    /// XFetch-style early refresh: a hit close to its entry's expiry refreshes it in the
    /// background (one request per process), with a probability that rises as expiry nears
    /// and with the time the response took to compute, so hot keys never all expire at
    /// once. `beta` 1.0 is the usual choice; larger refreshes earlier. Off by default.
    pub fn early_refresh(mut self, beta: f64) -> Self {
        self.early_refresh = (beta.is_finite() && beta > 0.0).then_some(beta);
        self
    }

    /// Near-cache: entries of this route read from Redis are also kept in this process, in a
    /// tier sized in bytes ([`CacheLayer::near_capacity`](crate::CacheLayer::near_capacity),
    /// 64 MiB by default), for at most `max_age` and never past their freshness; hits from
    /// it cost no Redis round trip (`Cache-Status: ...; hit; detail=near; ttl=N`).
    ///
    /// Coherent across instances: every invalidation through a
    /// [`CacheHandle`](crate::CacheHandle), in any instance, empties the near-cache of every
    /// instance (Redis pub/sub on the namespace's channel `<namespace>:near`); while that
    /// subscription is down the near-cache is emptied and not used. What no invalidation
    /// announces (an entry replaced after its TTL by another instance's miss) is served from
    /// here for at most `max_age`: keep it short (a few seconds). Off by default, and not
    /// used in [`http_shared`](Self::http_shared) mode (whose reuse rules need the request).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_redis_cache::Policy;
    ///
    /// let hot = Policy::shared(Duration::from_secs(300)).near(Duration::from_secs(5));
    /// ```
    #[cfg(feature = "near")]
    pub fn near(mut self, max_age: Duration) -> Self {
        self.near = (!max_age.is_zero()).then_some(max_age);
        self
    }

    /// The stale windows of a response (stale-while-revalidate, stale-if-error): the
    /// route's, or the response's own `Cache-Control` directives when longer and allowed
    /// (see [`stale_from_response`](Self::stale_from_response)).
    /// In shared-cache mode, `must-revalidate` and `proxy-revalidate` (and `no-cache`) allow
    /// no stale use at all, and `s-maxage` none by the route's configuration.
    pub(crate) fn stale_windows(&self, headers: &HeaderMap) -> (Duration, Duration) {
        let d = cache_control(headers);
        let from_response = self.stale_from_response.unwrap_or(!self.is_per_user());
        let own = |s: Option<u64>| {
            s.filter(|_| from_response)
                .map(Duration::from_secs)
                .unwrap_or_default()
        };
        if self.http_shared && (d.must_revalidate || d.proxy_revalidate || d.no_cache) {
            return (Duration::ZERO, Duration::ZERO);
        }
        let configured = !(self.http_shared && d.s_maxage.is_some());
        let route = |w: Option<Duration>| w.filter(|_| configured).unwrap_or_default();
        (
            route(self.stale_while_revalidate).max(own(d.stale_while_revalidate)),
            route(self.stale_if_error).max(own(d.stale_if_error)),
        )
    }

    pub(crate) fn is_strictly_shared(&self) -> bool {
        self.scope == Scope::Shared
    }

    pub(crate) fn is_per_user(&self) -> bool {
        self.scope == Scope::PerUser
    }
}

/// A per-response instruction from the handler, put in the response extensions.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_cache::CacheOverride;
///
/// let mut res = http::Response::new(String::from("rarely changes"));
/// res.extensions_mut().insert(CacheOverride::ttl(Duration::from_secs(86_400)));
/// ```
///
/// The same can be said with the [`TTL_OVERRIDE_HEADER`] response header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheOverride(Option<Duration>);

impl CacheOverride {
    /// Store this response for `ttl` instead of the route's TTL.
    pub fn ttl(ttl: Duration) -> Self {
        CacheOverride(Some(ttl))
    }

    /// Do not store this response.
    pub fn skip() -> Self {
        CacheOverride(None)
    }
}

/// Response headers through which a handler tags its response (space- or comma-separated);
/// the layer strips them before the response leaves.
pub const TAG_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("cache-tag"),
    HeaderName::from_static("surrogate-key"),
];

/// The most tags one entry keeps, and the longest tag, in bytes.
const MAX_TAGS: usize = 32;
const MAX_TAG_LEN: usize = 256;

/// Removes the tag headers from a response and returns their tags, with the policy's.
pub(crate) fn take_tags(headers: &mut HeaderMap, policy: &Policy) -> Vec<String> {
    let mut tags = policy.tags.clone();
    for name in &TAG_HEADERS {
        if let http::header::Entry::Occupied(e) = headers.entry(name) {
            for value in e.remove_entry_mult().1 {
                let Ok(value) = value.to_str() else { continue };
                for tag in value.split([',', ' ', '\t']).map(str::trim) {
                    if !tag.is_empty() && tag.len() <= MAX_TAG_LEN && !tags.iter().any(|t| t == tag)
                    {
                        tags.push(tag.to_owned());
                    }
                }
            }
        }
    }
    if tags.len() > MAX_TAGS {
        tracing::warn!(
            count = tags.len(),
            "more than {MAX_TAGS} cache tags; extra tags ignored"
        );
        tags.truncate(MAX_TAGS);
    }
    tags
}

/// Request headers that carry a credential besides `Authorization` and `Cookie`: a request
/// with one bypasses shared routes (see [`CacheLayer::credential_header`](crate::CacheLayer::credential_header)).
pub(crate) const DEFAULT_CREDENTIAL_HEADERS: [HeaderName; 4] = [
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("x-auth-token"),
    HeaderName::from_static("x-access-token"),
];

/// Decides whether a GET/HEAD request may use the cache at all. `body_empty` is what the
/// request body says of itself (ended, or an exact size of zero); `credentials` are the
/// layer's credential-bearing headers other than `Authorization` and `Cookie`.
pub(crate) fn request_bypass(
    headers: &HeaderMap,
    body_empty: bool,
    policy: &Policy,
    credentials: &[HeaderName],
) -> Option<BypassReason> {
    if !policy.enabled {
        return Some(BypassReason::Route);
    }
    if headers.contains_key(header::RANGE) {
        return Some(BypassReason::Range);
    }
    // The key does not hold the request body: a GET with one is not cached. The body says
    // so itself (over HTTP/2 a body comes with neither `Content-Length` nor
    // `Transfer-Encoding`); the headers say so before it arrives.
    let has_body = !body_empty
        || headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Some(BypassReason::Body);
    }
    if policy.scope == Scope::Shared {
        // In shared-cache mode the response decides (RFC 9111 §3.5).
        if headers.contains_key(header::AUTHORIZATION) && !policy.http_shared {
            return Some(BypassReason::Authorization);
        }
        if headers.contains_key(header::COOKIE) {
            return Some(BypassReason::Cookie);
        }
        if credentials.iter().any(|name| headers.contains_key(name)) {
            return Some(BypassReason::Credential);
        }
    }
    None
}

/// The directives of `Cache-Control` that decide storability.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Directives {
    pub(crate) no_store: bool,
    pub(crate) no_cache: bool,
    pub(crate) private: bool,
    pub(crate) max_age: Option<u64>,
    pub(crate) s_maxage: Option<u64>,
    pub(crate) stale_while_revalidate: Option<u64>,
    pub(crate) stale_if_error: Option<u64>,
    pub(crate) public: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) proxy_revalidate: bool,
    pub(crate) must_understand: bool,
}

/// Parses every `Cache-Control` header by token, case-insensitively. Quoted arguments
/// (`private="set-cookie, x-a"`) may contain commas; unknown directives are ignored.
pub(crate) fn cache_control(headers: &HeaderMap) -> Directives {
    let mut d = Directives::default();
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else {
            // Not visible ASCII: we cannot tell what it says, so be safe.
            d.no_store = true;
            continue;
        };
        for directive in split_directives(value) {
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            // Delta-seconds; an invalid value counts as 0 (RFC 9111 §1.2.2: stale at once).
            let seconds = || Some(arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0));
            if name.eq_ignore_ascii_case("max-age") {
                d.max_age = d.max_age.min(seconds()).or(seconds());
            } else if name.eq_ignore_ascii_case("s-maxage") {
                d.s_maxage = d.s_maxage.min(seconds()).or(seconds());
            } else if name.eq_ignore_ascii_case("stale-while-revalidate") {
                d.stale_while_revalidate = d.stale_while_revalidate.max(seconds());
            } else if name.eq_ignore_ascii_case("stale-if-error") {
                d.stale_if_error = d.stale_if_error.max(seconds());
            } else if name.eq_ignore_ascii_case("no-store") {
                d.no_store = true;
            } else if name.eq_ignore_ascii_case("no-cache") {
                d.no_cache = true;
            } else if name.eq_ignore_ascii_case("private") {
                d.private = true;
            } else if name.eq_ignore_ascii_case("public") {
                d.public = true;
            } else if name.eq_ignore_ascii_case("must-revalidate") {
                d.must_revalidate = true;
            } else if name.eq_ignore_ascii_case("proxy-revalidate") {
                d.proxy_revalidate = true;
            } else if name.eq_ignore_ascii_case("must-understand") {
                d.must_understand = true;
            }
        }
    }
    d
}

/// Splits a list on commas that are not inside a quoted string.
fn split_directives(value: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts.into_iter().map(str::trim).filter(|s| !s.is_empty())
}

/// The handler's instruction for one response, from the extension or the header.
pub(crate) fn handler_override(
    headers: &HeaderMap,
    extensions: &http::Extensions,
) -> Option<CacheOverride> {
    if let Some(o) = extensions.get::<CacheOverride>() {
        return Some(*o);
    }
    let value = headers.get(TTL_OVERRIDE_HEADER)?;
    let parsed = value.to_str().ok().and_then(|s| {
        let s = s.trim();
        if s.eq_ignore_ascii_case("skip") {
            Some(CacheOverride::skip())
        } else {
            s.parse::<u64>().ok().map(|secs| {
                if secs == 0 {
                    CacheOverride::skip()
                } else {
                    CacheOverride::ttl(Duration::from_secs(secs))
                }
            })
        }
    });
    match parsed {
        Some(o) => Some(o),
        None => {
            tracing::warn!(
                value = ?value,
                "invalid {TTL_OVERRIDE_HEADER} header: expected seconds or `skip`; response not stored"
            );
            Some(CacheOverride::skip())
        }
    }
}

/// Decides, from the response head, whether and for how long it may be stored.
pub(crate) fn response_ttl(
    status: StatusCode,
    headers: &HeaderMap,
    over: Option<CacheOverride>,
    policy: &Policy,
) -> Result<Duration, NotStored> {
    let mut ttl = if status == StatusCode::PARTIAL_CONTENT || status == StatusCode::NOT_MODIFIED {
        // Partial and conditional answers depend on request headers the key does not hold.
        return Err(NotStored::Status);
    } else if let Some((_, ttl)) = policy.status_ttls.iter().find(|(s, _)| *s == status) {
        *ttl
    } else if status.is_success() {
        policy.ttl
    } else {
        return Err(NotStored::Status);
    };
    match over {
        Some(CacheOverride(None)) => return Err(NotStored::Handler),
        Some(CacheOverride(Some(t))) => ttl = t,
        None => {}
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    let cc = cache_control(headers);
    if cc.no_store || cc.no_cache {
        return Err(NotStored::NoStore);
    }
    if cc.private && !policy.is_per_user() {
        return Err(NotStored::Private);
    }
    if let (Some((min, max)), None) = (policy.ttl_from_response, over) {
        let shared = !policy.is_per_user();
        let origin = cc
            .s_maxage
            .filter(|_| shared)
            .or(cc.max_age)
            .map(Duration::from_secs)
            .or_else(|| expires_in(headers, std::time::SystemTime::now()));
        if let Some(origin) = origin {
            if origin.is_zero() {
                return Err(NotStored::NoStore);
            }
            ttl = origin.clamp(min, max);
        }
    }
    for value in headers.get_all(header::VARY) {
        let Ok(value) = value.to_str() else {
            return Err(NotStored::Vary);
        };
        for name in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let covered = policy
                .key_headers
                .iter()
                .any(|k| k.as_str().eq_ignore_ascii_case(name));
            if name == "*" || !covered {
                return Err(NotStored::Vary);
            }
        }
    }
    if ttl < Duration::from_millis(1) {
        return Err(NotStored::Handler);
    }
    Ok(ttl)
}

/// `Expires` minus `Date` (or `now`): how long the origin says the response stays fresh.
/// An invalid `Expires` means "already expired" (RFC 9111 §5.3).
fn expires_in(headers: &HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    let expires = headers.get(header::EXPIRES)?;
    let Some(expires) = expires
        .to_str()
        .ok()
        .and_then(|v| httpdate::parse_http_date(v).ok())
    else {
        return Some(Duration::ZERO);
    };
    let date = headers
        .get(header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

/// Whether a request of this method is handled by the cache at all.
pub(crate) fn cacheable_method(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in pairs {
            m.append(*n, HeaderValue::from_static(v));
        }
        m
    }

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn cache_control_by_token_case_insensitive() {
        assert!(cache_control(&h(&[("cache-control", "No-Store")])).no_store);
        assert!(cache_control(&h(&[("cache-control", "max-age=5, PRIVATE")])).private);
        assert!(
            cache_control(&h(&[
                ("cache-control", "public"),
                ("cache-control", "no-cache")
            ]))
            .no_cache
        );
        // Tokens, not substrings.
        let d = cache_control(&h(&[("cache-control", "x-no-store-ish, max-age=3")]));
        assert!(!d.no_store && !d.no_cache && !d.private);
        assert_eq!(d.max_age, Some(3));
        // A quoted argument may contain commas and directive names.
        let d = cache_control(&h(&[(
            "cache-control",
            "private=\"set-cookie, no-store\", max-age=3",
        )]));
        assert!(d.private && !d.no_store);
    }

    #[test]
    fn statuses() {
        let p = Policy::shared(TTL);
        assert_eq!(
            response_ttl(StatusCode::OK, &HeaderMap::new(), None, &p),
            Ok(TTL)
        );
        assert_eq!(
            response_ttl(StatusCode::NO_CONTENT, &HeaderMap::new(), None, &p),
            Ok(TTL)
        );
        assert_eq!(
            response_ttl(StatusCode::PARTIAL_CONTENT, &HeaderMap::new(), None, &p),
            Err(NotStored::Status)
        );
        assert_eq!(
            response_ttl(StatusCode::NOT_FOUND, &HeaderMap::new(), None, &p),
            Err(NotStored::Status)
        );
        let p = p.status(StatusCode::NOT_FOUND, Duration::from_secs(5));
        assert_eq!(
            response_ttl(StatusCode::NOT_FOUND, &HeaderMap::new(), None, &p),
            Ok(Duration::from_secs(5))
        );
        let p = p.status(StatusCode::PARTIAL_CONTENT, TTL);
        assert_eq!(
            response_ttl(StatusCode::PARTIAL_CONTENT, &HeaderMap::new(), None, &p),
            Err(NotStored::Status)
        );
        let p = p.status(StatusCode::NOT_MODIFIED, TTL);
        assert_eq!(
            response_ttl(StatusCode::NOT_MODIFIED, &HeaderMap::new(), None, &p),
            Err(NotStored::Status)
        );
    }

    #[test]
    fn never_stored() {
        let shared = Policy::shared(TTL);
        let per_user = Policy::per_user(TTL);
        let cases = [
            (h(&[("set-cookie", "a=b")]), NotStored::SetCookie),
            (h(&[("cache-control", "no-store")]), NotStored::NoStore),
            (h(&[("cache-control", "no-cache")]), NotStored::NoStore),
            (h(&[("vary", "*")]), NotStored::Vary),
            (h(&[("vary", "accept-encoding")]), NotStored::Vary),
        ];
        for (headers, why) in cases {
            assert_eq!(
                response_ttl(StatusCode::OK, &headers, None, &shared),
                Err(why)
            );
            assert_eq!(
                response_ttl(StatusCode::OK, &headers, None, &per_user),
                Err(why)
            );
        }
        let private = h(&[("cache-control", "private, max-age=60")]);
        assert_eq!(
            response_ttl(StatusCode::OK, &private, None, &shared),
            Err(NotStored::Private)
        );
        assert_eq!(
            response_ttl(StatusCode::OK, &private, None, &per_user),
            Ok(TTL)
        );
    }

    #[test]
    fn vary_covered_by_key_headers() {
        let p = Policy::shared(TTL).key_header(header::ACCEPT_LANGUAGE);
        let headers = h(&[("vary", "Accept-Language")]);
        assert_eq!(response_ttl(StatusCode::OK, &headers, None, &p), Ok(TTL));
        let headers = h(&[("vary", "accept-language, accept-encoding")]);
        assert_eq!(
            response_ttl(StatusCode::OK, &headers, None, &p),
            Err(NotStored::Vary)
        );
    }

    #[test]
    fn handler_overrides() {
        let p = Policy::shared(TTL);
        let ext = http::Extensions::new();
        let o = handler_override(&h(&[("x-cache-ttl", "5")]), &ext);
        assert_eq!(
            response_ttl(StatusCode::OK, &HeaderMap::new(), o, &p),
            Ok(Duration::from_secs(5))
        );
        for v in ["0", "skip", "SKIP", "-1", "soon", "1.5"] {
            let mut m = HeaderMap::new();
            m.insert("x-cache-ttl", HeaderValue::from_str(v).unwrap());
            let o = handler_override(&m, &ext);
            assert_eq!(
                response_ttl(StatusCode::OK, &HeaderMap::new(), o, &p),
                Err(NotStored::Handler),
                "{v}"
            );
        }
        let mut ext = http::Extensions::new();
        ext.insert(CacheOverride::ttl(Duration::from_secs(9)));
        let o = handler_override(&h(&[("x-cache-ttl", "5")]), &ext);
        assert_eq!(o, Some(CacheOverride::ttl(Duration::from_secs(9))));
        // An override does not make an uncacheable status cacheable.
        assert_eq!(
            response_ttl(StatusCode::INTERNAL_SERVER_ERROR, &HeaderMap::new(), o, &p),
            Err(NotStored::Status)
        );
    }

    #[test]
    fn tags_from_policy_and_headers() {
        let p = Policy::shared(TTL).tag("roles");
        let mut headers = h(&[
            ("cache-tag", "a, b"),
            ("cache-tag", "roles c"),
            ("surrogate-key", "d"),
            ("content-type", "x"),
        ]);
        assert_eq!(take_tags(&mut headers, &p), ["roles", "a", "b", "c", "d"]);
        assert!(!headers.contains_key("cache-tag") && !headers.contains_key("surrogate-key"));
        assert!(headers.contains_key("content-type"));
    }

    #[test]
    fn ttl_from_the_response() {
        let min = Duration::from_secs(10);
        let max = Duration::from_secs(600);
        let p = Policy::shared(TTL).ttl_from_response(min, max);
        let ttl = |pairs: &[(&'static str, &'static str)], p: &Policy| {
            response_ttl(StatusCode::OK, &h(pairs), None, p)
        };
        assert_eq!(
            ttl(&[("cache-control", "max-age=120")], &p),
            Ok(Duration::from_secs(120))
        );
        assert_eq!(
            ttl(&[("cache-control", "max-age=120, s-maxage=300")], &p),
            Ok(Duration::from_secs(300))
        );
        assert_eq!(
            ttl(&[("cache-control", "max-age=5")], &p),
            Ok(min),
            "clamped up"
        );
        assert_eq!(
            ttl(&[("cache-control", "max-age=86400")], &p),
            Ok(max),
            "clamped down"
        );
        assert_eq!(
            ttl(&[("cache-control", "max-age=0")], &p),
            Err(NotStored::NoStore)
        );
        assert_eq!(
            ttl(&[("cache-control", "max-age=soon")], &p),
            Err(NotStored::NoStore)
        );
        assert_eq!(ttl(&[], &p), Ok(TTL), "no freshness: the route's TTL");
        assert_eq!(
            ttl(
                &[
                    ("date", "Wed, 25 Nov 2026 10:00:00 GMT"),
                    ("expires", "Wed, 25 Nov 2026 10:02:00 GMT")
                ],
                &p
            ),
            Ok(Duration::from_secs(120))
        );
        assert_eq!(ttl(&[("expires", "0")], &p), Err(NotStored::NoStore));
        // Per-user routes ignore s-maxage (it is for shared caches).
        let pu = Policy::per_user(TTL).ttl_from_response(min, max);
        assert_eq!(
            ttl(
                &[("cache-control", "private, max-age=60, s-maxage=300")],
                &pu
            ),
            Ok(Duration::from_secs(60))
        );
        // Off by default.
        assert_eq!(
            ttl(&[("cache-control", "max-age=120")], &Policy::shared(TTL)),
            Ok(TTL)
        );
    }

    #[test]
    fn request_bypass_rules() {
        let shared = Policy::shared(TTL);
        let auth = h(&[("authorization", "Bearer x")]);
        let cookie = h(&[("cookie", "s=1")]);
        assert_eq!(
            request_bypass(&auth, true, &shared, &[]),
            Some(BypassReason::Authorization)
        );
        assert_eq!(
            request_bypass(&cookie, true, &shared, &[]),
            Some(BypassReason::Cookie)
        );
        let open = shared.clone().shared_for_authenticated();
        assert_eq!(request_bypass(&auth, true, &open, &[]), None);
        assert_eq!(request_bypass(&cookie, true, &open, &[]), None);
        assert_eq!(
            request_bypass(&auth, true, &Policy::per_user(TTL), &[]),
            None
        );
        assert_eq!(
            request_bypass(
                &h(&[("range", "bytes=0-1")]),
                true,
                &Policy::per_user(TTL),
                &[]
            ),
            Some(BypassReason::Range)
        );
        assert_eq!(
            request_bypass(&HeaderMap::new(), true, &Policy::bypass(), &[]),
            Some(BypassReason::Route)
        );
        assert_eq!(
            request_bypass(&h(&[("content-length", "12")]), true, &shared, &[]),
            Some(BypassReason::Body)
        );
        assert_eq!(
            request_bypass(&h(&[("transfer-encoding", "chunked")]), true, &shared, &[]),
            Some(BypassReason::Body)
        );
        assert_eq!(
            request_bypass(&h(&[("content-length", "0")]), true, &shared, &[]),
            None
        );
        // A body that says it is not empty, whatever the headers (HTTP/2).
        assert_eq!(
            request_bypass(&HeaderMap::new(), false, &Policy::per_user(TTL), &[]),
            Some(BypassReason::Body)
        );
        // Credential-bearing headers bypass strictly shared routes only.
        let key = h(&[("x-api-key", "k")]);
        let creds = DEFAULT_CREDENTIAL_HEADERS;
        assert_eq!(
            request_bypass(&key, true, &shared, &creds),
            Some(BypassReason::Credential)
        );
        assert_eq!(request_bypass(&key, true, &open, &creds), None);
        assert_eq!(
            request_bypass(&key, true, &Policy::per_user(TTL), &creds),
            None
        );
        // A client's no-cache does not bypass.
        assert_eq!(
            request_bypass(&h(&[("cache-control", "no-cache")]), true, &shared, &[]),
            None
        );
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn cache_control_never_panics(value in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(v) = HeaderValue::from_bytes(&value) {
                let mut h = HeaderMap::new();
                h.insert(header::CACHE_CONTROL, v);
                let _ = cache_control(&h);
            }
        }

        #[test]
        fn directives_are_found_among_any_others(
            before in proptest::collection::vec("[a-z-]{1,12}(=[a-z0-9]{1,5})?", 0..4),
            after in proptest::collection::vec("[a-z-]{1,12}(=[a-z0-9]{1,5})?", 0..4),
            which in 0usize..3,
            upper in any::<bool>(),
        ) {
            let names = ["no-store", "no-cache", "private"];
            let mut name = names[which].to_owned();
            if upper {
                name = name.to_uppercase();
            }
            let mut parts = before.clone();
            parts.push(name);
            parts.extend(after.clone());
            let mut h = HeaderMap::new();
            h.insert(header::CACHE_CONTROL, HeaderValue::from_str(&parts.join(", ")).unwrap());
            let d = cache_control(&h);
            prop_assert!([d.no_store, d.no_cache, d.private][which]);
        }

        #[test]
        fn quoted_arguments_hide_their_contents(inner in "(no-store|no-cache|[a-z, -]){0,8}") {
            let mut h = HeaderMap::new();
            let v = format!("private=\"{}\", max-age=5", inner.replace('"', ""));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_str(&v).unwrap());
            let d = cache_control(&h);
            prop_assert!(d.private);
            prop_assert!(!d.no_store && !d.no_cache, "{}", v);
        }
    }
}
