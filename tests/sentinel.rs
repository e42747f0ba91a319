//! Redis Sentinel (1 primary, 1 replica, 3 sentinels, started once for this test binary):
//! caching through the sentinels, then the primary killed under load and the replica
//! promoted.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use common::failover::{until_caching_resumes, SteadyLoad};
use common::{get as get_req, send, wait_until, RedisServer};
use tower_redis_cache::{CacheLayer, Policy, RedisStore};

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_caches_and_survives_a_failover() {
    let mut primary = RedisServer::start();
    let replica = RedisServer::start_with(
        &[
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.port().to_string(),
        ],
        false,
    );
    until("replication", 20, || {
        cli(replica.port(), &["INFO", "replication"]).contains("master_link_status:up")
    });
    let sentinels: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start_sentinel(primary.port()))
        .collect();
    until("sentinels to see the replica and each other", 30, || {
        sentinels.iter().all(|s| {
            let replicas = cli(s.port(), &["SENTINEL", "REPLICAS", "mymaster"]);
            let others = cli(s.port(), &["SENTINEL", "SENTINELS", "mymaster"]);
            replicas.contains(&replica.port().to_string())
                && others.matches("127.0.0.1").count() >= 2
        })
    });

    let url = format!(
        "redis-sentinel://127.0.0.1:{}?sentinelServiceName=mymaster&node=127.0.0.1:{}&node=127.0.0.1:{}",
        sentinels[0].port(),
        sentinels[1].port(),
        sentinels[2].port()
    );
    // 200 ms: out of reach of a loaded machine's hiccups, short enough for the "no request
    // waits 1 s" rule during the failover.
    let config = common::relaxed_config(&url).lookup_timeout(Duration::from_millis(200));
    let store = RedisStore::connect(config).await.unwrap();
    let cache = CacheLayer::new(store, Policy::shared(Duration::from_secs(60)));
    let handle = cache.handle();
    let app = Router::new()
        .route("/data", get(|| async { "data" }))
        .layer(cache);
    assert_eq!(send(&app, get_req("/data")).await.x_cache(), "MISS");
    wait_until("stored", || handle.stats().stored == 1).await;
    assert_eq!(send(&app, get_req("/data")).await.x_cache(), "HIT");

    // Failover under load.
    let load = SteadyLoad::start(&app, "/data", |body| body == "data");
    tokio::time::sleep(Duration::from_millis(300)).await;
    primary.kill();
    let sentinel = sentinels[0].port();
    let replica_port = replica.port().to_string();
    tokio::task::spawn_blocking(move || {
        until("the replica's promotion", 30, || {
            cli(
                sentinel,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
            )
            .contains(&replica_port)
        })
    })
    .await
    .unwrap();
    // Caching resumes on the new primary.
    until_caching_resumes(&app, &handle, "/data", String::new).await;
    load.finish().await;
    assert!(cli(replica.port(), &["INFO", "replication"]).contains("role:master"));
}
