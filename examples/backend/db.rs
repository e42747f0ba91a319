//! The example service's database: SQLite (bundled with sqlx, so nothing to install) or
//! PostgreSQL, picked by the URL at run time through sqlx's `Any` driver. Every query is
//! written once, in SQL both understand (`$1` placeholders, `WITH RECURSIVE`, `||`); only the
//! outbox's generated key is spelled per database.
//!
//! The data: an organisation of [`USERS`] users, each with roles of their own (viewer,
//! editor, admin) and a member of [`TEAMS_PER_USER`] of [`TEAMS`] teams; each team is granted
//! a role on about half of [`PROJECTS`] projects. A user's permissions are those of their own
//! roles, and, per permission, the number of projects their teams' grants give it: the second
//! part joins team memberships, grants, role grants and permissions over some 25,000 grant
//! rows per user, which is what makes an uncached answer cost tens of milliseconds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
// The SQL built with `format!` below is made of this file's constants only (table names,
// seed sizes), never of request data, which is always bound as a parameter.
use sqlx::{AnyPool, AssertSqlSafe, Executor, Row};

/// Users in the seed.
pub const USERS: i64 = 20_000;
/// Teams in the seed.
pub const TEAMS: i64 = 40;
/// Teams each user is a member of.
pub const TEAMS_PER_USER: i64 = 8;
/// Projects in the seed; each team is granted a role on about half of them.
pub const PROJECTS: i64 = 10_000;
/// Changes when the schema or the seed does: a database seeded by another version is
/// seeded again.
const SEED_VERSION: i64 = 1;
/// The PostgreSQL schema that holds the example's tables (SQLite: the file is its own).
pub const PG_SCHEMA: &str = "backend_example";

/// Which database the URL named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sqlite => "sqlite",
            Kind::Postgres => "postgres",
        }
    }
}

/// A database error, as the handlers see it.
pub type Error = sqlx::Error;

/// The pool, and how many reads the handlers made (so a response can show whether it came
/// from the database).
pub struct Db {
    pool: AnyPool,
    kind: Kind,
    /// Extra time added to every read (`DB_DELAY_MS`, 0 by default): a slower database.
    delay: Duration,
    reads: AtomicU64,
}

/// A user's access, as `GET /users/{id}/permissions` shows it.
pub struct Access {
    pub roles: Vec<String>,
    pub permissions: Vec<String>,
    /// Per permission (in permission order), how many projects the user's teams grant it on.
    pub projects: Vec<(String, i64)>,
}

/// The outcome of a write that was refused before anything changed.
pub enum Refused {
    NoSuchUser,
    NoSuchRole,
    UnknownName(String),
}

/// What a committed change must invalidate, as an outbox row names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// Every cached entry of one user (their permissions and menu).
    User(String),
    /// A role's permissions changed: every user's permissions and menu, and `/roles`.
    RolePermissions,
}

impl Invalidation {
    fn to_row(&self) -> (&'static str, &str) {
        match self {
            Invalidation::User(id) => ("user", id),
            Invalidation::RolePermissions => ("role_permissions", ""),
        }
    }

    fn from_row(kind: &str, target: String) -> Option<Self> {
        match kind {
            "user" => Some(Invalidation::User(target)),
            "role_permissions" => Some(Invalidation::RolePermissions),
            _ => None,
        }
    }
}

/// A row of the outbox: a committed change whose cache entries are not known to be gone.
pub struct Pending {
    pub id: i64,
    pub invalidation: Invalidation,
}

