//! The protocol-agnostic engine: what every service of a layer shares (settings, the route
//! table, counters and bounds), and the work behind a request that does not depend on its
//! protocol. It never builds a `Response`.

pub(crate) mod coalesce;
pub(crate) mod ctx;
pub(crate) mod inflight;

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderName;
use tokio::sync::Semaphore;

use crate::key::{Identity, Keyer};
use crate::outcome::Counters;
use crate::policy::Policy;
use crate::store::Store;

/// Everything a layer's services, futures, bodies and handle share: cloned per layer
/// (cheap: the route table and the runtime are behind `Arc`s).
#[derive(Clone)]
pub(crate) struct Engine {
    pub(crate) settings: Settings,
    pub(crate) routes: Arc<Routes>,
    pub(crate) runtime: Arc<Runtime>,
}

impl Engine {
    /// The near-cache of this layer (and its clones and handle), made on first use.
    #[cfg(feature = "near")]
    pub(crate) fn near(&self) -> &Arc<crate::store::near::Near> {
        self.runtime.near.get_or_init(|| {
            Arc::new(crate::store::near::Near::new(
                self.settings.near_capacity,
                format!("{}:near", self.settings.keyer.namespace()),
            ))
        })
    }
}

/// What the services of one layer read on every request.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) store: Store,
    pub(crate) keyer: Keyer,
    pub(crate) identity: Identity,
    /// Credential-bearing request headers besides `Authorization` and `Cookie`.
    pub(crate) credentials: Arc<[HeaderName]>,
    pub(crate) x_cache: Option<HeaderName>,
    pub(crate) invalidate_on_write: bool,
    #[cfg(feature = "near")]
    pub(crate) near_capacity: u64,
}

/// Counters and the write bound: shared by every clone of a layer, its services and handle.
#[derive(Debug)]
pub(crate) struct Runtime {
    pub(crate) counters: Counters,
    pub(crate) writes: Arc<Semaphore>,
    /// Bytes of entries being written: bounds memory while Redis is slow.
    pub(crate) write_bytes: Arc<Semaphore>,
    /// `get_or_insert_json` computations in flight, by key.
    pub(crate) inflight: inflight::Inflight,
    /// Misses in flight, for request coalescing.
    pub(crate) flights: coalesce::Flights,
    /// Leaders of coalesced misses finishing in the background after their client left.
    pub(crate) detached: Arc<Semaphore>,
    /// The near-cache, made on first use (with the namespace and capacity of that moment).
    #[cfg(feature = "near")]
    pub(crate) near: std::sync::OnceLock<Arc<crate::store::near::Near>>,
    /// Routes whose responses were refused for their `Vary` (logged once each).
    vary_logged: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// At most this many coalesced misses finish in the background after their clients left; past
/// it, a leaving client's work is dropped as without coalescing (its followers call the
/// inner service themselves).
pub(crate) const MAX_DETACHED: usize = 256;

/// The default bound on the bytes of entries being written at once.
pub(crate) const DEFAULT_MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;

impl Runtime {
    pub(crate) fn new(max_pending_writes: usize) -> Self {
        Runtime {
            counters: Counters::default(),
            writes: Arc::new(Semaphore::new(max_pending_writes)),
            write_bytes: Arc::new(Semaphore::new(DEFAULT_MAX_PENDING_BYTES)),
            inflight: inflight::Inflight::default(),
            flights: coalesce::Flights::default(),
            detached: Arc::new(Semaphore::new(MAX_DETACHED)),
            #[cfg(feature = "near")]
            near: std::sync::OnceLock::new(),
            vary_logged: std::sync::Mutex::default(),
        }
    }

    /// True the first time a route's response is refused for its `Vary` (bounded: at most
    /// 1,000 routes are remembered).
    pub(crate) fn first_vary_refusal(&self, route: &str) -> bool {
        let mut seen = self.vary_logged.lock().unwrap_or_else(|e| e.into_inner());
        seen.len() < 1000 && seen.insert(route.to_owned())
    }
}

/// The default policy and the table of route templates.
#[derive(Clone)]
pub(crate) struct Routes {
    pub(crate) default: Arc<Policy>,
    pub(crate) by_template: HashMap<String, Arc<Policy>>,
    pub(crate) matcher: matchit::Router<String>,
    /// Opted-in unary gRPC methods.
    pub(crate) grpc: Methods,
}

impl Routes {
    /// The route template and policy of a request: axum's `MatchedPath` when the layer runs
    /// inside a router, otherwise the table's own match of the path.
    pub(crate) fn lookup<'a>(
        &'a self,
        matched: Option<&'a str>,
        path: &str,
    ) -> (Option<&'a str>, &'a Arc<Policy>) {
        if let Some(template) = matched {
            let policy = self.by_template.get(template).unwrap_or(&self.default);
            return (Some(template), policy);
        }
        match self.matcher.at(path) {
            Ok(m) => {
                let template = m.value.as_str();
                let policy = self.by_template.get(template).unwrap_or(&self.default);
                (Some(template), policy)
            }
            Err(_) => (None, &self.default),
        }
    }

    /// Whether any route keeps entries in the near-cache.
    #[cfg(feature = "near")]
    pub(crate) fn uses_near(&self) -> bool {
        self.default.near.is_some() || self.by_template.values().any(|p| p.near.is_some())
    }
}

/// The default bound on the request message of an opted-in gRPC method: 64 KiB. Larger
/// requests are passed to the inner service (nothing lost) and not cached.
pub const DEFAULT_MAX_GRPC_REQUEST_SIZE: usize = 64 * 1024;

/// The opted-in unary methods of a layer, by full path.
#[derive(Clone, Debug)]
pub(crate) struct Methods {
    pub(crate) by_path: HashMap<String, Arc<Policy>>,
    pub(crate) max_request: usize,
}

impl Default for Methods {
    fn default() -> Self {
        Methods {
            by_path: HashMap::new(),
            max_request: DEFAULT_MAX_GRPC_REQUEST_SIZE,
        }
    }
}

// Named as the public type it stands for: a layer's, a service's and a handle's `Debug`
// show the layer's configuration.
impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLayer")
            .field("namespace", &self.settings.keyer.namespace())
            .field("identity", &self.settings.identity)
            .field("default", &self.routes.default)
            .field("routes", &self.routes.by_template)
            .field("grpc_methods", &self.routes.grpc.by_path)
            .field("store", &self.settings.store)
            .finish()
    }
}
