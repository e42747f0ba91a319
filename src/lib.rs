//! Tower middleware that caches HTTP responses of axum and tonic (and other Tower) services
//! in Redis.
//!
//! [`CacheLayer`] intercepts GET and HEAD requests (and the unary gRPC methods you opt in),
//! derives a key from the route, the exact
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
//! # Quick start (tonic)
//!
//! The same layer goes on a tonic 0.14 server. gRPC calls pass through untouched (streaming,
//! trailers, `grpc-status`), except the unary methods opted in by full path:
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_redis_cache::{CacheLayer, Policy, RedisConfig, RedisStore};
//!
//! # async fn run<S>(greeter: S) -> Result<(), Box<dyn std::error::Error>>
//! # where
//! #     S: tower_service::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible>
//! #         + tonic::server::NamedService + Clone + Send + Sync + 'static,
//! #     S::Response: axum::response::IntoResponse,
//! #     S::Future: Send + 'static,
//! # {
//! let store = RedisStore::connect(RedisConfig::from_env()?).await?;
//! let cache = CacheLayer::new(store, Policy::bypass())
//!     .grpc_method("/hello.Greeter/SayHello", Policy::shared(Duration::from_secs(60)))?;
//! let handle = cache.handle(); // handle.invalidate_grpc_method("/hello.Greeter/SayHello")
//!
//! tonic::transport::Server::builder()
//!     .layer(cache)
//!     .add_service(greeter)
//!     .serve("127.0.0.1:50051".parse()?)
//!     .await?;
//! # let _ = handle;
//! # Ok(()) }
//! ```
//!
//! Behind tonic's `Server` the layer sees tonic's request body: enable the **`tonic`
//! feature** so that it can rebuild it after reading an opted-in request (with only `axum`,
//! such calls pass through uncached and a warning is logged). A tonic service merged into an
//! axum router (`Routes::into_axum_router`) needs only `axum`. To layer one service alone,
//! use tonic's `LayerExt::named_layer`. See [`CacheLayer::grpc_method`] for what is keyed
//! and stored, and `examples/grpc.rs` for a service written without `protoc`.
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
//!   (1 MiB by default; larger bodies stream through, uncached). In shared-cache mode
//!   ([`Policy::http_shared`]) the response's headers decide instead, by RFC 9111.
//! - Hits carry `Content-Length`, `Age`, `Cache-Status: tower-redis-cache; hit; ttl=N`
//!   (RFC 9211) and `X-Cache: HIT`; misses `fwd=miss` / `MISS`; bypasses
//!   `fwd=bypass; detail=...` / `BYPASS`. The identity never appears in them.
//!
//! - Unary gRPC methods opted in with [`CacheLayer::grpc_method`]: keyed on the method path
//!   and the request message (hashed; requests over 64 KiB pass through), stored only when
//!   they end with `grpc-status: 0` in their trailers, replayed with headers, message and
//!   trailers and `x-cache: HIT` in the initial metadata. Other gRPC calls, gRPC-Web calls
//!   seen outside tonic-web's layer, and other methods (POST, PUT, ...) pass through
//!   untouched; a gRPC call never counts as a write for [`CacheLayer::invalidate_on_write`].
//!
//! # Per-route HTTP caching features
//!
//! Request coalescing ([`Policy::coalesce`], on by default; across instances with
//! [`Policy::lock_across_instances`]), strong ETags and `304 Not Modified` on hits
//! ([`Policy::etag`], on by default), TTLs from the response's own headers
//! ([`Policy::ttl_from_response`]), [`Policy::stale_while_revalidate`] and
//! [`Policy::stale_if_error`].
//!
//! # Shared-cache mode (RFC 9111)
//!
//! [`Policy::http_shared`] lets the origin's own headers decide, as RFC 9111 says for a
//! shared cache: `s-maxage`, `max-age`, `Expires`, `Age`, `no-cache`, `must-revalidate`,
//! `private`, `Authorization`, `Vary`, a `Last-Modified` heuristic and the request's
//! `no-store` / `no-cache` / `max-age`. `examples/proxy.rs` is a caching reverse proxy in
//! this mode.
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
//!   declared [`Policy::shared_for_authenticated`]. In shared-cache mode, `Authorization`
//!   follows RFC 9111 §3.5 instead: only responses marked `public`, `s-maxage` or
//!   `must-revalidate` are stored for, or served to, such requests.
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
//! - For gRPC-Web, put the cache **inside** tonic-web's `GrpcWebLayer`
//!   (`Server::builder().accept_http1(true).layer(GrpcWebLayer::new()).layer(cache)`): there
//!   calls are plain gRPC again, and hits are translated to gRPC-Web like any response.
//!   Outside it, gRPC-Web calls pass through uncached.
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
//! | `memory` | `MemoryStore`: the cache in this process's memory, without Redis | Yes |
//! | `near` | The near-cache in front of Redis (`Policy::near`) | Yes |
//! | `tonic` | Caches opted-in gRPC methods behind tonic's `Server` (rebuilds its request body) | No |

#![deny(missing_docs, unsafe_code, unreachable_pub)]
#![warn(missing_debug_implementations, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod engine;
mod entry;
mod grpc;
mod handle;
mod http;
mod key;
mod layer;
mod outcome;
mod policy;
mod service;
mod store;
mod value;

pub use engine::DEFAULT_MAX_GRPC_REQUEST_SIZE;
#[cfg(feature = "axum")]
pub use handle::health_route;
pub use handle::{CacheError, CacheHandle, Health, PathPattern, RedisStatus, RequestKey};
pub use http::body::ResponseBody;
pub use http::future::ResponseFuture;
pub use key::Identity;
pub use layer::{CacheLayer, DEFAULT_MAX_PENDING_WRITES, DEFAULT_NAMESPACE};
pub use outcome::{BypassReason, CacheStatus, Stats, CACHE_NAME, CACHE_STATUS};
pub use policy::{
    CacheOverride, Policy, DEFAULT_COALESCE_WAIT, DEFAULT_MAX_BODY_SIZE, DEFAULT_MAX_VARIANTS,
    TAG_HEADERS, TTL_OVERRIDE_HEADER,
};
pub use service::CacheService;
#[cfg(feature = "memory")]
pub use store::memory::MemoryStore;
pub use store::redis::breaker::BreakerState;
pub use store::redis::config::{
    ConfigError, RedisConfig, DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LOOKUP_TIMEOUT, DEFAULT_POOL_SIZE,
};
pub use store::redis::RedisStore;
pub use store::Store;
pub use value::ValueKey;
