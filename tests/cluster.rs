//! Caching and every invalidation against a real Redis Cluster of 3 primaries with a replica
//! each, started once for this test binary (one test, so the cluster is stopped when it
//! ends); then a primary is killed under load and its replica promoted.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::scenario;
use common::{get_with, send, wait_until, RedisCluster};
use tower_redis_cache::RequestKey;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_caches_invalidates_and_survives_a_failover() {
    let mut cluster = RedisCluster::start_with_replicas(3, 1);
    let cache = scenario::layer(&cluster.url(), "clu").await;
    let handle = cache.handle();
    let app = scenario::app(cache, Arc::default());

    // Hits are served from the cluster.
    let me = [("x-test-user", "9")];
    assert_eq!(
        send(&app, get_with("/users/9/menu", &me)).await.x_cache(),
        "MISS"
    );
    wait_until("stored", || handle.stats().stored == 1).await;
    assert_eq!(
        send(&app, get_with("/users/9/menu", &me)).await.x_cache(),
        "HIT"
    );
    handle
        .invalidate(&RequestKey::new("/users/9/menu").identity("9"))
        .await
        .unwrap();

    // Every invalidation, with entries and indexes spread over the three primaries.
    scenario::every_operation(&app, &handle, || cluster.keys("clu:v1:*")).await;
    let per_node: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| n.keys("clu:*").len())
        .collect();
    assert!(
        per_node.iter().filter(|&&n| n > 0).count() >= 2,
        "keys should spread over primaries: {per_node:?}"
    );
    assert!(handle.stats().write_errors == 0 && handle.stats().unavailable == 0);

    // Failover under load: kill the primary of a cached entry's slot.
    let key = handle.key(&RequestKey::new("/roles"));
    let victim = cluster.primary_of(&key);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (app, stop, ok, failed) = (app.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let r = send(&app, common::get("/roles")).await;
                    let good = r.status == 200
                        && r.text().starts_with("call #")
                        && started.elapsed() < Duration::from_secs(1);
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed)
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed)
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.nodes[victim].kill();
    // The replica takes over (cluster-node-timeout 2 s); caching resumes on that slot.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        handle.invalidate_path("/roles").await.ok();
        let _ = send(&app, common::get("/roles")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if send(&app, common::get("/roles")).await.x_cache() == "HIT" {
            break;
        }
        if Instant::now() > deadline {
            let alive = (victim + 1) % cluster.nodes.len();
            let out = std::process::Command::new("redis-cli")
                .args([
                    "-p",
                    &cluster.nodes[alive].port().to_string(),
                    "cluster",
                    "nodes",
                ])
                .output()
                .unwrap();
            panic!(
                "caching did not resume after the failover: {:?} breaker {:?}\n{}",
                handle.stats(),
                handle.breaker(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the failover"
    );
    assert!(ok.load(Ordering::Relaxed) > 10);
}
