//! A caching reverse proxy: every request goes to one origin, and GET responses are cached
//! in Redis as a shared HTTP cache (RFC 9111) would, by the origin's own headers
//! (`Policy::http_shared`).
//!
//! Run with `ORIGIN_URL=http://127.0.0.1:8080 cargo run --example proxy` (Redis on
//! 127.0.0.1:6379 by default), then:
//!
//! ```text
//! curl -i localhost:3000/some/page          # MISS, then HIT if the origin allows it
//! curl -i localhost:3000/_proxy/health      # the proxy's own health, Redis included
//! ```
//!
//! Settings (environment): `ORIGIN_URL` (http://127.0.0.1:8080; `http` only), `BIND`
//! (127.0.0.1:3000), `REDIS_URL` or `REDIS_HOST`, `REDIS_PORT`, `REDIS_PASSWORD`,
//! `REDIS_DB`, `REDIS_SSL` (see `RedisConfig::from_env`), `CACHE_NAMESPACE` (proxy),
//! `CACHE_MAX_TTL` (86400: the longest any response stays fresh here, in seconds),
//! `HEALTH_PATH` (/_proxy/health), `RUST_LOG`.
//!
//! Entries are keyed on the authority the client asked for, passed to the origin as
//! `X-Forwarded-Host`; forwarding headers a client sends itself (`Forwarded`,
//! `X-Forwarded-*`, `X-Real-IP`) are dropped, since this proxy is the first hop.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use axum::Router;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_redis_cache::{health_route, CacheLayer, Policy, RedisConfig, RedisStore};

/// How long the origin may take to answer before the proxy says 504.
const ORIGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers through which proxies tell the origin about earlier hops. A client's own are
/// removed: this proxy is the first hop, and sets the ones it knows.
const FORWARDING_HEADERS: [&str; 6] = [
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
];

/// What this proxy adds to `Via` (RFC 9110 §7.6.3).
const VIA: &str = "1.1 tower-redis-cache";

/// The origin: its scheme and authority, and a pooled HTTP/1 client.
#[derive(Clone)]
struct Origin {
    base: Arc<Uri>,
    client: Client<HttpConnector, Body>,
}

impl Origin {
    /// Sends `req` to the origin and returns its answer, or 502/504.
    async fn forward(self, req: Request<Body>) -> Result<Response<Body>, Infallible> {
        let (mut parts, body) = req.into_parts();
        let client_addr = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let uri = match self.target(&parts.uri) {
            Some(uri) => uri,
            None => return Ok(status(StatusCode::BAD_REQUEST)),
        };
        // The authority the client asked for: the cache keys on it (see `main`), and the
        // origin learns it from `X-Forwarded-Host`.
        let host = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| parts.headers.get(header::HOST).cloned());
        parts.headers.remove(header::HOST);
        remove_hop_by_hop(&mut parts.headers);
        // This proxy is the edge: what a client says of earlier hops is not forwarded (a
        // client-sent `X-Forwarded-Host` would change the page without changing the key).
        for name in FORWARDING_HEADERS {
            parts.headers.remove(name);
        }
        if let Some(host) = host {
            parts
                .headers
                .insert(HeaderName::from_static("x-forwarded-host"), host);
        }
        parts.headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("http"),
        );
        if let Some(ip) = client_addr {
            append_list(&mut parts.headers, "x-forwarded-for", &ip.to_string());
        }
        append_list(&mut parts.headers, "via", VIA);
        let mut upstream = Request::from_parts(parts, body);
        *upstream.uri_mut() = uri;
        // Host comes from the origin's URI (hyper sets it).
        *upstream.version_mut() = http::Version::HTTP_11;

        match tokio::time::timeout(ORIGIN_TIMEOUT, self.client.request(upstream)).await {
            Ok(Ok(res)) => {
                let (mut parts, body) = res.into_parts();
                // The proxy speaks its own HTTP version to its client (RFC 9110 §2.5).
                parts.version = http::Version::HTTP_11;
                remove_hop_by_hop(&mut parts.headers);
                append_list(&mut parts.headers, "via", VIA);
                Ok(Response::from_parts(parts, Body::new(body)))
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "origin request failed");
                Ok(status(StatusCode::BAD_GATEWAY))
            }
            Err(_) => Ok(status(StatusCode::GATEWAY_TIMEOUT)),
        }
    }

    /// The origin's URI for a request's path and query.
    fn target(&self, uri: &Uri) -> Option<Uri> {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        Uri::builder()
            .scheme(self.base.scheme()?.clone())
            .authority(self.base.authority()?.clone())
            .path_and_query(path)
            .build()
            .ok()
    }
}

