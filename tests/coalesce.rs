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
    a_leader_that_never_reads_does_not_hold_its_followers,
    a_body_read_ahead_reaches_the_leaders_client_whole,
    a_leader_that_never_reads_does_not_hold_other_instances,
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

/// A client that leads a coalesced miss of a large streamed body and never reads it (its
/// socket full, the server stops writing to it): the others get the response as soon as the
/// handler's body is recorded, not after the coalescing wait. Through a real server and real
/// sockets.
async fn a_leader_that_never_reads_does_not_hold_its_followers(kind: Kind) {
    use tokio::io::AsyncWriteExt;
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 128; // 8 MiB: far more than the socket buffers and hyper's
    let backing = Backing::start(kind);
    let policy = Policy::shared(Duration::from_secs(60))
        .coalesce(Duration::from_secs(30))
        .max_body_size(16 << 20);
    let cache = CacheLayer::new(backing.store_with(Duration::from_secs(2)).await, policy);
    let handle = cache.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let chunk = |i: usize| Bytes::from(vec![b'a' + (i % 26) as u8; CHUNK]);
    let app = Router::new()
        .route(
            "/big",
            get(move || {
                c.fetch_add(1, Ordering::SeqCst);
                let parts = futures_util::stream::iter(
                    (0..CHUNKS).map(move |i| Ok::<_, std::convert::Infallible>(chunk(i))),
                );
                async move { axum::body::Body::from_stream(parts) }
            }),
        )
        .layer(cache);
    // Small socket buffers on both ends, so that the unread response stalls early.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let leader = tokio::net::TcpSocket::new_v4().unwrap();
    leader.set_recv_buffer_size(4096).unwrap();
    let mut leader = leader.connect(addr).await.unwrap();
    leader
        .write_all(b"GET /big HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    common::wait_until("the leader's call", || calls.load(Ordering::SeqCst) == 1).await;
    // Time for its response to fill the sockets (nothing is asserted on it).
    tokio::time::sleep(Duration::from_millis(200)).await;

    let followers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(async move { common::load::Conn::new(addr).get("/big", &[]).await }))
        .collect();
    let replies = tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::future::join_all(followers),
    )
    .await
    .expect("followers answered long before the 30 s coalescing wait");
    let expected: Vec<u8> = (0..CHUNKS).flat_map(|i| chunk(i).to_vec()).collect();
    for r in replies {
        let r = r.unwrap().unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body == expected, "the whole body, in order");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
    let stats = handle.stats();
    assert_eq!(stats.collapsed + stats.hits, 4);
    drop(leader);
    server.abort();
}

