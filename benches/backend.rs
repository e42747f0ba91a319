//! The example service (`examples/backend.rs`) on its real database, over loopback HTTP, with
//! the cache off, on Redis, and in the process (`CACHE_STORE=memory`): on SQLite, and on
//! PostgreSQL when a server answers. Prints, per database, the seed and the time of the
//! permissions queries straight from the database, then req/s, p50/p99 and the share of hits
//! for three workloads on `/users/{id}/permissions`:
//!
//! - `hits`: 200 users, each asked for again and again (cached after the first request);
//! - `misses`: every request a user not asked for before (a cache miss for every request);
//! - `mix 1% writes`: `hits`, with one request in a hundred a `PUT /users/{id}/roles` by the
//!   administrator, which commits and invalidates that user's entries (their next read is a
//!   miss).
//!
//! `off p50 / p50` is the ratio the issue asks for: uncached p50 against this contender's.
//!
//! `cargo bench --bench backend` (`SECS` per run, default 2; `ROUNDS`, default 2, contenders
//! alternated each round; `CONNS`, comma-separated keep-alive connection counts, default
//! `1,16`; `DBS`, default `sqlite,postgres`; `BENCH_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`, a server on which it creates, and then
//! drops, a database of its own). It starts its own redis-server, and the example as three
//! processes of this binary per database. Loopback only; every run is bounded by `SECS`.

#[path = "../tests/common/mod.rs"]
mod common;

#[allow(dead_code)]
#[path = "../examples/backend.rs"]
mod backend;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::load::percentiles;

