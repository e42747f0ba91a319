//! Cost of invalidating one user's entries among 100,000 cached entries, against the cost of
//! the full SCAN a pattern-only cache (like the Python utility's `invalidate_cache("...*")`)
//! pays for the same job, measured in one run against a redis-server of the benchmark's own.
//!
//! `cargo bench --bench invalidation` (set `ENTRIES` to change the 100,000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::Body;
use futures_util::StreamExt;
use http::{Request, Response};
use tower::ServiceExt;
use tower_redis_cache::{CacheLayer, Identity, Policy, RedisConfig, RedisStore};

fn handler(_: Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
    std::future::ready(Ok(Response::new(Body::from(
        "{\"permissions\":[\"read\"]}",
    ))))
}

type Svc = tower::util::BoxCloneService<Request<Body>, Response<Body>, Infallible>;

async fn send(svc: Svc, user: usize, item: usize) {
    let req = Request::get(format!("/users/{user}/items/{item}"))
        .header("x-user", user.to_string())
        .body(Body::empty())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
}

fn main() {
    let total: usize = std::env::var("ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let per_user = 10;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = common::RedisServer::start();
    rt.block_on(async move {
        let store = RedisStore::connect(RedisConfig::from_url(&server.url()).unwrap())
            .await
            .unwrap();
        let pool = store.pool().clone();
        let cache = CacheLayer::new(store, Policy::per_user(Duration::from_secs(3600)))
            .namespace("bench")
            .unwrap()
            .identity(Identity::header(http::HeaderName::from_static("x-user")));
        let handle = cache.handle();
        let svc = tower::ServiceBuilder::new()
            .map_response(|r: Response<tower_redis_cache::ResponseBody<Body>>| r.map(Body::new))
            .layer(cache)
            .service_fn(handler)
            .boxed_clone();

        let started = Instant::now();
        let users = total / per_user;
        futures_util::stream::iter(0..total)
            .map(|i| {
                let s = svc.clone();
                async move { send(s, i / per_user, i % per_user).await }
            })
            .buffer_unordered(64)
            .collect::<()>()
            .await;
        while handle.stats().stored < total as u64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "populated {total} entries ({users} users x {per_user}) in {:.1?}",
            started.elapsed()
        );

        let mut ours = Vec::new();
        let mut scans = Vec::new();
        for round in 0..5 {
            let user = (round * 7919) % users;
            // The index: time proportional to the entries removed.
            let t = Instant::now();
            let removed = handle.invalidate_user(&user.to_string()).await.unwrap();
            ours.push(t.elapsed());
            assert_eq!(removed, per_user as u64);

            // The baseline: SCAN the whole namespace for the user's keys, then UNLINK them.
            let t = Instant::now();
            let client = pool.next();
            let mut seen = 0usize;
            let mut pages = std::pin::pin!(client.scan("bench:v1:*", Some(1000), None));
            while let Some(page) = pages.next().await {
                let mut page = page.unwrap();
                seen += fred::types::scan::Scanner::take_results(&mut page).map_or(0, |k| k.len());
            }
            scans.push(t.elapsed());
            assert!(seen >= total - per_user * (round + 1), "{seen}");

            // Put the user's entries back for the next round.
            for item in 0..per_user {
                send(svc.clone(), user, item).await;
            }
            let want = total as u64 + per_user as u64 * (round as u64 + 1);
            while handle.stats().stored < want {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        ours.sort();
        scans.sort();
        let (o, s) = (ours[2], scans[2]);
        println!("invalidate_user (10 of {total}): median {o:.2?}  all {ours:.2?}");
        println!("full SCAN of the namespace:     median {s:.2?}  all {scans:.2?}");
        println!(
            "ratio scan / index: {:.0}x",
            s.as_secs_f64() / o.as_secs_f64().max(1e-9)
        );
    });
}
