//! Load benchmark: the same axum handler served by separate processes, `plain` (no cache),
//! `naive` (a hand-written Redis middleware: GET by path, on a miss call the handler, collect
//! the body, SET EX), `cache-redis` (this crate) and `cache-near` (this crate with its
//! in-process near-cache on, 5 s bound), driven over loopback by 64 keep-alive
//! connections, contenders alternated so machine noise hits them alike. Prints req/s,
//! p50/p99 and peak RSS per scenario, with ratios against `plain` and `naive`.
//!
//! `cargo bench --bench load` (`SECS` per run, default 4; `ROUNDS`, default 2; `SCENARIOS`, a
//! comma-separated list of words that pick the scenarios whose name contains one, e.g.
//! `SCENARIOS=misses,1 KiB`). It starts its own redis-server.
//!
//! Every scenario gets fresh server processes (started before it, stopped after it), so that
//! its peak RSS (`VmHWM`) is its own: a server kept across scenarios would report the peak of
//! an earlier, larger one (the 256 KiB bodies) in every later row.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/contenders.rs"]
mod contenders;

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::load::{percentiles, Conn};

const CONTENDERS: [&str; 4] = ["plain", "naive", "cache-redis", "cache-near"];
const CONNECTIONS: usize = 64;

async fn serve(kind: &str, port: u16, redis: &str) {
    let app = match kind {
        "plain" => contenders::plain(),
        "naive" => contenders::naive_app(redis).await,
        "cache-near" => contenders::cache_near_app(redis).await,
        _ => contenders::cache_app(redis).await,
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    axum::serve(listener, app).await.unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One server process per contender, each listening on its own port once this returns.
fn start_servers(exe: &std::path::Path, redis: &str) -> Vec<Server> {
    CONTENDERS
        .iter()
        .map(|kind| {
            let port = free_port();
            let child = Command::new(exe)
                .env("LOAD_SERVE", kind)
                .env("LOAD_PORT", port.to_string())
                .env("LOAD_REDIS", redis)
                .spawn()
                .unwrap();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(addr).is_err() {
                assert!(Instant::now() < deadline, "{kind} did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            Server { child, addr }
        })
        .collect()
}

/// One scenario: its name, how many distinct keys its hits use (warmed before the first
/// round), and a path (and user) for request number `i`.
type Scenario = (&'static str, u64, fn(u64) -> (String, Option<String>));

fn scenarios() -> Vec<Scenario> {
    vec![
        ("hits 1 KiB, 1,000 keys", 1000, |i| {
            (format!("/item/{}?size=1024", i % 1000), None)
        }),
        ("hits 16 KiB, 1,000 keys", 1000, |i| {
            (format!("/item/{}?size=16384", i % 1000), None)
        }),
        ("hits 256 KiB, 1,000 keys", 1000, |i| {
            (format!("/item/{}?size=262144", i % 1000), None)
        }),
        ("per-user hits, 10,000 users", 10_000, |i| {
            let u = i % 10_000;
            (format!("/user/{u}"), Some(u.to_string()))
        }),
        ("misses, 20 ms handler", 0, |i| (format!("/slow/{i}"), None)),
        ("90% hits / 10% misses", 1000, |i| {
            if i % 10 == 0 {
                (format!("/item/{}?size=1024&miss={i}", 1_000_000 + i), None)
            } else {
                (format!("/item/{}?size=1024", i % 1000), None)
            }
        }),
    ]
}

fn main() {
    if let (Ok(kind), Ok(port), Ok(redis)) = (
        std::env::var("LOAD_SERVE"),
        std::env::var("LOAD_PORT"),
        std::env::var("LOAD_REDIS"),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(serve(&kind, port.parse().unwrap(), &redis));
        return;
    }
    let secs: u64 = std::env::var("SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let redis = common::RedisServer::start();
    let exe = std::env::current_exe().unwrap();
    let picked: Option<Vec<String>> = std::env::var("SCENARIOS")
        .ok()
        .map(|v| v.split(',').map(|w| w.trim().to_owned()).collect());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    println!(
        "load: {CONNECTIONS} keep-alive connections, {secs} s per run, {rounds} rounds, contenders alternated; nproc {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<29} | {:<11} | {:>9} {:>9} {:>9} | {:>8} {:>8} | {:>8}",
        "scenario", "contender", "req/s", "p50", "p99", "x plain", "x naive", "rss MiB"
    );
    for (name, keys, path) in scenarios() {
        if picked
            .as_ref()
            .is_some_and(|words| !words.iter().any(|w| name.contains(w.as_str())))
        {
            continue;
        }
        let servers = start_servers(&exe, &redis.url());
        // Warm: every key once, so hit scenarios measure hits.
        let mut results: Vec<(u64, Vec<Duration>)> = vec![(0, Vec::new()); CONTENDERS.len()];
        for round in 0..rounds {
            for c in 0..CONTENDERS.len() {
                // Alternate the order each round.
                let c = if round % 2 == 0 {
                    c
                } else {
                    CONTENDERS.len() - 1 - c
                };
                let addr = servers[c].addr;
                let (n, mut lat) = rt.block_on(drive(
                    addr,
                    path,
                    Duration::from_secs(secs),
                    if round == 0 { keys } else { 0 },
                ));
                results[c].0 += n;
                results[c].1.append(&mut lat);
            }
        }
        let rates: Vec<f64> = results
            .iter()
            .map(|r| r.0 as f64 / (secs as f64 * rounds as f64))
            .collect();
        let rate = |c: usize| rates[c];
        for (c, kind) in CONTENDERS.iter().enumerate() {
            let (p50, p99, _) = percentiles(&mut results[c].1);
            println!(
                "{:<29} | {:<11} | {:>9.0} {:>9.2?} {:>9.2?} | {:>8.2} {:>8.2} | {:>8.1}",
                name,
                kind,
                rate(c),
                p50,
                p99,
                rate(c) / rate(0).max(1.0),
                rate(c) / rate(1).max(1.0),
                peak_rss_kib(servers[c].child.id()) as f64 / 1024.0
            );
        }
    }
}

/// Drives one server for `duration`, after requesting its first `warm` keys once.
async fn drive(
    addr: SocketAddr,
    path: fn(u64) -> (String, Option<String>),
    duration: Duration,
    warm: u64,
) -> (u64, Vec<Duration>) {
    if warm > 0 {
        let mut conn = Conn::new(addr);
        for i in 0..warm {
            let (p, user) = path(i);
            let headers: Vec<(&str, &str)> =
                user.as_deref().map(|u| ("x-user", u)).into_iter().collect();
            let _ = conn.get(&p, &headers).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Every run draws fresh request numbers, so a miss scenario never repeats an earlier
    // run's keys (hit scenarios take them modulo their key count, unchanged).
    static RUN: AtomicU64 = AtomicU64::new(1);
    let offset = RUN.fetch_add(1, Ordering::Relaxed) * 1_000_000_000;
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(offset));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (stop, counter, latencies) = (stop.clone(), counter.clone(), latencies.clone());
            tokio::spawn(async move {
                let mut conn = Conn::new(addr);
                let mut mine = Vec::new();
                let mut done = 0;
                while !stop.load(Ordering::Relaxed) {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    let (p, user) = path(i);
                    let headers: Vec<(&str, &str)> =
                        user.as_deref().map(|u| ("x-user", u)).into_iter().collect();
                    if let Ok(r) = conn.get(&p, &headers).await {
                        if r.status == 200 {
                            done += 1;
                            mine.push(r.took);
                        }
                    }
                }
                latencies.lock().unwrap().append(&mut mine);
                done
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    let lat = std::mem::take(&mut *latencies.lock().unwrap());
    (total, lat)
}
