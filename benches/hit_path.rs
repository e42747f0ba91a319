//! Per-request cost of the layer against a plain service, measured side by side in one run
//! against a redis-server of the benchmark's own on loopback.
//!
//! `cargo bench --bench hit_path`. Compare within one run: `cached_hit` with `redis_get` (the
//! round trip a hit cannot avoid) and `passthrough_post` with `plain` (the cost of the layer
//! on requests it does not cache). Ratios are the figures, not absolute times.

#[path = "../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{Service, ServiceExt};
use tower_redis_cache::{CacheLayer, Policy, RedisConfig, RedisStore};

fn handler(_: Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
    std::future::ready(Ok(Response::new(Body::from(Bytes::from_static(
        &[b'x'; 1024],
    )))))
}

async fn call<S>(svc: &mut S, req: Request<Body>) -> Bytes
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    res.into_body().collect().await.unwrap().to_bytes()
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = common::RedisServer::start();
    let store = rt
        .block_on(RedisStore::connect(
            RedisConfig::from_url(&server.url()).unwrap(),
        ))
        .unwrap();
    let pool = store.pool().clone();
    let cache = CacheLayer::new(store, Policy::shared(Duration::from_secs(600)));
    let handle = cache.handle();
    let plain = tower::service_fn(handler);
    let cached = tower::ServiceBuilder::new()
        .map_response(|r: Response<tower_redis_cache::ResponseBody<Body>>| r.map(Body::new))
        .layer(cache)
        .service_fn(handler);

    // Store the entry once.
    rt.block_on(async {
        let mut s = cached.clone();
        call(&mut s, Request::get("/item").body(Body::empty()).unwrap()).await;
        while handle.stats().stored == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });

    let mut group = c.benchmark_group("1KiB");
    group.bench_function("plain", |b| {
        b.to_async(&rt).iter(|| {
            let mut s = plain;
            async move { call(&mut s, Request::get("/item").body(Body::empty()).unwrap()).await }
        })
    });
    // The Redis round trip alone (a GET of the same entry): the floor under a hit.
    let key = handle.key(&tower_redis_cache::RequestKey::new("/item"));
    group.bench_function("redis_get", |b| {
        b.to_async(&rt).iter(|| {
            let pool = pool.clone();
            let key = key.clone();
            async move {
                let v: Option<Bytes> = fred::prelude::KeysInterface::get(&pool, key).await.unwrap();
                v
            }
        })
    });
    group.bench_function("cached_hit", |b| {
        b.to_async(&rt).iter(|| {
            let mut s = cached.clone();
            async move { call(&mut s, Request::get("/item").body(Body::empty()).unwrap()).await }
        })
    });
    group.bench_function("passthrough_post", |b| {
        b.to_async(&rt).iter(|| {
            let mut s = cached.clone();
            async move { call(&mut s, Request::post("/item").body(Body::empty()).unwrap()).await }
        })
    });
    group.finish();
    let stats = handle.stats();
    assert!(stats.hits > 0 && stats.unavailable == 0, "{stats:?}");
}

criterion_group! {
    name = hit_path;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(hit_path);
