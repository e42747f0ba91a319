//! Shared-cache mode (`Policy::http_shared`): the origin's headers decide, as RFC 9111 says
//! for a shared cache. Through a real axum router whose handler sets the headers each test
//! asks for, and a redis-server of each test's own.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use common::{get as get_req, get_with, wait_until, Got, RedisServer};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tower_redis_cache::{CacheHandle, CacheLayer, Policy, RedisStore};

#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicUsize>,
    fail: Arc<AtomicBool>,
}

/// The origin: answers `#<call> <accept-language>` with the response headers named in the
/// query. `date`, `expires` and `last-modified` take seconds relative to now (`-40`);
/// `status` sets the status and `delay` (ms) makes it slow. While `fail` is set it answers
/// 503.
async fn origin(
    State(o): State<Origin>,
    Query(query): Query<Vec<(String, String)>>,
    request: HeaderMap,
) -> Response {
    let n = o.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let lang = request
        .get("accept-language")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let mut res = format!("#{n} {lang}").into_response();
    if o.fail.load(Ordering::SeqCst) {
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return res;
    }
    for (name, value) in query {
        if name == "delay" {
            tokio::time::sleep(Duration::from_millis(value.parse().unwrap())).await;
            continue;
        }
        if name == "status" {
            *res.status_mut() = StatusCode::from_u16(value.parse().unwrap()).unwrap();
            continue;
        }
        let value = if ["date", "expires", "last-modified"].contains(&name.as_str()) {
            let offset: i64 = value.parse().unwrap();
            let now = SystemTime::now();
            let at = if offset < 0 {
                now - Duration::from_secs(offset.unsigned_abs())
            } else {
                now + Duration::from_secs(offset as u64)
            };
            httpdate::fmt_http_date(at)
        } else {
            value
        };
        res.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(&value).unwrap(),
        );
    }
    res
}

struct Proxy {
    app: Router,
    handle: CacheHandle,
    origin: Origin,
    _server: RedisServer,
}

impl Proxy {
    async fn start(policy: Policy) -> Self {
        let server = RedisServer::start();
        let store = RedisStore::connect(common::relaxed_config(&server.url()))
            .await
            .unwrap();
        let cache = CacheLayer::new(store, policy);
        let handle = cache.handle();
        let o = Origin::default();
        let app = Router::new()
            .route("/{*path}", get(origin))
            .with_state(o.clone())
            .layer(cache);
        Proxy {
            app,
            handle,
            origin: o,
            _server: server,
        }
    }

    async fn get(&self, uri: &str) -> Got {
        common::send(&self.app, get_req(uri)).await
    }

    async fn get_with(&self, uri: &str, headers: &[(&str, &str)]) -> Got {
        common::send(&self.app, get_with(uri, headers)).await
    }

    fn calls(&self) -> usize {
        self.origin.calls.load(Ordering::SeqCst)
    }

    /// Waits until `n` responses were stored in all.
    async fn stored(&self, n: u64) {
        wait_until(&format!("{n} stored"), || self.handle.stats().stored >= n).await;
        assert_eq!(
            self.handle.stats().stored,
            n,
            "more responses stored than expected"
        );
    }

    /// Sends `uri` twice (with `headers`): both reach the origin, and nothing was stored
    /// (checked after a storable response sent in between was stored).
    async fn not_stored(&self, uri: &str, headers: &[(&str, &str)]) {
        let before = self.handle.stats().stored;
        let calls = self.calls();
        let first = self.get_with(uri, headers).await;
        assert_eq!(first.x_cache(), "MISS", "{uri}");
        // A storable response: once it is stored, any write of the first would have been
        // started before it.
        let marker = format!("/marker/{}?cache-control=max-age=60", before);
        self.get(&marker).await;
        self.stored(before + 1).await;
        let second = self.get_with(uri, headers).await;
        assert_ne!(second.x_cache(), "HIT", "{uri} was stored");
        assert_eq!(self.calls(), calls + 3, "{uri}");
        assert_eq!(self.handle.stats().stored, before + 1, "{uri} was stored");
    }
}

fn ttl(got: &Got) -> u64 {
    let status = got.header("cache-status").unwrap();
    let ttl = status.split("ttl=").nth(1).expect("a hit's ttl");
    ttl.parse().unwrap()
}

fn age(got: &Got) -> u64 {
    got.header("age").unwrap().parse().unwrap()
}

fn max() -> Policy {
    Policy::http_shared(Duration::from_secs(3600))
}

