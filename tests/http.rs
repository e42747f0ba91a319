//! Behaviour through a real axum router against a real redis-server per test.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use common::scenario::{fake_auth, UserId};
use common::{get as get_req, get_with, send, wait_until, RedisServer};
use fred::prelude::{ClientLike, KeysInterface};
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tower_redis_cache::{
    CacheHandle, CacheLayer, CacheOverride, CacheService, CacheStatus, Identity, Policy,
    RedisStore, RequestKey, ResponseFuture,
};

const MIN: Duration = Duration::from_secs(60);

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::connect(common::relaxed_config(&server.url()))
        .await
        .unwrap()
}

/// A counter of handler calls, returned in bodies so a hit can be told from a miss.
#[derive(Clone, Default)]
struct Calls(Arc<AtomicUsize>);

impl Calls {
    fn next(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

fn build_app(cache: CacheLayer, calls: Calls) -> Router {
    let c = calls.clone();
    let shared = get(move || {
        let c = c.clone();
        async move { format!("shared #{}", c.next()) }
    });
    let c = calls.clone();
    let mine = get(
        move |Path(id): Path<String>, user: Option<axum::Extension<UserId>>| {
            let c = c.clone();
            async move {
                let who = user.map(|u| u.0 .0).unwrap_or_default();
                format!("user {id} seen by {who} #{}", c.next())
            }
        },
    );
    let c = calls.clone();
    let headers = get(move |Path(kind): Path<String>| {
        let c = c.clone();
        async move {
            let n = c.next();
            let mut res = format!("{kind} #{n}").into_response();
            let h = res.headers_mut();
            match kind.as_str() {
                "set-cookie" => {
                    h.insert("set-cookie", HeaderValue::from_static("s=1"));
                }
                "no-store" => {
                    h.insert("cache-control", HeaderValue::from_static("No-Store"));
                }
                "private" => {
                    h.insert(
                        "cache-control",
                        HeaderValue::from_static("max-age=60, private"),
                    );
                }
                "vary-star" => {
                    h.insert("vary", HeaderValue::from_static("*"));
                }
                "not-found" => {
                    *res.status_mut() = StatusCode::NOT_FOUND;
                }
                "partial" => {
                    *res.status_mut() = StatusCode::PARTIAL_CONTENT;
                }
                "skip-header" => {
                    h.insert("x-cache-ttl", HeaderValue::from_static("0"));
                }
                "ttl-header" => {
                    h.insert("x-cache-ttl", HeaderValue::from_static("5"));
                }
                "ttl-ext" => {
                    res.extensions_mut()
                        .insert(CacheOverride::ttl(Duration::from_secs(7)));
                }
                "skip-ext" => {
                    res.extensions_mut().insert(CacheOverride::skip());
                }
                "multi" => {
                    h.append("x-multi", HeaderValue::from_static("a"));
                    h.append("x-multi", HeaderValue::from_static("b"));
                    h.insert("connection", HeaderValue::from_static("x-hop"));
                    h.insert("x-hop", HeaderValue::from_static("1"));
                }
                _ => {}
            }
            res
        }
    });
    Router::new()
        .route("/shared", shared.clone())
        .route("/prompts/{name}", shared)
        .route("/users/{id}/data", mine)
        .route("/h/{kind}", headers)
        .layer(cache)
        .layer(axum::middleware::from_fn(fake_auth))
}

async fn setup(server: &RedisServer) -> (Router, CacheHandle, Calls) {
    let cache = CacheLayer::new(store(server).await, Policy::shared(MIN))
        .namespace("t")
        .unwrap()
        .identity(Identity::extension::<UserId>())
        .route("/users/{id}/data", Policy::per_user(MIN))
        .unwrap()
        .route(
            "/h/{kind}",
            Policy::shared(MIN).status(StatusCode::NOT_FOUND, Duration::from_secs(3)),
        )
        .unwrap();
    let handle = cache.handle();
    let calls = Calls::default();
    (build_app(cache, calls.clone()), handle, calls)
}

async fn stored(handle: &CacheHandle, n: u64) {
    wait_until("stored entries", || handle.stats().stored >= n).await;
}

#[tokio::test]
async fn miss_then_hit_with_headers() {
    let server = RedisServer::start();
    let (app, handle, calls) = setup(&server).await;

    let first = send(&app, get_req("/shared")).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.x_cache(), "MISS");
    assert_eq!(
        first.header("cache-status"),
        Some("tower-redis-cache; fwd=miss")
    );
    assert_eq!(first.text(), "shared #1");
    stored(&handle, 1).await;

    let second = send(&app, get_req("/shared")).await;
    assert_eq!(second.x_cache(), "HIT");
    assert_eq!(second.text(), "shared #1");
    assert_eq!(calls.get(), 1, "a hit never calls the handler");
    assert_eq!(second.header("content-length"), Some("9"));
    assert_eq!(
        second.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    let age: u64 = second.header("age").unwrap().parse().unwrap();
    assert!(age <= 1);
    let status = second.header("cache-status").unwrap();
    assert!(
        status.starts_with("tower-redis-cache; hit; ttl="),
        "{status}"
    );
    let ttl: u64 = status.rsplit('=').next().unwrap().parse().unwrap();
    assert!((58..=60).contains(&ttl), "{ttl}");
    assert_eq!(handle.stats().hits, 1);

    // The entry is stored with the route's TTL, in milliseconds.
    let key = handle.key(&RequestKey::new("/shared").route("/shared"));
    let pttl: i64 = store(&server).await.pool().pttl(&key).await.unwrap();
    assert!((55_000..=60_000).contains(&pttl), "{pttl}");
}

#[tokio::test]
async fn head_is_answered_from_the_get_entry_and_never_stored() {
    let server = RedisServer::start();
    let (app, handle, calls) = setup(&server).await;

    let head = send(&app, Request::head("/shared").body(Body::empty()).unwrap()).await;
    assert_eq!(head.x_cache(), "MISS");
    assert!(head.body.is_empty());
    assert_eq!(calls.get(), 1);
    // The HEAD miss was not stored: the GET after it misses too.
    let g = send(&app, get_req("/shared")).await;
    assert_eq!(g.x_cache(), "MISS");
    assert_eq!(g.text(), "shared #2");
    stored(&handle, 1).await;
    assert_eq!(handle.stats().stored, 1);

    let head = send(&app, Request::head("/shared").body(Body::empty()).unwrap()).await;
    assert_eq!(head.x_cache(), "HIT");
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some("9"));
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn query_order_does_not_matter_but_values_do() {
    let server = RedisServer::start();
    let (app, handle, calls) = setup(&server).await;
    send(&app, get_req("/prompts/welcome?lang=en&version=2")).await;
    stored(&handle, 1).await;
    let r = send(&app, get_req("/prompts/welcome?version=2&lang=en")).await;
    assert_eq!(r.x_cache(), "HIT");
    let r = send(&app, get_req("/prompts/welcome?version=3&lang=en")).await;
    assert_eq!(r.x_cache(), "MISS");
    let r = send(&app, get_req("/prompts/other?version=2&lang=en")).await;
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(calls.get(), 3);
}

#[tokio::test]
async fn per_user_entries_are_isolated() {
    let server = RedisServer::start();
    let (app, handle, calls) = setup(&server).await;
    let as_user = |u: &str| get_with("/users/1/data", &[("x-test-user", u)]);

    let a = send(&app, as_user("alice")).await;
    assert_eq!(
        (a.x_cache(), a.text().as_str()),
        ("MISS", "user 1 seen by alice #1")
    );
    stored(&handle, 1).await;
    let b = send(&app, as_user("bob")).await;
    assert_eq!(
        (b.x_cache(), b.text().as_str()),
        ("MISS", "user 1 seen by bob #2")
    );
    stored(&handle, 2).await;
    let a = send(&app, as_user("alice")).await;
    assert_eq!(
        (a.x_cache(), a.text().as_str()),
        ("HIT", "user 1 seen by alice #1")
    );
    let b = send(&app, as_user("bob")).await;
    assert_eq!(
        (b.x_cache(), b.text().as_str()),
        ("HIT", "user 1 seen by bob #2")
    );

    // No identity on a per-user route: passed through, never stored.
    for _ in 0..2 {
        let anon = send(&app, get_req("/users/1/data")).await;
        assert_eq!(anon.x_cache(), "BYPASS");
        assert_eq!(
            anon.header("cache-status"),
            Some("tower-redis-cache; fwd=bypass; detail=no-identity")
        );
    }
    assert_eq!(calls.get(), 4);
    assert_eq!(handle.stats().stored, 2);

    // The identity is in the key only hashed.
    let key = handle.key(&RequestKey::new("/users/1/data").identity("alice"));
    assert!(!key.contains("alice"));
    let client = store(&server).await;
    let keys: Vec<String> = {
        let (_, keys): (String, Vec<String>) =
            fred::prelude::KeysInterface::scan_page(client.pool(), "0", "*", Some(1000), None)
                .await
                .unwrap();
        keys
    };
    assert!(keys.contains(&key), "{keys:?}");
    assert!(keys
        .iter()
        .all(|k| !k.contains("alice") && !k.contains("bob")));
}

#[tokio::test]
async fn authorization_and_cookie_bypass_shared_routes() {
    let server = RedisServer::start();
    let (router, handle, calls) = setup(&server).await;
    let app = &router;
    send(app, get_req("/shared")).await;
    stored(&handle, 1).await;
    for (name, value, detail) in [
        ("authorization", "Bearer t", "authorization"),
        ("cookie", "session=1", "cookie"),
    ] {
        let r = send(app, get_with("/shared", &[(name, value)])).await;
        assert_eq!(r.x_cache(), "BYPASS");
        assert_eq!(
            r.header("cache-status").unwrap(),
            format!("tower-redis-cache; fwd=bypass; detail={detail}")
        );
    }
    assert_eq!(calls.get(), 3);

    // Unless the route is declared the same for everybody.
    let cache = CacheLayer::new(
        store(&server).await,
        Policy::shared(MIN).shared_for_authenticated(),
    )
    .namespace("open")
    .unwrap();
    let h = cache.handle();
    let open = build_app(cache, Calls::default());
    send(&open, get_with("/shared", &[("authorization", "Bearer a")])).await;
    stored(&h, 1).await;
    let r = send(&open, get_with("/shared", &[("cookie", "x=1")])).await;
    assert_eq!(r.x_cache(), "HIT");
}

#[tokio::test]
async fn unstorable_responses_are_never_stored() {
    let server = RedisServer::start();
    let (app, handle, calls) = setup(&server).await;
    for kind in [
        "set-cookie",
        "no-store",
        "private",
        "vary-star",
        "partial",
        "skip-header",
        "skip-ext",
    ] {
        let uri = format!("/h/{kind}");
        for _ in 0..2 {
            let r = send(&app, get_req(&uri)).await;
            assert_eq!(r.x_cache(), "MISS", "{kind}");
            assert!(
                r.header("x-cache-ttl").is_none(),
                "override header stripped"
            );
        }
    }
    assert_eq!(calls.get(), 14);
    assert_eq!(handle.stats().stored, 0);
    assert_eq!(handle.stats().abandoned, 0);
    assert_eq!(handle.stats().vary_refused, 2, "Vary: * counted");
}

#[tokio::test]
async fn statuses_opt_in_and_handler_ttls() {
    let server = RedisServer::start();
    let (app, handle, _calls) = setup(&server).await;
    let pool = store(&server).await;
    for (kind, secs) in [("not-found", 3), ("ttl-header", 5), ("ttl-ext", 7)] {
        let uri = format!("/h/{kind}");
        let before = handle.stats().stored;
        send(&app, get_req(&uri)).await;
        stored(&handle, before + 1).await;
        let r = send(&app, get_req(&uri)).await;
        assert_eq!(r.x_cache(), "HIT", "{kind}");
        assert!(r.header("x-cache-ttl").is_none());
        let pttl: i64 = pool
            .pool()
            .pttl(handle.key(&RequestKey::new(&uri)))
            .await
            .unwrap();
        assert!(
            pttl > (secs - 1) * 1000 && pttl <= secs * 1000,
            "{kind}: {pttl}"
        );
    }
    let r = send(&app, get_req("/h/not-found")).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn repeated_headers_kept_and_hop_by_hop_dropped() {
    let server = RedisServer::start();
    let (app, handle, _) = setup(&server).await;
    send(&app, get_req("/h/multi")).await;
    stored(&handle, 1).await;
    let r = send(&app, get_req("/h/multi")).await;
    assert_eq!(r.x_cache(), "HIT");
    let multi: Vec<_> = r.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"]);
    assert!(r.headers.get("connection").is_none());
    assert!(r.headers.get("x-hop").is_none());
}

/// A body that yields `chunks` then optionally trailers, with no Content-Length.
fn streamed(chunks: Vec<Bytes>, trailers: Option<HeaderMap>) -> Body {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> =
        chunks.into_iter().map(|c| Ok(Frame::data(c))).collect();
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    Body::new(StreamBody::new(futures_util::stream::iter(frames)))
}

fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn large_bodies_stream_through_uncached() {
    let server = RedisServer::start();
    let cache = CacheLayer::new(
        store(&server).await,
        Policy::shared(MIN).max_body_size(64 * 1024),
    );
    let handle = cache.handle();
    let calls = Calls::default();
    let c = calls.clone();
    let app = Router::new()
        .route(
            "/big",
            get(move || {
                c.next();
                async { streamed(vec![Bytes::from(vec![7u8; 40 * 1024]); 3], None) }
            }),
        )
        .route("/big-known", get(|| async { vec![1u8; 200 * 1024] }))
        .layer(cache);
    for _ in 0..2 {
        let r = send(&app, get_req("/big")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 120 * 1024);
        assert_eq!(r.x_cache(), "MISS");
    }
    wait_until("abandoned", || handle.stats().abandoned == 2).await;
    let r = send(&app, get_req("/big-known")).await;
    assert_eq!(r.body.len(), 200 * 1024);
    assert_eq!(handle.stats().abandoned, 3);
    assert_eq!(handle.stats().stored, 0);
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn a_client_that_leaves_early_stores_nothing() {
    let server = RedisServer::start();
    // Without coalescing: the leader of a coalesced miss is finished in the background for
    // the requests waiting on it instead (tests/coalesce.rs).
    let policy = Policy::shared(MIN).coalesce(Duration::ZERO);
    let cache = CacheLayer::new(store(&server).await, policy);
    let handle = cache.handle();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Frame<Bytes>, Infallible>>();
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let app = Router::new()
        .route(
            "/slow",
            get(move || {
                let rx = rx.lock().unwrap().take().expect("called once");
                async move { Body::new(StreamBody::new(tokio_stream_from(rx))) }
            }),
        )
        .layer(cache);
    let res = tower::ServiceExt::oneshot(app.clone(), get_req("/slow"))
        .await
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
        .unwrap();
    let mut body = res.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "first");
    drop(body); // the client goes away mid-body
    wait_until("abandoned", || handle.stats().abandoned == 1).await;
    tx.send(Ok(Frame::data(Bytes::from_static(b"second")))).ok();
    drop(tx);
    assert_eq!(handle.stats().stored, 0);
}

#[tokio::test]
async fn trailers_pass_through_and_are_replayed() {
    let server = RedisServer::start();
    let cache = CacheLayer::new(store(&server).await, Policy::shared(MIN));
    let handle = cache.handle();
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc"));
    let t1 = trailers.clone();
    let t2 = trailers.clone();
    let app = Router::new()
        .route(
            "/upload",
            post(move || {
                let t = t1.clone();
                async move { streamed(vec![Bytes::from_static(b"posted")], Some(t)) }
            }),
        )
        .route(
            "/with-trailers",
            get(move || {
                let t = t2.clone();
                async move {
                    streamed(
                        vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")],
                        Some(t),
                    )
                }
            }),
        )
        .layer(cache);

    // A non-cached method: untouched, trailers intact, no cache headers.
    let r = send(
        &app,
        Request::post("/upload").body(Body::from("x")).unwrap(),
    )
    .await;
    assert_eq!(r.text(), "posted");
    assert_eq!(r.trailers.as_ref(), Some(&trailers));
    assert!(r.header("x-cache").is_none() && r.header("cache-status").is_none());

    // A cached GET keeps its trailers on the miss and on the hit.
    let r = send(&app, get_req("/with-trailers")).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "ab"));
    assert_eq!(r.trailers.as_ref(), Some(&trailers));
    stored(&handle, 1).await;
    let r = send(&app, get_req("/with-trailers")).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "ab"));
    assert_eq!(r.trailers.as_ref(), Some(&trailers));
}

