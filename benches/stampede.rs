//! A stampede: 1,000 concurrent requests on one cold key, with request coalescing off and
//! on, in one run against a redis-server of the benchmark's own. Prints the handler calls
//! and the latency percentiles of each.
//!
//! `cargo bench --bench stampede` (`REQUESTS` changes the 1,000; the handler takes 50 ms).
//!
//! A third run, "slow leader": the first request's client takes the response head of a
//! 4 KiB body streamed in four chunks and reads none of it (a client that never reads its socket); the
//! others then ask for the same key. They must not wait for that client (the coalescing wait
//! is 5 s): their latencies are printed against it.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use common::load::percentiles;
use tower::ServiceExt;
use tower_redis_cache::{CacheLayer, Policy, RedisConfig, RedisStore};

fn main() {
    let requests: usize = std::env::var("REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = common::RedisServer::start();
    rt.block_on(async {
        for (name, wait) in [("coalescing off", Duration::ZERO), ("coalescing on", Duration::from_secs(5))] {
            let store = RedisStore::connect(RedisConfig::from_url(&server.url()).unwrap()).await.unwrap();
            let ns = if wait.is_zero() { "off" } else { "on" };
            let cache = CacheLayer::new(store, Policy::shared(Duration::from_secs(60)).coalesce(wait))
                .namespace(ns)
                .unwrap();
            let calls = Arc::new(AtomicUsize::new(0));
            let c = calls.clone();
            let app = Router::new()
                .route(
                    "/hot",
                    get(move || {
                        c.fetch_add(1, Ordering::SeqCst);
                        async {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            "expensive"
                        }
                    }),
                )
                .layer(cache);
            let started = Instant::now();
            let tasks: Vec<_> = (0..requests)
                .map(|_| {
                    let app = app.clone();
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let req = http::Request::get("/hot").body(axum::body::Body::empty()).unwrap();
                        let res = app.oneshot(req).await.unwrap();
                        http_body_util::BodyExt::collect(res.into_body()).await.unwrap();
                        t.elapsed()
                    })
                })
                .collect();
            let mut latencies = Vec::new();
            for t in tasks {
                latencies.push(t.await.unwrap());
            }
            let total = started.elapsed();
            let (p50, p99, max) = percentiles(&mut latencies);
            println!(
                "{name:<15} {requests} requests: handler calls {:>5}, p50 {p50:>9.2?}, p99 {p99:>9.2?}, max {max:>9.2?}, all done in {total:.2?}",
                calls.load(Ordering::SeqCst)
            );
        }

        let store = RedisStore::connect(RedisConfig::from_url(&server.url()).unwrap()).await.unwrap();
        let cache = CacheLayer::new(store, Policy::shared(Duration::from_secs(60)))
            .namespace("slow-leader")
            .unwrap();
        let handle = cache.handle();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let app = Router::new()
            .route(
                "/big",
                get(move || {
                    c.fetch_add(1, Ordering::SeqCst);
                    let chunks = (0..4).map(|_| Ok::<_, std::convert::Infallible>(bytes::Bytes::from(vec![b'x'; 1024])));
                    async move { axum::body::Body::from_stream(futures_util::stream::iter(chunks)) }
                }),
            )
            .layer(cache);
        let get_big = || http::Request::get("/big").body(axum::body::Body::empty()).unwrap();
        let leader = app.clone().oneshot(get_big()).await.unwrap();
        let started = Instant::now();
        let tasks: Vec<_> = (0..requests)
            .map(|_| {
                let app = app.clone();
                let req = get_big();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let res = app.oneshot(req).await.unwrap();
                    http_body_util::BodyExt::collect(res.into_body()).await.unwrap();
                    t.elapsed()
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.push(t.await.unwrap());
        }
        let total = started.elapsed();
        let (p50, p99, max) = percentiles(&mut latencies);
        println!(
            "{:<15} {requests} requests: handler calls {:>5}, p50 {p50:>9.2?}, p99 {p99:>9.2?}, max {max:>9.2?}, all done in {total:.2?} (coalescing wait 5 s; {} collapsed, {} hits)",
            "slow leader",
            calls.load(Ordering::SeqCst),
            handle.stats().collapsed,
            handle.stats().hits,
        );
        drop(leader);
    });
}
