//! Deterministic per-hit cost: allocations and bytes allocated per request for the bare
//! handlers (`plain`), the hand-written middleware (`naive`) and this crate (`cache-redis`),
//! driven in-process with `tower::ServiceExt::oneshot` on a current-thread runtime against a
//! redis-server of its own on a free loopback port (stopped by PID at the end).
//!
//! `cargo bench --bench alloc_per_hit` prints a table. Instruction counts come from running
//! the same binary under callgrind, one contender at a time, collecting only inside
//! `hits_under_measurement` (which also runs fred's connection tasks, on this thread):
//!
//! ```text
//! ONLY=cache-redis N=2000 valgrind --tool=callgrind --toggle-collect='*hits_under_measurement*' \
//!     target/release/deps/alloc_per_hit-<hash>
//! ```
//!
//! `ONLY` picks one contender (`plain`, `naive`, `cache-redis`, `cache-near`: the near-cache on
//! every route, so its hits are near hits), `N` the hits per scenario
//! (default 5,000), `SCENARIO` one of `shared` (1 KiB, 100 keys), `user` (1 KiB, per user) or
//! `miss` (1 KiB, a new key each time; the writes that follow are counted too).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/contenders.rs"]
mod contenders;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::Router;
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const KEYS: u64 = 100;

fn request(scenario: &str, i: u64) -> Request<Body> {
    if scenario == "miss" {
        // A new key every time (ids past those of the hit scenarios).
        return Request::get(format!("/item/{}?size=1024", 1_000_000 + i))
            .body(Body::empty())
            .unwrap();
    }
    let i = i % KEYS;
    let builder = match scenario {
        "user" => Request::get(format!("/user/{i}")).header("x-user", i.to_string()),
        _ => Request::get(format!("/item/{i}?size=1024")),
    };
    builder.body(Body::empty()).unwrap()
}

async fn one(app: &Router, req: Request<Body>) -> usize {
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap().to_bytes().len()
}

/// The measured loop: `n` requests, each built, served and its body read to the end. The
/// request building is part of every contender's figure alike.
#[inline(never)]
fn hits_under_measurement(
    rt: &tokio::runtime::Runtime,
    app: &Router,
    scenario: &str,
    n: u64,
) -> usize {
    rt.block_on(async {
        let mut total = 0;
        for i in 0..n {
            total += one(app, request(scenario, i)).await;
        }
        if scenario == "miss" {
            // Let the writes that follow the responses finish: they are part of a miss.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        total
    })
}

fn main() {
    let n: u64 = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let only = std::env::var("ONLY").ok();
    let scenarios: Vec<String> = match std::env::var("SCENARIO") {
        Ok(s) => vec![s],
        Err(_) => vec!["shared".into(), "user".into(), "miss".into()],
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis = common::RedisServer::start();
    let url = redis.url();
    let mut apps: Vec<(&str, Router, Option<tower_redis_cache::CacheHandle>)> = Vec::new();
    for kind in ["plain", "naive", "cache-redis", "cache-near"] {
        if only.as_deref().is_some_and(|o| o != kind) {
            continue;
        }
        let entry = rt.block_on(async {
            match kind {
                "plain" => (kind, contenders::plain(), None),
                "naive" => (kind, contenders::naive_app(&url).await, None),
                "cache-near" => {
                    let config = common::relaxed_config(&url);
                    let layer = contenders::cache_near_layer_with(config).await;
                    let handle = layer.handle();
                    (kind, contenders::app().layer(layer), Some(handle))
                }
                _ => {
                    // A generous lookup deadline (the setting only changes the timer's
                    // expiry), so that a loaded machine or callgrind cannot turn a hit
                    // into a miss.
                    let config = common::relaxed_config(&url);
                    let layer = contenders::cache_layer_with(config).await;
                    let handle = layer.handle();
                    (kind, contenders::app().layer(layer), Some(handle))
                }
            }
        });
        // What `axum::serve` does once: turn the handlers (and the layers on them) into
        // services. Without it, a `Router<()>` applies its layers again on every request.
        let entry = (entry.0, entry.1.with_state::<()>(()), entry.2);
        apps.push(entry);
    }
    println!("per request, {n} requests per row, current-thread runtime, redis on loopback");
    println!(
        "{:<8} | {:<11} | {:>10} {:>12} | redis commands",
        "scenario", "contender", "allocs", "bytes"
    );
    for scenario in &scenarios {
        for (kind, app, handle) in &apps {
            if scenario == "miss" && *kind == "cache-near" {
                // The near tier plays no part in a miss, and cache-redis (same namespace)
                // has just stored these keys: they would be hits.
                continue;
            }
            // Warm every key (stores the entries), then wait for the writes to land.
            rt.block_on(async {
                if scenario == "miss" {
                    return;
                }
                let stored = handle.as_ref().map_or(0, |h| h.stats().stored);
                for i in 0..KEYS {
                    one(app, request(scenario, i)).await;
                }
                if let Some(h) = handle {
                    for _ in 0..400 {
                        if h.stats().stored >= stored + KEYS {
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                }
                // A second pass: every later request must be a hit.
                for i in 0..KEYS {
                    one(app, request(scenario, i)).await;
                }
                if *kind == "cache-near" {
                    // The near-cache's subscription comes up in the background; then a
                    // pass through Redis fills it, and later requests are near hits.
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    for i in 0..KEYS {
                        one(app, request(scenario, i)).await;
                    }
                }
            });
            let hits_before = handle.as_ref().map(|h| h.stats().hits);
            redis_cli(redis.port(), &["CONFIG", "RESETSTAT"]);
            let (a0, b0) = (
                ALLOCS.load(Ordering::Relaxed),
                BYTES.load(Ordering::Relaxed),
            );
            let total = hits_under_measurement(&rt, app, scenario, n);
            let (a1, b1) = (
                ALLOCS.load(Ordering::Relaxed),
                BYTES.load(Ordering::Relaxed),
            );
            let commands = commands_per_request(redis.port(), n);
            assert_eq!(total as u64, n * 1024, "{kind}: every body is 1 KiB");
            if let (Some(h), Some(before)) = (handle, hits_before) {
                let s = h.stats();
                let want = if scenario == "miss" { 0 } else { n };
                assert_eq!(s.hits - before, want, "{kind}: {s:?}");
            }
            println!(
                "{:<8} | {:<11} | {:>10.1} {:>12.0} | {}",
                scenario,
                kind,
                (a1 - a0) as f64 / n as f64,
                (b1 - b0) as f64 / n as f64,
                commands
            );
        }
    }
    drop(apps);
    drop(rt);
    drop(redis);
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Commands Redis served since the last `CONFIG RESETSTAT`, per request, by name (the
/// `INFO` call that reads them excluded).
fn commands_per_request(port: u16, n: u64) -> String {
    let info = redis_cli(port, &["INFO", "commandstats"]);
    let mut parts = Vec::new();
    for line in info.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let calls: u64 = rest
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if name == "info" || name.starts_with("config") {
            continue;
        }
        parts.push(format!("{name} {:.2}", calls as f64 / n as f64));
    }
    parts.join(", ")
}
