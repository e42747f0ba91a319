//! `MemoryStore` under many variants of one path: what a write costs as its index grows, what
//! an invalidation of a large index does to the requests around it, and what a flood of unique
//! queries leaves in memory against the store's bound. In process only (no Redis).
//!
//! `cargo bench --bench memory_index` runs four parts (`PARTS=write,interleaved,invalidation,
//! flood` selects some):
//! - `write` (criterion): `write_in_one_index/{1000,10000,100000}` is one miss and its write
//!   into a path index holding that many entries (each iteration invalidates one variant
//!   exactly, requests it again and waits until its entry is stored, so the index keeps its
//!   size); `write_in_own_index/..` is the control, as many entries each in its own path (same
//!   store size, indexes of one). Compare within one run: flat across sizes, and one index
//!   like the control, means a write does not depend on its index's size.
//! - `interleaved`: the same six cases alternated in rounds (`ROUNDS`, `BATCH`), their medians
//!   and ratios to 1,000 entries printed; the figure to quote on a busy machine.
//! - `invalidation`: the time to invalidate a path holding `BIG` (100,000) entries and the
//!   slowest of the misses of another path served meanwhile (printed).
//! - `flood`: `FLOOD` (100,000) unique queries of one path through a store bounded to 8 MiB:
//!   the store's counted bytes and the heap the flood left allocated, with the layer and by
//!   the store alone (printed).

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use criterion::{criterion_group, Criterion};
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_redis_cache::{CacheHandle, CacheLayer, MemoryStore, Policy, RequestKey};

/// The system allocator, counting the bytes live on the heap.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type Svc = tower::util::BoxCloneService<Request<Body>, Response<Body>, Infallible>;

/// A layer on `store` in front of a handler answering `body_bytes` bytes.
fn service(store: MemoryStore, body_bytes: usize) -> (Svc, CacheHandle) {
    // The variant bound lifted: this measures the index structures themselves.
    let policy = Policy::shared(Duration::from_secs(3600)).max_variants(u32::MAX);
    let cache = CacheLayer::new(store, policy).max_pending_writes(4096);
    let handle = cache.handle();
    let body = bytes::Bytes::from(vec![b'x'; body_bytes]);
    let svc = tower::ServiceBuilder::new()
        .map_response(|r: Response<tower_redis_cache::ResponseBody<Body>>| r.map(Body::new))
        .layer(cache)
        .service_fn(move |_: Request<Body>| {
            std::future::ready(Ok::<_, Infallible>(Response::new(Body::from(body.clone()))))
        });
    (tower::util::BoxCloneService::new(svc), handle)
}

async fn get(svc: Svc, uri: String) {
    let req = Request::get(uri).body(Body::empty()).unwrap();
    let res = svc.oneshot(req).await.unwrap();
    res.into_body().collect().await.unwrap();
}

/// Writes done or given up: stored or refused, dropped, failed or abandoned.
fn writes(handle: &CacheHandle) -> u64 {
    let s = handle.stats();
    s.stored + s.refused + s.writes_dropped + s.write_errors + s.abandoned
}

/// Waits until `n` writes are done (see `writes`); panics after a minute.
async fn written(handle: &CacheHandle, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while writes(handle) < n {
        assert!(
            Instant::now() < deadline,
            "{n} writes awaited: {:?}",
            handle.stats()
        );
        tokio::task::yield_now().await;
    }
}

/// Stores the entries of `uri(0)` .. `uri(n - 1)`, in windows of concurrent misses.
async fn fill(svc: &Svc, handle: &CacheHandle, uri: Variant, n: usize) {
    let start = writes(handle);
    for window in (0..n).collect::<Vec<_>>().chunks(256) {
        let calls = window.iter().map(|&i| get(svc.clone(), uri(i)));
        futures_util::future::join_all(calls).await;
        written(handle, start + (window[window.len() - 1] + 1) as u64).await;
    }
    let s = handle.stats();
    assert_eq!(writes(handle) - start, n as u64, "{s:?}");
    assert_eq!(
        s.writes_dropped + s.refused + s.abandoned + s.write_errors,
        0,
        "{s:?}"
    );
}

