//! Shared-cache mode ([`Policy::http_shared`]): storability, freshness, age and reuse as
//! RFC 9111 defines them for a shared cache. Pure functions, time passed in.

use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::{cache_control, expires_in, response_ttl, CacheOverride, Policy};
use crate::outcome::NotStored;

/// The stored header that holds a hash of the request headers a stored response was
/// selected by (its `Vary`). Written by the layer only (an origin's is replaced or removed)
/// and never sent to clients.
pub(crate) const VARY_FINGERPRINT: HeaderName = HeaderName::from_static("tower-redis-cache-vary");

/// The longest heuristic freshness lifetime (RFC 9111 §4.2.2 leaves the bound to caches).
const MAX_HEURISTIC: Duration = Duration::from_secs(86_400);

/// Less than this left of a freshness lifetime is not worth storing.
const MIN_TTL: Duration = Duration::from_millis(1);

/// What the shared-cache mode keeps of a request: what decides whether a stored response
/// may answer it, and whether its response may be stored. Not `Debug`: it holds the
/// request's credentials.
pub(crate) struct SharedRequest {
    /// The request's headers, for `Vary` (kept in memory only; only a hash is stored).
    headers: HeaderMap,
    authorized: bool,
    no_store: bool,
    no_cache: bool,
    max_age: Option<u64>,
}

impl SharedRequest {
    pub(crate) fn new(headers: &HeaderMap) -> Self {
        let cc = cache_control(headers);
        // HTTP/1.0's `Pragma: no-cache` counts only without `Cache-Control` (RFC 9111 §5.4).
        let pragma_no_cache = !headers.contains_key(header::CACHE_CONTROL)
            && headers.get_all(header::PRAGMA).iter().any(|v| {
                v.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("no-cache"))
                })
            });
        SharedRequest {
            headers: headers.clone(),
            authorized: headers.contains_key(header::AUTHORIZATION),
            no_store: cc.no_store,
            no_cache: cc.no_cache || pragma_no_cache,
            max_age: cc.max_age,
        }
    }

    /// The request as a route sees it: over HTTP/2 the authority travels in the URI and
    /// `Host` is absent, so a response's `Vary: Host` is matched against the URI's
    /// authority there (the same value HTTP/1.1 sends as `Host`).
    pub(crate) fn for_request(uri: &http::Uri, headers: &HeaderMap) -> Self {
        let mut request = Self::new(headers);
        if !request.headers.contains_key(header::HOST) {
            let authority = uri.authority().map(|a| HeaderValue::from_str(a.as_str()));
            if let Some(Ok(value)) = authority {
                request.headers.insert(header::HOST, value);
            }
        }
        request
    }

    /// Whether this request refuses every stored response (`no-cache`, `max-age=0`, as
    /// browsers send on reload): it need not wait for a concurrent miss's.
    pub(crate) fn refuses_stored(&self) -> bool {
        self.no_cache || self.max_age == Some(0)
    }

    /// Whether a stored response (its headers, and its current age) may answer this request.
    pub(crate) fn may_reuse(&self, stored: &HeaderMap, age: Duration) -> bool {
        if self.no_cache
            || self
                .max_age
                .is_some_and(|max| age > Duration::from_secs(max))
        {
            return false;
        }
        if self.authorized && !shareable_when_authorized(stored) {
            return false;
        }
        match vary_fingerprint(stored, &self.headers) {
            Ok(expected) => expected.as_ref() == stored.get(VARY_FINGERPRINT),
            Err(_) => false,
        }
    }
}

/// RFC 9111 §3.5: a shared cache stores or reuses a response to a request with
/// `Authorization` only if the response says so.
fn shareable_when_authorized(response: &HeaderMap) -> bool {
    let cc = cache_control(response);
    cc.public || cc.s_maxage.is_some() || cc.must_revalidate
}

/// How a response is stored: its freshness lifetime as seen from `stored_at` (which is
/// `age` before it arrived), and the hash of its `Vary`'d request headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Storage {
    /// From the response's origin-side birth (`age` before now) to the end of its freshness.
    pub(crate) ttl: Duration,
    /// The response's age when it arrived.
    pub(crate) age: Duration,
    /// The value of [`VARY_FINGERPRINT`] to store, if the response has a `Vary`.
    pub(crate) vary: Option<HeaderValue>,
}

