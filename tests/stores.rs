//! What every store must do alike, run on both: a real redis-server of the test's own and the
//! in-process `MemoryStore`. TTLs, HEAD from the GET entry, per-user isolation, the memory
//! bound, stale serving. (Invalidation, values and coalescing run on both stores in their
//! own files.)

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use common::scenario::{self, UserId};
use common::stores::{Backing, Kind};
use common::{get as get_req, get_with, send, wait_until};
use http::Request;
use tower_redis_cache::{CacheHandle, CacheLayer, MemoryStore, Policy, RequestKey};

on_both_stores!(
    entries_expire_with_their_ttl,
    head_is_answered_from_the_get_entry,
    users_never_see_each_others_entries,
    the_memory_bound_is_honoured,
    a_stale_entry_is_served_while_it_is_refreshed,
);

/// `/n/{n}` answers "call #k" (k counts handler calls) with a body of `size` bytes after it.
fn counting_app(cache: CacheLayer, size: usize) -> (Router, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new()
        .route(
            "/n/{n}",
            get(move || {
                let k = c.fetch_add(1, Ordering::SeqCst) + 1;
                async move { format!("call #{k} {}", "x".repeat(size)) }
            }),
        )
        .layer(cache);
    (app, calls)
}

async fn stored(handle: &CacheHandle, n: u64) {
    wait_until("stored", || handle.stats().stored >= n).await;
}

async fn entries_expire_with_their_ttl(kind: Kind) {
    let backing = Backing::start(kind);
    let cache = CacheLayer::new(
        backing.store().await,
        Policy::shared(Duration::from_secs(1)),
    );
    let handle = cache.handle();
    let (app, calls) = counting_app(cache, 0);
    assert_eq!(send(&app, get_req("/n/1")).await.x_cache(), "MISS");
    stored(&handle, 1).await;
    let hit = send(&app, get_req("/n/1")).await;
    assert_eq!((hit.x_cache(), hit.text().trim()), ("HIT", "call #1"));
    assert!(hit.header("age").is_some());
    assert!(
        backing
            .keys("cache:v1:*")
            .contains(&handle.key(&RequestKey::new("/n/1").route("/n/{n}"))),
        "{:?}",
        backing.keys("*")
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        backing.keys("cache:v1:*").is_empty(),
        "{:?}",
        backing.keys("*")
    );
    let again = send(&app, get_req("/n/1")).await;
    assert_eq!((again.x_cache(), again.text().trim()), ("MISS", "call #2"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

async fn head_is_answered_from_the_get_entry(kind: Kind) {
    let backing = Backing::start(kind);
    let cache = CacheLayer::new(
        backing.store().await,
        Policy::shared(Duration::from_secs(60)),
    );
    let handle = cache.handle();
    let (app, calls) = counting_app(cache, 10);
    let head = || {
        Request::head("/n/1")
            .body(axum::body::Body::empty())
            .unwrap()
    };
    // A HEAD miss is not stored.
    assert_eq!(send(&app, head()).await.x_cache(), "MISS");
    let get = send(&app, get_req("/n/1")).await;
    stored(&handle, 1).await;
    let hit = send(&app, head()).await;
    assert_eq!(hit.x_cache(), "HIT");
    assert!(hit.body.is_empty());
    assert_eq!(
        hit.header("content-length"),
        Some(get.body.len().to_string().as_str())
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

async fn users_never_see_each_others_entries(kind: Kind) {
    let backing = Backing::start(kind);
    let cache = scenario::layer_on(backing.store().await, "users");
    let handle = cache.handle();
    let app = scenario::app(cache, Arc::default());
    let as_user = |u: &'static str| get_with("/users/me/menu", &[("x-test-user", u)]);
    let a = send(&app, as_user("a")).await;
    let b = send(&app, as_user("b")).await;
    assert_ne!(a.text(), b.text());
    stored(&handle, 2).await;
    for _ in 0..3 {
        assert_eq!(send(&app, as_user("a")).await.text(), a.text());
        assert_eq!(send(&app, as_user("b")).await.text(), b.text());
    }
    // Without an identity, a per-user route is not served from the cache.
    assert_eq!(
        send(&app, get_req("/users/me/menu")).await.x_cache(),
        "BYPASS"
    );
    // Keys never hold the identity in clear.
    assert!(backing
        .keys("users:*")
        .iter()
        .all(|k| !k.ends_with(":a") && !k.contains(":a:")));
    let _ = UserId("".into());
}

/// 120 entries of 128 KiB (15 MiB) through a store bounded to 8 MiB: every request is
/// answered in full, the store stays within its bound (Redis: `used_memory` within the last
/// entry of `maxmemory`, as Redis evicts before each command), the oldest entries were
/// evicted and the newest is a hit.
async fn the_memory_bound_is_honoured(kind: Kind) {
    const BOUND: u64 = 8 << 20;
    const SIZE: usize = 128 << 10;
    let backing = Backing::bounded(kind, BOUND);
    let cache = CacheLayer::new(
        backing.store().await,
        Policy::shared(Duration::from_secs(60)),
    )
    .max_pending_writes(4);
    let handle = cache.handle();
    let (app, _) = counting_app(cache, SIZE);
    for n in 0..120u64 {
        let r = send(&app, get_req(&format!("/n/{n}"))).await;
        assert_eq!((r.status.as_u16(), r.body.len() > SIZE), (200, true));
        // One write at a time, so that none is dropped for the write bound.
        wait_until("written", || {
            let s = handle.stats();
            s.stored + s.refused + s.writes_dropped + s.write_errors > n
        })
        .await;
    }
    let used = backing.used_bytes();
    assert!(
        used <= BOUND + SIZE as u64,
        "{used} bytes held, bound {BOUND}"
    );
    let held = backing.keys("cache:v1:*").len();
    assert!((1..120).contains(&held), "{held} entries held");
    let newest = send(&app, get_req("/n/119")).await;
    assert_eq!(newest.x_cache(), "HIT");
    let oldest = send(&app, get_req("/n/0")).await;
    assert_eq!((oldest.status.as_u16(), oldest.x_cache()), (200, "MISS"));
}

async fn a_stale_entry_is_served_while_it_is_refreshed(kind: Kind) {
    let backing = Backing::start(kind);
    let policy =
        Policy::shared(Duration::from_secs(1)).stale_while_revalidate(Duration::from_secs(30));
    let cache = CacheLayer::new(backing.store().await, policy);
    let handle = cache.handle();
    let (app, calls) = counting_app(cache, 0);
    send(&app, get_req("/n/1")).await;
    stored(&handle, 1).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let stale = send(&app, get_req("/n/1")).await;
    assert_eq!(stale.text().trim(), "call #1");
    assert!(
        stale
            .header("cache-status")
            .is_some_and(|s| s.contains("stale")),
        "{:?}",
        stale.header("cache-status")
    );
    stored(&handle, 2).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let fresh = send(&app, get_req("/n/1")).await;
    assert_eq!((fresh.x_cache(), fresh.text().trim()), ("HIT", "call #2"));
}

#[test]
fn a_memory_store_reports_its_bound() {
    let store = MemoryStore::new(1 << 20);
    assert_eq!((store.capacity(), store.used_bytes()), (1 << 20, 0));
}
