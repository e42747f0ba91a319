//! Conditional requests (ETag / 304, If-Modified-Since) and TTLs from the response's own
//! headers, through a real axum router against a real redis-server.

mod common;

use std::time::Duration;

use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use common::{get as get_req, get_with, send, wait_until, RedisServer};
use fred::prelude::KeysInterface;
use http::HeaderValue;
use tower_redis_cache::{CacheHandle, CacheLayer, Policy, RedisStore, RequestKey};

async fn setup(server: &RedisServer, policy: Policy) -> (Router, CacheHandle, RedisStore) {
    let store = RedisStore::connect(common::relaxed_config(&server.url()))
        .await
        .unwrap();
    let cache = CacheLayer::new(store.clone(), policy);
    let handle = cache.handle();
    let app = Router::new()
        .route("/plain", get(|| async { "plain body" }))
        .route(
            "/own-etag",
            get(|| async {
                let mut r = "tagged".into_response();
                r.headers_mut()
                    .insert("etag", HeaderValue::from_static("W/\"v7\""));
                r.headers_mut().insert(
                    "last-modified",
                    HeaderValue::from_static("Wed, 25 Nov 2026 10:00:00 GMT"),
                );
                r
            }),
        )
        .route(
            "/fresh/{secs}",
            get(
                |axum::extract::Path(secs): axum::extract::Path<u64>| async move {
                    let mut r = "fresh".into_response();
                    r.headers_mut().insert(
                        "cache-control",
                        HeaderValue::from_str(&format!("public, max-age={secs}")).unwrap(),
                    );
                    r
                },
            ),
        )
        .layer(cache);
    (app, handle, store)
}

#[tokio::test]
async fn hits_carry_a_strong_etag_and_answer_304() {
    let server = RedisServer::start();
    let (app, handle, _) = setup(&server, Policy::shared(Duration::from_secs(60))).await;
    send(&app, get_req("/plain")).await;
    wait_until("stored", || handle.stats().stored == 1).await;
    let hit = send(&app, get_req("/plain")).await;
    let etag = hit.header("etag").unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.len() == 34, "{etag}");
    // Stable: the same body gives the same tag in any process (a hash of the body).
    let expected = format!("\"{}\"", &blake3::hash(b"plain body").to_hex()[..32]);
    assert_eq!(etag, expected);

    for (inm, status) in [
        (etag.as_str(), 304),
        ("\"other\"", 200),
        ("*", 304),
        (&format!("\"x\", W/{etag}") as &str, 304),
    ] {
        let r = send(&app, get_with("/plain", &[("if-none-match", inm)])).await;
        assert_eq!(r.status, status, "{inm}");
        if status == 304 {
            assert!(r.body.is_empty());
            assert_eq!(r.header("etag"), Some(etag.as_str()));
            assert_eq!(r.x_cache(), "HIT");
            // The length a 200 would have had, never a misleading 0 (RFC 9110 §8.6).
            assert_eq!(r.header("content-length"), Some("10"));
        } else {
            assert_eq!(r.text(), "plain body");
        }
    }
}