#[tokio::test]
async fn per_route_ttl_with_route_layer_and_method_router_layer() {
    let server = RedisServer::start();
    let cache = CacheLayer::new(store(&server).await, Policy::bypass())
        .namespace("rl")
        .unwrap();
    let handle = cache.handle();
    let app = Router::new()
        .route("/a", get(|| async { "a" }))
        .route_layer(
            cache
                .clone()
                .policy(Policy::shared(Duration::from_secs(11))),
        )
        .route(
            "/b",
            get(|| async { "b" }).layer(
                cache
                    .clone()
                    .policy(Policy::shared(Duration::from_secs(22))),
            ),
        )
        .route("/c", get(|| async { "c" }).layer(cache.clone()));
    send(&app, get_req("/a")).await;
    send(&app, get_req("/b")).await;
    stored(&handle, 2).await;
    let r = send(&app, get_req("/c")).await;
    assert_eq!(r.x_cache(), "BYPASS");
    let pool = store(&server).await;
    for (path, secs) in [("/a", 11i64), ("/b", 22)] {
        let key = handle.key(&RequestKey::new(path).route(path));
        let pttl: i64 = pool.pool().pttl(&key).await.unwrap();
        assert!(
            pttl > (secs - 1) * 1000 && pttl <= secs * 1000,
            "{path}: {pttl}"
        );
        assert_eq!(send(&app, get_req(path)).await.x_cache(), "HIT");
    }
}

