//! `CacheHandle`: invalidation, health and counters, for the application's own code.

use std::fmt;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Uri};

use crate::engine::Engine;
use crate::key::KeyInput;
use crate::outcome::Stats;
use crate::store::redis::breaker::BreakerState;

/// A cheap, cloneable handle on a [`CacheLayer`](crate::CacheLayer)'s store, for the
/// application's own code (for example in axum state, to invalidate after a write).
///
/// ```no_run
/// use std::time::Duration;
/// use tower_redis_cache::{CacheLayer, Policy, RedisConfig, RedisStore, RequestKey};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect(RedisConfig::from_env()?).await?;
/// let cache = CacheLayer::new(store, Policy::bypass())
///     .route("/users/{id}/menu", Policy::per_user(Duration::from_secs(900)))?;
/// let handle = cache.handle();
/// // After user 42's roles change:
/// handle.invalidate(&RequestKey::new("/users/42/menu").identity("42")).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CacheHandle {
    engine: Engine,
}

/// The state of Redis as seen by [`CacheHandle::health`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisStatus {
    /// Redis answered a PING within the lookup deadline.
    Connected,
    /// Redis answered, but slower than the lookup deadline: lookups may time out.
    Degraded,
    /// Redis did not answer; requests are served uncached.
    Unavailable,
    /// The layer keeps its entries in process (`MemoryStore`): there is
    /// no Redis to ask.
    NotUsed,
}

impl RedisStatus {
    /// `"connected"`, `"degraded"`, `"unavailable"` or `"not used"`.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisStatus::Connected => "connected",
            RedisStatus::Degraded => "degraded",
            RedisStatus::Unavailable => "unavailable",
            RedisStatus::NotUsed => "not used",
        }
    }
}

/// The result of a health check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Whether Redis answered, and how fast.
    pub redis: RedisStatus,
    /// The circuit breaker after the check.
    pub breaker: BreakerState,
    /// The PING round-trip time, when it answered.
    pub round_trip: Option<Duration>,
}

impl Health {
    /// The Python utility's `/health` body: `{"status":"ok","env":...,"redis":...}`, with
    /// `"redis"` `"connected"` (also when degraded), `"unavailable"` or `"not used"` (the
    /// in-process store), plus `"redis_state"`,
    /// `"breaker"` and `"round_trip_ms"`. The status stays `"ok"` when only Redis is down:
    /// a cache outage is not a service outage.
    pub fn to_json(&self, env: &str) -> String {
        let redis = match self.redis {
            RedisStatus::Unavailable => "unavailable",
            RedisStatus::NotUsed => "not used",
            RedisStatus::Connected | RedisStatus::Degraded => "connected",
        };
        serde_json::json!({
            "status": "ok",
            "env": env,
            "redis": redis,
            "redis_state": self.redis.as_str(),
            "breaker": self.breaker.as_str(),
            "round_trip_ms": self.round_trip.map(|d| d.as_secs_f64() * 1000.0),
        })
        .to_string()
    }
}

/// A Redis operation of the handle failed (Redis down, too slow, or refusing the command),
/// or a value could not be serialized.
///
/// An invalidation that fails part-way keeps what it did: [`removed`](Self::removed) says how
/// many entries it removed before it stopped, and the others are still cached (and still
/// indexed, so calling it again removes them).
#[derive(Debug)]
pub struct CacheError {
    source: fred::error::Error,
    /// Entries an invalidation removed before it failed.
    removed: Option<u64>,
}

impl CacheError {
    pub(crate) fn serialize(e: serde_json::Error) -> Self {
        fred::error::Error::new(
            fred::error::ErrorKind::Parse,
            format!("value does not serialize to JSON: {e}"),
        )
        .into()
    }

    /// For an invalidation that failed part-way, how many entries it removed before it
    /// stopped (`None` when it removed none, or for other operations). Those stay removed;
    /// the rest are still cached until the invalidation is run again.
    pub fn removed(&self) -> Option<u64> {
        self.removed
    }

