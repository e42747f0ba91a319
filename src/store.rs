//! The Redis store on a fred `Pool`. Every Redis command of the crate lives here.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::{
    Builder, ClientLike, Error as FredError, ErrorKind, Expiration, KeysInterface, LuaInterface,
    Options, Pool, ReconnectPolicy, TcpConfig,
};
use fred::types::config::UnresponsiveConfig;

use crate::config::{ConfigError, RedisConfig};

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// Deletes a key only if it still holds the given bytes, so that removing a corrupt entry
/// never removes a good one written in the meantime.
const DELETE_IF_EQUAL: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// A connection pool to Redis, shared by every clone of the layer and its handle.
///
/// Built from a [`RedisConfig`] with the settings this crate relies on: a reconnect policy
/// that retries forever with a capped backoff (fred has none by default, and a pool without
/// one is dead after the first disconnect), per-command deadlines, fail-fast reads, a bounded
/// command queue, and detection of dead connections. Cheap to clone.
///
/// ```no_run
/// use tower_redis_cache::{RedisConfig, RedisStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect(RedisConfig::from_env()?).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    read: Options,
    write: Options,
    state: AtomicU8,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("pool_size", &self.inner.pool.size())
            .field("available", &self.is_available())
            .finish()
    }
}

impl RedisStore {
    /// Builds the pool and starts connecting. Returns once connected or after the
    /// connect timeout, whichever comes first: **Redis being down is not an error** (requests
    /// are served uncached and the pool keeps reconnecting in the background). Only a
    /// configuration that cannot work is.
    ///
    /// Must be called within a Tokio runtime.
    pub async fn connect(config: RedisConfig) -> Result<Self, ConfigError> {
        let mut fred_config = config.fred.clone();
        // Keep retrying when Redis is down at start instead of failing `connect`.
        fred_config.fail_fast = false;
        let mut policy = ReconnectPolicy::new_exponential(0, 10, 250, 2);
        policy.set_jitter(10);
        let connect_timeout = config.connect_timeout;
        let command_timeout = config.command_timeout;
        let pool = Builder::from_config(fred_config)
            .with_connection_config(|c| {
                c.connection_timeout = connect_timeout;
                c.internal_command_timeout = connect_timeout;
                c.max_command_attempts = 1;
                c.max_redirections = 3;
                c.max_command_buffer_len = 10_000;
                c.unresponsive = UnresponsiveConfig {
                    max_timeout: Some(Duration::from_secs(2)),
                    interval: Duration::from_millis(500),
                };
                c.tcp = TcpConfig {
                    nodelay: Some(true),
                    keepalive: Some(
                        fred::socket2::TcpKeepalive::new()
                            .with_time(Duration::from_secs(30))
                            .with_interval(Duration::from_secs(10)),
                    ),
                    ..TcpConfig::default()
                };
            })
            .with_performance_config(|p| p.default_command_timeout = command_timeout)
            .set_policy(policy)
            .build_pool(config.pool_size)
            .map_err(|e| ConfigError::InvalidUrl(e.details().to_owned()))?;
        let _connection_tasks = pool.connect();
        let store = RedisStore {
            inner: Arc::new(Inner {
                pool,
                read: Options {
                    timeout: Some(config.lookup_timeout),
                    fail_fast: true,
                    max_attempts: Some(1),
                    ..Options::default()
                },
                write: Options {
                    timeout: Some(command_timeout),
                    fail_fast: true,
                    max_attempts: Some(1),
                    ..Options::default()
                },
                state: AtomicU8::new(UNKNOWN),
            }),
        };
        match tokio::time::timeout(connect_timeout, store.inner.pool.wait_for_connect()).await {
            Ok(Ok(())) => store.observe_ok(),
            Ok(Err(e)) => store.observe_err("connect", &e),
            Err(_) => {
                let e = FredError::new(
                    ErrorKind::Timeout,
                    "no connection within the connect timeout",
                );
                store.observe_err("connect", &e);
            }
        }
        Ok(store)
    }

    /// The underlying fred pool, for commands of your own.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Whether the last command reached Redis. Starts `false` until a command succeeds.
    pub fn is_available(&self) -> bool {
        self.inner.state.load(Ordering::Relaxed) == UP
    }

    fn observe_ok(&self) {
        if self.inner.state.swap(UP, Ordering::Relaxed) == DOWN {
            tracing::info!("redis is available again; caching resumed");
        }
    }

    fn observe_err(&self, op: &'static str, err: &FredError) {
        if self.inner.state.swap(DOWN, Ordering::Relaxed) != DOWN {
            tracing::warn!(
                op,
                kind = ?err.kind(),
                error = %err.details(),
                "redis is unavailable; serving uncached until it answers again"
            );
        } else {
            tracing::trace!(op, error = %err.details(), "redis still unavailable");
        }
    }

    fn observe<T>(&self, op: &'static str, r: Result<T, FredError>) -> Result<T, FredError> {
        match &r {
            Ok(_) => self.observe_ok(),
            // An error answered by Redis (wrong type, OOM, READONLY...) means it is reachable
            // but this command failed; it is logged per occurrence at debug level.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Unknown | ErrorKind::InvalidArgument | ErrorKind::Parse
                ) =>
            {
                tracing::debug!(op, kind = ?e.kind(), error = %e.details(), "redis command failed");
            }
            Err(e) => self.observe_err(op, e),
        }
        r
    }

    /// GET within the lookup deadline.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Bytes>, FredError> {
        let r = self
            .inner
            .pool
            .with_options(&self.inner.read)
            .get::<Option<Bytes>, _>(key)
            .await;
        self.observe("get", r)
    }

    /// SET with an expiry in milliseconds.
    pub(crate) async fn set(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), FredError> {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let r = self
            .inner
            .pool
            .with_options(&self.inner.write)
            .set::<(), _, _>(key, value, Some(Expiration::PX(ms)), None, false)
            .await;
        self.observe("set", r)
    }

    /// Deletes keys; returns how many existed.
    pub(crate) async fn delete(&self, keys: Vec<String>) -> Result<u64, FredError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let r = self
            .inner
            .pool
            .with_options(&self.inner.write)
            .del::<u64, _>(keys)
            .await;
        self.observe("del", r)
    }

    /// Deletes `key` only if it still holds `value`.
    pub(crate) async fn delete_if_equal(&self, key: &str, value: Bytes) -> Result<bool, FredError> {
        let r = self
            .inner
            .pool
            .with_options(&self.inner.write)
            .eval::<i64, _, _, _>(DELETE_IF_EQUAL, key, value)
            .await;
        self.observe("delete_if_equal", r).map(|n| n == 1)
    }

    /// PING; returns the round-trip time.
    pub(crate) async fn ping(&self) -> Result<Duration, FredError> {
        let start = Instant::now();
        let r = self
            .inner
            .pool
            .with_options(&self.inner.write)
            .ping::<()>(None)
            .await;
        self.observe("ping", r).map(|()| start.elapsed())
    }
}
