//! Redis killed, frozen, restarted and absent at start: every request is still answered
//! correctly and promptly, and caching resumes by itself.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use common::{get as get_req, send, wait_until, RedisServer};
use tower_redis_cache::{CacheHandle, CacheLayer, Policy, RedisConfig, RedisStatus, RedisStore};

/// Far above the 50 ms lookup deadline, far below a stall: a request that takes longer
/// than this waited on Redis.
const BOUND: Duration = Duration::from_millis(1000);

async fn setup(server: &RedisServer) -> (Router, CacheHandle, Arc<AtomicUsize>) {
    let started = Instant::now();
    // A lookup deadline of 200 ms: still far below `BOUND` (a frozen Redis costs each
    // request at most that), and out of reach of a loaded machine's hiccups in healthy phases.
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .lookup_timeout(Duration::from_millis(200));
    let store = RedisStore::connect(config).await.unwrap();
    assert!(
        started.elapsed() < BOUND,
        "connect took {:?}",
        started.elapsed()
    );
    let cache = CacheLayer::new(store, Policy::shared(Duration::from_secs(60)));
    let handle = cache.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new()
        .route(
            "/data",
            get(move || {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                async move { format!("data #{n}") }
            }),
        )
        .layer(cache);
    (app, handle, calls)
}

/// Sends a GET and checks that it was answered correctly within the bound.
async fn answered(app: &Router) -> String {
    let started = Instant::now();
    let r = send(app, get_req("/data")).await;
    let took = started.elapsed();
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("data #"), "{}", r.text());
    assert!(took < BOUND, "request took {took:?}");
    r.x_cache().to_owned()
}

/// Repeats GETs until one is a hit (the cache has resumed), within 10 s.
async fn until_hit(app: &Router) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if answered(app).await == "HIT" {
            return;
        }
        assert!(Instant::now() < deadline, "caching did not resume");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn killed_then_restarted_empty() {
    let mut server = RedisServer::start();
    let (app, handle, calls) = setup(&server).await;
    answered(&app).await;
    wait_until("stored", || handle.stats().stored == 1).await;
    assert_eq!(answered(&app).await, "HIT");
    assert_eq!(handle.health().await.redis, RedisStatus::Connected);

    server.kill();
    for _ in 0..20 {
        assert_eq!(answered(&app).await, "MISS");
    }
    assert_eq!(handle.health().await.redis, RedisStatus::Unavailable);
    assert!(handle.stats().unavailable >= 20);
    let during = calls.load(Ordering::SeqCst);
    assert!(
        during >= 21,
        "every request during the outage reached the handler"
    );

    server.restart();
    until_hit(&app).await;
    assert_eq!(handle.health().await.redis, RedisStatus::Connected);
}

#[tokio::test]
async fn frozen_then_thawed() {
    let mut server = RedisServer::start();
    let (app, handle, _) = setup(&server).await;
    answered(&app).await;
    wait_until("stored", || handle.stats().stored == 1).await;

    server.freeze();
    for _ in 0..10 {
        assert_eq!(answered(&app).await, "MISS");
    }
    let started = Instant::now();
    assert_eq!(handle.health().await.redis, RedisStatus::Unavailable);
    assert!(started.elapsed() < BOUND);

    server.thaw();
    // The entry survived the freeze: the next hit comes from it.
    until_hit(&app).await;
}

#[tokio::test]
async fn absent_at_start_then_started() {
    let mut server = RedisServer::unstarted();
    let (app, handle, calls) = setup(&server).await;
    for _ in 0..5 {
        assert_eq!(answered(&app).await, "MISS");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    assert_eq!(handle.health().await.redis, RedisStatus::Unavailable);

    server.restart();
    until_hit(&app).await;
}

#[tokio::test]
async fn many_concurrent_requests_during_an_outage_are_all_answered() {
    let mut server = RedisServer::start();
    let (app, _handle, calls) = setup(&server).await;
    server.freeze();
    let started = Instant::now();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, get_req("/data")).await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(started.elapsed() < BOUND * 3, "{:?}", started.elapsed());
    assert_eq!(calls.load(Ordering::SeqCst), 200);
    server.thaw();
}

