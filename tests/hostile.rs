//! Hostile input and a misbehaving Redis: every request is answered by the inner service,
//! nothing panics, nothing wrong is stored.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::RawQuery;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::{get as get_req, send, wait_until, RedisServer};
use std::process::Command;
use tower_redis_cache::{BreakerState, CacheHandle, CacheLayer, ConfigError, Policy, RedisStore};

const BOUND: Duration = Duration::from_millis(1000);

fn cli(server: &RedisServer, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &server.port().to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn layer(url: &str) -> CacheLayer {
    // 200 ms: out of reach of a loaded machine's hiccups, well below `BOUND` for the tests of
    // a slow Redis.
    let config = common::relaxed_config(url).lookup_timeout(Duration::from_millis(200));
    let store = RedisStore::connect(config).await.unwrap();
    CacheLayer::new(store, Policy::shared(Duration::from_secs(60)))
}

/// Echoes the raw query and counts calls.
fn echo_app(cache: CacheLayer, calls: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route(
            "/{*path}",
            get(move |RawQuery(q): RawQuery| {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move { format!("{} #{n}", q.unwrap_or_default()) }
            }),
        )
        .layer(cache)
}

#[tokio::test]
async fn a_user_without_a_needed_permission_is_a_startup_error() {
    let server = RedisServer::start();
    cli(
        &server,
        &[
            "ACL", "SETUSER", "limited", "on", ">pw", "~*", "&*", "+@all", "-eval",
        ],
    );
    cli(
        &server,
        &["ACL", "SETUSER", "full", "on", ">pw", "~*", "&*", "+@all"],
    );
    let url = |user: &str| format!("redis://{user}:pw@127.0.0.1:{}", server.port());

    let limited = layer(&url("limited"))
        .await
        .namespace("acl")
        .unwrap()
        .handle();
    match limited.check().await {
        Err(ConfigError::Permission(reason)) => {
            assert!(reason.to_lowercase().contains("eval"), "{reason}");
            let msg = ConfigError::Permission(reason).to_string();
            assert!(msg.contains("ACL") && !msg.contains(">pw"), "{msg}");
        }
        other => panic!("expected a permission error, got {other:?}"),
    }
    let full = layer(&url("full")).await.namespace("acl").unwrap().handle();
    full.check().await.unwrap();
    assert!(server.keys("acl:*").is_empty(), "the probe cleans up");
}

#[tokio::test]
async fn the_check_passes_when_redis_is_down() {
    let server = RedisServer::unstarted();
    let handle = layer(&server.url()).await.handle();
    handle.check().await.unwrap();
}

async fn stored(handle: &CacheHandle, n: u64) {
    wait_until("stored", || handle.stats().stored >= n).await;
}

#[tokio::test]
async fn odd_paths_and_queries_never_collide_nor_panic() {
    let server = RedisServer::start();
    let cache = layer(&server.url()).await;
    let handle = cache.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let app = echo_app(cache, calls.clone());
    let long = "v".repeat(30_000);
    let uris = [
        "/a?x=%41".to_owned(),
        "/a?x=A".to_owned(),
        "/a?x=%61".to_owned(),
        "/a?x=1&x=2".to_owned(),
        "/a?x=2&x=1".to_owned(),
        "/a?x=1&&x=2&".to_owned(),
        "/a?%FF%FE=%00".to_owned(),
        "/a?%ff%fe=%00".to_owned(),
        "/%E2%82%AC/%2F?q=a+b".to_owned(),
        "/%E2%82%AC/%2F?q=a%20b".to_owned(),
        format!("/a?long={long}"),
        format!("/{long}"),
    ];
    // Every distinct request is its own entry: each answers with its own body, twice.
    for uri in &uris {
        let first = send(&app, get_req(uri)).await;
        assert_eq!(first.status, 200, "{uri}");
    }
    let distinct = uris.len() as u64 - 1; // `x=1&&x=2&` normalizes to `x=1&x=2`
    stored(&handle, distinct).await;
    for uri in &uris {
        let again = send(&app, get_req(uri)).await;
        assert_eq!(again.x_cache(), "HIT", "{uri}");
        let q = uri.split_once('?').map(|(_, q)| q).unwrap_or("");
        // `x=1&x=2` and `x=1&&x=2&` are one entry: either request's answer may be in it.
        let same = ["x=1&x=2", "x=1&&x=2&"];
        let expected: Vec<String> = if same.contains(&q) {
            same.iter().map(|q| format!("{q} #")).collect()
        } else {
            vec![format!("{q} #")]
        };
        assert!(
            expected.iter().any(|e| again.text().starts_with(e)),
            "{uri}: {}",
            again.text()
        );
    }
    // One call per entry; the two spellings of one entry may both have missed.
    let calls = calls.load(Ordering::SeqCst) as u64;
    assert!(calls == distinct || calls == distinct + 1, "{calls}");
    for key in server.keys("cache:*") {
        assert!(key.len() < 100, "{key}");
    }
}

#[tokio::test]
async fn huge_responses_stream_through_uncached() {
    let server = RedisServer::start();
    let cache = layer(&server.url()).await;
    let handle = cache.handle();
    let big = Bytes::from(vec![b'z'; 20 * 1024 * 1024]);
    let (b1, b2) = (big.clone(), big.clone());
    let app = Router::new()
        .route("/known", get(move || async move { b1.clone() }))
        .route(
            "/chunked",
            get(move || async move {
                let chunks: Vec<Result<Bytes, std::convert::Infallible>> = b2
                    .chunks(64 * 1024)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                Body::from_stream(futures_util::stream::iter(chunks))
            }),
        )
        .layer(cache);
    for uri in ["/known", "/chunked", "/known", "/chunked"] {
        let r = send(&app, get_req(uri)).await;
        assert_eq!(r.body.len(), big.len(), "{uri}");
        assert_eq!(r.x_cache(), "MISS");
    }
    wait_until("abandoned", || handle.stats().abandoned == 4).await;
    assert_eq!(handle.stats().stored, 0);
}

#[tokio::test]
async fn out_of_memory_redis_serves_from_the_handler() {
    let server = RedisServer::start();
    let cache = layer(&server.url()).await;
    let handle = cache.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let app = echo_app(cache, calls.clone());
    cli(
        &server,
        &["CONFIG", "SET", "maxmemory-policy", "noeviction"],
    );
    cli(&server, &["CONFIG", "SET", "maxmemory", "1"]);
    for i in 0..5 {
        let r = send(&app, get_req(&format!("/oom?i={i}"))).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    }
    // Refused by Redis, or not even sent: writes pause while Redis is full.
    wait_until("failed or paused writes", || {
        let s = handle.stats();
        s.write_errors + s.writes_paused == 5
    })
    .await;
    assert_eq!(handle.stats().stored, 0);
    assert_eq!(
        handle.breaker(),
        BreakerState::Closed,
        "Redis answers: not an outage"
    );
    cli(&server, &["CONFIG", "SET", "maxmemory", "0"]);
    // Writes resume within a second or two (the next look at Redis's memory).
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.stats().stored == 0 {
        assert!(Instant::now() < deadline, "writes never resumed");
        send(&app, get_req("/oom?i=0")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(send(&app, get_req("/oom?i=0")).await.x_cache(), "HIT");
}

#[tokio::test]
async fn a_read_only_replica_serves_from_the_handler() {
    let server = RedisServer::start();
    let nowhere = RedisServer::unstarted();
    let cache = layer(&server.url()).await;
    let handle = cache.handle();
    let app = echo_app(cache, Arc::default());
    cli(
        &server,
        &["REPLICAOF", "127.0.0.1", &nowhere.port().to_string()],
    );
    for i in 0..5 {
        let r = send(&app, get_req(&format!("/ro?i={i}"))).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    }
    wait_until("failed writes", || handle.stats().write_errors == 5).await;
    assert_eq!(handle.breaker(), BreakerState::Closed);
    cli(&server, &["REPLICAOF", "NO", "ONE"]);
    send(&app, get_req("/ro?i=0")).await;
    stored(&handle, 1).await;
    assert_eq!(send(&app, get_req("/ro?i=0")).await.x_cache(), "HIT");
}

#[tokio::test]
async fn a_slow_redis_costs_at_most_the_lookup_deadline() {
    let server = RedisServer::start();
    let cache = layer(&server.url()).await;
    let handle = cache.handle();
    let app = echo_app(cache, Arc::default());
    send(&app, get_req("/slow")).await;
    stored(&handle, 1).await;
    // A script that keeps Redis busy for 1.5 s, sent from another process.
    let port = server.port().to_string();
    let busy = std::thread::spawn(move || {
        Command::new("redis-cli")
            .args(["-p", &port, "EVAL"])
            .arg(
                "local t=redis.call('TIME') local s=t[1]*1000000+t[2] \
                 while true do local n=redis.call('TIME') \
                 if n[1]*1000000+n[2]-s > 1500000 then break end end return 1",
            )
            .arg("0")
            .output()
    });
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..10 {
        let started = Instant::now();
        let r = send(&app, get_req("/slow")).await;
        assert_eq!(r.status, 200);
        assert!(started.elapsed() < BOUND, "{:?}", started.elapsed());
    }
    busy.join().unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while send(&app, get_req("/slow")).await.x_cache() != "HIT" {
        assert!(Instant::now() < deadline, "hits never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