    /// Whether the command ran out of time (or was not sent because Redis is unreachable).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self.source.kind(),
            fred::error::ErrorKind::Timeout | fred::error::ErrorKind::Canceled
        )
    }
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.removed {
            Some(n) => write!(
                f,
                "invalidation incomplete: {n} entries removed, the others are still cached \
                 (run it again to remove them): {}",
                self.source.details()
            ),
            None => write!(f, "cache operation failed: {}", self.source.details()),
        }
    }
}

impl std::error::Error for CacheError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// One request as the layer would key it, to invalidate its entry.
///
/// The route template is found in the layer's route table when not given; give it with
/// [`route`](Self::route) when the layer learned it from axum's `MatchedPath` instead (a
/// layer per route, or a route outside the table). Give the
/// [`identity`](Self::identity) for entries of per-user routes. To reach every variant of
/// a path without knowing these, use [`CacheHandle::invalidate_path`].
#[derive(Clone)]
pub struct RequestKey {
    uri: String,
    route: Option<String>,
    identity: Option<String>,
    headers: HeaderMap,
}

impl fmt::Debug for RequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestKey")
            .field("uri", &self.uri)
            .field("route", &self.route)
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl RequestKey {
    /// The request's path and query, for example `/prompts/welcome?lang=en`.
    pub fn new(path_and_query: impl Into<String>) -> Self {
        RequestKey {
            uri: path_and_query.into(),
            route: None,
            identity: None,
            headers: HeaderMap::new(),
        }
    }

    /// The route template (`/users/{id}/menu`), when the layer's table does not have it.
    pub fn route(mut self, template: impl Into<String>) -> Self {
        self.route = Some(template.into());
        self
    }

    /// The caller's identity on a per-user route, exactly as the layer's
    /// [`Identity`](crate::Identity) extracts it (for `Identity::extension`, its `Display`).
    pub fn identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// A value of a header the route keys on ([`Policy::key_header`](crate::Policy::key_header)).
    /// For a route keyed on `Host`, give the authority as `Host` (`shop.example`): it finds
    /// the entry of that authority whether the request came over HTTP/1.1 or HTTP/2.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }
}

impl CacheHandle {
    pub(crate) fn new(engine: Engine) -> Self {
        CacheHandle { engine }
    }

    /// Counters since the layer was built.
    pub fn stats(&self) -> Stats {
        let mut stats = self.engine.runtime.counters.snapshot();
        stats.breaker_opened = self.store().breaker_opened();
        #[cfg(feature = "near")]
        if let Some(near) = self.engine.runtime.near.get() {
            use std::sync::atomic::Ordering::Relaxed;
            stats.near_hits = near.hits.load(Relaxed);
            stats.near_flushes = near.flushes.load(Relaxed);
            stats.near_bytes = near.size().1;
        }
        stats
    }

    /// Pings Redis within the command deadline (not gated by the circuit breaker; a reply
    /// closes it).
    pub async fn health(&self) -> Health {
        let store = self.store();
        if store.is_memory() {
            return Health {
                redis: RedisStatus::NotUsed,
                breaker: BreakerState::Closed,
                round_trip: None,
            };
        }
        let (redis, round_trip) = match store.ping().await {
            Ok(rtt) if rtt <= store.lookup_timeout() => (RedisStatus::Connected, Some(rtt)),
            Ok(rtt) => (RedisStatus::Degraded, Some(rtt)),
            Err(_) => (RedisStatus::Unavailable, None),
        };
        Health {
            redis,
            breaker: store.breaker_state(),
            round_trip,
        }
    }

    /// Checks, at start-up, that Redis lets the cache run every command it needs (GET, SET,
    /// EVAL, INCR, the sorted-set commands, SCAN, UNLINK...) on keys of its namespace. A
    /// missing ACL permission is a [`ConfigError::Permission`](crate::ConfigError) naming
    /// the command, instead of requests that silently never cache. When Redis cannot be
    /// reached the check passes (there is nothing to check yet) and says so in the log.
    ///
    /// ```no_run
    /// # async fn run(cache: tower_redis_cache::CacheLayer) -> Result<(), tower_redis_cache::ConfigError> {
    /// cache.handle().check().await?;
    /// # Ok(()) }
    /// ```
    pub async fn check(&self) -> Result<(), crate::ConfigError> {
        self.store().check(self.keyer().namespace()).await
    }