#[tokio::test]
async fn freshness_comes_from_s_maxage_then_max_age_then_expires() {
    let p = Proxy::start(max()).await;

    let uri = "/a?cache-control=max-age=600";
    assert_eq!(p.get(uri).await.x_cache(), "MISS");
    p.stored(1).await;
    let hit = p.get(uri).await;
    assert_eq!((hit.x_cache(), hit.text().as_str()), ("HIT", "#1 -"));
    assert!((500..=600).contains(&ttl(&hit)), "{}", ttl(&hit));
    // The origin's Cache-Control, untouched: the layer adds no max-age of its own.
    assert_eq!(hit.header("cache-control"), Some("max-age=600"));

    let uri = "/b?cache-control=max-age=600,s-maxage=120";
    p.get(uri).await;
    p.stored(2).await;
    let hit = p.get(uri).await;
    assert!((20..=120).contains(&ttl(&hit)), "{}", ttl(&hit));

    // Expires against Date.
    let uri = "/c?date=0&expires=300";
    p.get(uri).await;
    p.stored(3).await;
    let hit = p.get(uri).await;
    assert!((200..=300).contains(&ttl(&hit)), "{}", ttl(&hit));

    // Bounded by the policy's maximum.
    let uri = "/d?cache-control=public,max-age=86400";
    p.get(uri).await;
    p.stored(4).await;
    assert!(ttl(&p.get(uri).await) <= 3600);

    // Expired or invalid Expires, max-age=0: not stored.
    p.not_stored("/e?date=0&expires=-10", &[]).await;
    p.not_stored("/f?expires=0", &[]).await;
    p.not_stored("/g?cache-control=max-age=0", &[]).await;
    // No freshness at all, and no Last-Modified for a heuristic.
    p.not_stored("/h", &[]).await;
}

#[tokio::test]
async fn age_is_taken_off_and_hits_carry_the_true_age() {
    let p = Proxy::start(max()).await;

    let uri = "/a?cache-control=max-age=100&age=30";
    p.get(uri).await;
    p.stored(1).await;
    let hit = p.get(uri).await;
    assert_eq!(hit.x_cache(), "HIT");
    assert!((20..=70).contains(&ttl(&hit)), "ttl {}", ttl(&hit));
    assert!((30..=80).contains(&age(&hit)), "age {}", age(&hit));

    // The age seen from Date.
    let uri = "/b?cache-control=max-age=100&date=-40";
    p.get(uri).await;
    p.stored(2).await;
    let hit = p.get(uri).await;
    assert!((10..=60).contains(&ttl(&hit)), "ttl {}", ttl(&hit));
    assert!(age(&hit) >= 40, "age {}", age(&hit));

    // Stale on arrival: not stored.
    p.not_stored("/c?cache-control=max-age=100&age=100", &[])
        .await;
    p.not_stored("/d?cache-control=max-age=100&date=-200", &[])
        .await;
}

#[tokio::test]
async fn heuristic_freshness_from_last_modified() {
    let p = Proxy::start(max()).await;

    // Modified 10,000 s ago: fresh for 10 % of that.
    let uri = "/a?date=0&last-modified=-10000";
    p.get(uri).await;
    p.stored(1).await;
    let hit = p.get(uri).await;
    assert_eq!(hit.x_cache(), "HIT");
    assert!((900..=1000).contains(&ttl(&hit)), "{}", ttl(&hit));

    // 404 is heuristically cacheable too; 302 is not, unless explicitly fresh or public.
    let uri = "/b?status=404&date=0&last-modified=-10000";
    p.get(uri).await;
    p.stored(2).await;
    assert_eq!(p.get(uri).await.status, 404);
    p.not_stored("/c?status=302&location=/x&date=0&last-modified=-10000", &[])
        .await;
    let uri = "/d?status=302&location=/x&cache-control=max-age=60";
    p.get(uri).await;
    p.stored(4).await;
    assert_eq!(p.get(uri).await.x_cache(), "HIT");
    // Explicit freshness wins over the heuristic.
    let uri = "/e?date=0&last-modified=-10000&cache-control=max-age=5";
    p.get(uri).await;
    p.stored(5).await;
    assert!(ttl(&p.get(uri).await) <= 5);
    // Errors without explicit freshness are not stored.
    p.not_stored("/f?status=500&date=0&last-modified=-10000", &[])
        .await;
}

#[tokio::test]
async fn private_no_store_no_cache_and_set_cookie_are_not_stored() {
    let p = Proxy::start(max()).await;
    for uri in [
        "/a?cache-control=private,max-age=60",
        "/b?cache-control=max-age=60,no-store",
        "/c?cache-control=no-cache,max-age=60",
        "/d?cache-control=max-age=60&set-cookie=s=1",
        "/e?cache-control=max-age=60&vary=*",
    ] {
        p.not_stored(uri, &[]).await;
    }
}

