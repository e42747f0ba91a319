//! A small HTTP/1.1 keep-alive load client for loopback servers (tests and benchmarks).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One response: status, whether it was a hit, its body, and how long it took.
pub struct Reply {
    pub status: u16,
    pub hit: bool,
    pub body: Vec<u8>,
    pub took: Duration,
}

/// A keep-alive connection; reconnects after an error.
pub struct Conn {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Self {
        Conn { addr, stream: None }
    }

    /// GET `path`; `Err` on any transport or protocol error.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
        self.request("GET", path, headers, "").await
    }

    /// `method` on `path`, with a JSON `body` when it is not empty; `Err` on any transport or
    /// protocol error.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Reply, String> {
        let started = Instant::now();
        let exchange = self.exchange(method, path, headers, body);
        let r = tokio::time::timeout(Duration::from_secs(10), exchange).await;
        match r {
            Ok(Ok(mut reply)) => {
                reply.took = started.elapsed();
                Ok(reply)
            }
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                Err("timed out after 10 s".into())
            }
        }
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Reply, String> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .map_err(|e| e.to_string())?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            self.stream = Some(BufReader::new(s));
        }
        let stream = self.stream.as_mut().ok_or("no connection")?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() {
            let len = body.len();
            req.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {len}\r\n"
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        stream
            .get_mut()
            .write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        stream
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut len = None;
        let mut hit = false;
        loop {
            line.clear();
            stream
                .read_line(&mut line)
                .await
                .map_err(|e| e.to_string())?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((n, v)) = l.split_once(':') {
                let (n, v) = (n.trim().to_ascii_lowercase(), v.trim());
                if n == "content-length" {
                    len = v.parse::<usize>().ok();
                } else if n == "x-cache" {
                    hit = v == "HIT";
                }
            }
        }
        // 204 and 304 never have a body (RFC 9112 §6.3).
        let len = match (len, status) {
            (Some(n), _) => n,
            (None, 204 | 304) => 0,
            (None, _) => return Err("no content-length".into()),
        };
        let mut body = vec![0; len];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Reply {
            status,
            hit,
            body,
            took: Duration::ZERO,
        })
    }
}

/// Latency percentiles of a set of samples.
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration, Duration) {
    if samples.is_empty() {
        return (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), samples[samples.len() - 1])
}
