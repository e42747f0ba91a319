//! Tower middleware that caches HTTP responses of axum (and other Tower) services in Redis.
//!
//! [`CacheLayer`] intercepts GET and HEAD requests, derives a key from the route, the exact
//! path, the normalized query and (on per-user routes) the caller's identity, serves hits
//! from Redis through a [fred](https://docs.rs/fred) connection pool, and falls through to
//! the wrapped service on a miss **or when Redis is slow or down**: a cache problem is never
//! the client's problem. Responses are streamed to the client while they are recorded, and
//! written to Redis after the end of the stream, off the response path.
//!
//! # Quick start (axum)
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower_redis_cache::{CacheLayer, Policy, RedisConfig, RedisStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::connect(RedisConfig::from_env()?).await?;
//! let cache = CacheLayer::new(store, Policy::bypass())
//!     .namespace("backend")?
//!     .route("/roles", Policy::shared(Duration::from_secs(3600)))?
//!     .route("/users/{id}/menu", Policy::per_user(Duration::from_secs(900)))?;
//! let handle = cache.handle(); // invalidation, health, counters
//!
//! let app: Router = Router::new()
//!     .route("/roles", get(|| async { "admin, editor" }))
//!     .route("/users/{id}/menu", get(|| async { "menu" }))
//!     .layer(cache);
//! # let _ = (app, handle);
//! # Ok(()) }
//! ```
//!
//! A TTL per route can also be given with one layer per route (`route_layer` with
//! `cache.clone().policy(..)`), and a handler can change the TTL of one response or skip it
//! with [`CacheOverride`] or the [`TTL_OVERRIDE_HEADER`].
//!
//! # What is cached
//!
//! - GET requests; HEAD requests are answered from the GET entry (headers only, with the
//!   entry's `Content-Length`) and never stored. Other methods pass through untouched.
//! - Responses with a 2xx status other than 206 (other statuses only when the route's
//!   [`Policy::status`] opts in), without `Set-Cookie`, `Cache-Control: no-store`,
//!   `no-cache` or `private` (allowed on per-user routes), `Vary: *`, or a `Vary` naming a
//!   header the route does not key on, and whose body ended cleanly within the size limit
//!   (1 MiB by default; larger bodies stream through, uncached).
//! - Hits carry `Content-Length`, `Age`, `Cache-Status: tower-redis-cache; hit; ttl=N`
//!   (RFC 9211) and `X-Cache: HIT`; misses `fwd=miss` / `MISS`; bypasses
//!   `fwd=bypass; detail=...` / `BYPASS`. The identity never appears in them.
//!
//! # Per-route HTTP caching features
//!
//! Request coalescing ([`Policy::coalesce`], on by default; across instances with
//! [`Policy::lock_across_instances`]), strong ETags and `304 Not Modified` on hits
//! ([`Policy::etag`], on by default), TTLs from the response's own headers
//! ([`Policy::ttl_from_response`]), [`Policy::stale_while_revalidate`] and
//! [`Policy::stale_if_error`].
//!
//! # Invalidation and values
//!
//! [`CacheLayer::handle`] gives a [`CacheHandle`]: race-safe invalidation by request, path,
//! user, route, tag, glob pattern or the whole namespace, health and counters, and a JSON
//! value cache with `get_or_insert_json` (the Python utility's `@cached`).
//!
//! # Security
//!
//! - **A shared route serves one response to everybody.** Requests carrying
//!   `Authorization` or `Cookie` therefore bypass shared routes, unless the route is
//!   declared [`Policy::shared_for_authenticated`].
//! - Per-user routes ([`Policy::per_user`]) key entries on the caller's [`Identity`],
//!   hashed with BLAKE3 keyed by the namespace; a request without identity is not cached.
//!   **The identity must come from something the client cannot forge** (an auth layer's
//!   request extension, a verified token), not from a header the client sets freely.
//! - No token, cookie or request header value is written to Redis: identities and keyed
//!   header values only enter keys hashed. Responses with `Set-Cookie` are never stored.
//!
//! # Ordering
//!
//! - Put the cache **inside** authentication (so the identity extension is set when the
//!   cache runs) and inside `CompressionLayer` (so it stores identity-encoded bodies and the
//!   compression layer compresses hits per client). Outside compression, responses that
//!   `Vary: Accept-Encoding` are only stored when the route keys on `Accept-Encoding`.
//! - Inside an axum `Router` (`Router::layer`, `route_layer`, `MethodRouter::layer`) the
//!   layer sees the route template (`MatchedPath`); wrapped around a whole router it matches
//!   the path against its own table of templates.
//!
//! # Redis outages
//!
//! Every lookup has a deadline (50 ms by default, [`RedisConfig::lookup_timeout`]) and
//! fails in microseconds once fred knows the connection is down; the pool reconnects
//! forever with a capped backoff. Writes are bounded ([`CacheLayer::max_pending_writes`])
//! and dropped, not queued, past the bound. Redis problems are logged once per change of
//! state (`tracing`), not once per request.
//!
//! # Feature flags
//!
//! | Name | Description | Default? |
//! |---|---|---|
//! | `axum` | Reads axum's `MatchedPath` for route templates | Yes |
//! | `tls` | rustls (ring) for `rediss://` and Azure Cache for Redis | Yes |

#![deny(missing_docs, unsafe_code, unreachable_pub)]
#![warn(missing_debug_implementations, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod breaker;
mod coalesce;
mod config;
mod entry;
mod future;
mod grpc;
mod handle;
mod key;
mod layer;
mod policy;
mod service;
mod status;
mod store;
mod value;

pub use body::ResponseBody;
pub use breaker::BreakerState;
pub use config::{
    ConfigError, RedisConfig, DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LOOKUP_TIMEOUT, DEFAULT_POOL_SIZE,
};
pub use future::ResponseFuture;
pub use grpc::DEFAULT_MAX_GRPC_REQUEST_SIZE;
#[cfg(feature = "axum")]
pub use handle::health_route;
pub use handle::{CacheError, CacheHandle, Health, PathPattern, RedisStatus, RequestKey};
pub use key::Identity;
pub use layer::{CacheLayer, DEFAULT_MAX_PENDING_WRITES, DEFAULT_NAMESPACE};
pub use policy::{
    CacheOverride, Policy, DEFAULT_COALESCE_WAIT, DEFAULT_MAX_BODY_SIZE, TAG_HEADERS,
    TTL_OVERRIDE_HEADER,
};
pub use service::CacheService;
pub use status::{BypassReason, CacheStatus, Stats, CACHE_NAME, CACHE_STATUS};
pub use store::RedisStore;
pub use value::ValueKey;
