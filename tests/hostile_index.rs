//! Indexes that hostile traffic grows: 200,000 members in one index are invalidated under the
//! default deadlines, in commands that never block Redis for long, while other routes keep
//! being served from Redis.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use common::index::{cli, clone_entry, slowlog, slowlog_from, zcard};
use common::stores::{Backing, Kind};
use common::{get as get_req, get_with, send, wait_until, RedisServer};
use tower_redis_cache::{
    CacheHandle, CacheLayer, Identity, PathPattern, Policy, RedisStore, RequestKey,
};

on_both_stores!(the_variant_bound_refuses_new_variants_until_the_path_is_invalidated);

/// What 200,000 unauthenticated `?q=N` requests leave behind.
const MEMBERS: usize = 200_000;

/// No command may carry more than this many arguments: a slice of at most 250 members (a
/// member and its score each) and the command's own. The commands this replaces carried the
/// whole index (400,000 arguments for 200,000 members).
const MOST_ARGS: usize = 2 * 250 + 4;

/// Nor keep Redis busy longer than this. Bounded commands take a few milliseconds (see
/// RELIABILITY.md); Redis's clock also counts the time its process waits for a core on a
/// loaded machine, hence the margin. The whole-index commands took seconds here.
const LONGEST_COMMAND: Duration = Duration::from_millis(250);

const TTL: Duration = Duration::from_secs(600);

fn app(cache: CacheLayer) -> Router {
    Router::new()
        .route("/items", get(|| async { "items" }))
        .route("/other", get(|| async { "other" }))
        .layer(cache)
}

async fn layer(server: &RedisServer) -> CacheLayer {
    // The default command deadline (500 ms) for invalidations; lookups get 200 ms, out of
    // reach of a loaded machine's hiccups and far below a whole-index command.
    let config = common::relaxed_config(&server.url()).lookup_timeout(Duration::from_millis(200));
    let store = RedisStore::connect(config).await.unwrap();
    CacheLayer::new(store, Policy::bypass())
        .namespace("hx")
        .unwrap()
        // A bound above the test's variants: what the layer stores then (variants past the
        // default bound are not stored).
        .route(
            "/items",
            Policy::shared(TTL).tag("roles").max_variants(300_000),
        )
        .unwrap()
        .route("/other", Policy::shared(TTL))
        .unwrap()
}

/// Stores `/items?q=real` through the layer, then `members` more variants of `/items` beside
/// it, exactly as the layer would have indexed them. Returns the real entry's key.
async fn populate(
    server: &RedisServer,
    app: &Router,
    handle: &CacheHandle,
    members: usize,
) -> String {
    assert_eq!(send(app, get_req("/items?q=real")).await.x_cache(), "MISS");
    let real = handle.key(&RequestKey::new("/items?q=real"));
    // A write may fail on a loaded machine (its deadline passed): ask again until stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cli(server, &["EXISTS", &real]).trim() != "1" {
        assert!(
            std::time::Instant::now() < deadline,
            "the real entry never got stored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        send(app, get_req("/items?q=real")).await;
    }
    let keys: Vec<String> = (0..members)
        .map(|i| handle.key(&RequestKey::new(format!("/items?q={i}"))))
        .collect();
    clone_entry(server, "hx", &real, &keys, TTL);
    let biggest = server
        .keys("hx:ix:*")
        .iter()
        .map(|ix| zcard(server, ix))
        .max()
        .unwrap_or(0);
    assert!(biggest > members as u64, "{biggest}");
    real
}

/// Sends `/other` in a loop until stopped; counts its answers that were not hits.
struct Hits {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Hits {
    async fn start(app: &Router) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (app, stop, sent) = (app.clone(), stop.clone(), sent.clone());
            async move {
                let mut not_hits = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let r = send(&app, get_req("/other")).await;
                    if r.x_cache() != "HIT" {
                        not_hits.push(format!("{} {}", r.status, r.x_cache()));
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                }
                not_hits
            }
        });
        let first = sent.clone();
        wait_until("hits started", move || first.load(Ordering::SeqCst) > 0).await;
        Hits { stop, sent, task }
    }

    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let not_hits = self.task.await.unwrap();
        (self.sent.load(Ordering::SeqCst), not_hits)
    }
}

