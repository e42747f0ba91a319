//! An application and an invalidation scenario shared by the standalone and cluster tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use http::{HeaderValue, Request};
use tower_redis_cache::{
    CacheHandle, CacheLayer, Identity, PathPattern, Policy, RedisStore, RequestKey,
};

use super::{get_with, send, wait_until};

#[derive(Clone)]
pub struct UserId(pub String);
impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Copies `x-test-user` into a `UserId` extension, as an auth layer would.
pub async fn fake_auth(
    mut req: Request<Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(user) = req
        .headers()
        .get("x-test-user")
        .and_then(|v| v.to_str().ok())
    {
        let user = UserId(user.to_owned());
        req.extensions_mut().insert(user);
    }
    next.run(req).await
}

pub const TTL: Duration = Duration::from_secs(60);

pub async fn layer(url: &str, namespace: &str) -> CacheLayer {
    // A 200 ms lookup deadline: out of reach of a loaded machine's hiccups, and still short
    // enough for the failover tests' "no request waits 1 s" rule.
    let config = super::relaxed_config(url).lookup_timeout(Duration::from_millis(200));
    let store = RedisStore::connect(config).await.unwrap();
    layer_on(store.into(), namespace)
}

/// The scenario's layer over any store.
pub fn layer_on(store: tower_redis_cache::Store, namespace: &str) -> CacheLayer {
    CacheLayer::new(store, Policy::bypass())
        .namespace(namespace)
        .unwrap()
        .identity(Identity::extension::<UserId>())
        .route("/users/{id}/menu", Policy::per_user(TTL))
        .unwrap()
        .route("/users/{id}/permissions", Policy::per_user(TTL))
        .unwrap()
        .route("/roles", Policy::shared(TTL).tag("roles"))
        .unwrap()
        .route("/prompts/{name}", Policy::shared(TTL))
        .unwrap()
        .route("/tagged", Policy::shared(TTL))
        .unwrap()
        .route("/odd/{*rest}", Policy::shared(TTL))
        .unwrap()
}

/// The application: every body says how many handler calls came before it.
pub fn app(cache: CacheLayer, calls: Arc<AtomicUsize>) -> Router {
    let handler = move |tagged: bool| {
        let calls = calls.clone();
        get(move || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let mut res = format!("call #{n}").into_response();
                if tagged {
                    res.headers_mut()
                        .insert("cache-tag", HeaderValue::from_static("a b"));
                }
                res
            }
        })
    };
    Router::new()
        .route("/users/{id}/menu", handler(false))
        .route("/users/{id}/permissions", handler(false))
        .route("/roles", handler(false))
        .route("/prompts/{name}", handler(false))
        .route("/tagged", handler(true))
        .route("/odd/{*rest}", handler(false))
        .layer(cache)
        .layer(axum::middleware::from_fn(fake_auth))
}

/// A request and the identity it is sent as.
pub struct Entry {
    pub uri: &'static str,
    pub user: Option<&'static str>,
}

pub const ENTRIES: &[Entry] = &[
    Entry {
        uri: "/users/1/menu",
        user: Some("1"),
    },
    Entry {
        uri: "/users/2/menu",
        user: Some("2"),
    },
    Entry {
        uri: "/users/1/permissions",
        user: Some("1"),
    },
    Entry {
        uri: "/users/2/permissions",
        user: Some("2"),
    },
    Entry {
        uri: "/roles",
        user: None,
    },
    Entry {
        uri: "/prompts/a?lang=en",
        user: None,
    },
    Entry {
        uri: "/prompts/a?lang=de",
        user: None,
    },
    Entry {
        uri: "/prompts/b",
        user: None,
    },
    Entry {
        uri: "/tagged",
        user: None,
    },
    Entry {
        uri: "/odd/a*b",
        user: None,
    },
    Entry {
        uri: "/odd/axxb",
        user: None,
    },
];

