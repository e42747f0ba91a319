//! The Redis store on a fred `Pool`. Every Redis command of the crate lives here.

pub(crate) mod batch;
pub(crate) mod breaker;
pub(crate) mod config;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::clients::{Client, WithOptions};
use fred::prelude::{
    Builder, ClientLike, Error as FredError, ErrorKind, Expiration, KeysInterface, LuaInterface,
    Options, Pool, ReconnectPolicy, SortedSetsInterface, TcpConfig,
};
use fred::types::config::UnresponsiveConfig;
use fred::types::{FromValue, MultipleKeys, MultipleValues};

use crate::store::redis::breaker::{Breaker, BreakerState};
use crate::store::redis::config::{ConfigError, RedisConfig};
use crate::store::{Incomplete, Write, Written, MARKER_TTL};

/// Deletes a key only if it still holds the given bytes, so that removing a corrupt entry
/// never removes a good one written in the meantime.
static DELETE_IF_EQUAL: Lua = Lua::new(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
);

/// A Lua script, sent by its SHA-1 (EVALSHA) once Redis has told it (SCRIPT LOAD, once per
/// process), and as text (EVAL) when the server does not know it (NOSCRIPT: restarted,
/// flushed, another node of a cluster; EVAL caches it there again).
pub(crate) struct Lua {
    text: &'static str,
    /// The same on every server: SHA-1 of the text.
    sha: OnceLock<fred::bytes_utils::Str>,
    /// The same script without its `#!lua` flags line, for servers older than Redis 7.0
    /// (which do not know it).
    compat: Option<&'static Lua>,
}

impl Lua {
    const fn new(text: &'static str) -> Self {
        Lua {
            text,
            sha: OnceLock::new(),
            compat: None,
        }
    }

