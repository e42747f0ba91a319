//! Hostile traffic against the indexes: 200,000 variants of one path (what as many
//! unauthenticated `?q=N` requests leave), then each index invalidation of them, on a
//! redis-server of the benchmark's own. Prints the index's size and memory, the
//! invalidation's time and Redis's longest command meanwhile (SLOWLOG, every command
//! logged), and the latency of hits on another route during it against the same hits
//! without it. A baseline in the same run does the job the way the cache did before
//! invalidations were chunked (one ZRANGE of the whole index, every UNLINK at once, one
//! cleanup script over all members), with the same hits beside it.
//!
//! `cargo bench --bench hostile` (about a minute; `MEMBERS` changes the 200,000, `KINDS`
//! the invalidations, default `tag,route,path,naive`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use common::index::{cli, clone_entry, slowlog, slowlog_from, zcard, Slow};
use common::load::percentiles;
use common::{get as get_req, send, RedisServer};
use fred::prelude::{ClientLike, KeysInterface, LuaInterface, Options, SortedSetsInterface};
use tower_redis_cache::{CacheHandle, CacheLayer, Policy, RedisConfig, RedisStore, RequestKey};

const TTL: Duration = Duration::from_secs(3600);
/// Concurrent loops of hits on `/other`.
const HIT_LOOPS: usize = 4;

/// The cleanup script before chunking: every member of the index in one call.
const WHOLE_INDEX_CLEANUP: &str = r#"
local n = 0
for i = 1, #ARGV, 2 do
  local cur = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if cur and tonumber(cur) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n"#;