/// Invalidating a tag, a route or a path of 200,000 entries completes under the default
/// deadlines, in commands that never carry more than a slice of the index nor block Redis
/// long, while `/other` keeps being served from Redis; the real entry is gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_an_index_of_200_000_members_is_bounded() {
    invalidations(MEMBERS, &["tag", "route", "path"]).await;
}

/// Patterns (the path registry scanned, then each path's index) and `clear` (SCAN of the
/// namespace) under the same rules, on 20,000 entries (the commands are the same at any
/// size past one slice; the test is cheaper).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_and_clear_are_bounded_too() {
    invalidations(MEMBERS / 10, &["pattern", "clear"]).await;
}

/// The large invalidation tests run one at a time: together they load a 2-core machine
/// enough to push a write past its deadline.
static LARGE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn invalidations(members: usize, kinds: &[&str]) {
    let _one_at_a_time = LARGE.lock().await;
    let server = RedisServer::start();
    let cache = layer(&server).await;
    let handle = cache.handle();
    let app = app(cache);
    assert_eq!(send(&app, get_req("/other")).await.x_cache(), "MISS");
    wait_until("stored", || handle.stats().stored == 1).await;
    assert_eq!(send(&app, get_req("/other")).await.x_cache(), "HIT");

    for kind in kinds {
        let real = populate(&server, &app, &handle, members).await;
        // Every command, to see the arguments of each.
        slowlog_from(&server, 0);
        let hits = Hits::start(&app).await;
        let started = std::time::Instant::now();
        let removed = match *kind {
            "tag" => handle.invalidate_tag("roles").await,
            "route" => handle.invalidate_route("/items").await,
            "path" => handle.invalidate_path("/items").await,
            "pattern" => {
                handle
                    .invalidate_pattern(&PathPattern::glob("/item*"))
                    .await
            }
            _ => handle.clear().await,
        };
        let took = started.elapsed();
        let (sent, not_hits) = hits.stop().await;
        let removed = removed.unwrap_or_else(|e| panic!("{kind}: {e}"));
        let clear = *kind == "clear";
        assert_eq!(removed, members as u64 + 1 + u64::from(clear), "{kind}");
        let slow = slowlog(&server);
        let longest = slow.first().cloned().unwrap_or_default();
        assert!(
            longest.took < LONGEST_COMMAND,
            "{kind}: {longest:?}; slowest: {:?}",
            &slow[..slow.len().min(5)]
        );
        let widest = slow
            .iter()
            .max_by_key(|s| s.args)
            .cloned()
            .unwrap_or_default();
        assert!(widest.args <= MOST_ARGS, "{kind}: {widest:?}");
        if !clear {
            assert!(
                not_hits.is_empty(),
                "{kind}: {sent} sent, not hits: {not_hits:?}"
            );
        }
        assert!(!server.keys("hx:v1:*").contains(&real), "{kind}");
        assert_eq!(
            send(&app, get_req("/items?q=real")).await.x_cache(),
            "MISS",
            "{kind}"
        );
        println!(
            "{kind}: {removed} removed in {took:?}, {} commands, slowest {:?}, widest {widest:?}, \
             {sent} hits meanwhile",
            slow.len(),
            &slow[..slow.len().min(3)],
        );
        // The next round starts from the real entry again.
        handle.invalidate_path("/items").await.unwrap();
    }
}

