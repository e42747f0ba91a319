//! Inputs the key does not see: the authority, a GET body, credential headers. Each test
//! runs over real connections, HTTP/1.1 and HTTP/2 (h2c) both, to `axum::serve` on a
//! loopback port, with a redis-server of its own.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::Request as AxumRequest;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::{wait_until, RedisServer};
use http::{header, HeaderName, Request};
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower_redis_cache::{CacheHandle, CacheLayer, Policy, RedisStore, RequestKey};

const TTL: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Http1,
    H2c,
}

/// One answer, read whole.
struct Answer {
    x_cache: String,
    body: String,
}

/// Sends one request over a new connection of `proto` to `port`. The request is sent as
/// given: its URI's authority becomes HTTP/2's `:authority`; over HTTP/1.1 the URI is sent
/// in origin form unless it has an authority, and the `Host` header is what the test set.
async fn send<B>(proto: Proto, port: u16, req: Request<B>) -> Answer
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let io = TokioIo::new(tcp);
    let res = match proto {
        Proto::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("h1 handshake");
            tokio::spawn(conn);
            sender.send_request(req).await.expect("h1 request")
        }
        Proto::H2c => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
            tokio::spawn(conn);
            sender.send_request(req).await.expect("h2 request")
        }
    };
    let x_cache = res
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    Answer {
        x_cache,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A GET for `authority` over `proto`: HTTP/2 carries it as `:authority` (no `Host`),
/// HTTP/1.1 as the `Host` header.
fn get_for(proto: Proto, authority: &str, path: &str) -> Request<http_body_util::Empty<Bytes>> {
    let b = match proto {
        Proto::Http1 => Request::get(path).header(header::HOST, authority),
        Proto::H2c => Request::get(format!("http://{authority}{path}")),
    };
    b.body(http_body_util::Empty::new()).expect("request")
}

async fn serve(app: Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

async fn layer(server: &RedisServer, policy: Policy) -> CacheLayer {
    let store = RedisStore::connect(common::relaxed_config(&server.url()))
        .await
        .unwrap();
    CacheLayer::new(store, Policy::bypass())
        .route("/tenant", policy.clone())
        .unwrap()
        .route("/echo", policy)
        .unwrap()
}

/// The authority as a handler reads it: the URI's (HTTP/2), else `Host` (HTTP/1.1).
fn authority_of(req: &AxumRequest) -> String {
    req.uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            let host = req.headers().get(header::HOST)?;
            Some(host.to_str().ok()?.to_owned())
        })
        .unwrap_or_default()
}

fn tenant_app(cache: CacheLayer) -> Router {
    Router::new()
        .route(
            "/tenant",
            get(|req: AxumRequest| async move { format!("page of {}", authority_of(&req)) }),
        )
        .layer(cache)
}

async fn stored(handle: &CacheHandle, n: u64) {
    wait_until("stored", || handle.stats().stored >= n).await;
}