/// Whether and how a response may be stored. `request` is set on shared-cache routes;
/// `now` is when the response arrived and `delay` how long the inner service took.
pub(crate) fn storage(
    status: StatusCode,
    headers: &HeaderMap,
    over: Option<CacheOverride>,
    policy: &Policy,
    request: Option<&SharedRequest>,
    now: SystemTime,
    delay: Duration,
) -> Result<Storage, NotStored> {
    match request.filter(|_| policy.http_shared) {
        Some(request) => shared(status, headers, over, policy, request, now, delay),
        None => response_ttl(status, headers, over, policy).map(|ttl| Storage {
            ttl,
            age: Duration::ZERO,
            vary: None,
        }),
    }
}

fn shared(
    status: StatusCode,
    headers: &HeaderMap,
    over: Option<CacheOverride>,
    policy: &Policy,
    request: &SharedRequest,
    now: SystemTime,
    delay: Duration,
) -> Result<Storage, NotStored> {
    if status == StatusCode::PARTIAL_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Err(NotStored::Status);
    }
    if over == Some(CacheOverride::skip()) {
        return Err(NotStored::Handler);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    let cc = cache_control(headers);
    if cc.no_store || cc.no_cache || request.no_store {
        return Err(NotStored::NoStore);
    }
    if cc.private {
        return Err(NotStored::Private);
    }
    if cc.must_understand && status.canonical_reason().is_none() {
        return Err(NotStored::Status);
    }
    if request.authorized && !shareable_when_authorized(headers) {
        return Err(NotStored::Authorization);
    }
    let vary = vary_fingerprint(headers, &request.headers)?;
    let date = http_date(headers.get(header::DATE));
    let explicit = cc
        .s_maxage
        .or(cc.max_age)
        .map(Duration::from_secs)
        .or_else(|| expires_in(headers, date.unwrap_or(now)));
    let lifetime = match explicit {
        Some(lifetime) => lifetime,
        None if heuristically_cacheable(status) || cc.public => {
            heuristic(headers, date.unwrap_or(now)).ok_or(NotStored::Stale)?
        }
        None => return Err(NotStored::Status),
    };
    let age = current_age(headers, date, now, delay);
    if now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        <= age
    {
        // Older than the clock: it could not be dated back (and is surely not fresh).
        return Err(NotStored::Stale);
    }
    let left = lifetime
        .checked_sub(age)
        .filter(|left| *left >= MIN_TTL)
        .ok_or(NotStored::Stale)?;
    let mut keep = left.min(policy.ttl);
    if let Some(CacheOverride(Some(ttl))) = over {
        keep = keep.min(ttl);
    }
    if keep < MIN_TTL {
        return Err(NotStored::Handler);
    }
    Ok(Storage {
        ttl: age.saturating_add(keep),
        age,
        vary,
    })
}

/// Statuses cacheable by default (RFC 9110 §15.1), without 206 (never stored here).
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// 10 % of the time from `Last-Modified` to `Date`, at most [`MAX_HEURISTIC`].
fn heuristic(headers: &HeaderMap, date: SystemTime) -> Option<Duration> {
    let modified = http_date(headers.get(header::LAST_MODIFIED))?;
    let since = date.duration_since(modified).ok()?;
    Some((since / 10).min(MAX_HEURISTIC))
}

/// The response's age when it arrived (RFC 9111 §4.2.3): the larger of `Date` to `now`
/// and `Age` plus the time the inner service took.
fn current_age(
    headers: &HeaderMap,
    date: Option<SystemTime>,
    now: SystemTime,
    delay: Duration,
) -> Duration {
    let apparent = date
        .and_then(|d| now.duration_since(d).ok())
        .unwrap_or_default();
    let age = headers.get(header::AGE).and_then(age_value);
    let corrected = age.unwrap_or_default().saturating_add(delay);
    apparent.max(corrected)
}

/// `Age`: the first member if it is a list; a value that is not a non-negative integer is
/// ignored, and one too large to represent counts as the largest (RFC 9111 §1.2.2, §5.1).
fn age_value(value: &HeaderValue) -> Option<Duration> {
    let first = value.to_str().ok()?.split(',').next()?.trim();
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Duration::from_secs(first.parse().unwrap_or(u64::MAX)))
}

