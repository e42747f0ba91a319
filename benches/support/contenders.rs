//! The application and the contenders shared by the load benchmark (`benches/load.rs`) and
//! the per-hit cost harness (`benches/alloc_per_hit.rs`), so that both measure the same
//! handler, the same hand-written middleware and the same layer configuration.
#![allow(dead_code)]

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use fred::prelude::{ClientLike, Expiration, KeysInterface};
use tower_redis_cache::{CacheLayer, Identity, Policy, RedisConfig, RedisStore};

#[derive(serde::Deserialize)]
struct Size {
    size: Option<usize>,
}

/// The handlers every contender serves.
pub fn app() -> Router {
    Router::new()
        .route(
            "/item/{id}",
            get(|Path(id): Path<u32>, Query(s): Query<Size>| async move {
                let size = s.size.unwrap_or(1024);
                let mut body = format!("item {id} ").into_bytes();
                body.resize(size, b'x');
                Bytes::from(body)
            }),
        )
        .route(
            "/user/{id}",
            get(|Path(id): Path<u32>| async move {
                let mut body = format!("user {id} ").into_bytes();
                body.resize(1024, b'u');
                Bytes::from(body)
            }),
        )
        .route(
            "/slow/{id}",
            get(|Path(id): Path<u64>| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                format!("slow {id}")
            }),
        )
}

/// The middleware a user writes without a library.
async fn naive(pool: fred::clients::Pool, req: Request, next: Next) -> Response {
    let user = req
        .headers()
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let key = format!("naive:{}:{}", user, req.uri());
    if let Ok(Some(body)) = pool.get::<Option<Bytes>, _>(&key).await {
        return body.into_response();
    }
    let res = next.run(req).await;
    let (parts, body) = res.into_parts();
    let Ok(bytes) = http_body_util::BodyExt::collect(body)
        .await
        .map(|c| c.to_bytes())
    else {
        return Response::from_parts(parts, Body::empty());
    };
    let _: Result<(), _> = pool
        .set(&key, bytes.clone(), Some(Expiration::EX(600)), None, false)
        .await;
    Response::from_parts(parts, Body::from(bytes))
}

/// `plain`: the handlers alone.
pub fn plain() -> Router {
    app()
}

/// `naive`: the hand-written middleware on a fred pool of 8 with fred's defaults.
pub async fn naive_app(redis: &str) -> Router {
    let pool = fred::prelude::Builder::from_config(fred::prelude::Config::from_url(redis).unwrap())
        .build_pool(8)
        .unwrap();
    pool.init().await.unwrap();
    app().layer(axum::middleware::from_fn(move |req, next| {
        naive(pool.clone(), req, next)
    }))
}

/// `cache-redis`: this crate with its defaults (pool of 8), shared entries, and per-user
/// entries on `/user/{id}` identified by `x-user`.
pub async fn cache_layer(redis: &str) -> CacheLayer {
    cache_layer_with(RedisConfig::from_url(redis).unwrap()).await
}

/// [`cache_layer`] on a configuration of the caller's.
pub async fn cache_layer_with(config: RedisConfig) -> CacheLayer {
    let store = RedisStore::connect(config).await.unwrap();
    CacheLayer::new(store, Policy::shared(Duration::from_secs(600)))
        .identity(Identity::header(http::HeaderName::from_static("x-user")))
        .route("/user/{id}", Policy::per_user(Duration::from_secs(600)))
        .unwrap()
}

/// `cache-redis` on the handlers.
pub async fn cache_app(redis: &str) -> Router {
    app().layer(cache_layer(redis).await)
}

/// `cache-near`: [`cache_layer`] with the near-cache on every route (5 s bound, default
/// 64 MiB capacity).
#[allow(dead_code)] // not every bench uses every contender
pub async fn cache_near_app(redis: &str) -> Router {
    app().layer(cache_near_layer_with(RedisConfig::from_url(redis).unwrap()).await)
}

/// The layer of [`cache_near_app`] on a configuration of the caller's.
pub async fn cache_near_layer_with(config: RedisConfig) -> CacheLayer {
    let store = RedisStore::connect(config).await.unwrap();
    let near = Duration::from_secs(5);
    CacheLayer::new(store, Policy::shared(Duration::from_secs(600)).near(near))
        .identity(Identity::header(http::HeaderName::from_static("x-user")))
        .route(
            "/user/{id}",
            Policy::per_user(Duration::from_secs(600)).near(near),
        )
        .unwrap()
}