/// Lets moka finish the housekeeping a fill left pending (thousands of queued inserts), so
/// that the first measured requests do not pay for it.
fn settle(store: &MemoryStore) {
    store.used_bytes();
}

/// How the `i`-th variant is requested.
type Variant = fn(usize) -> String;

/// The two kinds of store measured: every entry in one index, or each in its own.
const KINDS: [(&str, Variant); 2] = [("one index", query_variant), ("own index", path_variant)];

/// Variants of one path: one index (the path's) holds them all.
fn query_variant(i: usize) -> String {
    format!("/items?q={i}")
}

/// A path each: every index holds one entry (the control: same store size, small indexes).
fn path_variant(i: usize) -> String {
    format!("/items/{i}")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One thread: the write task spawned by a miss runs when the loop waiting for it yields,
/// without the wake-ups across threads that would dominate the figure.
fn rt_one() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn part(name: &str) -> bool {
    std::env::var("PARTS").map_or(true, |p| p.split(',').any(|p| p == name))
}

/// `count` misses and their writes, of variants `first`, `first + 1`, ... (modulo `n`): each
/// variant's entry is invalidated (its memberships stay, as in Redis), then requested and
/// stored again, so that the index keeps its size.
async fn rewrites(
    svc: &Svc,
    handle: &CacheHandle,
    uri: Variant,
    n: usize,
    first: usize,
    count: usize,
) -> Duration {
    let started = Instant::now();
    for i in 0..count {
        let uri = uri((first + i) % n);
        handle
            .invalidate(&RequestKey::new(uri.clone()))
            .await
            .unwrap();
        let before = writes(handle);
        get(svc.clone(), uri).await;
        written(handle, before + 1).await;
    }
    started.elapsed()
}

/// One miss and its write at each store size: into one index holding every entry, and (the
/// control) into an index of its own.
fn write_cost(c: &mut Criterion) {
    if !part("write") {
        return;
    }
    let rt = rt_one();
    for (kind, uri) in KINDS {
        let mut group = c.benchmark_group(format!("write_in_{}", kind.replace(' ', "_")));
        for n in [1_000usize, 10_000, 100_000] {
            let store = MemoryStore::new(4 << 30);
            let (svc, handle) = service(store.clone(), 16);
            rt.block_on(fill(&svc, &handle, uri, n));
            settle(&store);
            let mut next = 0usize;
            group.bench_function(n.to_string(), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (svc, handle) = (svc.clone(), handle.clone());
                    let first = next;
                    next += iters as usize;
                    async move { rewrites(&svc, &handle, uri, n, first, iters as usize).await }
                })
            });
            let s = handle.stats();
            assert!(s.refused == 0 && s.writes_dropped == 0, "{s:?}");
        }
        group.finish();
    }
}

/// The same measure as `write_cost`, its six cases alternated in rounds of `BATCH` (2,000)
/// misses each, `ROUNDS` (9) times: the median of each case, with its ratio to 1,000 entries,
/// printed, after a warm-up round. Alternating keeps a change of the machine's load from
/// landing on one case only.
fn interleaved() {
    if !part("interleaved") {
        return;
    }
    let (rounds, batch) = (env("ROUNDS", 9), env("BATCH", 2_000));
    let rt = rt_one();
    let sizes = [1_000usize, 10_000, 100_000];
    let (mut cases, mut stores) = (Vec::new(), Vec::new());
    for (kind, uri) in KINDS {
        for n in sizes {
            let store = MemoryStore::new(4 << 30);
            let (svc, handle) = service(store.clone(), 16);
            rt.block_on(fill(&svc, &handle, uri, n));
            cases.push((kind, n, uri, svc, handle, Vec::new()));
            stores.push(store);
        }
    }
    // Filled one after another, the first stores have been idle longest: moka catches up on
    // its timers at their next requests. A warm-up round, not counted, for each.
    for ((_, n, uri, svc, handle, _), store) in cases.iter().zip(&stores) {
        settle(store);
        rt.block_on(rewrites(svc, handle, *uri, *n, 0, batch.min(500)));
    }
    for round in 0..rounds {
        for c in 0..cases.len() {
            // A different case first in each round.
            let (_, n, uri, svc, handle, times) = &mut cases[(c + round) % 6];
            let took = rt.block_on(rewrites(svc, handle, *uri, *n, round * batch, batch));
            times.push(took.as_nanos() as f64 / batch as f64);
        }
    }
    println!(
        "interleaved: {rounds} rounds of {batch} misses per case, median ns per miss and write"
    );
    for chunk in cases.chunks_mut(3) {
        let medians: Vec<f64> = chunk
            .iter_mut()
            .map(|(_, _, _, _, _, times)| {
                times.sort_by(f64::total_cmp);
                times[times.len() / 2]
            })
            .collect();
        for ((kind, n, ..), m) in chunk.iter().zip(&medians) {
            println!(
                "interleaved: {kind:9} {n:>7} entries: {m:>9.0} ns  x{:.2}",
                m / medians[0]
            );
        }
    }
}