#[tokio::test]
async fn request_directives() {
    let p = Proxy::start(max()).await;
    let uri = "/a?cache-control=max-age=600";

    // no-store on the request: the response is not stored.
    p.not_stored(uri, &[("cache-control", "no-store")]).await;
    p.get(uri).await;
    p.stored(2).await; // the marker's and this one
    let calls = p.calls();
    assert_eq!(p.get(uri).await.text(), format!("#{calls} -"));

    // no-cache: to the origin, and its response replaces the stored one.
    let fresh = p.get_with(uri, &[("cache-control", "no-cache")]).await;
    assert_eq!(fresh.x_cache(), "MISS");
    assert_eq!(fresh.text(), format!("#{} -", calls + 1));
    p.stored(3).await;
    assert_eq!(p.get(uri).await.text(), fresh.text());
    let r = p.get_with(uri, &[("pragma", "no-cache")]).await;
    assert_eq!(r.x_cache(), "MISS");
    p.stored(4).await;
    // What browsers send on reload.
    let r = p.get_with(uri, &[("cache-control", "max-age=0")]).await;
    assert_eq!(r.x_cache(), "MISS");
    p.stored(5).await;

    // max-age: a stored response older than that is not used.
    let r = p.get_with(uri, &[("cache-control", "max-age=3600")]).await;
    assert_eq!(r.x_cache(), "HIT");
    let old = "/b?cache-control=max-age=600&age=100";
    p.get(old).await;
    p.stored(6).await;
    assert_eq!(p.get(old).await.x_cache(), "HIT");
    let r = p.get_with(old, &[("cache-control", "max-age=50")]).await;
    assert_eq!(r.x_cache(), "MISS");
}

#[tokio::test]
async fn authorization_needs_public_s_maxage_or_must_revalidate() {
    let p = Proxy::start(max()).await;
    let auth = [("authorization", "Bearer secret")];

    // Not marked shareable: an authenticated request's response is not stored...
    p.not_stored("/a?cache-control=max-age=60", &auth).await;
    // ...and an anonymous request's entry is not served to an authenticated one.
    let uri = "/b?cache-control=max-age=60";
    p.get(uri).await;
    p.stored(2).await;
    assert_eq!(p.get(uri).await.x_cache(), "HIT");
    let r = p.get_with(uri, &auth).await;
    assert_eq!(r.x_cache(), "MISS");

    // Marked shareable: stored from an authenticated request, served to everybody.
    for (i, cc) in [
        "public,max-age=60",
        "s-maxage=60",
        "max-age=60,must-revalidate",
    ]
    .iter()
    .enumerate()
    {
        let uri = format!("/c{i}?cache-control={cc}");
        let first = p.get_with(&uri, &auth).await;
        assert_eq!(first.x_cache(), "MISS");
        p.stored(3 + i as u64).await;
        let r = p.get_with(&uri, &[("authorization", "Bearer other")]).await;
        assert_eq!((r.x_cache(), r.text()), ("HIT", first.text()), "{cc}");
        assert_eq!(p.get(&uri).await.x_cache(), "HIT", "{cc}");
    }
}

#[tokio::test]
async fn vary_never_serves_another_variant() {
    let p = Proxy::start(max()).await;
    let uri = "/a?cache-control=max-age=600&vary=accept-language";
    let fr = [("accept-language", "fr")];
    let en = [("accept-language", "en")];

    assert_eq!(p.get_with(uri, &fr).await.text(), "#1 fr");
    p.stored(1).await;
    let r = p.get_with(uri, &fr).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "#1 fr"));
    assert!(r.header("tower-redis-cache-vary").is_none());
    // Another value, or none: a miss, never the French response.
    let r = p.get_with(uri, &en).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "#2 en"));
    p.stored(2).await;
    let r = p.get_with(uri, &en).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "#2 en"));
    // One variant per key: English replaced French.
    let r = p.get_with(uri, &fr).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "#3 fr"));
    p.stored(3).await;
    assert_eq!(p.get(uri).await.text(), "#4 -");

    // Keyed on the header: a variant per value, each kept.
    let p = Proxy::start(max().key_header(http::header::ACCEPT_LANGUAGE)).await;
    p.get_with(uri, &fr).await;
    p.get_with(uri, &en).await;
    p.stored(2).await;
    assert_eq!(p.get_with(uri, &fr).await.text(), "#1 fr");
    assert_eq!(p.get_with(uri, &en).await.text(), "#2 en");
    assert_eq!(p.calls(), 2);
}

