//! Caching and every invalidation against a real 3-primary Redis Cluster, started once for
//! this test binary (one test, so the cluster is stopped when it ends).

mod common;

use std::sync::Arc;

use common::scenario;
use common::{get_with, send, wait_until, RedisCluster};
use tower_redis_cache::RequestKey;

#[tokio::test]
async fn cluster_caches_and_invalidates_across_slots() {
    let cluster = RedisCluster::start(3);
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
}
