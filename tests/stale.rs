//! stale-if-error: a stale entry answers when the inner service fails.

mod common;

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use common::{get as get_req, read, wait_until, RedisServer};
use http::{Request, Response, StatusCode};
use tower::ServiceExt;
use tower_redis_cache::{CacheLayer, Policy, RedisConfig, RedisStore};

/// 0: answer 200; 1: answer 503; 2: fail with an error.
#[tokio::test]
async fn a_stale_entry_answers_when_the_handler_fails() {
    let server = RedisServer::start();
    let store = RedisStore::connect(RedisConfig::from_url(&server.url()).unwrap())
        .await
        .unwrap();
    let policy = Policy::shared(Duration::from_millis(500)).stale_if_error(Duration::from_secs(60));
    let cache = CacheLayer::new(store, policy);
    let handle = cache.handle();
    let mode = Arc::new(AtomicU8::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (m, c) = (mode.clone(), calls.clone());
    let svc = tower::ServiceBuilder::new()
        .layer(cache)
        .service(tower::service_fn(move |_req: Request<Body>| {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            let mode = m.load(Ordering::SeqCst);
            async move {
                match mode {
                    0 => Ok(Response::new(Body::from(format!("good #{n}")))),
                    1 => {
                        let mut r = Response::new(Body::from("down"));
                        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        Ok(r)
                    }
                    _ => Err(std::io::Error::other("handler failed")),
                }
            }
        }));
    let send = |uri: &'static str| {
        let svc = svc.clone();
        async move {
            match svc.oneshot(get_req(uri)).await {
                Ok(res) => Ok(read(res.map(Body::new)).await),
                Err(e) => Err(e),
            }
        }
    };

    send("/a").await.unwrap();
    wait_until("stored", || handle.stats().stored == 1).await;
    assert_eq!(send("/a").await.unwrap().x_cache(), "HIT");
    tokio::time::sleep(Duration::from_millis(600)).await; // past freshness

    mode.store(1, Ordering::SeqCst);
    let r = send("/a").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text().as_str(), r.x_cache()),
        (200, "good #1", "STALE")
    );
    assert!(r.header("cache-status").unwrap().contains("fwd=stale"));
    mode.store(2, Ordering::SeqCst);
    let r = send("/a").await.unwrap();
    assert_eq!((r.text().as_str(), r.x_cache()), ("good #1", "STALE"));
    assert_eq!(handle.stats().stale_if_error, 2);

    // Without a stale entry, failures pass through unchanged.
    let r = send("/b").await;
    assert!(r.is_err(), "the inner error type passes through");
    mode.store(1, Ordering::SeqCst);
    assert_eq!(send("/b").await.unwrap().status, 503);

    // When the handler answers again, the stale entry is replaced.
    mode.store(0, Ordering::SeqCst);
    let r = send("/a").await.unwrap();
    assert_eq!(
        (r.x_cache(), r.text().starts_with("good #")),
        ("MISS", true)
    );
    let fresh = r.text();
    wait_until("stored", || handle.stats().stored == 2).await;
    assert_eq!(send("/a").await.unwrap().text(), fresh);
}
