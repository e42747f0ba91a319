//! Request coalescing: concurrent cold requests make one call to the handler; others wait
//! for its response, and never receive a response that was not storable (the first four
//! tests on both stores: a real redis-server and the in-process store).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::stores::{Backing, Kind};
use common::{get as get_req, send, RedisServer};
use futures_util::StreamExt;
use http::HeaderValue;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_redis_cache::{CacheHandle, CacheLayer, Policy, RedisConfig, RedisStore};

on_both_stores!(
    a_hundred_cold_requests_make_one_call,
    an_unstorable_response_is_never_handed_to_the_waiting_requests,
    coalescing_can_be_turned_off,
    two_instances_with_the_lock_make_one_call,
    the_longest_settings_still_answer,
);

async fn setup(backing: &Backing, policy: Policy) -> (Router, CacheHandle, Arc<AtomicUsize>) {
    // A generous lookup deadline: these tests are about coalescing, and on a loaded machine
    // 100 concurrent lookups could otherwise pass the 50 ms default and skip it (a lookup
    // that fails is not coalesced).
    let store = backing.store_with(Duration::from_secs(2)).await;
    let cache = CacheLayer::new(store, policy);
    let handle = cache.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let (c1, c2) = (calls.clone(), calls.clone());
    let app = Router::new()
        .route(
            "/slow",
            get(move || {
                let n = c1.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    format!("computed once? call #{n}")
                }
            }),
        )
        .route(
            "/cookie",
            get(move || {
                let n = c2.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let mut r = format!("for one client only #{n}").into_response();
                    r.headers_mut()
                        .insert("set-cookie", HeaderValue::from_static("s=1"));
                    r
                }
            }),
        )
        .layer(cache);
    (app, handle, calls)
}

async fn concurrently(app: &Router, uri: &'static str, n: usize) -> Vec<common::Got> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, get_req(uri)).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn a_hundred_cold_requests_make_one_call(kind: Kind) {
    let server = Backing::start(kind);
    let (app, handle, calls) = setup(&server, Policy::shared(Duration::from_secs(60))).await;
    let replies = concurrently(&app, "/slow", 100).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(replies
        .iter()
        .all(|r| r.status == 200 && r.text() == "computed once? call #1"));
    let collapsed = replies
        .iter()
        .filter(|r| r.header("cache-status") == Some("tower-redis-cache; fwd=miss; collapsed"))
        .count();
    assert_eq!(collapsed, 99);
    assert_eq!(handle.stats().collapsed, 99);
}

async fn an_unstorable_response_is_never_handed_to_the_waiting_requests(kind: Kind) {
    let server = Backing::start(kind);
    let (app, handle, calls) = setup(&server, Policy::shared(Duration::from_secs(60))).await;
    let replies = concurrently(&app, "/cookie", 10).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        10,
        "each asked the handler itself"
    );
    let mut bodies: Vec<String> = replies.iter().map(|r| r.text()).collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 10, "nobody received another's response");
    assert_eq!(handle.stats().collapsed, 0);
}

/// A router whose `/gated` handler is counted and answers "part one, " at once, then
/// "part two" once the test adds a permit to `gate`; `head_gated` also holds back the head.
async fn gated(
    server: &RedisServer,
    head_gated: bool,
) -> (
    Router,
    CacheHandle,
    Arc<AtomicUsize>,
    Arc<tokio::sync::Semaphore>,
) {
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .lookup_timeout(Duration::from_secs(2));
    let store = RedisStore::connect(config).await.unwrap();
    let cache = CacheLayer::new(store, Policy::shared(Duration::from_secs(60)));
    let handle = cache.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (c, g) = (calls.clone(), gate.clone());
    let app = Router::new()
        .route(
            "/gated",
            get(move || {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                let gate = g.clone();
                async move {
                    if head_gated {
                        gate.acquire().await.unwrap().forget();
                    }
                    let parts = futures_util::stream::iter(0..2).then(move |i| {
                        let gate = gate.clone();
                        async move {
                            if i == 0 {
                                return Ok::<_, std::convert::Infallible>(Bytes::from(format!(
                                    "call #{n}: part one, "
                                )));
                            }
                            if !head_gated {
                                gate.acquire().await.unwrap().forget();
                            }
                            Ok(Bytes::from_static(b"part two"))
                        }
                    });
                    axum::body::Body::from_stream(parts)
                }
            }),
        )
        .layer(cache);
    (app, handle, calls, gate)
}