#[tokio::test]
async fn layer_around_a_whole_router_matches_its_own_templates() {
    let server = RedisServer::start();
    let cache = CacheLayer::new(store(&server).await, Policy::bypass())
        .route("/items/{id}", Policy::shared(Duration::from_secs(30)))
        .unwrap();
    let handle = cache.handle();
    let router = Router::new()
        .route(
            "/items/{id}",
            get(|Path(id): Path<u32>| async move { format!("item {id}") }),
        )
        .route("/other", get(|| async { "other" }));
    let app =
        Router::new().fallback_service(tower::ServiceBuilder::new().layer(cache).service(router));
    send(&app, get_req("/items/5")).await;
    stored(&handle, 1).await;
    let r = send(&app, get_req("/items/5")).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "item 5"));
    assert_eq!(send(&app, get_req("/items/6")).await.x_cache(), "MISS");
    assert_eq!(send(&app, get_req("/other")).await.x_cache(), "BYPASS");
    let key = handle.key(&RequestKey::new("/items/5"));
    assert!(
        handle
            .invalidate(&RequestKey::new("/items/5"))
            .await
            .unwrap()
            == 1,
        "{key}"
    );
    assert_eq!(send(&app, get_req("/items/5")).await.x_cache(), "MISS");
}

#[tokio::test]
async fn undecodable_entries_are_misses_and_replaced() {
    let server = RedisServer::start();
    let (app, handle, calls) = setup(&server).await;
    let key = handle.key(&RequestKey::new("/shared").route("/shared"));
    let pool = store(&server).await;
    for junk in [&b"random junk"[..], b"TRC\x09future", b"TRC\x01\x00\x00"] {
        let _: () = pool
            .pool()
            .set(&key, Bytes::copy_from_slice(junk), None, None, false)
            .await
            .unwrap();
        let before = handle.stats();
        let r = send(&app, get_req("/shared")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.x_cache(), "MISS");
        wait_until("replaced", || handle.stats().stored > before.stored).await;
        assert_eq!(send(&app, get_req("/shared")).await.x_cache(), "HIT");
    }
    assert_eq!(handle.stats().undecodable, 3);
    assert_eq!(calls.get(), 3);
    // A wrong-type value at the key (a list): still just a miss.
    let _: () = pool.pool().del(&key).await.unwrap();
    let _: () = pool
        .pool()
        .custom(
            fred::types::CustomCommand::new_static("RPUSH", None, false),
            vec![key.clone(), "x".into()],
        )
        .await
        .map(|_: i64| ())
        .unwrap();
    let r = send(&app, get_req("/shared")).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
}

