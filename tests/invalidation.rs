//! The invalidation handle: exact counts, neighbours that must survive, the stale-set race
//! forced deterministically, two instances, index expiry, invalidation on writes (each on
//! both stores: a real redis-server and the in-process store), and Redis down.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use common::scenario::{self, UserId};
use common::stores::{Backing, Kind};
use common::{get as get_req, get_with, send, wait_until, RedisServer};
use tokio::sync::Semaphore;
use tower_redis_cache::{CacheLayer, Identity, PathPattern, Policy, RequestKey};

on_both_stores!(
    every_operation_removes_exactly_its_entries,
    a_response_computed_across_an_invalidation_is_never_stored,
    two_instances_see_each_others_invalidations,
    indexes_expire_with_their_entries,
    successful_writes_invalidate_their_path_when_asked,
);

async fn every_operation_removes_exactly_its_entries(kind: Kind) {
    let backing = Backing::start(kind);
    let cache = scenario::layer_on(backing.store_with(Duration::from_millis(200)).await, "inv");
    let handle = cache.handle();
    let app = scenario::app(cache, Arc::default());
    scenario::every_operation(&app, &handle, || backing.keys("inv:v1:*")).await;
}

/// A handler that waits at a gate, so a test can run an invalidation while it computes.
struct Gate {
    entered: Arc<Semaphore>,
    release: Arc<Semaphore>,
}

fn gated_app(cache: CacheLayer, gate: &Gate, version: Arc<AtomicUsize>) -> Router {
    let entered = gate.entered.clone();
    let release = gate.release.clone();
    let handler = get(move || {
        let (entered, release, version) = (entered.clone(), release.clone(), version.clone());
        async move {
            // Reads "the database" first, then waits: the classic stale-set interleaving.
            let v = version.load(Ordering::SeqCst);
            entered.add_permits(1);
            release.acquire().await.unwrap().forget();
            let mut res = axum::response::IntoResponse::into_response(format!("v{v}"));
            res.headers_mut()
                .insert("cache-tag", http::HeaderValue::from_static("t"));
            res
        }
    });
    Router::new()
        .route("/users/{id}/data", handler)
        .layer(cache)
        .layer(axum::middleware::from_fn(
            |mut req: http::Request<axum::body::Body>, next: axum::middleware::Next| async move {
                req.extensions_mut().insert(UserId("7".into()));
                next.run(req).await
            },
        ))
}

/// Waits (bounded) until the handler is inside the gate.
async fn enter(gate: &Gate) {
    tokio::time::timeout(Duration::from_secs(10), gate.entered.acquire())
        .await
        .expect("the handler was never called")
        .unwrap()
        .forget();
}

async fn a_response_computed_across_an_invalidation_is_never_stored(kind: Kind) {
    let server = Backing::start(kind);
    let store = server.store().await;
    let cache = CacheLayer::new(store, Policy::per_user(Duration::from_secs(60)))
        .namespace("race")
        .unwrap()
        .identity(Identity::extension::<UserId>());
    let handle = cache.handle();
    let gate = Gate {
        entered: Arc::new(Semaphore::new(0)),
        release: Arc::new(Semaphore::new(0)),
    };
    let version = Arc::new(AtomicUsize::new(1));
    let app = gated_app(cache, &gate, version.clone());
    let key = || {
        handle.key(
            &RequestKey::new("/users/7/data")
                .route("/users/{id}/data")
                .identity("7"),
        )
    };

    let kinds = ["path", "user", "route", "tag", "pattern", "clear", "exact"];
    for (i, kind) in kinds.iter().enumerate() {
        // Start from a miss.
        handle.invalidate_path("/users/7/data").await.unwrap();
        // A request misses and reads version N...
        let task = tokio::spawn({
            let app = app.clone();
            async move { send(&app, get_req("/users/7/data")).await }
        });
        enter(&gate).await;
        // ...the data changes and is invalidated while it computes...
        version.fetch_add(1, Ordering::SeqCst);
        match *kind {
            "path" => handle.invalidate_path("/users/7/data").await,
            "user" => handle.invalidate_user("7").await,
            "route" => handle.invalidate_route("/users/{id}/data").await,
            "tag" => handle.invalidate_tag("t").await,
            "pattern" => {
                handle
                    .invalidate_pattern(&PathPattern::glob("/users/*"))
                    .await
            }
            "clear" => handle.clear().await,
            _ => {
                handle
                    .invalidate(
                        &RequestKey::new("/users/7/data")
                            .route("/users/{id}/data")
                            .identity("7"),
                    )
                    .await
            }
        }
        .unwrap();
        // ...then it finishes with the old data: served to its client, never stored.
        gate.release.add_permits(1);
        let r = task.await.unwrap();
        assert_eq!(r.x_cache(), "MISS");
        wait_until("the refused write", || {
            handle.stats().refused == i as u64 + 1
        })
        .await;
        assert!(!server.keys("race:v1:*").contains(&key()), "{kind}");

        // The next request computes the new version, and that one is stored.
        let stored_before = handle.stats().stored;
        let fresh = tokio::spawn({
            let app = app.clone();
            async move { send(&app, get_req("/users/7/data")).await }
        });
        enter(&gate).await;
        gate.release.add_permits(1);
        assert_eq!(fresh.await.unwrap().text(), format!("v{}", i + 2));
        wait_until("stored", || handle.stats().stored > stored_before).await;
        let hit = send(&app, get_req("/users/7/data")).await;
        assert_eq!(
            (hit.x_cache(), hit.text()),
            ("HIT", format!("v{}", i + 2)),
            "{kind}"
        );
    }
}

