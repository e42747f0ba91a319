//! `CacheLayer`: the builder, the per-route policy table and what every service shares.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use http::HeaderName;
use tower_layer::Layer;

use crate::engine::{Engine, Routes, Runtime, Settings};
use crate::handle::CacheHandle;
use crate::key::{valid_namespace, Identity, Keyer};
use crate::policy::Policy;
use crate::service::CacheService;
use crate::store::redis::config::ConfigError;
use crate::store::Store;

/// The default namespace, the first part of every key.
pub const DEFAULT_NAMESPACE: &str = "cache";
/// The default bound on Redis writes in flight; past it, new writes are dropped and counted.
pub const DEFAULT_MAX_PENDING_WRITES: usize = 1024;

/// A Tower layer that caches GET (and HEAD) responses, and opted-in unary gRPC calls, in
/// Redis.
///
/// See the [crate docs](crate) for an example with axum.
#[derive(Clone)]
#[must_use]
pub struct CacheLayer {
    pub(crate) engine: Engine,
}

impl CacheLayer {
    /// A layer over `store` whose routes without a policy of their own (see
    /// [`route`](Self::route)) are cached with `policy`.
    ///
    /// The default policy applies to every route the table does not name, so spell it out:
    /// `Policy::bypass()` and a table of routes is the safe shape; a
    /// [`Policy::shared`] default shares every unnamed route's responses with every caller
    /// (requests with `Authorization`, `Cookie`, another
    /// [credential header](Self::credential_header) or an identity excepted).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_redis_cache::{CacheLayer, Policy, RedisConfig, RedisStore};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = RedisStore::connect(RedisConfig::from_env()?).await?;
    /// let cache = CacheLayer::new(store, Policy::bypass())
    ///     .namespace("backend")?
    ///     .route("/roles", Policy::shared(Duration::from_secs(60)))?;
    /// # Ok(()) }
    /// ```
    pub fn new(store: impl Into<Store>, policy: Policy) -> Self {
        CacheLayer {
            engine: Engine {
                settings: Settings {
                    store: store.into(),
                    keyer: Keyer::new(DEFAULT_NAMESPACE),
                    identity: Identity::default(),
                    credentials: Arc::from(crate::policy::DEFAULT_CREDENTIAL_HEADERS.as_slice()),
                    x_cache: Some(HeaderName::from_static("x-cache")),
                    invalidate_on_write: false,
                    #[cfg(feature = "near")]
                    near_capacity: crate::store::near::DEFAULT_NEAR_CAPACITY,
                },
                routes: Arc::new(Routes {
                    default: Arc::new(policy),
                    by_template: HashMap::new(),
                    matcher: matchit::Router::new(),
                    grpc: crate::engine::Methods::default(),
                }),
                runtime: Arc::new(Runtime::new(DEFAULT_MAX_PENDING_WRITES)),
            },
        }
    }

    /// The namespace, first part of every key (default `cache`): 1 to 64 characters of
    /// `A-Z a-z 0-9 _ - .`. Services sharing a Redis use different namespaces.
    pub fn namespace(mut self, namespace: &str) -> Result<Self, ConfigError> {
        if !valid_namespace(namespace) {
            return Err(ConfigError::InvalidNamespace(namespace.to_owned()));
        }
        self.engine.settings.keyer = Keyer::new(namespace);
        Ok(self)
    }

