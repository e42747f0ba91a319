//! Runs `examples/backend.rs` as a process (built by `cargo test`) against a redis-server of
//! its own, over loopback HTTP, including a Redis outage. Its database is a SQLite file of
//! each process's own (in the redis-server's folder), and once PostgreSQL: a database of the
//! test's own on the server `TEST_POSTGRES_URL` names (`.ci/run` sets it when a server
//! answers; the test says it is skipped otherwise).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::RedisServer;
use serde_json::Value;

struct Backend {
    child: Child,
    port: u16,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn example_binary() -> PathBuf {
    example("backend")
}

fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/example-<hash> → target/<profile>/examples/<name>
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(n, _)| n == name) {
        return p.clone();
    }
    let build = || {
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().and_then(|d| d.parent()).unwrap();
        let bin = dir.join("examples").join(name);
        // `cargo test` builds examples first; `cargo test --test example` does not, and
        // may find a binary older than its source: build it then (never otherwise, since
        // a nested cargo could wait on the outer one's lock).
        let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(format!("{name}.rs"));
        let lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        // The example's own modules, if it has some (examples/backend/db.rs).
        let modules = source.with_extension("");
        let newest_src = [lib, modules]
            .iter()
            .flat_map(std::fs::read_dir)
            .flatten()
            .flatten()
            .filter_map(|e| modified(&e.path()))
            .chain(modified(&source))
            .max();
        if modified(&bin).is_none() || modified(&bin) < newest_src {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--example", name])
                .status()
                .unwrap();
            assert!(status.success(), "building the example failed");
        }
        assert!(bin.exists(), "{} is missing", bin.display());
        bin
    };
    let path = build();
    built.push((name.to_owned(), path.clone()));
    path
}

fn start_backend(redis: &RedisServer, extra: &[(&str, &str)]) -> Backend {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A SQLite file of this process's own, removed with the redis-server's folder.
    let db = redis.dir().join(format!("backend-{port}.db"));
    let mut cmd = Command::new(example_binary());
    cmd.env_clear()
        .env("BIND", format!("127.0.0.1:{port}"))
        .env(
            "DATABASE_URL",
            format!("sqlite://{}?mode=rwc", db.display()),
        )
        .env("REDIS_HOST", "127.0.0.1")
        .env("REDIS_PORT", redis.port().to_string())
        .env("APP_ENV", "test")
        .env("RUST_LOG", "warn")
        // Out of reach of a loaded machine's hiccups, below the outage test's 1 s bound.
        .env("REDIS_LOOKUP_TIMEOUT_MS", "200")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut backend = Backend {
        child: cmd.spawn().unwrap(),
        port,
    };
    // It seeds its database before it listens: a second or two, more on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = backend.child.try_wait() {
            panic!("backend exited at start: {status}");
        }
        assert!(Instant::now() < deadline, "backend did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    backend
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn db_reads(&self) -> u64 {
        self.body["db_reads"].as_u64().unwrap_or(0)
    }
}

/// A minimal HTTP/1.1 client: one request per connection.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let own_host = headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host"));
    let host = if own_host { "" } else { "Host: localhost\r\n" };
    let mut req = format!("{method} {path} HTTP/1.1\r\n{host}Connection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let body = serde_json::from_str(rest).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
    }
}

fn bearer(user: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer user-{user}"))
}

fn get(port: u16, path: &str, user: Option<&str>) -> Reply {
    match user.map(bearer) {
        Some((n, v)) => http(port, "GET", path, &[(n, &v)], ""),
        None => http(port, "GET", path, &[], ""),
    }
}

/// GETs until the reply is a hit (the write is off the response path), within 10 s.
fn until_hit(port: u16, path: &str, user: Option<&str>) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(port, path, user);
        if r.header("x-cache") == Some("HIT") {
            return r;
        }
        assert!(Instant::now() < deadline, "{path} never became a hit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn backend_caches_per_user_and_invalidates_on_role_change() {
    let redis = RedisServer::start();
    let b = start_backend(&redis, &[]);
    caches_per_user_and_invalidates_on_role_change(b.port, "connected");
}