/// What seeding did, for the start-up log.
pub struct Seeded {
    pub rows: Vec<(&'static str, i64)>,
    pub took: Duration,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The SQLite file the example uses when `DATABASE_URL` is not set.
pub fn default_url() -> String {
    let path = std::env::temp_dir().join("tower-redis-cache-backend.db");
    format!("sqlite://{}?mode=rwc", path.display())
}

impl Db {
    /// Connects, and creates and seeds the tables if this version has not seeded them yet
    /// (`Some` then). Tables of an older seed are dropped first.
    pub async fn open(url: &str, delay: Duration) -> Result<(Db, Option<Seeded>), Error> {
        sqlx::any::install_default_drivers();
        let kind = if url.starts_with("sqlite:") {
            Kind::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Kind::Postgres
        } else {
            return Err(Error::Configuration(
                "DATABASE_URL must start with sqlite: or postgres:".into(),
            ));
        };
        let options: AnyConnectOptions = url.parse()?;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if kind == Kind::Postgres {
                        conn.execute(AssertSqlSafe(format!("SET search_path TO {PG_SCHEMA}")))
                            .await?;
                        // Not "table does not exist, skipping" at every seed.
                        conn.execute("SET client_min_messages TO warning").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let db = Db {
            pool,
            kind,
            delay,
            reads: AtomicU64::new(0),
        };
        let seeded = if db.seed_version().await != Some(SEED_VERSION) {
            Some(db.seed().await?)
        } else {
            None
        };
        Ok((db, seeded))
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Counts one read by a handler (and waits `DB_DELAY_MS`); returns the count so far.
    async fn read(&self) -> u64 {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.reads.fetch_add(1, Ordering::SeqCst) + 1
    }

    async fn seed_version(&self) -> Option<i64> {
        sqlx::query("SELECT version FROM seed_info")
            .fetch_optional(&self.pool)
            .await
            .ok()
            .flatten()
            .and_then(|row| row.try_get(0).ok())
    }

    /// Drops the example's tables and creates and fills them again, in one transaction:
    /// rows are generated by the database itself (`WITH RECURSIVE`), so a seed of several
    /// hundred thousand rows takes a second or two.
    async fn seed(&self) -> Result<Seeded, Error> {
        let started = Instant::now();
        if self.kind == Kind::Postgres {
            sqlx::query(AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS {PG_SCHEMA}"
            )))
            .execute(&self.pool)
            .await?;
        } else {
            // Readers do not wait for writers, nor writers for readers. Kept in the file.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&self.pool)
                .await?;
        }
        let outbox_id = match self.kind {
            Kind::Sqlite => "id INTEGER PRIMARY KEY",
            Kind::Postgres => "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        };
        // The two large tables' foreign keys: declared with their columns in SQLite (whose
        // checks are cheap), added after the rows in PostgreSQL, which then checks them in
        // one pass instead of a trigger per row (5 s of the seed otherwise).
        let late_fks = self.kind == Kind::Postgres;
        let inline_fk = |table: &str| {
            if late_fks {
                String::new()
            } else {
                format!("REFERENCES {table} (id)")
            }
        };
        let mut tx = self.pool.begin().await?;
        for table in [
            "seed_info",
            "cache_outbox",
            "prompts",
            "menu_items",
            "grants",
            "projects",
            "team_members",
            "teams",
            "user_roles",
            "role_permissions",
            "permissions",
            "roles",
            "users",
        ] {
            tx.execute(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
                .await?;
        }
        let n = |max: i64| {
            format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {max})"
            )
        };
        let statements = [
            "CREATE TABLE users (id BIGINT PRIMARY KEY, name TEXT NOT NULL)".to_owned(),
            "CREATE TABLE roles (id BIGINT PRIMARY KEY, name TEXT NOT NULL UNIQUE)".to_owned(),
            "CREATE TABLE permissions (id BIGINT PRIMARY KEY, name TEXT NOT NULL UNIQUE)"
                .to_owned(),
            "CREATE TABLE role_permissions (
                role_id BIGINT NOT NULL REFERENCES roles (id),
                permission_id BIGINT NOT NULL REFERENCES permissions (id),
                PRIMARY KEY (role_id, permission_id))"
                .to_owned(),
            "CREATE TABLE user_roles (
                user_id BIGINT NOT NULL REFERENCES users (id),
                role_id BIGINT NOT NULL REFERENCES roles (id),
                PRIMARY KEY (user_id, role_id))"
                .to_owned(),
            "CREATE TABLE teams (id BIGINT PRIMARY KEY, name TEXT NOT NULL)".to_owned(),
            format!(
                "CREATE TABLE team_members (
                    user_id BIGINT NOT NULL {}, team_id BIGINT NOT NULL {},
                    PRIMARY KEY (user_id, team_id))",
                inline_fk("users"),
                inline_fk("teams")
            ),
            "CREATE TABLE projects (id BIGINT PRIMARY KEY, name TEXT NOT NULL)".to_owned(),
            format!(
                "CREATE TABLE grants (
                    team_id BIGINT NOT NULL {}, project_id BIGINT NOT NULL {},
                    role_id BIGINT NOT NULL {}, PRIMARY KEY (team_id, project_id))",
                inline_fk("teams"),
                inline_fk("projects"),
                inline_fk("roles")
            ),
            "CREATE TABLE menu_items (
                id BIGINT PRIMARY KEY,
                name TEXT NOT NULL,
                permission_id BIGINT REFERENCES permissions (id))"
                .to_owned(),
            "CREATE TABLE prompts (
                name TEXT NOT NULL, lang TEXT NOT NULL, version BIGINT NOT NULL,
                body TEXT NOT NULL, PRIMARY KEY (name, lang, version))"
                .to_owned(),
            format!(
                "CREATE TABLE cache_outbox (
                    {outbox_id}, kind TEXT NOT NULL, target TEXT NOT NULL,
                    created_ms BIGINT NOT NULL)"
            ),
            "CREATE TABLE seed_info (version BIGINT NOT NULL)".to_owned(),
            "INSERT INTO roles (id, name) VALUES (1, 'viewer'), (2, 'editor'), (3, 'admin')"
                .to_owned(),
            "INSERT INTO permissions (id, name)
                VALUES (1, 'read'), (2, 'write'), (3, 'delete'), (4, 'manage_users')"
                .to_owned(),
            "INSERT INTO role_permissions (role_id, permission_id)
                VALUES (1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3), (3, 4)"
                .to_owned(),
            "INSERT INTO menu_items (id, name, permission_id)
                VALUES (1, 'home', NULL), (2, 'profile', NULL), (3, 'editor', 2), (4, 'admin', 4)"
                .to_owned(),
            format!(
                "INSERT INTO users (id, name) {} SELECT i, 'user ' || i FROM n",
                n(USERS)
            ),
            // Everybody views; every 10th user also edits, every 100th administers.
            "INSERT INTO user_roles (user_id, role_id) SELECT id, 1 FROM users".to_owned(),
            "INSERT INTO user_roles (user_id, role_id) SELECT id, 2 FROM users WHERE id % 10 = 0"
                .to_owned(),
            "INSERT INTO user_roles (user_id, role_id) SELECT id, 3 FROM users WHERE id % 100 = 0"
                .to_owned(),
            format!(
                "INSERT INTO teams (id, name) {} SELECT i, 'team ' || i FROM n",
                n(TEAMS)
            ),
            // User u is in teams u, u+8, u+16, ... (mod TEAMS): TEAMS_PER_USER distinct ones.
            format!(
                "INSERT INTO team_members (user_id, team_id) {}
                 SELECT u.id, (u.id + (n.i - 1) * {step}) % {TEAMS} + 1 FROM users u, n",
                n(TEAMS_PER_USER),
                step = TEAMS / TEAMS_PER_USER
            ),
            format!(
                "INSERT INTO projects (id, name) {} SELECT i, 'project ' || i FROM n",
                n(PROJECTS)
            ),
            // Team t on about half of the projects: mostly viewer, some editor, few admin.
            format!(
                "INSERT INTO grants (team_id, project_id, role_id)
                 SELECT t.id, p.id,
                        CASE WHEN (p.id + t.id) % 10 < 7 THEN 1
                             WHEN (p.id + t.id) % 10 < 9 THEN 2 ELSE 3 END
                 FROM teams t, projects p WHERE (p.id * 7 + t.id * 13) % {TEAMS} < {half}",
                half = TEAMS / 2
            ),
            format!(
                "INSERT INTO prompts (name, lang, version, body) {}
                 SELECT names.name, langs.lang, n.i,
                        '[' || langs.lang || ' v' || n.i || '] prompt ' || names.name
                 FROM n,
                      (SELECT 'welcome' AS name UNION ALL SELECT 'goodbye'
                       UNION ALL SELECT 'onboarding' UNION ALL SELECT 'error') names,
                      (SELECT 'en' AS lang UNION ALL SELECT 'fr'
                       UNION ALL SELECT 'de' UNION ALL SELECT 'es') langs",
                n(3)
            ),
            format!("INSERT INTO seed_info (version) VALUES ({SEED_VERSION})"),
        ];
        for sql in statements {
            tx.execute(AssertSqlSafe(sql)).await?;
        }
        if late_fks {
            for (table, column, parent) in [
                ("team_members", "user_id", "users"),
                ("team_members", "team_id", "teams"),
                ("grants", "team_id", "teams"),
                ("grants", "project_id", "projects"),
                ("grants", "role_id", "roles"),
            ] {
                tx.execute(AssertSqlSafe(format!(
                    "ALTER TABLE {table} ADD FOREIGN KEY ({column}) REFERENCES {parent} (id)"
                )))
                .await?;
            }
        }
        let mut rows = Vec::new();
        for table in [
            "users",
            "user_roles",
            "teams",
            "team_members",
            "projects",
            "grants",
            "prompts",
        ] {
            let count: i64 = sqlx::query(AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            rows.push((table, count));
        }
        tx.commit().await?;
        // Statistics for the planners (PostgreSQL's autovacuum would take a while).
        sqlx::query("ANALYZE").execute(&self.pool).await?;
        Ok(Seeded {
            rows,
            took: started.elapsed(),
        })
    }

    /// Whether user `id` exists.
    async fn user_exists(conn: &mut sqlx::AnyConnection, id: i64) -> Result<bool, Error> {
        Ok(sqlx::query("SELECT 1 FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(conn)
            .await?
            .is_some())
    }

    /// User `id`'s roles, permissions and project grants (`None`: no such user), and the
    /// read count.
    pub async fn access(&self, id: i64) -> Result<(Option<Access>, u64), Error> {
        let reads = self.read().await;
        Ok((self.query_access(id).await?, reads))
    }

    /// The queries of [`Db::access`], uncounted (the start-up probe and the benchmark time
    /// them).
    pub async fn query_access(&self, id: i64) -> Result<Option<Access>, Error> {
        let mut conn = self.pool.acquire().await?;
        if !Self::user_exists(&mut conn, id).await? {
            return Ok(None);
        }
        let roles = sqlx::query(
            "SELECT r.name FROM user_roles ur JOIN roles r ON r.id = ur.role_id
             WHERE ur.user_id = $1 ORDER BY r.id",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
        let permissions = sqlx::query(
            "SELECT DISTINCT p.id, p.name FROM user_roles ur
             JOIN role_permissions rp ON rp.role_id = ur.role_id
             JOIN permissions p ON p.id = rp.permission_id
             WHERE ur.user_id = $1 ORDER BY p.id",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| row.try_get(1))
        .collect::<Result<_, _>>()?;
        // The costly part: every grant of every team of the user, through the role's
        // permissions, counted per permission without counting a project twice.
        let projects = sqlx::query(
            "SELECT p.name, COUNT(DISTINCT g.project_id) FROM team_members tm
             JOIN grants g ON g.team_id = tm.team_id
             JOIN role_permissions rp ON rp.role_id = g.role_id
             JOIN permissions p ON p.id = rp.permission_id
             WHERE tm.user_id = $1
             GROUP BY p.id, p.name ORDER BY p.id",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_, Error>>()?;
        Ok(Some(Access {
            roles,
            permissions,
            projects,
        }))
    }

    /// User `id`'s menu: the items their own roles' permissions open (`None`: no such user).
    pub async fn menu(&self, id: i64) -> Result<(Option<Vec<String>>, u64), Error> {
        let reads = self.read().await;
        let mut conn = self.pool.acquire().await?;
        if !Self::user_exists(&mut conn, id).await? {
            return Ok((None, reads));
        }
        let items = sqlx::query(
            "SELECT m.name FROM menu_items m
             WHERE m.permission_id IS NULL OR m.permission_id IN (
                 SELECT rp.permission_id FROM user_roles ur
                 JOIN role_permissions rp ON rp.role_id = ur.role_id
                 WHERE ur.user_id = $1)
             ORDER BY m.id",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
        Ok((Some(items), reads))
    }

    /// Every role with its permissions, in name order.
    pub async fn roles(&self) -> Result<(Vec<(String, Vec<String>)>, u64), Error> {
        let reads = self.read().await;
        let rows = sqlx::query(
            "SELECT r.name, p.name FROM roles r
             LEFT JOIN role_permissions rp ON rp.role_id = r.id
             LEFT JOIN permissions p ON p.id = rp.permission_id
             ORDER BY r.name, p.id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut roles: Vec<(String, Vec<String>)> = Vec::new();
        for row in rows {
            let role: String = row.try_get(0)?;
            let permission: Option<String> = row.try_get(1)?;
            match roles.last_mut() {
                Some((r, ps)) if *r == role => ps.extend(permission),
                _ => roles.push((role, permission.into_iter().collect())),
            }
        }
        Ok((roles, reads))
    }

    /// A prompt's text (`None`: no such prompt, language or version).
    pub async fn prompt(
        &self,
        name: &str,
        lang: &str,
        version: i64,
    ) -> Result<(Option<String>, u64), Error> {
        let reads = self.read().await;
        let body =
            sqlx::query("SELECT body FROM prompts WHERE name = $1 AND lang = $2 AND version = $3")
                .bind(name)
                .bind(lang)
                .bind(version)
                .fetch_optional(&self.pool)
                .await?
                .map(|row| row.try_get(0))
                .transpose()?;
        Ok((body, reads))
    }

    /// Replaces user `id`'s roles in one transaction. With `outbox`, the same transaction
    /// records the invalidation the change needs (see [`Db::pending`]), and its id is
    /// returned. Every statement of the transaction writes before it reads, so that SQLite
    /// takes its write lock first (a read first could not be upgraded if another writer
    /// committed meanwhile).
    pub async fn set_roles(
        &self,
        id: i64,
        roles: &[String],
        outbox: bool,
    ) -> Result<Result<Option<i64>, Refused>, Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM user_roles WHERE user_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if !Self::user_exists(&mut tx, id).await? {
            return Ok(Err(Refused::NoSuchUser));
        }
        let insert = "INSERT INTO user_roles (user_id, role_id)
             SELECT $1, id FROM roles WHERE name = $2
             AND NOT EXISTS (SELECT 1 FROM user_roles WHERE user_id = $1 AND role_id = roles.id)";
        let known = "SELECT 1 FROM roles WHERE name = $1";
        if let Some(unknown) = Self::link_names(&mut tx, insert, known, id, roles).await? {
            return Ok(Err(unknown));
        }
        let what = outbox.then(|| Invalidation::User(id.to_string()));
        Self::commit(tx, what).await.map(Ok)
    }

    /// Replaces a role's permissions in one transaction, as [`Db::set_roles`] does.
    pub async fn set_role_permissions(
        &self,
        role: &str,
        permissions: &[String],
        outbox: bool,
    ) -> Result<Result<Option<i64>, Refused>, Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM role_permissions WHERE role_id IN (SELECT id FROM roles WHERE name = $1)",
        )
        .bind(role)
        .execute(&mut *tx)
        .await?;
        let role_id: Option<i64> = sqlx::query("SELECT id FROM roles WHERE name = $1")
            .bind(role)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?;
        let Some(role_id) = role_id else {
            return Ok(Err(Refused::NoSuchRole));
        };
        let insert = "INSERT INTO role_permissions (role_id, permission_id)
             SELECT $1, id FROM permissions WHERE name = $2
             AND NOT EXISTS (SELECT 1 FROM role_permissions
                             WHERE role_id = $1 AND permission_id = permissions.id)";
        let known = "SELECT 1 FROM permissions WHERE name = $1";
        if let Some(unknown) =
            Self::link_names(&mut tx, insert, known, role_id, permissions).await?
        {
            return Ok(Err(unknown));
        }
        let what = outbox.then_some(Invalidation::RolePermissions);
        Self::commit(tx, what).await.map(Ok)
    }

    /// Adds an outbox row inside the caller's transaction: it commits with the change, or
    /// not at all.
    /// Links `owner` to each of `names` with `insert` (binds: owner, name; a link that exists
    /// is kept). A name that links nothing and that `known` (bind: name) does not find is
    /// refused, and the transaction is left to roll back.
    async fn link_names(
        tx: &mut sqlx::AnyConnection,
        insert: &'static str,
        known: &'static str,
        owner: i64,
        names: &[String],
    ) -> Result<Option<Refused>, Error> {
        for name in names {
            let added = sqlx::query(insert)
                .bind(owner)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            if added.rows_affected() == 0
                && sqlx::query(known)
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_none()
            {
                return Ok(Some(Refused::UnknownName(name.clone())));
            }
        }
        Ok(None)
    }

    /// Commits, with the outbox row of `what` written in the transaction when there is one;
    /// returns that row's id.
    async fn commit(
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        what: Option<Invalidation>,
    ) -> Result<Option<i64>, Error> {
        let pending = match what {
            Some(what) => Some(Self::record(&mut tx, &what).await?),
            None => None,
        };
        tx.commit().await?;
        Ok(pending)
    }

    async fn record(conn: &mut sqlx::AnyConnection, what: &Invalidation) -> Result<i64, Error> {
        let (kind, target) = what.to_row();
        sqlx::query(
            "INSERT INTO cache_outbox (kind, target, created_ms) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(kind)
        .bind(target)
        .bind(now_ms())
        .fetch_one(conn)
        .await?
        .try_get(0)
    }

    /// Removes an outbox row once its invalidation has succeeded.
    pub async fn done(&self, id: i64) -> Result<(), Error> {
        sqlx::query("DELETE FROM cache_outbox WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Outbox rows older than `age`: changes whose invalidation failed, or whose process
    /// stopped between its commit and its invalidation.
    pub async fn pending(&self, age: Duration) -> Result<Vec<Pending>, Error> {
        let rows = sqlx::query(
            "SELECT id, kind, target FROM cache_outbox WHERE created_ms <= $1 ORDER BY id LIMIT 100",
        )
        .bind(now_ms() - age.as_millis() as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut pending = Vec::new();
        for row in rows {
            let kind: String = row.try_get(1)?;
            if let Some(invalidation) = Invalidation::from_row(&kind, row.try_get(2)?) {
                pending.push(Pending {
                    id: row.try_get(0)?,
                    invalidation,
                });
            }
        }
        Ok(pending)
    }
}
