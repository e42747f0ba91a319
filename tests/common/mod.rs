//! Test harness: real `redis-server` processes on free loopback ports, owned by one test.
#![allow(dead_code)]

pub mod failover;
pub mod index;
pub mod load;
pub mod scenario;
pub mod stores;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// A redis-server of this test's own. Killed (by PID) when dropped.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    frozen: bool,
    cluster: bool,
    /// Extra arguments (TLS, passwords...). With TLS the server listens on `port` with TLS
    /// only, and readiness is a TCP connect.
    extra: Vec<String>,
    tls: bool,
    /// A sentinel: started from this configuration file with `--sentinel`.
    sentinel_conf: Option<PathBuf>,
    /// Whether a server ever ran on `port` (until then `restart` may move to another port).
    started: bool,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Self {
        for _ in 0..5 {
            let mut server = RedisServer::unstarted();
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server (is it installed?)");
    }

    /// Like `unstarted`, on a port a cluster node can use: its bus listens on port + 10000,
    /// so the port must be at most 55535 and that one free too.
    pub fn unstarted_cluster_node() -> Self {
        loop {
            let server = RedisServer::unstarted();
            let bus = u32::from(server.port) + 10_000;
            if bus <= 65_535 && TcpListener::bind(("127.0.0.1", bus as u16)).is_ok() {
                return server;
            }
        }
    }

    /// A free port on which nothing listens yet; `restart` starts a server there later.
    pub fn unstarted() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("trc-redis-{}-{port}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        RedisServer {
            child: None,
            port,
            dir,
            frozen: false,
            cluster: false,
            extra: Vec::new(),
            tls: false,
            sentinel_conf: None,
            started: false,
        }
    }

    fn spawn(&mut self) -> bool {
        if let Some(conf) = &self.sentinel_conf {
            let child = Command::new("redis-server")
                .arg(conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let Ok(child) = child else { return false };
            return self.wait_ready(child);
        }
        let port = self.port.to_string();
        let (port_flag, tls_port): (&str, Vec<&str>) = if self.tls {
            ("0", vec!["--tls-port", &port])
        } else {
            (&port, vec![])
        };
        let child = Command::new("redis-server")
            .args(["--port", port_flag])
            .args(&tls_port)
            .args(&self.extra)
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(if self.cluster {
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                    // Replicas fail over even before their first sync completed (tests are young).
                    "--cluster-replica-validity-factor",
                    "0",
                ][..]
            } else {
                &[][..]
            })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else { return false };
        self.wait_ready(child)
    }

    fn wait_ready(&mut self, mut child: Child) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // exited: port taken
            }
            let ready = if self.tls {
                TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            } else {
                // Ours, not another test's server that took the port first.
                ping(self.port) && server_pid(self.port) == Some(child.id())
            };
            if ready {
                self.child = Some(child);
                self.started = true;
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// A server with extra arguments, started on a free port.
    pub fn start_with(extra: &[String], tls: bool) -> Self {
        let mut server = RedisServer::unstarted();
        server.extra = extra.to_vec();
        server.tls = tls;
        server.restart();
        server
    }

    /// A sentinel monitoring `master_port` as `mymaster` (quorum 2, down after 1 s).
    pub fn start_sentinel(master_port: u16) -> Self {
        let mut s = RedisServer::unstarted();
        let conf = s.dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                 sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 2000\n\
                 sentinel parallel-syncs mymaster 1\n",
                s.port,
                s.dir.display()
            ),
        )
        .expect("sentinel.conf");
        s.sentinel_conf = Some(conf);
        s.restart();
        s
    }

    /// The folder the server runs in (for certificates and the like).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let status = Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .expect("kill");
            assert!(status.success(), "kill {sig} {pid}");
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.frozen {
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .status();
                self.frozen = false;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: sockets stay open, nothing answers.
    pub fn freeze(&mut self) {
        self.signal("-STOP");
        self.frozen = true;
    }

    /// SIGCONT.
    pub fn thaw(&mut self) {
        self.signal("-CONT");
        self.frozen = false;
    }

    /// Starts (again) on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "could not restart redis on {}",
                self.port
            );
            if !self.started && self.sentinel_conf.is_none() {
                // Never ran here: the port was taken since it was picked; take another.
                self.port = if self.cluster {
                    RedisServer::unstarted_cluster_node().port
                } else {
                    free_port()
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `process_id` that the server on `port` reports (`INFO server`, over a raw socket).
fn server_pid(port: u16) -> Option<u32> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    s.write_all(b"INFO server\r\n").ok()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    // A bulk string: `$<len>\r\n<text>\r\n`; read until the field shows up.
    while !String::from_utf8_lossy(&reply).contains("process_id:") || !reply.ends_with(b"\r\n") {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.len() > 1 << 16 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&reply);
    let line = text.lines().find(|l| l.starts_with("process_id:"))?;
    line.trim_start_matches("process_id:").trim().parse().ok()
}

/// Sends PING over a raw socket; true on +PONG.
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    matches!(s.read_exact(&mut buf), Ok(())) && &buf == b"+PONG\r\n"
}