#[tokio::test]
async fn coalesced_requests_get_only_their_own_variant() {
    let p = Proxy::start(max()).await;
    let uri = "/a?delay=200&cache-control=max-age=600&vary=accept-language";
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let app = p.app.clone();
            let lang = if i % 2 == 0 { "fr" } else { "en" };
            tokio::spawn(async move {
                let r = common::send(&app, get_with(uri, &[("accept-language", lang)])).await;
                (lang, r.text())
            })
        })
        .collect();
    for t in tasks {
        let (lang, text) = t.await.unwrap();
        assert!(text.ends_with(&format!(" {lang}")), "{lang} got {text}");
    }
}

#[tokio::test]
async fn must_revalidate_and_s_maxage_forbid_the_routes_stale_windows() {
    let policy = max().stale_if_error(Duration::from_secs(600));
    let p = Proxy::start(policy).await;
    let plain = "/a?cache-control=max-age=1";
    let strict = "/b?cache-control=max-age=1,must-revalidate";
    let shared = "/c?cache-control=s-maxage=1";
    for uri in [plain, strict, shared] {
        p.get(uri).await;
    }
    p.stored(3).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // all stale now
    p.origin.fail.store(true, Ordering::SeqCst);
    let r = p.get(plain).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "STALE"));
    for uri in [strict, shared] {
        let r = p.get(uri).await;
        assert_eq!(r.status, 503, "{uri}: a stale response served");
    }
}

#[tokio::test]
async fn the_responses_own_stale_while_revalidate_applies_with_s_maxage() {
    let p = Proxy::start(max()).await;
    let uri = "/a?cache-control=s-maxage=1,stale-while-revalidate=600";
    let strict = "/b?cache-control=s-maxage=1,stale-while-revalidate=600,must-revalidate";
    assert_eq!(p.get(uri).await.text(), "#1 -");
    assert_eq!(p.get(strict).await.text(), "#2 -");
    p.stored(2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // stale now
    let r = p.get(uri).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("STALE", "#1 -"));
    let r = p.get(strict).await;
    assert_eq!(r.x_cache(), "MISS", "must-revalidate: no stale response");
}

#[tokio::test]
async fn cookies_pass_through_unless_declared() {
    let p = Proxy::start(max()).await;
    let uri = "/a?cache-control=max-age=60";
    let r = p.get_with(uri, &[("cookie", "session=1")]).await;
    assert_eq!(r.x_cache(), "BYPASS");

    let p = Proxy::start(max().shared_for_authenticated()).await;
    p.get_with(uri, &[("cookie", "session=1")]).await;
    p.stored(1).await;
    let r = p.get_with(uri, &[("cookie", "session=2")]).await;
    assert_eq!(r.x_cache(), "HIT");
    // Vary: Cookie keeps them apart.
    let uri = "/b?cache-control=max-age=60&vary=cookie";
    p.get_with(uri, &[("cookie", "session=1")]).await;
    p.stored(2).await;
    let r = p.get_with(uri, &[("cookie", "session=2")]).await;
    assert_eq!(r.x_cache(), "MISS");
}

/// A stored response being replaced (here by `no-cache` requests) stays served until its
/// replacement is confirmed: readers never see a gap while a write checks for invalidations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_being_replaced_is_served_until_the_new_one_lands() {
    let p = Proxy::start(max()).await;
    let uri = "/r?cache-control=max-age=600";
    p.get(uri).await;
    p.stored(1).await;
    let ended = |p: &Proxy| {
        let s = p.handle.stats();
        s.stored + s.refused
    };
    for round in 1..=5u64 {
        let writers: Vec<_> = (0..10)
            .map(|_| {
                let app = p.app.clone();
                tokio::spawn(async move {
                    common::send(&app, get_with(uri, &[("cache-control", "no-cache")])).await
                })
            })
            .collect();
        // Read while the writes run (and a little after).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut reads = 0;
        while ended(&p) < 1 + 10 * round || reads < 20 {
            assert_eq!(
                p.get(uri).await.x_cache(),
                "HIT",
                "read {reads} of round {round}"
            );
            reads += 1;
            assert!(std::time::Instant::now() < deadline, "writes never ended");
        }
        for w in writers {
            assert_eq!(w.await.unwrap().x_cache(), "MISS");
        }
    }
    // Concurrent writers of one key share its pending slot: the last one's write lands, the
    // others' are withdrawn (counted as refused).
    assert!(p.handle.stats().stored >= 6);
}