#[tokio::test]
async fn status_extension_for_outer_layers() {
    let server = RedisServer::start();
    let cache = CacheLayer::new(store(&server).await, Policy::shared(MIN)).no_status_header();
    let handle = cache.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(cache)
        .service(tower::service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(http::Response::new(Body::from("x")))
        }));
    let res = tower::ServiceExt::oneshot(svc.clone(), get_req("/"))
        .await
        .unwrap();
    assert_eq!(
        res.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Miss)
    );
    assert!(res.headers().get("x-cache").is_none());
    assert!(res.headers().get("cache-status").is_some());
    res.into_body().collect().await.unwrap();
    stored(&handle, 1).await;
    let res = tower::ServiceExt::oneshot(svc, get_req("/")).await.unwrap();
    assert_eq!(
        res.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Hit)
    );
}

#[test]
fn service_and_future_are_send_sync_static() {
    fn send_sync_static<T: Send + Sync + 'static>() {}
    fn send_static<T: Send + 'static>() {}
    type Svc = CacheService<axum::routing::Route>;
    send_sync_static::<Svc>();
    send_sync_static::<CacheLayer>();
    send_sync_static::<CacheHandle>();
    send_static::<ResponseFuture<axum::routing::Route, Body>>();
    type Ready = tower::util::ServiceFn<
        fn(Request<Body>) -> std::future::Ready<Result<http::Response<Body>, Infallible>>,
    >;
    send_sync_static::<CacheService<Ready>>();
    // With a Sync inner future and request body, the future is Sync too.
    send_sync_static::<
        ResponseFuture<
            tower::util::ServiceFn<
                fn(
                    Request<String>,
                )
                    -> std::future::Ready<Result<http::Response<String>, Infallible>>,
            >,
            String,
        >,
    >();
    send_sync_static::<tower_redis_cache::ResponseBody<http_body_util::Full<Bytes>>>();
}