async fn two_instances_see_each_others_invalidations(kind: Kind) {
    let backing = Backing::start(kind);
    let lookup = Duration::from_millis(200);
    let (c1, c2) = (
        scenario::layer_on(backing.store_with(lookup).await, "two"),
        scenario::layer_on(backing.store_with(lookup).await, "two"),
    );
    let (h1, h2) = (c1.handle(), c2.handle());
    let (a1, a2) = (
        scenario::app(c1, Arc::default()),
        scenario::app(c2, Arc::default()),
    );
    let me = [("x-test-user", "5")];
    send(&a1, get_with("/users/5/menu", &me)).await;
    wait_until("stored", || h1.stats().stored == 1).await;
    assert_eq!(
        send(&a2, get_with("/users/5/menu", &me)).await.x_cache(),
        "HIT"
    );
    assert_eq!(h2.invalidate_user("5").await.unwrap(), 1);
    assert_eq!(
        send(&a1, get_with("/users/5/menu", &me)).await.x_cache(),
        "MISS"
    );
    wait_until("stored", || h1.stats().stored == 2).await;
    assert_eq!(
        send(&a2, get_with("/users/5/menu", &me)).await.x_cache(),
        "HIT"
    );
    assert_eq!(h1.invalidate_path("/users/5/menu").await.unwrap(), 1);
    assert_eq!(
        send(&a2, get_with("/users/5/menu", &me)).await.x_cache(),
        "MISS"
    );
}

async fn indexes_expire_with_their_entries(kind: Kind) {
    let server = Backing::start(kind);
    let store = server.store().await;
    let cache = CacheLayer::new(store, Policy::per_user(Duration::from_millis(600)).tag("x"))
        .namespace("exp")
        .unwrap()
        .identity(Identity::header(http::HeaderName::from_static("x-user")));
    let handle = cache.handle();
    let app = Router::new()
        .route("/{n}", get(|| async { "x" }))
        .layer(cache);
    for n in 0..5 {
        send(&app, get_with(&format!("/{n}"), &[("x-user", "u")])).await;
    }
    wait_until("stored", || handle.stats().stored == 5).await;
    // Path, user, route and tag indexes, a variant set per path, and the path registry.
    let indexes = server.keys("exp:ix:*");
    assert_eq!(indexes.len(), 5 + 1 + 1 + 1 + 5, "{indexes:?}");
    assert_eq!(server.keys("exp:ix:v:*").len(), 5);
    assert_eq!(server.keys("exp:paths").len(), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(server.keys("exp:*").is_empty()) {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            server.keys("exp:*")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn with_redis_down_invalidations_fail_promptly() {
    let mut server = RedisServer::start();
    let cache = scenario::layer(&server.url(), "down").await;
    let handle = cache.handle();
    server.kill();
    let started = Instant::now();
    let results = [
        handle.invalidate(&RequestKey::new("/roles")).await,
        handle.invalidate_path("/roles").await,
        handle.invalidate_user("1").await,
        handle.invalidate_route("/roles").await,
        handle.invalidate_tag("roles").await,
        handle.invalidate_pattern(&PathPattern::glob("/*")).await,
        handle.clear().await,
    ];
    for r in results {
        let err = r.unwrap_err();
        assert!(!err.to_string().is_empty());
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

async fn successful_writes_invalidate_their_path_when_asked(kind: Kind) {
    let server = Backing::start(kind);
    let app_with = |on: bool, ns: &'static str| {
        let server = &server;
        async move {
            let store = server.store().await;
            let cache = CacheLayer::new(store, Policy::shared(Duration::from_secs(60)))
                .namespace(ns)
                .unwrap()
                .invalidate_on_write(on);
            let handle = cache.handle();
            let app = Router::new()
                .route(
                    "/items/{id}",
                    get(|| async { "item" }).put(|body: String| async move {
                        if body == "fail" {
                            http::StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            http::StatusCode::NO_CONTENT
                        }
                    }),
                )
                .layer(cache);
            (app, handle)
        }
    };
    let put_req = |body: &'static str| {
        http::Request::put("/items/1")
            .body(axum::body::Body::from(body))
            .unwrap()
    };

    let (app, handle) = app_with(true, "onw").await;
    send(&app, get_req("/items/1?v=1")).await;
    send(&app, get_req("/items/1?v=2")).await;
    send(&app, get_req("/items/2")).await;
    wait_until("stored", || handle.stats().stored == 3).await;
    // A failed write invalidates nothing.
    assert_eq!(send(&app, put_req("fail")).await.status, 500);
    assert_eq!(send(&app, get_req("/items/1?v=1")).await.x_cache(), "HIT");
    // A successful one removes every variant of its path before it answers.
    assert_eq!(send(&app, put_req("ok")).await.status, 204);
    assert_eq!(send(&app, get_req("/items/1?v=1")).await.x_cache(), "MISS");
    assert_eq!(send(&app, get_req("/items/1?v=2")).await.x_cache(), "MISS");
    assert_eq!(send(&app, get_req("/items/2")).await.x_cache(), "HIT");

    // Off by default.
    let (app, handle) = app_with(false, "off").await;
    send(&app, get_req("/items/1")).await;
    wait_until("stored", || handle.stats().stored == 1).await;
    assert_eq!(send(&app, put_req("ok")).await.status, 204);
    assert_eq!(send(&app, get_req("/items/1")).await.x_cache(), "HIT");
}
