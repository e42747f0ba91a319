//! The near-cache: hits without Redis, coherence across instances through pub/sub, the
//! subscription's loss, and the memory bound.
#![cfg(feature = "near")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use common::{get as get_req, send, wait_until, RedisServer};
use tower_redis_cache::{CacheHandle, CacheLayer, Policy, RedisStore};

struct Instance {
    app: Router,
    handle: CacheHandle,
    calls: Arc<AtomicUsize>,
}

/// One instance of a service: `/item` (a count of the calls to it in every instance built
/// with the same `calls`) and `/big/{n}` (16 KiB), both with a near-cache of `near` and a
/// 300 s TTL, on its own connection pool.
async fn instance_counting(
    server: &RedisServer,
    near: Duration,
    capacity: u64,
    calls: Arc<AtomicUsize>,
) -> Instance {
    let store = RedisStore::connect(common::relaxed_config(&server.url()))
        .await
        .unwrap();
    let cache = CacheLayer::new(store, Policy::shared(Duration::from_secs(300)).near(near))
        .namespace("near")
        .unwrap()
        .near_capacity(capacity);
    let handle = cache.handle();
    let c = calls.clone();
    let app = Router::new()
        .route(
            "/item",
            get(move || {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                async move { format!("version {n}") }
            }),
        )
        .route(
            "/big/{n}",
            get(|Path(n): Path<u32>| async move { format!("{n:>16384}") }),
        )
        .layer(cache);
    Instance { app, handle, calls }
}

async fn instance(server: &RedisServer, near: Duration, capacity: u64) -> Instance {
    instance_counting(server, near, capacity, Arc::default()).await
}

fn from_near(r: &common::Got) -> bool {
    r.header("cache-status")
        .is_some_and(|s| s.contains("; detail=near;"))
}

/// Requests `uri` until the near-cache answers (its subscription comes up in the background
/// after the first request that could use it, and it is filled by a Redis hit).
async fn until_near_hit(app: &Router, uri: &str) -> common::Got {
    for _ in 0..400 {
        let r = send(app, get_req(uri)).await;
        if from_near(&r) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no near-cache hit for {uri} within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_hits_need_neither_redis_nor_the_handler() {
    let server = RedisServer::start();
    let a = instance(&server, Duration::from_secs(60), 64 << 20).await;
    let r = until_near_hit(&a.app, "/item").await;
    assert_eq!(r.text(), "version 1");
    assert_eq!(r.x_cache(), "HIT");
    assert!(r.header("age").is_some());
    let before = a.handle.stats();
    for _ in 0..5 {
        let r = send(&a.app, get_req("/item")).await;
        assert!(from_near(&r));
        assert_eq!(r.text(), "version 1");
    }
    let after = a.handle.stats();
    assert_eq!(after.near_hits - before.near_hits, 5);
    assert_eq!(after.hits - before.hits, 5, "near hits count as hits");
    assert_eq!(a.calls.load(Ordering::SeqCst), 1);
    assert!(after.near_bytes > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_in_one_instance_empties_the_near_cache_of_the_other() {
    let server = RedisServer::start();
    // A bound far longer than the test: only the invalidation can empty the near-caches.
    let calls = Arc::new(AtomicUsize::new(0));
    let a = instance_counting(&server, Duration::from_secs(120), 64 << 20, calls.clone()).await;
    let b = instance_counting(&server, Duration::from_secs(120), 64 << 20, calls).await;
    until_near_hit(&a.app, "/item").await;
    let r = until_near_hit(&b.app, "/item").await;
    assert_eq!(r.text(), "version 1", "b got a's entry through Redis");
    assert_eq!(b.calls.load(Ordering::SeqCst), 1, "one call in all");

    let flushes = b.handle.stats().near_flushes;
    assert_eq!(a.handle.invalidate_path("/item").await.unwrap(), 1);
    // a's own near-cache is emptied before the call returns.
    let r = send(&a.app, get_req("/item")).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "version 2"));
    // b's, when the message arrives.
    wait_until("b's near-cache emptied", || {
        b.handle.stats().near_flushes > flushes
    })
    .await;
    let r = send(&b.app, get_req("/item")).await;
    assert!(!from_near(&r), "b's next request goes past its near-cache");
    assert_ne!(r.text(), "version 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_subscription_empties_and_bypasses_the_near_cache() {
    let mut server = RedisServer::start();
    let a = instance(&server, Duration::from_secs(120), 64 << 20).await;
    until_near_hit(&a.app, "/item").await;
    let flushes = a.handle.stats().near_flushes;

    server.kill();
    wait_until("near-cache emptied", || {
        a.handle.stats().near_flushes > flushes
    })
    .await;
    // Redis is gone and the near-cache is not used: the handler answers.
    let r = send(&a.app, get_req("/item")).await;
    assert_eq!(r.status, 200);
    assert!(!from_near(&r));
    assert_eq!(r.text(), "version 2");

    // Back: the subscription comes up again, and the near-cache fills again.
    server.restart();
    let r = until_near_hit(&a.app, "/item").await;
    assert!(r.text().starts_with("version "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_cache_stays_within_its_size() {
    let server = RedisServer::start();
    let capacity = 64 * 1024;
    let a = instance(&server, Duration::from_secs(120), capacity).await;
    until_near_hit(&a.app, "/big/0").await;
    // Twenty 16 KiB entries into a 64 KiB near-cache, each read from Redis twice.
    for n in 1..20 {
        let uri = format!("/big/{n}");
        send(&a.app, get_req(&uri)).await;
        wait_until("stored", || a.handle.stats().stored == n + 1).await;
        for _ in 0..2 {
            let r = send(&a.app, get_req(&uri)).await;
            assert_eq!(r.body.len(), 16384);
            assert_eq!(r.x_cache(), "HIT");
        }
    }
    let bytes = a.handle.stats().near_bytes;
    assert!(bytes > 0, "the near-cache holds something");
    assert!(bytes <= capacity, "{bytes} bytes held, over {capacity}");
}