/// An invalidation that Redis stops part-way (here: a user who may not run ZREM, so the
/// first page's entries are removed and then the index cannot be cleaned) says how many
/// entries it removed, keeps them removed, and leaves the others indexed: run again by a
/// user who may, it removes exactly the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_invalidation_says_what_it_removed_and_a_retry_finishes() {
    let server = RedisServer::start();
    let cache = layer(&server).await;
    let handle = cache.handle();
    let app = app(cache);
    let members = 5_000;
    populate(&server, &app, &handle, members).await;
    cli(
        &server,
        &[
            "ACL", "SETUSER", "nozrem", "on", ">pw", "~*", "&*", "+@all", "-zrem",
        ],
    );
    let url = format!("redis://nozrem:pw@127.0.0.1:{}", server.port());
    let store = RedisStore::connect(common::relaxed_config(&url))
        .await
        .unwrap();
    let limited = CacheLayer::new(store, Policy::bypass())
        .namespace("hx")
        .unwrap()
        .handle();

    let e = limited.invalidate_tag("roles").await.unwrap_err();
    let removed = e.removed().expect("a count of what was removed");
    assert!(removed > 0 && removed < members as u64, "{removed}");
    let message = e.to_string();
    assert!(
        message.contains(&format!("{removed} entries removed")) && message.contains("again"),
        "{message}"
    );
    let left = server.keys("hx:v1:*").len() as u64;
    assert_eq!(left, members as u64 + 1 - removed);

    let rest = handle.invalidate_tag("roles").await.unwrap();
    assert_eq!(rest, left);
    assert!(server.keys("hx:v1:*").is_empty());
    assert_eq!(send(&app, get_req("/items?q=real")).await.x_cache(), "MISS");
}

/// `Policy::max_variants`: past the bound a path's new variants are answered but not stored,
/// and counted; stored variants are rewritten as usual; other paths and other callers have
/// bounds of their own; invalidating the path resets it (and counts only entries).
async fn the_variant_bound_refuses_new_variants_until_the_path_is_invalidated(kind: Kind) {
    let backing = Backing::start(kind);
    let cache = CacheLayer::new(backing.store().await, Policy::bypass())
        .namespace("cap")
        .unwrap()
        .identity(Identity::header(http::HeaderName::from_static("x-user")))
        .route("/s/{k}", Policy::shared(TTL).max_variants(3))
        .unwrap()
        .route("/menu", Policy::per_user(TTL).max_variants(1))
        .unwrap();
    let handle = cache.handle();
    let app = Router::new()
        .route("/s/{k}", get(|| async { "s" }))
        .route("/menu", get(|| async { "menu" }))
        .layer(cache);
    let stats = || handle.stats();
    let get = |uri: &str| send(&app, get_req(uri));

    for q in 1..=3 {
        assert_eq!(get(&format!("/s/a?q={q}")).await.x_cache(), "MISS");
    }
    wait_until("stored", || stats().stored == 3).await;
    // The fourth variant of /s/a: answered, not stored, counted (twice: asked twice).
    for expected in 1..=2 {
        let r = get("/s/a?q=4").await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
        wait_until("refused", || stats().variants_refused == expected).await;
    }
    assert_eq!(stats().stored, 3);
    assert_eq!(get("/s/a?q=1").await.x_cache(), "HIT");
    // A stored variant is rewritten as usual (here after its entry alone was removed).
    assert_eq!(
        handle
            .invalidate(&RequestKey::new("/s/a?q=2"))
            .await
            .unwrap(),
        1
    );
    assert_eq!(get("/s/a?q=2").await.x_cache(), "MISS");
    wait_until("rewritten", || stats().stored == 4).await;
    assert_eq!(get("/s/a?q=2").await.x_cache(), "HIT");
    // Another path of the route has a bound of its own.
    assert_eq!(get("/s/b?q=4").await.x_cache(), "MISS");
    wait_until("other path", || stats().stored == 5).await;
    // So does every caller of a per-user route.
    let menu =
        |user: &str, v: u32| send(&app, get_with(&format!("/menu?v={v}"), &[("x-user", user)]));
    menu("ann", 1).await;
    wait_until("ann's first", || stats().stored == 6).await;
    menu("ann", 2).await;
    wait_until("ann's second refused", || stats().variants_refused == 3).await;
    menu("bob", 2).await;
    wait_until("bob's first", || stats().stored == 7).await;
    assert_eq!(stats().variants_refused, 3);

    // Invalidating the path removes its three entries (the variant set is not an entry)
    // and resets the bound.
    assert_eq!(handle.invalidate_path("/s/a").await.unwrap(), 3);
    assert_eq!(get("/s/a?q=4").await.x_cache(), "MISS");
    wait_until("stored after the reset", || stats().stored == 8).await;
    assert_eq!(get("/s/a?q=4").await.x_cache(), "HIT");
    // So does invalidating the user, for their own bound only.
    assert_eq!(handle.invalidate_user("ann").await.unwrap(), 1);
    menu("ann", 2).await;
    wait_until("ann's second stored", || stats().stored == 9).await;
    assert_eq!(stats().variants_refused, 3);
    assert!(
        backing.keys("cap:ix:v:*").len() >= 3,
        "{:?}",
        backing.keys("cap:*")
    );
}