/// A route keyed on `Host` keeps tenants apart over HTTP/2 as over HTTP/1.1, and one
/// tenant's entry is the same whichever protocol asks.
#[tokio::test]
async fn a_route_keyed_on_host_keys_the_authority_over_both_protocols() {
    let server = RedisServer::start();
    let cache = layer(&server, Policy::shared(TTL).key_header(header::HOST)).await;
    let handle = cache.handle();
    let port = serve(tenant_app(cache)).await;

    for (i, proto) in [Proto::Http1, Proto::H2c].into_iter().enumerate() {
        let a = format!("a{i}.example");
        let b = format!("b{i}.example");
        let first = send(proto, port, get_for(proto, &a, "/tenant")).await;
        assert_eq!(
            (first.x_cache.as_str(), first.body.as_str()),
            ("MISS", &*format!("page of {a}"))
        );
        stored(&handle, 2 * i as u64 + 1).await;
        // Tenant B must never get tenant A's page.
        let other = send(proto, port, get_for(proto, &b, "/tenant")).await;
        assert_eq!(other.body, format!("page of {b}"), "{proto:?}");
        assert_eq!(other.x_cache, "MISS", "{proto:?}");
        stored(&handle, 2 * i as u64 + 2).await;
        let again = send(proto, port, get_for(proto, &a, "/tenant")).await;
        assert_eq!(
            (again.x_cache.as_str(), again.body.as_str()),
            ("HIT", &*format!("page of {a}"))
        );
    }

    // One entry per authority, whichever protocol stored it; in any letter case.
    let h2 = send(
        Proto::H2c,
        port,
        get_for(Proto::H2c, "a0.example", "/tenant"),
    )
    .await;
    assert_eq!(
        (h2.x_cache.as_str(), h2.body.as_str()),
        ("HIT", "page of a0.example")
    );
    let h1 = send(
        Proto::Http1,
        port,
        get_for(Proto::Http1, "A1.Example", "/tenant"),
    )
    .await;
    assert_eq!(
        (h1.x_cache.as_str(), h1.body.as_str()),
        ("HIT", "page of a1.example")
    );

    // The handle finds an authority's entry by its Host.
    let key = RequestKey::new("/tenant").header(header::HOST, "a0.example".parse().unwrap());
    assert_eq!(handle.invalidate(&key).await.unwrap(), 1);
    let after = send(
        Proto::H2c,
        port,
        get_for(Proto::H2c, "a0.example", "/tenant"),
    )
    .await;
    assert_eq!(after.x_cache, "MISS");
}

/// A request that names two authorities is not cached: the handler may read either one.
#[tokio::test]
async fn a_request_naming_two_authorities_bypasses() {
    let server = RedisServer::start();
    let cache = layer(&server, Policy::shared(TTL).key_header(header::HOST)).await;
    let handle = cache.handle();
    let port = serve(tenant_app(cache)).await;

    // HTTP/2: `:authority` says one host, a `Host` header another.
    let req = Request::get("http://shop.example/tenant")
        .header(header::HOST, "evil.example")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let two = send(Proto::H2c, port, req).await;
    assert_eq!(two.x_cache, "BYPASS");
    // HTTP/1.1: two Host headers.
    let req = Request::get("/tenant")
        .header(header::HOST, "shop.example")
        .header(header::HOST, "evil.example")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let two = send(Proto::Http1, port, req).await;
    assert_eq!(two.x_cache, "BYPASS");
    assert_eq!(handle.stats().bypassed, 2);
    // Nothing of either was stored: shop.example gets its own page.
    let shop = send(
        Proto::H2c,
        port,
        get_for(Proto::H2c, "shop.example", "/tenant"),
    )
    .await;
    assert_eq!(
        (shop.x_cache.as_str(), shop.body.as_str()),
        ("MISS", "page of shop.example")
    );
}

/// A body that says nothing of itself in headers (HTTP/2 sends neither `Content-Length`
/// nor `Transfer-Encoding` for a streamed body).
fn streamed(
    text: &'static str,
) -> impl http_body::Body<Data = Bytes, Error = Infallible> + Send + Unpin + 'static {
    let frames = vec![Ok(http_body::Frame::data(Bytes::from_static(
        text.as_bytes(),
    )))];
    StreamBody::new(futures_util::stream::iter(frames))
}