    /// Where the caller's identity comes from (default [`Identity::none`]: per-user routes
    /// cache nothing until this is set). On strictly shared routes, a request with an
    /// identity is passed through, like one with `Authorization`.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.engine.settings.identity = identity;
        self
    }

    /// Declares a request header as carrying a credential, like `Authorization` and
    /// `Cookie`: a request with it bypasses strictly shared routes (`BYPASS`, detail
    /// `credential`), so that a response personalised by it is never served to others.
    /// Per-user routes and routes declared
    /// [`shared_for_authenticated`](Policy::shared_for_authenticated) are not affected.
    ///
    /// `Proxy-Authorization`, `X-Api-Key`, `X-Auth-Token` and `X-Access-Token` are
    /// credential headers by default; add the ones your authentication reads:
    ///
    /// ```
    /// use std::time::Duration;
    /// use http::HeaderName;
    /// use tower_redis_cache::{CacheLayer, MemoryStore, Policy};
    ///
    /// let cache = CacheLayer::new(MemoryStore::new(1 << 20), Policy::bypass())
    ///     .credential_header(HeaderName::from_static("x-tenant-token"));
    /// # let _ = cache;
    /// ```
    pub fn credential_header(mut self, name: HeaderName) -> Self {
        if !self.engine.settings.credentials.contains(&name) {
            let mut names = self.engine.settings.credentials.to_vec();
            names.push(name);
            self.engine.settings.credentials = Arc::from(names);
        }
        self
    }

    /// Replaces the policy of routes that have none in the table. With
    /// `Router::route_layer`, give each route a clone of one layer with its own policy:
    /// they share the store, the counters and the handle.
    pub fn policy(mut self, policy: Policy) -> Self {
        Arc::make_mut(&mut self.engine.routes).default = Arc::new(policy);
        self
    }

    /// Sets the policy of a route template, in axum's syntax (`/users/{id}/menu`,
    /// `/files/{*path}`). Inside an axum router the template is compared with the route's
    /// `MatchedPath`; elsewhere (a layer around the whole router, tonic) the request path is
    /// matched against the templates.
    pub fn route(mut self, template: &str, policy: Policy) -> Result<Self, ConfigError> {
        let routes = Arc::make_mut(&mut self.engine.routes);
        if !routes.by_template.contains_key(template) {
            routes
                .matcher
                .insert(template, template.to_owned())
                .map_err(|e| ConfigError::InvalidRoute {
                    route: template.to_owned(),
                    reason: e.to_string(),
                })?;
        }
        routes
            .by_template
            .insert(template.to_owned(), Arc::new(policy));
        Ok(self)
    }

    /// Caches a unary gRPC method, named by its full path (`/package.Service/Method`),
    /// with its own policy: TTL, shared or per-user scope, tags, size limit, coalescing.
    ///
    /// Every other gRPC call passes through untouched (streaming, trailers, no buffering).
    /// For an opted-in method the request message is read (up to
    /// [`grpc_max_request_size`](Self::grpc_max_request_size); larger requests pass through
    /// uncached, nothing lost) and goes into the key hashed, with the request's
    /// `content-type` and `grpc-encoding`. Only responses that end with `grpc-status: 0` in
    /// their trailers and are not compressed are stored, headers and trailers included;
    /// errors (trailers-only responses) never are. A hit replays headers, message and
    /// trailers, with `x-cache: HIT` in the initial metadata. Entries are indexed under the
    /// method path: [`CacheHandle::invalidate_grpc_method`] removes them.
    ///
    /// The policy's TTL, scope, tags, size limit, coalescing, stale-while-revalidate and
    /// handler overrides (`x-cache-ttl`, `cache-tag` in the response metadata) apply as on a
    /// route; ETags do not, and stale-if-error answers only HTTP-level failures (an error
    /// of the inner service, a 5xx), not gRPC error statuses. A gRPC-Web call is cached only
    /// where the layer sees it as gRPC, inside tonic-web's layer (see the crate docs).
    ///
    /// The request body must be one the layer can rebuild after reading it: tonic's (feature
    /// `tonic`) or axum's (feature `axum`); otherwise calls pass through uncached and a
    /// warning is logged once.
    ///
    /// ```
    /// use std::time::Duration;
    /// use http::HeaderName;
    /// use tower_redis_cache::{CacheLayer, Identity, Policy, RedisConfig, RedisStore};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = RedisStore::connect(RedisConfig::from_env()?).await?;
    /// let cache = CacheLayer::new(store, Policy::bypass())
    ///     .identity(Identity::header(HeaderName::from_static("x-user-id")))
    ///     .grpc_method("/shop.Catalog/GetProduct", Policy::shared(Duration::from_secs(300)))?
    ///     .grpc_method("/shop.Cart/GetCart", Policy::per_user(Duration::from_secs(30)))?;
    /// // tonic::transport::Server::builder().layer(cache).add_service(...)
    /// # let _ = cache;
    /// # Ok(()) }
    /// ```
    ///
    /// [`CacheHandle::invalidate_grpc_method`]: crate::CacheHandle::invalidate_grpc_method
    pub fn grpc_method(mut self, path: &str, policy: Policy) -> Result<Self, ConfigError> {
        if !crate::grpc::valid_method_path(path) {
            return Err(ConfigError::InvalidRoute {
                route: path.to_owned(),
                reason: "a gRPC method is named /package.Service/Method".to_owned(),
            });
        }
        let policy = crate::grpc::method_policy(policy);
        Arc::make_mut(&mut self.engine.routes)
            .grpc
            .by_path
            .insert(path.to_owned(), Arc::new(policy));
        Ok(self)
    }

    /// The largest request of an opted-in gRPC method that is read and cached, in bytes
    /// (default [`DEFAULT_MAX_GRPC_REQUEST_SIZE`](crate::DEFAULT_MAX_GRPC_REQUEST_SIZE),
    /// 64 KiB). Larger requests are handed to the inner service as they came, uncached.
    pub fn grpc_max_request_size(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.engine.routes).grpc.max_request = bytes;
        self
    }

    /// The name of the short status header (default `x-cache`: `HIT`, `MISS` or `BYPASS`).
    /// `Cache-Status` (RFC 9211) is always sent.
    pub fn status_header(mut self, name: HeaderName) -> Self {
        self.engine.settings.x_cache = Some(name);
        self
    }

    /// After a successful (2xx) PUT, PATCH, POST or DELETE to a path, removes that path's
    /// entries (every query, user and header variant) before the response is returned.
    /// Off by default. Entries of other paths that show the same data (a list showing the
    /// item just changed) still need [`CacheHandle`] calls or tags of your own.
    pub fn invalidate_on_write(mut self, on: bool) -> Self {
        self.engine.settings.invalidate_on_write = on;
        self
    }

    /// Sends no short status header, only `Cache-Status`.
    pub fn no_status_header(mut self) -> Self {
        self.engine.settings.x_cache = None;
        self
    }

    /// The most Redis writes in flight at once (default 1024, at least 1; their entries may
    /// hold 64 MiB in all). Past either bound new writes are dropped and counted in
    /// [`Stats::writes_dropped`](crate::Stats); the response is never delayed. Resets the counters: call it before [`handle`](Self::handle).
    pub fn max_pending_writes(mut self, n: usize) -> Self {
        self.engine.runtime = Arc::new(Runtime::new(n.max(1)));
        self
    }

    /// The size of the near-cache in bytes (default 64 MiB), shared by the routes that use
    /// it ([`Policy::near`]). Entries are weighed by body, headers and key.
    #[cfg(feature = "near")]
    pub fn near_capacity(mut self, bytes: u64) -> Self {
        self.engine.settings.near_capacity = bytes;
        self
    }

    /// A handle for invalidation, health and counters, shared by every clone of this layer.
    /// Take it after the other settings: it keeps the namespace it was taken with.
    pub fn handle(&self) -> CacheHandle {
        CacheHandle::new(self.engine.clone())
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = CacheService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CacheService::new(inner, self.engine.clone())
    }
}

impl fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.engine, f)
    }
}