/// `maxmemory-policy noeviction` with unique query strings: the cache stops writing well
/// before Redis is full (paused writes counted, clients never see an error, the handler
/// answers), and once Redis is full (filled by someone else) an invalidation still succeeds
/// and the stale entry is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_stops_cache_writes_and_still_invalidates() {
    let max: u64 = 8 << 20;
    let server = RedisServer::start_with(
        &[
            "--maxmemory".into(),
            max.to_string(),
            "--maxmemory-policy".into(),
            "noeviction".into(),
        ],
        false,
    );
    let store = RedisStore::connect(common::relaxed_config(&server.url()))
        .await
        .unwrap();
    let cache = CacheLayer::new(store, Policy::bypass())
        .namespace("oom")
        .unwrap()
        .route("/data", Policy::shared(TTL).tag("data"))
        .unwrap()
        .route("/fill", Policy::shared(TTL).max_variants(1_000_000))
        .unwrap();
    let handle = cache.handle();
    let version = Arc::new(AtomicU64::new(1));
    let v = version.clone();
    let app = Router::new()
        .route(
            "/data",
            get(move || {
                let v = v.load(Ordering::SeqCst);
                async move { format!("data v{v}") }
            }),
        )
        .route("/fill", get(|| async { "f".repeat(4096) }))
        .layer(cache);
    let used = || {
        server
            .info("memory")
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("used_memory")
    };

    assert_eq!(send(&app, get_req("/data")).await.x_cache(), "MISS");
    wait_until("stored", || handle.stats().stored == 1).await;
    assert_eq!(send(&app, get_req("/data")).await.text(), "data v1");

    // Unique query strings, 50 at a time, until the cache stops writing.
    let mut q = 0;
    while handle.stats().writes_paused == 0 {
        assert!(q < 20_000, "writes never paused; used {} of {max}", used());
        for _ in 0..50 {
            q += 1;
            let r = send(&app, get_req(&format!("/fill?q={q}"))).await;
            assert_eq!((r.status.as_u16(), r.body.len()), (200, 4096));
        }
        // Every write answered (`/data`'s too) before the next 50.
        wait_until("writes settled", || {
            let s = handle.stats();
            s.stored + s.writes_paused + s.write_errors > q
        })
        .await;
    }
    let stats = handle.stats();
    assert_eq!(
        stats.write_errors, 0,
        "the cache stopped before Redis refused: {stats:?}"
    );
    assert!(used() < max, "{} of {max}", used());
    // Writes stay paused while Redis is that full.
    let stored = handle.stats().stored;
    for _ in 0..100 {
        q += 1;
        let r = send(&app, get_req(&format!("/fill?q={q}"))).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    }
    wait_until("paused", || {
        let s = handle.stats();
        s.stored + s.writes_paused + s.write_errors > q
    })
    .await;
    assert_eq!(handle.stats().stored, stored);

    // Someone else fills Redis past its bound (here: the bound lowered under what it holds,
    // which leaves no doubt): every command that needs memory is refused.
    cli(
        &server,
        &["CONFIG", "SET", "maxmemory", &(used() / 2).to_string()],
    );
    assert!(cli(&server, &["SET", "someone", "else"]).starts_with("OOM"));
    assert!(cli(&server, &["INCR", "oom:seq"]).starts_with("OOM"));

    // The data changes: the invalidation succeeds on a full Redis, the stale entry is gone.
    version.store(2, Ordering::SeqCst);
    assert_eq!(handle.invalidate_tag("data").await.unwrap(), 1);
    let r = send(&app, get_req("/data")).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "data v2"));
    assert_eq!(handle.invalidate_path("/data").await.unwrap(), 0);
    // Requests are still answered, none stored.
    for i in 0..20 {
        let r = send(&app, get_req(&format!("/fill?q=full{i}"))).await;
        assert_eq!(r.status, 200);
    }
}
