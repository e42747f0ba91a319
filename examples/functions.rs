//! The Python utility's function cache, in Rust: `@cached(ttl)` on `get_user_permissions`
//! and `get_user_menu`, keyed per user, invalidated after a role change.
//!
//! Run with `cargo run --example functions` (Redis from `REDIS_URL` or `REDIS_HOST`/...,
//! default 127.0.0.1:6379; without Redis every call runs the function, as the Python
//! utility did).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tower_redis_cache::{CacheHandle, CacheLayer, Policy, RedisConfig, RedisStore, ValueKey};

/// The stand-in for the database: 50 ms a query.
struct Db {
    roles: RwLock<HashMap<u64, Vec<String>>>,
    queries: AtomicU64,
}

impl Db {
    async fn roles_of(&self, user: u64) -> Vec<String> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.queries.fetch_add(1, Ordering::SeqCst);
        let roles = self.roles.read().unwrap_or_else(|e| e.into_inner());
        roles
            .get(&user)
            .cloned()
            .unwrap_or_else(|| vec!["viewer".into()])
    }
}

#[derive(Serialize, Deserialize, Debug)]
struct Permissions {
    user_id: u64,
    permissions: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug)]
struct Menu {
    user_id: u64,
    items: Vec<String>,
}

/// `@cached(ttl=600, key_func=lambda user_id: f"user_perms:{user_id}")`
async fn get_user_permissions(
    cache: &CacheHandle,
    db: &Db,
    user_id: u64,
) -> Result<Permissions, String> {
    let key = ValueKey::for_user("user_perms", user_id.to_string());
    cache
        .get_or_insert_json(&key, Duration::from_secs(600), || async {
            let roles = db.roles_of(user_id).await;
            let mut permissions = vec!["read".to_owned()];
            if roles.iter().any(|r| r == "admin") {
                permissions.extend(["write".to_owned(), "delete".to_owned()]);
            }
            Ok(Permissions {
                user_id,
                permissions,
            })
        })
        .await
}

/// `@cached(ttl=900, key_func=lambda user_id: menu_cache_key(user_id))`
async fn get_user_menu(cache: &CacheHandle, db: &Db, user_id: u64) -> Result<Menu, String> {
    let key = ValueKey::for_user("menu", user_id.to_string());
    cache
        .get_or_insert_json(&key, Duration::from_secs(900), || async {
            let roles = db.roles_of(user_id).await;
            let mut items = vec!["home".to_owned(), "profile".to_owned()];
            if roles.iter().any(|r| r == "admin") {
                items.push("admin".to_owned());
            }
            Ok(Menu { user_id, items })
        })
        .await
}

/// Changes a user's roles, then `invalidate_cache(f"user_perms:{user_id}")` and the menu,
/// in one call.
async fn set_roles(cache: &CacheHandle, db: &Db, user_id: u64, roles: &[&str]) {
    db.roles
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(user_id, roles.iter().map(|r| r.to_string()).collect());
    match cache.invalidate_user(&user_id.to_string()).await {
        Ok(n) => println!("roles of user {user_id} changed; {n} cached values removed"),
        Err(e) => println!("roles of user {user_id} changed; cache not reachable ({e})"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = RedisStore::connect(RedisConfig::from_env()?).await?;
    let cache = CacheLayer::new(store, Policy::bypass())
        .namespace(&std::env::var("CACHE_NAMESPACE").unwrap_or_else(|_| "functions".into()))?
        .handle();
    let db = Db {
        roles: RwLock::new(HashMap::new()),
        queries: AtomicU64::new(0),
    };
    cache.invalidate_user("1").await.ok();

    for round in 1..=2 {
        if round == 2 {
            // Values are written in the background, off the caller's path: let the two
            // writes of round 1 end (stored, refused or failed), for at most a second.
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline {
                let s = cache.stats();
                if s.stored + s.refused + s.write_errors + s.writes_dropped >= 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let started = Instant::now();
        let p = get_user_permissions(&cache, &db, 1).await?;
        let m = get_user_menu(&cache, &db, 1).await?;
        println!(
            "round {round}: {:?} {:?} in {:.1?} ({} database queries so far)",
            p.permissions,
            m.items,
            started.elapsed(),
            db.queries.load(Ordering::SeqCst)
        );
    }
    set_roles(&cache, &db, 1, &["admin"]).await;
    let p = get_user_permissions(&cache, &db, 1).await?;
    let m = get_user_menu(&cache, &db, 1).await?;
    println!("after the change: {:?} {:?}", p.permissions, m.items);
    Ok(())
}