/// The contenders: the same example process, configured by its environment.
const CONTENDERS: [(&str, &[(&str, &str)]); 3] = [
    ("off", &[("CACHE_ENABLED", "false")]),
    ("redis", &[("CACHE_STORE", "redis")]),
    ("memory", &[("CACHE_STORE", "memory")]),
];
/// Users of the `hits` and `mix` workloads.
const WARM: u64 = 200;
/// The first user of the `misses` workload; each is asked for once, up to the seed's last.
const FIRST_MISS: u64 = 1_000;

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(exe: &std::path::Path, env: &[(&str, &str)], db_url: &str, redis_port: u16) -> Server {
    let port = free_port();
    let mut cmd = Command::new(exe);
    cmd.env("BACKEND_BENCH_SERVE", "1")
        .env("BIND", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", db_url)
        .env("REDIS_HOST", "127.0.0.1")
        .env("REDIS_PORT", redis_port.to_string())
        // A loaded machine's hiccups are not Redis failures.
        .env("REDIS_LOOKUP_TIMEOUT_MS", "200")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the example exited at start: {status}");
        }
        assert!(Instant::now() < deadline, "the example did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, addr }
}

/// One answer: status, whether it was a cache hit, and how long it took.
struct Answer {
    status: u16,
    hit: bool,
    took: Duration,
}

/// The shared keep-alive client, with the example's bearer tokens.
struct Conn(common::load::Conn);

impl Conn {
    fn new(addr: SocketAddr) -> Self {
        Conn(common::load::Conn::new(addr))
    }

    async fn send(&mut self, method: &str, path: &str, token: &str, body: &str) -> Option<Answer> {
        let bearer = format!("Bearer {token}");
        let headers = [("authorization", bearer.as_str())];
        let reply = self.0.request(method, path, &headers, body).await.ok()?;
        Some(Answer {
            status: reply.status,
            hit: reply.hit,
            took: reply.took,
        })
    }
}

/// Request `i` of a workload: method, path, token, body.
type Workload = fn(u64) -> (&'static str, String, String, String);

fn read(user: u64) -> (&'static str, String, String, String) {
    (
        "GET",
        format!("/users/{user}/permissions"),
        format!("user-{user}"),
        String::new(),
    )
}

fn workloads() -> Vec<(&'static str, Workload)> {
    vec![
        ("hits", |i| read(i % WARM + 1)),
        ("misses", read),
        ("mix 1% writes", |i| {
            if i % 100 == 0 {
                let user = (i / 100) % WARM + 1;
                let roles = if (i / 100 / WARM) % 2 == 0 {
                    r#"{"roles":["viewer","editor"]}"#
                } else {
                    r#"{"roles":["viewer"]}"#
                };
                (
                    "PUT",
                    format!("/users/{user}/roles"),
                    "admin".to_owned(),
                    roles.to_owned(),
                )
            } else {
                read(i % WARM + 1)
            }
        }),
    ]
}

/// What one contender did in one workload, over its runs.
#[derive(Default)]
struct Tally {
    ok: u64,
    reads: u64,
    hits: u64,
    errors: u64,
    secs: f64,
    latencies: Vec<Duration>,
}

/// Drives `addr` with `conns` connections for `secs`, request numbers from `counter` (up
/// to `limit`).
async fn drive(
    addr: SocketAddr,
    workload: Workload,
    conns: usize,
    secs: Duration,
    counter: Arc<AtomicU64>,
    limit: u64,
    tally: &mut Tally,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (stop, counter, shared) = (stop.clone(), counter.clone(), shared.clone());
            tokio::spawn(async move {
                let mut conn = Conn::new(addr);
                let mut mine = Tally::default();
                while !stop.load(Ordering::Relaxed) {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    if i >= limit {
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                    let (method, path, token, body) = workload(i);
                    match conn.send(method, &path, &token, &body).await {
                        Some(a) if a.status == 200 || a.status == 204 => {
                            mine.ok += 1;
                            if method == "GET" {
                                mine.reads += 1;
                                mine.hits += u64::from(a.hit);
                            }
                            mine.latencies.push(a.took);
                        }
                        _ => mine.errors += 1,
                    }
                }
                let mut all = shared.lock().unwrap();
                all.ok += mine.ok;
                all.reads += mine.reads;
                all.hits += mine.hits;
                all.errors += mine.errors;
                all.latencies.append(&mut mine.latencies);
            })
        })
        .collect();
    let deadline = tokio::time::sleep(secs);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if stop.load(Ordering::Relaxed) { break; }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let mut all = std::mem::take(&mut *shared.lock().unwrap());
    tally.ok += all.ok;
    tally.reads += all.reads;
    tally.hits += all.hits;
    tally.errors += all.errors;
    tally.secs += started.elapsed().as_secs_f64();
    tally.latencies.append(&mut all.latencies);
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A database of the benchmark's own on a PostgreSQL server, dropped at the end.
struct PgDatabase {
    server: String,
    name: String,
}

async fn pg_run(server: &str, sql: String) -> Result<(), sqlx::Error> {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::postgres::PgConnection::connect(server).await?;
    conn.execute(sqlx::AssertSqlSafe(sql)).await?;
    Ok(())
}

impl PgDatabase {
    fn url(&self) -> String {
        let after_scheme = self.server.find("://").map_or(0, |i| i + 3);
        let base = match self.server[after_scheme..].find(['/', '?']) {
            Some(i) => &self.server[..after_scheme + i],
            None => &self.server,
        };
        format!("{base}/{}", self.name)
    }
}

fn main() {
    if std::env::var_os("BACKEND_BENCH_SERVE").is_some() {
        if let Err(e) = backend::main() {
            eprintln!("example: {e}");
            std::process::exit(1);
        }
        return;
    }
    let secs = Duration::from_secs(env_or("SECS", 2));
    let rounds: usize = env_or("ROUNDS", 2);
    let conns: Vec<usize> = std::env::var("CONNS")
        .unwrap_or_else(|_| "1,16".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let dbs = std::env::var("DBS").unwrap_or_else(|_| "sqlite,postgres".into());
    let pg_server = std::env::var("BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let redis = common::RedisServer::start();
    let exe = std::env::current_exe().unwrap();
    println!(
        "backend: examples/backend.rs over loopback HTTP, {} s per run, {rounds} rounds, contenders alternated; nproc {}, load average {}",
        secs.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split(' ')
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    for db_kind in dbs.split(',').map(str::trim) {
        let sqlite_file =
            std::env::temp_dir().join(format!("trc-bench-backend-{}.db", std::process::id()));
        let pg = match db_kind {
            "sqlite" => None,
            "postgres" => {
                let db = PgDatabase {
                    server: pg_server.clone(),
                    name: format!("trc_bench_backend_{}", std::process::id()),
                };
                match rt.block_on(pg_run(&db.server, format!("CREATE DATABASE {}", db.name))) {
                    Ok(()) => Some(db),
                    Err(e) => {
                        println!("\npostgres: skipped ({pg_server}: {e})");
                        continue;
                    }
                }
            }
            other => {
                println!("\n{other}: unknown database (sqlite or postgres)");
                continue;
            }
        };
        let url = match &pg {
            Some(db) => db.url(),
            None => format!("sqlite://{}?mode=rwc", sqlite_file.display()),
        };

        // Seed, and time the permissions queries in this process (no HTTP, no cache).
        rt.block_on(async {
            let (db, seeded) = backend::db::Db::open(&url, Duration::ZERO).await.unwrap();
            if let Some(s) = seeded {
                let rows: Vec<String> = s.rows.iter().map(|(t, n)| format!("{t} {n}")).collect();
                println!(
                    "\n{db_kind}: seeded in {:.2?}: {}",
                    s.took,
                    rows.join(", ")
                );
            }
            let mut took = Vec::new();
            for user in 0..60u64 {
                let started = Instant::now();
                db.query_access((user * 331) as i64 % 20_000 + 1).await.unwrap();
                took.push(started.elapsed());
            }
            let (p50, p99, max) = percentiles(&mut took[10..]);
            println!(
                "{db_kind}: the permissions queries of one user, straight from the database: p50 {p50:.2?}, p99 {p99:.2?}, max {max:.2?} (50 users)"
            );
        });

        let servers: Vec<Server> = CONTENDERS
            .iter()
            .map(|(name, env)| {
                let namespace = format!("bench-{db_kind}-{name}");
                let mut env = env.to_vec();
                env.push(("CACHE_NAMESPACE", &namespace));
                start(&exe, &env, &url, redis.port())
            })
            .collect();
        println!(
            "{:<8} | {:<14} | {:>5} | {:<7} | {:>8} {:>9} {:>9} | {:>6} | {:>13}",
            "database",
            "workload",
            "conns",
            "cache",
            "req/s",
            "p50",
            "p99",
            "hits",
            "off p50 / p50"
        );
        let misses = Arc::new(AtomicU64::new(FIRST_MISS));
        for (name, workload) in workloads() {
            for &c in &conns {
                let mut tallies: Vec<Tally> = CONTENDERS.iter().map(|_| Tally::default()).collect();
                for round in 0..rounds {
                    for k in 0..CONTENDERS.len() {
                        let k = if round % 2 == 0 {
                            k
                        } else {
                            CONTENDERS.len() - 1 - k
                        };
                        let addr = servers[k].addr;
                        let (counter, limit) = if name == "misses" {
                            (misses.clone(), backend::db::USERS as u64 + 1)
                        } else {
                            (Arc::new(AtomicU64::new(1)), u64::MAX)
                        };
                        if name != "misses" && k > 0 {
                            // Warm: every user once, then a pause for the stores.
                            rt.block_on(async {
                                let mut conn = Conn::new(addr);
                                for u in 1..=WARM {
                                    let (m, p, t, b) = read(u);
                                    let _ = conn.send(m, &p, &t, &b).await;
                                }
                                tokio::time::sleep(Duration::from_millis(300)).await;
                            });
                        }
                        rt.block_on(drive(
                            addr,
                            workload,
                            c,
                            secs,
                            counter,
                            limit,
                            &mut tallies[k],
                        ));
                    }
                }
                let p50s: Vec<Duration> = tallies
                    .iter_mut()
                    .map(|t| percentiles(&mut t.latencies).0)
                    .collect();
                for (k, t) in tallies.iter_mut().enumerate() {
                    let (p50, p99, _) = percentiles(&mut t.latencies);
                    let ratio = p50s[0].as_secs_f64() / p50.as_secs_f64().max(1e-9);
                    println!(
                        "{:<8} | {:<14} | {:>5} | {:<7} | {:>8.0} {:>9.2?} {:>9.2?} | {:>5.1}% | {:>13}{}",
                        db_kind,
                        name,
                        c,
                        CONTENDERS[k].0,
                        t.ok as f64 / t.secs.max(1e-9),
                        p50,
                        p99,
                        100.0 * t.hits as f64 / t.reads.max(1) as f64,
                        if k == 0 { "1.00".to_owned() } else { format!("{ratio:.1}") },
                        if t.errors > 0 {
                            format!("  ({} errors)", t.errors)
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
        drop(servers);
        if let Some(db) = pg {
            let drop_db = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", db.name);
            if let Err(e) = rt.block_on(pg_run(&db.server, drop_db)) {
                println!("postgres: database {} not dropped: {e}", db.name);
            }
        } else {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", sqlite_file.display()));
            }
        }
    }
}
