//! The Python backend's cached endpoints, in Rust, with `tower-redis-cache`, on a real
//! database.
//!
//! Run with `cargo run --example backend` (Redis on 127.0.0.1:6379 by default; without one it
//! runs uncached, and `CACHE_STORE=memory` caches in the process). Its data is in SQLite, a
//! file created and seeded at start (sqlx bundles SQLite: nothing to install), or in
//! PostgreSQL when `DATABASE_URL=postgres://...` says so. Then:
//!
//! ```text
//! # MISS (the database: tens of ms), then HIT (the cache: about a millisecond)
//! curl -s -o /dev/null -w '%{time_total}s\n' -H 'Authorization: Bearer user-1' localhost:3000/users/1/permissions
//! curl -i -H 'Authorization: Bearer user-1' localhost:3000/users/1/permissions
//! curl -i localhost:3000/roles
//! curl -i 'localhost:3000/prompts/welcome?lang=en&version=2'
//! curl -i -X PUT -H 'Authorization: Bearer user-1' -H 'content-type: application/json' \
//!      -d '{"roles":["admin"]}' localhost:3000/users/1/roles                      # invalidates
//! curl -i -X PUT -H 'Authorization: Bearer admin' -H 'content-type: application/json' \
//!      -d '{"permissions":["read","write"]}' localhost:3000/roles/viewer/permissions
//! curl -i localhost:3000/health
//! curl -i -X POST -H 'Authorization: Bearer admin' -H 'content-type: application/json' \
//!      -d '{"pattern":"/users/*/permissions"}' localhost:3000/admin/cache/invalidate
//! ```
//!
//! Tokens: `Bearer user-<id>` is user `<id>` (1 to 20,000 exist); `Bearer admin` is the
//! administrator.
//!
//! # Writes and the cache
//!
//! A change of permissions (`PUT /users/{id}/roles`, `PUT /roles/{name}/permissions`) is one
//! database transaction, and the cache entries it affects are invalidated **after its
//! commit**, before the response. In that order no client is served data from before the
//! change once the response is sent: a request that read the database before the commit and
//! stores its response after the invalidation is refused by the cache (an invalidation moves
//! a marker that every write checks against the time its miss began), and a request whose
//! miss begins after the invalidation reads the committed data. Invalidating *before* the
//! commit leaves a window: a request that reads the old rows between the invalidation and
//! the commit stores them, and they are served until their TTL ends.
//!
//! If the invalidation fails (Redis unreachable), the change is committed and cannot be
//! taken back. So the transaction also writes a row to an outbox table (`cache_outbox`),
//! deleted once the invalidation succeeded: the response is then `503` with `"changed":
//! true` (the client may repeat the `PUT`, which is idempotent), and a background task of
//! every instance retries what the outbox holds once a second until Redis answers, after a
//! crash between commit and invalidation too. Until then the old entries may be served once
//! Redis is back, for at most the time to the next retry (a second or two), and at worst for
//! their TTL (600 s and 900 s here) if Redis never comes back with the outbox still
//! unprocessed: keep TTLs of data that changes short where that matters.
//!
//! Settings (environment): `BIND` (127.0.0.1:3000), `DATABASE_URL` (`sqlite://<temp
//! dir>/tower-redis-cache-backend.db?mode=rwc`; or `postgres://user@host/db`, whose tables
//! go in the schema `backend_example`), `REDIS_URL` or `REDIS_HOST`, `REDIS_PORT`,
//! `REDIS_PASSWORD`, `REDIS_DB`, `REDIS_SSL` (see `RedisConfig::from_env`), `CACHE_NAMESPACE`
//! (backend), `DB_DELAY_MS` (0: extra time added to every database read, to play a slower
//! database), `CACHE_ENABLED` (true; `false` runs the same service without the cache layer),
//! `CACHE_STORE` (`redis`; `memory` keeps the cache in this process, without Redis, for a
//! single instance or a test run), `CACHE_MEMORY_MB` (64: the memory store's bound),
//! `APP_ENV` (development), `RUST_LOG` (for example `tower_redis_cache=debug`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;
use tower_redis_cache::{
    CacheError, CacheHandle, CacheLayer, Identity, MemoryStore, PathPattern, Policy, RedisConfig,
    RedisStore, Store,
};

#[path = "backend/db.rs"]
pub(crate) mod db;

use db::{Db, Invalidation, Refused};

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

