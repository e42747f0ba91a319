//! The value cache (`set_json` / `get_json` / `delete` / `get_or_insert_json`), on both stores
//! (a real redis-server and the in-process store), and what Redis holds of it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::scenario;
use common::stores::{Backing, Kind};
use common::{get_with, send, wait_until, RedisServer};
use fred::prelude::KeysInterface;
use serde::{Deserialize, Serialize};
use tower_redis_cache::{CacheHandle, CacheLayer, Policy, RedisStore, ValueKey};

const TTL: Duration = Duration::from_secs(60);

on_both_stores!(
    keys_do_not_collide,
    a_changed_type_is_a_miss_and_is_replaced,
    concurrent_callers_share_one_run,
    errors_are_returned_and_not_cached,
    one_call_invalidates_a_users_values_and_responses,
    a_value_computed_across_an_invalidation_is_never_stored,
);

async fn handle(url: &str) -> CacheHandle {
    let store = RedisStore::connect(common::relaxed_config(url))
        .await
        .unwrap();
    layer(store.into()).handle()
}

fn layer(store: tower_redis_cache::Store) -> CacheLayer {
    CacheLayer::new(store, Policy::bypass())
        .namespace("vals")
        .unwrap()
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Perms {
    user: u64,
    permissions: Vec<String>,
}

#[tokio::test]
async fn set_get_delete_json() {
    let server = RedisServer::start();
    let h = handle(&server.url()).await;
    let key = ValueKey::for_user("user_perms", "42");
    assert_eq!(h.get_json::<Perms>(&key).await.unwrap(), None);
    let p = Perms {
        user: 42,
        permissions: vec!["read".into()],
    };
    h.set_json(&key, &p, TTL).await.unwrap();
    assert_eq!(h.get_json::<Perms>(&key).await.unwrap(), Some(p.clone()));
    // Stored as readable JSON, with the TTL, under a namespaced key without the user in clear.
    let keys = server.keys("vals:val:*");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let parts: Vec<&str> = keys[0].split(':').collect();
    assert_eq!(&parts[..3], ["vals", "val", "user_perms"]);
    // The user only as a 128-bit keyed hash.
    assert!(
        parts[3].len() == 33 && parts[3].starts_with('u'),
        "{keys:?}"
    );
    assert!(!parts.contains(&"42"));
    let store = RedisStore::connect(common::relaxed_config(&server.url()))
        .await
        .unwrap();
    let raw: Vec<u8> = store.pool().get(&keys[0]).await.unwrap();
    // A 13-byte header (format, state, nonce), then the JSON.
    assert_eq!(&raw[..5], b"TRV\x01\x01");
    assert_eq!(&raw[13..], br#"{"user":42,"permissions":["read"]}"#);
    let pttl: i64 = store.pool().pttl(&keys[0]).await.unwrap();
    assert!((59_000..=60_000).contains(&pttl), "{pttl}");
    assert_eq!(h.delete(&key).await.unwrap(), 1);
    assert_eq!(h.get_json::<Perms>(&key).await.unwrap(), None);
    assert_eq!(h.delete(&key).await.unwrap(), 0);
}

async fn keys_do_not_collide(kind: Kind) {
    let backing = Backing::start(kind);
    let h = layer(backing.store().await).handle();
    let keys = [
        ValueKey::new("a").part("b:c"),
        ValueKey::new("a").part("b").part("c"),
        ValueKey::new("a:b").part("c"),
        ValueKey::new("a").part("b:c").user("1"),
        ValueKey::new("a").part("b:c").user("2"),
        ValueKey::new("a*").part("?"),
    ];
    for (i, k) in keys.iter().enumerate() {
        h.set_json(k, &i, TTL).await.unwrap();
    }
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(h.get_json::<usize>(k).await.unwrap(), Some(i));
    }
}

async fn a_changed_type_is_a_miss_and_is_replaced(kind: Kind) {
    let backing = Backing::start(kind);
    let h = layer(backing.store().await).handle();
    let key = ValueKey::new("menu").part(7);
    h.set_json(&key, &vec!["home", "profile"], TTL)
        .await
        .unwrap();
    // The next deploy reads it as another type: a miss, not an error.
    assert_eq!(h.get_json::<Perms>(&key).await.unwrap(), None);
    let calls = AtomicUsize::new(0);
    let v: Perms = h
        .get_or_insert_json(&key, TTL, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(Perms {
                user: 7,
                permissions: vec![],
            })
        })
        .await
        .unwrap();
    assert_eq!((v.user, calls.load(Ordering::SeqCst)), (7, 1));
    wait_until("stored", || h.stats().stored == 1).await;
    assert_eq!(h.get_json::<Perms>(&key).await.unwrap(), Some(v));
}

