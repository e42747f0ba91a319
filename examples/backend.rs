//! The Python backend's cached endpoints, in Rust, with `tower-redis-cache`.
//!
//! Run with `cargo run --example backend` (Redis on 127.0.0.1:6379 by default), then:
//!
//! ```text
//! curl -i -H 'Authorization: Bearer user-1' localhost:3000/users/1/permissions   # MISS, then HIT
//! curl -i localhost:3000/roles
//! curl -i 'localhost:3000/prompts/welcome?lang=en&version=2'
//! curl -i -X PUT -H 'Authorization: Bearer user-1' -H 'content-type: application/json' \
//!      -d '{"roles":["admin"]}' localhost:3000/users/1/roles                      # invalidates
//! curl -i localhost:3000/health
//! curl -i -X POST -H 'Authorization: Bearer admin' -H 'content-type: application/json' \
//!      -d '{"pattern":"/users/*/permissions"}' localhost:3000/admin/cache/invalidate
//! ```
//!
//! Tokens: `Bearer user-<id>` is user `<id>`; `Bearer admin` is the administrator.
//!
//! Settings (environment): `BIND` (127.0.0.1:3000), `REDIS_URL` or `REDIS_HOST`,
//! `REDIS_PORT`, `REDIS_PASSWORD`, `REDIS_DB`, `REDIS_SSL` (see `RedisConfig::from_env`),
//! `CACHE_NAMESPACE` (backend), `DB_DELAY_MS` (50: the simulated cost of a database read),
//! `CACHE_ENABLED` (true; `false` runs the same service without the cache layer),
//! `CACHE_STORE` (`redis`; `memory` keeps the cache in this process, without Redis, for a
//! single instance or a test run), `CACHE_MEMORY_MB` (64: the memory store's bound),
//! `APP_ENV` (development), `RUST_LOG` (for example `tower_redis_cache=debug`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tower_redis_cache::{
    CacheHandle, CacheLayer, Identity, MemoryStore, PathPattern, Policy, RedisConfig, RedisStore,
    Store,
};

/// The authenticated caller, set by `auth` and read by the cache layer as the identity.
#[derive(Clone, Debug)]
struct UserId(String);

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The administrator's user id (and token).
const ADMIN: &str = "admin";

/// The stand-in for the database.
struct Db {
    delay: Duration,
    reads: AtomicU64,
    roles: RwLock<HashMap<String, Vec<String>>>,
}

impl Db {
    /// One simulated database read: costs `delay`, returns the read count so far.
    async fn read(&self) -> u64 {
        tokio::time::sleep(self.delay).await;
        self.reads.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn roles_of(&self, user: &str) -> Vec<String> {
        let roles = self.roles.read().unwrap_or_else(|e| e.into_inner());
        roles
            .get(user)
            .cloned()
            .unwrap_or_else(|| vec!["viewer".to_owned()])
    }
}

#[derive(Clone)]
struct AppState {
    db: Arc<Db>,
    cache: Option<CacheHandle>,
    env: String,
}

fn permissions(roles: &[String]) -> Vec<&'static str> {
    let mut p = vec!["read"];
    if roles.iter().any(|r| r == "editor" || r == "admin") {
        p.push("write");
    }
    if roles.iter().any(|r| r == "admin") {
        p.extend(["delete", "manage_users"]);
    }
    p
}

fn menu(roles: &[String]) -> Vec<&'static str> {
    let mut m = vec!["home", "profile"];
    if roles.iter().any(|r| r == "editor" || r == "admin") {
        m.push("editor");
    }
    if roles.iter().any(|r| r == "admin") {
        m.push("admin");
    }
    m
}

/// `Authorization: Bearer user-<id>` → `UserId(<id>)`; any other credential → 401. Requests
/// without `Authorization` go on without identity.
async fn auth(mut req: Request, next: Next) -> Response {
    if let Some(value) = req.headers().get(axum::http::header::AUTHORIZATION) {
        let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer "));
        let id = match token {
            Some(ADMIN) => Some(ADMIN),
            Some(t) => t
                .strip_prefix("user-")
                .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric())),
            None => None,
        };
        match id {
            Some(id) => {
                let id = UserId(id.to_owned());
                req.extensions_mut().insert(id);
            }
            None => {
                return (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": "invalid token"})),
                )
                    .into_response()
            }
        }
    }
    next.run(req).await
}