#[tokio::test]
async fn writes_past_the_bound_are_dropped_not_queued() {
    use axum::body::Body;
    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;

    type Tx = mpsc::UnboundedSender<Result<Frame<Bytes>, std::convert::Infallible>>;
    let mut server = RedisServer::start();
    // Lookups out of reach of a loaded machine's hiccups; writes that outlast the test's
    // frozen phase, so that the one pending write holds its permit throughout.
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .lookup_timeout(Duration::from_millis(200))
        .command_timeout(Duration::from_secs(10));
    let store = RedisStore::connect(config).await.unwrap();
    let cache =
        CacheLayer::new(store, Policy::shared(Duration::from_secs(60))).max_pending_writes(1);
    let handle = cache.handle();
    // Each response streams what the test sends it, so all five lookups happen while Redis
    // answers and all five writes start while it is frozen.
    let senders: Arc<std::sync::Mutex<Vec<Tx>>> = Arc::default();
    let s = senders.clone();
    let app = Router::new()
        .route(
            "/{n}",
            get(move || {
                let (tx, mut rx) = mpsc::unbounded_channel();
                s.lock().unwrap().push(tx);
                async move {
                    Body::new(StreamBody::new(futures_util::stream::poll_fn(move |cx| {
                        rx.poll_recv(cx)
                    })))
                }
            }),
        )
        .layer(cache);
    let mut bodies = Vec::new();
    for n in 0..5 {
        let res = tower::ServiceExt::oneshot(app.clone(), get_req(&format!("/{n}")))
            .await
            .unwrap();
        assert_eq!(res.headers()["x-cache"], "MISS");
        bodies.push(res.into_body());
    }
    server.freeze();
    let txs: Vec<Tx> = senders.lock().unwrap().drain(..).collect();
    for (tx, body) in txs.into_iter().zip(bodies.iter_mut()) {
        tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).unwrap();
        drop(tx);
        let started = Instant::now();
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected, "x");
        assert!(
            started.elapsed() < BOUND,
            "the end of a body never waits on Redis"
        );
    }
    let s = handle.stats();
    assert_eq!(s.writes_dropped, 4, "{s:?}");
    server.thaw();
    wait_until("the pending write to end", || {
        let s = handle.stats();
        s.stored + s.write_errors + s.refused == 1
    })
    .await;
}

/// Counts WARN events whose message says Redis became unavailable.
#[derive(Clone, Default)]
struct OutageWarnings(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for OutageWarnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Msg(bool);
        impl tracing::field::Visit for Msg {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message"
                    && format!("{value:?}").contains("redis is unavailable")
                {
                    self.0 = true;
                }
            }
        }
        let mut m = Msg(false);
        event.record(&mut m);
        if m.0 && *event.metadata().level() == tracing::Level::WARN {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test]
async fn an_outage_is_logged_once_not_per_request() {
    use tracing_subscriber::layer::SubscriberExt;
    let warnings = OutageWarnings::default();
    let subscriber = tracing_subscriber::registry().with(warnings.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut server = RedisServer::start();
    let (app, _handle, _) = setup(&server).await;
    answered(&app).await;
    server.kill();
    for _ in 0..30 {
        answered(&app).await;
    }
    assert_eq!(warnings.0.load(Ordering::SeqCst), 1);
    server.restart();
    until_hit(&app).await;
    server.kill();
    for _ in 0..10 {
        answered(&app).await;
    }
    assert_eq!(
        warnings.0.load(Ordering::SeqCst),
        2,
        "a second outage is logged again"
    );
}

#[tokio::test]
async fn the_breaker_skips_a_frozen_redis_and_closes_when_it_answers() {
    use tower_redis_cache::BreakerState;
    let mut server = RedisServer::start();
    let (app, handle, _) = setup(&server).await;
    answered(&app).await;
    wait_until("stored", || handle.stats().stored == 1).await;
    assert_eq!(handle.breaker(), BreakerState::Closed);

    server.freeze();
    // A few lookups pay the deadline, then the breaker opens...
    for _ in 0..3 {
        assert_eq!(answered(&app).await, "MISS");
    }
    assert_eq!(handle.breaker(), BreakerState::Open);
    assert_eq!(handle.stats().breaker_opened, 1);
    // ...and requests stop waiting on Redis: 100 of them take far less than one deadline
    // each (50 ms); at most a probe every 250 ms pays it.
    let started = Instant::now();
    for _ in 0..100 {
        assert_eq!(answered(&app).await, "MISS");
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    server.thaw();
    until_hit(&app).await;
    assert_eq!(handle.breaker(), BreakerState::Closed);
    let health = handle.health().await;
    assert_eq!(health.redis, RedisStatus::Connected);
    assert!(health.round_trip.is_some());
}

#[tokio::test]
async fn health_json_keeps_the_service_ok_when_redis_is_down() {
    let mut server = RedisServer::start();
    let (_, handle, _) = setup(&server).await;
    let app: Router =
        Router::new().route("/health", tower_redis_cache::health_route(handle, "test"));
    let up = send(&app, get_req("/health")).await;
    assert_eq!(up.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_slice(&up.body).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["env"].as_str(), v["redis"].as_str()),
        (Some("ok"), Some("test"), Some("connected"))
    );
    assert_eq!(v["breaker"], "closed");
    assert!(v["round_trip_ms"].as_f64().unwrap() > 0.0);

    server.kill();
    let down = send(&app, get_req("/health")).await;
    assert_eq!(down.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&down.body).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["redis"].as_str()),
        (Some("ok"), Some("unavailable"))
    );
    assert!(v["round_trip_ms"].is_null());
}