    /// The state of the circuit breaker around Redis, without asking Redis.
    pub fn breaker(&self) -> BreakerState {
        self.store().breaker_state()
    }

    /// The Redis key of a request (for inspection and tests).
    pub fn key(&self, request: &RequestKey) -> String {
        self.key_and_path(request).0
    }

    /// The key of a request and its path as the key sees it (the URI parsed once).
    fn key_and_path(&self, request: &RequestKey) -> (String, String) {
        let uri: Option<Uri> = request.uri.parse().ok();
        let (path, query) = match &uri {
            Some(u) => (u.path(), u.query()),
            None => (request.uri.as_str(), None),
        };
        let routes = &self.engine.routes;
        let (route, policy) = match &request.route {
            Some(r) => (Some(r.as_str()), routes.lookup(Some(r.as_str()), path).1),
            None => routes.lookup(None, path),
        };
        // An identity given means a per-user entry, whatever the handle's table says (the
        // route may have its policy from a clone of the layer).
        let identity = request.identity.as_deref().map(str::as_bytes);
        // A keyed Host stands for the authority: the URI's, else the `Host` given.
        let authority = uri.as_ref().and_then(Uri::authority).map(|a| a.as_str());
        let authority = authority.or_else(|| {
            let host = request.headers.get(http::header::HOST)?;
            host.to_str().ok()
        });
        let key = self.engine.settings.keyer.key(&KeyInput {
            route,
            identity,
            path,
            query,
            key_headers: &policy.key_headers,
            headers: &request.headers,
            authority,
        });
        (key, path.to_owned())
    }

    pub(crate) fn store(&self) -> &crate::store::Store {
        &self.engine.settings.store
    }

    pub(crate) fn keyer(&self) -> &crate::key::Keyer {
        &self.engine.settings.keyer
    }

    pub(crate) fn runtime(&self) -> &crate::engine::Runtime {
        &self.engine.runtime
    }

    async fn by_indexes(&self, indexes: Vec<String>) -> Result<u64, CacheError> {
        let keyer = self.keyer();
        let markers: Vec<String> = indexes.iter().map(|i| keyer.marker_of(i)).collect();
        self.store()
            .invalidate_indexes(
                keyer.seq_key(),
                &markers,
                &indexes,
                &keyer.bookkeeping_prefix(),
            )
            .await
            .map_err(CacheError::from)
    }

    /// Removes the entry of one request (GET and HEAD share it). Returns how many entries
    /// were removed (0 or 1).
    ///
    /// Like every invalidation, it also stops responses to this path that are being
    /// computed right now from being stored afterwards, and it runs to its end even if the
    /// caller stops waiting for it (a client that disconnects, a timeout layer).
    pub async fn invalidate(&self, request: &RequestKey) -> Result<u64, CacheError> {
        let (handle, request) = (self.clone(), request.clone());
        self.detached(async move { handle.invalidate_now(&request).await })
            .await
    }

    async fn invalidate_now(&self, request: &RequestKey) -> Result<u64, CacheError> {
        // The path as the key sees it, so the marker is the one the request's writer checks.
        let (key, path) = self.key_and_path(request);
        let keyer = self.keyer();
        let marker = keyer.marker_of(&keyer.path_index(&path));
        self.store()
            .invalidate_keys(keyer.seq_key(), &[marker], vec![key])
            .await
            .map_err(CacheError::from)
    }

    /// Removes every entry of a path, exactly as the router sees it (`/users/42/menu`):
    /// every query string, every user, every keyed-header variant.
    pub async fn invalidate_path(&self, path: &str) -> Result<u64, CacheError> {
        let (handle, path) = (self.clone(), path.to_owned());
        self.detached(async move { handle.invalidate_path_now(&path).await })
            .await
    }

    async fn invalidate_path_now(&self, path: &str) -> Result<u64, CacheError> {
        self.by_indexes(vec![self.keyer().path_index(path)]).await
    }

    /// Removes every entry of one identity across all routes, as the layer's
    /// [`Identity`](crate::Identity) extracts it (for `Identity::extension`, its `Display`).
    pub async fn invalidate_user(&self, identity: &str) -> Result<u64, CacheError> {
        let (handle, identity) = (self.clone(), identity.to_owned());
        self.detached(async move { handle.invalidate_user_now(&identity).await })
            .await
    }