    /// A script with flags (`#!lua flags=...` then `compat`'s text), and `compat` for servers
    /// that reject the flags line.
    const fn flagged(text: &'static str, compat: &'static Lua) -> Self {
        Lua {
            text,
            sha: OnceLock::new(),
            compat: Some(compat),
        }
    }
}

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

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    /// How the pool was built, for the near-cache's subscriber connection.
    #[cfg_attr(not(feature = "near"), allow(dead_code))]
    builder: Builder,
    pub(crate) read: Options,
    write: Options,
    breaker: Breaker,
    /// Lookups batched into MGET (not on a cluster; see `batch`).
    pub(crate) batcher: Option<crate::store::redis::batch::Batcher>,
    /// Set when Redis refuses SCRIPT LOAD for good (ACL): scripts go as text (EVAL).
    eval_only: AtomicBool,
    /// Set when Redis does not know script flags (older than 7.0): scripts go without.
    no_flags: AtomicBool,
    /// Whether entry writes are paused because Redis is (nearly) out of memory.
    pub(crate) memory: MemoryGuard,
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
        probe(&config).await?;
        let mut fred_config = config.fred.clone();
        // Keep retrying when Redis is down at start instead of failing `connect`.
        fred_config.fail_fast = false;
        let mut policy = ReconnectPolicy::new_exponential(0, 10, 250, 2);
        policy.set_jitter(10);
        let connect_timeout = config.connect_timeout;
        let command_timeout = config.command_timeout;
        let mut builder = Builder::from_config(fred_config);
        builder
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
            .set_policy(policy);
        let pool = builder
            .build_pool(config.pool_size)
            .map_err(|e| ConfigError::InvalidUrl(e.details().to_owned()))?;
        let _connection_tasks = pool.connect();
        let batch = config.batch_lookups && !pool.is_clustered();
        let store = RedisStore {
            inner: Arc::new(Inner {
                pool,
                builder,
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
                breaker: Breaker::new(),
                batcher: batch.then(crate::store::redis::batch::Batcher::default),
                eval_only: AtomicBool::new(false),
                no_flags: AtomicBool::new(false),
                memory: MemoryGuard::new(),
            }),
        };
        match tokio::time::timeout(connect_timeout, store.inner.pool.wait_for_connect()).await {
            Ok(Ok(())) => store.inner.breaker.success(),
            Ok(Err(e)) => store.inner.breaker.open_now("connect", e.details()),
            Err(_) => store
                .inner
                .breaker
                .open_now("connect", "no connection within the connect timeout"),
        }
        Ok(store)
    }

    /// The deadline of a lookup.
    pub(crate) fn lookup_timeout(&self) -> Duration {
        self.inner.lookup_timeout()
    }

    /// The underlying fred pool, for commands of your own.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Whether Redis is in use: it has answered, and the circuit breaker is closed.
    pub fn is_available(&self) -> bool {
        self.inner.breaker.ever_up() && self.inner.breaker.state() == BreakerState::Closed
    }

    /// The state of the circuit breaker.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// How many times the breaker has opened.
    pub(crate) fn breaker_opened(&self) -> u64 {
        self.inner.breaker.opened.load(Ordering::Relaxed)
    }

    /// Fails at once, without touching Redis, while the breaker is open.
    /// A subscriber client on the same settings as the pool (not connected yet).
    #[cfg(feature = "near")]
    pub(crate) fn subscriber(&self) -> Result<fred::clients::SubscriberClient, FredError> {
        self.inner.builder.build_subscriber_client()
    }

    /// PUBLISH within the command deadline (not gated by the breaker: it is rare, and a
    /// message that gets through is worth the try).
    #[cfg(feature = "near")]
    pub(crate) async fn publish(&self, channel: &str, message: &str) -> Result<(), FredError> {
        use fred::interfaces::PubsubInterface;
        let r = self
            .inner
            .pool
            .next_connected()
            .with_options(&self.inner.write)
            .publish::<(), _, _>(channel, message)
            .await;
        self.observe("publish", r)
    }

    fn gate(&self) -> Result<(), FredError> {
        if self.inner.breaker.allow() {
            Ok(())
        } else {
            Err(FredError::new(ErrorKind::Canceled, "circuit breaker open"))
        }
    }

    fn observe<T>(&self, op: &'static str, r: Result<T, FredError>) -> Result<T, FredError> {
        self.inner.observe(op, r)
    }

    /// Runs a script: EVALSHA once its SHA-1 is known, EVAL when the server does not know it
    /// (a NOSCRIPT answer means it did not run, so running it again is safe).
    async fn script<R, K, V>(
        &self,
        client: &WithOptions<Client>,
        lua: &'static Lua,
        keys: K,
        args: V,
    ) -> Result<R, FredError>
    where
        R: FromValue,
        K: Into<MultipleKeys> + Send,
        V: TryInto<MultipleValues> + Send,
        V::Error: Into<FredError> + Send,
    {
        let keys: MultipleKeys = keys.into();
        let args: MultipleValues = args.try_into().map_err(Into::into)?;
        let lua = match lua.compat {
            Some(compat) if self.inner.no_flags.load(Ordering::Relaxed) => compat,
            _ => lua,
        };
        let r = self
            .run_script(client, lua, keys.clone(), args.clone())
            .await;
        match (r, lua.compat) {
            // Redis before 7.0 reads the flags line as Lua, and fails to compile it.
            (Err(e), Some(compat)) if e.details().contains("Error compiling script") => {
                tracing::debug!(error = %e.details(), "script flags unknown to this Redis; sent without");
                self.inner.no_flags.store(true, Ordering::Relaxed);
                self.run_script(client, compat, keys, args).await
            }
            (r, _) => r,
        }
    }

    async fn run_script<R: FromValue>(
        &self,
        client: &WithOptions<Client>,
        lua: &'static Lua,
        keys: MultipleKeys,
        args: MultipleValues,
    ) -> Result<R, FredError> {
        if let Some(sha) = self.sha(client, lua).await {
            match client
                .evalsha::<R, _, _, _>(sha, keys.clone(), args.clone())
                .await
            {
                Err(e) if e.details().starts_with("NOSCRIPT") => {}
                r => return r,
            }
        }
        client.eval::<R, _, _, _>(lua.text, keys, args).await
    }

    /// The script's SHA-1, asked of Redis the first time (SCRIPT LOAD also caches the script
    /// on that server). `None`: send the text this time.
    async fn sha(
        &self,
        client: &WithOptions<Client>,
        lua: &'static Lua,
    ) -> Option<fred::bytes_utils::Str> {
        if let Some(sha) = lua.sha.get() {
            return Some(sha.clone());
        }
        if self.inner.eval_only.load(Ordering::Relaxed) {
            return None;
        }
        match client
            .script_load::<fred::bytes_utils::Str, _>(lua.text)
            .await
        {
            Ok(sha) => Some(lua.sha.get_or_init(|| sha).clone()),
            Err(e) => {
                if refused_for_good(&e) {
                    tracing::debug!(error = %e.details(), "SCRIPT LOAD refused; scripts are sent as text");
                    self.inner.eval_only.store(true, Ordering::Relaxed);
                }
                None
            }
        }
    }

    /// GET within the lookup deadline (batched with concurrent lookups into one MGET where
    /// the store batches).
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Bytes>, FredError> {
        self.lookup(key, None).await.map(|(value, _)| value)
    }

    /// [`get`](Self::get), and the invalidation sequence at `seq_key` read in the same
    /// command when the lookup is batched (`None` otherwise: read it on a miss).
    pub(crate) async fn lookup(
        &self,
        key: &str,
        seq_key: Option<&Arc<str>>,
    ) -> Result<(Option<Bytes>, Option<u64>), FredError> {
        self.gate()?;
        let batcher = self.inner.batcher.as_ref();
        // Alone (nothing out to batch with): a GET of its own, counted as out meanwhile.
        let alone = batcher.and_then(crate::store::redis::batch::Batcher::alone);
        if let (Some(batcher), None) = (batcher, &alone) {
            if let Some(answer) = batcher.submit(&self.inner, key, seq_key) {
                // Its own deadline too, should the batch task not be driven.
                return match tokio::time::timeout(self.lookup_timeout(), answer).await {
                    Ok(Ok(reply)) => reply,
                    Ok(Err(_)) => Err(FredError::new(ErrorKind::Canceled, "lookup batch dropped")),
                    Err(_) => Err(FredError::new(
                        ErrorKind::Timeout,
                        "lookup batch did not answer in time",
                    )),
                };
            }
        }
        let r = self
            .inner
            .pool
            .next_connected()
            .with_options(&self.inner.read)
            .get::<Option<Bytes>, _>(key)
            .await;
        drop(alone);
        self.observe("get", r).map(|value| (value, None))
    }

    /// Deletes `key` only if it still holds `value`.
    pub(crate) async fn delete_if_equal(&self, key: &str, value: Bytes) -> Result<bool, FredError> {
        let client = self
            .inner
            .pool
            .next_connected()
            .with_options(&self.inner.write);
        let r = self
            .script::<i64, _, _>(&client, &DELETE_IF_EQUAL, key, value)
            .await;
        self.observe("delete_if_equal", r).map(|n| n == 1)
    }

    /// PING; returns the round-trip time.
    pub(crate) async fn ping(&self) -> Result<Duration, FredError> {
        let start = Instant::now();
        let r = self
            .inner
            .pool
            .next_connected()
            .with_options(&self.inner.write)
            .ping::<()>(None)
            .await;
        self.observe("ping", r).map(|()| start.elapsed())
    }
}

impl Inner {
    /// The deadline of a lookup.
    pub(crate) fn lookup_timeout(&self) -> Duration {
        self.read
            .timeout
            .unwrap_or(crate::store::redis::config::DEFAULT_LOOKUP_TIMEOUT)
    }

    /// Feeds a command's outcome to the circuit breaker.
    pub(crate) fn observe<T>(
        &self,
        op: &'static str,
        r: Result<T, FredError>,
    ) -> Result<T, FredError> {
        match &r {
            Ok(_) => self.breaker.success(),
            // Redis answered: it is reachable, this command failed (wrong type, out of
            // memory, read-only replica, missing permission...). Not an outage.
            Err(e) if answered(e) => {
                self.breaker.success();
                tracing::debug!(op, error = %e.details(), "redis refused a command");
                if e.details().starts_with("OOM") {
                    self.memory.out_of_memory();
                }
            }
            Err(e) => self.breaker.failure(op, e.details()),
        }
        r
    }
}