/// Steady load through a real axum server on loopback while Redis is killed, restarted
/// empty, frozen, thawed and filled up: no request fails, every body is the handler's
/// answer, and hits come back after each recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_through_every_fault() {
    use common::load::Conn;
    let mut server = RedisServer::start();
    let store = RedisStore::connect(RedisConfig::from_url(&server.url()).unwrap())
        .await
        .unwrap();
    let cache = CacheLayer::new(store, Policy::shared(Duration::from_secs(60)));
    let handle = cache.handle();
    let app =
        Router::new()
            .route(
                "/items/{id}",
                get(
                    |axum::extract::Path(id): axum::extract::Path<u32>| async move {
                        format!("item {id}")
                    },
                ),
            )
            .layer(cache);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut conn = Conn::new(addr);
                let (mut ok, mut bad, mut slowest, mut hits) =
                    (0u64, Vec::new(), Duration::ZERO, 0u64);
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let id = i % 50;
                    i += 1;
                    match conn.get(&format!("/items/{id}"), &[]).await {
                        Ok(r) if r.status == 200 && r.body == format!("item {id}").as_bytes() => {
                            ok += 1;
                            hits += u64::from(r.hit);
                            slowest = slowest.max(r.took);
                        }
                        Ok(r) => bad.push(format!(
                            "{} {:?}",
                            r.status,
                            String::from_utf8_lossy(&r.body)
                        )),
                        Err(e) => bad.push(e),
                    }
                }
                (ok, bad, slowest, hits)
            })
        })
        .collect();

    let phase = Duration::from_millis(800);
    let hits_now = |h: &tower_redis_cache::CacheHandle| h.stats().hits;
    tokio::time::sleep(phase).await;
    assert!(hits_now(&handle) > 0, "healthy: hits");
    // The harness blocks (processes, polling): off the runtime's workers, so that the load
    // and the server keep both of them.
    use tokio::task::block_in_place as blocking;
    blocking(|| server.kill());
    tokio::time::sleep(phase).await;
    blocking(|| server.restart());
    let before = hits_now(&handle);
    wait_until("hits after restart", || hits_now(&handle) > before).await;
    tokio::time::sleep(phase).await;
    blocking(|| server.freeze());
    tokio::time::sleep(phase).await;
    blocking(|| server.thaw());
    let before = hits_now(&handle);
    wait_until("hits after thaw", || hits_now(&handle) > before).await;
    let out = blocking(|| {
        std::process::Command::new("redis-cli")
            .args([
                "-p",
                &server.port().to_string(),
                "CONFIG",
                "SET",
                "maxmemory",
                "1",
            ])
            .output()
            .unwrap()
    });
    assert!(out.status.success());
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);

    let (mut ok, mut slowest) = (0, Duration::ZERO);
    for w in workers {
        let (o, bad, s, _) = w.await.unwrap();
        assert!(bad.is_empty(), "failed requests: {bad:?}");
        ok += o;
        slowest = slowest.max(s);
    }
    assert!(ok > 100, "{ok}");
    assert!(slowest < BOUND, "slowest request {slowest:?}");
}

/// Scripts go by SHA-1 (EVALSHA): a Redis that forgot them (SCRIPT FLUSH, or a restart)
/// answers NOSCRIPT, and the script is sent again as text; writes and invalidations go on.
#[tokio::test]
async fn scripts_forgotten_by_redis_are_sent_again() {
    let server = RedisServer::start();
    let (app, handle, calls) = setup(&server).await;
    assert_eq!(answered(&app).await, "MISS");
    wait_until("the first write", || handle.stats().stored == 1).await;
    assert_eq!(answered(&app).await, "HIT");
    let flushed = std::process::Command::new("redis-cli")
        .args(["-p", &server.port().to_string(), "SCRIPT", "FLUSH"])
        .output()
        .unwrap();
    assert!(flushed.status.success());
    // The invalidation's scripts (marker, index cleanup) and the next write's all meet
    // NOSCRIPT first.
    handle.invalidate_path("/data").await.unwrap();
    assert_eq!(answered(&app).await, "MISS");
    wait_until("the second write", || handle.stats().stored == 2).await;
    assert_eq!(answered(&app).await, "HIT");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(handle.stats().write_errors, 0);
}
