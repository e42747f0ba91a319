//! Large indexes, made fast and exactly as the layer makes them, and Redis's own record of
//! its slowest commands.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::RedisServer;

/// One command in Redis's wire protocol (RESP), binary-safe.
fn resp(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Copies the entry at `real` under every key of `keys`, and adds each of them to every
/// index (`{namespace}:ix:*`) that holds `real`, scored as the layer scores (expiry in ms):
/// what the layer leaves after requests for those keys, without sending them. The copies
/// live `ttl`. Sent with `redis-cli --pipe`; panics if Redis reports an error.
pub fn clone_entry(
    server: &RedisServer,
    namespace: &str,
    real: &str,
    keys: &[String],
    ttl: Duration,
) {
    let port = server.port().to_string();
    // DUMP's payload, for RESTORE: binary, so read it with the protocol instead of the CLI.
    let payload = dump(server.port(), real);
    let indexes: Vec<String> = server
        .keys(&format!("{namespace}:ix:*"))
        .into_iter()
        .filter(|ix| {
            let out = Command::new("redis-cli")
                .args(["-p", &port, "ZSCORE", ix, real])
                .output()
                .expect("redis-cli");
            !String::from_utf8_lossy(&out.stdout).trim().is_empty()
        })
        .collect();
    assert!(!indexes.is_empty(), "{real} is in no index");
    let ttl_ms = ttl.as_millis() as u64;
    let score = (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + ttl_ms)
        .to_string();
    let ttl_ms = ttl_ms.to_string();
    let mut out = Vec::with_capacity(keys.len() * 400);
    for key in keys {
        resp(
            &mut out,
            &[
                b"RESTORE",
                key.as_bytes(),
                ttl_ms.as_bytes(),
                &payload,
                b"REPLACE",
            ],
        );
        for ix in &indexes {
            resp(
                &mut out,
                &[b"ZADD", ix.as_bytes(), score.as_bytes(), key.as_bytes()],
            );
        }
    }
    let mut child = Command::new("redis-cli")
        .args(["-p", &port, "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli --pipe");
    child.stdin.take().unwrap().write_all(&out).unwrap();
    let done = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&done.stdout);
    assert!(text.contains("errors: 0"), "{text}");
}

/// `DUMP key` over a raw socket: the serialized value, byte for byte.
fn dump(port: u16, key: &str) -> Vec<u8> {
    use std::io::{BufRead, BufReader, Read};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut cmd = Vec::new();
    resp(&mut cmd, &[b"DUMP", key.as_bytes()]);
    s.write_all(&cmd).unwrap();
    let mut r = BufReader::new(s);
    let mut header = String::new();
    r.read_line(&mut header).unwrap();
    let len: usize = header
        .trim()
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("DUMP {key}: {header}"));
    let mut payload = vec![0; len + 2];
    r.read_exact(&mut payload).unwrap();
    payload.truncate(len);
    payload
}

/// Members of a sorted set.
pub fn zcard(server: &RedisServer, key: &str) -> u64 {
    let out = Command::new("redis-cli")
        .args(["-p", &server.port().to_string(), "ZCARD", key])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Runs a redis-cli command on the server, returning its output.
pub fn cli(server: &RedisServer, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &server.port().to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts recording every command slower than `micros` (and forgets earlier ones).
pub fn slowlog_from(server: &RedisServer, micros: u64) {
    cli(server, &["CONFIG", "SET", "slowlog-max-len", "100000"]);
    cli(
        server,
        &[
            "CONFIG",
            "SET",
            "slowlog-log-slower-than",
            &micros.to_string(),
        ],
    );
    cli(server, &["SLOWLOG", "RESET"]);
}

/// A command Redis recorded in its slow log.
#[derive(Clone, Debug, Default)]
pub struct Slow {
    pub took: Duration,
    pub name: String,
    /// Its arguments, the command's name included (Redis keeps 32 and counts the others).
    pub args: usize,
}

/// The commands recorded since [`slowlog_from`], slowest first (but the reading of the
/// log itself).
pub fn slowlog(server: &RedisServer) -> Vec<Slow> {
    let out = cli(server, &["-2", "--json", "SLOWLOG", "GET", "100000"]);
    let entries: serde_json::Value = serde_json::from_str(out.trim()).expect("slowlog json");
    let mut slow: Vec<Slow> = entries
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    let us = e.get(2)?.as_u64()?;
                    let args = e.get(3)?.as_array()?;
                    let name = args.first()?.as_str()?.to_ascii_uppercase();
                    if matches!(name.as_str(), "SLOWLOG" | "CONFIG") {
                        return None; // the test's own
                    }
                    // The last of 32 kept arguments reads "... (N more arguments)".
                    let more = args
                        .last()
                        .and_then(|a| a.as_str())
                        .and_then(|a| a.strip_prefix("... ("))
                        .and_then(|a| a.split(' ').next())
                        .and_then(|n| n.parse::<usize>().ok());
                    let args = match more {
                        Some(n) => args.len() - 1 + n,
                        None => args.len(),
                    };
                    Some(Slow {
                        took: Duration::from_micros(us),
                        name,
                        args,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    slow.sort_by_key(|s| std::cmp::Reverse(s.took));
    slow
}