/// One connection attempt, to tell a configuration that cannot work (untrusted certificate,
/// refused credentials) from a Redis that is down (which is not an error: the pool keeps
/// trying).
async fn probe(config: &RedisConfig) -> Result<(), ConfigError> {
    let mut fred_config = config.fred.clone();
    fred_config.fail_fast = true;
    let timeout = config.connect_timeout;
    let client = Builder::from_config(fred_config)
        .with_connection_config(|c| {
            c.connection_timeout = timeout;
            c.internal_command_timeout = timeout;
        })
        .build()
        .map_err(|e| ConfigError::InvalidUrl(e.details().to_owned()))?;
    let result = tokio::time::timeout(timeout.saturating_mul(2), client.init()).await;
    // `quit` has no deadline of its own on this client: a frozen Redis must not hold start-up.
    let _ = tokio::time::timeout(timeout, client.quit()).await;
    let e = match result {
        Ok(Ok(_)) | Err(_) => return Ok(()),
        Ok(Err(e)) => e,
    };
    let details = e.details().to_owned();
    let lower = details.to_ascii_lowercase();
    if matches!(e.kind(), ErrorKind::Auth)
        || [
            "wrongpass",
            "noauth",
            "invalid username-password",
            "invalid password",
        ]
        .iter()
        .any(|p| lower.contains(p))
    {
        return Err(ConfigError::Auth(details));
    }
    if lower.contains("certificate") || lower.contains("handshake") || lower.contains("tls") {
        return Err(ConfigError::Tls(details));
    }
    tracing::debug!(error = %details, "redis not reachable at start");
    Ok(())
}

/// Whether Redis refused a command in a way that will not pass: a missing ACL permission, a
/// command renamed or disabled, refused credentials.
fn refused_for_good(e: &FredError) -> bool {
    let details = e.details();
    let first = details.split_whitespace().next().unwrap_or("");
    matches!(first, "NOPERM" | "NOAUTH" | "WRONGPASS")
        || matches!(e.kind(), ErrorKind::Auth | ErrorKind::InvalidCommand)
        || details.contains("unknown command")
}

/// Whether an error is Redis's answer to a command (so Redis is reachable), as opposed to a
/// timeout, a lost connection, or a server that cannot serve at all (loading, busy).
fn answered(e: &FredError) -> bool {
    const ANSWERS: [&str; 8] = [
        "ERR",
        "WRONGTYPE",
        "OOM",
        "READONLY",
        "NOSCRIPT",
        "NOPERM",
        "EXECABORT",
        "NOAUTH",
    ];
    let first = e.details().split_whitespace().next().unwrap_or("");
    matches!(
        e.kind(),
        ErrorKind::InvalidArgument | ErrorKind::InvalidCommand | ErrorKind::Parse
    ) || ANSWERS.contains(&first)
}

/// Adds members to an index (a sorted set scored by expiry, in Redis's own clock so that
/// instances with skewed clocks agree), never lowering a member's score (variants of one path
/// may have different TTLs), prunes expired members and keeps the index alive at least as
/// long as its newest member. ARGV: TTL in ms, the index's TTL in ms, then the members.
///
/// Pruning removes at most 128 expired members per call (the lowest ranks: scores are
/// expiries), so that a write never pays for a whole index expiring at once; each write adds
/// a member or two, so pruning keeps up.
static ADD_TO_INDEX: Lua = Lua::new(
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = now + tonumber(ARGV[1])
for i = 3, #ARGV do
  local cur = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if (not cur) or tonumber(cur) < score then redis.call('ZADD', KEYS[1], score, ARGV[i]) end
end
local expired = redis.call('ZCOUNT', KEYS[1], '-inf', now)
if expired > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, math.min(expired, 128) - 1) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1"#,
);

/// Admits a variant (ARGV[1], an entry key) into the set of its path's variants (KEYS[1],
/// scored by expiry like an index): a variant already there is always admitted (its score
/// raised), a new one only while fewer than ARGV[4] live variants are. Returns 1 if
/// admitted, 0 if not. ARGV: member, TTL in ms, the set's TTL in ms, the bound. One key, so
/// one hash slot.
static ADMIT_VARIANT: Lua = Lua::new(
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = now + tonumber(ARGV[2])
local cur = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not cur) or tonumber(cur) <= now then
  if redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf') >= tonumber(ARGV[4]) then return 0 end
end
if (not cur) or tonumber(cur) < score then redis.call('ZADD', KEYS[1], score, ARGV[1]) end
local expired = redis.call('ZCOUNT', KEYS[1], '-inf', now)
if expired > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, math.min(expired, 128) - 1) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1"#,
);

