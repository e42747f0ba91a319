//! stale-if-error: a stale entry answers when the inner service fails.

mod common;

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use common::{get as get_req, read, wait_until, RedisServer};
use http::{Request, Response, StatusCode};
use tower::ServiceExt;
use tower_redis_cache::{CacheLayer, Policy, RedisStore};

/// 0: answer 200; 1: answer 503; 2: fail with an error.
#[tokio::test]
async fn a_stale_entry_answers_when_the_handler_fails() {
    let server = RedisServer::start();
    let store = RedisStore::connect(common::relaxed_config(&server.url()))
        .await
        .unwrap();
    // A 2 s TTL: long enough that a loaded machine still finds the entry fresh right after
    // storing it.
    let policy = Policy::shared(Duration::from_secs(2)).stale_if_error(Duration::from_secs(60));
    let cache = CacheLayer::new(store, policy);
    let handle = cache.handle();
    let mode = Arc::new(AtomicU8::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (m, c) = (mode.clone(), calls.clone());
    let svc = tower::ServiceBuilder::new()
        .layer(cache)
        .service(tower::service_fn(move |_req: Request<Body>| {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            let mode = m.load(Ordering::SeqCst);
            async move {
                match mode {
                    0 => Ok(Response::new(Body::from(format!("good #{n}")))),
                    1 => {
                        let mut r = Response::new(Body::from("down"));
                        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        Ok(r)
                    }
                    _ => Err(std::io::Error::other("handler failed")),
                }
            }
        }));
    let send = |uri: &'static str| {
        let svc = svc.clone();
        async move {
            match svc.oneshot(get_req(uri)).await {
                Ok(res) => Ok(read(res.map(Body::new)).await),
                Err(e) => Err(e),
            }
        }
    };

    send("/a").await.unwrap();
    wait_until("stored", || handle.stats().stored == 1).await;
    assert_eq!(send("/a").await.unwrap().x_cache(), "HIT");
    tokio::time::sleep(Duration::from_millis(2100)).await; // past freshness

    mode.store(1, Ordering::SeqCst);
    let r = send("/a").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text().as_str(), r.x_cache()),
        (200, "good #1", "STALE")
    );
    assert!(r.header("cache-status").unwrap().contains("fwd=stale"));
    mode.store(2, Ordering::SeqCst);
    let r = send("/a").await.unwrap();
    assert_eq!((r.text().as_str(), r.x_cache()), ("good #1", "STALE"));
    assert_eq!(handle.stats().stale_if_error, 2);

    // Without a stale entry, failures pass through unchanged.
    let r = send("/b").await;
    assert!(r.is_err(), "the inner error type passes through");
    mode.store(1, Ordering::SeqCst);
    assert_eq!(send("/b").await.unwrap().status, 503);

    // When the handler answers again, the stale entry is replaced.
    mode.store(0, Ordering::SeqCst);
    let r = send("/a").await.unwrap();
    assert_eq!(
        (r.x_cache(), r.text().starts_with("good #")),
        ("MISS", true)
    );
    let fresh = r.text();
    wait_until("stored", || handle.stats().stored == 2).await;
    assert_eq!(send("/a").await.unwrap().text(), fresh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_entries_are_served_at_once_and_refreshed_once() {
    use axum::routing::get;
    let server = RedisServer::start();
    let store = RedisStore::connect(common::relaxed_config(&server.url()))
        .await
        .unwrap();
    let policy =
        Policy::shared(Duration::from_secs(2)).stale_while_revalidate(Duration::from_secs(60));
    let cache = CacheLayer::new(store, policy);
    let handle = cache.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = axum::Router::new()
        .route(
            "/v",
            get(move || {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    // Slow, so that the refresh cannot end before the ten lookups below.
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    format!("version {n}")
                }
            }),
        )
        .layer(cache);

    assert_eq!(common::send(&app, get_req("/v")).await.text(), "version 1");
    wait_until("stored", || handle.stats().stored == 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await; // stale now

    // Ten concurrent requests: all get the stale entry at once, one refresh runs.
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { common::send(&app, get_req("/v")).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!((r.text().as_str(), r.x_cache()), ("version 1", "STALE"));
        assert_eq!(
            r.header("cache-status"),
            Some("tower-redis-cache; hit; fwd=stale")
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "not waiting for the 1.5 s handler"
    );
    wait_until("the refresh stored", || handle.stats().stored == 2).await;
    assert_eq!(handle.stats().refreshes, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let r = common::send(&app, get_req("/v")).await;
    assert_eq!((r.text().as_str(), r.x_cache()), ("version 2", "HIT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responses_own_stale_directives_apply() {
    use axum::response::IntoResponse;
    use axum::routing::get;
    let server = RedisServer::start();
    let store = RedisStore::connect(common::relaxed_config(&server.url()))
        .await
        .unwrap();
    // No stale windows on the route: they come from the response.
    let cache = CacheLayer::new(store, Policy::shared(Duration::from_millis(300)));
    let handle = cache.handle();
    let mode = Arc::new(AtomicU8::new(0));
    let m = mode.clone();
    let app = axum::Router::new()
        .route(
            "/swr",
            get(|| async {
                let mut r = "swr".into_response();
                r.headers_mut().insert(
                    "cache-control",
                    http::HeaderValue::from_static("max-age=1, stale-while-revalidate=60"),
                );
                r
            }),
        )
        .route(
            "/sie",
            get(move || {
                let fail = m.load(Ordering::SeqCst) == 1;
                async move {
                    let mut r = "sie".into_response();
                    r.headers_mut().insert(
                        "cache-control",
                        http::HeaderValue::from_static("max-age=1, stale-if-error=60"),
                    );
                    if fail {
                        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    r
                }
            }),
        )
        .layer(cache);
    common::send(&app, get_req("/swr")).await;
    common::send(&app, get_req("/sie")).await;
    wait_until("stored", || handle.stats().stored == 2).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = common::send(&app, get_req("/swr")).await;
    assert_eq!(r.x_cache(), "STALE");
    mode.store(1, Ordering::SeqCst);
    let r = common::send(&app, get_req("/sie")).await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str(), r.x_cache()),
        (200, "sie", "STALE")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_entries_are_refreshed_early() {
    use axum::routing::get;
    let server = RedisServer::start();
    let app_with = |beta: f64, ns: &'static str| {
        let url = server.url();
        async move {
            let store = RedisStore::connect(common::relaxed_config(&url))
                .await
                .unwrap();
            let cache = CacheLayer::new(
                store,
                Policy::shared(Duration::from_secs(2)).early_refresh(beta),
            )
            .namespace(ns)
            .unwrap();
            let handle = cache.handle();
            let calls = Arc::new(AtomicUsize::new(0));
            let c = calls.clone();
            let app = axum::Router::new()
                .route(
                    "/hot",
                    get(move || {
                        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                        async move {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            format!("version {n}")
                        }
                    }),
                )
                .layer(cache);
            (app, handle)
        }
    };
    // A huge beta: the first hit already refreshes. Computing took at least 200 ms, so the gap
    // drawn is 200 ms x 1e9 x X with X exponential (mean 1); it falls short of the 2 s TTL only
    // when X < 1e-8, one chance in a hundred million.
    let (app, handle) = app_with(1e9, "early").await;
    common::send(&app, get_req("/hot")).await;
    wait_until("stored", || handle.stats().stored == 1).await;
    let r = common::send(&app, get_req("/hot")).await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "version 1"),
        "served at once"
    );
    wait_until("the early refresh stored", || handle.stats().stored == 2).await;
    assert_eq!(handle.stats().refreshes, 1);
    assert_eq!(
        common::send(&app, get_req("/hot")).await.text(),
        "version 2"
    );

    // A tiny beta: no early refresh this far from expiry.
    let (app, handle) = app_with(0.000_001, "late").await;
    common::send(&app, get_req("/hot")).await;
    wait_until("stored", || handle.stats().stored == 1).await;
    for _ in 0..5 {
        assert_eq!(
            common::send(&app, get_req("/hot")).await.text(),
            "version 1"
        );
    }
    assert_eq!(handle.stats().refreshes, 0);
}

// Stale data after a refusal (issue 12, item 7): on both stores.
mod refusals {
    use super::*;
    use crate::common::stores::{Backing, Kind};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use tower_redis_cache::Identity;

    crate::on_both_stores!(
        a_refused_refresh_removes_the_stale_entry,
        a_no_store_refresh_removes_the_stale_entry,
        per_user_routes_ignore_the_responses_own_stale_directives,
        a_refusal_is_not_an_error_and_removes_the_stale_entry,
        a_refused_early_refresh_removes_the_entry,
        a_write_computed_before_a_refusal_never_lands_after_it,
        a_per_user_route_may_opt_in_to_the_responses_stale_directives,
    );

    /// What the handler answers: 0 a 200, 1 a 403, 2 a 500, 3 a 200 with `no-store`,
    /// 4 a 404, 5 a 401.
    #[derive(Clone, Default)]
    struct Answer(Arc<AtomicU8>);

    impl Answer {
        fn set(&self, mode: u8) {
            self.0.store(mode, Ordering::SeqCst);
        }
        fn respond(&self, n: usize, cache_control: Option<&'static str>) -> Response<Body> {
            let mut r = match self.0.load(Ordering::SeqCst) {
                1 => (StatusCode::FORBIDDEN, "revoked").into_response(),
                2 => (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response(),
                4 => (StatusCode::NOT_FOUND, "gone").into_response(),
                5 => (StatusCode::UNAUTHORIZED, "who are you").into_response(),
                mode => {
                    let mut r = format!("secret #{n}").into_response();
                    if mode == 3 {
                        r.headers_mut()
                            .insert("cache-control", http::HeaderValue::from_static("no-store"));
                    }
                    r
                }
            };
            if let (Some(cc), false) = (cache_control, r.headers().contains_key("cache-control")) {
                r.headers_mut()
                    .insert("cache-control", http::HeaderValue::from_static(cc));
            }
            r
        }
    }

    struct App {
        app: axum::Router,
        handle: tower_redis_cache::CacheHandle,
        answer: Answer,
        calls: Arc<AtomicUsize>,
        backing: Backing,
    }

    impl App {
        async fn get(&self, user: &str) -> common::Got {
            common::send(&self.app, common::get_with("/p", &[("x-user", user)])).await
        }
        /// Entries of the namespace (pending values and indexes aside).
        fn entries(&self) -> usize {
            self.backing.keys("refusals:v*").len()
        }
    }

    /// A router whose `/p` answers what `answer` says, optionally with `cache_control` on
    /// its responses, cached under `policy` with identities from `x-user`.
    async fn app(kind: Kind, policy: Policy, cache_control: Option<&'static str>) -> App {
        let backing = Backing::start(kind);
        let cache = CacheLayer::new(backing.store().await, policy)
            .namespace("refusals")
            .unwrap()
            .identity(Identity::header(http::HeaderName::from_static("x-user")));
        let handle = cache.handle();
        let answer = Answer::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let (a, c) = (answer.clone(), calls.clone());
        let app = axum::Router::new()
            .route(
                "/p",
                get(move || {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    let r = a.respond(n, cache_control);
                    async move { r }
                }),
            )
            .layer(cache);
        App {
            app,
            handle,
            answer,
            calls,
            backing,
        }
    }

    /// Stores user a's entry, then lets it go stale (its TTL is 1 s).
    async fn stored_then_stale(app: &App) {
        let r = app.get("a").await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "secret #1"));
        wait_until("stored", || app.handle.stats().stored == 1).await;
        assert_eq!(app.entries(), 1);
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }

    async fn a_refused_refresh_removes_the_stale_entry(kind: Kind) {
        let policy = Policy::per_user(Duration::from_secs(1))
            .stale_while_revalidate(Duration::from_secs(3600));
        let app = app(kind, policy, None).await;
        stored_then_stale(&app).await;
        // The user's access is revoked: the handler says 403 from now on.
        app.answer.set(1);
        let r = app.get("a").await;
        assert_eq!(
            (r.text().as_str(), r.x_cache()),
            ("secret #1", "STALE"),
            "served at once while refreshed"
        );
        // The refresh got a 403: the entry is gone, not served for the next hour.
        wait_until("the stale entry removed", || app.entries() == 0).await;
        let r = app.get("a").await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (403, "revoked"));
    }

    async fn a_no_store_refresh_removes_the_stale_entry(kind: Kind) {
        let policy = Policy::per_user(Duration::from_secs(1))
            .stale_while_revalidate(Duration::from_secs(3600));
        let app = app(kind, policy, None).await;
        stored_then_stale(&app).await;
        app.answer.set(3);
        assert_eq!(app.get("a").await.x_cache(), "STALE");
        wait_until("the stale entry removed", || app.entries() == 0).await;
        let r = app.get("a").await;
        assert_eq!((r.text().as_str(), r.x_cache()), ("secret #3", "MISS"));
    }

    async fn per_user_routes_ignore_the_responses_own_stale_directives(kind: Kind) {
        // Directives meant for the browser's own cache (and a CDN that does not see private).
        let app = app(
            kind,
            Policy::per_user(Duration::from_secs(1)),
            Some("private, max-age=1, stale-while-revalidate=3600, stale-if-error=3600"),
        )
        .await;
        stored_then_stale(&app).await;
        app.answer.set(1);
        let r = app.get("a").await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str(), r.x_cache()),
            (403, "revoked", "MISS"),
            "no stale 200 after the handler refused"
        );
        app.answer.set(2);
        let r = app.get("a").await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (500, "MISS"));
    }

    async fn a_per_user_route_may_opt_in_to_the_responses_stale_directives(kind: Kind) {
        let app = app(
            kind,
            Policy::per_user(Duration::from_secs(1)).stale_from_response(true),
            Some("private, max-age=1, stale-while-revalidate=3600"),
        )
        .await;
        stored_then_stale(&app).await;
        app.answer.set(1);
        let r = app.get("a").await;
        assert_eq!((r.text().as_str(), r.x_cache()), ("secret #1", "STALE"));
        // Even so, the refused refresh removes the entry.
        wait_until("the stale entry removed", || app.entries() == 0).await;
        assert_eq!(app.get("a").await.status, 403);
    }

    async fn a_refusal_is_not_an_error_and_removes_the_stale_entry(kind: Kind) {
        let policy =
            Policy::per_user(Duration::from_secs(1)).stale_if_error(Duration::from_secs(3600));
        let app = app(kind, policy, None).await;
        stored_then_stale(&app).await;
        // An error may reuse the stale entry...
        app.answer.set(2);
        assert_eq!(app.get("a").await.x_cache(), "STALE");
        // ...a refusal may not, and removes it: no later error brings the 200 back.
        for (refusal, status) in [(1, 403), (4, 404), (5, 401)] {
            app.answer.set(refusal);
            let r = app.get("a").await;
            assert_eq!((r.status.as_u16(), r.x_cache()), (status, "MISS"));
        }
        wait_until("the stale entry removed", || app.entries() == 0).await;
        app.answer.set(2);
        let r = app.get("a").await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str(), r.x_cache()),
            (500, "down", "MISS")
        );
        assert_eq!(app.handle.stats().stale_if_error, 1);
    }

    async fn a_refused_early_refresh_removes_the_entry(kind: Kind) {
        // A huge beta: every hit refreshes early (see hot_entries_are_refreshed_early; this
        // handler takes about 1 ms, so the gap drawn is 1e9 s x X, X exponential: it falls
        // short of the 60 s TTL when X < 6e-8).
        let policy = Policy::per_user(Duration::from_secs(60)).early_refresh(1e12);
        let app = app(kind, policy, None).await;
        let r = app.get("a").await;
        assert_eq!(r.text(), "secret #1");
        wait_until("stored", || app.handle.stats().stored == 1).await;
        app.answer.set(1);
        let r = app.get("a").await;
        assert_eq!((r.text().as_str(), r.x_cache()), ("secret #1", "HIT"));
        wait_until("the refused entry removed", || app.entries() == 0).await;
        assert_eq!(app.get("a").await.status, 403);
    }

    async fn a_write_computed_before_a_refusal_never_lands_after_it(kind: Kind) {
        // Without coalescing, two misses of the key run side by side: one computed with the
        // old permissions (held by the test), one refused after the revocation.
        let backing = Backing::start(kind);
        let policy = Policy::per_user(Duration::from_secs(1))
            .stale_if_error(Duration::from_secs(3600))
            .coalesce(Duration::ZERO);
        let cache = CacheLayer::new(backing.store().await, policy)
            .namespace("refusals")
            .unwrap()
            .identity(Identity::header(http::HeaderName::from_static("x-user")));
        let handle = cache.handle();
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (c, g) = (calls.clone(), gate.clone());
        let app = axum::Router::new()
            .route(
                "/p",
                get(move || {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    let gate = g.clone();
                    async move {
                        match n {
                            1 => "secret #1".into_response(),
                            2 => {
                                // Computed before the revocation, slow to finish.
                                gate.acquire().await.unwrap().forget();
                                "secret #2 (old permissions)".into_response()
                            }
                            _ => (StatusCode::FORBIDDEN, "revoked").into_response(),
                        }
                    }
                }),
            )
            .layer(cache);
        let app = App {
            app,
            handle,
            answer: Answer::default(),
            calls,
            backing,
        };
        stored_then_stale(&app).await;
        let slow = tokio::spawn({
            let app = app.app.clone();
            async move { common::send(&app, common::get_with("/p", &[("x-user", "a")])).await }
        });
        wait_until("the slow call", || app.calls.load(Ordering::SeqCst) == 2).await;
        let r = app.get("a").await;
        assert_eq!(r.status, 403);
        wait_until("the stale entry removed", || app.entries() == 0).await;
        gate.add_permits(1);
        assert_eq!(slow.await.unwrap().text(), "secret #2 (old permissions)");
        wait_until("the old write refused", || app.handle.stats().refused == 1).await;
        assert_eq!(app.entries(), 0);
        assert_eq!(app.handle.stats().stored, 1);
        let r = app.get("a").await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (403, "MISS"));
    }
}