fn used_memory(server: &RedisServer) -> u64 {
    server
        .info("memory")
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `/items?q=real` stored by the layer, then `members` more variants beside it, indexed as
/// the layer indexes them.
async fn populate(server: &RedisServer, app: &Router, handle: &CacheHandle, members: usize) {
    send(app, get_req("/items?q=real")).await;
    let real = handle.key(&RequestKey::new("/items?q=real"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while cli(server, &["EXISTS", &real]).trim() != "1" {
        assert!(Instant::now() < deadline, "the real entry was never stored");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let keys: Vec<String> = (0..members)
        .map(|i| handle.key(&RequestKey::new(format!("/items?q={i}"))))
        .collect();
    clone_entry(server, "hb", &real, &keys, TTL);
}

#[derive(Default)]
struct Hits {
    took: Vec<Duration>,
    not_hits: usize,
}

/// Hits on `/other` from `HIT_LOOPS` loops until `stop` is set.
fn hits(app: &Router, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Hits>> {
    (0..HIT_LOOPS)
        .map(|_| {
            let (app, stop) = (app.clone(), stop.clone());
            tokio::spawn(async move {
                let mut h = Hits::default();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = send(&app, get_req("/other")).await;
                    h.took.push(t.elapsed());
                    h.not_hits += usize::from(r.x_cache() != "HIT");
                }
                h
            })
        })
        .collect()
}

async fn collect(loops: Vec<tokio::task::JoinHandle<Hits>>) -> Hits {
    let mut all = Hits::default();
    for l in loops {
        let h = l.await.unwrap();
        all.took.extend(h.took);
        all.not_hits += h.not_hits;
    }
    all
}

/// Runs `work` with hits beside it; returns its result, its time and the hits.
async fn with_hits<T>(
    app: &Router,
    work: impl std::future::Future<Output = T>,
) -> (T, Duration, Hits) {
    let stop = Arc::new(AtomicBool::new(false));
    let loops = hits(app, &stop);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    let out = work.await;
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    (out, took, collect(loops).await)
}

/// The same hits for `d`, without anything else.
async fn hits_alone(app: &Router, d: Duration) -> Hits {
    let stop = Arc::new(AtomicBool::new(false));
    let loops = hits(app, &stop);
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    collect(loops).await
}

fn row(name: &str, h: &mut Hits, base: Option<(Duration, Duration)>) -> (Duration, Duration) {
    let (p50, p99, max) = percentiles(&mut h.took);
    let ratio = base
        .map(|(b50, b99)| {
            format!(
                "  x{:.2} p50, x{:.2} p99",
                p50.as_secs_f64() / b50.as_secs_f64().max(1e-9),
                p99.as_secs_f64() / b99.as_secs_f64().max(1e-9)
            )
        })
        .unwrap_or_default();
    println!(
        "    hits {name:<22} {:>7} req  p50 {p50:>10.2?}  p99 {p99:>10.2?}  max {max:>10.2?}  not HIT {}{ratio}",
        h.took.len(),
        h.not_hits
    );
    (p50, p99)
}

/// The invalidation's own commands (hits are GETs and MGETs): count, p50, p99, longest.
fn commands(slow: &[Slow]) -> String {
    let mut own: Vec<Duration> = slow
        .iter()
        .filter(|s| !matches!(s.name.as_str(), "GET" | "MGET"))
        .map(|s| s.took)
        .collect();
    let n = own.len();
    let (p50, p99, max) = percentiles(&mut own);
    let widest = slow.iter().map(|s| s.args).max().unwrap_or(0);
    let longest = slow
        .first()
        .map(|s| format!("{} {:.2?}", s.name, s.took))
        .unwrap_or_default();
    format!(
        "{n} commands: p50 {p50:.2?}, p99 {p99:.2?}, max {max:.2?}; longest of all {longest}; most arguments {widest}"
    )
}

fn main() {
    let members: usize = std::env::var("MEMBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let kinds = std::env::var("KINDS").unwrap_or_else(|_| "tag,route,path,naive".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = RedisServer::start();
    rt.block_on(async move {
        // The default deadlines: 50 ms lookups, 500 ms other commands.
        let store = RedisStore::connect(RedisConfig::from_url(&server.url()).unwrap())
            .await
            .unwrap();
        let cache = CacheLayer::new(store, Policy::bypass())
            .namespace("hb")
            .unwrap()
            .route(
                "/items",
                Policy::shared(TTL).tag("roles").max_variants(members as u32 + 1000),
            )
            .unwrap()
            .route("/other", Policy::shared(TTL))
            .unwrap();
        let handle = cache.handle();
        let app = Router::new()
            .route("/items", get(|| async { "{\"items\":[1,2,3]}" }))
            .route("/other", get(|| async { "{\"other\":true}" }))
            .layer(cache);
        send(&app, get_req("/other")).await;
        while handle.stats().stored < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("hostile: {members} variants of /items (+ the real one), each in the path, route and tag indexes");
        println!("machine: {} cores, load average {}", std::thread::available_parallelism().map_or(0, |n| n.get()), std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" "));

        for kind in kinds.split(',') {
            let before = used_memory(&server);
            let t = Instant::now();
            populate(&server, &app, &handle, members).await;
            let populated = t.elapsed();
            let after = used_memory(&server);
            let index = server
                .keys("hb:ix:t:*")
                .into_iter()
                .next()
                .unwrap_or_default();
            let index_bytes: u64 = cli(&server, &["MEMORY", "USAGE", &index, "SAMPLES", "0"])
                .trim()
                .parse()
                .unwrap_or(0);
            println!(
                "{kind}: populated in {populated:.1?}; tag index {} members, {:.1} MiB; Redis used_memory +{:.1} MiB ({} B per variant, its entry and its members in 4 indexes)",
                zcard(&server, &index),
                index_bytes as f64 / (1 << 20) as f64,
                after.saturating_sub(before) as f64 / (1 << 20) as f64,
                after.saturating_sub(before) / members as u64
            );
            let mut alone = hits_alone(&app, Duration::from_secs(2)).await;
            slowlog_from(&server, 0);
            let (removed, took, mut during) = if kind == "naive" {
                with_hits(&app, naive(&server.url(), &index)).await
            } else {
                with_hits(&app, async {
                    match kind {
                        "tag" => handle.invalidate_tag("roles").await,
                        "route" => handle.invalidate_route("/items").await,
                        _ => handle.invalidate_path("/items").await,
                    }
                    .map_err(|e| e.to_string())
                })
                .await
            };
            // Redis may still be running what its client gave up on (the baseline's script).
            cli(&server, &["PING"]);
            let slow = slowlog(&server);
            println!(
                "  invalidate {kind}: {} in {took:.2?}; {}",
                match &removed {
                    Ok(n) => format!("{n} removed"),
                    Err(e) => format!("FAILED ({e})"),
                },
                commands(&slow)
            );
            let base = row("alone (2 s)", &mut alone, None);
            row("during invalidation", &mut during, Some(base));
            // Start the next round clean.
            cli(&server, &["FLUSHALL", "SYNC"]);
            send(&app, get_req("/other")).await;
            let stored = handle.stats().stored;
            let deadline = Instant::now() + Duration::from_secs(10);
            while handle.stats().stored == stored && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
}

/// The job as done before chunking, by hand: the whole index read in one ZRANGE, every
/// entry unlinked at once (500 keys per UNLINK), the index cleaned in one script call. On a
/// client of its own without deadlines, so that it runs to its end (the cache's client gave
/// up at its 500 ms deadline, and Redis ran the script anyway).
async fn naive(url: &str, index: &str) -> Result<u64, String> {
    use futures_util::future::join_all;
    let client = fred::prelude::Builder::from_config(
        fred::prelude::Config::from_url(url).map_err(|e| e.to_string())?,
    )
    .build()
    .map_err(|e| e.to_string())?;
    client.init().await.map_err(|e| e.to_string())?;
    let slow = Options {
        timeout: Some(Duration::from_secs(120)),
        ..Options::default()
    };
    let c = client.with_options(&slow);
    let flat: Vec<String> = c
        .zrange(index, 0, -1, None, false, None, true)
        .await
        .map_err(|e| e.to_string())?;
    let keys: Vec<&String> = flat.iter().step_by(2).collect();
    let unlinks = keys.chunks(500).map(|chunk| {
        let chunk: Vec<String> = chunk.iter().map(|k| (*k).clone()).collect();
        let c = client.with_options(&slow);
        async move { c.unlink::<u64, _>(chunk).await.unwrap_or(0) }
    });
    let removed: u64 = join_all(unlinks).await.into_iter().sum();
    c.eval::<i64, _, _, _>(WHOLE_INDEX_CLEANUP, index, flat)
        .await
        .map_err(|e| e.to_string())?;
    let _ = client.quit().await;
    Ok(removed)
}