/// The caller must be user `id`: otherwise the status and message to answer with.
fn check_caller(caller: Option<&UserId>, id: &str) -> Option<(StatusCode, &'static str)> {
    match caller {
        None => Some((StatusCode::UNAUTHORIZED, "authentication required")),
        Some(c) if c.0 != id => Some((StatusCode::FORBIDDEN, "forbidden")),
        Some(_) => None,
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn user_permissions(
    State(s): State<AppState>,
    Path(id): Path<String>,
    caller: Option<Extension<UserId>>,
) -> Response {
    if let Some((status, message)) = check_caller(caller.as_deref(), &id) {
        return error(status, message);
    }
    let db_reads = s.db.read().await;
    let roles = s.db.roles_of(&id);
    Json(json!({"user_id": id, "roles": roles, "permissions": permissions(&roles), "db_reads": db_reads}))
        .into_response()
}

async fn user_menu(
    State(s): State<AppState>,
    Path(id): Path<String>,
    caller: Option<Extension<UserId>>,
) -> Response {
    if let Some((status, message)) = check_caller(caller.as_deref(), &id) {
        return error(status, message);
    }
    let db_reads = s.db.read().await;
    let roles = s.db.roles_of(&id);
    Json(json!({"user_id": id, "menu": menu(&roles), "db_reads": db_reads})).into_response()
}

async fn roles(State(s): State<AppState>) -> Json<Value> {
    let db_reads = s.db.read().await;
    Json(json!({"roles": ["admin", "editor", "viewer"], "db_reads": db_reads}))
}

#[derive(Deserialize)]
struct PromptQuery {
    lang: Option<String>,
    version: Option<u32>,
}

async fn prompt(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<PromptQuery>,
) -> Json<Value> {
    let db_reads = s.db.read().await;
    let lang = q.lang.unwrap_or_else(|| "en".to_owned());
    let version = q.version.unwrap_or(1);
    Json(json!({
        "name": name,
        "lang": lang,
        "version": version,
        "text": format!("[{lang} v{version}] prompt {name}"),
        "db_reads": db_reads,
    }))
}

#[derive(Deserialize)]
struct RolesBody {
    roles: Vec<String>,
}

/// Changes a user's roles (the user themself or the administrator), then drops that
/// user's cached entries before answering, so the next read sees the change.
///
/// If the cache cannot be reached, nothing is changed and the answer is 503: a change whose
/// invalidation failed could leave stale permissions cached for their whole TTL. The cache
/// is invalidated before the change too, so a Redis outage is found before anything is
/// written.
async fn set_roles(
    State(s): State<AppState>,
    Path(id): Path<String>,
    caller: Option<Extension<UserId>>,
    Json(body): Json<RolesBody>,
) -> Response {
    match caller.as_deref() {
        None => return error(StatusCode::UNAUTHORIZED, "authentication required"),
        Some(c) if c.0 != id && c.0 != ADMIN => return error(StatusCode::FORBIDDEN, "forbidden"),
        Some(_) => {}
    }
    if let Some(cache) = &s.cache {
        if let Err(e) = cache.invalidate_user(&id).await {
            tracing::error!(error = %e, user = %id, "cache unreachable; roles not changed");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cache unavailable; try again",
            );
        }
    }
    s.db.roles
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), body.roles);
    if let Some(cache) = &s.cache {
        // Requests that read the old roles meanwhile are not stored (the invalidation
        // handle is race-safe); this second call removes what was stored in between.
        if let Err(e) = cache.invalidate_user(&id).await {
            tracing::error!(error = %e, user = %id, "invalidation after the change failed; retrying");
            let cache = cache.clone();
            tokio::spawn(async move {
                for attempt in 1..=10u32 {
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    if cache.invalidate_user(&id).await.is_ok() {
                        return;
                    }
                }
                tracing::error!(user = %id, "invalidation kept failing; entries expire with their TTL");
            });
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

/// What `POST /admin/cache/invalidate` takes: exactly one of the fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateBody {
    path: Option<String>,
    user: Option<String>,
    tag: Option<String>,
    pattern: Option<String>,
}

/// Invalidation for operators: `{"path": ...}`, `{"user": ...}`, `{"tag": ...}` or
/// `{"pattern": ...}` (a glob over paths), answering `{"removed": n}`.
async fn admin_invalidate(
    State(s): State<AppState>,
    caller: Option<Extension<UserId>>,
    Json(body): Json<InvalidateBody>,
) -> Response {
    match caller.as_deref() {
        Some(c) if c.0 == ADMIN => {}
        Some(_) => return error(StatusCode::FORBIDDEN, "administrator only"),
        None => return error(StatusCode::UNAUTHORIZED, "authentication required"),
    }
    let Some(cache) = &s.cache else {
        return Json(json!({"removed": 0})).into_response();
    };
    let result = match (body.path, body.user, body.tag, body.pattern) {
        (Some(path), None, None, None) => cache.invalidate_path(&path).await,
        (None, Some(user), None, None) => cache.invalidate_user(&user).await,
        (None, None, Some(tag), None) => cache.invalidate_tag(&tag).await,
        (None, None, None, Some(pattern)) => {
            cache.invalidate_pattern(&PathPattern::glob(pattern)).await
        }
        _ => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "give exactly one of path, user, tag, pattern",
            )
        }
    };
    match result {
        Ok(removed) => Json(json!({ "removed": removed })).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "invalidation failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "cache unavailable")
        }
    }
}