/// A GET whose handler reads its body is never cached, over HTTP/2 as over HTTP/1.1.
#[tokio::test]
async fn a_get_with_a_streamed_body_is_not_cached_over_either_protocol() {
    let server = RedisServer::start();
    let cache = layer(&server, Policy::shared(TTL)).await;
    let handle = cache.handle();
    let app = Router::new()
        .route(
            "/echo",
            get(|body: Bytes| async move { format!("got {}", String::from_utf8_lossy(&body)) }),
        )
        .layer(cache);
    let port = serve(app).await;

    for proto in [Proto::H2c, Proto::Http1] {
        let with_body = |text| {
            let b = Request::get("http://shop.example/echo");
            let b = if proto == Proto::Http1 {
                // hyper sends no body with a GET unless told how it is framed.
                Request::get("/echo")
                    .header(header::HOST, "shop.example")
                    .header(header::TRANSFER_ENCODING, "chunked")
            } else {
                b
            };
            b.body(streamed(text)).unwrap()
        };
        let a = send(proto, port, with_body("from A")).await;
        assert_eq!(
            (a.x_cache.as_str(), a.body.as_str()),
            ("BYPASS", "got from A"),
            "{proto:?}"
        );
        let b = send(proto, port, with_body("from B")).await;
        assert_eq!(
            (b.x_cache.as_str(), b.body.as_str()),
            ("BYPASS", "got from B"),
            "{proto:?}"
        );
    }
    assert_eq!(handle.stats().stored, 0);
    // A GET without a body is cached as ever, and a body never gets its entry.
    let plain = send(
        Proto::H2c,
        port,
        get_for(Proto::H2c, "shop.example", "/echo"),
    )
    .await;
    assert_eq!(
        (plain.x_cache.as_str(), plain.body.as_str()),
        ("MISS", "got ")
    );
    stored(&handle, 1).await;
    let hit = send(
        Proto::H2c,
        port,
        get_for(Proto::H2c, "shop.example", "/echo"),
    )
    .await;
    assert_eq!(hit.x_cache, "HIT");
    let req = Request::get("http://shop.example/echo")
        .body(streamed("C"))
        .unwrap();
    let c = send(Proto::H2c, port, req).await;
    assert_eq!((c.x_cache.as_str(), c.body.as_str()), ("BYPASS", "got C"));
}

/// Requests with a credential-bearing header (by default `X-Api-Key` and the like, and any
/// header the layer declares) bypass shared routes: a handler that personalises by them
/// never has its answer served to another caller.
#[tokio::test]
async fn credential_headers_bypass_shared_routes() {
    let server = RedisServer::start();
    let tenant_token = HeaderName::from_static("x-tenant-token");
    let cache = layer(&server, Policy::shared(TTL))
        .await
        .credential_header(tenant_token.clone());
    let handle = cache.handle();
    let app = Router::new()
        .route(
            "/tenant",
            get(|req: AxumRequest| async move {
                let who = ["x-api-key", "x-tenant-token"]
                    .iter()
                    .find_map(|n| req.headers().get(*n)?.to_str().ok().map(str::to_owned))
                    .unwrap_or_else(|| "anonymous".into());
                format!("page for {who}")
            }),
        )
        .layer(cache);
    let port = serve(app).await;

    for proto in [Proto::Http1, Proto::H2c] {
        for (name, value) in [("x-api-key", "alice"), ("x-tenant-token", "bob")] {
            let mut req = get_for(proto, "shop.example", "/tenant");
            req.headers_mut().insert(name, value.parse().unwrap());
            let got = send(proto, port, req).await;
            assert_eq!(got.x_cache, "BYPASS", "{proto:?} {name}");
            assert_eq!(got.body, format!("page for {value}"));
        }
    }
    assert_eq!(handle.stats().stored, 0);
    let anonymous = send(
        Proto::Http1,
        port,
        get_for(Proto::Http1, "shop.example", "/tenant"),
    )
    .await;
    assert_eq!(
        (anonymous.x_cache.as_str(), anonymous.body.as_str()),
        ("MISS", "page for anonymous")
    );
}

/// In shared-cache mode a response's `Vary: Host` holds over HTTP/2 too, where the
/// authority is in the URI and no `Host` header comes.
#[tokio::test]
async fn vary_host_in_shared_cache_mode_holds_over_http2() {
    let server = RedisServer::start();
    let cache = layer(&server, Policy::http_shared(TTL)).await;
    let handle = cache.handle();
    let app = Router::new()
        .route(
            "/tenant",
            get(|req: AxumRequest| async move {
                (
                    [("cache-control", "public, max-age=60"), ("vary", "host")],
                    format!("page of {}", authority_of(&req)),
                )
            }),
        )
        .layer(cache);
    let port = serve(app).await;

    for proto in [Proto::H2c, Proto::Http1] {
        let a = send(proto, port, get_for(proto, "a.example", "/tenant")).await;
        assert_eq!(a.body, "page of a.example", "{proto:?}");
        wait_until("stored", || handle.stats().stored >= 1).await;
        let b = send(proto, port, get_for(proto, "b.example", "/tenant")).await;
        assert_eq!(b.body, "page of b.example", "{proto:?}");
    }
}
