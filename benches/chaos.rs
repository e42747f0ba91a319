//! Chaos benchmark: steady load on two servers on loopback, the same axum handler with and
//! without the cache layer, while the cache's redis-server is killed, restarted, frozen
//! (SIGSTOP) and thawed at fixed times. Prints requests, errors and p50/p99/max latency per
//! phase for both, their throughput ratio, and how long hits took to come back.
//!
//! `cargo bench --bench chaos` (about 30 s; `PHASE_SECS` sets each of the five phases,
//! default 6; `WORKERS` the connections per server, default 16).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use common::load::{percentiles, Conn};
use tower_redis_cache::{CacheLayer, Policy, RedisConfig, RedisStore};

const PHASES: [&str; 5] = ["healthy", "killed", "restarted", "frozen", "thawed"];

fn app() -> Router {
    Router::new().route(
        "/items/{id}",
        get(|Path(id): Path<u32>| async move {
            // The simulated database read the cache saves.
            tokio::time::sleep(Duration::from_millis(1)).await;
            format!("{{\"id\":{id},\"payload\":\"{}\"}}", "x".repeat(1000))
        }),
    )
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[derive(Default, Clone)]
struct Phase {
    ok: u64,
    errors: u64,
    hits: u64,
    latencies: Vec<Duration>,
    first_hit: Option<Duration>,
}

fn main() {
    let phase_secs: u64 = std::env::var("PHASE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let workers: usize = std::env::var("WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut redis = common::RedisServer::start();
    let url = redis.url();
    let (plain, cached, handle) = rt.block_on(async {
        let store = RedisStore::connect(RedisConfig::from_url(&url).unwrap())
            .await
            .unwrap();
        let cache = CacheLayer::new(store, Policy::shared(Duration::from_secs(600)));
        let handle = cache.handle();
        (serve(app()).await, serve(app().layer(cache)).await, handle)
    });

    // stats[server][phase]
    let stats: Arc<Mutex<Vec<Vec<Phase>>>> =
        Arc::new(Mutex::new(vec![vec![Phase::default(); 5]; 2]));
    let phase_now = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let phase_start = Arc::new(Mutex::new(Instant::now()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (s, addr) in [plain, cached].into_iter().enumerate() {
        for w in 0..workers {
            let (stats, phase_now, phase_start, stop) = (
                stats.clone(),
                phase_now.clone(),
                phase_start.clone(),
                stop.clone(),
            );
            tasks.push(rt.spawn(async move {
                let mut conn = Conn::new(addr);
                let mut i = w * 7;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let r = conn.get(&format!("/items/{}", i % 200), &[]).await;
                    let p = phase_now.load(Ordering::Relaxed);
                    let since = phase_start.lock().unwrap().elapsed();
                    let mut st = stats.lock().unwrap();
                    let ph = &mut st[s][p];
                    match r {
                        Ok(r) if r.status == 200 => {
                            ph.ok += 1;
                            ph.latencies.push(r.took);
                            if r.hit {
                                ph.hits += 1;
                                if ph.first_hit.is_none() {
                                    ph.first_hit = Some(since);
                                }
                            }
                        }
                        _ => ph.errors += 1,
                    }
                }
            }));
        }
    }

    let phase = Duration::from_secs(phase_secs);
    for (p, name) in PHASES.iter().enumerate() {
        match *name {
            "killed" => redis.kill(),
            "restarted" => redis.restart(),
            "frozen" => redis.freeze(),
            "thawed" => redis.thaw(),
            _ => {}
        }
        *phase_start.lock().unwrap() = Instant::now();
        phase_now.store(p, Ordering::Relaxed);
        std::thread::sleep(phase);
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });

    let mut st = stats.lock().unwrap();
    println!(
        "chaos: {workers} keep-alive connections per server, {phase_secs} s per phase, handler 1 ms + 1 KiB, 200 keys"
    );
    println!(
        "{:<10} | {:>9} {:>6} {:>8} {:>8} {:>8} | {:>9} {:>6} {:>6} {:>8} {:>8} {:>8} | {:>6} | {:>10}",
        "phase", "plain req", "err", "p50", "p99", "max", "cache req", "err", "hits%", "p50", "p99", "max", "ratio", "first hit"
    );
    for (p, name) in PHASES.iter().enumerate() {
        let (a, b) = st.split_at_mut(1);
        let (plain, cache) = (&mut a[0][p], &mut b[0][p]);
        let (pp50, pp99, pmax) = percentiles(&mut plain.latencies);
        let (cp50, cp99, cmax) = percentiles(&mut cache.latencies);
        println!(
            "{:<10} | {:>9} {:>6} {:>8.2?} {:>8.2?} {:>8.2?} | {:>9} {:>6} {:>5.0}% {:>8.2?} {:>8.2?} {:>8.2?} | {:>6.2} | {:>10}",
            name,
            plain.ok,
            plain.errors,
            pp50,
            pp99,
            pmax,
            cache.ok,
            cache.errors,
            100.0 * cache.hits as f64 / cache.ok.max(1) as f64,
            cp50,
            cp99,
            cmax,
            cache.ok as f64 / plain.ok.max(1) as f64,
            cache.first_hit.map_or("-".to_owned(), |d| format!("{d:.2?}")),
        );
    }
    let s = handle.stats();
    println!(
        "cache stats: hits {} misses {} unavailable {} stored {} write_errors {} breaker_opened {}",
        s.hits, s.misses, s.unavailable, s.stored, s.write_errors, s.breaker_opened
    );
}