    async fn invalidate_user_now(&self, identity: &str) -> Result<u64, CacheError> {
        self.by_indexes(vec![self.keyer().user_index(identity.as_bytes())])
            .await
    }

    /// Removes every entry of a route template (`/users/{id}/menu`).
    pub async fn invalidate_route(&self, template: &str) -> Result<u64, CacheError> {
        let (handle, template) = (self.clone(), template.to_owned());
        self.detached(async move { handle.invalidate_route_now(&template).await })
            .await
    }

    async fn invalidate_route_now(&self, template: &str) -> Result<u64, CacheError> {
        self.by_indexes(vec![self.keyer().route_index(template)])
            .await
    }

    /// Removes every entry of an opted-in gRPC method (`/package.Service/Method`), for every
    /// request message and user. The same as [`invalidate_route`](Self::invalidate_route)
    /// with the method path.
    pub async fn invalidate_grpc_method(&self, path: &str) -> Result<u64, CacheError> {
        self.invalidate_route(path).await
    }

    /// Removes every entry carrying a tag (from [`Policy::tag`](crate::Policy::tag) or a
    /// `Cache-Tag` / `Surrogate-Key` response header).
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64, CacheError> {
        let (handle, tag) = (self.clone(), tag.to_owned());
        self.detached(async move { handle.invalidate_tag_now(&tag).await })
            .await
    }

    async fn invalidate_tag_now(&self, tag: &str) -> Result<u64, CacheError> {
        self.by_indexes(vec![self.keyer().tag_index(tag)]).await
    }

    /// Removes every entry whose path matches a glob pattern (`/users/*/permissions`).
    /// Costs a scan of the cached paths (never `KEYS`), then time proportional to the
    /// entries removed.
    pub async fn invalidate_pattern(&self, pattern: &PathPattern) -> Result<u64, CacheError> {
        let (handle, pattern) = (self.clone(), pattern.clone());
        self.detached(async move { handle.invalidate_pattern_now(&pattern).await })
            .await
    }

    async fn invalidate_pattern_now(&self, pattern: &PathPattern) -> Result<u64, CacheError> {
        let keyer = self.keyer();
        let store = self.store();
        // The namespace-wide marker: in-flight responses of any path are not stored.
        store
            .invalidate_keys(keyer.seq_key(), &[keyer.all_marker()], Vec::new())
            .await?;
        let paths = store.matching_paths(&keyer.paths_key(), &pattern.0).await?;
        let indexes: Vec<String> = paths.iter().map(|p| keyer.path_index(p)).collect();
        let mut removed = 0;
        for chunk in indexes.chunks(100) {
            match store
                .invalidate_indexes(keyer.seq_key(), &[], chunk, &keyer.bookkeeping_prefix())
                .await
            {
                Ok(n) => removed += n,
                Err(mut e) => {
                    e.removed += removed;
                    return Err(e.into());
                }
            }
        }
        Ok(removed)
    }

    /// Removes every entry and index of the namespace, on every primary (SCAN and UNLINK
    /// in batches). Returns how many entries were removed.
    pub async fn clear(&self) -> Result<u64, CacheError> {
        let handle = self.clone();
        self.detached(async move { handle.clear_now().await }).await
    }

    async fn clear_now(&self) -> Result<u64, CacheError> {
        let keyer = self.keyer();
        let store = self.store();
        store
            .invalidate_keys(keyer.seq_key(), &[keyer.all_marker()], Vec::new())
            .await?;
        // The path registry and the indexes go first (see `Keyer::scan_patterns`).
        store
            .invalidate_keys(keyer.seq_key(), &[], vec![keyer.paths_key()])
            .await?;
        let [indexes, entries, values, pending] = keyer.scan_patterns();
        let removed = store
            .scan_unlink(&[indexes, pending, entries, values], 2)
            .await?;
        Ok(removed)
    }
}