/// The same service and checks with `CACHE_STORE=memory`, and no Redis anywhere.
#[test]
fn backend_with_the_memory_store_caches_and_invalidates_without_redis() {
    let nowhere = RedisServer::unstarted();
    let b = start_backend(&nowhere, &[("CACHE_STORE", "memory")]);
    caches_per_user_and_invalidates_on_role_change(b.port, "not used");
}

fn caches_per_user_and_invalidates_on_role_change(p: u16, redis_health: &str) {
    let first = get(p, "/users/1/permissions", Some("1"));
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(first.body["permissions"], serde_json::json!(["read"]));
    // Misses sent while the first write was in flight may store again; once settled, hits
    // repeat the stored body and never read the database.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut hit = until_hit(p, "/users/1/permissions", Some("1"));
    loop {
        let again = until_hit(p, "/users/1/permissions", Some("1"));
        if again.db_reads() == hit.db_reads() {
            break;
        }
        assert!(Instant::now() < deadline, "hits never settled");
        hit = again;
    }
    for _ in 0..5 {
        let r = get(p, "/users/1/permissions", Some("1"));
        assert_eq!(
            r.db_reads(),
            hit.db_reads(),
            "a hit does not read the database"
        );
    }

    // Another user, or nobody, never gets user 1's entry.
    assert_eq!(get(p, "/users/1/permissions", Some("2")).status, 403);
    assert_eq!(get(p, "/users/1/permissions", None).status, 401);
    assert_eq!(
        get(p, "/users/1/permissions", None).header("x-cache"),
        Some("BYPASS")
    );
    assert_eq!(
        http(p, "GET", "/roles", &[("authorization", "Bearer nope")], "").status,
        401
    );

    // A role change invalidates permissions and menu before it answers.
    until_hit(p, "/users/1/menu", Some("1"));
    let (n, v) = bearer("1");
    let put = http(
        p,
        "PUT",
        "/users/1/roles",
        &[(n, &v)],
        r#"{"roles":["admin"]}"#,
    );
    assert_eq!(put.status, 204);
    let after = get(p, "/users/1/permissions", Some("1"));
    assert_eq!(after.header("x-cache"), Some("MISS"));
    assert_eq!(
        after.body["permissions"],
        serde_json::json!(["read", "write", "delete", "manage_users"])
    );
    let menu = get(p, "/users/1/menu", Some("1"));
    assert_eq!(menu.header("x-cache"), Some("MISS"));
    assert!(menu.body["menu"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == "admin"));

    // Shared routes; query order does not matter.
    let roles = get(p, "/roles", None);
    assert_eq!(roles.status, 200);
    until_hit(p, "/roles", None);
    get(p, "/prompts/welcome?lang=en&version=2", None);
    let r = until_hit(p, "/prompts/welcome?version=2&lang=en", None);
    assert_eq!(r.body["text"], "[en v2] prompt welcome");

    // Operators invalidate by tag, pattern, path or user; only the administrator may.
    let admin = [("authorization", "Bearer admin")];
    let post = |headers: &[(&str, &str)], body: &str| {
        http(p, "POST", "/admin/cache/invalidate", headers, body)
    };
    let r = post(&admin, r#"{"tag":"roles"}"#);
    assert_eq!(
        (r.status, &r.body),
        (200, &serde_json::json!({"removed": 1}))
    );
    assert_eq!(get(p, "/roles", None).header("x-cache"), Some("MISS"));
    let r = post(&admin, r#"{"pattern":"/prompts/*"}"#);
    assert_eq!(
        (r.status, &r.body),
        (200, &serde_json::json!({"removed": 1}))
    );
    let (n, v) = bearer("1");
    assert_eq!(post(&[(n, &v)], r#"{"tag":"roles"}"#).status, 403);
    assert_eq!(post(&[], r#"{"tag":"roles"}"#).status, 401);
    assert_eq!(post(&admin, r#"{"tag":"a","user":"1"}"#).status, 422);
    assert_eq!(
        http(
            p,
            "PUT",
            "/users/1/roles",
            &[(n, &v)],
            r#"{"roles":["viewer"]}"#
        )
        .status,
        204
    );
    let (n2, v2) = bearer("2");
    assert_eq!(
        http(
            p,
            "PUT",
            "/users/1/roles",
            &[(n2, &v2)],
            r#"{"roles":["admin"]}"#
        )
        .status,
        403
    );

    let h = get(p, "/health", None);
    assert_eq!(h.body["status"], "ok");
    assert_eq!(h.body["env"], "test");
    assert_eq!(h.body["redis"], redis_health);
    assert_eq!(h.body["breaker"], "closed");
}

#[test]
fn backend_answers_while_redis_is_down_and_recovers() {
    let mut redis = RedisServer::start();
    let b = start_backend(&redis, &[]);
    let p = b.port;
    get(p, "/roles", None);
    until_hit(p, "/roles", None);

    redis.kill();
    for _ in 0..5 {
        let started = Instant::now();
        let r = get(p, "/roles", None);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cache"), Some("MISS"));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    let h = get(p, "/health", None);
    assert_eq!(h.status, 200);
    assert_eq!(h.body["status"], "ok");
    assert_eq!(h.body["redis"], "unavailable");
    let u = get(p, "/users/3/menu", Some("3"));
    assert_eq!(u.status, 200);

    redis.restart();
    until_hit(p, "/roles", None);
    assert_eq!(get(p, "/health", None).body["redis"], "connected");
}

#[test]
fn backend_starts_without_redis_and_without_cache() {
    let mut redis = RedisServer::unstarted();
    let b = start_backend(&redis, &[]);
    let r = get(b.port, "/roles", None);
    assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
    assert_eq!(get(b.port, "/health", None).body["redis"], "unavailable");
    redis.restart();
    until_hit(b.port, "/roles", None);

    let plain = start_backend(&redis, &[("CACHE_ENABLED", "false")]);
    let r1 = get(plain.port, "/roles", None);
    let r2 = get(plain.port, "/roles", None);
    assert_eq!(r1.header("x-cache"), None);
    assert_eq!(r2.db_reads(), r1.db_reads() + 1);
    assert_eq!(get(plain.port, "/health", None).body["redis"], "disabled");
}

/// The roles a `GET /users/{id}/permissions` answer shows.
fn roles_of(r: &Reply) -> Vec<String> {
    r.body["roles"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

const ADMIN: (&str, &str) = ("authorization", "Bearer admin");

/// While three readers keep asking for `user`'s permissions (so that misses are reading the
/// database when a write commits), the administrator changes that user's roles back and
/// forth through the database. Every answer to a request sent after a change was answered
/// (and before the next change began) shows that change, never a response cached from
/// before it; the writer's own next read too. Then a change of a role's permissions reaches
/// every user's cached permissions and `/roles`, and refused writes change nothing.
fn writes_are_never_followed_by_older_responses(p: u16, user: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let path = format!("/users/{user}/permissions");
    let first = until_hit(p, &path, Some(user));
    assert_eq!(roles_of(&first), ["viewer"], "{:?}", first.body);

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (stop, path, user) = (stop.clone(), path.clone(), user.to_owned());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let r = get(p, &path, Some(&user));
                    assert_eq!(r.status, 200, "{:?}", r.body);
                    let hit = r.header("x-cache") == Some("HIT");
                    seen.push((sent, Instant::now(), roles_of(&r), hit));
                }
                seen
            })
        })
        .collect();

    // (began, answered, roles) of every write.
    let mut writes: Vec<(Instant, Instant, Vec<String>)> = Vec::new();
    for i in 0..20u64 {
        let roles: &[&str] = if i % 2 == 0 {
            &["viewer", "editor"]
        } else {
            &["viewer"]
        };
        let began = Instant::now();
        let body = serde_json::json!({ "roles": roles }).to_string();
        let put = http(p, "PUT", &format!("/users/{user}/roles"), &[ADMIN], &body);
        let answered = Instant::now();
        assert_eq!(put.status, 204, "write {i}: {:?}", put.body);
        let after = get(p, &path, Some(user));
        assert_eq!(
            roles_of(&after),
            roles,
            "write {i}: the writer's next read (x-cache {:?})",
            after.header("x-cache")
        );
        writes.push((
            began,
            answered,
            roles.iter().map(|r| r.to_string()).collect(),
        ));
        // The next write at another moment of the refill (misses in flight, or hits).
        std::thread::sleep(Duration::from_millis(5 + 23 * (i % 5)));
    }
    stop.store(true, Ordering::Relaxed);
    let (mut checked, mut hits) = (0, 0);
    for reader in readers {
        for (sent, received, roles, hit) in reader.join().unwrap() {
            let Some(last) = writes.iter().rposition(|w| w.1 < sent) else {
                continue;
            };
            if writes.get(last + 1).is_some_and(|next| next.0 < received) {
                continue; // the next write was under way: either state is right
            }
            assert_eq!(
                roles,
                writes[last].2,
                "a request sent {:?} after write {last} was answered got older roles (hit: {hit})",
                sent - writes[last].1
            );
            checked += 1;
            hits += usize::from(hit);
        }
    }
    assert!(
        checked >= 20 && hits > 0,
        "{checked} reads between writes, {hits} of them hits"
    );

    // One role's permissions: every user holding it, and /roles.
    until_hit(p, "/users/8/permissions", Some("8"));
    until_hit(p, "/roles", None);
    let set = |perms: &str| {
        http(
            p,
            "PUT",
            "/roles/viewer/permissions",
            &[ADMIN],
            &format!(r#"{{"permissions":{perms}}}"#),
        )
    };
    assert_eq!(set(r#"["read","write"]"#).status, 204);
    for u in [user, "8"] {
        let r = get(p, &format!("/users/{u}/permissions"), Some(u));
        assert_eq!(
            (r.header("x-cache"), &r.body["permissions"]),
            (Some("MISS"), &serde_json::json!(["read", "write"]))
        );
    }
    let roles = get(p, "/roles", None);
    assert_eq!(
        roles.body["permissions"]["viewer"],
        serde_json::json!(["read", "write"])
    );
    assert_eq!(set(r#"["read"]"#).status, 204);
    assert_eq!(
        get(p, "/users/8/permissions", Some("8")).body["permissions"],
        serde_json::json!(["read"])
    );

    // Refused writes: nothing changes.
    let (n, v) = bearer("8");
    assert_eq!(
        http(
            p,
            "PUT",
            "/roles/viewer/permissions",
            &[(n, &v)],
            "{\"permissions\":[]}"
        )
        .status,
        403
    );
    assert_eq!(set(r#"["read","fly"]"#).status, 422);
    let unknown_role = http(
        p,
        "PUT",
        "/roles/pilot/permissions",
        &[ADMIN],
        r#"{"permissions":["read"]}"#,
    );
    assert_eq!(unknown_role.status, 404);
    let bad = http(
        p,
        "PUT",
        &format!("/users/{user}/roles"),
        &[ADMIN],
        r#"{"roles":["admin","pilot"]}"#,
    );
    assert_eq!(bad.status, 422, "{:?}", bad.body);
    let nobody = http(p, "PUT", "/users/999999/roles", &[ADMIN], r#"{"roles":[]}"#);
    assert_eq!(nobody.status, 404);
    let r = until_hit(p, &path, Some(user));
    assert_eq!(
        (roles_of(&r), &r.body["permissions"]),
        (vec!["viewer".to_owned()], &serde_json::json!(["read"]))
    );
}

#[test]
fn backend_write_through_the_database_is_never_followed_by_an_older_cached_response() {
    let redis = RedisServer::start();
    let b = start_backend(&redis, &[]);
    writes_are_never_followed_by_older_responses(b.port, "7");
}

#[test]
fn backend_on_the_memory_store_never_serves_a_response_from_before_a_write() {
    let nowhere = RedisServer::unstarted();
    let b = start_backend(&nowhere, &[("CACHE_STORE", "memory")]);
    writes_are_never_followed_by_older_responses(b.port, "7");
}

/// A change committed while Redis does not answer: the write says so (503, `"changed":
/// true`), and the outbox row its transaction wrote has the old entry removed once Redis
/// answers again, without anyone asking (Redis was frozen, not restarted: it still holds
/// the entry).
#[test]
fn backend_retries_an_invalidation_that_failed_after_the_commit() {
    let mut redis = RedisServer::start();
    let b = start_backend(&redis, &[]);
    let p = b.port;
    let before = until_hit(p, "/users/5/permissions", Some("5"));
    assert_eq!(roles_of(&before), ["viewer"]);

    redis.freeze();
    let put = http(
        p,
        "PUT",
        "/users/5/roles",
        &[ADMIN],
        r#"{"roles":["viewer","editor"]}"#,
    );
    assert_eq!(
        (put.status, &put.body["changed"]),
        (503, &Value::Bool(true)),
        "{:?}",
        put.body
    );
    redis.thaw();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = get(p, "/users/5/permissions", Some("5"));
        if r.status == 200 && roles_of(&r) == ["viewer", "editor"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the committed change was never served: {:?} (x-cache {:?})",
            r.body,
            r.header("x-cache")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = until_hit(p, "/users/5/permissions", Some("5"));
    assert_eq!(roles_of(&r), ["viewer", "editor"]);
}

/// A database of its own on the PostgreSQL server `TEST_POSTGRES_URL` names, dropped at
/// the end.
struct PgDatabase {
    server: String,
    name: String,
    url: String,
}

impl PgDatabase {
    fn create(server: &str) -> Self {
        let name = format!(
            "trc_example_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        // postgres://user@host:port/db?params → postgres://user@host:port/<name>
        let after_scheme = server.find("://").map_or(0, |i| i + 3);
        let base = match server[after_scheme..].find(['/', '?']) {
            Some(i) => &server[..after_scheme + i],
            None => server,
        };
        let db = PgDatabase {
            server: server.to_owned(),
            url: format!("{base}/{name}"),
            name,
        };
        db.run(&format!("CREATE DATABASE {}", db.name));
        db
    }

    fn run(&self, sql: &str) {
        use sqlx::{Connection, Executor};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut conn = sqlx::postgres::PgConnection::connect(&self.server)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL at TEST_POSTGRES_URL: {e}"));
            conn.execute(sqlx::AssertSqlSafe(sql.to_owned()))
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        });
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        self.run(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// The per-user, invalidation and write checks once against PostgreSQL.
#[test]
fn backend_on_postgres_caches_and_never_serves_a_response_from_before_a_write() {
    let Some(server) = std::env::var("TEST_POSTGRES_URL")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        eprintln!(
            "skipped: TEST_POSTGRES_URL is not set (.ci/run sets it when PostgreSQL answers on 127.0.0.1:5432)"
        );
        return;
    };
    let db = PgDatabase::create(&server);
    let redis = RedisServer::start();
    let b = start_backend(&redis, &[("DATABASE_URL", &db.url)]);
    caches_per_user_and_invalidates_on_role_change(b.port, "connected");
    writes_are_never_followed_by_older_responses(b.port, "7");
}

#[test]
fn functions_example_caches_and_invalidates() {
    let redis = RedisServer::start();
    let out = Command::new(example("functions"))
        .env_clear()
        .env("REDIS_PORT", redis.port().to_string())
        .env("REDIS_LOOKUP_TIMEOUT_MS", "1000")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("round 2: [\"read\"] [\"home\", \"profile\"]"),
        "{text}"
    );
    assert!(text.contains("(2 database queries so far)"), "{text}");
    assert!(!text.contains("(4 database queries so far)"), "{text}");
    assert!(text.contains("2 cached values removed"), "{text}");
    assert!(
        text.contains("after the change: [\"read\", \"write\", \"delete\"]"),
        "{text}"
    );
}

/// A small origin on a free loopback port, in a thread of its own: `/page` is public for a
/// minute, `/private` is private; both answer `{"n": <calls so far>}`. `/echo` answers the
/// request headers it got.
fn start_origin() -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let calls = Arc::new(AtomicU64::new(0));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let c = calls.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let answer = move |cc: &'static str| {
                let c = c.clone();
                axum::routing::get(move || async move {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    (
                        [("cache-control", cc), ("content-type", "application/json")],
                        serde_json::json!({ "n": n }).to_string(),
                    )
                })
            };
            // The request headers the origin saw, and a hop-by-hop header of its own.
            let echo = axum::routing::get(|headers: http::HeaderMap| async move {
                let seen: serde_json::Map<String, Value> = headers
                    .iter()
                    .map(|(n, v)| {
                        let v = v.to_str().unwrap_or("?").to_owned();
                        (n.as_str().to_owned(), Value::String(v))
                    })
                    .collect();
                (
                    [("connection", "x-origin-hop"), ("x-origin-hop", "1")],
                    Value::Object(seen).to_string(),
                )
            });
            // A public page built for the host the client asked for (as pages with absolute
            // links are), with the forwarding headers the origin saw.
            let hosted = axum::routing::get(|headers: http::HeaderMap| async move {
                let seen = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                (
                    [("cache-control", "public, max-age=60")],
                    serde_json::json!({
                        "host": seen("x-forwarded-host"),
                        "forwarded": seen("forwarded"),
                        "for": seen("x-forwarded-for"),
                    })
                    .to_string(),
                )
            });
            let app = axum::Router::new()
                .route("/hosted", hosted)
                .route("/page", answer("public, max-age=60"))
                .route("/private", answer("private, max-age=60"))
                .route("/echo", echo);
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (port, calls)
}

fn start_proxy(redis: &RedisServer, origin_port: u16) -> Backend {
    start_proxy_to(redis, &format!("http://127.0.0.1:{origin_port}"))
}

fn start_proxy_to(redis: &RedisServer, origin: &str) -> Backend {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(example("proxy"))
        .env_clear()
        .env("BIND", format!("127.0.0.1:{port}"))
        .env("ORIGIN_URL", origin)
        .env("REDIS_HOST", "127.0.0.1")
        .env("REDIS_PORT", redis.port().to_string())
        // A loaded machine must not turn an expected hit into a miss (the 50 ms default).
        .env("REDIS_LOOKUP_TIMEOUT_MS", "2000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proxy = Backend { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "proxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy
}

#[test]
fn proxy_caches_what_the_origin_allows() {
    use std::sync::atomic::Ordering;
    let redis = RedisServer::start();
    let (origin, calls) = start_origin();
    let proxy = start_proxy(&redis, origin);
    let p = proxy.port;

    let first = get(p, "/page", None);
    assert_eq!((first.status, first.header("x-cache")), (200, Some("MISS")));
    assert_eq!(first.header("via"), Some("1.1 tower-redis-cache"));
    // The write is off the response path: a request sent before it ends may miss again.
    let hit = until_hit(p, "/page", None);
    let misses = calls.load(Ordering::SeqCst);
    assert_eq!(hit.header("cache-control"), Some("public, max-age=60"));
    assert!(hit.header("age").is_some());
    for _ in 0..3 {
        let again = get(p, "/page", None);
        assert_eq!(
            (again.header("x-cache"), &again.body),
            (Some("HIT"), &hit.body)
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        misses,
        "hits do not reach the origin"
    );

    // Private responses are passed on, never stored.
    for _ in 0..3 {
        assert_eq!(get(p, "/private", None).header("x-cache"), Some("MISS"));
    }
    // The proxy's own health.
    let health = get(p, "/_proxy/health", None);
    assert_eq!(
        (health.status, health.body["redis"].as_str()),
        (200, Some("connected"))
    );
}

/// The proxy keys on the authority the client asked for, so a page built for one host is
/// never served for another, and forwarding headers a client sends itself never reach the
/// origin (they would change the page without changing the key).
#[test]
fn proxy_keys_on_the_authority_and_drops_client_forwarding_headers() {
    let redis = RedisServer::start();
    let (origin, _) = start_origin();
    let proxy = start_proxy(&redis, origin);
    let p = proxy.port;
    let as_host = |host: &str, extra: &[(&str, &str)]| {
        let mut headers = vec![("host", host)];
        headers.extend_from_slice(extra);
        http(p, "GET", "/hosted", &headers, "")
    };

    // An attacker's page for evil.example gets stored...
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let evil = as_host("evil.example", &[]);
        assert_eq!(evil.body["host"], "evil.example");
        if evil.header("x-cache") == Some("HIT") {
            break;
        }
        assert!(Instant::now() < deadline, "evil.example never became a hit");
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...and shop.example's clients still get shop.example's page.
    let shop = as_host("shop.example", &[]);
    assert_eq!(
        (shop.header("x-cache"), &shop.body["host"]),
        (Some("MISS"), &Value::from("shop.example"))
    );

    // A client's own forwarding headers are dropped: the origin sees what the proxy knows.
    let spoofed = as_host(
        "shop2.example",
        &[
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "host=evil.example;for=6.6.6.6"),
            ("x-forwarded-for", "6.6.6.6"),
        ],
    );
    assert_eq!(spoofed.body["host"], "shop2.example");
    assert_eq!(spoofed.body["forwarded"], Value::Null);
    assert_eq!(spoofed.body["for"], "127.0.0.1");
}

#[test]
fn proxy_removes_hop_by_hop_fields_and_reports_a_failing_origin() {
    let redis = RedisServer::start();
    let (origin, _) = start_origin();
    let proxy = start_proxy(&redis, origin);

    // `http` sends `Connection: close` itself; the fields it names go no further either.
    let r = http(
        proxy.port,
        "GET",
        "/echo",
        &[
            ("connection", "x-client-hop"),
            ("x-client-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic eDp5"),
            ("x-end-to-end", "1"),
        ],
        "",
    );
    assert_eq!(r.status, 200);
    let seen = |name: &str| r.body.get(name).and_then(Value::as_str).map(str::to_owned);
    for hop in [
        "x-client-hop",
        "keep-alive",
        "proxy-authorization",
        "connection",
    ] {
        assert_eq!(seen(hop), None, "{hop} was forwarded");
    }
    assert_eq!(seen("x-end-to-end").as_deref(), Some("1"));
    assert_eq!(seen("via").as_deref(), Some("1.1 tower-redis-cache"));
    assert_eq!(seen("x-forwarded-host").as_deref(), Some("localhost"));
    assert_eq!(seen("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    // And on the way back.
    assert_eq!(r.header("x-origin-hop"), None);

    // Nothing listens on the origin's port: 502, not a hang or a dropped connection.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = start_proxy_to(&redis, &format!("http://127.0.0.1:{closed}"));
    assert_eq!(get(proxy.port, "/page", None).status, 502);
}

#[test]
fn grpc_example_serves_http_and_grpc_through_one_cache() {
    let redis = RedisServer::start();
    let out = Command::new(example("grpc"))
        .arg("demo")
        .env_clear()
        .env("REDIS_PORT", redis.port().to_string())
        .env("BIND", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let expected = [
        "GetProduct(7): product 7 (x-cache: MISS, read #1)",
        "GetProduct(7): product 7 (x-cache: HIT, read #1)",
        "GetProduct(0): NotFound: no product 0",
        "GetProduct(0): NotFound: no product 0",
        "ListProducts: product 1",
        "ListProducts: product 2",
        "ListProducts: product 3",
        "invalidate_tag(\"catalog\"): 1 entries",
    ];
    assert_eq!(&lines[..expected.len()], &expected[..], "{text}");
    assert!(
        lines[expected.len()].starts_with("GetProduct(7): product 7 (x-cache: MISS"),
        "{text}"
    );
}