#[tokio::test]
async fn a_body_that_errors_is_not_stored() {
    let server = RedisServer::start();
    let cache = CacheLayer::new(store(&server).await, Policy::shared(MIN));
    let handle = cache.handle();
    let app = Router::new()
        .route(
            "/broken",
            get(|| async {
                let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
                    Ok(Frame::data(Bytes::from_static(b"partial"))),
                    Err(std::io::Error::other("database went away")),
                ];
                Body::new(StreamBody::new(futures_util::stream::iter(frames)))
            }),
        )
        .layer(cache);
    let res = tower::ServiceExt::oneshot(app.clone(), get_req("/broken"))
        .await
        .unwrap();
    assert!(
        res.into_body().collect().await.is_err(),
        "the client sees the error"
    );
    wait_until("abandoned", || handle.stats().abandoned == 1).await;
    assert_eq!(handle.stats().stored, 0);
    let again = tower::ServiceExt::oneshot(app, get_req("/broken"))
        .await
        .unwrap();
    assert_eq!(again.headers()["x-cache"], "MISS");
}

#[tokio::test]
async fn hits_have_an_exact_size_hint() {
    use http_body::Body as _;
    let server = RedisServer::start();
    let cache = CacheLayer::new(store(&server).await, Policy::shared(MIN));
    let handle = cache.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(cache)
        .service(tower::service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(http::Response::new(streamed(
                vec![Bytes::from_static(b"hello "), Bytes::from_static(b"world")],
                None,
            )))
        }));
    let res = tower::ServiceExt::oneshot(svc.clone(), get_req("/"))
        .await
        .unwrap();
    assert_eq!(
        res.body().size_hint().exact(),
        None,
        "a streamed miss has no exact size"
    );
    res.into_body().collect().await.unwrap();
    stored(&handle, 1).await;
    let res = tower::ServiceExt::oneshot(svc.clone(), get_req("/"))
        .await
        .unwrap();
    assert_eq!(res.body().size_hint().exact(), Some(11));
    let res = tower::ServiceExt::oneshot(svc, Request::head("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.headers()["content-length"], "11");
    assert!(res.body().is_end_stream());
    assert_eq!(res.body().size_hint().exact(), Some(0));
}

#[tokio::test]
async fn shared_routes_pass_identified_and_bodied_requests_through() {
    let server = RedisServer::start();
    let (app, handle, calls) = setup(&server).await;
    // An identity the layer can extract (here from the auth layer's extension).
    for _ in 0..2 {
        let r = send(&app, get_with("/shared", &[("x-test-user", "alice")])).await;
        assert_eq!(
            r.header("cache-status"),
            Some("tower-redis-cache; fwd=bypass; detail=identity")
        );
    }
    // A GET with a body: the key does not hold it.
    let with_body = Request::get("/shared")
        .header("content-length", "3")
        .body(Body::from("abc"))
        .unwrap();
    let r = send(&app, with_body).await;
    assert_eq!(
        r.header("cache-status"),
        Some("tower-redis-cache; fwd=bypass; detail=body")
    );
    assert_eq!(calls.get(), 3);
    assert_eq!(handle.stats().bypassed, 3);
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_is_not_stored() {
    let server = RedisServer::start();
    let cache = CacheLayer::new(store(&server).await, Policy::shared(MIN));
    let handle = cache.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(cache)
        .service(tower::service_fn(|_req: Request<Body>| async {
            let mut res = http::Response::new(streamed(vec![Bytes::from_static(b"half")], None));
            res.headers_mut()
                .insert("content-length", HeaderValue::from_static("8"));
            Ok::<_, Infallible>(res)
        }));
    let res = tower::ServiceExt::oneshot(svc, get_req("/")).await.unwrap();
    let _ = res.into_body().collect().await;
    wait_until("abandoned", || handle.stats().abandoned == 1).await;
    assert_eq!(handle.stats().stored, 0);
}

/// Calls of one Redis command so far (`INFO commandstats`).
fn command_calls(server: &RedisServer, command: &str) -> u64 {
    server
        .info("commandstats")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_share_mgets_and_each_gets_its_own_entry() {
    let server = RedisServer::start();
    let cache = CacheLayer::new(store(&server).await, Policy::shared(MIN));
    let handle = cache.handle();
    let app = Router::new()
        .route(
            "/items/{id}",
            get(|Path(id): Path<u32>| async move { format!("item {id}") }),
        )
        .layer(cache);
    for id in 0..50 {
        send(&app, get_req(&format!("/items/{id}"))).await;
    }
    stored(&handle, 50).await;
    let mgets = command_calls(&server, "mget");
    let tasks: Vec<_> = (0..500u32)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                let id = i % 50;
                (id, send(&app, get_req(&format!("/items/{id}"))).await)
            })
        })
        .collect();
    for t in tasks {
        let (id, r) = t.await.unwrap();
        assert_eq!((r.x_cache(), r.text()), ("HIT", format!("item {id}")));
    }
    // 500 lookups went out in fewer commands than requests.
    let batches = command_calls(&server, "mget") - mgets;
    assert!(
        (1..500).contains(&batches),
        "{batches} MGETs for 500 lookups"
    );
}