/// A leader's body read ahead for its followers still reaches its own client frame by frame,
/// in order, trailers and errors included, and past the size limit (not stored, the rest
/// streamed at the client's pace).
async fn a_body_read_ahead_reaches_the_leaders_client_whole(kind: Kind) {
    use http_body_util::StreamBody;
    let backing = Backing::start(kind);
    let policy = Policy::shared(Duration::from_secs(60))
        .coalesce(Duration::from_secs(30))
        .max_body_size(1000);
    let cache = CacheLayer::new(backing.store_with(Duration::from_secs(2)).await, policy);
    let handle = cache.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new()
        .route(
            "/{kind}",
            get(
                move |axum::extract::Path(kind): axum::extract::Path<String>| {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        let mut frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = (0
                            ..3)
                            .map(|i| {
                                Ok(http_body::Frame::data(Bytes::from(format!("{kind} {i}; "))))
                            })
                            .collect();
                        match kind.as_str() {
                            "trailers" => {
                                let mut t = http::HeaderMap::new();
                                t.insert("x-sum", HeaderValue::from_static("3"));
                                frames.push(Ok(http_body::Frame::trailers(t)));
                            }
                            // The first call fails half-way; the others do not.
                            "error" if n == 1 => {
                                frames.insert(1, Err(std::io::Error::other("boom")))
                            }
                            "large" => frames
                                .push(Ok(http_body::Frame::data(Bytes::from(vec![b'x'; 2000])))),
                            _ => {}
                        }
                        axum::body::Body::new(StreamBody::new(futures_util::stream::iter(frames)))
                    }
                },
            ),
        )
        .layer(cache);
    // The followers of a response that turns out not storable call the handler again (alone
    // or coalesced among themselves).
    for (kind, one_call) in [("trailers", true), ("error", false), ("large", false)] {
        calls.store(0, Ordering::SeqCst);
        let uri: &'static str = Box::leak(format!("/{kind}").into_boxed_str());
        // The leader's client has the head and does not read the body yet.
        let leader = app.clone().oneshot(get_req(uri)).await.unwrap();
        let followers = tokio::time::timeout(Duration::from_secs(10), concurrently(&app, uri, 4))
            .await
            .expect("followers answered without the leader's client");
        let calls = calls.load(Ordering::SeqCst);
        assert!(
            if one_call { calls == 1 } else { calls > 1 },
            "{kind}: {calls} calls"
        );
        let mut body = leader.into_body();
        let mut data = Vec::new();
        let mut trailers = None;
        let mut error = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) if f.is_data() => data.extend_from_slice(&f.into_data().unwrap()),
                Ok(f) => trailers = f.into_trailers().ok(),
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&data).into_owned();
        match kind {
            "trailers" => {
                assert_eq!(text, "trailers 0; trailers 1; trailers 2; ");
                assert_eq!(trailers.unwrap().get("x-sum").unwrap(), "3");
                for f in &followers {
                    assert_eq!(f.text(), text);
                    assert_eq!(f.trailers.as_ref().unwrap().get("x-sum").unwrap(), "3");
                }
            }
            "error" => {
                assert_eq!(text, "error 0; ");
                assert!(error.unwrap().contains("boom"));
                for f in &followers {
                    assert_eq!(f.text(), "error 0; error 1; error 2; ");
                }
            }
            _ => {
                assert_eq!(data.len(), "large 0; ".len() * 3 + 2000);
                assert!(text.ends_with(&"x".repeat(2000)));
                for f in &followers {
                    assert_eq!(f.body.len(), data.len());
                }
            }
        }
    }
    // The trailers' entry, and the error's followers' (writes are off the response path).
    common::wait_until("stored", || handle.stats().stored >= 2).await;
}

/// With the cross-instance lock, other instances wait for the leader's entry in Redis (they
/// cannot ask for its body to be read ahead): a leader's client that never reads holds them
/// no more than it holds its own instance's followers.
async fn a_leader_that_never_reads_does_not_hold_other_instances(kind: Kind) {
    let backing = Backing::start(kind);
    let policy = Policy::shared(Duration::from_secs(60))
        .coalesce(Duration::from_secs(30))
        .lock_across_instances(Duration::from_secs(30));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut apps = Vec::new();
    for _ in 0..2 {
        let store = backing.store_with(Duration::from_secs(2)).await;
        let cache = CacheLayer::new(store, policy.clone())
            .namespace("locked")
            .unwrap();
        let c = calls.clone();
        apps.push(
            Router::new()
                .route(
                    "/streamed",
                    get(move || {
                        c.fetch_add(1, Ordering::SeqCst);
                        let parts = futures_util::stream::iter(
                            ["part one, ", "part two"]
                                .map(|p| Ok::<_, std::convert::Infallible>(Bytes::from(p))),
                        );
                        async move { axum::body::Body::from_stream(parts) }
                    }),
                )
                .layer(cache),
        );
    }
    // The leader's client has the head and never reads the body.
    let leader = apps[0].clone().oneshot(get_req("/streamed")).await.unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        send(&apps[1], get_req("/streamed")),
    )
    .await
    .expect("answered long before the 30 s wait");
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "part one, part two")
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one call across both instances"
    );
    drop(leader);
}