/// The followers of a leader whose client left, once the handler is released: one call,
/// the whole response for everyone.
async fn followers_get_the_leaders_work(
    app: &Router,
    handle: &CacheHandle,
    calls: &AtomicUsize,
    gate: &tokio::sync::Semaphore,
) {
    let followers = tokio::spawn({
        let app = app.clone();
        async move { concurrently(&app, "/gated", 5).await }
    });
    // The followers are waiting on the flight (or will find the entry).
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.add_permits(1);
    let replies = followers.await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
    for r in &replies {
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "call #1: part one, part two")
        );
    }
    let stats = handle.stats();
    assert_eq!(stats.detached, 1);
    assert_eq!(stats.collapsed + stats.hits, 5);
    assert_eq!(stats.abandoned, 0);
    common::wait_until("stored", || handle.stats().stored == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_client_leaves_before_the_response_still_answers_the_others() {
    let server = RedisServer::start();
    let (app, handle, calls, gate) = gated(&server, true).await;
    let leader = tokio::spawn({
        let app = app.clone();
        async move { send(&app, get_req("/gated")).await }
    });
    common::wait_until("the leader's call", || calls.load(Ordering::SeqCst) == 1).await;
    // Its client gives up while the handler has not answered yet.
    leader.abort();
    assert!(leader.await.is_err_and(|e| e.is_cancelled()));
    followers_get_the_leaders_work(&app, &handle, &calls, &gate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_client_leaves_mid_body_still_answers_the_others() {
    let server = RedisServer::start();
    let (app, handle, calls, gate) = gated(&server, false).await;
    let response = app.clone().oneshot(get_req("/gated")).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"call #1: part one, ");
    // Its client leaves after the first part.
    drop(body);
    followers_get_the_leaders_work(&app, &handle, &calls, &gate).await;
}

async fn coalescing_can_be_turned_off(kind: Kind) {
    let server = Backing::start(kind);
    let policy = Policy::shared(Duration::from_secs(60)).coalesce(Duration::ZERO);
    let (app, handle, calls) = setup(&server, policy).await;
    concurrently(&app, "/slow", 10).await;
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    assert_eq!(handle.stats().collapsed, 0);
}

async fn two_instances_with_the_lock_make_one_call(kind: Kind) {
    let server = Backing::start(kind);
    let policy =
        Policy::shared(Duration::from_secs(60)).lock_across_instances(Duration::from_secs(5));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut apps = Vec::new();
    for _ in 0..2 {
        let store = server.store_with(Duration::from_secs(2)).await;
        let cache = CacheLayer::new(store, policy.clone())
            .namespace("two")
            .unwrap();
        let c = calls.clone();
        apps.push(
            Router::new()
                .route(
                    "/slow",
                    get(move || {
                        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                        async move {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            format!("call #{n}")
                        }
                    }),
                )
                .layer(cache),
        );
    }
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let app = apps[i % 2].clone();
            tokio::spawn(async move { send(&app, get_req("/slow")).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "call #1"));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one call across both instances"
    );
}

/// `Duration::MAX` wherever a setting takes a duration: nothing overflows, every request is
/// answered, the lock still makes one call across instances and the entry is stored.
async fn the_longest_settings_still_answer(kind: Kind) {
    let backing = Backing::start(kind);
    let max = Duration::MAX;
    let policy = Policy::shared(max)
        .coalesce(max)
        .lock_across_instances(max)
        .stale_if_error(max)
        .stale_while_revalidate(max)
        .status(http::StatusCode::NOT_FOUND, max)
        .near(max);
    let calls = Arc::new(AtomicUsize::new(0));
    let mut apps = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..2 {
        let store: tower_redis_cache::Store = match &backing {
            Backing::Redis(server) => {
                let config = RedisConfig::from_url(&server.url())
                    .unwrap()
                    .lookup_timeout(max)
                    .command_timeout(max)
                    .connect_timeout(max);
                RedisStore::connect(config).await.unwrap().into()
            }
            Backing::Memory(_) => backing.store().await,
        };
        let cache = CacheLayer::new(store, policy.clone())
            .namespace("longest")
            .unwrap();
        handles.push(cache.handle());
        let c = calls.clone();
        apps.push(
            Router::new()
                .route(
                    "/slow",
                    get(move || {
                        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                        async move {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            format!("call #{n}")
                        }
                    }),
                )
                .layer(cache),
        );
    }
    let answered = tokio::time::timeout(Duration::from_secs(30), async {
        let first = tokio::spawn({
            let app = apps[0].clone();
            async move { send(&app, get_req("/slow")).await }
        });
        // The first instance holds the lock: the second waits for its entry.
        common::wait_until("the first call", || calls.load(Ordering::SeqCst) == 1).await;
        let second = tokio::spawn({
            let app = apps[1].clone();
            async move { send(&app, get_req("/slow")).await }
        });
        (first.await.unwrap(), second.await.unwrap())
    })
    .await
    .expect("answered");
    for r in [&answered.0, &answered.1] {
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "call #1"));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one call across both instances"
    );
    common::wait_until("stored", || handles[0].stats().stored == 1).await;
    for _ in 0..2 {
        // The second from the near-cache, on Redis.
        let r = send(&apps[1], get_req("/slow")).await;
        assert_eq!((r.text().as_str(), r.x_cache()), ("call #1", "HIT"));
    }
}