/// Removes the hop-by-hop fields (RFC 9110 §7.6.1): those named by `Connection`, and the
/// ones defined as such, so that they are not forwarded (nor cached).
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// Appends `value` to a list-valued header (`Via`, `X-Forwarded-For`).
fn append_list(headers: &mut HeaderMap, name: &'static str, value: &str) {
    let name = HeaderName::from_static(name);
    let joined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(old) => format!("{old}, {value}"),
        None => value.to_owned(),
    };
    if let Ok(v) = HeaderValue::try_from(joined) {
        headers.insert(name, v);
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut res = Response::new(Body::from(code.canonical_reason().unwrap_or("error")));
    *res.status_mut() = code;
    res
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_redis_cache=debug".into()),
        )
        .init();

    let bind = env_or("BIND", "127.0.0.1:3000");
    let base: Uri = env_or("ORIGIN_URL", "http://127.0.0.1:8080").parse()?;
    if base.scheme_str() != Some("http") || base.authority().is_none() {
        return Err(format!("ORIGIN_URL must be http://host[:port], got {base}").into());
    }
    let max_ttl: u64 = env_or("CACHE_MAX_TTL", "86400")
        .parse()
        .map_err(|_| "CACHE_MAX_TTL must be a whole number of seconds")?;
    let health_path = env_or("HEALTH_PATH", "/_proxy/health");
    if !health_path.starts_with('/') || health_path.contains(['{', '}']) {
        return Err(format!(
            "HEALTH_PATH must be a plain path such as /_proxy/health, got {health_path:?}"
        )
        .into());
    }

    let config = RedisConfig::from_env()?;
    tracing::info!(?config, "redis");
    let store = RedisStore::connect(config).await?;
    // The target URI is the primary cache key (RFC 9111 §4): keying on `Host` keys the
    // authority the client asked for (`:authority` over HTTP/2), which the origin sees as
    // `X-Forwarded-Host`. Most origins that compress answer `Vary: Accept-Encoding`: keying
    // on it keeps an entry per value (gzip, br, none...) instead of one that each value
    // replaces in turn.
    let policy = Policy::http_shared(Duration::from_secs(max_ttl))
        .key_header(header::HOST)
        .key_header(header::ACCEPT_ENCODING);
    let cache = CacheLayer::new(store, policy)
        .namespace(&env_or("CACHE_NAMESPACE", "proxy"))?
        // A successful PUT, PATCH, POST or DELETE removes its path's entries (RFC 9111 §4.4).
        .invalidate_on_write(true);
    let handle = cache.handle();

    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.set_nodelay(true);
    let origin = Origin {
        base: Arc::new(base.clone()),
        client: Client::builder(TokioExecutor::new()).build(connector),
    };
    let proxy = tower::ServiceBuilder::new()
        .layer(cache)
        .service(tower::service_fn(move |req| origin.clone().forward(req)));

    let app = Router::new()
        .route(
            &health_path,
            health_route(handle, env_or("APP_ENV", "development")),
        )
        .fallback_service(proxy);

    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!(addr = %listener.local_addr()?, origin = %base, "listening");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