#[derive(Clone)]
struct AppState {
    db: Arc<Db>,
    cache: Option<CacheHandle>,
    env: String,
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

/// A database failure: logged, answered 500 (never cached; the shared routes serve their
/// stale entry instead, `stale_if_error`).
fn db_error(e: db::Error) -> Response {
    tracing::error!(error = %e, "database error");
    error(StatusCode::INTERNAL_SERVER_ERROR, "database error")
}

/// Path ids are the users table's integer keys; anything else names nobody.
fn user_key(id: &str) -> Option<i64> {
    id.parse().ok().filter(|n| *n > 0)
}

async fn user_permissions(
    State(s): State<AppState>,
    Path(id): Path<String>,
    caller: Option<Extension<UserId>>,
) -> Response {
    if let Some((status, message)) = check_caller(caller.as_deref(), &id) {
        return error(status, message);
    }
    let Some(key) = user_key(&id) else {
        return error(StatusCode::NOT_FOUND, "no such user");
    };
    match s.db.access(key).await {
        Ok((Some(a), db_reads)) => {
            let projects: BTreeMap<String, i64> = a.projects.into_iter().collect();
            Json(json!({
                "user_id": id,
                "roles": a.roles,
                "permissions": a.permissions,
                "projects": projects,
                "db_reads": db_reads,
            }))
            .into_response()
        }
        Ok((None, _)) => error(StatusCode::NOT_FOUND, "no such user"),
        Err(e) => db_error(e),
    }
}

async fn user_menu(
    State(s): State<AppState>,
    Path(id): Path<String>,
    caller: Option<Extension<UserId>>,
) -> Response {
    if let Some((status, message)) = check_caller(caller.as_deref(), &id) {
        return error(status, message);
    }
    let Some(key) = user_key(&id) else {
        return error(StatusCode::NOT_FOUND, "no such user");
    };
    match s.db.menu(key).await {
        Ok((Some(menu), db_reads)) => {
            Json(json!({"user_id": id, "menu": menu, "db_reads": db_reads})).into_response()
        }
        Ok((None, _)) => error(StatusCode::NOT_FOUND, "no such user"),
        Err(e) => db_error(e),
    }
}

async fn roles(State(s): State<AppState>) -> Response {
    match s.db.roles().await {
        Ok((roles, db_reads)) => {
            let names: Vec<&str> = roles.iter().map(|(r, _)| r.as_str()).collect();
            let permissions: BTreeMap<&str, &[String]> = roles
                .iter()
                .map(|(r, p)| (r.as_str(), p.as_slice()))
                .collect();
            Json(json!({"roles": names, "permissions": permissions, "db_reads": db_reads}))
                .into_response()
        }
        Err(e) => db_error(e),
    }
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
) -> Response {
    let lang = q.lang.unwrap_or_else(|| "en".to_owned());
    let version = q.version.unwrap_or(1);
    match s.db.prompt(&name, &lang, i64::from(version)).await {
        Ok((Some(text), db_reads)) => Json(json!({
            "name": name,
            "lang": lang,
            "version": version,
            "text": text,
            "db_reads": db_reads,
        }))
        .into_response(),
        Ok((None, _)) => error(StatusCode::NOT_FOUND, "no such prompt"),
        Err(e) => db_error(e),
    }
}

/// Removes what a committed change made stale.
async fn invalidate(cache: &CacheHandle, what: &Invalidation) -> Result<(), CacheError> {
    match what {
        Invalidation::User(id) => cache.invalidate_user(id).await.map(drop),
        Invalidation::RolePermissions => {
            // Every user holding the role may see other permissions and another menu.
            cache.invalidate_route("/users/{id}/permissions").await?;
            cache.invalidate_route("/users/{id}/menu").await?;
            cache.invalidate_tag("roles").await.map(drop)
        }
    }
}

/// After the commit of a change whose outbox row is `pending`: invalidates, then deletes
/// the row. `None` when done (or when there is no cache); otherwise the response to send.
async fn invalidate_committed(
    s: &AppState,
    what: Invalidation,
    pending: Option<i64>,
) -> Option<Response> {
    let (Some(cache), Some(row)) = (&s.cache, pending) else {
        return None;
    };
    if let Err(e) = invalidate(cache, &what).await {
        tracing::error!(error = %e, ?what, "committed, but the invalidation failed; the outbox retries it");
        let body = json!({
            "error": "changed, but cached copies may still be served until the cache is reachable; retried in the background",
            "changed": true,
        });
        return Some(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(axum::http::header::RETRY_AFTER, "1")],
                Json(body),
            )
                .into_response(),
        );
    }
    if let Err(e) = s.db.done(row).await {
        // Harmless: the outbox task repeats an invalidation that already succeeded.
        tracing::warn!(error = %e, "outbox row not deleted");
    }
    None
}