/// Invalidates a path of `BIG` entries while misses of another path run one after another;
/// prints how long the invalidation took and the slowest miss meanwhile.
fn invalidation() {
    if !part("invalidation") {
        return;
    }
    let big = env("BIG", 100_000);
    let rt = rt();
    rt.block_on(async {
        let store = MemoryStore::new(4 << 30);
        let (svc, handle) = service(store.clone(), 16);
        fill(&svc, &handle, |i| format!("/big?q={i}"), big).await;
        settle(&store);
        // Misses of another path (each also a write), timed one by one.
        let stop = Arc::new(AtomicBool::new(false));
        let probe = tokio::spawn({
            let (svc, stop) = (svc.clone(), stop.clone());
            async move {
                let (mut slowest, mut n) = (Duration::ZERO, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    get(svc.clone(), format!("/other?q={n}")).await;
                    slowest = slowest.max(t.elapsed());
                    n += 1;
                }
                (slowest, n)
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        let removed = handle.invalidate_path("/big").await.unwrap();
        let took = t.elapsed();
        tokio::time::sleep(Duration::from_millis(20)).await;
        stop.store(true, Ordering::Relaxed);
        let (slowest, misses) = probe.await.unwrap();
        assert_eq!(removed, big as u64);
        println!(
            "invalidation: {big} entries removed in {took:.2?}; slowest of {misses} misses of another path meanwhile {slowest:.2?}"
        );
    });
}

/// `FLOOD` unique queries of one path through a store bounded to 8 MiB: prints the store's
/// counted bytes and the heap the flood left allocated (live bytes, counted by the global
/// allocator), with the layer and once the layer is dropped (the store alone).
fn flood() {
    if !part("flood") {
        return;
    }
    const BOUND: u64 = 8 << 20;
    let n = env("FLOOD", 100_000);
    let rt = rt_one();
    rt.block_on(async {
        let mib = |bytes: usize| bytes as f64 / (1 << 20) as f64;
        let before = LIVE.load(Ordering::Relaxed);
        let store = MemoryStore::new(BOUND);
        // 4 KiB answers: the bound holds about 2,000 of them.
        let (svc, handle) = service(store.clone(), 4096);
        let started = writes(&handle);
        for q in 0..n {
            get(svc.clone(), format!("/flood?q={q}")).await;
            written(&handle, started + q as u64 + 1).await;
        }
        let held = store.used_bytes();
        let all = LIVE.load(Ordering::Relaxed).saturating_sub(before);
        // The layer gone (its coalescing table, counters, tasks), what the store alone holds.
        drop((svc, handle));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let alone = LIVE.load(Ordering::Relaxed).saturating_sub(before);
        println!(
            "flood: {n} unique queries through a {} MiB store: {:.1} MiB counted by the bound; heap +{:.1} MiB with the layer, +{:.1} MiB the store alone",
            BOUND >> 20,
            held as f64 / (1 << 20) as f64,
            mib(all),
            mib(alone),
        );
        drop(store);
    });
}

criterion_group! {
    name = write_group;
    config = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = write_cost
}

fn main() {
    write_group();
    interleaved();
    invalidation();
    flood();
    Criterion::default().configure_from_args().final_summary();
}