/// Polls `f` every 5 ms until it is true; panics after 10 s.
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A response read whole.
pub struct Got {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("-")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn read(res: Response<Body>) -> Got {
    let (parts, body) = res.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

/// Sends one request through a router (no network).
pub async fn send(app: &axum::Router, req: Request<Body>) -> Got {
    read(app.clone().oneshot(req).await.expect("infallible")).await
}

pub fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).expect("request")
}

pub fn get_with(uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut b = Request::get(uri);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Body::empty()).expect("request")
}

/// A Redis Cluster of `n` primaries (no replicas) on free loopback ports, for one test
/// binary. Dropped: every node is killed.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(n: usize) -> Self {
        Self::start_with_replicas(n, 0)
    }

    /// `primaries` primaries with `replicas` replicas each.
    pub fn start_with_replicas(primaries: usize, replicas: usize) -> Self {
        let n = primaries * (1 + replicas);
        let mut nodes = Vec::new();
        for _ in 0..n {
            let mut node = RedisServer::unstarted_cluster_node();
            node.cluster = true;
            node.restart();
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(status.success(), "redis-cli --cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            loop {
                let out = Command::new("redis-cli")
                    .args(["-p", &node.port().to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli");
                if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster never became ok");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        RedisCluster { nodes }
    }

    /// The node that serves `key`'s slot as primary now.
    pub fn primary_of(&self, key: &str) -> usize {
        for (i, n) in self.nodes.iter().enumerate() {
            let out = Command::new("redis-cli")
                .args(["-p", &n.port().to_string(), "cluster", "keyslot", key])
                .output()
                .expect("redis-cli");
            let slot: u16 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0);
            let out = Command::new("redis-cli")
                .args(["-p", &n.port().to_string(), "cluster", "nodes"])
                .output()
                .expect("redis-cli");
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 9 || !f[2].contains("myself") || !f[2].contains("master") {
                    continue;
                }
                for range in &f[8..] {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) {
                        if (a..=b).contains(&slot) {
                            return i;
                        }
                    }
                }
            }
        }
        panic!("no primary serves {key}");
    }

    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port());
        for (i, n) in self.nodes.iter().enumerate().skip(1) {
            url.push_str(if i == 1 { "?" } else { "&" });
            url.push_str(&format!("node=127.0.0.1:{}", n.port()));
        }
        url
    }

    /// Keys of every primary matching a pattern (redis-cli --scan per node). Replicas are
    /// skipped: they may still hold a key just removed from their primary.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys = Vec::new();
        for n in &self.nodes {
            let role = Command::new("redis-cli")
                .args(["-p", &n.port().to_string(), "role"])
                .output()
                .expect("redis-cli");
            if String::from_utf8_lossy(&role.stdout).lines().next() != Some("master") {
                continue;
            }
            let out = Command::new("redis-cli")
                .args(["-p", &n.port().to_string(), "--scan", "--pattern", pattern])
                .output()
                .expect("redis-cli");
            keys.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_owned),
            );
        }
        keys
    }
}

impl RedisServer {
    /// A section of `INFO` (redis-cli).
    pub fn info(&self, section: &str) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "info", section])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Keys matching a pattern (redis-cli --scan).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--scan", "--pattern", pattern])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// A configuration for behaviour tests: a generous lookup deadline, so that a loaded machine
/// cannot turn an expected hit into a miss. Tests of deadlines use the defaults.
pub fn relaxed_config(url: &str) -> tower_redis_cache::RedisConfig {
    tower_redis_cache::RedisConfig::from_url(url)
        .expect("url")
        .lookup_timeout(Duration::from_secs(1))
        // A slow start must not open the circuit breaker before the first request.
        .connect_timeout(Duration::from_secs(5))
}