#[derive(Deserialize)]
struct RolesBody {
    roles: Vec<String>,
}

/// Replaces a user's roles (the user themself or the administrator): one transaction,
/// then the user's cache entries are invalidated after the commit (see the file's header).
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
    let Some(key) = user_key(&id) else {
        return error(StatusCode::NOT_FOUND, "no such user");
    };
    let pending = match s.db.set_roles(key, &body.roles, s.cache.is_some()).await {
        Ok(Ok(pending)) => pending,
        Ok(Err(refused)) => return refusal(refused),
        Err(e) => return db_error(e),
    };
    // Committed: only now may the cache forget the old roles.
    if let Some(response) = invalidate_committed(&s, Invalidation::User(id), pending).await {
        return response;
    }
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct PermissionsBody {
    permissions: Vec<String>,
}

/// Replaces a role's permissions (administrator only): every user's permissions and menu
/// and `/roles` may change, so their routes and tag are invalidated after the commit.
async fn set_role_permissions(
    State(s): State<AppState>,
    Path(role): Path<String>,
    caller: Option<Extension<UserId>>,
    Json(body): Json<PermissionsBody>,
) -> Response {
    match caller.as_deref() {
        Some(c) if c.0 == ADMIN => {}
        Some(_) => return error(StatusCode::FORBIDDEN, "administrator only"),
        None => return error(StatusCode::UNAUTHORIZED, "authentication required"),
    }
    let pending = match s
        .db
        .set_role_permissions(&role, &body.permissions, s.cache.is_some())
        .await
    {
        Ok(Ok(pending)) => pending,
        Ok(Err(refused)) => return refusal(refused),
        Err(e) => return db_error(e),
    };
    if let Some(response) = invalidate_committed(&s, Invalidation::RolePermissions, pending).await {
        return response;
    }
    StatusCode::NO_CONTENT.into_response()
}

fn refusal(refused: Refused) -> Response {
    match refused {
        Refused::NoSuchUser => error(StatusCode::NOT_FOUND, "no such user"),
        Refused::NoSuchRole => error(StatusCode::NOT_FOUND, "no such role"),
        Refused::UnknownName(name) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("unknown role or permission {name:?}"),
        ),
    }
}

/// Retries, once a second, the invalidations of committed changes that are still in the
/// outbox (failed, or their process stopped before them). Rows younger than a second are
/// left to the request that wrote them.
async fn outbox_worker(db: Arc<Db>, cache: CacheHandle) {
    let mut failing = false;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pending = match db.pending(Duration::from_secs(1)).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "outbox not read");
                continue;
            }
        };
        for p in pending {
            match invalidate(&cache, &p.invalidation).await {
                Ok(()) => {
                    if failing {
                        tracing::info!("outbox: invalidations succeed again");
                        failing = false;
                    }
                    tracing::info!(what = ?p.invalidation, "outbox: invalidated");
                    if let Err(e) = db.done(p.id).await {
                        tracing::warn!(error = %e, "outbox row not deleted");
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, "outbox: invalidation still failing; retrying every second");
                        failing = true;
                    }
                    break;
                }
            }
        }
    }
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
pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // sqlx warns of statements over a second: only the seed's are.
                .unwrap_or_else(|_| "info,tower_redis_cache=debug,sqlx::query=error".into()),
        )
        .init();

    let bind = env_or("BIND", "127.0.0.1:3000");
    let delay_ms: u64 = env_or("DB_DELAY_MS", "0")
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

    let url = env_or("DATABASE_URL", &db::default_url());
    let (db, seeded) = Db::open(&url, Duration::from_millis(delay_ms)).await?;
    match seeded {
        Some(seeded) => {
            tracing::info!(database = db.kind().name(), rows = ?seeded.rows, took = ?seeded.took, "seeded")
        }
        None => tracing::info!(database = db.kind().name(), "already seeded"),
    }
    // What a miss costs: the permissions queries of one user, straight from the database.
    let started = Instant::now();
    db.query_access(1).await?;
    tracing::info!(took = ?started.elapsed(), "the permissions queries of user 1, uncached");
    let db = Arc::new(db);

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
        tokio::spawn(outbox_worker(db.clone(), cache.handle()));
    }
    let state = AppState {
        db,
        cache: cache.as_ref().map(CacheLayer::handle),
        env: env_or("APP_ENV", "development"),
    };

    let mut app = Router::new()
        .route("/users/{id}/permissions", get(user_permissions))
        .route("/users/{id}/menu", get(user_menu))
        .route("/users/{id}/roles", put(set_roles))
        .route("/roles", get(roles))
        .route("/roles/{name}/permissions", put(set_role_permissions))
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