#[tokio::test]
async fn the_handlers_own_validators_are_used() {
    let server = RedisServer::start();
    let (app, handle, _) = setup(&server, Policy::shared(Duration::from_secs(60))).await;
    send(&app, get_req("/own-etag")).await;
    wait_until("stored", || handle.stats().stored == 1).await;
    let hit = send(&app, get_req("/own-etag")).await;
    assert_eq!(hit.header("etag"), Some("W/\"v7\""));
    assert_eq!(
        send(&app, get_with("/own-etag", &[("if-none-match", "\"v7\"")]))
            .await
            .status,
        304
    );
    let ims = |d: &str| get_with("/own-etag", &[("if-modified-since", d)]);
    assert_eq!(
        send(&app, ims("Wed, 25 Nov 2026 10:00:00 GMT"))
            .await
            .status,
        304
    );
    assert_eq!(
        send(&app, ims("Thu, 26 Nov 2026 10:00:00 GMT"))
            .await
            .status,
        304
    );
    assert_eq!(
        send(&app, ims("Tue, 24 Nov 2026 10:00:00 GMT"))
            .await
            .status,
        200
    );
    assert_eq!(send(&app, ims("not a date")).await.status, 200);
    // If-None-Match wins over If-Modified-Since.
    let both = get_with(
        "/own-etag",
        &[
            ("if-none-match", "\"nope\""),
            ("if-modified-since", "Thu, 26 Nov 2026 10:00:00 GMT"),
        ],
    );
    assert_eq!(send(&app, both).await.status, 200);
    // A miss is never answered 304 by the cache.
    let (app2, _, _) = setup(&server, Policy::shared(Duration::from_secs(60)).etag(false)).await;
    let r = send(&app2, get_with("/plain", &[("if-none-match", "*")])).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn ttls_from_the_response_are_clamped() {
    let server = RedisServer::start();
    let policy = Policy::shared(Duration::from_secs(60))
        .ttl_from_response(Duration::from_secs(10), Duration::from_secs(300));
    let (app, handle, store) = setup(&server, policy).await;
    for (secs, expected) in [(120u64, 120i64), (5, 10), (86_400, 300)] {
        let uri = format!("/fresh/{secs}");
        let before = handle.stats().stored;
        send(&app, get_req(&uri)).await;
        wait_until("stored", || handle.stats().stored > before).await;
        let key = handle.key(&RequestKey::new(&uri).route("/fresh/{secs}"));
        let pttl: i64 = store.pool().pttl(&key).await.unwrap();
        assert!(
            pttl > (expected - 2) * 1000 && pttl <= expected * 1000,
            "{secs}: {pttl}"
        );
    }
    // max-age=0: not stored.
    for _ in 0..2 {
        assert_eq!(send(&app, get_req("/fresh/0")).await.x_cache(), "MISS");
    }
}

// A refresh or a coalescing leader's call is the cache's own request: the client's
// conditional headers are not sent to the handler (issue 12), on both stores.
mod refreshes {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::common::stores::{Backing, Kind};

    crate::on_both_stores!(
        a_leaders_call_carries_no_conditional_headers,
        a_refresh_carries_no_conditional_headers,
    );

    const CONDITIONALS: [(&str, &str); 5] = [
        ("if-none-match", "\"same\""),
        ("if-modified-since", "Wed, 25 Nov 2026 10:00:00 GMT"),
        ("if-match", "\"same\""),
        ("if-unmodified-since", "Wed, 25 Nov 2026 10:00:00 GMT"),
        ("if-range", "\"same\""),
    ];

    /// `/doc` answers version n with the same validators each time, and 304 when the
    /// request's `If-None-Match` or `If-Modified-Since` match them, as handlers do; it
    /// records the conditional headers it was sent.
    async fn app(
        kind: Kind,
        policy: Policy,
    ) -> (Backing, Router, CacheHandle, Arc<Mutex<Vec<String>>>) {
        let backing = Backing::start(kind);
        let cache = CacheLayer::new(backing.store().await, policy);
        let handle = cache.handle();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let app = Router::new()
            .route(
                "/doc",
                get(move |headers: http::HeaderMap| {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    for (name, _) in CONDITIONALS {
                        if headers.contains_key(name) {
                            s.lock().unwrap().push(format!("call {n}: {name}"));
                        }
                    }
                    async move {
                        let unchanged = headers
                            .get("if-none-match")
                            .is_some_and(|v| v == "\"same\"")
                            || headers.contains_key("if-modified-since");
                        let mut r = if unchanged {
                            http::StatusCode::NOT_MODIFIED.into_response()
                        } else {
                            format!("version {n}").into_response()
                        };
                        r.headers_mut()
                            .insert("etag", HeaderValue::from_static("\"same\""));
                        r.headers_mut().insert(
                            "last-modified",
                            HeaderValue::from_static("Wed, 25 Nov 2026 10:00:00 GMT"),
                        );
                        r
                    }
                }),
            )
            .layer(cache);
        (backing, app, handle, seen)
    }

    async fn a_leaders_call_carries_no_conditional_headers(kind: Kind) {
        let (_backing, app, handle, seen) =
            app(kind, Policy::shared(Duration::from_secs(60))).await;
        // A cold key: this request leads the miss; its entry is for everybody.
        let r = send(&app, get_with("/doc", &CONDITIONALS)).await;
        assert_eq!(r.x_cache(), "MISS");
        wait_until("stored", || handle.stats().stored == 1).await;
        assert_eq!(*seen.lock().unwrap(), Vec::<String>::new());
        let r = send(&app, get_req("/doc")).await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str(), r.x_cache()),
            (200, "version 1", "HIT")
        );
        // The client's own conditional is answered by the cache from the entry.
        let r = send(&app, get_with("/doc", &[CONDITIONALS[0]])).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (304, "HIT"));
    }

    async fn a_refresh_carries_no_conditional_headers(kind: Kind) {
        let policy =
            Policy::shared(Duration::from_secs(1)).stale_while_revalidate(Duration::from_secs(60));
        let (_backing, app, handle, seen) = app(kind, policy).await;
        assert_eq!(send(&app, get_req("/doc")).await.text(), "version 1");
        wait_until("stored", || handle.stats().stored == 1).await;
        tokio::time::sleep(Duration::from_millis(1200)).await; // stale now
                                                               // The client revalidates its copy: answered from the stale entry, which is refreshed.
        let r = send(&app, get_with("/doc", &[CONDITIONALS[0], CONDITIONALS[1]])).await;
        assert_eq!(r.status, 304);
        wait_until("the refresh stored", || handle.stats().stored == 2).await;
        assert_eq!(*seen.lock().unwrap(), Vec::<String>::new());
        let r = send(&app, get_req("/doc")).await;
        assert_eq!((r.text().as_str(), r.x_cache()), ("version 2", "HIT"));
    }
}