/// A glob pattern over request paths, for
/// [`CacheHandle::invalidate_pattern`]: `*` matches any run of characters (`/` included),
/// `?` one character.
///
/// Build patterns from user input with [`literal`](Self::literal), which escapes glob
/// metacharacters, so that a path can never widen into a broader pattern by accident:
///
/// ```
/// use tower_redis_cache::PathPattern;
///
/// let user_id = "4*2"; // from a request: must not match every user starting with 4
/// let p = PathPattern::new().literal("/users/").literal(user_id).any();
/// assert_eq!(p.as_str(), r"/users/4\*2*");
/// assert_eq!(PathPattern::glob("/users/*/permissions").as_str(), "/users/*/permissions");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathPattern(String);

impl PathPattern {
    /// An empty pattern, to build with [`literal`](Self::literal) and [`any`](Self::any).
    pub fn new() -> Self {
        PathPattern(String::new())
    }

    /// A pattern written as a Redis glob, taken as is (`*`, `?`, `[abc]`, `\` escapes).
    /// Only for trusted, constant patterns.
    pub fn glob(pattern: impl Into<String>) -> Self {
        PathPattern(pattern.into())
    }

    /// Appends text that matches only itself.
    pub fn literal(mut self, text: &str) -> Self {
        for c in text.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^' | '-') {
                self.0.push('\\');
            }
            self.0.push(c);
        }
        self
    }

    /// Appends `*`: any run of characters.
    pub fn any(mut self) -> Self {
        self.0.push('*');
        self
    }

    /// The pattern as Redis reads it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl CacheHandle {
    /// Runs an invalidation as its own task, so that it completes even when its caller is
    /// dropped halfway (a marker raised and the entries not yet removed would leave them
    /// stale). Then empties the near-caches, here and, through Redis, in other instances.
    async fn detached<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, CacheError>> + Send + 'static,
    ) -> Result<T, CacheError> {
        #[cfg(feature = "near")]
        let work = {
            let store = self.store().as_redis().cloned();
            let near = (self.engine.routes.uses_near() && store.is_some())
                .then(|| std::sync::Arc::clone(self.engine.near()));
            async move {
                let result = work.await;
                if let (Some(near), Some(store)) = (near, store) {
                    near.invalidated(&store).await;
                }
                result
            }
        };
        spawn_detached(Box::pin(work)).await
    }
}

/// The work as a boxed trait object: the futures of an invalidation nest deep enough
/// (handle, store, scripts) to pass the compiler's query depth in release builds of the
/// futures that await an invalidation.
type Work<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, CacheError>> + Send + 'static>>;

async fn spawn_detached<T: Send + 'static>(work: Work<T>) -> Result<T, CacheError> {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => rt.spawn(work).await.unwrap_or_else(|e| {
            Err(fred::error::Error::new(
                fred::error::ErrorKind::Unknown,
                format!("invalidation task failed: {e}"),
            )
            .into())
        }),
        Err(_) => work.await,
    }
}

impl From<fred::error::Error> for CacheError {
    fn from(source: fred::error::Error) -> Self {
        CacheError {
            source,
            removed: None,
        }
    }
}

impl From<crate::store::Incomplete> for CacheError {
    fn from(e: crate::store::Incomplete) -> Self {
        CacheError {
            source: e.error,
            removed: (e.removed > 0).then_some(e.removed),
        }
    }
}

impl fmt::Debug for CacheHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheHandle")
            .field("namespace", &self.engine.settings.keyer.namespace())
            .finish()
    }
}

/// A ready-made axum route for `/health`, answering [`Health::to_json`].
///
/// ```no_run
/// # async fn run(handle: tower_redis_cache::CacheHandle) {
/// let app: axum::Router = axum::Router::new()
///     .route("/health", tower_redis_cache::health_route(handle, "production"));
/// # }
/// ```
#[cfg(feature = "axum")]
pub fn health_route<S>(
    handle: CacheHandle,
    env: impl Into<String>,
) -> axum::routing::MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    let env: std::sync::Arc<str> = env.into().into();
    axum::routing::get(move || {
        let handle = handle.clone();
        let env = env.clone();
        async move {
            let body = handle.health().await.to_json(&env);
            ([(http::header::CONTENT_TYPE, "application/json")], body)
        }
    })
}