/// Removes members from an index only if their score is still the one read (a member
/// re-added meanwhile by a fresh write has a new score and stays). ARGV: member, score, ...
/// Two commands whatever the number of members (ZMSCORE, ZREM), so that a slice of an
/// index costs Redis little more than the members it removes. Not `allow-oom`: neither
/// command is refused when Redis is full.
static REMOVE_IF_SCORE: Lua = Lua::new(
    r#"
local members, read = {}, {}
for i = 1, #ARGV, 2 do
  members[#members + 1] = ARGV[i]
  read[#read + 1] = tonumber(ARGV[i + 1])
end
if #members == 0 then return 0 end
local now = redis.call('ZMSCORE', KEYS[1], unpack(members))
local gone = {}
for i = 1, #members do
  if now[i] and tonumber(now[i]) == read[i] then gone[#gone + 1] = members[i] end
end
if #gone == 0 then return 0 end
return redis.call('ZREM', KEYS[1], unpack(gone))"#,
);

/// Moves a pending value (KEYS[1], see `pending_key`) to its key (KEYS[2], same slot) and flips
/// it to confirmed, only if it is still this writer's value: readers of the key see the old
/// value or the new one, never a gap.
static CONFIRM: Lua = Lua::new(
    r#"
if redis.call('GETRANGE', KEYS[1], 5, 12) == ARGV[1] then
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('SETRANGE', KEYS[2], 4, ARGV[2])
  return 1
end
return 0"#,
);

/// Where a value waits while its writer checks for invalidations: beside its key, in the same
/// hash slot (the key holds no braces, so the tag is the whole key), never served. An
/// invalidation removes it with its key.
pub(crate) fn pending_key(key: &str) -> String {
    format!("{{{key}}}:w")
}

/// Deletes an entry only if it is still this writer's value.
static WITHDRAW: Lua = Lua::new(
    r#"
if redis.call('GETRANGE', KEYS[1], 5, 12) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0"#,
);

// Script bodies used twice (with flags and without), as literals for `concat!`.
macro_rules! raise_marker {
    () => {
        r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local seq = tonumber(ARGV[1])
if seq > cur then cur = seq end
redis.call('SET', KEYS[1], cur, 'PX', ARGV[2])
return cur"#
    };
}
macro_rules! next_seq {
    () => {
        "return redis.call('INCR', KEYS[1])"
    };
}

/// Raises a marker to a sequence number, never lowers it (invalidations may land out of
/// order on different connections), and keeps it alive for the marker TTL. `allow-oom`: an
/// invalidation must succeed when Redis is full (a marker is a few bytes; without the flag
/// its SET is refused with OOM, and the entries it protects stay cached).
static RAISE_MARKER: Lua = Lua::flagged(
    concat!("#!lua flags=allow-oom\n", raise_marker!()),
    &RAISE_MARKER_COMPAT,
);
static RAISE_MARKER_COMPAT: Lua = Lua::new(raise_marker!());

/// Takes the next invalidation sequence number (INCR), also when Redis is full
/// (`allow-oom`, see `RAISE_MARKER`).
static NEXT_SEQ: Lua = Lua::flagged(
    concat!("#!lua flags=allow-oom\n", next_seq!()),
    &NEXT_SEQ_COMPAT,
);
static NEXT_SEQ_COMPAT: Lua = Lua::new(next_seq!());

/// The arguments of `ADD_TO_INDEX` for `members`, kept for `ttl_ms`.
fn index_args(ttl_ms: i64, members: &[&str]) -> Vec<String> {
    let mut args = vec![
        ttl_ms.to_string(),
        // Indexes outlive their newest member a little, so pruning sees it expire.
        ttl_ms.saturating_add(1000).to_string(),
    ];
    args.extend(members.iter().map(|m| (*m).to_owned()));
    args
}

/// A duration in whole milliseconds for Redis (`PX`, `PEXPIRE`), at least 1 and at most a
/// century: Redis refuses an expiry that overflows its clock (`Duration::MAX` from a setting
/// or a header would make every write fail).
fn ms(d: Duration) -> i64 {
    const CENTURY_MS: i64 = 100 * 365 * 86_400 * 1000;
    i64::try_from(d.as_millis())
        .unwrap_or(i64::MAX)
        .clamp(1, CENTURY_MS)
}

impl RedisStore {
    /// The namespace's invalidation sequence (0 before the first invalidation), read within
    /// the lookup deadline.
    pub(crate) async fn read_seq(
        &self,
        seq_key: &str,
        timeout: Duration,
    ) -> Result<u64, FredError> {
        self.gate()?;
        let options = Options {
            timeout: Some(timeout),
            ..self.inner.read.clone()
        };
        let r = self
            .inner
            .pool
            .next_connected()
            .with_options(&options)
            .get::<Option<u64>, _>(seq_key)
            .await;
        self.observe("get_seq", r).map(Option::unwrap_or_default)
    }

    /// Writes an entry race-safely: pending value, index registration, marker check, then
    /// confirm (or withdraw if an invalidation ran since the miss began).
    pub(crate) async fn write(&self, w: Write) -> Result<Written, FredError> {
        self.gate()?;
        if self.writes_paused().await {
            return Ok(Written::Paused);
        }
        // The value, and its key in each index, its variant set and beside (pending).
        self.inner.memory.wrote(
            w.value.len()
                + (w.indexes.len() + 2) * (w.key.len() + 64)
                + w.path.as_ref().map_or(0, |(_, p)| p.len() + 64),
        );
        let pool = self
            .inner
            .pool
            .next_connected()
            .with_options(&self.inner.write);
        let ttl_ms = ms(w.ttl);
        if let Some(v) = &w.variants {
            let args = vec![
                w.key.clone(),
                ttl_ms.to_string(),
                ttl_ms.saturating_add(1000).to_string(),
                v.max.to_string(),
            ];
            let r = self
                .script::<i64, _, _>(&pool, &ADMIT_VARIANT, v.key.as_str(), args)
                .await;
            if self.observe("variants", r)? == 0 {
                return Ok(Written::TooManyVariants);
            }
        }
        let pending = pending_key(&w.key);
        let r = pool
            .set::<(), _, _>(&pending, w.value, Some(Expiration::PX(ttl_ms)), None, false)
            .await;
        self.observe("set", r)?;
        // The entry, and its variant set (so that invalidating an index resets the bound).
        let members: Vec<&str> = std::iter::once(w.key.as_str())
            .chain(w.variants.as_ref().map(|v| v.key.as_str()))
            .collect();
        let path: Vec<&str> = w.path.iter().map(|(_, p)| p.as_str()).collect();
        let registrations = w
            .indexes
            .iter()
            .map(|index| (index.as_str(), &members[..]))
            .chain(
                w.path
                    .iter()
                    .map(|(registry, _)| (registry.as_str(), &path[..])),
            )
            .map(|(index, members)| {
                self.script::<i64, _, _>(&pool, &ADD_TO_INDEX, index, index_args(ttl_ms, members))
            });
        for r in futures_util::future::join_all(registrations).await {
            self.observe("index", r)?;
        }
        let mut moved = if self.inner.pool.is_clustered() {
            // Markers and counter in different slots: one GET each.
            let markers = w
                .markers
                .iter()
                .map(|m| pool.get::<Option<u64>, _>(m.as_str()));
            let seq_now = pool.get::<Option<u64>, _>(w.seq_key.as_str());
            let (markers, seq_now) =
                futures_util::future::join(futures_util::future::join_all(markers), seq_now).await;
            let mut moved = self.observe("seq", seq_now)?.unwrap_or(0) < w.miss_seq;
            for r in markers {
                moved |= self.observe("marker", r)?.unwrap_or(0) > w.miss_seq;
            }
            moved
        } else {
            // One server: the counter and every marker in one MGET.
            let keys: Vec<&str> = std::iter::once(w.seq_key.as_str())
                .chain(w.markers.iter().map(String::as_str))
                .collect();
            let values = pool.mget::<Vec<Option<u64>>, _>(keys).await;
            let values = self.observe("marker", values)?;
            let mut values = values.into_iter();
            let seq_now = values.next().flatten().unwrap_or(0);
            seq_now < w.miss_seq || values.any(|m| m.unwrap_or(0) > w.miss_seq)
        };
        // Markers live `MARKER_TTL`: an older miss cannot be checked against them.
        moved |= w.started.elapsed() + Duration::from_secs(10) >= MARKER_TTL;
        let nonce = Bytes::copy_from_slice(&w.nonce);
        if moved {
            let r = self
                .script::<i64, _, _>(&pool, &WITHDRAW, pending.as_str(), vec![nonce])
                .await;
            self.observe("withdraw", r)?;
            return Ok(Written::Refused);
        }
        let r = self
            .script::<i64, _, _>(
                &pool,
                &CONFIRM,
                vec![pending.as_str(), w.key.as_str()],
                vec![nonce, Bytes::from_static(&[crate::entry::CONFIRMED])],
            )
            .await;
        // 0: the entry was invalidated (or replaced) meanwhile; nothing to serve from it.
        match self.observe("confirm", r)? {
            1 => Ok(Written::Stored),
            _ => Ok(Written::Refused),
        }
    }

    /// Starts an invalidation: takes the next sequence number and sets `markers` to it, so
    /// that responses computed before now are not stored afterwards.
    async fn mark(&self, seq_key: &str, markers: &[String]) -> Result<(), FredError> {
        let pool = self
            .inner
            .pool
            .next_connected()
            .with_options(&self.inner.write);
        let seq = self
            .script::<u64, _, _>(&pool, &NEXT_SEQ, seq_key, Vec::<String>::new())
            .await;
        let seq = self.observe("incr", seq)?;
        let sets = markers.iter().map(|m| {
            self.script::<i64, _, _>(
                &pool,
                &RAISE_MARKER,
                m.as_str(),
                vec![seq.to_string(), ms(MARKER_TTL).to_string()],
            )
        });
        for r in futures_util::future::join_all(sets).await {
            self.observe("mark", r)?;
        }
        Ok(())
    }

    /// SET NX PX: true if this caller took the lock.
    pub(crate) async fn try_lock(&self, key: &str, ttl: Duration) -> Result<bool, FredError> {
        self.gate()?;
        let r = self
            .inner
            .pool
            .next_connected()
            .with_options(&self.inner.read)
            .set::<Option<String>, _, _>(
                key,
                "1",
                Some(Expiration::PX(ms(ttl))),
                Some(fred::types::SetOptions::NX),
                false,
            )
            .await;
        self.observe("lock", r).map(|r| r.is_some())
    }

    /// GET of a plain value (not on the request path: the command deadline applies).
    pub(crate) async fn get_value(&self, key: &str) -> Result<Option<Bytes>, FredError> {
        let r = self
            .inner
            .pool
            .next_connected()
            .with_options(&self.inner.write)
            .get::<Option<Bytes>, _>(key)
            .await;
        self.observe("get", r)
    }

    /// SET of a plain value with an expiry, registered in `indexes` (sorted sets scored by
    /// expiry, like entries) so that index invalidations remove it too.
    pub(crate) async fn set_value(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
        indexes: &[String],
    ) -> Result<(), FredError> {
        let pool = self
            .inner
            .pool
            .next_connected()
            .with_options(&self.inner.write);
        let ttl_ms = ms(ttl);
        let r = pool
            .set::<(), _, _>(key, value, Some(Expiration::PX(ttl_ms)), None, false)
            .await;
        self.observe("set", r)?;
        let adds = indexes.iter().map(|index| {
            self.script::<i64, _, _>(&pool, &ADD_TO_INDEX, index, index_args(ttl_ms, &[key]))
        });
        for r in futures_util::future::join_all(adds).await {
            self.observe("index", r)?;
        }
        Ok(())
    }

    /// Unlinks keys, grouped by hash slot so that it works on a cluster; returns how many
    /// existed.
    pub(crate) async fn unlink(&self, keys: Vec<String>) -> Result<u64, FredError> {
        let mut removed = 0;
        self.unlink_counted(self.inner.pool.next_connected(), keys, &mut removed)
            .await?;
        Ok(removed)
    }

    /// Unlinks keys in commands of at most [`SLICE`] keys of one hash slot, at most
    /// [`IN_FLIGHT`] of them out at once, adding to `removed` how many existed as they are
    /// answered (so that a failure part-way still counts what was removed before it).
    async fn unlink_counted(
        &self,
        client: &Client,
        keys: Vec<String>,
        removed: &mut u64,
    ) -> Result<(), FredError> {
        use futures_util::StreamExt;
        if keys.is_empty() {
            return Ok(());
        }
        let pool = client.with_options(&self.inner.write);
        let slices: Vec<Vec<fred::types::Key>> = if self.inner.pool.is_clustered() {
            fred::util::group_by_hash_slot(keys)?
                .into_values()
                .flat_map(|group| {
                    Vec::from(group)
                        .chunks(SLICE)
                        .map(<[_]>::to_vec)
                        .collect::<Vec<_>>()
                })
                .collect()
        } else {
            keys.chunks(SLICE)
                .map(|c| c.iter().map(|k| k.as_str().into()).collect())
                .collect()
        };
        // Futures made up front: a stream's closure over borrowed state is not `Send` enough
        // for the handle's spawned tasks.
        let calls: Vec<_> = slices
            .into_iter()
            .map(|slice| pool.unlink::<u64, _>(slice))
            .collect();
        let mut calls = futures_util::stream::iter(calls).buffer_unordered(IN_FLIGHT);
        let mut failed = None;
        while let Some(r) = calls.next().await {
            match self.observe("unlink", r) {
                Ok(n) => *removed += n,
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Invalidates exact keys, after setting `markers`.
    pub(crate) async fn invalidate_keys(
        &self,
        seq_key: &str,
        markers: &[String],
        keys: Vec<String>,
    ) -> Result<u64, FredError> {
        self.mark(seq_key, markers).await?;
        self.unlink_with_pending(keys).await
    }

    /// Unlinks keys and their pending values (see `pending_key`); returns how many of the
    /// keys existed.
    async fn unlink_with_pending(&self, keys: Vec<String>) -> Result<u64, FredError> {
        let pending = keys.iter().map(|k| pending_key(k)).collect();
        let (removed, pending) =
            futures_util::future::join(self.unlink(keys), self.unlink(pending)).await;
        pending?;
        removed
    }

    /// Invalidates every member of `indexes`, after setting `markers`; returns how many
    /// entries existed. Members whose name starts with `uncounted` (the index's own
    /// bookkeeping, such as variant sets) are removed too but not counted.
    ///
    /// Each index is read a page at a time (ZSCAN), and a page's keys are unlinked before its
    /// members leave the index, only if their score is unchanged (an entry stored meanwhile
    /// by a fresh request has a new score and stays indexed). No command carries more than
    /// [`SLICE`] keys or members, whatever the size of the index, and at most
    /// [`INDEXES_AT_ONCE`] indexes are read at once. A failure part-way keeps what was done:
    /// the error says how many entries were removed, and the others are still indexed, so a
    /// retry removes them.
    pub(crate) async fn invalidate_indexes(
        &self,
        seq_key: &str,
        markers: &[String],
        indexes: &[String],
        uncounted: &str,
    ) -> Result<u64, Incomplete> {
        use futures_util::StreamExt;
        self.mark(seq_key, markers)
            .await
            .map_err(|error| Incomplete { removed: 0, error })?;
        // One connection of the pool for the whole invalidation: the others serve lookups
        // without queueing behind its commands.
        let client = self.inner.pool.next_connected();
        let drains: Vec<_> = indexes
            .iter()
            .map(|index| self.drain_index(client, index, uncounted))
            .collect();
        let mut drains = futures_util::stream::iter(drains).buffer_unordered(INDEXES_AT_ONCE);
        let mut removed = 0;
        let mut failed = None;
        while let Some((n, r)) = drains.next().await {
            removed += n;
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
        }
        match failed {
            None => Ok(removed),
            Some(error) => Err(Incomplete { removed, error }),
        }
    }

    /// Removes every member of one index, page by page: how many entries it removed, and the
    /// error it stopped at, if any.
    async fn drain_index(
        &self,
        client: &Client,
        index: &str,
        uncounted: &str,
    ) -> (u64, Result<(), FredError>) {
        use fred::types::scan::Scanner;
        use futures_util::StreamExt;
        let pool = client.with_options(&self.inner.write);
        let mut removed = 0;
        let mut pages = std::pin::pin!(client.zscan(index, "*", Some(SLICE as u32)));
        while let Some(page) = pages.next().await {
            let mut page = match self.observe("zscan", page) {
                Ok(page) => page,
                Err(e) => return (removed, Err(e)),
            };
            let mut members: Vec<(String, f64)> = page
                .take_results()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(m, score)| Some((m.into_string()?, score)))
                .collect();
            // The next page is read while this one is removed (SCAN allows removals).
            page.next();
            // A page may repeat members of an earlier one (ZSCAN while the set is resized).
            members.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            members.dedup_by(|a, b| a.0 == b.0);
            let (own, entries): (Vec<&str>, Vec<&str>) = members
                .iter()
                .map(|(m, _)| m.as_str())
                .partition(|m| !uncounted.is_empty() && m.starts_with(uncounted));
            let others: Vec<String> = entries
                .iter()
                .map(|k| pending_key(k))
                .chain(own.iter().map(|k| (*k).to_owned()))
                .collect();
            let entries: Vec<String> = entries.iter().map(|k| (*k).to_owned()).collect();
            let mut ignored = 0;
            let (counted, others) = futures_util::future::join(
                self.unlink_counted(client, entries, &mut removed),
                self.unlink_counted(client, others, &mut ignored),
            )
            .await;
            if let Err(e) = counted.and(others) {
                // The page's members stay indexed: a retry finds them again.
                return (removed, Err(e));
            }
            for slice in members.chunks(SLICE) {
                let args: Vec<String> = slice
                    .iter()
                    .flat_map(|(m, score)| [m.clone(), score.to_string()])
                    .collect();
                let r = self
                    .script::<i64, _, _>(&pool, &REMOVE_IF_SCORE, index, args)
                    .await;
                if let Err(e) = self.observe("zrem", r) {
                    return (removed, Err(e));
                }
            }
        }
        (removed, Ok(()))
    }

    /// The cached paths matching a glob pattern (ZSCAN of the path registry, a page of
    /// at most about 1,000 members per command).
    pub(crate) async fn matching_paths(
        &self,
        paths_key: &str,
        pattern: &str,
    ) -> Result<Vec<String>, FredError> {
        use fred::types::scan::Scanner;
        use futures_util::StreamExt;
        let client = self.inner.pool.next_connected();
        let mut pages = std::pin::pin!(client.zscan(paths_key, pattern, Some(1000)));
        let mut paths = Vec::new();
        while let Some(page) = pages.next().await {
            let mut page = self.observe("zscan", page)?;
            for (member, _) in page.take_results().unwrap_or_default() {
                if let Some(p) = member.as_string() {
                    paths.push(p);
                }
            }
        }
        paths.sort_unstable();
        paths.dedup();
        Ok(paths)
    }

    /// Deletes every key matching the patterns on every primary (SCAN, never KEYS), in
    /// pages with UNLINK; returns how many keys matched pattern number `counted`.
    pub(crate) async fn scan_unlink(
        &self,
        patterns: &[String],
        counted: usize,
    ) -> Result<u64, Incomplete> {
        use fred::types::scan::Scanner;
        use futures_util::StreamExt;
        let client = self.inner.pool.next_connected();
        let mut counted_removed = 0;
        let mut ignored = 0;
        let incomplete = |removed, error| Incomplete { removed, error };
        for (i, pattern) in patterns.iter().enumerate() {
            let mut pages = if self.inner.pool.is_clustered() {
                client
                    .scan_cluster(pattern.as_str(), Some(1000), None)
                    .boxed()
            } else {
                client.scan(pattern.as_str(), Some(1000), None).boxed()
            };
            while let Some(page) = pages.next().await {
                let mut page = self
                    .observe("scan", page)
                    .map_err(|e| incomplete(counted_removed, e))?;
                let keys: Vec<String> = page
                    .take_results()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|k| k.into_string())
                    .collect();
                let into = if i == counted {
                    &mut counted_removed
                } else {
                    &mut ignored
                };
                if let Err(e) = self.unlink_counted(client, keys, into).await {
                    return Err(incomplete(counted_removed, e));
                }
            }
        }
        Ok(counted_removed)
    }
}

/// The most keys (UNLINK) or index members (ZSCAN's page, the conditional removal from an
/// index) that one command of an invalidation carries: Redis is never busy with one of
/// them for long, whatever the size of the index (about 0.4 ms each at the median on a
/// loaded 2-core machine, `cargo bench --bench hostile`; 500 took twice that for the same
/// total time and a longer tail for the hits around them).
const SLICE: usize = 250;

/// Commands of one unlink out at once (a page's keys on a cluster are one command per hash
/// slot).
const IN_FLIGHT: usize = 8;

/// Indexes drained at once by one invalidation (a pattern may match many paths).
const INDEXES_AT_ONCE: usize = 4;

/// Pauses entry writes while Redis is (nearly) out of memory and cannot evict, so that the
/// cache never fills it: with `maxmemory-policy noeviction`, a full Redis refuses every
/// write (OOM), and the entries a caller meant to invalidate would stay. Two signals:
/// - `INFO memory`, asked by a write at most once a second: with `noeviction`, writes pause
///   while `used_memory` is at [`PAUSE_ABOVE`] of `maxmemory` or more (on a cluster, the
///   fullest primary's). Between looks, the bytes this process writes are added to the last
///   reading, and a write that would take the estimate past the threshold looks again
///   first (at most every 20 ms), so a burst of writes cannot fill Redis between two looks;
/// - any command answered with OOM pauses writes for [`OOM_PAUSE`], whatever the policy.
///
/// Invalidations are never paused, and their writes (the sequence and markers) run with
/// `allow-oom`; deletes are allowed under OOM anyway.
pub(crate) struct MemoryGuard {
    epoch: Instant,
    /// Writes are paused until then (ms since `epoch`), after an OOM answer.
    paused_until: AtomicU64,
    /// When the last look was claimed (ms since `epoch`; `u64::MAX`: never).
    last_look: AtomicU64,
    /// The last look's `used_memory` and pause threshold in bytes (0: no threshold, Redis
    /// evicts or is unbounded).
    used: AtomicU64,
    limit: AtomicU64,
    /// Bytes this process wrote since the last look (estimated).
    since: AtomicU64,
    /// Whether writes were paused for memory at the last look (for one log line per change).
    full: AtomicBool,
    /// Set when Redis refuses INFO (ACL): only OOM answers pause writes.
    no_info: AtomicBool,
}

/// The share of `maxmemory` past which entry writes pause under `noeviction`.
pub(crate) const PAUSE_ABOVE: f64 = 0.9;
/// How often a write looks at Redis's memory.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// How often at most, when this process's own writes near the threshold.
const LOOK_AT_MOST_EVERY: Duration = Duration::from_millis(20);
/// How long writes pause after an OOM answer.
pub(crate) const OOM_PAUSE: Duration = Duration::from_secs(2);

impl MemoryGuard {
    fn new() -> Self {
        MemoryGuard {
            epoch: Instant::now(),
            paused_until: AtomicU64::new(0),
            last_look: AtomicU64::new(u64::MAX),
            used: AtomicU64::new(0),
            limit: AtomicU64::new(0),
            since: AtomicU64::new(0),
            full: AtomicBool::new(false),
            no_info: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Redis answered a command with OOM.
    pub(crate) fn out_of_memory(&self) {
        let now = self.now_ms();
        if now >= self.paused_until.load(Ordering::Acquire) {
            tracing::warn!(
                pause_ms = OOM_PAUSE.as_millis() as u64,
                "redis is out of memory; cache writes paused (invalidations still run)"
            );
        }
        self.paused_until.fetch_max(
            now.saturating_add(OOM_PAUSE.as_millis() as u64),
            Ordering::AcqRel,
        );
    }

    /// Whether the estimate (last reading plus this process's writes since) is past the
    /// threshold.
    fn over(&self) -> bool {
        let limit = self.limit.load(Ordering::Acquire);
        limit > 0
            && self
                .used
                .load(Ordering::Acquire)
                .saturating_add(self.since.load(Ordering::Acquire))
                >= limit
    }

    fn paused(&self) -> bool {
        self.now_ms() < self.paused_until.load(Ordering::Acquire) || self.over()
    }

    /// True for the one caller that should look at Redis's memory now: a second after the
    /// last look, or sooner when the estimate is past the threshold.
    fn claim_look(&self) -> bool {
        if self.no_info.load(Ordering::Relaxed) {
            return false;
        }
        let now = self.now_ms();
        let last = self.last_look.load(Ordering::Acquire);
        let due = last == u64::MAX
            || now.saturating_sub(last) >= LOOK_EVERY.as_millis() as u64
            || (self.over() && now.saturating_sub(last) >= LOOK_AT_MOST_EVERY.as_millis() as u64);
        due && self
            .last_look
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// What a look found: the fullest server's `used_memory` and `maxmemory` under
    /// `noeviction` (`None`: no server is bounded and non-evicting).
    fn looked(&self, fullest: Option<(u64, u64)>) {
        let (used, max) = fullest.unwrap_or((0, 0));
        let limit = (max as f64 * PAUSE_ABOVE) as u64;
        self.used.store(used, Ordering::Release);
        self.limit.store(limit, Ordering::Release);
        self.since.store(0, Ordering::Release);
        let full = limit > 0 && used >= limit;
        if self.full.swap(full, Ordering::AcqRel) != full {
            if full {
                tracing::warn!(
                    used_memory = used,
                    maxmemory = max,
                    "redis is nearly full and does not evict (noeviction); cache writes paused"
                );
            } else {
                tracing::info!("redis has room again; cache writes resume");
            }
        }
    }

    /// A write of about `bytes` goes to Redis.
    fn wrote(&self, bytes: usize) {
        self.since
            .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::AcqRel);
    }
}

/// `used_memory` and `maxmemory` from an `INFO memory` reply, if `maxmemory` is set and
/// the policy is `noeviction` (other policies make room by evicting).
fn memory_use(info: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let used: u64 = field("used_memory")?.parse().ok()?;
    let max: u64 = field("maxmemory")?.parse().ok()?;
    (max > 0 && field("maxmemory_policy")? == "noeviction").then_some((used, max))
}

impl RedisStore {
    /// Whether entry writes are paused now (looking at Redis's memory first when a look is
    /// due; see `MemoryGuard`).
    async fn writes_paused(&self) -> bool {
        let guard = &self.inner.memory;
        if guard.claim_look() {
            match self.fullest().await {
                Ok(fullest) => guard.looked(fullest),
                Err(e) if refused_for_good(&e) => {
                    tracing::debug!(error = %e.details(), "INFO refused; only out-of-memory answers pause writes");
                    guard.no_info.store(true, Ordering::Relaxed);
                }
                // Unreachable or slow: the write itself will tell.
                Err(_) => {}
            }
        }
        guard.paused()
    }

    /// The fullest primary's memory use under `noeviction` (`INFO memory` of each): its
    /// `used_memory` and `maxmemory`.
    async fn fullest(&self) -> Result<Option<(u64, u64)>, FredError> {
        use fred::types::InfoKind;
        let client = self.inner.pool.next_connected();
        // On a cluster the pool's connections are to the primaries.
        let servers: Vec<Option<fred::types::config::Server>> = if self.inner.pool.is_clustered() {
            client.active_connections().into_iter().map(Some).collect()
        } else {
            vec![None]
        };
        let mut fullest: Option<(u64, u64)> = None;
        for server in servers {
            let options = Options {
                cluster_node: server,
                ..self.inner.write.clone()
            };
            let info = client
                .with_options(&options)
                .info::<String>(Some(InfoKind::Memory))
                .await;
            if let Some((used, max)) = memory_use(&self.observe("info", info)?) {
                // The fullest is the one with the least room left before its threshold.
                let room = |(u, m): (u64, u64)| (m as f64 * PAUSE_ABOVE) as i128 - i128::from(u);
                if fullest.map_or(true, |f| room((used, max)) < room(f)) {
                    fullest = Some((used, max));
                }
            }
        }
        Ok(fullest)
    }
}

impl RedisStore {
    /// Runs every kind of command the cache uses on throw-away keys under `prefix`, so that
    /// a missing ACL permission shows at start-up. Redis unreachable: `Ok` (nothing to
    /// check now; logged).
    pub(crate) async fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = format!("{prefix}:probe");
        let index = format!("{prefix}:probe:ix");
        let pool = self
            .inner
            .pool
            .next_connected()
            .with_options(&self.inner.write);
        let nonce = Bytes::from_static(b"probe!!!");
        let value = crate::entry::Entry::encode(
            http::StatusCode::OK,
            &http::HeaderMap::new(),
            None,
            &[],
            *b"probe!!!",
            crate::entry::Timing {
                stored_at_ms: 0,
                ttl_ms: 1,
                swr_ms: 0,
                sie_ms: 0,
                delta_ms: 0,
            },
        );
        let value_again = value.clone();
        let steps = async {
            pool.ping::<()>(None).await?;
            pool.set::<(), _, _>(&key, value, Some(Expiration::PX(5000)), None, false)
                .await?;
            pool.get::<Option<Bytes>, _>(&key).await?;
            pool.mget::<Vec<Option<Bytes>>, _>(vec![key.as_str()])
                .await?;
            self.script::<i64, _, _>(
                &pool,
                &ADD_TO_INDEX,
                index.as_str(),
                index_args(5000, &[&key]),
            )
            .await?;
            let pending = pending_key(&key);
            pool.set::<(), _, _>(
                &pending,
                value_again,
                Some(Expiration::PX(5000)),
                None,
                false,
            )
            .await?;
            self.script::<i64, _, _>(
                &pool,
                &CONFIRM,
                vec![pending.as_str(), key.as_str()],
                vec![
                    nonce.clone(),
                    Bytes::from_static(&[crate::entry::CONFIRMED]),
                ],
            )
            .await?;
            self.script::<i64, _, _>(
                &pool,
                &RAISE_MARKER,
                key.as_str(),
                vec!["1".to_owned(), "5000".to_owned()],
            )
            .await?;
            pool.incr::<u64, _>(&key).await?;
            pool.zrange::<Vec<String>, _, _, _>(index.as_str(), 0, -1, None, false, None, false)
                .await?;
            pool.zrem::<i64, _, _>(index.as_str(), key.as_str()).await?;
            pool.set::<(), _, _>(&key, "x", Some(Expiration::PX(5000)), None, false)
                .await?;
            self.script::<i64, _, _>(&pool, &WITHDRAW, key.as_str(), vec![nonce])
                .await?;
            pool.scan_page::<(String, Vec<String>), _, _>(
                "0",
                format!("{prefix}:probe*"),
                Some(10),
                None,
            )
            .await?;
            // One key per command: on a cluster the two are in different slots.
            pool.unlink::<u64, _>(key.clone()).await?;
            pool.unlink::<u64, _>(index.clone()).await?;
            Ok::<(), FredError>(())
        };
        match steps.await {
            Ok(()) => Ok(()),
            Err(e) if refused_for_good(&e) => Err(ConfigError::Permission(e.details().to_owned())),
            Err(e) if answered(&e) => {
                // Out of memory, a read-only replica during a failover...: passing states.
                tracing::warn!(error = %e.details(), "redis refused a command during the permission check");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e.details(), "redis unreachable: permissions not checked");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{NONCE_OFFSET, STATE_OFFSET};

    #[test]
    fn scripts_use_the_envelope_offsets() {
        // Lua's GETRANGE/SETRANGE offsets are 0-based and GETRANGE's end is inclusive.
        let nonce = format!("GETRANGE', KEYS[1], {}, {}", NONCE_OFFSET, NONCE_OFFSET + 7);
        assert!(CONFIRM.text.contains(&nonce) && WITHDRAW.text.contains(&nonce));
        assert!(CONFIRM
            .text
            .contains(&format!("SETRANGE', KEYS[2], {STATE_OFFSET},")));
    }
}