fn http_date(value: Option<&HeaderValue>) -> Option<SystemTime> {
    httpdate::parse_http_date(value?.to_str().ok()?).ok()
}

/// A hash of the request header fields named by the response's `Vary` (names and values,
/// each field's lines joined), or `None` without `Vary`. `Vary: *` (or an unreadable
/// `Vary`) makes the response unstorable.
fn vary_fingerprint(
    response: &HeaderMap,
    request: &HeaderMap,
) -> Result<Option<HeaderValue>, NotStored> {
    let mut names = Vec::new();
    for value in response.get_all(header::VARY) {
        let value = value.to_str().map_err(|_| NotStored::Vary)?;
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Err(NotStored::Vary);
            }
            names.push(name.to_ascii_lowercase());
        }
    }
    if names.is_empty() {
        return Ok(None);
    }
    names.sort_unstable();
    names.dedup();
    let mut h = blake3::Hasher::new_derive_key("tower-redis-cache vary v1");
    for name in &names {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        // A name that is not a valid header name matches no request header: absent.
        let mut lines = HeaderName::from_bytes(name.as_bytes())
            .map(|n| request.get_all(n).iter().collect::<Vec<_>>())
            .unwrap_or_default();
        h.update(&[u8::from(!lines.is_empty())]);
        let mut joined = Vec::new();
        for (i, line) in lines.drain(..).enumerate() {
            if i > 0 {
                joined.push(b',');
            }
            joined.extend_from_slice(line.as_bytes().trim_ascii());
        }
        h.update(&(joined.len() as u64).to_le_bytes());
        h.update(&joined);
    }
    // 128 bits, in hex.
    HeaderValue::from_str(&h.finalize().to_hex()[..32])
        .map(Some)
        .map_err(|_| NotStored::Vary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in pairs {
            m.append(*n, HeaderValue::from_static(v));
        }
        m
    }

    const MAX: Duration = Duration::from_secs(3600);
    /// Wed, 25 Nov 2026 10:00:00 GMT
    fn at(secs_after_ten: u64) -> SystemTime {
        httpdate::parse_http_date("Wed, 25 Nov 2026 10:00:00 GMT").unwrap()
            + Duration::from_secs(secs_after_ten)
    }
    const DATE: &str = "Wed, 25 Nov 2026 10:00:00 GMT";

    fn decide(
        status: u16,
        response: &[(&'static str, &'static str)],
        request: &[(&'static str, &'static str)],
        now: SystemTime,
    ) -> Result<Storage, NotStored> {
        storage(
            StatusCode::from_u16(status).unwrap(),
            &h(response),
            None,
            &Policy::http_shared(MAX),
            Some(&SharedRequest::new(&h(request))),
            now,
            Duration::ZERO,
        )
    }

    fn ttl(r: Result<Storage, NotStored>) -> Result<(u64, u64), NotStored> {
        r.map(|s| (s.ttl.as_secs(), s.age.as_secs()))
    }

    #[test]
    fn freshness_lifetime_order() {
        let cc = |v| [("cache-control", v), ("date", DATE)];
        assert_eq!(
            ttl(decide(200, &cc("max-age=60, s-maxage=120"), &[], at(0))),
            Ok((120, 0))
        );
        assert_eq!(ttl(decide(200, &cc("max-age=60"), &[], at(0))), Ok((60, 0)));
        let expires = [("date", DATE), ("expires", "Wed, 25 Nov 2026 10:05:00 GMT")];
        assert_eq!(ttl(decide(200, &expires, &[], at(0))), Ok((300, 0)));
        // max-age wins over Expires, even an invalid one.
        let both = [
            ("date", DATE),
            ("expires", "0"),
            ("cache-control", "max-age=30"),
        ];
        assert_eq!(ttl(decide(200, &both, &[], at(0))), Ok((30, 0)));
        assert_eq!(
            decide(200, &[("date", DATE), ("expires", "0")], &[], at(0)),
            Err(NotStored::Stale)
        );
        // Bounded by the policy's maximum.
        assert_eq!(
            ttl(decide(200, &cc("max-age=86400"), &[], at(0))),
            Ok((3600, 0))
        );
        assert_eq!(
            decide(200, &cc("max-age=0"), &[], at(0)),
            Err(NotStored::Stale)
        );
    }

    #[test]
    fn age_is_taken_off() {
        // Age header.
        let r = decide(
            200,
            &[("cache-control", "max-age=100"), ("age", "30")],
            &[],
            at(0),
        );
        assert_eq!(ttl(r), Ok((100, 30)));
        // Date in the past: apparent age.
        let r = decide(
            200,
            &[("cache-control", "max-age=100"), ("date", DATE)],
            &[],
            at(40),
        );
        assert_eq!(ttl(r), Ok((100, 40)));
        // The larger of both; the inner service's time adds to Age.
        let r = storage(
            StatusCode::OK,
            &h(&[
                ("cache-control", "max-age=100"),
                ("date", DATE),
                ("age", "30"),
            ]),
            None,
            &Policy::http_shared(MAX),
            Some(&SharedRequest::new(&HeaderMap::new())),
            at(10),
            Duration::from_secs(5),
        );
        assert_eq!(ttl(r), Ok((100, 35)));
        // Bounded: what is left, not the lifetime, is bounded by the maximum.
        let r = storage(
            StatusCode::OK,
            &h(&[("cache-control", "max-age=10000"), ("age", "9000")]),
            None,
            &Policy::http_shared(Duration::from_secs(600)),
            Some(&SharedRequest::new(&HeaderMap::new())),
            at(0),
            Duration::ZERO,
        );
        assert_eq!(ttl(r), Ok((9600, 9000)));
        // Stale on arrival.
        assert_eq!(
            decide(
                200,
                &[("cache-control", "max-age=100"), ("age", "100")],
                &[],
                at(0)
            ),
            Err(NotStored::Stale)
        );
        // Invalid Age is ignored; a huge one is the largest.
        for (age, expected) in [("x", Ok((100, 0))), ("-5", Ok((100, 0)))] {
            let r = decide(
                200,
                &[("cache-control", "max-age=100"), ("age", age)],
                &[],
                at(0),
            );
            assert_eq!(ttl(r), expected, "{age}");
        }
        assert_eq!(
            decide(
                200,
                &[
                    ("cache-control", "max-age=100"),
                    ("age", "99999999999999999999999")
                ],
                &[],
                at(0)
            ),
            Err(NotStored::Stale)
        );
        // An age beyond the epoch, with a lifetime longer still.
        assert_eq!(
            decide(
                200,
                &[
                    ("cache-control", "max-age=99999999999"),
                    ("age", "9999999999")
                ],
                &[],
                at(0)
            ),
            Err(NotStored::Stale)
        );
        // A Date in the future (clock skew) is no age.
        let r = decide(
            200,
            &[("cache-control", "max-age=100"), ("date", DATE)],
            &[],
            at(0) - Duration::from_secs(50),
        );
        assert_eq!(ttl(r), Ok((100, 0)));
    }

    #[test]
    fn heuristic_freshness() {
        let lm = [
            ("date", DATE),
            ("last-modified", "Wed, 25 Nov 2026 00:00:00 GMT"),
        ];
        // 10 hours since modified: 1 hour.
        assert_eq!(ttl(decide(200, &lm, &[], at(0))), Ok((3600, 0)));
        assert_eq!(ttl(decide(404, &lm, &[], at(0))), Ok((3600, 0)));
        // Not for statuses that are not heuristically cacheable, unless public.
        assert_eq!(decide(302, &lm, &[], at(0)), Err(NotStored::Status));
        assert_eq!(decide(500, &lm, &[], at(0)), Err(NotStored::Status));
        let public = [
            ("date", DATE),
            ("last-modified", "Wed, 25 Nov 2026 09:00:00 GMT"),
            ("cache-control", "public"),
        ];
        assert_eq!(ttl(decide(302, &public, &[], at(0))), Ok((360, 0)));
        // Explicit freshness makes any final status storable.
        assert_eq!(
            ttl(decide(302, &[("cache-control", "max-age=9")], &[], at(0))),
            Ok((9, 0))
        );
        // Capped at a day.
        let old = [
            ("date", DATE),
            ("last-modified", "Wed, 25 Nov 2015 00:00:00 GMT"),
        ];
        let long = storage(
            StatusCode::OK,
            &h(&old),
            None,
            &Policy::http_shared(Duration::from_secs(10 * 86_400)),
            Some(&SharedRequest::new(&HeaderMap::new())),
            at(0),
            Duration::ZERO,
        );
        assert_eq!(ttl(long), Ok((86_400, 0)));
        // Never with explicit freshness, nor without Last-Modified (or one in the future).
        let explicit = [
            ("date", DATE),
            ("last-modified", "Wed, 25 Nov 2026 00:00:00 GMT"),
            ("cache-control", "max-age=5"),
        ];
        assert_eq!(ttl(decide(200, &explicit, &[], at(0))), Ok((5, 0)));
        assert_eq!(
            decide(200, &[("date", DATE)], &[], at(0)),
            Err(NotStored::Stale)
        );
        let future = [
            ("date", DATE),
            ("last-modified", "Wed, 25 Nov 2026 11:00:00 GMT"),
        ];
        assert_eq!(decide(200, &future, &[], at(0)), Err(NotStored::Stale));
    }

    #[test]
    fn never_stored() {
        let fresh =
            |extra: (&'static str, &'static str)| vec![("cache-control", "max-age=60"), extra];
        let cases: [(Vec<(&str, &str)>, NotStored); 7] = [
            (fresh(("cache-control", "no-store")), NotStored::NoStore),
            (fresh(("cache-control", "no-cache")), NotStored::NoStore),
            (
                fresh(("cache-control", "no-cache=\"set-cookie\"")),
                NotStored::NoStore,
            ),
            (fresh(("cache-control", "private")), NotStored::Private),
            (
                fresh(("cache-control", "private=\"x-user\"")),
                NotStored::Private,
            ),
            (fresh(("set-cookie", "a=b")), NotStored::SetCookie),
            (fresh(("vary", "accept, *")), NotStored::Vary),
        ];
        for (response, why) in cases {
            assert_eq!(decide(200, &response, &[], at(0)), Err(why), "{response:?}");
        }
        let fresh = [("cache-control", "max-age=60")];
        assert_eq!(decide(206, &fresh, &[], at(0)), Err(NotStored::Status));
        assert_eq!(decide(304, &fresh, &[], at(0)), Err(NotStored::Status));
        // The request's no-store.
        assert_eq!(
            decide(200, &fresh, &[("cache-control", "no-store")], at(0)),
            Err(NotStored::NoStore)
        );
        // must-understand with a status this crate does not know.
        let mu = [("cache-control", "max-age=60, must-understand")];
        assert_eq!(decide(299, &mu, &[], at(0)), Err(NotStored::Status));
        assert!(decide(200, &mu, &[], at(0)).is_ok());
    }

    #[test]
    fn authorization() {
        let auth = [("authorization", "Bearer t")];
        for cc in ["max-age=60", "max-age=60, proxy-revalidate"] {
            assert_eq!(
                decide(200, &[("cache-control", cc)], &auth, at(0)),
                Err(NotStored::Authorization),
                "{cc}"
            );
        }
        for cc in [
            "public, max-age=60",
            "s-maxage=60",
            "max-age=60, must-revalidate",
        ] {
            assert!(
                decide(200, &[("cache-control", cc)], &auth, at(0)).is_ok(),
                "{cc}"
            );
        }
        let request = SharedRequest::new(&h(&auth));
        assert!(!request.may_reuse(&h(&[("cache-control", "max-age=60")]), Duration::ZERO));
        assert!(request.may_reuse(
            &h(&[("cache-control", "public, max-age=60")]),
            Duration::ZERO
        ));
        let anonymous = SharedRequest::new(&HeaderMap::new());
        assert!(anonymous.may_reuse(&h(&[("cache-control", "max-age=60")]), Duration::ZERO));
    }

    /// A stored response as the layer stores it: with the fingerprint of its request.
    fn stored(
        response: &[(&'static str, &'static str)],
        request: &[(&'static str, &'static str)],
    ) -> HeaderMap {
        let mut headers = h(response);
        if let Some(fp) = decide(200, response, request, at(0)).unwrap().vary {
            headers.insert(VARY_FINGERPRINT, fp);
        }
        headers
    }

    #[test]
    fn vary_selects_one_variant() {
        let response = [
            ("cache-control", "max-age=60"),
            ("vary", "Accept-Language"),
            ("vary", "accept-encoding, Accept-Language"),
        ];
        let entry = stored(
            &response,
            &[("accept-language", "fr"), ("accept-encoding", "gzip")],
        );
        let reuse = |request: &[(&'static str, &'static str)]| {
            SharedRequest::new(&h(request)).may_reuse(&entry, Duration::ZERO)
        };
        assert!(reuse(&[
            ("Accept-Language", "fr"),
            ("accept-encoding", "gzip")
        ]));
        assert!(
            reuse(&[
                ("accept-language", " fr "),
                ("accept-encoding", "gzip"),
                ("x-other", "1")
            ]),
            "whitespace around a value and other headers do not matter"
        );
        assert!(!reuse(&[
            ("accept-language", "en"),
            ("accept-encoding", "gzip")
        ]));
        assert!(
            !reuse(&[("accept-encoding", "gzip")]),
            "absent is not a match"
        );
        assert!(!reuse(&[
            ("accept-language", "fr"),
            ("accept-language", "en"),
            ("accept-encoding", "gzip")
        ]));
        // Absent when stored: only absent matches.
        let entry = stored(&response, &[]);
        assert!(SharedRequest::new(&HeaderMap::new()).may_reuse(&entry, Duration::ZERO));
        assert!(
            !SharedRequest::new(&h(&[("accept-language", "")])).may_reuse(&entry, Duration::ZERO)
        );
        // A Vary'd entry without (or with a forged) fingerprint is never reused.
        let mut forged = h(&response);
        assert!(!SharedRequest::new(&HeaderMap::new()).may_reuse(&forged, Duration::ZERO));
        forged.insert(VARY_FINGERPRINT, HeaderValue::from_static("00"));
        assert!(!SharedRequest::new(&HeaderMap::new()).may_reuse(&forged, Duration::ZERO));
        // Without Vary, a fingerprint (an origin's own header) is never reused either.
        let plain = h(&[
            ("cache-control", "max-age=60"),
            ("tower-redis-cache-vary", "x"),
        ]);
        assert!(!SharedRequest::new(&HeaderMap::new()).may_reuse(&plain, Duration::ZERO));
    }

    #[test]
    fn request_directives() {
        let entry = h(&[("cache-control", "max-age=600")]);
        let reuse = |request: &[(&'static str, &'static str)], age: u64| {
            SharedRequest::new(&h(request)).may_reuse(&entry, Duration::from_secs(age))
        };
        assert!(reuse(&[], 100));
        assert!(!reuse(&[("cache-control", "no-cache")], 0));
        assert!(!reuse(&[("pragma", "no-cache")], 0));
        assert!(reuse(
            &[("pragma", "no-cache"), ("cache-control", "max-stale")],
            0
        ));
        assert!(!reuse(&[("cache-control", "max-age=0")], 1));
        let refuses = |request| SharedRequest::new(&h(request)).refuses_stored();
        assert!(refuses(&[("cache-control", "no-cache")]));
        assert!(refuses(&[("cache-control", "max-age=0")]));
        assert!(!refuses(&[("cache-control", "max-age=1")]));
        assert!(!refuses(&[]));
        assert!(reuse(&[("cache-control", "max-age=60")], 60));
        assert!(!reuse(&[("cache-control", "max-age=60")], 61));
        // Advisory directives are ignored.
        assert!(reuse(
            &[("cache-control", "min-fresh=1000, only-if-cached, max-stale")],
            100
        ));
    }

    #[test]
    fn stale_windows_in_shared_mode() {
        let p = Policy::http_shared(MAX)
            .stale_while_revalidate(Duration::from_secs(30))
            .stale_if_error(Duration::from_secs(300));
        let w = |cc: &'static str| {
            let (a, b) = p.stale_windows(&h(&[("cache-control", cc)]));
            (a.as_secs(), b.as_secs())
        };
        assert_eq!(w("max-age=60"), (30, 300));
        assert_eq!(w("max-age=60, stale-while-revalidate=90"), (90, 300));
        assert_eq!(w("s-maxage=60"), (0, 0));
        assert_eq!(w("s-maxage=60, stale-while-revalidate=90"), (90, 0));
        assert_eq!(w("max-age=60, must-revalidate, stale-if-error=99"), (0, 0));
        assert_eq!(w("max-age=60, proxy-revalidate"), (0, 0));
        // Other modes keep their windows.
        let shared = Policy::shared(MAX).stale_if_error(Duration::from_secs(300));
        let (_, sie) =
            shared.stale_windows(&h(&[("cache-control", "s-maxage=60, must-revalidate")]));
        assert_eq!(sie.as_secs(), 300);
    }

    #[test]
    fn overrides_only_shorten() {
        let p = Policy::http_shared(MAX);
        let request = SharedRequest::new(&HeaderMap::new());
        let decide = |over| {
            ttl(storage(
                StatusCode::OK,
                &h(&[("cache-control", "max-age=100")]),
                over,
                &p,
                Some(&request),
                at(0),
                Duration::ZERO,
            ))
        };
        assert_eq!(
            decide(Some(CacheOverride::ttl(Duration::from_secs(10)))),
            Ok((10, 0))
        );
        assert_eq!(
            decide(Some(CacheOverride::ttl(Duration::from_secs(1000)))),
            Ok((100, 0))
        );
        assert_eq!(decide(Some(CacheOverride::skip())), Err(NotStored::Handler));
    }

    #[test]
    fn request_bypass_in_shared_mode() {
        use crate::outcome::BypassReason;
        let p = Policy::http_shared(MAX);
        assert_eq!(
            super::super::request_bypass(&h(&[("authorization", "x")]), true, &p, &[]),
            None
        );
        assert_eq!(
            super::super::request_bypass(&h(&[("cookie", "a=b")]), true, &p, &[]),
            Some(BypassReason::Cookie)
        );
        let open = Policy::http_shared(MAX).shared_for_authenticated();
        assert_eq!(
            super::super::request_bypass(&h(&[("cookie", "a=b")]), true, &open, &[]),
            None
        );
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn at(offset: i64) -> SystemTime {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        if offset < 0 {
            base - Duration::from_secs(offset.unsigned_abs())
        } else {
            base + Duration::from_secs(offset as u64)
        }
    }

    proptest! {
        /// Whatever the headers say, nothing panics, and what is stored is fresh for at
        /// least a millisecond and at most the policy's maximum from now.
        #[test]
        fn storage_is_bounded(
            cc in "[a-z0-9=, \"-]{0,40}",
            age in "[0-9a-z, ]{0,25}",
            vary in "[a-zA-Z*, -]{0,20}",
            status in 200u16..600,
            date in proptest::option::of(-100_000i64..100_000),
            expires in proptest::option::of(-100_000i64..100_000),
            modified in proptest::option::of(-10_000_000i64..100_000),
            delay_ms in 0u64..10_000,
        ) {
            let mut h = HeaderMap::new();
            for (name, value) in [("cache-control", cc), ("age", age), ("vary", vary)] {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(name, v);
                }
            }
            for (name, offset) in [("date", date), ("expires", expires), ("last-modified", modified)] {
                if let Some(offset) = offset {
                    h.insert(name, HeaderValue::from_str(&httpdate::fmt_http_date(at(offset))).unwrap());
                }
            }
            let max = Duration::from_secs(600);
            let request = SharedRequest::new(&h);
            let status = StatusCode::from_u16(status).unwrap();
            let decided = storage(status, &h, None, &Policy::http_shared(max), Some(&request), at(0), Duration::from_millis(delay_ms));
            if let Ok(s) = decided {
                prop_assert!(s.ttl >= s.age);
                let left = s.ttl - s.age;
                prop_assert!(left >= MIN_TTL && left <= max, "{:?}", s);
                let mut stored = h.clone();
                if let Some(fp) = s.vary {
                    stored.insert(VARY_FINGERPRINT, fp);
                }
                // The request it was stored for may reuse it (unless it refused reuse).
                prop_assert!(request.refuses_stored() || request.may_reuse(&stored, Duration::ZERO));
            }
        }
    }
}