/// `{"status":"ok","env":...,"redis":"connected"|"unavailable",...}`: the service stays "ok"
/// when only Redis is down.
async fn health(State(s): State<AppState>) -> Response {
    match &s.cache {
        Some(cache) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            cache.health().await.to_json(&s.env),
        )
            .into_response(),
        None => Json(json!({"status": "ok", "env": s.env, "redis": "disabled"})).into_response(),
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_redis_cache=debug".into()),
        )
        .init();

    let bind = env_or("BIND", "127.0.0.1:3000");
    let delay_ms: u64 = env_or("DB_DELAY_MS", "50")
        .parse()
        .map_err(|_| "DB_DELAY_MS must be a whole number of milliseconds")?;
    let cache_enabled = match env_or("CACHE_ENABLED", "true")
        .to_ascii_lowercase()
        .as_str()
    {
        "true" | "1" | "yes" => true,
        "false" | "0" | "no" => false,
        other => return Err(format!("CACHE_ENABLED must be true or false, got {other:?}").into()),
    };

    let db = Arc::new(Db {
        delay: Duration::from_millis(delay_ms),
        reads: AtomicU64::new(0),
        roles: RwLock::new(HashMap::new()),
    });

    let cache = if cache_enabled {
        let store: Store = match env_or("CACHE_STORE", "redis").to_ascii_lowercase().as_str() {
            "redis" => {
                let config = RedisConfig::from_env()?;
                tracing::info!(?config, "redis");
                RedisStore::connect(config).await?.into()
            }
            "memory" => {
                let mb: u64 = env_or("CACHE_MEMORY_MB", "64")
                    .parse()
                    .map_err(|_| "CACHE_MEMORY_MB must be a whole number of MiB")?;
                tracing::info!(max_mib = mb, "in-process cache store");
                MemoryStore::new(mb << 20).into()
            }
            other => {
                return Err(format!("CACHE_STORE must be redis or memory, got {other:?}").into())
            }
        };
        Some(
            CacheLayer::new(store, Policy::bypass())
                .namespace(&env_or("CACHE_NAMESPACE", "backend"))?
                .identity(Identity::extension::<UserId>())
                .route(
                    "/users/{id}/permissions",
                    Policy::per_user(Duration::from_secs(600)),
                )?
                .route(
                    "/users/{id}/menu",
                    Policy::per_user(Duration::from_secs(900)),
                )?
                .route(
                    "/roles",
                    Policy::shared(Duration::from_secs(3600))
                        .tag("roles")
                        .stale_while_revalidate(Duration::from_secs(60))
                        .stale_if_error(Duration::from_secs(86_400)),
                )?
                // Coalescing and ETags are on by default; the shared routes also serve a
                // stale entry for a minute while it is refreshed, and for up to a day when
                // the database fails.
                .route(
                    "/prompts/{name}",
                    Policy::shared(Duration::from_secs(300))
                        .stale_while_revalidate(Duration::from_secs(60))
                        .stale_if_error(Duration::from_secs(86_400)),
                )?,
        )
    } else {
        None
    };
    if let Some(cache) = &cache {
        // A Redis user without the permissions the cache needs is a start-up error.
        cache.handle().check().await?;
    }
    let state = AppState {
        db,
        cache: cache.as_ref().map(CacheLayer::handle),
        env: env_or("APP_ENV", "development"),
    };

    let mut app = Router::new()
        .route("/users/{id}/permissions", get(user_permissions))
        .route("/users/{id}/menu", get(user_menu))
        .route("/users/{id}/roles", axum::routing::put(set_roles))
        .route("/roles", get(roles))
        .route("/prompts/{name}", get(prompt))
        .route("/health", get(health))
        .route(
            "/admin/cache/invalidate",
            axum::routing::post(admin_invalidate),
        );
    if let Some(cache) = cache {
        // Inside `auth`, so the identity is known when the cache runs.
        app = app.layer(cache);
    }
    let app = app.layer(middleware::from_fn(auth)).with_state(state);

    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!(addr = %listener.local_addr()?, cache = cache_enabled, "listening");
    axum::serve(listener, app).await?;
    Ok(())
}