pub fn request_key(e: &Entry) -> RequestKey {
    let k = RequestKey::new(e.uri);
    match e.user {
        Some(u) => k.identity(u),
        None => k,
    }
}

/// Stores every entry and waits for the writes.
pub async fn populate(app: &Router, handle: &CacheHandle) {
    let before = handle.stats().stored;
    for e in ENTRIES {
        let headers: Vec<(&str, &str)> = e.user.map(|u| ("x-test-user", u)).into_iter().collect();
        let r = send(app, get_with(e.uri, &headers)).await;
        assert_eq!(r.status, 200, "{}", e.uri);
    }
    let n = ENTRIES.len() as u64;
    wait_until("entries stored", || handle.stats().stored >= before + n).await;
}

/// Which of `ENTRIES` are in Redis, by checking their keys in `existing`.
pub fn present(handle: &CacheHandle, existing: &[String]) -> Vec<&'static str> {
    ENTRIES
        .iter()
        .filter(|e| existing.contains(&handle.key(&request_key(e))))
        .map(|e| e.uri)
        .collect()
}

/// Runs every invalidation once, checking counts and that neighbours survive.
/// `keys` lists the entry keys currently in Redis.
pub async fn every_operation(app: &Router, handle: &CacheHandle, keys: impl Fn() -> Vec<String>) {
    populate(app, handle).await;
    let all: Vec<&str> = ENTRIES.iter().map(|e| e.uri).collect();
    assert_eq!(present(handle, &keys()), all);

    let gone = |now: Vec<&'static str>, removed: &[&str]| {
        let expected: Vec<&str> = all
            .iter()
            .copied()
            .filter(|u| !removed.contains(u))
            .collect();
        assert_eq!(now, expected);
    };
    let mut removed: Vec<&str> = Vec::new();

    // One exact request.
    let n = handle
        .invalidate(&RequestKey::new("/prompts/a?lang=en"))
        .await
        .unwrap();
    assert_eq!(n, 1);
    removed.push("/prompts/a?lang=en");
    gone(present(handle, &keys()), &removed);

    // Every variant of a path.
    assert_eq!(handle.invalidate_path("/prompts/a").await.unwrap(), 1);
    removed.push("/prompts/a?lang=de");
    gone(present(handle, &keys()), &removed);

    // Every entry of a user, across routes.
    assert_eq!(handle.invalidate_user("1").await.unwrap(), 2);
    removed.extend(["/users/1/menu", "/users/1/permissions"]);
    gone(present(handle, &keys()), &removed);

    // Every entry of a route.
    assert_eq!(
        handle.invalidate_route("/users/{id}/menu").await.unwrap(),
        1
    );
    removed.push("/users/2/menu");
    gone(present(handle, &keys()), &removed);

    // Tags from the policy and from a response header.
    assert_eq!(handle.invalidate_tag("roles").await.unwrap(), 1);
    removed.push("/roles");
    assert_eq!(handle.invalidate_tag("b").await.unwrap(), 1);
    removed.push("/tagged");
    assert_eq!(handle.invalidate_tag("a").await.unwrap(), 0);
    gone(present(handle, &keys()), &removed);

    // A pattern built from user input matches only itself.
    let literal = PathPattern::new().literal("/odd/a*b");
    assert_eq!(handle.invalidate_pattern(&literal).await.unwrap(), 1);
    removed.push("/odd/a*b");
    gone(present(handle, &keys()), &removed);

    // A glob pattern, as the Python utility wrote them.
    let perms = PathPattern::glob("/users/*/permissions");
    assert_eq!(handle.invalidate_pattern(&perms).await.unwrap(), 1);
    removed.push("/users/2/permissions");
    gone(present(handle, &keys()), &removed);

    // Everything else.
    assert_eq!(handle.clear().await.unwrap(), 2);
    assert!(present(handle, &keys()).is_empty());

    // And it all works again afterwards.
    populate(app, handle).await;
    assert_eq!(present(handle, &keys()), all);
}