async fn concurrent_callers_share_one_run(kind: Kind) {
    let backing = Backing::start(kind);
    let h = layer(backing.store().await).handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let key = ValueKey::for_user("user_perms", "9");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (h, calls, key) = (h.clone(), calls.clone(), key.clone());
            tokio::spawn(async move {
                h.get_or_insert_json(&key, TTL, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, String>(Perms {
                        user: 9,
                        permissions: vec!["read".into()],
                    })
                })
                .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().user, 9);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Later callers read it from Redis (written in the background).
    wait_until("stored", || h.stats().stored == 1).await;
    let v: Perms = h
        .get_or_insert_json(&key, TTL, || async { Err::<Perms, _>("must not run") })
        .await
        .unwrap();
    assert_eq!(v.user, 9);
}

async fn errors_are_returned_and_not_cached(kind: Kind) {
    let backing = Backing::start(kind);
    let h = layer(backing.store().await).handle();
    let key = ValueKey::new("flaky");
    let r: Result<u32, String> = h
        .get_or_insert_json(&key, TTL, || async { Err("database down".to_owned()) })
        .await;
    assert_eq!(r, Err("database down".to_owned()));
    assert_eq!(h.get_json::<u32>(&key).await.unwrap(), None);
    let r: Result<u32, String> = h.get_or_insert_json(&key, TTL, || async { Ok(5) }).await;
    assert_eq!(r, Ok(5));
    // While one caller fails, a waiting caller runs its own computation.
    let key = ValueKey::new("flaky2");
    let (h1, h2) = (h.clone(), h.clone());
    let (k1, k2) = (key.clone(), key.clone());
    let first = tokio::spawn(async move {
        h1.get_or_insert_json(&k1, TTL, || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err::<u32, _>("no")
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = tokio::spawn(async move {
        h2.get_or_insert_json(&k2, TTL, || async { Ok::<u32, &str>(8) })
            .await
    });
    assert_eq!(first.await.unwrap(), Err("no"));
    assert_eq!(second.await.unwrap(), Ok(8));
}

#[tokio::test]
async fn with_redis_down_functions_run_uncached() {
    let mut server = RedisServer::start();
    let h = handle(&server.url()).await;
    server.kill();
    let key = ValueKey::new("perms");
    let started = Instant::now();
    let calls = AtomicUsize::new(0);
    for _ in 0..3 {
        let v: u32 = h
            .get_or_insert_json(&key, TTL, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(3)
            })
            .await
            .unwrap();
        assert_eq!(v, 3);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(h.get_json::<u32>(&key).await.is_err());
    assert!(h.set_json(&key, &1, TTL).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
}

async fn one_call_invalidates_a_users_values_and_responses(kind: Kind) {
    let backing = Backing::start(kind);
    let cache = scenario::layer_on(backing.store().await, "mix");
    let h = cache.handle();
    let app = scenario::app(cache, Arc::default());
    send(&app, get_with("/users/42/menu", &[("x-test-user", "42")])).await;
    wait_until("stored", || h.stats().stored == 1).await;
    h.set_json(&ValueKey::for_user("user_perms", "42"), &["read"], TTL)
        .await
        .unwrap();
    h.set_json(&ValueKey::for_user("user_perms", "43"), &["read"], TTL)
        .await
        .unwrap();
    assert_eq!(h.invalidate_user("42").await.unwrap(), 2);
    assert_eq!(
        h.get_json::<Vec<String>>(&ValueKey::for_user("user_perms", "42"))
            .await
            .unwrap(),
        None
    );
    assert!(h
        .get_json::<Vec<String>>(&ValueKey::for_user("user_perms", "43"))
        .await
        .unwrap()
        .is_some());
}

async fn a_value_computed_across_an_invalidation_is_never_stored(kind: Kind) {
    let backing = Backing::start(kind);
    let h = layer(backing.store().await).handle();
    let key = ValueKey::for_user("user_perms", "5");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(tokio::sync::Semaphore::new(0));
    let leader = tokio::spawn({
        let (h, key, gate, entered) = (h.clone(), key.clone(), gate.clone(), entered.clone());
        async move {
            h.get_or_insert_json(&key, TTL, || async move {
                // Reads the old roles, then waits while they change.
                entered.add_permits(1);
                gate.acquire().await.unwrap().forget();
                Ok::<_, String>(vec!["old".to_owned()])
            })
            .await
        }
    });
    entered.acquire().await.unwrap().forget();
    h.invalidate_user("5").await.unwrap();
    // A caller after the invalidation does not join the computation that began before it.
    let fresh = h
        .get_or_insert_json(&key, TTL, || async {
            Ok::<_, String>(vec!["new".to_owned()])
        })
        .await
        .unwrap();
    assert_eq!(fresh, ["new"]);
    gate.add_permits(1);
    assert_eq!(
        leader.await.unwrap().unwrap(),
        ["old"],
        "its own caller gets its answer"
    );
    // Both writes end; the stale one is refused. (The fresh one may be refused too, when the
    // stale pending write replaced it before it was confirmed: then the next read computes.)
    wait_until("both writes", || {
        let s = h.stats();
        s.stored + s.refused == 2
    })
    .await;
    assert!(h.stats().refused >= 1);
    let now = h.get_json::<Vec<String>>(&key).await.unwrap();
    assert!(
        now.is_none() || now == Some(vec!["new".to_owned()]),
        "{now:?}"
    );
}
