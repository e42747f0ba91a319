//! Behaviour tests that run against both stores: a redis-server of the test's own, and the
//! in-process `MemoryStore`. A test is an `async fn(Kind)`; `on_both_stores!` makes one
//! `#[tokio::test]` per store of it.

use std::time::Duration;

use tower_redis_cache::{MemoryStore, RedisStore, Store};

use super::RedisServer;

/// Which store a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Memory,
}

/// The store of one test, and what the test can inspect of it.
pub enum Backing {
    Redis(RedisServer),
    Memory(MemoryStore),
}

impl Backing {
    /// A store without a memory bound worth the name (64 MiB).
    pub fn start(kind: Kind) -> Self {
        match kind {
            Kind::Redis => Backing::Redis(RedisServer::start()),
            Kind::Memory => Backing::Memory(MemoryStore::new(64 << 20)),
        }
    }

    /// A store bounded to `max_bytes`, evicting the least recently used entries past it:
    /// Redis with `maxmemory` and `allkeys-lru`, or a `MemoryStore` of that size.
    pub fn bounded(kind: Kind, max_bytes: u64) -> Self {
        match kind {
            Kind::Redis => Backing::Redis(RedisServer::start_with(
                &[
                    "--maxmemory".into(),
                    max_bytes.to_string(),
                    "--maxmemory-policy".into(),
                    "allkeys-lru".into(),
                ],
                false,
            )),
            Kind::Memory => Backing::Memory(MemoryStore::new(max_bytes)),
        }
    }

    /// A store for a layer (a new pool each call for Redis; the same memory for the other).
    pub async fn store(&self) -> Store {
        self.store_with(Duration::from_secs(1)).await
    }

    /// As [`store`](Self::store), with a lookup deadline for Redis.
    pub async fn store_with(&self, lookup: Duration) -> Store {
        match self {
            Backing::Redis(server) => {
                let config = super::relaxed_config(&server.url()).lookup_timeout(lookup);
                RedisStore::connect(config).await.expect("connect").into()
            }
            Backing::Memory(store) => store.clone().into(),
        }
    }

    /// Keys matching a glob pattern, sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        match self {
            Backing::Redis(server) => {
                let mut keys = server.keys(pattern);
                keys.sort_unstable();
                keys
            }
            Backing::Memory(store) => store.keys(pattern),
        }
    }

    /// Bytes the store holds as its bound counts them: Redis's `used_memory`, or the
    /// memory store's weighted size.
    pub fn used_bytes(&self) -> u64 {
        match self {
            Backing::Redis(server) => server
                .info("memory")
                .lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("used_memory"),
            Backing::Memory(store) => store.used_bytes(),
        }
    }
}

/// One `#[tokio::test]` per store for each `async fn(Kind)` named.
#[macro_export]
macro_rules! on_both_stores {
    ($($test:ident),+ $(,)?) => {
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::common::stores::Kind::Redis).await;
                }
            )+
        }
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::common::stores::Kind::Memory).await;
                }
            )+
        }
    };
}
