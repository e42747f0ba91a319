//! Caching and every invalidation against a real Redis Cluster of 3 primaries with a replica
//! each, started once for this test binary (one test, so the cluster is stopped when it
//! ends); then a primary is killed under load and its replica promoted.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::failover::{until_caching_resumes, SteadyLoad};
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
    let load = SteadyLoad::start(&app, "/roles", |body| body.starts_with("call #"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.nodes[victim].kill();
    // The replica takes over (cluster-node-timeout 2 s); caching resumes on that slot.
    let alive = cluster.nodes[(victim + 1) % cluster.nodes.len()].port();
    until_caching_resumes(&app, &handle, "/roles", || {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &alive.to_string(), "cluster", "nodes"])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await;
    load.finish().await;
}