#[tokio::test]
async fn lookups_can_go_one_by_one() {
    let server = RedisServer::start();
    let config = common::relaxed_config(&server.url()).batch_lookups(false);
    let cache = CacheLayer::new(
        RedisStore::connect(config).await.unwrap(),
        Policy::shared(MIN),
    );
    let handle = cache.handle();
    let app = Router::new()
        .route("/one", get(|| async { "one" }))
        .layer(cache);
    send(&app, get_req("/one")).await;
    stored(&handle, 1).await;
    let (mgets, gets) = (
        command_calls(&server, "mget"),
        command_calls(&server, "get"),
    );
    assert_eq!(send(&app, get_req("/one")).await.x_cache(), "HIT");
    // (The write path reads its markers with MGET; a lookup is one GET.)
    assert_eq!(command_calls(&server, "mget"), mgets);
    assert_eq!(command_calls(&server, "get"), gets + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_misses_read_the_invalidation_sequence_in_their_lookup() {
    let server = RedisServer::start();
    let cache = CacheLayer::new(store(&server).await, Policy::shared(MIN));
    // Never stored (Set-Cookie), so the only commands are the lookup's.
    let app = Router::new()
        .route(
            "/private",
            get(|| async { ([("set-cookie", "s=1")], "for one client") }),
        )
        .layer(cache);
    // Alone, a lookup is a GET, and a miss then reads the sequence with a second GET.
    let (mgets, gets) = (
        command_calls(&server, "mget"),
        command_calls(&server, "get"),
    );
    assert_eq!(send(&app, get_req("/private")).await.x_cache(), "MISS");
    assert_eq!(command_calls(&server, "mget"), mgets);
    assert_eq!(command_calls(&server, "get"), gets + 2);
    // Concurrent misses are batched with the sequence: fewer than two GETs per miss.
    let gets = command_calls(&server, "get");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, get_req("/private")).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().text(), "for one client");
    }
    let (mgets, gets) = (
        command_calls(&server, "mget") - mgets,
        command_calls(&server, "get") - gets,
    );
    assert!(
        mgets >= 1 && gets < 100,
        "{mgets} MGETs, {gets} GETs for 50 misses"
    );
}
