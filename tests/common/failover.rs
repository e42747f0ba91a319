//! Failover under load, for the Cluster and Sentinel tests: steady requests while a primary
//! is killed, and the wait until caching resumes on the promoted replica.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use tokio::task::JoinHandle;
use tower_redis_cache::CacheHandle;

use super::{get, send};

/// Four clients sending `GET uri` every 5 ms until [`finish`](Self::finish).
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    clients: Vec<JoinHandle<()>>,
}

impl SteadyLoad {
    /// A request is good when it answers 200 within 1 s with a body for which `good` holds.
    pub fn start(app: &Router, uri: &'static str, good: fn(&str) -> bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let clients = (0..4)
            .map(|_| {
                let (app, stop, ok, failed) =
                    (app.clone(), stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let r = send(&app, get(uri)).await;
                        let counter = if r.status == 200
                            && good(&r.text())
                            && started.elapsed() < Duration::from_secs(1)
                        {
                            &ok
                        } else {
                            &failed
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        SteadyLoad {
            stop,
            ok,
            failed,
            clients,
        }
    }

    /// Stops the clients; no request may have failed, and enough must have been answered.
    pub async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.expect("load client");
        }
        assert_eq!(
            self.failed.load(Ordering::Relaxed),
            0,
            "requests failed during the failover"
        );
        assert!(self.ok.load(Ordering::Relaxed) > 10);
    }
}

/// Invalidates `uri`, requests it and checks for a hit, until one comes (at most 30 s; then
/// panics with `describe()`).
pub async fn until_caching_resumes(
    app: &Router,
    handle: &CacheHandle,
    uri: &str,
    describe: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        handle.invalidate_path(uri).await.ok();
        let _ = send(app, get(uri)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if send(app, get(uri)).await.x_cache() == "HIT" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "caching did not resume: {:?}, breaker {:?}\n{}",
            handle.stats(),
            handle.breaker(),
            describe()
        );
    }
}
